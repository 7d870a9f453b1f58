"""Run the ``hbi`` custom ops of an exported graph with the numpy kernels, inside ONNX Runtime (CPU).

An exported graph holds ``hbi::WeightedTokenInteraction`` / ``hbi::TokenMerge`` nodes *and* model-local ONNX
functions of the same domain and name (the standard-op decomposition). Left alone, ONNX Runtime inlines the
functions ("function path"). To run :mod:`hbi_runtime.ops.kernels` instead ("kernel path"):

1. :func:`prepare_model_for_kernels` rewrites the model in memory: each ``hbi`` node becomes a node of the
   onnxruntime-extensions PyOp domain ``ai.onnx.contrib`` (op types :data:`KERNEL_OP_TYPES`), keeping only the
   ``clusters`` / ``k`` attributes; float16 nodes get ``Cast`` nodes around them (the PyOp API has no float16:
   onnxruntime-extensions aborts the process on it); the ``hbi`` functions that are no longer called are dropped;
2. :func:`session_options_with_kernels` registers the Python kernels and the extensions library on a
   ``SessionOptions``.

Why a rewrite: PyOps are registered under the fixed domain ``ai.onnx.contrib``, so the ``hbi`` nodes would
otherwise find no kernel and ONNX Runtime would inline the function. (When a kernel *is* registered for a node's
domain and op type, ONNX Runtime runs the kernel and ignores a model-local function of the same name; checked
with onnxruntime 1.32.) The rewrite validates the attributes (and ``clusters <= N`` where ``N`` is static)
because an exception raised inside a PyOp terminates the process instead of failing ``run``.

``onnx`` and ``onnxruntime_extensions`` are imported lazily: the runtime imports without them.
"""

from __future__ import annotations

import os
from typing import Any

from hbi_runtime.errors import BadInputError, MissingDependencyError
from hbi_runtime.ops import kernels

HBI_DOMAIN = "hbi"
KERNEL_DOMAIN = "ai.onnx.contrib"  # onnxruntime_extensions.default_opset_domain(); PyOps cannot choose another
KERNEL_OP_TYPES = {"WeightedTokenInteraction": "HbiWeightedTokenInteraction", "TokenMerge": "HbiTokenMerge"}
MERGE_ATTRIBUTES = ("clusters", "k")
_REGISTERED_KEY = "hbi.custom_ops_library"  # session config entry that marks a SessionOptions as done
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
_registered_ops: list[Any] = []  # the PyOp definitions; registered once per process (the extensions keep them)


def _import_extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise MissingDependencyError(
            f"onnxruntime-extensions is not installed ({exc}); the hbi custom-op kernels run through it",
            hint="pip install onnxruntime-extensions, or run the graph's standard-op functions (path 'function')",
        ) from exc
    return onnxruntime_extensions


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(f"onnx is not installed ({exc}); rewriting a model for the kernels needs it",
                                     hint="pip install onnx") from exc
    return onnx


def kernel_available() -> bool:
    """Whether the kernel path can run here (onnxruntime-extensions is importable)."""
    try:
        _import_extensions()
    except MissingDependencyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------

def _wti_kernel(tt, tw, tm, vt, vw, vm):
    return kernels.weighted_token_interaction(tt, tw, tm != 0, vt, vw, vm != 0)


def _merge_kernel(x, score, mask, clusters, k):
    return kernels.token_merge(x, score, mask, int(clusters), int(k))


def _register_python_ops() -> None:
    """Declare the two PyOps (float32 only) with onnxruntime-extensions, once per process."""
    if _registered_ops:
        return
    ext = _import_extensions()
    f32, i64 = ext.PyCustomOpDef.dt_float, ext.PyCustomOpDef.dt_int64
    _registered_ops.append(ext.onnx_op(op_type=KERNEL_OP_TYPES["WeightedTokenInteraction"], inputs=[f32] * 6,
                                       outputs=[f32])(_wti_kernel))
    _registered_ops.append(ext.onnx_op(op_type=KERNEL_OP_TYPES["TokenMerge"], inputs=[f32] * 3, outputs=[f32],
                                       attrs={name: i64 for name in MERGE_ATTRIBUTES})(_merge_kernel))


def session_options_with_kernels(so):
    """Register the hbi kernels on an ``onnxruntime.SessionOptions`` (idempotent) and return it.

    Use it with a model from :func:`prepare_model_for_kernels`; an unprepared model still runs its functions.

    Raises:
        MissingDependencyError: onnxruntime-extensions is not installed.
    """
    ext = _import_extensions()
    _register_python_ops()
    try:
        so.get_session_config_entry(_REGISTERED_KEY)
        return so  # registering the library twice on one SessionOptions fails at session creation
    except RuntimeError:  # no such entry: not registered yet
        pass
    so.register_custom_ops_library(ext.get_library_path())
    so.add_session_config_entry(_REGISTERED_KEY, "1")
    return so


# ---------------------------------------------------------------------------------------------------------------
# Model rewrite
# ---------------------------------------------------------------------------------------------------------------

