"""What every model-family adapter answers, and the registry that picks one by the checkpoint's ``model_type``.

A family = one adapter module (``llava.py``) plus its tiny-model spec (``llava_tiny.py``); it registers an object
satisfying ``ModelAdapter`` with ``register_adapter`` at import. Exporters, the runtime, viz, eval and bench ask
``adapter_for(path_or_config)`` for it and never read a checkpoint's config keys themselves. The shared decoder
machinery (split KV cache, kept positions, the pruned prefill, decode steps) is in ``decoder.py``; resolving model
names (tiny builds, hub aliases, local directories) in ``hub.py``.

Shapes as in ``decoder.py``: B batch, T prompt length, N image tokens, R kept, D text width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..config import PrunerConfig

POSITION_SCHEMES = ("1d", "mrope")


@dataclass(frozen=True)
class ModelGeometry:
    """A checkpoint's shapes at the export resolution, from its config alone (no weights).

    image_size:      (H, W) pixels the vision tower takes
    grid:            (rows, cols) of the image-token grid the pruner selects over; rows * cols = N
    image_token_id:  the placeholder token the prompt holds N times where the image goes
    num_layers:      decoder layers L (the pruning layer K is in 0..L-1)
    num_heads / num_kv_heads / head_dim / hidden_size: the decoder's attention layout (H, Hkv, d) and width D
    position_scheme: "1d" (one RoPE position per token, [B, T]) or "mrope" (3-D (t, h, w) positions, [3, B, T])
    merge:           vision patches per image token along each side (Qwen2-VL's spatial merge 2; LLaVA-1.5 1),
                     what ``PrunerConfig.authors_grid`` needs (``select_tokens(..., merge=)``)
    """

    image_size: tuple[int, int]
    grid: tuple[int, int]
    image_token_id: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    position_scheme: str = "1d"
    merge: int = 1

    def __post_init__(self) -> None:
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"position_scheme must be one of {POSITION_SCHEMES}, got {self.position_scheme!r}")

    @property
    def num_image_tokens(self) -> int:
        """N: image tokens in the prompt (before pruning)."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a checkpoint by part, from its config alone: what the export memory model needs."""

    vision: int  # vision tower + projector
    decoder_layer: int  # one decoder layer
    decoder_layers: int  # how many
    embedding: int  # token embedding table
    lm_head: int  # 0 when tied to the embedding
    other: int = 0  # final norm and the like

    @property
    def decoder(self) -> int:
        """The parameters the decoder's linear layers hold (the layers and the LM head): what 8da4w quantizes."""
        return self.decoder_layer * self.decoder_layers + self.lm_head

    @property
    def total(self) -> int:
        return self.vision + self.decoder + self.embedding + self.other


@runtime_checkable
class ModelAdapter(Protocol):
    """One model family: everything the rest of the product needs to know about it.

    Models are the stock transformers classes loaded with ``from_pretrained``; the decoder-side pruning runs the
    stock decoder layers through ``decoder.py``. Tensors follow the shapes in ``decoder.py``.
    """

    family: str  # human-readable, e.g. "LLaVA-1.5"
    model_types: tuple[str, ...]  # config.json model_type values this adapter loads, e.g. ("llava",)
    tiny_models: Mapping[str, Any]  # tiny-model name -> its spec (a frozen dataclass)
    hub_aliases: Mapping[str, str]  # short name -> hub id, resolved from the local Hugging Face cache only
    tiny_spec_file: str  # stamp written next to a tiny build (its spec as JSON): another spec is rebuilt
    export_targets: tuple[str, ...]  # the pruner-export targets built for this family ("executorch", "onnx")

    # ---------------------------------------------------------------- checkpoints
    def build_tiny(self, directory: str | Path, spec: Any) -> Path:
        """Write the tiny model ``spec`` (model, tokenizer, processor) to ``directory`` with save_pretrained."""
        ...

    def check_directory(self, path: str | Path) -> Path:
        """``path`` if it holds a checkpoint of this family, else ValueError saying what is supported."""
        ...

    def load(self, path: str | Path, dtype: torch.dtype = torch.float32, *,
             attn_implementation: str | None = None) -> tuple[nn.Module, Any]:
        """-> (model in eval mode, its processor)."""
        ...

    def parameter_counts(self, path: str | Path) -> ParameterCounts:
        """Parameters by part from config.json alone."""
        ...

    def default_image_size(self, path: str | Path) -> tuple[int, int]:
        """(H, W) an export of this checkpoint takes images at when none is asked for."""
        ...

    def geometry(self, config: Any, image_size: tuple[int, int] | None = None) -> ModelGeometry:
        """The geometry at ``image_size`` (None: the family default; a loaded model: its own) from a config or a
        loaded model; ValueError for a size the family cannot take."""
        ...

    def pixel_input_shape(self, geometry: ModelGeometry) -> tuple[int, ...]:
        """The vision encoder's pixel_values shape at that geometry (LLaVA [1, 3, H, W]; Qwen2-VL [P, 1176])."""
        ...

    def image_preprocessing(self, processor: Any) -> Any:
        """``runtime.preprocess.ImagePreprocessing`` reproducing the processor's pixels without transformers."""
        ...

    def prompt_positions(self, before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
        """RoPE position ids of [before] + [image] + [after]: [1, T] or M-RoPE's [3, 1, T]."""
        ...

    # ---------------------------------------------------------------- modules of a loaded model
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``layers``, ``norm``, ``rotary_emb``) that ``decoder.py`` runs."""
        ...

    def lm_head(self, model: nn.Module) -> nn.Module:
        """Final-norm hidden [B, S, D] -> logits [B, S, V]."""
        ...

    # ---------------------------------------------------------------- image and prompt
    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Fixed-size pixel input -> the image tokens' input embeddings [B, N, D]."""
        ...

    def cls_attention(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """VisionZip's signal for the same pixels -> [B, N]."""
        ...

    def vision_encoder(self, model: nn.Module, image_size: tuple[int, int], *,
                       patch_matmul: bool = False) -> nn.Module:
        """An exportable module: pixel_values (``pixel_input_shape``) -> image tokens [1, N, D]. patch_matmul: a
        patch embedding the target cannot lower (a 5-D convolution) as the equal matmul over flattened patches."""
        ...

    def prompt(self, question: str) -> str:
        """The family's prompt for one image and one question (the image as its placeholder)."""
        ...

    def prompt_image_start(self, tokenizer: Any, image_token_id: int) -> int:
        """Index of the image span in the tokenized prompt format."""
        ...

    def tokenizer_info(self, model: nn.Module, processor: Any, files: list[str]) -> dict[str, Any]:
        """The ``export_config.json["tokenizer"]`` block: special ids, chat template, prompt format."""
        ...

    def processor_files(self, processor: Any, image_placeholders: int) -> dict[str, dict[str, Any]]:
        """{file name: JSON payload} of the processor configs an exported folder carries, written so that the
        stock processors (transformers, transformers.js) put ``image_placeholders`` image tokens per image in the
        prompt; {} where no config can say so (the checkpoint's files are then copied unchanged)."""
        ...

    def embed_prompt(self, model: nn.Module, input_ids: torch.Tensor,
                     pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """input_ids [B, T] + pixels -> (embeds [B, T, D] with the image tokens in place, image_start [B], N)."""
        ...

    # ---------------------------------------------------------------- pruning
    def select_before_llm(self, model: nn.Module, features: torch.Tensor, image_start: int | torch.Tensor,
                          grid: tuple[int, int], config: PrunerConfig) -> Any:
        """The layer-0 placement's Selection over features [1, N, D]."""
        ...

    def prefill_with_pruning(self, model: nn.Module, embeds: torch.Tensor, image_start: int | torch.Tensor,
                             n_image: int, grid: tuple[int, int], config: PrunerConfig, **kwargs: Any) -> Any:
        """Pruned prefill -> ``decoder.PrefillOutput`` (logits, per-layer K/V, positions, selection)."""
        ...

    def decode_step(self, model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, cache: Any,
                    split_layer: int, key_valid_full: torch.Tensor | None = None,
                    key_valid_pruned: torch.Tensor | None = None) -> torch.Tensor:
        """Continue a pruned prefill's cache -> final-norm hidden [B, S, D]."""
        ...

    def apply_pruner(self, model: nn.Module, config: PrunerConfig | None = None) -> nn.Module:
        """Prune this model instance's prefill; its stock ``generate`` then decodes as usual."""
        ...

    def remove_pruner(self, model: nn.Module) -> nn.Module:
        """Undo ``apply_pruner`` on this instance."""
        ...

    def pruner_config(self, model: nn.Module) -> PrunerConfig | None:
        """The PrunerConfig applied to this instance, or None."""
        ...


def meta_parameter_counts(model_class: type, config: Any) -> ParameterCounts:
    """Parameters by part of ``model_class(config)`` built on the meta device (no memory, no weights): the decoder
    stack's ``language_model.layers.*`` per layer, ``embed_tokens``, ``lm_head`` (0 when tied), the rest of the
    language model as other, everything else (vision tower, projector / merger) as vision."""
    with torch.device("meta"):
        model = model_class._from_config(config)
    parts = dict.fromkeys(("vision", "layers", "embedding", "lm_head", "other"), 0)
    for name, parameter in model.named_parameters():
        part = ("lm_head" if name.startswith("lm_head") else "embedding" if "embed_tokens" in name
                else "layers" if "language_model.layers." in name else "other" if "language_model." in name
                else "vision")
        parts[part] += parameter.numel()
    layers = config.text_config.num_hidden_layers
    return ParameterCounts(vision=parts["vision"], decoder_layer=parts["layers"] // layers, decoder_layers=layers,
                           embedding=parts["embedding"], lm_head=parts["lm_head"], other=parts["other"])


class DecoderAdapter:
    """What adapters of Llama-like decoders share: decoding continues through ``decoder.decode_step`` on the stack
    ``language_model(model)`` returns."""

    def language_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def decode_step(self, model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, cache: Any,
                    split_layer: int, key_valid_full: torch.Tensor | None = None,
                    key_valid_pruned: torch.Tensor | None = None) -> torch.Tensor:
        """Continue a pruned prefill's cache: embeds [B, S, D] at positions [B, S] ([3, B, S]) -> final-norm hidden."""
        from .decoder import decode_step

        return decode_step(self.language_model(model), embeds, positions, cache, split_layer, key_valid_full,
                           key_valid_pruned)


class ImageEncoder(nn.Module):
    """An exportable module around a family's ``encode_image(model, pixel_values) -> [1, N, D]``."""

    def __init__(self, model: nn.Module, encode: Any):
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(self.model, pixel_values)


def tokenizer_block(model: nn.Module, processor: Any, files: list[str], prompt_format: str) -> dict[str, Any]:
    """The `export_config.json["tokenizer"]` block every target writes (and the eager runtime uses): special ids
    and tokens, the chat template and the family's prompt format (``prompt_format``: a literal image token and a
    {prompt} field). The image token is the config's ``image_token_id``."""
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({int(e) for e in ([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])}
                     | ({int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()))
    image_token_id = int(model.config.image_token_id)
    return {
        "files": files,
        "bos_id": tokenizer.bos_token_id,
        "eos_ids": eos_ids,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "image_token_id": image_token_id,
        "image_token": tokenizer.convert_ids_to_tokens(image_token_id),
        "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "prompt_format": prompt_format,
    }


# ================================================================================================================
# Registry
# ================================================================================================================

_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one for each of its ``model_types`` (a model type claimed twice raises). Returns it."""
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"{type(adapter).__name__} does not implement ModelAdapter")
    for model_type in adapter.model_types:
        current = _REGISTRY.get(model_type)
        if current is not None and current is not adapter:
            raise ValueError(f"model_type {model_type!r} already has an adapter ({current.family})")
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def registered_adapters() -> tuple[ModelAdapter, ...]:
    """Every registered adapter once, in registration order."""
    return tuple(dict.fromkeys(_REGISTRY.values()))


def supported_model_types() -> str:
    """The supported config model types for error messages: "model_type 'llava' (LLaVA-1.5), ..."."""
    return "model_type " + ", ".join(f"{t!r} ({a.family})" for t, a in _REGISTRY.items())


def model_type_of(path_or_config: Any) -> str | None:
    """config.json's ``model_type`` from a checkpoint directory (or its config.json), a config dict, a transformers
    config or a model (its ``.config``). A directory without config.json raises ValueError."""
    source = path_or_config
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        config_file = path if path.is_file() else path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{path} has no config.json; pass a directory written by save_pretrained (e.g. a hub snapshot)"
            )
        source = json.loads(config_file.read_text())
    if isinstance(source, Mapping):
        return source.get("model_type")
    config = getattr(source, "config", None) if isinstance(source, nn.Module) else source
    return getattr(config, "model_type", None)


def adapter_for(path_or_config: Any) -> ModelAdapter:
    """The adapter for a checkpoint directory, config.json, config dict, transformers config or loaded model.

    Raises ValueError naming the supported model types when none is registered for its ``model_type``.
    """
    model_type = model_type_of(path_or_config)
    adapter = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        where = f"{path_or_config} holds" if isinstance(path_or_config, (str, Path)) else "got"
        raise ValueError(
            f"{where} a {model_type!r} model, which no adapter supports; supported checkpoints have config "
            f"{supported_model_types()}"
        )
    return adapter


# ================================================================================================================
# Family-agnostic entry points: the model's own adapter does the work
# ================================================================================================================


def apply_pruner(model: nn.Module, config: PrunerConfig | None = None) -> nn.Module:
    """Prune image tokens in this model instance's prefill, whatever its family (``adapter_for(model)``); its stock
    ``generate`` then decodes as usual. Raises ValueError for a model no adapter supports. Returns ``model``."""
    return adapter_for(model).apply_pruner(model, config)


def remove_pruner(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruner`` on this instance (a no-op if it is not applied). Returns ``model``."""
    return adapter_for(model).remove_pruner(model)


def pruner_config(model: nn.Module) -> PrunerConfig | None:
    """The PrunerConfig applied to this instance, or None."""
    return adapter_for(model).pruner_config(model)
