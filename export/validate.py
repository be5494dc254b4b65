"""pruner-export's self-check: run what an export wrote, once, on a bundled photograph, against the eager pruned model.

As optimum's exporters validate an ONNX export against the PyTorch model (optimum/exporters/onnx/convert.py,
``validate_model_outputs``: reference outputs, then ``atol``), the written folder is loaded with ``runtime.load``
(whatever its target) and the eager reference with ``runtime.loader.load_eager`` at the same pruning settings,
dtype and image size; both generate ``tokens`` greedy tokens for one fixed prompt, and the per-step next-token
logits are compared the way tests/test_export_onnx.py and tests/test_export_executorch.py compare them (max absolute
difference over the steps both runs reached with the same tokens, and greedy tokens identical).

Tolerances (``tolerance_for``) were measured on the tiny random-weight models (export/README.md, "Validation").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

VALIDATION_IMAGE = "astronaut"  # scikit-image's bundled photograph (runtime/cli.py resolve_image)
VALIDATION_PROMPT = "What is in the picture?"
VALIDATION_TOKENS = 8


@dataclass(frozen=True)
class Tolerance:
    """What an export must meet against the eager reference.

    max_logit_diff: the largest |export - eager| of any next-token logit (float32 logits, absolute units) over the
    steps compared, or None (not bounded: quantized exports, whose error grows with the logits' scale).
    tokens_must_agree: every greedy token identical (float exports); quantized ones only report them (quantization
    moves near-tied logits, and a random-weight model's are all near-tied). min_logit_correlation: the smallest
    Pearson correlation of the export's and eager's next-token logits [V] allowed at any step compared, or None.
    """

    max_logit_diff: float | None
    tokens_must_agree: bool = True
    why: str = ""
    min_logit_correlation: float | None = None

    def __post_init__(self) -> None:
        if self.max_logit_diff is not None and not (isinstance(self.max_logit_diff, float)
                                                    and self.max_logit_diff >= 0.0):
            raise ValueError(f"max_logit_diff must be a float >= 0 or None, got {self.max_logit_diff!r}")
        if self.min_logit_correlation is not None and not -1.0 <= self.min_logit_correlation <= 1.0:
            raise ValueError(f"min_logit_correlation must lie in [-1, 1] or be None, got {self.min_logit_correlation!r}")

    def describe(self) -> str:
        parts = []
        if self.max_logit_diff is not None:
            parts.append(f"max |logit diff| <= {self.max_logit_diff:g}")
        if self.min_logit_correlation is not None:
            parts.append(f"logit correlation >= {self.min_logit_correlation:g} at every step")
        parts.append("greedy tokens identical" if self.tokens_must_agree else "greedy tokens reported, not required")
        return ", ".join(parts)


# Measured on tiny-llava, tiny-llava-gqa, tiny-qwen2-vl, tiny-qwen2.5-vl (export/README.md "Validation"); the
# reference runs in the export's own dtype.
FLOAT_TOLERANCES = {
    "fp32": Tolerance(1e-3, why="fp32: kernels differ in summation order only"),
    "fp16": Tolerance(0.25, why="fp16: half-precision rounding differs between runtimes"),
    "bf16": Tolerance(0.5, why="bf16: 8-bit mantissa rounding differs between runtimes"),
}
# Quantization error scales with the logits: an absolute bound measured on the tiny models (|logits| < 1) failed an
# 8da4w export at LLaVA-1.5-7B widths (max |diff| 2.16 at |logits| up to 4.7) whose logits still correlate at 0.88.
# The correlation is scale-free: quantization noise measured 0.88-0.9998 (export/README.md), unrelated logits ~0.
QUANTIZED_TOLERANCE = Tolerance(None, tokens_must_agree=False, min_logit_correlation=0.5,
                                why="quantized weights or activations against the unquantized eager model")


def tolerances_text() -> str:
    """The bounds in one phrase, for `pruner-export --help`."""
    floats = ", ".join(f"{dtype} {tol.max_logit_diff:g}" for dtype, tol in FLOAT_TOLERANCES.items())
    return (f"max |logit diff| {floats} with identical greedy tokens; quantized: logit correlation >= "
            f"{QUANTIZED_TOLERANCE.min_logit_correlation:g} at every step, tokens only reported")


def tolerance_for(dtype: str, quantize: str = "none", quantize_vision: str = "none") -> Tolerance:
    """The Tolerance an export with these options must meet (dtype fp32 | fp16 | bf16; quantize none | int8 | int4 |
    8da4w; quantize_vision none | int8). ValueError for an unknown dtype."""
    if dtype not in FLOAT_TOLERANCES:
        raise ValueError(f"no validation tolerance for dtype {dtype!r}; one of {sorted(FLOAT_TOLERANCES)}")
    if quantize != "none" or quantize_vision != "none":
        return QUANTIZED_TOLERANCE
    return FLOAT_TOLERANCES[dtype]


@dataclass(frozen=True)
class Validation:
    """The figures of one check: what ``export_config.json["validation"]`` and the model card record."""

    passed: bool
    max_logit_diff: float  # over the steps compared
    min_logit_correlation: float  # Pearson r of the next-token logits, the smallest over the steps compared
    steps_compared: int  # steps both runs reached with identical tokens so far (>= 1: the prompt's)
    tokens_agree: bool  # every greedy token identical
    first_token_rank: int  # rank of the export's first token among eager's logits (0 = eager's own choice)
    export_tokens: list[int]
    eager_tokens: list[int]
    tolerance: dict[str, Any]
    reference: str  # what the export was compared against
    image: str = VALIDATION_IMAGE
    prompt: str = VALIDATION_PROMPT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: figures against the tolerance."""
        agree = "agree" if self.tokens_agree else (
            f"differ (first token is eager's #{self.first_token_rank + 1})")
        verdict = "passed" if self.passed else "FAILED"
        return (f"validation {verdict}: max |logit diff| {self.max_logit_diff:.3g}, logit correlation >= "
                f"{self.min_logit_correlation:.4f} over {self.steps_compared} "
                f"step(s), {len(self.export_tokens)} greedy tokens {agree} ({self.reference}; tolerance: "
                f"{Tolerance(**self.tolerance).describe()})")


def compare(export_logits: list[np.ndarray], export_tokens: list[int], eager_logits: list[np.ndarray],
            eager_tokens: list[int]) -> tuple[float, float, int, bool, int]:
    """Per-step next-token logits (float32 [V] each) and greedy tokens of two runs of one prompt -> (max |diff| over
    the steps both reached with the same tokens, the smallest Pearson correlation of the two logit vectors over those
    steps (NaN where one is constant), those steps, tokens identical, rank of the export's first token among eager's
    first-step logits). The steps after the first differing token saw different inputs: not compared.
    """
    steps = 1
    while steps < min(len(export_logits), len(eager_logits)) and \
            export_tokens[steps - 1: steps] == eager_tokens[steps - 1: steps]:
        steps += 1
    pairs = [(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(export_logits[:steps], eager_logits[:steps])]
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    correlation = min(_correlation(a, b) for a, b in pairs)
    first = int(np.argmax(export_logits[0]))
    rank = int((eager_logits[0] > eager_logits[0][first]).sum())
    return diff, correlation, steps, export_tokens == eager_tokens, rank


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two [V] vectors (numpy's corrcoef); NaN when either is constant (or holds NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.corrcoef(a, b)[0, 1])


def judge(diff: float, tokens_agree: bool, tolerance: Tolerance, correlation: float = 1.0) -> bool:
    """Whether the figures meet the tolerance (NaN never does)."""
    within = tolerance.max_logit_diff is None or bool(diff <= tolerance.max_logit_diff)
    correlated = tolerance.min_logit_correlation is None or bool(correlation >= tolerance.min_logit_correlation)
    finite = not (np.isnan(diff) or np.isnan(correlation))
    return finite and within and correlated and (tokens_agree or not tolerance.tokens_must_agree)


def validate_export(folder: str | Path, model_dir: str | Path, pruner, *, dtype: str = "fp32",
                    image_size: tuple[int, int] | None = None, tolerance: Tolerance,
                    tokens: int = VALIDATION_TOKENS) -> Validation:
    """Run the export in ``folder`` (``runtime.load``) and the eager pruned model (``pruner``: a PrunerConfig, at
    ``dtype`` fp32 | fp16 | bf16 and ``image_size``) on VALIDATION_IMAGE / VALIDATION_PROMPT for ``tokens`` greedy
    tokens -> the figures, ``passed`` set against ``tolerance``. Raises what runtime.load raises for a folder it
    cannot load."""
    import torch

    from runtime import load
    from runtime.cli import resolve_image
    from runtime.loader import load_eager

    image = resolve_image(VALIDATION_IMAGE)  # HxWx3 uint8
    session = load(folder)
    exported = session.generate(image, VALIDATION_PROMPT, max_new_tokens=tokens, output_logits=True)
    del session  # one model in memory at a time (a 7B export and its eager reference would not fit together)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    eager = load_eager(model_dir, pruner, dtype=torch_dtype, image_size=image_size)
    # as many tokens as the export gave: a small --max-seq-len may end it early (cache full), which is no fault
    reference = eager.generate(image, VALIDATION_PROMPT, max_new_tokens=max(1, len(exported.tokens)),
                               output_logits=True)
    diff, correlation, steps, agree, rank = compare(exported.logits, exported.tokens, reference.logits,
                                                    reference.tokens)
    return Validation(
        passed=judge(diff, agree, tolerance, correlation), max_logit_diff=diff, min_logit_correlation=correlation,
        steps_compared=steps, tokens_agree=agree,
        first_token_rank=rank, export_tokens=exported.tokens, eager_tokens=reference.tokens,
        tolerance=asdict(tolerance), reference=f"eager pruned PyTorch, {dtype}, unquantized",
    )


def failure_message(validation: Validation) -> str:
    """Why the export was refused: the figures, the tolerance, and the ways out."""
    return (f"{validation.summary()}. The export does not reproduce the eager pruned model on the bundled "
            f"{validation.image!r} photograph (export tokens {validation.export_tokens}, eager "
            f"{validation.eager_tokens}); nothing was written. Try another --dtype / --quantize / --backend, or pass "
            "--no-validate to keep it unchecked")
