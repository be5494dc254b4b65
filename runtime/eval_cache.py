"""pruner-eval's answer cache: every answer appended to ``<cache>/answers.jsonl`` as soon as it is computed, keyed by
a hash of (the setting's model identity, its PrunerConfig JSON, prompt, image, max_new_tokens), so that an
interrupted run resumes and a rerun loads no model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .eval_questions import EvalError
from .eval_settings import Setting

CACHE_FILE = "answers.jsonl"


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
