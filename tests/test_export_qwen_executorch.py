"""Qwen2-VL / Qwen2.5-VL ExecuTorch exports: one `model.pte` with the LLM-runner method names whose text_decoder also
takes M-RoPE position_ids [3, 1, T], run by the project's runtime (runtime.load, ExecuTorchModel), equal to the eager
pruned model: the same greedy tokens (apply_pruner + the stock generate) and the same kept image tokens (the
adapter's pruned prefill).

One export per configuration, shared by the module (the tower's Conv3d patch embedding is exported as the equal
matmul on every backend): tiny-qwen2.5-vl (window attention, GQA: 2 KV heads of 4) at layer 0 on the portable
backend and at layer 2 on XNNPACK, and tiny-qwen2-vl at layer 2 through the `pruner-export` CLI (XNNPACK), in a
second process started first so that it overlaps the others; its measured peak checks the memory estimate the CLI
prints. (XNNPACK lowering dominates: one partition per stretch of delegable ops, tens of seconds per method here.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cases import BackgroundExport, copy_export_without
import torch
from PIL import Image
from skimage import data

from export.common import ExportOptions, checkpoint_dtype
from export.executorch_export import export_executorch
from export.memory import estimate_export_memory
from pruner_core import PrunerConfig
from pruner_core.adapters import apply_pruner, load_qwen2_vl, qwen_prompt, resolve_model
from pruner_core.adapters.qwen2_vl import embed_prompt, merged_grid, prefill_with_pruning, rope_positions
from runtime import load
from runtime.executorch_backend import ExecuTorchModel

pytestmark = pytest.mark.slow

KEEP = 0.12
NEW_TOKENS = 8
MAX_SEQ_LEN = 256
QUESTION = "What is in the picture?"
IN_PROCESS = {("tiny-qwen2.5-vl", 0): "portable", ("tiny-qwen2.5-vl", 2): "xnnpack"}  # (name, layer) -> backend
CLI_EXPORT = ("tiny-qwen2-vl", 2)  # XNNPACK, through pruner-export
SLICED = {("tiny-qwen2.5-vl", 2): 1}  # lowered one block per XNNPACK pass (export/lowering.py): the tower's blocks too
CASES = [*IN_PROCESS, CLI_EXPORT]
SCALAR_TYPES = {"float32": 6, "int64": 4}  # ExecuTorch ScalarType codes


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("qwen-et-zoo")
    return {name: resolve_model(name, cache) for name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl")}


@pytest.fixture(scope="module")
def cli_export(zoo, tmp_path_factory):
    """tiny-qwen2-vl, layer 2, XNNPACK, through `python -m export.cli` in the background -> wait() -> (folder, peak
    RSS bytes, log text). Killed at teardown if still running."""
    name, layer = CLI_EXPORT
    out = tmp_path_factory.mktemp("qwen-cli") / "export"
    export = BackgroundExport.start([
        "--model", name, "--cache-dir", zoo[name].parent, "--keep", KEEP, "--prune-layer", layer,
        "--target", "executorch", "--backend", "xnnpack", "--max-seq-len", MAX_SEQ_LEN,
        "--no-validate",  # the measured peak is the export's alone (the estimate's subject)
        "--jobs", "1"], out)  # one process: its peak RSS is the export's (two: README "Export memory")

    def wait():
        folder = export()
        return folder, export.peak_rss, export.log_path.read_text()

    yield wait
    export.stop()


@pytest.fixture(scope="module")
def exports(zoo, tmp_path_factory, cli_export):
    """(name, layer) -> (model directory, export folder, export_config payload); each exported once."""
    out = {}
    for (name, layer), backend in IN_PROCESS.items():
        folder = tmp_path_factory.mktemp(f"{name}-L{layer}-pte")
        options = ExportOptions(model=name, target="executorch", pruner=PrunerConfig(keep=KEEP, layer=layer),
                                backend=backend, max_seq_len=MAX_SEQ_LEN,
                                lowering_slice_bytes=SLICED.get((name, layer), 1 << 29))
        out[name, layer] = zoo[name], folder, export_executorch(zoo[name], folder, options, model_id=name)
    folder, _, _ = cli_export()
    out[CLI_EXPORT] = zoo[CLI_EXPORT[0]], folder, json.loads((folder / "export_config.json").read_text())
    return out


# In a fresh interpreter (what pruner-export is), so that no other test's state keeps anything alive: export, then
# print the bytes of the weights the export loaded that are still alive, and their total.
WEIGHTS_ALIVE_SCRIPT = """
import sys, weakref
from pathlib import Path
from export import executorch_backends, executorch_export
from export.common import ExportOptions
from pruner_core import PrunerConfig
traced, trace = [], executorch_backends.trace
def recording_trace(plans):  # the weights as traced here: the decoder's quantized ones (8da4w) included
    seen = {}
    for plan in plans:
        seen |= {id(p): p for p in [*plan.module.parameters(), *plan.module.buffers()]}
    traced.extend((weakref.ref(p), p.numel() * p.element_size()) for p in seen.values())
    return trace(plans)
