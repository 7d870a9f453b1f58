"""hbi_runtime.ops: the numpy kernels against the PyTorch reference and the numpy sides, and the ONNX Runtime
kernel path (onnxruntime-extensions PyOps) against the function path (the standard-op decomposition).

TokenMerge fixtures avoid near-ties: the reference uses ``torch.cdist`` while the contract (and so the kernel and
the decomposition) uses the matmul form, whose rounding noise decides ties that are exact in real arithmetic. Tie
cases (2 valid tokens, identical tokens) use small-integer tokens, for which every implementation is exact.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hbi_runtime.errors import BadInputError, MissingDependencyError, UsageError
from hbi_runtime.ops import DEFAULT_PATH, kernels
from hbi_runtime.ops import ort as ops_ort
from hbi_runtime.sides import SideLevel, score_level

torch = pytest.importorskip("torch")
merge_ref = pytest.importorskip("hbi_export.model.merge")

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------

def merge_case(rng, valid: tuple[int, ...], n: int, c: int = 32, integer: bool = False) -> dict:
    """x (B, N, C), score (B, N) with -1e4 at padding, mask (B, N): one sample per entry of ``valid``."""
    b = len(valid)
    mask = np.arange(n)[None, :] < np.asarray(valid)[:, None]  # (B, N)
    x = rng.integers(-3, 4, (b, n, c)) if integer else rng.standard_normal((b, n, c))
    score = np.where(mask, rng.standard_normal((b, n)), -1e4)
    return {"x": x.astype(np.float32), "score": score.astype(np.float32), "mask": mask.astype(np.float32)}


def reference_merge(case: dict, clusters: int, k: int = 3) -> np.ndarray:
    x, score, mask = (torch.from_numpy(case[key]) for key in ("x", "score", "mask"))
    return merge_ref.token_merge(x, score, mask, clusters, k).numpy()


def wti_case(rng, text_valid: tuple[int, ...], video_valid: tuple[int, ...], lt: int = 7, lv: int = 5,
             d: int = 16) -> dict:
    def side(valid, length):
        mask = np.arange(length)[None, :] < np.asarray(valid)[:, None]
        tokens = rng.standard_normal((len(valid), length, d))
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        weights = np.where(mask, rng.uniform(0.1, 1.0, mask.shape), 0.0)
        weights /= weights.sum(axis=1, keepdims=True)
        return tokens.astype(np.float32), weights.astype(np.float32), mask.astype(np.float32)

    (tt, tw, tm), (vt, vw, vm) = side(text_valid, lt), side(video_valid, lv)
    return {"text_tokens": tt, "text_weights": tw, "text_mask": tm,
            "video_tokens": vt, "video_weights": vw, "video_mask": vm}


def naive_wti(case: dict) -> np.ndarray:
    """The contract's definition, one (text, video) pair at a time, in float64."""
    tt, tw, tm, vt, vw, vm = (case[key].astype(np.float64) for key in case)
    out = np.zeros((tt.shape[0], vt.shape[0]))
    for a in range(tt.shape[0]):
        for b in range(vt.shape[0]):
            s = (tt[a] @ vt[b].T) * tm[a][:, None] * vm[b][None, :]  # (Lt, Lv)
            out[a, b] = (tw[a] @ s.max(axis=1) + vw[b] @ s.max(axis=0)) / 2
    return out


MERGE_CASES = {  # name -> (valid tokens per sample, N, clusters, k, integer tokens)
    "padded": ((9, 4, 3, 7, 9), 9, 3, 3, False),
    "all-valid": ((12, 12, 12), 12, 6, 3, False),
    "one-valid": ((1, 1, 5), 6, 2, 3, False),
    "two-valid": ((2, 2, 2, 5), 6, 3, 3, True),
    "clusters-over-valid": ((3, 1, 4), 8, 6, 3, False),
    "n-below-k": ((2, 1, 2), 2, 1, 3, True),
    "k-two": ((5, 3), 5, 2, 2, False),  # k = 1 would tie every density (self only): noise decides
}


# ---------------------------------------------------------------------------------------------------------------
# TokenMerge kernel
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MERGE_CASES))
def test_token_merge_matches_reference(rng, name):
    valid, n, clusters, k, integer = MERGE_CASES[name]
    case = merge_case(rng, valid, n, integer=integer)
    out = kernels.token_merge(case["x"], case["score"], case["mask"], clusters, k)
    assert out.shape == (len(valid), clusters, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_merge(case, clusters, k), atol=ATOL, rtol=0)


@pytest.mark.parametrize("integer", [False, True])
def test_token_merge_identical_tokens(rng, integer):
    case = merge_case(rng, (6, 4), 6, integer=integer)
    case["x"] = np.repeat(case["x"][:, :1], 6, axis=1)  # every token equal: all densities and distances tie
    out = kernels.token_merge(case["x"], case["score"], case["mask"], 3, 3)
    np.testing.assert_allclose(out, reference_merge(case, 3), atol=ATOL, rtol=0)


