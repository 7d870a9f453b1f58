"""Lint one ONNX model for one TensorRT version: ``lint_model``.

How TensorRT's ONNX parser resolves a node decides what is checked (onnx-tensorrt, docs/Changelog.md): a
native importer first; otherwise a model-local function of that name is inlined (TensorRT <= 10.6), or a
registered plugin of that op_type is used (preferred over the function from 10.7; the ONNX domain is ignored,
the plugin is matched by the ``plugin_namespace`` / ``plugin_version`` attributes). So:

- standard-domain nodes must be importable (``checks.check_standard_node``);
- a custom node with a model-local function is linted through the function BODY, since that body is what
  TensorRT builds whenever the plugin is not loaded;
- ``hbi`` nodes must also carry ``plugin_namespace="hbi"`` and ``plugin_version="1"`` so that the plugin can
  be matched; a custom node without a function needs a plugin and is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import onnx

from hbi_export.trt_lint.checks import check_standard_node
from hbi_export.trt_lint.report import ERROR, WARNING, Finding
from hbi_export.trt_lint.scope import (STANDARD_DOMAINS, Scope, attribute_value, function_scope, graph_scope,
                                       node_label, subgraphs)
from hbi_export.trt_lint.support import TrtSupport, load_support
from hbi_export.trt_lint.tensors import check_fp16_range, check_graph_inputs, check_opset, check_tensor_dtypes

HBI_DOMAIN = "hbi"
HBI_OPS = ("WeightedTokenInteraction", "TokenMerge")
PLUGIN_ATTRIBUTES = {"plugin_namespace": "hbi", "plugin_version": "1"}


@dataclass
class _Context:
    """State of one ``lint_model`` call."""

    support: TrtSupport
    requested: str            # the version name as asked for ("current"), recorded in each finding
    graph: str
    precision: str
    linted_functions: set[tuple[str, str]] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, code: str, node: str, op_type: str, message: str,
            function: str | None = None) -> None:
        self.findings.append(Finding(severity, code, self.graph, node, op_type, message, (self.requested,), function))


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value infos (dtypes of intermediate tensors); the model itself if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return model  # dtype checks then only see declared types


def lint_model(model: onnx.ModelProto, trt_version: str = "current", *, graph: str = "model",
               precision: str = "fp32") -> list[Finding]:
    """Check one ONNX model against TensorRT ``trt_version``'s ONNX support.

    Args:
        model: the ONNX model (with its initializers loaded).
        trt_version: "10.3" (JetPack 6 / Jetson Orin), "current" (latest table) or any alias ``load_support`` knows.
        graph: the graph's name in the findings (the package manifest's key).
        precision: the precision the engine will be built in; "fp16" / "int8" make FP16 range problems errors.

    Returns:
        The findings, errors first; no finding means TensorRT should import every node.

    Raises:
        UsageError: no support table for ``trt_version``.
    """
    support = load_support(trt_version)
    ctx = _Context(support, trt_version, graph, precision)
    inferred = _infer(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    scope = graph_scope(inferred.graph, functions)
    for severity, code, node, op, message in (*check_opset(model, support), *check_graph_inputs(model.graph),
                                              *check_tensor_dtypes(inferred.graph, support),
                                              *check_fp16_range(model, precision)):
        ctx.add(severity, code, node, op, message)
    _lint_nodes(ctx, inferred.graph.node, scope)
    order = {ERROR: 0, WARNING: 1}
    return sorted(ctx.findings, key=lambda f: order.get(f.severity, 2))


def _lint_nodes(ctx: _Context, nodes, scope: Scope, function: str | None = None) -> None:
    for index, node in enumerate(nodes):
        label = node_label(node, index)
        if node.domain in STANDARD_DOMAINS:
            for severity, code, message in check_standard_node(node, ctx.support, scope):
                ctx.add(severity, code, label, node.op_type, message, function)
            for sub in subgraphs(node):
                _lint_nodes(ctx, sub.node, graph_scope(sub, scope.functions, parent=scope), function)
        else:
            _lint_custom_node(ctx, node, label, scope, function)


def _lint_custom_node(ctx: _Context, node: onnx.NodeProto, label: str, scope: Scope, function: str | None) -> None:
    key = (node.domain, node.op_type)
    qualified = f"{node.domain}.{node.op_type}"
    if node.domain == HBI_DOMAIN:
        for message in _plugin_attribute_problems(node):
            ctx.add(ERROR, "plugin-attributes", label, qualified, message, function)
        if node.op_type not in HBI_OPS:
            ctx.add(WARNING, "unknown-hbi-op", label, qualified,
                    f"{node.op_type} is not an hbi op of this toolkit ({', '.join(HBI_OPS)})", function)
    body = scope.functions.get(key)
    if body is None:
        ctx.add(ERROR, "missing-function", label, qualified,
                f"no model-local function {qualified}: TensorRT can only import it through a "
                f"plugin named {node.op_type!r} loaded at build time (needs a plugin)", function)
        return
    if key not in ctx.linted_functions:  # lint each body once, however many nodes call it
        ctx.linted_functions.add(key)
        _lint_nodes(ctx, body.node, function_scope(body, scope.functions), function=qualified)


def _plugin_attribute_problems(node: onnx.NodeProto) -> Iterator[str]:
    for name, expected in PLUGIN_ATTRIBUTES.items():
        attr = next((a for a in node.attribute if a.name == name), None)
        if attr is None:
            yield f"attribute {name}={expected!r} is missing: a TensorRT plugin cannot be matched to this node"
        elif attr.type != onnx.AttributeProto.STRING or attribute_value(node, name) != expected:
            yield f"attribute {name} must be the string {expected!r}, found {attribute_value(node, name)!r}"
