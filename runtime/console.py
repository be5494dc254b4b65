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


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose: keep the libraries' warnings, logs and progress bars."""
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings, logs and progress bars")
