"""runtime/console.py: what every CLI prints besides its own output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (torch not imported yet, as in a CLI): quiet_libraries, then a warning on the logger torch's
# pytree registrations use (torchao's `register_constant` notices come through it when it is imported).
PROBE = """
import logging, sys
from runtime.console import quiet_libraries
quiet_libraries(verbose=sys.argv[1] == "verbose")
import torch
logging.getLogger("torch.utils._pytree").warning("probe: register_constant is deprecated")
logging.getLogger("torch.export").warning("probe: torch.export notice")
"""


def _stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torch_log_warnings_quiet_unless_verbose():
    """Importing torch resets its loggers to WARNING; quiet_libraries must still hold after that import."""
    assert "probe" not in _stderr("quiet")
    verbose = _stderr("verbose")
    assert "probe: register_constant" in verbose and "probe: torch.export notice" in verbose
