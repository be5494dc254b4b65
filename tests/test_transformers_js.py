"""transformers.js runs the layer-0 ONNX export as exported, and both stock LlavaProcessors put in the prompt exactly
the image placeholders the vision encoder fills.

The Node side (tests/js/llava_generate.mjs) loads the folder with `LlavaForConditionalGeneration.from_pretrained` /
`AutoProcessor.from_pretrained` (local files only) and decodes greedily with `generate`; it also runs the vision
encoder in onnxruntime-web's WebAssembly backend, what a browser uses. transformers.js is pinned
in tests/js/package.json + package-lock.json and installed once with `npm ci --ignore-scripts` into
tests/js/node_modules (git-ignored, kept between runs like .venv; reinstalled only when the lock file changes);
the test skips, saying why, where Node.js or npm is missing or the install fails (offline).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from export.common import ExportOptions, copy_model_files, write_processor_files
from export.onnx_export import export_onnx
from pruner_core import PrunerConfig
from pruner_core.adapters import LLAVA, load_llava, resolve_model
from runtime.onnx_backend import OnnxModel
from runtime.prompt import PromptEncoder

pytestmark = pytest.mark.slow

JS_DIR = Path(__file__).parent / "js"
PINNED = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["@huggingface/transformers"]
KEEP = 0.12  # tests/test_export_onnx.py exports tiny-llava at this keep and layer 0: its folder is reused
QUESTION = "What is in the picture?"
TOKENS = 16
# transformers.js resizes with sharp's affine bicubic interpolation (no low-pass filter when shrinking), Pillow
# with a bicubic filter widened by the scale: the same crop and normalisation, different resampling. Measured on
# the astronaut (512 -> 336 px): mean |diff| 0.039, max 1.19 in normalised units (pixel / 255 - mean) / std. A
# one-pixel shift of the crop gives mean 0.13, swapped channels 0.41, so these bounds still catch a wrong crop,
# channel order or normalisation.
RESAMPLING_MEAN_BOUND, RESAMPLING_MAX_BOUND = 0.06, 1.5


@pytest.fixture(scope="session")
def transformers_js() -> str:
    """The node executable, tests/js's pinned transformers.js installed (npm ci, once per lock file); skips,
    saying why, without Node.js / npm or when the install fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        pytest.skip(f"the transformers.js check needs Node.js and npm; {missing} not found on PATH")
    lock = JS_DIR / "package-lock.json"
    digest = hashlib.sha256((JS_DIR / "package.json").read_bytes() + lock.read_bytes()).hexdigest()
    stamp = JS_DIR / "node_modules" / ".installed-lock-sha256"
    with open(JS_DIR / ".install.lock", "w") as guard:  # two pytest runs at once install one after the other
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == digest):
            try:  # --ignore-scripts: onnxruntime-node's install script fetches GPU binaries; its CPU one is packed
                done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=JS_DIR,
                                      capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                pytest.skip(f"npm ci of @huggingface/transformers {PINNED} timed out after 900 s (slow or no network)")
            if done.returncode != 0:  # npm's first lines name the error ("npm error code ECONNREFUSED", ...)
                head = " | ".join((done.stderr or done.stdout).strip().splitlines()[:4])
                pytest.skip(f"npm ci of @huggingface/transformers {PINNED} in {JS_DIR} failed (offline?): {head}")
            stamp.write_text(digest)
    return node


