"""Export the token selection alone (for tests and benchmarks): torch.export, ONNX, ExecuTorch `.pte`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pruner_core import PrunerConfig, get_method
from pruner_core.methods import Grid, Signals
from pruner_core.viz_render import atomic_write

SIGNAL_ORDER = ("hidden", "keys", "text_attention", "cls_attention")


class SelectionModule(torch.nn.Module):
    """forward(*signals the method needs, in SIGNAL_ORDER) -> (indices [B, R], states [B, R, D], order [B, R])."""

    def __init__(self, config: PrunerConfig, grid: tuple[int, int]):
        super().__init__()
        self.config = config
        self.method = get_method(config.method)
        self.grid = Grid(*grid)
        self.budget = config.budget(self.grid.size)
        self.inputs = tuple(name for name in SIGNAL_ORDER if name in self.method.needs or name == "hidden")

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        signals = Signals(**dict(zip(self.inputs, tensors)))
        return self.method.select(signals, self.grid, self.budget, self.config)


def example_signals(module: SelectionModule, batch: int, width: int, key_width: int) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right static shapes, in the module's input order."""
    generator = torch.Generator().manual_seed(0)
    n = module.grid.size
    shapes = {"hidden": (batch, n, width), "keys": (batch, n, key_width), "text_attention": (batch, n),
              "cls_attention": (batch, n)}
    return tuple(torch.rand(shapes[name], generator=generator) for name in module.inputs)


def export_program(module: SelectionModule, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    # strict=False: transformers-era hooks and the scan body trace cleanly only in non-strict mode
    return torch.export.export(module, example, strict=False)


def export_selection_pte(
    module: SelectionModule, example: tuple[torch.Tensor, ...], path: str | Path, backend: str = "xnnpack"
) -> Path:
    """Lower to ExecuTorch and write a `.pte` (atomically)."""
    from executorch.exir import to_edge_transform_and_lower

    partitioners = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners.append(XnnpackPartitioner())
    elif backend != "portable":
        raise ValueError(f"backend {backend!r} is not supported for the selection module; use xnnpack or portable")
    program = to_edge_transform_and_lower(export_program(module, example), partitioner=partitioners).to_executorch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(program.buffer))
    return path


def export_selection_onnx(module: SelectionModule, example: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """Export with the dynamo ONNX exporter (scan becomes an ONNX Scan) and write atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        onnx_program = torch.onnx.export(
            module, example, dynamo=True, input_names=list(module.inputs),
            output_names=["indices", "states", "order"], external_data=False, verbose=False,
        )
        onnx_program.save(str(tmp_path))
        os.replace(tmp_path, path)
    return path
