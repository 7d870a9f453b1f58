"""TensorRT readiness lint on tiny generated ONNX graphs (no TensorRT needed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hbi_export.trt_lint import SCHEMA, lint_model, lint_package, load_support, render_text
from hbi_runtime.errors import BadInputError, UsageError

VERSIONS = ("10.3", "current")
OPSET = 17
PLUGIN_ATTRS = {"plugin_namespace": "hbi", "plugin_version": "1"}


def make_model(nodes, inputs, outputs, initializers=(), functions=(), opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("hbi", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def tensor(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def clean_model() -> onnx.ModelProto:
    """x[batch, 4] @ w + b -> relu -> LayerNormalization: what a healthy export looks like."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.ones(4, np.float32), "gamma")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("LayerNormalization", ["h3", "gamma"], ["y"], name="ln", axis=-1)]
    return make_model(nodes, [tensor("x", ["batch", 4])], [tensor("y", ["batch", 4])], inits)


def one_node_model(node, inputs, outputs, initializers=(), **kw) -> onnx.ModelProto:
    return make_model([node], inputs, outputs, initializers, **kw)


def errors(findings, code=None):
    return [f for f in findings if f.severity == "error" and (code is None or f.code == code)]


def hbi_function(body_op: str = "Relu") -> onnx.FunctionProto:
    """A stand-in local function hbi.TokenMerge(x) -> y whose body is one ``body_op`` node."""
    return helper.make_function("hbi", "TokenMerge", ["x"], ["y"],
                                [helper.make_node(body_op, ["x"], ["y"], name=f"body_{body_op.lower()}")],
                                opset_imports=[helper.make_opsetid("", OPSET)])


def hbi_model(functions=(), body_op="Relu", **attrs) -> onnx.ModelProto:
    node = helper.make_node("TokenMerge", ["x"], ["y"], name="merge", domain="hbi", **attrs)
    return one_node_model(node, [tensor("x", ["batch", 4])], [tensor("y", ["batch", 4])], functions=functions)


# --- data ---------------------------------------------------------------------------------------------------

def test_support_tables_record_their_source_and_differ_where_tensorrt_changed():
    old, new = load_support("10.3"), load_support("current")
    assert old.version == "10.3" and new.version.startswith("10.")
    for table in (old, new):
        assert table.source["repo"] == "onnx/onnx-tensorrt" and table.source["file"] == "docs/operators.md"
        assert len(table.ops) > 150 and table.ops["MatMul"].supported
    assert not old.ops["HannWindow"].supported and new.ops["HannWindow"].supported   # added in TensorRT 10.4
    assert "RMSNormalization" not in old.ops and new.ops["RMSNormalization"].supported
    assert not old.plugin_before_function and new.plugin_before_function


def test_unknown_trt_version_is_a_usage_error():
    with pytest.raises(UsageError, match="no TensorRT support table for version '7.1'"):
        lint_model(clean_model(), "7.1")


# --- lint_model -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_clean_graph_passes(version):
    assert lint_model(clean_model(), version) == []


def test_string_op_is_unsupported_with_node_name():
    node = helper.make_node("StringNormalizer", ["s"], ["t"], name="normalize_text")
    model = one_node_model(node, [tensor("s", ["batch"], TensorProto.STRING)],
                           [tensor("t", ["batch"], TensorProto.STRING)])
    for version in VERSIONS:
        found = errors(lint_model(model, version), "unsupported-op")
        assert [(f.node, f.op_type) for f in found] == [("normalize_text", "StringNormalizer")]
        assert any(f.code == "dtype" and "STRING" in f.message for f in errors(lint_model(model, version)))


def test_op_added_after_10_3_is_caught_only_for_10_3():
    size = numpy_helper.from_array(np.array(16, np.int64), "size")
    model = one_node_model(helper.make_node("HannWindow", ["size"], ["w"], name="window"),
                           [], [tensor("w", [16])], [size])
    found = errors(lint_model(model, "10.3"))
    assert [(f.node, f.code) for f in found] == [("window", "unsupported-op")]
    assert "no importer for HannWindow" in found[0].message
    assert errors(lint_model(model, "current")) == []


def test_op_missing_from_the_list_is_an_error():
    model = one_node_model(helper.make_node("BitwiseAnd", ["a", "b"], ["c"], name="bits"),
                           [tensor("a", [2], TensorProto.INT32), tensor("b", [2], TensorProto.INT32)],
                           [tensor("c", [2], TensorProto.INT32)])
    assert [f.node for f in errors(lint_model(model), "unsupported-op")] == ["bits"]


