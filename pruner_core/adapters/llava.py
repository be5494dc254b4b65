"""LLaVA-1.5 (llava-hf format): the adapter for config model_type "llava". The only file that knows this family.

* Checkpoints: ``load_llava``, ``parameter_counts``, the hub aliases; the tiny builds are in ``llava_tiny.py`` and
  name resolution (``resolve_model``) in ``hub.py``.
* Reading the model: ``image_grid`` (from the vision config), ``encode_image`` (CLIP tower + projector),
  ``embed_prompt`` (the ``<image>`` placeholders filled), ``clip_cls_attention`` (VisionZip's signal), the prompt
  format and chat template.
* Pruning: ``prefill_with_pruning`` runs the shared pruned prefill (``decoder.py``) on this model's decoder and LM
  head; ``apply_pruner`` / ``remove_pruner`` route ``model.generate`` through it for one model instance.
* ``LlavaAdapter`` (registered as ``LLAVA``) answers ``base.ModelAdapter`` with the above.

Shapes: B batch, T prompt length, N image tokens, R kept tokens, T' = T - N + R, D text width, H query heads,
Hkv key/value heads, d head width, L decoder layers, K the pruning layer.

Nothing here hard-codes a grid, an image span or a layer count: they are read from the model's config, the processor's
output and the prompt's placeholder tokens.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import select_tokens
from ..config import PrunerConfig
from ..methods import get_method
from ..primitives import placement_lattice
from ..selection import Selection
from .base import (
    DecoderAdapter, ImageEncoder, ModelGeometry, ParameterCounts, meta_parameter_counts, register_adapter,
    tokenizer_block,
)
from .decoder import (
    SUPPORTED_ATTENTION, PrefillOutput, _heads, check_split_layer, image_span_starts, layer_keys, prefill_recorded,
    prune_and_prefill, rotary,
)
from .llava_processor import llava_processor_files
from .llava_tiny import SPEC_FILE, TINY_MODELS, TinyLlavaSpec, build_tiny_llava
from .patching import PrunerSession, install_pruner, installed_config, open_session, session_decode, uninstall_pruner

# ================================================================================================================
# Checkpoints and prompt format
# ================================================================================================================

HUB_ALIASES: dict[str, str] = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
}

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def llava_prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for one image and one question."""
    return PROMPT_TEMPLATE.format(prompt=question)


def prompt_image_start(tokenizer: Any, image_token_id: int) -> int:
    """Index of the image placeholder in LLaVA-1.5's prompt format (after "<s> USER: ")."""
    ids = list(tokenizer(llava_prompt("?"))["input_ids"])
    if image_token_id not in ids:
        raise ValueError(
            f"the tokenizer does not keep the image token (id {image_token_id}) as one token in "
            f"{llava_prompt('?')!r}; use the checkpoint's own tokenizer (it registers '<image>' as a special token)"
        )
    return ids.index(image_token_id)


def tokenizer_info(model: nn.Module, processor: Any, files: list[str]) -> dict[str, Any]:
    """The `export_config.json["tokenizer"]` block every target writes (and the eager runtime uses): special ids
    and tokens, the chat template and the LLaVA prompt format with a literal image token and a {prompt} field."""
    return tokenizer_block(model, processor, files, llava_prompt("{prompt}"))


def _check_llava_directory(path: Path) -> Path:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path} has no config.json; pass a directory written by save_pretrained in llava-hf format "
            "(e.g. a snapshot of llava-hf/llava-1.5-7b-hf)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "llava":
        raise ValueError(
            f"{path} holds a {model_type!r} model; this adapter supports LLaVA-1.5 checkpoints in llava-hf format "
            f"(config model_type 'llava'): {sorted(TINY_MODELS)}, {sorted(HUB_ALIASES)}, a llava-hf hub id or a "
            "local llava-hf directory"
        )
    return path


def estimate_parameters(path: str | Path) -> int:
    """Parameter count of a llava-hf checkpoint from its config.json alone (no weights needed); llava-1.5-7b:
    ~7.06e9. Used to estimate export memory before loading anything."""
    return parameter_counts(path).total


