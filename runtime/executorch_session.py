"""ExecuTorch backend for runtime.Session: the `.pte`'s methods run step by step (see runtime/executorch_backend.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .executorch_backend import ExecuTorchModel

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class ExecuTorchBackend:
    """Backend protocol (runtime.session.Backend) over an ExecuTorch export folder."""

    kind = "executorch"

    def __init__(self, folder: str | Path, export_config: dict[str, Any], device: str, profile_ops: bool = False):
        self.folder = Path(folder)
        self.model = ExecuTorchModel(folder)
        self.config = export_config
        self.device = device
        self.num_image_tokens = int(export_config["num_image_tokens"])
        self.kept_image_tokens = int(export_config["kept_image_tokens"])
        self.max_seq_len = int(export_config["max_seq_len"])
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        self._etdump_dir = None
        if profile_ops:  # timing-only ETDump: a debug buffer that overflows would abort the process
            from executorch.runtime import Runtime

            # removed with this backend, or at exit (its finalizer), not left in the temporary folder
            self._etdump_folder = tempfile.TemporaryDirectory(prefix="pruner-etdump-", ignore_cleanup_errors=True)
            self._etdump_dir = Path(self._etdump_folder.name)
            program = self.folder / export_config["executorch"]["program"]
            self.model.program = Runtime.get().load_program(program, enable_etdump=True, debug_buffer_size=0)
            self.model._methods = {}
        self.reset()

    @property
    def needs_context_before_image(self) -> bool:
        return self.model.needs_context_before_image

    def reset(self) -> None:
        self._position = 0

    def prefill_context(self, before) -> None:
        """Layer K: the text before the image, into the caches that ``vision_encoder`` reads."""
        self.model.prefill_context(before)

    def image_features(self, pixel_values: np.ndarray, image_start: int) -> torch.Tensor:
        return self.model.encode_image(torch.from_numpy(np.ascontiguousarray(pixel_values)))

    def embed(self, ids: list[int]) -> torch.Tensor | None:
        return self.model.embed(ids) if ids else None

    def prefill(self, before, image, after) -> np.ndarray:
        logits, self._position = self.model.prefill_chunks(before, image, after)
        return logits[0].float().numpy()

    def decode(self, token: int) -> np.ndarray:
        logits = self.model.decode_step(token, self._position)
        self._position += 1
        return logits[0].float().numpy()

    def kv_cache_bytes(self) -> int:
        """The static caches the program allocates: keys and values, every layer's slots."""
        cache = self.config["executorch"]["kv_cache"]
        slots = cache["slots"]
        slots = sum(slots) if isinstance(slots, list) else slots * int(self.config["executorch"]["num_layers"])
        return 2 * int(cache["kv_heads"]) * int(cache["head_dim"]) * slots * DTYPE_BYTES.get(self.config["dtype"], 4)

    def operator_profile(self) -> list:
        if self._etdump_dir is None:
            return []
        from .op_profile import summarise_etdump

        path = self._etdump_dir / "run.etdp"
        self.model.program.write_etdump_result_to_file(str(path), str(self._etdump_dir / "run.debug"))
        return summarise_etdump(path)
