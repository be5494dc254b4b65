"""The tiny LLaVA-1.5 for tests and the demo: LLaVA-1.5's architecture at toy width, random weights from a seed.

``build_tiny_llava`` writes the model, a byte-level BPE tokenizer built in code (LLaVA-1.5's special tokens and
conversation format as a chat template) and the CLIP processor with ``save_pretrained``; ``TINY_MODELS`` names the
builds ``resolve_model`` knows (``tiny-llava``: 24 x 24 grid like LLaVA-1.5; ``tiny-llava-gqa``: 16 x 16, grouped-query
attention). Benchmarks build LLaVA-1.5-7B widths with few layers from a ``TinyLlavaSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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


SPEC_FILE = "tiny_llava_spec.json"  # written next to a tiny build; a build from another spec is rebuilt


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