@pytest.fixture(scope="module")
def layer0(onnx_export_cache, tmp_path_factory) -> tuple[Path, dict]:
    """A layer-0 ONNX export of tiny-llava made in this session: test_export_onnx.py's, or one made here."""
    options = ExportOptions(model="tiny-llava", target="onnx", pruner=PrunerConfig(keep=KEEP, layer=0))
    if options not in onnx_export_cache:
        model_dir = resolve_model("tiny-llava", tmp_path_factory.mktemp("zoo"))
        out = tmp_path_factory.mktemp("onnx-layer0")
        onnx_export_cache[options] = out, export_onnx(model_dir, out, options, model_id="tiny-llava")
    return onnx_export_cache[options]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """The astronaut as scikit-image ships it (512 x 512) and already at the crop size (336 x 336: no resampling)."""
    folder = tmp_path_factory.mktemp("photos")
    photo = Image.fromarray(data.astronaut())
    paths = {"astronaut": folder / "astronaut.png", "astronaut-336": folder / "astronaut-336.png"}
    photo.save(paths["astronaut"])
    photo.resize((336, 336), Image.BICUBIC).save(paths["astronaut-336"])
    return paths


def features_returned(payload: dict) -> int:
    """Image features vision_encoder returns, from the graph contract export_config.json records."""
    output = next(spec for spec in payload["methods"]["vision_encoder"]["outputs"] if spec["name"] == "image_features")
    return output["shape"][1]


def runtime_inputs(folder: Path, image: Path) -> tuple[OnnxModel, list[int], list[int], np.ndarray]:
    """What the project's runtime feeds: (model, text ids before the image, after it, pixel_values [1, 3, H, W])."""
    model = OnnxModel(folder)
    prompt = PromptEncoder(folder, model.config["tokenizer"]).encode(QUESTION)
    return model, prompt.before, prompt.after, model.preprocess(image)


def test_hf_processor_puts_what_the_vision_encoder_returns(layer0, photos):
    """transformers' AutoProcessor loads the exported folder as it is and expands <image> into R placeholders: the
    runtime's prompt ids, and pixel_values bit for bit the runtime's."""
    from transformers import AutoProcessor

    folder, payload = layer0
    model, before, after, pixels = runtime_inputs(folder, photos["astronaut"])
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(photos["astronaut"]), text=text, return_tensors="np")
    ids = inputs["input_ids"][0].tolist()
    assert type(processor).__name__ == "LlavaProcessor"
    assert ids.count(model.image_token_id) == features_returned(payload) == payload["image_placeholders"]
    assert features_returned(payload) == payload["kept_image_tokens"] < payload["num_image_tokens"]
    assert ids == model.prompt_ids(before, after)[0].tolist()
    np.testing.assert_array_equal(inputs["pixel_values"], pixels)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object, int]:
    """tiny-llava's checkpoint folder, its processor and N, its image tokens."""
    from transformers import AutoConfig

    model_dir = resolve_model("tiny-llava", tmp_path_factory.mktemp("zoo"))
    _, processor = load_llava(model_dir)
    return model_dir, processor, LLAVA.geometry(AutoConfig.from_pretrained(model_dir)).num_image_tokens


@pytest.mark.parametrize("placement", ["layer 0: R", "layer K: N", "one token"])
def test_processor_files_give_any_placeholder_count(tiny, tmp_path, placement):
    """write_processor_files for R (layer 0), N (layer K: the encoder returns every token) and 1 placeholder:
    transformers' LlavaProcessor puts exactly that many; what it read from preprocessor_config.json and
    processor_config.json is the checkpoint's image processing."""
    from transformers import AutoProcessor

    model_dir, processor, n = tiny
    count = {"layer 0: R": PrunerConfig(keep=KEEP).budget(n), "layer K: N": n, "one token": 1}[placement]
    folder = tmp_path / "export"
    folder.mkdir()
    copy_model_files(model_dir, processor, folder)
    written = write_processor_files(folder, LLAVA, processor, count)
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer_config.json"} == set(written)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == processor.chat_template
    image_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert image_config.pop("processor_class") == "LlavaProcessor"
    assert image_config == json.loads(processor.image_processor.to_json_string())
    loaded = AutoProcessor.from_pretrained(folder)
    inputs = loaded(images=data.astronaut(), text="USER: <image>\nHi ASSISTANT:", return_tensors="np")
    assert inputs["input_ids"][0].tolist().count(processor.image_token_id) == count
    np.testing.assert_array_equal(inputs["pixel_values"],
                                  processor.image_processor(data.astronaut(), return_tensors="np")["pixel_values"])
    with pytest.raises(ValueError, match="image_placeholders must be an int >= 1"):
        write_processor_files(folder, LLAVA, processor, 0)


