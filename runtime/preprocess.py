"""Image preprocessing at run time: a JSON-serialisable description of a CLIP-style image processor, and the
numpy + PIL code that applies it without transformers.

``ImagePreprocessing`` is the ``"image_preprocessing"`` object of an export folder's ``export_config.json``. The
exporter fills it from the model's Hugging Face processor with ``ImagePreprocessing.from_hf_processor``; the runtime
turns an image into the vision encoder's input with ``preprocess(image, spec)``.

``preprocess`` reproduces transformers' PIL backend (``CLIPImageProcessorPil``, which ``CLIPImageProcessor(...)``
instantiates when torchvision is absent, and ``LlavaImageProcessorPil`` for pad-to-square) bit for bit:

1. RGB: alpha composited onto white, other modes converted (``image_transforms.convert_to_rgb``);
2. optional pad to a square of the longest edge, image centred, ``pad_color`` around it (LLaVA's ``do_pad``);
3. resize with PIL (``shortest_edge``: the short side becomes n, the long side ``int(n * long / short)``,
   truncated; or an explicit height x width);
4. centre crop, zero-padding where the image is smaller than the crop;
5. rescale in float64, cast to float32; normalise ``(x - mean) / std`` in float32;
6. layout: ``float_nchw`` float32 [1, 3, H, W] or ``uint8_chw`` uint8 [3, H, W] (steps 5 skipped: graphs that
   normalise inside, like ExecuTorch's LLaVA).

The torchvision ("fast") backend resizes with a different kernel and differs from this by up to a few grey levels.

Extreme aspect ratios (``MAX_INTERMEDIATE_PIXELS``): a 1 x 20000 px file is a few KB, but resizing its short side to
336 px makes a 336 x 6,720,000 px intermediate (6.7 GB) of which the centre crop keeps 336 x 336. Where the resized
image (or the padded square) would hold more than ``max_pixels`` pixels, ``preprocess`` first reduces the image in
source pixels, so the work stays bounded, and then runs the steps above:

* resize to ``shortest_edge`` + centre crop: the image is centre-cropped along its long side to
  ``ceil(2 * crop * short / shortest_edge)`` source pixels (``crop`` = the crop size along that side: twice what the
  centre crop keeps) plus the resampling filter's reach on both sides, ``ceil(support * max(short, shortest_edge)
  / shortest_edge) + 1`` pixels each, one more if needed so that the strip is exactly centred; window at
  (long - kept) / 2;
* pad to square: the image is first resized (``resample``) to a longest edge of ``isqrt(max_pixels)``, the short
  edge ``max(1, short * that // long)``;
* resize to ``shortest_edge`` without a crop: refused (the output itself would be that large).

Images under the limit are processed exactly as transformers does: every ordinary photo, and 100:1 strips with
a shortest-edge resize; with pad-to-square, images whose longest edge is at most 8192 px. A reduced image differs
from what transformers would compute (if it had the memory) by the resampling phase: the resized long side is
rounded from a shorter strip (a grey level or a few on natural images).
``android_demo``'s ImagePreprocessor.kt applies the same rule.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SCHEMA_VERSION = 1
OPTIONAL_FIELDS = ("patches",)  # fields an export_config.json may leave out (their default applies)

INPUT_LAYOUTS = ("float_nchw", "uint8_chw", "flat_patches")

# PIL.Image.Resampling ids (transformers' PILImageResampling is the same enum).
RESAMPLE_FILTERS: dict[str, int] = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

# The largest intermediate image (resized, or padded to a square) preprocess builds: 2^26 px, 192 MiB as RGB.
MAX_INTERMEDIATE_PIXELS = 1 << 26
# Each PIL filter's support (reach) in half input pixels at scale 1 (Pillow's Resample.c), by filter id.
FILTER_SUPPORT_HALVES = {0: 0, 1: 6, 2: 2, 3: 4, 4: 1, 5: 2}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the vision encoder's input; the defaults are LLaVA-1.5's processor (336 px CLIP).

    Resize target: ``shortest_edge`` (aspect kept) or ``height`` + ``width`` (exact), never both.
    """

    do_convert_rgb: bool = True
    do_pad_to_square: bool = False
    pad_color: tuple[int, int, int] = (0, 0, 0)  # RGB 0-255 around a padded image; LLaVA uses int(mean * 255)
    do_resize: bool = True
    shortest_edge: int | None = 336
    height: int | None = None
    width: int | None = None
    resample: int = RESAMPLE_FILTERS["bicubic"]
    do_center_crop: bool = True
    crop_height: int | None = 336
    crop_width: int | None = 336
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    input_layout: str = "float_nchw"
    # flat_patches only (Qwen2-VL): (patch_size, temporal_patch_size, merge_size); omitted from JSON when None
    patches: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("do_convert_rgb", "do_pad_to_square", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImagePreprocessing.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("shortest_edge", "height", "width", "crop_height", "crop_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ImagePreprocessing.{name} must be a positive int or null, got {value!r}")
        self._check_resize()
        if self.do_center_crop and (self.crop_height is None or self.crop_width is None):
            raise ValueError(
                "ImagePreprocessing: do_center_crop needs crop_height and crop_width "
                f"(got {self.crop_height!r} x {self.crop_width!r})"
            )
        if self.resample not in RESAMPLE_FILTERS.values() or isinstance(self.resample, bool):
            raise ValueError(
                f"ImagePreprocessing.resample must be a PIL filter id {RESAMPLE_FILTERS}, got {self.resample!r}"
            )
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"ImagePreprocessing.rescale_factor must be a finite number > 0, got {factor!r}")
        object.__setattr__(self, "rescale_factor", float(factor))
        object.__setattr__(self, "image_mean", _three_numbers("image_mean", self.image_mean, positive=False))
        object.__setattr__(self, "image_std", _three_numbers("image_std", self.image_std, positive=True))
        object.__setattr__(self, "pad_color", _pad_color(self.pad_color))
        if self.input_layout not in INPUT_LAYOUTS:
            raise ValueError(
                f"ImagePreprocessing.input_layout must be one of {INPUT_LAYOUTS}, got {self.input_layout!r}"
            )
        self._check_patches()

    def _check_patches(self) -> None:
        if (self.input_layout == "flat_patches") != (self.patches is not None):
            raise ValueError("ImagePreprocessing: input_layout 'flat_patches' goes with patches = [patch_size, "
                             "temporal_patch_size, merge_size], and only it "
                             f"(got {self.input_layout!r}, {self.patches!r})")
        if self.patches is None:
            return
        values = tuple(self.patches) if isinstance(self.patches, (list, tuple)) else ()
        if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"ImagePreprocessing.patches must be three positive ints, got {self.patches!r}")
        object.__setattr__(self, "patches", values)
        factor = values[0] * values[2]
        if self.height is None or self.do_center_crop or self.height % factor or self.width % factor:
            raise ValueError(f"ImagePreprocessing: flat_patches needs an exact height x width resize to multiples of "
                             f"{factor} and no crop (got {self.height!r} x {self.width!r})")

    def _check_resize(self) -> None:
        if (self.height is None) != (self.width is None):
            raise ValueError(
                f"ImagePreprocessing: give both height and width or neither, got {self.height!r} x {self.width!r}"
            )
        if self.shortest_edge is not None and self.height is not None:
            raise ValueError(
                "ImagePreprocessing: give either shortest_edge (aspect kept) or height + width (exact), not both"
            )
        if self.do_resize and self.shortest_edge is None and self.height is None:
            raise ValueError("ImagePreprocessing: do_resize needs shortest_edge or height + width")

    # ---- sizes ------------------------------------------------------------------------------------
    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step for an input of ``height`` x ``width`` (after any padding)."""
        if not self.do_resize:
            return height, width
        if self.height is not None and self.width is not None:
            return self.height, self.width
        n = self.shortest_edge
        assert n is not None  # guaranteed by __post_init__
        if width <= height:  # portrait or square: width is the short side
            return int(n * height / width), n
        return n, int(n * width / height)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the array ``preprocess`` returns for an input image of ``height`` x ``width``."""
        if self.do_pad_to_square:
            height = width = max(height, width)
        if self.do_center_crop:
            assert self.crop_height is not None and self.crop_width is not None
            return self.crop_height, self.crop_width
        return self.resized_hw(height, width)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: every field, tuples as lists, plus ``"version"``."""
        data = asdict(self)
        for name in ("pad_color", "image_mean", "image_std"):
            data[name] = list(data[name])
        if self.patches is None:
            del data["patches"]  # optional: exports without it (CLIP layouts) keep their fields
        else:
            data["patches"] = list(self.patches)
        return {"version": SCHEMA_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImagePreprocessing":
        """Inverse of ``to_dict``; every field is required, unknown ones are refused."""
        if not isinstance(data, dict):
            raise ValueError(f"image_preprocessing must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(
                f"image_preprocessing version {version!r} is newer than this runtime understands ({SCHEMA_VERSION}); "
                "upgrade vlm-pruner-edge"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"image_preprocessing has unknown fields {unknown}; known fields: {known}")
        missing = [name for name in known if name not in data and name not in OPTIONAL_FIELDS]
        if missing:
            raise ValueError(f"image_preprocessing is missing fields {missing}; re-export, or add them")
        for name in ("pad_color", "image_mean", "image_std"):
            if isinstance(data[name], list):
                data[name] = tuple(data[name])
        return cls(**data)

    @classmethod
    def from_hf_processor(cls, image_processor: Any, input_layout: str = "float_nchw") -> "ImagePreprocessing":
        """Read a transformers CLIP-style image processor (``CLIPImageProcessor``, ``LlavaImageProcessor``, either
        backend) into a spec. Raises ValueError on settings ``preprocess`` cannot reproduce."""
        p = image_processor
        size = _size_dict(getattr(p, "size", None), default_to_square=bool(getattr(p, "default_to_square", True)))
        resize = _resize_fields(size) if size else {"shortest_edge": None, "height": None, "width": None}
        crop = _size_dict(getattr(p, "crop_size", None), default_to_square=True)
        if crop and set(crop) != {"height", "width"}:
            raise ValueError(f"crop_size must have height and width, got {crop}")
        do_pad = bool(getattr(p, "do_pad", False))
        if do_pad and "llava" not in type(p).__name__.lower():
            raise ValueError(
                f"{type(p).__name__}.do_pad pads a batch to a common size, which a single-image runtime does not "
                "reproduce; set do_pad=False"
            )
        mean = _as_triple(getattr(p, "image_mean", None), OPENAI_CLIP_MEAN)
        std = _as_triple(getattr(p, "image_std", None), OPENAI_CLIP_STD)
        return cls(
            do_convert_rgb=bool(getattr(p, "do_convert_rgb", True)),
            do_pad_to_square=do_pad,
            pad_color=tuple(int(m * 255) for m in mean) if do_pad else (0, 0, 0),  # LLaVA's background colour
            do_resize=bool(getattr(p, "do_resize", True)),
            resample=_resample_id(getattr(p, "resample", None)),
            do_center_crop=bool(getattr(p, "do_center_crop", False)),
            crop_height=crop.get("height") if crop else None,
            crop_width=crop.get("width") if crop else None,
            do_rescale=bool(getattr(p, "do_rescale", True)),
            rescale_factor=float(getattr(p, "rescale_factor", 1.0 / 255.0)),
            do_normalize=bool(getattr(p, "do_normalize", True)),
            image_mean=mean,
            image_std=std,
            input_layout=input_layout,
            **resize,
        )


# ---- field helpers ---------------------------------------------------------------------------------
def _three_numbers(name: str, value: Any, positive: bool) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(v) for v in value if not isinstance(v, bool))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or len(numbers) != len(value) or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"ImagePreprocessing.{name} must be 3 finite numbers (R, G, B), got {value!r}")
    if positive and min(numbers) <= 0:
        raise ValueError(f"ImagePreprocessing.{name} must be > 0 (it divides), got {value!r}")
    return numbers  # type: ignore[return-value]


def _pad_color(value: Any) -> tuple[int, int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 3
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    if not ok:
        raise ValueError(f"ImagePreprocessing.pad_color must be 3 ints in 0..255 (R, G, B), got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def _size_dict(size: Any, default_to_square: bool) -> dict[str, int]:
    """A transformers size (SizeDict, dict, int, (h, w)) as a plain dict of its set keys."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    try:
        items = dict(size)  # SizeDict iterates (key, value) pairs of its non-None entries
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot read image size {size!r}") from error
    return {k: int(v) for k, v in items.items() if v is not None}


