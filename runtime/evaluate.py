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
import hashlib
import json
import re
import statistics
import string
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable
from .console import HelpFormatter, add_verbose, native_notices_filtered, quiet_libraries
from .preprocess import SAMPLE_IMAGES

EVAL_VERSION = 1
DEFAULT_CACHE = Path(".pruner-eval-cache")
CACHE_FILE = "answers.jsonl"
DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's eval prompts
DEFAULT_KEEPS = "1.0,0.33,0.11"
# Image placeholders of the model families this tool runs; a question holding one would add a second image.
IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
DEFAULT_METHODS = "vlm_pruner"
REQUIRED_FIELDS = ("image", "question", "answer")
REFERENCE_RULE = ("same model and layer: the first keep-1.0 setting with the same method, else the first keep-1.0 "
                  "setting, else the first setting; retained_accuracy = accuracy / reference accuracy, agreement = "
                  "share of questions whose stripped answer text equals the reference's")

# load(source, device, *, config=PrunerConfig | None, cache_dir=...) -> an object with Session.generate
Loader = Callable[..., Any]


class EvalError(Exception):
    """A problem the user can fix; the message says what and how."""


def shipped_questions() -> Path:
    """The question set shipped with the package (scikit-image photographs)."""
    return Path(str(resources.files("runtime") / "eval_data" / "skimage_qa.jsonl"))


# ================================================================================================================
# Scoring
# ================================================================================================================

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, no apostrophes, no articles, number words -> digits, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower().replace("'", "").replace("\u2019", ""))
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def yes_no(text: str) -> str | None:
    """"yes" / "no" as POPE reads an answer (first word, else any "no"/"not", else any "yes"); None when neither."""
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if "no" in words or "not" in words:
        return "no"
    if "yes" in words:
        return "yes"
    return None


def is_yes_no(answers: Iterable[str]) -> bool:
    """True when the correct answer is a yes/no one."""
    return any(normalize_answer(answer) in ("yes", "no") for answer in answers)


def is_correct(prediction: str, answers: Iterable[str]) -> bool:
    """Does the prediction match any accepted answer (yes/no detection for yes/no answers, else exact match)?"""
    predicted = normalize_answer(prediction)
    for answer in answers:
        gold = normalize_answer(answer)
        if gold in ("yes", "no"):
            if yes_no(prediction) == gold:
                return True
        elif gold and predicted == gold:
            return True
    return False


# ================================================================================================================
# Questions
# ================================================================================================================


@dataclass(frozen=True)
class Question:
    line: int  # 1-based line number in the JSONL file
    image: str  # as written in the file
    image_ref: str  # absolute path, or "skimage:<name>" (part of the cache key)
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class SkippedLine:
    line: int
    reason: str


@dataclass(frozen=True)
class QuestionSet:
    path: Path
    questions: tuple[Question, ...]
    skipped: tuple[SkippedLine, ...]


class _BadLine(Exception):
    pass


def read_questions(path: str | Path, limit: int | None = None) -> QuestionSet:
    """Parse a JSONL question file; bad lines are collected (not raised); no usable line raises EvalError."""
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise EvalError(f"question file {path} is {what}; pass a JSONL file with one "
                        '{"image": ..., "question": ..., "answer": ...} object a line')
    folder = path.resolve().parent
    questions: list[Question] = []
    skipped: list[SkippedLine] = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                questions.append(parse_line(text, number, folder))
            except _BadLine as error:
                skipped.append(SkippedLine(number, str(error)))
    if not questions:
        reasons = "".join(f"\n  line {bad.line}: {bad.reason}" for bad in skipped[:5])
        more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise EvalError(f"{path} has no usable question ({len(skipped)} line(s) skipped); each line must be a JSON "
                        'object {"image": ..., "question": ..., "answer": ...} naming an existing image'
                        + reasons + more)
    if limit is not None:
        questions = questions[:limit]
    return QuestionSet(path, tuple(questions), tuple(skipped))


