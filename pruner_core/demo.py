"""`make demo`: prune a real photograph's patch tokens and show what was kept.

Stand-in features (no model weights here): each 14x14 patch's pixels, projected at random to the hidden width,
so the similarity structure is the image's own.  Later stages of the demo run the tiny LLaVA end to end.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from runtime.console import run_program

from . import PrunerConfig, method_names, select_tokens
from .config import Keep, parse_keep
from .methods import get_method

PATCH = 14


def patch_tokens(image: np.ndarray, rows: int, cols: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> (hidden [1, N, width], keys [1, N, width]) from its patches."""
    resized = Image.fromarray(image).convert("RGB").resize((cols * PATCH, rows * PATCH), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # [H, W, 3]
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    patches = patches - patches.mean(0)
    generator = torch.Generator().manual_seed(seed)
    project = torch.randn(patches.shape[1], width, generator=generator) / patches.shape[1] ** 0.5
    key_project = torch.randn(patches.shape[1], width, generator=generator) / patches.shape[1] ** 0.5
    return torch.tanh(4.0 * patches @ project).unsqueeze(0), (patches @ key_project).unsqueeze(0)


def selection_map(order: list[int], rows: int, cols: int, pivots: int) -> str:
    """Text map of the grid: 'P' pivot, '#' kept, '.' discarded."""
    cells = [["."] * cols for _ in range(rows)]
    for rank, token in enumerate(order):
        cells[token // cols][token % cols] = "P" if rank < pivots else "#"
    return "\n".join(" ".join(row) for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prune a scikit-image photograph's patch tokens and show the result")
    parser.add_argument("--image", default="astronaut", choices=["astronaut", "chelsea", "coffee"],
                        help="a scikit-image sample photograph")
    parser.add_argument("--keep", type=parse_keep, default=Keep(64),
                        help="token count (64) or fraction (0.12; 1.0 keeps every token)")
    parser.add_argument("--grid", type=int, nargs=2, default=[24, 24], metavar=("ROWS", "COLS"))
    parser.add_argument("--method", default="vlm_pruner", choices=method_names())
    args = parser.parse_args(argv)

    from skimage import data

    rows, cols = args.grid
    config = PrunerConfig(keep=args.keep, method=args.method)
    try:
        if rows < 1 or cols < 1:
            raise ValueError(f"--grid {rows} {cols}: rows and columns must be >= 1")
        config.budget(rows * cols)
    except ValueError as error:
        print(f"pruner-demo: error: {error}", file=sys.stderr)
        return 2
    hidden, keys = patch_tokens(getattr(data, args.image)(), rows, cols, width=256)
    signals = {}
    needs = get_method(args.method).needs
    if "text_attention" in needs or "cls_attention" in needs:
        saliency = hidden.norm(dim=-1)  # stand-in attention for the demo
        signals = {name: saliency.softmax(-1) for name in ("text_attention", "cls_attention") if name in needs}
    start = time.perf_counter()
    selection = select_tokens(hidden, keys, (rows, cols), config, **signals)
    elapsed = (time.perf_counter() - start) * 1000
    budget = selection.budget
    pivots = config.pivots if args.method == "vlm_pruner" else 0
    print(f"{args.method}: kept {budget} of {rows * cols} tokens of '{args.image}' in {elapsed:.1f} ms (eager)")
    print(selection_map(selection.order[0].tolist(), rows, cols, min(pivots, budget)))
    print(f"kept indices: {selection.indices[0].tolist()}")
    return 0


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
