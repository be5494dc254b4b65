"""`pruner-export` argument handling and bad input: clear errors, nothing left behind."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from pruner_core.config import Keep
from cases import LLAVA_7B_CONFIG
from export.cli import ExportError, build_parser, default_out, main, parse_keep, run


def run_cli(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """main() with the model cache under tmp_path; returns (exit code, stderr)."""
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv + ["--cache-dir", str(tmp_path / "cache")])
        except SystemExit as exit_:  # argparse's own usage errors (a --keep its type rejects)
            code = exit_.code
    return code, err.getvalue()


def assert_nothing_left(directory: Path) -> None:
    leftovers = [p for p in directory.rglob("*") if ".partial" in p.name or p.suffix == ".tmp"]
    assert not leftovers, leftovers


def test_parse_keep_distinguishes_counts_and_fractions():
    assert parse_keep("64") == Keep(64) and not parse_keep("64").is_fraction
    assert parse_keep("0.12") == Keep(0.12)
    assert parse_keep("1.0").is_fraction and parse_keep("1.0") != parse_keep("1")


def test_default_out_names_model_keep_and_target():
    assert default_out("llava-1.5-7b", 0.12, "executorch") == Path("exported/llava-1.5-7b-keep0.12-executorch")
    assert default_out("tiny-llava", 1.0, "onnx") == Path("exported/tiny-llava-keep1.0-onnx")
    assert default_out("llava-hf/llava-1.5-7b-hf", 64, "onnx") == Path("exported/llava-1.5-7b-hf-keep64-onnx")


@pytest.mark.parametrize("keep, pattern", [("0", "keep"), ("-5", "keep"), ("1.5", "fraction"), ("700", "exceeds")])
def test_keep_out_of_range(tmp_path, keep, pattern):
    out = tmp_path / "out"
    code, err = run_cli(["--keep", keep, "--out", str(out)], tmp_path)
    assert code == 2 and "error" in err and pattern in err
    assert not out.exists()
    assert_nothing_left(tmp_path)


def test_unknown_model(tmp_path):
    code, err = run_cli(["--model", "not-a-model", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "unknown model 'not-a-model'" in err and "tiny-llava" in err


def test_hub_id_missing_offline_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    code, err = run_cli(["--model", "someone/llava-missing", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "download someone/llava-missing" in err
    assert not (tmp_path / "o").exists()


def test_non_llava_directory(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run_cli(["--model", str(model), "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "'bert'" in err and "LLaVA" in err


def test_out_dir_exists_without_overwrite(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--out", str(out)], tmp_path)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(["--out", str(blocker / "sub" / "out")], tmp_path)
    assert code == 2 and "cannot write" in err


def test_unsupported_backend_and_quantisation(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--backend", "tpu"])
    assert "invalid choice" in capsys.readouterr().err
    code, err = run_cli(["--target", "onnx", "--quantize", "8da4w", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "--quantize 8da4w is not available for onnx" in err


def test_7b_export_memory_on_this_machine(tmp_path):
    """llava-1.5-7b as llava-hf ships it (fp16 safetensors): the headline command (dtype auto = fp16) fits 24 GiB,
    an explicit fp32 export is refused with the fix, 8da4w needs less."""
    model = tmp_path / "llava-7b-config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAVA_7B_CONFIG, "torch_dtype": "float16"}))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))  # weights "there", absent
    from pruner_core.adapters.hub import random_weights

    assert not random_weights(model)  # a checkpoint, not a tiny build
    import export.cli as cli

    def run_with(argv: list[str]) -> str:
        args = build_parser().parse_args(["--model", str(model), "--out", str(tmp_path / "o"),
                                          "--cache-dir", str(tmp_path / "cache"), *argv])
        stream = io.StringIO()
        original = cli.available_memory_bytes
        cli.available_memory_bytes = lambda: 24 * 1024**3  # this machine's size, whatever is free right now
        try:
            run(args, stream)
        except ExportError as error:
            return f"{stream.getvalue()}REFUSED: {error}"
        except Exception as error:  # noqa: BLE001 - past the memory check, loading the (absent) weights fails
            return f"{stream.getvalue()}LOADED: {type(error).__name__}"
        finally:
            cli.available_memory_bytes = original
        return stream.getvalue()

    headline = run_with(["--keep", "0.12", "--target", "executorch"])
    assert "dtype fp16 (auto" in headline and "7.06B parameters" in headline and "REFUSED" not in headline
    fp32 = run_with(["--keep", "0.12", "--target", "executorch", "--dtype", "fp32"])
    assert "REFUSED: not enough memory" in fp32 and "--dtype auto (the checkpoint's fp16" in fp32
    peaks = [float(re.search(r"export ~([0-9.]+) GiB at peak", text).group(1)) for text in (headline, fp32)]
    quantized = run_with(["--keep", "0.12", "--target", "executorch", "--quantize", "8da4w"])
    peaks.append(float(re.search(r"export ~([0-9.]+) GiB at peak", quantized).group(1)))
    # measured on this machine (README "Export memory"): fp16 16.9 GiB, 8da4w 9.35 GiB (64 kept at layer 0; layer 2
    # adds a lowering slice's duplicate); both fit, fp32 does not
    assert max(peaks[0], peaks[2]) < 19 < 24 < peaks[1] and 16 < peaks[0] and 9 < peaks[2] < 12
    assert not (tmp_path / "o").exists()


def test_staging_folder_gets_a_normal_mode(tmp_path):
    """Export folders are made in a temporary folder and renamed: they get the umask's mode, not mkdtemp's 0700."""
    import os

    from export.common import staging_directory

    out = tmp_path / "exported"
    with staging_directory(out) as staging:
        (staging / "file.txt").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "file.txt").is_file() and (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert_nothing_left(tmp_path)


def test_path_like_names_and_folders_without_weights(tmp_path, monkeypatch):
    """A path that does not exist says so (with the nearest names), not "download it"; a folder with config.json
    and no weights says what is missing; a family without exports says how to run it instead."""
    (tmp_path / "exported" / "tiny-llava-keep0.12").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["--model", "exported/tiny-llava-keep0.21", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "no such folder: exported/tiny-llava-keep0.21" in err and "keep0.12" in err
    assert err.index("no such folder") < err.index("not in the local Hugging Face cache")  # the path reading first
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(LLAVA_7B_CONFIG))
    code, err = run_cli(["--model", str(config_only), "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "no weights" in err and "Traceback" not in err
    from pruner_core.adapters import QWEN2_VL

    monkeypatch.setattr(QWEN2_VL, "export_targets", ("onnx",))  # a family with one target (every family has both)
    for target in ("executorch", "all"):  # a family that exports to ONNX only: say so and give the command
        code, err = run_cli(["--model", "tiny-qwen2-vl", "--keep", "0.12", "--target", target,
                             "--out", str(tmp_path / "o")], tmp_path)
        assert code == 2 and "Qwen2-VL" in err and "exports with --target onnx only" in err
        assert f"not --target {target}" in err and "--target onnx`" in err and "LLaVA" not in err
    assert "(it includes executorch)" in err
    assert not (tmp_path / "o").exists()


def test_image_size_flag(tmp_path):
    from export.cli import parse_image_size

    assert parse_image_size("672x448") == (672, 448) and parse_image_size("336") == (336, 336)
    code, err = run_cli(["--model", "tiny-llava", "--image-size", "12x", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "HxW" in err
    code, err = run_cli(["--model", "tiny-llava", "--image-size", "448x448", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "336x336 images only" in err
    code, err = run_cli(["--model", "tiny-qwen2-vl", "--target", "onnx", "--image-size", "300x300",
                         "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "multiple of 28" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_help_shows_defaults_and_flags_that_do_not_apply_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.12)" in shown and "(default: 2)" in shown and "(default: 768)" in shown
    code, err = run_cli(["--target", "onnx", "--backend", "qnn", "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and "--backend qnn applies to --target executorch" in err
    assert not (tmp_path / "o").exists()


def test_pruner_run_refuses_pruning_flags_on_an_exported_folder(tmp_path, capsys):
    from runtime.cli import build_parser as run_parser
    from runtime.cli import main as run_main

    with pytest.raises(SystemExit):
        run_parser().parse_args(["--help"])
    assert "(default: 64)" in " ".join(capsys.readouterr().out.split())  # --max-new-tokens
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "export_config.json").write_text("{}")
    code = run_main([str(folder), "--image", "astronaut", "--prompt", "hi", "--keep", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--keep sets how an eager model is pruned" in err and "drop it, or export again" in err
    code = run_main([str(folder), "--image", "astronaut", "--prompt", "hi", "--keep", "0.5", "--method", "dart"])
    assert code == 2 and "--keep / --method set how an eager model is pruned" in capsys.readouterr().err
    code = run_main([str(folder), "--image", "astronaut", "--prompt", "hi", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--cache-dir is where eager tiny models are built" in err and ": drop it" in err
    assert "export again" not in err


def test_summary_notes_random_weights_and_the_next_command(tmp_path):
    from export.cli import summarise

    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.pte").write_bytes(b"x" * 10)
    payload = {"target": "executorch", "kept_image_tokens": 69, "num_image_tokens": 576, "placement": "in_llm",
               "pruner": {"method": "vlm_pruner", "layer": 2}, "methods": {"forward": {}}}

    def shown(payload, notes=True) -> str:
        stream = io.StringIO()
        summarise(out, payload, 1.0, stream, notes)
        return stream.getvalue()

    real = shown(payload)
    assert f"next: pruner-run {out}" in real and "random weights" not in real
    tiny = shown({**payload, "random_weights": True})
    assert "note: random weights (a tiny test build)" in tiny
    quiet = shown({**payload, "random_weights": True}, notes=False)  # pruner-bench prints its own notes once
    assert "kept 69 of 576" in quiet and "next:" not in quiet and "random weights" not in quiet


def test_authors_grid_is_refused_for_llava(tmp_path):
    """--authors-grid reproduces the authors' Qwen2-VL grid placement: LLaVA-1.5 has no merged grid, say so."""
    code, err = run_cli(["--model", "tiny-llava", "--authors-grid", "--target", "onnx", "--out", str(tmp_path / "o")],
                        tmp_path)
    assert code == 2 and "drop authors_grid" in err and "LLaVA-1.5" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layer, expected", [
    ("9", "--prune-layer 9 is past the last decoder layer: tiny-llava has 4 decoder layers, so --prune-layer takes "
          "0..3"),
    ("-1", "--prune-layer -1: give a decoder layer K >= 0"),
])
def test_prune_layer_out_of_range_speaks_the_cli(tmp_path, layer, expected):
    code, err = run_cli(["--model", "tiny-llava", "--prune-layer", layer, "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and expected in err and "PrunerConfig" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_pruner_run_prune_layer_out_of_range_speaks_the_cli(tmp_path, capsys):
    """The eager path's layer check comes from the library (PrunerConfig.layer); pruner-run words it as its flag."""
    from runtime.cli import main as run_main

    code = run_main(["tiny-llava", "--cache-dir", str(tmp_path), "--prune-layer", "9", "--image", "astronaut",
                     "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--prune-layer 9 is past the last decoder layer: tiny-llava has 4 decoder layers" in err
    assert "PrunerConfig" not in err and "Traceback" not in err


def test_overwrite_never_deletes_what_is_not_an_export(tmp_path, monkeypatch):
    """--out . (or a folder of the user's files) with --overwrite is refused before any work; nothing is deleted."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        code, err = run_cli(["--model", "tiny-llava", "--target", "onnx", "--out", out, "--overwrite"], tmp_path)
        assert code == 2 and "working folder or one above it" in err and "Traceback" not in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mine.txt").write_text("mine")
    code, err = run_cli(["--model", "tiny-llava", "--target", "onnx", "--out", str(mine), "--overwrite"], tmp_path)
    assert code == 2 and "not an export of this tool" in err
    assert (work / "keep.txt").read_text() == "precious" and (mine / "mine.txt").read_text() == "mine"


def test_a_failed_export_leaves_no_folder_it_created(tmp_path):
    """Folders made for --out are removed again when the export fails (here: a backend this machine lacks)."""
    out = tmp_path / "new" / "deeper" / "model"
    code, err = run_cli(["--model", "tiny-llava", "--target", "executorch", "--backend", "coreml", "--out", str(out),
                         "--no-validate"], tmp_path)
    assert code == 2 and "CoreML" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_sigterm_unwinds_like_ctrl_c():
    """SIGTERM inside an export raises a KeyboardInterrupt (staging_directory then removes its folder); the handler
    before it comes back."""
    import os
    import signal

    from runtime.console import Terminated, terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_pruner_run_refuses_an_operator_profile_of_an_eager_model(tmp_path, capsys):
    from runtime.cli import main as run_main

    code = run_main(["tiny-llava", "--cache-dir", str(tmp_path), "--profile-ops", "--image", "astronaut",
                     "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--profile-ops" in err and "eager PyTorch" in err and "Traceback" not in err


@pytest.mark.parametrize("model, argv, expected", [
    ("tiny-llava", ["--target", "onnx"], "--android needs an ExecuTorch export the stock runner can run"),
    ("tiny-llava", ["--prune-layer", "2"], "use --target executorch --prune-layer 0"),
    # the family's refusal comes first: no target or placement would make an M-RoPE .pte run on the phone
    ("tiny-qwen2-vl", ["--target", "onnx"], "MultimodalRunner"),
])
def test_android_refusals_name_what_would_work(tmp_path, model, argv, expected):
    code, err = run_cli(["--model", model, "--android", *argv, "--out", str(tmp_path / "o")], tmp_path)
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-android").exists()


def test_target_all_says_which_target_a_quantization_skips(tmp_path):
    """--target all --quantize int8: ONNX takes int8, ExecuTorch has no int8 decoder option; the CLI says the .pte
    will not be quantized before any work (here the model name is unknown, so nothing else runs)."""
    code, err = run_cli(["--model", "no-such-model", "--target", "all", "--quantize", "int8", "--out",
                         str(tmp_path / "o")], tmp_path)
    assert code == 2 and "note: --quantize int8 does not apply to executorch" in err and "--quantize 8da4w" in err
    assert "does not apply to onnx" not in err and not (tmp_path / "o").exists()


def test_a_failed_second_lowering_process_is_one_line_naming_jobs_1(tmp_path, monkeypatch):
    """The second lowering process killed (for memory, by the user): a one-line error naming the fix, exit 2, no
    traceback, nothing written."""
    import export.cli as cli
    from export.parallel_lowering import LoweringProcessError

    def killed(*args, **kwargs):
        raise LoweringProcessError("the process lowering token_embedding, text_decoder ended without a result (exit "
                                   "code -9; -9 is a kill, often for memory): export with --jobs 1 to lower every "
                                   "method in one process")

    monkeypatch.setattr(cli, "exporter_for", lambda target: killed)
    out = tmp_path / "model"
    code, err = run_cli(["--model", "tiny-llava", "--target", "executorch", "--out", str(out), "--no-validate"],
                        tmp_path)
    assert code == 2 and "pruner-export: error: the process lowering" in err and "--jobs 1" in err, err
    assert "Traceback" not in err and not out.exists()
    assert_nothing_left(tmp_path)


def test_jobs_help_says_two_processes_at_most():
    text = " ".join(build_parser().format_help().split())
    assert "more than 2 is the same as 2" in text
