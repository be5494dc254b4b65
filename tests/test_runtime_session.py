"""runtime.load / Session.generate / pruner-run: backends equal eager, profiles are consistent, bad input is clear."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from cases import write_bomb_png
from export.common import ExportOptions
from pruner_core import PrunerConfig
from pruner_core.adapters import resolve_model
from runtime import NoNpuError, load

PROMPT = "What is in the picture?"
TOKENS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def onnx_exports(zoo, tmp_path_factory, onnx_export_cache) -> dict[int, Path]:
    """ONNX exports of tiny-llava at keep 0.12 for both placements (test_export_onnx.py's when it ran)."""
    from export.onnx_export import export_onnx

    folders = {}
    for layer in (0, 2):
        options = ExportOptions(model="tiny-llava", target="onnx", pruner=PrunerConfig(keep=0.12, layer=layer))
        if options not in onnx_export_cache:
            out = tmp_path_factory.mktemp(f"onnx-layer{layer}")
            onnx_export_cache[options] = out, export_onnx(resolve_model("tiny-llava", zoo), out, options,
                                                          model_id="tiny-llava")
        folders[layer] = onnx_export_cache[options][0]
    return folders


@pytest.fixture(scope="module")
def eager_tokens(zoo) -> dict[int, list[int]]:
    out = {}
    for layer in (0, 2):
        session = load("tiny-llava", config=PrunerConfig(keep=0.12, layer=layer), cache_dir=zoo)
        out[layer] = session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS).tokens
    return out


@pytest.mark.parametrize("layer", [0, 2])
def test_onnx_session_equals_eager(onnx_exports, eager_tokens, layer):
    session = load(onnx_exports[layer])
    result = session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS)
    assert result.tokens == eager_tokens[layer]
    assert len(result.tokens) == TOKENS or result.stop_reason == "eos"
    again = session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS)  # reusable, deterministic
    assert again.tokens == result.tokens and again.text == result.text


