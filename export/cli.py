"""`pruner-export`: prune a vision-language model's image tokens and export it (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) to
ExecuTorch and/or ONNX.

    pruner-export --model llava-1.5-7b --keep 0.12 --target executorch
    pruner-export --model qwen2-vl-2b --keep 0.12 --target onnx
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TextIO

from pruner_core import PrunerConfig, method_names
from pruner_core.config import Keep, parse_keep

from .common import (DTYPES, EXECUTORCH_BACKENDS, ExportOptions, check_replaceable, checkpoint_dtype, resolve_dtype,
                     staging_directory)
from .model_card import human_size
from .validate import Tolerance, tolerance_for, tolerances_text
from runtime.console import (HelpFormatter, add_verbose, interrupt_status, native_notices_filtered, quiet_libraries,
                             run_program)

DEFAULT_CACHE = Path.home() / ".cache" / "vlm-pruner-edge" / "models"


class ExportError(Exception):
    """A problem the user can fix; printed without a traceback."""


@dataclass
class Progress:
    """Stage lines with elapsed time: `[  12.3s] lower (trace took 4.1s)`."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    start: float = field(default_factory=time.perf_counter)
    current: str | None = None
    stage_start: float = 0.0
    durations: dict[str, float] = field(default_factory=dict)

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self._close(now)
        self.current, self.stage_start = stage, now
        print(f"[{now - self.start:7.1f}s] {stage} ...", file=self.stream, flush=True)

    def _close(self, now: float) -> None:
        if self.current is not None:
            self.durations[self.current] = self.durations.get(self.current, 0.0) + now - self.stage_start
        self.current = None

    def finish(self) -> float:
        now = time.perf_counter()
        self._close(now)
        return now - self.start


def default_out(model: str, keep: Keep | int | float, target: str) -> Path:
    """exported/<model>-keep<keep>-<target>; the keep label tells a count (64, 1) from a fraction (0.12, 1.0)."""
    name = Path(model.rstrip("/")).name or model.replace("/", "_")
    return Path("exported") / f"{name}-keep{Keep.of(keep)}-{target}"


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(counts, options: ExportOptions, stored_dtype: str, available: int | None, stream: TextIO,
                 validate: bool = True) -> bool:
    """Say what the export needs (export/memory.py's measured model of its peak); refuse when the estimated peak
    exceeds the free memory, saying what would fit. Returns whether the validation that follows (``validate``) fits
    too; when it does not, says so: the export is then written unchecked (``Validation skipped`` in the caller)."""
    from .memory import BYTES_PER_PARAM, GIB, estimate_export_memory, estimate_validation_memory

    estimate = estimate_export_memory(counts, options, stored_dtype)
    weights = counts.total * BYTES_PER_PARAM[options.dtype]
    have = f"{available / GIB:.1f} GiB available" if available else "available memory unknown"
    size = f"{counts.total / 1e9:.2f}B" if counts.total >= 1e8 else f"{counts.total / 1e6:.2f}M"
    held = f"{weights / GIB:.1f} GiB" if weights >= GIB / 10 else f"{weights / 2**20:.1f} MiB"
    print(f"model: {size} parameters, {options.dtype} weights {held}; "
          f"{options.target} export {estimate.describe()}; {have}", file=stream)
    if available is None or estimate.peak <= available:
        validation = estimate_validation_memory(counts, options, stored_dtype)
        validation_fits = not validate or available is None or validation <= available
        if not validation_fits:
            print(f"note: validation of the {options.target} export needs ~{validation / GIB:.1f} GiB (running the "
                  f"written files, then the eager model), more than the {available / GIB:.1f} GiB available: that "
                  "export will be written unchecked; run it with pruner-run on a machine with more memory",
                  file=stream)
        return validation_fits
    hints = []
    if options.dtype == "fp32" and stored_dtype != "fp32":
        hints.append(f"--dtype auto (the checkpoint's {stored_dtype}: no fp32 copy)")
    elif options.dtype == "fp32":
        hints.append("--dtype fp16 (halves the weights)")
    if options.quantize == "none":
        hints.append("--quantize 8da4w" if options.target == "executorch" else "--quantize int4")
    hint = f"try {' or '.join(hints)}, or " if hints else ""
    raise ExportError(
        f"not enough memory: the {options.target} export needs {estimate.describe()} but only "
        f"{available / GIB:.1f} GiB is available; {hint}export on a machine with >= {estimate.peak / GIB:.0f} GiB "
        "of RAM"
    )


