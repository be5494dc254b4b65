"""pruner-eval (runtime/evaluate.py, runtime/eval_*.py): scoring, question files, settings, caching, resuming, JSON
output.

The tiny model has random weights, so its accuracy means nothing: these tests check the plumbing.
"""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.eval_cache import CACHE_FILE, AnswerCache, CachedAnswer
from runtime.eval_questions import EvalError, is_correct, normalize_answer, read_questions, shipped_questions, yes_no
from runtime.eval_report import AnswerRecord, yes_no_stats
from runtime.eval_run import default_loader, evaluate
from runtime.eval_settings import EvalOptions, exported_settings, reference_of
from runtime.evaluate import main
from cases import write_bomb_png
from pruner_core.config import Keep
from runtime.profile import Profile
from runtime.session import Result

QUESTIONS = [
    {"image": "astronaut", "question": "Is there a person in the image?", "answer": "yes"},
    {"image": "chelsea", "question": "What animal is this?", "answer": "cat"},
    {"image": "coffee", "question": "Is there a fork in the image?", "answer": "no"},
]
FAST = ["--max-new-tokens", "4", "--no-progress"]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-models")


class CountingLoader:
    """runtime.load that counts loads and generate calls, and can fail after `fail_after` generate calls.

    Sessions are shared between instances (per source + config) so each tiny-llava setting is built once.
    """

    sessions: dict[str, object] = {}

    def __init__(self, fail_after: int | None = None, error: type[BaseException] = KeyboardInterrupt):
        self.loads = 0
        self.calls = 0
        self.fail_after = fail_after
        self.error = error

    def __call__(self, source, device, *, config=None, cache_dir=None):
        self.loads += 1
        key = f"{source}|{config.to_json() if config else ''}"
        if key not in self.sessions:
            self.sessions[key] = default_loader(source, device, config=config, cache_dir=cache_dir)
        return _Counted(self, self.sessions[key])


class _Counted:
    def __init__(self, loader: CountingLoader, session):
        self.loader, self.session = loader, session

    def generate(self, *args, **kwargs):
        if self.loader.fail_after is not None and self.loader.calls >= self.loader.fail_after:
            raise self.loader.error("simulated interruption")
        self.loader.calls += 1
        return self.session.generate(*args, **kwargs)


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def eager_args(questions: Path, cache: Path, model_cache: Path, keep="1.0,0.11", methods="vlm_pruner,dart"):
    return ["--questions", str(questions), "--model", "tiny-llava", "--keep", keep, "--methods", methods,
            "--cache", str(cache), "--model-cache-dir", str(model_cache), *FAST]


# ---- scoring ---------------------------------------------------------------------------------------------------


def test_normalize_answer() -> None:
    assert normalize_answer("  The Cat. ") == "cat"
    assert normalize_answer("A red, wooden table!") == "red wooden table"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("an apple's core") == "apples core"
    assert normalize_answer("it's 3.5") == "its 3 5"
    assert normalize_answer("") == ""


def test_yes_no_detection_as_pope() -> None:
    assert yes_no("Yes") == "yes"
    assert yes_no("yes, there is a cat in the image.") == "yes"
    assert yes_no("No.") == "no"
    assert yes_no("There is not a dog.") == "no"
    assert yes_no("I think yes") == "yes"
    assert yes_no("No, but yes") == "no"  # the first word decides
    assert yes_no("not sure, yes") == "no"  # POPE: any no / not
    assert yes_no("yesterday") is None and yes_no("A cat") is None and yes_no("") is None


def test_is_correct() -> None:
    assert is_correct("Yes.", ["yes"]) and is_correct("No, there is none.", ["no"])
    assert not is_correct("Yes", ["no"]) and not is_correct("cat", ["yes"])
    assert is_correct("The cat", ["cat"]) and is_correct("two", ["2"]) and is_correct("Espresso.", ["coffee", "espresso"])
    assert not is_correct("cats", ["cat"]) and not is_correct("a black cat", ["cat"])
    assert not is_correct("", ["cat"])


