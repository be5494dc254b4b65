"""The static form equals the eager reference, token for token; config; determinism; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from cases import Case, all_cases, make_inputs
from pruner_core import PrunerConfig, num_rounds, select_tokens, select_tokens_reference
from pruner_core.config import Keep
from pruner_core.primitives import (
    grid_diameter,
    grid_distance,
    grid_positions,
    similarity_for,
    stable_argsort,
    stable_rank,
)
from pruner_core.reference import reference_centrifugal, reference_pivots
from pruner_core.static import StaticPlan, vlm_pruner_static

CASES = all_cases()


def assert_same_selection(case: Case, config: PrunerConfig) -> None:
    hidden, keys = make_inputs(case)
    static = select_tokens(hidden, keys, case.grid, config)
    reference = select_tokens_reference(hidden, keys, case.grid, config)
    assert static.indices.shape == (case.batch, case.budget)
    assert torch.equal(static.order, reference.order), f"{case}: selection order differs"
    assert torch.equal(static.indices, reference.indices), f"{case}: kept tokens differ"
    torch.testing.assert_close(static.states, reference.states, rtol=1e-5, atol=1e-5)


def test_case_set_covers_the_required_space():
    assert len(CASES) >= 300
    assert {c.grid for c in CASES} >= {(24, 24), (16, 16), (27, 27), (12, 20)}
    assert min(c.width for c in CASES) == 64 and max(c.width for c in CASES) == 4096
    assert {c.batch for c in CASES} == {1, 3}
    assert any(c.budget == 1 for c in CASES) and any(c.budget == c.tokens for c in CASES)
    assert {c.regime for c in CASES} >= {"orthogonal", "similar", "real", "duplicates"}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_static_equals_reference(case: Case):
    assert_same_selection(case, PrunerConfig(keep=case.budget))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pivots=1, chunk=4),
        dict(pivots=8, chunk=32, tau0=0.5, tau_step=0.25),
        dict(bss_lambda=0.0, feature_channels=16),
        dict(bss_lambda=2.0, fusion_beta=1.0),
        dict(tau0=0.95, tau_step=0.01, chunk=1),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("index", [3, 7, 12, 40])
def test_static_equals_reference_other_hyperparameters(overrides, index):
    case = CASES[index]
    assert_same_selection(case, PrunerConfig(keep=case.budget, **overrides))


@pytest.mark.parametrize("index", [0, 9, 25, 26])
def test_scan_form_equals_loop_form(index):
    """The export path (one scan) and the eager loop run the same steps."""
    case = CASES[index]
    hidden, keys = make_inputs(case)
    config = PrunerConfig(keep=case.budget)
    plan = StaticPlan.build(config, *case.grid, case.budget)
    looped = vlm_pruner_static(hidden, keys, config, plan, use_scan=False)
    scanned = vlm_pruner_static(hidden, keys, config, plan, use_scan=True)
    for a, b in zip(looped, scanned):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [c for c in CASES if c.regime in ("similar", "orthogonal", "real")][:60], ids=str)
def test_exactly_r_tokens_unique_ascending(case: Case):
    hidden, keys = make_inputs(case)
    selection = select_tokens(hidden, keys, case.grid, PrunerConfig(keep=case.budget))
    assert selection.indices.shape == selection.order.shape == (case.batch, case.budget)
    assert selection.states.shape == (case.batch, case.budget, case.width)
    for b in range(case.batch):
        kept = selection.indices[b]
        assert len(set(kept.tolist())) == case.budget
        assert torch.all(kept[1:] > kept[:-1])
        assert sorted(selection.order[b].tolist()) == kept.tolist()
        assert int(kept.min()) >= 0 and int(kept.max()) < case.tokens


def similar_regime_inputs(seed: int = 0, tokens_grid=(24, 24), width: int = 256):
    generator = torch.Generator().manual_seed(seed)
    n = tokens_grid[0] * tokens_grid[1]
    hidden = torch.randn(1, 1, width, generator=generator) + 0.05 * torch.randn(1, n, width, generator=generator)
    keys = torch.randn(1, n, width, generator=generator)
    return hidden, keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_highly_similar_regime_still_keeps_exactly_r(seed):
    """Every candidate starts above tau0; the authors' code stops short, this project fills the budget and the
    authors' (shorter) selection is a prefix of ours."""
    config = PrunerConfig(keep=64)
    hidden, keys = similar_regime_inputs(seed)
    similarity = similarity_for(hidden.float(), config.feature_channels)[0]
    off_diagonal = similarity[~torch.eye(similarity.shape[0], dtype=torch.bool)]
    assert float(off_diagonal.min()) > config.tau0, "the regime must put every candidate above tau0"

    ours = select_tokens(hidden, keys, (24, 24), config)
    assert ours.indices.shape == (1, 64)

    positions = grid_positions(24, 24)
    distance = grid_distance(positions, positions, grid_diameter(24, 24))
    pivots = reference_pivots(keys[:1].float(), config.pivots)
    authors = reference_centrifugal(similarity, distance, pivots, 64, config, authors_early_stop=True)
    assert len(authors) < 64, "the authors' stopping rule should stop short here"
    assert ours.order[0, : len(authors)].tolist() == authors


