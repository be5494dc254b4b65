"""Export memory: keep the exporter's resident set near one copy of the output's weights.

A 7B checkpoint in fp16 is 13.5 GiB; a naive export holds it three times (the loaded weights, the backend's
serialised copy, the program built in memory before it is written). What keeps it near one copy:

* the checkpoint is loaded in its own dtype, so transformers maps the safetensors files instead of copying them
  (file-backed pages, not anonymous memory);
* ``CheckpointPages`` hands those pages back to the kernel while the export runs (``madvise(MADV_PAGEOUT)`` on the
  mappings of the checkpoint's files, every fraction of a second): a weight the backend has copied is not kept
  resident twice. Pages are re-read from the file if touched again; nothing is lost (clean file pages only: a page
  written to is anonymous and PAGEOUT leaves it alone without swap);
* ``return_freed_memory_promptly`` makes glibc give large freed blocks back at once (a fixed mmap threshold), so the
  backend's transient per-weight copies do not stay in the heap;
* the program is lowered one method at a time and written to the file piece by piece (export/executorch_backends.py).

Linux-only mechanisms; elsewhere they do nothing and the export just needs more memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages of the range (clean file pages are dropped)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks from 1 MiB up are mmap'd, so freeing them returns them at once


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def return_freed_memory_promptly() -> bool:
    """glibc: serve blocks >= 1 MiB with mmap at a fixed threshold (no dynamic raise), so a freed weight-sized
    buffer goes back to the kernel instead of staying in the heap. Returns whether it took effect (glibc only)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


GEN0_THRESHOLD = 7000  # allocations between young collections while exporting (CPython's default: 700)


