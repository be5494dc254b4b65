"""Device selection: which onnxruntime execution providers, or which ExecuTorch delegates, serve "cpu" / "npu" /
"auto" on this machine.

ONNX: the graph is portable, so the device is chosen at load time from the providers this onnxruntime build has
(``onnxruntime.get_available_providers()``); an NPU provider always comes with CPUExecutionProvider behind it for
the operators it does not support.

ExecuTorch: the delegates are baked into the ``.pte`` at export time, so the device follows from the file; the
check here is that this runtime can execute them (``Runtime.get().backend_registry``) and that they match the device
asked for.

onnxruntime and executorch are imported inside the functions, never at module import.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("cpu", "npu", "auto")

CPU_PROVIDER = "CPUExecutionProvider"

# NPU execution providers in order of preference, with the options that put them on the NPU.
NPU_ONNX_PROVIDERS: tuple[tuple[str, dict[str, str]], ...] = (
    ("QNNExecutionProvider", {"backend_type": "htp"}),  # Qualcomm Hexagon (Snapdragon)
    ("CoreMLExecutionProvider", {"MLComputeUnits": "CPUAndNeuralEngine"}),  # Apple Neural Engine
    ("OpenVINOExecutionProvider", {"device_type": "NPU"}),  # Intel NPU (Core Ultra)
    ("VitisAIExecutionProvider", {}),  # AMD Ryzen AI
)

HOW_TO_GET_AN_NPU_PROVIDER = (
    "to run on an NPU, install the onnxruntime build for your chip in place of `onnxruntime`: "
    "Snapdragon (Windows on ARM): `pip install onnxruntime-qnn`; "
    "Intel Core Ultra: `pip install onnxruntime-openvino`; "
    "Apple silicon: the stock macOS `onnxruntime` wheel has CoreML; "
    "AMD Ryzen AI: the onnxruntime-vitisai wheel from AMD's Ryzen AI Software. "
    "Or ask for device='cpu' (or 'auto', which falls back to CPU)"
)

# ExecuTorch delegate ids (the BackendDetails class name written into the .pte) by the hardware they drive.
NPU_EXECUTORCH_BACKENDS: dict[str, str] = {
    "QnnBackend": "Qualcomm Hexagon NPU (QNN)",
    "CoreMLBackend": "Apple Neural Engine (Core ML)",
    "NeuropilotBackend": "MediaTek APU (NeuroPilot)",
    "OpenvinoBackend": "Intel NPU (OpenVINO)",
    "EnnBackend": "Samsung Exynos NPU (ENN)",
    "EthosUBackend": "Arm Ethos-U microNPU",
    "NeutronBackend": "NXP eIQ Neutron NPU",
}
CPU_EXECUTORCH_BACKENDS = frozenset({"XnnpackBackend"})  # plus undelegated (portable / optimized kernel) ops
GPU_EXECUTORCH_BACKENDS = frozenset({"VulkanBackend", "MPSBackend", "MetalBackend", "CudaBackend", "MLXBackend"})

# Vendor libraries a registered delegate loads when it runs: registered is not enough without them (the pip wheel
# registers QnnBackend on any Linux host, but it needs Qualcomm's HTP library to execute).
_EXECUTORCH_RUNTIME_LIBRARIES: dict[str, tuple[str, ...]] = {"QnnBackend": ("libQnnHtp.so", "QnnHtp.dll")}


class NoNpuError(RuntimeError):
    """An NPU was asked for (or a file needs one) and this machine's runtime has none to offer."""


# ================================================================================================================
# onnxruntime
# ================================================================================================================
@dataclass(frozen=True)
class OnnxProviders:
    """The execution providers to open an ``onnxruntime.InferenceSession`` with, and which device they give."""

    requested: str  # the device asked for: "cpu", "npu" or "auto"
    device: str  # the device taken: "cpu" or "npu"
    providers: tuple[str, ...]  # in priority order; CPUExecutionProvider last
    provider_options: tuple[dict[str, str], ...]  # one dict per provider
    note: str = ""  # why this choice, for logs and profiles

    def session_kwargs(self) -> dict[str, Any]:
        """``InferenceSession(path, **choice.session_kwargs())``."""
        return {"providers": list(self.providers), "provider_options": [dict(o) for o in self.provider_options]}


def _check_device(device: str) -> str:
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    return device.lower()


