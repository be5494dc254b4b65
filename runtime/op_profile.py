"""Operator-level breakdowns: onnxruntime's profiler traces and ExecuTorch ETDump, summarised as top operators."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .profile import OpTime


# Events that total other events rather than time one operator: ExecuTorch's wrappers around every non-delegated
# kernel call and every delegate call (ETDump), and onnxruntime's whole-run event (cat "Session").
ETDUMP_SUMMARY_EVENTS = ("OPERATOR_CALL", "DELEGATE_CALL")
ETDUMP_IGNORED_EVENTS = ("Method::execute", "Program::load_method", "Method::init")
ONNX_SUMMARY_EVENTS = ("model_run",)


def top_operators(
    totals_us: dict[str, float], calls: dict[str, int], limit: int = 15, summary: tuple[str, ...] = ()
) -> list[OpTime]:
    """{event: total microseconds} -> the summary rows (the events named in ``summary``, in that order; kind
    "summary", share of all summary time) followed by the ``limit`` largest operator rows (kind "operator", share of
    all operator time; summary events are left out of it, so no time is counted twice)."""
    operators = {name: us for name, us in totals_us.items() if name not in summary}
    grand = sum(operators.values()) or 1.0
    ranked = sorted(operators.items(), key=lambda item: -item[1])[:limit]
    present = [name for name in summary if name in totals_us]
    summary_grand = sum(totals_us[name] for name in present) or 1.0
    rows = [OpTime(name=name, total_ms=totals_us[name] / 1000.0, calls=calls[name],
                   share=totals_us[name] / summary_grand, kind="summary") for name in present]
    return rows + [OpTime(name=name, total_ms=us / 1000.0, calls=calls[name], share=us / grand) for name, us in ranked]


def summarise_onnx_traces(paths: Iterable[str | Path], limit: int = 15) -> list[OpTime]:
    """onnxruntime profiler JSON traces -> top operators by time (node events, grouped by op type)."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for path in paths:
        for event in json.loads(Path(path).read_text()):
            name = str(event.get("name", ""))
            if event.get("cat") == "Session" and name in ONNX_SUMMARY_EVENTS:
                op = name
            elif event.get("cat") == "Node" and name.endswith("_kernel_time"):
                op = event.get("args", {}).get("op_name", name)
            else:
                continue
            totals[op] += float(event.get("dur", 0.0))
            calls[op] += 1
    return top_operators(totals, calls, limit, summary=ONNX_SUMMARY_EVENTS)


def summarise_etdump(etdump_path: str | Path, limit: int = 15) -> list[OpTime]:
    """An ExecuTorch ETDump (timing only) -> top operators / delegate calls by time, via the devtools Inspector."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(etdump_path))
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None or event.name in ETDUMP_IGNORED_EVENTS:
                continue
            totals[event.name] += sum(event.perf_data.raw) * 1000.0  # raw is in ms
            calls[event.name] += len(event.perf_data.raw)
    return top_operators(totals, calls, limit, summary=ETDUMP_SUMMARY_EVENTS)
