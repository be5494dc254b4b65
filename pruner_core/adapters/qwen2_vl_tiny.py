"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints for tests and the demo (the real architectures at toy widths).

A build writes what a Hugging Face snapshot of ``Qwen/Qwen2-VL-2B-Instruct`` holds, in the same layout: model
weights (``save_pretrained``), a byte-level BPE tokenizer carrying Qwen's special tokens and chat template, and the
image processor's ``preprocessor_config.json``. No processor object is built: ``Qwen2VLProcessor`` needs
torchvision for its video half, which does not import with the CPU torch here (see ``qwen2_vl.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("qwen2_vl", "qwen2_5_vl")  # config.json model_type of each variant

# Qwen2-VL's special tokens (tokenizer_config.json of the Qwen/Qwen2-VL-*-Instruct checkpoints), in their order.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen2-VL instruct conversation format as a Jinja chat template: a default system turn, then
# "<|im_start|>{role}\n{content}<|im_end|>\n" per message, an image part as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_TOKENIZER_CORPUS = (
    "system You are a helpful assistant. user What is shown in this image? assistant A cat on a wooden table.",
    "Describe the photo in detail. An astronaut in a white suit stands in front of a flag.",
    "What color is the sky? The sky is blue and there are a few white clouds.",
    "How many people are in the picture? There are two people walking along the street.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A red car is parked next to a green tree on a sunny day in the city.",
)

SPEC_FILE = "tiny_qwen2_vl_spec.json"  # written next to a tiny build; a build from another spec is rebuilt


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    """Sizes of a tiny Qwen2-VL (``variant="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``).

    Vision: ViT on 14x14 patches (pairs of frames: temporal patch 2), 2x2 patch merger to the text width; Qwen2.5-VL
    adds window attention (``window_size`` pixels) with full attention at ``full_attention_blocks``. Text: a Qwen2
    decoder (q/k/v biases, GQA) with M-RoPE; ``mrope_section`` splits head_dim / 2 over (t, h, w).
    """

    variant: str = "qwen2_vl"
    image_size: tuple[int, int] = (224, 336)  # (H, W) the build exports at by default: 8 x 12 = 96 merged tokens
    seed: int = 0
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_ffn: int | None = None  # vision MLP width; None: 2 * vision_hidden (Qwen2.5-VL-3B: 3420 for 1280)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    kv_heads: int = 2
    text_ffn: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = text_hidden / text_heads / 2
    window_size: int = 56  # Qwen2.5-VL only: window attention span in pixels (a multiple of 28)
    full_attention_blocks: tuple[int, ...] = (1,)  # Qwen2.5-VL only
    vocab_size: int = 600  # BPE training target; the model's vocab is the tokenizer's size
    max_positions: int = 4096
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"TinyQwen2VLSpec.variant must be one of {VARIANTS}, got {self.variant!r}")
        head_dim = self.text_hidden // self.text_heads
        if 2 * sum(self.mrope_section) != head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2} "
                f"(text_hidden {self.text_hidden} / text_heads {self.text_heads} / 2)"
            )
        if self.variant == "qwen2_vl" and self.vision_ffn is not None and self.vision_ffn % self.vision_hidden:
            raise ValueError(f"Qwen2-VL's vision MLP is an integer multiple of its width (mlp_ratio): vision_ffn "
                             f"{self.vision_ffn} is not a multiple of vision_hidden {self.vision_hidden}")
        if self.text_heads % self.kv_heads:
            raise ValueError(f"text_heads {self.text_heads} is not a multiple of kv_heads {self.kv_heads}")


def build_tokenizer(spec: TinyQwen2VLSpec):
    """A byte-level BPE tokenizer with Qwen's special tokens (no BOS, as Qwen's), chat template included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )


def tiny_config(spec: TinyQwen2VLSpec, tokenizer: Any):
    """The transformers config of ``spec`` (Qwen2VLConfig or Qwen2_5_VLConfig) for ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(spec.mrope_section)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_ffn = spec.vision_ffn or 2 * spec.vision_hidden
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=spec.vision_heads,
                  depth=spec.vision_layers)
    if spec.variant == "qwen2_vl":
        vision = dict(common, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                      mlp_ratio=vision_ffn // spec.vision_hidden)  # an int in Qwen2VLVisionConfig
        config_class = Qwen2VLConfig
    else:
        vision = dict(common, hidden_size=spec.vision_hidden, intermediate_size=vision_ffn,
                      out_hidden_size=spec.text_hidden, window_size=spec.window_size,
                      fullatt_block_indexes=list(spec.full_attention_blocks))
        config_class = Qwen2_5_VLConfig
    return config_class(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def build_tiny_qwen2_vl(directory: str | Path, spec: TinyQwen2VLSpec | None = None) -> Path:
    """Write a tiny random Qwen2-VL / Qwen2.5-VL (weights, tokenizer, image processor) to ``directory``.

    Weights come from ``spec.seed`` alone (two builds are identical). Raises ValueError for an invalid spec.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = spec or TinyQwen2VLSpec()
    directory = Path(directory)
    tokenizer = build_tokenizer(spec)
    config = tiny_config(spec, tokenizer)
    config.vision_config._attn_implementation = "eager"
    model_class = Qwen2VLForConditionalGeneration if spec.variant == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_class._from_config(config, dtype=getattr(torch, spec.dtype)).eval()
    generation = model.generation_config
    generation.bos_token_id = config.bos_token_id
    generation.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), config.bos_token_id]
    generation.pad_token_id = config.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="2GB")
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil().save_pretrained(directory)  # the checkpoints' defaults (min / max pixels, CLIP norm)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), sort_keys=True))
    return directory
