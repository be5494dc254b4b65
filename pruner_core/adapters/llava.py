"""LLaVA-1.5 (llava-hf format): the model zoo and eager image-token pruning. The only file that knows this family.

Two halves:

* Model zoo: ``build_tiny_llava`` (LLaVA-1.5's architecture at toy width, random weights from a seed, a tokenizer and
  processor built in code, all saved with ``save_pretrained``), ``resolve_model`` (names, aliases, hub ids looked up
  offline, local directories) and ``load_llava``.
* Pruning: ``prefill_with_pruning`` / ``prune_and_prefill`` run the stock decoder layers of a loaded model over a prompt
  and drop image tokens between layers K-1 and K (``PrunerConfig.layer``); ``decode_step`` continues from their cache;
  ``apply_pruner`` / ``remove_pruner`` route ``model.generate`` through them for one model instance.

Shapes: B batch, T prompt length, N image tokens, R kept tokens, T' = T - N + R, D text width, H query heads,
Hkv key/value heads, d head width, L decoder layers, K the pruning layer.

Nothing here hard-codes a grid, an image span or a layer count: they are read from the model's config, the processor's
output and the prompt's placeholder tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..api import select_tokens
from ..config import PrunerConfig
from ..methods import get_method
from ..primitives import take_rows
from ..selection import Selection

# ================================================================================================================
# Model zoo
# ================================================================================================================

HUB_ALIASES: dict[str, str] = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
}

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

# LLaVA-1.5's conversation format as a Jinja chat template: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% else -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ' ' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# What the tiny tokenizer's byte-level BPE is trained on; any text still encodes (byte fallback alphabet).
_TOKENIZER_CORPUS = (
    "USER: What is shown in this image? ASSISTANT: The image shows a cat sitting on a wooden table.",
    "USER: Describe the photo in detail. ASSISTANT: An astronaut in a white suit stands in front of a flag.",
    "What color is the sky? The sky is blue and there are a few white clouds.",
    "How many people are in the picture? There are two people walking along the street.",
    "Is there a dog in the image? No, there is a small brown cat looking at the camera.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A red car is parked next to a green tree on a sunny day in the city.",
    "Read the text on the sign. The sign says stop, and it is red with white letters.",
)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA-1.5: CLIP ViT tower -> 2-layer GELU projector -> Llama decoder, toy widths."""

    image_size: int = 336
    patch_size: int = 14
    gqa: bool = False
    seed: int = 0
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    vocab_size: int = 512  # BPE training target; the model's vocab is the tokenizer's actual size
    max_positions: int = 4096
    vision_ffn: int = 0  # 0 = 4 x vision_hidden (CLIP's ratio)
    text_ffn: int = 0  # 0 = 4 x text_hidden; LLaVA-1.5-7B: 11008
    dtype: str = "float32"  # weights as built and saved: "float16" / "bfloat16" build directly in half precision
    text_vocab: int = 0  # rows of the embedding and LM head; 0 = the tokenizer's size (llava-1.5-7b-hf: 32064)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "text_hidden",
                     "text_layers", "text_heads", "vocab_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyLlavaSpec.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                f"use e.g. image_size={self.image_size // self.patch_size * self.patch_size}"
            )
        if self.vision_layers < 2:
            raise ValueError(
                "vision_layers must be >= 2: LLaVA-1.5 reads the penultimate layer (vision_feature_layer=-2)"
            )
        if self.text_hidden % self.text_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden widths must be multiples of their head counts")
        if self.gqa and self.text_heads % 2:
            raise ValueError("gqa=True halves the key/value heads, so text_heads must be even")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"TinyLlavaSpec.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def kv_heads(self) -> int:
        return self.text_heads // 2 if self.gqa else self.text_heads


