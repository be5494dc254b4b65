"""Typed configuration of the pruner (every hyperparameter of the algorithm as pruner_core/reference.py
states it, with the authors' defaults)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_VERSION = 1


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Keep:
    """How many of the N image tokens to keep: a token count R (an ``int``) or a fraction of N (a ``float`` in
    (0, 1]).

    The kind is part of the value: ``Keep(1)`` keeps one token and ``Keep(1.0)`` keeps every token, so the two are
    different settings wherever they are compared, hashed, stored, labelled or used as a baseline (a bare ``1 == 1.0``
    would conflate them). ``str(keep)`` is the label and the command-line spelling (``64``, ``0.12``, ``1.0``);
    ``keep.number`` is what JSON files store (an int or a float, so the kind survives a round trip).

    Raises ValueError for anything else (bool, str, NaN, a fraction outside (0, 1], a count < 1).
    """

    value: int | float
    is_fraction: bool = field(init=False)

    def __post_init__(self) -> None:
        value = self.value
        if not _is_real_number(value):
            raise ValueError(f"keep must be an int (token count) or a float in (0, 1] (fraction), got {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"keep={value!r}: a fraction must be in (0, 1]; use e.g. keep=0.12 or a count keep=64")
            if value > 1.0:
                raise ValueError(
                    f"keep={value!r}: a float is a fraction and must be <= 1.0; for a token count pass an int "
                    f"(keep={int(value)})"
                )
        elif value <= 0:
            raise ValueError(f"keep={value!r}: the token count must be >= 1")
        object.__setattr__(self, "is_fraction", isinstance(value, float))

    @classmethod
    def of(cls, value: "Keep | int | float") -> "Keep":
        """A Keep as it is, or an int (count) / float (fraction) made into one."""
        return value if isinstance(value, Keep) else cls(value)

    @classmethod
    def parse(cls, text: str) -> "Keep":
        """Command-line spelling -> Keep: '64' a count; '0.12', '1.0' or '1e-3' a fraction ('1' is one token)."""
        return parse_keep(text)

    @property
    def number(self) -> int | float:
        """The JSON form: the int count or the float fraction."""
        return self.value

    @property
    def keeps_all(self) -> bool:
        """The fraction 1.0: every image token, whatever N is (a count keeps all only when it equals N)."""
        return self.is_fraction and self.value == 1.0

    def budget(self, num_tokens: int) -> int:
        """R for an image of ``num_tokens`` tokens (fraction: round half to even, at least 1); raises ValueError
        when a count exceeds the image's tokens."""
        if num_tokens < 1:
            raise ValueError(f"the image span must hold at least one token, got N={num_tokens}")
        if self.is_fraction:
            return max(1, min(num_tokens, round(num_tokens * self.value)))  # round() is half-to-even
        if self.value > num_tokens:
            raise ValueError(
                f"keep={self.value} exceeds the {num_tokens} image tokens; pass a token count from 1 to {num_tokens}, "
                f"or a fraction in (0, 1] such as keep=0.12 (keep=1.0 keeps every token)"
            )
        return int(self.value)

    def __str__(self) -> str:
        return repr(self.value)  # 64, 0.12, 1.0: a fraction always shows its point or exponent

    def __repr__(self) -> str:
        return f"Keep({self.value!r})"