def _load(onnx, model: bytes | str | os.PathLike):
    if isinstance(model, (bytes, bytearray)):
        from google.protobuf.message import DecodeError  # protobuf comes with onnx

        try:
            return onnx.load_model_from_string(bytes(model))
        except DecodeError as exc:
            raise BadInputError(f"model bytes | Received {len(model)} bytes that are not an ONNX model: {exc}") \
                from exc
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise BadInputError(f"model {path} | Received a path that is not a file. Note: Expected an .onnx file")
    return onnx.load(path)


def _value_types(onnx, model) -> dict[str, tuple[int, tuple]]:
    """name -> (elem_type, shape with None for unknown dims) of every typed value of the main graph."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    out = {init.name: (init.data_type, tuple(init.dims)) for init in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out[vi.name] = (tt.elem_type, dims)
    return out


def _merge_attributes(onnx, node, shape: tuple) -> dict[str, int]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    for name in MERGE_ATTRIBUTES:
        value = attrs.get(name)
        if not isinstance(value, int) or value < 1:
            raise BadInputError(f"TokenMerge node {node.name!r} | Received attribute {name}={value!r}. "
                                "Note: Expected an integer >= 1")
    n = shape[1] if len(shape) == 3 else None
    if n is not None and attrs["clusters"] > n:
        raise BadInputError(f"TokenMerge node {node.name!r} | Received clusters={attrs['clusters']} for N={n} "
                            "tokens. Note: Expected clusters <= N")
    return {name: attrs[name] for name in MERGE_ATTRIBUTES}


def _kernel_nodes(onnx, node, elem_type: int, shape: tuple, index: int) -> list:
    """The replacement of one hbi node: the PyOp node, with Casts around it for float16."""
    attrs = _merge_attributes(onnx, node, shape) if node.op_type == "TokenMerge" else {}
    op_type, make = KERNEL_OP_TYPES[node.op_type], onnx.helper.make_node
    if elem_type == _FLOAT:
        return [make(op_type, list(node.input), list(node.output), name=node.name, domain=KERNEL_DOMAIN, **attrs)]
    prefix = f"hbi_kernel_{index}"
    casts = [make("Cast", [name], [f"{prefix}/in{i}"], name=f"{prefix}/cast_in{i}", to=_FLOAT)
             for i, name in enumerate(node.input)]
    kernel = make(op_type, [c.output[0] for c in casts], [f"{prefix}/out"], name=node.name or prefix,
                  domain=KERNEL_DOMAIN, **attrs)
    back = make("Cast", [f"{prefix}/out"], [node.output[0]], name=f"{prefix}/cast_out", to=_FLOAT16)
    return [*casts, kernel, back]


def _uses_domain(graph, functions, domain: str) -> set[str]:
    """Op types of ``domain`` still called by the main graph or by any local function."""
    nodes = [*graph.node, *(n for f in functions for n in f.node)]
    return {n.op_type for n in nodes if n.domain == domain}


def prepare_model_for_kernels(model: bytes | str | os.PathLike) -> bytes:
    """Rewrite an exported model so that ONNX Runtime runs the numpy kernels of its hbi nodes.

    Only nodes of the main graph are rewritten (the exporter puts them nowhere else). Load the result with
    ``onnxruntime.InferenceSession(prepared, session_options_with_kernels(so))``.

    Args:
        model: the serialized model, or the path of an ``.onnx`` file (external data is loaded and inlined).

    Returns:
        The serialized rewritten model.

    Raises:
        MissingDependencyError: onnx is not installed.
        BadInputError: the model cannot be read, an hbi node has an input that is neither float32 nor float16, or
            bad ``clusters`` / ``k`` attributes.
    """
    onnx = _import_onnx()
    proto = _load(onnx, model)
    targets = [i for i, n in enumerate(proto.graph.node) if n.domain == HBI_DOMAIN and n.op_type in KERNEL_OP_TYPES]
    if not targets:
        return proto.SerializeToString()
    types = _value_types(onnx, proto)
    new_nodes = []
    for i, node in enumerate(proto.graph.node):
        if i not in targets:
            new_nodes.append(node)
            continue
        elem_type, shape = types.get(node.input[0], (0, ()))
        if elem_type not in (_FLOAT, _FLOAT16):
            raise BadInputError(f"{node.op_type} node {node.name!r} | Received input {node.input[0]!r} of ONNX "
                                f"element type {elem_type}. Note: Expected float (1) or float16 (10)")
        new_nodes.extend(_kernel_nodes(onnx, node, elem_type, shape, i))
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    _drop_unused_hbi(proto)
    return proto.SerializeToString()


def _drop_unused_hbi(proto) -> None:
    """Remove the hbi functions nothing calls any more, fix the opset imports (kernel domain in, hbi if unused)."""
    while True:  # to a fixed point: a dropped function may have been the only caller of an hbi helper function
        called = _uses_domain(proto.graph, proto.functions, HBI_DOMAIN)
        keep = [f for f in proto.functions if f.domain != HBI_DOMAIN or f.name in called]
        if len(keep) == len(proto.functions):
            break
        del proto.functions[:]
        proto.functions.extend(keep)
    imports = [o for o in proto.opset_import if o.domain != KERNEL_DOMAIN and (o.domain != HBI_DOMAIN or called)]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    proto.opset_import.add(domain=KERNEL_DOMAIN, version=1)

