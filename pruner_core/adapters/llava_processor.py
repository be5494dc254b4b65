"""LLaVA-1.5's processor config files for an exported folder whose vision encoder returns a fixed number of image
features, written so that the stock processors put exactly that many ``<image>`` placeholders in the prompt.

Both processors expand ``<image>`` with one formula over the pixel_values' size H x W and the processor config:
- Hugging Face ``LlavaProcessor.replace_image_token`` (transformers/models/llava/processing_llava.py):
  ``(H // patch_size) * (W // patch_size) + num_additional_image_tokens``, minus 1 when
  ``vision_feature_select_strategy == "default"`` (the tower's [CLS] is dropped again);
- transformers.js ``LlavaProcessor._call`` (src/models/llava/processing_llava.js): the same sum, without the
  strategy term.
A layer-0 export's encoder returns R of the N patch tokens, so ``num_additional_image_tokens`` = R - N and the
strategy ``"full"`` give R in both (0 and ``"full"``: N, for a layer-K export). The strategy only counts placeholders
here: the graph already dropped the [CLS] token.
"""

from __future__ import annotations

import json
from typing import Any


def llava_processor_files(processor: Any, image_placeholders: int) -> dict[str, dict[str, Any]]:
    """A loaded ``LlavaProcessor`` -> {file name: JSON payload} of an export that takes ``image_placeholders``
    placeholders per image (R at layer 0, N at layer K):

    - ``processor_config.json``: transformers' own ``to_dict()`` (the image processor nested), the count set as
      above; transformers.js reads ``patch_size``, ``num_additional_image_tokens`` and ``image_token`` from it;
    - ``preprocessor_config.json``: the image processor's settings plus ``processor_class``, the file
      transformers.js' ``AutoProcessor`` / ``AutoImageProcessor`` read (transformers 5 nests it in the former).

    Raises ValueError when ``image_placeholders`` < 1 or the processor has no patch size or crop size.
    """
    if not isinstance(image_placeholders, int) or image_placeholders < 1:
        raise ValueError(f"image_placeholders must be an int >= 1, got {image_placeholders!r}")
    crop = getattr(processor.image_processor, "crop_size", None)
    if not processor.patch_size or crop is None:
        raise ValueError("the LLaVA processor has no patch_size or crop_size: its placeholder count is undefined; "
                         "load a llava-hf checkpoint's processor (AutoProcessor.from_pretrained)")
    cells = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)  # N patch tokens
    config = json.loads(processor.to_json_string())
    config.update(num_additional_image_tokens=image_placeholders - cells, vision_feature_select_strategy="full")
    image_processor = json.loads(processor.image_processor.to_json_string())
    image_processor["processor_class"] = config.get("processor_class") or type(processor).__name__
    return {"processor_config.json": config, "preprocessor_config.json": image_processor}
