"""ONNX target: the exported graphs match eager pruned PyTorch, pass the ONNX checker, and export_config.json
describes them exactly.

Every export runs once per module in a two-process pool (tracing and lowering are single-threaded, ~25 s each);
tests share the folders. Inputs are a real photo (scikit-image's astronaut) through the model's own processor.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from skimage import data

from export.common import ExportOptions
from export.onnx_contract import evaluate_dim, same_expression
from export.onnx_export import export_onnx, lower, trace
from export.onnx_files import quantize_graph, save_graph
from export.onnx_graphs import embed_plan, read_shapes
from export.onnx_weights import StoredTensor, duplicated, stored_tensors
from pruner_core import PrunerConfig
from pruner_core.adapters import (
    apply_pruner,
    embed_prompt,
    image_grid,
    llava_prompt,
    load_llava,
    prefill_with_pruning,
    resolve_model,
)
from runtime.onnx_backend import OnnxModel
from runtime.prompt import PromptIds, split_prompt
from runtime.preprocess import ImagePreprocessing

pytestmark = pytest.mark.slow

MODELS = ("tiny-llava", "tiny-llava-gqa")
LAYERS = (0, 2)
KEEPS = (0.12, 1.0)
TOKENS = 16
QUESTION = "What is shown in this image?"
STAGES = ["trace", "lower", "serialise"]


@dataclass(frozen=True)
class Case:
    model: str
    layer: int
    keep: float
    quantize: str = "none"
    dtype: str = "fp32"

    def options(self) -> ExportOptions:
        pruner = PrunerConfig(keep=self.keep, layer=self.layer)
        return ExportOptions(model=self.model, target="onnx", pruner=pruner, quantize=self.quantize, dtype=self.dtype)

    def __str__(self) -> str:
        extra = "" if self.quantize == "none" and self.dtype == "fp32" else f"-{self.quantize}-{self.dtype}"
        return f"{self.model}-L{self.layer}-keep{self.keep}{extra}"


BASE = [Case(model, layer, keep) for model in MODELS for layer in LAYERS for keep in KEEPS]
INT8 = Case("tiny-llava-gqa", 2, 0.12, quantize="int8")
INT4 = Case("tiny-llava", 2, 0.12, quantize="int4")
FP16 = Case("tiny-llava-gqa", 0, 0.12, dtype="fp16")
ALL = BASE + [INT8, INT4, FP16]


def _export_case(model_dir: Path, out: Path, options: ExportOptions, model_id: str) -> tuple[dict, list[str]]:
    """Runs in a worker process: one export, recording the progress stages."""
    torch.set_num_threads(1)
    stages: list[str] = []
    out.mkdir(parents=True)
    payload = export_onnx(model_dir, out, options, model_id=model_id, progress=stages.append)
    return payload, stages


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    return {name: resolve_model(name, cache_dir) for name in MODELS}


class Exports:
    """Every case's export, started at once in a two-process pool; ``get`` waits for one (and raises its error)."""

    def __init__(self, zoo: dict[str, Path], root: Path, cache: dict):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pools
        self.root, self.cache = root, cache
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context)
        self.futures = {case: self.pool.submit(_export_case, zoo[case.model], root / str(case), case.options(),
                                               case.model) for case in ALL}

    def get(self, case: Case) -> tuple[Path, dict, list[str]]:
        payload, stages = self.futures[case].result()
        self.cache.setdefault(case.options(), (self.root / str(case), payload))  # conftest.onnx_export_cache
        return self.root / str(case), payload, stages


@pytest.fixture(scope="module")
def exports(zoo, tmp_path_factory, onnx_export_cache):
    runner = Exports(zoo, tmp_path_factory.mktemp("onnx"), onnx_export_cache)
    yield runner
    runner.pool.shutdown(cancel_futures=True)  # a -k run that needed few cases does not wait for the rest


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(data.astronaut())


def prompt_inputs(processor, image):
    return processor(images=image, text=llava_prompt(QUESTION), return_tensors="pt")


def load(zoo, case):
    dtype = torch.float16 if case.dtype == "fp16" else torch.float32
    return load_llava(zoo[case.model], dtype=dtype)