@contextmanager
def fewer_collections(gen0_threshold: int = GEN0_THRESHOLD) -> Iterator[None]:
    """Run the body with Python's cyclic garbage collector doing less needless work, then restore its settings.

    Lowering allocates millions of short-lived graph objects (fx nodes, their metadata, fake tensors), and with
    CPython's defaults the collector runs thousands of times; the full collections among them scan every tracked
    object, the imported world (torch, transformers, ExecuTorch) included: 4.6 s of the tiny demo's 35 s export in
    17 full collections, measured with ``gc.callbacks``. Inside, the objects alive on entry are frozen out of the
    scans (``gc.freeze``; call this before loading a model: a frozen object in a reference cycle is collected only
    after the exit) and young collections run every ``gen0_threshold`` allocations instead of 700, so fewer of them
    cascade into full ones: 7 full collections, 1.4 s (2.5-3.3 s on a loaded machine) of
    collection in the same export. Garbage is collected as before, a few thousand allocations later (a decoder
    layer's lowering allocates ~10^5), so memory is let go at the same points of the export. On exit the frozen
    objects rejoin the collector (``gc.unfreeze``) and the thresholds are restored, exceptions or not. When objects
    are frozen already on entry (the caller's own ``gc.freeze``, or a ``fewer_collections`` around this one), the
    frozen set is left as it is: unfreezing on exit would hand the caller's frozen objects back to the collector.
    pruner-export runs each export and its validation inside; benchmarks/export_time.py measures it against the
    defaults."""
    thresholds = gc.get_threshold()
    freezes = gc.get_freeze_count() == 0
    if freezes:
        gc.collect()  # nothing collectable is frozen
        gc.freeze()
    gc.set_threshold(gen0_threshold, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if freezes:
            gc.unfreeze()


def mapped_ranges(files: Iterable[Path], maps: str | None = None) -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's mappings of ``files`` (absolute, resolved paths), from
    /proc/self/maps."""
    wanted = {str(f) for f in files}
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in wanted:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class CheckpointPages:
    """While active, the resident pages of ``files``' mappings are handed back to the kernel every ``interval``
    seconds (and once on exit). Use around loading, quantizing, tracing and lowering a mapped checkpoint."""

    def __init__(self, files: Iterable[str | Path], interval: float = 0.25) -> None:
        self.files = [Path(f).resolve() for f in files]
        self.interval = interval
        self._libc = _libc()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released_calls = 0

    def release(self) -> None:
        """One pass: MADV_PAGEOUT over every current mapping of the files."""
        if self._libc is None:
            return
        for start, end in mapped_ranges(self.files):
            self._libc.madvise(start, end - start, MADV_PAGEOUT)
        self.released_calls += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.release()

    def __enter__(self) -> "CheckpointPages":
        if self._libc is not None and self.files:
            self._thread = threading.Thread(target=self._run, name="checkpoint-pages", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()


def release_tracing_caches() -> None:
    """Drop the process-wide references that keep a lowered program, and so every weight, alive after it is
    written: ExecuTorch's ``exir.backend.utils.is_same_node`` (an unbounded ``lru_cache`` keyed by graph nodes,
    which hold their graphs, the lowered delegate modules and their programs' state dicts), the XNNPACK partitioner
    configs' module-level ``WhyNoPartition`` reporters (each keeps the last node it rejected), torch's fake-tensor
    dispatch cache (``FakeTensorMode.cache_clear``: its keys hold cached ops' arguments, delegate modules among
    them) and the ``lru_cache``s on ``ShapeEnv``'s methods (keyed by the ShapeEnv, whose own fake-tensor cache holds
    the same keys). Measured: a Qwen2.5-VL-3B-width export still held all 3.6 GiB of its weights after writing the
    ``.pte``, under the validation that runs next. Then the fake-tensor caches of every ShapeEnv still alive (some
    outlive the export and keep its traced programs' weights: a full-depth LLaVA-7B 8da4w export was killed for
    memory in the validation after it) are cleared, and a full collection runs (the lowered programs sit in reference
    cycles, which Python's collector, counting objects rather than bytes, may not reach before the caller allocates
    again). A 4-layer 7B-width 8da4w export: 3.5 GiB resident after writing, 2.2 GiB after a collection alone, 1.0
    GiB after this. Call once a program is written; the next export fills them again."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    FakeTensorMode.cache_clear()
    for method in vars(ShapeEnv).values():
        if callable(getattr(method, "cache_clear", None)):
            method.cache_clear()
    for obj in gc.get_objects():
        cache = getattr(obj, "fake_tensor_cache", None) if issubclass(type(obj), ShapeEnv) else None  # type(): some
        if cache is not None:  # objects warn when their __class__ is read (isinstance)
            cache.clear()
    backend_utils = sys.modules.get("executorch.exir.backend.utils")  # only where an ExecuTorch export ran
    if backend_utils is not None:
        backend_utils.is_same_node.cache_clear()
        for name, module in list(sys.modules.items()):
            reporter = getattr(module, "why", None) if name.startswith("executorch.") else None
            if isinstance(reporter, backend_utils.WhyNoPartition):
                reporter.node = None  # a diagnostic's last subject (logged at debug level when it was set)
    gc.collect()


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files transformers maps when it loads ``model_dir`` (safetensors shards)."""
    return sorted(Path(model_dir).glob("*.safetensors"))


# ================================================================================================================
# The memory model pruner-export prints and refuses on
# ================================================================================================================

GIB = 1 << 30
# Fitted to measured peaks (tests/test_export_executorch.py's CLI export, benchmarks/full_size.py; README "Export
# memory"): the exporter's own footprint (Python, torch, transformers, executorch / the ONNX exporter), and what
# each decoder layer's graph adds to it. Measured in one process (the tests' CLI exports run with --jobs 1). A
# small model's export traces and lowers in two processes by default (export/parallel_lowering.py): its memory is
# then the two processes' summed PSS, peak 0.73 GiB vs 0.58 GiB in one for tiny-llava-gqa 8da4w (estimate 0.67 GiB).
BASE_BYTES = {"executorch": int(0.55 * GIB), "onnx": int(0.5 * GIB)}
GRAPH_BYTES_PER_LAYER = {"executorch": int(0.03 * GIB), "onnx": int(0.01 * GIB)}
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2}
INT4_BYTES_PER_PARAM = 0.5 + 2 / 32  # 4-bit weights + one 16-bit scale per group (8da4w groups <= 128, q4: 32)
# ExecuTorch 8da4w: torchao holds the decoder's 4-bit weights int8-unpacked (1 byte per parameter, a 16-bit scale and
# an 8-bit zero point per group of 128) until their lowering slice is lowered; XNNPACK's packed copy (the output)
# then replaces them (export/lowering.py LoweringMemory). At the start of lowering the whole decoder is held so: the
# output plus the excess of the unpacked form over the packed one.
UNPACKED_INT4_BYTES_PER_PARAM = 1 + 3 / 128


# Validation (export/validate.py, on by default) runs the written files, then the eager reference, one at a time in
# the exporter's process. Running them: the peak RSS of `pruner-run` per byte of the files' weights, measured by the
# benchmarks (README): an XNNPACK .pte 3.1x (the mapped program plus XNNPACK's packed copy of the weights; LLaVA-1.5-7B
# widths fp32 13.9 GB for 4.51 GB, 8da4w at full depth 12.6 GiB for 4.0; Qwen2.5-VL-3B widths 12.1 GB for 3.91),
# onnxruntime 1.7x (Qwen2.5-VL-3B widths 6.2-6.6 GB for 3.94 GB).
RUN_BYTES_PER_FILE_BYTE = {"executorch": 3.1, "onnx": 1.7}


@dataclass(frozen=True)
class MemoryEstimate:
    """What an export holds at its peak, in bytes, by part."""

    base: int  # the exporter itself and its graphs
    output: int  # the weights as written: the backend's serialised copy (ExecuTorch), the graphs' (ONNX)
    held: int  # weights held in anonymous memory besides: a dtype conversion, quantized tensors
    working: int  # transient copies: one lowering slice, the largest tensor's copies

    @property
    def peak(self) -> int:
        return self.base + self.output + self.held + self.working

    def describe(self) -> str:
        return (f"~{self.peak / GIB:.1f} GiB at peak ({self.output / GIB:.1f} GiB output weights, "
                f"{self.held / GIB:.1f} GiB held, {self.working / GIB:.1f} GiB working, "
                f"{self.base / GIB:.1f} GiB exporter)")


def estimate_export_memory(counts: Any, options: Any, stored_dtype: str) -> MemoryEstimate:
    """The peak resident memory of one export, from the checkpoint's parameter counts (``ParameterCounts``: vision,
    decoder layers, embedding, LM head), the options (target, dtype, quantization, placement, lowering slice) and
    the dtype the checkpoint is stored in. A measured model: see the constants above."""
    width = BYTES_PER_PARAM[options.dtype]
    decoder_width = INT4_BYTES_PER_PARAM if options.quantize in ("8da4w", "int4") else width
    vision_width = 1 + 4 / 1024 if options.quantize_vision == "int8" else width
    output = int(counts.vision * vision_width + counts.embedding * width + counts.decoder * decoder_width)
    held = 0
    if options.dtype != stored_dtype:  # a converted copy of every weight, in anonymous memory
        held += counts.total * width
    if options.target == "executorch":  # quantized tensors give way to the backend's copy slice by slice
        if options.quantize == "8da4w":
            held += int(counts.decoder * (UNPACKED_INT4_BYTES_PER_PARAM - INT4_BYTES_PER_PARAM))
    elif options.quantize == "int4":
        held += output - counts.embedding * width  # the quantized tensors themselves, alive until exported
    largest = max(counts.embedding, counts.lm_head, counts.decoder_layer // 3) * width
    layers = counts.decoder_layers
    if options.target == "executorch":
        slice_bytes = min(options.lowering_slice_bytes, counts.decoder_layer * width * layers)
        shared = 2 if options.pruner.layer > 0 else 1  # prefill and decode: a slice's duplicate until merged
        working = slice_bytes * shared + 3 * largest
    else:
        working = 2 * largest  # one decoder graph at either placement (layer K prunes inside it)
    base = BASE_BYTES[options.target] + GRAPH_BYTES_PER_LAYER[options.target] * layers
    return MemoryEstimate(base=base, output=output, held=held, working=working)


def estimate_validation_memory(counts: Any, options: Any, stored_dtype: str) -> int:
    """The peak resident bytes of the validation after an export (same arguments as ``estimate_export_memory``):
    the exporter, plus the larger of running the written files (``RUN_BYTES_PER_FILE_BYTE`` times their weights) and
    the eager reference in the export's dtype (every weight, a converted copy when the checkpoint is stored in
    another dtype). A measured model (see the constants). ONNX: plus the exported weights once more, which the
    exporter does not let go of (torch's non-strict tracer and onnxscript's rewrite rules keep the last graphs they
    saw: 71 % of a tiny model's weights measured still alive after export_onnx; ExecuTorch's are freed,
    ``release_tracing_caches``)."""
    export = estimate_export_memory(counts, options, stored_dtype)
    run = int(RUN_BYTES_PER_FILE_BYTE[options.target] * export.output)
    eager = counts.total * BYTES_PER_PARAM[options.dtype]
    still_held = export.output if options.target == "onnx" else 0
    return export.base + still_held + max(run, eager)