@pytest.mark.parametrize("layer", [0, 2])
def test_eager_session_matches_stock_generate_with_the_pruner(zoo, eager_tokens, layer):
    """The eager backend is the adapter's pruned prefill + decode: the same tokens as model.generate patched."""
    import torch

    from pruner_core.adapters import apply_pruner, load_llava

    model, processor = load_llava(resolve_model("tiny-llava", zoo))
    apply_pruner(model, PrunerConfig(keep=0.12, layer=layer))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True
    )
    inputs = processor(images=data.astronaut(), text=text, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    stock = generated[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    assert eager_tokens[layer] == [t for t in stock if t != eos][: len(eager_tokens[layer])]


def test_profile_is_consistent(onnx_exports, zoo):
    session = load(onnx_exports[2])
    profile = session.generate(data.chelsea(), PROMPT, max_new_tokens=TOKENS).profile
    payload = json.loads(profile.to_json())
    for key in ("preprocess_ms", "vision_ms", "embed_ms", "prefill_ms", "decode_ms", "time_to_first_token_ms",
                "decode_tokens_per_s", "prompt_tokens_before_pruning", "prompt_tokens_after_pruning",
                "peak_rss_bytes", "model_files_bytes", "kv_cache_bytes"):
        assert payload[key] is not None, key
    assert abs(profile.stage_sum_ms() - profile.wall_ms) <= 0.1 * profile.wall_ms
    assert profile.time_to_first_token_ms <= profile.wall_ms
    n_image = session.config["num_image_tokens"]
    assert profile.image_tokens_total == n_image and profile.image_tokens_kept == round(n_image * 0.12)
    assert profile.prompt_tokens_after_pruning == (
        profile.prompt_tokens_before_pruning - n_image + profile.image_tokens_kept)
    full = load("tiny-llava", config=PrunerConfig(keep=1.0), cache_dir=zoo).generate(
        data.chelsea(), PROMPT, max_new_tokens=TOKENS).profile
    assert profile.prompt_tokens_after_pruning < full.prompt_tokens_after_pruning
    assert profile.kv_cache_bytes < full.kv_cache_bytes
    assert "prefill" in profile.table() and "KV cache" in profile.table()


def test_operator_profile_lists_top_operators(onnx_exports):
    session = load(onnx_exports[0], profile_ops=True)
    profile = session.generate(data.coffee(), PROMPT, max_new_tokens=4).profile
    assert profile.ops and all(op.total_ms >= 0 and op.calls >= 1 for op in profile.ops)
    operators = [op for op in profile.ops if op.kind == "operator"]
    assert {op.name for op in operators} & {"MatMul", "FusedMatMul", "Scan"}
    assert sum(op.share for op in operators) <= 1.0 + 1e-6
    summary = [op for op in profile.ops if op.kind == "summary"]
    assert [op.name for op in summary] == ["model_run"] and summary[0].calls >= 4  # one per graph run at least
    assert summary[0].total_ms > max(op.total_ms for op in operators)  # a whole run holds each operator's time
    table = profile.table()
    assert table.index("profiled totals") < table.index("model_run") < table.index("top operators")


def test_sampling_is_seeded(onnx_exports):
    session = load(onnx_exports[0])
    first = session.generate(data.astronaut(), PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    second = session.generate(data.astronaut(), PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert first.tokens == second.tokens


def test_stream_pieces_add_up_to_the_text(onnx_exports):
    pieces = []
    result = load(onnx_exports[2]).generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS, on_token=pieces.append)
    assert "".join(pieces) == result.text


# ---- bad input ----------------------------------------------------------------------------------------------------


def copy_export(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def test_missing_model_file(onnx_exports, tmp_path):
    folder = copy_export(onnx_exports[0], tmp_path)
    (folder / "onnx" / "decoder_model_merged.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="decoder_model_merged.onnx is missing"):
        load(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_model_file(onnx_exports, tmp_path, damage):
    folder = copy_export(onnx_exports[0], tmp_path)
    graph = folder / "onnx" / "embed_tokens.onnx"
    graph.write_bytes(b"not a model" if damage == "garbage" else graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{graph}.* is corrupt or incomplete.*export the model again"):
        load(folder)


@pytest.mark.parametrize("backend", ["onnx", "executorch"])
@pytest.mark.parametrize("change", ["missing", "empty"])
def test_export_config_without_eos_ids_is_refused_by_both_backends(onnx_exports, executorch_exports, tmp_path,
                                                                  backend, change):
    folder = copy_export((onnx_exports if backend == "onnx" else executorch_exports)[2], tmp_path)
    config = json.loads((folder / "export_config.json").read_text())
    if change == "missing":
        del config["tokenizer"]["eos_ids"]
    else:
        config["tokenizer"]["eos_ids"] = []
    (folder / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no end-of-sequence ids.*tokenizer.eos_ids.*export the model again"):
        load(folder)


@pytest.mark.parametrize("field", ["tokenizer", "max_seq_len", "graphs"])
def test_export_config_missing_a_runtime_field_names_it(onnx_exports, tmp_path, field):
    folder = copy_export(onnx_exports[0], tmp_path)
    config = json.loads((folder / "export_config.json").read_text())
    del config[field]
    (folder / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"lacks {field}.*export the model again"):
        load(folder)


@pytest.mark.parametrize("layer", [0, 2])
def test_older_llava_export_without_position_scheme_runs_with_1d_positions(onnx_exports, eager_tokens, tmp_path,
                                                                          layer):
    """ONNX exports made before Qwen2-VL support have no decoder.position_scheme: LLaVA's is "1d", filled in."""
    folder = copy_export(onnx_exports[layer], tmp_path)
    config = json.loads((folder / "export_config.json").read_text())
    del config["decoder"]["position_scheme"]
    (folder / "export_config.json").write_text(json.dumps(config))
    session = load(folder)
    assert session.config["decoder"]["position_scheme"] == "1d"
    assert session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS).tokens == eager_tokens[layer]
    config["decoder"]["position_scheme"] = "2d"
    (folder / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="decoder.position_scheme '2d'.*export the model again"):
        load(folder)


def test_question_holding_the_image_placeholder_is_refused_as_such(onnx_exports):
    session = load(onnx_exports[0])
    with pytest.raises(ValueError, match="question contains the image placeholder '<image>'.*remove"):
        session.generate(data.astronaut(), "<image> What is in the picture?")


def test_newer_export_format(onnx_exports, tmp_path):
    folder = copy_export(onnx_exports[0], tmp_path)
    config = json.loads((folder / "export_config.json").read_text())
    config["format_version"] = 99
    (folder / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer than this vlm-pruner-edge understands"):
        load(folder)


def test_image_that_is_not_an_image(onnx_exports, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("hello")
    session = load(onnx_exports[0])
    with pytest.raises(ValueError, match=f"cannot read image file {fake}: not an image"):
        session.generate(fake, PROMPT)
    bomb = write_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=f"cannot read image file {bomb}: its header declares more pixels"):
        session.generate(bomb, PROMPT)
    with pytest.raises(ValueError, match="shape"):
        session.generate(np.zeros((4, 4), dtype=np.uint8), PROMPT)


def test_empty_and_too_long_prompts(onnx_exports):
    session = load(onnx_exports[0])
    with pytest.raises(ValueError, match="prompt is empty"):
        session.generate(data.astronaut(), "   ")
    with pytest.raises(ValueError, match="max_seq_len"):
        session.generate(data.astronaut(), "cat " * 2000)


def test_npu_without_npu_lists_what_the_machine_has(onnx_exports):
    with pytest.raises(NoNpuError, match="CPUExecutionProvider"):
        load(onnx_exports[0], device="npu")
    session = load(onnx_exports[0], device="auto")
    assert "cpu" in session.device_note.lower()


def test_pruner_run_cli_end_to_end(onnx_exports):
    command = [sys.executable, "-m", "runtime.cli", str(onnx_exports[2]), "--image", "astronaut", "--prompt", PROMPT,
               "--max-new-tokens", "4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)  # stdout is the JSON object alone; the answer streamed to stderr
    assert payload["backend"] == "onnxruntime"
    assert payload["text"] in done.stderr and len(payload["tokens"]) <= 4
    assert "random weights" in done.stderr  # a tiny build: gibberish answers are expected, and said so
    assert payload["stop_reason"] in ("eos", "max_new_tokens") and payload["context_left"] > 0
    assert payload["image_tokens_kept"] == json.loads((onnx_exports[2] / "export_config.json").read_text())[
        "kept_image_tokens"]
    bad = subprocess.run([sys.executable, "-m", "runtime.cli", str(onnx_exports[2]), "--image", "/no/such.png",
                          "--prompt", PROMPT], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "pruner-run: error" in bad.stderr and "does not exist" in bad.stderr
    bomb = write_bomb_png(onnx_exports[2].parent / "bomb.png")
    bad = subprocess.run([sys.executable, "-m", "runtime.cli", str(onnx_exports[2]), "--image", str(bomb),
                          "--prompt", PROMPT], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "header declares more pixels" in bad.stderr and "Traceback" not in bad.stderr


# ---- ExecuTorch backend -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executorch_exports(zoo, tmp_path_factory) -> dict[int, Path]:
    """ExecuTorch exports of tiny-llava at keep 0.12 for both placements (portable kernels: quick to lower)."""
    from export.executorch_export import export_executorch

    model_dir = resolve_model("tiny-llava", zoo)
    folders = {}
    for layer in (0, 2):
        out = tmp_path_factory.mktemp(f"et-layer{layer}")
        options = ExportOptions(model="tiny-llava", target="executorch", backend="portable",
                                pruner=PrunerConfig(keep=0.12, layer=layer))
        export_executorch(model_dir, out, options, model_id="tiny-llava")
        folders[layer] = out
    return folders


@pytest.mark.parametrize("layer", [0, 2])
def test_executorch_session_equals_eager(executorch_exports, eager_tokens, layer):
    session = load(executorch_exports[layer])
    assert session.backend.kind == "executorch"
    result = session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS)
    assert result.tokens == eager_tokens[layer]
    assert session.generate(data.astronaut(), PROMPT, max_new_tokens=TOKENS).tokens == result.tokens
    profile = result.profile
    assert abs(profile.stage_sum_ms() - profile.wall_ms) <= 0.1 * profile.wall_ms
    assert profile.kv_cache_bytes > 0 and profile.image_tokens_kept < profile.image_tokens_total


def test_executorch_operator_profile_does_not_abort(executorch_exports):
    profile = load(executorch_exports[2], profile_ops=True).generate(data.coffee(), PROMPT, max_new_tokens=3).profile
    assert profile.ops and all(op.total_ms >= 0 for op in profile.ops)
    summary = {op.name: op for op in profile.ops if op.kind == "summary"}
    operators = [op for op in profile.ops if op.kind == "operator"]
    assert "OPERATOR_CALL" in summary and summary["OPERATOR_CALL"].calls > 0  # portable kernels: operator calls
    assert operators and not {"OPERATOR_CALL", "DELEGATE_CALL"} & {op.name for op in operators}
    assert abs(sum(op.share for op in summary.values()) - 1.0) < 1e-6


def test_profile_ops_leaves_no_temporary_folder(onnx_exports, executorch_exports, tmp_path):
    """pruner-run --profile-ops (onnxruntime's traces, ExecuTorch's ETDump) leaves nothing in the temporary folder
    once the command has ended (each ran into a folder of its own that nothing removed)."""
    import os

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for folder in (onnx_exports[0], executorch_exports[2]):
        done = subprocess.run([sys.executable, "-m", "runtime.cli", str(folder), "--image", "coffee", "--prompt",
                               PROMPT, "--max-new-tokens", "2", "--profile-ops"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
        assert done.returncode == 0, done.stderr
        assert "top operators" in done.stdout  # the breakdown was read from that folder
        assert not [p.name for p in scratch.iterdir() if p.name.startswith("pruner-")], folder


def test_operator_summary_rows_are_kept_apart_from_operator_rows():
    from runtime.op_profile import top_operators

    totals = {"OPERATOR_CALL": 600.0, "DELEGATE_CALL": 400.0, "aten::add": 500.0, "GEMM": 300.0, "Softmax": 200.0}
    calls = {name: 2 for name in totals}
    rows = top_operators(totals, calls, limit=2, summary=("OPERATOR_CALL", "DELEGATE_CALL"))
    assert [(op.name, op.kind) for op in rows] == [
        ("OPERATOR_CALL", "summary"), ("DELEGATE_CALL", "summary"), ("aten::add", "operator"), ("GEMM", "operator")]
    assert [round(op.share, 3) for op in rows] == [0.6, 0.4, 0.5, 0.3]  # operator shares over operators only


def test_executorch_missing_and_corrupt_program(executorch_exports, tmp_path):
    folder = copy_export(executorch_exports[0], tmp_path)
    (folder / "model.pte").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        load(folder)
    (folder / "model.pte").unlink()
    with pytest.raises(FileNotFoundError, match="model.pte is missing"):
        load(folder)


# ---- the cache boundary -------------------------------------------------------------------------------------------


def question_filling(session, positions: int) -> str:
    """A question whose prompt makes the decoder hold exactly ``positions`` tokens after prefill."""
    image = session.backend.kept_image_tokens if session.config["placement"] == "before_llm" else \
        session.backend.num_image_tokens
    for words in range(1, 4 * positions):
        question = "cat " * words + "?"
        held = session.encoder.encode(question).text_tokens + image
        if held == positions:
            return question
        if held > positions:
            break
    raise AssertionError(f"no question fills exactly {positions} positions")


@pytest.mark.parametrize("backend, layer", [("onnx", 2), ("executorch", 0), ("executorch", 2)])
def test_generation_uses_the_whole_cache(onnx_exports, executorch_exports, zoo, backend, layer):
    """A prompt of P positions leaves room for max_seq_len - P + 1 tokens (the last needs no cache slot): a prompt
    that fills the cache still answers one token, the tokens up to the boundary equal eager PyTorch, and one position
    more is refused."""
    session = load((onnx_exports if backend == "onnx" else executorch_exports)[layer])
    limit = session.backend.max_seq_len
    eager = load("tiny-llava", config=PrunerConfig(keep=0.12, layer=layer), cache_dir=zoo)
    for room in (1, 3):
        question = question_filling(session, limit - room + 1)
        result = session.generate(data.astronaut(), question, max_new_tokens=room + 5)
        reference = eager.generate(data.astronaut(), question, max_new_tokens=room)
        assert result.tokens == reference.tokens
        assert len(result.tokens) == room and result.stop_reason == "max_seq_len" or result.stop_reason == "eos"
        assert result.profile.stop_reason == result.stop_reason
        assert result.profile.context_left == max(0, limit - (limit - room + 1) - len(result.tokens))
    with pytest.raises(ValueError, match=f"needs {limit + 1} positions.*max_seq_len={limit}"):
        session.generate(data.astronaut(), question_filling(session, limit + 1))
