"""The Android demo (android_demo/): what can be checked without an Android SDK.

* the names the Kotlin relies on (runner methods, metadata, stats keys, export_config.json paths) against ExecuTorch
  1.5.1's runner and a real tiny layer-0 export;
* no preprocessing constant hard-coded in the app;
* a Python port of ImagePreprocessor.kt, step for step, reproduces runtime.preprocess on real photos, and the
  golden file the Kotlin unit test reads is the runtime's current output;
* the Gradle versions: the executorch-android release of the pinned executorch, a compatible AGP/Kotlin/Gradle;
* export/android.py (prepare_android_folder / adb_push_commands);
* the Kotlin unit tests themselves, when Debian's kotlinc and junit4 are installed.

`python tests/test_android_demo.py --write-fixtures` rewrites the Kotlin tests' resources (app/src/test/resources):
preprocess_golden.json from runtime.preprocess and export_config_layer0.json from a fresh tiny-llava export.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import MAX_INTERMEDIATE_PIXELS, RESAMPLE_FILTERS, ImagePreprocessing, preprocess

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "android_demo"
APP = DEMO / "app"
KOTLIN_MAIN = APP / "src/main/java/dev/vlmpruner/edge/demo"
KOTLIN_TEST = APP / "src/test/java/dev/vlmpruner/edge/demo"
TEST_RESOURCES = APP / "src/test/resources"
GOLDEN = TEST_RESOURCES / "preprocess_golden.json"
CONFIG_FIXTURE = TEST_RESOURCES / "export_config_layer0.json"


def load_android_files():
    """export/android.py: what `pruner-export --android` uses to prepare the app's files."""
    spec = importlib.util.spec_from_file_location("android_files", DEMO.parent / "export" / "android.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


android_files = load_android_files()


# ================================================================================================================
# Reading the Kotlin
# ================================================================================================================


def kotlin_sources(root: Path = KOTLIN_MAIN) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(root.glob("*.kt"))}