TINY_MODELS: dict[str, TinyLlavaSpec] = {
    "tiny-llava": TinyLlavaSpec(image_size=336, gqa=False),  # 24 x 24 grid, like LLaVA-1.5
    "tiny-llava-gqa": TinyLlavaSpec(image_size=224, gqa=True),  # 16 x 16 grid, grouped-query attention
}


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
        "prompt_format": llava_prompt("{prompt}"),
    }


def _build_tokenizer(spec: TinyLlavaSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    # LLaVA-1.5 (Llama tokenizer) prepends <s> to every prompt.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # batched generation pads on the left, as llava-hf does
        chat_template=CHAT_TEMPLATE,
    )


def _tiny_config(spec: TinyLlavaSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn or 4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.text_vocab),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn or 4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    num_patches = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def build_tiny_llava(
    directory: str | Path,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    gqa: bool = False,
    seed: int = 0,
    spec: TinyLlavaSpec | None = None,
) -> Path:
    """Write a tiny random LLaVA-1.5 (model, tokenizer, processor) to ``directory`` with ``save_pretrained``.

    The architecture is LLaVA-1.5's (CLIP vision tower read at ``vision_feature_layer=-2`` with its [CLS] dropped,
    2-layer GELU projector, Llama decoder); only the widths are toy. Weights come from ``seed`` alone, so two builds
    are identical. The processor expands ``<image>`` to (image_size / patch_size)^2 placeholders.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if spec is None:  # `spec` sets every size at once (benchmarks build LLaVA-1.5-7B widths with few layers)
        spec = TinyLlavaSpec(image_size=image_size, patch_size=patch_size, gqa=gqa, seed=seed)
    image_size, patch_size, seed = spec.image_size, spec.patch_size, spec.seed
    directory = Path(directory)
    tokenizer = _build_tokenizer(spec)
    config = _tiny_config(spec, tokenizer)
    config.vision_config._attn_implementation = "eager"  # lets callers ask the tower for its attention maps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.dtype == "float32":
            model = LlavaForConditionalGeneration(config).eval()
        else:  # initialised in half precision: a 7B never exists in fp32 (26 GiB)
            model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, spec.dtype)).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's [CLS], which the "default" strategy drops again
        chat_template=CHAT_TEMPLATE,
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="2GB")  # shards: a 7B is never serialised as one buffer
    processor.save_pretrained(directory)
    return directory


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


def _supported_names() -> str:
    return (
        f"{', '.join(sorted(TINY_MODELS))} (built locally), {', '.join(sorted(HUB_ALIASES))} (aliases of "
        f"{', '.join(HUB_ALIASES[k] for k in sorted(HUB_ALIASES))}), a hub id 'owner/name' already in the local "
        "Hugging Face cache, or a local llava-hf directory"
    )


def _from_hub_cache(repo_id: str, hf_cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as error:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and models are never downloaded here; fetch it once "
            f"with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`), or pass "
            f"the path of a local copy ({type(error).__name__}: {error})"
        ) from None


SPEC_FILE = "tiny_llava_spec.json"  # written next to a tiny build; a build from another spec is rebuilt


def _is_built(target: Path, spec: TinyLlavaSpec) -> bool:
    stamp = target / SPEC_FILE
    return (target / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec)


def _build_once(name: str, target: Path) -> Path:
    spec = TINY_MODELS[name]
    if _is_built(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_llava(staging, image_size=spec.image_size, patch_size=spec.patch_size, gqa=spec.gqa, seed=spec.seed)
        (staging / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))
        if target.exists() and not _is_built(target, spec):
            shutil.rmtree(target)  # a stale build from another spec
        try:
            os.replace(staging, target)  # atomic: a half-written build is never visible under `target`
        except OSError:
            if not _is_built(target, spec):  # only a concurrent build that finished first is acceptable
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str, cache_dir: str | Path, *, hf_cache_dir: str | Path | None = None) -> Path:
    """A model name -> a local llava-hf directory, never downloading.

    ``tiny-llava`` / ``tiny-llava-gqa`` are built into ``cache_dir/<name>`` on first use and reused after;
    ``llava-1.5-7b`` / ``llava-1.5-13b`` and any ``owner/name`` hub id are looked up in the local Hugging Face cache
    (``hf_cache_dir``, default: the standard one); a path to a directory is used as is. Anything that is not a LLaVA
    checkpoint (config ``model_type != "llava"``) raises ``ValueError``; a hub id that is not cached raises
    ``FileNotFoundError`` saying how to fetch it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string; supported: {_supported_names()}")
    if name in TINY_MODELS:
        return _build_once(name, Path(cache_dir) / name)
    if name in HUB_ALIASES:
        return _check_llava_directory(_from_hub_cache(HUB_ALIASES[name], hf_cache_dir))
    local = Path(name).expanduser()
    if local.is_dir():
        return _check_llava_directory(local)
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return _check_llava_directory(_from_hub_cache(name, hf_cache_dir))
    raise ValueError(f"unknown model {name!r} (not a directory either); supported: {_supported_names()}")


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