@pytest.mark.parametrize("version", VERSIONS)
def test_scatternd_with_reduction_is_caught(version):
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], name="index_add", reduction="add")
    idx = numpy_helper.from_array(np.array([[0], [2]], np.int64), "idx")
    model = one_node_model(node, [tensor("data", [4, 3]), tensor("upd", [2, 3])], [tensor("out", [4, 3])], [idx])
    found = errors(lint_model(model, version), "attribute")
    assert [(f.node, f.op_type) for f in found] == [("index_add", "ScatterND")]
    assert "reduction='add' is not supported" in found[0].message


def test_scatternd_without_reduction_passes():
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], name="assign")
    idx = numpy_helper.from_array(np.array([[0], [2]], np.int64), "idx")
    model = one_node_model(node, [tensor("data", [4, 3]), tensor("upd", [2, 3])], [tensor("out", [4, 3])], [idx])
    assert errors(lint_model(model)) == []


def test_axes_from_a_graph_input_are_an_error_on_10_3():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum", keepdims=0)
    model = one_node_model(node, [tensor("x", ["batch", 4]), tensor("axes", [1], TensorProto.INT64)],
                           [tensor("y", ["batch"])], opset=18)
    assert [f.node for f in errors(lint_model(model, "10.3"), "input-constant")] == ["sum"]


@pytest.mark.parametrize("precision, severity", [("fp16", "error"), ("fp32", "warning")])
def test_fp16_overflowing_constant_is_caught(precision, severity):
    mask = helper.make_node("Constant", [], ["neg"], name="mask_fill",
                            value=numpy_helper.from_array(np.array([-9e15], np.float32), "neg_value"))
    add = helper.make_node("Add", ["x", "neg"], ["y"], name="add")
    model = make_model([mask, add], [tensor("x", ["batch", 4])], [tensor("y", ["batch", 4])])
    found = [f for f in lint_model(model, precision=precision) if f.code == "fp16-range"]
    assert [(f.severity, f.node, f.op_type) for f in found] == [(severity, "mask_fill", "Constant")]
    assert "overflow FP16" in found[0].message and "9e+15" in found[0].message


def test_fp16_underflowing_initializer_is_caught_but_infinities_are_fine():
    eps = numpy_helper.from_array(np.array([1e-12], np.float32), "eps")
    inf = numpy_helper.from_array(np.array([-np.inf], np.float32), "neg_inf")
    nodes = [helper.make_node("Add", ["x", "eps"], ["h"], name="add_eps"),
             helper.make_node("Add", ["h", "neg_inf"], ["y"], name="add_inf")]
    model = make_model(nodes, [tensor("x", ["batch", 4])], [tensor("y", ["batch", 4])], [eps, inf])
    found = errors(lint_model(model, precision="fp16"), "fp16-range")
    assert [f.node for f in found] == ["eps"] and "become 0 in FP16" in found[0].message


def test_unsupported_dtypes_and_int64_notes():
    model = one_node_model(helper.make_node("Identity", ["x"], ["y"], name="copy"),
                           [tensor("x", ["batch"], TensorProto.UINT16)], [tensor("y", ["batch"], TensorProto.UINT16)])
    assert {f.node for f in errors(lint_model(model), "dtype")} == {"x", "copy"}
    ids = one_node_model(helper.make_node("Identity", ["ids"], ["out"], name="copy"),
                         [tensor("ids", ["batch", 8], TensorProto.INT64)], [tensor("out", ["batch", 8], TensorProto.INT64)])
    found = lint_model(ids)
    assert errors(found) == [] and {f.severity for f in found} == {"info"}


def test_dynamic_axes_beyond_batch_warn():
    model = one_node_model(helper.make_node("Relu", ["x"], ["y"], name="relu"),
                           [tensor("x", ["batch", "seq", 4])], [tensor("y", ["batch", "seq", 4])])
    found = [f for f in lint_model(model) if f.code == "dynamic-shape"]
    assert [(f.severity, f.node) for f in found] == [("warning", "x")] and "1 (seq)" in found[0].message


# --- custom hbi ops ---------------------------------------------------------------------------------------------

def test_hbi_node_with_function_and_plugin_attributes_passes():
    for version in VERSIONS:
        assert errors(lint_model(hbi_model([hbi_function()], **PLUGIN_ATTRS), version)) == []


