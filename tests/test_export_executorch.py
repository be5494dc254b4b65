"""The ExecuTorch target: `.pte` files that generate what eager pruned PyTorch generates, in our runtime and (layer 0)
in ExecuTorch's stock MultimodalRunner; export_config.json consistent with the program; each weight stored once in
the .pte (#15); clear backend errors.

Tiny random LLaVA-1.5 models are built once per session (no downloads); the image is scikit-image's astronaut.
Exports are shared by every test of this module (lowering dominates its runtime, mostly per XNNPACK partition):
XNNPACK, the default backend, for tiny-llava at layer 0 and tiny-llava-gqa at layer 2 (keep 0.12) and for the
quantised export; the portable backend (no delegate, the same graphs) for the rest of the matrix and fp16. The
quantised export, the slowest (one XNNPACK partition per quantised linear), goes through the `pruner-export` CLI in a
second process started with the first export, so it overlaps the others on a multi-core machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
from cases import BackgroundExport
import torch
from PIL import Image
from skimage import data

from export.common import ExportOptions, checkpoint_dtype
from export.executorch_export import BackendUnavailableError, export_executorch, quant_group_size
from export.memory import estimate_export_memory
from export.parallel_lowering import lower_in_two_processes, usable_cpus
from export.pte_weights import StoredConstant, duplicated, stored_constants
from pruner_core import PrunerConfig
from pruner_core.adapters import apply_pruner, llava_prompt, load_llava, parameter_counts, resolve_model
from runtime.executorch_backend import ExecuTorchModel
from runtime.prompt import split_prompt

pytestmark = pytest.mark.slow

MODELS = ("tiny-llava", "tiny-llava-gqa")
QUESTION = "What is shown in this image?"
NEW_TOKENS = 16
MAX_SEQ_LEN = 640
LOGIT_TOLERANCE = 1e-4
SCALAR_TYPES = {"float32": 6, "float16": 5, "bfloat16": 15, "int64": 4}  # ExecuTorch ScalarType codes
XNNPACK_EXPORTS = {("tiny-llava", 0, 0.12), ("tiny-llava-gqa", 2, 0.12)}
QUANTISED = ("tiny-llava-gqa", 0, 0.12)  # model, layer, keep of the 8da4w export


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def et_zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("et_zoo")
    return {name: resolve_model(name, cache_dir) for name in MODELS}


@pytest.fixture(scope="session")
def astronaut():
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def prompts(et_zoo, astronaut):
    """The processor's inputs (input_ids with N placeholders, pixel_values) per model."""
    out = {}
    for name, path in et_zoo.items():
        _, processor = load_llava(path)
        out[name] = processor(images=astronaut, text=llava_prompt(QUESTION), return_tensors="pt")
    return out


@pytest.fixture(scope="session")
def quantised_cli_export(et_zoo, tmp_path_factory):
    """The 8da4w XNNPACK export through `python -m export.cli`, running in the background -> a BackgroundExport.
    Killed at teardown if still running."""
    name, layer, keep = QUANTISED
    out = tmp_path_factory.mktemp("cli") / "quantised"
    export = BackgroundExport.start([
        "--model", name, "--cache-dir", et_zoo[name].parent,
        "--keep", keep, "--prune-layer", layer, "--target", "executorch", "--backend", "xnnpack",
        "--quantize", "8da4w", "--quantize-vision", "int8", "--max-seq-len", MAX_SEQ_LEN,
        "--no-validate",  # the measured peak is the export's (test_memory_estimate...); validated in a test below
        "--jobs", "1",  # one process: its peak RSS is the export's (two processes: README "Export memory")
    ], out)
    yield export
    export.stop()


