"""`pruner-viz`: which image tokens each pruning method keeps, drawn on the image as the model sees it.

    pruner-viz --model tiny-llava --image astronaut --keep 64 \\
        --methods vlm_pruner,dart,divprune,fastv,visionzip,random --out viz.png

Every panel comes from the real model path: the prompt goes through the model's processor, the stock encoder and
``prefill_with_pruning``, and the panel shows that call's ``Selection`` (nothing is re-selected here). One PNG,
one panel per method: kept patches at full brightness with an outline and their 1-based pick rank, discarded ones
dimmed; pivots (the first ``pivots`` picks of methods that pick pivots first) in their own colour, marked "P".
Under each title: coverage figures (``pruner_core.coverage``). A sidecar ``<out>.json`` records, per panel, the
kept indices, the pick order, the coverage and where the panel sits in the PNG (so tests can read the pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Keep, PrunerConfig, parse_keep
from .coverage import Coverage, coverage
from .methods import get_method, method_names
from runtime.console import HelpFormatter, add_verbose, quiet_libraries
from runtime.preprocess import SAMPLE_IMAGES

DEFAULT_CACHE = Path.home() / ".cache" / "vlm-pruner-edge" / "models"
DEFAULT_METHODS = ("vlm_pruner", "dart", "divprune", "fastv", "visionzip", "random")
DEFAULT_PROMPT = "What is shown in this image?"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Pure colours no dimmed pixel can take (dimmed pixels stay <= DIM * 255), so outlines are countable in the PNG.
KEPT_RGB = (0, 255, 0)
PIVOT_RGB = (255, 0, 255)
DIM = 0.35  # brightness factor of discarded patches
PIVOT_METHODS = frozenset({"vlm_pruner", "dart"})  # methods whose `order` starts with `config.pivots` pivots

DPI = 100
CELL_PX = 28  # smallest on-screen patch size; a 14-px patch is drawn at 2x
MARGIN_PX = 16
HEADER_PX = 64  # title + two coverage lines above each panel
BANNER_PX = 44  # figure caption: model, image, prompt, legend


class VizError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ================================================================================================================
# Options and inputs
# ================================================================================================================


@dataclass(frozen=True)
class VizOptions:
    """What to draw: one panel per method, all at the same keep and pruning layer."""

    model: str = "tiny-llava"
    image: str = "astronaut"
    prompt: str = DEFAULT_PROMPT
    keep: Keep | int | float = 64  # stored as a Keep
    methods: tuple[str, ...] = DEFAULT_METHODS
    out: Path = Path("viz.png")
    layer: int = 2
    cache_dir: Path = DEFAULT_CACHE
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "keep", Keep.of(self.keep))
        except ValueError as error:
            raise VizError(str(error)) from None
        if not self.methods:
            raise VizError(f"no methods given; pass --methods with names from {method_names()}")
        for name in self.methods:
            try:
                get_method(name)
            except ValueError:
                raise VizError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None
        twice = sorted({name for name in self.methods if self.methods.count(name) > 1})
        if twice:
            raise VizError(f"method(s) {twice} listed more than once; list each method once")
        if self.dtype not in DTYPES:
            raise VizError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if Path(self.out).suffix.lower() != ".png":
            raise VizError(f"--out {self.out} must name a .png file (e.g. viz.png)")
        self.pruner_config(self.methods[0])  # keep / layer out of range for any model: fail now

    def pruner_config(self, method: str) -> PrunerConfig:
        try:
            return PrunerConfig(keep=self.keep, method=method, layer=self.layer)
        except ValueError as error:
            raise VizError(str(error)) from None


def load_image(source: str):
    """A path to an image file, or a scikit-image sample name -> PIL RGB image (files decoded by the runtime's
    ``open_image_file``: the same errors as pruner-run)."""
    from PIL import Image

    from runtime.preprocess import load_image as load_rgb

    path = Path(source).expanduser()
    if path.is_file():
        try:
            return load_rgb(path)
        except ValueError as error:
            raise VizError(str(error)) from None
    if source in SAMPLE_IMAGES:
        from runtime.preprocess import sample_image

        try:
            return Image.fromarray(sample_image(source)).convert("RGB")
        except ValueError as error:  # scikit-image missing
            raise VizError(f"--image {source}: {error}") from None
    what = "a directory, not an image file" if path.is_dir() else "not found"
    raise VizError(f"image {source!r} is {what}; pass the path of an image file or one of {', '.join(SAMPLE_IMAGES)}")


def check_writable(out: Path) -> None:
    """Create out's folder if needed and prove a file can be written there, before any model is loaded."""
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pruner-viz-probe-"):
            pass
    except OSError as error:
        raise VizError(
            f"cannot write to {folder} ({error.strerror or error}); choose a writable --out"
        ) from None
    if out.is_dir():
        raise VizError(f"--out {out} is a directory; name a .png file inside it")


