"""runtime.preprocess against transformers' CLIP / LLaVA image processors on real photographs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from skimage import data

from cases import write_bomb_png
from runtime.preprocess import ImagePreprocessing, center_crop, load_image, preprocess


def _photos() -> dict[str, np.ndarray]:
    coffee = data.coffee()
    return {
        "astronaut": data.astronaut(),  # 512 x 512
        "chelsea": data.chelsea(),  # 300 x 451, landscape
        "coffee": coffee,  # 400 x 600
        "small_37x100": np.ascontiguousarray(coffee[100:137, 200:300]),  # upscaled ~9x, odd sides
        "portrait_101x57": np.ascontiguousarray(data.astronaut()[:101, 200:257]),
        "panorama_12x500": np.ascontiguousarray(coffee[200:212, 50:550]),  # 42:1, still under the limit
    }


PHOTOS = _photos()


def _hf_processors() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

    def make(cls, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)

    clip, llava = transformers.CLIPImageProcessor, transformers.LlavaImageProcessor
    return {
        "clip336": make(clip, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),  # LLaVA-1.5
        "clip224": make(clip),  # CLIP ViT-B/16 and L/14 defaults
        # odd crop excess on both axes, bilinear
        "clip230_crop223x225": make(
            clip, size={"shortest_edge": 230}, crop_size={"height": 223, "width": 225}, resample=2
        ),
        # exact resize smaller than the crop in height (odd zero padding), larger in width
        "exact199x300_crop224": make(clip, size={"height": 199, "width": 300}, crop_size={"height": 224, "width": 224}),
        "llava_pad336": make(llava, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True),
    }


@pytest.fixture(scope="module")
def hf_processors() -> dict[str, object]:
    return _hf_processors()


def _reference(processor: object, image: object) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"]  # type: ignore[operator]


@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize(
    "processor_name", ["clip336", "clip224", "clip230_crop223x225", "exact199x300_crop224", "llava_pad336"]
)
def test_preprocess_equals_transformers(hf_processors, processor_name: str, photo: str) -> None:
    processor = hf_processors[processor_name]
    spec = ImagePreprocessing.from_hf_processor(processor)
    expected = _reference(processor, PHOTOS[photo])
    actual = preprocess(PHOTOS[photo], spec)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) < 1e-5
    assert np.array_equal(actual, expected)  # bit-exact in practice
    assert actual.shape[2:] == spec.output_hw(*PHOTOS[photo].shape[:2])


def test_llava_defaults_are_llava_15(hf_processors) -> None:
    spec = ImagePreprocessing.from_hf_processor(hf_processors["clip336"])
    assert spec == ImagePreprocessing()
    padded = ImagePreprocessing.from_hf_processor(hf_processors["llava_pad336"])
    assert padded.do_pad_to_square and padded.pad_color == (122, 116, 104)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P_transparency"])
def test_colour_modes_match_transformers(hf_processors, mode: str) -> None:
    rgb = PHOTOS["chelsea"]
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "LA":
        image = Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA")
    elif mode == "L":
        image = Image.fromarray(rgb[..., 1], "L")
    else:
        image = Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 7
    processor = hf_processors["clip224"]
    spec = ImagePreprocessing.from_hf_processor(processor)
    assert np.array_equal(preprocess(image, spec), _reference(processor, image))
    assert load_image(image).mode == "RGB"


def test_uint8_layout_is_the_resized_cropped_image(hf_processors) -> None:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = transformers.CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_rescale=False, do_normalize=False
        )
    spec = ImagePreprocessing.from_hf_processor(hf_processors["clip336"], input_layout="uint8_chw")
    for photo in ("chelsea", "small_37x100"):
        actual = preprocess(PHOTOS[photo], spec)
        expected = _reference(raw, PHOTOS[photo])[0]
        assert actual.dtype == np.uint8 and actual.shape == (3, 336, 336)
        assert np.array_equal(actual, expected)


def test_path_pil_and_array_inputs_agree(tmp_path) -> None:
    spec = ImagePreprocessing()
    photo = PHOTOS["coffee"]
    path = tmp_path / "coffee.png"
    Image.fromarray(photo).save(path)
    from_array = preprocess(photo, spec)
    assert np.array_equal(preprocess(path, spec), from_array)
    assert np.array_equal(preprocess(str(path), spec), from_array)
    assert np.array_equal(preprocess(Image.fromarray(photo), spec), from_array)
    assert np.array_equal(np.asarray(load_image(path)), photo)


def test_exif_orientation_is_applied_to_files(tmp_path) -> None:
    photo = PHOTOS["small_37x100"]
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    assert load_image(path).size == (photo.shape[0], photo.shape[1])  # (W, H) swapped: upright


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    spec = ImagePreprocessing()
    text = tmp_path / "notes.txt"
    text.write_text("not pixels")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(PHOTOS["chelsea"]).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    bomb = write_bomb_png(tmp_path / "bomb.png")
    cases = [
        (text, f"cannot read image file {text}: not an image"),
        (tmp_path / "missing.png", "missing.png: it does not exist"),
        (tmp_path, "it is a directory"),
        (truncated, f"cannot read image file {truncated}: "),
        (bomb, f"cannot read image file {bomb}: its header declares more pixels"),
        (np.zeros((8, 8), np.uint8), "got shape (8, 8)"),
        (np.zeros((8, 8, 4), np.uint8), "got shape (8, 8, 4)"),
        (np.zeros((3, 8, 8), np.uint8), "got shape (3, 8, 8)"),
        (np.zeros((8, 8, 3), np.float32), "got dtype float32"),
        (np.zeros((0, 8, 3), np.uint8), "got shape (0, 8, 3)"),
        ([[0, 0, 0]], "cannot use a list"),
        (42, "cannot use a int"),
    ]
    for image, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            preprocess(image, spec)


def test_dict_round_trip_and_validation() -> None:
    spec = ImagePreprocessing(
        shortest_edge=None, height=300, width=200, resample=2, crop_height=223, crop_width=225,
        do_pad_to_square=True, pad_color=(1, 2, 3), input_layout="uint8_chw",
    )
    data_dict = spec.to_dict()
    assert data_dict["version"] == 1
    assert ImagePreprocessing.from_dict(json.loads(json.dumps(data_dict))) == spec
    assert ImagePreprocessing.from_dict(ImagePreprocessing().to_dict()) == ImagePreprocessing()

    missing = dict(data_dict)
    del missing["crop_width"]
    with pytest.raises(ValueError, match=r"missing fields \['crop_width'\]"):
        ImagePreprocessing.from_dict(missing)
    with pytest.raises(ValueError, match=r"unknown fields \['longest_edge'\]"):
        ImagePreprocessing.from_dict({**data_dict, "longest_edge": 5})
    with pytest.raises(ValueError, match="newer"):
        ImagePreprocessing.from_dict({**data_dict, "version": 99})
    with pytest.raises(ValueError, match="JSON object"):
        ImagePreprocessing.from_dict([1, 2])  # type: ignore[arg-type]

    bad_fields = [
        ({"height": 300, "width": 200}, "not both"),
        ({"shortest_edge": None}, "needs shortest_edge"),
        ({"shortest_edge": None, "height": 3}, "both height and width"),
        ({"crop_height": None}, "needs crop_height"),
        ({"resample": 7}, "PIL filter"),
        ({"image_std": (0.1, 0.0, 0.2)}, "> 0"),
        ({"image_mean": (0.1, 0.2)}, "3 finite numbers"),
        ({"pad_color": (0, 0, 256)}, "0..255"),
        ({"rescale_factor": 0}, "rescale_factor"),
        ({"do_resize": 1}, "true or false"),
        ({"shortest_edge": 0}, "positive int"),
        ({"input_layout": "nhwc"}, "input_layout"),
    ]
    for changes, message in bad_fields:
        with pytest.raises(ValueError, match=message):
            ImagePreprocessing(**changes)


def test_from_hf_processor_refuses_what_it_cannot_reproduce() -> None:
    base = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3)
    with pytest.raises(ValueError, match="not supported"):
        ImagePreprocessing.from_hf_processor(
            SimpleNamespace(**{**base, "size": {"shortest_edge": 336, "longest_edge": 500}})
        )
    with pytest.raises(ValueError, match="do_pad"):
        ImagePreprocessing.from_hf_processor(SimpleNamespace(**base, do_pad=True))
    with pytest.raises(ValueError, match="resampling filter"):
        ImagePreprocessing.from_hf_processor(SimpleNamespace(**{**base, "resample": "sinc"}))
    torchvision_style = SimpleNamespace(**{**base, "resample": SimpleNamespace(value="bicubic")})
    assert ImagePreprocessing.from_hf_processor(torchvision_style).resample == 3


def test_center_crop_padding_arithmetic() -> None:
    pixels = np.arange(1, 5 * 4 + 1, dtype=np.uint8).reshape(5, 4, 1)
    out = center_crop(pixels, 8, 3)  # 3 rows short: 2 zero rows above (ceil(3 / 2)), 1 below; 1 column over
    assert out.shape == (8, 3, 1)
    assert np.array_equal(out[:2], np.zeros((2, 3, 1), np.uint8)) and not out[-1].any()
    assert np.array_equal(out[2:7, :, 0], pixels[:, 0:3, 0])  # left = (4 - 3) // 2 = 0: the last column goes


def test_importing_runtime_stays_light() -> None:
    heavy = ("torch", "executorch", "onnxruntime", "transformers")
    code = f"import sys, runtime; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- extreme aspect ratios ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(20000, 1), (1, 20000), (3, 70000)])
def test_thin_image_is_processed_in_bounded_memory(tmp_path, height, width) -> None:
    """A few-KB file whose resized intermediate would be gigabytes (336 x 6.7 M px for 1 x 20000) is processed with
    a bounded peak: the peak RSS the call adds is measured in a fresh process."""
    rng = np.random.default_rng(height + width)
    path = tmp_path / "thin.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size < 1_000_000
    script = (
        "import resource, sys\n"
        "from runtime.preprocess import ImagePreprocessing, preprocess, load_image\n"
        "image = load_image(sys.argv[1])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = preprocess(image, ImagePreprocessing())\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(out.shape, (after - before) * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shape, added = done.stdout.rsplit(" ", 1)
    assert shape == "(1, 3, 336, 336)"
    assert int(added) < 64 * 2**20, f"preprocessing a {width} x {height} image added {int(added) / 2**20:.0f} MiB"


def test_thin_image_keeps_the_middle_of_the_image() -> None:
    """The bounded path is the ordinary pipeline on the middle strip of the image (wide enough for the crop and the
    filter's reach, exactly centred), and close to the unbounded result on a real photograph's strip."""
    from runtime.preprocess import bounded_source

    spec = ImagePreprocessing()
    rng = np.random.default_rng(0)
    thin = Image.fromarray(rng.integers(0, 256, (2, 40000, 3), dtype=np.uint8))
    kept = 4 + 2 * 3  # ceil(2 * 336 * 2 / 336) + 2 * (ceil(bicubic 2 px * 336 / 336) + 1)
    assert bounded_source(thin, spec).size == (kept, 2)
    middle = thin.crop(((40000 - kept) // 2, 0, (40000 + kept) // 2, 2))
    assert np.array_equal(preprocess(thin, spec), preprocess(middle, spec))
    assert bounded_source(thin, spec, max_pixels=336 * 6_720_000).size == thin.size  # under the limit: untouched
    with pytest.raises(ValueError, match="less extreme aspect ratio"):
        preprocess(thin, ImagePreprocessing(do_center_crop=False, crop_height=None, crop_width=None))
    assert preprocess(thin, ImagePreprocessing(do_pad_to_square=True)).shape == (1, 3, 336, 336)

    strip = Image.fromarray(np.ascontiguousarray(data.coffee()[200:204]))  # 4 x 600 px of a photograph
    as_is = preprocess(strip, ImagePreprocessing(input_layout="uint8_chw"))  # 336 x 50400 intermediate
    bounded = preprocess(strip, ImagePreprocessing(input_layout="uint8_chw"), max_pixels=1_000_000)
    assert int(np.abs(as_is.astype(int) - bounded).max()) <= 4


def test_sample_names_mean_the_same_in_the_api_and_every_cli(tmp_path, monkeypatch):
    """pruner-run / pruner-bench (runtime.cli.resolve_image), pruner-viz, pruner-eval and Session.generate
    (load_image) share one rule: an existing file of that name wins, otherwise the name is the bundled photograph."""
    from skimage import data

    from pruner_core.viz import load_image as load_source_image
    from runtime.cli import resolve_image
    from runtime.eval_questions import resolve_image as eval_image
    from runtime.preprocess import SAMPLE_IMAGES, load_image

    monkeypatch.chdir(tmp_path)
    for name in SAMPLE_IMAGES:
        expected = np.asarray(getattr(data, name)())
        assert np.array_equal(np.asarray(load_image(name)), expected)
        assert np.array_equal(np.asarray(load_image(resolve_image(name))), expected)
        assert np.array_equal(np.asarray(load_source_image(name)), expected)
        assert eval_image(name, tmp_path) == f"skimage:{name}"
    Image.new("RGB", (5, 4), (9, 9, 9)).save(tmp_path / "coffee", format="PNG")  # a file named like a sample
    assert load_image("coffee").size == (5, 4)
    assert load_image(resolve_image("coffee")).size == (5, 4)
    assert load_source_image("coffee").size == (5, 4)
    assert eval_image("coffee", tmp_path) == str((tmp_path / "coffee").resolve())
    with pytest.raises(ValueError, match="does not exist"):
        load_image("astronat")