def test_determinism_and_json_round_trip():
    hidden, keys = make_inputs(CASES[13])
    config = PrunerConfig(keep=0.12, tau0=0.75, chunk=8)
    first = select_tokens(hidden, keys, CASES[13].grid, config)
    second = select_tokens(hidden, keys, CASES[13].grid, config)
    restored = PrunerConfig.from_json(config.to_json())
    assert restored == config
    third = select_tokens(hidden, keys, CASES[13].grid, restored)
    for other in (second, third):
        assert torch.equal(first.indices, other.indices)
        assert torch.equal(first.order, other.order)
        assert torch.equal(first.states, other.states)  # bit for bit


def test_batch_items_are_independent():
    case = next(c for c in CASES if c.batch == 3 and c.regime == "moderate")
    hidden, keys = make_inputs(case)
    config = PrunerConfig(keep=case.budget)
    together = select_tokens(hidden, keys, case.grid, config)
    for b in range(3):
        alone = select_tokens(hidden[b : b + 1], keys[b : b + 1], case.grid, config)
        assert torch.equal(alone.indices[0], together.indices[b])
        torch.testing.assert_close(alone.states[0], together.states[b], rtol=1e-5, atol=1e-5)


def test_fp16_and_bf16_inputs_keep_their_dtype():
    hidden, keys = make_inputs(CASES[1])
    for dtype in (torch.float16, torch.bfloat16):
        selection = select_tokens(hidden.to(dtype), keys.to(dtype), CASES[1].grid, PrunerConfig(keep=8))
        assert selection.states.dtype == dtype and selection.indices.dtype == torch.int64


def test_fusion_moves_kept_states_toward_discarded_ones():
    """SWA: with beta < 1 kept states change; beta = 1 keeps the raw states."""
    hidden, keys = make_inputs(CASES[2])
    fused = select_tokens(hidden, keys, CASES[2].grid, PrunerConfig(keep=16))
    raw = select_tokens(hidden, keys, CASES[2].grid, PrunerConfig(keep=16, fusion_beta=1.0))
    assert torch.equal(fused.indices, raw.indices)
    kept = hidden.gather(1, raw.indices.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    assert torch.equal(raw.states, kept)
    assert not torch.allclose(fused.states, kept)


# ---- config -------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_authors():
    config = PrunerConfig()
    assert (config.layer, config.pivots, config.feature_channels, config.chunk) == (2, 4, 256, 16)
    assert (config.bss_lambda, config.tau0, config.tau_step, config.fusion_beta) == (0.5, 0.8, 0.1, 0.3)
    assert num_rounds(config) == 9


def test_budget_rounding():
    assert PrunerConfig(keep=64).budget(576) == 64
    assert PrunerConfig(keep=0.12).budget(576) == 69  # 69.12
    assert PrunerConfig(keep=0.5).budget(5) == 2  # 2.5 rounds half to even
    assert PrunerConfig(keep=0.5).budget(7) == 4  # 3.5 rounds half to even
    assert PrunerConfig(keep=0.0001).budget(576) == 1  # at least one token
    assert PrunerConfig(keep=1.0).budget(576) == 576


def test_config_json_keeps_int_and_float_keep_apart():
    assert PrunerConfig.from_json(PrunerConfig(keep=1).to_json()).keep == Keep(1)
    assert PrunerConfig.from_json(PrunerConfig(keep=1.0).to_json()).keep == Keep(1.0)
    assert json.loads(PrunerConfig(keep=1.0).to_json())["keep"] == 1.0
    assert isinstance(json.loads(PrunerConfig(keep=1).to_json())["keep"], int)
    payload = json.loads(PrunerConfig().to_json())
    assert payload["version"] == 1
    with pytest.raises(ValueError, match="unknown PrunerConfig fields"):
        PrunerConfig.from_dict({**payload, "bogus": 1})
    with pytest.raises(ValueError, match="newer"):
        PrunerConfig.from_dict({**payload, "version": 99})


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(keep=0), "keep"),
        (dict(keep=-3), "keep"),
        (dict(keep=0.0), "keep"),
        (dict(keep=1.5), "keep"),
        (dict(keep=float("nan")), "keep"),
        (dict(keep="64"), "keep"),
        (dict(keep=True), "keep"),
        (dict(pivots=0), "pivots"),
        (dict(chunk=0), "chunk"),
        (dict(feature_channels=0), "feature_channels"),
        (dict(tau_step=0.0), "tau_step"),
        (dict(bss_lambda=-1.0), "bss_lambda"),
        (dict(fusion_beta=1.5), "fusion_beta"),
        (dict(layer=-1), "layer"),
    ],
)
def test_config_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PrunerConfig(**kwargs)


