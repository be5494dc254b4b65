"""Eager PyTorch backend: the reference every exported backend is compared with.

Runs the stock transformers modules of a checkpoint (LLaVA-1.5, Qwen2-VL / Qwen2.5-VL) through its adapter's pruned
prefill and the shared decode steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pruner_core import PrunerConfig
from pruner_core.primitives import placement_lattice
from pruner_core.adapters import KVRecorder, adapter_for, decode_step
from pruner_core.methods import get_method


class EagerBackend:
    """Backend protocol (runtime.session.Backend) over a model its adapter loaded."""

    kind = "pytorch"

    def __init__(self, model_dir: str | Path, config: PrunerConfig, device: str = "cpu", *,
                 dtype: torch.dtype = torch.float32, image_size: tuple[int, int] | None = None):
        """dtype: weights and activations (an export's reference runs in the export's dtype); image_size (H, W):
        the resolution the model takes images at (None: the family's default; Qwen2-VL takes multiples of 28)."""
        if device not in ("cpu", "auto"):
            raise ValueError(f"the eager PyTorch backend runs on the CPU here; got device={device!r}")
        self.device = "cpu"
        self.adapter = adapter_for(model_dir)
        self.model, self.processor = self.adapter.load(model_dir, dtype, image_size=image_size)
        self.language_model = self.adapter.language_model(self.model)
        self.config = config
        geometry = self.adapter.geometry(self.model)
        self.grid, self.position_scheme = geometry.grid, geometry.position_scheme
        placement_lattice(*self.grid, geometry.merge, config.authors_grid)  # authors_grid off Qwen2-VL: fail now
        self.num_image_tokens = self.grid[0] * self.grid[1]
        self.kept_image_tokens = config.budget(self.num_image_tokens)
        self.max_seq_len = None
        self.files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
        self._needs_cls = "cls_attention" in get_method(config.method).needs
        self.reset()

    def reset(self) -> None:
        self._cache: KVRecorder | None = None
        self._split = 0
        self._next_position = 0
        self._cls_attention: torch.Tensor | None = None

    @torch.no_grad()
    def image_features(self, pixel_values: np.ndarray, image_start: int = 0) -> torch.Tensor:
        """The preprocessed image (LLaVA [1, 3, H, W]; Qwen2-VL [P, 1176]) -> image tokens [1, N, D] (pruning
        happens in prefill for both placements)."""
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.model.dtype)
        if self._needs_cls:
            self._cls_attention = self.adapter.cls_attention(self.model, pixels)
        return self.adapter.encode_image(self.model, pixels)

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))

    @torch.no_grad()
    def prefill(self, before: torch.Tensor, image: torch.Tensor, after: torch.Tensor) -> np.ndarray:
        embeds = torch.cat([before, image.to(before.dtype), after], dim=1)  # [1, T, D]
        positions = self.adapter.prompt_positions(before.shape[1], self.grid, after.shape[1])  # [1, T] or [3, 1, T]
        out = self.adapter.prefill_with_pruning(self.model, embeds, before.shape[1], self.num_image_tokens, self.grid,
                                                self.config, cls_attention=self._cls_attention, position_ids=positions)
        cache = KVRecorder(len(out.keys))
        cache.keys, cache.values = list(out.keys), list(out.values)
        self._cache, self._split = cache, out.split_layer
        self._next_position = int(out.next_position[0])
        return out.logits[0].float().numpy()

    @torch.no_grad()
    def decode(self, token: int) -> np.ndarray:
        embeds = self.embed([token])
        positions = torch.tensor([[self._next_position]], dtype=torch.long)  # [1, 1]
        if self.position_scheme == "mrope":
            positions = positions.expand(3, 1, 1)  # text: t = h = w
        hidden = decode_step(self.language_model, embeds, positions, self._cache, self._split)
        self._next_position += 1
        return self.adapter.lm_head(self.model)(hidden[:, -1])[0].float().numpy()

    def kv_cache_bytes(self) -> int:
        if self._cache is None:
            return 0
        tensors = [t for t in self._cache.keys + self._cache.values if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
