"""The --help layout every CLI shares (no torch import: `pruner-run --help` stays instant)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one (not for flags, required
    options or options whose help already says its default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or action.required or "default" in help_text.lower()
                or not action.option_strings):
            return help_text
        return f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)"
