"""Time to first token at Qwen2.5-VL-3B's real widths and a high resolution, pruned vs unpruned, against the
token-count bound.

    .venv/bin/python benchmarks/qwen_shapes.py [--image-size 896x896] [--keep 128] [--decoder-layers 4]
        [--targets onnx,executorch] [--repeats 3]

Builds a Qwen2.5-VL with Qwen2.5-VL-3B-Instruct's widths (vision: 32 blocks of 1280 wide, 16 heads, MLP 3420,
window attention over 112 px with full attention at blocks 7, 15, 23, 31, 2x2 merger to 2048; text: Qwen2 decoder
2048 wide, MLP 11008, 16 query heads over 2 KV heads, M-RoPE sections 16/24/24) but few decoder layers (random
weights, the tiny tokenizer, so the LM head is small), fixed at --image-size (896 x 896: 4096 patches, N = 1024
merged image tokens). It exports it unpruned and pruned (--keep of N at layer 2 and at layer 0) to each target, runs
every export side by side in one process (benchmarks/llava_shapes.py's `measure`) and reports time to first token,
the decoder prefill's speed-up against the bound set by token counts (see llava_shapes.py), and the token
selection's share of time to first token (the static selection at this N, R and width, lowered to an ExecuTorch
.pte with XNNPACK and timed alone).

Goals (issue #13): decoder prefill speed-up >= 85 % of the bound; selection < 2 % of time to first token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_select import lower_to_pte, median_ms  # noqa: E402
from llava_shapes import add_measure_options, measure  # noqa: E402

from export.selection import SelectionModule  # noqa: E402
from pruner_core import PrunerConfig  # noqa: E402
from pruner_core.adapters.qwen2_vl_tiny import TinyQwen2VLSpec, build_tiny_qwen2_vl  # noqa: E402

MERGED_PATCH = 28  # pixels per merged image token side (14 px patches, 2 x 2 merge)


def qwen25_vl_3b_widths(decoder_layers: int, image_size: tuple[int, int]) -> TinyQwen2VLSpec:
    """Qwen2.5-VL-3B-Instruct's config.json widths with ``decoder_layers`` text layers (the real model has 36)."""
    return TinyQwen2VLSpec(variant="qwen2_5_vl", image_size=image_size, vision_hidden=1280, vision_layers=32,
                           vision_heads=16, vision_ffn=3420, text_hidden=2048, text_layers=decoder_layers,
                           text_heads=16, kv_heads=2, text_ffn=11008, mrope_section=(16, 24, 24), window_size=112,
                           full_attention_blocks=(7, 15, 23, 31), max_positions=32768)


def parse_size(text: str) -> tuple[int, int]:
    """'896x896' -> (896, 896), multiples of 28 (one merged token)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size wants HxW, e.g. 896x896, got {text!r}") from None
    if height % MERGED_PATCH or width % MERGED_PATCH or height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"--image-size {text}: both sides must be positive multiples of 28")
    return height, width


def selection_ms(tokens: int, grid: tuple[int, int], width: int, keep: int, repeats: int) -> float:
    """Median ms of the static selection (R = keep of ``tokens``) in an XNNPACK .pte, on LLM-like states."""
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1, 1, width, generator=generator)
              + 0.7 * torch.randn(1, tokens, width, generator=generator)).contiguous()
    keys = torch.randn(1, tokens, width, generator=generator).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        run = lower_to_pte(SelectionModule(PrunerConfig(keep=keep), grid), (hidden, keys), Path(tmp) / "select.pte")
        return median_ms(run, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--image-size", type=parse_size, default=(896, 896), help="HxW, multiples of 28")
    add_measure_options(parser, keep=128, work_dir=Path("exported") / "qwen_shapes",
                        out=Path("benchmarks") / "out" / "qwen_shapes.json")
    args = parser.parse_args(argv)
    if args.max_seq_len is None:  # the prompt holds every image placeholder: room for them, the text and decoding
        rows, cols = (side // MERGED_PATCH for side in args.image_size)
        args.max_seq_len = rows * cols + 256

    from runtime.console import quiet_libraries

    quiet_libraries()
    height, width = args.image_size
    spec = qwen25_vl_3b_widths(args.decoder_layers, args.image_size)
    model_dir = args.work_dir / f"qwen25vl3b-widths-{args.decoder_layers}l-{height}x{width}"
    if not (model_dir / "config.json").is_file():
        print(f"building {model_dir} ...", file=sys.stderr)
        build_tiny_qwen2_vl(model_dir, spec=spec)
    report = measure(model_dir, args.decoder_layers, args)
    grid = (height // MERGED_PATCH, width // MERGED_PATCH)
    select = selection_ms(grid[0] * grid[1], grid, spec.text_hidden, args.keep, max(args.repeats, 5))
    for row in report:
        if row["label"] != "unpruned":
            print(f"{row['target']:<11} {row['label']:<9} selection {select:.1f} ms = "
                  f"{100.0 * select / row['ttft_ms']:.2f} % of time to first token (goal < 2 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
