"""Model-wide checks that are about tensors, not nodes: opset, graph-input shapes, dtypes, FP16 range.

Each check yields ``(severity, code, node, op_type, message)``; for a tensor, ``node`` / ``op_type`` name its
producer (``(input)``, ``(initializer)`` or the producing node).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from hbi_export.trt_lint.report import ERROR, INFO, WARNING
from hbi_export.trt_lint.scope import STANDARD_DOMAINS, constant_node_tensor, node_label, subgraphs
from hbi_export.trt_lint.support import ONNX_TO_TOKEN, TrtSupport, dtype_name

Row = tuple[str, str, str, str, str]
FP16_MAX = 65504.0
# Precisions whose engines run (most) layers in FP16: FP16 range problems are errors there.
FP16_PRECISIONS = frozenset({"fp16", "float16", "half", "int8", "best"})


def check_opset(model: onnx.ModelProto, support: TrtSupport) -> Iterator[Row]:
    """The default-domain opset must lie in the range the TensorRT version documents."""
    version = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    if version is None:
        return
    span = f"opsets {support.opset_min} to {support.opset_max}"
    if version < support.opset_min:
        yield ERROR, "opset", "", "(model)", f"opset {version} is older than TensorRT {support.version} imports ({span})"
    elif version > support.opset_max:
        yield WARNING, "opset", "", "(model)", (f"opset {version} is newer than TensorRT {support.version} documents "
                                                f"({span}); export with opset <= {support.opset_max}")


def check_graph_inputs(graph: onnx.GraphProto) -> Iterator[Row]:
    """Only the batch axis (0) of a graph input should be dynamic; every other axis needs a static size."""
    initializers = {i.name for i in graph.initializer}
    for vi in graph.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        if not vi.type.tensor_type.HasField("shape"):
            yield WARNING, "dynamic-shape", vi.name, "(input)", f"input {vi.name!r} has no declared shape"
            continue
        dims = vi.type.tensor_type.shape.dim
        dynamic = [f"{i} ({d.dim_param or '?'})" for i, d in enumerate(dims) if i > 0 and d.dim_value <= 0]
        if dynamic:
            yield WARNING, "dynamic-shape", vi.name, "(input)", (
                f"input {vi.name!r} has dynamic axes besides the batch axis: {', '.join(dynamic)}; each needs an "
                "optimization-profile range and usually costs speed: export them static unless they must vary")


def _producers(graph: onnx.GraphProto) -> dict[str, tuple[str, str]]:
    where = {vi.name: (vi.name, "(input)") for vi in graph.input}
    where.update({i.name: (i.name, "(initializer)") for i in graph.initializer})
    for index, node in enumerate(graph.node):
        for out in node.output:
            where[out] = (node_label(node, index), node.op_type)
    return where


def check_tensor_dtypes(graph: onnx.GraphProto, support: TrtSupport) -> Iterator[Row]:
    """Every typed tensor of the top-level graph must have a type TensorRT accepts (where it is used)."""
    io_names = {vi.name for vi in (*graph.input, *graph.output)}
    typed = {i.name: i.data_type for i in graph.initializer}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            typed.setdefault(vi.name, vi.type.tensor_type.elem_type)
    producers = _producers(graph)
    for name, elem in typed.items():
        node, op = producers.get(name, (name, "(tensor)"))
        for severity, message in _dtype_problems(name, elem, name in io_names, support):
            yield severity, "dtype", node, op, message


def _dtype_problems(name: str, elem: int, is_io: bool, support: TrtSupport) -> Iterator[tuple[str, str]]:
    token = ONNX_TO_TOKEN.get(elem)
    if token is None or token not in support.accepted_types:
        yield ERROR, f"tensor {name!r} is {dtype_name(elem)}, which TensorRT does not support"
    elif token in support.cast_down_types:
        yield WARNING, f"tensor {name!r} is {dtype_name(elem)}: TensorRT casts it to FLOAT (clamped); export float32"
    elif token in support.io_only_types and not is_io:
        yield ERROR, f"tensor {name!r} is {dtype_name(elem)}, which TensorRT only accepts as a network input/output"
    elif token == "INT64" and is_io:
        yield INFO, f"tensor {name!r} is INT64: TensorRT 10 keeps it INT64, so the binding needs an int64 buffer"


def _constant_tensors(graph: onnx.GraphProto, functions) -> Iterator[tuple[str, str, str, onnx.TensorProto]]:
    """(node, op_type, tensor name, tensor) for initializers and Constant values, in subgraphs and functions too."""
    for init in graph.initializer:
        yield init.name, "(initializer)", init.name, init
    for nodes, prefix in [(graph.node, "")] + [(f.node, f"{f.domain}.{f.name}/") for f in functions]:
        for index, node in enumerate(nodes):
            tensor = constant_node_tensor(node) if node.op_type == "Constant" else None
            if tensor is not None and node.output:
                yield prefix + node_label(node, index), "Constant", node.output[0], tensor
            for sub in subgraphs(node):
                yield from _constant_tensors(sub, ())


def _fp16_problems(values: np.ndarray) -> Iterator[str]:
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        as16 = values.astype(np.float16)
    finite = np.isfinite(values)
    overflow = finite & np.isinf(as16)
    if overflow.any():
        peak = float(np.max(np.abs(values[overflow])))
        yield (f"{int(overflow.sum())} finite value(s) overflow FP16 (max |x| = {peak:.4g} > {FP16_MAX:g}); "
               "they become +-inf in FP16")
    nonzero = finite & (values != 0)
    flushed = nonzero & (as16 == 0)
    if flushed.any() and flushed.sum() * 2 >= nonzero.sum():  # "badly": at least half of the nonzero values vanish
        tiny = float(np.min(np.abs(values[flushed])))
        yield f"{int(flushed.sum())} of {int(nonzero.sum())} nonzero value(s) become 0 in FP16 (e.g. {tiny:.3g})"


def check_fp16_range(model: onnx.ModelProto, precision: str) -> Iterator[Row]:
    """Float constants must survive a cast to FP16 (errors for FP16 / INT8 builds, warnings for FP32)."""
    severity = ERROR if precision.lower() in FP16_PRECISIONS else WARNING
    for node, op, name, tensor in _constant_tensors(model.graph, model.functions):
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
            continue
        values = numpy_helper.to_array(tensor)
        for message in _fp16_problems(values):
            yield severity, "fp16-range", node, op, f"{name!r}: {message} (precision {precision})"
