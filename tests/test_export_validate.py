"""pruner-export checks what it wrote (export/validate.py) and describes it in a README.md model card
(export/model_card.py): validation passes and is recorded, a broken export is refused leaving nothing, --no-validate
skips, and the card lists the folder's files, sizes and placement.

Two CLI exports per module (tiny-llava ONNX at layer 0, validated; tiny-qwen2-vl ONNX at layer 2 with --no-validate);
the failure cases reuse the first one's files.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from cases import LLAVA_7B_CONFIG
from onnx import numpy_helper

from export.cli import ExportError, build_parser, check_and_describe, run
from export.common import ExportOptions, staging_directory
from export.model_card import CARD_FILE, human_size, source_revision
from export.validate import Tolerance, compare, judge, tolerance_for, validate_export
from pruner_core import PrunerConfig
from pruner_core.adapters import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def cli_export(argv: list[str], cache: Path, tolerance: Tolerance | None = None) -> tuple[Path, str]:
    """run() of pruner-export -> (folder, what it printed)."""
    args = build_parser().parse_args([*argv, "--cache-dir", str(cache)])
    stream = io.StringIO()
    (folder,) = run(args, stream, tolerance=tolerance)
    return folder, stream.getvalue()


@pytest.fixture(scope="module")
def llava_onnx(cache, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("exports") / "tiny-llava-onnx"
    return cli_export(["--model", "tiny-llava", "--keep", "0.12", "--prune-layer", "0", "--target", "onnx",
                       "--out", str(out)], cache)


@pytest.fixture(scope="module")
def qwen_unvalidated(cache, tmp_path_factory) -> tuple[Path, str]:
    """--no-validate with a tolerance nothing meets: the export is written only if validation really is skipped."""
    out = tmp_path_factory.mktemp("exports") / "tiny-qwen2-vl-onnx"
    return cli_export(["--model", "tiny-qwen2-vl", "--keep", "0.25", "--prune-layer", "2", "--target", "onnx",
                       "--no-validate", "--out", str(out)], cache, tolerance=Tolerance(0.0))


def test_validation_passes_and_is_recorded(llava_onnx):
    folder, printed = llava_onnx
    config = json.loads((folder / "export_config.json").read_text())
    validation = config["validation"]
    assert validation["passed"] and validation["tokens_agree"] and validation["first_token_rank"] == 0
    assert 0.0 <= validation["max_logit_diff"] <= tolerance_for("fp32").max_logit_diff
    assert validation["steps_compared"] == len(validation["export_tokens"]) == 8
    assert validation["export_tokens"] == validation["eager_tokens"]
    assert validation["image"] == "astronaut" and validation["tolerance"]["tokens_must_agree"]
    line = next(line for line in printed.splitlines() if line.startswith("validation passed"))
    assert f"{validation['max_logit_diff']:.3g}" in line and "8 greedy tokens agree" in line and "<= 0.001" in line


def test_model_card_lists_files_sizes_placement_and_how_to_run(llava_onnx):
    folder, _ = llava_onnx
    card = (folder / CARD_FILE).read_text()
    config = json.loads((folder / "export_config.json").read_text())
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CARD_FILE]
    assert "onnx/decoder_model_merged.onnx" in [str(p.relative_to(folder)) for p in files]
    for path in files:  # every file with its exact size (export_config.json as finally written)
        size = path.stat().st_size
        assert f"| `{path.relative_to(folder)}` | {human_size(size)} ({size} bytes) |" in card
    assert f"R = {config['kept_image_tokens']} of N = {config['num_image_tokens']}" in card
    assert "--prune-layer 0: before the LLM (`before_llm`)" in card and "| revision | random weights, tiny |" in card
    assert "| method | vlm_pruner |" in card and "| keep | 0.12 |" in card and "| dtype | fp32 |" in card
    assert f"max |logit difference|: {config['validation']['max_logit_diff']:.3g}" in card
    assert f"pruner-run {folder} --image" in card
    assert "LlavaForConditionalGeneration.from_pretrained" in card and "local_files_only: true" in card
    assert f"into the {config['image_placeholders']} kept tokens the vision encoder returns" in card
    assert "ExecuTorch" not in card and "adb" not in card  # an ONNX folder: no .pte sections


def test_no_validate_skips_and_says_so(qwen_unvalidated):
    folder, printed = qwen_unvalidated
    config = json.loads((folder / "export_config.json").read_text())
    assert config["validation"] == {"skipped": "--no-validate"} and "validation skipped (--no-validate)" in printed
    assert "validation passed" not in printed and "validation FAILED" not in printed
    card = (folder / CARD_FILE).read_text()
    assert "Not validated: exported with `--no-validate`." in card
    assert "--prune-layer 2: inside the LLM, between decoder layers 1 and 2 (`in_llm`)" in card
    # layer 2 of an ONNX export: this project's decoder, which transformers.js does not call
    assert "transformers.js" not in card and "adb" not in card


def test_qwen_export_passes_validation_when_asked(qwen_unvalidated, cache):
    """Validation is target- and family-agnostic (runtime.load): Qwen2-VL's M-RoPE export meets the fp32 bound."""
    folder, _ = qwen_unvalidated
    result = validate_export(folder, resolve_model("tiny-qwen2-vl", cache), PrunerConfig(keep=0.25, layer=2),
                             tolerance=tolerance_for("fp32"))
    assert result.passed and result.tokens_agree and result.max_logit_diff <= 1e-3


