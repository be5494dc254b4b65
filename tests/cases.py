"""Shared test helpers: deterministic inputs for the selection tests (random regimes, real photographs), export
folder copies, and pruner-export run in the background with its own peak memory measured."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GRIDS = ((24, 24), (16, 16), (27, 27), (12, 20))
WIDTHS = (64, 256, 1024, 4096)
REGIMES = ("orthogonal", "moderate", "similar", "clustered", "duplicates", "real")
PATCH = 14


# LLaVA-1.5-7B's config.json as llava-hf ships it, the parts parameter counts and geometry read (no weights)
LLAVA_7B_CONFIG = {
    "model_type": "llava",
    "text_config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "patch_size": 14,
                      "num_attention_heads": 16, "projection_dim": 768,
                      "image_size": 336},
}


@dataclass(frozen=True)
class Case:
    index: int
    grid: tuple[int, int]
    width: int
    regime: str
    batch: int
    budget: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def __str__(self) -> str:
        rows, cols = self.grid
        return f"{self.index}-{rows}x{cols}-D{self.width}-{self.regime}-B{self.batch}-R{self.budget}"


def budget_for(index: int, tokens: int) -> int:
    """Budgets spanning 1..N: the edges, the authors' settings, and random values."""
    fixed = (1, 2, 4, 5, 16, 17, 64, tokens // 9, tokens // 3, tokens // 2, tokens - 1, tokens)
    rng = np.random.default_rng(index)
    if index % 3 == 0:
        return int(rng.integers(1, tokens + 1))
    return max(1, min(tokens, fixed[(index // 3) % len(fixed)]))


def all_cases(count: int = 312) -> list[Case]:
    cases = []
    for i in range(count):
        grid = GRIDS[i % len(GRIDS)]
        tokens = grid[0] * grid[1]
        cases.append(
            Case(
                index=i,
                grid=grid,
                width=WIDTHS[(i // len(GRIDS)) % len(WIDTHS)],
                regime=REGIMES[(i // 2) % len(REGIMES)],
                batch=3 if i % 5 == 0 else 1,
                budget=budget_for(i, tokens),
            )
        )
    return cases


@lru_cache(maxsize=None)
def photo_patches(name: str, rows: int, cols: int) -> torch.Tensor:
    """A scikit-image photograph resized to the grid, cut into 14x14 patches.  -> [N, 14*14*3] float32 in [0, 1]"""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((cols * PATCH, rows * PATCH))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3]
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).permute(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, PATCH * PATCH * 3)


def photo_features(name: str, grid: tuple[int, int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and keys with a real image's spatial structure: random nonlinear projections of its patches."""
    generator = torch.Generator().manual_seed(seed)
    patches = photo_patches(name, *grid)
    centred = patches - patches.mean(0)
    hidden_proj = torch.randn(patches.shape[1], width, generator=generator) / patches.shape[1] ** 0.5
    key_proj = torch.randn(patches.shape[1], width // 2, generator=generator) / patches.shape[1] ** 0.5
    hidden = torch.tanh(centred @ hidden_proj * 4.0) + 0.1 * torch.randn(patches.shape[0], width, generator=generator)
    return hidden, centred @ key_proj


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, N, D], keys [B, N, D/2] for a case's regime."""
    generator = torch.Generator().manual_seed(1000 + case.index)
    batch, tokens, width = case.batch, case.tokens, case.width
    key_width = max(8, width // 2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if case.regime == "real":
        photos = ("astronaut", "chelsea", "coffee")
        pairs = [photo_features(photos[(case.index + b) % 3], case.grid, width, case.index + b) for b in range(batch)]
        return torch.stack([h for h, _ in pairs]), torch.stack([k for _, k in pairs])
    keys = randn(batch, tokens, key_width)
    if case.regime == "orthogonal":
        hidden = randn(batch, tokens, width)
    elif case.regime == "moderate":
        hidden = randn(batch, 1, width) + 0.8 * randn(batch, tokens, width)
    elif case.regime == "similar":  # every pair above tau0: the regime where the authors' code stops short
        hidden = randn(batch, 1, width) + 0.05 * randn(batch, tokens, width)
    elif case.regime == "clustered":
        centres = randn(batch, 6, width)
        member = torch.randint(0, 6, (batch, tokens), generator=generator)
        hidden = centres.gather(1, member.unsqueeze(-1).expand(-1, -1, width)) + 0.2 * randn(batch, tokens, width)
    elif case.regime == "duplicates":  # exact ties in features and keys
        prototypes = randn(batch, 8, width)
        proto_keys = randn(batch, 8, key_width)
        member = torch.randint(0, 8, (batch, tokens), generator=generator)
        hidden = prototypes.gather(1, member.unsqueeze(-1).expand(-1, -1, width))
        keys = proto_keys.gather(1, member.unsqueeze(-1).expand(-1, -1, key_width))
    else:
        raise ValueError(case.regime)
    return hidden, keys


def write_bomb_png(path: Path, width: int = 40000, height: int = 40000) -> Path:
    """A few-byte PNG whose header declares width x height pixels (Pillow's decompression-bomb check fires on open)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def copy_export_without(folder: Path, dest: Path, section: str, key: str) -> Path:
    """A copy of an export folder at ``dest`` whose export_config.json lacks ``[section][key]`` (an older or
    hand-edited export), for tests of how the runtime refuses it."""
    import json
    import shutil

    shutil.copytree(folder, dest)
    config = json.loads((dest / "export_config.json").read_text())
    del config[section][key]
    (dest / "export_config.json").write_text(json.dumps(config))
    return dest


REPO = Path(__file__).resolve().parents[1]


@dataclass
class BackgroundExport:
    """A `python -m export.cli` child (runtime.memory.peak_measuring_command) running while other tests work;
    calling it waits for it -> its folder (a ``.pte`` export), and records its peak RSS in bytes (VmHWM: the child's
    own; os.wait4's ru_maxrss would include this test process's peak, which Linux carries over fork + exec)."""

    process: subprocess.Popen
    out: Path
    log_path: Path
    report: Path
    peak_rss: int | None = None

    @classmethod
    def start(cls, argv: list, out: Path) -> "BackgroundExport":
        """Start ``pruner-export argv --out out`` with one intra-op thread (like the test process, tests/conftest.py);
        its output goes to a log file beside ``out`` (a full pipe would stall it)."""
        from runtime.memory import peak_measuring_command

        report, log_path = out.parent / "peak-rss", out.parent / "pruner-export.log"
        command = peak_measuring_command("export.cli", [*argv, "--out", out], report)
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                       stderr=subprocess.STDOUT)
        return cls(process, out, log_path, report)

    def __call__(self) -> Path:
        import pytest

        from runtime.memory import read_peak_report

        try:
            self.process.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            pytest.fail("pruner-export ran for more than 30 minutes")
        log = self.log_path.read_text()
        assert self.process.returncode == 0, f"pruner-export failed ({self.process.returncode}):\n{log[-4000:]}"
        assert (self.out / "model.pte").is_file() and (self.out / "export_config.json").is_file(), log[-4000:]
        self.peak_rss = read_peak_report(self.report)
        return self.out

    def stop(self) -> None:
        """Kill the child if it is still running (fixture teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