def estimate_parameters(path: str | Path) -> int:
    """Parameter count of a llava-hf checkpoint from its config.json alone (no weights needed).

    CLIP tower + 2-layer projector + Llama decoder (GQA-aware) + LM head; used to estimate export memory before
    loading anything. llava-1.5-7b: ~7.06e9.
    """
    return parameter_counts(path).total


def parameter_counts(path: str | Path) -> ParameterCounts:
    """``estimate_parameters`` by part (vision, one decoder layer and their number, embedding, LM head)."""
    config = json.loads((_check_llava_directory(Path(path)) / "config.json").read_text())
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    width = text.get("hidden_size", 4096)
    heads = text.get("num_attention_heads", 32)
    head_dim = text.get("head_dim") or width // heads
    kv_width = text.get("num_key_value_heads", heads) * head_dim
    ffn = text.get("intermediate_size", 11008)
    vocab = text.get("vocab_size", config.get("vocab_size", 32064))
    layer = 2 * width * heads * head_dim + 2 * width * kv_width + 3 * width * ffn + 2 * width
    embedding = vocab * width
    lm_head = 0 if text.get("tie_word_embeddings", False) else vocab * width
    v_width = vision.get("hidden_size", 1024)
    v_ffn = vision.get("intermediate_size", 4096)
    patch, image = vision.get("patch_size", 14), vision.get("image_size", 336)
    v_layer = 4 * v_width * v_width + 2 * v_width * v_ffn + 4 * v_width
    tower = vision.get("num_hidden_layers", 24) * v_layer + 3 * patch * patch * v_width
    tower += ((image // patch) ** 2 + 1) * v_width
    projector = v_width * width + width * width + 2 * width
    return ParameterCounts(vision=tower + projector, decoder_layer=layer,
                           decoder_layers=text.get("num_hidden_layers", 32), embedding=embedding, lm_head=lm_head,
                           other=width)


def load_llava(path: str | Path, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None):
    """-> (LlavaForConditionalGeneration in eval mode, its processor), loaded with the stock ``from_pretrained``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = _check_llava_directory(Path(path))
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


def image_span_starts(input_ids: torch.Tensor, image_token_id: int, n_image: int) -> torch.Tensor:
    """input_ids [B, T] -> image_start [B]: where each row's single run of ``n_image`` placeholders begins.

    Raises when a row has no image, several images, or a span of another length (the processor and the model
    disagree on the image size).
    """
    is_image = input_ids == image_token_id  # [B, T]
    counts = is_image.sum(1)
    starts = is_image.int().argmax(1)
    for row in range(input_ids.shape[0]):
        count, start = int(counts[row]), int(starts[row])
        if count != n_image or not bool(is_image[row, start : start + n_image].all()):
            raise ValueError(
                f"prompt {row} holds {count} image placeholder tokens but the pruner needs exactly one image of "
                f"{n_image} tokens in one run; use one '<image>' per prompt and the model's own processor"
            )
    return starts


# ================================================================================================================
# Decoder pieces: keys, attention probes, masks, the layer loop
# ================================================================================================================


class KVCache(Protocol):
    """What the stock attention layers need from a cache: ``update`` appends and returns the layer's K/V."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs): ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVRecorder:
    """The smallest cache the stock layers accept: per layer, keys and values [B, Hkv, L_i, d] grown by ``update``.

    Plain lists of tensors, no transformers types, so an exporter can read them as graph outputs.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, n*d] -> [B, n, S, d]"""
    batch, length, _ = x.shape
    return x.view(batch, length, -1, head_dim).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, S, d], cos/sin [B, S, d] -> x rotated (the Llama rotary embedding, half-split convention)."""
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def layer_keys(layer: nn.Module, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The post-RoPE keys one decoder layer computes for its input, all heads concatenated after the GQA repeat.

    hidden_in [B, S, D] (the layer's input, before its input_layernorm), cos/sin [B, S, d] -> keys [B, S, H*d].
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    keys = _rope(_heads(attn.k_proj(normed), attn.head_dim), cos, sin)  # [B, Hkv, S, d]
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, H, S, d]
    batch, heads, length, head_dim = keys.shape
    return keys.transpose(1, 2).reshape(batch, length, heads * head_dim)


def last_token_attention(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last token over the whole sequence in one decoder layer, averaged over heads (FastV's signal).

    hidden_in [B, T, D] (the layer's input), cos/sin [B, T, d], key_valid [B, T] bool or None -> [B, T].
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    query = _rope(_heads(attn.q_proj(normed[:, -1:]), attn.head_dim), cos[:, -1:], sin[:, -1:])  # [B, H, 1, d]
    keys = _rope(_heads(attn.k_proj(normed), attn.head_dim), cos, sin)  # [B, Hkv, T, d]
    keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)  # [B, H, T, d]
    scores = (query @ keys.transpose(-1, -2)).float() * attn.scaling  # [B, H, 1, T]
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(-1).mean(1)[:, 0].to(hidden_in.dtype)  # [B, T]


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


SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_bias(
    key_valid: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
    implementation: str,
) -> torch.Tensor | None:
    """Causal + padding mask for the stock attention layers -> additive [B, 1, q_len, kv_len], or None.

    The queries are the last ``q_len`` of the ``kv_len`` cached entries (order = causality, whatever the RoPE
    positions are). key_valid [B, kv_len] bool marks real (non-padding) entries; None = no padding. With ``sdpa``
    and no padding, a square (prefill) or single-query (decode) block needs no mask: None lets sdpa use its causal
    kernel, as stock transformers does.
    """
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by the pruned decoder; load the model "
            f"with attn_implementation in {SUPPORTED_ATTENTION}"
        )
    if key_valid is None and implementation == "sdpa" and (q_len == 1 or q_len == kv_len):
        return None
    query_index = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q, 1]
    allowed = torch.arange(kv_len, device=device)[None, :] <= query_index  # [q, kv]
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # finfo.min, not -inf: all-padding rows stay finite


def rotary(language_model: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock rotary embedding's (cos, sin) [B, S, d] for positions [B, S].

    Calls the module's forward beneath its ``torch.no_grad`` decorator (same values): a grad-mode switch inside a
    graph that also holds the selection's ``scan`` / ``cond`` breaks ``torch.export`` (torch 2.13).
    """
    module = language_model.rotary_emb
    undecorated = getattr(type(module).forward, "__wrapped__", None)
    return undecorated(module, x, positions) if undecorated is not None else module(x, positions)


def run_layers(
    language_model: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    cache: KVCache,
    layers: range,
) -> torch.Tensor:
    """Run the stock decoder layers ``layers`` on hidden [B, S, D] at RoPE positions [B, S] -> [B, S, D].

    Every layer in ``layers`` must hold the same number of cached entries (it appends S more); key_valid
    [B, cached + S] marks the non-padding entries (None = none padded).
    """
    if len(layers) == 0:
        return hidden
    batch, length, _ = hidden.shape
    kv_len = cache.get_seq_length(layers[0]) + length
    mask = attention_bias(
        key_valid, batch, length, kv_len, hidden.dtype, hidden.device, language_model.config._attn_implementation
    )
    position_embeddings = rotary(language_model, hidden, positions)  # (cos, sin) [B, S, d]
    for index in layers:
        hidden = language_model.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
        )
    return hidden


