"""pruner-eval: answer a question set with every (keep, method) setting, or with exported folders, and score it.

    pruner-eval --model tiny-llava --keep 1.0,0.33,0.11 --methods vlm_pruner,dart --layer 2 \\
        --max-new-tokens 8 --out results.json
    pruner-eval --questions pope_random.jsonl --exported out/llava-onnx-k1 out/llava-onnx-k064 --out pope.json

Questions: a JSONL file, one object a line: {"image": ..., "question": ..., "answer": ...}.
  image     a path relative to the JSONL file's folder, an absolute path, or a scikit-image sample name
            (astronaut, chelsea, coffee);
  question  the text asked (the --prompt-suffix is appended, LLaVA-1.5's short-answer instruction by default);
  answer    the correct answer, or a list of accepted answers.
Lines that are not valid JSON, lack a field or name a missing image are reported on stderr with their line number
and skipped. Without --questions the shipped set runs: 20 yes/no and short-answer questions about scikit-image's
three photographs (runtime/eval_data/skimage_qa.jsonl).

Scoring (greedy decoding):
  normalisation  lowercase; punctuation -> space (apostrophes dropped); articles a/an/the dropped; number words
                 zero..ten -> digits; whitespace collapsed.
  yes/no         a correct answer "yes"/"no" is compared with the yes/no detected in the prediction, as POPE does:
                 the first word when it is yes/no, else "no" when the words contain "no" or "not", else "yes" when
                 they contain "yes"; a prediction with neither is wrong (POPE's script would count it as "yes").
  other answers  normalised exact match with any accepted answer.
Per setting: accuracy; retained accuracy = accuracy / accuracy of the setting's reference; agreement = share of
questions whose answer text (stripped) is the reference's; median time to first token (ms, as measured when the
answer was computed); on yes/no questions POPE's yes ratio, precision, recall and F1 ("yes" is positive).
The reference of a setting, among the settings of the same model (same export target, backend, dtype,
quantisation) and the same layer: the first that keeps every image token (keep 1.0) with the same method; else the
first that keeps every token with any method (keeping every token makes the method irrelevant); else the first
setting of that group in the run.

Resumable: every answer is appended to <--cache>/answers.jsonl as soon as it is computed, keyed by a hash of
(model name or the exported folder's export_config.json text, PrunerConfig JSON, prompt, image, max_new_tokens).
An interrupted run continues where it stopped; a rerun loads no model and costs nothing. A local model directory
is keyed by its path, not its weights: use another --cache (or delete it) after changing the weights in place.

Real benchmarks (run with real weights, e.g. --model llava-1.5-7b; write the JSONL next to the images, or use
absolute paths):
  POPE   POPE's output/coco/coco_pope_{random,popular,adversarial}.json hold one object a line:
         {"question_id", "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
         "label": "yes"}; images: COCO val2014. Mapping: image <- "<val2014 folder>/" + image, question <- text,
         answer <- label. The yes ratio / precision / recall / F1 of the JSON output are POPE's metrics.
  MME    each subtask folder (existence, count, position, color, OCR, ...) pairs an image with a .txt file (or
         images/ + questions_answers_YN/) of two tab-separated lines "question<TAB>Yes|No". Mapping: image <- the
         image with the .txt file's stem, question <- first column (it already asks "Please answer yes or no.":
         pass --prompt-suffix ''), answer <- second column lowercased. MME's score adds acc+ (both questions of
         an image right), which this tool does not compute: derive it from the per-answer records.
  GQA    testdev_balanced_questions.json is {question_id: {"imageId", "question", "answer", ...}}; images: GQA's
         images/ folder. Mapping: image <- "images/" + imageId + ".jpg", question <- question, answer <- answer.
A converter is a few lines, e.g. for POPE:
    import json
    with open("pope_random.jsonl", "w") as out:
        for line in open("coco_pope_random.json"):
            q = json.loads(line)
            out.write(json.dumps({"image": "val2014/" + q["image"], "question": q["text"],
                                  "answer": q["label"]}) + "\\n")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

from .console import (HelpFormatter, add_verbose, interrupt_status, native_notices_filtered, quiet_libraries,
                      run_program)
from .eval_questions import EvalError, SkippedLine, read_questions, shipped_questions
from .eval_report import EvalReport
from .eval_run import Loader, default_loader, evaluate
from .eval_settings import DEFAULT_CACHE, DEFAULT_PROMPT_SUFFIX, EvalOptions, parse_keeps, parse_list

DEFAULT_KEEPS = "1.0,0.33,0.11"
DEFAULT_METHODS = "vlm_pruner"


# ================================================================================================================
# CLI
# ================================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruner-eval", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--questions", type=Path, default=None,
                        help="JSONL of {image, question, answer} (default: the shipped scikit-image set)")
    parser.add_argument("--model", default=None, help="eager PyTorch: tiny-llava (default), tiny-llava-gqa, "
                                                      "llava-1.5-7b, llava-1.5-13b, tiny-qwen2-vl, tiny-qwen2.5-vl, "
                                                      "qwen2-vl-2b/7b, qwen2.5-vl-3b/7b, a cached hub id or a "
                                                      "checkpoint directory")
    parser.add_argument("--keep", default=None, help=f"comma-separated counts or fractions (default {DEFAULT_KEEPS})")
    parser.add_argument("--methods", default=None, help=f"comma-separated method names (default {DEFAULT_METHODS})")
    parser.add_argument("--prune-layer", "--layer", dest="layer", type=int, default=None,
                        help="K: prune before decoder layer K (default 2)")
    parser.add_argument("--authors-grid", action="store_true",
                        help="VLM-Pruner's spatial distance on the authors' Qwen2-VL grid (merged tokens placed on the"
                             " unmerged patch grid, as their code does) instead of the true merged grid; Qwen2-VL / "
                             "Qwen2.5-VL only")
    parser.add_argument("--exported", type=Path, nargs="+", default=None, metavar="DIR",
                        help="evaluate folders written by pruner-export instead of eager settings "
                             "(default: none, eager)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "npu", "auto"),
                        help="for --exported folders: npu = the first NPU provider / delegate, else an error; auto = "
                             "NPU if any, else CPU (eager models run on the CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="tokens generated per answer at most (short answers need few)")
    parser.add_argument("--prompt-suffix", default=DEFAULT_PROMPT_SUFFIX,
                        help="appended to every question (default: LLaVA-1.5's short-answer instruction)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable questions (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results JSON here (default: none, the table only)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="answer cache folder (resumable runs)")
    parser.add_argument("--model-cache-dir", type=Path, default=None,
                        help="where tiny models are built; default ~/.cache/vlm-pruner-edge/models")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_verbose(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    eager_flags = [name for name in ("model", "keep", "methods", "layer") if getattr(args, name) is not None]
    eager_flags += ["authors-grid"] if args.authors_grid else []
    if args.exported and eager_flags:
        raise EvalError(f"--exported evaluates exported folders, whose settings are in their export_config.json; "
                        f"drop --{', --'.join(eager_flags)}")
    return EvalOptions(
        questions=args.questions or shipped_questions(), model=args.model or "tiny-llava",
        keeps=tuple(parse_keeps(DEFAULT_KEEPS if args.keep is None else args.keep)),
        methods=tuple(parse_list(args.methods or DEFAULT_METHODS)), layer=2 if args.layer is None else args.layer,
        authors_grid=args.authors_grid,
        exported=tuple(args.exported or ()), max_new_tokens=args.max_new_tokens, cache_dir=args.cache,
        model_cache_dir=args.model_cache_dir, device=args.device, prompt_suffix=args.prompt_suffix,
        limit=args.limit, progress=not args.no_progress)


def report_skipped(question_set_path: str, skipped: Iterable[SkippedLine]) -> None:
    for bad in skipped:
        print(f"pruner-eval: {question_set_path}:{bad.line}: skipped: {bad.reason}", file=sys.stderr)


def write_report(report: EvalReport, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n", encoding="utf-8")
    except OSError as error:
        raise EvalError(f"cannot write {out} ({error}); pass a writable --out path") from None


def main(argv: list[str] | None = None, load: Loader = default_loader) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(args.verbose)
    try:
        options = options_from_args(args)
        question_set = read_questions(options.questions, options.limit)
        report_skipped(str(question_set.path), question_set.skipped)
        with native_notices_filtered(args.verbose):
            report = evaluate(options, load, question_set)
        if args.out is not None:
            write_report(report, args.out)
    except EvalError as error:
        print(f"pruner-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (run_program's terminate_as_interrupt)
        said, code = interrupt_status(interrupt)
        print(f"pruner-eval: {said}; the answers computed so far are cached in {args.cache}: rerun the same command "
              "to continue", file=sys.stderr)
        return code
    print(report.table())
    if report.random_weights:
        from pruner_core.adapters.hub import RANDOM_WEIGHTS_NOTE

        print(f"note: {RANDOM_WEIGHTS_NOTE} (the scores test the plumbing, not the pruning)")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def console_main() -> int:
    """The console script's entry point (pyproject.toml): main() for a process that exits next."""
    return run_program(main)


if __name__ == "__main__":
    raise SystemExit(console_main())