@pytest.fixture(scope="module")
def eager(zoo, astronaut):
    """Eager pruned PyTorch per case: (prompt inputs, greedy tokens, per-step logits, kept image indices)."""
    runs = {}

    def run(case):
        if case not in runs:
            model, processor = load(zoo, case)
            inputs = prompt_inputs(processor, astronaut)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            config = PrunerConfig(keep=case.keep, layer=case.layer)
            with torch.no_grad():
                embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
                kept = prefill_with_pruning(model, embeds, int(starts[0]), n_image, image_grid(model.config), config)
                apply_pruner(model, config)
                out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            logits = [step[0].float().numpy() for step in out.logits]
            runs[case] = (inputs, tokens, logits, kept.selection.indices[0].numpy())
        return runs[case]

    return run


def onnx_greedy(model: OnnxModel, before, pixel_values, after, tokens: int):
    """Greedy decoding through OnnxModel.prefill / decode -> (tokens, per-step logits, kept image indices)."""
    state = model.prefill(before, pixel_values, after)
    logits, cache, position = state.logits, state.cache, state.next_position
    out_tokens, out_logits = [], []
    while True:
        out_logits.append(logits.astype(np.float32))
        out_tokens.append(int(np.argmax(logits)))
        if len(out_tokens) == tokens or out_tokens[-1] in model.eos_ids:
            return out_tokens, out_logits, state.kept_image_indices
        logits, cache = model.decode(out_tokens[-1], cache, position)
        position += 1


def run_case(exports, eager, case):
    folder, payload, _ = exports.get(case)
    inputs, tokens, logits, kept = eager(case)
    model = OnnxModel(folder)
    parts = split_prompt(inputs["input_ids"][0].numpy(), model.image_token_id)
    return model, (parts.before, inputs["pixel_values"].float().numpy(), parts.after), (tokens, logits, kept)


# ---------------------------------------------------------------- onnxruntime == eager pruned PyTorch


@pytest.mark.parametrize("case", BASE, ids=str)
def test_greedy_tokens_and_logits_match_eager(exports, eager, case):
    model, (before, pixels, after), (tokens, logits, kept) = run_case(exports, eager, case)
    got_tokens, got_logits, got_kept = onnx_greedy(model, before, pixels, after, TOKENS)
    assert got_tokens == tokens
    assert max(np.abs(a - b).max() for a, b in zip(got_logits, logits, strict=True)) <= 1e-4
    assert np.array_equal(got_kept, kept)
    assert model.generate_greedy(before, pixels, after, TOKENS) == tokens


def test_fp16_matches_eager_fp16(exports, eager):
    model, (before, pixels, after), (tokens, logits, kept) = run_case(exports, eager, FP16)
    assert {meta.type for meta in model.sessions["vision_encoder"].get_inputs()} == {"tensor(float16)"}
    got_tokens, got_logits, got_kept = onnx_greedy(model, before, pixels, after, TOKENS)
    # fp16 is not bit-exact across runtimes (onnxruntime's CPU kernels accumulate more precisely than torch's), so a
    # near-tied token may swap; the selection still runs in fp16 inside the scan and agrees almost everywhere
    assert len(set(got_kept.tolist()) & set(kept.tolist())) >= 0.9 * len(kept)
    assert got_tokens == tokens
    assert max(np.abs(a - b).max() for a, b in zip(got_logits, logits, strict=True)) <= 5e-2


def test_int8_exports_and_generates(exports, eager):
    folder, payload, _ = exports.get(INT8)
    assert all(file.endswith("_quantized.onnx") for file in payload["graphs"].values())
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == sorted(
        Path(file).name for file in payload["graphs"].values()
    )  # only the graphs it uses, no leftover fp32 copies
    assert payload["quantization"] == "int8"
    decoder = onnx.load(str(folder / payload["graphs"]["decoder_model_merged"]))
    assert "MatMulInteger" in {node.op_type for node in decoder.graph.node}
    model, (before, pixels, after), (tokens, _, _) = run_case(exports, eager, INT8)
    got = model.generate_greedy(before, pixels, after, TOKENS)
    assert 1 <= len(got) <= TOKENS and all(0 <= t < model.decoder["vocab_size"] for t in got)
    assert got[0] == tokens[0]  # int8 weights barely move the first token of this tiny model


