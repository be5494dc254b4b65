"""The peer selection methods: exact R, batch independence, static export, ExecuTorch round trips, behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from export.selection import SelectionModule, export_program, export_selection_pte
from pruner_core import PrunerConfig, method_names, select_tokens
from pruner_core.methods.grid import lattice_cells
from pruner_core.methods.visionzip import split_budget

PEERS = ["dart", "divprune", "fastv", "grid", "random", "visionzip"]
ALL = PEERS + ["vlm_pruner"]
GRIDS = [(8, 8), (5, 7)]
UNCHANGED_STATES = {"dart", "divprune", "fastv", "random"}  # methods that keep hidden states as they are


def make_signals(batch: int, grid: tuple[int, int], width: int = 32, key_width: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    return {
        "hidden": torch.randn(batch, n, width, generator=generator),
        "keys": torch.randn(batch, n, key_width, generator=generator),
        "text_attention": torch.rand(batch, n, generator=generator),
        "cls_attention": torch.rand(batch, n, generator=generator),
    }


def run(method: str, signals: dict, grid: tuple[int, int], budget: int, **options):
    config = PrunerConfig(keep=budget, method=method, **options)
    return select_tokens(
        signals["hidden"], signals["keys"], grid, config,
        text_attention=signals["text_attention"], cls_attention=signals["cls_attention"],
    )


def module_inputs(module: SelectionModule, signals: dict) -> list[torch.Tensor]:
    return [signals[name].contiguous() for name in module.inputs]


def only_inputs(module: SelectionModule, signals: dict) -> dict:
    """The signals the exported module sees (what its method needs); the rest None, as for eager."""
    return {name: (value if name in module.inputs else None) for name, value in signals.items()}


def test_all_methods_registered():
    assert set(ALL) <= set(method_names())


# ---- interface: exact R, ascending unique indices, batch independence ---------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("method", ALL)
def test_exact_budget_and_ascending(method, grid):
    n = grid[0] * grid[1]
    for batch in (1, 3):
        signals = make_signals(batch, grid)
        for budget in (1, n // 3, n):
            sel = run(method, signals, grid, budget)
            assert sel.indices.shape == (batch, budget) and sel.indices.dtype == torch.int64
            assert sel.order.shape == (batch, budget) and sel.order.dtype == torch.int64
            assert sel.states.shape == (batch, budget, signals["hidden"].shape[2])
            assert sel.states.dtype == signals["hidden"].dtype
            assert bool((sel.indices[:, 1:] > sel.indices[:, :-1]).all()), "ascending and unique"
            assert int(sel.indices.min()) >= 0 and int(sel.indices.max()) < n
            assert torch.equal(sel.order.sort(-1).values, sel.indices), "order is a permutation of indices"
            if method in UNCHANGED_STATES:
                expected = signals["hidden"].gather(1, sel.indices.unsqueeze(-1).expand_as(sel.states))
                assert torch.equal(sel.states, expected)
            if budget == n and method in UNCHANGED_STATES | {"grid"}:
                assert torch.allclose(sel.states, signals["hidden"], atol=1e-6)


@pytest.mark.parametrize("method", ALL)
def test_batch_items_independent(method):
    grid = (5, 7)
    signals = make_signals(3, grid, seed=1)
    together = run(method, signals, grid, 9)
    for b in range(3):
        alone = run(method, {k: v[b : b + 1] for k, v in signals.items()}, grid, 9)
        assert torch.equal(together.indices[b : b + 1], alone.indices)
        assert torch.equal(together.order[b : b + 1], alone.order)
        assert torch.allclose(together.states[b : b + 1], alone.states, atol=1e-5)


def test_half_precision_states_keep_dtype():
    grid = (4, 4)
    signals = make_signals(2, grid)
    signals = {k: v.to(torch.bfloat16) for k, v in signals.items()}
    for method in PEERS:
        assert run(method, signals, grid, 5).states.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("method", "missing"),
    [("dart", "keys"), ("fastv", "text_attention"), ("visionzip", "cls_attention")],
)
def test_missing_signal_is_a_clear_value_error(method, missing):
    grid = (4, 4)
    signals = make_signals(1, grid)
    signals[missing] = None
    with pytest.raises(ValueError, match=f"{method}.*needs '{missing}'"):
        run(method, signals, grid, 4)


def test_signal_free_methods_run_without_keys():
    grid = (4, 4)
    signals = make_signals(1, grid)
    hidden = signals["hidden"]
    for method in ("divprune", "grid", "random"):
        assert select_tokens(hidden, None, grid, PrunerConfig(keep=5, method=method)).indices.shape == (1, 5)


# ---- export ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PEERS)
def test_torch_export_static(method):
    grid = (5, 7)
    module = SelectionModule(PrunerConfig(keep=10, method=method), grid)
    program = export_program(module, tuple(module_inputs(module, make_signals(2, grid, seed=2))))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    forbidden = ("aten.sort", "aten.argsort", "rand", "aten.item", "_local_scalar_dense", "nonzero")
    assert not any(word in t for t in targets for word in forbidden), targets
    signals = make_signals(2, grid, seed=3)  # new values, same shapes
    exported = program.module()(*module_inputs(module, signals))
    eager = run(method, only_inputs(module, signals), grid, 10)
    assert torch.equal(exported[0], eager.indices)
    assert torch.equal(exported[2], eager.order)
    assert torch.allclose(exported[1], eager.states, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", PEERS)
def test_executorch_round_trip(method, tmp_path):
    from executorch.runtime import Runtime

    grid = (8, 8)
    module = SelectionModule(PrunerConfig(keep=12, method=method), grid)
    example = tuple(module_inputs(module, make_signals(1, grid, width=64, key_width=64, seed=4)))
    path = export_selection_pte(module, example, tmp_path / f"{method}.pte", backend="xnnpack")
    signals = make_signals(1, grid, width=64, key_width=64, seed=5)
    outputs = Runtime.get().load_program(path).load_method("forward").execute(module_inputs(module, signals))
    eager = run(method, only_inputs(module, signals), grid, 12)
    assert torch.equal(outputs[0], eager.indices)
    assert torch.equal(outputs[2], eager.order)
    assert torch.allclose(outputs[1], eager.states, atol=1e-5)


# ---- behaviour -------------------------------------------------------------------------------------------------------
def test_fastv_keeps_top_attention():
    grid = (5, 7)
    signals = make_signals(2, grid, seed=6)
    sel = run("fastv", signals, grid, 11)
    for b in range(2):
        scores = signals["text_attention"][b].tolist()
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        assert sel.order[b].tolist() == ranked[:11]
        assert sel.indices[b].tolist() == sorted(ranked[:11])


def brute_force_farthest_points(hidden: torch.Tensor, budget: int) -> list[int]:
    """DivPrune written plainly: first the token whose nearest other token is farthest, then max-min steps."""
    rows = hidden.double().tolist()
    norms = [math.sqrt(sum(v * v for v in row)) for row in rows]
    n = len(rows)

    def distance(i, j):
        return 1.0 - sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])

    nearest_other = [min(distance(i, j) for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: nearest_other[i])]
    while len(picks) < budget:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: min(distance(i, p) for p in picks)))
    return picks


def test_divprune_matches_brute_force_farthest_point():
    grid = (5, 7)
    signals = make_signals(2, grid, width=24, seed=7)
    sel = run("divprune", signals, grid, 12)
    for b in range(2):
        assert sel.order[b].tolist() == brute_force_farthest_points(signals["hidden"][b], 12)


def test_divprune_scan_form_equals_loop_form():
    from pruner_core.methods.divprune import cosine_distance, farthest_point_order

    distance = cosine_distance(make_signals(2, (5, 7), seed=13)["hidden"])
    loop = farthest_point_order(distance, 9, use_scan=False)
    assert torch.equal(farthest_point_order(distance, 9, use_scan=True), loop)


def test_dart_keeps_pivots_and_least_similar_tokens():
    grid = (6, 6)
    signals = make_signals(2, grid, seed=8)
    budget, pivots = 10, 3
    sel = run("dart", signals, grid, budget, pivots=pivots)
    for b in range(2):
        l1 = signals["keys"][b].abs().sum(-1).tolist()
        expected_pivots = sorted(range(36), key=lambda i: -l1[i])[:pivots]
        assert sel.order[b, :pivots].tolist() == expected_pivots
        unit = torch.nn.functional.normalize(signals["hidden"][b].double(), dim=-1)
        max_sim = (unit @ unit[expected_pivots].T).max(-1).values.tolist()
        others = [i for i in range(36) if i not in expected_pivots]
        expected_rest = sorted(others, key=lambda i: max_sim[i])[: budget - pivots]
        assert sel.order[b, pivots:].tolist() == expected_rest


def visionzip_brute_force(hidden, cls, features, budget):
    """VisionZip written plainly for one item: (kept positions ascending, their states)."""
    n = hidden.shape[0]
    dominant_count, contextual_count = split_budget(budget)
    cls_list = cls.tolist()
    dominant = sorted(range(n), key=lambda i: -cls_list[i])[:dominant_count]
    states = {i: hidden[i].double() for i in dominant}
    if contextual_count:
        remaining = [i for i in range(n) if i not in dominant]
        step = max(1, len(remaining) // contextual_count)
        targets = remaining[::step][:contextual_count]
        unit = torch.nn.functional.normalize(features.double(), dim=-1)
        groups = {t: [t] for t in targets}
        for i in remaining:
            if i not in targets:
                sims = [float(unit[i] @ unit[t]) for t in targets]
                groups[targets[sims.index(max(sims))]].append(i)
        for t, members in groups.items():
            states[t] = hidden[members].double().mean(0)
    kept = sorted(states)
    return kept, torch.stack([states[i] for i in kept])


@pytest.mark.parametrize("use_keys", [False, True])
def test_visionzip_dominant_tokens_and_group_means(use_keys):
    grid = (6, 8)
    signals = make_signals(2, grid, seed=9)
    budget = 16  # 14 dominant + 2 contextual
    if not use_keys:
        signals["keys"] = None
    sel = run("visionzip", signals, grid, budget)
    dominant_count, contextual_count = split_budget(budget)
    assert (dominant_count, contextual_count) == (14, 2)
    for b in range(2):
        top = signals["cls_attention"][b].topk(dominant_count).indices.tolist()
        assert sel.order[b, :dominant_count].tolist() == top
        features = signals["keys"][b] if use_keys else signals["hidden"][b]
        kept, states = visionzip_brute_force(signals["hidden"][b], signals["cls_attention"][b], features, budget)
        assert sel.indices[b].tolist() == kept
        assert torch.allclose(sel.states[b].double(), states, atol=1e-5)


def test_visionzip_split_follows_budget():
    assert split_budget(64) == (54, 10)
    assert split_budget(1) == (1, 0)
    for budget in range(1, 300):
        dominant, contextual = split_budget(budget)
        assert dominant >= 1 and contextual >= 0 and dominant + contextual == budget


def test_random_is_reproducible_per_seed():
    grid = (8, 8)
    signals = make_signals(2, grid)
    first = run("random", signals, grid, 10, seed=1)
    again = run("random", make_signals(2, grid, seed=11), grid, 10, seed=1)
    assert torch.equal(first.indices, again.indices), "picks depend on the seed only"
    assert torch.equal(first.indices[0], first.indices[1])
    picks = {tuple(run("random", signals, grid, 10, seed=s).indices[0].tolist()) for s in range(8)}
    assert len(picks) == 8, "different seeds give different picks"


def test_random_export_is_deterministic_constant():
    grid = (5, 7)
    module = SelectionModule(PrunerConfig(keep=6, method="random", seed=3), grid)
    program = export_program(module, tuple(module_inputs(module, make_signals(1, grid))))
    runner = program.module()
    inputs = module_inputs(module, make_signals(1, grid, seed=1))
    assert torch.equal(runner(*inputs)[0], runner(*inputs)[0])
    assert torch.equal(runner(*inputs)[0], run("random", make_signals(1, grid), grid, 6, seed=3).indices)


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (3, 10), (1, 9)])
def test_grid_spreads_picks_and_pools_cells(grid):
    rows, cols = grid
    n = rows * cols
    signals = make_signals(2, grid, seed=12)
    for budget in (1, 5, n // 2, n):
        sel = run("grid", signals, grid, budget)
        picks = sel.indices[0].tolist()
        cells = lattice_cells(rows, cols, budget)
        assert len(cells) == budget
        for top, bottom, left, right in cells:  # the lattice tiles the grid, one pick per cell
            inside = [p for p in picks if top <= p // cols < bottom and left <= p % cols < right]
            assert len(inside) == 1
        assert sum((b - t) * (r - l) for t, b, l, r in cells) == n
        heights = {b - t for t, b, _, _ in cells}
        assert max(heights) - min(heights) <= 1
        # each kept state is the mean of the tokens whose nearest pick (grid distance, first on ties) it is
        owner = []
        for i in range(n):
            d = [(i % cols - p % cols) ** 2 + (i // cols - p // cols) ** 2 for p in picks]
            owner.append(d.index(min(d)))
        for b in range(2):
            assert sel.indices[b].tolist() == picks
            for slot in range(budget):
                members = [i for i in range(n) if owner[i] == slot]
                expected = signals["hidden"][b, members].mean(0)
                assert torch.allclose(sel.states[b, slot], expected, atol=1e-5)


def test_grid_lattice_is_close_to_square():
    cells = lattice_cells(24, 24, 64)
    sizes = {(b - t, r - l) for t, b, l, r in cells}
    assert sizes == {(3, 3)}
    cells = lattice_cells(8, 16, 8)  # wide grid: 2 lattice rows of 4 cells of 4x4
    assert {(b - t, r - l) for t, b, l, r in cells} == {(4, 4)}
