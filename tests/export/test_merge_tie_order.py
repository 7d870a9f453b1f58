"""The hbi decompositions do not depend on how TopK / ArgMin / ArgMax break ties (docs/custom_ops.md).

ONNX defines those ties (lower index first); TensorRT's TopK layer, which also implements its ArgMin / ArgMax,
does not document them. Ties are common in TokenMerge: every padded token has centre score 0, so a caption shorter
than the cluster count takes padded centres, and duplicated tokens tie in density and distance. Two checks:

* structure: no function body uses an index output of TopK, nor ArgMin / ArgMax;
* behaviour: with every tie-breaking operator rewritten to break ties the other way (TopK on the reversed axis,
  ``select_last_index=1``), the results still equal the PyTorch reference on tie-heavy inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hbi_export.model.merge import token_merge
from hbi_export.onnx.functions import attach_functions, function_protos

INDEX_OPS = ("ArgMin", "ArgMax")


def test_no_body_depends_on_tie_order():
    for proto in function_protos():
        used = {name for node in proto.node for name in node.input} | set(proto.output)
        for node in proto.node:
            assert node.op_type not in INDEX_OPS, f"{proto.name}: {node.op_type} breaks ties by index"
            if node.op_type == "TopK" and len(node.output) > 1:
                assert node.output[1] == "" or node.output[1] not in used, (
                    f"{proto.name}: the indices of a TopK are used; their tie order is not defined by TensorRT")


def _reverse_ties(function: onnx.FunctionProto) -> onnx.FunctionProto:
    """The same body with every tie broken the other way: TopK runs on the axis reversed (its indices mapped
    back), ArgMin / ArgMax take the last extreme."""
    h = onnx.helper
    nodes = []
    for i, node in enumerate(function.node):
        if node.op_type in INDEX_OPS:
            node = onnx.NodeProto.FromString(node.SerializeToString())
            del node.attribute[:]
            node.attribute.extend([a for a in function.node[i].attribute if a.name != "select_last_index"]
                                  + [h.make_attribute("select_last_index", 1)])
        elif node.op_type == "TopK":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            p = f"_rev{i}_"
            x, k = node.input
            values, indices = (list(node.output) + [""])[:2]
            nodes += [
                h.make_node("Constant", [], [p + "axis"], value_ints=[axis]),
                h.make_node("Constant", [], [p + "start"], value_ints=[-1]),
                h.make_node("Constant", [], [p + "end"], value_ints=[-(2 ** 63)]),
                h.make_node("Constant", [], [p + "step"], value_ints=[-1]),
                h.make_node("Slice", [x, p + "start", p + "end", p + "axis", p + "step"], [p + "x"]),
                h.make_node("TopK", [p + "x", k], [values, p + "idx"], **{a.name: h.get_attribute_value(a)
                                                                            for a in node.attribute}),
                h.make_node("Shape", [x], [p + "shape"]),
                h.make_node("Gather", [p + "shape", p + "axis"], [p + "n"], axis=0),
                h.make_node("Constant", [], [p + "one"], value_ints=[1]),
                h.make_node("Sub", [p + "n", p + "one"], [p + "last"]),
            ]
            if indices:
                nodes.append(h.make_node("Sub", [p + "last", p + "idx"], [indices]))
            continue
        nodes.append(node)
    out = onnx.FunctionProto.FromString(function.SerializeToString())
    del out.node[:]
    out.node.extend(nodes)
    return out


def _merge_model(n: int, c: int, clusters: int, k: int = 3, reverse: bool = False) -> bytes:
    h = onnx.helper
    node = h.make_node("TokenMerge", ["x", "score", "mask"], ["merged"], domain="hbi", clusters=clusters, k=k,
                       plugin_namespace="hbi", plugin_version="1")
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph([node], "merge", [h.make_tensor_value_info("x", f, ["b", n, c]),
                                           h.make_tensor_value_info("score", f, ["b", n]),
                                           h.make_tensor_value_info("mask", f, ["b", n])],
                         [h.make_tensor_value_info("merged", f, ["b", clusters, c])])
    model = attach_functions(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))
    if reverse:
        functions = [_reverse_ties(fn) for fn in model.functions]
        del model.functions[:]
        model.functions.extend(functions)
    return model.SerializeToString()


def _tie_heavy_inputs(n: int, c: int, valid: tuple[int, ...], seed: int):
    """Samples with fewer valid tokens than clusters (padded centres), duplicated tokens (density and distance
    ties), and identical padded tokens (zeroed frames)."""
    g = torch.Generator().manual_seed(seed)
    b = len(valid)
    x = torch.randn(b, n, c, generator=g)
    mask = torch.zeros(b, n)
    for i, v in enumerate(valid):
        mask[i, :v] = 1
        x[i, v:] = x[i, v:].mean(dim=0, keepdim=True) if v < n else x[i, v:]  # identical padded tokens
    x[0, 1] = x[0, 0]  # duplicated valid tokens
    x[-1, 2] = x[-1, 0]
    score = torch.where(mask > 0, torch.randn(b, n, generator=g), torch.full((b, n), -1e4))
    return x, score, mask


@pytest.mark.parametrize("n,clusters,valid", [(32, 8, (32, 5, 3, 2, 1)), (16, 4, (16, 3, 2, 4)),
                                              (12, 6, (12, 2, 5, 1)), (8, 2, (8, 1, 2))])
def test_token_merge_is_the_same_whichever_way_ties_break(n, clusters, valid):
    c = 16
    x, score, mask = _tie_heavy_inputs(n, c, valid, seed=n + clusters)
    feed = {"x": x.numpy(), "score": score.numpy(), "mask": mask.numpy()}
    want = token_merge(x, score, mask, clusters, 3).numpy()
    for reverse in (False, True):
        session = ort.InferenceSession(_merge_model(n, c, clusters, reverse=reverse),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, feed)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"ties reversed: {reverse}")


def test_the_adversary_bites():
    """The rewrite does change tie order: on a plain TopK with ties, the reversed body returns other indices."""
    h = onnx.helper
    body = h.make_function("t", "F", ["x"], ["i"], [
        h.make_node("Constant", [], ["k"], value_ints=[2]),
        h.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=1)],
        [h.make_opsetid("", 18)])
    graph = h.make_graph([h.make_node("F", ["x"], ["i"], domain="t")], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("i", onnx.TensorProto.INT64, [1, 2])])
    x = np.zeros((1, 4), np.float32)
    results = []
    for fn in (body, _reverse_ties(body)):
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("t", 1)],
                             functions=[fn])
        results.append(ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    assert results[0].tolist() == [[0, 1]] and results[1].tolist() == [[3, 2]]


@pytest.mark.parametrize("max_words,max_frames", [(32, 8), (12, 4), (4, 2)])
def test_parity_inputs_hold_captions_and_videos_shorter_than_the_cluster_count(max_words, max_frames):
    from hbi_export.model import HBIConfig, HBIModel
    from hbi_export.onnx.parity import parity_inputs

    torch.manual_seed(0)
    model = HBIModel(HBIConfig.tiny()).eval()
    x = parity_inputs(model, max_words, max_frames)
    text_clusters = model.config.cluster_counts(max_words, "text")[0]
    video_clusters = model.config.cluster_counts(max_frames, "video")[0]
    lengths, frames = x["attention_mask"].sum(1).tolist(), x["frame_mask"].sum(1).tolist()
    assert min(lengths) == 2 and min(frames) == 1  # start + end only; one frame
    if text_clusters > 2:  # a caption shorter than the cluster count, yet as long as possible
        assert text_clusters - 1 in lengths
    if video_clusters > 1:
        assert video_clusters - 1 in frames