def available_onnx_providers() -> list[str]:
    """The execution providers this onnxruntime build can use."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _openvino_npu_present() -> bool | None:
    """Whether OpenVINO sees an NPU; None when the ``openvino`` Python package is absent and it cannot tell."""
    try:
        import openvino
    except ImportError:
        return None
    try:
        return "NPU" in openvino.Core().available_devices
    except Exception:  # a broken driver install: let the session creation report it
        return None


def resolve_onnx_providers(device: str = "auto") -> OnnxProviders:
    """Providers for ``device``: "cpu" -> CPU only; "npu" -> the first available NPU provider
    (QNN, CoreML, OpenVINO on its NPU, VitisAI) with CPU as fallback for unsupported operators, else NoNpuError;
    "auto" -> NPU when there is one, else CPU (``note`` says which and why)."""
    requested = _check_device(device)
    if requested == "cpu":
        return OnnxProviders(requested, "cpu", (CPU_PROVIDER,), ({},),
                             f"running on the CPU ({CPU_PROVIDER}), as device cpu asks")
    available = available_onnx_providers()
    for name, options in NPU_ONNX_PROVIDERS:
        if name == "OpenVINOExecutionProvider" and _openvino_npu_present() is False:
            continue  # OpenVINO is there but drives only the CPU / GPU of this machine
        if name in available:
            return OnnxProviders(
                requested,
                "npu",
                (name, CPU_PROVIDER),
                (dict(options), {}),
                f"running on the NPU through {name} (operators it does not support run on the CPU, "
                f"{CPU_PROVIDER})",
            )
    if requested == "npu":
        raise NoNpuError(
            f"no NPU execution provider in this onnxruntime build (it has: {', '.join(available) or 'none'}; "
            f"NPU providers: {', '.join(name for name, _ in NPU_ONNX_PROVIDERS)}); {HOW_TO_GET_AN_NPU_PROVIDER}"
        )
    return OnnxProviders(
        requested,
        "cpu",
        (CPU_PROVIDER,),
        ({},),
        f"running on the CPU: device auto found no NPU execution provider (this onnxruntime has: "
        f"{', '.join(available)})",
    )


# ================================================================================================================
# ExecuTorch
# ================================================================================================================
@dataclass(frozen=True)
class ExecutorchBackends:
    """What an ExecuTorch ``.pte`` runs on here."""

    requested: str  # "cpu", "npu" or "auto"
    device: str  # "cpu", "npu" or "gpu"
    backends: tuple[str, ...]  # the delegates in the .pte (empty: portable kernels only)
    note: str = ""
    registered: tuple[str, ...] = field(default=())  # delegates this runtime has registered


def backend_kind(backend_id: str) -> str:
    """"npu", "gpu", "cpu" or "other" for an ExecuTorch delegate id."""
    if backend_id in NPU_EXECUTORCH_BACKENDS:
        return "npu"
    if backend_id in GPU_EXECUTORCH_BACKENDS:
        return "gpu"
    if backend_id in CPU_EXECUTORCH_BACKENDS:
        return "cpu"
    return "other"


def _library_loads(names: Iterable[str]) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def executorch_backends() -> dict[str, bool]:
    """Delegates registered in this ExecuTorch runtime -> whether they can run here (the backend reports itself
    available and, for QNN, Qualcomm's HTP library loads)."""
    from executorch.runtime import Runtime

    registry = Runtime.get().backend_registry
    usable = {}
    for name in registry.registered_backend_names:
        ok = bool(registry.is_available(name))
        if ok and name in _EXECUTORCH_RUNTIME_LIBRARIES:
            ok = _library_loads(_EXECUTORCH_RUNTIME_LIBRARIES[name])
        usable[name] = ok
    return usable


def pte_backend_ids(path: str | Path) -> list[str]:
    """The delegate ids an ExecuTorch program uses (sorted, unique; empty for a portable-only program)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .pte file at {path}")
    pte = deserialize_pte_binary(path.read_bytes())
    program = getattr(pte, "program", pte)
    return sorted({delegate.id for plan in program.execution_plan for delegate in plan.delegates})


def _describe(backends: Mapping[str, bool]) -> str:
    if not backends:
        return "none"
    return ", ".join(name + ("" if ok else " (registered, not runnable here)") for name, ok in sorted(backends.items()))


def resolve_executorch_backend(
    backends_in_pte: Iterable[str], device: str = "auto", registered: Mapping[str, bool] | None = None
) -> ExecutorchBackends:
    """Check that a ``.pte`` delegating to ``backends_in_pte`` can run here on ``device``.

    ``registered`` maps this runtime's delegates to whether they can run (default: ``executorch_backends()``).
    NoNpuError when the file needs an NPU delegate this runtime cannot run, or ``device="npu"`` was asked of a
    CPU-only (XNNPACK / portable) file; ValueError when ``device="cpu"`` was asked of an NPU / GPU file.
    """
    requested = _check_device(device)
    needed = tuple(sorted(set(backends_in_pte)))
    registry = dict(executorch_backends() if registered is None else registered)
    names = tuple(sorted(registry))
    npu = [b for b in needed if backend_kind(b) == "npu"]
    accelerated = [b for b in needed if backend_kind(b) in ("npu", "gpu")]

    if requested == "npu" and not npu:
        raise NoNpuError(
            f"this .pte is CPU-only (delegates: {', '.join(needed) or 'none, portable kernels'}); an NPU needs a .pte "
            f"exported with an NPU recipe ({', '.join(NPU_EXECUTORCH_BACKENDS)}). This runtime has: "
            f"{_describe(registry)}. Or run it with device='cpu'"
        )
    if requested == "cpu" and accelerated:
        raise ValueError(
            f"this .pte delegates to {', '.join(accelerated)}, which cannot run on the CPU; export it again with the "
            "xnnpack recipe for CPU, or pass device='auto'"
        )
    missing = [b for b in needed if not registry.get(b, False)]
    if missing:
        what = ", ".join(f"{b} ({NPU_EXECUTORCH_BACKENDS.get(b, backend_kind(b))})" for b in missing)
        libraries = "".join(
            f"; {b} also needs {' / '.join(_EXECUTORCH_RUNTIME_LIBRARIES[b])} on the library path"
            for b in missing
            if b in _EXECUTORCH_RUNTIME_LIBRARIES and b in registry
        )
        message = (
            f"this .pte needs {what}, which this ExecuTorch runtime cannot run; it has: {_describe(registry)}"
            f"{libraries}. Run it on the device it was exported for, or export again with the xnnpack recipe"
        )
        raise NoNpuError(message) if any(backend_kind(b) == "npu" for b in missing) else RuntimeError(message)
    taken = "npu" if npu else ("gpu" if accelerated else "cpu")
    note = f"running on the {taken.upper()} through {', '.join(needed) or 'portable kernels'} (device {requested})"
    if "QnnBackend" in npu and platform.machine().lower() in ("x86_64", "amd64"):
        note += " (x86-64 host: QNN HTP runs in Qualcomm's simulator, not on an NPU)"
    return ExecutorchBackends(requested, taken, needed, note, names)
