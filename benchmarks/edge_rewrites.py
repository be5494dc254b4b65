"""The XNNPACK recipe's edge rewrites (export/edge_rewrites.py) on and off, side by side in one run.

    .venv/bin/python benchmarks/edge_rewrites.py [--model tiny-llava] [--keep 0.12] [--prune-layer 2] [--runs 3]
                                                 [--max-new-tokens 64]

For each variant, interleaved, --runs times: ``export_executorch`` in a fresh child process as pruner-export runs it
(two-process lowering, ``fewer_collections``; validation off), its wall seconds; the XNNPACK delegates of each
method of the written program; then ``pruner-run <export> --image astronaut --json`` (greedy, --max-new-tokens):
time to first token, prefill, decode tokens/s. "off" lowers with the same XNNPACK partitioners and no edge passes.

Results: benchmarks/out/edge_rewrites.json; README.md ("Export time") records them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export_time import add_export_arguments, child_json, demo_export_options  # noqa: E402  (benchmarks/, this script's folder)

VARIANTS = ("on", "off")
RUNTIME = ("time_to_first_token_ms", "prefill_ms", "decode_tokens_per_s")


def export_once(model: str, keep: str, prune_layer: int, variant: str, out_dir: Path) -> dict:
    """One export in this process -> {"export_s", "delegates": {method: count}}."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from export.executorch_backends import BACKENDS
    from export.executorch_export import export_executorch
    from export.memory import fewer_collections

    model_dir, options = demo_export_options(model, keep, prune_layer)
    xnnpack = BACKENDS["xnnpack"]
    recipe = xnnpack if variant == "on" else dataclasses.replace(xnnpack, edge_passes=list)
    started = time.perf_counter()
    with fewer_collections():
        export_executorch(model_dir, out_dir, options, model_id=model, recipe=recipe)
    seconds = time.perf_counter() - started
    program = deserialize_pte_binary((out_dir / "model.pte").read_bytes()).program
    return {"export_s": round(seconds, 2),
            "delegates": {plan.name: len(plan.delegates) for plan in program.execution_plan if plan.delegates}}


def run_once(out_dir: Path, max_new_tokens: int) -> dict:
    """pruner-run on the export as a user runs it -> its profile's time to first token, prefill, decode tokens/s."""
    entry = Path(sys.executable).with_name("pruner-run")
    command = [str(entry)] if entry.is_file() else [sys.executable, "-m", "runtime.cli"]
    done = subprocess.run([*command, str(out_dir), "--image", "astronaut", "--prompt", "What is in the picture?",
                           "--max-new-tokens", str(max_new_tokens), "--json"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"edge_rewrites: pruner-run failed:\n{done.stderr[-3000:]}")
    profile = json.loads(done.stdout)
    profile = profile.get("profile", profile)
    return {key: round(profile[key], 2) for key in RUNTIME}


def measure(variant: str, args: argparse.Namespace) -> dict:
    """A fresh child per export (imports, caches and the heap start the same), then pruner-run on what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "export"
        out_dir.mkdir()
        result = child_json([sys.executable, __file__, "--child", variant, "--out", str(out_dir), "--model",
                             args.model, "--keep", args.keep, "--prune-layer", str(args.prune_layer)],
                            f"the {variant} export")
        return {**result, **run_once(out_dir, args.max_new_tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser)
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant, interleaved; medians reported")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens pruner-run decodes per run")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "edge_rewrites.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(export_once(args.model, args.keep, args.prune_layer, args.child, args.out)))
        return 0
    if args.runs < 1 or args.max_new_tokens < 1:
        parser.error("--runs and --max-new-tokens take counts >= 1")

    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.runs):
        for variant in VARIANTS:
            runs[variant].append(measure(variant, args))
    medians = {variant: {key: statistics.median(r[key] for r in results) for key in ("export_s", *RUNTIME)}
               for variant, results in runs.items()}
    print(f"{args.model}, keep {args.keep}, layer {args.prune_layer}: median of {args.runs} interleaved runs")
    print(f"  {'rewrites':<10}{'export s':>10}{'TTFT ms':>10}{'prefill ms':>12}{'decode tok/s':>14}  delegates")
    for variant, row in medians.items():
        print(f"  {variant:<10}{row['export_s']:>10.1f}{row['time_to_first_token_ms']:>10.1f}"
              f"{row['prefill_ms']:>12.1f}{row['decode_tokens_per_s']:>14.0f}  {runs[variant][0]['delegates']}")
    for key in ("export_s", *RUNTIME):
        print(f"  {key}: on / off = {medians['on'][key] / medians['off'][key]:.2f} "
              f"(runs on: {[r[key] for r in runs['on']]}, off: {[r[key] for r in runs['off']]})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "keep": args.keep, "prune_layer": args.prune_layer,
                                     "max_new_tokens": args.max_new_tokens, "runs": runs, "medians": medians},
                                    indent=2))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