def parameter_counts(path: str | Path) -> ParameterCounts:
    """Parameters by part (vision tower + projector, one decoder layer and their number, embedding, LM head),
    counted on a meta-device instance built from config.json (``base.meta_parameter_counts``)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(_check_llava_directory(Path(path)))
    return meta_parameter_counts(LlavaForConditionalGeneration, config)


def load_llava(path: str | Path, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None,
               image_size: tuple[int, int] | None = None):
    """-> (LlavaForConditionalGeneration in eval mode, its processor), loaded with the stock ``from_pretrained``.
    image_size: None or the CLIP tower's own (H, W); another raises ValueError (its position embeddings fix it)."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    path = _check_llava_directory(Path(path))
    if image_size is not None:
        check_native_size(AutoConfig.from_pretrained(path), image_size)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


# ================================================================================================================
# Reading the model: grid, image span, projector outputs
# ================================================================================================================


def _llava_inner(model: nn.Module) -> nn.Module:
    """LlavaForConditionalGeneration or LlavaModel -> the LlavaModel (vision tower, projector, language model)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llava":
        raise ValueError(
            f"expected a LLaVA model (config model_type 'llava'), got {type(model).__name__} with model_type "
            f"{getattr(config, 'model_type', None)!r}; load one with load_llava(resolve_model(name, cache_dir))"
        )
    inner = getattr(model, "model", None)
    inner = inner if isinstance(inner, nn.Module) and hasattr(inner, "vision_tower") else model
    if not hasattr(inner, "language_model") or not hasattr(inner, "vision_tower"):
        raise ValueError(
            f"{type(model).__name__} does not look like a llava-hf LLaVA model (no vision_tower / language_model)"
        )
    return inner


def image_grid(config: Any, pixel_values: torch.Tensor | None = None) -> tuple[int, int]:
    """(rows, cols) of the image-token grid: the image's height and width in patches.

    From ``pixel_values`` [B, C, H, W] when given (what the processor produced), else from the vision config's
    ``image_size``. Only the "default" feature strategy (tower [CLS] dropped) has a pure grid of image tokens.
    """
    vision = config.vision_config
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} keeps the tower's [CLS] token in the image span, which then "
            "is not a grid; the pruner supports the 'default' strategy (LLaVA-1.5's)"
        )
    patch = vision.patch_size
    if pixel_values is not None:
        height, width = pixel_values.shape[-2:]
    else:
        height = width = vision.image_size
    return height // patch, width // patch


def _grid_for(config: Any, n_image: int) -> tuple[int, int]:
    """The config's grid, checked against the image span the prompt actually holds."""
    rows, cols = image_grid(config)
    if rows * cols != n_image:
        raise ValueError(
            f"the image span holds {n_image} tokens but the vision config's grid is {rows}x{cols}; "
            "use the model's own processor (it sizes images to the vision config)"
        )
    return rows, cols


