"""The headline command at full size: a LLaVA-1.5-7B-shaped checkpoint, exported and run on this machine.

    .venv/bin/python benchmarks/full_size.py [--settings headline,headline-8da4w,...] [--work-dir DIR]

Builds, once, a checkpoint laid out as llava-hf ships llava-1.5-7b-hf (real widths, 32 decoder layers, vocabulary
32064, random weights, fp16 safetensors shards; built directly in fp16: an fp32 copy would not fit in 24 GiB), then
for each setting runs `pruner-export` in a child process (wall time, the child's peak RSS, `.pte` size) and
`pruner-run` on the result in another (time to first token, prefill and decode tokens/s, the child's peak RSS).
Settings (all ExecuTorch, XNNPACK, dtype auto = fp16):

    headline            the headline command as written: keep 0.12 (69 of 576), layer 2
    headline-8da4w      the same with --quantize 8da4w
    keep1.0-8da4w       unpruned baseline, 8da4w
    k64-layer0-8da4w    64 of 576 before the LLM, 8da4w
    k64-layer2-8da4w    64 of 576 at layer 2, 8da4w

Exports run with --no-validate: the checkpoint's weights are random, and at full depth the 8da4w export's logits no
longer follow the fp16 eager model's (measured: logit correlation 0.07 at the first step, k64-layer0-8da4w; the
tolerance asks 0.5), so validation refuses it and nothing is left to run (random weights cannot tell quantization
noise compounded over 32 random layers from a fault: fp32 8da4w at 4 decoder layers gave 0.61, fp16 0.28); and the
fp16 `.pte`'s validation needs more memory than this machine has (pruner-export says so and skips it). With
validation, k64-layer0-8da4w peaked at 18.2 GiB, export and validation together, before the lowering let go of
quantized weights slice by slice (its export alone now peaks at 9.35 GiB; README "Export memory").

Each export takes tens of minutes and most of the machine's memory: run nothing else alongside. Results go to
--out (JSON) as each setting finishes; a setting already there is skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.llava_shapes import llava_7b_widths  # noqa: E402
from runtime.memory import peak_measuring_command, read_peak_report  # noqa: E402

SETTINGS = {
    "headline": ["--keep", "0.12"],
    "headline-8da4w": ["--keep", "0.12", "--quantize", "8da4w"],
    "keep1.0-8da4w": ["--keep", "1.0", "--quantize", "8da4w"],
    "k64-layer0-8da4w": ["--keep", "64", "--prune-layer", "0", "--quantize", "8da4w"],
    "k64-layer2-8da4w": ["--keep", "64", "--prune-layer", "2", "--quantize", "8da4w"],
}


def child_peak(module: str, args: list[str], log: Path, stdout: Path | None = None) -> tuple[int, float, int | None]:
    """Run ``python -m module args`` (stderr to ``log``, stdout too unless ``stdout`` is given) -> (return code, wall
    seconds, the child's own peak RSS in bytes, VmHWM; None when it was killed before reporting). Not os.wait4's
    ru_maxrss: Linux carries this process's peak (building the 14 GB checkpoint) over into it."""
    report = log.with_suffix(".peak")
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle, open(stdout or os.devnull, "w") as out:
        code = subprocess.call(peak_measuring_command(module, args, report), cwd=REPO,
                               stdout=out if stdout else handle, stderr=handle)
    wall = time.perf_counter() - start
    return code, wall, read_peak_report(report) if report.is_file() else None


def build_checkpoint(folder: Path) -> Path:
    from dataclasses import replace

    from pruner_core.adapters import build_tiny_llava

    if not (folder / "config.json").is_file():
        spec = replace(llava_7b_widths(32), dtype="float16", text_vocab=32064)
        print(f"building {folder} (fp16, ~14 GB) ...", file=sys.stderr)
        build_tiny_llava(folder, spec=spec)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--work-dir", type=Path, default=Path("exported") / "full_size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "out" / "full_size.json")
    parser.add_argument("--keep-exports", action="store_true", help="keep each .pte (13 GiB unquantized)")
    args = parser.parse_args(argv)
    model = build_checkpoint(args.work_dir / "llava-1.5-7b-shaped")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.settings.split(","):
        if name in results:
            continue
        folder = args.work_dir / name
        code, wall, peak = child_peak("export.cli", ["--model", model.resolve(), *SETTINGS[name], "--target",
                                                     "executorch", "--out", folder, "--overwrite", "--no-validate"],
                                      args.work_dir / f"{name}-export.log")
        row = {"argv": SETTINGS[name], "export_rc": code, "export_wall_s": round(wall, 1),
               "export_peak_rss_gib": peak and round(peak / 2**30, 2)}
        if code == 0:
            row["pte_gib"] = round((folder / "model.pte").stat().st_size / 2**30, 2)
            run_json = args.work_dir / f"{name}-run.json"  # pruner-run --json: stdout is the JSON object alone
            run_args = [folder, "--image", "astronaut", "--prompt", "What is in the picture?", "--max-new-tokens", "16",
                        "--json"]
            code, wall, peak = child_peak("runtime.cli", run_args, args.work_dir / f"{name}-run.log", stdout=run_json)
            profile = json.loads(run_json.read_text()) if code == 0 else {}
            row |= {"run_rc": code, "run_peak_rss_gib": peak and round(peak / 2**30, 2),
                    **{key: profile.get(key) for key in ("time_to_first_token_ms", "prefill_ms", "vision_ms",
                                                          "prompt_tokens_after_pruning", "decode_tokens_per_s")}}
            if profile.get("prefill_ms"):
                row["prefill_tokens_per_s"] = round(1000 * profile["prompt_tokens_after_pruning"]
                                                    / (profile["prefill_ms"] + profile["vision_ms"]), 1)
            if not args.keep_exports:
                (folder / "model.pte").unlink()
        results[name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