def test_failed_validation_writes_nothing_and_names_the_way_out(llava_onnx, cache, tmp_path):
    """The CLI's post-export step inside its staging folder, with a tolerance no run meets: ExportError naming the
    figures, the tolerance and --no-validate; no folder, no partial files."""
    folder, _ = llava_onnx
    out = tmp_path / "refused"
    options = ExportOptions(model="tiny-llava", target="onnx", pruner=PrunerConfig(keep=0.12, layer=0))
    progress = lambda stage: None  # noqa: E731
    with pytest.raises(ExportError) as raised:
        with staging_directory(out) as staging:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            check_and_describe(staging, out, resolve_model("tiny-llava", cache), options, progress, io.StringIO(),
                               tolerance=Tolerance(0.0))
    message = str(raised.value)
    assert "validation FAILED: max |logit diff|" in message and "tolerance: max |logit diff| <= 0" in message
    assert "nothing was written" in message and "--no-validate" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_corrupted_weight_fails_validation(llava_onnx, cache, tmp_path):
    """The decoder's LM head scaled by 1.5 in a copy of the export: the logits move far past fp32's bound."""
    folder, _ = llava_onnx
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    path = broken / "onnx" / "decoder_model_merged.onnx"
    graph = onnx.load(path)
    vocab = json.loads((folder / "export_config.json").read_text())["methods"]["decoder_model_merged"]["outputs"][0][
        "shape"][-1]
    head = next(init for init in graph.graph.initializer if vocab in init.dims and len(init.dims) == 2)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1.5), head.name))
    onnx.save(graph, path)
    result = validate_export(broken, resolve_model("tiny-llava", cache), PrunerConfig(keep=0.12, layer=0),
                             tolerance=tolerance_for("fp32"))
    assert not result.passed and result.max_logit_diff > 1e-2


def test_compare_and_judge():
    """Steps after the first differing token saw other inputs and are not compared; quantized tolerances report the
    tokens without requiring them and bound the logits' correlation, not their difference."""
    eager = [np.array([0.0, 2.0, 1.0], np.float32), np.array([5.0, 0.0, 0.0], np.float32)]
    same_first = [np.array([0.0, 2.0, 1.5], np.float32), np.array([0.0, 9.0, 0.0], np.float32)]
    diff, correlation, steps, agree, rank = compare(same_first, [1, 1], eager, [1, 0])
    assert (diff, steps, agree, rank) == (9.0, 2, False, 0)
    assert correlation == pytest.approx(-0.5)  # step 2: [0, 9, 0] against [5, 0, 0]
    flipped = [np.array([0.0, 1.0, 1.5], np.float32), np.array([0.0, 0.0, 0.0], np.float32)]
    diff, correlation, steps, agree, rank = compare(flipped, [2, 0], eager, [1, 0])
    assert steps == 1 and diff == 1.0 and not agree and rank == 1  # token 2 is eager's second choice
    assert correlation == pytest.approx(np.corrcoef([0.0, 1.0, 1.5], [0.0, 2.0, 1.0])[0, 1])
    assert not judge(diff, agree, Tolerance(2.0)) and judge(diff, agree, Tolerance(2.0, tokens_must_agree=False))
    assert not judge(diff, True, Tolerance(0.5)) and not judge(float("nan"), True, Tolerance(2.0))
    quantized = tolerance_for("fp32", "8da4w")
    assert quantized.max_logit_diff is None and not quantized.tokens_must_agree
    assert judge(50.0, False, quantized, correlation=0.9)  # any scale of difference, if the logits still correlate
    assert not judge(0.1, True, quantized, correlation=0.2) and not judge(0.1, True, quantized, float("nan"))
    assert "logit correlation >= 0.5" in quantized.describe() and "max |logit diff|" not in quantized.describe()
    with pytest.raises(ValueError, match="max_logit_diff"):
        Tolerance(-1.0)
    with pytest.raises(ValueError, match="min_logit_correlation"):
        Tolerance(None, min_logit_correlation=1.5)