def check_model_fits(model_dir: Path, options: VizOptions) -> None:
    """keep and --layer against the model's config (cheap: no weights loaded)."""
    from transformers import AutoConfig

    from .adapters import adapter_for, check_split_layer

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config)
    if adapter.geometry(config).position_scheme != "1d":
        raise VizError(f"pruner-viz draws LLaVA-1.5 models so far; {options.model} is a {adapter.family} model "
                       f"(run it with pruner-run {options.model} --keep ... to see its answers)")
    geometry = adapter.geometry(config, adapter.default_image_size(model_dir))
    rows, cols = geometry.grid
    pruner = options.pruner_config(options.methods[0])
    try:
        pruner.budget(rows * cols)
        check_split_layer(pruner, geometry.num_layers)
    except ValueError as error:
        raise VizError(f"{error} (model {options.model}: {rows}x{cols} = {rows * cols} image tokens)") from None


# ================================================================================================================
# The model path: one Selection per method
# ================================================================================================================


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
    """The image as the vision tower sees it (after the processor's resize and crop), un-normalised."""

    pixels: np.ndarray  # uint8 [rows * patch, cols * patch, 3]
    grid: tuple[int, int]
    patch: int


def model_view(pixel_values: torch.Tensor, image_processor: Any, grid: tuple[int, int], patch: int) -> ModelView:
    """pixel_values [1, 3, H, W] (normalised) -> the RGB image the model sees, cropped to the patch grid."""
    pixels = pixel_values[0].float()  # [3, H, W]
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        pixels = pixels * std + mean
    scale = 1.0 / float(getattr(image_processor, "rescale_factor", 1 / 255)) if getattr(
        image_processor, "do_rescale", True) else 1.0
    rows, cols = grid
    image = (pixels * scale).round().clamp(0, 255).to(torch.uint8)[:, : rows * patch, : cols * patch]
    return ModelView(pixels=image.permute(1, 2, 0).numpy(), grid=grid, patch=patch)  # [H, W, 3]


def _pixel_values(processor: Any, image: Any) -> torch.Tensor:
    """The processor's pixel_values for ``image``, computed by the runtime's preprocessing (bit for bit the same
    for every ordinary image, and bounded in memory for extreme aspect ratios, where the processor is not)."""
    from runtime.preprocess import ImagePreprocessing, preprocess

    try:
        spec = ImagePreprocessing.from_hf_processor(processor.image_processor)
        return torch.from_numpy(preprocess(image, spec))
    except ValueError as error:
        raise VizError(str(error)) from None


def _cls_attention(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """VisionZip's signal: the tower's [CLS] attention over the patches -> [1, N]."""
    from .adapters import adapter_for

    return adapter_for(model).cls_attention(model, pixel_values)


def collect_selections(model: Any, processor: Any, image: Any, options: VizOptions) -> tuple[ModelView, list]:
    """Run the prompt through the model once per method -> (what the model sees, one PanelSelection per method)."""
    from PIL import Image

    from .adapters import check_split_layer, embed_prompt, image_grid, llava_prompt, prefill_with_pruning

    try:
        check_split_layer(options.pruner_config(options.methods[0]), model.config.text_config.num_hidden_layers)
    except ValueError as error:
        raise VizError(str(error)) from None

    placeholder = processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    if placeholder in options.prompt:
        raise VizError(f"the prompt contains the image placeholder {placeholder!r}; the prompt format puts the image "
                       f"in by itself, so remove {placeholder!r} from --prompt")
    pixel_values = _pixel_values(processor, image)  # [1, 3, H, W] float32
    # the prompt's ids depend on the input size alone, not on the pixels: an empty image of that size gives them
    blank = Image.new("RGB", (pixel_values.shape[-1], pixel_values.shape[-2]))
    inputs = processor(images=blank, text=llava_prompt(options.prompt), return_tensors="pt")
    view = model_view(pixel_values, processor.image_processor, image_grid(model.config, pixel_values),
                      model.config.vision_config.patch_size)
    pixel_values = pixel_values.to(model.dtype)
    grid = image_grid(model.config, pixel_values)
    selections = []
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], pixel_values)  # [1, T, D]
        if grid[0] * grid[1] != n_image:
            raise VizError(f"the prompt holds {n_image} image tokens but the image is a {grid[0]}x{grid[1]} grid; "
                           "use the model's own processor")
        needs_cls = any("cls_attention" in get_method(m).needs for m in options.methods)
        cls = _cls_attention(model, pixel_values) if needs_cls else None  # [1, N]
        for method in options.methods:
            config = options.pruner_config(method)
            try:
                config.budget(n_image)
            except ValueError as error:
                raise VizError(str(error)) from None
            signal = cls if "cls_attention" in get_method(method).needs else None
            result = prefill_with_pruning(model, embeds, int(starts[0]), n_image, grid, config, cls_attention=signal)
            selections.append(panel_selection(method, grid, result.selection, config))
    return view, selections


