"""Qwen2-VL / Qwen2.5-VL ONNX exports: the transformers.js layout with M-RoPE position_ids [3, 1, S], run by the
project's runtime without transformers, equal to the eager pruned model (apply_pruner + the stock generate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cases import copy_export_without
import torch
from PIL import Image
from skimage import data

from export.common import ExportOptions
from export.onnx_export import export_onnx
from pruner_core import PrunerConfig
from pruner_core.adapters import apply_pruner, load_qwen2_vl, qwen_prompt, resolve_model
from runtime import load

EXPORTS = [("tiny-qwen2-vl", 0), ("tiny-qwen2.5-vl", 2)]  # both variants, both placements; GQA (2 KV heads of 4)
IMAGE_SIZE = {("tiny-qwen2-vl", 0): None, ("tiny-qwen2.5-vl", 2): (280, 196)}  # the tiny default (224 x 336) and
# an --image-size with more rows than columns (10 x 7 merged tokens)
AUTHORS_GRID = {("tiny-qwen2-vl", 0): False, ("tiny-qwen2.5-vl", 2): True}  # the authors' grid placement option
KEEP = {("tiny-qwen2-vl", 0): 0.12, ("tiny-qwen2.5-vl", 2): 0.25}  # 0.25: where the authors' grid keeps other tokens
QUESTIONS = ("What is in the picture?", "Describe the photo in detail.")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def qwen_onnx(tmp_path_factory):
    """(name, layer) -> (model directory, export folder), each exported once."""
    cache = tmp_path_factory.mktemp("qwen-onnx-zoo")
    out = {}
    for name, layer in EXPORTS:
        model_dir = resolve_model(name, cache)
        folder = tmp_path_factory.mktemp(f"{name}-L{layer}")
        pruner = PrunerConfig(keep=KEEP[name, layer], layer=layer, authors_grid=AUTHORS_GRID[name, layer])
        options = ExportOptions(model=name, target="onnx", pruner=pruner, max_seq_len=256,
                                image_size=IMAGE_SIZE[name, layer])
        export_onnx(model_dir, folder, options, model_id=name)
        out[name, layer] = model_dir, folder
    return out


@pytest.mark.parametrize("name, layer", EXPORTS)
def test_onnx_equals_eager_pruned_generate(qwen_onnx, name, layer):
    model_dir, folder = qwen_onnx[name, layer]
    session = load(folder)
    model, processor = load_qwen2_vl(model_dir, image_size=IMAGE_SIZE[name, layer])
    apply_pruner(model, PrunerConfig(keep=KEEP[name, layer], layer=layer, authors_grid=AUTHORS_GRID[name, layer]))
    eos = set(model.generation_config.eos_token_id)
    image = Image.fromarray(data.astronaut())
    for question in QUESTIONS:
        result = session.generate(image, question, max_new_tokens=NEW_TOKENS)
        with torch.no_grad():
            expected = model.generate(**processor(images=image, text=qwen_prompt(question)),
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        generated = expected[0, -NEW_TOKENS:].tolist()
        assert result.tokens == generated[: len(result.tokens)]
        assert len(result.tokens) == NEW_TOKENS or generated[len(result.tokens)] in eos
        n_image = int(processor(images=image, text=qwen_prompt(question))["mm_token_type_ids"].sum())
        assert result.profile.image_tokens_kept == PrunerConfig(keep=KEEP[name, layer]).budget(n_image)


@pytest.mark.parametrize("name, layer", EXPORTS)
def test_export_config_records_the_qwen_contract(qwen_onnx, name, layer):
    model_dir, folder = qwen_onnx[name, layer]
    config = json.loads((folder / "export_config.json").read_text())
    height, width = IMAGE_SIZE[name, layer] or json.loads((model_dir / "tiny_qwen2_vl_spec.json").read_text())[
        "image_size"]
    assert config["decoder"]["position_scheme"] == "mrope" and config["positions"] == "original"
    assert config["random_weights"] is True  # a tiny build
    assert config["pruner"]["authors_grid"] is AUTHORS_GRID[name, layer]  # the grid placement the graphs hold
    assert config["grid"] == [height // 28, width // 28] and config["num_image_tokens"] == height * width // 784
    assert config["image_preprocessing"]["input_layout"] == "flat_patches"
    pixels = next(s for s in config["methods"]["vision_encoder"]["inputs"] if s["name"] == "pixel_values")
    assert pixels["shape"] == [height * width // 196, 1176]
    decoder = {s["name"]: s for s in config["methods"]["decoder_model_merged"]["inputs"]}
    assert decoder["position_ids"]["shape"][:2] == [3, 1]
    assert (folder / "preprocessor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    # the runtime's pixels for the export are the HF image processor's at the export size
    from runtime.preprocess import ImagePreprocessing, preprocess

    _, processor = load_qwen2_vl(model_dir, image_size=(height, width))
    image = Image.fromarray(data.chelsea())
    spec = ImagePreprocessing.from_dict(config["image_preprocessing"])
    assert np.array_equal(preprocess(image, spec), processor.pixels(image)["pixel_values"].numpy())


def test_export_without_position_scheme_is_refused_naming_the_field(qwen_onnx, tmp_path):
    """An M-RoPE export whose export_config.json lacks decoder.position_scheme cannot be run as a 1-D one: a clear
    error naming the field, not onnxruntime's missing-input message."""
    folder = copy_export_without(qwen_onnx["tiny-qwen2-vl", 0][1], tmp_path / "edited", "decoder", "position_scheme")
    with pytest.raises(ValueError, match="lacks decoder.position_scheme.*mrope.*export the model again"):
        load(folder)


