"""The benchmark scripts run end to end at toy sizes (what they print is checked, never how fast it is)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_select_prints_a_row_per_budget_with_ratios(capsys):
    bench = load_script("bench_select")
    assert bench.main(["--budgets", "3", "5", "--grid", "4", "5", "--width", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "N=20 (4x5), D=32" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [row[0] for row in rows] == ["3", "5"]
    for row in rows:  # 5 timings then 3 ratios (toy sizes print some timings as 0.0)
        values = [float(cell.rstrip("msx")) for cell in row[1:]]
        assert len(values) == 8 and all(0 <= v < float("inf") for v in values)
        assert values[0] > 0  # the eager reference takes measurable time even here


def test_l1_topk_baseline_keeps_the_largest_key_norms_ascending():
    import torch

    bench = load_script("bench_select")
    keys = torch.zeros(1, 6, 4)
    keys[0, [4, 1, 5], 0] = torch.tensor([3.0, 2.0, -5.0])  # L1 norms: token 5 > 4 > 1 > the rest
    hidden = torch.arange(6.0).reshape(1, 6, 1).expand(1, 6, 3).contiguous()
    indices, states = bench.L1TopK(3)(hidden, keys)
    assert indices.tolist() == [[1, 4, 5]]
    assert states[0, :, 0].tolist() == [1.0, 4.0, 5.0]


def test_qwen_shapes_builds_qwen25_vl_3b_widths_at_the_benchmark_resolution():
    """The Qwen benchmark's model is Qwen2.5-VL-3B-Instruct's architecture at its published widths (few decoder
    layers), and 896 x 896 gives the 1,024 merged image tokens the issue names."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    bench = load_script("qwen_shapes")
    from pruner_core.adapters.qwen2_vl_tiny import build_tokenizer, tiny_config

    spec = bench.qwen25_vl_3b_widths(2, bench.parse_size("896x896"))
    config = tiny_config(spec, build_tokenizer(spec))
    vision, text = config.vision_config, config.text_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.out_hidden_size, vision.window_size, list(vision.fullatt_block_indexes)) == (2048, 112,
                                                                                               [7, 15, 23, 31])
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        2048, 11008, 16, 2)
    assert text.num_hidden_layers == 2 and list(text.rope_parameters["mrope_section"]) == [16, 24, 24]
    rows, cols = (side // bench.MERGED_PATCH for side in spec.image_size)
    assert rows * cols == 1024
    for bad in ("900x896", "896", "0x28"):
        with pytest.raises(Exception, match="image-size"):
            bench.parse_size(bad)
