"""Where an ExecuTorch `.pte` stores its weights, blob by blob, with a content hash: for checking that an export
holds each weight once (issue #15).

An ExecuTorch 1.5.1 program file is a flatbuffer (``Program``, schema ``exir/_serialize/program.fbs``) followed by
data segments (``Program.segments``, located by the file's extended header). Weights can sit in four places:

* the constant segment (``Program.constant_segment``: one segment, a tensor at each offset; index 0 is reserved):
  constants of the operators that run outside a delegate (portable kernels: the whole model with
  ``--backend portable``; with XNNPACK, what it does not delegate, e.g. the token embedding table, norms);
* ``Program.constant_buffer``: the same, inline in the flatbuffer (deprecated, older writers);
* the named data store (``Program.named_data``: key -> segment): where the XNNPACK delegate keeps every weight it
  consumes, keyed by the SHA-256 of the bytes (so a key is written once per program, whichever methods use it);
* inside a delegate's payload (``ExecutionPlan.delegates[i].processed``). XNNPACK's payload (``XH00`` header,
  ``backends/xnnpack/serialization/xnnpack_graph_serialize.py``) is its graph plus a constant-data section, which
  1.5.1 leaves empty (its weights go to the named data store); that section is listed when it is not empty. A
  payload of another backend is opaque and listed whole, so its bytes are counted even though its weights cannot be
  told apart.

Within one store identical content is already kept once (the emitter merges equal constants, the named data store
equal keys), so a weight stored twice shows as the same bytes in two stores, or as two forms of it (say fp32 in the
constant segment for one method and an XNNPACK copy for another).

Mutable buffers with an initial value (``Program.mutable_data_segments``) and segments nothing references are listed
too: every stored blob that could hold weights is in the list, so the sum of their sizes bounds what the file holds
in weights (compare it with the model's parameter bytes to catch a weight stored twice in different forms, which a
content hash cannot see).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PTE_IDENTIFIER = b"ET12"  # program.fbs file_identifier, at bytes 4..8 of the flatbuffer
KINDS = ("constant", "named_data", "delegate_constants", "delegate_opaque", "mutable", "unreferenced")


@dataclass(frozen=True)
class StoredConstant:
    """One stored blob of a ``.pte``.

    where: its place in the file, e.g. ``constant_segment[3]``, ``constant_buffer[3]``, ``named_data:<key>`` (keys
      sharing one segment joined by ``|``), ``delegate:text_decoder[2]:XnnpackBackend constants``,
      ``delegate:<method>[i]:<backend id>`` (an opaque payload), ``mutable_data[i]``, ``segment[i]``.
    kind: one of ``KINDS`` (the part of the list above it comes from).
    nbytes: its size in bytes (constant segment / buffer: the tensor's own size, without alignment padding).
    sha256: hex SHA-256 of those bytes.
    methods: the methods (execution plans) that read it, sorted: constant entries, by their tensors; named data, by
      the delegates whose payloads name its key; a delegate's blob, its own method; () for the rest.
    """

    where: str
    kind: str
    nbytes: int
    sha256: str
    methods: tuple[str, ...] = ()


CHUNK_BYTES = 1 << 24  # hashing reads the file 16 MiB at a time


@dataclass(frozen=True)
class _Range:
    """``nbytes`` bytes at ``offset`` of the file (or of ``data`` when given: inline flatbuffer bytes)."""

    offset: int
    nbytes: int
    data: bytes | None = None

    def part(self, start: int, nbytes: int) -> "_Range":
        nbytes = max(0, min(nbytes, self.nbytes - start))
        return _Range(self.offset + start, nbytes, self.data)

    def read(self, handle, start: int = 0, nbytes: int | None = None) -> bytes:
        nbytes = self.nbytes - start if nbytes is None else min(nbytes, self.nbytes - start)
        if self.data is not None:
            return self.data[self.offset + start : self.offset + start + nbytes]
        handle.seek(self.offset + start)
        return handle.read(nbytes)

    def sha256(self, handle) -> str:
        digest = hashlib.sha256()
        for start in range(0, self.nbytes, CHUNK_BYTES):
            digest.update(self.read(handle, start, CHUNK_BYTES))
        return digest.hexdigest()


def _constant_tensors(program) -> tuple[dict[int, int], dict[int, set[str]]]:
    """Over the constant tensors of every method: data_buffer_idx -> bytes of the largest tensor reading it, and
    data_buffer_idx -> the methods reading it."""
    from executorch.exir.schema import Tensor
    from executorch.exir.tensor import get_scalar_type, num_bytes_from_shape_and_dtype

    sizes: dict[int, int] = {}
    users: dict[int, set[str]] = defaultdict(set)
    for plan in program.execution_plan:
        for value in plan.values:
            tensor = value.val
            if isinstance(tensor, Tensor) and tensor.data_buffer_idx > 0:
                users[tensor.data_buffer_idx].add(plan.name)
                try:
                    nbytes = num_bytes_from_shape_and_dtype(tensor.sizes, get_scalar_type(tensor.scalar_type))
                except (KeyError, ValueError, TypeError):  # a dtype without a torch counterpart: the padded size
                    continue
                sizes[tensor.data_buffer_idx] = max(sizes.get(tensor.data_buffer_idx, 0), nbytes)
    return sizes, users


def _xnnpack_sections(payload: _Range, handle) -> tuple[_Range, _Range] | None:
    """(graph flatbuffer, constant data) of an XNNPACK payload, or None when it has no ``XH00`` header."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader

    try:
        header = XNNHeader.from_bytes(payload.read(handle, 0, XNNHeader.EXPECTED_LENGTH))
    except ValueError:
        return None
    if not header.is_valid() or header.constant_data_offset + header.constant_data_size > payload.nbytes:
        return None
    return (payload.part(header.flatbuffer_offset, header.flatbuffer_size),
            payload.part(header.constant_data_offset, header.constant_data_size))


_KEY_TOKEN = re.compile(rb"[0-9A-Za-z_]+")


def _named_keys_in(data: bytes, keys: set[str]) -> set[str]:
    """The named-data keys a delegate payload (its graph) names: flatbuffer strings, so whole tokens."""
    if all(_KEY_TOKEN.fullmatch(key.encode()) for key in keys):
        return keys & {token.decode() for token in _KEY_TOKEN.findall(data)}
    return {key for key in keys if key.encode() in data}


def stored_constants(pte_path: str | Path) -> list[StoredConstant]:
    """Every blob of ``pte_path`` (an ExecuTorch 1.5.1 ``.pte``) that can hold weights (see the module docstring):
    constant segment or constant buffer entries, named data (one entry per segment, whatever the number of keys
    naming it), the constant sections of XNNPACK payloads (when not empty), other backends' payloads whole, mutable
    data, and segments nothing references. Sizes in bytes; hashes over exactly those bytes.

    Reads the flatbuffer with ExecuTorch's own deserializer (its extended-header reader, then
    ``_flatbuffer_to_program``), and the segments in 16 MiB reads while hashing: the weights are never all in memory,
    but every byte of them is read once. A named-data entry's ``methods`` come from the key strings in the
    delegates' graphs.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not an ExecuTorch program (no
    ``ET12`` identifier, a flatbuffer that does not parse, or a header / segment table pointing outside the file).
    """
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header

    path = Path(pte_path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(64)
        if len(head) < 8 or head[4:8] != PTE_IDENTIFIER:
            raise ValueError(f"{path} is not an ExecuTorch program (.pte): no {PTE_IDENTIFIER.decode()} identifier "
                             f"at bytes 4..8 (found {head[4:8]!r})")
        header = _get_extended_header(head)
        program_size = header.program_size if header else size
        base = header.segment_base_offset if header else size
        if program_size > size or base > size:
            raise ValueError(f"{path} is not a complete ExecuTorch program: its header points past the end of the "
                             f"file ({size} bytes)")
        handle.seek(0)
        try:
            program = _flatbuffer_to_program(handle.read(program_size))
        except Exception as error:  # the flatbuffer reader's own errors vary (struct.error, IndexError, ...)
            raise ValueError(f"{path} is not an ExecuTorch program (.pte): {error}") from error
        return _list_blobs(path, handle, size, base, program)


def _list_blobs(path: Path, handle, size: int, base: int, program) -> list[StoredConstant]:
    from executorch.exir.schema import DataLocation

    segments = []
    for index, entry in enumerate(program.segments or []):
        if base + entry.offset + entry.size > size:
            raise ValueError(f"{path}: segment {index} ({entry.offset}+{entry.size}) lies past the end of the file")
        segments.append(_Range(base + entry.offset, entry.size))
    referenced: set[int] = set()

    def segment(index: int, what: str) -> _Range:
        if index >= len(segments):
            raise ValueError(f"{path}: {what} refers to segment {index} of {len(segments)}")
        referenced.add(index)
        return segments[index]

    def blob(where: str, kind: str, data: _Range, methods=()) -> StoredConstant:
        return StoredConstant(where, kind, data.nbytes, data.sha256(handle), tuple(sorted(methods)))

    keys: dict[int, list[str]] = defaultdict(list)  # named data: segment -> its keys
    for entry in program.named_data or []:
        keys[entry.segment_index].append(entry.key)
    all_keys = {key for names in keys.values() for key in names}
    key_users: dict[str, set[str]] = defaultdict(set)
    delegate_blobs: list[StoredConstant] = []
    inline = program.backend_delegate_data or []
    for plan in program.execution_plan:
        for number, delegate in enumerate(plan.delegates or []):
            what = f"delegate:{plan.name}[{number}]:{delegate.id}"
            reference = delegate.processed
            if reference.location == DataLocation.SEGMENT:
                payload = segment(reference.index, what)
            elif reference.index < len(inline):
                data = bytes(inline[reference.index].data)
                payload = _Range(0, len(data), data)
            else:
                raise ValueError(f"{path}: {what} refers to inline data {reference.index} of {len(inline)}")
            sections = _xnnpack_sections(payload, handle) if "xnnpack" in delegate.id.lower() else None
            graph = payload if sections is None else sections[0]
            for key in _named_keys_in(graph.read(handle), all_keys) if all_keys else ():
                key_users[key].add(plan.name)
            if sections is None:
                delegate_blobs.append(blob(what, "delegate_opaque", payload, [plan.name]))
            elif sections[1].nbytes:
                delegate_blobs.append(blob(f"{what} constants", "delegate_constants", sections[1], [plan.name]))

    out: list[StoredConstant] = []
    exact, users = _constant_tensors(program)  # constant entries are padded to their alignment; hash the tensor
    constant_segment = program.constant_segment
    if constant_segment is not None and constant_segment.offsets:
        data = segment(constant_segment.segment_index, "the constant segment")
        offsets = list(constant_segment.offsets)
        for index in range(1, len(offsets)):  # 0: reserved for non-constant tensors
            end = offsets[index + 1] if index + 1 < len(offsets) else data.nbytes
            padded = end - offsets[index]
            out.append(blob(f"constant_segment[{index}]", "constant",
                            data.part(offsets[index], min(exact.get(index, padded), padded)), users[index]))
    for index, buffer in enumerate(program.constant_buffer or []):
        storage = bytes(buffer.storage or b"")
        if index and storage:
            out.append(blob(f"constant_buffer[{index}]", "constant",
                            _Range(0, min(exact.get(index, len(storage)), len(storage)), storage), users[index]))
    for index, names in keys.items():
        methods = set().union(*(key_users[key] for key in names))
        out.append(blob("named_data:" + "|".join(names), "named_data", segment(index, f"named data {names[0]!r}"),
                        methods))
    out.extend(delegate_blobs)

    for number, mutable in enumerate(program.mutable_data_segments or []):
        data = segment(mutable.segment_index, "mutable data")
        offsets = list(mutable.offsets)
        for index, start in enumerate(offsets):
            end = offsets[index + 1] if index + 1 < len(offsets) else data.nbytes
            if end > start:
                out.append(blob(f"mutable_data[{number}][{index}]", "mutable", data.part(start, end - start)))

    for index, data in enumerate(segments):
        if index not in referenced:
            out.append(blob(f"segment[{index}]", "unreferenced", data))
    return out


def duplicated(constants: Iterable[StoredConstant], min_bytes: int = 1024) -> dict[str, list[str]]:
    """sha256 -> the places (``where``) of each content stored more than once among ``constants`` of at least
    ``min_bytes`` bytes; empty when every such blob is stored once."""
    from .onnx_weights import duplicated as duplicated_contents  # the one grouping by digest, for both targets

    copies = duplicated_contents(list(constants), min_bytes)
    return {sha: [constant.where for constant in group] for sha, group in copies.items()}
