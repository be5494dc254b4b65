"""Qwen2-VL / Qwen2.5-VL inputs at a fixed resolution: what ``Qwen2VLProcessor`` does for one image, without it.

``Qwen2VLProcessor`` cannot be built here (its video half needs torchvision, whose reachable wheels do not import
with the CPU torch), so ``QwenVLInputs`` does for one image per prompt what it does, with
``Qwen2VLImageProcessorPil`` and the tokenizer: the chat-template prompt, one ``<|image_pad|>`` per merged token, the
pixels and ``image_grid_thw``, and ``mm_token_type_ids`` (transformers 5.23 needs it for M-RoPE; ``generate``
silently falls back to 1-D positions without it). Every image is resized (bicubic, aspect not kept) to exactly the
export resolution (H, W), multiples of 28, which the stock image processor then leaves as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .qwen2_vl_tiny import DEFAULT_SYSTEM, IMAGE_PAD, SPEC_FILE, VISION_END, VISION_START

# The default export resolution of real checkpoints: 672 x 672 px = 24 x 24 merged tokens (N = 576), LLaVA-1.5's
# image-token count, so keep values, budgets and figures compare across families; about a phone photo's detail at
# the sizes Qwen2-VL's processor makes by default (it allows up to 1280 tokens).
DEFAULT_IMAGE_SIZE = (672, 672)
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: H and W must be multiples of it
PROMPT_TEMPLATE = (
    f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{VISION_START}{IMAGE_PAD}{VISION_END}"
    "{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


def check_image_size(size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) pixels -> itself, or ValueError when not positive multiples of 28 (patch 14 x merge 2)."""
    height, width = (int(v) for v in size)
    if height < PATCH_FACTOR or width < PATCH_FACTOR or height % PATCH_FACTOR or width % PATCH_FACTOR:
        near = tuple(max(PATCH_FACTOR, round(v / PATCH_FACTOR) * PATCH_FACTOR) for v in (height, width))
        raise ValueError(
            f"image size {height}x{width} is not a multiple of {PATCH_FACTOR} (Qwen2-VL's 14-pixel patches merged "
            f"2x2); use e.g. {near[0]}x{near[1]}"
        )
    return height, width


def default_image_size(path: str | Path | None) -> tuple[int, int]:
    """The export resolution a checkpoint gets when none is asked for: a tiny build's own, else 672 x 672."""
    stamp = Path(path) / SPEC_FILE if path is not None else None
    if stamp is not None and stamp.is_file():
        return tuple(json.loads(stamp.read_text())["image_size"])
    return DEFAULT_IMAGE_SIZE


def qwen_prompt(question: str) -> str:
    """The Qwen2-VL instruct prompt for one image and one question (one ``<|image_pad|>``, expanded to N later)."""
    return PROMPT_TEMPLATE.format(prompt=question)


@dataclass
class QwenVLInputs:
    """What ``Qwen2VLProcessor`` does for one image per prompt, at a fixed resolution, without torchvision.

    ``__call__(images=..., text=...)`` -> input_ids [B, T] (each ``<|image_pad|>`` expanded to N), attention_mask
    [B, T], mm_token_type_ids [B, T] (1 at image tokens), pixel_values [B * P, 3 * 2 * 14 * 14] and image_grid_thw
    [B, 3] = (1, H / 14, W / 14) per image. Source: transformers' processing_qwen2_vl.py (what it computes).
    """

    tokenizer: Any
    image_processor: Any
    image_size: tuple[int, int]

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    @property
    def num_image_tokens(self) -> int:
        height, width = self.image_size
        return (height // PATCH_FACTOR) * (width // PATCH_FACTOR)

    def pixels(self, images: Any) -> dict[str, torch.Tensor]:
        """Image(s) (PIL, HxWx3 uint8 array or file path) -> pixel_values [B * P, 1176] float32 and image_grid_thw
        [B, 3] at ``image_size``. Transparency is composited onto white first (as runtime.preprocess does)."""
        from runtime.preprocess import _to_rgb, load_image

        height, width = check_image_size(self.image_size)
        images = images if isinstance(images, (list, tuple)) else [images]
        resized = [_to_rgb(load_image(image)).resize((width, height), Image.Resampling.BICUBIC) for image in images]
        area = height * width  # smart_resize keeps an (H, W) already on the 28-grid with this pixel budget
        out = self.image_processor(images=resized, size={"shortest_edge": area, "longest_edge": area},
                                   return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def preprocessing(self) -> Any:
        """The same steps as a ``runtime.preprocess.ImagePreprocessing`` (layout ``flat_patches``): what exports
        record so the runtime reproduces ``pixels`` bit for bit without transformers."""
        from runtime.preprocess import ImagePreprocessing

        p = self.image_processor
        height, width = check_image_size(self.image_size)
        return ImagePreprocessing(
            do_resize=True, shortest_edge=None, height=height, width=width, resample=int(p.resample),
            do_center_crop=False, crop_height=None, crop_width=None, do_rescale=bool(p.do_rescale),
            rescale_factor=float(p.rescale_factor), do_normalize=bool(p.do_normalize),
            image_mean=tuple(p.image_mean), image_std=tuple(p.image_std), input_layout="flat_patches",
            patches=(int(p.patch_size), int(p.temporal_patch_size), int(p.merge_size)),
        )

    def __call__(self, images: Any = None, text: Any = None, return_tensors: str = "pt", **kwargs: Any):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        out: dict[str, Any] = {}
        count = len(images) if isinstance(images, (list, tuple)) else int(images is not None)
        if sum(t.count(IMAGE_PAD) for t in texts) != count:
            raise ValueError(
                f"{count} image(s) for {len(texts)} prompt(s) holding {sum(t.count(IMAGE_PAD) for t in texts)} "
                f"{IMAGE_PAD}: give one image per prompt, each prompt with one {IMAGE_PAD} (qwen_prompt makes it)"
            )
        if images is not None:
            out.update(self.pixels(images))
            texts = [t.replace(IMAGE_PAD, IMAGE_PAD * self.num_image_tokens) for t in texts]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, **kwargs)
        out["input_ids"], out["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        out["mm_token_type_ids"] = (encoded["input_ids"] == image_id).int()
        return BatchFeature(out, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)
