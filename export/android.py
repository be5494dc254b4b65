"""The files the Android demo app needs, in one folder, and the `adb` commands that put them on a phone.

`pruner-export ... --android` calls `prepare_android_folder(export_dir, out_dir)` after an ExecuTorch export and
prints `adb_push_commands(out_dir)`. The app (android_demo/app) lists the folders under `DEVICE_DIR`, one per model.

Only a layer-0 export (`placement == "before_llm"`) runs in the stock ExecuTorch runner that the app uses
(`LlmModule`, `MODEL_TYPE_TEXT_VISION`): its `vision_encoder` returns the R kept tokens and the runner gives them
consecutive positions. A layer K >= 1 export has the same three methods, but its `vision_encoder` and
`text_decoder` share state in mutable buffers (export/executorch_layer_k.py), and executorch-android 1.5.1 loads a
program without sharing them between methods (its `Module` is built without `share_memory_arenas`; see
export/README.md), so it is refused here, before anything is copied or pushed.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from export.common import check_runtime_fields, read_export_config, staging_directory

DEVICE_DIR = "/data/local/tmp/vlm_pruner"  # the app scans this folder (ModelLocator.DEVICE_DIR in the Kotlin)
CONFIG_FILE = "export_config.json"
DEFAULT_PROGRAM = "model.pte"
RUNNER_TOKENIZER_SUFFIXES = ("tokenizer.json", "tokenizer.model")  # what the ExecuTorch runner's tokenizer reads


def default_android_folder(export_dir: str | Path) -> Path:
    """`exported/llava-1.5-7b-keep0.11-executorch` -> `exported/llava-1.5-7b-keep0.11-executorch-android`."""
    export_dir = Path(export_dir)
    return export_dir.with_name(f"{export_dir.name}-android")


def android_files(config: dict[str, Any]) -> list[str]:
    """Names of the files the app opens: the program, the runner's tokenizer, export_config.json."""
    program = config.get("executorch", {}).get("program", DEFAULT_PROGRAM)
    tokenizer = config.get("tokenizer", {})
    runner_file = tokenizer.get("runner_file")
    if not runner_file:
        candidates = [name for name in tokenizer.get("files", []) if name.endswith(RUNNER_TOKENIZER_SUFFIXES)]
        if not candidates:
            raise ValueError(
                f"{CONFIG_FILE} names no tokenizer the ExecuTorch runner reads (tokenizer.json or tokenizer.model) "
                f"among {tokenizer.get('files', [])}; export the model again"
            )
        runner_file = candidates[0]
    return [program, runner_file, CONFIG_FILE]


def check_runnable_on_android(config: dict[str, Any], export_dir: str | Path = "") -> None:
    """Raise ValueError, with the command that fixes it, unless the stock runner can run this export."""
    where = f" ({export_dir})" if export_dir else ""
    target = config.get("target")
    if target != "executorch":
        raise ValueError(
            f"this export{where} is for {target!r}; the app runs ExecuTorch programs: export with "
            "`pruner-export --model <model> --keep <k> --target executorch --prune-layer 0 --android`"
        )
    scheme = config.get("executorch", {}).get("position_scheme", "1d")
    if scheme != "1d":
        raise ValueError(
            f"this export{where} takes {scheme!r} RoPE positions (text_decoder's position_ids [3, 1, T]), which "
            "executorch-android 1.5.1's LlmModule cannot feed (one 1-D start position per call); run it with "
            "pruner-run, or export a LLaVA-1.5 model for the app"
        )
    placement = config.get("placement")
    if placement != "before_llm":
        layer = config.get("pruner", {}).get("layer")
        raise ValueError(
            f"this export{where} prunes inside the LLM (--prune-layer {layer}, placement {placement!r}): its "
            "vision_encoder and text_decoder share state in mutable buffers, which executorch-android 1.5.1's "
            "LlmModule does not share between methods. Export with `pruner-export ... --target executorch "
            "--prune-layer 0 --android`"
        )


def prepare_android_folder(export_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> list[str]:
    """Copy exactly the files the app needs from an ExecuTorch export into `out_dir`; return their names.

    The folder appears complete or not at all (written beside `out_dir`, then renamed). Raises ValueError for an
    export the app cannot run (not ExecuTorch, or pruned inside the LLM), FileNotFoundError for a missing file,
    FileExistsError when `out_dir` exists and `overwrite` is false.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if export_dir.resolve() == out_dir.resolve():
        raise ValueError(f"the Android folder must differ from the export folder {export_dir}; choose another one")
    config = read_export_config(export_dir, check_fields=False)
    check_runnable_on_android(config, export_dir)  # first: its error says which export the app needs
    check_runtime_fields(config, export_dir / CONFIG_FILE)
    names = android_files(config)
    missing = [name for name in names if not (export_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{export_dir} lacks {missing} named by its {CONFIG_FILE}: the export is incomplete; export it again"
        )
    with staging_directory(out_dir, overwrite=overwrite) as staging:
        for name in names:
            shutil.copyfile(export_dir / name, staging / name)
    return names


def adb_push_commands(folder: str | Path, device_dir: str = DEVICE_DIR, files: list[str] | None = None) -> list[str]:
    """Shell commands that copy a prepared folder to `device_dir/<folder name>/` on a phone over adb.

    files: the names to push (default: what the folder holds, which must then exist; the model card passes
    ``android_files(config)`` for a folder `--android` writes). The last command makes the files readable by the
    app (adb pushes them as the shell user).
    """
    folder = Path(folder)
    if files is None and not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no {CONFIG_FILE}; prepare it first with `pruner-export ... --android` "
            "(or android_files.prepare_android_folder)"
        )
    target = f"{device_dir.rstrip('/')}/{folder.name}"
    files = sorted(files if files is not None else (path.name for path in folder.iterdir() if path.is_file()))
    commands = [f"adb shell mkdir -p {shlex.quote(target)}"]
    commands += [f"adb push {shlex.quote(str(folder / name))} {shlex.quote(target + '/' + name)}" for name in files]
    commands.append(f"adb shell chmod -R a+rX {shlex.quote(device_dir.rstrip('/'))}")
    return commands


def summary(folder: str | Path) -> str:
    """One line for the CLI: what the folder holds (kept tokens, placement, size)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    return (
        f"{folder.name}: {config.get('model_id')} keeps {config.get('kept_image_tokens')} of "
        f"{config.get('num_image_tokens')} image tokens ({config.get('quantization')}, "
        f"{size / 1024**3:.2f} GiB)"
    )