def check_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    try:
        check_replaceable(out)
    except FileExistsError as error:
        raise ExportError(str(error)) from None
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    probe = parent / f".pruner-export-probe-{time.time_ns()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise ExportError(f"cannot write to {out.parent} ({error.strerror}); choose a writable --out") from None


def parse_image_size(text: str) -> tuple[int, int]:
    """argparse type: "672x448" (height x width) or "672" (square) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"image size {text!r}: give HxW in pixels, e.g. 672x672")
    return values


def check_model_fits(model_dir: Path, pruner: PrunerConfig, image_size: tuple[int, int] | None = None,
                     model_name: str | None = None) -> None:
    """keep, --prune-layer and --image-size against the model's config (cheap: no weights loaded); model_name: as
    the user gave it (--model), for the messages."""
    from transformers import AutoConfig

    from pruner_core.adapters import adapter_for
    from pruner_core.primitives import placement_lattice

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config)
    try:
        geometry = adapter.geometry(config, image_size or adapter.default_image_size(model_dir))
    except ValueError as error:
        raise ExportError(str(error)) from None
    try:
        pruner.budget(geometry.num_image_tokens)
        placement_lattice(*geometry.grid, geometry.merge, pruner.authors_grid)
    except ValueError as error:
        raise ExportError(str(error)) from None
    layers = geometry.num_layers
    if pruner.layer >= layers:
        raise ExportError(f"--prune-layer {pruner.layer} is past the last decoder layer: {model_name or model_dir} has "
                          f"{layers} decoder layers, so --prune-layer takes 0..{layers - 1} (0 = before the LLM, "
                          "2 = the paper's default)")


def check_target_supported(adapter, args: argparse.Namespace, targets: list[str]) -> None:
    """Refuse a --target the model's family has no exporter for, naming the targets it has (adapter.export_targets)
    and the command with one of them."""
    missing = [target for target in targets if target not in adapter.export_targets]
    if not missing:
        return
    family = f"{args.model} is a {adapter.family} checkpoint"
    if not adapter.export_targets:
        raise ExportError(f"{family}, which has no export yet; run it eagerly: `pruner-run {args.model} --keep "
                          f"{args.keep} --image photo.jpg --prompt ...`")
    supported = adapter.export_targets
    flags = " or ".join(f"--target {target}" for target in supported)
    asked = f"--target {args.target}" + (f" (it includes {', '.join(missing)})" if args.target == "all" else "")
    raise ExportError(
        f"{family}: this family exports with {flags} only, not {asked}; run `pruner-export --model {args.model} "
        f"--keep {args.keep} --target {supported[0]}`"
    )


def check_android_runnable(adapter, model_dir: Path, image_size: tuple[int, int] | None) -> None:
    """Refuse --android, before any work, for a family whose text_decoder takes M-RoPE position_ids: the stock
    LlmModule / MultimodalRunner feeds one 1-D start position per call."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    scheme = adapter.geometry(config, image_size or adapter.default_image_size(model_dir)).position_scheme
    if scheme != "1d":
        raise ExportError(
            f"--android: {adapter.family} takes {scheme!r} (3-D t, h, w) RoPE positions, which ExecuTorch's stock "
            "LlmModule / MultimodalRunner cannot feed (it passes one 1-D start position per text_decoder call); "
            "the .pte runs in this project's runtime (pruner-run). Drop --android, or use a LLaVA-1.5 model for the "
            "Android demo"
        )