def test_yes_no_stats_pope_metrics() -> None:
    def record(answer: str, prediction: str) -> AnswerRecord:
        return AnswerRecord(1, "x", "q", [answer], prediction, is_correct(prediction, [answer]), True, None, False)

    stats = yes_no_stats([record("yes", "Yes"), record("yes", "No"), record("no", "yes"), record("no", "no"),
                          record("cat", "cat")])
    assert stats.questions == 4 and stats.yes_ratio == 0.5
    assert stats.precision == 0.5 and stats.recall == 0.5 and stats.f1 == 0.5
    assert yes_no_stats([record("cat", "cat")]) is None


# ---- question files --------------------------------------------------------------------------------------------


def test_shipped_question_set() -> None:
    questions = read_questions(shipped_questions())
    assert not questions.skipped and 12 <= len(questions.questions) <= 20
    assert {q.image for q in questions.questions} == {"astronaut", "chelsea", "coffee"}
    yes_no_answers = [q for q in questions.questions if q.answers[0] in ("yes", "no")]
    assert len(yes_no_answers) >= 10 and len(questions.questions) - len(yes_no_answers) >= 3


def test_bad_lines_are_reported_and_skipped(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "black.png")
    (tmp_path / "img" / "fake.png").write_text("not an image")
    path = write_jsonl(tmp_path / "q.jsonl", [
        QUESTIONS[0],                                                       # 1 ok (sample)
        '{"image": "astronaut", "question": "broken"',                      # 2 invalid JSON
        {"image": "astronaut", "question": "Is it?"},                       # 3 missing answer
        {"image": "missing.png", "question": "Is it?", "answer": "no"},     # 4 image not found
        "",                                                                 # 5 blank: ignored
        {"image": "img/black.png", "question": "Is it dark?", "answer": "yes"},  # 6 ok (relative path)
        '["a", "list"]',                                                    # 7 not an object
        {"image": "img/fake.png", "question": "Is it?", "answer": "no"},    # 8 unreadable image
        {"image": "coffee", "question": " ", "answer": "no"},               # 9 empty question
        {"image": str(tmp_path / "img" / "black.png"), "question": "Dark?", "answer": ["yes", "dark"]},  # 10 ok
        {"image": str(write_bomb_png(tmp_path / "img" / "bomb.png")), "question": "Q?", "answer": "no"},  # 11 bomb
    ])
    questions = read_questions(path)
    assert [q.line for q in questions.questions] == [1, 6, 10]
    assert questions.questions[1].image_ref == questions.questions[2].image_ref == str(tmp_path / "img" / "black.png")
    assert questions.questions[0].image_ref == "skimage:astronaut"
    reasons = {bad.line: bad.reason for bad in questions.skipped}
    assert sorted(reasons) == [2, 3, 4, 7, 8, 9, 11]
    assert "invalid JSON" in reasons[2] and "missing field(s) answer" in reasons[3]
    assert "not found" in reasons[4] and "astronaut" in reasons[4] and "JSON object" in reasons[7]
    assert f"cannot read image file {tmp_path / 'img' / 'fake.png'}: not an image" in reasons[8]
    assert "question" in reasons[9] and "header declares more pixels" in reasons[11]
    assert [q.line for q in read_questions(path, limit=2).questions] == [1, 6]