executorch_backends.trace = recording_trace
options = ExportOptions(model="m", target="executorch", pruner=PrunerConfig(keep=0.12, layer=2), backend="xnnpack",
                        max_seq_len=256, quantize="8da4w", lowering_slice_bytes=1)
executorch_export.export_executorch(Path(sys.argv[1]), Path(sys.argv[2]), options, model_id="m")
print(sum(size for ref, size in traced if ref() is not None), sum(size for _, size in traced))
"""


def test_an_export_lets_go_of_its_weights(zoo, tmp_path):
    """Once export_executorch returns, the weights it traced are freed, with no collection by the caller (the
    validation that follows allocates its own at once): ExecuTorch's and torch's process-wide caches
    (export/memory.py release_tracing_caches) had kept every lowered program alive, which at Qwen2.5-VL-3B widths
    held all 3.6 GiB of weights under the validation; the ShapeEnvs that outlive an 8da4w export kept its quantized
    weights in their fake-tensor caches, and lowering in several passes (``lowering_slice_bytes``) leaves the programs
    in reference cycles (at LLaVA-7B widths, 4 layers, 8da4w: 3.5 GiB resident after writing, 1.0 GiB with the
    ShapeEnv caches cleared and a collection). Measured here: 0 bytes alive; 24 % without either step, 0.15 % with the
    collection alone: at tiny widths this test guards the collection; tests/test_export_memory.py guards the ShapeEnv
    clearing."""
    out = tmp_path / "export"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", WEIGHTS_ALIVE_SCRIPT, str(zoo["tiny-qwen2.5-vl"]), str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    alive, total = map(int, done.stdout.split()[-2:])
    assert total > 0 and alive < 0.05 * total, f"{alive} of {total} bytes of traced weights still alive"


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(data.astronaut())


def eager_reference(model_dir: Path, layer: int, image) -> tuple[list[int], list[int], dict]:
    """-> (greedy tokens of apply_pruner + generate, kept image indices of the adapter's pruned prefill, inputs)."""
    model, processor = load_qwen2_vl(model_dir)
    config = PrunerConfig(keep=KEEP, layer=layer)
    inputs = processor(images=image, text=qwen_prompt(QUESTION))
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"],
                                               inputs["image_grid_thw"])
        positions, _ = rope_positions(model, inputs["input_ids"], inputs["mm_token_type_ids"],
                                      inputs["image_grid_thw"])
        prefill = prefill_with_pruning(model, embeds, int(starts[0]), n_image, merged_grid(inputs["image_grid_thw"]),
                                       config, position_ids=positions)
        apply_pruner(model, config)
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return generated[0, -NEW_TOKENS:].tolist(), prefill.selection.indices[0].tolist(), inputs


def assert_prefix(tokens: list[int], expected: list[int], eos: set[int]) -> None:
    """tokens are expected's first ones, stopped at an EOS or after NEW_TOKENS."""
    assert tokens and tokens == expected[: len(tokens)]
    assert len(tokens) == NEW_TOKENS or tokens[-1] in eos


@pytest.mark.parametrize("name, layer", CASES)
def test_pte_equals_eager_pruned_model(exports, astronaut, name, layer):
    model_dir, folder, payload = exports[name, layer]
    tokens, kept, inputs = eager_reference(model_dir, layer, astronaut)
    eos = set(payload["tokenizer"]["eos_ids"])
    model = ExecuTorchModel(folder)
    ours = model.generate_greedy(inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS)
    assert_prefix(ours, tokens, eos)
    assert model.kept_image_indices.tolist() == kept  # the same R image tokens, in image order
    assert len(kept) == payload["kept_image_tokens"] == PrunerConfig(keep=KEEP).budget(payload["num_image_tokens"])
    # the Session (pruner-run's path): its own preprocessing and chat template give the same tokens
    result = load(folder).generate(astronaut, QUESTION, max_new_tokens=NEW_TOKENS)
    assert [t for t in result.tokens] == [t for t in ours if t not in eos]
    assert result.profile.image_tokens_kept == len(kept)


