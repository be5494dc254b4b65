"""pruner-bench end to end on tiny-llava (ONNX): exports, runs side by side, writes JSON and a PNG chart."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from pruner_core.config import Keep
from runtime.bench import PeakSampler, main, parse_keeps, parse_targets, supported_targets


def test_parse_keeps():
    assert parse_keeps("1.0,0.33,64") == [Keep(1.0), Keep(0.33), Keep(64)]
    with pytest.raises(argparse.ArgumentTypeError, match="'half'.*token count"):
        parse_keeps("1.0,half")


def test_peak_sampler_sees_an_allocation():
    import numpy as np

    with PeakSampler() as sampler:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
    assert sampler.growth >= 32 * 2**20


def test_bench_needs_the_keep_1_baseline(capsys):
    assert main(["--keeps", "0.5,0.25"]) == 2
    assert "must include 1.0" in capsys.readouterr().err


def test_targets_are_checked_and_unsupported_ones_skipped(tmp_path, capsys, monkeypatch):
    """--targets takes known names only; a model of a family with one target (Qwen2-VL made ONNX-only here: every
    family exports to both) benches what it exports to with a note, and refuses before any export when none of the
    requested targets is one."""
    from pruner_core.adapters import QWEN2_VL

    monkeypatch.setattr(QWEN2_VL, "export_targets", ("onnx",))
    assert parse_targets("onnx,executorch,onnx") == ["onnx", "executorch"]
    with pytest.raises(argparse.ArgumentTypeError, match="executorch, onnx"):
        parse_targets("tflite")
    zoo = tmp_path / "zoo"
    assert supported_targets("tiny-qwen2-vl", ["executorch", "onnx"], zoo) == ["onnx"]
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("pruner-bench")]  # not the tiny build's progress
    assert "skipping executorch" in err and "onnx only" in err and len(notes) == 1
    assert supported_targets("tiny-llava", ["executorch", "onnx"], zoo) == ["executorch", "onnx"]
    assert capsys.readouterr().err == ""
    code = main(["--model", "tiny-qwen2-vl", "--targets", "executorch", "--cache-dir", str(zoo),
                 "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "bench.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "pruner-bench: error:" in err and "--targets onnx" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "bench.json").exists()


@pytest.mark.slow
def test_pruner_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "report" / "bench.json"
    code = main(["--model", "tiny-llava", "--cache-dir", str(tmp_path / "zoo"), "--targets", "onnx",
                 "--keeps", "1.0,0.11", "--repeats", "2", "--warmup", "1", "--max-new-tokens", "3",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {row["keep"]: row for row in report["rows"]}
    assert set(rows) == {1.0, 0.11}
    assert rows[1.0]["speedup_vs_keep1"]["ttft"] == pytest.approx(1.0)
    assert rows[0.11]["prompt_tokens"] < rows[1.0]["prompt_tokens"]
    assert rows[0.11]["kv_cache_bytes"] < rows[1.0]["kv_cache_bytes"]
    assert all(len(row["samples"]["ttft_ms"]) == 2 for row in report["rows"])
    with Image.open(out.with_suffix(".png")) as chart:
        assert chart.size[0] > 200 and chart.size[1] > 200
    captured = capsys.readouterr()
    printed = captured.out
    assert "TTFT ms" in printed and "onnx" in printed
    assert report["image"] == "astronaut" and report["image_source"] == "scikit-image sample"
    assert (printed + captured.err).count("next:") == 1  # one hint, not one per export
    assert f"next: pruner-run {rows[0.11]['folder']} --image astronaut" in printed
    assert report["random_weights"] is True and "random weights" in printed  # a tiny build says so
    # a second run reuses the exports (no new export folders, same report shape)
    before = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert main(["--model", "tiny-llava", "--cache-dir", str(tmp_path / "zoo"), "--targets", "onnx",
                 "--keeps", "1.0,0.11", "--repeats", "1", "--max-new-tokens", "2",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == before