# ---- bad input ----------------------------------------------------------------------------------------------------


def good_inputs():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(1, 16, 32, generator=generator), torch.randn(1, 16, 24, generator=generator)


@pytest.mark.parametrize("select", [select_tokens, select_tokens_reference], ids=["static", "reference"])
@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda h, k, g, c: (h[0], k, g, c), r"hidden.*\[B, N, D\]"),
        (lambda h, k, g, c: (h, k[0], g, c), r"keys.*\[B, N, Dk\]"),
        (lambda h, k, g, c: (h, k[:, :8], g, c), r"keys has shape"),
        (lambda h, k, g, c: (h, torch.cat([k, k]), g, c), r"keys has shape"),
        (lambda h, k, g, c: (h, k, (4, 5), c), r"grid=\(4, 5\) holds 20 tokens.*N=16"),
        (lambda h, k, g, c: (h, k, (4,), c), r"grid must be a \(rows, cols\)"),
        (lambda h, k, g, c: (h, k, g, PrunerConfig(keep=17)), r"keep=17 exceeds the 16 image tokens"),
        (lambda h, k, g, c: (h.long(), k, g, c), r"hidden must be a floating-point"),
        (lambda h, k, g, c: (h, k.int(), g, c), r"keys must be a floating-point"),
        (lambda h, k, g, c: (h.index_fill(1, torch.tensor([3]), float("nan")), k, g, c), r"hidden contains NaN"),
        (lambda h, k, g, c: (h, k.index_fill(1, torch.tensor([0]), float("inf")), g, c), r"keys contains NaN or inf"),
        (lambda h, k, g, c: (h.numpy(), k, g, c), r"hidden must be a torch.Tensor"),
    ],
    ids=["hidden-rank", "keys-rank", "keys-N", "keys-B", "grid-mismatch", "grid-shape", "keep-above-N",
         "hidden-int", "keys-int", "hidden-nan", "keys-inf", "hidden-numpy"],
)
def test_bad_input_is_a_clear_value_error(select, mutate, pattern):
    hidden, keys = good_inputs()
    args = mutate(hidden, keys, (4, 4), PrunerConfig(keep=4))
    with pytest.raises(ValueError, match=pattern):
        select(*args)


def test_missing_keys_names_the_signal():
    hidden, _ = good_inputs()
    with pytest.raises(ValueError, match="needs 'keys'"):
        select_tokens(hidden, None, (4, 4), PrunerConfig(keep=4))