def test_hbi_node_without_function_is_an_error():
    found = errors(lint_model(hbi_model(**PLUGIN_ATTRS)))
    assert [(f.code, f.node, f.op_type) for f in found] == [("missing-function", "merge", "hbi.TokenMerge")]
    assert "needs a plugin" in found[0].message


def test_hbi_node_missing_plugin_attributes_is_an_error():
    found = errors(lint_model(hbi_model([hbi_function()], plugin_version="1")))
    assert [(f.code, f.node) for f in found] == [("plugin-attributes", "merge")]
    assert "plugin_namespace='hbi' is missing" in found[0].message
    wrong = errors(lint_model(hbi_model([hbi_function()], plugin_namespace="hbi", plugin_version=1)))
    assert len(wrong) == 1 and "plugin_version must be the string '1'" in wrong[0].message


def test_unsupported_op_inside_a_function_body_is_caught():
    model = hbi_model([hbi_function("StringNormalizer")], **PLUGIN_ATTRS)
    found = errors(lint_model(model, "10.3"), "unsupported-op")
    assert [(f.function, f.node, f.op_type) for f in found] == [("hbi.TokenMerge", "body_stringnormalizer",
                                                                 "StringNormalizer")]


def test_scatternd_reduction_inside_a_function_body_is_caught():
    body = [helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.array([[0]], np.int64))),
            helper.make_node("ScatterND", ["x", "idx", "x"], ["y"], name="scatter_add", reduction="add")]
    fn = helper.make_function("hbi", "TokenMerge", ["x"], ["y"], body, opset_imports=[helper.make_opsetid("", OPSET)])
    found = errors(lint_model(hbi_model([fn], **PLUGIN_ATTRS)))
    assert [(f.function, f.node) for f in found] == [("hbi.TokenMerge", "scatter_add")]


def test_unknown_custom_op_without_function_needs_a_plugin():
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    model = one_node_model(node, [tensor("x", ["batch", 4])], [tensor("y", ["batch", 4])])
    found = errors(lint_model(model))
    assert [(f.code, f.node) for f in found] == [("missing-function", "fancy")] and "needs a plugin" in found[0].message


# --- lint_package -----------------------------------------------------------------------------------------------

def write_package(tmp_path, graphs: dict[str, tuple[onnx.ModelProto, str]]):
    entries = {}
    for name, (model, precision) in graphs.items():
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        entries[name] = {"file": f"{name}.onnx", "precision": precision, "opset": OPSET}
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "hbi.package/1", "graphs": entries}))
    return tmp_path


def test_lint_package_clean(tmp_path):
    pkg = write_package(tmp_path, {"text_encoder": (clean_model(), "fp16"), "video_encoder": (clean_model(), "fp32")})
    report = lint_package(pkg)
    assert report.ok and report.findings == []
    data = report.to_dict()
    assert data["schema"] == SCHEMA == "hbi.check/1" and data["ok"] is True
    assert data["trt_versions"]["10.3"] == "10.3" and data["package"]["manifest_sha256"]
    json.dumps(data)  # JSON-ready
    assert "ok: 0 error(s)" in render_text(report)


def test_lint_package_reports_problems_per_graph_and_version(tmp_path):
    size = numpy_helper.from_array(np.array(16, np.int64), "size")
    window = one_node_model(helper.make_node("HannWindow", ["size"], ["w"], name="window"), [], [tensor("w", [16])],
                            [size])
    pkg = write_package(tmp_path, {"text_encoder": (clean_model(), "fp16"), "interaction": (window, "fp16"),
                                   "merge": (hbi_model(**PLUGIN_ATTRS), "fp32")})
    report = lint_package(pkg, trt_versions=("10.3", "current"))
    assert not report.ok
    found = {(f.graph, f.node, f.code): f.trt for f in report.findings if f.severity == "error"}
    assert found == {("interaction", "window", "unsupported-op"): ("10.3",),
                     ("merge", "merge", "missing-function"): ("10.3", "current")}
    text = render_text(report)
    assert "FAILED: 2 error(s)" in text and "window" in text and "SEVERITY" in text
    assert report.to_dict()["summary"]["errors"] == 2


def test_lint_package_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="manifest.json is missing"):
        lint_package(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"graphs": {"text": {"file": "text.onnx"}}}))
    with pytest.raises(BadInputError, match="graph 'text'.*missing"):
        lint_package(tmp_path)
    (tmp_path / "text.onnx").write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        lint_package(tmp_path)
    with pytest.raises(UsageError, match="no TensorRT support table"):
        lint_package(tmp_path, trt_versions=("8.6",))
