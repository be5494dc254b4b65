"""Lowering a program's methods in two processes (export/parallel_lowering.py): which methods go to the second
process, the same program as one process lowers, the child's failures raised here, no child left behind.

Small stacks of linears stand in for a VLM's methods (the demo export's byte-identity is in
test_export_executorch.py)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

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


def _plan(name: str, module: nn.Module, control_flow: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, module=module, control_flow=control_flow)  # what a MethodPlan tells


@pytest.fixture()
def plans() -> list[SimpleNamespace]:
    torch.manual_seed(0)
    return [_plan("vision_encoder", Stack(8, 3)), _plan("token_embedding", Stack(8, 1)),
            _plan("text_decoder", Stack(8, 2))]


def _to_edge(programs: dict, constants: dict):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(programs, partitioner={name: [XnnpackPartitioner()] for name in programs},
                                       constant_methods=constants)


def _maker(plans: list, child=None, parent=None):
    """make(methods, constants, progress) for lower_in_two_processes: trace and lower; ``child`` / ``parent``, if
    given, run first on the side they name."""
    modules = {plan.name: plan.module for plan in plans}
    main = os.getpid()

    def make(group: list[str], constants: dict, progress):
        hook = parent if os.getpid() == main else child
        if hook is not None:
            hook()
        progress("trace")
        programs = {name: _trace(modules[name]) for name in group}
        progress("lower")
        return _to_edge(programs, constants)

    return make


@needs_fork
def test_the_first_method_stays_and_control_flow_never_moves(plans, monkeypatch):
    assert second_process_methods(plans, jobs=2) == ["token_embedding", "text_decoder"]
    assert second_process_methods(plans, jobs=1) == []
    assert second_process_methods(plans[:1], jobs=2) == []

    looped = [_plan("vision_encoder", Looped(), control_flow=True), *plans[1:]]
    assert second_process_methods(looped, jobs=2) == ["token_embedding", "text_decoder"]
    assert second_process_methods([_plan("a", Looped(), True), _plan("b", Looped(), True)], jobs=2) == []

    weights = sum(t.numel() * t.element_size() for plan in plans for t in plan.module.state_dict().values())
    monkeypatch.setattr(parallel_lowering, "PARALLEL_MAX_WEIGHT_BYTES", weights - 1)
    assert second_process_methods(plans, jobs=2) == []  # too large to hand between processes


def test_control_flow_is_what_serde_cannot_carry():
    assert has_control_flow(_trace(Looped()))
    assert not has_control_flow(_trace(Stack(8, 2)))
    lowered = _to_edge({"forward": _trace(Stack(8, 2))}, {}).exported_program()
    assert "executorch_call_delegate" in str(lowered.graph) and not has_control_flow(lowered)  # serde carries those


@needs_fork
def test_two_processes_write_the_program_one_process_writes(plans):
    constants = {"get_max_seq_len": 64}
    names = [plan.name for plan in plans]
    alone = _to_edge({name: _trace(plan.module) for name, plan in zip(names, plans)}, constants)
    stages: list[str] = []
    together = lower_in_two_processes(names, ["token_embedding", "text_decoder"], _maker(plans), constants,
                                      stages.append)
    assert stages == ["trace", "lower"]  # this side's; the child reports nothing
    assert together.to_executorch().buffer == alone.to_executorch().buffer
    assert not multiprocessing.active_children()


@needs_fork
def test_a_method_with_control_flow_is_refused_by_the_child(plans):
    looped = [plans[0], _plan("text_decoder", Looped())]  # a plan that does not say control_flow=True
    with pytest.raises(LoweringProcessError, match="text_decoder holds control flow.*control_flow=True"):
        lower_in_two_processes(["vision_encoder", "text_decoder"], ["text_decoder"], _maker(looped), {},
                               lambda stage: None)


@needs_fork
def test_the_childs_error_is_raised_here(plans):
    names = [plan.name for plan in plans]

    def fixable():
        raise ValueError("max_seq_len=4 cannot hold the prompt")

    with pytest.raises(ValueError, match="max_seq_len=4 cannot hold the prompt"):
        lower_in_two_processes(names, ["text_decoder"], _maker(plans, child=fixable), {}, lambda stage: None)

    class NoKernel(Exception):
        pass

    def odd():
        raise NoKernel("no kernel")  # not an error the options can fix: named, with the child's traceback

    with pytest.raises(LoweringProcessError, match=r"(?s)text_decoder in a second process failed: NoKernel: no "
                                                   r"kernel.*Traceback.*--jobs 1"):
        lower_in_two_processes(names, ["text_decoder"], _maker(plans, child=odd), {}, lambda stage: None)
    assert not multiprocessing.active_children()


@needs_fork
def test_a_child_that_dies_is_reported_with_the_fix(plans):
    def dies():
        os._exit(9)  # as if killed for memory: no message ever comes

    with pytest.raises(LoweringProcessError, match=r"ended without a result \(exit code 9.*--jobs 1"):
        lower_in_two_processes([p.name for p in plans], ["text_decoder"], _maker(plans, child=dies), {},
                               lambda stage: None)
    assert not multiprocessing.active_children()


@needs_fork
def test_a_child_that_dies_is_reported_while_another_process_holds_the_pipe(plans, tmp_path):
    """A process forked from the child (as a lowering tool's helper would be) keeps the pipe's write end open after
    the child dies: the end is seen all the same, at once, not when that process ends."""
    import signal
    import time

    helper = tmp_path / "helper.pid"

    def forks_then_dies():
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        helper.write_text(str(pid))
        os._exit(9)

    started = time.monotonic()
    try:
        with pytest.raises(LoweringProcessError, match=r"ended without a result \(exit code 9.*--jobs 1"):
            lower_in_two_processes([p.name for p in plans], ["text_decoder"], _maker(plans, child=forks_then_dies),
                                   {}, lambda stage: None)
        assert time.monotonic() - started < 30
    finally:
        if helper.exists():
            os.kill(int(helper.read_text()), signal.SIGKILL)
    assert not multiprocessing.active_children()


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie no one reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@needs_fork
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_child_ends_when_the_parent_is_killed(plans, tmp_path):
    """SIGKILL on the exporting process (no finally runs there) ends the lowering child too, instead of leaving it
    lowering for nothing."""
    import signal
    import time

    record = tmp_path / "child.pid"

    def works():
        record.write_text(str(os.getpid()))
        time.sleep(60)

    exporter = os.fork()
    if exporter == 0:  # the exporting process, killed while both sides work
        try:
            lower_in_two_processes([p.name for p in plans], ["text_decoder"],
                                   _maker(plans, child=works, parent=lambda: time.sleep(60)), {}, lambda stage: None)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(record.read_text())
    os.kill(exporter, signal.SIGKILL)
    os.waitpid(exporter, 0)
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _gone(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the lowering child outlived its killed parent")


@needs_fork
def test_an_interrupted_export_leaves_no_child(plans):
    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C while this side works; the child would still be working

    def slow():
        import time

        time.sleep(60)

    with pytest.raises(KeyboardInterrupt):
        lower_in_two_processes([p.name for p in plans], ["text_decoder"], _maker(plans, child=slow,
                                                                                 parent=interrupted), {},
                               lambda stage: None)
    assert not multiprocessing.active_children()


def test_carrying_a_program_back_does_not_warn(caplog, monkeypatch):
    """exir serde warns that a dynamic dimension's symbol "did not appear in the graph" when it makes it again from
    the range constraints (the text_decoder's T; harmless: the same program is written): the carried programs are
    read with that logger quiet, and its level is put back."""
    import logging

    from executorch.exir.serde import serialize as serde

    logger = logging.getLogger("executorch.exir.serde.export_serialize")

    def deserialize(artifact):
        logger.warning("Symbol s79 did not appear in the graph that was deserialized")  # as serde does
        return artifact

    monkeypatch.setattr(serde, "deserialize", deserialize)
    # The logger's own level, so that a CLI test run earlier in this process (quiet_libraries sets "executorch" to
    # ERROR, which this logger would inherit) cannot hide the warning the helper must silence.
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert parallel_lowering._deserialize("artifact") == "artifact"
        assert logger.level == logging.WARNING  # put back
        assert not [r for r in caplog.records if "did not appear" in r.getMessage()]
        deserialize("artifact")  # the same call outside the helper is heard
        assert [r for r in caplog.records if "did not appear" in r.getMessage()]
