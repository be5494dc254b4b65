"""The model-family interface: the registry keyed by config model_type, the LLaVA adapter's answers, the position
helpers the shared decoder machinery keeps for M-RoPE, and the layout rule (one file per family, none huge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import pruner_core.adapters as adapters
from pruner_core.adapters import (
    LLAVA,
    ModelAdapter,
    ModelGeometry,
    adapter_for,
    image_grid,
    load_llava,
    register_adapter,
    registered_adapters,
    resolve_model,
)
from pruner_core.adapters.decoder import gather_positions, next_positions, prompt_positions


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    return {name: resolve_model(name, cache_dir) for name in ("tiny-llava", "tiny-llava-gqa")}


def test_registry_finds_llava_from_every_kind_of_source(zoo):
    path = zoo["tiny-llava"]
    config = AutoConfig.from_pretrained(path)
    assert isinstance(LLAVA, ModelAdapter)
    assert LLAVA in registered_adapters()
    for source in (path, str(path), path / "config.json", {"model_type": "llava"}, config):
        assert adapter_for(source) is LLAVA
    model, _ = load_llava(path)
    assert adapter_for(model) is LLAVA


def test_registry_errors_name_the_supported_model_types(tmp_path):
    with pytest.raises(ValueError, match="'llava_next' model.*model_type 'llava'.*'qwen2_vl'"):
        adapter_for({"model_type": "llava_next"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model.*model_type 'llava'"):
        adapter_for(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        adapter_for(tmp_path / "missing")
    with pytest.raises(ValueError, match="already has an adapter"):
        register_adapter(type(LLAVA)())  # a second adapter for "llava"
    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter(object())


def test_llava_geometry_matches_the_config(zoo):
    for name, (side, gqa) in {"tiny-llava": (24, False), "tiny-llava-gqa": (16, True)}.items():
        config = AutoConfig.from_pretrained(zoo[name])
        geometry = LLAVA.geometry(config)
        text = config.text_config
        assert isinstance(geometry, ModelGeometry)
        assert geometry.grid == image_grid(config) == (side, side)
        assert geometry.num_image_tokens == side * side
        assert geometry.image_size == (side * 14, side * 14)
        assert geometry.image_token_id == config.image_token_id
        assert geometry.num_layers == text.num_hidden_layers
        assert (geometry.num_heads, geometry.num_kv_heads) == (text.num_attention_heads, text.num_key_value_heads)
        assert (geometry.num_kv_heads < geometry.num_heads) == gqa
        assert geometry.head_dim * geometry.num_heads == text.hidden_size == geometry.hidden_size
        assert geometry.position_scheme == "1d"
    with pytest.raises(ValueError, match="position_scheme"):
        ModelGeometry((1, 1), (1, 1), 0, 1, 1, 1, 1, 1, position_scheme="2d")


def test_llava_adapter_answers_with_the_module_functions(zoo):
    path = zoo["tiny-llava"]
    model, processor = LLAVA.load(path)
    assert LLAVA.language_model(model) is model.model.language_model
    assert LLAVA.lm_head(model) is model.lm_head
    assert LLAVA.prompt("Why?") == adapters.llava_prompt("Why?")
    info = LLAVA.tokenizer_info(model, processor, ["tokenizer.json"])
    assert info["prompt_format"] == adapters.llava_prompt("{prompt}")
    assert info["image_token_id"] == model.config.image_token_id
    start = LLAVA.prompt_image_start(processor.tokenizer, model.config.image_token_id)
    ids = processor.tokenizer(LLAVA.prompt("?"))["input_ids"]
    assert ids[start] == model.config.image_token_id
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        features = LLAVA.encode_image(model, pixels)
        cls = LLAVA.cls_attention(model, pixels)
    assert features.shape == (1, 576, model.config.text_config.hidden_size)
    assert cls.shape == (1, 576)  # the [CLS] column dropped
    counts = LLAVA.parameter_counts(path)
    assert counts == adapters.parameter_counts(path) and counts.total == adapters.estimate_parameters(path)
    assert abs(counts.total / sum(p.numel() for p in model.parameters()) - 1) < 0.01  # an estimate from config.json
    assert set(LLAVA.tiny_models) <= set(adapters.hub.tiny_models())
    assert set(LLAVA.hub_aliases) <= set(adapters.hub.hub_aliases())


def test_position_helpers_keep_1d_and_take_mrope_axes():
    positions = torch.arange(12).reshape(2, 6)  # [B, T]
    index = torch.tensor([[0, 2, 5], [1, 3, 4]])
    assert torch.equal(gather_positions(positions, index), positions.gather(1, index))
    assert torch.equal(next_positions(positions), positions[:, -1] + 1)
    mrope = torch.stack([positions, positions * 2, positions * 3])  # [3, B, T]
    gathered = gather_positions(mrope, index)
    assert gathered.shape == (3, 2, 3)
    assert all(torch.equal(gathered[axis], mrope[axis].gather(1, index)) for axis in range(3))
    assert torch.equal(next_positions(mrope), mrope[:, :, -1].amax(0) + 1)
    assert torch.equal(prompt_positions(None, 2, 4, torch.device("cpu")), torch.arange(4).expand(2, 4))
    assert prompt_positions(torch.arange(4)[None], 3, 4, torch.device("cpu")).shape == (3, 4)
    assert prompt_positions(torch.zeros(3, 1, 4, dtype=torch.long), 2, 4, torch.device("cpu")).shape == (3, 2, 4)


def test_no_adapter_file_is_huge():
    folder = Path(adapters.__file__).parent
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    family_files = {"llava.py", "llava_tiny.py", "qwen2_vl.py", "qwen2_vl_tiny.py"}
    assert {"base.py", "hub.py", "decoder.py"} | family_files <= set(sizes)
    assert max(sizes.values()) <= 550, sizes
