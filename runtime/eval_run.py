"""pruner-eval's run: every setting over every question, cached answers reused and new ones cached at once, the model
of a setting loaded only when one of its answers is not cached; then the scores (runtime/eval_report.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from .eval_cache import AnswerCache, CachedAnswer, answer_key
from .eval_questions import EvalError, Question, QuestionSet, image_input, read_questions
from .eval_report import EvalReport, SettingAnswers, score_setting
from .eval_settings import EvalOptions, Setting

# load(source, device, *, config=PrunerConfig | None, cache_dir=...) -> an object with Session.generate
Loader = Callable[..., Any]


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
                   load: Loader, progress: _Progress, counts: dict[str, int]) -> SettingAnswers:
    """One setting over all questions; the model is loaded only when some answer is not cached."""
    session = None
    raw = SettingAnswers(setting, [], [])
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
