"""ONNX and ExecuTorch lowering of pruned models."""