# ---- primitives ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_stable_argsort_matches_a_stable_sort_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 6, (3, 70), generator=generator).float()
    values[0, :5] = float("inf")
    order = stable_argsort(values)
    expected = torch.tensor([sorted(range(70), key=lambda i: (float(row[i]), i)) for row in values])
    assert torch.equal(order, expected)
    ranks = stable_rank(values)
    assert torch.equal(ranks.gather(1, order), torch.arange(70).expand(3, 70))


# ---- the budget cap inside a chunk: the authors' selection order --------------------------------------------------


def authors_stage2(similarity: torch.Tensor, distance: torch.Tensor, pivots: list[int], budget: int,
                   config: PrunerConfig) -> tuple[list[int], int]:
    """An independent statement of the authors' Stage 2 (their get_retained_image_token in Casey-bit/VLMPruner,
    restated with tensors and masks instead of the reference's sets): -> (selection order, number of capped chunks
    whose top-k order differs from chunk order).

    Each chunk is judged against the current S; when the passing members would overflow the budget, a top-k of the
    negated redundancy takes the (R - |S|) lowest, lowest first, ties by chunk position."""
    n = similarity.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[pivots] = True
    order, reordered, round_index = list(pivots), 0, 0
    while len(order) < budget:
        tau = torch.tensor(config.tau0 + round_index * config.tau_step, dtype=torch.float32)

        def redundancy() -> torch.Tensor:  # m_i(S) for all i, S = chosen
            s = similarity[chosen].amax(0)
            d = distance[chosen].amin(0)
            return s * (1.0 + config.bss_lambda * d)

        m = redundancy()
        keys = [(float(m[i]), i) for i in range(n) if not chosen[i]]
        candidates = [i for _, i in sorted(keys)]
        for start in range(0, len(candidates), config.chunk):
            chunk = torch.tensor(candidates[start : start + config.chunk])
            m = redundancy()[chunk]
            passing = chunk[m < tau]
            room = budget - len(order)
            if len(passing) > room:
                # top-k with a deterministic tie rule: sort (m, chunk position) lexicographically
                positions = torch.nonzero(m < tau).flatten()
                ranked = sorted(zip(m[positions].tolist(), positions.tolist()))[:room]
                accepted = [int(chunk[p]) for _, p in ranked]
                in_chunk_order = [int(i) for i in passing if int(i) in set(accepted)]
                reordered += accepted != in_chunk_order
            else:
                accepted = [int(i) for i in passing]
            order += accepted
            chosen[accepted] = True
            if start == 0 and not accepted:
                break
            if len(order) == budget:
                break
        round_index += 1
    return order, reordered


CAPPED_CASES = [c for c in CASES if c.batch == 1 and 4 < c.budget < c.tokens][:48]


@pytest.mark.parametrize("case", CAPPED_CASES, ids=str)
def test_capped_chunk_records_the_authors_order(case: Case):
    """Where the budget caps a chunk, `order` lists its accepted members lowest redundancy first, in both forms."""
    config = PrunerConfig(keep=case.budget)
    hidden, keys = make_inputs(case)
    similarity = similarity_for(hidden.float(), config.feature_channels)[0]
    positions = grid_positions(*case.grid)
    distance = grid_distance(positions, positions, grid_diameter(*case.grid))
    pivots = reference_pivots(keys.float(), min(config.pivots, case.budget))
    expected, _ = authors_stage2(similarity, distance, pivots, case.budget, config)
    assert select_tokens_reference(hidden, keys, case.grid, config).order[0].tolist() == expected
    assert select_tokens(hidden, keys, case.grid, config).order[0].tolist() == expected


def test_capped_cases_include_caps_whose_order_is_not_chunk_order():
    """The cases above are only a test of the cap's order if, in some of them, it differs from chunk order."""
    reordered = 0
    for case in CAPPED_CASES:
        config = PrunerConfig(keep=case.budget)
        hidden, keys = make_inputs(case)
        similarity = similarity_for(hidden.float(), config.feature_channels)[0]
        positions = grid_positions(*case.grid)
        distance = grid_distance(positions, positions, grid_diameter(*case.grid))
        pivots = reference_pivots(keys.float(), min(config.pivots, case.budget))
        reordered += authors_stage2(similarity, distance, pivots, case.budget, config)[1]
    assert reordered >= 5, f"only {reordered} capped chunks reorder; widen CAPPED_CASES"