def check_and_describe(staging: Path, out: Path, model_dir: Path, options: ExportOptions, progress: Progress,
                       stream: TextIO, tolerance: Tolerance, skipped: str | None = None) -> dict:
    """After an export wrote ``staging`` (to become ``out``): validate it against the eager pruned model within
    ``tolerance`` unless ``skipped`` says why not ("--no-validate" or "not enough memory"), record the figures in
    export_config.json["validation"] (``{"skipped": why}`` when skipped), write the README.md model card -> the
    config. ExportError when validation fails or cannot run (the caller's staging folder is then removed: nothing is
    written)."""
    from pruner_core.adapters.hub import random_weights

    from .common import read_export_config, write_json
    from .model_card import source_revision, write_card
    from .validate import failure_message, validate_export

    validation = None
    if skipped is None:
        progress("validate")
        gc.collect()  # the exporter's model copies go before the export and its eager reference are loaded
        try:
            validation = validate_export(staging, model_dir, options.pruner, dtype=options.dtype,
                                         image_size=options.image_size, tolerance=tolerance)
        except Exception as error:  # noqa: BLE001 - whatever stops the written files from running
            raise ExportError(f"validation could not run the export ({type(error).__name__}: {error}); nothing was "
                              "written. Pass --no-validate to keep it unchecked") from None
        print(validation.summary(), file=stream)
        if not validation.passed:
            raise ExportError(failure_message(validation))
    else:
        print(f"validation skipped ({skipped}): the written files were not run", file=stream)
    config = read_export_config(staging)
    config["validation"] = {"skipped": skipped} if validation is None else validation.to_dict()
    write_json(staging / "export_config.json", config)
    write_card(staging, config, out, source_revision(model_dir, random_weights(model_dir)))
    return config


def exporter_for(target: str) -> Callable:
    if target == "executorch":
        from .executorch_export import export_executorch

        return export_executorch
    from .onnx_export import export_onnx

    return export_onnx


