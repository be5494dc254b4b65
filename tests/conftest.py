"""Test-session setup."""

import torch

# The suite is dominated by small tensor ops, where intra-op threads only add synchronisation (and on a busy
# 2-core machine, oversubscription slows them by 10-40x). Benchmarks, not tests, measure speed.
torch.set_num_threads(1)