def kotlin_object_constants(name: str) -> dict[str, str]:
    """`const val X = "..."` of `object <name> { ... }` in the app's main sources."""
    for text in kotlin_sources().values():
        start = re.search(rf"\bobject {name}\s*\{{", text)
        if not start:
            continue
        depth, end = 0, start.end() - 1
        for end in range(start.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        body = text[start.end() : end]
        return dict(re.findall(r'const val (\w+)\s*=\s*"([^"]*)"', body))
    raise AssertionError(f"object {name} not found in {KOTLIN_MAIN}")


def strip_comments_and_strings(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def json_path(root: dict, dotted: str):
    node = root
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no {part!r}"
        node = node[part]
    return node


# What ExecuTorch's LLM runner calls (pytorch/executorch extension/llm/runner/constants.h, v1.4.1 and main).
RUNNER_METHODS = {"vision_encoder", "token_embedding", "text_decoder"}
RUNNER_METADATA = {"get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids", "use_kv_cache",
                   "enable_dynamic_shape"}


def runner_library_bytes() -> bytes:
    """The compiled LLM runner of the installed executorch (the code LlmModule's JNI layer wraps)."""
    import executorch.extension.llm.runner as runner

    libraries = sorted(Path(runner.__file__).parent.glob("_llm_runner*.so"))
    if not libraries:
        pytest.skip("this executorch wheel has no compiled LLM runner (_llm_runner*.so)")
    return libraries[0].read_bytes()


def test_kotlin_runner_contract_names_are_the_executorch_runners():
    contract = kotlin_object_constants("RunnerContract")
    methods = {contract[k] for k in ("VISION_ENCODER", "TOKEN_EMBEDDING", "TEXT_DECODER")}
    assert methods == RUNNER_METHODS
    metadata_names = {v for k, v in contract.items() if k.startswith("GET_")}
    assert metadata_names and metadata_names <= RUNNER_METADATA
    library = runner_library_bytes()
    for name in sorted(RUNNER_METHODS | {"get_max_seq_len", "get_eos_ids"}):  # longer names are stored whole
        assert name.encode() in library, f"{name} is not in executorch {metadata.version('executorch')}'s runner"


def test_kotlin_stats_keys_are_what_the_runner_writes():
    keys = kotlin_object_constants("StatsKeys")
    assert keys
    library = runner_library_bytes()
    for key in keys.values():  # stats_to_json_string writes `"key":`
        assert f'"{key}":'.encode() in library, f"stats key {key} not written by executorch {metadata.version('executorch')}"


API_FIXTURE = TEST_RESOURCES / "executorch_android_api.json"


def executorch_android_api() -> dict[str, set[str]]:
    return {cls: set(names) for cls, names in json.loads(API_FIXTURE.read_text())["classes"].items()}


def kotlin_uses_of_executorch(text: str) -> dict[str, set[str]]:
    """Which members of ExecuTorch's Android classes the app's Kotlin touches: statics (`Tensor.fromBlob`),
    LlmModuleConfig builder steps, LlmCallback overrides, and calls on the app's `module` variables, which hold an
    LlmModule or a Module (reported as "module", checked against both)."""
    code = strip_comments_and_strings(text)
    uses: dict[str, set[str]] = {}
    for cls in ("LlmModule", "LlmModuleConfig", "Module", "Tensor", "EValue"):
        uses[cls] = set(re.findall(rf"(?<![\w.]){cls}\.(\w+)", code))
    for chain in re.findall(r"LlmModuleConfig\.create\(\)(.*?)\.build\(\)", code, flags=re.S):
        uses["LlmModuleConfig"] |= set(re.findall(r"\.(\w+)\s*\(", chain)) | {"create", "build"}
    uses["LlmCallback"] = set()
    for start in re.finditer(r"object\s*:\s*LlmCallback\s*\{", code):
        depth, end = 1, start.end()
        while depth:  # to the brace that closes the object
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            end += 1
        uses["LlmCallback"] |= set(re.findall(r"override fun (\w+)", code[start.end() : end]))
    uses["module"] = set(re.findall(r"\bmodule\.(\w+)\s*\(", code))
    uses["ExecutorchRuntimeException"] = set(re.findall(r"\berror\.(errorCode)\b", code))
    return {cls: names for cls, names in uses.items() if names}


def unknown_members(uses: dict[str, set[str]], api: dict[str, set[str]]) -> dict[str, set[str]]:
    known = dict(api, module=api["LlmModule"] | api["Module"])
    return {cls: names - known[cls] for cls, names in uses.items() if names - known[cls]}


def test_kotlin_calls_only_members_of_the_executorch_android_api():
    uses = kotlin_uses_of_executorch("\n".join(kotlin_sources().values()))
    for cls in ("LlmModuleConfig", "LlmCallback", "module", "Tensor", "ExecutorchRuntimeException"):
        assert uses.get(cls), f"found no use of {cls}: the scan of the Kotlin is broken"
    assert unknown_members(uses, executorch_android_api()) == {}, API_FIXTURE.name


def test_kotlin_api_scan_catches_a_misspelt_member():
    wrong = "val c = LlmModuleConfig.create().modulePath(p).tokenizerFile(t).build()\nmodule.prefillImage(x)\n" \
            "val t = Tensor.fromFloats(x)\n"
    wrong += "val cb = object : LlmCallback {\n  override fun onResult(r: String) { if (x) { y() } }\n" \
             "  override fun onToken(t: String) {}\n}\n"
    assert unknown_members(kotlin_uses_of_executorch(wrong), executorch_android_api()) == {
        "LlmModuleConfig": {"tokenizerFile"}, "module": {"prefillImage"}, "Tensor": {"fromFloats"},
        "LlmCallback": {"onToken"}}


def test_kotlin_config_paths_exist_in_the_fixture_export_config():
    config = json.loads(CONFIG_FIXTURE.read_text())
    for dotted in {**kotlin_object_constants("ConfigPaths"), **kotlin_object_constants("OptionalConfigPaths")}.values():
        json_path(config, dotted)
    keys = set(kotlin_object_constants("PreprocessingKeys").values())
    assert keys == set(ImagePreprocessing().to_dict()), "the app's image_preprocessing fields != runtime's"


def test_kotlin_device_folder_and_push_command_match_android_files():
    from export.cli import default_out

    locator = kotlin_object_constants("ModelLocator")
    assert locator["DEVICE_DIR"] == android_files.DEVICE_DIR
    folder = android_files.default_android_folder(default_out("llava-1.5-7b", 0.11, "executorch"))
    text = kotlin_sources()["ModelLocator.kt"]
    assert f"adb push {folder.as_posix()} $deviceDir/" in text


# ================================================================================================================
# (2) No preprocessing number written into the app by hand
# ================================================================================================================

FORBIDDEN_NUMBERS = ("336", "224", "14", "576", "24")  # sizes, patch, token count, grid of LLaVA / CLIP
FORBIDDEN_TEXT = ("0.48145466", "0.26862954", "0.4578275", "0.40821073", "0.26130258", "0.27577711")


@pytest.mark.parametrize("name", sorted(kotlin_sources()))
def test_no_hard_coded_preprocessing_constants(name):
    text = kotlin_sources()[name]
    for constant in FORBIDDEN_TEXT:
        assert constant not in text, f"{name} hard-codes CLIP's {constant}; read it from image_preprocessing"
    code = strip_comments_and_strings(text)
    numbers = "|".join(FORBIDDEN_NUMBERS)
    found = re.findall(rf"(?<![\w.])({numbers})(?:[fFlL])?(?![\w])(?!\.\d)", code)
    assert not found, f"{name} has numeric literals {found}: they must come from export_config.json"


# ================================================================================================================
# (3) ImagePreprocessor.kt, step for step in numpy, against runtime.preprocess
# ================================================================================================================

PRECISION_BITS = 32 - 8 - 2
SUPPORT = {"box": 0.5, "bilinear": 1.0, "hamming": 1.0, "bicubic": 2.0, "lanczos": 3.0}
FILTER_NAMES = {v: k for k, v in RESAMPLE_FILTERS.items()}


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    t = x * math.pi
    return math.sin(t) / t


def kt_weight(name: str, x: float) -> float:
    """Resampler.Coefficients.weight."""
    a = abs(x)
    if name == "box":
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    if name == "bilinear":
        return 1.0 - a if a < 1.0 else 0.0
    if name == "hamming":
        if a == 0.0:
            return 1.0
        if a >= 1.0:
            return 0.0
        t = a * math.pi
        return math.sin(t) / t * (float(np.float32(0.54)) + float(np.float32(0.46)) * math.cos(t))
    if name == "bicubic":
        if a < 1.0:
            return ((-0.5 + 2.0) * a - (-0.5 + 3.0)) * a * a + 1
        if a < 2.0:
            return (((a - 5) * a + 8) * a - 4) * -0.5
        return 0.0
    if name == "lanczos":
        return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0
    raise ValueError(name)


def kt_coefficients(in_size: int, out_size: int, name: str):
    """Resampler.Coefficients.of: bounds [(xmin, count)] and a dense fixed-point matrix [in_size, out_size]."""
    scale = in_size / out_size
    filter_scale = 1.0 if scale < 1.0 else scale
    support = SUPPORT[name] * filter_scale
    ss = 1.0 / filter_scale
    bounds, matrix = [], np.zeros((in_size, out_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [kt_weight(name, (x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in weights:
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        for x, w in enumerate(weights):
            matrix[xmin + x, xx] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
        bounds.append((xmin, xmax))
    return bounds, matrix


def kt_clip8(sums: np.ndarray) -> np.ndarray:
    return np.clip(sums >> PRECISION_BITS, 0, 255).astype(np.uint8)


def kt_resize(rgb: np.ndarray, out_w: int, out_h: int, name: str) -> np.ndarray:
    """Resampler.resize on an (H, W, 3) uint8 array."""
    h, w = rgb.shape[:2]
    if (out_w, out_h) == (w, h):
        return rgb.copy()
    if name == "nearest":
        def coords(size_in, size_out):
            scale, out = size_in / size_out, []
            pos = scale * 0.5
            for _ in range(size_out):
                out.append(min(0 if pos < 0 else int(pos), size_in - 1))
                pos += scale
            return out
        return rgb[np.ix_(coords(h, out_h), coords(w, out_w))]
    half = 1 << (PRECISION_BITS - 1)
    _, horizontal = kt_coefficients(w, out_w, name)
    vertical_bounds, vertical = kt_coefficients(h, out_h, name)
    first = vertical_bounds[0][0]
    last = vertical_bounds[-1][0] + vertical_bounds[-1][1]
    # Integer sums in float64 BLAS: every product and sum stays far below 2**53, so they are exact.
    window = rgb[first:last].astype(np.float64)
    if out_w != w:
        sums = (window.transpose(0, 2, 1) @ horizontal.astype(np.float64)).transpose(0, 2, 1)  # (rows, out_w, 3)
        window = kt_clip8(half + sums.astype(np.int64)).astype(np.float64)
    if out_h != h:
        rows, width = window.shape[:2]
        sums = vertical[first:last].astype(np.float64).T @ window.reshape(rows, width * 3)  # (out_h, out_w * 3)
        window = kt_clip8(half + sums.astype(np.int64)).reshape(out_h, width, 3).astype(np.float64)
    return window.astype(np.uint8)


def kt_over_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """OpaqueRows.overWhite."""
    value, alpha = value.astype(np.int64), alpha.astype(np.int64)
    blend = 255 * (255 - alpha)
    coef1 = alpha * 255 * 255 * 128 // (alpha * 255 + blend)
    coef2 = 255 * 128 - coef1
    tmp = value * coef1 + 255 * coef2 + (0x80 << 7)
    mixed = (((tmp >> 8) + tmp) >> 8) >> 7
    return np.where(alpha == 255, value, np.where(alpha == 0, 255, mixed)).astype(np.uint8)


def kt_bounded_source(rgb: np.ndarray, spec: dict, max_pixels: int) -> np.ndarray:
    """ImagePreprocessor.boundedSource on an (H, W, 3) array."""
    height, width = rgb.shape[:2]
    if spec["do_pad_to_square"]:
        side = max(width, height)
        if side * side <= max_pixels:
            return rgb
        longest = math.isqrt(max_pixels)
        size = (longest, max(1, height * longest // width)) if width >= height else \
            (max(1, width * longest // height), longest)
        return kt_resize(rgb, size[0], size[1], FILTER_NAMES[spec["resample"]])
    edge = spec["shortest_edge"]
    if not spec["do_resize"] or edge is None:
        return rgb
    short, long = min(width, height), max(width, height)
    if math.floor(float(edge * long) / short) * edge <= max_pixels:
        return rgb
    assert spec["do_center_crop"], "refused"
    crop = spec["crop_height"] if width <= height else spec["crop_width"]
    halves = {"nearest": 0, "lanczos": 6, "bilinear": 2, "bicubic": 4, "box": 1, "hamming": 2}[
        FILTER_NAMES[spec["resample"]]]
    reach = (halves * max(short, edge) + 2 * edge - 1) // (2 * edge) + 1
    keep = min(long, (2 * crop * short + edge - 1) // edge + 2 * reach)
    keep += (long - keep) % 2
    start = (long - keep) // 2
    return rgb[start : start + keep] if width <= height else rgb[:, start : start + keep]


def kt_preprocess(argb: np.ndarray, spec: dict, max_pixels: int = MAX_INTERMEDIATE_PIXELS) -> np.ndarray:
    """ImagePreprocessor.run on (H, W) uint32 ARGB pixels -> CHW float32 (float_nchw) or uint8 (uint8_chw)."""
    alpha = (argb >> 24) & 0xFF
    rgb = np.stack([kt_over_white((argb >> shift) & 0xFF, alpha) for shift in (16, 8, 0)], axis=-1)
    rgb = kt_bounded_source(rgb, spec, max_pixels)
    if spec["do_pad_to_square"]:
        h, w = rgb.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = spec["pad_color"]
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = rgb
        rgb = canvas
    if spec["do_resize"]:
        h, w = rgb.shape[:2]
        if spec["height"] is not None:
            out_h, out_w = spec["height"], spec["width"]
        elif w <= h:
            out_h, out_w = int(spec["shortest_edge"] * h / w), spec["shortest_edge"]
        else:
            out_h, out_w = spec["shortest_edge"], int(spec["shortest_edge"] * w / h)
        rgb = kt_resize(rgb, out_w, out_h, FILTER_NAMES[spec["resample"]])
    if spec["do_center_crop"]:
        ch, cw = spec["crop_height"], spec["crop_width"]
        h, w = rgb.shape[:2]
        top, left = (h - ch) // 2, (w - cw) // 2  # floor division, as Math.floorDiv
        out = np.zeros((ch, cw, 3), dtype=np.uint8)
        for i in range(ch):
            y = top + i
            if 0 <= y < h:
                for j in range(cw):
                    if 0 <= left + j < w:
                        out[i, j] = rgb[y, left + j]
        rgb = out
    planes = rgb.transpose(2, 0, 1)
    if spec["input_layout"] == "uint8_chw":
        return planes.copy()
    mean = np.asarray(spec["image_mean"], dtype=np.float64).astype(np.float32)
    std = np.asarray(spec["image_std"], dtype=np.float64).astype(np.float32)
    table = np.empty((3, 256), dtype=np.float32)
    for c in range(3):
        for p in range(256):
            v = np.float32(p * spec["rescale_factor"]) if spec["do_rescale"] else np.float32(p)
            if spec["do_normalize"]:
                v = np.float32(np.float32(v - mean[c]) / std[c])
            table[c, p] = v
    return np.stack([table[c][planes[c]] for c in range(3)])


def argb_of(image: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) uint8 -> (H, W) uint32 ARGB."""
    image = image.astype(np.uint32)
    alpha = image[..., 3] if image.shape[-1] == 4 else np.full(image.shape[:2], 255, dtype=np.uint32)
    return (alpha << 24) | (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]


def runtime_output(image, spec: ImagePreprocessing, max_pixels: int = MAX_INTERMEDIATE_PIXELS) -> np.ndarray:
    out = preprocess(image, spec, max_pixels)
    return out[0] if spec.input_layout == "float_nchw" else out


LLAVA = ImagePreprocessing()  # runtime's defaults are LLaVA-1.5's processor (the exporter writes the same)
SPECS = {
    "llava": LLAVA,
    "pad_uint8": ImagePreprocessing(do_pad_to_square=True, pad_color=(122, 116, 104), input_layout="uint8_chw"),
    "bilinear_exact": ImagePreprocessing(shortest_edge=None, height=200, width=150, resample=2, do_center_crop=False),
    "lanczos_small_crop": ImagePreprocessing(shortest_edge=96, resample=1, crop_height=112, crop_width=80),
    "box_no_rescale": ImagePreprocessing(shortest_edge=64, resample=4, crop_height=64, crop_width=64, do_rescale=False),
    "hamming_upscale": ImagePreprocessing(shortest_edge=640, resample=5, crop_height=320, crop_width=320),
    "nearest": ImagePreprocessing(shortest_edge=128, resample=0, crop_height=128, crop_width=128),
}


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    rgba = np.dstack([data.chelsea(), np.tile(np.linspace(0, 255, 451).astype(np.uint8), (300, 1))])
    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "chelsea_rgba": rgba}


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "chelsea_rgba"])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_python_port_of_image_preprocessor_matches_runtime(photo, spec_name):
    image = photos()[photo]
    spec = SPECS[spec_name]
    reference = runtime_output(Image.fromarray(image), spec)
    ported = kt_preprocess(argb_of(image), spec.to_dict())
    assert ported.shape == reference.shape and ported.dtype == reference.dtype
    np.testing.assert_allclose(ported.astype(np.float64), reference.astype(np.float64), rtol=0, atol=1e-5)
    assert np.array_equal(ported, reference), "not bit-exact"


# ---- golden file for the Kotlin unit test ------------------------------------------------------------------------


def golden_cases() -> list[dict]:
    """Small synthetic images through runtime.preprocess (the reference), for ImagePreprocessorTest.kt."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:31, 0:45]
    smooth = np.stack([xx * 5, yy * 8, (xx + yy) * 3], axis=-1) % 256
    rgb = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    rgba = np.dstack([rng.integers(0, 256, (40, 23, 3)), rng.integers(0, 256, (40, 23))]).astype(np.uint8)
    rgba[:5, :, 3] = 0
    rgba[5:10, :, 3] = 255
    wide = rng.integers(0, 256, (12, 30, 3)).astype(np.uint8)
    tiny = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    tall_thin = rng.integers(0, 256, (200, 3, 3)).astype(np.uint8)
    wide_thin = rng.integers(0, 256, (2, 230, 3)).astype(np.uint8)
    line = rng.integers(0, 256, (1, 60, 3)).astype(np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cases = [
        ("bicubic_crop_float", rgb, ImagePreprocessing(shortest_edge=20, crop_height=16, crop_width=16,
                                                       image_mean=mean, image_std=std)),
        ("rgba_pad_bilinear_uint8", rgba, ImagePreprocessing(do_pad_to_square=True, pad_color=(122, 116, 104),
                                                             shortest_edge=None, height=18, width=18, resample=2,
                                                             do_center_crop=False, input_layout="uint8_chw")),
        ("lanczos_crop_larger_than_image", wide, ImagePreprocessing(shortest_edge=10, resample=1, crop_height=12,
                                                                   crop_width=20, do_rescale=False)),
        ("nearest_upscale", tiny, ImagePreprocessing(shortest_edge=11, resample=0, do_center_crop=False)),
        ("box_upscale", tiny, ImagePreprocessing(shortest_edge=9, resample=4, crop_height=8, crop_width=8)),
        ("hamming_exact_size", rgb, ImagePreprocessing(shortest_edge=None, height=13, width=29, resample=5,
                                                      do_center_crop=False, do_normalize=False)),
        ("bicubic_no_resize", tiny, ImagePreprocessing(do_resize=False, shortest_edge=None, crop_height=4,
                                                      crop_width=6)),
        # extreme aspect ratios, with a small max_pixels so that the bounded path runs at toy size
        ("thin_tall_bicubic_bounded", tall_thin, ImagePreprocessing(shortest_edge=8, crop_height=8, crop_width=8), 1000),
        ("thin_wide_bilinear_bounded", wide_thin, ImagePreprocessing(shortest_edge=6, resample=2, crop_height=6,
                                                                    crop_width=5, input_layout="uint8_chw"), 300),
        ("thin_pad_lanczos_bounded", line, ImagePreprocessing(do_pad_to_square=True, pad_color=(9, 99, 199),
                                                             shortest_edge=10, resample=1, crop_height=10,
                                                             crop_width=10), 400),
    ]
    out = []
    for name, pixels, spec, *limit in cases:
        max_pixels = limit[0] if limit else MAX_INTERMEDIATE_PIXELS
        result = runtime_output(Image.fromarray(pixels), spec, max_pixels)
        out.append({
            "name": name,
            "width": int(pixels.shape[1]),
            "height": int(pixels.shape[0]),
            "max_pixels": max_pixels,
            "argb": [int(v) - (1 << 32) if v >= 1 << 31 else int(v) for v in argb_of(pixels).ravel()],  # Kotlin Int
            "image_preprocessing": spec.to_dict(),
            "out_width": int(result.shape[-1]),
            "out_height": int(result.shape[-2]),
            "expected": [float(v) if result.dtype == np.float32 else int(v) for v in result.ravel()],
        })
    return out


def golden_text() -> str:
    return json.dumps({"generated_by": "python tests/test_android_demo.py --write-fixtures",
                       "cases": golden_cases()}, separators=(",", ":")) + "\n"


def test_kotlin_intermediate_limit_is_the_runtimes():
    text = kotlin_sources()["ImagePreprocessor.kt"]
    shift = re.search(r"const val MAX_INTERMEDIATE_PIXELS = 1L shl (\d+)", text)
    assert shift and 1 << int(shift.group(1)) == MAX_INTERMEDIATE_PIXELS


def test_golden_fixture_is_runtime_output():
    assert GOLDEN.read_text() == golden_text(), "stale: python tests/test_android_demo.py --write-fixtures"


def test_python_port_reproduces_the_golden_cases():
    for case in json.loads(GOLDEN.read_text())["cases"]:
        argb = np.asarray(case["argb"], dtype=np.int64).astype(np.uint32).reshape(case["height"], case["width"])
        ported = kt_preprocess(argb, case["image_preprocessing"], case["max_pixels"])
        assert ported.ravel().tolist() == case["expected"], case["name"]


# ================================================================================================================
# (4) Gradle versions
# ================================================================================================================

# Checked by hand from the published tables (sources in gradle/libs.versions.toml):
#  AGP -> minimum Gradle, maximum compileSdk (AGP release notes);
AGP_MIN_GRADLE = {"8.9": "8.11.1", "8.10": "8.11.1", "8.11": "8.13"}
AGP_MAX_API = {"8.9": 35, "8.10": 36, "8.11": 36}
#  KGP -> fully supported (Gradle min, max), (AGP min, max) (kotlinlang.org "Configure a Gradle project");
KGP_SUPPORT = {
    ("2.2.0", "2.2.10"): (("7.6.3", "8.14"), ("7.3.1", "8.10.0")),
    ("2.2.20", "2.2.21"): (("7.6.3", "8.14"), ("7.3.1", "8.11.1")),
}
#  Kotlin -> earliest AGP whose D8/R8 reads its class files (developer.android.com "Kotlin support");
KOTLIN_MIN_AGP = {"2.0": "8.5", "2.1": "8.6", "2.2": "8.10"}
#  the combination chosen, also what the test expects to find.
VERIFIED = {"agp": "8.10.0", "kotlin": "2.2.0", "gradle": "8.11.1", "executorch": "1.5.1"}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def gradle_catalog() -> dict:
    return tomllib.loads((DEMO / "gradle/libs.versions.toml").read_text())


def test_executorch_android_is_the_pinned_executorch_release():
    """The AAR version is the pip wheel's: ExecuTorch's android-release-on-tag workflow publishes
    org.pytorch:executorch-android:<tag without v> to Maven Central for every vX.Y.Z tag."""
    catalog = gradle_catalog()
    pinned = metadata.version("executorch").split("+")[0]
    assert catalog["versions"]["executorch"] == pinned == VERIFIED["executorch"]
    library = catalog["libraries"]["executorch-android"]
    assert (library["group"], library["name"]) == ("org.pytorch", "executorch-android")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"executorch=={pinned}" in pyproject["project"]["dependencies"]


def test_agp_kotlin_gradle_are_a_published_compatible_combination():
    versions = gradle_catalog()["versions"]
    agp, kotlin = versions["agp"], versions["kotlin"]
    wrapper = (DEMO / "gradle/wrapper/gradle-wrapper.properties").read_text()
    gradle = re.search(r"gradle-([\d.]+)-bin\.zip", wrapper).group(1)
    assert {"agp": agp, "kotlin": kotlin, "gradle": gradle, "executorch": versions["executorch"]} == VERIFIED

    agp_minor = ".".join(agp.split(".")[:2])
    assert version_tuple(gradle) >= version_tuple(AGP_MIN_GRADLE[agp_minor])
    (kgp_range, (gradle_span, agp_span)), = [
        (span, support) for span, support in KGP_SUPPORT.items()
        if version_tuple(span[0]) <= version_tuple(kotlin) <= version_tuple(span[1])
    ]
    assert version_tuple(gradle_span[0]) <= version_tuple(gradle) <= version_tuple(gradle_span[1])
    assert version_tuple(agp_span[0]) <= version_tuple(agp) <= version_tuple(agp_span[1])
    assert version_tuple(agp) >= version_tuple(KOTLIN_MIN_AGP[".".join(kotlin.split(".")[:2])])

    build = (APP / "build.gradle.kts").read_text()
    compile_sdk = int(re.search(r"compileSdk = (\d+)", build).group(1))
    assert compile_sdk <= AGP_MAX_API[agp_minor]
    assert int(re.search(r"minSdk = (\d+)", build).group(1)) == 28
    assert "JavaVersion.VERSION_17" in build and "JvmTarget.JVM_17" in build  # AGP 8.x runs on JDK 17


def test_compose_compiler_is_the_kotlin_plugin_of_the_same_version():
    catalog = gradle_catalog()
    plugin = catalog["plugins"]["kotlin-compose"]
    assert plugin["id"] == "org.jetbrains.kotlin.plugin.compose" and plugin["version"]["ref"] == "kotlin"
    assert catalog["plugins"]["kotlin-android"]["version"]["ref"] == "kotlin"
    build = (APP / "build.gradle.kts").read_text()
    assert "compose = true" in build and "libs.plugins.kotlin.compose" in build
    assert "libs.executorch.android" in build


# ================================================================================================================
# (5) android_files.py
# ================================================================================================================


def fake_export(directory: Path, **changes) -> Path:
    config = json.loads(CONFIG_FIXTURE.read_text())
    for key, value in changes.items():
        config[key] = value
    directory.mkdir(parents=True)
    (directory / "export_config.json").write_text(json.dumps(config))
    (directory / "model.pte").write_bytes(b"PTE" * 10)
    for name in config["tokenizer"]["files"]:
        (directory / name).write_text("{}")
    return directory


def test_prepare_android_folder_copies_exactly_what_the_app_needs(tmp_path):
    export = fake_export(tmp_path / "exported/tiny-keep0.25-executorch")
    out = android_files.default_android_folder(export)
    names = android_files.prepare_android_folder(export, out)
    assert names == ["model.pte", "tokenizer.json", "export_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert (out / "model.pte").read_bytes() == (export / "model.pte").read_bytes()
    assert not list(out.parent.glob(".*partial"))
    with pytest.raises(FileExistsError):
        android_files.prepare_android_folder(export, out)
    assert android_files.prepare_android_folder(export, out, overwrite=True) == names
    assert "keeps 144 of 576" in android_files.summary(out)


@pytest.mark.parametrize(
    "changes, fix",
    [
        ({"placement": "in_llm", "pruner": {"layer": 2}}, "--prune-layer 0"),
        ({"target": "onnx"}, "--target executorch"),
    ],
)
def test_prepare_android_folder_refuses_exports_the_app_cannot_run(tmp_path, changes, fix):
    export = fake_export(tmp_path / "export", **changes)
    with pytest.raises(ValueError, match=re.escape(fix)):
        android_files.prepare_android_folder(export, tmp_path / "android")
    assert not (tmp_path / "android").exists()


def test_prepare_android_folder_reports_missing_files(tmp_path):
    export = fake_export(tmp_path / "export")
    (export / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        android_files.prepare_android_folder(export, tmp_path / "android")
    with pytest.raises(ValueError, match="must differ"):
        android_files.prepare_android_folder(export, export)
    with pytest.raises(FileNotFoundError, match="pruner-export"):
        android_files.prepare_android_folder(tmp_path / "nowhere", tmp_path / "android")


def test_adb_push_commands(tmp_path):
    export = fake_export(tmp_path / "my model")
    out = tmp_path / "my model-android"
    android_files.prepare_android_folder(export, out)
    commands = android_files.adb_push_commands(out)
    target = "/data/local/tmp/vlm_pruner/my model-android"
    assert commands[0] == f"adb shell mkdir -p '{target}'"
    assert commands[-1] == "adb shell chmod -R a+rX /data/local/tmp/vlm_pruner"
    pushes = commands[1:-1]
    assert len(pushes) == 3 and all(c.startswith("adb push ") for c in pushes)
    assert f"'{out / 'model.pte'}' '{target}/model.pte'" in pushes[1]
    assert android_files.adb_push_commands(out, "/sdcard/x/")[0] == "adb shell mkdir -p '/sdcard/x/my model-android'"
    with pytest.raises(FileNotFoundError):
        android_files.adb_push_commands(tmp_path)


# ================================================================================================================
# A real layer-0 ExecuTorch export of tiny-llava (slow: ~1 min of tracing and lowering)
# ================================================================================================================


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    exporter = pytest.importorskip("export.executorch_export", reason="the ExecuTorch exporter is not in this tree yet")
    from export.common import ExportOptions
    from pruner_core import PrunerConfig
    from pruner_core.adapters import resolve_model

    root = tmp_path_factory.mktemp("android")
    model_dir = resolve_model("tiny-llava", root / "cache")
    out = root / "tiny-keep0.25-executorch"
    out.mkdir()
    options = ExportOptions(model="tiny-llava", target="executorch", pruner=PrunerConfig(keep=0.25, layer=0))
    config = exporter.export_executorch(model_dir, out, options, model_id="tiny-llava")
    return out, config


@pytest.mark.slow
def test_exported_program_has_the_methods_the_app_relies_on(tiny_export):
    from executorch.runtime import Runtime

    out, config = tiny_export
    program = Runtime.get().load_program(out / config["executorch"]["program"])
    names = set(program.method_names)
    assert set(config["methods"]) <= names
    contract = kotlin_object_constants("RunnerContract")
    assert {v for k, v in contract.items() if k in ("VISION_ENCODER", "TOKEN_EMBEDDING", "TEXT_DECODER")} <= names
    assert {v for k, v in contract.items() if k.startswith("GET_")} <= names


@pytest.mark.slow
def test_app_config_paths_exist_in_a_real_export(tiny_export):
    out, _ = tiny_export
    config = json.loads((out / "export_config.json").read_text())
    for dotted in {**kotlin_object_constants("ConfigPaths"), **kotlin_object_constants("OptionalConfigPaths")}.values():
        json_path(config, dotted)
    assert set(kotlin_object_constants("PreprocessingKeys").values()) == set(config["image_preprocessing"])
    fixture = json.loads(CONFIG_FIXTURE.read_text())  # what the Kotlin unit tests parse: still what exports hold
    assert set(fixture) <= set(config), f"refresh {CONFIG_FIXTURE.name}: exports no longer write {set(fixture) - set(config)}"
    assert set(fixture["tokenizer"]) <= set(config["tokenizer"]) and set(fixture["executorch"]) <= set(config["executorch"])


@pytest.mark.slow
def test_app_call_sequence_runs_in_the_executorch_runner(tiny_export):
    """What VlmSession.generate does, through ExecuTorch's Python binding of the same C++ runner: text before the
    image, the image preprocessed by the app's steps, then generate the text after it; stats carry StatsKeys."""
    import torch
    from skimage import data

    from executorch.extension.llm.runner import (
        GenerationConfig, MultimodalRunner, make_image_input, make_text_input,
    )

    out, config = tiny_export
    tokenizer = json.loads((out / config["tokenizer"]["runner_file"]).read_text())
    image_token = next(t["content"] for t in tokenizer["added_tokens"] if t["id"] == config["tokenizer"]["image_token_id"])
    before, after = config["tokenizer"]["prompt_format"].split(image_token)
    pixels = kt_preprocess(argb_of(data.astronaut()), config["image_preprocessing"])
    assert np.array_equal(pixels, runtime_output(Image.fromarray(data.astronaut()),
                                                 ImagePreprocessing.from_dict(config["image_preprocessing"])))
    runner = MultimodalRunner(str(out / config["executorch"]["program"]), str(out / config["tokenizer"]["runner_file"]))
    runner.prefill([make_text_input(before), make_image_input(torch.from_numpy(pixels[None]))])
    pieces, stats = [], []
    runner.generate([make_text_input(after.format(prompt="What is in the picture?"))],
                    GenerationConfig(echo=False, seq_len=config["max_seq_len"], temperature=0.0, max_new_tokens=4),
                    token_callback=pieces.append, stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
    assert pieces and stats
    assert set(kotlin_object_constants("StatsKeys").values()) <= set(stats[0])
    assert stats[0]["prompt_tokens"] > config["kept_image_tokens"]


@pytest.mark.slow
def test_prepare_android_folder_on_a_real_export(tiny_export, tmp_path):
    out, config = tiny_export
    names = android_files.prepare_android_folder(out, tmp_path / "android")
    assert names == [config["executorch"]["program"], config["tokenizer"]["runner_file"], "export_config.json"]
    assert len(android_files.adb_push_commands(tmp_path / "android")) == len(names) + 2


# ================================================================================================================
# The Kotlin unit tests, with Debian's Kotlin compiler when it is installed (apt-get install kotlin junit4
# libandroid-json-java). The Android-only files (UI, LlmModule calls) are left out; Gradle runs everything.
# ================================================================================================================

PURE_KOTLIN = ["ExportConfig.kt", "ImagePreprocessor.kt", "PromptFormat.kt", "RunStats.kt", "ModelLocator.kt"]
JARS = {"junit": "/usr/share/java/junit4.jar", "hamcrest": "/usr/share/java/hamcrest-core.jar",
        "json": "/usr/share/java/com.android.json.jar"}


@pytest.mark.slow
def test_kotlin_unit_tests_pass(tmp_path):
    kotlinc = shutil.which("kotlinc")
    missing = [path for path in JARS.values() if not Path(path).is_file()]
    if kotlinc is None or missing:
        pytest.skip("needs Debian's kotlin, junit4 and libandroid-json-java (apt-get install kotlin junit4 "
                    f"libandroid-json-java); missing: {'kotlinc' if kotlinc is None else missing}")
    classes = tmp_path / "classes"
    shutil.copytree(TEST_RESOURCES, classes)
    classpath = ":".join(JARS.values())
    sources = [str(KOTLIN_MAIN / name) for name in PURE_KOTLIN] + [str(p) for p in sorted(KOTLIN_TEST.glob("*.kt"))]
    compiled = subprocess.run([kotlinc, *sources, "-cp", classpath, "-d", str(classes)], capture_output=True,
                              text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    stdlib = next(Path(kotlinc).resolve().parents[1].glob("share/java/kotlin-stdlib.jar"), None) or Path(
        "/usr/share/java/kotlin-stdlib.jar")
    test_classes = [f"dev.vlmpruner.edge.demo.{p.stem}" for p in sorted(KOTLIN_TEST.glob("*Test.kt"))]
    ran = subprocess.run(["java", "-cp", f"{classes}:{classpath}:{stdlib}", "org.junit.runner.JUnitCore", *test_classes],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-4000:]
    assert re.search(r"OK \(\d+ tests\)", ran.stdout)


def write_config_fixture() -> None:
    """Export tiny-llava at layer 0 (keep 0.25) and keep its export_config.json for the Kotlin unit tests."""
    import tempfile

    from export.common import ExportOptions
    from export.executorch_export import export_executorch
    from pruner_core import PrunerConfig
    from pruner_core.adapters import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        options = ExportOptions(model="tiny-llava", target="executorch", pruner=PrunerConfig(keep=0.25, layer=0))
        config = export_executorch(resolve_model("tiny-llava", Path(tmp) / "cache"), out, options, model_id="tiny-llava")
    config["library_versions"] = {"executorch": config["library_versions"]["executorch"]}  # machine-specific
    CONFIG_FIXTURE.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-fixtures"]:
        GOLDEN.write_text(golden_text())
        write_config_fixture()
        print(f"wrote {GOLDEN.relative_to(REPO)} and {CONFIG_FIXTURE.relative_to(REPO)}")
    else:
        print(__doc__)
