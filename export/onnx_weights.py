"""Which tensors an exported ONNX folder stores, and where: the check that no weight is stored twice.

An ONNX graph keeps its weights as initializers (in the ``.onnx`` file or in its external data file) and, more
rarely, as ``Constant`` nodes; ``If`` / ``Scan`` / ``Loop`` bodies can hold their own. ``stored_tensors`` lists all of
them, for every graph file of a folder, once per storage place (two graphs pointing at the same bytes of one
external data file store them once); ``duplicated`` groups equal contents. Reading needs ``onnx`` only.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .onnx_compat import constant_tensors


@dataclass(frozen=True)
class StoredTensor:
    """One stored tensor. file: the graph file (relative to the folder); name: the initializer's or Constant
    node's output name; nbytes: its stored size in bytes; sha256: hex digest of its raw little-endian bytes with
    its dtype and shape (equal tensors, equal digests); storage: where the bytes lie ("inline" or
    "<data file>@<offset>")."""

    file: str
    name: str
    nbytes: int
    sha256: str
    storage: str


def _storage(tensor, file: str) -> str:
    import onnx

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return "inline"
    info = {entry.key: entry.value for entry in tensor.external_data}
    return f"{info.get('location')}@{info.get('offset', '0')}"


def stored_tensors(folder: str | Path) -> list[StoredTensor]:
    """Every tensor stored by the ``.onnx`` graphs under ``folder`` (recursively), external data resolved.

    Raises FileNotFoundError when the folder holds no ``.onnx`` file, ValueError (naming the file) when one cannot
    be read as ONNX.
    """
    import onnx
    from onnx import numpy_helper

    folder = Path(folder)
    files = sorted(folder.rglob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .onnx file: pass an ONNX export folder")
    result, seen = [], set()
    for path in files:
        relative = str(path.relative_to(folder))
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise ValueError(f"{path} cannot be read as ONNX ({error}); export the model again") from None
        for name, tensor in constant_tensors(model.graph):
            storage = _storage(tensor, relative)
            place = (str(path.parent / storage) if storage != "inline" else f"{relative}:{name}")
            if place in seen:  # another graph points at the same stored bytes
                continue
            seen.add(place)
            if storage != "inline":
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            array = numpy_helper.to_array(tensor)
            digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()
            result.append(StoredTensor(relative, name, array.nbytes, digest, storage))
    return result


def duplicated(tensors: list[StoredTensor], min_bytes: int = 1024) -> dict[str, list[StoredTensor]]:
    """Contents stored more than once among tensors of at least ``min_bytes`` bytes: sha256 -> the copies. Any
    record with ``nbytes`` and ``sha256`` works (``export.pte_weights.StoredConstant`` too).

    The floor skips the small constants every graph carries (shape vectors, scalars, norm epsilons); weights are
    far larger (a tiny test model's smallest weight matrix is 64 x 64 float32 = 16 KiB)."""
    if isinstance(tensors, (str, Path)):
        raise TypeError(f"duplicated() takes stored_tensors(folder)'s list, got the path {tensors!r}: call "
                        "duplicated(stored_tensors(folder))")
    groups: dict[str, list[StoredTensor]] = defaultdict(list)
    for tensor in tensors:
        if tensor.nbytes >= min_bytes:
            groups[tensor.sha256].append(tensor)
    return {digest: copies for digest, copies in groups.items() if len(copies) > 1}


def share_duplicate_initializers(model, min_elements: int = 1024) -> int:
    """Store each weight once in a graph: equal initializers (dtype, shape, bytes) become one.

    model: an ``onnx_ir.Model``, changed in place. The dynamo exporter folds a weight's transpose separately for
    each use it traces: the layer-K decoder's selection branch (an ``If`` body) reads layer K-1's key projection as
    the layer does, and ends up with a second folded copy; onnxruntime's 4-bit quantizer writes a body's quantized
    weight into the body. The exporter's own deduplication (onnx_ir's ``DeduplicateInitializersPass``) keys on whole
    tensors' bytes and skips large ones; this one keys on sha256 digests, computed only for tensors that share a
    dtype and shape with another. A duplicate's uses then read the kept one: one of the main graph's (ONNX bodies
    see outer values) or an earlier one of its own graph. Initializers under ``min_elements`` are left alone
    (shape vectors, scalars). Returns how many copies were dropped.
    """
    import onnx_ir as ir

    digests: dict[int, str] = {}

    def digest(value) -> str:
        if id(value) not in digests:
            digests[id(value)] = hashlib.sha256(value.const_value.tobytes()).hexdigest()
        return digests[id(value)]

    def candidates(graph) -> dict[tuple, list]:
        found: dict[tuple, list] = defaultdict(list)
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.size >= min_elements:
                found[(value.dtype, tuple(value.shape))].append(value)
        return found

    main = candidates(model.graph)
    dropped = 0
    for graph in model.graphs():
        own = main if graph is model.graph else candidates(graph)
        for key, values in list(own.items()):
            kept: list = [] if graph is model.graph else list(main.get(key, []))
            for value in values:
                same = next((k for k in kept if k is not value and digest(k) == digest(value)), None)
                if same is None:
                    kept.append(value)
                    continue
                ir.convenience.replace_all_uses_with(value, same)
                graph.initializers.pop(value.name)
                dropped += 1
    return dropped
