"""`pruner-bench`: keep settings side by side in one process, per runtime, with speed-up ratios against keep 1.0.

    pruner-bench --model tiny-llava --targets executorch,onnx --keeps 1.0,0.33,0.22,0.11

Exports each (target, keep) once into --work-dir (reused when already there), loads every export, then runs them
interleaved (warm-up, then repeats) so that each setting sees the same machine state. Prints medians of time to
first token, prefill, decode speed and peak memory growth of the call, with ratios against keep 1.0 on the same
runtime; writes JSON and a PNG chart of time to first token.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .memory import current_rss_bytes
from .console import HelpFormatter, add_verbose, native_notices_filtered, quiet_libraries, run_program


class PeakSampler:
    """Peak resident memory while a block runs, sampled every `interval` seconds from another thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.base = current_rss_bytes() or 0
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes() or 0)

    @property
    def growth(self) -> int:
        return self.peak - self.base


@dataclass
class Setting:
    target: str
    keep: Any  # pruner_core.config.Keep (a count and a fraction are different settings)
    folder: str
    ttft_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    peak_growth_bytes: list[int] = field(default_factory=list)
    kv_cache_bytes: int = 0
    prompt_tokens: int = 0

    def medians(self) -> dict[str, float]:
        def med(values):
            return statistics.median(values) if values else float("nan")

        return {"ttft_ms": med(self.ttft_ms), "prefill_ms": med(self.prefill_ms),
                "decode_tokens_per_s": med(self.decode_tps), "peak_growth_bytes": med(self.peak_growth_bytes)}


def parse_keeps(text: str) -> list:
    """'1.0,0.33,64' -> [Keep(1.0), Keep(0.33), Keep(64)] (argparse type: pruner_core.config.parse_keeps)."""
    from pruner_core.config import parse_keeps as parse

    return parse(text)


def ensure_export(model: str, target: str, keep, layer: int, work_dir: Path, cache_dir: Path | None,
                  quantize: str = "none", quantize_vision: str = "none", max_seq_len: int | None = None) -> Path:
    """Export once; reuse a folder whose export_config.json records the same pruner and quantization settings."""
    from export.cli import ExportError, build_parser as export_parser, default_out, run as export_run

    suffix = ("" if quantize == "none" else f"-{quantize}") + (
        "" if quantize_vision == "none" else f"-vision{quantize_vision}")
    folder = work_dir / f"{default_out(model, keep, target).name}-layer{layer}{suffix}"
    config_file = folder / "export_config.json"
    if config_file.is_file():
        from pruner_core.config import Keep

        config = json.loads(config_file.read_text())
        pruner = config.get("pruner", {})
        try:
            same = Keep.of(pruner.get("keep")) == Keep.of(keep) and pruner.get("layer") == layer and \
                config.get("quantization") == quantize and config.get("vision_quantization", "none") == quantize_vision
        except ValueError:  # no or an unreadable keep: export again
            same = False
        if same:
            return folder
    argv = ["--model", model, "--keep", str(keep), "--prune-layer", str(layer), "--target", target,
            "--out", str(folder), "--overwrite", "--quantize", quantize]
    if quantize_vision != "none":
        argv += ["--quantize-vision", quantize_vision]
    if max_seq_len is not None:
        argv += ["--max-seq-len", str(max_seq_len)]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    try:  # the exporter itself: its summary without the closing notes per export (pruner-bench prints its own once)
        export_run(export_parser().parse_args(argv), notes=False)
    except ExportError as error:
        raise RuntimeError(f"export of {model} keep={keep} target={target} failed: {error}") from None
    return folder


