"""`pruner-viz`: which image tokens each pruning method keeps, drawn on the image as the model sees it.

    pruner-viz --model tiny-llava --image astronaut --keep 64 \\
        --methods vlm_pruner,dart,divprune,fastv,visionzip,random --out viz.png
    pruner-viz --model tiny-qwen2-vl --image astronaut --keep 24 --methods vlm_pruner,dart,random --out viz.png

Every panel comes from the real model path, for any registered family (LLaVA-1.5, Qwen2-VL / Qwen2.5-VL): the
image goes through the family's preprocessing at its export resolution, the prompt through its prompt format, the
stock encoder and ``prefill_with_pruning``, and the panel shows that call's ``Selection`` (nothing is re-selected
here). The grid is the image-token grid the pruner selects over: LLaVA-1.5's 14-px patches, Qwen2-VL's merged
tokens (28 x 28 px each at the resized image). One PNG, one panel per method: kept tokens at full brightness with
an outline and their 1-based pick rank, discarded ones dimmed; pivots (the first ``pivots`` picks of methods that
pick pivots first) in their own colour, marked "P". Under each title: coverage figures (``pruner_core.coverage``).
A sidecar JSON beside it (``viz.png`` -> ``viz.json``) records, per panel, the kept indices, the pick order, the
coverage and where the panel sits in the PNG (so tests can read the pixels). Drawing: ``pruner_core.viz_render``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Keep, PrunerConfig, parse_keep
from .coverage import coverage
from .methods import get_method, method_names
from .viz_render import (  # noqa: F401  (the colours: re-exported, the sidecar and tests name them)
    DIM, KEPT_RGB, PIVOT_RGB, Layout, ModelView, PanelSelection, atomic_write, render,
)
from runtime.console import HelpFormatter, add_verbose, quiet_libraries, run_program
from runtime.preprocess import SAMPLE_IMAGES

DEFAULT_CACHE = Path.home() / ".cache" / "vlm-pruner-edge" / "models"
DEFAULT_METHODS = ("vlm_pruner", "dart", "divprune", "fastv", "visionzip", "random")
DEFAULT_PROMPT = "What is shown in this image?"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIVOT_METHODS = frozenset({"vlm_pruner", "dart"})  # methods whose `order` starts with `config.pivots` pivots


class VizError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ================================================================================================================
# Options and inputs
# ================================================================================================================


@dataclass(frozen=True)
class VizOptions:
    """What to draw: one panel per method, all at the same keep and pruning layer.

    methods: None draws ``DEFAULT_METHODS`` less those whose signal the model lacks (VisionZip's [CLS] attention on
    Qwen2-VL), with a note; methods named explicitly must all run. authors_grid: ``PrunerConfig.authors_grid``.
    """

    model: str = "tiny-llava"
    image: str = "astronaut"
    prompt: str = DEFAULT_PROMPT
    keep: Keep | int | float = 64  # stored as a Keep
    methods: tuple[str, ...] | None = None
    out: Path = Path("viz.png")
    layer: int = 2
    cache_dir: Path = DEFAULT_CACHE
    dtype: str = "fp32"
    authors_grid: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "keep", Keep.of(self.keep))
        except ValueError as error:
            raise VizError(str(error)) from None
        if self.methods is not None and not self.methods:
            raise VizError(f"no methods given; pass --methods with names from {method_names()}")
        for name in self.methods or ():
            try:
                get_method(name)
            except ValueError:
                raise VizError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None
        twice = sorted({name for name in self.methods or () if self.methods.count(name) > 1})
        if twice:
            raise VizError(f"method(s) {twice} listed more than once; list each method once")
        if self.dtype not in DTYPES:
            raise VizError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if Path(self.out).suffix.lower() != ".png":
            raise VizError(f"--out {self.out} must name a .png file (e.g. viz.png)")
        self.pruner_config(self.method_list[0])  # keep / layer out of range for any model: fail now

    @property
    def method_list(self) -> tuple[str, ...]:
        """The methods asked for, or the defaults."""
        return self.methods or DEFAULT_METHODS

    def pruner_config(self, method: str) -> PrunerConfig:
        try:
            return PrunerConfig(keep=self.keep, method=method, layer=self.layer, authors_grid=self.authors_grid)
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
    """keep, --layer and --authors-grid against the model's config at its export resolution (cheap: no weights)."""
    from transformers import AutoConfig

    from .adapters import adapter_for, check_split_layer
    from .primitives import placement_lattice

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config)
    geometry = adapter.geometry(config, adapter.default_image_size(model_dir))
    rows, cols = geometry.grid
    pruner = options.pruner_config(options.method_list[0])
    try:
        pruner.budget(rows * cols)
        check_split_layer(pruner, geometry.num_layers)
        placement_lattice(rows, cols, geometry.merge, pruner.authors_grid)
    except ValueError as error:
        raise VizError(f"{error} (model {options.model}: {rows}x{cols} = {rows * cols} image tokens)") from None


