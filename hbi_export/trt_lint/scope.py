"""What a list of nodes can see while it is linted: constants, runtime inputs, dtypes, local functions.

One ``Scope`` per graph, subgraph (If / Loop / Scan body) or function body. Constant values are decoded lazily
(big initializers are only turned into arrays when a check asks for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

STANDARD_DOMAINS = ("", "ai.onnx")


def attribute_value(node: onnx.NodeProto, name: str):
    """The Python value of a node attribute (strings decoded); ``None`` when absent or a function-attribute ref."""
    for attr in node.attribute:
        if attr.name == name:
            if attr.ref_attr_name:
                return None
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            if isinstance(value, list) and value and isinstance(value[0], bytes):
                return [v.decode("utf-8", "replace") for v in value]
            return value
    return None


def has_attribute(node: onnx.NodeProto, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node defines (``value`` or the scalar / list forms), if any."""
    for attr in node.attribute:
        if attr.ref_attr_name:
            return None
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.asarray(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.asarray(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.asarray(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.asarray(list(attr.ints), dtype=np.int64))
    return None


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``<OpType#index>`` for an unnamed node."""
    return node.name or f"<{node.op_type}#{index}>"


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graph-valued attributes of a node (If branches, Loop / Scan bodies)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


@dataclass
class Scope:
    """Names visible to the nodes being linted.

    ``constants``: initializer / Constant-node outputs -> tensor; ``runtime``: graph inputs fed at run time;
    ``formal``: function parameters (unknown until the call site, so checks skip them); ``dtypes``: known
    element type per tensor name; ``functions``: model-local functions by (domain, name).
    """

    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    runtime: set[str] = field(default_factory=set)
    formal: set[str] = field(default_factory=set)
    dtypes: dict[str, int] = field(default_factory=dict)
    functions: dict[tuple[str, str], onnx.FunctionProto] = field(default_factory=dict)

    def child(self) -> "Scope":
        """A nested scope (subgraph) that still sees everything of this one."""
        return Scope(dict(self.constants), set(self.runtime), set(self.formal), dict(self.dtypes), self.functions)

    def add_nodes(self, nodes) -> None:
        """Record the outputs of Constant nodes (as constants) and their dtypes."""
        for node in nodes:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.output:
                tensor = constant_node_tensor(node)
                if tensor is not None:
                    self.constants[node.output[0]] = tensor
                    self.dtypes[node.output[0]] = tensor.data_type

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def graph_scope(graph: onnx.GraphProto, functions, parent: Scope | None = None) -> Scope:
    """The scope of a (sub)graph: its initializers, inputs, inferred value infos and Constant nodes."""
    scope = parent.child() if parent is not None else Scope(functions=functions)
    for init in graph.initializer:
        scope.constants[init.name] = init
        scope.dtypes[init.name] = init.data_type
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            scope.dtypes.setdefault(vi.name, vi.type.tensor_type.elem_type)
    scope.runtime |= {vi.name for vi in graph.input if vi.name not in scope.constants}
    scope.add_nodes(graph.node)
    return scope


def function_scope(function: onnx.FunctionProto, functions) -> Scope:
    """The scope of a function body: its parameters are formal (unknown), its Constant nodes known."""
    scope = Scope(formal=set(function.input), functions=functions)
    scope.add_nodes(function.node)
    return scope
