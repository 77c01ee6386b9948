"""Store a graph's large frozen weights in float16, cast back to float32 inside the graph.

A device holds every head weight once per open graph; in float16 that is half the bytes on disk
and at rest in memory. The graph stays standard ONNX and its arithmetic float32: each use of a
weight reads a float32 copy cast from the FLOAT16 initializer just for that use. The function
the device computes changes by the rounding of the weights (relative error ~5e-4 per weight),
which the exporter's tests bound.

Each cast is gated on an activation of the node that uses it, so that onnxruntime cannot run it
before that activation exists. Its scheduler runs every node whose inputs are ready, and a cast
of an initializer is ready at once: ungated, all the float32 copies were made first and lived
together through the whole call (+30 MB at the peak of a ViT-Base head, as much as the fp16
saving). The gate is `Reshape(weight, Concat(shape, Shape(activation)[0:0]))`: the weight's own
shape, computed after the activation; the reshape is a view.

The runtime must not let onnxruntime fold the casts back into float32 constants (that would
undo the saving): it opens such graphs with constant folding off and at the "extended"
optimisation level (the "all" level folds them too). The device manifest says which bundles
need that (`extra["head_weights"] == "fp16"`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HALF_WEIGHTS_KEY = "sfprompt.half_weights"  # metadata: "1" where weights are stored as float16
MIN_ELEMENTS = 4096  # smaller weights (norms, biases) stay float32: no saving worth a cast


def halve_weights(path: Path, min_elements: int = MIN_ELEMENTS) -> int:
    """Rewrite the ONNX file at `path` in place; return how many weights were halved."""
    model = onnx.load(str(path))
    graph = model.graph
    halved = {i.name for i in graph.initializer if _worth_halving(i, min_elements)}
    constants = _constant_values(graph)
    nodes = list(graph.node)
    added: list[onnx.NodeProto] = []
    for index, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            if name in halved:
                gate = _gate(nodes, index, constants)
                cast_nodes, cast_name = _gated_cast(name, f"{name}.use{index}.{slot}", gate)
                added.extend(cast_nodes)
                node.input[slot] = cast_name
    kept = [_half(i) if i.name in halved else i for i in graph.initializer]
    kept += [_shape_constant(graph, name) for name in sorted(halved)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(_topological(added + nodes, {i.name for i in kept}, graph))
    helper.set_model_props(model, {**_props(model), HALF_WEIGHTS_KEY: "1"})
    onnx.save_model(model, str(path))
    return len(halved)


def _worth_halving(init: onnx.TensorProto, min_elements: int) -> bool:
    return init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements


def _half(init: onnx.TensorProto) -> onnx.TensorProto:
    half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16))
    half.name = f"{init.name}.fp16"
    return half


def _shape_constant(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    dims = next(i.dims for i in graph.initializer if i.name == name)
    return numpy_helper.from_array(np.array(dims, np.int64), f"{name}.shape")


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """Every value computed from initializers alone (nodes are in topological order)."""
    constants = {i.name for i in graph.initializer}
    for node in graph.node:
        if all(name in constants for name in node.input if name):
            constants.update(node.output)
    return constants


def _gate(nodes: list[onnx.NodeProto], index: int, constants: set[str]) -> str:
    """An activation the weight's use at `nodes[index]` waits for anyway: one of that node's
    inputs, or, where it reads constants only (a weight's transpose), the first activation a
    node downstream of it reads."""
    frontier = {*nodes[index].output}
    for node in nodes[index:]:
        if node is not nodes[index] and not frontier.intersection(node.input):
            continue
        activations = [n for n in node.input if n and n not in constants]
        if activations:
            return activations[0]
        frontier.update(node.output)
    raise ValueError(f"{nodes[index].name or nodes[index].op_type}: no activation downstream")


def _gated_cast(weight: str, prefix: str, gate: str) -> tuple[list[onnx.NodeProto], str]:
    """float32 `weight`, computed only once `gate` exists (module docstring)."""
    empty, shape, view, out = (f"{prefix}.{s}" for s in ("gate", "shape", "view", "fp32"))
    return [
        helper.make_node("Shape", [gate], [empty], start=0, end=0),
        helper.make_node("Concat", [f"{weight}.shape", empty], [shape], axis=0),
        helper.make_node("Reshape", [f"{weight}.fp16", shape], [view]),
        helper.make_node("Cast", [view], [out], to=onnx.TensorProto.FLOAT),
    ], out


def _topological(
    nodes: Iterable[onnx.NodeProto], initializers: set[str], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """`nodes` in an order ONNX accepts, each as early as its inputs allow (Kahn, stable)."""
    ready = initializers | {i.name for i in graph.input} | {""}
    pending, ordered = list(nodes), []
    while pending:
        still = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ValueError(f"{len(still)} nodes wait on values no node computes")
        pending = still
    return ordered


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
