"""Per-node checks of a standard-domain ONNX node against one TensorRT support table.

The machine-checkable restrictions are data (the ``checks`` list of an operator in ``trt_*.json``); each
``kind`` below has one small function:

- ``attr_in``: attribute ``attr`` (or its ``default``) must be one of ``allowed``;
- ``attr_all_ones``: integer-list attribute ``attr`` must be empty or all ones (pool dilations);
- ``attr_absent``: none of ``attrs`` may be set;
- ``input_absent``: the optional inputs at ``inputs`` may not be given;
- ``max_outputs``: at most ``count`` outputs may be used;
- ``input_dtype``: input ``input`` must have one of the ``allowed`` types;
- ``input_constant``: input ``input`` must be known at build time. ``strict``: an initializer / Constant
  (a computed value is a warning: fold constants first); otherwise anything TensorRT can fold (only a graph
  input is an error). ``required: false`` only checks the value when it is constant. ``all_equal`` /
  ``max_exclusive`` constrain the value.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import onnx

from hbi_export.trt_lint.report import ERROR, WARNING
from hbi_export.trt_lint.scope import Scope, attribute_value, has_attribute
from hbi_export.trt_lint.support import ONNX_TO_TOKEN, OpSupport, TrtSupport, dtype_name

# A check yields (severity, code, message) triples for one node.
Issue = tuple[str, str, str]


def _attr_in(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    value = attribute_value(node, chk["attr"])
    if value is None:
        return  # absent (default is allowed) or bound to a function attribute (unknown here)
    if value not in chk["allowed"]:
        allowed = ", ".join(repr(a) for a in chk["allowed"])
        yield ERROR, "attribute", f"{chk['attr']}={value!r} is not supported (allowed: {allowed})"


def _attr_all_ones(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    value = attribute_value(node, chk["attr"])
    if value and any(v != 1 for v in value):
        yield ERROR, "attribute", f"{chk['attr']}={list(value)} is not supported (must be empty or all ones)"


def _attr_absent(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    for name in chk["attrs"]:
        if has_attribute(node, name):
            yield ERROR, "attribute", f"attribute {name!r} is not supported"


def _input_absent(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    names = chk.get("names", [])
    for pos, idx in enumerate(chk["inputs"]):
        if idx < len(node.input) and node.input[idx]:
            label = names[pos] if pos < len(names) else f"#{idx}"
            yield ERROR, "input", f"optional input {label} is not supported"


def _max_outputs(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    used = [i for i, name in enumerate(node.output) if name and i >= chk["count"]]
    if used:
        yield ERROR, "output", f"only the first {chk['count']} output(s) are supported; outputs {used} are used"


def _input_dtype(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    idx = chk["input"]
    if idx < len(node.input) and node.input[idx] in scope.dtypes:
        token = ONNX_TO_TOKEN.get(scope.dtypes[node.input[idx]])
        if token not in chk["allowed"]:
            found = token or dtype_name(scope.dtypes[node.input[idx]])
            yield ERROR, "dtype", f"input {chk.get('name', idx)} must be {'/'.join(chk['allowed'])}, not {found}"


def _input_constant(node: onnx.NodeProto, chk: dict[str, Any], scope: Scope) -> Iterator[Issue]:
    idx, label = chk["input"], chk.get("name", f"#{chk['input']}")
    if idx >= len(node.input) or not node.input[idx] or node.input[idx] in scope.formal:
        return  # absent optional input, or a function parameter (decided at the call site)
    name, required = node.input[idx], chk.get("required", True)
    if name in scope.constants:
        yield from _constant_value(scope.value(name), chk, label)
    elif name in scope.runtime and required:
        yield ERROR, "input-constant", f"input {label} ({name!r}) is a graph input; it must be a build-time constant"
    elif chk.get("strict") and required:
        yield (WARNING, "input-constant", f"input {label} ({name!r}) is computed; TensorRT needs an "
               "initializer here (fold constants first, e.g. `polygraphy surgeon sanitize --fold-constants`)")


def _constant_value(value: np.ndarray | None, chk: dict[str, Any], label: str) -> Iterator[Issue]:
    if value is None:
        return
    if "all_equal" in chk and np.any(value != chk["all_equal"]):
        yield ERROR, "input-constant", f"input {label} must be {chk['all_equal']} everywhere"
    if "max_exclusive" in chk and value.size and np.max(value) >= chk["max_exclusive"]:
        yield ERROR, "input-constant", f"input {label}={int(np.max(value))} must be below {chk['max_exclusive']}"


CHECKS: dict[str, Callable[[onnx.NodeProto, dict[str, Any], Scope], Iterator[Issue]]] = {
    "attr_in": _attr_in, "attr_all_ones": _attr_all_ones, "attr_absent": _attr_absent,
    "input_absent": _input_absent, "max_outputs": _max_outputs, "input_dtype": _input_dtype,
    "input_constant": _input_constant,
}


def _operand_dtype(node: onnx.NodeProto, scope: Scope) -> int | None:
    """The type TensorRT's table is about: the first input's, or the first output's for source ops."""
    names = [n for n in node.input[:1] if n] or [n for n in node.output[:1] if n]
    return scope.dtypes.get(names[0]) if names else None


def _op_types(node: onnx.NodeProto, op: OpSupport, scope: Scope) -> Iterator[Issue]:
    elem = _operand_dtype(node, scope)
    if elem is None or not op.types:
        return
    token = ONNX_TO_TOKEN.get(elem)
    if token not in op.types:
        # A warning: the table documents the common cases and is not the parser; check the build log.
        yield (WARNING, "dtype", f"{token or dtype_name(elem)} is not among the types listed for {op.name} "
               f"({', '.join(op.types)})")


def _cast_target(node: onnx.NodeProto, support: TrtSupport) -> Iterator[Issue]:
    to = attribute_value(node, "to")
    if node.op_type in ("Cast",) and isinstance(to, int) and ONNX_TO_TOKEN.get(to) not in support.accepted_types:
        yield ERROR, "dtype", f"casts to {dtype_name(to)}, which TensorRT does not support"


def check_standard_node(node: onnx.NodeProto, support: TrtSupport, scope: Scope) -> Iterator[Issue]:
    """Every issue of one standard-domain node: operator support, restrictions, listed types."""
    op = support.ops.get(node.op_type)
    if op is None:
        yield ERROR, "unsupported-op", (f"{node.op_type} is not in TensorRT's ONNX operator list (it would "
                                        "need a plugin of that name)")
        return
    if not op.supported:
        note = f": {op.restrictions}" if op.restrictions else ""
        yield ERROR, "unsupported-op", f"TensorRT has no importer for {node.op_type}{note}"
        return
    for chk in op.checks:
        yield from CHECKS[chk["kind"]](node, chk, scope)
    yield from _op_types(node, op, scope)
    yield from _cast_target(node, support)
