"""The Qwen2-VL / Qwen2.5-VL adapter: fixed-resolution inputs, M-RoPE positions, the pruned forward.

Checkpoints: ``Qwen2VLForConditionalGeneration`` (config model_type "qwen2_vl") and
``Qwen2_5_VLForConditionalGeneration`` ("qwen2_5_vl") as transformers 5.23 loads them. The paper's Qwen2-VL
placement (authors' ``Qwen2-VL/Qwen2VL_VLMPruner/modeling_qwen2_vl_self.py``): the image span is the
``<|image_pad|>`` run between ``<|vision_start|>`` / ``<|vision_end|>``, N = (grid_h / 2) * (grid_w / 2) merged
tokens; the selection runs on the merged grid (rows, cols) = (grid_h / 2, grid_w / 2) from layer K-1's states and
M-RoPE keys; kept tokens keep their ORIGINAL 3-D (t, h, w) position ids at every placement, and text after the image
and decoding continue from the unpruned positions.

Static shapes: dynamic resolution becomes a resolution fixed per export, (H, W) pixels, multiples of 28; every
image is resized (bicubic, aspect not kept) to exactly (H, W) before the stock image processor, which then leaves
it as is (``qwen2_vl_inputs.QwenVLInputs``: what ``Qwen2VLProcessor``, which cannot be built here, does for one
image).

Grid placement: VLM-Pruner's spatial distance (BSS) uses the true merged grid, token i at (i mod cols, i div cols),
distances over sqrt(rows^2 + cols^2). ``PrunerConfig(authors_grid=True)`` (CLI ``--authors-grid``) reproduces the
authors' placement instead, for comparisons with the paper: their code takes height and width from
``image_grid_thw``, before the 2x2 merge, so merged token i sits at (i mod 2 cols, i div 2 cols) and distances are
divided by sqrt((2 rows)^2 + (2 cols)^2) (``primitives.placement_lattice``; the eager forward, ``prefill_with_pruning``,
``select_before_llm`` and the ONNX export all pass the vision config's spatial_merge_size for it).

Shapes: B batch, T prompt length, N image tokens, R kept, D text width, P = grid_h * grid_w patches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PrunerConfig
from ..methods import get_method
from .base import (
    DecoderAdapter, ModelGeometry, ParameterCounts, meta_parameter_counts, register_adapter, tokenizer_block,
)
from .decoder import (
    check_split_layer,
    image_span_starts,
    prefill_recorded,
    prune_and_prefill,
)
from .patching import install_pruner, installed_config, open_session, session_decode, uninstall_pruner
from .qwen2_vl_inputs import (
    DEFAULT_IMAGE_SIZE,
    PATCH_FACTOR,
    QwenVLInputs,
    check_image_size,
    default_image_size,
    qwen_prompt,
)
from .qwen2_vl_tiny import IMAGE_PAD, SPEC_FILE, VARIANTS, TinyQwen2VLSpec, build_tiny_qwen2_vl
from .qwen2_vl_vision import StaticVisionEncoder

HUB_ALIASES: dict[str, str] = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
TINY_MODELS: dict[str, TinyQwen2VLSpec] = {
    "tiny-qwen2-vl": TinyQwen2VLSpec(variant="qwen2_vl"),
    "tiny-qwen2.5-vl": TinyQwen2VLSpec(variant="qwen2_5_vl"),
}

# ================================================================================================================
# Checkpoints
# ================================================================================================================


def _model_class(model_type: str) -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[model_type]


def _check_directory(path: str | Path) -> Path:
    path = Path(path)
    config_file = path / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type not in VARIANTS:
        raise ValueError(
            f"{path} does not hold a Qwen2-VL / Qwen2.5-VL checkpoint (config.json model_type {model_type!r}); pass "
            f"a snapshot of one of {sorted(HUB_ALIASES.values())} or a tiny build ({', '.join(TINY_MODELS)})"
        )
    return path


def load_qwen2_vl(path: str | Path, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None,
                  image_size: tuple[int, int] | None = None):
    """A Qwen2-VL / Qwen2.5-VL checkpoint directory -> (model in eval mode, ``QwenVLInputs`` at ``image_size``).

    image_size (H, W) defaults to ``default_image_size(path)``. The vision tower runs eager attention (exportable
    to XNNPACK); the decoder ``attn_implementation`` (default sdpa). Raises ValueError for another model type or an
    image size off the 28-pixel grid.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = _check_directory(path)
    size = check_image_size(image_size or default_image_size(path))
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    implementation = {"text_config": attn_implementation or "sdpa", "vision_config": "eager", "": "sdpa"}
    model = _model_class(model_type).from_pretrained(path, dtype=dtype, attn_implementation=implementation).eval()
    inputs = QwenVLInputs(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path), size)
    model._pruner_image_size = size  # what geometry(model) reports for this loaded instance
    return model, inputs


