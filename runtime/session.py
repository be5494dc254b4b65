"""`runtime.load(...)` -> a Session that runs a (pruned) VLM on an image and a prompt, and profiles the call.

The Session owns what every backend shares (image preprocessing, prompt encoding, sampling, streaming, profiling);
a backend only runs the model's pieces step by step: image features, token embedding, prefill, one-token decode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .memory import files_size_bytes, peak_rss_bytes
from .preprocess import ImagePreprocessing, load_image, preprocess
from .profile import Profile, timed
from .prompt import PromptEncoder, PromptIds


class Backend(Protocol):
    """The model's pieces, run step by step. Arrays are whatever the backend uses (numpy or torch)."""

    kind: str  # "executorch" | "onnxruntime" | "pytorch"
    device: str  # what actually runs it: "cpu", or the NPU provider / delegate
    num_image_tokens: int  # N
    kept_image_tokens: int  # R
    max_seq_len: int | None
    files: list[Path]

    def image_features(self, pixel_values: np.ndarray, image_start: int) -> Any: ...  # [1, N or R, D]
    # (R: pruned inside for layer 0, whose selection reads the image tokens' positions from image_start, and by
    # ExecuTorch's layer-K vision_encoder, which needs_context_before_image: prefill_context(before) runs first)

    def embed(self, ids: list[int]) -> Any: ...  # [1, T, D]

    def prefill(self, before: Any, image: Any, after: Any) -> np.ndarray: ...  # next-token logits [V]

    def decode(self, token: int) -> np.ndarray: ...  # next-token logits [V]

    def kv_cache_bytes(self) -> int: ...

    def reset(self) -> None: ...


@dataclass
class Result:
    text: str
    tokens: list[int]
    profile: Profile
    stop_reason: str  # "eos" | "max_new_tokens" | "max_seq_len"
    logits: list[np.ndarray] | None = None  # with output_logits: float32 [V] per step, the one each token came from


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """logits [V] -> a token id."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if sampling.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # the smallest set reaching top_p
    nucleus = order[keep]
    return int(rng.choice(nucleus, p=probs[nucleus] / probs[nucleus].sum()))


@dataclass
class Session:
    """A loaded model, reusable for many calls; the same input gives the same tokens every time."""

    backend: Backend
    encoder: PromptEncoder
    image_spec: ImagePreprocessing
    config: dict[str, Any] = field(default_factory=dict)
    device_note: str = ""

    @property
    def files(self) -> list[Path]:
        return self.backend.files

    def generate(
        self,
        image: Any,
        prompt: str,
        max_new_tokens: int = 64,
        on_token: Callable[[str], Any] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        output_logits: bool = False,
    ) -> Result:
        """Answer `prompt` about `image` (path, PIL image or HxWx3 uint8 array); stream text pieces to on_token.
        output_logits: also return each step's next-token logits (``Result.logits``, as transformers' generate)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        sampling = Sampling(temperature, top_p, seed)
        rng = np.random.default_rng(seed)
        prompt_ids = self.encoder.encode(prompt)
        self._check_length(prompt_ids, max_new_tokens)
        profile = Profile(backend=self.backend.kind, device=self.backend.device)
        start = time.perf_counter()
        self.backend.reset()
        with timed(profile, "preprocess"):
            pixels = preprocess(load_image(image), self.image_spec)
        with timed(profile, "embed"):
            before, after = self.backend.embed(prompt_ids.before), self.backend.embed(prompt_ids.after)
        if getattr(self.backend, "needs_context_before_image", False):
            with timed(profile, "prefill"):  # the text before the image first: the vision encoder attends to it
                self.backend.prefill_context(before)
        with timed(profile, "vision"):
            features = self.backend.image_features(pixels, len(prompt_ids.before))
        with timed(profile, "prefill"):
            logits = self.backend.prefill(before, features, after)
        profile.time_to_first_token_ms = (time.perf_counter() - start) * 1000.0
        steps = [] if output_logits else None
        tokens, text, stop = self._decode_loop(logits, prompt_ids, max_new_tokens, sampling, rng, profile, on_token,
                                               steps)
        room = self._room(prompt_ids)
        profile.stop_reason = stop
        # positions still free once the prompt and the answer are in the cache (max_seq_len - P - tokens)
        profile.context_left = None if room is None else max(0, room - 1 - len(tokens))
        profile.wall_ms = (time.perf_counter() - start) * 1000.0
        self._fill_counts(profile, prompt_ids)
        if hasattr(self.backend, "operator_profile"):
            profile.ops = self.backend.operator_profile() or None
        profile.finish()
        return Result(text=text, tokens=tokens, profile=profile, stop_reason=stop, logits=steps)

    def _decode_loop(self, logits, prompt_ids, max_new_tokens, sampling, rng, profile, on_token, steps=None):
        tokens: list[int] = []
        shown = ""
        stop = "max_new_tokens"
        room = self._room(prompt_ids)  # tokens the cache has room for
        while True:
            if steps is not None:
                steps.append(np.asarray(logits, dtype=np.float32).reshape(-1))
            token = choose_token(logits, sampling, rng)
            if token in self.encoder.eos_ids:
                stop = "eos"
                break
            tokens.append(token)
            text = self.encoder.decode(tokens)
            if on_token is not None and len(text) > len(shown):
                on_token(text[len(shown):])
            shown = text
            if len(tokens) >= max_new_tokens:
                break
            if room is not None and len(tokens) >= room:
                stop = "max_seq_len"
                break
            with timed(profile, "decode"):
                logits = self.backend.decode(token)
        return tokens, shown, stop

    def _prompt_length(self, prompt_ids: PromptIds) -> int:
        """Tokens the decoder holds after prefill (image span already pruned for layer 0)."""
        image = self.backend.kept_image_tokens if self.config.get("placement") == "before_llm" else \
            self.backend.num_image_tokens
        return prompt_ids.text_tokens + image

    def _room(self, prompt_ids: PromptIds) -> int | None:
        """Tokens a generation can produce before the cache is full: the prompt fills P of the max_seq_len slots
        and every generated token but the last is decoded into one more, so max_seq_len - P + 1 (None: unbounded)."""
        if self.backend.max_seq_len is None:
            return None
        return self.backend.max_seq_len - self._prompt_length(prompt_ids) + 1

    def _check_length(self, prompt_ids: PromptIds, max_new_tokens: int) -> None:
        room = self._room(prompt_ids)
        if room is not None and room < 1:  # the prompt alone overflows the cache
            raise ValueError(
                f"the prompt needs {self._prompt_length(prompt_ids)} positions but the model was exported with "
                f"max_seq_len={self.backend.max_seq_len}; shorten the prompt or export with a larger --max-seq-len"
            )

    def _fill_counts(self, profile: Profile, prompt_ids: PromptIds) -> None:
        total, kept = self.backend.num_image_tokens, self.backend.kept_image_tokens
        profile.image_tokens_total, profile.image_tokens_kept = total, kept
        profile.prompt_tokens_before_pruning = prompt_ids.text_tokens + total
        profile.prompt_tokens_after_pruning = prompt_ids.text_tokens + kept
        profile.peak_rss_bytes = peak_rss_bytes()
        profile.model_files_bytes = files_size_bytes(self.backend.files) if self.backend.files else None
        profile.kv_cache_bytes = self.backend.kv_cache_bytes()