def dequantize_matmul_nbits(graph: onnx.ModelProto) -> list[np.ndarray]:
    """The float weights [K, N] every MatMulNBits node of a graph multiplies by (4-bit, symmetric: zero point 8,
    low nibble first, one scale per block of block_size along K)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    weights = []
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        packed = inits[node.input[1]].reshape(n, -1)  # [N, blocks * block / 2] uint8
        low, high = packed & 0x0F, packed >> 4
        q = np.stack([low, high], axis=-1).reshape(n, -1).astype(np.float32) - 8.0  # [N, blocks * block]
        scales = inits[node.input[2]].reshape(n, -1).astype(np.float32)  # [N, blocks]
        values = (q.reshape(n, scales.shape[1], block) * scales[..., None]).reshape(n, -1)[:, :k]
        weights.append(values.T)  # [K, N]
    return weights


def test_int4_equals_eager_with_its_4bit_weights(exports, eager, zoo, astronaut):
    """The q4 decoder is the eager model with every decoder linear's weight replaced by its 4-bit value (read back
    from the graph's MatMulNBits): same tokens, logits within float tolerance."""
    folder, payload, _ = exports.get(INT4)
    assert all(file.endswith("_q4.onnx") for file in payload["graphs"].values()) and payload["quantization"] == "int4"
    decoder = onnx.load(str(folder / payload["graphs"]["decoder_model_merged"]))
    assert "MatMulNBits" in {node.op_type for node in decoder.graph.node}
    vision = onnx.load(str(folder / payload["graphs"]["vision_encoder"]))
    assert "MatMulNBits" not in {node.op_type for node in vision.graph.node}  # the vision tower stays float
    model, processor = load(zoo, INT4)
    linears = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and (name.startswith("model.language_model.") or name == "lm_head")]
    quantized = dequantize_matmul_nbits(decoder)
    assert len(quantized) == len(linears)  # every linear of the layers and the LM head, once
    with torch.no_grad():  # each linear's 4-bit weight: the dequantized matrix closest to its float weight
        for linear in linears:
            target = linear.weight.T.numpy()
            best = min((w for w in quantized if w.shape == target.shape), key=lambda w: np.abs(w - target).sum())
            assert np.abs(best - target).max() <= np.abs(target).max() / 7  # within a 4-bit step of the original
            linear.weight.copy_(torch.from_numpy(best.T.copy()))
    inputs = prompt_inputs(processor, astronaut)
    config = PrunerConfig(keep=INT4.keep, layer=INT4.layer)
    apply_pruner(model, config)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    onnx_model = OnnxModel(folder)
    parts = split_prompt(inputs["input_ids"][0].numpy(), onnx_model.image_token_id)
    got_tokens, got_logits, _ = onnx_greedy(onnx_model, parts.before, inputs["pixel_values"].numpy(), parts.after,
                                            TOKENS)
    assert got_tokens == tokens
    assert max(np.abs(a - b[0].float().numpy()).max() for a, b in zip(got_logits, out.logits)) <= 1e-3


# ---------------------------------------------------------------- OpenVINO (issue #16)


@pytest.mark.parametrize("case", [Case("tiny-llava", 0, 0.12), Case("tiny-llava-gqa", 2, 0.12), INT8], ids=str)
def test_openvino_runs_the_graphs_like_onnxruntime(exports, eager, case):
    """Every graph file reads and compiles in plain OpenVINO (``Core().read_model(path)``, as a new user tries it),
    and the OpenVINO engine on its CPU device generates the same greedy tokens and keeps the same image tokens as
    onnxruntime, at both placements."""
    import openvino

    from runtime.openvino_backend import OpenVinoEngine

    model, (before, pixels, after), _ = run_case(exports, eager, case)
    core = openvino.Core()
    for file in model.config["graphs"].values():
        core.compile_model(core.read_model(str(model.folder / file)), "CPU")
    engine = OpenVinoEngine("cpu")
    ov_model = OnnxModel(model.folder, open_graph=engine)
    assert engine.note.startswith("running on OpenVINO's CPU")
    tokens, logits, kept = onnx_greedy(model, before, pixels, after, TOKENS)
    ov_tokens, ov_logits, ov_kept = onnx_greedy(ov_model, before, pixels, after, TOKENS)
    if case.quantize == "int8":  # OpenVINO quantizes the activations its own way: near-ties may go either way
        assert len(set(ov_kept.tolist()) & set(kept.tolist())) >= 0.9 * len(kept)
        assert np.abs(ov_logits[0] - logits[0]).max() <= 5e-2 and ov_tokens[0] == tokens[0]
        return
    assert ov_tokens == tokens
    assert np.array_equal(ov_kept, kept)
    assert max(np.abs(a - b).max() for a, b in zip(logits, ov_logits)) <= 1e-4