def supported_targets(model: str, targets: list[str], cache_dir: Path | None) -> list[str]:
    """The requested targets the model's family exports to (adapter.export_targets), in the order asked; a one-line
    note on stderr for each one skipped; ValueError when none is left."""
    from export.cli import DEFAULT_CACHE
    from pruner_core.adapters import adapter_for, resolve_model

    adapter = adapter_for(resolve_model(model, cache_dir or DEFAULT_CACHE))
    kept = [target for target in targets if target in adapter.export_targets]
    skipped = [target for target in targets if target not in adapter.export_targets]
    if not kept:
        raise ValueError(f"{model} is a {adapter.family} checkpoint, which exports to "
                         f"{', '.join(adapter.export_targets) or 'no target yet'}, none of --targets "
                         f"{','.join(targets)}" + (f"; pass --targets {','.join(adapter.export_targets)}"
                                                    if adapter.export_targets else ""))
    if skipped:
        print(f"pruner-bench: note: skipping {', '.join(skipped)} ({adapter.family} exports to "
              f"{', '.join(adapter.export_targets)} only)", file=sys.stderr)
    return kept


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from . import load
    from .cli import resolve_image

    image = resolve_image(args.image)
    settings: list[Setting] = []
    sessions = []
    for target in supported_targets(args.model, args.targets, args.cache_dir):
        for keep in args.keeps:
            folder = ensure_export(args.model, target, keep, args.prune_layer, args.work_dir, args.cache_dir)
            settings.append(Setting(target=target, keep=keep, folder=str(folder)))
            sessions.append(load(folder))
    runs = [(i, r) for r in range(args.warmup + args.repeats) for i in range(len(settings))]
    progress = _progress(len(runs), args.no_progress)
    for index, repeat in runs:
        setting, session = settings[index], sessions[index]
        with PeakSampler() as sampler:
            result = session.generate(image, args.prompt, max_new_tokens=args.max_new_tokens)
        progress(f"{setting.target} keep {setting.keep}")
        if repeat < args.warmup:
            continue
        profile = result.profile
        setting.ttft_ms.append(profile.time_to_first_token_ms)
        setting.prefill_ms.append(profile.prefill_ms)
        if profile.decode_tokens_per_s:
            setting.decode_tps.append(profile.decode_tokens_per_s)
        setting.peak_growth_bytes.append(sampler.growth)
        setting.kv_cache_bytes = profile.kv_cache_bytes or 0
        setting.prompt_tokens = profile.prompt_tokens_after_pruning or 0
    report = summarise(settings, args)
    report.update(image_fields(args.image))
    report["random_weights"] = any(bool(session.config.get("random_weights")) for session in sessions)
    return report