def test_onnx_keeps_the_authors_grid_selection(qwen_onnx):
    """The export with authors_grid keeps, in its layer-K decoder graph, the tokens the eager option keeps, which
    are not those of the true merged grid (the static selection in the graph uses the same placement)."""
    from pruner_core.adapters import QWEN2_VL
    from pruner_core.adapters.qwen2_vl import merged_grid, rope_positions

    name, layer = next(key for key, authors in AUTHORS_GRID.items() if authors)
    model_dir, folder = qwen_onnx[name, layer]
    model, processor = load_qwen2_vl(model_dir, image_size=IMAGE_SIZE[name, layer])
    inputs = processor(images=Image.fromarray(data.astronaut()), text=qwen_prompt(QUESTIONS[0]))
    ids, grid_thw = inputs["input_ids"], inputs["image_grid_thw"]
    kept = {}
    with torch.no_grad():
        embeds, starts, n_image = QWEN2_VL.embed_prompt(model, ids, inputs["pixel_values"], grid_thw)
        positions, _ = rope_positions(model, ids, inputs["mm_token_type_ids"], grid_thw)
        for authors in (False, True):
            config = PrunerConfig(keep=KEEP[name, layer], layer=layer, authors_grid=authors)
            out = QWEN2_VL.prefill_with_pruning(model, embeds, int(starts[0]), n_image, merged_grid(grid_thw), config,
                                                position_ids=positions)
            kept[authors] = out.selection.indices[0].tolist()
    start = int(starts[0])
    graphs = load(folder).backend.model
    prefill = graphs.prefill(ids[0, :start].tolist(), inputs["pixel_values"].numpy(), ids[0, start + n_image:].tolist())
    assert prefill.kept_image_indices.tolist() == kept[True] != kept[False]


def test_small_external_tensors_go_back_into_the_graph(qwen_onnx, tmp_path):
    """A graph saved with every tensor external (what the torch exporter writes above EXTERNAL_DATA_BYTES) fails
    ONNX's full check on Qwen2.5-VL's window split sizes; inline_small_external_tensors moves tensors <= 1 KiB back
    and the check passes, the large weights stay external, and onnxruntime gives the same output."""
    import onnx
    import onnxruntime

    from export.onnx_files import INLINE_TENSOR_BYTES, inline_small_external_tensors

    _, folder = qwen_onnx["tiny-qwen2.5-vl", 2]
    source = folder / "onnx" / "vision_encoder.onnx"
    external = tmp_path / "vision_encoder.onnx"
    onnx.save(onnx.load(str(source)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="vision_encoder.onnx_data", size_threshold=0)
    with pytest.raises(onnx.shape_inference.InferenceError, match="external"):
        onnx.checker.check_model(str(external), full_check=True)
    model = onnx.load(str(external), load_external_data=False)
    moved = inline_small_external_tensors(model, tmp_path)
    onnx.save(model, str(external))
    onnx.checker.check_model(str(external), full_check=True)
    kept_external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    lengths = [int({e.key: e.value for e in t.external_data}["length"]) for t in kept_external]
    assert moved > 0 and lengths and min(lengths) > INLINE_TENSOR_BYTES
    pixels = {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
    outputs = [onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, pixels)
               for path in (source, external)]
    for expected, got in zip(*outputs):
        np.testing.assert_array_equal(expected, got)


def test_quantized_graphs_keep_split_sizes_in_the_graph(tmp_path):
    """The quantized files' rewrite (onnx_files._tidy_quantized, onnx_ir's save: 256-byte threshold) keeps tensors
    up to INLINE_TENSOR_BYTES in the graph: a Split by 64 window lengths (512 bytes, Qwen2.5-VL's window attention at
    448 x 448) stays readable by the full check when the graph's weights are external (int8 / int4 at 3B widths)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.onnx_files import INLINE_TENSOR_BYTES, _tidy_quantized

    sizes = numpy_helper.from_array(np.full(64, 4, dtype=np.int64), "window_lengths")
    weight = numpy_helper.from_array(np.ones((256, 8), dtype=np.float32), "weight")  # 8 KiB: stays external
    outputs = [f"window_{i}" for i in range(64)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"]),
         helper.make_node("Split", ["y", "window_lengths"], outputs)],
        "windows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 8]) for name in outputs], [sizes, weight])
    target = tmp_path / "vision_encoder_quantized.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(target),
              save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + "_data",
              size_threshold=0)  # every tensor external, as the torch exporter writes them
    assert 256 < len(sizes.raw_data) <= INLINE_TENSOR_BYTES
    _tidy_quantized(target, external=True)
    onnx.checker.check_model(str(target), full_check=True)
    saved = {t.name: t.data_location for t in onnx.load(str(target), load_external_data=False).graph.initializer}
    assert saved == {"window_lengths": TensorProto.DEFAULT, "weight": TensorProto.EXTERNAL}
