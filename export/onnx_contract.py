"""The ONNX graphs' contract: the exporter's symbolic dims renamed to the contract's names, and a check of every
graph input and output (name, dtype, shape) against its ``GraphPlan``. Dim expressions (``past_sequence_length +
sequence_length``) compare by value at a few random points.
"""

from __future__ import annotations

import ast
import random
import re
from typing import Any

import numpy as np

from .onnx_graphs import GraphPlan

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def apply_contract(model, plan: GraphPlan) -> None:
    """Rename the exporter's symbolic dims (``s13``, ``s13 + s29``) to the contract's names and check every graph
    input and output (name, dtype, shape) against ``plan``; a mismatch is an exporter change this code must follow."""
    graph = model.graph
    mapping = _symbol_mapping(graph.input, plan.inputs)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = _SYMBOL.sub(lambda m: mapping.get(m.group(), m.group()), dim.dim_param)
    check_contract(model, plan, set_names=True)


def _symbol_mapping(values, specs: list[dict[str, Any]]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value, spec in zip(values, specs):
        for dim, want in zip(value.type.tensor_type.shape.dim, spec["shape"]):
            if dim.HasField("dim_param") and isinstance(want, str) and want.isidentifier():
                mapping.setdefault(dim.dim_param, want)
    return mapping


def check_contract(model, plan: GraphPlan, set_names: bool = False) -> None:
    """Raise unless the graph's inputs and outputs are exactly ``plan``'s (same order, dtype, equivalent shapes)."""
    graph = model.graph
    for kind, values, specs in (("input", graph.input, plan.inputs), ("output", graph.output, plan.outputs)):
        names = [value.name for value in values]
        if names != [spec["name"] for spec in specs]:
            expected = [spec["name"] for spec in specs]
            raise RuntimeError(f"{plan.name}: graph {kind}s are {names}, the contract says {expected}")
        for value, spec in zip(values, specs):
            _check_value(plan.name, value, spec, set_names, frozenset(plan.data_dependent_dims))


def _check_value(graph_name: str, value, spec: dict[str, Any], set_names: bool,
                 data_dependent: frozenset[str] = frozenset()) -> None:
    import onnx

    tensor_type = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    where = f"{graph_name}: {value.name}"
    if dtype != spec["dtype"]:
        raise RuntimeError(f"{where} is {dtype}, the contract says {spec['dtype']}")
    dims = tensor_type.shape.dim
    if len(dims) != len(spec["shape"]):
        raise RuntimeError(f"{where} has rank {len(dims)}, the contract says shape {spec['shape']}")
    for dim, want in zip(dims, spec["shape"]):
        actual = dim.dim_param if dim.HasField("dim_param") else dim.dim_value if dim.HasField("dim_value") else None
        if (actual is None or want in data_dependent) and set_names:  # unknown or decided at run time (an If's
            actual = want  # branches disagree): record the contract's name
        if isinstance(want, int) and actual != want:
            raise RuntimeError(f"{where} has dim {actual!r} where the contract has {want}")
        if isinstance(want, str):
            if not isinstance(actual, str) or not same_expression(actual, want):
                raise RuntimeError(f"{where} has dim {actual!r} where the contract has {want!r}")
            if set_names:
                dim.dim_param = want


def evaluate_dim(expression: str, values: dict[str, int]) -> int:
    """The value of a dim expression such as ``past_sequence_length + sequence_length`` (+, -, *, // of names and
    integers); raises ValueError for anything else."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__}
            if type(node.op) in ops:
                return ops[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported dim expression {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def same_expression(a: str, b: str) -> bool:
    """Whether two dim expressions agree at a few random points (``s0 + s1`` == ``s1 + s0``)."""
    names = set(_SYMBOL.findall(a)) | set(_SYMBOL.findall(b))
    rng = random.Random(0)
    try:
        for _ in range(4):
            values = {name: rng.randrange(1000, 100000) for name in names}
            if evaluate_dim(a, values) != evaluate_dim(b, values):
                return False
    except ValueError:
        return False
    return True
