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


def _method(edge) -> tuple:
    """The lowered program's ``forward`` loaded by ExecuTorch's runtime, and the program's bytes, which the caller
    holds while it runs (the loaded program reads them in place). ``to_executorch`` runs once per edge program."""
    from executorch.runtime import Runtime

    buffer = edge.to_executorch().buffer
    return Runtime.get().load_program(buffer).load_method("forward"), buffer


def _xnnpack_lowered(program: torch.export.ExportedProgram):
    """A traced ``forward`` lowered with the XNNPACK recipe, as ``lower`` lowers a method of pruner-export's."""
    return lower({"forward": program}, BACKENDS["xnnpack"], ExportOptions(model="tiny-llava", target="executorch",
                                                                          jobs=1), {})


class Rows(nn.Module):
    """Row 0 of x repeated n times, n a data-dependent size (``count.item()``, ``least`` to 8: an unbacked SymInt;
    ExecuTorch 1.5.1 lowers it from 1, not from 0)."""

    def __init__(self, least: int) -> None:
        super().__init__()
        self.least = least

    def forward(self, x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:  # [8, 4], [] int64 -> [n, 4]
        rows = count.item()
        torch._check(rows >= self.least)
        torch._check(rows <= 8)
        return x[:1].expand(rows, 4) * 2.0


def _rows_example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 4), torch.tensor(3)


def test_inferred_view_shape_takes_a_data_dependent_size():
    """A data-dependent size that may be 0 is inferred like any other (a -1 among non-zero sizes is 0 then); asking
    whether it is 0 has no answer at export time (it raised GuardOnDataDependentSymNode)."""
    with torch.no_grad():
        program = torch.export.export(Rows(least=0), _rows_example(), strict=False)
    output = next(node for node in program.graph.nodes if node.op == "output")
    rows = output.args[0][0].meta["val"].shape[0]  # n
    assert not isinstance(rows, int)
    assert inferred_view_shape([1, rows, 4]) == [1, -1, 4]
    assert inferred_view_shape([0, rows]) is None


def test_xnnpack_rewrites_lower_an_expand_to_a_data_dependent_size():
    """An expand from 1 to a data-dependent size is not known to keep its input's shape: left alone, the program
    lowers as without the rewrites (the shape comparison raised GuardOnDataDependentSymNode) and computes the same."""
    with torch.no_grad():
        program = torch.export.export(Rows(least=1), _rows_example(), strict=False)
    (method, _buffer), x = _method(_xnnpack_lowered(program)), torch.randn(8, 4)
    for rows in (3, 1):
        got = method.execute([x, torch.tensor(rows)])[0]
        torch.testing.assert_close(got, x[:1].expand(rows, 4) * 2.0)


class ChannelsLast(nn.Module):
    """A channels-last tensor (ExecuTorch: dim order 0, 2, 3, 1) squeezed and unsqueezed."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [2, 3, 1, 5]
        y = (x * 1.5).to(memory_format=torch.channels_last)
        return y.squeeze(2) * 2.0, y.unsqueeze(1) * 2.0


class ChannelsLastExpand(nn.Module):
    """A channels-last tensor expanded to its own shape, which copies it into the contiguous order cumsum's result
    is planned in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [2, 3, 1, 5]
        y = (x * 1.5).to(memory_format=torch.channels_last)
        return torch.cumsum(y.expand(2, 3, 1, 5), dim=-1)


def test_view_shapes_keeps_a_squeeze_or_unsqueeze_of_a_non_contiguous_tensor():
    """An unsqueeze / squeeze of a tensor in another dim order copies it into the contiguous order; a view of it
    would read its bytes as if contiguous (ExecuTorch runs a view in place: wrong values, measured for an int32
    tensor left to the portable kernels)."""
    from executorch.exir import EdgeCompileConfig, to_edge

    from export.edge_rewrites import view_shapes

    with torch.no_grad():
        program = torch.export.export(ChannelsLast(), (torch.randn(2, 3, 1, 5),), strict=False)
    graph_module = to_edge(program, compile_config=EdgeCompileConfig(_check_ir_validity=False)) \
        .exported_program().graph_module
    view_shapes(graph_module)
    targets = [str(node.target) for node in graph_module.graph.nodes]
    assert any("squeeze_copy.dims" in name for name in targets) and any("unsqueeze_copy" in name for name in targets)


