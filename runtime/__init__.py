"""VLM-Pruner Edge runtime: loads what ``export/`` wrote, runs it, measures it.

Importing this package stays light (numpy and PIL only); onnxruntime and executorch are imported by the functions
that need them.
"""

from .devices import NoNpuError, OnnxProviders, ExecutorchBackends, resolve_executorch_backend, resolve_onnx_providers
from .memory import current_rss_bytes, files_size_bytes, peak_rss_bytes
from .preprocess import ImagePreprocessing, load_image, preprocess
from .profile import OpTime, Profile, Stopwatch, timed



def load(path, device="cpu", *, config=None, cache_dir=None, profile_ops=False, engine="onnxruntime"):
    """Load an exported folder (ExecuTorch / ONNX) or a model for eager PyTorch -> a reusable Session.

    See runtime.loader.load; imported lazily so that `import runtime` stays light.
    """
    from .loader import load as _load

    return _load(path, device, config=config, cache_dir=cache_dir, profile_ops=profile_ops, engine=engine)


__all__ = [
    "load",
    "ExecutorchBackends",
    "ImagePreprocessing",
    "NoNpuError",
    "OnnxProviders",
    "OpTime",
    "Profile",
    "Stopwatch",
    "current_rss_bytes",
    "files_size_bytes",
    "load_image",
    "peak_rss_bytes",
    "preprocess",
    "resolve_executorch_backend",
    "resolve_onnx_providers",
    "timed",
]
