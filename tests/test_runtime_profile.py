"""runtime.profile and runtime.memory: JSON, table, timing, resident memory."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.memory import (current_rss_bytes, files_size_bytes, peak_measuring_command, peak_rss_bytes,
                            read_peak_report)
from runtime.profile import PROFILE_VERSION, STAGES, OpTime, Profile, Stopwatch, timed

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def _profile() -> Profile:
    return Profile(
        backend="onnxruntime",
        device="cpu",
        preprocess_ms=12.5,
        vision_ms=140.0,
        embed_ms=1.5,
        prefill_ms=800.0,
        decode_ms=[100.0, 110.0, 90.0, 100.0],
        wall_ms=1300.0,
        prompt_tokens_before_pruning=616,
        prompt_tokens_after_pruning=104,
        image_tokens_kept=64,
        image_tokens_total=576,
        peak_rss_bytes=5 * 1024**3,
        model_files_bytes=3_900_000_000,
        kv_cache_bytes=52 * MIB,
        ops=[OpTime("aten::linear", 600.0, 224, 0.6), OpTime("aten::scaled_dot_product_attention", 200.0, 32, 0.2)],
    ).finish()


def test_json_round_trip_and_stable_keys() -> None:
    profile = _profile()
    data = json.loads(profile.to_json())
    assert list(data) == [
        "version", "backend", "device", "preprocess_ms", "vision_ms", "embed_ms", "prefill_ms", "decode_ms",
        "time_to_first_token_ms", "decode_tokens_per_s", "wall_ms", "prompt_tokens_before_pruning",
        "prompt_tokens_after_pruning", "image_tokens_kept", "image_tokens_total", "peak_rss_bytes",
        "model_files_bytes", "kv_cache_bytes", "ops", "stop_reason", "context_left",
    ]
    assert data["version"] == PROFILE_VERSION
    assert data["ops"][0] == {"name": "aten::linear", "total_ms": 600.0, "calls": 224, "share": 0.6, "kind": "operator"}
    assert Profile.from_json(profile.to_json()) == profile
    assert Profile.from_dict(profile.to_dict()) == profile
    # an empty profile keeps the same keys (None where not measured)
    assert list(json.loads(Profile().to_json())) == list(data)
    assert Profile.from_json(Profile().to_json()) == Profile()
    with pytest.raises(ValueError, match="unknown Profile fields"):
        Profile.from_dict({**profile.to_dict(), "gpu_ms": 1.0})


def test_derived_values() -> None:
    profile = _profile()
    assert profile.stage_sum_ms() == pytest.approx(12.5 + 140.0 + 1.5 + 800.0 + 400.0)
    assert profile.time_to_first_token_ms == pytest.approx(954.0)
    assert profile.decode_tokens_per_s == pytest.approx(4 / 0.4)
    empty = Profile().finish()
    assert empty.stage_sum_ms() == 0.0 and empty.decode_tokens_per_s is None


def test_table_has_every_stage_with_units() -> None:
    text = _profile().table()
    for label in ("preprocess", "vision encoder + pruning", "token embedding", "prefill", "decode (4 steps)", "wall"):
        assert label in text
    for expected in ("12.50 ms", "140.00 ms", "800.00 ms", "400.00 ms", "1354.00 ms", "100.00 ms/token",
                     "10.00 tokens/s", "616 -> 104", "64 / 576", "11.1 % kept", "5.00 GiB", "52.00 MiB",
                     "aten::linear", "60.0 %"):
        assert expected in text, expected
    assert "n/a" in Profile().table()  # unmeasured values are marked, not zero


def test_timed_measures_a_sleep() -> None:
    profile = Profile()
    with timed(profile, "prefill") as watch:
        time.sleep(0.05)
    assert 45.0 <= profile.prefill_ms < 250.0
    assert watch.elapsed_ms == profile.prefill_ms
    with timed(profile, "prefill"):
        time.sleep(0.01)
    assert profile.prefill_ms >= 55.0  # a stage timed twice accumulates
    for _ in range(3):
        with timed(profile, "decode"):
            time.sleep(0.005)
    assert len(profile.decode_ms) == 3 and all(4.0 <= ms < 200.0 for ms in profile.decode_ms)
    with pytest.raises(RuntimeError):
        with timed(profile, "vision"):
            raise RuntimeError("boom")
    assert profile.vision_ms > 0.0  # recorded even when the stage fails
    with pytest.raises(ValueError, match="unknown stage 'gpu'"):
        with timed(profile, "gpu"):
            pass
    with Stopwatch() as watch:
        time.sleep(0.02)
    assert 18.0 <= watch.elapsed_ms < 220.0
    assert set(STAGES) == {"preprocess", "vision", "embed", "prefill", "decode", "wall"}


def test_peak_rss_grows_with_a_big_allocation() -> None:
    before_peak, before_now = peak_rss_bytes(), current_rss_bytes()
    assert before_peak is not None and before_now is not None  # Linux
    skew = 4 * MIB  # the kernel batches RSS counters per thread: statm and getrusage can differ by a few pages
    assert before_peak >= before_now - skew and before_now > 0
    # The peak is a high-water mark: to move it, the process must go above its earlier peak, so allocate the headroom
    # between now and then as well as 200 MB (the suite may have peaked higher before this test).
    headroom = max(0, before_peak - before_now)
    if headroom > 2 * 1024**3:
        pytest.skip(f"the process peaked {headroom / 1024**3:.1f} GiB above its current size earlier")
    block = np.ones(headroom + 200 * MIB, dtype=np.uint8)  # np.ones writes every page
    after_now, after_peak = current_rss_bytes(), peak_rss_bytes()
    assert after_now - before_now >= 0.9 * block.nbytes
    assert after_peak - before_peak >= 150 * MIB
    assert after_peak >= after_now - skew
    del block


def test_a_child_reports_its_own_peak_not_its_parents(tmp_path) -> None:
    """peak_measuring_command: a small module started by this (large) process reports its own high-water mark,
    well under this process's (os.wait4's ru_maxrss for the same child would carry this process's peak over on Linux:
    the reason the launcher exists); and the child's exit code passes through."""
    block = np.ones(300 * MIB, dtype=np.uint8)  # this process is now at least 300 MiB above a small child
    parent_peak = peak_rss_bytes()
    report = tmp_path / "peak"
    process = subprocess.Popen(peak_measuring_command("json.tool", ["--help"], report), cwd=REPO,
                               stdout=subprocess.DEVNULL)
    assert process.wait() == 0
    del block
    child_peak = read_peak_report(report)
    assert 0 < child_peak < parent_peak - 250 * MIB, (child_peak, parent_peak)
    failing = subprocess.run(peak_measuring_command("json.tool", ["--no-such-option"], tmp_path / "peak2"), cwd=REPO,
                             capture_output=True)
    assert failing.returncode == 2 and read_peak_report(tmp_path / "peak2") > 0


def test_files_size_bytes(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights.bin").write_bytes(b"y" * 24)
    assert files_size_bytes(tmp_path / "model.onnx") == 1000
    assert files_size_bytes([tmp_path / "model.onnx", str(tmp_path / "data")]) == 1024
    assert files_size_bytes(tmp_path) == 1024
    with pytest.raises(FileNotFoundError, match="missing.pte"):
        files_size_bytes([tmp_path / "missing.pte"])
