"""What every export target shares: typed options, the `export_config.json` it writes, atomic output folders."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pruner_core import PrunerConfig, get_method

EXPORT_FORMAT_VERSION = 1
TARGETS = ("executorch", "onnx")
EXECUTORCH_BACKENDS = ("xnnpack", "portable", "coreml", "qnn")
QUANTIZE_CHOICES = {"executorch": ("none", "8da4w"), "onnx": ("none", "int8", "int4")}
VISION_QUANTIZE_CHOICES = {"executorch": ("none", "int8"), "onnx": ("none",)}
DTYPES = ("fp32", "fp16", "bf16")
# Signals a selection can read inside the exported graphs, per (target, placement): the selection runs in the vision
# encoder at layer 0 (both targets) and at layer K in ExecuTorch (the stock runner calls it before the prompt's last
# token exists), in ONNX's prefill at layer K; no graph exposes the vision tower's [CLS] attention.
GRAPH_SIGNALS = {
    ("executorch", "before_llm"): frozenset({"hidden", "keys"}),
    ("executorch", "in_llm"): frozenset({"hidden", "keys"}),
    ("onnx", "before_llm"): frozenset({"hidden", "keys"}),
    ("onnx", "in_llm"): frozenset({"hidden", "keys", "text_attention"}),
}
# Files copied beside the graphs: the tokenizer first, then what a runtime or app reads of the processor.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
LIBRARIES = ("torch", "executorch", "transformers", "onnx", "onnxruntime", "onnxscript", "optimum", "torchao")


@dataclass(frozen=True)
class ExportOptions:
    """One export of one model to one target."""

    model: str  # as the user named it (tiny-llava, llava-1.5-7b, hub id, or a local directory)
    target: str  # executorch | onnx
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    backend: str = "xnnpack"  # executorch only
    quantize: str = "none"  # executorch: none | 8da4w ; onnx: none | int8 | int4
    dtype: str = "fp32"
    max_seq_len: int = 768
    quantize_vision: str = "none"  # executorch: none | int8 (dynamic int8 activations, per-channel int8 weights)
    lowering_slice_bytes: int = 1 << 29  # ExecuTorch: weights per XNNPACK lowering pass (export/lowering.py)
    image_size: tuple[int, int] | None = None  # (H, W) the export takes images at; None = the model's default
    jobs: int = 2  # ExecuTorch: processes lowering methods at once (export/parallel_lowering.py says when 2 apply)

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
        if self.quantize_vision not in VISION_QUANTIZE_CHOICES[self.target]:
            raise ValueError(
                f"--quantize-vision {self.quantize_vision} is not available for {self.target}; choose one of "
                f"{VISION_QUANTIZE_CHOICES[self.target]}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {DTYPES}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be an int >= 8, got {self.max_seq_len!r}")
        if self.image_size is not None and (len(self.image_size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.image_size)):
            raise ValueError(f"image_size must be (height, width) in pixels, got {self.image_size!r}")
        if not isinstance(self.lowering_slice_bytes, int) or self.lowering_slice_bytes < 1:
            raise ValueError(f"lowering_slice_bytes must be an int >= 1, got {self.lowering_slice_bytes!r}")
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise ValueError(f"jobs must be an int >= 1, got {self.jobs!r}")

    @property
    def placement(self) -> str:
        """'before_llm' (layer 0: stock runners run it) or 'in_llm' (layer K >= 1: the paper's placement)."""
        return "before_llm" if self.pruner.layer == 0 else "in_llm"


CHECKPOINT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a Hugging Face checkpoint stores its weights in (config.json ``dtype`` / ``torch_dtype``, top level
    or the text config's) as fp32 / fp16 / bf16; fp32 when the config does not say."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "fp32"
    candidates = [config, config.get("text_config") or {}]
    for block in candidates:
        for key in ("dtype", "torch_dtype"):
            name = str(block.get(key) or "").replace("torch.", "")
            if name in CHECKPOINT_DTYPES:
                return CHECKPOINT_DTYPES[name]
    return "fp32"


def resolve_dtype(requested: str, model_dir: str | Path, target: str, quantize: str) -> tuple[str, str]:
    """``--dtype`` -> (fp32 | fp16 | bf16, why). ``auto`` is the checkpoint's own dtype, so a half-precision
    checkpoint is never held in fp32 (its weights stay mapped from the files); onnxruntime's CPU provider has no
    bf16 MatMul, so ONNX takes fp16 for a bf16 checkpoint, and fp32 for ``--quantize int8`` (it quantizes fp32)."""
    if requested != "auto":
        return requested, "as asked"
    stored = checkpoint_dtype(model_dir)
    if target == "onnx" and quantize == "int8":
        return "fp32", f"auto: the checkpoint is {stored}; --quantize int8 quantizes fp32 weights"
    if target == "onnx" and stored == "bf16":
        return "fp16", "auto: the checkpoint is bf16, which onnxruntime's CPU provider cannot run"
    return stored, "auto: the checkpoint's own dtype"


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
    random_weights: bool = False,
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
        "random_weights": random_weights,  # a tiny / benchmark build: answers are gibberish by design
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
        "vision_quantization": options.quantize_vision,
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


def read_export_config(directory: str | Path, check_fields: bool = True) -> dict[str, Any]:
    """Load and check `export_config.json`; a clear error for a missing, corrupt or newer-format file, and (unless
    ``check_fields`` is false) for one that lacks a field a runtime reads (``check_runtime_fields``)."""
    path = Path(directory) / "export_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a folder written by pruner-export?")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt ({error}); export the model again") from None
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if not isinstance(version, int):
        raise ValueError(f"{path} has no format_version; export the model again")
    if version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} uses export format {version}, newer than this vlm-pruner-edge understands "
            f"({EXPORT_FORMAT_VERSION}); upgrade vlm-pruner-edge"
        )
    if check_fields:
        check_runtime_fields(payload, path)
    return payload


