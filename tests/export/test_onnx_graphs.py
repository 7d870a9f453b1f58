"""ONNX export of the three graphs: custom-op nodes, full checker, shape inference, ORT vs PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hbi_export.model import HBIConfig, HBIModel
from hbi_export.model.merge import token_merge
from hbi_export.onnx.export import example_inputs, export_graph
from hbi_export.onnx.functions import attach_functions
from hbi_export.onnx.graphs import graph_defs
from hbi_export.onnx.precision import for_precision

L, T = 16, 8


@pytest.fixture(scope="module")
def model() -> HBIModel:
    torch.manual_seed(0)
    return HBIModel(HBIConfig.tiny()).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("graphs")
    for precision in ("fp32", "fp16"):
        m = for_precision(model, precision)
        for name, gdef in graph_defs(model.config, L, T).items():
            path = root / f"{name}_{precision}.onnx"
            out[name, precision] = (gdef, export_graph(gdef, m, path), path)
    return out


def _run(path, gdef, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {spec.name: x.numpy() for spec, x in zip(gdef.inputs, inputs)})


@pytest.mark.parametrize("name", ["text_encoder", "video_encoder", "interaction"])
def test_graph_structure(exported, name):
    gdef, proto, _ = exported[name, "fp32"]
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    assert [i.name for i in inferred.graph.input] == [s.name for s in gdef.inputs]
    assert [o.name for o in inferred.graph.output] == [s.name for s in gdef.outputs]
    hbi_nodes = [n for n in proto.graph.node if n.domain == "hbi"]
    expected = {"text_encoder": ["TokenMerge"] * 2, "video_encoder": ["TokenMerge"] * 2,
                "interaction": ["WeightedTokenInteraction"] * 3}[name]
    assert [n.op_type for n in hbi_nodes] == expected
    for node in hbi_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"hbi" and attrs["plugin_version"] == b"1"
    assert {f.name for f in proto.functions} == set(expected)
    assert any(n.op_type == "LayerNormalization" for n in proto.graph.node) or name == "interaction"
    # batch axes are dynamic and named per tower, L and T are fixed
    for value, spec in zip(proto.graph.input, gdef.inputs):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == list(spec.shape)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["text_encoder", "video_encoder", "interaction"])
@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(exported, model, name, precision, batch):
    gdef, _, path = exported[name, precision]
    inputs = example_inputs(gdef, {"text_batch": batch, "video_batch": batch + 1}, seed=7)
    got = _run(path, gdef, inputs)
    with torch.no_grad():
        want = gdef.wrapper(model)(*inputs)
    for spec, g, w in zip(gdef.outputs, got, want):
        w = w.numpy()
        assert g.shape == w.shape and g.dtype == np.float32, spec.name
        if "_clusters_" in spec.name:  # cluster indices and merge checks: exact (a flip is a different merge)
            np.testing.assert_array_equal(g, w, err_msg=spec.name)
        elif precision == "fp32" or name == "interaction" and precision == "fp16":
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=spec.name)
        else:
            cos = float(g.ravel() @ w.ravel() / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-12))
            assert cos >= 0.999, (spec.name, cos)


def test_fp16_graphs_hold_fp16_weights_and_fp32_layernorm(exported):
    _, proto, _ = exported["video_encoder", "fp16"]
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert sum(t == onnx.TensorProto.FLOAT16 for t in types.values()) > 10
    for node in proto.graph.node:
        if node.op_type == "LayerNormalization":
            scale = node.input[1]
            assert types.get(scale, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, node.name


def _merge_graph(n: int, c: int, clusters: int, k: int) -> onnx.ModelProto:
    h = onnx.helper
    node = h.make_node("TokenMerge", ["x", "score", "mask"], ["merged"], domain="hbi", clusters=clusters, k=k,
                       plugin_namespace="hbi", plugin_version="1")
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph([node], "merge", [h.make_tensor_value_info("x", f, ["b", n, c]),
                                           h.make_tensor_value_info("score", f, ["b", n]),
                                           h.make_tensor_value_info("mask", f, ["b", n])],
                         [h.make_tensor_value_info("merged", f, ["b", clusters, c])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    return attach_functions(model)


@pytest.mark.parametrize("n,clusters,valid", [(12, 3, (12, 6, 2, 1)), (8, 2, (8, 3, 1, 8)), (2, 1, (2, 1, 2, 1)),
                                              (24, 6, (24, 11, 3, 2))])
def test_token_merge_decomposition_matches_reference(n, clusters, valid):
    g = torch.Generator().manual_seed(n)
    b, c = len(valid), 16
    x = torch.randn(b, n, c, generator=g)
    x[3, 1] = x[3, 0]  # a duplicated token: a density tie
    mask = torch.zeros(b, n)
    for i, v in enumerate(valid):
        mask[i, :v] = 1
    score = torch.where(mask > 0, torch.randn(b, n, generator=g), torch.full((b, n), -1e4))
    session = ort.InferenceSession(_merge_graph(n, c, clusters, 3).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "score": score.numpy(), "mask": mask.numpy()})[0]
    want = token_merge(x, score, mask, clusters, 3).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_token_merge_decomposition_on_identical_tokens():
    """All-equal densities and scores: centres in index order, every other token in cluster 0."""
    x = torch.ones(1, 4, 8) * torch.arange(1, 9.0)
    score = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    session = ort.InferenceSession(_merge_graph(4, 8, 2, 3).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "score": score.numpy(), "mask": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_allclose(got, token_merge(x, score, torch.ones(1, 4), 2, 3).numpy(), atol=1e-6)


def test_token_merge_decomposition_two_token_tie_on_random_values():
    """Two valid tokens tie exactly in density; the symmetrised matmul distances keep the index rule."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 6, 32, generator=g) * 3
    mask = torch.zeros(64, 6)
    mask[:, :2] = 1
    score = torch.where(mask > 0, torch.randn(64, 6, generator=g), torch.full((64, 6), -1e4))
    session = ort.InferenceSession(_merge_graph(6, 32, 2, 3).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "score": score.numpy(), "mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, token_merge(x, score, mask, 2, 3).numpy(), atol=1e-5, rtol=0)
