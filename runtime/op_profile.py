"""Operator-level breakdowns: onnxruntime's profiler traces and ExecuTorch ETDump, summarised as top operators."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .profile import OpTime


def top_operators(totals_us: dict[str, float], calls: dict[str, int], limit: int = 15) -> list[OpTime]:
    """{operator: total microseconds} -> the `limit` largest, with their share of all operator time."""
    grand = sum(totals_us.values()) or 1.0
    ranked = sorted(totals_us.items(), key=lambda item: -item[1])[:limit]
    return [OpTime(name=name, total_ms=us / 1000.0, calls=calls[name], share=us / grand) for name, us in ranked]


def summarise_onnx_traces(paths: Iterable[str | Path], limit: int = 15) -> list[OpTime]:
    """onnxruntime profiler JSON traces -> top operators by time (node events, grouped by op type)."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for path in paths:
        for event in json.loads(Path(path).read_text()):
            if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
                continue
            op = event.get("args", {}).get("op_name", event.get("name"))
            totals[op] += float(event.get("dur", 0.0))
            calls[op] += 1
    return top_operators(totals, calls, limit)


def summarise_etdump(etdump_path: str | Path, limit: int = 15) -> list[OpTime]:
    """An ExecuTorch ETDump (timing only) -> top operators / delegate calls by time, via the devtools Inspector."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(etdump_path))
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None or event.name in ("Method::execute", "Program::load_method", "Method::init"):
                continue
            totals[event.name] += sum(event.perf_data.raw) * 1000.0  # raw is in ms
            calls[event.name] += len(event.perf_data.raw)
    return top_operators(totals, calls, limit)
