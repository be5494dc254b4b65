"""export/edge_rewrites.py: the XNNPACK recipe's exact rewrites of an edge program before partitioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.common import ExportOptions
from export.edge_rewrites import inferred_view_shape, xnnpack_rewrites
from export.executorch_backends import BACKENDS, BackendRecipe, lower


class Heads(nn.Module):
    """A decoder-like block over a dynamic number of tokens T attending to a fixed memory (a static KV cache's
    place): a head split (view to [1, T, -1, 8]), two batched matmuls (aten.matmul writes an expand to the same
    shape before each operand), a merge of the heads and an unsqueeze off the trailing dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.memory = nn.Parameter(torch.randn(1, 4, 6, 8))  # [1, heads, slots, head_dim]
        self.out = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, T, 32] -> [1, 1, T, 32]
        tokens = x.shape[1]
        heads = self.proj(x).view(1, tokens, -1, 8).transpose(1, 2)  # [1, 4, T, 8]
        scores = torch.matmul(heads, self.memory.transpose(-1, -2)).softmax(-1)  # [1, 4, T, 6]
        mixed = torch.matmul(scores, self.memory).transpose(1, 2).reshape(1, tokens, 32)  # [1, T, 32]
        return self.out(mixed.unsqueeze(1))


def _traced(module: nn.Module) -> torch.export.ExportedProgram:
    tokens = torch.export.Dim("T", min=1, max=16)
    with torch.no_grad():
        return torch.export.export(module, (torch.randn(1, 5, 32),), dynamic_shapes=({1: tokens},), strict=False)


@pytest.fixture(scope="module")
def traced() -> torch.export.ExportedProgram:
    return _traced(Heads().eval())


def _lowered(module: nn.Module, recipe: BackendRecipe):
    """``module`` traced and lowered as pruner-export lowers a method (``lower``: which lets go of the traced
    program's weights, so each lowering traces afresh)."""
    options = ExportOptions(model="tiny-llava", target="executorch", jobs=1)
    return lower({"forward": _traced(module)}, recipe, options, {})


def _undelegated(edge) -> list[str]:
    """The top-level operators no delegate took: their names (``aten.view_copy.default``, ...)."""
    graph = edge.exported_program("forward").graph_module.graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"
            and "call_delegate" not in str(node.target) and "getitem" not in str(node.target)]


def _delegates(edge) -> int:
    graph = edge.exported_program("forward").graph_module.graph
    return sum("call_delegate" in str(node.target) for node in graph.nodes)


def test_inferred_view_shape_infers_the_one_symbolic_size(traced):
    symbolic = next(node.meta["val"].shape[1] for node in traced.graph.nodes if node.op == "placeholder"
                    and node.meta["val"].dim() == 3)  # T
    assert not isinstance(symbolic, int)
    assert inferred_view_shape([1, symbolic, 4, 8]) == [1, -1, 4, 8]
    assert inferred_view_shape([2, 3]) == [2, 3]
    assert inferred_view_shape([symbolic, symbolic]) is None  # two unknowns: no single -1 says it
    assert inferred_view_shape([0, symbolic]) is None  # -1 next to a 0 has no single meaning


def test_xnnpack_rewrites_delegate_more_in_fewer_partitions_and_compute_the_same():
    """Without the rewrites XNNPACK declines the symbolic view, the unsqueeze and the expands, which split the block
    into several partitions; with them the whole block is one delegate. The program computes the same, for T at
    both ends of its range."""
    from executorch.runtime import Runtime

    assert BACKENDS["xnnpack"].edge_passes() == xnnpack_rewrites()
    plain = BackendRecipe("plain", BACKENDS["xnnpack"].check, BACKENDS["xnnpack"].partitioners)
    module = Heads().eval()
    before, after = _lowered(module, plain), _lowered(module, BACKENDS["xnnpack"])
    declined = _undelegated(before)
    assert any("view_copy" in name for name in declined) and any("expand_copy" in name for name in declined)
    assert any("unsqueeze_copy" in name for name in declined)
    assert [name for name in _undelegated(after) if "sym_size" not in name] == []  # the size T is still read
    assert _delegates(after) == 1 < _delegates(before)

    for edge in (before, after):
        buffer = edge.to_executorch().buffer  # held: the loaded program reads it in place
        method = Runtime.get().load_program(buffer).load_method("forward")
        for tokens in (1, 7, 16):
            x = torch.randn(1, tokens, 32)
            with torch.no_grad():
                expected = module(x)
            got = method.execute([x])[0]
            assert got.shape == expected.shape == (1, 1, tokens, 32)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
