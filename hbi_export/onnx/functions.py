"""Standard-op decompositions of the ``hbi`` custom ops (docs/custom_ops.md), as model-local ONNX functions.

Every exported graph carries these FunctionProtos, so any ONNX runtime can run an ``hbi.*`` node by inlining its
body. The bodies compute in float32 whatever the input type (fp16 packages keep these reductions in fp32) and
cast the result back to the input type. They are written for TensorRT's parser too: the weighted merge is a
one-hot assignment matmul (no ScatterND reduction), distances use the matmul form, and every centre is forced to
its own cluster without a scatter.

Tie order. Nothing in these bodies depends on how an operator breaks ties: ONNX defines ``TopK`` / ``ArgMin`` /
``ArgMax`` ties (lower index first), TensorRT's TopK (which also implements its ArgMin / ArgMax) does not document
them, and ties are common here (every padded token has centre score 0, so a caption shorter than the cluster
count picks padded centres; duplicated tokens tie in density and in distance). So:

* the kNN density uses ``TopK`` *values* only (the k smallest distances are the same whichever tied index is
  returned);
* the centres are chosen by an explicit rank, ``rank[i] = #{j: s[j] > s[i] or (s[j] == s[i] and j < i)}``
  (pairwise comparisons and an exact count, a strict total order), cluster ``c`` being the token of rank ``c``;
* the nearest centre is the *first* minimum, computed as the smallest cluster index whose distance equals the
  minimum (``ReduceMin`` of exact values), not by ``ArgMin``.

``tests/export/test_merge_tie_order.py`` holds this: no index output of ``TopK`` and no ``ArgMin`` / ``ArgMax``
in the bodies, and the same results when every tie-breaking operator is made to break ties the other way.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

DOMAIN = "hbi"
VERSION = 1
HBI = onnxscript.values.Opset(DOMAIN, VERSION)
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")  # carried by nodes for TensorRT, unused by the bodies


@onnxscript.script(HBI, default_opset=op)
def WeightedTokenInteraction(text_tokens, text_weights, text_mask, video_tokens, video_weights, video_mask):
    t = op.Cast(text_tokens, to=FLOAT.dtype)  # (Bt, Lt, D)
    v = op.Cast(video_tokens, to=FLOAT.dtype)  # (Bv, Lv, D)
    tm = op.Cast(text_mask, to=FLOAT.dtype)
    vm = op.Cast(video_mask, to=FLOAT.dtype)
    sim = op.MatMul(op.Unsqueeze(t, [1]), op.Unsqueeze(op.Transpose(v, perm=[0, 2, 1]), [0]))  # (Bt, Bv, Lt, Lv)
    sim = op.Mul(op.Mul(sim, op.Unsqueeze(tm, [1, 3])), op.Unsqueeze(vm, [0, 2]))
    tw = op.Unsqueeze(op.Cast(text_weights, to=FLOAT.dtype), [1])  # (Bt, 1, Lt)
    vw = op.Unsqueeze(op.Cast(video_weights, to=FLOAT.dtype), [0])  # (1, Bv, Lv)
    t2v = op.ReduceSum(op.Mul(op.ReduceMax(sim, [3], keepdims=0), tw), [2], keepdims=0)  # (Bt, Bv)
    v2t = op.ReduceSum(op.Mul(op.ReduceMax(sim, [2], keepdims=0), vw), [2], keepdims=0)
    scores = op.Mul(op.Add(t2v, v2t), op.Constant(value_float=0.5))
    return op.CastLike(scores, text_tokens)


@onnxscript.script(HBI, default_opset=op)
def TokenMerge(x, score, mask, clusters: int, k: int):
    xf = op.Cast(x, to=FLOAT.dtype)  # (B, N, C)
    mf = op.Cast(mask, to=FLOAT.dtype)  # (B, N)
    n = op.Shape(xf, start=1, end=2)  # (1,) int64
    channels = op.Cast(op.Shape(xf, start=2, end=3), to=FLOAT.dtype)
    zero = op.Constant(value_float=0.0)
    one = op.Constant(value_float=1.0)
    # distances, matmul form: sqrt(max(|xi|^2 + |xj|^2 - 2 xi.xj, 0)) / sqrt(C)
    # made exactly symmetric with an exact zero diagonal, as the direct form is: rounding must not break the
    # density ties of identical tokens or of two-token samples differently for i and j
    sq = op.ReduceSum(op.Mul(xf, xf), [2], keepdims=1)  # (B, N, 1)
    gram = op.MatMul(xf, op.Transpose(xf, perm=[0, 2, 1]))  # (B, N, N)
    d2 = op.Sub(op.Add(sq, op.Transpose(sq, perm=[0, 2, 1])), op.Add(gram, gram))
    d2 = op.Mul(op.Add(d2, op.Transpose(d2, perm=[0, 2, 1])), op.Constant(value_float=0.5))
    idx = op.Range(op.Constant(value_int=0), op.Squeeze(n, [0]), op.Constant(value_int=1))  # (N,)
    diagonal = op.Equal(op.Unsqueeze(idx, [0]), op.Unsqueeze(idx, [1]))  # (N, N)
    dist = op.Div(op.Sqrt(op.Where(diagonal, zero, op.Max(d2, zero))), op.Sqrt(channels))
    # per-sample fill of padded columns
    fill = op.Add(op.ReduceMax(dist, [1, 2], keepdims=1), one)  # (B, 1, 1)
    dist = op.Where(op.Unsqueeze(op.Greater(mf, zero), [1]), dist, fill)
    # kNN density, k' = min(k, N), the token itself included
    k_const = op.Constant(value_int=k)
    knn, _ = op.TopK(dist, op.Min(op.Reshape(k_const, [1]), n), axis=-1, largest=0, sorted=1)
    density = op.Mul(op.Exp(op.Neg(op.ReduceMean(op.Mul(knn, knn), [2], keepdims=0))), mf)  # (B, N)
    # j outranks i: denser, or equally dense with a lower index
    d_i = op.Unsqueeze(density, [2])
    d_j = op.Unsqueeze(density, [1])
    lower = op.Less(op.Unsqueeze(idx, [0]), op.Unsqueeze(idx, [1]))  # [i, j] = j < i
    outranks = op.Or(op.Greater(d_j, d_i), op.And(op.Equal(d_j, d_i), lower))
    dist_max = op.ReduceMax(dist, [1, 2], keepdims=1)
    parent = op.ReduceMin(op.Where(outranks, dist, dist_max), [2], keepdims=0)  # (B, N)
    # centres: the `clusters` highest centre scores, equal scores lower index first, by an exact rank (no TopK
    # indices: their tie order is not defined by TensorRT); rank is a permutation of 0..N-1
    s_i = op.Unsqueeze(op.Mul(parent, density), [2])  # (B, N, 1)
    s_j = op.Transpose(s_i, perm=[0, 2, 1])  # (B, 1, N)
    before = op.Or(op.Greater(s_j, s_i), op.And(op.Equal(s_j, s_i), lower))  # [i, j] = j ranks before i
    rank = op.ReduceSum(op.Cast(before, to=FLOAT.dtype), [2], keepdims=0)  # (B, N), exact integers
    c_const = op.Constant(value_int=clusters)
    cluster_ids = op.Range(op.Constant(value_int=0), c_const, op.Constant(value_int=1))  # (K,)
    cluster_f = op.Cast(cluster_ids, to=FLOAT.dtype)
    is_centre = op.Cast(op.Equal(op.Unsqueeze(rank, [1]), op.Unsqueeze(cluster_f, [0, 2])),
                        to=FLOAT.dtype)  # (B, K, N): token n has rank c
    idx_f = op.Cast(idx, to=FLOAT.dtype)
    centres = op.Cast(op.ReduceSum(op.Mul(is_centre, op.Unsqueeze(idx_f, [0, 1])), [2], keepdims=0),
                      to=INT64.dtype)  # (B, K): the one token of rank c (a sum of one index and zeros)
    # nearest centre, the first on equal distance (the smallest cluster index at the minimum); a centre: its own
    b = op.Shape(xf, start=0, end=1)
    gather_shape = op.Concat(b, op.Reshape(c_const, [1]), n, axis=0)
    to_centre = op.GatherElements(dist, op.Expand(op.Unsqueeze(centres, [2]), gather_shape), axis=1)  # (B, K, N)
    at_min = op.Equal(to_centre, op.ReduceMin(to_centre, [1], keepdims=1))
    k_f = op.Cast(c_const, to=FLOAT.dtype)
    nearest = op.ReduceMin(op.Where(at_min, op.Unsqueeze(cluster_f, [0, 2]), k_f), [1], keepdims=0)  # (B, N)
    assign = op.Where(op.Less(rank, k_f), rank, nearest)  # float cluster index per token
    # weighted merge as a one-hot matmul
    onehot = op.Cast(op.Equal(op.Unsqueeze(assign, [1]), op.Unsqueeze(cluster_f, [0, 2])), to=FLOAT.dtype)
    weighted = op.Mul(onehot, op.Unsqueeze(op.Exp(op.Cast(score, to=FLOAT.dtype)), [1]))  # (B, K, N)
    norm = op.Add(op.ReduceSum(weighted, [2], keepdims=1), op.Constant(value_float=1e-6))
    merged = op.Div(op.MatMul(weighted, xf), norm)
    return op.CastLike(merged, x)


def function_protos() -> list[onnx.FunctionProto]:
    """The decompositions as FunctionProtos (domain ``hbi``), with the TensorRT plugin attributes declared."""
    protos = []
    for fn in (WeightedTokenInteraction, TokenMerge):
        proto = fn.to_function_proto()
        for name in PLUGIN_ATTRIBUTES:
            if name not in proto.attribute:
                proto.attribute.append(name)
        protos.append(proto)
    return protos


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the decompositions the graph's ``hbi`` nodes need, and the opset imports their bodies use."""
    used = {node.op_type for node in model.graph.node if node.domain == DOMAIN}
    del model.functions[:]
    for proto in function_protos():
        if proto.name in used:
            model.functions.append(proto)
    imports = {imp.domain: imp for imp in model.opset_import}
    if used and DOMAIN not in imports:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model