def summarise(settings: list[Setting], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for setting in settings:
        base = next((s for s in settings if s.target == setting.target and s.keep.keeps_all), None)
        medians, base_medians = setting.medians(), base.medians() if base else None
        ratio = (lambda key, inverse=False: None if base_medians is None or not medians[key] else
                 (medians[key] / base_medians[key] if inverse else base_medians[key] / medians[key]))
        rows.append({
            **{k: v for k, v in asdict(setting).items() if k not in ("ttft_ms", "prefill_ms", "decode_tps",
                                                                      "peak_growth_bytes")},
            "keep": setting.keep.number,  # int count or float fraction: JSON keeps the two apart
            "median": medians,
            "speedup_vs_keep1": {"ttft": ratio("ttft_ms"), "prefill": ratio("prefill_ms"),
                                 "decode": ratio("decode_tokens_per_s", inverse=True),
                                 "peak_growth": ratio("peak_growth_bytes")},
            "samples": {"ttft_ms": setting.ttft_ms, "prefill_ms": setting.prefill_ms},
        })
    return {"model": args.model, "prune_layer": args.prune_layer, "repeats": args.repeats, "warmup": args.warmup,
            "max_new_tokens": args.max_new_tokens, "prompt": args.prompt, "rows": rows}


def image_fields(name: str) -> dict[str, str]:
    """Which image the report measured: a file's absolute path, or the bundled sample's name."""
    path = Path(name)
    if path.exists():
        return {"image": str(path.resolve()), "image_source": "file"}
    return {"image": name, "image_source": "scikit-image sample"}


def table(report: dict[str, Any]) -> str:
    lines = [f"pruner-bench {report['model']} (layer {report['prune_layer']}, median of {report['repeats']})",
             f"{'runtime':<11} {'keep':>6} {'tokens':>7} {'TTFT ms':>9} {'x':>6} {'prefill ms':>11} {'x':>6} "
             f"{'decode t/s':>11} {'peak +MiB':>10} {'KV MiB':>8}"]
    for row in report["rows"]:
        m, x = row["median"], row["speedup_vs_keep1"]

        def fmt(v):
            return f"{v:5.2f}x" if v else "    - "

        lines.append(f"{row['target']:<11} {str(row['keep']):>6} {row['prompt_tokens']:>7} {m['ttft_ms']:>9.1f} "
                     f"{fmt(x['ttft'])} {m['prefill_ms']:>11.1f} {fmt(x['prefill'])} "
                     f"{m['decode_tokens_per_s']:>11.1f} {m['peak_growth_bytes'] / 2**20:>10.1f} "
                     f"{row['kv_cache_bytes'] / 2**20:>8.2f}")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """Bars of median time to first token per keep setting, one group per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({row["target"] for row in report["rows"]})
    keeps = [row["keep"] for row in report["rows"] if row["target"] == targets[0]]
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(keeps) * len(targets), 4))
    width = 0.8 / len(targets)
    for t, target in enumerate(targets):
        values = [row["median"]["ttft_ms"] for row in report["rows"] if row["target"] == target]
        axis.bar([k + t * width for k in range(len(values))], values, width, label=target)
    axis.set_xticks([k + width * (len(targets) - 1) / 2 for k in range(len(keeps))], [f"keep {k}" for k in keeps])
    axis.set_ylabel("time to first token (ms)")
    axis.set_title(f"{report['model']}: time to first token by keep setting")
    axis.legend()
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def _progress(total: int, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is not None and not disabled:
        bar = tqdm(total=total, unit="run", file=sys.stderr)

        def step(label: str) -> None:
            bar.set_description(label)
            bar.update(1)
            if bar.n == total:
                bar.close()
        return step
    return lambda label: None


TARGETS = ("executorch", "onnx")


def parse_targets(text: str) -> list[str]:
    """argparse type: 'executorch,onnx' -> ['executorch', 'onnx'] (known targets, each once)."""
    targets = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(TARGETS)}")
    return targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruner-bench", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny-llava",
                        help="a model name (tiny-llava, tiny-qwen2-vl, llava-1.5-7b, ...), a cached hub id or a "
                             "checkpoint directory, as pruner-export takes it")
    parser.add_argument("--targets", type=parse_targets, default=list(TARGETS), metavar="LIST",
                        help="comma-separated runtimes to compare; targets the model's family does not export to "
                             "are skipped with a note (default: executorch,onnx)")
    parser.add_argument("--keeps", type=parse_keeps, default="1.0,0.33,0.22,0.11",
                        help="comma-separated counts (64) or fractions (0.33); must include 1.0, the baseline "
                             "(default: %(default)s)")
    parser.add_argument("--prune-layer", type=int, default=2,
                        help="K: prune between decoder layers K-1 and K (0 = before the LLM)")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per setting (the table shows medians)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs per setting first")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per run")
    parser.add_argument("--image", default="astronaut",
                        help="image file (or astronaut / chelsea / coffee, the bundled scikit-image photographs)")
    parser.add_argument("--prompt", default="What is in the picture?", help="the question asked on every run")
    parser.add_argument("--work-dir", type=Path, default=Path("exported") / "bench",
                        help="where the exports are written (and reused by later runs with the same settings)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where tiny models are built (default: pruner-export's, ~/.cache/vlm-pruner-edge/models)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON report; the chart goes beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_verbose(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    if not any(k.keeps_all for k in args.keeps):
        print("pruner-bench: error: --keeps must include 1.0 (the unpruned baseline of the ratios; the count 1 keeps "
              "one token)", file=sys.stderr)
        return 2
    try:
        with native_notices_filtered(args.verbose):
            report = run_bench(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"pruner-bench: error: {error}", file=sys.stderr)
        return 2
    print(table(report))
    if report.get("random_weights"):
        print("note: random weights (a tiny or benchmark build): the timings are real, the answers gibberish by "
              "design")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    chart(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    hint = ["pruner-run", report["rows"][-1]["folder"], "--image", args.image, "--prompt", args.prompt]
    print(f"next: {shlex.join(hint)}")
    return 0


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
