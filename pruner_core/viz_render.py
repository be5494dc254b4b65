"""pruner-viz's drawing: the panels (the model's view, kept patches outlined with their pick rank, pivots in their own
colour, discarded ones dimmed) laid out side by side in one PNG with matplotlib's Agg canvas (no display, no global
pyplot state). The data drawn (``ModelView``, ``PanelSelection``) comes from ``pruner_core.viz``'s model path.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .coverage import Coverage

# Pure colours no dimmed pixel can take (dimmed pixels stay <= DIM * 255), so outlines are countable in the PNG.
KEPT_RGB = (0, 255, 0)
PIVOT_RGB = (255, 0, 255)
DIM = 0.35  # brightness factor of discarded patches

DPI = 100
CELL_PX = 28  # smallest on-screen patch size; a 14-px patch is drawn at 2x, a 28-px merged token at 1x
MARGIN_PX = 16
HEADER_PX = 64  # title + two coverage lines above each panel
BANNER_PX = 44  # figure caption: model, image, prompt, legend


@dataclass(frozen=True)
class PanelSelection:
    """What one method kept: R of the N tokens of a (rows, cols) grid."""

    method: str
    grid: tuple[int, int]
    indices: tuple[int, ...]  # R ascending
    order: tuple[int, ...]  # R in pick order
    pivots: int  # the first `pivots` of `order` are pivots (0 for methods without)
    coverage: Coverage

    @property
    def budget(self) -> int:
        return len(self.indices)

    @property
    def total(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ModelView:
    """The image as the vision tower sees it (after the processor's resize and crop, at the export resolution),
    before normalisation."""

    pixels: np.ndarray  # uint8 [rows * patch, cols * patch, 3]
    grid: tuple[int, int]  # (rows, cols) of image tokens
    patch: int  # image pixels per image token along each side (LLaVA-1.5 14; Qwen2-VL's merged tokens 28)


# ================================================================================================================
# Drawing
# ================================================================================================================


@dataclass(frozen=True)
class PanelBox:
    """Where a panel's image sits in the PNG, in pixels from the top-left corner."""

    left: int
    top: int
    cell: int  # on-screen patch size
    rows: int
    cols: int

    @property
    def width(self) -> int:
        return self.cols * self.cell

    @property
    def height(self) -> int:
        return self.rows * self.cell


@dataclass(frozen=True)
class Layout:
    """Panels side by side in one row, each under its header; the figure's size in pixels."""

    boxes: tuple[PanelBox, ...]
    width: int
    height: int


def plan_layout(panels: int, grid: tuple[int, int], cell: int) -> Layout:
    """Pixel positions of `panels` panels of a (rows, cols) grid drawn at `cell` px per patch."""
    rows, cols = grid
    top = BANNER_PX + HEADER_PX
    boxes = tuple(PanelBox(MARGIN_PX + k * (cols * cell + MARGIN_PX), top, cell, rows, cols) for k in range(panels))
    width = MARGIN_PX + panels * (cols * cell + MARGIN_PX)
    return Layout(boxes, width, top + rows * cell + MARGIN_PX)


def cell_size(patch: int, minimum: int = CELL_PX) -> int:
    """On-screen patch size: the patch's own pixels, enlarged to at least `minimum` so a rank fits inside."""
    return max(patch, minimum)


def outline_width(cell: int) -> int:
    return max(2, cell // 12)


def panel_pixels(view: ModelView, panel: PanelSelection, cell: int) -> np.ndarray:
    """The model's view enlarged to `cell` px per patch, discarded patches dimmed, kept ones outlined.

    -> uint8 [rows * cell, cols * cell, 3]
    """
    from PIL import Image

    rows, cols = view.grid
    big = np.asarray(Image.fromarray(view.pixels).resize((cols * cell, rows * cell), Image.Resampling.BICUBIC))
    cells = big.reshape(rows, cell, cols, cell, 3).astype(np.float64)  # [rows, cell, cols, cell, 3]
    kept = np.zeros(rows * cols, dtype=bool)
    kept[list(panel.indices)] = True
    kept = kept.reshape(rows, 1, cols, 1, 1)
    cells = np.where(kept, cells, np.floor(cells * DIM)).astype(np.uint8)
    line = outline_width(cell)
    for rank, token in enumerate(panel.order):
        colour = PIVOT_RGB if rank < panel.pivots else KEPT_RGB
        y, x = divmod(token, cols)
        block = cells[y, :, x]  # [cell, cell, 3] view into the panel
        block[:line], block[-line:], block[:, :line], block[:, -line:] = colour, colour, colour, colour
    return cells.reshape(rows * cell, cols * cell, 3)


def rank_labels(panel: PanelSelection) -> list[tuple[int, str, bool]]:
    """(token, label, is_pivot) for every kept token: its 1-based pick rank, "P<k>" for pivots."""
    return [(token, f"P{rank + 1}" if rank < panel.pivots else str(rank + 1), rank < panel.pivots)
            for rank, token in enumerate(panel.order)]


def label_font_px(cell: int, chars: int) -> float:
    """Largest label font (px) that stays inside the cell's outline with room for its stroke."""
    room = cell - 2 * outline_width(cell) - 4
    return min(0.42 * cell, room / (0.7 * max(chars, 1)))


def _px_to_pt(px: float) -> float:
    return px * 72.0 / DPI


def render(view: ModelView, panels: list[PanelSelection], out: Path, caption: str) -> Layout:
    """Draw the panels into one PNG at `out` (written atomically) -> the layout used."""
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cell = cell_size(view.patch)
    layout = plan_layout(len(panels), view.grid, cell)
    figure = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)  # the Agg canvas: no display, no global pyplot state
    text = _text_writer(figure, layout)
    for row, line in enumerate(caption_lines(caption, layout.width)):
        text(MARGIN_PX, 6 + 17 * row, line, size=10, va="top", ha="left")
    widest = max(len(label) for panel in panels for _, label, _ in rank_labels(panel))
    label_pt = _px_to_pt(label_font_px(cell, widest))
    stroke = [patheffects.withStroke(linewidth=1.6, foreground="black")]
    for panel, box in zip(panels, layout.boxes, strict=True):
        figure.figimage(panel_pixels(view, panel, cell), xo=box.left, yo=layout.height - box.top - box.height,
                        origin="upper", resize=False)
        centre = box.left + box.width / 2
        text(centre, box.top - HEADER_PX + 4, f"{panel.method}: {panel.budget} of {panel.total}",
             size=13, weight="bold", ha="center", va="top")
        cov = panel.coverage
        text(centre, box.top - HEADER_PX + 26,
             f"regions hit {cov.regions_hit}/{cov.regions_total} ({cov.region_fraction:.0%})",
             size=10, ha="center", va="top")
        text(centre, box.top - HEADER_PX + 42, f"mean gap {cov.mean_gap:.2f} patches, {cov.kept_groups} groups",
             size=10, ha="center", va="top")
        for token, label, pivot in rank_labels(panel):
            y, x = divmod(token, box.cols)
            text(box.left + (x + 0.5) * cell, box.top + (y + 0.5) * cell, label, size=label_pt, ha="center",
                 va="center_baseline", color="#ffd0ff" if pivot else "white", weight="bold", path_effects=stroke)
    atomic_write(out, lambda handle: figure.savefig(handle, format="png", dpi=DPI, facecolor="white"))
    return layout


def caption_lines(caption: str, width_px: int, lines: int = 2) -> list[str]:
    """The caption wrapped to the figure's width (about 7 px a character at 10 pt), at most `lines` lines."""
    import textwrap

    wrapped = textwrap.wrap(caption, width=wrapped_width(width_px))
    if len(wrapped) > lines:
        wrapped = wrapped[: lines - 1] + [textwrap.shorten(" ".join(wrapped[lines - 1 :]), wrapped_width(width_px))]
    return wrapped


def wrapped_width(width_px: int) -> int:
    return max(20, (width_px - 2 * MARGIN_PX) // 7)


def _text_writer(figure: Any, layout: Layout):
    """Text at pixel coordinates from the top-left corner (matplotlib's figure fractions count from bottom-left)."""

    def write(x: float, y: float, message: str, **kwargs: Any) -> None:
        figure.text(x / layout.width, 1.0 - y / layout.height, message, **kwargs)

    return write


def atomic_write(out: Path, write: Any, mode: str = "wb") -> None:
    """Write through a temporary file in out's folder, then rename: `out` is never half-written. `out` gets a new
    file's usual permissions (0666 less the umask: 0644 under the common umask 022), not the temporary file's private
    0600."""
    handle = tempfile.NamedTemporaryFile(mode, dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, out)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise

