"""Test-session setup."""

import pytest
import torch

# The suite is dominated by small tensor ops, where intra-op threads only add synchronisation (and on a busy
# 2-core machine, oversubscription slows them by 10-40x). Benchmarks, not tests, measure speed.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def onnx_export_cache() -> dict:
    """Finished ONNX exports of this session: ExportOptions -> (folder, export_config.json payload).
    tests/test_export_onnx.py fills it; a module that needs one of those exports takes its folder instead of
    exporting again (exports are the suite's expensive part)."""
    return {}