def test_transformers_js_runs_the_export(transformers_js, layer0, photos, tmp_path, record_property):
    """The pinned transformers.js runs the folder unchanged: with the runtime's input_ids and pixel_values it gives
    the runtime's greedy tokens and prefill logits (and onnxruntime-web's WASM backend its vision_encoder outputs);
    from the photographs through its own processor and chat template, the runtime's prompt ids (R placeholders),
    pixel_values within the resampling bounds, and the runtime's tokens for the pixels it made."""
    folder, payload = layer0
    model, before, after, pixels = runtime_inputs(folder, photos["astronaut"])
    ids = model.prompt_ids(before, after)[0].tolist()
    pixel_file = tmp_path / "pixel_values.f32"
    pixels.astype("<f4").tofile(pixel_file)
    images = [{"path": str(path), "pixels_out": str(tmp_path / f"{name}.f32")} for name, path in photos.items()]
    request = {"folder": str(folder), "max_new_tokens": TOKENS, "input_ids": ids, "pixel_values": str(pixel_file),
               "pixel_shape": list(pixels.shape), "question": QUESTION, "images": images}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run([transformers_js, str(JS_DIR / "llava_generate.mjs"), str(tmp_path / "request.json")],
                          cwd=JS_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    js = json.loads(done.stdout.strip().splitlines()[-1])
    assert js["version"] == PINNED and js["processor"] == "LlavaProcessor"

    # 1. the runtime's own inputs: the same tokens and prefill logits
    expected = model.generate_greedy(before, pixels, after, TOKENS)
    assert js["from_ids"]["tokens"] == expected
    prefill = model.prefill(before, pixels, after).logits
    np.testing.assert_allclose(js["from_ids"]["first_logits"], prefill, atol=1e-4, rtol=0)

    # onnxruntime-web's WASM backend (what a browser runs) gives the same vision_encoder outputs
    features, kept = model.encode_image(pixels, len(before))
    assert js["wasm_vision"]["kept_image_indices"] == kept[0].tolist()
    np.testing.assert_allclose(np.reshape(js["wasm_vision"]["image_features"], features.shape), features,
                               atol=1e-4, rtol=0)

    # 2. the photographs through transformers.js' processor: R placeholders, the runtime's prompt ids
    assert js["prompt"] == PromptEncoder(folder, model.config["tokenizer"]).render(QUESTION)
    for (name, path), image, result in zip(photos.items(), images, js["from_images"]):
        assert result["input_ids"] == ids, name
        assert result["input_ids"].count(model.image_token_id) == features_returned(payload)
        reference = model.preprocess(path)
        theirs = np.fromfile(image["pixels_out"], dtype="<f4").reshape(result["pixel_shape"])
        assert theirs.shape == reference.shape
        difference = np.abs(theirs - reference)
        record_property(f"{name} pixel_values |transformers.js - runtime|",
                        {"mean": float(difference.mean()), "max": float(difference.max())})
        if name == "astronaut-336":  # at the crop size nothing is resampled: only float rounding differs
            assert difference.max() < 1e-5, f"{name}: pixel_values differ by up to {difference.max():.3g}"
        else:  # the resampling differs (see RESAMPLING_*_BOUND)
            assert difference.mean() < RESAMPLING_MEAN_BOUND and difference.max() < RESAMPLING_MAX_BOUND, (
                f"{name}: pixel_values differ by mean {difference.mean():.3f}, max {difference.max():.3f}")
        # the same graphs and decoding: the runtime given transformers.js' pixels decodes the same tokens
        assert result["tokens"] == model.generate_greedy(before, theirs, after, TOKENS), name
        np.testing.assert_allclose(result["first_logits"], model.prefill(before, theirs, after).logits,
                                   atol=1e-4, rtol=0)