def _as_starts(image_start: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(image_start, torch.Tensor):
        return image_start.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
    return torch.full((batch,), int(image_start), dtype=torch.long, device=device)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T] or [B, T, D] gathered along T with index [B, S] -> [B, S] or [B, S, D]"""
    if x.dim() == 2:
        return x.gather(1, index)
    return take_rows(x, index)


def kept_sequence_index(image_start: torch.Tensor, kept: torch.Tensor, length: int, n_image: int) -> torch.Tensor:
    """Where each slot of the pruned sequence comes from in the full one.

    image_start [B], kept [B, R] ascending indices within the N image tokens, length T -> [B, T - N + R]:
    [text before] + [start + kept] + [text after]. Static shapes, no data-dependent control flow.
    """
    budget = kept.shape[1]
    slot = torch.arange(length - n_image + budget, device=kept.device)[None, :]  # [1, T']
    start = image_start[:, None]  # [B, 1]
    in_image = (slot >= start) & (slot < start + budget)
    rel = (slot - start).clamp(0, budget - 1)  # [B, T']
    image_source = start + kept.gather(1, rel)
    return torch.where(in_image, image_source, torch.where(slot >= start + budget, slot + (n_image - budget), slot))


def _consecutive_positions(
    valid: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions 0, 1, ... over the real tokens (padding gets 0), as generate makes them -> [B, length]."""
    if valid is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    positions = valid.long().cumsum(-1) - 1
    return positions.masked_fill(~valid, 0)


