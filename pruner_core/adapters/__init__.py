"""Model-family adapters: the only code that knows a model family (LLaVA-1.5, Qwen2-VL / Qwen2.5-VL).

``base``: the ``ModelAdapter`` protocol, ``ModelGeometry`` and the registry keyed by config ``model_type``
(``adapter_for``). ``hub``: model names -> local directories for every registered family. ``decoder``: the shared
pruned prefill / decode machinery for Llama-like decoders. ``patching``: the per-instance forward patch behind
``apply_pruner``. One family = one adapter module plus its tiny-model spec: ``llava`` + ``llava_tiny``,
``qwen2_vl`` + ``qwen2_vl_tiny``.
"""

from .base import (
    ModelAdapter,
    apply_pruner,
    pruner_config,
    remove_pruner,
    ModelGeometry,
    ParameterCounts,
    adapter_for,
    register_adapter,
    registered_adapters,
    supported_model_types,
)
from .decoder import (
    KVRecorder,
    PrefillOutput,
    PrunedPrefill,
    check_split_layer,
    decode_step,
    image_span_starts,
    last_token_attention,
    layer_keys,
    prune_and_prefill,
    rotary,
)
from .hub import resolve_model
from .llava import (
    HUB_ALIASES,
    LLAVA,
    LlavaAdapter,
    clip_cls_attention,
    embed_prompt,
    encode_image,
    estimate_parameters,
    image_grid,
    llava_prompt,
    load_llava,
    parameter_counts,
    prefill_with_pruning,
    prompt_image_start,
    select_before_llm,
    tokenizer_info,
)
from .llava_tiny import TINY_MODELS, TinyLlavaSpec, build_tiny_llava
from .qwen2_vl import QWEN2_VL, Qwen2VLAdapter, QwenVLInputs, load_qwen2_vl, qwen_prompt
from .qwen2_vl_tiny import TinyQwen2VLSpec, build_tiny_qwen2_vl

__all__ = [
    "HUB_ALIASES",
    "TINY_MODELS",
    "KVRecorder",
    "PrefillOutput",
    "PrunedPrefill",
    "TinyLlavaSpec",
    "apply_pruner",
    "build_tiny_llava",
    "clip_cls_attention",
    "decode_step",
    "embed_prompt",
    "encode_image",
    "ParameterCounts",
    "estimate_parameters",
    "parameter_counts",
    "image_grid",
    "image_span_starts",
    "last_token_attention",
    "layer_keys",
    "llava_prompt",
    "load_llava",
    "prefill_with_pruning",
    "prune_and_prefill",
    "pruner_config",
    "remove_pruner",
    "resolve_model",
    # added with the model-family interface
    "LLAVA",
    "LlavaAdapter",
    "ModelAdapter",
    "ModelGeometry",
    "adapter_for",
    "check_split_layer",
    "prompt_image_start",
    "register_adapter",
    "registered_adapters",
    "rotary",
    "select_before_llm",
    "supported_model_types",
    "tokenizer_info",
    # Qwen2-VL / Qwen2.5-VL
    "QWEN2_VL",
    "Qwen2VLAdapter",
    "QwenVLInputs",
    "TinyQwen2VLSpec",
    "build_tiny_qwen2_vl",
    "load_qwen2_vl",
    "qwen_prompt",
]
