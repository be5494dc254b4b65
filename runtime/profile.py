"""What one generate call cost: stage wall times, token counts, memory; as JSON and as a readable table.

A runner fills a ``Profile`` with ``timed(profile, stage)`` around each stage and calls ``finish()`` at the end:

    profile = Profile(backend="onnxruntime", device="cpu")
    with timed(profile, "preprocess"):
        pixel_values = preprocess(image, spec)
    ...
    for step in range(max_new_tokens):
        with timed(profile, "decode"):  # one list entry per decoded token
            ...
    profile.finish()
    print(profile.table())
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PROFILE_VERSION = 1

# Stage names ``timed`` accepts; each adds to the field "<stage>_ms" ("decode" appends one entry per step).
STAGES = ("preprocess", "vision", "embed", "prefill", "decode", "wall")
_STAGE_LABELS = {
    "preprocess": "preprocess",
    "vision": "vision encoder + pruning",
    "embed": "token embedding",
    "prefill": "prefill",
}


@dataclass
class OpTime:
    """One operator's share of the profiled run (from ETDump or onnxruntime's profiler)."""

    name: str
    total_ms: float
    calls: int
    share: float  # fraction of all profiled operator time (summary rows: of all summary time), 0..1
    kind: str = "operator"  # "operator": one operator / delegated op; "summary": a total over many (OPERATOR_CALL,
    # DELEGATE_CALL in ExecuTorch, model_run in onnxruntime), shown apart so nothing is counted twice


@dataclass
class Profile:
    """One generate call. Times in milliseconds of wall clock (``time.perf_counter``), sizes in bytes; None where
    not measured."""

    backend: str = ""  # "onnxruntime", "executorch", ...
    device: str = ""  # "cpu", "npu", or the execution provider / delegate name
    preprocess_ms: float = 0.0  # image load + resize + normalise
    vision_ms: float = 0.0  # vision encoder, projector and token pruning
    embed_ms: float = 0.0  # prompt token embedding
    prefill_ms: float = 0.0  # decoder over the (pruned) prompt, up to the first token's logits
    decode_ms: list[float] = field(default_factory=list)  # one entry per decoded token after the first
    time_to_first_token_ms: float | None = None  # call start -> first token; finish() fills it from the stages
    decode_tokens_per_s: float | None = None  # finish() fills it from decode_ms
    wall_ms: float = 0.0  # the whole call
    prompt_tokens_before_pruning: int = 0  # text + all image tokens
    prompt_tokens_after_pruning: int = 0  # text + kept image tokens (what the decoder's KV cache holds)
    image_tokens_kept: int = 0
    image_tokens_total: int = 0
    peak_rss_bytes: int | None = None  # process high-water mark (runtime.memory.peak_rss_bytes)
    model_files_bytes: int | None = None  # .onnx / .pte (+ external data) on disk
    kv_cache_bytes: int | None = None  # KV cache allocated for the call
    ops: list[OpTime] | None = None  # top operators by total time, when an operator profiler ran
    stop_reason: str | None = None  # why generation ended: "eos", "max_new_tokens" or "max_seq_len" (cache full)
    context_left: int | None = None  # tokens the KV cache still had room for when it ended (None: unbounded)

    # ---- derived values ---------------------------------------------------------------------------
    def decode_total_ms(self) -> float:
        """Time of all decode steps."""
        return float(sum(self.decode_ms))

    def stage_sum_ms(self) -> float:
        """preprocess + vision + embed + prefill + all decode steps (wall_ms minus it is untimed overhead)."""
        return self.preprocess_ms + self.vision_ms + self.embed_ms + self.prefill_ms + self.decode_total_ms()

    def finish(self) -> "Profile":
        """Fill the derived fields left unset: time to first token (the stages up to prefill) and decode speed."""
        if self.time_to_first_token_ms is None:
            self.time_to_first_token_ms = self.preprocess_ms + self.vision_ms + self.embed_ms + self.prefill_ms
        if self.decode_tokens_per_s is None and self.decode_ms and self.decode_total_ms() > 0:
            self.decode_tokens_per_s = len(self.decode_ms) / (self.decode_total_ms() / 1000.0)
        return self

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field in declaration order (None kept, so the key set never changes), plus ``"version"``."""
        return {"version": PROFILE_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        data = dict(data)
        version = data.pop("version", PROFILE_VERSION)
        if not isinstance(version, int) or version > PROFILE_VERSION:
            raise ValueError(f"profile version {version!r} is newer than this runtime reads ({PROFILE_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Profile fields {unknown}; known fields: {sorted(known)}")
        if data.get("ops") is not None:
            data["ops"] = [op if isinstance(op, OpTime) else OpTime(**op) for op in data["ops"]]
        if "decode_ms" in data:
            data["decode_ms"] = [float(ms) for ms in data["decode_ms"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        return cls.from_dict(json.loads(text))

    # ---- text -------------------------------------------------------------------------------------
    def table(self) -> str:
        """A fixed-width, human-readable summary with units."""
        lines = [f"profile: backend {self.backend or 'n/a'}, device {self.device or 'n/a'}", _row("stage", "time", "")]
        for stage, label in _STAGE_LABELS.items():
            lines.append(_row(f"  {label}", _fixed(getattr(self, f"{stage}_ms")), "ms"))
        steps = len(self.decode_ms)
        per_token = f"  ({self.decode_total_ms() / steps:.2f} ms/token)" if steps else ""
        lines.append(_row(f"  decode ({steps} steps)", _fixed(self.decode_total_ms()), "ms") + per_token)
        lines.append(_row("  sum of stages", _fixed(self.stage_sum_ms()), "ms"))
        lines.append(_row("  wall", _fixed(self.wall_ms), "ms"))
        lines.append(_row("time to first token", _fixed(self.time_to_first_token_ms), "ms"))
        lines.append(_row("decode speed", _fixed(self.decode_tokens_per_s), "tokens/s"))
        prompt = f"{self.prompt_tokens_before_pruning} -> {self.prompt_tokens_after_pruning}"
        lines.append(_row("prompt tokens", prompt, "tokens"))
        if self.stop_reason is not None:
            left = "" if self.context_left is None else f" ({self.context_left} tokens of context left)"
            lines.append(_row("stopped by", self.stop_reason + left, ""))
        kept = f"{self.image_tokens_kept} / {self.image_tokens_total}"
        share = ""
        if self.image_tokens_total:
            share = f"  ({100.0 * self.image_tokens_kept / self.image_tokens_total:.1f} % kept)"
        lines.append(_row("image tokens", kept, "tokens") + share)
        lines.append(_row("peak RSS", *_bytes(self.peak_rss_bytes)))
        lines.append(_row("model files", *_bytes(self.model_files_bytes)))
        lines.append(_row("KV cache", *_bytes(self.kv_cache_bytes)))
        for kind, title in (("summary", "profiled totals"), ("operator", "top operators")):
            rows = [op for op in self.ops or () if op.kind == kind]
            if rows:
                lines.append(f"{title:<40}{'total ms':>12}{'calls':>8}{'share':>9}")
                lines += [f"  {op.name[:38]:<38}{op.total_ms:>12.2f}{op.calls:>8d}{100.0 * op.share:>7.1f} %"
                          for op in rows]
        return "\n".join(lines)


def _row(label: str, value: str, unit: str) -> str:
    return f"{label:<28}{value:>14} {'' if value == 'n/a' else unit}".rstrip()


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _bytes(value: int | None) -> tuple[str, str]:
    """(number, unit) in binary units."""
    if value is None:
        return "n/a", ""
    size, unit = float(value), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024.0:
            break
        size, unit = size / 1024.0, bigger
    return (f"{size:.0f}" if unit == "B" else f"{size:.2f}"), unit


# ---- timing ------------------------------------------------------------------------------------------
class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.elapsed_ms``; ``time.perf_counter`` based."""

    def __init__(self) -> None:
        self.elapsed_ms = 0.0
        self._start: float | None = None

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._start is not None
        self.elapsed_ms = (time.perf_counter() - self._start) * 1000.0
        self._start = None


@contextmanager
def timed(profile: Profile, stage: str) -> Iterator[Stopwatch]:
    """Time the ``with`` body and add it to ``profile``'s stage: "decode" appends a step, the others accumulate
    (so a stage split over several calls sums). Recorded even when the body raises."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    watch = Stopwatch()
    try:
        with watch:
            yield watch
    finally:
        if stage == "decode":
            profile.decode_ms.append(watch.elapsed_ms)
        else:
            name = f"{stage}_ms"
            setattr(profile, name, getattr(profile, name) + watch.elapsed_ms)