def _resize_fields(size: dict[str, int]) -> dict[str, int | None]:
    if set(size) == {"shortest_edge"}:
        return {"shortest_edge": size["shortest_edge"], "height": None, "width": None}
    if set(size) == {"height", "width"}:
        return {"shortest_edge": None, "height": size["height"], "width": size["width"]}
    raise ValueError(
        f"image size {size} is not supported: use {{'shortest_edge': n}} or {{'height': h, 'width': w}} "
        "(longest_edge / max_height / pixel budgets are other processors)"
    )


def _as_triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # type: ignore[return-value]
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _resample_id(resample: Any) -> int:
    """A PIL filter id from an int, a PIL / transformers resampling enum or a torchvision InterpolationMode."""
    if resample is None:
        return RESAMPLE_FILTERS["bilinear"]  # transformers' default when unset
    if isinstance(resample, int):
        return int(resample)
    name = str(getattr(resample, "value", resample)).lower().rsplit(".", 1)[-1]
    if name in RESAMPLE_FILTERS:
        return RESAMPLE_FILTERS[name]
    raise ValueError(f"unknown resampling filter {resample!r}; use one of {sorted(RESAMPLE_FILTERS)}")


# ---- input -------------------------------------------------------------------------------------------
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee")  # scikit-image's bundled photographs (skimage.data)


