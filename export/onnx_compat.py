"""Graph rewrites that let other ONNX consumers than onnxruntime read the exported graphs (issue #16: OpenVINO).

The dynamo exporter lowers the selection's ``scan`` to an ONNX ``Scan`` whose body reads tensors of the enclosing
graph directly (the similarity matrix, the grid positions, the round thresholds): ONNX allows that (outer-scope
values), onnxruntime runs it, but OpenVINO's ONNX frontend (2026.4) converts a ``Scan`` only when every tensor its
body reads comes in as a ``Scan`` input ("Number of Scan node inputs (12) is less than required (13)").
``explicit_scan_inputs`` passes each such tensor in as one more loop-carried state that the body returns unchanged
(small constants -- axes, shapes, scalars -- are copied into the body instead: OpenVINO infers ranks from their
values): same values, same outputs, a graph both runtimes read.
"""

from __future__ import annotations

from typing import Any, Iterator


def _subgraphs(node) -> Iterator[Any]:
    import onnx

    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _defined(graph) -> set[str]:
    names = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    names |= {tensor.name for tensor in graph.sparse_initializer}
    for node in graph.node:
        names.update(output for output in node.output if output)
    return names


def free_names(graph) -> set[str]:
    """Names a graph (its subgraphs included) reads but does not define: the outer-scope values it uses."""
    defined = _defined(graph)
    free: set[str] = set()
    for node in graph.node:
        free.update(name for name in node.input if name and name not in defined)
        for body in _subgraphs(node):
            free.update(name for name in free_names(body) if name not in defined)
    free.update(value.name for value in graph.output if value.name not in defined)
    return free


def _rename_uses(graph, old: str, new: str) -> None:
    """Replace reads of ``old`` in graph and its subgraphs (a subgraph that defines ``old`` itself keeps it)."""
    if old in _defined(graph):
        return
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for body in _subgraphs(node):
            _rename_uses(body, old, new)
    for value in graph.output:
        if value.name == old:
            value.name = new


