"""Where the demo export's time goes, and what the exporter's collector settings and two-process lowering save,
side by side in one run.

    .venv/bin/python benchmarks/export_time.py [--model tiny-llava] [--keep 0.12] [--prune-layer 2] [--runs 3]
                                               [--no-profile]

1. The demo export as a user runs it: `pruner-export --model tiny-llava --keep 0.12 --target executorch` in a child
   process, wall time from start to exit (imports and validation included), --runs times.
2. The export alone (``export_executorch``: load, trace, lower, serialise; no validation), each run in a fresh
   child, rotating through: Python's collector at CPython's defaults, one process (``jobs=1``); inside
   ``export.memory.fewer_collections``, one process; and ``fewer_collections`` with the methods traced and lowered
   in two processes (``jobs=2``, export/parallel_lowering.py): what pruner-export does. Each stage's seconds (with
   two processes: this process's stages; the second process works during "trace" and "lower") and the seconds this
   process's collector ran (``gc.callbacks``).
3. Unless --no-profile: one more child under cProfile (one process), lowering split into ExecuTorch's edge generation
   (``_gen_edge_manager_for_partitioners``: decompositions and edge passes, per method), XNNPACK's preprocess (its
   passes and serialisation, per partition) and the rest of ``to_backend`` (partitioning, per-partition copies), and
   serialisation (``to_executorch`` and the write). cProfile inflates Python-heavy code about 2x: its shares, not its
   seconds, are the figures.

Results: benchmarks/out/export_time.json; README.md "Export time" records them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("load", "trace", "lower", "serialise")
# (label, qualified-name suffix of the profiled function) for the profile's lowering split
PROFILED = (
    ("edge generation", "exir/program/_program.py:_gen_edge_manager_for_partitioners"),
    ("backend lowering (to_backend)", "exir/program/_program.py:to_backend"),
    ("XNNPACK preprocess", "backends/xnnpack/xnnpack_preprocess.py:preprocess"),
    ("serialisation (to_executorch + write)", "export/executorch_backends.py:write_program"),
)


MODES = {"default": ("default", 1), "fewer": ("fewer", 1), "parallel": ("fewer", 2)}  # mode: (collector, jobs)
LABELS = {"default": "CPython collector, 1 process", "fewer": "fewer_collections, 1 process",
          "parallel": "fewer_collections, 2 processes"}


def demo_export_options(model: str, keep: str, prune_layer: int, jobs: int = 2) -> tuple[Path, object]:
    """(checkpoint folder, ``ExportOptions``) of ``pruner-export --model M --keep K --prune-layer L --target
    executorch`` with pruner-export's other defaults (its cache, the checkpoint's own dtype) and ``jobs``
    processes lowering."""
    from export.cli import DEFAULT_CACHE
    from export.common import ExportOptions, resolve_dtype
    from pruner_core import PrunerConfig
    from pruner_core.adapters import resolve_model
    from pruner_core.config import parse_keep

    model_dir = resolve_model(model, DEFAULT_CACHE)
    dtype = resolve_dtype("auto", model_dir, "executorch", "none")[0]
    return model_dir, ExportOptions(model=model, target="executorch", dtype=dtype, jobs=jobs,
                                    pruner=PrunerConfig(keep=parse_keep(keep), layer=prune_layer))


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --keep and --prune-layer, as pruner-export takes them, defaulting to the demo export's."""
    parser.add_argument("--model", default="tiny-llava", help="what pruner-export --model takes (default: the demo's)")
    parser.add_argument("--keep", default="0.12", help="token count or fraction, as pruner-export --keep")
    parser.add_argument("--prune-layer", type=int, default=2, help="K: 0 = before the LLM, 2 = the paper's default")


def child_json(command: list[str], what: str) -> dict:
    """Run a benchmark's child process (a fresh process per measurement: imports, caches and the heap start the same
    for every run) -> the JSON object its last stdout line holds; SystemExit with its stderr's tail if it failed."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{Path(command[1]).stem}: {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_once(model: str, keep: str, prune_layer: int, mode: str) -> dict:
    """One export_executorch in this process -> {"stages": {stage: s}, "total_s", "gc_s", "collections"}.
    mode: a key of MODES (the collector: "default", CPython's settings, or "fewer", ``fewer_collections``; the
    processes lowering: ``ExportOptions.jobs``)."""
    from export.executorch_export import export_executorch
    from export.memory import fewer_collections

    collector, jobs = MODES[mode]
    model_dir, options = demo_export_options(model, keep, prune_layer, jobs)
    spent = {"gc_s": 0.0, "collections": 0}
    began = [0.0]

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            spent["gc_s"] += time.perf_counter() - began[0]
            spent["collections"] += 1

    marks = [("load", time.perf_counter())]
    gc.callbacks.append(on_collection)
    context = fewer_collections() if collector == "fewer" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, context:
        export_executorch(model_dir, Path(tmp), options, model_id=model,
                          progress=lambda stage: marks.append((stage, time.perf_counter())))
        marks.append(("end", time.perf_counter()))
    gc.callbacks.remove(on_collection)
    stages = {stage: round(marks[i + 1][1] - at, 2) for i, (stage, at) in enumerate(marks[:-1])}
    return {"mode": mode, "stages": stages, "total_s": round(marks[-1][1] - marks[0][1], 2),
            "gc_s": round(spent["gc_s"], 2), "collections": spent["collections"]}


def profile_once(model: str, keep: str, prune_layer: int) -> dict:
    """One export under cProfile (``fewer_collections``, one process: every stage in the profile) -> {label: share
    of the export's profiled time}."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = export_once(model, keep, prune_layer, "fewer")
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, tottime, cumtime, callers)}
    total = max(entry[3] for key, entry in stats.items() if key[2] == "export_executorch")
    shares = {}
    for label, suffix in PROFILED:
        path, name = suffix.split(":")
        rows = [entry for key, entry in stats.items() if key[0].endswith(path) and key[2] == name]
        shares[label] = {"share": round(sum(e[3] for e in rows) / total, 3), "calls": sum(e[1] for e in rows)}
    return {"profiled_total_s": round(total, 1), "unprofiled": result, "shares": shares}


