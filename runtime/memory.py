"""Process memory and on-disk model size, from the standard library only."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

try:  # POSIX only; Windows has no `resource`
    import resource
except ImportError:  # pragma: no cover - exercised on Windows only
    resource = None  # type: ignore[assignment]


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident memory in bytes, or None where the platform has neither source.

    Linux: ``VmHWM`` of /proc/self/status -- the peak of this program alone. Not ``getrusage``'s ``ru_maxrss``: Linux
    carries that over from the parent across fork + exec, so a small program started by a large one (a test runner,
    a benchmark that built a checkpoint first) reports the parent's peak. Elsewhere ``ru_maxrss`` (macOS: bytes)."""
    try:
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(encoding="ascii"), re.MULTILINE)
    except OSError:
        hwm = None
    if hwm is not None:
        return int(hwm.group(1)) * 1024
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# Runs a module as __main__ (argv: REPORT_FILE MODULE ARGS...) and writes its peak RSS in bytes to REPORT_FILE on
# exit: ``runtime.memory.peak_rss_bytes`` in the child itself, since the parent cannot read it afterwards.
_PEAK_LAUNCHER = """
import atexit, runpy, sys
from pathlib import Path
report, module = sys.argv[1], sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
def _write_peak():
    from runtime.memory import peak_rss_bytes
    Path(report).write_text(str(peak_rss_bytes()))
atexit.register(_write_peak)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def peak_measuring_command(module: str, args: list[str], report: str | Path) -> list[str]:
    """``python -m module args...`` (this interpreter) that, when it exits, writes its own peak RSS in bytes to
    ``report`` (read it with ``read_peak_report``). Run it from the repository root (``runtime`` must import).
    For measuring a CLI's memory from a test or a benchmark: the parent's ``os.wait4`` figure would include the
    parent's own peak (see ``peak_rss_bytes``)."""
    return [sys.executable, "-c", _PEAK_LAUNCHER, str(report), module, *map(str, args)]


def read_peak_report(report: str | Path) -> int:
    """The bytes ``peak_measuring_command`` wrote. Raises FileNotFoundError when the child died before its exit
    handlers ran (killed, e.g. for memory), ValueError when the platform had no figure."""
    return int(Path(report).read_text())


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
