"""Qwen2-VL / Qwen2.5-VL eager: the adapter's inputs, apply_pruner with the stock generate, and the pruned prefill
against an independent statement of it built from the stock transformers modules."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import DynamicCache
from transformers.vision_utils import get_vision_window_index

from pruner_core import PrunerConfig, select_tokens
from pruner_core.adapters import (
    QWEN2_VL,
    adapter_for,
    apply_pruner,
    load_qwen2_vl,
    pruner_config,
    qwen_prompt,
    remove_pruner,
    resolve_model,
)
from pruner_core.adapters.qwen2_vl import _PrunedQwenForward, check_image_size, parameter_counts
from pruner_core.adapters.qwen2_vl_vision import StaticVisionEncoder, window_groups

VARIANTS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
QUESTION = "What is in the picture?"
NEW_TOKENS = 6


@pytest.fixture(scope="session")
def qwen_zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("qwen-zoo")
    return {name: resolve_model(name, cache) for name in VARIANTS}


@pytest.fixture(scope="session")
def astronaut():
    return Image.fromarray(data.astronaut())


def generate(model, inputs, tokens=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def cache_lengths(cache) -> list[int]:
    return [cache.get_seq_length(index) for index in range(len(cache.layers))]


@pytest.fixture(scope="session")
def stock(qwen_zoo, astronaut):
    """Stock generate per variant -> (inputs, result)."""
    out = {}
    for name, path in qwen_zoo.items():
        model, processor = load_qwen2_vl(path)
        inputs = processor(images=astronaut, text=qwen_prompt(QUESTION))
        out[name] = inputs, generate(model, inputs)
    return out


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("name", VARIANTS)
def test_keep_all_matches_stock_generate(qwen_zoo, stock, name, layer):
    inputs, expected = stock[name]
    model, _ = load_qwen2_vl(qwen_zoo[name])
    apply_pruner(model, PrunerConfig(keep=1.0, layer=layer))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.past_key_values in model.model._pruner_sessions  # the pruned prefill ran (its cache has a session)
    result = generate(model, inputs)
    assert torch.equal(result.sequences, expected.sequences)
    assert max_logit_diff(result.logits, expected.logits) <= 1e-5


def _keys(layer, hidden, cos, sin):
    """Independent post-RoPE keys [B, S, Hkv * d]: the stock k_proj and the stock rotary application."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    attention = layer.self_attn
    k = attention.k_proj(layer.input_layernorm(hidden))
    batch, length, _ = k.shape
    k = k.view(batch, length, -1, attention.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.transpose(1, 2).reshape(batch, length, -1)


def _stack(language_model, layers, norm: bool):
    """A copy of the stock text model holding only ``layers`` (re-indexed from 0 for its own cache)."""
    stack = copy.deepcopy(language_model)
    stack.layers = torch.nn.ModuleList(copy.deepcopy([language_model.layers[i] for i in layers]))
    for index, layer in enumerate(stack.layers):
        layer.self_attn.layer_idx = index
    stack.config = copy.deepcopy(language_model.config)
    stack.config.num_hidden_layers = len(layers)
    stack.config.layer_types = stack.config.layer_types[: len(layers)]
    if not norm:
        stack.norm = torch.nn.Identity()
    return stack


def merged_selection(hidden, keys, image_grid_thw, config):
    """The project's selection on the true merged grid (grid_h / 2, grid_w / 2)."""
    _, h, w = image_grid_thw.tolist()
    return select_tokens(hidden, keys, (h // 2, w // 2), config)


def independent_pruned_generation(model, inputs, config, tokens=NEW_TOKENS, select=merged_selection):
    """The pruned prefill and greedy decoding stated with the stock modules: layers < K on the full prompt at the stock
    M-RoPE positions, the selection (``select(hidden [1, N, D], keys [1, N, Dk], image_grid_thw [3], config)``) from
    layer K-1's output and post-RoPE keys at the image tokens, layers >= K on [text before] + [R fused tokens] +
    [text after] at the kept tokens' ORIGINAL positions, decoding at the unpruned positions (rope deltas).
    -> (tokens [tokens], logits [tokens, V])."""
    inner = model.model
    language_model = inner.language_model
    split = config.layer
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        embeds = inner.get_input_embeddings()(ids).clone()
        where = (ids[0] == image_id).nonzero()[:, 0]
        embeds[0, where] = features
        positions, deltas = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])  # [3, 1, T]
        lower = _stack(language_model, range(split), norm=False)
        upper = _stack(language_model, range(split, len(language_model.layers)), norm=True)
        lower_cache, upper_cache = DynamicCache(), DynamicCache()
        probe_in = embeds if split == 0 else _stack(language_model, range(split - 1), norm=False)(
            inputs_embeds=embeds, position_ids=positions).last_hidden_state
        hidden = embeds if split == 0 else lower(inputs_embeds=embeds, position_ids=positions,
                                                 past_key_values=lower_cache, use_cache=True).last_hidden_state
        cos, sin = language_model.rotary_emb(embeds, positions[:, :, where])
        keys = _keys(language_model.layers[max(split - 1, 0)], probe_in[:, where], cos, sin)
        selection = select(hidden[:, where], keys, inputs["image_grid_thw"][0], config)
        start, n_image = int(where[0]), len(where)
        kept = selection.indices[0]  # [R] ascending
        pruned = torch.cat([hidden[:, :start], selection.states.to(hidden.dtype), hidden[:, start + n_image:]], 1)
        kept_index = torch.cat([torch.arange(start), start + kept, torch.arange(start + n_image, ids.shape[1])])
        logits = []
        out = upper(inputs_embeds=pruned, position_ids=positions[:, :, kept_index], past_key_values=upper_cache,
                    use_cache=True).last_hidden_state
        step_logits = model.lm_head(out[:, -1])[0]
        next_position = ids.shape[1] + int(deltas[0, 0])
        result = []
        for step in range(tokens):
            logits.append(step_logits)
            token = int(step_logits.argmax())
            result.append(token)
            position = torch.full((3, 1, 1), next_position + step)
            x = inner.get_input_embeddings()(torch.tensor([[token]]))
            if split:
                x = lower(inputs_embeds=x, position_ids=position, past_key_values=lower_cache,
                          use_cache=True).last_hidden_state
            out = upper(inputs_embeds=x, position_ids=position, past_key_values=upper_cache,
                        use_cache=True).last_hidden_state
            step_logits = model.lm_head(out[:, -1])[0]
    return result, torch.stack(logits)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("name", VARIANTS)
def test_pruned_generation_equals_an_independent_statement(qwen_zoo, stock, name, layer):
    inputs, unpruned = stock[name]
    model, _ = load_qwen2_vl(qwen_zoo[name])
    config = PrunerConfig(keep=0.12, layer=layer)
    tokens, logits = independent_pruned_generation(model, inputs, config)
    apply_pruner(model, config)
    result = generate(model, inputs)
    assert result.sequences[0, -NEW_TOKENS:].tolist() == tokens
    assert (torch.stack([x[0] for x in result.logits]) - logits).abs().max().item() <= 1e-5
    assert not torch.equal(result.sequences, unpruned.sequences)  # pruning 88 % of the image changes the answer


@pytest.mark.parametrize("layer", [0, 2])
def test_kv_cache_lengths_and_positions(qwen_zoo, stock, layer):
    inputs, _ = stock["tiny-qwen2.5-vl"]
    model, _ = load_qwen2_vl(qwen_zoo["tiny-qwen2.5-vl"])
    config = PrunerConfig(keep=0.12, layer=layer)
    apply_pruner(model, config)
    full = inputs["input_ids"].shape[1]
    n_image = int(inputs["mm_token_type_ids"].sum())
    pruned = full - n_image + config.budget(n_image)
    expected = [full if index < layer else pruned for index in range(model.config.text_config.num_hidden_layers)]
    result = generate(model, inputs, 4)
    assert cache_lengths(result.past_key_values) == [length + 3 for length in expected]


def test_inputs_at_a_fixed_resolution(qwen_zoo, astronaut):
    model, processor = load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"])
    height, width = processor.image_size
    geometry = QWEN2_VL.geometry(model)
    assert geometry.image_size == (height, width) and geometry.position_scheme == "mrope"
    assert geometry.grid == (height // 28, width // 28) and geometry.num_image_tokens == height * width // 784
    for image in (astronaut, astronaut.resize((97, 401)), astronaut.convert("L")):  # every image -> (H, W)
        inputs = processor(images=image, text=qwen_prompt(QUESTION))
        assert inputs["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]
        assert inputs["pixel_values"].shape == (height * width // 196, 3 * 2 * 14 * 14)
        assert int(inputs["mm_token_type_ids"].sum()) == geometry.num_image_tokens
        assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == geometry.image_token_id)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == qwen_prompt(QUESTION)  # the chat template and the prompt format agree
    with pytest.raises(ValueError, match="multiple of 28"):
        check_image_size((300, 336))
    with pytest.raises(ValueError, match="multiple of 28"):
        load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"], image_size=(224, 330))


def test_bad_inputs_get_clear_errors(qwen_zoo, stock):
    inputs, _ = stock["tiny-qwen2-vl"]
    model, processor = load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"])
    apply_pruner(model, PrunerConfig(keep=0.12, layer=2))
    no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        generate(model, no_types)
    with pytest.raises(ValueError, match="video"):
        model(**inputs, pixel_values_videos=inputs["pixel_values"], video_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="CLS"):
        apply_pruner(model, PrunerConfig(method="visionzip"))
    with pytest.raises(ValueError, match="decoder layers"):
        apply_pruner(model, PrunerConfig(layer=model.config.text_config.num_hidden_layers))


def test_remove_restores_stock_and_dispatch_is_by_family(qwen_zoo, stock):
    inputs, expected = stock["tiny-qwen2-vl"]
    model, _ = load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"])
    assert adapter_for(qwen_zoo["tiny-qwen2-vl"]) is QWEN2_VL and adapter_for(model) is QWEN2_VL
    apply_pruner(model, PrunerConfig(keep=0.12, layer=2))
    assert isinstance(model.model, _PrunedQwenForward) and pruner_config(model).layer == 2
    remove_pruner(model)
    assert type(model.model).__name__ == "Qwen2VLModel" and pruner_config(model) is None
    result = generate(model, inputs)
    assert torch.equal(result.sequences, expected.sequences)


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_build_and_parameter_counts(qwen_zoo, name):
    path = qwen_zoo[name]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}[name]
    model, processor = load_qwen2_vl(path)
    tokenizer = processor.tokenizer
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    counts = parameter_counts(path)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision == sum(p.numel() for p in model.model.visual.parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_vision_tower_exports_at_a_fixed_resolution(qwen_zoo, stock, name):
    """The tower (Qwen2.5-VL: with its window attention) traces with torch.export into a graph without
    data-dependent ops, and equals the stock image features."""
    inputs, _ = stock[name]
    model, processor = load_qwen2_vl(qwen_zoo[name])
    encoder = QWEN2_VL.vision_encoder(model, processor.image_size)
    with torch.no_grad():
        expected = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        program = torch.export.export(encoder, (inputs["pixel_values"],), strict=False)
        out = program.module()(inputs["pixel_values"])
    assert out.shape == (1, *expected.shape)
    # Qwen2.5-VL's window blocks run one batched attention per window size: the same sums in another order
    assert torch.allclose(out[0], expected, rtol=0, atol=1e-5), (out[0] - expected).abs().max()
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not {t for t in targets if t.split(".")[1:2] in (["nonzero"], ["item"], ["_local_scalar_dense"],
                                                             ["_assert_scalar"])}, targets


@pytest.mark.parametrize("size", [(224, 336), (252, 336), (308, 196)])
def test_window_attention_is_one_batched_attention_per_window_size(qwen_zoo, size):
    """Qwen2.5-VL's window blocks: BatchedWindowAttention equals the stock per-window attention, at sizes whose
    merged grid divides into whole windows (224 x 336) and sizes leaving edge windows of other sizes; the traced
    tower holds one softmax per window size per window block (the stock one: one per window), and the stock
    per-window path (batched_windows=False) stays bit-exact."""
    model, _ = load_qwen2_vl(qwen_zoo["tiny-qwen2.5-vl"])
    visual = model.model.visual
    height, width = size
    grid_thw = torch.tensor([[1, height // 14, width // 14]])
    pixels = torch.randn(height // 14 * width // 14, 1176, generator=torch.Generator().manual_seed(0))
    _, cu_window_seqlens = get_vision_window_index(grid_thw, 2, visual.config.window_size, 14)
    sizes = len(window_groups(cu_window_seqlens.numpy()))
    window_blocks = len(visual.blocks) - len(visual.fullatt_block_indexes)
    softmaxes = {}
    with torch.no_grad():
        expected = model.model.get_image_features(pixels, grid_thw).pooler_output[0]  # [N, D]
        for batched in (True, False):
            encoder = StaticVisionEncoder(visual, size, batched_windows=batched)
            program = torch.export.export(encoder, (pixels,), strict=False)
            out = program.module()(pixels)[0]
            softmaxes[batched] = sum("softmax" in str(node.target) for node in program.graph.nodes)
            if batched:
                assert torch.allclose(out, expected, rtol=0, atol=1e-5), (out - expected).abs().max()
            else:
                assert torch.equal(out, expected)
    full = len(visual.fullatt_block_indexes)
    assert softmaxes[True] == full + window_blocks * sizes
    assert softmaxes[False] == full + window_blocks * (len(cu_window_seqlens) - 1)
    assert softmaxes[False] > softmaxes[True]
    assert (sizes == 1) == (size == (224, 336))


def test_window_groups_group_segments_by_length():
    groups = window_groups(np.array([0, 4, 8, 10, 10, 14, 16]))
    assert [group.tolist() for group in groups] == [[[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]],
                                                     [[8, 9], [14, 15]]]
    with pytest.raises(ValueError, match="non-decreasing from 0"):
        window_groups(np.array([0, 4, 2]))


@pytest.mark.parametrize("size", [(224, 336), (448, 448), (56, 840)])
def test_runtime_preprocessing_is_bit_exact_to_the_hf_processor(qwen_zoo, size):
    """runtime.preprocess with the spec an export records == Qwen2VLImageProcessorPil at the export size, for
    photographs of other sizes and aspects, a grey one and a thin one; the spec round-trips through JSON."""
    import numpy as np

    from runtime.preprocess import ImagePreprocessing, preprocess

    _, processor = load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"], image_size=size)
    spec = processor.preprocessing()
    assert ImagePreprocessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea()), Image.fromarray(data.camera()),
              Image.fromarray(data.coffee()).resize((1200, 7))]
    for image in images:
        expected = processor.pixels(image)["pixel_values"].numpy()
        assert np.array_equal(preprocess(image, spec), expected)


def test_clip_preprocessing_json_has_no_patch_field():
    from runtime.preprocess import ImagePreprocessing

    data_ = ImagePreprocessing().to_dict()
    assert "patches" not in data_ and ImagePreprocessing.from_dict(data_) == ImagePreprocessing()
    with pytest.raises(ValueError, match="flat_patches"):
        ImagePreprocessing(input_layout="flat_patches")


def test_closed_form_positions_equal_get_rope_index(qwen_zoo, stock):
    from pruner_core.adapters.qwen2_vl import mrope_positions

    inputs, _ = stock["tiny-qwen2.5-vl"]
    model, processor = load_qwen2_vl(qwen_zoo["tiny-qwen2.5-vl"])
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"])
    ids = inputs["input_ids"][0]
    where = (ids == model.config.image_token_id).nonzero()[:, 0]
    grid = QWEN2_VL.geometry(model).grid
    before, after = int(where[0]), len(ids) - int(where[-1]) - 1
    assert torch.equal(mrope_positions(before, grid, after), expected)
    assert torch.equal(mrope_positions(3, (2, 5), 1)[:, 0, -1], torch.tensor([8, 8, 8]))  # 3 + max(2, 5)


@pytest.mark.parametrize("layer, authors_grid", [(0, False), (2, False), (2, True)])
def test_runtime_eager_session_equals_apply_pruner(qwen_zoo, astronaut, layer, authors_grid):
    """pruner-run's eager path (runtime.load: the runtime's own preprocessing, prompt encoding and positions) gives
    the tokens of apply_pruner + the stock generate (with the authors' grid placement too)."""
    from runtime import load

    config = PrunerConfig(keep=0.12, layer=layer, authors_grid=authors_grid)
    session = load("tiny-qwen2-vl", config=config, cache_dir=qwen_zoo["tiny-qwen2-vl"].parent)
    result = session.generate(astronaut, QUESTION, max_new_tokens=NEW_TOKENS)
    model, processor = load_qwen2_vl(qwen_zoo["tiny-qwen2-vl"])
    apply_pruner(model, config)
    expected = generate(model, processor(images=astronaut, text=qwen_prompt(QUESTION)))
    generated = expected.sequences[0, -NEW_TOKENS:].tolist()
    eos = set(model.generation_config.eos_token_id)
    assert result.tokens == generated[: len(result.tokens)] and (len(result.tokens) == NEW_TOKENS
                                                                 or generated[len(result.tokens)] in eos)
    assert result.profile.image_tokens_total == QWEN2_VL.geometry(model).num_image_tokens
    assert session.config["pruner"]["authors_grid"] is authors_grid


def test_tiny_build_is_reused_and_inputs_check_images(qwen_zoo, stock):
    """A second resolve reuses the build (its stamp matches: no rebuild under a concurrent run); the processor
    takes arrays and paths, and refuses images that do not match the prompts' placeholders."""
    import numpy as np

    path = qwen_zoo["tiny-qwen2-vl"]
    before = (path / "config.json").stat().st_mtime_ns
    assert resolve_model("tiny-qwen2-vl", path.parent) == path
    assert (path / "config.json").stat().st_mtime_ns == before
    model, processor = load_qwen2_vl(path)
    array = data.astronaut()
    expected = processor.pixels(Image.fromarray(array))["pixel_values"]
    assert torch.equal(processor.pixels(array)["pixel_values"], expected)
    with pytest.raises(ValueError, match="one image per prompt"):
        processor(images=Image.fromarray(array), text=[qwen_prompt("a"), qwen_prompt("b")])
    with pytest.raises(ValueError, match="one image per prompt"):
        processor(images=None, text=qwen_prompt("a"))
    inputs, _ = stock["tiny-qwen2-vl"]
    apply_pruner(model, PrunerConfig(keep=0.12))
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    assert np.isfinite(expected.numpy()).all()


def test_pruner_eval_runs_qwen_eagerly(qwen_zoo, tmp_path, monkeypatch):
    """pruner-eval takes a Qwen2-VL model like a LLaVA one: keep 1.0 is its own reference, pruning answers too."""
    from runtime.evaluate import main as eval_main

    monkeypatch.chdir(tmp_path)  # the answer cache goes beside the run
    out = tmp_path / "eval.json"
    code = eval_main(["--model", "tiny-qwen2-vl", "--model-cache-dir", str(qwen_zoo["tiny-qwen2-vl"].parent),
                      "--keep", "1.0,0.25", "--methods", "vlm_pruner", "--limit", "2", "--out", str(out),
                      "--no-progress"])
    settings = json.loads(out.read_text())["settings"]
    assert code == 0 and [s["keep"] for s in settings] == [1.0, 0.25]
    assert settings[0]["agreement"] == 1.0 and all(s["total"] == 2 and s["computed"] == 2 for s in settings)


# ---------------------------------------------------------------- the authors' grid placement (authors_grid)


def authors_distance(n_image: int, image_grid_thw) -> torch.Tensor:
    """The authors' Qwen2-VL placement restated (their modeling_qwen2_vl_self.py): height and width come straight
    from image_grid_thw, the patch grid BEFORE the 2x2 merge; merged token i sits at (i mod width, i div width);
    distances are divided by sqrt(height^2 + width^2). -> [N, N] float32"""
    _, height, width = (int(v) for v in image_grid_thw)
    xy = [(i % width, i // width) for i in range(n_image)]
    squared = [[(xa - xb) ** 2 + (ya - yb) ** 2 for xb, yb in xy] for xa, ya in xy]
    return torch.tensor(squared, dtype=torch.float32).sqrt() / math.sqrt(height * height + width * width)


def authors_selection(hidden, keys, image_grid_thw, config):
    """pruner_core/reference.py's stages (pivots, centrifugal rounds, fusion) over ``authors_distance``."""
    from pruner_core.primitives import similarity_for
    from pruner_core.reference import reference_centrifugal, reference_fusion, reference_pivots
    from pruner_core.selection import Selection

    n_image = hidden.shape[1]
    budget = config.budget(n_image)
    similarity = similarity_for(hidden.float(), config.feature_channels)[0]  # [N, N]
    pivots = reference_pivots(keys.float(), min(config.pivots, budget))
    order = reference_centrifugal(similarity, authors_distance(n_image, image_grid_thw), pivots, budget, config)
    kept = sorted(order)
    states = reference_fusion(hidden[0].float(), similarity, kept, config.fusion_beta)
    return Selection(indices=torch.tensor([kept]), states=states[None].to(hidden.dtype), order=torch.tensor([order]))


def option_selection(model, inputs, config):
    """The option's selection through the adapter's exporter entry point (prefill_with_pruning)."""
    from pruner_core.adapters.qwen2_vl import merged_grid, rope_positions

    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds, starts, n_image = QWEN2_VL.embed_prompt(model, ids, inputs["pixel_values"], inputs["image_grid_thw"])
        positions, _ = rope_positions(model, ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
        grid = merged_grid(inputs["image_grid_thw"])
        out = QWEN2_VL.prefill_with_pruning(model, embeds, int(starts[0]), n_image, grid, config,
                                            position_ids=positions)
    return out.selection


@pytest.mark.parametrize("grid_thw, keep", [((1, 12, 16), 0.25), ((1, 20, 14), 20), ((1, 8, 8), 7)])
def test_authors_grid_equals_an_independent_statement_on_synthetic_features(grid_thw, keep):
    """select_tokens(authors_grid) == the restated placement driving the reference stages; the true merged grid
    (default) is another selection on at least one of the seeds (the option matters)."""
    rows, cols = grid_thw[1] // 2, grid_thw[2] // 2
    differs = False
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        shared = torch.randn(1, 1, 48, generator=generator)  # similar tokens: redundancy near the thresholds
        hidden = shared + 0.6 * torch.randn(1, rows * cols, 48, generator=generator)
        keys = torch.randn(1, rows * cols, 32, generator=generator)
        config = PrunerConfig(keep=keep, feature_channels=16, authors_grid=True)
        option = select_tokens(hidden, keys, (rows, cols), config, merge=2)
        expected = authors_selection(hidden, keys, torch.tensor(grid_thw), config)
        assert option.order.tolist() == expected.order.tolist()
        assert torch.equal(option.indices, expected.indices)
        assert torch.allclose(option.states, expected.states, atol=1e-5)
        default = select_tokens(hidden, keys, (rows, cols), PrunerConfig(keep=keep, feature_channels=16))
        differs |= default.order.tolist() != option.order.tolist()
    assert differs
    with pytest.raises(ValueError, match="not merged patches.*drop authors_grid"):  # no merge, nothing to reproduce
        select_tokens(hidden, keys, (rows, cols), config)


@pytest.mark.parametrize("name", VARIANTS)
def test_authors_grid_on_the_tiny_models_equals_an_independent_statement(qwen_zoo, stock, name):
    """apply_pruner and prefill_with_pruning with authors_grid keep what the restated placement keeps (layer 2:
    the same tokens, logits and answer), and other tokens than the default grid; at layer 0 select_before_llm
    (the ONNX encoder's selection) too."""
    inputs, _ = stock[name]
    model, _ = load_qwen2_vl(qwen_zoo[name])
    config = PrunerConfig(keep=0.25, layer=2, authors_grid=True)
    chosen = []

    def recorded(*args):
        chosen.append(authors_selection(*args))
        return chosen[-1]

    tokens, logits = independent_pruned_generation(model, inputs, config, select=recorded)
    kept = option_selection(model, inputs, config).indices
    assert torch.equal(kept, chosen[0].indices)
    assert not torch.equal(kept, option_selection(model, inputs, PrunerConfig(keep=0.25, layer=2)).indices)
    apply_pruner(model, config)
    result = generate(model, inputs)
    assert result.sequences[0, -NEW_TOKENS:].tolist() == tokens
    assert (torch.stack([x[0] for x in result.logits]) - logits).abs().max().item() <= 1e-5
    remove_pruner(model)
    layer0 = PrunerConfig(keep=0.25, layer=0, authors_grid=True)
    chosen.clear()
    independent_pruned_generation(model, inputs, layer0, tokens=1, select=recorded)
    with torch.no_grad():
        features = QWEN2_VL.encode_image(model, inputs["pixel_values"], inputs["image_grid_thw"])
        start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])
        grid = QWEN2_VL.geometry(model).grid
        selection = QWEN2_VL.select_before_llm(model, features, start, grid, layer0)
    assert torch.equal(selection.indices, chosen[0].indices)
    assert torch.equal(option_selection(model, inputs, layer0).indices, chosen[0].indices)


def test_authors_grid_is_a_typed_recorded_option():
    config = PrunerConfig(authors_grid=True)
    assert PrunerConfig.from_json(config.to_json()) == config and config.to_dict()["authors_grid"] is True
    assert PrunerConfig.from_dict({"keep": 64}).authors_grid is False  # configs written before the option
    with pytest.raises(ValueError, match="authors_grid must be True or False"):
        PrunerConfig(authors_grid="yes")


def test_authors_grid_flags_reach_the_pruner_config(qwen_zoo, tmp_path):
    """pruner-export, pruner-run (eager) and pruner-eval take --authors-grid, say what it does in --help, and put it
    in the PrunerConfig; pruner-run refuses it for an exported folder (whose graphs hold their own placement)."""
    from export.cli import build_parser as export_parser
    from runtime.cli import build_parser as run_parser
    from runtime.cli import refuse_eager_flags
    from runtime.evaluate import build_parser as eval_parser
    from runtime.evaluate import options_from_args

    for parser in (export_parser(), run_parser(), eval_parser()):
        shown = " ".join(parser.format_help().split())
        assert "--authors-grid" in shown and "unmerged patch grid" in shown and "Qwen2-VL / Qwen2.5-VL only" in shown
    assert export_parser().parse_args(["--authors-grid"]).authors_grid is True
    args = eval_parser().parse_args(["--model", str(qwen_zoo["tiny-qwen2-vl"]), "--keep", "0.25", "--authors-grid"])
    settings = options_from_args(args).settings()
    assert all(s.pruner["authors_grid"] is True and s.label.endswith("authors-grid") for s in settings)
    (tmp_path / "export_config.json").write_text("{}")
    args = run_parser().parse_args([str(tmp_path), "--image", "x", "--prompt", "p", "--authors-grid"])
    with pytest.raises(ValueError, match="--authors-grid sets how an eager model is pruned"):
        refuse_eager_flags(args)
