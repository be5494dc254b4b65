"""pruner-eval's settings: what is evaluated (eager (model, PrunerConfig) pairs or exported folders, ``EvalOptions``)
and which setting each one is compared with (``reference_of``). Importing this module does not load torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from .eval_questions import EvalError, shipped_questions

DEFAULT_CACHE = Path(".pruner-eval-cache")
DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's eval prompts


@dataclass(frozen=True)
class Setting:
    """One thing evaluated: an eager (model, PrunerConfig) pair, or an exported folder."""

    label: str
    kind: str  # "eager" | "exported"
    source: str  # the model name / directory, or the exported folder
    method: str
    keep: Any  # pruner_core.config.Keep: a count and a fraction are different settings
    layer: int
    full: bool  # keeps every image token
    group: str  # settings with the same group compare with each other (same model, backend, layer)
    identity: str  # the model part of the cache key
    pruner: dict[str, Any] = field(default_factory=dict)  # PrunerConfig.to_dict()
    random_weights: bool = False  # a tiny (or benchmark) build: its answers are gibberish by design

    def config_json(self) -> str:
        return json.dumps(self.pruner, sort_keys=True)


def parse_keeps(text: str) -> list[Any]:
    """'1.0,0.33,64' -> [Keep(1.0), Keep(0.33), Keep(64)] ('1' is one token and '1.0' is every token: two settings).

    pruner_core.config.parse_keeps, imported here so that importing this module does not load torch."""
    from pruner_core.config import parse_keeps as parse_config_keeps

    try:
        return parse_config_keeps(text)
    except ValueError as error:
        raise EvalError(str(error)) from None


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def eager_settings(model: str, keeps: Iterable[Any], methods: Iterable[str], layer: int,
                   authors_grid: bool = False) -> list[Setting]:
    """Every (method, keep) pair for the eager backend, methods outer; duplicates dropped (keeps are Keep values,
    or ints / floats made into them: 1 and 1.0 stay two settings). authors_grid: ``PrunerConfig.authors_grid`` for
    every setting (labels say so)."""
    from pruner_core import PrunerConfig, method_names
    from pruner_core.config import Keep

    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise EvalError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    local = Path(model).expanduser()
    identity = f"dir:{local.resolve()}" if local.is_dir() else f"model:{model}"
    random = model_has_random_weights(model)
    settings: dict[tuple[str, Any], Setting] = {}
    for method in methods:
        for value in keeps:
            try:
                keep = Keep.of(value)
                config = PrunerConfig(keep=keep, method=method, layer=layer, authors_grid=authors_grid)
            except ValueError as error:
                raise EvalError(str(error)) from None
            label = f"{method} keep={keep}" + (" authors-grid" if authors_grid else "")
            settings.setdefault((method, keep), Setting(
                label=label, kind="eager", source=model, method=method, keep=keep, layer=layer,
                full=keep.keeps_all, group=f"{identity} layer={layer}", identity=identity,
                pruner=config.to_dict(), random_weights=random))
    if not settings:
        raise EvalError("no setting to evaluate: give --keep and --methods (e.g. --keep 1.0,0.11 --methods vlm_pruner)")
    return list(settings.values())


def model_has_random_weights(model: str) -> bool:
    """A tiny model name, or a local build whose spec stamp says its weights are random (no model is built)."""
    from pruner_core.adapters.hub import random_weights, tiny_models

    local = Path(model).expanduser()
    return model in tiny_models() or (local.is_dir() and random_weights(local))


def exported_setting(folder: str | Path) -> Setting:
    """An exported folder -> its Setting, from export_config.json (read as JSON; no export code imported)."""
    folder = Path(folder)
    path = folder / "export_config.json"
    if not path.is_file():
        raise EvalError(f"{folder} has no export_config.json; pass folders written by pruner-export to --exported")
    from pruner_core.config import Keep

    text = path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
        pruner = dict(config["pruner"])
        method, keep, layer = pruner["method"], Keep.of(pruner["keep"]), int(pruner["layer"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EvalError(f"{path} is corrupt or has no pruner settings ({error}); export the model again") from None
    kept, total = config.get("kept_image_tokens"), config.get("num_image_tokens")
    full = keep.keeps_all or (kept is not None and kept == total)
    group = json.dumps({name: config.get(name) for name in ("model_id", "target", "backend", "dtype", "quantization")}
                       | {"layer": layer}, sort_keys=True)
    return Setting(label=folder.name or str(folder), kind="exported", source=str(folder), method=method, keep=keep,
                   layer=layer, full=full, group=group, identity=f"export_config:{text}", pruner=pruner,
                   random_weights=bool(config.get("random_weights")))


def exported_settings(folders: Iterable[str | Path]) -> list[Setting]:
    settings = [exported_setting(folder) for folder in folders]
    labels = [s.label for s in settings]
    if len(set(labels)) < len(labels):  # two folders with the same name: label by the path given
        settings = [replace(s, label=s.source) for s in settings]
    return settings


def reference_of(setting: Setting, settings: list[Setting]) -> Setting:
    """Same group: keep-1.0 with the same method, else keep-1.0 with any method, else the group's first setting."""
    group = [s for s in settings if s.group == setting.group]
    for pool in ([s for s in group if s.full and s.method == setting.method], [s for s in group if s.full], group):
        if pool:
            return pool[0]
    return setting


@dataclass(frozen=True)
class EvalOptions:
    """What to run. Either model + keeps + methods (eager PyTorch) or exported folders."""

    questions: Path = field(default_factory=shipped_questions)
    model: str = "tiny-llava"
    keeps: tuple[Any, ...] = (1.0, 0.33, 0.11)  # Keep values (or ints / floats made into them)
    methods: tuple[str, ...] = ("vlm_pruner",)
    layer: int = 2
    authors_grid: bool = False  # PrunerConfig.authors_grid for the eager settings
    exported: tuple[Path, ...] = ()
    max_new_tokens: int = 8
    cache_dir: Path = DEFAULT_CACHE
    model_cache_dir: Path | None = None  # where tiny models are built (runtime.load's cache_dir)
    device: str = "cpu"
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise EvalError(f"--limit must be an int >= 1, got {self.limit!r}")

    def settings(self) -> list[Setting]:
        if self.exported:
            return exported_settings(self.exported)
        return eager_settings(self.model, self.keeps, self.methods, self.layer, self.authors_grid)