def parse_line(text: str, number: int, folder: Path) -> Question:
    """One JSONL line -> a Question; raises _BadLine saying what is wrong."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise _BadLine(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object with {', '.join(REQUIRED_FIELDS)}, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise _BadLine(f"missing field(s) {', '.join(missing)}; each line needs {', '.join(REQUIRED_FIELDS)}")
    question, answer, image = record["question"], record["answer"], record["image"]
    if not isinstance(question, str) or not question.strip():
        raise _BadLine("question must be a non-empty string")
    placeholder = next((p for p in IMAGE_PLACEHOLDERS if p in question), None)
    if placeholder is not None:
        raise _BadLine(f"the question contains the image placeholder {placeholder!r}; the prompt format puts the "
                       "image in by itself: remove it from the question text")
    answers = (answer,) if isinstance(answer, str) else answer
    if not isinstance(answers, (list, tuple)) or not answers or \
            not all(isinstance(a, str) and a.strip() for a in answers):
        raise _BadLine("answer must be a non-empty string or a list of non-empty strings")
    if not isinstance(image, str) or not image.strip():
        raise _BadLine("image must be a path or one of " + ", ".join(SAMPLE_IMAGES))
    return Question(number, image, resolve_image(image, folder), question.strip(), tuple(answers))


def resolve_image(image: str, folder: Path) -> str:
    """A path (relative to folder, or absolute) -> its absolute path; a sample name -> "skimage:<name>"."""
    path = Path(image).expanduser()
    path = path if path.is_absolute() else folder / path
    if path.exists():  # a file (it wins over a sample of the same name), or a directory: the decoder says which
        _check_readable(str(path.resolve()))
        return str(path.resolve())
    if image in SAMPLE_IMAGES:
        if not _have_skimage():
            raise _BadLine(f"image {image!r} is a scikit-image sample but scikit-image is not installed; "
                           "`pip install scikit-image` or give an image path")
        return f"skimage:{image}"
    raise _BadLine(f"image {image!r} not found (looked for {path}); paths are relative to the question file's "
                   f"folder or absolute, or use a sample: {', '.join(SAMPLE_IMAGES)}")


@lru_cache(maxsize=None)
def _check_readable(path: str) -> None:
    from .preprocess import open_image_file  # the runtime's decoder: the same check and message as pruner-run

    try:
        open_image_file(path)
    except ValueError as error:
        raise _BadLine(str(error)) from None


@lru_cache(maxsize=1)
def _have_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


@lru_cache(maxsize=len(SAMPLE_IMAGES))
def _sample_image(name: str) -> Any:
    from .preprocess import sample_image

    return sample_image(name)


def image_input(image_ref: str) -> Any:
    """What Session.generate takes: a sample's HxWx3 array, or the path."""
    if image_ref.startswith("skimage:"):
        return _sample_image(image_ref.removeprefix("skimage:"))
    return image_ref


# ================================================================================================================
# Settings
# ================================================================================================================


@dataclass(frozen=True)
class Setting:
    """One thing evaluated: an eager (model, PrunerConfig) pair, or an exported folder."""

    label: str
    kind: str  # "eager" | "exported"
    source: str  # the model name / directory, or the exported folder
    method: str
    keep: Any  # pruner_core.config.Keep: a count and a fraction are different settings
    layer: int
    full: bool  # keeps every image token
    group: str  # settings with the same group compare with each other (same model, backend, layer)
    identity: str  # the model part of the cache key
    pruner: dict[str, Any] = field(default_factory=dict)  # PrunerConfig.to_dict()
    random_weights: bool = False  # a tiny (or benchmark) build: its answers are gibberish by design

    def config_json(self) -> str:
        return json.dumps(self.pruner, sort_keys=True)