def summarise(out: Path, payload: dict, seconds: float, stream: TextIO, notes: bool = True) -> None:
    """What was written; with ``notes``, the pruner-run command that runs it and, for a tiny (random-weight) build,
    a note saying its answers are gibberish."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"\n{payload['target']}: kept {payload['kept_image_tokens']} of {payload['num_image_tokens']} image tokens "
          f"({payload['pruner']['method']}, layer {payload['pruner']['layer']}, {payload['placement']}) "
          f"in {seconds:.1f}s -> {out}", file=stream)
    for path in files:
        print(f"  {str(path.relative_to(out)):<40} {human_size(path.stat().st_size):>12}", file=stream)
    methods = ", ".join(payload.get("methods", {}))
    print(f"  methods/graphs: {methods}", file=stream)
    if not notes:
        return
    print(f"next: pruner-run {out} --image astronaut --prompt \"What is in the picture?\"", file=stream)
    if payload.get("random_weights"):
        from pruner_core.adapters.hub import RANDOM_WEIGHTS_NOTE

        print(f"note: {RANDOM_WEIGHTS_NOTE}", file=stream)


def prepare_android(export_dir: Path, overwrite: bool, stream: TextIO) -> Path:
    from .android import adb_push_commands, default_android_folder, prepare_android_folder

    folder = default_android_folder(export_dir)
    try:
        names = prepare_android_folder(export_dir, folder, overwrite=overwrite)
    except (ValueError, FileExistsError) as error:
        raise ExportError(str(error)) from None
    print(f"\nandroid: {', '.join(names)} -> {folder}\npush them to the phone with:", file=stream)
    for command in adb_push_commands(folder):
        print(f"  {command}", file=stream)
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruner-export", description=__doc__,
                                     formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny-llava",
                       help="tiny-llava (embedded), tiny-llava-gqa, llava-1.5-7b, llava-1.5-13b; tiny-qwen2-vl, "
                            "tiny-qwen2.5-vl, qwen2-vl-2b/7b, qwen2.5-vl-3b/7b; a hub id in the local cache, or a "
                            "local checkpoint directory")
    model.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where tiny models are built")
    pruning = parser.add_argument_group("pruning")
    pruning.add_argument("--keep", type=parse_keep, default=Keep(0.12),
                         help="token count (64) or fraction (0.12; 1.0 keeps every token)")
    pruning.add_argument("--prune-layer", type=int, default=2,
                         help="K: prune between decoder layers K-1 and K (0 = before the LLM, runs in stock runners)")
    pruning.add_argument("--method", default="vlm_pruner", choices=method_names(),
                         help="how the kept image tokens are chosen (pruner_core/methods)")
    pruning.add_argument("--authors-grid", action="store_true",
                         help="VLM-Pruner's spatial distance on the authors' Qwen2-VL grid (merged tokens placed on the"
                              " unmerged patch grid, as their code does) instead of the true merged grid; Qwen2-VL / "
                              "Qwen2.5-VL only (recorded in export_config.json)")
    target = parser.add_argument_group("target")
    target.add_argument("--target", default="executorch", choices=["executorch", "onnx", "all"],
                        help="executorch: a .pte program (LLaVA-1.5 in the stock runner's contract; Qwen2-VL's "
                             "text_decoder also takes M-RoPE position_ids, run by pruner-run); onnx: onnxruntime "
                             "graphs in transformers.js' layout; all: both")
    target.add_argument("--backend", default=None, choices=list(EXECUTORCH_BACKENDS),
                        help="ExecuTorch backend; default xnnpack")
    target.add_argument("--quantize", default="none", choices=["none", "8da4w", "int8", "int4"],
                        help="executorch: 8da4w (torchao, decoder linears); onnx: int8 (dynamic) or int4 (4-bit "
                             "MatMulNBits weights of the decoder, transformers.js' q4)")
    target.add_argument("--quantize-vision", default="none", choices=["none", "int8"],
                        help="executorch: int8 vision tower and projector (dynamic int8 activations, per-channel int8 "
                             "weights)")
    target.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and activations; auto (default) = the checkpoint's own dtype (fp16 for "
                             "llava-hf 7B: never an fp32 copy of a half-precision checkpoint)")
    target.add_argument("--max-seq-len", type=int, default=768, help="KV-cache positions: prompt plus answer tokens")
    target.add_argument("--image-size", type=parse_image_size, default=None, metavar="HxW",
                        help="the one image resolution the export takes (every image is resized to it), HxW in "
                             "pixels or a single N for a square NxN (448 = 448x448); default: the model family's "
                             "own: LLaVA-1.5 its CLIP size (336x336, the only one it takes), Qwen2-VL / Qwen2.5-VL "
                             "672x672 (a tiny build: its own; any size in multiples of 28)")
    target.add_argument("--jobs", type=int, default=2, metavar="N",
                        help="executorch: processes that trace and lower the model's methods at once: 1 or 2 (default "
                             "2: a second process on Linux with 2+ CPUs for models up to 256 MiB of weights; more "
                             "than 2 is the same as 2; 1: one process)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="default: exported/<model>-keep<k>-<target>")
    output.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    output.add_argument("--android", action="store_true",
                        help="also prepare <out>-android with exactly the files the Android demo needs (needs "
                             "--target executorch --prune-layer 0 and a 1-D RoPE family: LLaVA-1.5) and print the adb "
                             "push commands")
    output.add_argument("--no-validate", action="store_true",
                        help="skip the check that runs the written files once (bundled astronaut photograph, 8 "
                             "greedy tokens) against the eager pruned model in the same dtype and refuses the "
                             f"export outside tolerance: {tolerances_text()} (export/README.md, Validation)")
    add_verbose(parser)
    return parser


def run(args: argparse.Namespace, stream: TextIO | None = None, notes: bool = True,
        tolerance: Tolerance | None = None) -> list[Path]:
    """Export as ``args`` (build_parser's) say -> the folders written; ExportError for a problem the user can fix
    (a failed validation too: nothing is written then).
    notes: end each export's summary with the pruner-run command that runs it (and the random-weights note).
    tolerance: what validation requires instead of ``tolerance_for(dtype, quantize, quantize_vision)`` (tests)."""
    from pruner_core.adapters import adapter_for, resolve_model

    from .memory import fewer_collections
    from .parallel_lowering import LoweringProcessError

    stream = stream or sys.stderr
    if args.prune_layer < 0:
        raise ExportError(f"--prune-layer {args.prune_layer}: give a decoder layer K >= 0 (0 = before the LLM, 2 = "
                          "the paper's default)")
    try:
        pruner = PrunerConfig(keep=args.keep, layer=args.prune_layer, method=args.method,
                              authors_grid=args.authors_grid)
    except ValueError as error:
        raise ExportError(str(error)) from None
    targets = ["executorch", "onnx"] if args.target == "all" else [args.target]
    if args.target == "onnx" and args.backend is not None:
        raise ExportError(f"--backend {args.backend} applies to --target executorch; onnxruntime picks its execution "
                          "provider at run time (pruner-run --device): drop --backend")
    if args.target == "onnx" and args.quantize_vision != "none":
        raise ExportError("--quantize-vision applies to --target executorch (XNNPACK's dynamically quantised linears); "
                          "drop it for ONNX, or use --quantize int8 there")
    plans = []
    for target in targets:
        quantize = args.quantize
        if args.target == "all" and quantize != "none":  # each target takes the quantisation it knows
            known = {"executorch": ("8da4w",), "onnx": ("int8", "int4")}[target]
            if quantize not in known:
                print(f"note: --quantize {quantize} does not apply to {target}: its export is not quantized "
                      f"({target} takes --quantize {' / '.join(known)})", file=stream)
                quantize = "none"
        try:  # "auto" becomes the checkpoint's dtype once the model is found
            options = ExportOptions(model=args.model, target=target, pruner=pruner, backend=args.backend or "xnnpack",
                                    quantize=quantize, dtype="fp32" if args.dtype == "auto" else args.dtype,
                                    max_seq_len=args.max_seq_len, image_size=args.image_size, jobs=args.jobs,
                                    quantize_vision=args.quantize_vision if target == "executorch" else "none")
        except ValueError as error:
            raise ExportError(str(error)) from None
        out = args.out if args.out and len(targets) == 1 else (
            args.out / target if args.out else default_out(args.model, args.keep, target))
        check_writable(out, args.overwrite)
        plans.append((options, out))

    progress = Progress(stream)
    progress("load")
    try:
        model_dir = resolve_model(args.model, args.cache_dir)
    except (ValueError, FileNotFoundError) as error:
        raise ExportError(str(error)) from None
    adapter = adapter_for(model_dir)
    check_target_supported(adapter, args, [options.target for options, _ in plans])
    check_model_fits(model_dir, pruner, args.image_size, args.model)
    if args.android:  # the family first: for M-RoPE families no target or placement would do
        check_android_runnable(adapter, model_dir, args.image_size)
        if args.target == "onnx" or args.prune_layer != 0:
            raise ExportError("--android needs an ExecuTorch export the stock runner can run: use --target executorch "
                              "--prune-layer 0")
    resolved = []
    for options, out in plans:
        dtype, why = resolve_dtype(args.dtype, model_dir, options.target, options.quantize)
        if args.dtype == "auto":
            print(f"{options.target}: dtype {dtype} ({why})", file=stream)
        try:
            resolved.append((replace(options, dtype=dtype), out))
        except ValueError as error:
            raise ExportError(str(error)) from None
    plans = resolved
    available = available_memory_bytes()
    validations = [check_memory(adapter_for(model_dir).parameter_counts(model_dir), options,
                                checkpoint_dtype(model_dir), available, stream, validate=not args.no_validate)
                   for options, _ in plans]
    written = []
    for (options, out), validation_fits in zip(plans, validations):
        export = exporter_for(options.target)
        skipped = "--no-validate" if args.no_validate else None if validation_fits else "not enough memory"
        try:
            with staging_directory(out, overwrite=args.overwrite) as staging, fewer_collections():
                payload = export(model_dir, staging, options, model_id=args.model, progress=progress)
                payload = check_and_describe(staging, out, model_dir, options, progress, stream, skipped=skipped,
                                             tolerance=tolerance or tolerance_for(options.dtype, options.quantize,
                                                                                  options.quantize_vision))
        except (ValueError, FileExistsError, PermissionError, NotImplementedError, ImportError,
                LoweringProcessError) as error:  # the last: the second lowering process failed, its message names
            raise ExportError(str(error)) from None  # --jobs 1
        summarise(out, payload, progress.finish(), stream, notes)
        written.append(out)
        if args.android and options.target == "executorch":
            written.append(prepare_android(out, args.overwrite, stream))
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        with native_notices_filtered(args.verbose):
            run(args)
    except ExportError as error:
        print(f"pruner-export: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (run_program's terminate_as_interrupt)
        said, code = interrupt_status(interrupt)
        print(f"pruner-export: {said}; nothing was written", file=sys.stderr)
        return code
    return 0


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
