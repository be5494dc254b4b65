"""Input checks shared by every selection method: clear ValueErrors that name the argument and the fix."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tracing() -> bool:
    # Value checks (NaN/inf) branch on data; under torch.export / dynamo they are skipped, shapes still checked.
    return torch.compiler.is_compiling()


def check_grid(grid: object, num_tokens: int) -> tuple[int, int]:
    """grid = (rows, cols) with rows * cols == N."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise ValueError(f"grid must be a (rows, cols) pair of ints, got {grid!r}")
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid={tuple(grid)}: rows and cols must be >= 1")
    if rows * cols != num_tokens:
        raise ValueError(
            f"grid={tuple(grid)} holds {rows * cols} tokens but the inputs have N={num_tokens} image tokens; "
            "pass the image-token grid (rows, cols) with rows * cols == N"
        )
    return rows, cols


def check_float_tensor(name: str, value: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {value.dtype}; "
            f"convert it with {name}.float()"
        )
    if any(s == 0 for s in value.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(value.shape)}")
    if not _tracing() and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{name} contains NaN or inf values; pruning on them would be a silent arbitrary pick. "
            "Check the model's dtype (fp16 overflow) and inputs"
        )
    return value


def check_inputs(
    hidden: object,
    keys: object | None,
    grid: object,
    *,
    text_attention: object | None = None,
    cls_attention: object | None = None,
    needs: frozenset[str] = frozenset({"hidden", "keys"}),
    method: str = "vlm_pruner",
) -> tuple[int, int]:
    """Validate the signals a method needs; returns (rows, cols)."""
    hidden = check_float_tensor("hidden", hidden, 3, "[B, N, D]")
    batch, num_tokens, _ = hidden.shape
    signals = {"keys": keys, "text_attention": text_attention, "cls_attention": cls_attention}
    for name in sorted(needs - {"hidden"}):
        if signals.get(name) is None:
            raise ValueError(
                f"method {method!r} needs {name!r} (signals it uses: {sorted(needs)}); pass {name}=... "
                "or choose a method whose signals you have"
            )
    if keys is not None:
        keys = check_float_tensor("keys", keys, 3, "[B, N, Dk]")
        if keys.shape[:2] != (batch, num_tokens):
            raise ValueError(
                f"keys has shape {tuple(keys.shape)} but hidden has B={batch}, N={num_tokens}; "
                "keys must be [B, N, Dk] for the same image tokens"
            )
    for name, value in (("text_attention", text_attention), ("cls_attention", cls_attention)):
        if value is not None:
            value = check_float_tensor(name, value, 2, "[B, N]")
            if tuple(value.shape) != (batch, num_tokens):
                raise ValueError(f"{name} must have shape [B, N] = [{batch}, {num_tokens}], got {tuple(value.shape)}")
    return check_grid(grid, num_tokens)