def sample_image(name: str) -> np.ndarray:
    """A bundled photograph by name -> H x W x 3 uint8 (scikit-image's ``skimage.data.<name>()``).

    The one rule every entry point follows (pruner-run, pruner-bench, pruner-viz, pruner-eval, ``Session.generate``):
    an existing file of that name wins; otherwise these names are the samples. Raises ValueError for other names
    and when scikit-image is not installed.
    """
    if name not in SAMPLE_IMAGES:
        raise ValueError(f"{name!r} is not a bundled photograph; use one of {', '.join(SAMPLE_IMAGES)} or a file path")
    try:
        from skimage import data
    except ImportError:
        raise ValueError(f"{name!r} is a scikit-image sample, but scikit-image is not installed; "
                         "`pip install scikit-image` or pass the path of an image file") from None
    return getattr(data, name)()


def load_image(image: Any) -> Image.Image:
    """An RGB PIL image from a path (str / Path), a sample name (``SAMPLE_IMAGES``, where no such file exists), a
    PIL image, or an H x W x 3 uint8 array.

    Transparency is composited onto white and other modes (L, P, CMYK, I;16, ...) converted to RGB, as transformers'
    processor does. Files are turned upright by their EXIF orientation (transformers' ``load_image`` does the same);
    a PIL image or array is taken as given.
    """
    if isinstance(image, str) and image in SAMPLE_IMAGES and not Path(image).exists():
        return Image.fromarray(sample_image(image), mode="RGB")
    if isinstance(image, (str, Path)):
        return _to_rgb(open_image_file(Path(image)))
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"expected an HxWx3 uint8 array (RGB, channels last), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"expected an HxWx3 uint8 array, got dtype {image.dtype}; convert 0-1 floats with "
                "(x * 255).round().astype(np.uint8)"
            )
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise ValueError(
        f"cannot use a {type(image).__name__} as an image; pass a file path, a PIL.Image or an HxWx3 uint8 numpy array"
    )