def test_no_usable_line_is_a_clear_error(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"image": "nowhere.jpg", "question": "Q?", "answer": "no"}])
    with pytest.raises(EvalError, match="no usable question"):
        read_questions(path)
    assert main(["--questions", str(path), "--cache", str(tmp_path / "cache"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no usable question" in err and "line 1: invalid JSON" in err and "line 2: image 'nowhere.jpg'" in err
    assert main(["--questions", str(tmp_path / "absent.jsonl"), *FAST]) == 2
    assert "not found" in capsys.readouterr().err


def test_module_import_is_light() -> None:
    code = ("import sys, runtime.evaluate; bad = [m for m in sys.modules if m == 'torch' or m.startswith('export')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---- runs on tiny-llava ----------------------------------------------------------------------------------------


def test_keep_one_agrees_with_itself_and_json_schema(tmp_path, model_cache, capsys) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", [*QUESTIONS[:2], '{"bad json', QUESTIONS[2]])
    out = tmp_path / "out" / "results.json"
    loader = CountingLoader()
    code = main([*eager_args(questions, tmp_path / "cache", model_cache), "--out", str(out)], load=loader)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"{questions}:3: skipped: invalid JSON" in captured.err
    assert loader.calls == 3 * 4 and loader.loads == 4

    report = json.loads(out.read_text())
    assert list(report) == ["version", "reference_rule", "questions_file", "questions", "skipped_lines",
                            "max_new_tokens", "prompt_suffix", "cache_file", "generate_calls", "cache_hits",
                            "settings", "random_weights"]
    assert report["questions"] == 3 and report["skipped_lines"][0]["line"] == 3
    assert report["generate_calls"] == 12 and report["cache_hits"] == 0 and report["max_new_tokens"] == 4
    settings = {s["label"]: s for s in report["settings"]}
    assert list(settings) == ["vlm_pruner keep=1.0", "vlm_pruner keep=0.11", "dart keep=1.0", "dart keep=0.11"]
    first = settings["vlm_pruner keep=1.0"]
    assert list(first) == ["label", "kind", "source", "method", "keep", "layer", "reference", "accuracy",
                           "retained_accuracy", "agreement", "median_ttft_ms", "correct", "total", "computed",
                           "cached", "yes_no", "answers"]
    assert list(first["answers"][0]) == ["line", "image", "question", "answer", "prediction", "correct", "agrees",
                                         "ttft_ms", "cached"]
    assert list(first["yes_no"]) == ["questions", "yes_ratio", "precision", "recall", "f1"]
    assert first["yes_no"]["questions"] == 2
    for setting in settings.values():
        assert setting["kind"] == "eager" and setting["total"] == 3 and setting["computed"] == 3
        assert setting["median_ttft_ms"] > 0 and 0.0 <= setting["accuracy"] <= 1.0
        assert setting["reference"] == f"{setting['method']} keep=1.0"
    # keep 1.0 is its own reference, and keeping every token makes the method irrelevant
    for label in ("vlm_pruner keep=1.0", "dart keep=1.0"):
        assert settings[label]["agreement"] == 1.0
    predictions = [[a["prediction"] for a in settings[label]["answers"]]
                   for label in ("vlm_pruner keep=1.0", "dart keep=1.0")]
    assert predictions[0] == predictions[1]
    # the table on stdout
    assert "accuracy" in captured.out and "agreement" in captured.out and "dart keep=0.11" in captured.out
    assert f"wrote {out}" in captured.out
    assert report["random_weights"] is True and "note: random weights" in captured.out  # tiny-llava says so


def test_second_run_is_free(tmp_path, model_cache) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    options = EvalOptions(questions=questions, keeps=(1.0, 0.11), methods=("vlm_pruner",), max_new_tokens=4,
                          cache_dir=tmp_path / "cache", model_cache_dir=model_cache, progress=False)
    first_loader, second_loader = CountingLoader(), CountingLoader()
    first = evaluate(options, first_loader)
    second = evaluate(options, second_loader)
    assert first_loader.calls == 6 and first.generate_calls == 6 and first.cache_hits == 0
    assert second_loader.calls == 0 and second_loader.loads == 0  # no model is even loaded
    assert second.generate_calls == 0 and second.cache_hits == 6
    assert all(r.cached == 3 and r.computed == 0 for r in second.settings)
    for a, b in zip(first.settings, second.settings):
        assert [x.prediction for x in a.answers] == [x.prediction for x in b.answers]
        assert a.median_ttft_ms == b.median_ttft_ms  # the timing measured when the answer was computed
    # a different max_new_tokens is a different answer
    third_loader = CountingLoader()
    evaluate(replace(options, max_new_tokens=3), third_loader)
    assert third_loader.calls == 6


def test_terminated_run_says_so_and_keeps_what_was_done(tmp_path, model_cache, capsys) -> None:
    """SIGTERM (run_program turns it into Terminated, a KeyboardInterrupt): "terminated", 143, answers kept."""
    from runtime.console import Terminated

    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    args = eager_args(questions, tmp_path / "cache", model_cache, keep="1.0", methods="vlm_pruner")
    assert main(args, load=CountingLoader(fail_after=1, error=Terminated)) == 143
    assert "pruner-eval: terminated; the answers computed so far are cached" in capsys.readouterr().err
    assert len((tmp_path / "cache" / CACHE_FILE).read_text().splitlines()) == 1


def test_interrupted_run_resumes(tmp_path, model_cache, capsys) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    args = eager_args(questions, tmp_path / "cache", model_cache, keep="1.0,0.11", methods="vlm_pruner")
    crashing = CountingLoader(fail_after=4)
    assert main(args, load=crashing) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    assert crashing.calls == 4
    cached = (tmp_path / "cache" / CACHE_FILE).read_text().splitlines()
    assert len(cached) == 4

    resumed = CountingLoader()
    assert main([*args, "--out", str(tmp_path / "r.json")], load=resumed) == 0
    assert resumed.calls == 6 - 4  # only what was left
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["generate_calls"] == 2 and report["cache_hits"] == 4
    assert [(s["computed"], s["cached"]) for s in report["settings"]] == [(0, 3), (2, 1)]

    # an error that is not an interrupt also keeps what was done
    other = tmp_path / "other-cache"
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(EvalOptions(questions=questions, keeps=(1.0,), methods=("dart",), max_new_tokens=4,
                             cache_dir=other, model_cache_dir=model_cache, progress=False),
                 CountingLoader(fail_after=2, error=RuntimeError))
    assert len(AnswerCache(other).entries) == 2


def test_retained_accuracy_against_keep_one(tmp_path, model_cache) -> None:
    """Gold answers set to keep 1.0's own answers: keep 1.0 scores 100 %, the others are scored relative to it."""
    options = EvalOptions(questions=write_jsonl(tmp_path / "q.jsonl", QUESTIONS), keeps=(0.11, 1.0),
                          methods=("vlm_pruner",), max_new_tokens=4, cache_dir=tmp_path / "cache",
                          model_cache_dir=model_cache, progress=False)
    first = evaluate(options, CountingLoader())
    full = next(r for r in first.settings if r.keep == Keep(1.0))
    gold = [{**q, "answer": a.prediction or "-"} for q, a in zip(QUESTIONS, full.answers)]
    rescored = evaluate(replace(options, questions=write_jsonl(tmp_path / "gold.jsonl", gold)),
                        CountingLoader())
    assert rescored.generate_calls == 0  # the answer is not part of the cache key
    pruned, full = rescored.settings
    assert pruned.reference == full.label == "vlm_pruner keep=1.0"  # keep 1.0 is the reference even when listed later
    assert full.accuracy == 1.0 and full.retained_accuracy == 1.0 and full.agreement == 1.0
    assert pruned.retained_accuracy == pytest.approx(pruned.accuracy)
    assert pruned.agreement == pytest.approx(sum(a.agrees for a in pruned.answers) / 3)


# ---- exported folders (fake sessions: the exported backends are tested elsewhere) ---------------------------------


def _export_folder(root: Path, name: str, keep, kept: int, method: str = "vlm_pruner") -> Path:
    folder = root / name
    folder.mkdir()
    config = {"format_version": 1, "model_id": "tiny-llava", "target": "onnx", "backend": "onnxruntime",
              "dtype": "fp32", "quantization": None, "num_image_tokens": 576, "kept_image_tokens": kept,
              "pruner": {"version": 1, "keep": keep, "method": method, "layer": 2}}
    (folder / "export_config.json").write_text(json.dumps(config))
    return folder


class FakeExportLoader:
    """Answers "yes" from a folder keeping every token, "no" from the others."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, source, device, *, config=None, cache_dir=None):
        assert config is None  # an exported folder carries its own settings
        loader = self

        class Session:
            def generate(self, image, prompt, max_new_tokens, temperature):
                loader.calls.append(source)
                profile = Profile(time_to_first_token_ms=5.0)
                text = "Yes" if source.endswith("full") else "No"
                return Result(text=text, tokens=[1], profile=profile, stop_reason="eos")

        return Session()


def test_exported_folders(tmp_path, capsys) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    pruned = _export_folder(tmp_path, "k64", 64, 64)
    full = _export_folder(tmp_path, "full", 1.0, 576, method="dart")
    settings = exported_settings([pruned, full])
    assert [s.label for s in settings] == ["k64", "full"] and settings[1].full and not settings[0].full
    assert reference_of(settings[0], settings) == settings[1]  # keep 1.0 of another method when none of its own

    loader = FakeExportLoader()
    args = ["--questions", str(questions), "--exported", str(pruned), str(full), "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "r.json"), *FAST]
    assert main(args, load=loader) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    k64, whole = report["settings"]
    assert k64["kind"] == "exported" and k64["keep"] == 64 and k64["method"] == "vlm_pruner"
    assert k64["reference"] == "full" and k64["agreement"] == 0.0 and whole["agreement"] == 1.0
    assert k64["accuracy"] == pytest.approx(1 / 3) and whole["accuracy"] == pytest.approx(1 / 3)
    assert k64["retained_accuracy"] == pytest.approx(1.0) and k64["median_ttft_ms"] == 5.0
    assert len(loader.calls) == 6

    assert main(args, load=loader) == 0 and len(loader.calls) == 6  # cached
    assert report["random_weights"] is False and "random weights" not in capsys.readouterr().out
    config = json.loads((pruned / "export_config.json").read_text())
    (pruned / "export_config.json").write_text(json.dumps({**config, "dtype": "fp16", "random_weights": True}))
    assert main(args, load=loader) == 0 and len(loader.calls) == 9  # only that folder (a re-export) runs again
    assert "note: random weights" in capsys.readouterr().out

    assert main([*args, "--keep", "0.5"], load=loader) == 2
    assert "drop --keep" in capsys.readouterr().err
    assert main(["--questions", str(questions), "--exported", str(tmp_path), *FAST], load=loader) == 2
    assert "no export_config.json" in capsys.readouterr().err


def test_bad_settings_and_truncated_cache(tmp_path, capsys) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    assert main(["--questions", str(questions), "--methods", "nope", "--cache", str(tmp_path / "c"), *FAST]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["--questions", str(questions), "--keep", "1.5", "--cache", str(tmp_path / "c"), *FAST]) == 2
    assert "keep=1.5" in capsys.readouterr().err
    assert main(["--questions", str(questions), "--keep", "lots", "--cache", str(tmp_path / "c"), *FAST]) == 2
    assert "keep 'lots'" in capsys.readouterr().err

    cache = AnswerCache(tmp_path / "c2")
    cache.put("k1", CachedAnswer("yes", 1.0, "eos", 1), {})
    with (tmp_path / "c2" / CACHE_FILE).open("a") as out:
        out.write('{"key": "k2", "predic')  # cut short by an interrupt
    reread = AnswerCache(tmp_path / "c2")
    assert list(reread.entries) == ["k1"] and reread.unreadable_lines == 1
    reread.put("k3", CachedAnswer("no", None, "max_new_tokens", 4), {"line": 3})  # on a line of its own
    assert list(AnswerCache(tmp_path / "c2").entries) == ["k1", "k3"]
