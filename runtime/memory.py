"""Process memory and on-disk model size, from the standard library only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

try:  # POSIX only; Windows has no `resource`
    import resource
except ImportError:  # pragma: no cover - exercised on Windows only
    resource = None  # type: ignore[assignment]


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident memory in bytes (``getrusage`` ``ru_maxrss``), or None where the
    platform has no ``getrusage``. Linux reports KiB, macOS bytes."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int | None:
    """Resident memory of this process now, in bytes, from ``/proc/self/statm``; None where it does not exist."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def files_size_bytes(paths: str | Path | Iterable[str | Path]) -> int:
    """Total size of files in bytes; a directory counts every file under it. Raises FileNotFoundError naming a
    missing path."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    total = 0
    for path in map(Path, paths):
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
        else:
            raise FileNotFoundError(f"cannot size {path}: no such file or directory")
    return total