def open_image_file(path: str | Path) -> Image.Image:
    """Decode an image file (upright by its EXIF orientation) -> a PIL image, detached from the file.

    The one decoder of image files for the runtime, pruner-viz and pruner-eval: every failure (missing file, a
    directory, an unknown format, a truncated or corrupt file, a header declaring more pixels than Pillow's
    decompression-bomb limit) raises ``ValueError("cannot read image file <path>: <reason>")``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"cannot read image file {path}: it does not exist")
    if path.is_dir():
        raise ValueError(f"cannot read image file {path}: it is a directory; pass an image file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it (89-179 MP): refuse there too, before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()  # decode now, so a truncated file fails here rather than later
                return ImageOps.exif_transpose(opened)  # a new image: upright, detached from the file
    except UnidentifiedImageError:
        raise ValueError(
            f"cannot read image file {path}: not an image Pillow can identify (PNG, JPEG, WebP, ... expected)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"cannot read image file {path}: its header declares more pixels than Pillow decodes safely ({error}); "
            "resize the image, or check that the file is not corrupt"
        ) from None
    except (OSError, SyntaxError, ValueError, MemoryError) as error:
        raise ValueError(f"cannot read image file {path}: {str(error) or type(error).__name__}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# ---- pipeline ----------------------------------------------------------------------------------------
def pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square of its longest edge filled with ``color`` (offset floored)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Centre ``crop_height`` x ``crop_width`` window of an H x W x C array, zero-padded where the image is smaller.

    The window starts at floor((H - h) / 2); padding puts ceil((h - H) / 2) rows above the image, so an odd
    excess goes to the top / left of the crop and an odd shortfall pads one more row below / right.
    """
    height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width:
        return pixels[top : top + crop_height, left : left + crop_width]
    pad_top, pad_left = max(0, -top), max(0, -left)  # == ceil(shortfall / 2), as floor division went negative
    canvas = np.zeros((max(height, crop_height), max(width, crop_width)) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[top : top + crop_height, left : left + crop_width]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bounded_source(rgb: Image.Image, spec: ImagePreprocessing, max_pixels: int = MAX_INTERMEDIATE_PIXELS):
    """The image, reduced in source pixels where the steps after it would build more than ``max_pixels`` pixels
    (see the module docstring); the image itself otherwise. Raises ValueError where no reduction keeps the output."""
    width, height = rgb.size
    if spec.do_pad_to_square:
        side = max(width, height)
        if side * side <= max_pixels:
            return rgb
        longest = math.isqrt(max_pixels)
        size = (longest, max(1, height * longest // width)) if width >= height else \
            (max(1, width * longest // height), longest)
        return rgb.resize(size, resample=spec.resample, reducing_gap=None)
    if not spec.do_resize or spec.shortest_edge is None:
        return rgb  # an exact height x width resize, or none: no intermediate beyond the image and the output
    resized_h, resized_w = spec.resized_hw(height, width)
    if resized_h * resized_w <= max_pixels:
        return rgb
    if not spec.do_center_crop:
        raise ValueError(
            f"a {width} x {height} px image resized to a shortest edge of {spec.shortest_edge} px would be "
            f"{resized_w} x {resized_h} px, more than this runtime builds ({max_pixels} px); crop it to a "
            "less extreme aspect ratio first"
        )
    assert spec.crop_height is not None and spec.crop_width is not None
    n = spec.shortest_edge
    short, long = min(width, height), max(width, height)
    crop = spec.crop_height if width <= height else spec.crop_width
    reach = ceil_div(FILTER_SUPPORT_HALVES[spec.resample] * max(short, n), 2 * n) + 1  # source px per side
    keep = min(long, ceil_div(2 * crop * short, n) + 2 * reach)
    keep += (long - keep) % 2  # centred exactly: the strip's middle is the image's middle
    start = (long - keep) // 2
    return rgb.crop((0, start, width, start + keep) if width <= height else (start, 0, start + keep, height))


def flat_patches(chw: np.ndarray, patch: int, temporal: int, merge: int) -> np.ndarray:
    """Qwen2-VL's pixel layout: chw [C, H, W] float32 -> [(H / p) * (W / p), C * temporal * p * p], patches ordered
    by 2x2 merge unit (merge-row, merge-col, row in unit, col in unit), each flattened as (C, frame, y, x) with the
    still image repeated over the ``temporal`` frames. Source: transformers' image_processing_pil_qwen2_vl.py
    ``patchify`` (the layout; pure data movement, so equal bit for bit)."""
    channels, height, width = chw.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = chw.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(frames.reshape(grid_h * grid_w, channels * temporal * patch * patch))


def preprocess(image: Any, spec: ImagePreprocessing, max_pixels: int = MAX_INTERMEDIATE_PIXELS) -> np.ndarray:
    """The vision encoder's input for one image: float32 [1, 3, H, W] (``float_nchw``), uint8 [3, H, W]
    (``uint8_chw``) or float32 [P, 3 * t * p * p] (``flat_patches``, Qwen2-VL); identical to transformers' image
    processor (PIL backend: CLIP's, or Qwen2-VL's at an on-grid size) for the same settings.

    ``max_pixels``: the largest intermediate image built; larger ones are reduced first (module docstring).
    Raises ValueError for an unreadable image (naming the file and the reason)."""
    rgb = bounded_source(load_image(image), spec, max_pixels)
    if spec.do_pad_to_square:
        rgb = pad_to_square(rgb, spec.pad_color)
    if spec.do_resize:
        height, width = spec.resized_hw(rgb.height, rgb.width)
        rgb = rgb.resize((width, height), resample=spec.resample, reducing_gap=None)
    pixels = np.asarray(rgb)  # (H, W, 3) uint8
    if spec.do_center_crop:
        assert spec.crop_height is not None and spec.crop_width is not None
        pixels = center_crop(pixels, spec.crop_height, spec.crop_width)
    if spec.input_layout == "uint8_chw":
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, H, W)
    values = pixels
    if spec.do_rescale:
        values = (values.astype(np.float64) * spec.rescale_factor).astype(np.float32)  # transformers' order
    values = values.astype(np.float32, copy=False)
    if spec.do_normalize:
        mean = np.asarray(spec.image_mean, dtype=np.float32)
        std = np.asarray(spec.image_std, dtype=np.float32)
        values = (values - mean) / std
    if spec.patches is not None:
        return flat_patches(values.transpose(2, 0, 1), *spec.patches)  # (P, 3 * t * p * p)
    return np.ascontiguousarray(values.transpose(2, 0, 1)[None])  # (1, 3, H, W)