def test_token_merge_tie_breaks_by_index():
    # 4 tokens at the corners of a square: equal densities, so the centres are the lowest indices, in order
    x = np.array([[[0, 0], [2, 0], [0, 2], [2, 2]]], dtype=np.float32)
    score = np.zeros((1, 4), np.float32)
    mask = np.ones((1, 4), np.float32)
    out = kernels.token_merge(x, score, mask, clusters=2, k=3)
    # centres: token 0 (parent = dist_max), then token 1 ahead of the equal-scored 2 and 3; 2 -> 0, 3 -> 1
    np.testing.assert_allclose(out, [[[0, 1], [2, 1]]], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out, reference_merge({"x": x, "score": score, "mask": mask}, 2), atol=ATOL, rtol=0)


def test_token_merge_float16(rng):
    case = merge_case(rng, (9, 4, 6), 9)
    half = {key: value.astype(np.float16) for key, value in case.items()}
    out = kernels.token_merge(half["x"], half["score"], half["mask"], 3, 3)
    assert out.dtype == np.float16
    widened = {key: value.astype(np.float32) for key, value in half.items()}
    np.testing.assert_allclose(out.astype(np.float32), reference_merge(widened, 3), atol=5e-3, rtol=0)


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda c: {**c, "x": c["x"][0]}, BadInputError, r"TokenMerge x \| Received incompatible shape: \(6, 32\)"),
    (lambda c: {**c, "mask": c["mask"][:, :3]}, BadInputError, r"TokenMerge mask \| Received incompatible shape"),
    (lambda c: {**c, "x": c["x"].astype(np.int32)}, BadInputError, r"Received dtype int32"),
])
def test_token_merge_rejects_bad_inputs(rng, change, error, match):
    case = change(merge_case(rng, (6, 4), 6))
    with pytest.raises(error, match=match):
        kernels.token_merge(case["x"], case["score"], case["mask"], 2, 3)


@pytest.mark.parametrize(("clusters", "k", "match"), [(7, 3, r"clusters must be .* at most N = 6, got 7"),
                                                      (0, 3, r"clusters must be an integer >= 1"),
                                                      (2, 0, r"k must be an integer >= 1, got 0")])
def test_token_merge_rejects_bad_attributes(rng, clusters, k, match):
    case = merge_case(rng, (6, 4), 6)
    with pytest.raises(UsageError, match=match):
        kernels.token_merge(case["x"], case["score"], case["mask"], clusters, k)


# ---------------------------------------------------------------------------------------------------------------
# WeightedTokenInteraction kernel
# ---------------------------------------------------------------------------------------------------------------

def test_wti_matches_sides_naive_and_torch(rng):
    case = wti_case(rng, (7, 3, 1, 5), (5, 2, 5, 1, 4, 5))
    out = kernels.weighted_token_interaction(*case.values())
    assert out.shape == (4, 6) and out.dtype == np.float32
    text = SideLevel(case["text_tokens"], case["text_weights"], case["text_mask"])
    video = SideLevel(case["video_tokens"], case["video_weights"], case["video_mask"])
    np.testing.assert_array_equal(out, score_level(text, video))
    np.testing.assert_allclose(out, naive_wti(case), atol=ATOL, rtol=0)
    sides_ref = pytest.importorskip("hbi_export.model.sides")
    t, v = (sides_ref.SideLevel(*(torch.from_numpy(case[f"{side}_{key}"]) for key in ("tokens", "weights", "mask")))
            for side in ("text", "video"))
    np.testing.assert_allclose(out, sides_ref.score_level(t, v).numpy(), atol=ATOL, rtol=0)


def test_wti_tiles_over_texts_and_videos(rng):
    case = wti_case(rng, (7, 3, 1, 5, 2), (5, 2, 5, 1, 4, 5, 3))
    whole = kernels.weighted_token_interaction(*case.values())
    one_pair = 7 * 5 * 4  # bytes of one (text, video) similarity block: forces 1 text x 1 video per chunk
    np.testing.assert_allclose(kernels.weighted_token_interaction(*case.values(), chunk_bytes=one_pair), whole,
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(kernels.weighted_token_interaction(*case.values(), chunk_bytes=3 * one_pair), whole,
                               atol=1e-6, rtol=0)


def test_wti_float16(rng):
    case = {key: value.astype(np.float16) for key, value in wti_case(rng, (7, 3), (5, 2, 4)).items()}
    out = kernels.weighted_token_interaction(*case.values())
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), naive_wti(case), atol=2e-3, rtol=0)


