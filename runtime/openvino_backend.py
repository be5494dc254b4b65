"""OpenVINO as the engine for an ONNX export folder: Intel CPUs, GPUs and NPUs (Core Ultra) (issue #16).

``OpenVinoEngine(device)`` opens each graph file of the folder with OpenVINO (``Core.read_model`` on the ``.onnx``
file, external data included, then ``compile_model``) and gives ``runtime.onnx_backend.OnnxModel`` sessions that
answer the calls it makes of onnxruntime's, so prefill, decoding, both placements and the profile are the same code.

* device: "cpu", "gpu", "npu" (OpenVINO's device names CPU / GPU / NPU) or "auto" (NPU, else GPU, else CPU). A device
  this machine's OpenVINO does not see raises NoDeviceError naming the devices it has.
* CPU and GPU run with ``INFERENCE_PRECISION_HINT`` f32 for float32 graphs: OpenVINO otherwise computes in bf16 /
  fp16 on hardware that has it, and the selection's thresholds then decide differently from onnxruntime.
* TopK is made stable (ONNX's tie rule; OpenVINO's conversion leaves it off and the selection meets ties).
* The layer-0 encoder's ``image_start`` is an overridable initializer in ONNX; OpenVINO folds initializers into
  constants, so it is turned back into an input here.
* The NPU compiler wants static shapes: the decoder's sequence and cache dims are dynamic, so an NPU compile may be
  refused by the driver; that error is reported as OpenVINO gives it.

Needs the ``openvino`` package (``pip install openvino``); nothing here imports it at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPENVINO_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
AUTO_ORDER = ("NPU", "GPU", "CPU")
_ONNX_TYPE = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)",
              "boolean": "tensor(bool)", "u8": "tensor(uint8)"}


class NoDeviceError(RuntimeError):
    """The device asked for is not one this machine's OpenVINO can use."""


@dataclass(frozen=True)
class _Meta:
    name: str
    type: str


def _meta(port) -> _Meta:
    return _Meta(port.get_any_name(), _ONNX_TYPE.get(port.get_element_type().get_type_name(), "tensor(unknown)"))


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError("the OpenVINO engine needs the openvino package: pip install openvino") from None
    return openvino


def resolve_openvino_device(device: str, available: list[str]) -> tuple[str, str]:
    """device ("cpu" / "gpu" / "npu" / "auto") and OpenVINO's available devices -> (OpenVINO device, note).

    Raises ValueError for an unknown device name, NoDeviceError when the device is not available."""
    if device == "auto":
        for name in AUTO_ORDER:
            if any(d == name or d.startswith(name + ".") for d in available):
                return name, f"running on OpenVINO's {name} (device auto: the first of NPU, GPU, CPU it has)"
    if device not in OPENVINO_DEVICES:
        raise ValueError(f"unknown device {device!r} for OpenVINO; choose one of {(*OPENVINO_DEVICES, 'auto')}")
    name = OPENVINO_DEVICES[device]
    if not any(d == name or d.startswith(name + ".") for d in available):
        hint = (" (an Intel Core Ultra NPU needs the Intel NPU driver; on other machines use device cpu)"
                if name == "NPU" else "")
        raise NoDeviceError(f"OpenVINO sees no {name} on this machine (it has: {', '.join(available) or 'none'})"
                            f"{hint}")
    return name, f"running on OpenVINO's {name}, as device {device} asks"


class OpenVinoGraph:
    """One compiled graph, with the slice of ``onnxruntime.InferenceSession``'s interface OnnxModel uses."""

    def __init__(self, core: Any, path: Path, device: str):
        import onnx

        model = core.read_model(str(path))
        _stable_topk(model)
        proto = onnx.load(str(path), load_external_data=False)
        overridable = {t.name for t in proto.graph.initializer} & {v.name for v in proto.graph.input}
        self._overridable = [_expose_constant(model, name) for name in sorted(overridable)]
        self._overridable = [meta for meta in self._overridable if meta is not None]
        floats = {port.get_element_type().get_type_name() for port in model.inputs} & {"f32"}
        config = {"INFERENCE_PRECISION_HINT": "f32"} if floats and device in ("CPU", "GPU") else {}
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self._inputs = [_meta(port) for port in self.compiled.inputs]
        self._outputs = [_meta(port) for port in self.compiled.outputs]

    def get_inputs(self) -> list[_Meta]:
        return [meta for meta in self._inputs if meta.name not in {m.name for m in self._overridable}]

    def get_outputs(self) -> list[_Meta]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[_Meta]:
        return list(self._overridable)

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer({name: np.array(value, copy=True, order="C") for name, value in feed.items()})
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return [np.array(by_name[name], copy=True) for name in names]


def _stable_topk(model: Any) -> int:
    """ONNX's TopK breaks ties by the lower index; OpenVINO's frontend (2026.4) converts it to TopK-11 with
    ``stable`` off, so equal values may come out in another order. The selection orders tokens with TopK
    (``pruner_core.primitives.stable_argsort``: there is no sort kernel in ExecuTorch) and meets ties (masked
    entries): turn ``stable`` on in every TopK, loop and branch bodies included. Returns how many."""
    count = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "TopK" and "stable" in op.get_attributes():
            op.set_attribute("stable", True)
            count += 1
        bodies = ([op.get_function()] if kind in ("TensorIterator", "Loop")
                  else [op.get_then_body(), op.get_else_body()] if kind == "If" else [])
        for body in bodies:
            count += _stable_topk(body)
    return count


def _expose_constant(model: Any, name: str) -> _Meta | None:
    """Turn the constant OpenVINO made of an overridable initializer back into a Parameter named ``name``; its
    default stays with the caller (OnnxModel passes it or the folder's recorded one)."""
    ov = _openvino()
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and name in op.output(0).get_names():
            parameter = ov.opset13.parameter(op.output(0).get_partial_shape(), op.output(0).get_element_type(),
                                             name=name)
            parameter.output(0).get_tensor().set_names({name})
            op.output(0).replace(parameter.output(0))
            model.add_parameters([parameter])
            model.validate_nodes_and_infer_types()
            return _Meta(name, _ONNX_TYPE.get(parameter.output(0).get_element_type().get_type_name(), ""))
    return None


class OpenVinoEngine:
    """The graph opener ``OnnxModel(open_graph=...)`` takes: one OpenVINO Core and device for all graphs.

    device: "cpu", "gpu", "npu" or "auto" (see the module doc); ``note`` says what was taken."""

    kind = "openvino"

    def __init__(self, device: str = "cpu"):
        ov = _openvino()
        self.core = ov.Core()
        self.ov_device, self.note = resolve_openvino_device(device, list(self.core.available_devices))
        self.device = self.ov_device.lower()
        self.version = ov.__version__

    def __call__(self, name: str, path: Path) -> OpenVinoGraph:
        try:
            return OpenVinoGraph(self.core, path, self.ov_device)
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:500]
            raise ValueError(f"OpenVINO {self.version} cannot run {path} on {self.ov_device}: {reason}; export the "
                             "model again with this version of the project (its graphs convert), or use "
                             "onnxruntime") from None