def encode_image(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [B, C, H, W] -> projector outputs [B, N, D] (the stock ``get_image_features``)."""
    inner = _llava_inner(model)
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    return torch.stack(list(features))


def select_before_llm(
    model: nn.Module, features: torch.Tensor, image_start: int | torch.Tensor, grid: tuple[int, int],
    config: PrunerConfig,
) -> Selection:
    """The layer-0 placement's selection over the projector outputs features [1, N, D].

    Methods that read keys get decoder layer 0's post-RoPE keys of the image tokens at their prompt positions
    image_start .. image_start + N - 1 (image_start: an int, or a [1] tensor in graphs that take it as an input), as
    ``prune_and_prefill`` computes them at K = 0.
    """
    keys = None
    if "keys" in get_method(config.method).needs:
        language_model = _llava_inner(model).language_model
        start = image_start if isinstance(image_start, int) else image_start.reshape(-1, 1)
        positions = start + torch.arange(features.shape[1], device=features.device)[None]  # [1, N]
        keys = layer_keys(language_model.layers[0], features, *rotary(language_model, features, positions))
    return select_tokens(features, keys, grid, config)


def clip_cls_attention(
    vision_tower: nn.Module, hidden_states: tuple[torch.Tensor, ...], feature_layer: int
) -> torch.Tensor:
    """[CLS] attention over the patches in the tower layer that produces hidden state ``feature_layer``, head mean.

    VisionZip's signal. hidden_states: the tower's L+1 hidden states [B, 1+N, Dv] (``output_hidden_states=True``;
    entry i is the input of encoder layer i) -> [B, N] (the [CLS] column dropped, as the "default" strategy drops
    the [CLS] token). Computed from the layer's own q/k projections, so any attention backend works.
    """
    if not isinstance(feature_layer, int):
        raise ValueError(f"cls attention needs one vision_feature_layer (an int), got {feature_layer!r}")
    layers = vision_tower.encoder.layers
    if hidden_states is None or len(hidden_states) != len(layers) + 1:
        raise ValueError(
            f"cls attention needs all {len(layers) + 1} hidden states of the vision tower; call it with "
            "output_hidden_states=True"
        )
    index = feature_layer % len(hidden_states)  # hidden_states[index] is the output of encoder layer index-1
    if index == 0:
        raise ValueError("vision_feature_layer selects the patch embeddings, which have no attention map")
    layer = layers[index - 1]
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_states[index - 1])
    query = _heads(attn.q_proj(normed[:, :1]), attn.head_dim)  # [B, Hv, 1, dv]
    keys = _heads(attn.k_proj(normed), attn.head_dim)  # [B, Hv, 1+N, dv]
    weights = ((query @ keys.transpose(-1, -2)).float() * attn.scale).softmax(-1)  # [B, Hv, 1, 1+N]
    return weights.mean(1)[:, 0, 1:].to(normed.dtype)  # [B, N]


def prefill_with_pruning(
    model: nn.Module,
    embeds: torch.Tensor,
    image_start: int | torch.Tensor,
    n_image: int,
    grid: tuple[int, int],
    config: PrunerConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
) -> PrefillOutput:
    """The exporter's entry point: prune and prefill a LLaVA model's decoder, return logits and per-layer K/V.

    model: LlavaForConditionalGeneration (unpatched or patched, its stock modules are used). embeds [B, T, D] with
    the projector outputs in [image_start, image_start + n_image) (see ``embed_prompt``), grid = (rows, cols) with
    rows * cols == n_image (see ``image_grid``). With Python ints for image_start / n_image every output shape is
    static. Placement, positions and caches as in ``prune_and_prefill``.
    """
    return prefill_recorded(
        _llava_inner(model).language_model, model.lm_head, embeds, image_start, n_image, grid, config,
        attention_mask=attention_mask, position_ids=position_ids, cls_attention=cls_attention,
    )


def embed_prompt(
    model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids [B, T] + pixel_values [B, C, H, W] -> (embeds [B, T, D], image_start [B], N).

    The stock token embedding with the stock projector outputs written into the placeholder span, as LlavaModel does.
    """
    inner = _llava_inner(model)
    embeds = inner.get_input_embeddings()(input_ids)
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    return _merge_features(inner, input_ids, embeds, features)


def _merge_features(inner: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor, features) -> tuple:
    n_image = features[0].shape[0]
    flat = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)  # [images * N, D]
    starts = image_span_starts(input_ids, inner.config.image_token_id, n_image)
    placeholder = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=flat)
    return embeds.masked_scatter(placeholder, flat), starts, n_image


# ================================================================================================================
# apply_pruner / remove_pruner: route one model instance's forward (and so generate) through the pruned prefill
# ================================================================================================================


