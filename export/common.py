"""What every export target shares: typed options, the `export_config.json` it writes, atomic output folders."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from pruner_core import PrunerConfig

EXPORT_FORMAT_VERSION = 1
TARGETS = ("executorch", "onnx")
EXECUTORCH_BACKENDS = ("xnnpack", "portable", "coreml", "qnn")
QUANTIZE_CHOICES = {"executorch": ("none", "8da4w"), "onnx": ("none", "int8")}
DTYPES = ("fp32", "fp16", "bf16")
LIBRARIES = ("torch", "executorch", "transformers", "onnx", "onnxruntime", "onnxscript", "optimum", "torchao")


@dataclass(frozen=True)
class ExportOptions:
    """One export of one model to one target."""

    model: str  # as the user named it (tiny-llava, llava-1.5-7b, hub id, or a local directory)
    target: str  # executorch | onnx
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    backend: str = "xnnpack"  # executorch only
    quantize: str = "none"  # executorch: none | 8da4w ; onnx: none | int8
    dtype: str = "fp32"
    max_seq_len: int = 768

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target {self.target!r} is not supported; choose one of {TARGETS} (or 'all' in the CLI)")
        if self.target == "executorch" and self.backend not in EXECUTORCH_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not supported; choose one of {EXECUTORCH_BACKENDS}")
        if self.quantize not in QUANTIZE_CHOICES[self.target]:
            raise ValueError(
                f"--quantize {self.quantize} is not available for {self.target}; "
                f"choose one of {QUANTIZE_CHOICES[self.target]}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {DTYPES}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be an int >= 8, got {self.max_seq_len!r}")

    @property
    def placement(self) -> str:
        """'before_llm' (layer 0: stock runners run it) or 'in_llm' (layer K >= 1: the paper's placement)."""
        return "before_llm" if self.pruner.layer == 0 else "in_llm"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tensor_spec(name: str, shape: list[int | str], dtype: str) -> dict[str, Any]:
    """One input or output of an exported method/graph. A str in `shape` names a dynamic dim."""
    return {"name": name, "shape": list(shape), "dtype": dtype}


def build_export_config(
    options: ExportOptions,
    *,
    model_id: str,
    num_image_tokens: int,
    grid: tuple[int, int],
    methods: dict[str, dict[str, list[dict[str, Any]]]],
    image_preprocessing: dict[str, Any],
    tokenizer: dict[str, Any],
    files: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `export_config.json` payload every target writes (runtime/ reads it; the Android app too).

    methods: {method or graph name: {"inputs": [tensor_spec...], "outputs": [tensor_spec...]}}
    tokenizer: {"files": [...], "bos_id": int, "eos_ids": [...], "image_token_id": int, "chat_template": str|None,
                "prompt_format": str}
    """
    budget = options.pruner.budget(num_image_tokens)
    payload = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_id": model_id,
        "model": options.model,
        "target": options.target,
        "pruner": options.pruner.to_dict(),
        "num_image_tokens": num_image_tokens,
        "kept_image_tokens": budget,
        "grid": list(grid),
        "placement": options.placement,
        # layer 0: kept tokens take consecutive positions; layer >= 1: they keep their original position ids
        "positions": "consecutive" if options.placement == "before_llm" else "original",
        "dtype": options.dtype,
        "quantization": options.quantize,
        "backend": options.backend if options.target == "executorch" else "onnxruntime",
        "max_seq_len": options.max_seq_len,
        "library_versions": library_versions(),
        "methods": methods,
        "image_preprocessing": image_preprocessing,
        "tokenizer": tokenizer,
        "files": sorted(files),
    }
    if extra:
        payload.update(extra)
    return payload


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """Load and check `export_config.json`; a clear error for a missing, corrupt or newer-format file."""
    path = Path(directory) / "export_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a folder written by pruner-export?")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt ({error}); export the model again") from None
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path} has no format_version; export the model again")
    if version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses export format {version}, newer than this vlm-pruner-edge understands "
            f"({EXPORT_FORMAT_VERSION}); upgrade vlm-pruner-edge"
        )
    return payload


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextmanager
def staging_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it is renamed to `out_dir`, on any error removed.

    An interrupted or failed export therefore never leaves a half-written model behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    except OSError as error:
        raise PermissionError(f"cannot write to {parent}: {error.strerror}; choose a writable --out") from None
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
