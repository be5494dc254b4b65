"""`load(...)`: pick the backend from a folder's contents (or a model name for eager PyTorch) and build a Session."""

from __future__ import annotations

from pathlib import Path

from .devices import resolve_executorch_backend, resolve_onnx_providers
from .preprocess import ImagePreprocessing
from .prompt import PromptEncoder
from .session import Session

DEVICES = ("cpu", "npu", "auto")
ENGINES = ("onnxruntime", "openvino")


def load_eager(model: str | Path, config=None, device: str = "cpu", cache_dir: str | Path | None = None, *,
               dtype=None, image_size: tuple[int, int] | None = None) -> Session:
    """Eager PyTorch reference: a model name or checkpoint directory (any registered family) plus a PrunerConfig;
    dtype (a torch dtype, default float32) and image_size (H, W; default the family's) as EagerBackend takes them."""
    import torch

    from pruner_core import PrunerConfig
    from pruner_core.adapters import resolve_model
    from pruner_core.adapters.hub import random_weights

    from .eager_backend import EagerBackend

    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "vlm-pruner-edge" / "models"
    model_dir = resolve_model(str(model), cache_dir)
    config = config or PrunerConfig()
    backend = EagerBackend(model_dir, config, device, dtype=dtype or torch.float32, image_size=image_size)
    encoder = PromptEncoder(model_dir, backend.adapter.tokenizer_info(backend.model, backend.processor,
                                                                      ["tokenizer.json"]))
    spec = backend.adapter.image_preprocessing(backend.processor)
    placement = "before_llm" if config.layer == 0 else "in_llm"
    return Session(backend=backend, encoder=encoder, image_spec=spec,
                   config={"placement": placement, "pruner": config.to_dict(),
                           "random_weights": random_weights(model_dir)},
                   device_note="running on the CPU in eager PyTorch")


def load(
    path: str | Path,
    device: str = "cpu",
    *,
    config=None,
    cache_dir: str | Path | None = None,
    profile_ops: bool = False,
    engine: str = "onnxruntime",
) -> Session:
    """A folder written by pruner-export (ExecuTorch or ONNX, chosen by its contents), or a model for eager PyTorch.

    device: "cpu", "npu" (an NPU execution provider / delegate; a clear error when this machine has none) or "auto"
    (NPU when available, else CPU; `session.device_note` says which was taken); with engine "openvino" also "gpu".
    engine: what runs an ONNX folder: "onnxruntime" or "openvino" (runtime/openvino_backend.py: OpenVINO's CPU, GPU
    or NPU); ValueError for any other, or for "openvino" with another kind of folder.
    profile_ops: also record an operator-level breakdown (onnxruntime profiler / ExecuTorch ETDump in timing-only
    mode) into the first call's `profile.ops`.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if device not in (DEVICES + ("gpu",) if engine == "openvino" else DEVICES):
        hint = "; gpu is OpenVINO's: add engine openvino (--engine openvino)" if device == "gpu" else ""
        raise ValueError(f"device must be one of {DEVICES}{' or gpu' if engine == 'openvino' else ''}, got {device!r}"
                         f"{hint}")
    if profile_ops and engine == "openvino":
        raise ValueError("the operator breakdown (profile_ops / --profile-ops) comes from onnxruntime's and "
                         "ExecuTorch's profilers; OpenVINO has none here: drop it, or use engine onnxruntime")
    folder = Path(path)
    if not (folder / "export_config.json").is_file():
        if folder.is_dir() and (folder / "config.json").is_file() or not folder.exists():
            if engine != "onnxruntime" or device == "gpu":
                what = f"engine {engine}" if engine != "onnxruntime" else f"device {device}"
                path_like = any(sep in str(path) for sep in ("/", "\\")) or str(path).startswith(".")
                if not folder.exists() and path_like:
                    raise FileNotFoundError(f"{path} does not exist: pass a folder written by pruner-export "
                                            "--target onnx")
                raise ValueError(f"{what} runs ONNX exports, and {path} is a model, not an exported folder: export "
                                 "it with pruner-export --target onnx first and pass that folder")
            if profile_ops:
                raise ValueError("the operator breakdown (profile_ops / --profile-ops) reads onnxruntime's profiler or "
                                 f"ExecuTorch's ETDump of an exported folder, and {path} is a model run in eager "
                                 "PyTorch: drop it, or export with pruner-export and profile that folder")
            return load_eager(path, config, device, cache_dir)
        raise FileNotFoundError(
            f"{folder} has no export_config.json: pass a folder written by pruner-export, or a model name / "
            "checkpoint directory (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) for the eager PyTorch backend"
        )
    from export.common import read_export_config

    export_config = read_export_config(folder)
    target = export_config.get("target")
    if engine == "openvino" and target != "onnx":
        raise ValueError(f"engine openvino runs ONNX exports; {folder} holds a target={target!r} export (export it with "
                         "--target onnx, or leave engine at onnxruntime)")
    if target == "executorch":
        backend, note = _executorch_backend(folder, export_config, device, profile_ops)
    elif target == "onnx":
        backend, note = _onnx_backend(folder, export_config, device, profile_ops, engine)
    else:
        raise ValueError(f"{folder}/export_config.json names an unknown target {target!r}; export the model again")
    encoder = PromptEncoder(folder, export_config["tokenizer"])
    spec = ImagePreprocessing.from_dict(export_config["image_preprocessing"])
    return Session(backend=backend, encoder=encoder, image_spec=spec, config=export_config, device_note=note)


def _executorch_backend(folder: Path, export_config: dict, device: str, profile_ops: bool = False):
    from .devices import pte_backend_ids
    from .executorch_session import ExecuTorchBackend

    pte = folder / export_config["executorch"]["program"]
    if not pte.is_file():
        raise FileNotFoundError(f"{pte} is missing: the exported folder is incomplete; export the model again")
    try:
        delegates = pte_backend_ids(pte)
    except Exception as error:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ValueError(f"{pte} is corrupt or not an ExecuTorch program ({error}); export the model again") from None
    chosen = resolve_executorch_backend(delegates, device)
    return ExecuTorchBackend(folder, export_config, chosen.device, profile_ops=profile_ops), chosen.note


def _onnx_backend(folder: Path, export_config: dict, device: str, profile_ops: bool = False,
                  engine: str = "onnxruntime"):
    from .onnx_session import OnnxBackend

    if engine == "openvino":
        from .openvino_backend import OpenVinoEngine

        opener = OpenVinoEngine(device)
        return OnnxBackend(folder, export_config, None, engine=opener), opener.note
    providers = resolve_onnx_providers(device)
    return OnnxBackend(folder, export_config, providers, profile_ops=profile_ops), providers.note