@pytest.mark.parametrize("name, layer", CASES)
def test_export_config_records_the_mrope_contract(exports, name, layer):
    from executorch.runtime import Runtime

    model_dir, folder, payload = exports[name, layer]
    height, width = json.loads((model_dir / "tiny_qwen2_vl_spec.json").read_text())["image_size"]
    methods = payload["methods"]
    assert payload["target"] == "executorch" and payload["positions"] == "original"
    assert payload["executorch"]["position_scheme"] == "mrope"
    assert payload["placement"] == ("before_llm" if layer == 0 else "in_llm")
    assert payload["grid"] == [height // 28, width // 28]
    assert payload["image_preprocessing"]["input_layout"] == "flat_patches"
    assert payload["executorch"]["image_input_layout"] == "flat_patches"
    assert methods["vision_encoder"]["inputs"][0]["shape"] == [height * width // 196, 1176]
    assert [s["name"] for s in methods["vision_encoder"]["outputs"]] == ["image_embeddings", "kept_image_indices"]
    assert [s["name"] for s in methods["text_decoder"]["inputs"]] == ["embeddings", "input_pos", "position_ids"]
    assert methods["text_decoder"]["inputs"][2]["shape"] == [3, 1, "T"]
    assert "get_bos_id" not in payload["executorch"]["constant_methods"]  # Qwen's tokenizer has no BOS
    program = Runtime.get().load_program(folder / "model.pte")
    assert set(methods) == {"vision_encoder", "token_embedding", "text_decoder"} <= program.method_names
    high = payload["executorch"]["dynamic_dims"]["T"][1]
    for method, contract in methods.items():  # the program's methods take and return what the config says
        meta = program.metadata(method)
        assert meta.num_inputs() == len(contract["inputs"]) and meta.num_outputs() == len(contract["outputs"])
        tensors = [(meta.input_tensor_meta(i), spec) for i, spec in enumerate(contract["inputs"])]
        tensors += [(meta.output_tensor_meta(i), spec) for i, spec in enumerate(contract["outputs"])]
        for tensor, spec in tensors:
            assert list(tensor.sizes()) == [high if isinstance(d, str) else d for d in spec["shape"]], spec
            assert tensor.dtype() == SCALAR_TYPES[spec["dtype"]], spec


def test_the_runtime_resizes_other_images_and_refuses_several(exports, astronaut):
    """An image at another size is resized to the export's (as the eager processor does: same tokens); several
    images, video frames, or pixels of the wrong shape are refused with the fix."""
    model_dir, folder, payload = exports["tiny-qwen2.5-vl", 0]
    small = Image.fromarray(data.astronaut()[40:250:2, 100:400:3])  # 105 x 100 px, another aspect ratio
    tokens, _, _ = eager_reference(model_dir, 0, small)
    session = load(folder)
    result = session.generate(small, QUESTION, max_new_tokens=NEW_TOKENS)
    assert result.tokens == [t for t in tokens[: len(result.tokens)]] and result.tokens
    with pytest.raises(ValueError, match="cannot use a list as an image"):
        session.generate([astronaut, small], QUESTION, max_new_tokens=2)
    frames = np.stack([np.asarray(astronaut)] * 2)  # [2, H, W, 3]: a video
    with pytest.raises(ValueError, match="HxWx3"):
        session.generate(frames, QUESTION, max_new_tokens=2)
    with pytest.raises(ValueError, match="image placeholder"):
        session.generate(astronaut, "<|image_pad|> and this one?", max_new_tokens=2)
    model = ExecuTorchModel(folder)
    with pytest.raises(ValueError, match="pixel_values of shape"):
        model.encode_image(torch.zeros(1, 3, 224, 336))
    with pytest.raises(ValueError, match="position_ids"):
        model._step("text_decoder", model.embed([1, 2]), 0)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_patch_matmul_equals_the_conv3d_tower(zoo, name):
    """The typed option the ExecuTorch export uses (XNNPACK has no Conv3d, the portable kernel no 5-D input): the
    same image tokens as the stock tower, sharing its weights, leaving the model's own tower as it was."""
    from pruner_core.adapters import adapter_for

    adapter = adapter_for(zoo[name])
    model, _ = adapter.load(zoo[name])
    geometry = adapter.geometry(model)
    size = geometry.image_size
    pixels = torch.randn(*adapter.pixel_input_shape(geometry), generator=torch.Generator().manual_seed(0))
    stock_embed = model.model.visual.patch_embed
    matmul = adapter.vision_encoder(model, size, patch_matmul=True)
    with torch.no_grad():
        torch.testing.assert_close(matmul(pixels), adapter.vision_encoder(model, size)(pixels), rtol=1e-5, atol=1e-5)
    assert model.model.visual.patch_embed is stock_embed and isinstance(stock_embed.proj, torch.nn.Conv3d)
    assert matmul.visual.patch_embed.weight.data_ptr() == stock_embed.proj.weight.data_ptr()  # a view: no copy


def test_export_without_position_scheme_is_refused(exports, tmp_path):
    """A Qwen .pte folder whose export_config.json lacks executorch.position_scheme cannot be run with 1-D positions:
    a clear error naming the field, not ExecuTorch's input-count failure."""
    folder = copy_export_without(exports["tiny-qwen2.5-vl", 0][1], tmp_path / "edited", "executorch", "position_scheme")
    with pytest.raises(ValueError, match="lacks executorch.position_scheme.*mrope.*export the model again"):
        ExecuTorchModel(folder)


def test_android_refuses_mrope_exports_first(exports, zoo, tmp_path):
    from export.android import check_runnable_on_android
    from export.cli import ExportError, build_parser, run

    _, _, payload = exports["tiny-qwen2.5-vl", 0]
    with pytest.raises(ValueError, match="mrope.*LlmModule"):
        check_runnable_on_android(payload)
    args = build_parser().parse_args(["--model", "tiny-qwen2.5-vl", "--cache-dir", str(zoo["tiny-qwen2.5-vl"].parent),
                                      "--prune-layer", "0", "--android", "--out", str(tmp_path / "out")])
    with pytest.raises(ExportError, match="--android.*MultimodalRunner"):
        run(args)
    assert not (tmp_path / "out").exists()


def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(cli_export, zoo):
    """What pruner-export prints for a Qwen .pte against the export child's measured peak RSS."""
    folder, peak, log = cli_export()
    name, layer = CLI_EXPORT
    options = ExportOptions(model=name, target="executorch", pruner=PrunerConfig(keep=KEEP, layer=layer),
                            backend="xnnpack", dtype=checkpoint_dtype(zoo[name]), max_seq_len=MAX_SEQ_LEN)
    from pruner_core.adapters import adapter_for

    counts = adapter_for(zoo[name]).parameter_counts(zoo[name])
    estimate = estimate_export_memory(counts, options, checkpoint_dtype(zoo[name]))
    assert estimate.describe() in log and folder.is_dir()
    assert abs(estimate.peak - peak) <= 0.25 * peak, (estimate.describe(), peak / 2**30)


def test_model_card_of_an_mrope_pte_points_to_the_projects_runtime(exports):
    """A Qwen .pte (M-RoPE positions, flat patches) cannot run in ExecuTorch's stock MultimodalRunner or the Android
    app: its card says so at every placement and gives neither the runner snippet nor adb commands."""
    from export.model_card import folder_files, render_card

    for name, layer in IN_PROCESS:
        _, folder, config = exports[name, layer]
        card = render_card(dict(config, validation=None), folder, folder_files(folder), "random weights, tiny")
        assert "cannot feed" in card and "pruner-run" in card
        assert "MultimodalRunner(" not in card and "adb push" not in card and "## Android app" not in card


def test_the_vision_towers_blocks_are_lowering_slices(zoo):
    """export/lowering.py slices a method by its blocks: Qwen's vision tower names them ``blocks``, the decoder
    ``layers``; each is a pass of its own with a one-byte budget (the XNNPACK export above uses that)."""
    from export.executorch_backends import trace
    from export.executorch_export import _load, plan_methods, read_geometry
    from export.lowering import layer_passes

    name, layer = "tiny-qwen2.5-vl", 2
    options = ExportOptions(model=name, target="executorch", pruner=PrunerConfig(keep=KEEP, layer=layer),
                            max_seq_len=MAX_SEQ_LEN)
    model, processor = _load(zoo[name], options)
    plans = plan_methods(model, read_geometry(model, processor, options), options.pruner, torch.float32,
                         patch_matmul=True)
    program = trace([plan for plan in plans if plan.name == "vision_encoder"])["vision_encoder"]
    keys = {key for one in layer_passes(program, budget_bytes=1) for key in one.layers}
    blocks = {index for path, index in keys if path.endswith("visual.blocks")}
    decoder = {index for path, index in keys if path.endswith("language_model.layers")}
    assert blocks == set(range(model.config.vision_config.depth)) and decoder == set(range(layer))