def test_wti_rejects_mismatched_widths(rng):
    case = wti_case(rng, (7,), (5,))
    case["video_tokens"] = case["video_tokens"][..., :8]
    with pytest.raises(BadInputError, match=r"text tokens of width D=16 and video tokens of width D=8"):
        kernels.weighted_token_interaction(*case.values())


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime: kernel path vs function path
# ---------------------------------------------------------------------------------------------------------------

def test_default_paths_are_valid():
    assert set(DEFAULT_PATH) == set(ops_ort.KERNEL_OP_TYPES)
    assert set(DEFAULT_PATH.values()) <= {"kernel", "function"}


@pytest.fixture(scope="module")
def onnx_env():
    """onnx, onnxruntime and the production decompositions; the kernel path needs onnxruntime-extensions."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    functions = pytest.importorskip("hbi_export.onnx.functions")
    return onnx, ort, functions


def one_node_model(onnx_env, op_type: str, inputs: dict[str, tuple], output: tuple, dtype=np.float32,
                   **attrs) -> bytes:
    onnx, _, functions = onnx_env
    elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.FLOAT16
    node = onnx.helper.make_node(op_type, list(inputs), [output[0]], name=f"{op_type}_0", domain="hbi",
                                 plugin_namespace="hbi", plugin_version="1", **attrs)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info(n, elem, s)
                                                 for n, s in inputs.items()],
                                   [onnx.helper.make_tensor_value_info(output[0], elem, output[1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return functions.attach_functions(model).SerializeToString()


def merge_model(onnx_env, n: int, c: int, clusters: int, k: int = 3, dtype=np.float32) -> bytes:
    inputs = {"x": ("B", n, c), "score": ("B", n), "mask": ("B", n)}
    return one_node_model(onnx_env, "TokenMerge", inputs, ("merged", ("B", clusters, c)), dtype,
                          clusters=clusters, k=k)


def wti_model(onnx_env, lt: int, lv: int, d: int, dtype=np.float32) -> bytes:
    t, v = ("Bt", lt), ("Bv", lv)
    inputs = {"text_tokens": (*t, d), "text_weights": t, "text_mask": t,
              "video_tokens": (*v, d), "video_weights": v, "video_mask": v}
    return one_node_model(onnx_env, "WeightedTokenInteraction", inputs, ("scores", ("Bt", "Bv")), dtype)


def run_both(onnx_env, model: bytes, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(function path output, kernel path output)."""
    _, ort, _ = onnx_env
    cpu = ["CPUExecutionProvider"]
    function = ort.InferenceSession(model, ort.SessionOptions(), providers=cpu)
    so = ops_ort.session_options_with_kernels(ort.SessionOptions())
    kernel = ort.InferenceSession(ops_ort.prepare_model_for_kernels(model), so, providers=cpu)
    return function.run(None, feeds)[0], kernel.run(None, feeds)[0]


@pytest.mark.parametrize("name", sorted(MERGE_CASES))
def test_ort_token_merge_kernel_matches_function_and_reference(onnx_env, rng, name):
    valid, n, clusters, k, integer = MERGE_CASES[name]
    case = merge_case(rng, valid, n, integer=integer)
    function, kernel = run_both(onnx_env, merge_model(onnx_env, n, 32, clusters, k), case)
    reference = reference_merge(case, clusters, k)
    np.testing.assert_allclose(kernel, function, atol=ATOL, rtol=0)
    np.testing.assert_allclose(kernel, reference, atol=ATOL, rtol=0)
    np.testing.assert_allclose(function, reference, atol=ATOL, rtol=0)


def test_ort_wti_kernel_matches_function(onnx_env, rng):
    case = wti_case(rng, (7, 3, 1), (5, 2, 5, 1))
    function, kernel = run_both(onnx_env, wti_model(onnx_env, 7, 5, 16), case)
    np.testing.assert_allclose(kernel, function, atol=ATOL, rtol=0)
    np.testing.assert_allclose(kernel, naive_wti(case), atol=ATOL, rtol=0)


def test_ort_float16_models(onnx_env, rng):
    merge = {key: value.astype(np.float16) for key, value in merge_case(rng, (9, 4, 6), 9).items()}
    function, kernel = run_both(onnx_env, merge_model(onnx_env, 9, 32, 3, dtype=np.float16), merge)
    assert kernel.dtype == np.float16
    np.testing.assert_allclose(kernel.astype(np.float32), function.astype(np.float32), atol=5e-3, rtol=0)
    wti = {key: value.astype(np.float16) for key, value in wti_case(rng, (7, 3), (5, 2, 4)).items()}
    function, kernel = run_both(onnx_env, wti_model(onnx_env, 7, 5, 16, dtype=np.float16), wti)
    assert kernel.dtype == np.float16
    np.testing.assert_allclose(kernel.astype(np.float32), function.astype(np.float32), atol=2e-3, rtol=0)