def parse_keeps(text: str) -> list[Any]:
    """'1.0,0.33,64' -> [Keep(1.0), Keep(0.33), Keep(64)] ('1' is one token and '1.0' is every token: two settings).

    pruner_core.config.parse_keeps, imported here so that importing this module does not load torch."""
    from pruner_core.config import parse_keeps as parse_config_keeps

    try:
        return parse_config_keeps(text)
    except ValueError as error:
        raise EvalError(str(error)) from None


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def eager_settings(model: str, keeps: Iterable[Any], methods: Iterable[str], layer: int,
                   authors_grid: bool = False) -> list[Setting]:
    """Every (method, keep) pair for the eager backend, methods outer; duplicates dropped (keeps are Keep values,
    or ints / floats made into them: 1 and 1.0 stay two settings). authors_grid: ``PrunerConfig.authors_grid`` for
    every setting (labels say so)."""
    from pruner_core import PrunerConfig, method_names
    from pruner_core.config import Keep

    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise EvalError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    local = Path(model).expanduser()
    identity = f"dir:{local.resolve()}" if local.is_dir() else f"model:{model}"
    random = model_has_random_weights(model)
    settings: dict[tuple[str, Any], Setting] = {}
    for method in methods:
        for value in keeps:
            try:
                keep = Keep.of(value)
                config = PrunerConfig(keep=keep, method=method, layer=layer, authors_grid=authors_grid)
            except ValueError as error:
                raise EvalError(str(error)) from None
            label = f"{method} keep={keep}" + (" authors-grid" if authors_grid else "")
            settings.setdefault((method, keep), Setting(
                label=label, kind="eager", source=model, method=method, keep=keep, layer=layer,
                full=keep.keeps_all, group=f"{identity} layer={layer}", identity=identity,
                pruner=config.to_dict(), random_weights=random))
    if not settings:
        raise EvalError("no setting to evaluate: give --keep and --methods (e.g. --keep 1.0,0.11 --methods vlm_pruner)")
    return list(settings.values())


def model_has_random_weights(model: str) -> bool:
    """A tiny model name, or a local build whose spec stamp says its weights are random (no model is built)."""
    from pruner_core.adapters.hub import random_weights, tiny_models

    local = Path(model).expanduser()
    return model in tiny_models() or (local.is_dir() and random_weights(local))


