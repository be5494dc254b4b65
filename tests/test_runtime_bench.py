"""pruner-bench end to end on tiny-llava (ONNX): exports, runs side by side, writes JSON and a PNG chart."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from pruner_core.config import Keep
from runtime.bench import PeakSampler, main, parse_keeps

pytestmark = pytest.mark.slow


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
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "onnx" in printed
    assert report["random_weights"] is True and "random weights" in printed  # a tiny build says so
    # a second run reuses the exports (no new export folders, same report shape)
    before = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert main(["--model", "tiny-llava", "--cache-dir", str(tmp_path / "zoo"), "--targets", "onnx",
                 "--keeps", "1.0,0.11", "--repeats", "1", "--max-new-tokens", "2",
                 "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == before