def _value_types(model) -> dict[str, Any]:
    """name -> TypeProto for every typed value of the model and its subgraphs (inputs, outputs, value_info,
    initializers)."""
    import onnx

    types: dict[str, Any] = {}

    def visit(graph) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                types.setdefault(value.name, value.type)
        for tensor in graph.initializer:
            types.setdefault(tensor.name, onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
        for node in graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        t = attribute.t
                        types.setdefault(node.output[0], onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
            for body in _subgraphs(node):
                visit(body)

    visit(model.graph)
    return types


def explicit_scan_inputs(model) -> int:
    """Rewrite every ``Scan`` of ``model`` (an ``onnx.ModelProto``, changed in place; subgraphs included) so its body
    reads no outer-scope value: each one becomes an extra loop-carried state (node input, body input, body output
    through an ``Identity``, node output) inserted after the existing states. Returns the number of values made
    explicit. Raises ValueError when a value's type is unknown (the graph lacks value_info for it)."""
    return _rewrite_graph(model.graph, _value_types(model), _constants(model.graph))


# outer constants up to this many elements are copied into the body (axes, shapes, scalars: OpenVINO infers ranks
# from their values); larger tensors come in as carried states
COPIED_CONSTANT_ELEMENTS = 16


def constant_tensors(graph) -> Iterator[tuple[str, Any]]:
    """(name, TensorProto) of every initializer and Constant node value in graph and its subgraphs."""
    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            yield node.output[0], node.attribute[0].t
        for body in _subgraphs(node):
            yield from constant_tensors(body)


def _constants(graph) -> dict[str, Any]:
    return dict(constant_tensors(graph))


def _rewrite_graph(graph, types: dict[str, Any], constants: dict[str, Any]) -> int:
    import math

    import onnx

    count, copies = 0, []
    for node in graph.node:
        for body in _subgraphs(node):
            count += _rewrite_graph(body, types, constants)
        if node.op_type != "Scan":
            continue
        body = next(_subgraphs(node))
        scan_inputs = next(a.i for a in node.attribute if a.name == "num_scan_inputs")
        states = len(node.input) - scan_inputs
        seen: set[str] = set()
        for index, name in enumerate(node.input):  # one value feeding two states: OpenVINO loses one's updates
            if name in seen:
                distinct = f"{name}__{node.name}_state{index}"
                copies.append((node, onnx.helper.make_node("Identity", [name], [distinct], name=f"{distinct}_identity")))
                node.input[index] = distinct
                count += 1
            seen.add(name)
        free = sorted(free_names(body))
        for name in free:
            tensor = constants.get(name)
            if tensor is not None and math.prod(tensor.dims) <= COPIED_CONSTANT_ELEMENTS:
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = f"{name}__{node.name}_const"
                _rename_uses(body, name, copy.name)
                body.initializer.append(copy)
                count += 1
        for offset, name in enumerate(sorted(free_names(body))):
            if name not in types:
                raise ValueError(f"Scan {node.name!r} reads {name!r}, whose type the graph does not record; "
                                 "run onnx.shape_inference on it first")
            carried, returned = f"{name}__{node.name}_in", f"{name}__{node.name}_out"
            _rename_uses(body, name, carried)
            position = states + offset
            body.input.insert(position, onnx.helper.make_value_info(carried, types[name]))
            body.output.insert(position, onnx.helper.make_value_info(returned, types[name]))
            body.node.append(onnx.helper.make_node("Identity", [carried], [returned], name=f"{returned}_identity"))
            node.input.insert(position, name)
            node.output.insert(position, f"{name}__{node.name}_final")
            count += 1
    for scan, copy in copies:  # right before their Scan: they read what it reads
        index = next(i for i, node in enumerate(graph.node) if node is scan)
        graph.node.insert(index, copy)
    return count


def scans_to_loops(model) -> int:
    """Rewrite every forward ``Scan`` over one input along axis 0 (what the exporter makes of ``torch`` ``scan``)
    into the equivalent ``Loop``: the trip count is the input's length, each step reads its slice with a ``Gather``
    on the iteration number, scan outputs stack the same way. OpenVINO's ``Scan`` conversion (2026.4.1) loses the
    updates of some loop-carried states over many steps (one step matches onnxruntime, the whole loop does not);
    its ``Loop`` conversion keeps them. Run after ``explicit_scan_inputs`` (the body reads no outer value).
    Returns how many were rewritten."""
    return _loops(model.graph, _value_types(model))


def _attribute(node, name: str, default=None):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _loops(graph, types: dict[str, Any]) -> int:
    from onnx import TensorProto, helper

    count = 0
    for index, node in enumerate(list(graph.node)):
        for body in _subgraphs(node):
            count += _loops(body, types)
        if node.op_type != "Scan" or _attribute(node, "num_scan_inputs") != 1:
            continue
        if any(any(_attribute(node, key) or []) for key in
               ("scan_input_axes", "scan_input_directions", "scan_output_axes", "scan_output_directions")):
            continue  # only the forward, axis-0 form is rewritten
        body = next(_subgraphs(node))
        states = len(node.input) - 1
        xs = node.input[-1]
        xs_shape = types[xs].tensor_type.shape.dim if xs in types else []
        if not xs_shape or not xs_shape[0].HasField("dim_value"):
            continue
        prefix = f"{node.name}_loop"
        trip = helper.make_tensor(f"{prefix}_trip_count", TensorProto.INT64, [], [xs_shape[0].dim_value])
        graph.initializer.append(trip)
        step_input = body.input[states]  # the slice of xs this step reads
        iteration, condition = f"{prefix}_iteration", f"{prefix}_condition"
        xs_in, xs_out = f"{prefix}_xs_in", f"{prefix}_xs_out"
        new_inputs = [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
                      helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
                      *list(body.input)[:states], helper.make_value_info(xs_in, types[xs])]
        gather = helper.make_node("Gather", [xs_in, iteration], [step_input.name], name=f"{prefix}_slice", axis=0)
        keep_going = helper.make_node("Identity", [condition], [f"{prefix}_condition_out"],
                                      name=f"{prefix}_condition_identity")
        pass_xs = helper.make_node("Identity", [xs_in], [xs_out], name=f"{prefix}_xs_identity")
        outputs = list(body.output)
        new_outputs = [helper.make_tensor_value_info(f"{prefix}_condition_out", TensorProto.BOOL, []),
                       *outputs[:states], helper.make_value_info(xs_out, types[xs]), *outputs[states:]]
        nodes = [gather, keep_going, pass_xs, *body.node]
        loop_body = helper.make_graph(nodes, body.name, new_inputs, new_outputs, list(body.initializer))
        loop_body.value_info.extend(body.value_info)
        node_outputs = list(node.output)
        loop = helper.make_node(
            "Loop", [trip.name, "", *list(node.input)[:states], xs],
            [*node_outputs[:states], f"{prefix}_xs_final", *node_outputs[states:]], name=node.name, body=loop_body,
        )
        graph.node.remove(node)
        graph.node.insert(index, loop)
        count += 1
    return count


def drop_unused_initializers(model) -> int:
    """Remove initializers nothing reads (after ``explicit_scan_inputs`` copied small constants into loop bodies,
    their outer originals may be left unread; onnxruntime warns about each at every session). Overridable ones
    (also graph inputs) stay. Returns how many were removed."""
    graphs = [model.graph]
    read: set[str] = set()
    while graphs:
        graph = graphs.pop()
        read.update(value.name for value in graph.output)
        for node in graph.node:
            read.update(name for name in node.input if name)
            graphs.extend(_subgraphs(node))

    def prune(graph) -> int:
        keep = {value.name for value in graph.input} | read
        unused = [tensor for tensor in graph.initializer if tensor.name not in keep]
        for tensor in unused:
            graph.initializer.remove(tensor)
        return len(unused) + sum(prune(body) for node in graph.node for body in _subgraphs(node))

    return prune(model.graph)


def portable_loops(model) -> int:
    """The rewrite the exporter applies to every graph (``model``: an ``onnx.ModelProto``, changed in place):
    ``explicit_scan_inputs``, then ``scans_to_loops``, then ``drop_unused_initializers`` for the outer constants
    the loop bodies now carry copies of. Returns the number of Scans rewritten into Loops."""
    explicit_scan_inputs(model)
    loops = scans_to_loops(model)
    drop_unused_initializers(model)
    return loops