@dataclass(frozen=True)
class PrunedPrefill:
    """What ``prune_and_prefill`` leaves besides the cache it filled.

    hidden:        [B, T', D]  final-norm hidden states of the pruned sequence (feed the LM head with hidden[:, -1])
    positions:     [B, T']     RoPE positions layers >= K used (K >= 1: the kept tokens' original ones; K = 0: 0..T'-1)
    kept_index:    [B, T']     index in the full prompt of each slot of the pruned sequence
    kept_valid:    [B, T']     non-padding mask of the pruned sequence
    next_position: [B]         RoPE position of the first generated token (K >= 1: full length; K = 0: T')
    selection:     the Selection (indices [B, R] within the image span, fused states [B, R, D], order)
    split_layer:   K; layers < K cached T entries, layers >= K cached T'
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    kept_index: torch.Tensor
    kept_valid: torch.Tensor
    next_position: torch.Tensor
    selection: Selection
    split_layer: int


def check_split_layer(config: PrunerConfig, num_layers: int) -> int:
    if config.layer >= num_layers:
        raise ValueError(
            f"PrunerConfig.layer={config.layer} but the language model has {num_layers} decoder layers; "
            f"prune at a layer in 0..{num_layers - 1} (0 = before the LLM, 2 = the paper's default)"
        )
    return config.layer


def prune_and_prefill(
    language_model: nn.Module,
    embeds: torch.Tensor,
    image_start: int | torch.Tensor,
    n_image: int,
    grid: tuple[int, int],
    config: PrunerConfig,
    *,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
) -> PrunedPrefill:
    """Prefill the stock decoder layers on a prompt, keeping R of its N image tokens from layer K on.

    embeds [B, T, D]: the prompt's input embeddings with the projector outputs already in the image span
    [image_start, image_start + N) (``image_start`` an int, or [B] for left-padded batches). ``cache`` receives
    every layer's post-RoPE K/V: layers < K the full T entries, layers >= K the T' = T - N + R kept ones.
    attention_mask [B, T] (1 = real token) and position_ids [B, T] default to no padding and 0..T-1.

    K = config.layer >= 1 (the paper): layers < K run on the full prompt; the selection sees layer K-1's output at
    the image positions (no final norm) and layer K-1's post-RoPE keys there; layers >= K run on [text before] +
    [R kept tokens in original order, fused states] + [text after] at the kept tokens' ORIGINAL positions.
    K = 0: the selection sees the projector outputs and layer 0's keys for them; the kept sequence is an ordinary
    shorter prompt at consecutive positions (what stock runners do with an encoder that returns R tokens).
    Signals for FastV (last token's head-mean attention at layer K-1; layer 0 for K = 0) are computed when the
    method needs them; VisionZip's ``cls_attention`` [B, N] must be passed in (see ``clip_cls_attention``).

    All shapes are fixed by (B, T, N, R), the loops run over layers only: callable under ``torch.export`` with
    int ``image_start`` / ``n_image``.
    """
    batch, length, _ = embeds.shape
    num_layers = len(language_model.layers)
    split = check_split_layer(config, num_layers)
    device = embeds.device
    starts = _as_starts(image_start, batch, device)  # [B]
    valid = None if attention_mask is None else attention_mask.to(device).bool()  # [B, T]
    positions = (
        _consecutive_positions(None, batch, length, device)
        if position_ids is None
        else position_ids.to(device).long().expand(batch, length)
    )  # [B, T]
    image_index = starts[:, None] + torch.arange(n_image, device=device)[None]  # [B, N]

    # layers < K-1, then layer K-1 (whose input the signals probe) on the full prompt
    probe_in = run_layers(language_model, embeds, positions, valid, cache, range(max(split - 1, 0)))
    hidden = run_layers(language_model, probe_in, positions, valid, cache, range(max(split - 1, 0), split))

    text_attention, keys = _decoder_signals(
        language_model, get_method(config.method).needs, max(split - 1, 0), probe_in, positions, valid, image_index
    )
    selection = select_tokens(
        _gather_tokens(hidden, image_index), keys, grid, config,
        text_attention=text_attention, cls_attention=cls_attention,
    )
    pruned, kept_index = _pruned_sequence(hidden, starts, selection, n_image)  # [B, T', D], [B, T']
    kept_valid = torch.ones_like(kept_index, dtype=torch.bool) if valid is None else valid.gather(1, kept_index)
    if split == 0:  # an ordinary shorter prompt
        kept_positions = _consecutive_positions(None if valid is None else kept_valid, *kept_index.shape, device)
    else:  # the kept tokens keep their original RoPE positions
        kept_positions = positions.gather(1, kept_index)

    pruned = run_layers(
        language_model, pruned, kept_positions, None if valid is None else kept_valid, cache, range(split, num_layers)
    )
    return PrunedPrefill(
        hidden=language_model.norm(pruned),
        positions=kept_positions,
        kept_index=kept_index,
        kept_valid=kept_valid,
        next_position=(kept_positions if split == 0 else positions)[:, -1] + 1,
        selection=selection,
        split_layer=split,
    )


def _decoder_signals(
    language_model: nn.Module,
    needs: frozenset[str],
    probe_index: int,
    probe_in: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    image_index: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The decoder-side signals a method needs, from layer ``probe_index`` and its input probe_in [B, T, D].

    -> (text_attention [B, N] or None, keys [B, N, H*d] or None), both at the image positions image_index [B, N].
    """
    probe = language_model.layers[probe_index]
    keys = text_attention = None
    if "keys" in needs:
        image_in = _gather_tokens(probe_in, image_index)  # [B, N, D]
        cos_sin = rotary(language_model, image_in, _gather_tokens(positions, image_index))
        keys = layer_keys(probe, image_in, *cos_sin)
    if "text_attention" in needs:
        cos_sin = rotary(language_model, probe_in, positions)
        text_attention = _gather_tokens(last_token_attention(probe, probe_in, *cos_sin, valid), image_index)
    return text_attention, keys


def _pruned_sequence(
    hidden: torch.Tensor, starts: torch.Tensor, selection: Selection, n_image: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, D] -> (pruned [B, T', D], kept_index [B, T']).

    pruned = [text before] + [the kept tokens, their fused states] + [text after].
    """
    budget = selection.indices.shape[1]
    kept_index = kept_sequence_index(starts, selection.indices, hidden.shape[1], n_image)  # [B, T']
    slot = torch.arange(kept_index.shape[1], device=hidden.device)[None] - starts[:, None]  # [B, T'] rel. to span
    in_image = (slot >= 0) & (slot < budget)
    fused = _gather_tokens(selection.states.to(hidden.dtype), slot.clamp(0, budget - 1))  # [B, T', D]
    return torch.where(in_image[..., None], fused, _gather_tokens(hidden, kept_index)), kept_index


def decode_step(
    language_model: nn.Module,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    split_layer: int,
    key_valid_full: torch.Tensor | None = None,
    key_valid_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue from a ``prune_and_prefill`` cache: embeds [B, S, D] at RoPE positions [B, S] -> final-norm [B, S, D].

    Layers < split_layer attend over their full-prompt cache, layers >= split_layer over the pruned one; both
    append the S new entries. key_valid_full [B, cached_full + S] / key_valid_pruned [B, cached_pruned + S] mark
    non-padding entries (None = no padding). Positions continue from ``PrunedPrefill.next_position``.
    """
    num_layers = len(language_model.layers)
    hidden = run_layers(language_model, embeds, positions, key_valid_full, cache, range(split_layer))
    hidden = run_layers(language_model, hidden, positions, key_valid_pruned, cache, range(split_layer, num_layers))
    return language_model.norm(hidden)


@dataclass(frozen=True)
class PrefillOutput:
    """The result of ``prefill_with_pruning``: everything a decoder needs to continue, as plain tensors.

    logits:        [B, V]  next-token logits after the prompt
    keys / values: L tensors [B, Hkv, L_i, d], post-RoPE; L_i = T for layers < K, T' = T - N + R for layers >= K
    positions:     [B, T'] RoPE positions of the pruned sequence in layers >= K
    next_position: [B]     RoPE position of the first generated token (T for K >= 1 without padding; T' for K = 0)
    kept_index:    [B, T'] index in the full prompt of each pruned-sequence slot
    selection:     the Selection (indices [B, R], fused states [B, R, D], order [B, R])
    split_layer:   K
    """

    logits: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: torch.Tensor
    next_position: torch.Tensor
    kept_index: torch.Tensor
    selection: Selection
    split_layer: int


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
    inner = _llava_inner(model)
    language_model = inner.language_model
    recorder = KVRecorder(len(language_model.layers))
    result = prune_and_prefill(
        language_model, embeds, image_start, n_image, grid, config,
        cache=recorder, attention_mask=attention_mask, position_ids=position_ids, cls_attention=cls_attention,
    )
    logits = model.lm_head(result.hidden[:, -1:])[:, 0]  # [B, V] (a 3-D matmul: ONNX keeps it a MatMul, not a Gemm)
    return PrefillOutput(
        logits=logits,
        keys=tuple(recorder.keys),
        values=tuple(recorder.values),
        positions=result.positions,
        next_position=result.next_position,
        kept_index=result.kept_index,
        selection=result.selection,
        split_layer=result.split_layer,
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


@dataclass(frozen=True)
class _Session:
    """Per-cache state between the pruned prefill and the decode steps that follow it."""

    prompt_length: int  # T: entries the full-prompt layers cached at prefill
    kept_valid: torch.Tensor  # [B, T'] non-padding mask of the pruned prompt
    position_shift: int  # generate counts positions over the full prompt; K = 0 continues at T', i.e. N - R fewer
    split_layer: int


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
    _pruner_sessions: "weakref.WeakKeyDictionary[Any, _Session]"

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
        budget = result.selection.indices.shape[1]
        keep_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if keep_cache:
            self._pruner_sessions[cache] = _Session(
                prompt_length=input_ids.shape[1],
                kept_valid=result.kept_valid,
                position_shift=(n_image - budget) if result.split_layer == 0 else 0,
                split_layer=result.split_layer,
            )
        return LlavaModelOutputWithPast(
            last_hidden_state=result.hidden,
            past_key_values=cache if keep_cache else None,
            image_hidden_states=torch.cat(list(features), dim=0),  # [images * N, D], as the stock forward
        )

    def _pruned_decode(self, session, input_ids, inputs_embeds, attention_mask, position_ids, cache):
        from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

        _check_2d_mask(attention_mask)
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)  # [B, S, D]
        batch, length, _ = embeds.shape
        if position_ids is None:  # layer 0's cache length: full prompt for K >= 1, pruned (= consecutive) for K = 0
            positions = cache.get_seq_length(0) + torch.arange(length, device=embeds.device)[None].expand(batch, -1)
        else:
            positions = position_ids.long().expand(batch, length) - session.position_shift
        key_valid_full = key_valid_pruned = None
        if attention_mask is not None:
            valid = attention_mask.bool()  # [B, T + generated so far], as generate keeps it
            last_layer = len(self.language_model.layers) - 1  # always a pruned layer: T' + generated entries
            generated = cache.get_seq_length(last_layer) - session.kept_valid.shape[1]
            expected = session.prompt_length + generated + length
            if valid.shape[1] != expected:
                raise ValueError(
                    f"attention_mask has {valid.shape[1]} entries, expected {expected} (the full prompt, everything "
                    "generated so far and the new tokens); pass the mask generate keeps"
                )
            key_valid_full = valid
            key_valid_pruned = torch.cat([session.kept_valid, valid[:, session.prompt_length :]], dim=1)
        hidden = decode_step(
            self.language_model, embeds, positions, cache, session.split_layer, key_valid_full, key_valid_pruned
        )
        return LlavaModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


def _check_2d_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"the pruned LLaVA forward takes a 2-D padding mask [B, T], got shape {tuple(attention_mask.shape)}; "
            "pass the processor's attention_mask"
        )


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original: type) -> type:
    patched = _PATCHED_CLASSES.get(original)
    if patched is None:
        patched = type(f"Pruned{original.__name__}", (_PrunedLlavaForward, original), {})
        _PATCHED_CLASSES[original] = patched
    return patched


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
    image_grid(inner.config)  # a non-grid feature strategy: fail now
    implementation = language_model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"the language model uses attn_implementation={implementation!r}; the pruned decoder supports "
            f"{SUPPORTED_ATTENTION}: load with load_llava(path, attn_implementation='sdpa')"
        )
    if not isinstance(inner, _PrunedLlavaForward):
        original = type(inner)
        inner.__class__ = _patched_class(original)
        inner._pruner_original_class = original
    inner._pruner_config = config
    inner._pruner_sessions = weakref.WeakKeyDictionary()
    return model


def remove_pruner(model: nn.Module) -> nn.Module:
    """Undo ``apply_pruner`` on this instance (a no-op if it is not applied). Returns ``model``."""
    inner = _llava_inner(model)
    if isinstance(inner, _PrunedLlavaForward):
        inner.__class__ = inner._pruner_original_class
        for name in ("_pruner_config", "_pruner_original_class", "_pruner_sessions"):
            inner.__dict__.pop(name, None)
    return model


def pruner_config(model: nn.Module) -> PrunerConfig | None:
    """The PrunerConfig applied to this instance, or None."""
    inner = _llava_inner(model)
    return inner._pruner_config if isinstance(inner, _PrunedLlavaForward) else None
