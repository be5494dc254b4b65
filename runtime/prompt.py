"""Prompt -> token ids around the image span, through the model's own chat template and tokenizer.

Run-time only needs the `tokenizers` package and jinja2 (no transformers): the exported folder carries
`tokenizer.json` and `export_config.json["tokenizer"]` (ids of BOS / EOS / the image placeholder, chat template).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class PromptIds:
    """The prompt split at the image: ids before it, ids after it (the image span goes between)."""

    before: list[int]
    after: list[int]

    @property
    def text_tokens(self) -> int:
        return len(self.before) + len(self.after)


def eos_ids(tokenizer: dict[str, Any], where: str = "export_config.json") -> frozenset[int]:
    """The end-of-sequence ids of an export's ``export_config.json["tokenizer"]`` block (``eos_ids``, or an older
    single ``eos_id``). Every backend stops on them; a block without any raises ValueError naming ``where`` and the
    field, since generation could never stop."""
    block = tokenizer if isinstance(tokenizer, dict) else {}
    eos = block.get("eos_ids") if block.get("eos_ids") is not None else block.get("eos_id")
    ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    try:
        result = frozenset(int(e) for e in ids if e is not None and not isinstance(e, bool))
    except (TypeError, ValueError):
        result = frozenset()
    if not result:
        raise ValueError(
            f"{where} has no end-of-sequence ids (tokenizer.eos_ids is {eos!r}): generation could never "
            "stop; export the model again, or add the tokenizer's EOS ids, e.g. \"eos_ids\": [2], to its "
            "\"tokenizer\" block"
        )
    return result


def split_prompt(input_ids: Sequence[int] | Any, image_token_id: int) -> PromptIds:
    """Ids holding one run of image placeholders (one ``<image>``, or a processor's N) -> the ids around it.

    input_ids: a list, or a numpy array / torch tensor of shape [T] or [1, T] (batch 1).
    """
    import numpy as np

    array = np.asarray(input_ids)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise ValueError(f"input_ids must be [T] or [1, T] (batch 1), got shape {tuple(array.shape)}")
    ids = [int(i) for i in array]
    spots = [i for i, token in enumerate(ids) if token == image_token_id]
    if not spots or spots != list(range(spots[0], spots[-1] + 1)):
        raise ValueError(
            f"the prompt must hold exactly one image (one run of image token {image_token_id}), found "
            f"{len(spots)} placeholder(s){' in several runs' if spots else ''}; put one '<image>' in the prompt, "
            "e.g. 'USER: <image>\\nWhat is in the picture? ASSISTANT:'"
        )
    return PromptIds(before=ids[: spots[0]], after=ids[spots[-1] + 1 :])


class PromptEncoder:
    """Chat template + tokenizer of one exported model."""

    def __init__(self, folder: str | Path, tokenizer: dict[str, Any]):
        from tokenizers import Tokenizer

        folder = Path(folder)
        files = [f for f in tokenizer.get("files", []) if f.endswith("tokenizer.json")] or ["tokenizer.json"]
        path = folder / files[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the exported folder is incomplete; export the model again")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.image_token_id = int(tokenizer["image_token_id"])
        self.eos_ids = set(eos_ids(tokenizer))
        self.bos_id = tokenizer.get("bos_id")
        self.chat_template = tokenizer.get("chat_template")
        self.prompt_format = tokenizer.get("prompt_format")
        self.bos_token = tokenizer.get("bos_token", "<s>")
        self.eos_token = tokenizer.get("eos_token", "</s>")
        self.image_token = self.tokenizer.id_to_token(self.image_token_id)

    def render(self, question: str) -> str:
        """The conversation text with one image placeholder, as the model was trained to see it."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the prompt is empty; ask a question about the image, e.g. 'What is in the picture?'")
        if self.chat_template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
                self.chat_template
            )
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
        if self.prompt_format:
            return self.prompt_format.format(prompt=question, image=self.image_token)
        return f"USER: {self.image_token}\n{question} ASSISTANT:"

    def encode(self, question: str) -> PromptIds:
        if isinstance(question, str) and self.image_token and self.image_token in question:
            raise ValueError(
                f"the question contains the image placeholder {self.image_token!r}; the prompt format puts the image "
                f"in by itself, so remove {self.image_token!r} from the question text"
            )
        ids = self.tokenizer.encode(self.render(question), add_special_tokens=True).ids
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [int(self.bos_id)] + ids
        spots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(spots) != 1:
            raise ValueError(
                f"the rendered prompt holds {len(spots)} image placeholders; exactly one image per prompt is supported"
            )
        return PromptIds(before=ids[: spots[0]], after=ids[spots[0] + 1 :])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)