@pytest.fixture(scope="session")
def exports(et_zoo, tmp_path_factory, quantised_cli_export):
    """export(name, layer, keep, **options) -> (folder, payload), each distinct export done once per session.

    Asking for it starts the quantised CLI export in the background (see ``quantised_cli_export``).
    """
    done: dict[tuple, tuple[Path, dict]] = {}

    def export(name, layer, keep, backend=None, quantize="none", dtype="fp32"):
        backend = backend or ("xnnpack" if (name, layer, keep) in XNNPACK_EXPORTS else "portable")
        key = (name, layer, keep, backend, quantize, dtype)
        if key not in done:
            options = ExportOptions(
                model=name, target="executorch", pruner=PrunerConfig(keep=keep, layer=layer), backend=backend,
                quantize=quantize, dtype=dtype, max_seq_len=MAX_SEQ_LEN,
                # the layer-2 XNNPACK export lowers one layer per pass (export/lowering.py), sharing weights across
                # methods: what a 7B export does at scale
                lowering_slice_bytes=1 if (name, layer, backend) == ("tiny-llava-gqa", 2, "xnnpack") else 1 << 29,
            )
            folder = tmp_path_factory.mktemp(f"{name}-L{layer}-k{keep}-{backend}-{quantize}-{dtype}")
            stages = []
            with mock.patch("export.executorch_backends.lower_in_two_processes",
                            wraps=lower_in_two_processes) as spy:
                payload = export_executorch(et_zoo[name], folder, options, model_id=name, progress=stages.append)
            assert stages == ["trace", "lower", "serialise"]
            export.lowered_apart[key] = [call.args[1] for call in spy.call_args_list]
            done[key] = folder, payload
        return done[key]

    export.lowered_apart = {}  # key -> the methods each export lowered in a second process (export/parallel_lowering)
    return export


@pytest.fixture(scope="session")
def eager(et_zoo, prompts):
    """Greedy tokens and per-step logits of eager pruned PyTorch (the adapter's apply_pruner + generate)."""
    runs = {}

    def run(name, layer, keep):
        key = (name, layer, keep)
        if key not in runs:
            model, _ = load_llava(et_zoo[name])
            apply_pruner(model, PrunerConfig(keep=keep, layer=layer))
            inputs = prompts[name]
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                    return_dict_in_generate=True,
                )
            tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
            runs[key] = tokens, [logits[0].float() for logits in out.logits]
        return runs[key]

    return run


def run_greedy(folder, inputs):
    model = ExecuTorchModel(folder)
    steps = list(model.greedy_steps(inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS))
    return [token for token, _ in steps], [logits[0] for _, logits in steps]


# ---------------------------------------------------------------- exported == eager


@pytest.mark.parametrize("keep", [0.12, 1.0])
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_match_eager(exports, eager, prompts, name, layer, keep):
    folder, payload = exports(name, layer, keep)
    tokens, logits = run_greedy(folder, prompts[name])
    eager_tokens, eager_logits = eager(name, layer, keep)
    assert tokens == eager_tokens
    # every step's logits, not only the argmax: a wrong kept set or a stale cache would show here
    for step, (ours, reference) in enumerate(zip(logits, eager_logits, strict=True)):
        error = (ours - reference).abs().max().item()
        assert error <= LOGIT_TOLERANCE, f"step {step}: logits differ by {error:.2e}"
    assert payload["kept_image_tokens"] == PrunerConfig(keep=keep).budget(payload["num_image_tokens"])


@pytest.mark.parametrize("name", MODELS)
def test_layer0_pte_runs_in_stock_multimodal_runner(exports, eager, prompts, et_zoo, name):
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input

    folder, payload = exports(name, 0, 0.12)
    _, processor = load_llava(et_zoo[name])
    tokenizer = processor.tokenizer
    inputs = prompts[name]
    parts = split_prompt(inputs["input_ids"], payload["tokenizer"]["image_token_id"])
    bos = payload["tokenizer"]["bos_id"]
    assert parts.before[0] == bos  # the runner adds it (num_bos=1); the text pieces go without it
    runner = MultimodalRunner(str(folder / "model.pte"), str(folder / payload["tokenizer"]["runner_file"]))
    pieces, stats = [], []
    config = GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, temperature=0.0, num_bos=1)
    runner.generate(
        [make_text_input(tokenizer.decode(parts.before[1:])), make_image_input(inputs["pixel_values"]),
         make_text_input(tokenizer.decode(parts.after))],
        config, pieces.append, stats.append,
    )
    eager_tokens, _ = eager(name, 0, 0.12)
    assert stats[0].num_prompt_tokens == len(parts.before) + payload["kept_image_tokens"] + len(parts.after)
    assert pieces == [tokenizer.decode([token]) for token in eager_tokens]


