"""What every CLI shares on the console: the --help layout and quiet libraries (torch is imported only by
quiet_libraries, which runs after argument parsing: `--help` stays instant)."""

from __future__ import annotations

import argparse


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
    for name in ("torch", "torchao", "transformers", "onnxscript", "executorch", "root"):
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
