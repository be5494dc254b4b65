"""`pruner-run`: answer a prompt about an image with an exported (or eager) model, streaming, then profile it.

    pruner-run exported/tiny-llava-keep0.12-executorch --image photo.jpg --prompt "What is in the picture?"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .devices import NoNpuError
from .openvino_backend import NoDeviceError
from .console import (HelpFormatter, add_verbose, escape_controls, native_notices_filtered, quiet_libraries,
                      run_program)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruner-run", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("model", help="a folder written by pruner-export, or a model name (tiny-llava, tiny-qwen2-vl, "
                                      "tiny-qwen2.5-vl, a cached hub id or a checkpoint directory) to run eagerly in "
                                      "PyTorch with --keep/--prune-layer")
    parser.add_argument("--image", required=True, help="image file (or astronaut / chelsea / coffee, the bundled "
                                                       "scikit-image photographs)")
    parser.add_argument("--prompt", required=True, help="the question or instruction about the image")
    parser.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "openvino"],
                        help="what runs an ONNX export: onnxruntime, or OpenVINO (Intel CPU, GPU and NPU; "
                             "--device gpu too)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "npu", "auto", "gpu"],
                        help="npu: the first NPU provider / delegate, else an error; auto: NPU if any, else CPU; "
                             "gpu: with --engine openvino")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the answer's text and tokens, and the profile with "
                             "the stop reason and the context left); the answer streams to stderr")
    parser.add_argument("--profile-ops", action="store_true", help="add an operator-level breakdown")
    eager = parser.add_argument_group("eager PyTorch (when MODEL is not an exported folder)")
    eager.add_argument("--keep", type=_keep, default=None,
                       help="token count (64) or fraction (0.12; 1.0 keeps every token); default 0.12")
    eager.add_argument("--prune-layer", type=int, default=None,
                       help="K: prune between decoder layers K-1 and K (0 = before the LLM); default 2 (the paper's)")
    eager.add_argument("--method", default=None, help="how the kept image tokens are chosen; default vlm_pruner")
    eager.add_argument("--authors-grid", action="store_true",
                       help="VLM-Pruner's spatial distance on the authors' Qwen2-VL grid (merged tokens placed on the"
                            " unmerged patch grid, as their code does) instead of the true merged grid; Qwen2-VL / "
                            "Qwen2.5-VL only")
    eager.add_argument("--cache-dir", type=Path, default=None,
                       help="where tiny models are built; default ~/.cache/vlm-pruner-edge/models")
    add_verbose(parser)
    return parser


def _keep(text: str):
    """argparse type: the one keep parser (pruner_core.config.parse_keep), imported only when used (it loads torch)."""
    from pruner_core.config import parse_keep

    return parse_keep(text)


def resolve_image(name: str):
    """A path, or the name of a bundled scikit-image photograph (an existing file of that name wins): what
    ``runtime.preprocess.load_image`` takes."""
    from .preprocess import SAMPLE_IMAGES, sample_image

    if not Path(name).exists() and name in SAMPLE_IMAGES:
        return sample_image(name)
    return name


def refuse_eager_flags(args: argparse.Namespace) -> None:
    """The eager-only flags with an exported folder: ValueError naming them (they would be ignored)."""
    pruning = [flag for flag, value in (("--keep", args.keep), ("--prune-layer", args.prune_layer),
                                        ("--method", args.method),
                                        ("--authors-grid", args.authors_grid or None)) if value is not None]
    problems = []
    if pruning:
        problems.append(f"{' / '.join(pruning)} {'sets' if len(pruning) == 1 else 'set'} how an eager model is "
                        f"pruned; {args.model} was exported with its own settings (export_config.json)")
    if args.cache_dir is not None:
        problems.append(f"--cache-dir is where eager tiny models are built; {args.model} is an exported folder, "
                        "which reads nothing from it")
    if problems:
        flags = len(pruning) + (args.cache_dir is not None)
        raise ValueError("; ".join(problems) + f": drop {'it' if flags == 1 else 'them'}"
                         + (", or export again with pruner-export" if pruning else ""))


def token_printer(stream):
    """on_token for Session.generate: each piece printed as it comes; on a terminal with its control characters
    escaped (runtime.console.escape_controls), elsewhere (a pipe, a file) as generated."""
    tty = stream.isatty() if hasattr(stream, "isatty") else False
    return lambda piece: print(escape_controls(piece) if tty else piece, end="", flush=True, file=stream)


def run(args: argparse.Namespace) -> int:
    from . import load

    config = None
    if not (Path(args.model) / "export_config.json").is_file():
        from pruner_core import PrunerConfig

        config = PrunerConfig(keep=_keep("0.12") if args.keep is None else args.keep,
                              layer=2 if args.prune_layer is None else args.prune_layer,
                              method=args.method or "vlm_pruner", authors_grid=args.authors_grid)
    else:
        refuse_eager_flags(args)
    session = load(args.model, args.device, config=config, cache_dir=args.cache_dir, profile_ops=args.profile_ops,
                   engine=args.engine)
    if session.device_note:
        print(f"[{session.device_note}]", file=sys.stderr)
    if session.config.get("random_weights"):
        from pruner_core.adapters.hub import RANDOM_WEIGHTS_NOTE

        print(f"[{RANDOM_WEIGHTS_NOTE}]", file=sys.stderr)
    stream = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON object alone
    result = session.generate(resolve_image(args.image), args.prompt, max_new_tokens=args.max_new_tokens,
                              on_token=token_printer(stream),
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(file=stream)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, **result.profile.to_dict()}, indent=2))
    else:
        print(result.profile.table())
    return 0


def cli_words(error: Exception, args: argparse.Namespace) -> str:
    """An error's message, in this command's flags where the library names its own: the eager path's pruning layer
    (pruner_core.adapters.decoder.SplitLayerError, which carries layer / num_layers) as --prune-layer."""
    if hasattr(error, "num_layers") and hasattr(error, "layer"):
        return (f"--prune-layer {error.layer} is past the last decoder layer: {args.model} has {error.num_layers} "
                f"decoder layers, so --prune-layer takes 0..{error.num_layers - 1} (0 = before the LLM, 2 = the "
                "paper's default)")
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        with native_notices_filtered(args.verbose):
            return run(args)
    except (ValueError, FileNotFoundError, NoNpuError, NoDeviceError) as error:
        print(f"pruner-run: error: {cli_words(error, args)}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