def test_load_with_the_openvino_engine(exports, astronaut):
    """runtime.load(folder, engine="openvino"): the Session, its profile and tokens as with onnxruntime."""
    from runtime import load as load_session

    folder, _, _ = exports.get(Case("tiny-llava", 2, 0.12))
    reference = load_session(folder).generate(astronaut, QUESTION, max_new_tokens=4)
    result = load_session(folder, engine="openvino").generate(astronaut, QUESTION, max_new_tokens=4)
    assert result.tokens == reference.tokens
    assert (result.profile.backend, result.profile.device) == ("openvino", "cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        load_session(folder, engine="tensorrt")
    with pytest.raises(ValueError, match="export it with pruner-export --target onnx"):
        load_session("tiny-llava", engine="openvino")
    with pytest.raises(ValueError, match="add engine openvino"):
        load_session(folder, device="gpu")
    with pytest.raises(ValueError, match="OpenVINO has none here"):
        load_session(folder, engine="openvino", profile_ops=True)


def test_openvino_devices_are_checked():
    from runtime.openvino_backend import NoDeviceError, resolve_openvino_device

    assert resolve_openvino_device("auto", ["CPU"])[0] == "CPU"
    assert resolve_openvino_device("auto", ["CPU", "GPU.0", "NPU"])[0] == "NPU"
    assert resolve_openvino_device("gpu", ["CPU", "GPU.0"])[0] == "GPU"
    with pytest.raises(NoDeviceError, match="no NPU on this machine .it has: CPU.*driver"):
        resolve_openvino_device("npu", ["CPU"])
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_openvino_device("tpu", ["CPU"])


# ---------------------------------------------------------------- files and export_config.json


@pytest.mark.parametrize("case", ALL, ids=str)
def test_no_weight_is_stored_twice(exports, case):
    """Every weight is stored once in the folder, at both placements and every dtype / quantization (issue #15: the
    layer-K folder used to carry the decoder twice). The one allowed copy: the layer-0 vision encoder's own decoder
    layer-0 key projection (the keys its selection reads), which keeps that graph runnable alone by stock runtimes."""
    folder, payload, _ = exports.get(case)
    tensors = stored_tensors(folder)
    assert {t.file for t in tensors} >= set(payload["graphs"].values())
    copies = duplicated(tensors)
    layout = payload["decoder"]
    key_projection = layout["hidden_size"] * layout["num_key_value_heads"] * layout["head_dim"] * 4
    encoder = payload["graphs"]["vision_encoder"]
    allowed = {digest for digest, group in copies.items()
               if case.layer == 0 and len(group) == 2 and {t.file for t in group} == {
                   encoder, payload["graphs"]["decoder_model_merged"]} and group[0].nbytes <= key_projection}
    assert len(allowed) <= (1 if case.layer == 0 else 0)
    assert {digest: [(t.file, t.name) for t in group] for digest, group in copies.items() if digest not in allowed} == {}


def test_duplicate_check_sees_copies():
    """duplicated() finds equal contents and skips the small ones (so the test above can fail)."""
    a = StoredTensor("a.onnx", "w", 4096, "x" * 64, "inline")
    b = StoredTensor("b.onnx", "v", 4096, "x" * 64, "b.onnx_data@0")
    small = [StoredTensor("a.onnx", "s", 8, "y" * 64, "inline"), StoredTensor("b.onnx", "s", 8, "y" * 64, "inline")]
    assert duplicated([a, b, *small]) == {"x" * 64: [a, b]}
    assert duplicated([a, *small]) == {}


@pytest.mark.parametrize("case", ALL, ids=str)
def test_every_graph_passes_the_full_checker(exports, case):
    folder, payload, _ = exports.get(case)
    graphs = sorted((folder / "onnx").glob("*.onnx"))
    assert [str(p.relative_to(folder)) for p in graphs] == sorted(payload["graphs"].values())
    for path in graphs:
        onnx.checker.check_model(str(path), full_check=True)


def _dims(value) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _dtype(value) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


@pytest.mark.parametrize("case", ALL, ids=str)
def test_config_describes_the_graphs_exactly(exports, case):
    folder, payload, _ = exports.get(case)
    assert payload == json.loads((folder / "export_config.json").read_text())
    assert sorted(payload["methods"]) == sorted(payload["graphs"])
    for name, file in payload["graphs"].items():
        graph = onnx.load(str(folder / file), load_external_data=False).graph
        for kind, values in (("inputs", graph.input), ("outputs", graph.output)):
            actual = [{"name": v.name, "shape": _dims(v), "dtype": _dtype(v)} for v in values]
            assert actual == payload["methods"][name][kind], (name, kind)
    assert all((folder / file).is_file() for file in payload["files"])


@pytest.mark.parametrize("case", [Case("tiny-llava-gqa", 0, 0.12), Case("tiny-llava", 2, 0.12)], ids=str)
def test_graph_calls_follow_the_recorded_shapes(exports, eager, case):
    """Every graph call of a real generation returns the shapes export_config.json promises for its inputs."""
    model, (before, pixels, after), _ = run_case(exports, eager, case)
    calls = []
    run = model._run

    def recording_run(graph, feed):
        outputs = run(graph, feed)
        calls.append((graph, feed, outputs))
        return outputs

    model._run = recording_run  # this instance only
    model.generate_greedy(before, pixels, after, 3, stop_at_eos=False)
    assert {graph for graph, _, _ in calls} == set(model.config["graphs"])
    for graph, feed, outputs in calls:
        spec = model.config["methods"][graph]
        dims = {}
        for tensor in spec["inputs"]:
            if tensor["name"] in feed:
                for want, size in zip(tensor["shape"], feed[tensor["name"]].shape, strict=True):
                    if isinstance(want, str) and want.isidentifier():
                        dims[want] = size
        for tensor in spec["inputs"]:
            if tensor["name"] in feed:
                assert _resolve(tensor["shape"], dims) == list(feed[tensor["name"]].shape), (graph, tensor["name"])
        when = "prompt" if int(feed.get("image_start", [-1])[0]) >= 0 else "decoding step"
        for name, cases in model.config.get("data_dependent_dims", {}).items() if "image_start" in feed else ():
            dims[name] = eval(cases[when], {}, dict(dims))  # noqa: S307 - test-only
        for tensor in spec["outputs"]:
            assert _resolve(tensor["shape"], dims) == list(outputs[tensor["name"]].shape), (graph, tensor["name"])
            assert outputs[tensor["name"]].dtype.name == tensor["dtype"]


def _resolve(shape, dims):
    return [eval(d, {}, dict(dims)) if isinstance(d, str) else d for d in shape]  # noqa: S307 - test-only


@pytest.mark.parametrize("case", [Case("tiny-llava", 0, 0.12), Case("tiny-llava-gqa", 2, 0.12)], ids=str)
def test_config_records_placement_prompt_and_preprocessing(zoo, exports, case):
    folder, payload, stages = exports.get(case)
    model, processor = load(zoo, case)
    rows, cols = image_grid(model.config)
    n_image, budget = rows * cols, case.options().pruner.budget(rows * cols)
    assert stages == STAGES
    assert payload["pruner"] == case.options().pruner.to_dict()
    assert payload["num_image_tokens"] == n_image and payload["kept_image_tokens"] == budget
    assert payload["grid"] == [rows, cols]
    assert payload["placement"] == ("before_llm" if case.layer == 0 else "in_llm")
    assert payload["positions"] == ("consecutive" if case.layer == 0 else "original")
    assert payload["image_placeholders"] == (budget if case.layer == 0 else n_image)
    assert (payload["dtype"], payload["quantization"], payload["backend"]) == ("fp32", "none", "onnxruntime")
    assert payload["library_versions"]["onnxruntime"] not in ("", "not installed")
    expected_graphs = {"vision_encoder", "embed_tokens", "decoder_model_merged"}  # layer K prunes in the decoder
    assert payload["graphs"] == {name: f"onnx/{name}.onnx" for name in expected_graphs}
    tokenizer = payload["tokenizer"]
    assert tokenizer["bos_id"] == processor.tokenizer.bos_token_id
    assert processor.tokenizer.eos_token_id in tokenizer["eos_ids"]
    assert tokenizer["image_token_id"] == model.config.image_token_id
    assert tokenizer["chat_template"] == processor.chat_template
    assert "tokenizer.json" in tokenizer["files"] and (folder / "tokenizer.json").is_file()
    ids = processor.tokenizer(llava_prompt(QUESTION))["input_ids"]
    assert payload["prompt_image_start"] == ids.index(model.config.image_token_id)
    assert payload["image_preprocessing"] == ImagePreprocessing.from_hf_processor(processor.image_processor).to_dict()
    layout = payload["decoder"]
    assert layout["num_layers"] == model.config.text_config.num_hidden_layers
    assert layout["full_cache_layers"] == case.layer
    assert layout["uses_attention_mask"] == (case.layer == 0)


def test_layer0_encoder_image_start_is_optional(exports, eager):
    """A transformers.js-style runtime feeds pixel_values only; image_start then defaults to the prompt format's."""
    case = Case("tiny-llava", 0, 0.12)
    model, (before, pixels, _), _ = run_case(exports, eager, case)
    session = model.sessions["vision_encoder"]
    assert [meta.name for meta in session.get_inputs()] == ["pixel_values"]
    default = session.run(None, {"pixel_values": pixels})
    explicit = session.run(None, {"pixel_values": pixels, "image_start": np.array([len(before)])})
    assert model.config["prompt_image_start"] == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(default, explicit))