def panel_selection(method: str, grid: tuple[int, int], selection: Any, config: PrunerConfig) -> PanelSelection:
    """A Selection (batch item 0) -> the plain lists a panel draws."""
    indices = tuple(int(i) for i in selection.indices[0])  # [R]
    order = tuple(int(i) for i in selection.order[0])  # [R]
    pivots = min(config.pivots, len(order)) if method in PIVOT_METHODS else 0
    return PanelSelection(method, grid, indices, order, pivots, coverage(indices, grid))


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
    _atomic_write(out, lambda handle: figure.savefig(handle, format="png", dpi=DPI, facecolor="white"))
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


def _atomic_write(out: Path, write: Any, mode: str = "wb") -> None:
    """Write through a temporary file in out's folder, then rename: `out` is never half-written."""
    handle = tempfile.NamedTemporaryFile(mode, dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, out)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# ================================================================================================================
# Putting it together
# ================================================================================================================


@dataclass(frozen=True)
class VizResult:
    """What `visualize` wrote: the PNG, its sidecar JSON, and the panels drawn (in PNG order)."""

    png: Path
    sidecar: Path
    panels: tuple[PanelSelection, ...]
    layout: Layout
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "png": self.png.name,
            **self.meta,
            "image_px": [self.layout.width, self.layout.height],
            "colors": {"kept": list(KEPT_RGB), "pivot": list(PIVOT_RGB), "dim": DIM},
            "panels": [
                {
                    "method": panel.method,
                    "budget": panel.budget,
                    "total": panel.total,
                    "grid": list(panel.grid),
                    "indices": list(panel.indices),
                    "order": list(panel.order),
                    "pivots": panel.pivots,
                    "coverage": panel.coverage.to_dict(),
                    "box": {**asdict(box), "width": box.width, "height": box.height},
                }
                for panel, box in zip(self.panels, self.layout.boxes, strict=True)
            ],
        }


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def visualize(options: VizOptions, loaded: tuple[Any, Any] | None = None) -> VizResult:
    """Resolve and load the model (or use `loaded` = (model, processor)), select, draw, write PNG + sidecar."""
    from .adapters import adapter_for, resolve_model

    out = Path(options.out)
    check_writable(out)
    image = load_image(options.image)
    if loaded is None:
        try:
            model_dir = resolve_model(options.model, options.cache_dir)
        except (ValueError, FileNotFoundError) as error:
            raise VizError(str(error)) from None
        check_model_fits(model_dir, options)
        loaded = adapter_for(model_dir).load(model_dir, DTYPES[options.dtype])
    view, panels = collect_selections(*loaded, image, options)
    caption = (f"{options.model} | image: {options.image} | prompt: {options.prompt!r} | pruning layer "
               f"K={options.layer}. Bright + green outline: kept (number = pick rank); magenta P: pivot; "
               "dimmed: discarded")
    layout = render(view, panels, out, caption)
    meta = {"model": options.model, "image": options.image, "prompt": options.prompt, "keep": options.keep.number,
            "layer": options.layer, "grid": list(view.grid), "patch_px": view.patch}
    result = VizResult(out, sidecar_path(out), tuple(panels), layout, meta)
    payload = json.dumps(result.to_dict(), indent=2).encode()
    _atomic_write(result.sidecar, lambda handle: handle.write(payload))
    return result


# ================================================================================================================
# CLI
# ================================================================================================================


def parse_methods(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruner-viz", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny-llava",
                        help="tiny-llava, tiny-llava-gqa, llava-1.5-7b, llava-1.5-13b, a hub id in the local cache, "
                             "or a local llava-hf directory")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where tiny models are built")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="the model's weights and activations while it selects (bf16 / fp16: half the memory "
                             "for a 7B checkpoint)")
    parser.add_argument("--image", default="astronaut",
                        help=f"an image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about the image")
    parser.add_argument("--keep", type=parse_keep, default=Keep(64),
                        help="token count (64) or fraction (0.12; 1.0 keeps every token)")
    parser.add_argument("--methods", type=parse_methods, default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, one panel each (registered: {', '.join(method_names())})")
    parser.add_argument("--layer", type=int, default=2,
                        help="K: prune between decoder layers K-1 and K (0 = before the LLM)")
    parser.add_argument("--out", type=Path, default=Path("viz.png"), help="the PNG to write (+ a .json sidecar)")
    add_verbose(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        options = VizOptions(model=args.model, image=args.image, prompt=args.prompt, keep=args.keep,
                             methods=args.methods, out=args.out, layer=args.layer, cache_dir=args.cache_dir,
                             dtype=args.dtype)
        result = visualize(options)
    except VizError as error:
        print(f"pruner-viz: error: {error}", file=sys.stderr)
        return 2
    for panel in result.panels:
        print(f"{panel.method:>12}: {panel.budget} of {panel.total} | {panel.coverage.summary()}")
    print(f"wrote {result.png} ({result.layout.width}x{result.layout.height} px) and {result.sidecar}")
    from .adapters import resolve_model
    from .adapters.hub import random_weights

    if random_weights(resolve_model(options.model, options.cache_dir)):
        print("note: random weights (a tiny test build): the maps show how each method selects, not what a trained "
              "model would keep")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
