"""Store a graph's large frozen weights in float16, cast back to float32 inside the graph.

A device holds every head weight once per open graph; in float16 that is half the bytes on disk
and at rest in memory. The graph stays standard ONNX: each weight becomes a FLOAT16 initializer
followed by a `Cast` to FLOAT under the weight's old name, so no other node changes and the
arithmetic stays float32. The function the device computes changes by the rounding of the
weights (relative error ~5e-4 per weight), which the exporter's tests bound.

The runtime must not let onnxruntime fold those casts back into float32 constants (that would
undo the saving): it opens such graphs with constant folding off and at the "extended"
optimisation level (the "all" level folds them too). The device manifest says which bundles
need that (`extra["head_weights"] == "fp16"`).
"""

from __future__ import annotations

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
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16))
        half.name = f"{init.name}.fp16"
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(_each_cast_before_its_first_use(casts, nodes))
    helper.set_model_props(model, {**_props(model), HALF_WEIGHTS_KEY: "1"})
    onnx.save_model(model, str(path))
    return len(casts)


def _each_cast_before_its_first_use(
    casts: list[onnx.NodeProto], nodes: list[onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """Node order onnxruntime follows: a weight's float32 copy then lives from just before its
    first use to its last, not from the start of the graph."""
    pending = {cast.output[0]: cast for cast in casts}
    ordered = []
    for node in nodes:
        for name in node.input:
            if name in pending:
                ordered.append(pending.pop(name))
        ordered.append(node)
    return ordered + list(pending.values())


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