def test_prepare_rewrites_nodes_and_drops_functions(onnx_env):
    onnx, _, _ = onnx_env
    model = onnx.load_model_from_string(ops_ort.prepare_model_for_kernels(merge_model(onnx_env, 9, 32, 3)))
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == ("ai.onnx.contrib", "HbiTokenMerge")
    assert {a.name: a.i for a in node.attribute} == {"clusters": 3, "k": 3}
    assert not model.functions
    assert {o.domain for o in model.opset_import} == {"", "ai.onnx.contrib"}
    half = onnx.load_model_from_string(ops_ort.prepare_model_for_kernels(
        wti_model(onnx_env, 7, 5, 16, dtype=np.float16)))
    assert [n.op_type for n in half.graph.node] == ["Cast"] * 6 + ["HbiWeightedTokenInteraction", "Cast"]


def test_prepare_accepts_a_path(onnx_env, tmp_path):
    path = tmp_path / "merge.onnx"
    path.write_bytes(merge_model(onnx_env, 9, 32, 3))
    assert ops_ort.prepare_model_for_kernels(path) == ops_ort.prepare_model_for_kernels(path.read_bytes())


def test_ort_prefers_a_registered_kernel_over_a_local_function(onnx_env, rng):
    """ORT behaviour the design relies on: a node with a registered kernel ignores a same-named local function."""
    onnx, ort, _ = onnx_env
    model = onnx.load_model_from_string(ops_ort.prepare_model_for_kernels(merge_model(onnx_env, 9, 32, 3)))
    zero = onnx.helper.make_node("Constant", [], ["zero"], value_float=0.0)
    decoy = onnx.helper.make_function("ai.onnx.contrib", "HbiTokenMerge", ["x", "score", "mask"], ["merged"],
                                      [zero, onnx.helper.make_node("Mul", ["x", "zero"], ["merged"])],
                                      [onnx.helper.make_opsetid("", 18)], attributes=["clusters", "k"])
    model.functions.append(decoy)
    case = merge_case(rng, (9, 4), 9)
    so = ops_ort.session_options_with_kernels(ort.SessionOptions())
    with_kernel = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(with_kernel.run(None, case)[0], reference_merge(case, 3), atol=ATOL, rtol=0)
    without = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not without.run(None, case)[0].any()  # no kernel registered: the decoy function ran


def test_session_options_with_kernels_is_idempotent(onnx_env, rng):
    _, ort, _ = onnx_env
    so = ops_ort.session_options_with_kernels(ops_ort.session_options_with_kernels(ort.SessionOptions()))
    sess = ort.InferenceSession(ops_ort.prepare_model_for_kernels(merge_model(onnx_env, 9, 32, 3)), so,
                                providers=["CPUExecutionProvider"])
    assert sess.run(None, merge_case(rng, (9,), 9))[0].shape == (1, 3, 32)


def test_prepare_rejects_bad_models(onnx_env, tmp_path):
    with pytest.raises(BadInputError, match=r"model bytes \| Received 9 bytes that are not an ONNX model"):
        ops_ort.prepare_model_for_kernels(b"not onnx!")
    with pytest.raises(BadInputError, match=r"Received a path that is not a file"):
        ops_ort.prepare_model_for_kernels(tmp_path / "missing.onnx")
    with pytest.raises(BadInputError, match=r"Received clusters=12 for N=9 tokens"):
        ops_ort.prepare_model_for_kernels(merge_model(onnx_env, 9, 32, 12))


def test_missing_extensions_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import now raises ImportError
    assert ops_ort.kernel_available() is False
    with pytest.raises(MissingDependencyError, match=r"onnxruntime-extensions is not installed") as info:
        ops_ort.session_options_with_kernels(object())
    assert "pip install onnxruntime-extensions" in info.value.hint


def test_missing_onnx_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingDependencyError, match=r"onnx is not installed") as info:
        ops_ort.prepare_model_for_kernels(b"")
    assert info.value.hint == "pip install onnx"


def test_two_token_tie_follows_the_index_rule_for_random_tokens():
    """Two valid tokens have equal densities in exact arithmetic; the symmetrised distances keep them equal, so
    the index rule decides (token 0 is the first centre) in the kernel as in the reference, for any values."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6, 32)).astype(np.float32) * 3
    mask = np.zeros((64, 6), np.float32)
    mask[:, :2] = 1
    score = np.where(mask > 0, rng.normal(size=(64, 6)), -1e4).astype(np.float32)
    got = kernels.token_merge(x, score, mask, 2, 3)
    want = merge_ref.token_merge(torch.from_numpy(x), torch.from_numpy(score), torch.from_numpy(mask), 2, 3).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