def test_xnnpack_rewrites_keep_an_expand_of_a_non_contiguous_tensor():
    """The expand is the copy into the contiguous order the cumsum reads: removed, the program failed at run time
    (error 0x12: the cumsum got a channels-last input); kept, it computes as eager."""
    module, x = ChannelsLastExpand().eval(), torch.randn(2, 3, 1, 5)
    with torch.no_grad():
        expected = module(x)
        program = torch.export.export(module, (x,), strict=False)
    method, _buffer = _method(_xnnpack_lowered(program))
    torch.testing.assert_close(method.execute([x])[0], expected)


class Merge(nn.Module):
    """Heads merged over a dynamic token count: a view to [1, 4 * T, 8], its size computed from T (sym_size, mul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, T, 4, 8] -> [1, 4T, 8]
        return torch.relu(x).reshape(1, x.shape[1] * 4, 8) * 2.0


def test_view_shapes_erases_the_size_arithmetic_only_the_old_shape_read():
    """The view's old size (mul(sym_size(x, 1), 4)) goes with it: no node of the lowered program is left unread."""
    tokens = torch.export.Dim("T", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(Merge(), (torch.randn(1, 5, 4, 8),), dynamic_shapes=({1: tokens},),
                                      strict=False)
    graph = _xnnpack_lowered(program).exported_program("forward").graph_module.graph
    assert [node.name for node in graph.nodes if node.op == "call_function" and not node.users] == []


class SqueezeTokens(nn.Module):
    """A squeeze of the token dimension, whose size T may be 1 (the traced program drops it exactly then: another
    rank, so no fixed view), and a squeeze of the batch dimension, always 1."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [1, T, 8]
        y = x * 2.0
        return y.squeeze(1) + 1.0, y.squeeze(0) + 1.0  # [1, T, 8] ([1, 8] for T = 1), [T, 8]


def test_view_shapes_keeps_a_squeeze_of_a_symbolic_size():
    """As a view to [1, -1, 8], the token squeeze returned [1, 1, 8] for T = 1 where the program gives [1, 8]
    (ExecuTorch's squeeze kernel refuses that rank change: an error, not a wrong shape). The shape environment
    takes T >= 2 whether the export allows T = 1 or not, so neither squeeze of T is rewritten; the batch squeeze
    is a view in both."""
    from executorch.exir import EdgeCompileConfig, to_edge

    from export.edge_rewrites import view_shapes

    for least in (1, 2):
        tokens = torch.export.Dim("T", min=least, max=16)
        with torch.no_grad():
            program = torch.export.export(SqueezeTokens(), (torch.randn(1, 5, 8),), dynamic_shapes=({1: tokens},),
                                          strict=False)
        graph_module = to_edge(program, compile_config=EdgeCompileConfig(_check_ir_validity=False)) \
            .exported_program().graph_module
        view_shapes(graph_module)
        squeezes = [node.args[1] for node in graph_module.graph.nodes if "squeeze_copy" in str(node.target)]
        assert squeezes == [[1]], (least, squeezes)
        assert sum("view_copy" in str(node.target) for node in graph_module.graph.nodes) == 1


def test_xnnpack_rewrites_keep_the_rank_of_a_squeeze_of_a_size_that_may_be_1():
    """Lowered and run: never the wrong rank. For T = 1 the program either refuses (ExecuTorch's squeeze kernel
    cannot change a rank) or gives eager's shape; for T = 7 it computes as eager."""
    module, tokens = SqueezeTokens().eval(), torch.export.Dim("T", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(module, (torch.randn(1, 5, 8),), dynamic_shapes=({1: tokens},), strict=False)
    method, _buffer = _method(_xnnpack_lowered(program))
    x = torch.randn(1, 7, 8)
    for got, expected in zip(method.execute([x]), module(x)):
        torch.testing.assert_close(got, expected)
    x = torch.randn(1, 1, 8)
    try:
        got = method.execute([x])
    except RuntimeError:
        return  # refused, as without the rewrites
    assert [tuple(tensor.shape) for tensor in got] == [tuple(tensor.shape) for tensor in module(x)]