def child(mode: str, args: argparse.Namespace) -> dict:
    """One measurement of ``mode`` in a fresh child process (``child_json``)."""
    return child_json([sys.executable, __file__, "--child", mode, "--model", args.model, "--keep", args.keep,
                       "--prune-layer", str(args.prune_layer)], f"the {mode} child")


def cli_seconds(args: argparse.Namespace) -> float:
    """Wall seconds of pruner-export as a user runs it (entry point, validation on), start to exit."""
    entry = Path(sys.executable).with_name("pruner-export")
    command = [str(entry)] if entry.is_file() else [sys.executable, "-m", "export.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run([*command, "--model", args.model, "--keep", args.keep, "--prune-layer",
                               str(args.prune_layer), "--target", "executorch", "--out", str(Path(tmp) / "out")],
                              cwd=REPO, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"export_time: pruner-export failed:\n{done.stderr[-3000:]}")
    return round(seconds, 1)


def median_row(runs: list[dict]) -> dict:
    return {**{stage: statistics.median(r["stages"].get(stage, 0.0) for r in runs) for stage in STAGES},
            "total_s": statistics.median(r["total_s"] for r in runs),
            "gc_s": statistics.median(r["gc_s"] for r in runs),
            "collections": statistics.median(r["collections"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind; medians are reported")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run that splits lowering")
    parser.add_argument("--child", choices=[*MODES, "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "export_time.json")
    args = parser.parse_args(argv)
    if args.child:
        result = (profile_once(args.model, args.keep, args.prune_layer) if args.child == "profile"
                  else export_once(args.model, args.keep, args.prune_layer, args.child))
        print(json.dumps(result))
        return 0
    if args.runs < 1:
        parser.error("--runs takes a count >= 1")
    from pruner_core.config import KeepError, parse_keep

    try:
        parse_keep(args.keep)
    except KeepError as error:
        parser.error(f"--keep {args.keep}: {error}")

    cli = [cli_seconds(args) for _ in range(args.runs)]
    runs = {mode: [] for mode in MODES}
    for _ in range(args.runs):
        for mode in runs:
            runs[mode].append(child(mode, args))
    rows = {mode: median_row(results) for mode, results in runs.items()}
    profile = None if args.no_profile else child("profile", args)

    command = (f"pruner-export --model {args.model} --keep {args.keep} --prune-layer {args.prune_layer} "
               "--target executorch")
    print(f"{command}: median {statistics.median(cli):.1f} s wall (runs: {', '.join(f'{s:.1f}' for s in cli)}; "
          "imports and validation included)")
    print("\nexport_executorch alone, median of", args.runs, "fresh processes (s):")
    print(f"  {'':<32}" + "".join(f"{stage:>10}" for stage in STAGES) + f"{'total':>10}{'in gc':>10}"
          f"{'collections':>13}")
    for mode, row in rows.items():
        print(f"  {LABELS[mode]:<32}" + "".join(f"{row[stage]:>10.1f}" for stage in STAGES)
              + f"{row['total_s']:>10.1f}{row['gc_s']:>10.1f}{row['collections']:>13.0f}")
    for slower, faster, what in (("default", "fewer", "fewer_collections"), ("fewer", "parallel", "two processes")):
        print(f"  {what} saves {rows[slower]['total_s'] - rows[faster]['total_s']:.1f} s "
              f"({rows[slower]['total_s'] / rows[faster]['total_s']:.2f}x the export's speed)")
    if profile:
        print(f"\nprofiled export ({profile['profiled_total_s']} s under cProfile), share of export_executorch:")
        for label, entry in profile["shares"].items():
            print(f"  {label:<40}{entry['share']:>7.1%}  ({entry['calls']} calls)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "cli_wall_s": cli, "runs": runs, "medians": rows,
                                     "profile": profile}, indent=2))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
