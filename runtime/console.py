"""What every CLI shares on the console: the --help layout and quiet libraries (torch is imported only by
quiet_libraries, which runs after argument parsing: `--help` stays instant)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import signal
import sys
import threading
from typing import Callable, Iterator


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one (not for flags, required
    options or options whose help already says its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or action.required
                or "default" in help_text.lower() or not action.option_strings):  # `is`: a default of 0 is shown
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill``, ``timeout``, a container stopping)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) as Ctrl-C does, so the command unwinds and cleans
    up (pruner-export's staging folder is removed; Python's default on SIGTERM exits at once and leaves its hidden
    ``.partial`` folder; SIGKILL cannot be caught). The previous handler is restored on exit. Off the main thread,
    where Python cannot set handlers, the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_status(interrupt: KeyboardInterrupt) -> tuple[str, int]:
    """What a command says and exits with when interrupted: ("terminated", 143) for SIGTERM (``Terminated``),
    ("interrupted", 130) for Ctrl-C (128 + the signal, as a shell reports a command a signal ended)."""
    if isinstance(interrupt, Terminated):
        return "terminated", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


def run_program(main: Callable[[], int]) -> int:
    """A console script's entry point: ``main()``'s exit code, with Python's cyclic collector then told to leave
    every object alone (``gc.freeze``) for the exit that follows. The interpreter's final collections would scan
    everything the command imported (torch, transformers, ExecuTorch) only for the process to end: 1.3 s of a bare
    ``import torch, transformers, executorch.exir`` exit and ~1.5 s of pruner-export's on this VM, 0.15 s frozen
    (measured). ``atexit`` and ``weakref.finalize`` still run (temporary folders go: ``TemporaryDirectory``); what
    no longer runs is ``__del__`` of an object still caught in a reference cycle at exit, so nothing a command
    writes may be left to one (files are closed by ``with``, not at exit). The memory goes with the process. Only
    for a process about to exit: called in-process (tests), ``main`` itself is.

    A reader that stops early (``pruner-run ... | head -1``) ends the command quietly with 141 (128 + SIGPIPE, as
    a shell reports a command the closed pipe ended), not with a BrokenPipeError traceback; Ctrl-C that ``main``
    does not answer itself (pruner-export and pruner-eval do) with one line and 130 (128 + SIGINT), not a
    KeyboardInterrupt traceback; SIGTERM likewise (``terminate_as_interrupt``: the command unwinds through its
    clean-up, e.g. pruner-bench's exports remove their staging folders) with "terminated" and 143."""
    try:
        with terminate_as_interrupt():
            code = main()
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
    except KeyboardInterrupt as interrupt:
        said, code = interrupt_status(interrupt)
        print(f"{os.path.basename(sys.argv[0])}: {said}", file=sys.stderr)
    except BrokenPipeError:
        # the rest of the output has nowhere to go: stdout to /dev/null, so that the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE (13)
    gc.freeze()
    return code


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the output readable: library warnings, info logs and progress bars off in this process (native library
    notices too, where they go through Python logging), unless ``verbose``."""
    if verbose:
        return
    import importlib
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    try:  # importing torch resets the "torch" logger to WARNING (torch._logging): import it first, then set levels
        importlib.import_module("torch")  # every command that gets here imports it anyway
    except ImportError:
        pass
    for name in ("torch", "torchao", "transformers", "onnxscript", "onnx_ir", "executorch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# Bidirectional overrides and isolates: they reorder what a terminal shows after them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_controls(text: str) -> str:
    """Control characters (ESC, carriage return, backspace, bell, C1 controls, bidirectional overrides) as visible
    escapes (``\\x1b``, ``\\r``, ``\\u202e``), newlines and tabs kept: model output shown on a terminal cannot move
    the cursor, recolour or rewrite what is already there."""
    import unicodedata

    def show(char: str) -> str:
        if char in "\n\t" or not (unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS):
            return char
        return char.encode("unicode_escape", "backslashreplace").decode("ascii")

    return "".join(show(char) for char in text)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose: keep the libraries' warnings, logs and progress bars."""
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings, logs and progress bars")


# Notices native libraries write straight to the process's stderr (file descriptor 2), below Python's logging:
# ExecuTorch's info log of its OpenVINO backend loading, and of cpuinfo probing ARM-only files on x86; torchao's
# optional CUDA kernels that cannot load on a CPU build. Anything else a native library writes is passed through.
NATIVE_NOTICES = (
    re.compile(rb"\[OpenvinoBackend\.cpp:\d+\] OpenVINO: runtime loaded"),
    re.compile(rb"\[cpuinfo_utils\.cpp:\d+\] "),
    re.compile(rb"Failed to load \S*torchao\S*: Could not load this library"),
)
_NOTICE_PREFIXES = (b"[OpenvinoBackend.cpp:", b"[cpuinfo_utils.cpp:", b"Failed to load ")


def _without_notice(line: bytes) -> bytes:
    """A whole line (no newline) -> what precedes a notice in it (a notice runs to the end of its line; a streamed
    answer may precede it on the same line), or the line itself."""
    starts = [match.start() for pattern in NATIVE_NOTICES if (match := pattern.search(line))]
    return line[: min(starts)] if starts else line + b"\n"


def _hold_from(partial: bytes) -> int:
    """Where, in a line still being written, a notice could start: the text before it can be passed on now."""
    for index in range(len(partial)):
        tail = partial[index:]
        if any(prefix.startswith(tail[: len(prefix)]) for prefix in _NOTICE_PREFIXES):
            return index
    return len(partial)


def _forward_without_notices(read_fd: int, write_fd: int) -> None:
    """Copy what arrives on read_fd to write_fd until EOF, dropping the native notices (from where one starts to the
    end of its line). Partial lines (a streamed answer) are passed on at once, up to where a notice could start."""
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(_without_notice(line) for line in lines)
        held = _hold_from(pending)
        out, pending = out + pending[:held], pending[held:]
        if out:
            os.write(write_fd, out)
    if pending:
        os.write(write_fd, _without_notice(pending).removesuffix(b"\n"))


@contextlib.contextmanager
def native_notices_filtered(verbose: bool = False) -> Iterator[None]:
    """Within the block, the native notices of ``NATIVE_NOTICES`` are dropped from file descriptor 2 (what C++
    libraries write to); every other byte still reaches stderr, in order. A no-op with ``verbose`` or when stderr has
    no file descriptor (an in-memory capture)."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    if verbose:
        os.close(original)
        yield
        return
    read_fd, write_fd = os.pipe()
    forwarder = threading.Thread(target=_forward_without_notices, args=(read_fd, original), daemon=True)
    forwarder.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder reads EOF and ends
        forwarder.join(timeout=5.0)
        os.close(read_fd)
        os.close(original)
