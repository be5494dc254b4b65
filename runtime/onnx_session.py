"""ONNX Runtime backend for runtime.Session: the exported graphs run step by step (see runtime/onnx_backend.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .devices import OnnxProviders
from .onnx_backend import KVCache, OnnxModel


class OnnxBackend:
    """Backend protocol (runtime.session.Backend) over an ONNX export folder."""

    kind = "onnxruntime"

    def __init__(
        self, folder: str | Path, export_config: dict[str, Any], providers: OnnxProviders | None,
        profile_ops: bool = False, *, engine: Any = None,
    ):
        """providers: onnxruntime's choice; or engine: another engine's graph opener with ``device`` and ``kind``
        attributes (runtime/openvino_backend.py)."""
        self._profile_dir = None
        if profile_ops and not engine:  # removed with this backend, or at exit (its finalizer), not left behind
            self._profile_folder = tempfile.TemporaryDirectory(prefix="pruner-ort-profile-", ignore_cleanup_errors=True)
            self._profile_dir = self._profile_folder.name
        if engine is not None:
            self.model = OnnxModel(folder, config=export_config, open_graph=engine)
            self.device, self.kind = engine.device, engine.kind
        else:
            self.model = OnnxModel(folder, providers=list(providers.providers), config=export_config,
                                   provider_options=list(providers.provider_options), profile_dir=self._profile_dir)
            self.device = providers.device
        self.num_image_tokens = int(export_config["num_image_tokens"])
        self.kept_image_tokens = int(export_config["kept_image_tokens"])
        self.max_seq_len = int(export_config["max_seq_len"])
        self.files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        self.reset()

    def reset(self) -> None:
        self._cache: KVCache | None = None
        self._position = 0
        self._kept: np.ndarray | None = None

    def image_features(self, pixel_values: np.ndarray, image_start: int) -> np.ndarray:
        features, kept = self.model.encode_image(pixel_values, image_start)
        self._kept = None if kept is None else kept[0]  # layer 0: where the kept tokens sit (M-RoPE positions)
        return features  # [1, R (layer 0) or N, D]

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.model.embed(np.asarray([ids], dtype=np.int64))  # [1, T, D]

    def prefill(self, before: np.ndarray, image: np.ndarray, after: np.ndarray) -> np.ndarray:
        embeds = np.concatenate([before, image.astype(before.dtype), after], axis=1)  # [1, T, D]
        prefill = self.model.prefill_embeds(embeds, before.shape[1], self._kept)
        self._cache, self._position = prefill.cache, prefill.next_position  # decoding goes on after the full prompt
        return prefill.logits

    def decode(self, token: int) -> np.ndarray:
        logits, self._cache = self.model.decode(token, self._cache, self._position)
        self._position += 1
        return logits

    def kv_cache_bytes(self) -> int:
        if self._cache is None:
            return 0
        return int(sum(a.nbytes for a in self._cache.keys + self._cache.values))

    def operator_profile(self) -> list:
        """Top operators since load (onnxruntime profiler); empty unless loaded with profile_ops=True."""
        if self._profile_dir is None:
            return []
        from .op_profile import summarise_onnx_traces

        traces = [session.end_profiling() for session in self.model.sessions.values()]
        return summarise_onnx_traces(traces)