class RunnerSequence:
    """The call sequence of ExecuTorch's MultimodalRunner (extension/llm/runner: multimodal_prefiller.cpp,
    multimodal_runner.cpp), on ExecuTorch's Python runtime, whose methods share mutable buffers: each text input ->
    token_embedding -> text_decoder at the runner's position; an image -> vision_encoder -> text_decoder on what it
    returned; the position advances by the rows of each call; then one token at a time. Positions continue across
    generations, as the runner's do, unless ``reset`` (a new runner state)."""

    def __init__(self, folder: Path) -> None:
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(folder / "model.pte")
        self.methods = {name: self.program.load_method(name)
                        for name in ("vision_encoder", "token_embedding", "text_decoder")}
        self.position = 0

    def _call(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        return self.methods[name].execute([x.contiguous() for x in inputs])[0]

    def _decode(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self._call("text_decoder", rows, torch.tensor([self.position]))
        self.position += rows.shape[1]
        return logits

    def generate(self, pieces: list, new_tokens: int, eos: set[int]) -> list[int]:
        """pieces: token id lists (text) or pixel_values [1, 3, H, W] (an image) -> greedy tokens."""
        for piece in pieces:
            if isinstance(piece, torch.Tensor):
                logits = self._decode(self._call("vision_encoder", piece))
            else:
                logits = self._decode(self._call("token_embedding", torch.tensor([piece])))
        tokens = []
        while True:
            tokens.append(int(logits[0].argmax()))
            if len(tokens) == new_tokens or tokens[-1] in eos:
                return tokens
            logits = self._decode(self._call("token_embedding", torch.tensor([[tokens[-1]]])))


@pytest.mark.parametrize("name", MODELS)
def test_layer_k_pte_runs_through_the_runner_call_sequence(exports, eager, prompts, et_zoo, name):
    """The paper's placement in the runner's three methods: text, image, text, then decoding past the prompt gives
    eager pruned PyTorch's tokens (tiny-llava-gqa: grouped-query attention, a 16x16 grid); a second, image-free
    generation on the same program (a new conversation at position 0) is the stock unpruned model's."""
    folder, payload = exports(name, 2, 0.12)
    inputs = prompts[name]
    parts = split_prompt(inputs["input_ids"], payload["tokenizer"]["image_token_id"])
    runner = RunnerSequence(folder)
    eos = set(payload["tokenizer"]["eos_ids"])
    tokens = runner.generate([parts.before, inputs["pixel_values"], parts.after], NEW_TOKENS, eos)
    assert tokens == eager(name, 2, 0.12)[0]
    assert runner.position == len(parts.before) + payload["kept_image_tokens"] + len(parts.after) + len(tokens) - 1

    model, processor = load_llava(et_zoo[name])  # stock: no pruner
    text = processor.tokenizer("USER: What is the capital of France? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        stock = model.generate(**text, max_new_tokens=8, do_sample=False)[0, text["input_ids"].shape[1]:].tolist()
    runner.position = 0  # a new conversation, without an image: nothing is pruned
    again = runner.generate([text["input_ids"][0].tolist()], 8, eos)
    assert again and again == stock[: len(again)]


def test_layer_k_vision_encoder_selects_what_select_tokens_selects(exports, prompts, et_zoo):
    """The selection inside the layer-K vision_encoder equals the adapter's (pruner_core.select_tokens on layer K-1's
    states and post-RoPE keys of the image span, with the text before it as context): the same fused rows."""
    from pruner_core.adapters import embed_prompt, image_grid, prefill_with_pruning

    name = "tiny-llava-gqa"
    folder, payload = exports(name, 2, 0.12)
    inputs = prompts[name]
    parts = split_prompt(inputs["input_ids"], payload["tokenizer"]["image_token_id"])
    runner = RunnerSequence(folder)
    runner._decode(runner._call("token_embedding", torch.tensor([parts.before])))
    rows = runner._call("vision_encoder", inputs["pixel_values"])  # [1, R, D]
    model, _ = load_llava(et_zoo[name])
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
        reference = prefill_with_pruning(model, embeds, int(starts[0]), n_image, image_grid(model.config),
                                         PrunerConfig(keep=0.12, layer=2)).selection
    assert rows.shape == reference.states.shape
    torch.testing.assert_close(rows, reference.states, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- export_config.json against the program


def _expected_sizes(shape, payload):
    """A spec's shape with its dynamic dim replaced by the upper bound ExecuTorch plans for."""
    high = payload["executorch"]["dynamic_dims"]["T"][1]
    return [high if isinstance(d, str) else d for d in shape]


@pytest.mark.parametrize("layer", [0, 2])
def test_export_config_matches_program(exports, layer):
    from executorch.runtime import Runtime

    folder, payload = exports("tiny-llava", layer, 0.12)
    on_disk = json.loads((folder / "export_config.json").read_text())
    assert on_disk == payload
    assert PrunerConfig.from_dict(payload["pruner"]) == PrunerConfig(keep=0.12, layer=layer)
    assert payload["pruner"]["keep"] == 0.12 and isinstance(payload["pruner"]["keep"], float)
    assert payload["placement"] == ("before_llm" if layer == 0 else "in_llm")
    assert payload["positions"] == ("consecutive" if layer == 0 else "original")
    assert payload["grid"] == [24, 24] and payload["num_image_tokens"] == 24 * 24
    assert (payload["dtype"], payload["quantization"], payload["max_seq_len"]) == ("fp32", "none", MAX_SEQ_LEN)
    assert {"torch", "executorch", "transformers"} <= set(payload["library_versions"])
    preprocessing = payload["image_preprocessing"]
    assert preprocessing["input_layout"] == "float_nchw" and preprocessing["crop_height"] == 336
    tokenizer = payload["tokenizer"]
    assert {"bos_id", "eos_ids", "image_token_id", "chat_template"} <= set(tokenizer)
    assert all((folder / name).is_file() for name in payload["files"])

    program = Runtime.get().load_program(folder / "model.pte")
    expected_methods = {"vision_encoder", "token_embedding", "text_decoder"}  # the runner's, at both placements
    assert set(payload["methods"]) == expected_methods
    assert expected_methods | set(payload["executorch"]["constant_methods"]) <= program.method_names
    for name, contract in payload["methods"].items():
        meta = program.metadata(name)
        assert meta.num_inputs() == len(contract["inputs"]) and meta.num_outputs() == len(contract["outputs"])
        for index, spec in enumerate(contract["inputs"]):
            tensor = meta.input_tensor_meta(index)
            assert list(tensor.sizes()) == _expected_sizes(spec["shape"], payload), (name, spec)
            assert tensor.dtype() == SCALAR_TYPES[spec["dtype"]], (name, spec)
        for index, spec in enumerate(contract["outputs"]):
            tensor = meta.output_tensor_meta(index)
            assert list(tensor.sizes()) == _expected_sizes(spec["shape"], payload), (name, spec)
            assert tensor.dtype() == SCALAR_TYPES[spec["dtype"]], (name, spec)
    constants = payload["executorch"]["constant_methods"]
    for name, value in constants.items():
        result = program.load_method(name).execute([])
        assert (list(result) if isinstance(value, list) else result[0]) == value, name
    assert constants["get_num_image_tokens"] == payload["kept_image_tokens"]  # what vision_encoder returns
    removed = payload["num_image_tokens"] - payload["kept_image_tokens"] if layer else 0
    assert constants["get_max_seq_len"] == payload["executorch"]["runner_max_seq_len"] == MAX_SEQ_LEN - removed


# ---------------------------------------------------------------- each weight stored once (#15)

# The .pte files of this module's exports that the check reads (no export of its own): both placements, both places
# ExecuTorch keeps weights (XNNPACK's named data, the portable kernels' constant segment), the layer-2 export lowered
# one layer per pass (export/lowering.py), and the 8da4w (+ int8 vision) CLI export. (8da4w at layer 2 has no
# export here; checked once by hand: the same 420,556 stored bytes as at layer 0, layers < 2 read by both methods.)
PTE_CASES = {
    "L0-xnnpack": ("tiny-llava", 0, 0.12),
    "L2-xnnpack-sliced": ("tiny-llava-gqa", 2, 0.12),
    "L2-portable": ("tiny-llava", 2, 0.12),
    "L0-8da4w": QUANTISED,
}
# Blobs smaller than this may share content without being one weight stored twice: in these random tiny models the
# per-channel vectors (norm weights all ones, biases all zeros; at most 512 B here, 8da4w's bf16 scale vectors at
# most 988 B) coincide across tensors, and across the two stores (a zero [32] bias is in both the constant segment
# and XNNPACK's named data). 1 KiB is the smallest weight matrix as stored (8da4w's 4-bit 32x64 k/v projections;
# fp32 matrices start at 4 KiB), so every matrix, of every case, is hashed.
MIN_DUPLICATE_BYTES = 1024
STORED_BYTES_RANGE = (0.97, 1.03)  # stored / the parameters' bytes in the form the export stores them (measured 1.00)


def stored_form_bytes(model, inputs, quantize: str, quantize_vision: str) -> dict[str, float]:
    """Parameter name -> its bytes in the form an fp32 export stores it (8da4w decoder linears: 4-bit weights and a
    bf16 scale per group, XNNPACK's layout; int8 vision linears: int8 weights and an fp32 scale per row; the rest
    fp32), for the parameters the program reads: those that get a gradient from one forward pass of the full model
    (torch.export drops the others: CLIP's last layer and post-layernorm, whose output LLaVA-1.5 does not use)."""
    model.zero_grad(set_to_none=True)
    model(**inputs).logits.float().sum().backward()
    linears = {f"{fqn}.weight": module for fqn, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    out = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        linear = linears.get(name)
        if linear is not None and quantize == "8da4w" and name.startswith(("model.language_model.", "lm_head.")):
            out[name] = parameter.numel() / 2 + parameter.numel() // quant_group_size(linear.in_features) * 2
        elif linear is not None and quantize_vision == "int8" and name.startswith(
                ("model.vision_tower.", "model.multi_modal_projector.")):
            out[name] = parameter.numel() + linear.out_features * 4
        else:
            out[name] = parameter.numel() * parameter.element_size()
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("case", list(PTE_CASES))
def test_pte_stores_each_weight_once(exports, quantised_cli_export, et_zoo, prompts, case):
    """No weight blob of at least MIN_DUPLICATE_BYTES is stored twice (SHA-256 of its bytes) anywhere in model.pte:
    constant segment, named data, delegate payloads (export/pte_weights.py); and the blobs add up to the model's
    parameters once, in their stored form, so no weight is held twice in another form either. At layer K >= 1
    the decoder layers < K, which vision_encoder and text_decoder both run, are stored once for both."""
    name, layer, keep = PTE_CASES[case]
    folder = quantised_cli_export() if PTE_CASES[case] == QUANTISED else exports(name, layer, keep)[0]
    payload = json.loads((folder / "export_config.json").read_text())
    assert payload["dtype"] == "fp32"  # stored_form_bytes: 4 bytes for each parameter left unquantised
    constants = stored_constants(folder / "model.pte")

    assert duplicated(constants, MIN_DUPLICATE_BYTES) == {}
    assert not [c.where for c in constants if c.kind == "unreferenced"]  # no segment written and never read
    assert all(c.methods for c in constants if c.kind == "named_data")  # each key found in some delegate's graph
    stored = sum(c.nbytes for c in constants)
    hashed = sum(c.nbytes for c in constants if c.nbytes >= MIN_DUPLICATE_BYTES)
    assert hashed >= 0.95 * stored  # the hash check covers the weights, not a remainder

    model, _ = load_llava(et_zoo[name])
    expected = stored_form_bytes(model, prompts[name], payload["quantization"], payload["vision_quantization"])
    low, high = STORED_BYTES_RANGE
    assert low * sum(expected.values()) <= stored <= high * sum(expected.values()), (stored, sum(expected.values()))

    if layer:  # both methods read the layers below K: one copy, read by both
        shared = sum(c.nbytes for c in constants if {"vision_encoder", "text_decoder"} <= set(c.methods))
        below = sum(nbytes for parameter, nbytes in expected.items()
                    if any(parameter.startswith(f"model.language_model.layers.{i}.") for i in range(layer)))
        assert shared >= 0.95 * below, (shared, below)


def test_duplicated_finds_a_blob_stored_twice(tmp_path):
    """duplicated() reports content stored at two places from min_bytes up, and nothing else; a file that is not
    a .pte is refused with a ValueError."""
    blobs = [StoredConstant("named_data:a", "named_data", 4096, "aa"), StoredConstant("constant_segment[3]",
             "constant", 4096, "aa"), StoredConstant("constant_segment[4]", "constant", 4096, "bb"),
             StoredConstant("constant_segment[5]", "constant", 128, "cc"), StoredConstant("named_data:c",
             "named_data", 128, "cc")]
    assert duplicated(blobs, 1024) == {"aa": ["named_data:a", "constant_segment[3]"]}
    assert duplicated(blobs, 0) == {"aa": ["named_data:a", "constant_segment[3]"],
                                    "cc": ["constant_segment[5]", "named_data:c"]}
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07" + bytes(100))
    with pytest.raises(ValueError, match="not an ExecuTorch program"):
        stored_constants(tmp_path / "model.onnx")


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("backend", "words"),
    [("coreml", ("CoreML", "macOS", "pip install coremltools")), ("qnn", ("QNN", "SDK"))],
)
def test_unavailable_backends_fail_first_with_the_fix(tmp_path, backend, words):
    options = ExportOptions(model="tiny-llava", target="executorch", backend=backend, pruner=PrunerConfig(layer=0))
    with pytest.raises(BackendUnavailableError) as error:  # before loading: the model path does not even exist
        export_executorch(tmp_path / "no-model", tmp_path / "out", options, model_id="tiny-llava")
    assert all(word in str(error.value) for word in words), str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_combinations_fail_before_work(tmp_path, et_zoo):
    with pytest.raises(ValueError, match="xnnpack"):
        export_executorch(tmp_path / "no-model", tmp_path, ExportOptions(
            model="m", target="executorch", backend="portable", quantize="8da4w"), model_id="m")
    with pytest.raises(ValueError, match="prune-layer"):
        export_executorch(tmp_path / "no-model", tmp_path, ExportOptions(
            model="m", target="executorch", pruner=PrunerConfig(method="fastv", layer=0)), model_id="m")
    with pytest.raises(ValueError, match="max-seq-len"):
        export_executorch(et_zoo["tiny-llava"], tmp_path, ExportOptions(
            model="tiny-llava", target="executorch", pruner=PrunerConfig(keep=0.5, layer=2), max_seq_len=64),
            model_id="tiny-llava")


def assert_generates(folder: Path, inputs) -> None:
    """NEW_TOKENS tokens of the vocabulary, or fewer ending in EOS (quantised / half tokens may differ from fp32)."""
    payload = json.loads((folder / "export_config.json").read_text())
    tokens = ExecuTorchModel(folder).generate_greedy(inputs["input_ids"], inputs["pixel_values"], NEW_TOKENS)
    assert len(tokens) == NEW_TOKENS or (tokens and tokens[-1] in set(payload["tokenizer"]["eos_ids"]))
    assert all(0 <= token < payload["executorch"]["vocab_size"] for token in tokens)


def test_8da4w_export_through_the_cli_generates(quantised_cli_export, prompts):
    folder = quantised_cli_export()
    payload = json.loads((folder / "export_config.json").read_text())
    assert (payload["quantization"], payload["backend"], payload["dtype"]) == ("8da4w", "xnnpack", "fp32")
    assert payload["vision_quantization"] == "int8"
    assert_generates(folder, prompts[QUANTISED[0]])


def test_8da4w_export_meets_the_quantized_validation_tolerance(quantised_cli_export, et_zoo):
    """What pruner-export's validation (skipped for this export, see quantised_cli_export) decides: next-token logits
    that correlate with the unquantized eager model's (greedy tokens reported: this random model's logits are
    near-tied, and its first 8da4w token was eager's 76th choice, at a difference of 0.37)."""
    from export.validate import tolerance_for, validate_export

    folder = quantised_cli_export()
    assert json.loads((folder / "export_config.json").read_text())["validation"] == {"skipped": "--no-validate"}
    name, layer, keep = QUANTISED
    result = validate_export(folder, et_zoo[name], PrunerConfig(keep=keep, layer=layer),
                             tolerance=tolerance_for("fp32", "8da4w", "int8"))
    assert result.passed and 0.0 < result.max_logit_diff and result.steps_compared >= 1
    assert 0.5 <= result.min_logit_correlation < 1.0  # quantization noise: correlated, not equal
    assert result.export_tokens and result.eager_tokens


def test_model_card_runner_snippet_generates_what_pruner_run_does(exports, tmp_path):
    """The layer-0 .pte card's ExecuTorch runner snippet, run as written, prints what runtime.load(folder).generate
    prints (equal to eager pruned PyTorch: tests above and test_runtime_session); its adb commands are those of the
    folder `--android` prepares. photo.jpg is chelsea: on the astronaut this random model's second token is a lone
    byte (0x9b), which ExecuTorch's Python runner cannot hand to a str callback (UnicodeDecodeError)."""
    import contextlib
    import io
    import re

    from export.android import adb_push_commands, prepare_android_folder
    from export.model_card import folder_files, render_card

    folder, payload = exports("tiny-llava", 0, 0.12)
    out = tmp_path / "card"  # where the card says the folder lives: its -android sibling is prepared below
    card = render_card(payload, out, folder_files(folder), "random weights, tiny")
    snippet = re.search(r"## ExecuTorch's runner.*?```python\n(.*?)```", card, re.S).group(1)
    Image.fromarray(data.chelsea()).save(tmp_path / "photo.jpg", quality=95)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace(str(out), str(folder)).replace("photo.jpg", str(tmp_path / "photo.jpg")), {})
    from runtime import load

    text = load(folder).generate(str(tmp_path / "photo.jpg"), "What is in the picture?", max_new_tokens=64).text
    assert text and printed.getvalue().replace("\n", "") == text.replace("\n", "")
    android = prepare_android_folder(folder, tmp_path / "card-android")
    assert android and "\n".join(adb_push_commands(tmp_path / "card-android")) in card
    assert "--prune-layer 0: before the LLM" in card and "transformers.js" not in card


def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(quantised_cli_export, et_zoo):
    """What pruner-export prints (and refuses on) against the export child's measured peak RSS."""
    folder = quantised_cli_export()
    name, layer, keep = QUANTISED
    options = ExportOptions(model=name, target="executorch", pruner=PrunerConfig(keep=keep, layer=layer),
                            quantize="8da4w", quantize_vision="int8", dtype=checkpoint_dtype(et_zoo[name]),
                            max_seq_len=MAX_SEQ_LEN)
    estimate = estimate_export_memory(parameter_counts(et_zoo[name]), options, checkpoint_dtype(et_zoo[name]))
    assert estimate.describe() in quantised_cli_export.log_path.read_text()  # the CLI printed this estimate
    measured = quantised_cli_export.peak_rss
    assert folder.is_dir() and measured
    assert abs(estimate.peak - measured) <= 0.25 * measured, (estimate.describe(), measured / 2**30)


@pytest.mark.skipif(sys.platform != "linux" or usable_cpus() < 2, reason="two-process lowering: Linux, 2+ CPUs")
def test_two_process_lowering_writes_the_program_one_process_writes(exports, et_zoo, tmp_path):
    """The shared layer-0 XNNPACK export lowered text_decoder and token_embedding in a second process
    (export/parallel_lowering.py, the default): its model.pte is byte for byte the one-process lowering's."""
    name, layer, keep = "tiny-llava", 0, 0.12
    folder, _ = exports(name, layer, keep)
    apart = exports.lowered_apart[(name, layer, keep, "xnnpack", "none", "fp32")]
    assert apart == [["token_embedding", "text_decoder"]]
    options = ExportOptions(model=name, target="executorch", pruner=PrunerConfig(keep=keep, layer=layer),
                            max_seq_len=MAX_SEQ_LEN, jobs=1)
    with mock.patch("export.executorch_backends.lower_in_two_processes") as spy:
        export_executorch(et_zoo[name], tmp_path, options, model_id=name)
    assert not spy.called
    assert (tmp_path / "model.pte").read_bytes() == (folder / "model.pte").read_bytes()


def test_fp16_export_generates(exports, prompts):
    folder, payload = exports("tiny-llava-gqa", 0, 0.12, backend="portable", dtype="fp16")
    assert payload["dtype"] == "fp16"
    assert payload["methods"]["text_decoder"]["inputs"][0]["dtype"] == "float16"
    assert_generates(folder, prompts["tiny-llava-gqa"])


def test_runtime_rejects_prompts_without_an_image(exports, prompts):
    folder, _ = exports("tiny-llava", 0, 0.12)
    model = ExecuTorchModel(folder)
    with pytest.raises(ValueError, match="exactly one image.*found 0 placeholder"):
        model.generate_greedy([1, 5, 6], prompts["tiny-llava"]["pixel_values"], 2)
    with pytest.raises(ValueError, match="pixel_values of shape"):
        model.generate_greedy(prompts["tiny-llava"]["input_ids"], torch.zeros(1, 3, 32, 32), 2)


def test_trace_erases_metadata_asserts_everywhere_and_computes_the_same():
    """torch.export writes an aten._assert_tensor_metadata for a Tensor.to outside a higher-order op's branches (a
    trace-time check that ExecuTorch drops later; a branch's graph holds one written explicitly):
    without_metadata_asserts erases them all, in every graph, and the program, cond branches included, computes the
    same."""
    from export.executorch_backends import without_metadata_asserts

    class Casts(torch.nn.Module):
        def forward(self, x):
            y = x.to(torch.float32) * 2  # a cast to the dtype x has: an assert, no computation

            def double(t):
                torch.ops.aten._assert_tensor_metadata(t, dtype=torch.float32)  # one inside a branch's graph
                return t.to(torch.float32) * 2

            def negate(t):
                return -t.to(torch.float32)

            return torch.cond(y.sum() > 0, double, negate, (y,)).to(torch.float32)

    target = torch.ops.aten._assert_tensor_metadata.default

    def asserts(program):
        return sum(node.target is target for module in program.graph_module.modules()
                   if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes)

    x = torch.randn(3, 4)
    program = torch.export.export(Casts(), (x,), strict=False)
    before = asserts(program)
    assert before == 3  # the two casts outside the cond, the explicit one in its true branch
    branch = program.graph_module.true_graph_0
    assert sum(node.target is target for node in branch.graph.nodes) == 1
    stripped = without_metadata_asserts(program)
    assert asserts(stripped) == 0
    for sample in (x, -x.abs() - 1, x.abs() + 1):
        torch.testing.assert_close(stripped.module()(sample), Casts()(sample), rtol=0, atol=0)