class _PrunedLlavaForward:
    """Mixin placed in front of a LlavaModel instance's own class by ``apply_pruner`` (undone by ``remove_pruner``).

    Its forward prunes at prefill (a call with input_ids, an image as pixel_values or as generate's pre-encoded
    mm_encoder_outputs["image"], and an empty cache) and continues such a cache at decode; every other call (text
    only, inputs_embeds only, a cache it did not fill) goes to the stock forward untouched. The pruned paths return
    the kept sequence's states [B, T', D] (so logits over T' positions, the last one being the prompt's last) and
    no per-layer hidden states or attentions.
    """

    _pruner_config: PrunerConfig
    _pruner_original_class: type
    _pruner_sessions: "weakref.WeakKeyDictionary[Any, PrunerSession]"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        session = self._pruner_sessions.get(past_key_values) if past_key_values is not None else None
        if session is not None and pixel_values is None:
            return self._pruned_decode(session, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        # generate encodes the image first and passes it as mm_encoder_outputs["image"]; a direct call passes pixels
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        has_image = pixel_values is not None or encoded is not None
        is_prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if has_image and input_ids is not None and is_prefill:
            if vision_feature_select_strategy not in (None, self.config.vision_feature_select_strategy):
                raise ValueError(
                    "the pruned forward uses the model's own vision_feature_select_strategy; drop the override"
                )
            if encoded is None:
                encoded = self.get_image_features(
                    pixel_values=pixel_values, vision_feature_layer=vision_feature_layer, image_sizes=image_sizes,
                    return_dict=True,
                )
            return self._pruned_prefill(
                input_ids, encoded, attention_mask, position_ids, past_key_values, vision_feature_layer,
                kwargs.get("use_cache"),
            )
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes, **kwargs,
        )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        # VisionZip's signal needs every tower hidden state; the stock call keeps only the feature layer's.
        if "cls_attention" in get_method(self._pruner_config.method).needs:
            kwargs["output_hidden_states"] = True
        return super().get_image_features(
            pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes, **kwargs,
        )

    def _pruned_prefill(
        self, input_ids, encoded, attention_mask, position_ids, past_key_values, vision_feature_layer, use_cache
    ):
        from transformers import DynamicCache
        from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

        config = self._pruner_config
        _check_2d_mask(attention_mask)
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]
        features = encoded.pooler_output  # one [N, D] per image
        embeds, starts, n_image = _merge_features(self, input_ids, embeds, features)
        grid = _grid_for(self.config, n_image)
        cls_attention = None
        if "cls_attention" in get_method(config.method).needs:
            feature_layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            cls_attention = clip_cls_attention(self.vision_tower, encoded.hidden_states, feature_layer)
            cls_attention = cls_attention.to(embeds.dtype)
        cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config.text_config)
        result = prune_and_prefill(
            self.language_model, embeds, starts, n_image, grid, config,
            cache=cache, attention_mask=attention_mask, position_ids=position_ids, cls_attention=cls_attention,
        )
        keep_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if keep_cache:
            open_session(self._pruner_sessions, cache, result, input_ids.shape[1], n_image)
        return LlavaModelOutputWithPast(
            last_hidden_state=result.hidden,
            past_key_values=cache if keep_cache else None,
            image_hidden_states=torch.cat(list(features), dim=0),  # [images * N, D], as the stock forward
        )

    def _pruned_decode(self, session, input_ids, inputs_embeds, attention_mask, position_ids, cache):
        from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

        _check_2d_mask(attention_mask)
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)  # [B, S, D]
        hidden = session_decode(self.language_model, session, embeds, attention_mask, position_ids, cache)
        return LlavaModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


def _check_2d_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"the pruned LLaVA forward takes a 2-D padding mask [B, T], got shape {tuple(attention_mask.shape)}; "
            "pass the processor's attention_mask"
        )


def apply_pruner(model: nn.Module, config: PrunerConfig | None = None) -> nn.Module:
    """Prune image tokens in this LLaVA instance's prefill; ``model.generate`` then decodes as usual.

    model: LlavaForConditionalGeneration (or its LlavaModel). Only this instance changes (its LlavaModel's class is
    swapped for a subclass that remembers the original); applying again replaces the config, so applying twice is
    applying once. ``remove_pruner`` restores the stock model exactly. Returns ``model``.
    """
    config = config or PrunerConfig()
    if not isinstance(config, PrunerConfig):
        raise ValueError(f"config must be a PrunerConfig, got {type(config).__name__}")
    inner = _llava_inner(model)
    language_model = inner.language_model
    get_method(config.method)  # unknown method: fail now, not at the first generate
    check_split_layer(config, len(language_model.layers))
    placement_lattice(*image_grid(inner.config), 1, config.authors_grid)  # non-grid features, authors_grid: fail now
    implementation = language_model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"the language model uses attn_implementation={implementation!r}; the pruned decoder supports "
            f"{SUPPORTED_ATTENTION}: load with load_llava(path, attn_implementation='sdpa')"
        )
    install_pruner(inner, _PrunedLlavaForward, config)
    return model