# ---------------------------------------------------------------- errors and helpers (no full export)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(dtype="bf16"), r"--dtype bf16: onnxruntime .* cannot run bf16.*--dtype fp16 or fp32"),
        (dict(dtype="fp16", quantize="int8"), r"use --dtype fp32 with --quantize int8"),
        (dict(pruner=PrunerConfig(method="fastv", layer=0)), r"'fastv' needs \['text_attention'\].*--prune-layer >= 1"),
        (dict(pruner=PrunerConfig(method="visionzip", layer=2)), r"'visionzip' needs \['cls_attention'\]"),
    ],
)
def test_unsupported_exports_are_refused_before_loading(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(tmp_path / "no-model", tmp_path, ExportOptions(model="x", target="onnx", **options), model_id="x")


def test_external_data_uses_the_transformers_js_name(zoo, tmp_path):
    """Graphs over the size threshold keep their weights in '<graph>.onnx_data' (checked here with threshold 0)."""
    model, processor = load_llava(zoo["tiny-llava"])
    model.requires_grad_(False)
    shapes = read_shapes(model, processor, PrunerConfig(keep=0.12, layer=0), torch.float32)
    plan = embed_plan(model, shapes, torch.Generator().manual_seed(0))
    files = save_graph(plan, lower(plan, trace(plan)), tmp_path / "embed_tokens.onnx", external_bytes=0)
    quantized = quantize_graph(plan, files[0], tmp_path / "embed_tokens_quantized.onnx", external_bytes=0)
    assert [p.name for p in files] == ["embed_tokens.onnx", "embed_tokens.onnx_data"]
    assert [p.name for p in quantized] == ["embed_tokens_quantized.onnx", "embed_tokens_quantized.onnx_data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files + quantized)
    import onnxruntime

    ids = np.array([[1, 5, 9]])
    expected = model.get_input_embeddings()(torch.from_numpy(ids)).detach().numpy()
    for path in (files[0], quantized[0]):
        onnx.checker.check_model(str(path), full_check=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.allclose(session.run(None, {"input_ids": ids})[0], expected, atol=0.05)


def test_split_prompt_and_prompt_length_errors(exports):
    assert split_prompt([1, 2, 7, 7, 7, 3], 7) == PromptIds(before=[1, 2], after=[3])
    assert split_prompt(np.array([[1, 7, 4]]), 7) == PromptIds(before=[1], after=[4])
    assert split_prompt(torch.tensor([[1, 7, 7, 4, 5]]), 7) == PromptIds(before=[1], after=[4, 5])
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        split_prompt(np.ones((2, 3), np.int64), 7)
    with pytest.raises(ValueError, match="exactly one image"):
        split_prompt([1, 7, 2, 7], 7)
    with pytest.raises(ValueError, match="found 0 placeholder"):
        split_prompt([1, 2], 7)
    folder, _, _ = exports.get(Case("tiny-llava", 0, 0.12))
    model = OnnxModel(folder)
    pixels = np.zeros(model.config["methods"]["vision_encoder"]["inputs"][0]["shape"], np.float32)
    with pytest.raises(ValueError, match=re.escape("re-export with a larger --max-seq-len")):
        model.generate_greedy([1], pixels, [2], model.max_seq_len)


def test_dim_expressions():
    dims = {"past_sequence_length": 5, "sequence_length": 3}
    assert evaluate_dim("past_sequence_length + sequence_length", dims) == 8
    assert evaluate_dim("sequence_length - 507", {"sequence_length": 600}) == 93
    assert same_expression("s13 + s29", "s29 + s13") and not same_expression("s13 - s29", "s29 - s13")
    assert not same_expression("Max(s1, 2)", "s1")
