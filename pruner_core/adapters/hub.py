"""Model names -> local checkpoint directories, for every registered family, never downloading.

Tiny names (each adapter's ``tiny_models``) are built once into a cache directory and reused; short aliases (each
adapter's ``hub_aliases``) and any ``owner/name`` hub id are looked up in the local Hugging Face cache only; a local
directory is used as is. Whatever is found must be a checkpoint whose config.json ``model_type`` has a registered
adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .base import ModelAdapter, adapter_for, registered_adapters, supported_model_types


def tiny_models() -> dict[str, tuple[ModelAdapter, Any]]:
    """Every registered tiny-model name -> (its adapter, its spec)."""
    return {name: (adapter, spec) for adapter in registered_adapters() for name, spec in adapter.tiny_models.items()}


def hub_aliases() -> dict[str, str]:
    """Every registered short name -> its hub id."""
    return {name: repo for adapter in registered_adapters() for name, repo in adapter.hub_aliases.items()}


def _supported_names() -> str:
    aliases = hub_aliases()
    return (
        f"{', '.join(sorted(tiny_models()))} (built locally), {', '.join(sorted(aliases))} (aliases of "
        f"{', '.join(aliases[k] for k in sorted(aliases))}), a hub id 'owner/name' already in the local "
        f"Hugging Face cache, or a local directory of a supported checkpoint ({supported_model_types()})"
    )


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _missing_folder(name: str) -> FileNotFoundError:
    """A path-like name with nothing there: say so, with the nearest names beside it (not 'download it')."""
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if parent.is_dir() else []
    near = difflib.get_close_matches(path.name, siblings, n=3)
    hint = f"; did you mean {', '.join(str(parent / n) for n in near)}?" if near else (
        f"; {parent} holds {', '.join(siblings[:8])}" if siblings else "")
    return FileNotFoundError(f"no such folder: {name}{hint}")


def random_weights(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a tiny (or benchmark) build: random weights from a fixed seed, so its answers are
    gibberish and its selections do not mean anything about images (the build's spec stamp says so)."""
    return any((Path(model_dir) / adapter.tiny_spec_file).is_file() for adapter in registered_adapters())


RANDOM_WEIGHTS_NOTE = "random weights (a tiny test build): answers are gibberish by design"


def check_model_directory(path: Path) -> Path:
    """``path`` if it holds a checkpoint some registered adapter supports, else ValueError saying what is."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{path} has no config.json; pass a directory written by save_pretrained of a supported checkpoint "
            f"({supported_model_types()}; e.g. a snapshot of llava-hf/llava-1.5-7b-hf)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    try:
        adapter = adapter_for({"model_type": model_type})
    except ValueError:
        raise ValueError(
            (f"{path}/config.json has no model_type" if model_type is None else
             f"{path} holds a {model_type!r} model") + f"; supported checkpoints have config {supported_model_types()}: "
            f"{_supported_names()}"
        ) from None
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValueError(
            f"{path} has config.json but no weights ({', '.join(WEIGHT_FILES)}); copy the whole checkpoint folder "
            "(save_pretrained and hub snapshots write the weights beside config.json)"
        )
    return adapter.check_directory(path)


def _fetch_command(repo_id: str) -> str:
    return f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`)"


def _from_hub_cache(repo_id: str, hf_cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as error:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and models are never downloaded here; fetch it once "
            f"with {_fetch_command(repo_id)}, or pass the path of a local copy ({type(error).__name__}: {error})"
        ) from None


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled like a hub repo id, 'owner/name' (huggingface_hub's own rules)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or not all(name.split("/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _folder_or_hub_id(name: str, hf_cache_dir: str | Path | None) -> Path:
    """'owner/name' that is no folder here although ``owner`` is (e.g. ``Qwen/`` holding exports): the hub id's
    cached snapshot if there is one; else FileNotFoundError naming both readings (no such folder, not cached: the
    command that fetches it)."""
    try:
        return _from_hub_cache(name, hf_cache_dir)
    except FileNotFoundError:
        missing = _missing_folder(name)
    raise FileNotFoundError(
        f"{missing}; and {name} is not in the local Hugging Face cache as a hub id either: if it is one, fetch it "
        f"once with {_fetch_command(name)} (models are never downloaded here), else fix the path"
    ) from None


def _is_built(target: Path, spec: Any, stamp_file: str) -> bool:
    stamp = target / stamp_file
    spec_json = json.loads(json.dumps(asdict(spec)))  # as the stamp reads back: tuples become lists
    return (target / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec_json


def _build_once(name: str, target: Path) -> Path:
    adapter, spec = tiny_models()[name]
    stamp_file = adapter.tiny_spec_file
    if _is_built(target, spec, stamp_file):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        adapter.build_tiny(staging, spec)
        (staging / stamp_file).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))
        if target.exists() and not _is_built(target, spec, stamp_file):
            shutil.rmtree(target)  # a stale build from another spec
        try:
            os.replace(staging, target)  # atomic: a half-written build is never visible under `target`
        except OSError:
            if not _is_built(target, spec, stamp_file):  # only a concurrent build that finished first is acceptable
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str, cache_dir: str | Path, *, hf_cache_dir: str | Path | None = None) -> Path:
    """A model name -> a local checkpoint directory, never downloading.

    Tiny names (``tiny-llava`` / ``tiny-llava-gqa``, ...) are built into ``cache_dir/<name>`` on first use and reused
    after; aliases (``llava-1.5-7b`` / ``llava-1.5-13b``, ...) and any ``owner/name`` hub id are looked up in the
    local Hugging Face cache (``hf_cache_dir``, default: the standard one); a path to a directory is used as is. An
    ``owner/name`` that is no directory is looked up in that cache even when a folder ``owner/`` exists here (e.g.
    exports written under ``Qwen/``); when it is neither, the error names both (no such folder, not cached). Anything
    whose config ``model_type`` no registered adapter supports raises ``ValueError``; a hub id that is not
    cached raises ``FileNotFoundError`` saying how to fetch it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string; supported: {_supported_names()}")
    if name in tiny_models():
        return _build_once(name, Path(cache_dir) / name)
    aliases = hub_aliases()
    if name in aliases:
        return check_model_directory(_from_hub_cache(aliases[name], hf_cache_dir))
    local = Path(name).expanduser()
    if local.is_dir():
        return check_model_directory(local)
    parts = name.split("/")
    if name.startswith((".", "~", "/")) or (len(parts) > 2 and Path(parts[0]).expanduser().is_dir()):
        raise _missing_folder(name)  # a path (its first folder exists here), not a hub id
    if _is_hub_id(name) and Path(parts[0]).expanduser().is_dir():  # a folder 'owner/' here may shadow the hub id
        return check_model_directory(_folder_or_hub_id(name, hf_cache_dir))
    if len(parts) == 2 and all(parts):
        return check_model_directory(_from_hub_cache(name, hf_cache_dir))
    raise ValueError(f"unknown model {name!r} (not a directory either); supported: {_supported_names()}")