def exported_setting(folder: str | Path) -> Setting:
    """An exported folder -> its Setting, from export_config.json (read as JSON; no export code imported)."""
    folder = Path(folder)
    path = folder / "export_config.json"
    if not path.is_file():
        raise EvalError(f"{folder} has no export_config.json; pass folders written by pruner-export to --exported")
    from pruner_core.config import Keep

    text = path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
        pruner = dict(config["pruner"])
        method, keep, layer = pruner["method"], Keep.of(pruner["keep"]), int(pruner["layer"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EvalError(f"{path} is corrupt or has no pruner settings ({error}); export the model again") from None
    kept, total = config.get("kept_image_tokens"), config.get("num_image_tokens")
    full = keep.keeps_all or (kept is not None and kept == total)
    group = json.dumps({name: config.get(name) for name in ("model_id", "target", "backend", "dtype", "quantization")}
                       | {"layer": layer}, sort_keys=True)
    return Setting(label=folder.name or str(folder), kind="exported", source=str(folder), method=method, keep=keep,
                   layer=layer, full=full, group=group, identity=f"export_config:{text}", pruner=pruner,
                   random_weights=bool(config.get("random_weights")))


def exported_settings(folders: Iterable[str | Path]) -> list[Setting]:
    settings = [exported_setting(folder) for folder in folders]
    labels = [s.label for s in settings]
    if len(set(labels)) < len(labels):  # two folders with the same name: label by the path given
        settings = [replace(s, label=s.source) for s in settings]
    return settings


def reference_of(setting: Setting, settings: list[Setting]) -> Setting:
    """Same group: keep-1.0 with the same method, else keep-1.0 with any method, else the group's first setting."""
    group = [s for s in settings if s.group == setting.group]
    for pool in ([s for s in group if s.full and s.method == setting.method], [s for s in group if s.full], group):
        if pool:
            return pool[0]
    return setting


# ================================================================================================================
# Answer cache
# ================================================================================================================


@dataclass(frozen=True)
class CachedAnswer:
    prediction: str
    ttft_ms: float | None
    stop_reason: str
    tokens: int


def answer_key(setting: Setting, prompt: str, image_ref: str, max_new_tokens: int) -> str:
    payload = {"model": setting.identity, "config": setting.config_json(), "prompt": prompt, "image": image_ref,
               "max_new_tokens": max_new_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers in an append-only JSONL file; a line cut short by an interrupt is ignored when read back."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / CACHE_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EvalError(f"cannot create the answer cache {self.folder} ({error}); pass a writable --cache DIR") \
                from None
        self.entries: dict[str, CachedAnswer] = {}
        self.unreadable_lines = 0
        if self.path.is_file():
            self._read()
            self._end_line()

    def _end_line(self) -> None:
        """After a line cut short, start the next record on a line of its own."""
        with self.path.open("rb") as data:
            data.seek(0, 2)
            if data.tell() == 0:
                return
            data.seek(-1, 2)
            ended = data.read(1) == b"\n"
        if not ended:
            with self.path.open("a", encoding="utf-8") as out:
                out.write("\n")

    def _read(self) -> None:
        with self.path.open(encoding="utf-8") as lines:
            for text in lines:
                try:
                    record = json.loads(text)
                    self.entries[record["key"]] = CachedAnswer(
                        str(record["prediction"]), record.get("ttft_ms"), str(record.get("stop_reason", "")),
                        int(record.get("tokens", 0)))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.unreadable_lines += 1

    def get(self, key: str) -> CachedAnswer | None:
        return self.entries.get(key)

    def put(self, key: str, answer: CachedAnswer, note: dict[str, Any]) -> None:
        """Store and append at once (flushed), so an interrupt loses at most the answer being computed."""
        self.entries[key] = answer
        record = {"key": key, **asdict(answer), **note}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()


# ================================================================================================================
# Running
# ================================================================================================================


@dataclass(frozen=True)
class EvalOptions:
    """What to run. Either model + keeps + methods (eager PyTorch) or exported folders."""

    questions: Path = field(default_factory=shipped_questions)
    model: str = "tiny-llava"
    keeps: tuple[Any, ...] = (1.0, 0.33, 0.11)  # Keep values (or ints / floats made into them)
    methods: tuple[str, ...] = ("vlm_pruner",)
    layer: int = 2
    authors_grid: bool = False  # PrunerConfig.authors_grid for the eager settings
    exported: tuple[Path, ...] = ()
    max_new_tokens: int = 8
    cache_dir: Path = DEFAULT_CACHE
    model_cache_dir: Path | None = None  # where tiny models are built (runtime.load's cache_dir)
    device: str = "cpu"
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise EvalError(f"--limit must be an int >= 1, got {self.limit!r}")

    def settings(self) -> list[Setting]:
        if self.exported:
            return exported_settings(self.exported)
        return eager_settings(self.model, self.keeps, self.methods, self.layer, self.authors_grid)


@dataclass
class AnswerRecord:
    line: int
    image: str
    question: str
    answer: list[str]
    prediction: str
    correct: bool
    agrees: bool  # the same answer text as the reference setting
    ttft_ms: float | None
    cached: bool


@dataclass
class YesNoStats:
    """POPE's metrics over the yes/no questions, "yes" the positive class."""

    questions: int
    yes_ratio: float
    precision: float | None
    recall: float | None
    f1: float | None


@dataclass
class SettingResult:
    label: str
    kind: str
    source: str
    method: str
    keep: Any  # pruner_core.config.Keep; its JSON form (EvalReport.to_dict) is the int count or float fraction
    layer: int
    reference: str
    accuracy: float
    retained_accuracy: float | None  # None when the reference scored 0
    agreement: float
    median_ttft_ms: float | None
    correct: int
    total: int
    computed: int
    cached: int
    yes_no: YesNoStats | None
    answers: list[AnswerRecord]


@dataclass
class EvalReport:
    questions_file: str
    questions: int
    skipped_lines: list[SkippedLine]
    max_new_tokens: int
    prompt_suffix: str
    cache_file: str
    generate_calls: int
    cache_hits: int
    settings: list[SettingResult]
    random_weights: bool = False  # some setting's model is a tiny (or benchmark) build: scores mean nothing

    def to_dict(self) -> dict[str, Any]:
        payload = {"version": EVAL_VERSION, "reference_rule": REFERENCE_RULE, **asdict(self)}
        for row, result in zip(payload["settings"], self.settings):
            row["keep"] = result.keep.number  # an int count or a float fraction: JSON keeps the two apart
        return payload

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        return format_table(self)


@dataclass
class _Raw:
    """A setting's answers before scoring against its reference."""

    setting: Setting
    answers: list[CachedAnswer]
    cached: list[bool]


class _Progress:
    """tqdm over questions x settings on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar: Any = None
        self.enabled, self.total, self.done = enabled, total, 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # a plain line instead
                return
            self.bar = tqdm(total=total, desc="pruner-eval", unit="answer", file=sys.stderr, dynamic_ncols=True)

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\rpruner-eval: {self.done}/{self.total} answers ({label})", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)


def default_loader(source: str, device: str, *, config: Any = None, cache_dir: Path | None = None) -> Any:
    from . import load

    return load(source, device, config=config, cache_dir=cache_dir)


def evaluate(options: EvalOptions, load: Loader = default_loader,
             question_set: QuestionSet | None = None) -> EvalReport:
    """Answer every question with every setting (cached answers reused, new ones cached at once) and score them.

    question_set: already read from options.questions (main reads it first to report bad lines before running).
    """
    question_set = question_set or read_questions(options.questions, options.limit)
    settings = options.settings()
    cache = AnswerCache(options.cache_dir)
    progress = _Progress(len(settings) * len(question_set.questions), options.progress)
    counts = {"generate": 0, "hits": 0}
    try:
        raws = [answer_setting(s, question_set.questions, options, cache, load, progress, counts) for s in settings]
    finally:
        progress.close()
    results = [score_setting(raw, raws, question_set.questions) for raw in raws]
    return EvalReport(
        questions_file=str(question_set.path), questions=len(question_set.questions),
        skipped_lines=list(question_set.skipped), max_new_tokens=options.max_new_tokens,
        prompt_suffix=options.prompt_suffix, cache_file=str(cache.path), generate_calls=counts["generate"],
        cache_hits=counts["hits"], settings=results, random_weights=any(s.random_weights for s in settings))


def answer_setting(setting: Setting, questions: Iterable[Question], options: EvalOptions, cache: AnswerCache,
                   load: Loader, progress: _Progress, counts: dict[str, int]) -> _Raw:
    """One setting over all questions; the model is loaded only when some answer is not cached."""
    session = None
    raw = _Raw(setting, [], [])
    for question in questions:
        prompt = question.question + options.prompt_suffix
        key = answer_key(setting, prompt, question.image_ref, options.max_new_tokens)
        answer = cache.get(key)
        raw.cached.append(answer is not None)
        if answer is None:
            session = session or load_session(setting, options, load)
            answer = generate_answer(session, setting, question, prompt, options.max_new_tokens)
            counts["generate"] += 1
            cache.put(key, answer, {"setting": setting.label, "line": question.line, "question": question.question})
        else:
            counts["hits"] += 1
        raw.answers.append(answer)
        progress.step(setting.label)
    return raw


def load_session(setting: Setting, options: EvalOptions, load: Loader) -> Any:
    try:
        if setting.kind == "exported":
            return load(setting.source, options.device)
        from pruner_core import PrunerConfig

        return load(setting.source, options.device, config=PrunerConfig.from_dict(setting.pruner),
                    cache_dir=options.model_cache_dir)
    except (OSError, ValueError, ImportError) as error:
        raise EvalError(f"cannot load {setting.source} for {setting.label}: {error}") from None


def generate_answer(session: Any, setting: Setting, question: Question, prompt: str,
                    max_new_tokens: int) -> CachedAnswer:
    try:
        result = session.generate(image_input(question.image_ref), prompt, max_new_tokens=max_new_tokens,
                                  temperature=0.0)
    except (OSError, ValueError) as error:
        raise EvalError(f"{setting.label}, question on line {question.line}: {error}") from None
    return CachedAnswer(prediction=result.text.strip(), ttft_ms=result.profile.time_to_first_token_ms,
                        stop_reason=result.stop_reason, tokens=len(result.tokens))


# ================================================================================================================
# Scores
# ================================================================================================================


def score_setting(raw: _Raw, raws: list[_Raw], questions: tuple[Question, ...]) -> SettingResult:
    setting = raw.setting
    reference_setting = reference_of(setting, [r.setting for r in raws])
    reference = next(r for r in raws if r.setting == reference_setting)
    records = [
        AnswerRecord(line=q.line, image=q.image, question=q.question, answer=list(q.answers),
                     prediction=a.prediction, correct=is_correct(a.prediction, q.answers),
                     agrees=a.prediction.strip() == ref.prediction.strip(), ttft_ms=a.ttft_ms, cached=c)
        for q, a, ref, c in zip(questions, raw.answers, reference.answers, raw.cached)
    ]
    total = len(records)
    correct = sum(r.correct for r in records)
    accuracy = correct / total
    reference_accuracy = sum(is_correct(a.prediction, q.answers) for q, a in zip(questions, reference.answers)) / total
    ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
    return SettingResult(
        label=setting.label, kind=setting.kind, source=setting.source, method=setting.method, keep=setting.keep,
        layer=setting.layer, reference=reference_setting.label, accuracy=accuracy,
        retained_accuracy=accuracy / reference_accuracy if reference_accuracy > 0 else None,
        agreement=sum(r.agrees for r in records) / total,
        median_ttft_ms=statistics.median(ttfts) if ttfts else None, correct=correct, total=total,
        computed=sum(not r.cached for r in records), cached=sum(r.cached for r in records),
        yes_no=yes_no_stats(records), answers=records)


def yes_no_stats(records: list[AnswerRecord]) -> YesNoStats | None:
    pairs = [(normalize_answer(r.answer[0]), yes_no(r.prediction)) for r in records if is_yes_no(r.answer)]
    if not pairs:
        return None
    true_pos = sum(gold == "yes" and said == "yes" for gold, said in pairs)
    said_yes = sum(said == "yes" for _, said in pairs)
    gold_yes = sum(gold == "yes" for gold, _ in pairs)
    precision = true_pos / said_yes if said_yes else None
    recall = true_pos / gold_yes if gold_yes else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    return YesNoStats(questions=len(pairs), yes_ratio=said_yes / len(pairs), precision=precision, recall=recall, f1=f1)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def format_table(report: EvalReport) -> str:
    """A fixed-width table, one row per setting."""
    width = max([len("setting")] + [len(r.label) for r in report.settings])
    header = (f"{'setting':<{width}}  {'method':<11}{'keep':>6}{'layer':>6}{'accuracy':>10}{'retained':>10}"
              f"{'agreement':>11}{'TTFT ms':>10}{'F1':>9}  reference")
    lines = [f"{report.questions} questions from {report.questions_file}"
             + (f" ({len(report.skipped_lines)} lines skipped)" if report.skipped_lines else ""), header,
             "-" * len(header)]
    for r in report.settings:
        ttft = "n/a" if r.median_ttft_ms is None else f"{r.median_ttft_ms:.1f}"
        f1 = _percent(r.yes_no.f1) if r.yes_no else "n/a"
        lines.append(f"{r.label:<{width}}  {r.method:<11}{r.keep!s:>6}{r.layer:>6}{_percent(r.accuracy):>10}"
                     f"{_percent(r.retained_accuracy):>10}{_percent(r.agreement):>11}{ttft:>10}{f1:>9}  {r.reference}")
    lines.append(f"answers computed: {report.generate_calls}, from cache: {report.cache_hits} ({report.cache_file})")
    return "\n".join(lines)


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
                        help="evaluate folders written by pruner-export instead of eager settings (default: none, eager)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "npu", "auto"),
                        help="for --exported folders: npu = the first NPU provider / delegate, else an error; auto = "
                             "NPU if any, else CPU (eager models run on the CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="tokens generated per answer at most (short answers need few)")
    parser.add_argument("--prompt-suffix", default=DEFAULT_PROMPT_SUFFIX,
                        help="appended to every question (default: LLaVA-1.5's short-answer instruction)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable questions (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here (default: none, the table only)")
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
    except KeyboardInterrupt:
        print(f"pruner-eval: interrupted; the answers computed so far are cached in {args.cache}: rerun the same "
              "command to continue", file=sys.stderr)
        return 130
    print(report.table())
    if report.random_weights:
        from pruner_core.adapters.hub import RANDOM_WEIGHTS_NOTE

        print(f"note: {RANDOM_WEIGHTS_NOTE} (the scores test the plumbing, not the pruning)")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
