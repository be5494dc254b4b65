"""Time to first token at LLaVA-1.5-7B's real widths, pruned vs unpruned, against the token-count bound.

    .venv/bin/python benchmarks/llava_shapes.py [--decoder-layers 4] [--targets onnx,openvino,executorch] [--repeats 3]
        [--quantize 8da4w] [--quantize-vision int8] [--onnx-quantize int4]

Builds a LLaVA with LLaVA-1.5-7B's widths (CLIP ViT-L/14-336: 1024 hidden, 24 layers, 16 heads, 4096 FFN; Llama:
4096 hidden, 11008 FFN, 32 heads) but few decoder layers (random weights, the tiny tokenizer, so the LM head is
small), exports it pruned (64 of 576 at layer 2 and at layer 0) and unpruned to each target, runs every export side
by side in one process and reports time to first token, the decoder prefill time and its speed-up against the bound
set by token counts:

    layer K >= 1: bound = L * T / (K * T + (L - K) * T')      (K layers still see all T prompt tokens)
    layer 0:      bound = T / T'
    T = prompt tokens with all N image tokens, T' = with R, L = decoder layers.

Goals (issue #4): decoder prefill speed-up >= 80 % of the bound, pruning < 2 % of time to first token, peak memory of
the pruned run below the unpruned run. Each export's files (GB on disk) and the peak RSS of a fresh process that loads
it and generates --decode-tokens tokens are recorded too (issue #15: the layer-K ONNX folder used to hold the
decoder twice). Needs ~20 GiB of RAM for the ExecuTorch lowering at 4 decoder layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruner_core.adapters import TinyLlavaSpec, build_tiny_llava  # noqa: E402
from runtime.bench import PeakSampler, ensure_export  # noqa: E402
from runtime.memory import files_size_bytes  # noqa: E402


def llava_7b_widths(decoder_layers: int) -> TinyLlavaSpec:
    return TinyLlavaSpec(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                         vision_ffn=4096, text_hidden=4096, text_layers=decoder_layers, text_heads=32, text_ffn=11008)


def bound(total: int, kept: int, layers: int, split: int) -> float:
    return total / kept if split == 0 else layers * total / (split * total + (layers - split) * kept)


def run_peak_rss(folder: str | Path, new_tokens: int, engine: str = "onnxruntime") -> int:
    """Peak RSS in bytes of a fresh process (`pruner-run`, runtime.memory.peak_measuring_command: its own VmHWM) that
    loads the export and generates ``new_tokens`` tokens."""
    import subprocess
    import tempfile

    from runtime.memory import peak_measuring_command, read_peak_report

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak"
        command = peak_measuring_command("runtime.cli", [folder, "--image", "astronaut", "--prompt",
                                                         "What is in the picture?", "--max-new-tokens", new_tokens,
                                                         "--engine", engine], report)
        subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, check=True)
        return read_peak_report(report)


def add_measure_options(parser: argparse.ArgumentParser, keep: int, work_dir: Path, out: Path) -> None:
    """The options every shapes benchmark shares (targets, keep, repeats, quantization, decode tokens, folders)."""
    parser.add_argument("--targets", default="onnx,executorch",
                        help="onnx (onnxruntime), openvino (OpenVINO's CPU on the ONNX folders), executorch")
    parser.add_argument("--keep", type=int, default=keep)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", default="none", choices=["none", "8da4w"], help="ExecuTorch decoder")
    parser.add_argument("--quantize-vision", default="none", choices=["none", "int8"], help="ExecuTorch vision tower")
    parser.add_argument("--onnx-quantize", default="none", choices=["none", "int8", "int4"], help="ONNX decoder")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens generated to measure decode speed")
    parser.add_argument("--max-seq-len", type=int, default=None, help="KV cache length of the exports (default: "
                        "pruner-export's)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="hold one export in memory at a time (all its repeats, then the next) instead of all of "
                             "them interleaved: for models whose sessions do not fit in RAM together")
    parser.add_argument("--work-dir", type=Path, default=work_dir)
    parser.add_argument("--out", type=Path, default=out)


def measure(model_dir: Path, decoder_layers: int, args: argparse.Namespace) -> list[dict]:
    """Export ``model_dir`` unpruned, pruned at layer 2 and at layer 0 (``args.keep`` tokens) to each of
    ``args.targets``, run every export side by side in one process, print the table and write ``args.out``.

    Rows: time to first token and decoder prefill (median of ``args.repeats``, ms), the prefill speed-up against the
    token-count bound, the selection's share of time to first token, decode tokens/s, files (bytes) and the peak RSS
    of a fresh process running the export (bytes)."""
    from runtime import load
    from skimage import data

    settings = [("unpruned", 1.0, 2), ("layer 2", args.keep, 2), ("layer 0", args.keep, 0)]
    runs = []
    for target in args.targets.split(","):
        exported = "onnx" if target == "openvino" else target  # OpenVINO runs the ONNX folders
        quantize = args.quantize if target == "executorch" else args.onnx_quantize
        vision = args.quantize_vision if target == "executorch" else "none"
        for label, keep, layer in settings:
            folder = ensure_export(str(model_dir.resolve()), exported, keep, layer, args.work_dir / exported, None,
                                   quantize=quantize, quantize_vision=vision, max_seq_len=args.max_seq_len)
            runs.append({"target": target, "label": label, "keep": keep, "layer": layer, "folder": folder,
                         "quantization": f"{quantize}/vision {vision}",
                         "engine": "openvino" if target == "openvino" else "onnxruntime"})
    for run in runs:  # each export alone in a fresh process: its files and the memory a run of it needs
        run["folder_bytes"] = files_size_bytes(run["folder"])
        run["run_peak_rss_bytes"] = run_peak_rss(run["folder"], args.decode_tokens, run["engine"])
    image, prompt = data.astronaut(), "What is in the picture?"
    batches = [[run] for run in runs] if args.one_at_a_time else [runs]  # exports held in memory together
    for batch in batches:
        for run in batch:
            run["session"] = load(run["folder"], engine=run["engine"])
        for run in batch:  # warm-up
            run["session"].generate(image, prompt, max_new_tokens=1)
        for _ in range(args.repeats):
            for run in batch:
                with PeakSampler() as sampler:
                    profile = run["session"].generate(image, prompt, max_new_tokens=1).profile
                run.setdefault("ttft", []).append(profile.time_to_first_token_ms)
                run.setdefault("prefill", []).append(profile.prefill_ms)
                run.setdefault("vision", []).append(profile.vision_ms)
                run.setdefault("peak", []).append(sampler.growth)  # memory the call itself adds
                run["tokens"] = (profile.prompt_tokens_before_pruning, profile.prompt_tokens_after_pruning)
        for run in batch:  # decode speed: tokens after the first, at a fixed count (random weights rarely stop early)
            profile = run["session"].generate(image, prompt, max_new_tokens=args.decode_tokens).profile
            run["decode_tps"] = profile.decode_tokens_per_s
            del run["session"]
        gc.collect()
    report = []
    print(f"{'target':<11} {'setting':<9} {'T->T_':>10} {'TTFT ms':>9} {'prefill ms':>11} {'speed-up':>9} "
          f"{'bound':>6} {'of bound':>9} {'decode t/s':>11} {'call +MiB':>10} {'files GB':>9} {'run peak GB':>12}")
    for run in runs:
        base = next(r for r in runs if r["target"] == run["target"] and r["label"] == "unpruned")
        ttft, prefill = statistics.median(run["ttft"]), statistics.median(run["prefill"])
        speedup = statistics.median(base["prefill"]) / prefill
        total, kept = run["tokens"]
        limit = bound(total, kept, decoder_layers, run["layer"]) if run["label"] != "unpruned" else 1.0
        row = {k: run[k] for k in ("target", "label", "keep", "layer", "quantization", "decode_tps")} | {
            "tokens": run["tokens"], "ttft_ms": ttft, "prefill_ms": prefill, "vision_ms": statistics.median(run["vision"]),
            "decoder_prefill_speedup": speedup, "bound": limit, "share_of_bound": speedup / limit,
            "ttft_speedup": statistics.median(base["ttft"]) / ttft, "call_peak_growth_bytes": max(run["peak"]),
            "folder_bytes": run["folder_bytes"], "run_peak_rss_bytes": run["run_peak_rss_bytes"]}
        report.append(row)
        print(f"{run['target']:<11} {run['label']:<9} {f'{total}->{kept}':>10} {ttft:>9.0f} {prefill:>11.0f} "
              f"{speedup:>8.2f}x {limit:>6.2f} {speedup / limit:>8.0%} {run['decode_tps'] or 0:>11.2f} "
              f"{max(run['peak']) / 2**20:>10.0f} {run['folder_bytes'] / 1e9:>9.2f} "
              f"{run['run_peak_rss_bytes'] / 1e9:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder-layers", type=int, default=4)
    add_measure_options(parser, keep=64, work_dir=Path("exported") / "llava_shapes",
                        out=Path("benchmarks") / "out" / "llava_shapes.json")
    args = parser.parse_args(argv)

    from runtime.console import quiet_libraries

    quiet_libraries()
    model_dir = args.work_dir / f"llava7b-widths-{args.decoder_layers}l"
    if not (model_dir / "config.json").is_file():
        print(f"building {model_dir} ...", file=sys.stderr)
        build_tiny_llava(model_dir, spec=llava_7b_widths(args.decoder_layers))
    measure(model_dir, args.decoder_layers, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
