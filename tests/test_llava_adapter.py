"""The LLaVA adapter: tiny model zoo, eager pruning through the stock `generate`, exactness at keep=1.0.

Tiny random LLaVA-1.5 models are built once per session (no downloads); inputs are real photos from scikit-image.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from pruner_core import PrunerConfig, method_names
from pruner_core.adapters import (
    TINY_MODELS,
    apply_pruner,
    build_tiny_llava,
    clip_cls_attention,
    embed_prompt,
    image_grid,
    last_token_attention,
    layer_keys,
    llava_prompt,
    load_llava,
    prefill_with_pruning,
    pruner_config,
    remove_pruner,
    resolve_model,
)
from pruner_core.adapters.llava import _PrunedLlavaForward

MODELS = ("tiny-llava", "tiny-llava-gqa")
QUESTION = "What is shown in this image?"


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    return {name: resolve_model(name, cache_dir) for name in MODELS} | {"cache_dir": cache_dir}


@pytest.fixture(scope="session")
def astronaut():
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def chelsea():
    return Image.fromarray(data.chelsea())


def load(zoo, name, **kwargs):
    return load_llava(zoo[name], **kwargs)


@pytest.fixture(scope="session")
def stock_generate(zoo, astronaut):
    """Unpatched greedy generation on the astronaut prompt, computed once per (model, backend, tokens)."""
    runs = {}

    def run(name, tokens, attn_implementation=None):
        key = (name, tokens, attn_implementation)
        if key not in runs:
            model, processor = load(zoo, name, attn_implementation=attn_implementation)
            runs[key] = generate(model, prompt_inputs(processor, astronaut), tokens)
        return runs[key]

    return run


def prompt_inputs(processor, image, question=QUESTION):
    return processor(images=image, text=llava_prompt(question), return_tensors="pt")


def generate(model, inputs, tokens):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )


def max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


def image_tokens(model, inputs):
    return int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])


def cache_lengths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


# ---------------------------------------------------------------- keep = 1.0 reproduces stock transformers


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("name", MODELS)
def test_keep_all_matches_stock_generate(zoo, astronaut, stock_generate, name, layer):
    model, processor = load(zoo, name)
    inputs = prompt_inputs(processor, astronaut)
    stock = stock_generate(name, 6)
    apply_pruner(model, PrunerConfig(keep=1.0, layer=layer))
    pruned = generate(model, inputs, 6)
    assert torch.equal(pruned.sequences, stock.sequences)
    assert max_logit_diff(pruned, stock) <= 1e-5


@pytest.mark.parametrize("layer", [0, 2])
def test_keep_all_matches_stock_left_padded_batch(zoo, astronaut, chelsea, layer):
    model, processor = load(zoo, "tiny-llava-gqa")
    prompts = [llava_prompt("Describe the photo in detail, please, with every object you see."), llava_prompt("Cat?")]
    inputs = processor(images=[astronaut, chelsea], text=prompts, return_tensors="pt", padding=True)
    assert not bool(inputs["attention_mask"].all())  # the short prompt is left-padded
    stock = generate(model, inputs, 3)
    apply_pruner(model, PrunerConfig(keep=1.0, layer=layer))
    pruned = generate(model, inputs, 3)
    assert torch.equal(pruned.sequences, stock.sequences)
    assert max_logit_diff(pruned, stock) <= 1e-5


def test_keep_all_matches_stock_eager_attention(zoo, astronaut, stock_generate):
    """The eager backend gets explicit additive masks everywhere (sdpa mostly runs unmasked)."""
    model, processor = load(zoo, "tiny-llava-gqa", attn_implementation="eager")
    inputs = prompt_inputs(processor, astronaut)
    stock = stock_generate("tiny-llava-gqa", 4, "eager")
    apply_pruner(model, PrunerConfig(keep=1.0, layer=2))
    pruned = generate(model, inputs, 4)
    assert torch.equal(pruned.sequences, stock.sequences)
    assert max_logit_diff(pruned, stock) <= 1e-5


# ---------------------------------------------------------------- pruned generation


@pytest.mark.parametrize("layer", [0, 2])
def test_pruned_generation_is_deterministic_and_prunes(zoo, astronaut, stock_generate, layer):
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    stock = stock_generate("tiny-llava-gqa", 16)
    apply_pruner(model, PrunerConfig(keep=0.12, layer=layer))
    first, second = generate(model, inputs, 16), generate(model, inputs, 16)
    prompt_length = inputs["input_ids"].shape[1]
    assert first.sequences.shape[1] == prompt_length + 16
    assert torch.equal(first.sequences, second.sequences)
    assert max_logit_diff(first, second) == 0.0
    assert all(bool(torch.isfinite(step).all()) for step in first.logits)
    assert max_logit_diff(first, stock) > 1e-4  # pruning changed what the decoder saw


@pytest.mark.parametrize("layer", [0, 2])
def test_kv_cache_lengths(zoo, astronaut, layer):
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    config = PrunerConfig(keep=0.12, layer=layer)
    apply_pruner(model, config)
    full = inputs["input_ids"].shape[1]
    n_image = image_tokens(model, inputs)
    pruned = full - n_image + config.budget(n_image)
    expected = [full if index < layer else pruned for index in range(model.config.text_config.num_hidden_layers)]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert cache_lengths(out.past_key_values) == expected
    assert out.logits.shape[1] == pruned  # the forward returns the pruned sequence's logits
    new = 5
    generated = generate(model, inputs, new)
    assert cache_lengths(generated.past_key_values) == [length + new - 1 for length in expected]


def test_decoding_positions_continue_at_full_length(zoo, astronaut):
    """Layer 2: decoding positions count the full prompt; feeding them explicitly changes nothing."""
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    apply_pruner(model, PrunerConfig(keep=0.12, layer=2))
    full = inputs["input_ids"].shape[1]
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        implicit = model(input_ids=token, past_key_values=prefill.past_key_values).logits
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        explicit = model(
            input_ids=token, past_key_values=prefill.past_key_values, position_ids=torch.tensor([[full]]),
            attention_mask=torch.ones(1, full + 1, dtype=torch.long),
        ).logits
        other_cache = model(**inputs, use_cache=True).past_key_values
        shifted = model(input_ids=token, past_key_values=other_cache, position_ids=torch.tensor([[full - 7]])).logits
    assert torch.allclose(implicit, explicit, atol=1e-6)
    assert not torch.allclose(implicit, shifted, atol=1e-6)  # the position does matter


def test_layer0_equals_stock_model_on_the_pruned_prompt(zoo, astronaut):
    """Layer 0: generating from the image equals stock generate on [text] + [R kept tokens] + [text] embeddings."""
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    config = PrunerConfig(keep=0.12, layer=0)
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
        start = int(starts[0])
        result = prefill_with_pruning(model, embeds, start, n_image, image_grid(model.config), config)
    budget = config.budget(n_image)
    pruned_embeds = torch.cat(
        [embeds[:, :start], result.selection.states, embeds[:, start + n_image :]], dim=1
    )  # what a stock runner sees from an encoder that returns R tokens
    stock = generate(model, {"inputs_embeds": pruned_embeds}, 5)
    apply_pruner(model, config)
    pruned = generate(model, inputs, 5)
    assert torch.equal(pruned.sequences[:, -5:], stock.sequences[:, -5:])
    assert max_logit_diff(pruned, stock) <= 1e-5
    assert pruned_embeds.shape[1] == inputs["input_ids"].shape[1] - n_image + budget


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_generates(zoo, astronaut, method):
    """Each method gets the signals it declares (keys, last-token attention, tower [CLS] attention) via generate."""
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    layer = 2 if method_names().index(method) % 2 == 0 else 0
    config = PrunerConfig(keep=0.25, layer=layer, method=method)
    apply_pruner(model, config)
    out = generate(model, inputs, 2)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 2
    n_image = image_tokens(model, inputs)
    kept = inputs["input_ids"].shape[1] - n_image + config.budget(n_image)
    assert cache_lengths(out.past_key_values)[-1] == kept + 1


# ---------------------------------------------------------------- apply / remove


def test_remove_restores_stock_exactly(zoo, astronaut, stock_generate):
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    stock_class = type(model.model)
    stock = stock_generate("tiny-llava-gqa", 6)
    apply_pruner(model, PrunerConfig(keep=0.12))
    pruned = generate(model, inputs, 6)
    assert max_logit_diff(pruned, stock) > 1e-4
    remove_pruner(model)
    assert type(model.model) is stock_class
    assert pruner_config(model) is None
    assert not any(name.startswith("_pruner") for name in vars(model.model))
    restored = generate(model, inputs, 6)
    assert torch.equal(restored.sequences, stock.sequences)
    assert max_logit_diff(restored, stock) == 0.0
    remove_pruner(model)  # removing again is a no-op
    assert type(model.model) is stock_class


def test_apply_twice_is_idempotent_and_reapply_replaces(zoo, astronaut):
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    stock_class = type(model.model)
    once = PrunerConfig(keep=0.12, layer=2)
    apply_pruner(model, once)
    expected = generate(model, inputs, 4)
    apply_pruner(model, once)
    again = generate(model, inputs, 4)
    assert torch.equal(again.sequences, expected.sequences) and max_logit_diff(again, expected) == 0.0
    assert type(model.model).__mro__.count(_PrunedLlavaForward) == 1
    assert model.model._pruner_original_class is stock_class

    other = PrunerConfig(keep=0.25, layer=0)
    apply_pruner(model, other)
    assert pruner_config(model) == other
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    n_image = image_tokens(model, inputs)
    assert cache_lengths(out.past_key_values)[0] == inputs["input_ids"].shape[1] - n_image + other.budget(n_image)
    remove_pruner(model)
    assert type(model.model) is stock_class


def test_patch_is_per_instance(zoo, astronaut):
    pruned_model, processor = load(zoo, "tiny-llava-gqa")
    other_model, _ = load(zoo, "tiny-llava-gqa")
    apply_pruner(pruned_model, PrunerConfig(keep=0.12))
    assert isinstance(pruned_model.model, _PrunedLlavaForward)
    assert not isinstance(other_model.model, _PrunedLlavaForward)
    inputs = prompt_inputs(processor, astronaut)
    with torch.no_grad():
        out = other_model(**inputs, use_cache=True)
    assert cache_lengths(out.past_key_values) == [inputs["input_ids"].shape[1]] * len(out.past_key_values.layers)


def test_apply_rejects_bad_configs(zoo):
    model, _ = load(zoo, "tiny-llava-gqa")
    layers = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match="decoder layers"):
        apply_pruner(model, PrunerConfig(layer=layers))
    with pytest.raises(ValueError, match="unknown method"):
        apply_pruner(model, PrunerConfig(method="no-such-method"))
    with pytest.raises(ValueError, match="not merged patches.*LLaVA-1.5.*drop authors_grid"):  # a Qwen2-VL option
        apply_pruner(model, PrunerConfig(authors_grid=True))
    assert not isinstance(model.model, _PrunedLlavaForward)


# ---------------------------------------------------------------- the exporter's entry point and the signals


@pytest.mark.parametrize("layer", [0, 2])
def test_prefill_with_pruning_contract(zoo, astronaut, layer):
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    with torch.no_grad():
        stock = model(**inputs)
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
        grid = image_grid(model.config)
        start = int(starts[0])
        everything = prefill_with_pruning(model, embeds, start, n_image, grid, PrunerConfig(keep=1.0, layer=layer))
        config = PrunerConfig(keep=0.25, layer=layer)
        pruned = prefill_with_pruning(model, embeds, start, n_image, grid, config)
    full = inputs["input_ids"].shape[1]
    assert torch.allclose(everything.logits, stock.logits[:, -1], atol=1e-5)
    budget = config.budget(n_image)
    kept = full - n_image + budget
    assert [k.shape[-2] for k in pruned.keys] == [full if i < layer else kept for i in range(len(pruned.keys))]
    assert [v.shape for v in pruned.values] == [k.shape for k in pruned.keys]
    kept_image = start + pruned.selection.indices[0]
    if layer == 0:
        assert torch.equal(pruned.positions[0], torch.arange(kept))
        assert int(pruned.next_position[0]) == kept
    else:
        assert torch.equal(pruned.positions[0, start : start + budget], kept_image)  # original positions
        assert torch.equal(pruned.positions[0, start + budget :], torch.arange(start + n_image, full))
        assert int(pruned.next_position[0]) == full
    assert torch.equal(pruned.kept_index[0, start : start + budget], kept_image)


@pytest.mark.parametrize("layer", [0, 2])
def test_prefill_with_pruning_exports(zoo, astronaut, layer):
    """With int image_start / n_image every shape is static: torch.export traces it and matches eager exactly."""
    model, processor = load(zoo, "tiny-llava-gqa")
    inputs = prompt_inputs(processor, astronaut)
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
    start, grid, config = int(starts[0]), image_grid(model.config), PrunerConfig(keep=0.12, layer=layer)

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, prompt_embeds):
            out = prefill_with_pruning(self.model, prompt_embeds, start, n_image, grid, config)
            return (out.logits, out.positions, out.selection.indices, *out.keys, *out.values)

    module = Prefill().eval()
    with torch.no_grad():
        exported = torch.export.export(module, (embeds,), strict=False)
        expected, actual = module(embeds), exported.module()(embeds)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape
        assert torch.allclose(want.float(), got.float(), atol=1e-6)


def test_layer_keys_and_last_token_attention_match_stock(zoo, astronaut):
    model, processor = load(zoo, "tiny-llava-gqa", attn_implementation="eager")
    inputs = prompt_inputs(processor, astronaut)
    language_model = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
        layer = 1  # K - 1 for the default K = 2
        hidden_in = out.hidden_states[layer]  # input of decoder layer `layer`
        positions = torch.arange(hidden_in.shape[1])[None]
        cos_sin = language_model.rotary_emb(hidden_in, positions)
        keys = layer_keys(language_model.layers[layer], hidden_in, *cos_sin)  # [1, T, H*d]
        attention = last_token_attention(language_model.layers[layer], hidden_in, *cos_sin)  # [1, T]
    cached = out.past_key_values.layers[layer].keys  # [1, Hkv, T, d]
    groups = model.config.text_config.num_attention_heads // model.config.text_config.num_key_value_heads
    expected_keys = cached.repeat_interleave(groups, dim=1).transpose(1, 2).flatten(2)
    assert torch.allclose(keys, expected_keys, atol=1e-6)
    assert torch.allclose(attention, out.attentions[layer][:, :, -1].mean(1), atol=1e-6)


def test_clip_cls_attention_matches_eager_tower(zoo, astronaut):
    model, processor = load(zoo, "tiny-llava", attn_implementation="eager")
    pixel_values = prompt_inputs(processor, astronaut)["pixel_values"]
    tower = model.model.vision_tower
    feature_layer = model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        cls = clip_cls_attention(tower, out.hidden_states, feature_layer)
    expected = out.attentions[feature_layer][:, :, 0, 1:].mean(1)  # attentions[i] belongs to hidden_states[i + 1]
    assert cls.shape == (1, image_grid(model.config)[0] * image_grid(model.config)[1])
    assert torch.allclose(cls, expected, atol=1e-6)


# ---------------------------------------------------------------- zoo


def test_grid_and_span_are_read_from_config(zoo, astronaut):
    for name in MODELS:
        model, processor = load(zoo, name)
        spec = TINY_MODELS[name]
        side = spec.image_size // spec.patch_size
        assert image_grid(model.config) == (side, side)
        assert image_tokens(model, prompt_inputs(processor, astronaut)) == side * side
    gqa, _ = load(zoo, "tiny-llava-gqa")
    assert image_grid(gqa.config) == (16, 16)  # the 224 px model
    text = gqa.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads


def test_tiny_model_layout_and_chat_template(zoo):
    model, processor = load(zoo, "tiny-llava")
    assert model.config.model_type == "llava"
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama"
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == llava_prompt(QUESTION)
    ids = processor.tokenizer(llava_prompt(QUESTION)).input_ids
    assert ids[0] == processor.tokenizer.bos_token_id


def test_resolve_reuses_build_and_builds_are_seeded(zoo, tmp_path):
    path = zoo["tiny-llava-gqa"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-llava-gqa", zoo["cache_dir"]) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    spec = TINY_MODELS["tiny-llava-gqa"]
    rebuilt = build_tiny_llava(tmp_path / "again", image_size=spec.image_size, gqa=True, seed=spec.seed)
    first, second = load_file(path / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other_seed = load_file(build_tiny_llava(tmp_path / "seed1", image_size=spec.image_size, gqa=True, seed=1)
                           / "model.safetensors")
    assert any(not torch.equal(first[k], other_seed[k]) for k in first)


def fake_hub_snapshot(hf_cache, repo_id, config):
    """A snapshot laid out as huggingface_hub caches one (refs/main -> snapshots/<commit>)."""
    root = hf_cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))  # the weights' index
    return snapshot


def test_resolve_model_finds_hub_cache_and_local_directories(zoo, tmp_path):
    hf_cache = tmp_path / "hf"
    snapshot = fake_hub_snapshot(hf_cache, "llava-hf/llava-1.5-7b-hf", {"model_type": "llava"})
    assert resolve_model("llava-1.5-7b", tmp_path, hf_cache_dir=hf_cache) == snapshot
    assert resolve_model("llava-hf/llava-1.5-7b-hf", tmp_path, hf_cache_dir=hf_cache) == snapshot
    fake_hub_snapshot(hf_cache, "someone/text-only", {"model_type": "llama"})
    with pytest.raises(ValueError, match="'llama' model"):
        resolve_model("someone/text-only", tmp_path, hf_cache_dir=hf_cache)
    assert resolve_model(str(zoo["tiny-llava"]), tmp_path) == zoo["tiny-llava"]


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download someone/not-a-cached-model"):
        resolve_model("someone/not-a-cached-model", tmp_path, hf_cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="download llava-hf/llava-1.5-7b-hf"):
        resolve_model("llava-1.5-7b", tmp_path, hf_cache_dir=tmp_path / "hf")
    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    (llama_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model.*model_type 'llava'"):
        resolve_model(str(llama_dir), tmp_path)
    with pytest.raises(ValueError, match="tiny-llava"):
        resolve_model("gpt-nine", tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)


def test_hub_id_shadowed_by_a_local_folder(tmp_path, monkeypatch):
    """'Qwen/...' is a hub id even when a folder 'Qwen/' (e.g. of exports) is in the working directory: the local
    Hugging Face cache is used; when it is neither a folder nor cached, the error says both and how to fetch it."""
    hf_cache = tmp_path / "hf"
    repo = "Qwen/Qwen2-VL-2B-Instruct"
    work = tmp_path / "work"
    (work / "Qwen" / "qwen2-vl-2b-keep0.12-onnx").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(FileNotFoundError) as missing:
        resolve_model(repo, tmp_path, hf_cache_dir=hf_cache)
    message = str(missing.value)
    assert f"no such folder: {repo}" in message and "qwen2-vl-2b-keep0.12-onnx" in message
    assert "not in the local Hugging Face cache as a hub id" in message and f"hf download {repo}" in message
    snapshot = fake_hub_snapshot(hf_cache, repo, {"model_type": "qwen2_vl"})
    assert resolve_model(repo, tmp_path, hf_cache_dir=hf_cache) == snapshot
    assert resolve_model("qwen2-vl-2b", tmp_path, hf_cache_dir=hf_cache) == snapshot
    local = work / "Qwen" / "Qwen2-VL-2B-Instruct"  # a real folder of that name wins over the cache
    local.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(repo, tmp_path, hf_cache_dir=hf_cache)
    with pytest.raises(FileNotFoundError, match="no such folder: Qwen/a/b"):  # three parts: a path, never a hub id
        resolve_model("Qwen/a/b", tmp_path, hf_cache_dir=hf_cache)