def test_source_revision(tmp_path):
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert source_revision(snapshot, False) == f"llava-hf/llava-1.5-7b-hf at commit {'a' * 40}"
    assert source_revision(snapshot, True) == "random weights, tiny"
    assert "no hub revision" in source_revision(tmp_path, False)


@pytest.fixture(scope="module")
def seven_b_counts(tmp_path_factory):
    """LLaVA-1.5-7B's parameters by part, as pruner-export counts them from its config.json alone."""
    from pruner_core.adapters import adapter_for

    model = tmp_path_factory.mktemp("llava-7b-config")
    (model / "config.json").write_text(json.dumps(LLAVA_7B_CONFIG))
    return adapter_for(model).parameter_counts(model)


@pytest.mark.parametrize("quantize, validation_fits", [("none", False), ("8da4w", True)])
def test_validation_that_does_not_fit_is_announced(seven_b_counts, quantize, validation_fits):
    """LLaVA-1.5-7B in fp16 on a 22 GiB machine: the export fits either way; running the unquantized fp16 .pte
    (the mapped program plus XNNPACK's packed copy: ~3x its 13 GiB) does not, so the export is to be written
    unchecked, with a note; the 8da4w one's validation fits (the eager fp16 model, 13 GiB, is its larger half)."""
    from export.cli import check_memory
    from export.memory import GIB, estimate_export_memory, estimate_validation_memory

    counts = seven_b_counts
    options = ExportOptions(model="m", target="executorch", pruner=PrunerConfig(keep=0.12, layer=2), dtype="fp16",
                            quantize=quantize)
    available = 22 * GIB
    assert estimate_export_memory(counts, options, "fp16").peak < available
    validation = estimate_validation_memory(counts, options, "fp16")
    assert validation > counts.total * 2  # at least the eager fp16 weights
    stream = io.StringIO()
    assert check_memory(counts, options, "fp16", available, stream) is validation_fits
    assert ("validation of the executorch export needs" in stream.getvalue()) is not validation_fits
    if not validation_fits:
        assert validation > 3 * estimate_export_memory(counts, options, "fp16").output
        assert "written unchecked" in stream.getvalue() and "pruner-run" in stream.getvalue()
    quiet = io.StringIO()  # --no-validate: nothing to announce
    assert check_memory(counts, options, "fp16", available, quiet, validate=False)
    assert "validation" not in quiet.getvalue()


def test_an_export_that_does_not_fit_is_refused_without_the_validation_note(seven_b_counts):
    """When the export itself does not fit, check_memory refuses it: no note that it "will be written unchecked"
    (it will not be written at all)."""
    from export.cli import check_memory
    from export.memory import GIB

    options = ExportOptions(model="m", target="executorch", pruner=PrunerConfig(keep=0.12, layer=2), dtype="fp16")
    stream = io.StringIO()
    with pytest.raises(ExportError, match="not enough memory"):
        check_memory(seven_b_counts, options, "fp16", 8 * GIB, stream)
    assert "written unchecked" not in stream.getvalue()


def test_an_export_whose_validation_does_not_fit_is_written_unchecked(cache, tmp_path, monkeypatch):
    """Through the CLI, with the validation's estimate above the free memory and a tolerance nothing meets: the
    export is written (so validation really did not run), and says why in what it prints, export_config.json and
    the model card."""
    import export.memory

    monkeypatch.setattr(export.memory, "estimate_validation_memory", lambda *args: 1 << 60)
    folder, printed = cli_export(["--model", "tiny-llava", "--keep", "0.12", "--prune-layer", "0", "--target", "onnx",
                                  "--out", str(tmp_path / "unchecked")], cache, tolerance=Tolerance(0.0))
    assert "validation of the onnx export needs" in printed and "validation skipped (not enough memory)" in printed
    config = json.loads((folder / "export_config.json").read_text())
    assert config["validation"] == {"skipped": "not enough memory"}
    assert "Not validated (not enough memory)" in (folder / CARD_FILE).read_text()
