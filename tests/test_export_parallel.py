"""Lowering a program's methods in two processes (export/parallel_lowering.py): which methods go to the second
process, the same program as one process lowers, the child's failures raised here, no child left behind.

Small traced stacks of linears stand in for a VLM's methods (the demo export's byte-identity is in
test_export_executorch.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from torch import nn

from export import parallel_lowering
from export.parallel_lowering import (
    LoweringProcessError,
    has_control_flow,
    lower_in_two_processes,
    second_process_methods,
)

needs_fork = pytest.mark.skipif(
    not hasattr(os, "fork") or parallel_lowering.usable_cpus() < 2,
    reason="two-process lowering needs fork and 2+ CPUs",
)


class Stack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Looped(nn.Module):
    """A method with control flow (a scan, as the selection's), which exir's serde cannot carry."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.scan import scan

        def step(carry, row):
            return carry + row, carry * row

        total, _ = scan(step, torch.zeros_like(x[0]), x)
        return total


def _trace(module: nn.Module, width: int = 8) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module.eval(), (torch.randn(4, width),), strict=False)


@pytest.fixture()
def programs() -> dict[str, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    return {"vision_encoder": _trace(Stack(8, 3)), "token_embedding": _trace(Stack(8, 1)),
            "text_decoder": _trace(Stack(8, 2))}


def _to_edge(programs: dict, constants: dict):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(programs, partitioner={name: [XnnpackPartitioner()] for name in programs},
                                       constant_methods=constants)


@needs_fork
def test_the_largest_method_stays_and_control_flow_never_moves(programs, monkeypatch):
    assert not has_control_flow(programs["text_decoder"])
    assert second_process_methods(programs, jobs=2) == ["token_embedding", "text_decoder"]
    assert second_process_methods(programs, jobs=1) == []
    assert second_process_methods({"vision_encoder": programs["vision_encoder"]}, jobs=2) == []

    looped = {"vision_encoder": _trace(Looped()), **{k: v for k, v in programs.items() if k != "vision_encoder"}}
    assert has_control_flow(looped["vision_encoder"])
    assert second_process_methods(looped, jobs=2) == ["token_embedding", "text_decoder"]
    assert second_process_methods({"a": _trace(Looped()), "b": _trace(Looped())}, jobs=2) == []

    weights = sum(t.numel() * t.element_size() for p in programs.values() for t in p.state_dict.values())
    monkeypatch.setattr(parallel_lowering, "PARALLEL_MAX_WEIGHT_BYTES", weights - 1)
    assert second_process_methods(programs, jobs=2) == []  # too large to hand between processes


@needs_fork
def test_two_processes_write_the_program_one_process_writes(programs):
    constants = {"get_max_seq_len": 64}
    alone = _to_edge(programs, constants)
    parent = os.getpid()
    where: dict[str, int] = {}

    def lower(group: dict, methods: dict):
        if os.getpid() == parent:  # the child's record stays in the child; the parent sees only its own share
            where.update({name: os.getpid() for name in group})
        return _to_edge(group, methods)

    together = lower_in_two_processes(programs, ["token_embedding", "text_decoder"], lower, constants)
    assert where == {"vision_encoder": parent}
    assert together.to_executorch().buffer == alone.to_executorch().buffer
    assert not multiprocessing.active_children()


@needs_fork
def test_the_childs_error_is_raised_here(programs):
    parent = os.getpid()

    def lower(group: dict, methods: dict):
        if os.getpid() != parent:
            raise ValueError("max_seq_len=4 cannot hold the prompt")
        return _to_edge(group, methods)

    with pytest.raises(ValueError, match="max_seq_len=4 cannot hold the prompt"):
        lower_in_two_processes(programs, ["text_decoder"], lower, {})

    def fails_oddly(group: dict, methods: dict):
        if os.getpid() != parent:
            raise LookupError("no kernel")  # not a built-in error the options can fix: named with its traceback
        return _to_edge(group, methods)

    with pytest.raises(LoweringProcessError, match=r"(?s)text_decoder in a second process failed: LookupError: no "
                                                   r"kernel.*--jobs 1"):
        lower_in_two_processes(programs, ["text_decoder"], fails_oddly, {})
    assert not multiprocessing.active_children()


@needs_fork
def test_a_child_that_dies_is_reported_with_the_fix(programs):
    parent = os.getpid()

    def lower(group: dict, methods: dict):
        if os.getpid() != parent:
            os._exit(9)  # as if killed for memory: no message ever comes
        return _to_edge(group, methods)

    with pytest.raises(LoweringProcessError, match=r"ended without a result \(exit code 9.*--jobs 1"):
        lower_in_two_processes(programs, ["text_decoder"], lower, {})
    assert not multiprocessing.active_children()


@needs_fork
def test_an_interrupted_export_leaves_no_child(programs):
    parent = os.getpid()

    def lower(group: dict, methods: dict):
        if os.getpid() == parent:
            raise KeyboardInterrupt  # Ctrl-C while this side lowers; the child would still be working
        import time

        time.sleep(60)
        return _to_edge(group, methods)

    with pytest.raises(KeyboardInterrupt):
        lower_in_two_processes(programs, ["text_decoder"], lower, {})
    assert not multiprocessing.active_children()
