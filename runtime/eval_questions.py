"""pruner-eval's questions: the JSONL question file (one {"image", "question", "answer"} object a line; bad lines
collected with their line numbers, not raised), the images it names, and whether a prediction answers a question
(normalised exact match, POPE's yes/no detection). The file format and the scoring rules: runtime/evaluate.py.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .preprocess import SAMPLE_IMAGES

# Image placeholders of the model families this tool runs; a question holding one would add a second image.
IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
REQUIRED_FIELDS = ("image", "question", "answer")


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