def parameter_counts(path: str | Path) -> ParameterCounts:
    """Parameters by part, counted on a meta-device instance built from config.json (no weights read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_check_directory(path))
    return meta_parameter_counts(_model_class(config.model_type), config)


def _inner(model: nn.Module) -> nn.Module:
    """Qwen2VLForConditionalGeneration -> its Qwen2VLModel (the model itself if it is one)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "language_model") or not hasattr(inner, "visual"):
        raise ValueError(f"expected a Qwen2-VL / Qwen2.5-VL model, got {type(model).__name__}")
    return inner


def _merge(model: nn.Module) -> int:
    """Patches per merged image token along each side (the vision config's spatial_merge_size, 2)."""
    return int(_inner(model).config.vision_config.spatial_merge_size)


# ================================================================================================================
# Image tokens, positions
# ================================================================================================================


def merged_grid(image_grid_thw: torch.Tensor, merge: int = 2) -> tuple[int, int]:
    """image_grid_thw [I, 3], each (1, grid_h, grid_w) patches -> the pruning grid (grid_h / 2, grid_w / 2).

    Raises ValueError for video (t > 1) or images of different sizes (one export resolution is supported)."""
    sizes = {tuple(int(v) for v in row) for row in image_grid_thw}
    if len(sizes) != 1:
        raise ValueError(f"images of several sizes {sorted(sizes)}; bring every image to one size (QwenVLInputs)")
    frames, height, width = sizes.pop()
    if frames != 1:
        raise ValueError(f"an input of {frames} frames (video) was passed; only single images are supported")
    return height // merge, width // merge


def grid_of_positions(positions: torch.Tensor, starts: torch.Tensor, n_image: int) -> tuple[int, int]:
    """The merged grid (rows, cols) from the image span's M-RoPE positions [3, B, T] (generate passes positions, not
    image_grid_thw, to the forward): rows = the span of h, cols = the span of w. Raises ValueError when they do not
    tile N tokens (1-D positions: mm_token_type_ids was not given to generate)."""
    span = positions[:, 0, int(starts[0]) : int(starts[0]) + n_image]  # [3, N]
    rows, cols = (int(span[axis].max() - span[axis].min()) + 1 for axis in (1, 2))
    if rows * cols != n_image:
        raise ValueError(
            f"the image's positions span {rows} x {cols} but it has {n_image} tokens: M-RoPE positions are missing; "
            "pass mm_token_type_ids (1 at image tokens) to generate"
        )
    return rows, cols


