"""Store a graph's frozen matrix weights in int8 and multiply them in int8: a quarter of the
bytes, and the products run on the CPU's integer dot-product units.

onnxruntime's dynamic quantization rewrites every MatMul whose second operand is a weight into
standard ONNX: `DynamicQuantizeLinear` (the activation, per call, one uint8 scale and zero point
per tensor) -> `MatMulInteger` (int32 sums against the weight, int8 with one scale per output
column) -> `Cast` and `Mul` back to float32. At load time onnxruntime fuses the three into one
kernel with the weight pre-packed (x86: VNNI / AMX; aarch64: the sdot / udot of Cortex-A76 and
later). Products of two activations (attention scores) stay float32; the patch embedding is a
product too in the device's graphs (patch_product.py), so it is quantized with the others.

Unlike fp16 weights (half_weights.py) this changes the arithmetic, not just the weights: each
product rounds its activation to 8 bits too, so h moves by about 1% and the prompt's gradient by
a few percent (relative, max-norm) at one ViT-Base block; the exporter's tests bound it. The
device manifest says `extra["head_weights"] == "int8"`; the runtime needs nothing special.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT8_WEIGHTS_KEY = "sfprompt.int8_weights"  # metadata: "1" where weights are stored as int8
MIN_ELEMENTS = 4096  # a graph whose matrices are all smaller is left as it is


def quantize_weights(path: Path, min_elements: int = MIN_ELEMENTS) -> int:
    """Rewrite the ONNX file at `path` in place; return how many products were quantized
    (every product by a constant matrix, where the graph has one of `min_elements` or more)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # export-side only

    model = onnx.load(str(path))
    fold_weight_transposes(model.graph)
    if not weight_products(model.graph, min_elements):
        return 0
    with tempfile.TemporaryDirectory() as tmp, _root_logger_quiet():
        quantized = Path(tmp) / path.name
        quantize_dynamic(
            model,
            quantized,
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],  # a Gemm becomes MatMul + Add first
            extra_options={"MatMulConstBOnly": True},  # never a product of two activations
        )
        model = onnx.load(str(quantized))
    count = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**props, INT8_WEIGHTS_KEY: "1"})
    onnx.save_model(model, str(path))
    return count


@contextlib.contextmanager
def _root_logger_quiet() -> Iterator[None]:
    """The quantizer logs a warning per call on the root logger ("run pre-processing"): its
    pre-processing is shape inference and constant folding, which our graphs have had."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def weight_products(graph: onnx.GraphProto, min_elements: int = MIN_ELEMENTS) -> list[str]:
    """The names of the MatMul and Gemm nodes that multiply by a float32 matrix weight of
    >= `min_elements` (their second operand)."""
    weights = {
        i.name
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT
        and len(i.dims) == 2
        and int(np.prod(i.dims)) >= min_elements
    }
    return [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights
    ]


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Replace each `Transpose` of a matrix weight by the transposed weight, so that the product
    reading it multiplies by a weight the quantizer sees (backward graphs multiply by W^T)."""
    weights = {i.name: i for i in graph.initializer if len(i.dims) == 2}
    folded = [
        n
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in weights and _perm(n) == [1, 0]
    ]
    for node in folded:
        array = numpy_helper.to_array(weights[node.input[0]]).T.copy()
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return len(folded)


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