@dataclass(frozen=True)
class PrunerConfig:
    """What to keep and how.

    keep: a ``Keep``, or an ``int`` (token count R) / ``float`` in (0, 1] (fraction of the N image tokens,
    R = round-half-to-even(N * keep), at least 1), stored as a ``Keep`` so that a count and a fraction never compare
    equal (``PrunerConfig(keep=1) != PrunerConfig(keep=1.0)``).
    """

    keep: Keep | int | float = 64
    method: str = "vlm_pruner"
    layer: int = 2  # K: prune between decoder layers K-1 and K (0 = before the LLM)
    pivots: int = 4  # kappa
    feature_channels: int = 256  # q
    bss_lambda: float = 0.5  # lambda
    tau0: float = 0.8
    tau_step: float = 0.1  # dtau
    chunk: int = 16  # B, candidate batch
    fusion_beta: float = 0.3  # beta, SWA keep weight (1.0 disables fusion)
    seed: int = 0  # only the `random` method uses it
    # VLM-Pruner's spatial distance on the authors' Qwen2-VL grid (``placement_lattice``): merged tokens laid on the
    # unmerged patch grid. Off: the true image-token grid. Only for models whose image tokens merge patches
    # (Qwen2-VL / Qwen2.5-VL); selection refuses it elsewhere. Methods without a spatial term ignore it.
    authors_grid: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", Keep.of(self.keep))
        if not isinstance(self.authors_grid, bool):
            raise ValueError(f"authors_grid must be True or False, got {self.authors_grid!r}")
        self._check_int("layer", minimum=0)
        self._check_int("pivots", minimum=1)
        self._check_int("feature_channels", minimum=1)
        self._check_int("chunk", minimum=1)
        self._check_int("seed", minimum=0)
        self._check_float("bss_lambda", low=0.0)
        self._check_float("tau0", low=-1.0)
        self._check_float("tau_step", low=0.0, low_inclusive=False)
        self._check_float("fusion_beta", low=0.0, high=1.0)
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a registered method name, got {self.method!r}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    def _check_float(
        self, name: str, low: float, high: float | None = None, low_inclusive: bool = True
    ) -> None:
        value = getattr(self, name)
        bad = not _is_real_number(value) or not math.isfinite(value)
        bad = bad or (value < low if low_inclusive else value <= low) or (high is not None and value > high)
        if bad:
            bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")

    # ---- budget -------------------------------------------------------------------------------
    def budget(self, num_tokens: int) -> int:
        """R for an image of ``num_tokens`` tokens; raises when it cannot be met (see ``Keep.budget``)."""
        return self.keep.budget(num_tokens)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, **asdict(self), "keep": self.keep.number}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrunerConfig":
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"config version {version} is newer than this vlm-pruner-edge understands ({CONFIG_VERSION}); "
                "upgrade the package"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PrunerConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "PrunerConfig":
        return cls.from_dict(json.loads(text))


class KeepError(ValueError, argparse.ArgumentTypeError):
    """A --keep that is neither a count nor a fraction: a ValueError, and an argparse type error, so argparse
    prints its message as it is."""


def parse_keep(text: str) -> Keep:
    """Command-line keep -> Keep: '64' -> 64 tokens; '0.12', '1.0' or '1e-3' -> a fraction ('1' is one token,
    '1.0' all of them). The one parser every CLI uses; usable directly as an argparse ``type``.

    Raises KeepError (a ValueError) naming the text and the valid spellings."""
    text = str(text).strip()
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise KeepError(
                f"keep {text!r}: give a token count (64) or a fraction (0.12; 1.0 keeps every token)"
            ) from None
    try:
        return Keep(number)
    except ValueError as error:
        raise KeepError(str(error)) from None


def parse_keeps(text: str) -> list[Keep]:
    """'1.0,0.33,64' -> [Keep(1.0), Keep(0.33), Keep(64)], each part through ``parse_keep``, in the order given; a
    setting given twice is kept once ('1,1.0' is two settings: one token, every token). Usable as an argparse
    ``type``."""
    keeps = [parse_keep(part) for part in str(text).split(",") if part.strip()]
    if not keeps:
        raise KeepError(f"keep {text!r}: give one or more comma-separated counts or fractions, e.g. 1.0,0.33,64")
    return list(dict.fromkeys(keeps))


def num_rounds(config: PrunerConfig) -> int:
    """Rounds the static form runs: ceil((1 + lambda - tau0) / dtau) + 2.

    By the last round tau exceeds 1 + lambda, the largest BSS-adjusted redundancy, so every candidate passes
    and the budget is always met.
    """
    return max(1, math.ceil((1.0 + config.bss_lambda - config.tau0) / config.tau_step) + 2)


def round_threshold(config: PrunerConfig, round_index: int) -> float:
    """tau_r = tau0 + r * dtau, computed once in double precision so both forms compare against the same value."""
    return config.tau0 + round_index * config.tau_step
