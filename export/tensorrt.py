"""What TensorRT 10.3 (JetPack 6.2's) can parse, checked on the tensorrt flavour of a graph before it is written.

The op set is the part of onnx-tensorrt's operator matrix (docs/operators.md of its 10.x releases) that a decoder
graph can need, with the restrictions that bite: ``axes`` of Slice/Squeeze/Unsqueeze/Reduce* must be initializers,
DequantizeLinear takes INT8/INT4 with zero point 0 and positive scales ("Scale coefficients must all be positive";
blockwise when its scale has one blocked dimension), and no custom domains (onnxruntime's TensorRT EP hands
com.microsoft ops to the next provider, which would split the engine). The ONNX Attention / RMSNormalization /
RotaryEmbedding importers only arrived in TensorRT 10.14/10.15, so they are not in the set either. Checked against
that documentation only: no TensorRT runs on these machines.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgekit.runtimes.backend import TRT_SHAPE_INPUTS
from edgekit.runtimes.errors import ExportError

TENSORRT_VERSION = "10.3"
OPS: frozenset[str] = frozenset({
    "Add", "And", "ArgMax", "Cast", "Concat", "ConstantOfShape", "DequantizeLinear", "Div", "Equal", "Erf",
    "Expand", "Gather", "Gelu", "Gemm", "Greater", "Identity", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mul",
    "Neg", "Not", "Pow", "Range", "Reciprocal", "ReduceMean", "ReduceSum", "Reshape", "ScatterElements", "Shape",
    "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze",
    "Where",
})
# op -> index of the input that must be an initializer (TensorRT's "axes must be an initializer")
CONSTANT_INPUTS: dict[str, int] = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "ReduceSum": 1}
DQ_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
# op -> the inputs TensorRT reads as shape tensors (values it needs when it builds the engine, on the host)
SHAPE_POSITIONS: dict[str, tuple[int, ...]] = {
    "Slice": (1, 2, 3, 4), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ReduceMean": (1,), "ReduceSum": (1,),
}
SHAPE_ONLY = frozenset({"Shape", "Size", "ConstantOfShape"})  # their outputs' values do not depend on input values


def shape_inputs(model: onnx.ModelProto) -> set[str]:
    """The graph inputs TensorRT will treat as shape tensors: those whose values reach an input it reads as a shape
    (a Slice start, a Reshape shape, ...). Each needs value ranges in the optimization profile (onnxruntime's
    TensorRT EP reads a shape tensor's ``trt_profile_*_shapes`` entry as its values, not its dims:
    ApplyProfileShapesFromProviderOptions), and without one the EP will not build an engine from explicit
    profiles."""
    inputs = {i.name for i in model.graph.input}
    source: dict[str, set[str]] = {n: {n} for n in inputs}  # tensor -> the graph inputs its values depend on
    found: set[str] = set()
    for node in model.graph.node:  # (nodes are in topological order in a valid graph)
        for at in SHAPE_POSITIONS.get(node.op_type, ()):
            if len(node.input) > at and node.input[at]:
                found |= source.get(node.input[at], set())
        if node.op_type in SHAPE_ONLY:
            continue
        deps = set().union(*(source.get(t, set()) for t in node.input if t))
        if deps:
            for out in node.output:
                source[out] = deps
    return found


def problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT 10.3's parser would not take ``model`` whole, or the EP would not build it from the profile the
    runtime records (empty: it would)."""
    out = [f"graph input '{name}' is a TensorRT shape tensor without value ranges in the runtime's profile "
           f"(backend.TRT_SHAPE_INPUTS)" for name in sorted(shape_inputs(model) - set(TRT_SHAPE_INPUTS))]
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            out.append(f"{node.name}: {node.domain}.{node.op_type} is a custom-domain op")
        elif node.op_type not in OPS:
            out.append(f"{node.name}: {node.op_type} is not in TensorRT {TENSORRT_VERSION}'s op set")
        at = CONSTANT_INPUTS.get(node.op_type)
        if at is not None and len(node.input) > at and node.input[at] and node.input[at] not in inits:
            out.append(f"{node.name}: {node.op_type} input {at} ('{node.input[at]}') is not an initializer")
        if node.op_type == "DequantizeLinear":
            w = inits.get(node.input[0])
            if w is None or w.data_type not in DQ_TYPES:
                out.append(f"{node.name}: DequantizeLinear of a non-constant or non-int8/int4 tensor")
            zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zp is not None and onnx.numpy_helper.to_array(zp).any():
                out.append(f"{node.name}: DequantizeLinear with a non-zero zero point")
            scale = inits.get(node.input[1])
            if scale is None:
                out.append(f"{node.name}: DequantizeLinear scales must be constant")
            elif scale.data_location != onnx.TensorProto.EXTERNAL:  # (a graph loaded without its weights: unseen)
                values = onnx.numpy_helper.to_array(scale)
                if not (np.isfinite(values) & (values > 0)).all():  # TensorRT: "Scale coefficients must all be
                    out.append(f"{node.name}: DequantizeLinear scales must be positive")  # positive"
    return out


def check(model: onnx.ModelProto) -> None:
    """Refuse to write a tensorrt-flavour graph TensorRT 10.3 would not parse whole."""
    found = problems(model)
    if found:
        raise ExportError(f"The tensorrt graph has {len(found)} construct(s) TensorRT {TENSORRT_VERSION} cannot parse "
                          f"whole, e.g. {'; '.join(found[:3])}. HINT: this is an edgekit bug for this model family; "
                          "use --target cuda meanwhile.")