# ================================================================================================================
# The model path: one Selection per method
# ================================================================================================================


def model_view(image: Any, spec: Any, grid: tuple[int, int]) -> ModelView:
    """The RGB image the vision tower sees: ``image`` through the family's preprocessing ``spec``
    (``runtime.preprocess.ImagePreprocessing``: resize, crop) without rescaling or normalisation, cropped to the
    token grid (rows, cols). One token covers patch x patch pixels, patch = H // rows."""
    from runtime.preprocess import preprocess

    try:
        pixels = preprocess(image, replace(spec, input_layout="uint8_chw", patches=None))  # uint8 [3, H, W]
    except ValueError as error:
        raise VizError(str(error)) from None
    rows, cols = grid
    patch = min(pixels.shape[1] // rows, pixels.shape[2] // cols)
    view = pixels[:, : rows * patch, : cols * patch].transpose(1, 2, 0)  # [rows * patch, cols * patch, 3]
    return ModelView(pixels=np.ascontiguousarray(view), grid=grid, patch=patch)


def pixel_input(image: Any, spec: Any) -> torch.Tensor:
    """The vision encoder's pixel input for ``image`` (LLaVA [1, 3, H, W]; Qwen2-VL flattened patches [P, 1176]),
    computed by the runtime's preprocessing (bit for bit the processor's for every ordinary image, and bounded in
    memory for extreme aspect ratios, where the processor is not)."""
    from runtime.preprocess import preprocess

    try:
        return torch.from_numpy(preprocess(image, spec))
    except ValueError as error:
        raise VizError(str(error)) from None


def prompt_parts(adapter: Any, tokenizer: Any, question: str, image_token_id: int) -> tuple[list[int], list[int]]:
    """The family's prompt for ``question`` tokenized -> (ids before the image, ids after it)."""
    placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
    if placeholder in question:
        raise VizError(f"the prompt contains the image placeholder {placeholder!r}; the prompt format puts the image "
                       f"in by itself, so remove {placeholder!r} from --prompt")
    ids = list(tokenizer(adapter.prompt(question))["input_ids"])
    if ids.count(image_token_id) != 1:
        raise VizError(f"the tokenized prompt holds {ids.count(image_token_id)} image placeholders, not one; use the "
                       "model's own tokenizer")
    start = ids.index(image_token_id)
    return ids[:start], ids[start + 1 :]


def runnable_methods(adapter: Any, model: Any, pixel_values: torch.Tensor, options: VizOptions
                     ) -> tuple[list[str], torch.Tensor | None, list[str]]:
    """-> (methods to draw, the [CLS] attention [1, N] if one needs it, notes on default methods left out).

    VisionZip needs the vision tower's [CLS] attention, which Qwen2-VL's tower does not have: left out of the
    defaults with a note, a VizError when named in --methods."""
    needs_cls = [m for m in options.method_list if "cls_attention" in get_method(m).needs]
    if not needs_cls:
        return list(options.method_list), None, []
    try:
        return list(options.method_list), adapter.cls_attention(model, pixel_values), []
    except ValueError as error:
        if options.methods is not None:
            raise VizError(f"{', '.join(needs_cls)}: {error} (drop it from --methods)") from None
        kept = [m for m in options.method_list if m not in needs_cls]
        return kept, None, [f"{', '.join(needs_cls)} left out: {error}"]


def collect_selections(model: Any, processor: Any, image: Any, options: VizOptions
                       ) -> tuple[ModelView, list[PanelSelection], list[str]]:
    """Run the prompt through the model once per method -> (what the model sees, one PanelSelection per method,
    notes). The model's adapter supplies everything family-specific: geometry (grid, layers), preprocessing,
    prompt format, image encoder, M-RoPE or 1-D positions and the pruned prefill."""
    from .adapters import adapter_for, check_split_layer
    from .primitives import placement_lattice

    adapter = adapter_for(model)
    geometry = adapter.geometry(model)
    grid, n_image = geometry.grid, geometry.num_image_tokens
    try:
        first = options.pruner_config(options.method_list[0])
        check_split_layer(first, geometry.num_layers)
        placement_lattice(*grid, geometry.merge, first.authors_grid)
    except ValueError as error:
        raise VizError(str(error)) from None
    before, after = prompt_parts(adapter, processor.tokenizer, options.prompt, geometry.image_token_id)
    spec = adapter.image_preprocessing(processor)
    view = model_view(image, spec, grid)
    pixel_values = pixel_input(image, spec).to(model.dtype)
    selections = []
    with torch.no_grad():
        embed = model.get_input_embeddings()
        features = adapter.encode_image(model, pixel_values)  # [1, N, D]
        if features.shape[1] != n_image:
            raise VizError(f"the encoder returns {features.shape[1]} image tokens but the grid is "
                           f"{grid[0]}x{grid[1]}; use the model's own processor")
        embeds = torch.cat([embed(torch.tensor([before])), features.to(model.dtype), embed(torch.tensor([after]))], 1)
        positions = adapter.prompt_positions(len(before), grid, len(after))  # [1, T] or [3, 1, T]
        methods, cls, notes = runnable_methods(adapter, model, pixel_values, options)
        for method in methods:
            config = options.pruner_config(method)
            try:
                config.budget(n_image)
            except ValueError as error:
                raise VizError(str(error)) from None
            signal = cls if "cls_attention" in get_method(method).needs else None
            result = adapter.prefill_with_pruning(model, embeds, len(before), n_image, grid, config,
                                                  cls_attention=signal, position_ids=positions)
            selections.append(panel_selection(method, grid, result.selection, config))
    return view, selections, notes


def panel_selection(method: str, grid: tuple[int, int], selection: Any, config: PrunerConfig) -> PanelSelection:
    """A Selection (batch item 0) -> the plain lists a panel draws."""
    indices = tuple(int(i) for i in selection.indices[0])  # [R]
    order = tuple(int(i) for i in selection.order[0])  # [R]
    pivots = min(config.pivots, len(order)) if method in PIVOT_METHODS else 0
    return PanelSelection(method, grid, indices, order, pivots, coverage(indices, grid))



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
    view, panels, notes = collect_selections(*loaded, image, options)
    rows, cols = view.grid
    grid_note = " on the authors' unmerged grid" if options.authors_grid else ""
    caption = (f"{options.model} | image: {options.image} | prompt: {options.prompt!r} | pruning layer "
               f"K={options.layer}{grid_note} | {rows}x{cols} image tokens of {view.patch}x{view.patch} px. Bright + "
               "green outline: kept (number = pick rank); magenta P: pivot; dimmed: discarded")
    layout = render(view, panels, out, caption)
    meta = {"model": options.model, "image": options.image, "prompt": options.prompt, "keep": options.keep.number,
            "layer": options.layer, "authors_grid": options.authors_grid, "grid": list(view.grid),
            "patch_px": view.patch, "notes": notes}
    result = VizResult(out, sidecar_path(out), tuple(panels), layout, meta)
    payload = json.dumps(result.to_dict(), indent=2).encode()
    atomic_write(result.sidecar, lambda handle: handle.write(payload))
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
                        help="tiny-llava, tiny-llava-gqa, llava-1.5-7b, llava-1.5-13b, tiny-qwen2-vl, tiny-qwen2.5-vl, "
                             "qwen2-vl-2b/7b, qwen2.5-vl-3b/7b, a hub id in the local cache, or a local checkpoint "
                             "directory (drawn at the model's export resolution)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where tiny models are built")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="the model's weights and activations while it selects (bf16 / fp16: half the memory "
                             "for a 7B checkpoint)")
    parser.add_argument("--image", default="astronaut",
                        help=f"an image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about the image")
    parser.add_argument("--keep", type=parse_keep, default=Keep(64),
                        help="token count (64) or fraction (0.12; 1.0 keeps every token)")
    parser.add_argument("--methods", type=parse_methods, default=None,
                        help=f"comma-separated, one panel each (registered: {', '.join(method_names())}) (default: "
                             f"{','.join(DEFAULT_METHODS)}); of the defaults, those the model cannot run (visionzip on "
                             "Qwen2-VL, whose tower has no [CLS] token) are left out with a note")
    parser.add_argument("--prune-layer", "--layer", dest="layer", type=int, default=2,
                        help="K: prune between decoder layers K-1 and K (0 = before the LLM)")
    parser.add_argument("--authors-grid", action="store_true",
                        help="VLM-Pruner's spatial distance on the authors' Qwen2-VL grid (merged tokens placed on the "
                             "unmerged patch grid, as their code does) instead of the true merged grid; Qwen2-VL / "
                             "Qwen2.5-VL only")
    parser.add_argument("--out", type=Path, default=Path("viz.png"), help="the PNG to write (+ a .json sidecar)")
    add_verbose(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        options = VizOptions(model=args.model, image=args.image, prompt=args.prompt, keep=args.keep,
                             methods=args.methods, out=args.out, layer=args.layer, cache_dir=args.cache_dir,
                             dtype=args.dtype, authors_grid=args.authors_grid)
        result = visualize(options)
    except VizError as error:
        print(f"pruner-viz: error: {error}", file=sys.stderr)
        return 2
    for panel in result.panels:
        print(f"{panel.method:>12}: {panel.budget} of {panel.total} | {panel.coverage.summary()}")
    for note in result.meta.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {result.png} ({result.layout.width}x{result.layout.height} px) and {result.sidecar}")
    from .adapters import resolve_model
    from .adapters.hub import random_weights

    if random_weights(resolve_model(options.model, options.cache_dir)):
        print("note: random weights (a tiny test build): the maps show how each method selects, not what a trained "
              "model would keep")
    return 0


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