def encode_image(model: nn.Module, pixel_values: torch.Tensor,
                 image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """pixel_values [P, 1176] + image_grid_thw [1, 3] (default: the loaded model's export size) -> the merged image
    tokens' input embeddings [1, N, D]."""
    inner = _inner(model)
    if image_grid_thw is None:
        height, width = getattr(model, "_pruner_image_size", None) or DEFAULT_IMAGE_SIZE
        image_grid_thw = torch.tensor([[1, height // 14, width // 14]])
    features = inner.get_image_features(pixel_values.to(inner.visual.dtype), image_grid_thw, return_dict=True)
    return torch.cat(list(features.pooler_output), dim=0)[None]


def rope_positions(model: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None,
                   image_grid_thw: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock M-RoPE positions of a prompt -> (position_ids [3, B, T], rope_deltas [B, 1]).

    Raises ValueError when mm_token_type_ids is missing (transformers 5.23's generate would silently use 1-D)."""
    if mm_token_type_ids is None:
        raise ValueError(
            "mm_token_type_ids is missing: Qwen2-VL's M-RoPE needs it (1 at image tokens, 0 elsewhere); pass what "
            "QwenVLInputs returns (without it transformers' generate silently uses 1-D positions)"
        )
    return _inner(model).get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def mrope_positions(before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
    """M-RoPE position ids of one prompt [text before] + [image, merged grid (rows, cols)] + [text after] ->
    [3, 1, T] (t, h, w): transformers' ``get_rope_index`` for one image as a closed form (runtime/positions.py, which
    the runtimes use without the model)."""
    from runtime.positions import mrope_positions as closed_form

    return torch.from_numpy(closed_form(before, grid, after))


def select_before_llm(model: nn.Module, features: torch.Tensor, image_start: int | torch.Tensor,
                      grid: tuple[int, int], config: PrunerConfig):
    """The layer-0 placement's selection over the merged image tokens features [1, N, D]; methods that read keys get
    decoder layer 0's post-RoPE keys at the tokens' M-RoPE positions (s, s + r, s + c), s = image_start (an int,
    or a [1] tensor in graphs that take it as an input), as ``prune_and_prefill`` computes them at K = 0."""
    from ..api import select_tokens
    from .decoder import layer_keys, rotary

    keys = None
    if "keys" in get_method(config.method).needs:
        language_model = _inner(model).language_model
        offsets = mrope_positions(0, grid, 0).to(features.device)  # [3, 1, N]
        start = image_start if isinstance(image_start, int) else image_start.reshape(1, 1, 1)
        positions = offsets + start
        keys = layer_keys(language_model.layers[0], features, *rotary(language_model, features, positions))
    return select_tokens(features, keys, grid, config, merge=_merge(model))


def embed_prompt(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                 image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids [B, T] with N ``<|image_pad|>`` + pixels [P, 1176] (image_grid_thw [1, 3]; default: the loaded
    model's export size, as ``ModelAdapter.embed_prompt`` is called) -> (embeds [B, T, D], image_start [B], N)."""
    inner = _inner(model)
    embeds = inner.get_input_embeddings()(input_ids)
    features = encode_image(model, pixel_values, image_grid_thw)[0].to(embeds.dtype)  # [N, D]
    n_image = features.shape[0]
    starts = image_span_starts(input_ids, inner.config.image_token_id, n_image)
    mask = (input_ids == inner.config.image_token_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, features.repeat(input_ids.shape[0], 1)), starts, n_image


def prefill_with_pruning(model: nn.Module, embeds: torch.Tensor, image_start: int | torch.Tensor, n_image: int,
                         grid: tuple[int, int], config: PrunerConfig, *, position_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, cls_attention: torch.Tensor | None = None):
    """The exporter's entry point (``decoder.prefill_recorded``) with M-RoPE position_ids [3, B, T]: kept tokens
    keep their original positions at every K. -> ``decoder.PrefillOutput``."""
    if cls_attention is not None:
        raise ValueError(_NO_CLS)
    inner = _inner(model)
    return prefill_recorded(inner.language_model, model.lm_head, embeds, image_start, n_image, grid, config,
                            attention_mask=attention_mask, position_ids=position_ids, original_positions=True,
                            merge=_merge(model))


_NO_CLS = "Qwen2-VL's vision tower has no [CLS] token: VisionZip's signal does not exist; choose another method"


# ================================================================================================================
# apply_pruner / remove_pruner
# ================================================================================================================


class _PrunedQwenForward:
    """Mixin placed in front of one Qwen2VLModel / Qwen2_5_VLModel instance's class by ``apply_pruner``.

    Prunes at prefill (input_ids, an image as pixel_values or generate's pre-encoded mm_encoder_outputs["image"],
    an empty cache) and continues such a cache at decode; every other call goes to the stock forward. The pruned
    paths return the kept sequence's final-norm states [B, T', D].
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, mm_encoder_outputs=None, **kwargs):
        session = self._pruner_sessions.get(past_key_values) if past_key_values is not None else None
        if session is not None and pixel_values is None:
            return self._pruned_decode(session, input_ids, inputs_embeds, attention_mask, past_key_values)
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise ValueError("video input is not supported by the pruned Qwen2-VL forward; pass one image")
        encoded = (mm_encoder_outputs or {}).get("image")
        is_prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if (pixel_values is not None or encoded is not None) and input_ids is not None and is_prefill:
            if encoded is None:
                if image_grid_thw is None:
                    raise ValueError("pixel_values without image_grid_thw: pass both, as QwenVLInputs returns them")
                encoded = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            return self._pruned_prefill(input_ids, encoded, image_grid_thw, mm_token_type_ids, attention_mask,
                                        position_ids, past_key_values, use_cache)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )

    def _pruned_prefill(self, input_ids, encoded, image_grid_thw, mm_token_type_ids, attention_mask, position_ids,
                        cache, use_cache):
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        config = self._pruner_config
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"the pruned forward takes a 2-D padding mask [B, T], got {tuple(attention_mask.shape)}")
        if mm_token_type_ids is None:
            rope_positions(self, input_ids, None, image_grid_thw)  # raises: M-RoPE needs mm_token_type_ids
        features = list(encoded.pooler_output)  # one [N, D] per image
        if len(features) != input_ids.shape[0]:
            raise ValueError(f"{len(features)} images for {input_ids.shape[0]} prompts; the pruner takes exactly one "
                             "image per prompt")
        n_image = features[0].shape[0]
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]
        starts = image_span_starts(input_ids, self.config.image_token_id, n_image)  # [B]; one run of N per prompt
        mask = (input_ids == self.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat(features, dim=0).to(embeds.dtype))
        if position_ids is not None and position_ids.dim() == 3:  # generate's [4, B, T]: 1-D text row + (t, h, w)
            positions = position_ids[-3:].long()  # it has set self.rope_deltas with them
        else:
            positions, self.rope_deltas = rope_positions(self, input_ids, mm_token_type_ids, image_grid_thw,
                                                         attention_mask)
        grid = (merged_grid(image_grid_thw, self.config.vision_config.spatial_merge_size)
                if image_grid_thw is not None else grid_of_positions(positions, starts, n_image))
        cache = cache if cache is not None else DynamicCache(config=self.config.text_config)
        result = prune_and_prefill(self.language_model, embeds, starts, n_image, grid, config, cache=cache,
                                   attention_mask=attention_mask, position_ids=positions, original_positions=True,
                                   merge=_merge(self))
        keep_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if keep_cache:
            open_session(self._pruner_sessions, cache, result, input_ids.shape[1], n_image, original_positions=True)
            self._pruner_next_positions[cache] = result.next_position  # [B]
        return BaseModelOutputWithPast(last_hidden_state=result.hidden, past_key_values=cache if keep_cache else None)

    def _pruned_decode(self, session, input_ids, inputs_embeds, attention_mask, cache):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)  # [B, S, D]
        batch, length, _ = embeds.shape
        generated = cache.get_seq_length(len(self.language_model.layers) - 1) - session.kept_valid.shape[1]
        step = torch.arange(length, device=embeds.device)[None] + generated  # [1, S]
        positions = (self._pruner_next_positions[cache][:, None] + step)[None].expand(3, batch, length)  # [3, B, S]
        hidden = session_decode(self.language_model, session, embeds, attention_mask, positions, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


def apply_pruner(model: nn.Module, config: PrunerConfig | None = None) -> nn.Module:
    """Prune image tokens in this Qwen2-VL / Qwen2.5-VL instance's prefill; ``model.generate`` (given
    mm_token_type_ids) then decodes as usual. Only this instance changes; ``remove_pruner`` restores it exactly.
    Raises ValueError for an unknown method, a layer past the decoder, a method needing [CLS] attention, or an
    attention implementation the pruned decoder does not run. Returns ``model``."""
    import weakref

    config = config or PrunerConfig()
    if not isinstance(config, PrunerConfig):
        raise ValueError(f"config must be a PrunerConfig, got {type(config).__name__}")
    inner = _inner(model)
    if "cls_attention" in get_method(config.method).needs:
        raise ValueError(_NO_CLS)
    check_split_layer(config, len(inner.language_model.layers))
    implementation = inner.language_model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"the decoder uses attn_implementation={implementation!r}; load with 'sdpa' or 'eager'")
    install_pruner(inner, _PrunedQwenForward, config)
    inner._pruner_next_positions = weakref.WeakKeyDictionary()
    return model


def remove_pruner(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruner`` on this instance (a no-op if it is not applied). Returns ``model``."""
    inner = _inner(model)
    uninstall_pruner(inner, _PrunedQwenForward)
    inner.__dict__.pop("_pruner_next_positions", None)
    return model


def pruner_config(model: nn.Module) -> PrunerConfig | None:
    """The PrunerConfig applied to this instance, or None."""
    return installed_config(_inner(model), _PrunedQwenForward)


# ================================================================================================================
# The adapter
# ================================================================================================================


class Qwen2VLAdapter(DecoderAdapter):
    """``base.ModelAdapter`` for Qwen2-VL and Qwen2.5-VL (transformers' ``Qwen2VLForConditionalGeneration`` /
    ``Qwen2_5_VLForConditionalGeneration``)."""

    family = "Qwen2-VL / Qwen2.5-VL"
    model_types = VARIANTS
    tiny_models = TINY_MODELS
    hub_aliases = HUB_ALIASES
    tiny_spec_file = SPEC_FILE
    export_targets = ("executorch", "onnx")

    load = staticmethod(load_qwen2_vl)
    parameter_counts = staticmethod(parameter_counts)
    encode_image = staticmethod(encode_image)
    prompt = staticmethod(qwen_prompt)
    embed_prompt = staticmethod(embed_prompt)
    prefill_with_pruning = staticmethod(prefill_with_pruning)
    apply_pruner = staticmethod(apply_pruner)
    remove_pruner = staticmethod(remove_pruner)
    pruner_config = staticmethod(pruner_config)

    def build_tiny(self, directory: str | Path, spec: TinyQwen2VLSpec) -> Path:
        return build_tiny_qwen2_vl(directory, spec)

    def check_directory(self, path: str | Path) -> Path:
        return _check_directory(path)

    def geometry(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelGeometry:
        """From a Qwen2VLConfig / Qwen2_5_VLConfig (or a loaded model: its export size) at ``image_size`` (H, W)."""
        size = image_size or getattr(config, "_pruner_image_size", None) or DEFAULT_IMAGE_SIZE
        config = getattr(config, "config", config)
        height, width = check_image_size(size)
        text = config.text_config
        heads = text.num_attention_heads
        return ModelGeometry(
            image_size=(height, width),
            grid=(height // PATCH_FACTOR, width // PATCH_FACTOR),
            image_token_id=int(config.image_token_id),
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            hidden_size=text.hidden_size,
            position_scheme="mrope",
            merge=int(config.vision_config.spatial_merge_size),
        )

    def language_model(self, model: nn.Module) -> nn.Module:
        return _inner(model).language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def cls_attention(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(_NO_CLS)

    def default_image_size(self, path: str | Path) -> tuple[int, int]:
        """The export resolution when none is asked for: a tiny build's own, else 672 x 672."""
        return default_image_size(path)

    def prompt_positions(self, before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
        """RoPE position ids of [before] + [image] + [after] -> [3, 1, T] (``mrope_positions``)."""
        return mrope_positions(before, grid, after)

    def image_preprocessing(self, processor: QwenVLInputs) -> Any:
        """The runtime's ImagePreprocessing (layout ``flat_patches``) for this processor's export size."""
        return processor.preprocessing()

    def vision_encoder(self, model: nn.Module, image_size: tuple[int, int], *,
                       patch_matmul: bool = False) -> nn.Module:
        """The exportable vision tower at ``image_size``: pixel_values [P, 1176] -> image tokens [1, N, D].
        patch_matmul: the Conv3d patch embedding as the equal matmul over flattened patches (``FlatPatchEmbedding``:
        for backends without 5-D convolution). Qwen2.5-VL's window blocks run one batched attention per window size
        (``BatchedWindowAttention``), not one per window."""
        return StaticVisionEncoder(_inner(model).visual, image_size, "matmul" if patch_matmul else "conv3d")

    def prompt_image_start(self, tokenizer: Any, image_token_id: int) -> int:
        ids = list(tokenizer(qwen_prompt("?"))["input_ids"])
        if image_token_id not in ids:
            raise ValueError(f"the tokenizer does not keep {IMAGE_PAD} (id {image_token_id}) as one token")
        return ids.index(image_token_id)

    def tokenizer_info(self, model: nn.Module, processor: Any, files: list[str]) -> dict[str, Any]:
        return tokenizer_block(model, processor, files, qwen_prompt("{prompt}"))

    def processor_files(self, processor: Any, image_placeholders: int) -> dict[str, dict[str, Any]]:
        """{}: Qwen2-VL's processors count placeholders from the image's patch grid (``image_grid_thw``), which no
        config entry changes, and a layer-0 export keeps original positions stock runtimes do not compute."""
        return {}

    select_before_llm = staticmethod(select_before_llm)

    def pixel_input_shape(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """The vision encoder's pixel input at the export size: [P, 3 * 2 * 14 * 14] flattened patches."""
        height, width = geometry.image_size
        return (height // 14) * (width // 14), 3 * 2 * 14 * 14


QWEN2_VL = register_adapter(Qwen2VLAdapter())