def remove_pruner(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruner`` on this instance (a no-op if it is not applied). Returns ``model``."""
    uninstall_pruner(_llava_inner(model), _PrunedLlavaForward)
    return model


def pruner_config(model: nn.Module) -> PrunerConfig | None:
    """The PrunerConfig applied to this instance, or None."""
    return installed_config(_llava_inner(model), _PrunedLlavaForward)


# ================================================================================================================
# The adapter: this module's functions behind base.ModelAdapter, registered for config model_type "llava"
# ================================================================================================================


def check_native_size(config: Any, image_size: tuple[int, int]) -> None:
    """ValueError unless image_size is the CLIP tower's own (H, W)."""
    side = config.vision_config.image_size
    if tuple(image_size) != (side, side):
        raise ValueError(f"LLaVA-1.5's CLIP tower takes {side}x{side} images only (its position embeddings fix the "
                         f"size); drop --image-size {image_size[0]}x{image_size[1]}")


class LlavaAdapter(DecoderAdapter):
    """``base.ModelAdapter`` for LLaVA-1.5 in llava-hf format (``LlavaForConditionalGeneration``)."""

    family = "LLaVA-1.5"
    model_types = ("llava",)
    tiny_models = TINY_MODELS
    hub_aliases = HUB_ALIASES
    tiny_spec_file = SPEC_FILE
    export_targets = ("executorch", "onnx")

    load = staticmethod(load_llava)
    parameter_counts = staticmethod(parameter_counts)
    encode_image = staticmethod(encode_image)
    prompt = staticmethod(llava_prompt)
    prompt_image_start = staticmethod(prompt_image_start)
    tokenizer_info = staticmethod(tokenizer_info)
    processor_files = staticmethod(llava_processor_files)
    embed_prompt = staticmethod(embed_prompt)
    select_before_llm = staticmethod(select_before_llm)
    prefill_with_pruning = staticmethod(prefill_with_pruning)
    apply_pruner = staticmethod(apply_pruner)
    remove_pruner = staticmethod(remove_pruner)
    pruner_config = staticmethod(pruner_config)

    def build_tiny(self, directory: str | Path, spec: TinyLlavaSpec) -> Path:
        return build_tiny_llava(directory, spec=spec)

    def check_directory(self, path: str | Path) -> Path:
        return _check_llava_directory(Path(path))

    def default_image_size(self, path: str | Path) -> tuple[int, int]:
        """The CLIP tower's own input size (its only one)."""
        from transformers import AutoConfig

        side = AutoConfig.from_pretrained(path).vision_config.image_size
        return side, side

    def geometry(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelGeometry:
        """From a LlavaConfig (or a loaded model): the grid at the vision config's image size, the Llama decoder
        layout. image_size: None or that size (ValueError otherwise)."""
        config = getattr(config, "config", config)
        if image_size is not None:
            check_native_size(config, image_size)
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        return ModelGeometry(
            image_size=(vision.image_size, vision.image_size),
            grid=image_grid(config),
            image_token_id=int(config.image_token_id),
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            hidden_size=text.hidden_size,
            position_scheme="1d",
        )

    def pixel_input_shape(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """The vision encoder's pixel input at the export size: [1, 3, H, W]."""
        return (1, 3, *geometry.image_size)

    def vision_encoder(self, model: nn.Module, image_size: tuple[int, int], *,
                       patch_matmul: bool = False) -> nn.Module:
        """The exportable vision tower + projector: pixel_values [1, 3, H, W] -> image tokens [1, N, D].
        patch_matmul is accepted and changes nothing: CLIP's 2-D patch convolution lowers on every backend."""
        return ImageEncoder(model, encode_image)

    def prompt_positions(self, before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
        """RoPE position ids of [before] + [image] + [after]: 0 .. T-1 -> [1, T]."""
        return torch.arange(before + grid[0] * grid[1] + after)[None]

    def image_preprocessing(self, processor: Any) -> Any:
        """The runtime's ImagePreprocessing (CLIP's steps) read from the processor's image processor."""
        from runtime.preprocess import ImagePreprocessing

        return ImagePreprocessing.from_hf_processor(processor.image_processor)

    def language_model(self, model: nn.Module) -> nn.Module:
        return _llava_inner(model).language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def cls_attention(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> the CLIP tower's [CLS] attention over the patches [B, N] (VisionZip)."""
        tower = _llava_inner(model).vision_tower
        states = tower(pixel_values.to(tower.dtype), output_hidden_states=True).hidden_states
        return clip_cls_attention(tower, states, model.config.vision_feature_layer)


LLAVA = register_adapter(LlavaAdapter())
