"""runtime.devices: onnxruntime provider and ExecuTorch delegate selection (this machine has no NPU)."""

from __future__ import annotations

import onnxruntime
import pytest

from runtime import devices
from runtime.devices import (
    NoNpuError,
    backend_kind,
    resolve_executorch_backend,
    resolve_onnx_providers,
)

NO_NPU = ["AzureExecutionProvider", "CPUExecutionProvider"]


def _providers(monkeypatch, available: list[str]) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))


# ---- onnxruntime ---------------------------------------------------------------------------------------
def test_cpu_gives_the_cpu_provider() -> None:
    choice = resolve_onnx_providers("cpu")
    assert choice.device == "cpu" and choice.providers == ("CPUExecutionProvider",)
    assert choice.session_kwargs() == {"providers": ["CPUExecutionProvider"], "provider_options": [{}]}
    session = onnxruntime.InferenceSession(_identity_model(), **choice.session_kwargs())
    assert session.get_providers() == ["CPUExecutionProvider"]


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def test_npu_without_one_raises_and_lists_what_there_is(monkeypatch) -> None:
    _providers(monkeypatch, NO_NPU)
    with pytest.raises(NoNpuError) as raised:
        resolve_onnx_providers("npu")
    message = str(raised.value)
    assert "AzureExecutionProvider, CPUExecutionProvider" in message
    assert "pip install onnxruntime-qnn" in message and "onnxruntime-openvino" in message
    assert isinstance(raised.value, RuntimeError)


def test_npu_on_this_machine_raises() -> None:
    real = onnxruntime.get_available_providers()
    if any(name in real for name, _ in devices.NPU_ONNX_PROVIDERS):
        pytest.skip(f"this machine has an NPU provider: {real}")
    with pytest.raises(NoNpuError, match="CPUExecutionProvider"):
        resolve_onnx_providers("npu")


def test_auto_falls_back_to_cpu_and_says_so(monkeypatch) -> None:
    _providers(monkeypatch, NO_NPU)
    choice = resolve_onnx_providers("auto")
    assert choice.requested == "auto" and choice.device == "cpu"
    assert choice.providers == ("CPUExecutionProvider",)
    assert "no NPU" in choice.note and "CPU" in choice.note


@pytest.mark.parametrize(
    "available, expected, options",
    [
        (["QNNExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"], "QNNExecutionProvider",
         {"backend_type": "htp"}),
        (["CPUExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider"], "CoreMLExecutionProvider",
         {"MLComputeUnits": "CPUAndNeuralEngine"}),
        (["VitisAIExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"],
         "OpenVINOExecutionProvider", {"device_type": "NPU"}),
        (["VitisAIExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "VitisAIExecutionProvider", {}),
    ],
)
def test_npu_provider_order(monkeypatch, available, expected, options) -> None:
    _providers(monkeypatch, available)
    monkeypatch.setattr(devices, "_openvino_npu_present", lambda: None)
    for device in ("npu", "auto"):
        choice = resolve_onnx_providers(device)
        assert choice.device == "npu"
        assert choice.providers == (expected, "CPUExecutionProvider")  # CPU behind it for unsupported ops
        assert choice.provider_options == (options, {})
        assert expected in choice.note


def test_openvino_without_an_npu_is_skipped(monkeypatch) -> None:
    _providers(monkeypatch, ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(devices, "_openvino_npu_present", lambda: False)
    assert resolve_onnx_providers("auto").device == "cpu"
    with pytest.raises(NoNpuError):
        resolve_onnx_providers("npu")


@pytest.mark.parametrize("bad", ["gpu", "NPU0", "", None, 3])
def test_bad_device_is_a_value_error(bad) -> None:
    with pytest.raises(ValueError, match=r"choose one of \('cpu', 'npu', 'auto'\)"):
        resolve_onnx_providers(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choose one of"):
        resolve_executorch_backend(["XnnpackBackend"], bad, registered={"XnnpackBackend": True})  # type: ignore


# ---- ExecuTorch ----------------------------------------------------------------------------------------
HOST = {"XnnpackBackend": True, "QnnBackend": False, "OpenvinoBackend": False}  # what the x86 pip wheel reports


def test_executorch_cpu_pte() -> None:
    for device in ("cpu", "auto"):
        choice = resolve_executorch_backend(["XnnpackBackend", "XnnpackBackend"], device, registered=HOST)
        assert choice.device == "cpu" and choice.backends == ("XnnpackBackend",)
    portable = resolve_executorch_backend([], "auto", registered=HOST)
    assert portable.device == "cpu" and "portable" in portable.note


def test_executorch_npu_asked_of_a_cpu_pte_raises() -> None:
    with pytest.raises(NoNpuError) as raised:
        resolve_executorch_backend(["XnnpackBackend"], "npu", registered=HOST)
    message = str(raised.value)
    assert "CPU-only" in message and "QnnBackend (registered, not runnable here)" in message
    assert "XnnpackBackend" in message


def test_executorch_npu_pte_without_the_npu_raises() -> None:
    for device in ("npu", "auto"):
        with pytest.raises(NoNpuError, match="needs QnnBackend .*libQnnHtp.so"):
            resolve_executorch_backend(["QnnBackend", "XnnpackBackend"], device, registered=HOST)
    with pytest.raises(NoNpuError, match="CoreMLBackend .*it has: "):
        resolve_executorch_backend(["CoreMLBackend"], "npu", registered=HOST)
    with pytest.raises(ValueError, match="cannot run on the CPU"):
        resolve_executorch_backend(["QnnBackend"], "cpu", registered=HOST)
    with pytest.raises(RuntimeError, match="VulkanBackend") as raised:
        resolve_executorch_backend(["VulkanBackend"], "auto", registered=HOST)
    assert not isinstance(raised.value, NoNpuError)  # a GPU delegate is missing, not an NPU


def test_executorch_npu_pte_with_the_npu() -> None:
    phone = {"XnnpackBackend": True, "QnnBackend": True}
    for device in ("npu", "auto"):
        choice = resolve_executorch_backend(["QnnBackend", "XnnpackBackend"], device, registered=phone)
        assert choice.device == "npu" and choice.backends == ("QnnBackend", "XnnpackBackend")
    assert [backend_kind(b) for b in ("QnnBackend", "CoreMLBackend", "NeuropilotBackend", "OpenvinoBackend")] == [
        "npu"
    ] * 4
    assert backend_kind("XnnpackBackend") == "cpu" and backend_kind("VulkanBackend") == "gpu"


def test_executorch_registry_of_this_runtime() -> None:
    registry = devices.executorch_backends()
    assert registry.get("XnnpackBackend") is True
    choice = resolve_executorch_backend(["XnnpackBackend"], "auto")
    assert choice.device == "cpu" and "XnnpackBackend" in choice.registered
    if not any(registry.get(b) for b in devices.NPU_EXECUTORCH_BACKENDS):
        with pytest.raises(NoNpuError, match="XnnpackBackend"):
            resolve_executorch_backend(["XnnpackBackend"], "npu")


@pytest.mark.slow
def test_pte_backend_ids_reads_the_delegates(tmp_path) -> None:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, torch.ones(4, 4)) + 1.0

    program = torch.export.export(Tiny(), (torch.ones(2, 4),))
    pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path / "tiny.pte"
    path.write_bytes(pte.buffer)
    assert devices.pte_backend_ids(path) == ["XnnpackBackend"]
    assert resolve_executorch_backend(devices.pte_backend_ids(path), "auto").device == "cpu"
    with pytest.raises(FileNotFoundError, match="no .pte file"):
        devices.pte_backend_ids(tmp_path / "missing.pte")