# What a runtime reads from export_config.json, per target (the rest is documentation for people).
RUNTIME_FIELDS = ("target", "placement", "num_image_tokens", "kept_image_tokens", "max_seq_len", "methods",
                  "image_preprocessing", "tokenizer", "tokenizer.image_token_id")
TARGET_FIELDS = {"onnx": ("graphs", "decoder", "image_placeholders"), "executorch": ("executorch.program",)}
FIELD_TYPES = {"num_image_tokens": int, "kept_image_tokens": int, "max_seq_len": int, "methods": dict,
               "image_preprocessing": dict, "tokenizer": dict, "tokenizer.image_token_id": int, "graphs": dict,
               "decoder": dict, "image_placeholders": int, "executorch.program": str}


def check_runtime_fields(payload: dict[str, Any], path: Path | str) -> None:
    """Raise ValueError naming every field a runtime needs that ``payload`` lacks (and, for the tokenizer's EOS ids,
    why: without them generation never stops), so that no backend fails later with a KeyError."""
    from runtime.prompt import eos_ids

    def has(dotted: str) -> bool:
        node: Any = payload
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    def value(dotted: str) -> Any:
        node: Any = payload
        for key in dotted.split("."):
            node = node[key]
        return node

    needed = RUNTIME_FIELDS + TARGET_FIELDS.get(payload.get("target"), ())
    missing = [name for name in needed if not has(name)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it was not written by this pruner-export (or was "
                         "edited); export the model again")
    wrong = [f"{name} ({kind.__name__} expected, got {value(name)!r})" for name, kind in FIELD_TYPES.items()
             if has(name) and (not isinstance(value(name), kind) or isinstance(value(name), bool))]
    if wrong:
        raise ValueError(f"{path} has {', '.join(wrong)}: it was edited or is damaged; export the model again")
    eos_ids(payload["tokenizer"], str(path))
    if payload.get("target") == "onnx":
        complete_position_scheme(payload, path)


def complete_position_scheme(payload: dict[str, Any], path: Path | str) -> None:
    """decoder.position_scheme, which ONNX exports before Qwen2-VL support lack: LLaVA-1.5's image layout
    (float_nchw) means its 1-D positions, filled in; any other export without it (or with an unknown scheme) cannot
    be run with the right position_ids: ValueError naming the field and saying to export again."""
    from runtime.positions import POSITION_SCHEMES

    decoder = payload["decoder"]
    layout = payload["image_preprocessing"].get("input_layout", "float_nchw")
    if "position_scheme" not in decoder and layout == "float_nchw":  # LLaVA-1.5: position_ids [1, S]
        decoder["position_scheme"] = "1d"
    scheme = decoder.get("position_scheme")
    if scheme is None:
        raise ValueError(f"{path} lacks decoder.position_scheme, which an export with {layout!r} images needs (its "
                         "decoder takes M-RoPE position_ids, \"mrope\"): it was written by an older pruner-export "
                         "(or edited); export the model again")
    if scheme not in POSITION_SCHEMES:
        raise ValueError(f"{path} has decoder.position_scheme {scheme!r}, not one of {', '.join(POSITION_SCHEMES)}: "
                         "it was edited or is damaged; export the model again")


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
    check_replaceable(out_dir)
    parent = out_dir.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first: removed again on failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # a normal folder's mode, not mkdtemp's private 0700
    except OSError as error:
        raise PermissionError(f"cannot write to {parent}: {error.strerror}; choose a writable --out") from None
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # folders made for --out: a failed export leaves nothing behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def check_replaceable(out_dir: str | Path) -> None:
    """What --overwrite may replace: nothing yet, an empty folder, or an export folder (one holding
    export_config.json, or a `--target all` folder of such). Raises FileExistsError for a file, for the working
    folder or one above it, and for a folder holding anything else (so --overwrite never deletes a user's files)."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    resolved, here = out_dir.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise FileExistsError(f"--out {out_dir} is the working folder or one above it; an export replaces its --out "
                              "folder: choose a new folder, e.g. --out exported/my-model")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another --out")
    entries = list(out_dir.iterdir())
    exports = (out_dir / "export_config.json").is_file() or (entries and all(
        (entry / "export_config.json").is_file() for entry in entries if entry.is_dir()) and all(
        entry.is_dir() or entry.name == "README.md" for entry in entries))
    if entries and not exports:
        raise FileExistsError(f"{out_dir} holds files that are not an export of this tool (no export_config.json); "
                              "--overwrite only replaces export folders: choose another --out")


def check_method_exportable(options: "ExportOptions") -> None:
    """Refuse, before any work, a selection method whose signals the placement's graphs cannot compute."""
    allowed = GRAPH_SIGNALS[options.target, options.placement]
    missing = sorted(get_method(options.pruner.method).needs - allowed)
    if missing:
        prompt_signal = missing == ["text_attention"]
        hint = (
            "prune inside the LLM instead (--prune-layer >= 1)" if prompt_signal and options.target == "onnx"
            else "export it with --target onnx --prune-layer >= 1 (its prefill sees the whole prompt), or choose a "
                 f"--method that reads only {sorted(allowed)}" if prompt_signal
            else f"choose a --method that reads only {sorted(allowed)}"
        )
        raise ValueError(
            f"method {options.pruner.method!r} needs {missing}, which the {options.target} {options.placement} "
            f"graphs do not compute; {hint}"
        )


def copy_model_files(
    model_dir: Path, processor: Any, out_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Copy the tokenizer, processor and ``extra`` files a runtime reads -> (tokenizer files, all files copied).

    A checkpoint with only a slow tokenizer gets the fast tokenizer's tokenizer.json written.
    """
    copied = []
    for name in TOKENIZER_FILES + PROCESSOR_FILES + tuple(extra):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        processor.tokenizer.save_pretrained(out_dir)
        copied += [name for name in TOKENIZER_FILES if (out_dir / name).is_file() and name not in copied]
    return [name for name in copied if name in TOKENIZER_FILES], copied


def write_processor_files(out_dir: Path, adapter: Any, processor: Any, image_placeholders: int) -> list[str]:
    """Make ``out_dir`` loadable unchanged by the stock processors (transformers' and transformers.js'), with
    ``image_placeholders`` image tokens per prompt (what the vision encoder returns) -> the files written.

    Writes the adapter's ``processor_files`` (over the checkpoint's copies) and puts the chat template into
    ``tokenizer_config.json`` when that file lacks one: transformers.js reads it only from there, transformers also
    from ``chat_template.jinja`` / ``.json``.
    """
    written = []
    for name, payload in adapter.processor_files(processor, image_placeholders).items():
        write_json(out_dir / name, payload)
        written.append(name)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if isinstance(template, str) and tokenizer_config.is_file():
        payload = json.loads(tokenizer_config.read_text())
        if not payload.get("chat_template"):
            write_json(tokenizer_config, {**payload, "chat_template": template})
            written.append(tokenizer_config.name)
    return written


def image_preprocessing(processor: Any, input_layout: str = "float_nchw") -> dict[str, Any]:
    """The processor's image settings as runtime/preprocess.py's ImagePreprocessing (a dict for the config)."""
    from runtime.preprocess import ImagePreprocessing

    return ImagePreprocessing.from_hf_processor(processor.image_processor, input_layout=input_layout).to_dict()


class TokenEmbedding(nn.Module):
    """token ids int64 [1, T] -> embeddings [1, T, D]: the stock embedding table."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)
