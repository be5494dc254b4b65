"""Run a folder written by ``pruner-export --target executorch`` with the ExecuTorch Python runtime.

``ExecuTorchModel(folder)`` reads ``export_config.json``, loads ``model.pte`` with ``executorch.runtime.Runtime`` and
generates greedily for one prompt with one image, through the methods the stock ``MultimodalRunner`` calls
(``vision_encoder``, ``token_embedding``, ``text_decoder``), at both placements:

* layer 0 (``before_llm``): the text before and after the image -> ``token_embedding``; the image ->
  ``vision_encoder`` (R pruned tokens); all of it -> ``text_decoder`` in one call (the stock runner feeds the three
  pieces in turn, which fills the cache the same way but reads the decoder weights three times); then one token at
  a time.
* layer K (``in_llm``): the text before -> ``text_decoder``; the image -> ``vision_encoder`` (runs layers < K on the
  image and prunes: R rows); those rows and the text after -> ``text_decoder`` in one call; then one token at a
  time. Positions are the runner's (the image counts R); the program maps them to the full ones
  (export/executorch_layer_k.py).

Prompts are token ids holding one run of image placeholder tokens (the processor's expanded prompt, or a single
``<image>`` token); the image is the vision encoder's input (``image_preprocessing.input_layout`` in the config:
normalised float32 [1, 3, H, W], what the processor's ``pixel_values`` are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from export.common import read_export_config

from .prompt import PromptIds, eos_ids, split_prompt


class ExecuTorchModel:
    """One exported folder, loaded: ``generate_greedy(input_ids, image, max_new_tokens) -> new token ids``."""

    def __init__(self, folder: str | Path) -> None:
        from executorch.runtime import Runtime

        self.folder = Path(folder)
        self.config: dict[str, Any] = read_export_config(self.folder)
        if self.config.get("target") != "executorch":
            raise ValueError(
                f"{self.folder} holds a {self.config.get('target')!r} export; use the runtime for that target"
            )
        self.eos_ids: frozenset[int] = eos_ids(self.config["tokenizer"])  # before loading: fail at once
        settings = self.config["executorch"]
        self.program = Runtime.get().load_program(self.folder / settings["program"])
        expected = set(self.config["methods"])
        missing = expected - self.program.method_names
        if missing:
            raise ValueError(f"{self.folder / settings['program']} lacks methods {sorted(missing)}; export it again")
        self.placement: str = self.config["placement"]
        self.max_seq_len: int = int(self.config["max_seq_len"])  # full positions
        # positions the runner counts (the image counts R at both placements)
        self.runner_max_seq_len: int = int(settings.get("runner_max_seq_len", self.max_seq_len))
        self.image_token_id: int = int(self.config["tokenizer"]["image_token_id"])
        self.num_image_tokens: int = int(self.config["num_image_tokens"])  # N
        self.kept_image_tokens: int = int(self.config["kept_image_tokens"])  # R
        self._methods: dict[str, Any] = {}

    # ---- method calls ------------------------------------------------------------------------------
    def _call(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = self.program.load_method(name)
        return method.execute([x.contiguous() for x in inputs])[0]  # ExecuTorch needs contiguous inputs

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """token ids -> [1, T, D]"""
        return self._call("token_embedding", torch.tensor([list(token_ids)], dtype=torch.long))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 3, H, W] or [3, H, W] -> image embeddings [1, R (layer 0) or N, D]"""
        pixel_values = image if image.dim() == 4 else image[None]
        expected = self.config["methods"]["vision_encoder"]["inputs"][0]["shape"]
        if list(pixel_values.shape) != expected:
            raise ValueError(
                f"the image must be pixel_values of shape {expected} (the processor's output for this model), got "
                f"{tuple(image.shape)}; preprocess it with runtime.preprocess.preprocess(image, spec)"
            )
        return self._call("vision_encoder", pixel_values.to(torch.float32))

    def _step(self, name: str, embeddings: torch.Tensor, position: int) -> torch.Tensor:
        return self._call(name, embeddings, torch.tensor([position], dtype=torch.long))  # logits [1, V]

    # ---- prefill per placement ---------------------------------------------------------------------
    @property
    def needs_context_before_image(self) -> bool:
        """Layer K: ``vision_encoder`` attends to the text before the image, which ``text_decoder`` must have
        cached first (``prefill_context``)."""
        return self.placement == "in_llm"

    def prefill(self, parts: PromptIds, image: torch.Tensor) -> tuple[torch.Tensor, int]:
        """-> (logits [1, V] after the prompt, the runner's position of the first generated token)."""
        self._check_length(len(parts.before) + self.kept_image_tokens + len(parts.after))
        before = self.embed(parts.before) if parts.before else None
        if self.needs_context_before_image:
            self.prefill_context(before)
        return self.prefill_chunks(before, self.encode_image(image),
                                   self.embed(parts.after) if parts.after else None)

    def prefill_context(self, before: torch.Tensor | None) -> None:
        """Layer K: the text before the image [1, t, D] -> ``text_decoder`` at position 0 (a new conversation).
        Raises ValueError without text before the image (every chat template has some)."""
        if before is None or before.shape[1] == 0:
            raise ValueError(
                "an export pruned inside the LLM (--prune-layer >= 1) needs text before the image (its vision_encoder "
                "attends to it); start the prompt with text, as the model's chat template does"
            )
        self._step("text_decoder", before, 0)

    def prefill_chunks(
        self, before: torch.Tensor | None, image: torch.Tensor, after: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Embedded prompt pieces [1, t, D] (text before, the rows ``encode_image`` returned, text after; no text is
        None) -> (logits [1, V] after the prompt, the runner's position of the first generated token).

        Layer 0: one ``text_decoder`` call over the whole prompt (its token dim is dynamic, so the pieces go together
        and the decoder weights are read once; the stock runner feeds them in turn, which gives the same cache).
        Layer K: the text before is already in (``prefill_context``, which ``vision_encoder`` needed); one call over
        the image rows and the text after."""
        if self.placement == "before_llm":
            embeddings = torch.cat([p for p in (before, image, after) if p is not None], dim=1)  # [1, T, D]
            return self._step("text_decoder", embeddings, 0), embeddings.shape[1]
        start = 0 if before is None else before.shape[1]
        embeddings = torch.cat([p for p in (image, after) if p is not None], dim=1)  # [1, R + t, D]
        return self._step("text_decoder", embeddings, start), start + embeddings.shape[1]

    def _check_length(self, length: int) -> None:
        if length > self.runner_max_seq_len:
            raise ValueError(
                f"the prompt needs {length + self.max_seq_len - self.runner_max_seq_len} positions but the model was "
                f"exported with max_seq_len={self.max_seq_len}; shorten the prompt or export with a larger "
                "--max-seq-len"
            )

    # ---- generation --------------------------------------------------------------------------------
    def greedy_steps(
        self, input_ids: Sequence[int] | torch.Tensor, image: torch.Tensor, max_new_tokens: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Greedy decoding, one (token id, logits [1, V] it was chosen from) per step; stops after an EOS, after
        ``max_new_tokens`` tokens, or when the cache is full."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        logits, position = self.prefill(split_prompt(input_ids, self.image_token_id), image)
        for step in range(max_new_tokens):
            token = int(logits[0].argmax())
            yield token, logits
            if token in self.eos_ids or step + 1 == max_new_tokens or position >= self.runner_max_seq_len:
                return
            logits = self._step("text_decoder", self.embed([token]), position)
            position += 1

    def generate_greedy(
        self, input_ids: Sequence[int] | torch.Tensor, image: torch.Tensor, max_new_tokens: int
    ) -> list[int]:
        """Greedy decoding: up to ``max_new_tokens`` new token ids, stopping after an EOS (included)."""
        return [token for token, _ in self.greedy_steps(input_ids, image, max_new_tokens)]
