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
normalised float32 [1, 3, H, W], what the processor's ``pixel_values`` are; Qwen2-VL's flattened patches [P, 1176]).

M-RoPE exports (``executorch.position_scheme`` "mrope": Qwen2-VL / Qwen2.5-VL) run the same calls with every
``text_decoder`` call also given its rows' (t, h, w) positions [3, 1, T] (runtime/positions.py): the kept image
tokens at their original positions (``vision_encoder`` returns their indices), text after the image and every
decoding step at the unpruned positions. ``input_pos`` stays the cache slot. The stock runner cannot do this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from export.common import read_export_config

from .positions import POSITION_SCHEMES, prompt_positions
from .prompt import PromptIds, eos_ids, split_prompt


class ExecuTorchModel:
    """One exported folder, loaded: ``generate_greedy(input_ids, image, max_new_tokens) -> new token ids``."""

    def __init__(self, folder: str | Path) -> None:
        from executorch.runtime import Runtime

        self.folder = Path(folder)
        self.config: dict[str, Any] = read_export_config(self.folder)
        if self.config.get("target") != "executorch":
            raise ValueError(
                f"{self.folder} holds a target={self.config.get('target')!r} export; use the runtime for that target"
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
        layout = self.config["image_preprocessing"].get("input_layout", "float_nchw")
        # exports made before Qwen2-VL's lack the field: LLaVA-1.5's (float_nchw images) are 1-D
        self.position_scheme: str = settings.get("position_scheme", "1d" if layout == "float_nchw" else None)
        if self.position_scheme is None:
            raise ValueError(f"{self.folder}/export_config.json lacks executorch.position_scheme, which an export "
                             f"with {layout!r} images needs (its text_decoder takes M-RoPE position_ids, \"mrope\"): "
                             "it was written by an older pruner-export (or edited); export the model again")
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"{self.folder}/export_config.json has executorch.position_scheme "
                             f"{self.position_scheme!r}, not one of {POSITION_SCHEMES}; export the model again")
        self.grid: tuple[int, int] = tuple(self.config["grid"])
        self.kept_image_indices: np.ndarray | None = None  # [R], the last vision_encoder call's (M-RoPE exports)
        self._rope_offset = 0  # RoPE position minus cache slot of the tokens after the prompt (M-RoPE)
        self._methods: dict[str, Any] = {}

    @property
    def explicit_positions(self) -> bool:
        """M-RoPE: text_decoder takes position_ids [3, 1, T]; vision_encoder returns kept_image_indices."""
        return self.position_scheme != "1d"

    # ---- method calls ------------------------------------------------------------------------------
    def _call(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        return self._execute(name, *inputs)[0]

    def _execute(self, name: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = self.program.load_method(name)
        return method.execute([x.contiguous() for x in inputs])  # ExecuTorch needs contiguous inputs

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """token ids -> [1, T, D]"""
        return self._call("token_embedding", torch.tensor([list(token_ids)], dtype=torch.long))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 3, H, W] or [3, H, W] (M-RoPE exports: [P, 1176]) -> image embeddings [1, R, D];
        an M-RoPE export's kept token indices are kept in ``kept_image_indices`` [R]."""
        expected = self.config["methods"]["vision_encoder"]["inputs"][0]["shape"]
        pixel_values = image[None] if image.dim() == len(expected) - 1 else image
        if list(pixel_values.shape) != expected:
            raise ValueError(
                f"the image must be pixel_values of shape {expected} (the processor's output for this model), got "
                f"{tuple(image.shape)}; preprocess it with runtime.preprocess.preprocess(image, spec)"
            )
        outputs = self._execute("vision_encoder", pixel_values.to(torch.float32))
        if self.explicit_positions:
            self.kept_image_indices = outputs[1][0].numpy()  # [R]
        return outputs[0]

    def _step(self, name: str, embeddings: torch.Tensor, position: int,
              position_ids: np.ndarray | None = None) -> torch.Tensor:
        """text_decoder on embeddings [1, T, D] from cache slot ``position`` -> logits [1, V]; position_ids [3, 1, T]
        int64: the rows' M-RoPE positions (M-RoPE exports only)."""
        inputs = [embeddings, torch.tensor([position], dtype=torch.long)]
        if self.explicit_positions:
            if position_ids is None:
                raise ValueError("this export's text_decoder takes M-RoPE position_ids [3, 1, T]; pass them "
                                 "(runtime.positions.prompt_positions)")
            inputs.append(torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)))
        return self._call(name, *inputs)  # logits [1, V]

    def decode_step(self, token: int, position: int) -> torch.Tensor:
        """One generated token at the runner's position (cache slot) -> logits [1, V]; M-RoPE exports continue at
        the unpruned positions after the prompt."""
        rope = np.full((3, 1, 1), position + self._rope_offset, dtype=np.int64)
        return self._step("text_decoder", self.embed([token]), position, rope)

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
        length = before.shape[1]
        text = np.repeat(np.arange(length, dtype=np.int64)[None], 3, axis=0).reshape(3, 1, length)  # t = h = w
        self._step("text_decoder", before, 0, text)

    def prefill_chunks(
        self, before: torch.Tensor | None, image: torch.Tensor, after: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """Embedded prompt pieces [1, t, D] (text before, the rows ``encode_image`` returned, text after; no text is
        None) -> (logits [1, V] after the prompt, the runner's position of the first generated token).

        Layer 0: one ``text_decoder`` call over the whole prompt (its token dim is dynamic, so the pieces go together
        and the decoder weights are read once; the stock runner feeds them in turn, which gives the same cache).
        Layer K: the text before is already in (``prefill_context``, which ``vision_encoder`` needed); one call over
        the image rows and the text after."""
        start = 0 if before is None else before.shape[1]
        positions = self._prompt_positions(start, 0 if after is None else after.shape[1])
        if self.placement == "before_llm":
            embeddings = torch.cat([p for p in (before, image, after) if p is not None], dim=1)  # [1, T, D]
            return self._step("text_decoder", embeddings, 0, positions), embeddings.shape[1]
        embeddings = torch.cat([p for p in (image, after) if p is not None], dim=1)  # [1, R + t, D]
        chunk = None if positions is None else positions[:, :, start:]
        return self._step("text_decoder", embeddings, start, chunk), start + embeddings.shape[1]

    def _prompt_positions(self, before: int, after: int) -> np.ndarray | None:
        """M-RoPE: the pruned prompt's positions [3, 1, before + R + after] (kept image tokens at their original
        ones), and the offset decoding continues with; None for 1-D exports (the program maps them)."""
        if not self.explicit_positions:
            return None
        if self.kept_image_indices is None:
            raise ValueError("this export places the kept image tokens at their original positions: call "
                             "encode_image first (it records kept_image_indices)")
        positions, next_position = prompt_positions(self.position_scheme, before, self.grid, after,
                                                    self.kept_image_indices)
        self._rope_offset = next_position - positions.shape[-1]
        return positions

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
            logits = self.decode_step(token, position)
            position += 1

    def generate_greedy(
        self, input_ids: Sequence[int] | torch.Tensor, image: torch.Tensor, max_new_tokens: int
    ) -> list[int]:
        """Greedy decoding: up to ``max_new_tokens`` new token ids, stopping after an EOS (included)."""
        return [token for token, _ in self.greedy_steps(input_ids, image, max_new_tokens)]
