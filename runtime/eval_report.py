"""pruner-eval's report: each setting's answers scored against its reference setting (accuracy, retained
accuracy, agreement, median time to first token, POPE's yes/no metrics), the JSON payload and the table.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from .eval_cache import CachedAnswer
from .eval_questions import Question, SkippedLine, is_correct, is_yes_no, normalize_answer, yes_no
from .eval_settings import Setting, reference_of

EVAL_VERSION = 1
REFERENCE_RULE = ("same model and layer: the first keep-1.0 setting with the same method, else the first keep-1.0 "
                  "setting, else the first setting; retained_accuracy = accuracy / reference accuracy, agreement = "
                  "share of questions whose stripped answer text equals the reference's")


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
class SettingAnswers:
    """A setting's answers (and whether each came from the cache) before scoring against its reference."""

    setting: Setting
    answers: list[CachedAnswer]
    cached: list[bool]


def score_setting(raw: SettingAnswers, raws: list[SettingAnswers], questions: tuple[Question, ...]) -> SettingResult:
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
