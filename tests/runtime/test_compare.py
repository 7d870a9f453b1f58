"""hbi_runtime.compare: metrics against hand-computed values, tolerance evaluation, NaN detection, rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hbi_runtime.compare import (REL_EPS_SCALE, TOLERANCES, ParityResult, ScoreComparison, TensorComparison,
                                 Tolerance, compare_scores, compare_tensors, evaluate, render_table,
                                 spearman_rows, top1_agreement_rows, topk_overlap_rows)
from hbi_runtime.errors import EXIT_GATE_FAILED, BadInputError, GateFailedError, UsageError


def no_tie_scores(rng: np.random.Generator, shape=(6, 9)) -> np.ndarray:
    """Scores whose entries are at least 1e-2 apart within every row and column (no near-ties)."""
    values = rng.permutation(np.prod(shape)).reshape(shape) * 1e-2
    return values.astype(np.float32)


# --- tensor metrics ---------------------------------------------------------------------------------------------


def test_tensor_metrics_match_hand_computed_values() -> None:
    ref = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    test = np.array([[1.1, -2.0], [0.5, 3.6]], dtype=np.float32)
    c = compare_tensors("x", ref, test)
    assert c.max_abs == pytest.approx(0.4, abs=1e-6)
    assert c.mean_abs == pytest.approx(0.125, abs=1e-6)
    assert c.max_rel == pytest.approx(0.1, abs=1e-6)  # 0.1 / 1.0 and 0.4 / 4.0
    row0 = (1.1 + 4.0) / (np.sqrt(5.0) * np.sqrt(1.21 + 4.0))
    row1 = (0.25 + 14.4) / (np.sqrt(16.25) * np.sqrt(0.25 + 12.96))
    assert c.cosine_min == pytest.approx(min(row0, row1), abs=1e-6)
    assert c.shape == (2, 2) and c.failure is None


def test_cosine_of_orthogonal_and_opposite_vectors() -> None:
    assert compare_tensors("v", np.array([1.0, 0.0]), np.array([0.0, 1.0])).cosine == pytest.approx(0.0)
    c = compare_tensors("v", np.array([1.0, 2.0]), np.array([-1.0, -2.0]))
    assert c.cosine == pytest.approx(-1.0) and c.cosine_min is None  # rows only exist for ndim >= 2


def test_cosine_of_zero_rows_is_defined() -> None:
    ref = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert compare_tensors("z", ref, ref.copy()).cosine_min == 1.0  # both zero: identical
    test = np.array([[0.0, 1e-3], [3.0, 4.0]])
    assert compare_tensors("z", ref, test).cosine_min == 0.0  # one zero: no direction in common


def test_max_rel_does_not_explode_on_near_zero_reference() -> None:
    ref = np.array([1.0, 1e-9])
    test = np.array([1.0, 2e-9])
    c = compare_tensors("r", ref, test)
    assert c.max_rel == pytest.approx(1e-9 / REL_EPS_SCALE)  # measured against the tensor's scale, not 1e-9


def test_row_cosine_catches_one_bad_row_the_global_cosine_hides(rng: np.random.Generator) -> None:
    ref = rng.standard_normal((50, 2, 8))
    test = ref.copy()
    test[7] = -test[7]
    c = compare_tensors("tokens", ref, test)
    assert c.cosine > 0.9 and c.cosine_min == pytest.approx(-1.0)


def test_fp16_against_fp32_is_allowed_but_other_mismatches_are_refused() -> None:
    ref = np.ones((2, 3), dtype=np.float32)
    assert compare_tensors("x", ref, ref.astype(np.float16)).test_dtype == "float16"
    with pytest.raises(BadInputError, match=r"output x \| Received incompatible shapes: reference \(2, 3\), tested "
                                            r"\(3, 2\)"):
        compare_tensors("x", ref, np.ones((3, 2), dtype=np.float32))
    with pytest.raises(BadInputError, match="incompatible dtypes: reference float32, tested int64"):
        compare_tensors("x", ref, np.ones((2, 3), dtype=np.int64))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_reported_as_failures(bad: float) -> None:
    ref = np.zeros((3, 4), dtype=np.float32)
    test = ref.copy()
    test[1, 2] = bad
    c = compare_tensors("feat", ref, test)
    assert c.failure == "non-finite values: 0 in the reference, 1 in the tested output"
    assert (c.ref_nonfinite, c.test_nonfinite) == (0, 1)
    assert np.isnan(c.max_abs)
    s = compare_scores("scores", test, ref)
    assert s.ref_nonfinite == 1 and s.failure is not None and np.isnan(s.t2v.top1)
    for tolerance in TOLERANCES.values():  # fails under every tolerance, even those without max_abs
        result = evaluate([c, s], tolerance)
        assert not result.ok
        assert {(f.output, f.metric) for f in result.failures} >= {("feat", "finite"), ("scores", "finite")}
    json.dumps(evaluate([c, s], "fp16").to_dict(), allow_nan=False)  # NaN becomes null in JSON


# --- ranking metrics --------------------------------------------------------------------------------------------


def test_spearman_hand_computed() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 2.0]])
    test = np.array([[3.0, 2.0, 1.0], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    # row 2: ranks [1, 2.5, 2.5] vs [1, 2, 3] -> centred [-1, .5, .5] . [-1, 0, 1] / sqrt(1.5 * 2)
    np.testing.assert_allclose(spearman_rows(ref, test), [-1.0, 1.0, 1.5 / np.sqrt(3.0)])


def test_spearman_of_constant_and_single_column_rows() -> None:
    assert spearman_rows(np.array([[2.0, 2.0]]), np.array([[5.0, 5.0]]))[0] == 1.0
    assert spearman_rows(np.array([[2.0, 2.0]]), np.array([[1.0, 5.0]]))[0] == 0.0
    assert spearman_rows(np.array([[1.0, 5.0]]), np.array([[2.0, 2.0]]))[0] == 0.0
    assert spearman_rows(np.array([[0.3]]), np.array([[0.7]]))[0] == 1.0


def test_top1_agreement_on_constructed_rows() -> None:
    ref = np.array([[0.9, 0.1, 0.2],
                    [0.5, 0.5, 0.1],   # a reference tie: either of the first two agrees
                    [0.1, 0.2, 0.3],
                    [0.3, 0.3 - 5e-8, 0.0]])  # within the tie tolerance
    test = np.array([[0.8, 0.1, 0.2],
                     [0.4, 0.6, 0.1],
                     [0.3, 0.2, 0.1],  # disagrees
                     [0.2, 0.3, 0.0]])
    np.testing.assert_array_equal(top1_agreement_rows(ref, test), [1.0, 1.0, 0.0, 1.0])
    assert compare_scores("s", ref, test).t2v.top1 == pytest.approx(0.75)


def test_topk_overlap_and_clipping() -> None:
    ref = np.array([[6.0, 5, 4, 3, 2, 1, 0]])
    test = np.array([[6.0, 5, 4, 3, 0, 1, 2]])  # top-5 {0,1,2,3,4} vs {0,1,2,3,6}
    assert topk_overlap_rows(ref, test, 5)[0] == pytest.approx(0.8)
    assert topk_overlap_rows(ref, test, 1)[0] == 1.0
    assert topk_overlap_rows(ref[:, :3], test[:, :3], 5)[0] == 1.0  # k clipped to 3 columns


def test_score_directions_are_rows_and_columns() -> None:
    ref = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    test = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])  # row 2 flips; column 1's best text changes
    c = compare_scores("scores", ref, test, ks=(1, 2))
    assert c.t2v.top1 == pytest.approx(2 / 3) and c.t2v.spearman == pytest.approx(1 / 3)
    assert c.v2t.top1 == 1.0 and c.v2t.spearman == 1.0  # each video still ranks the texts the same way
    assert set(c.t2v.topk) == {1, 2} and c.t2v.topk[2] == 1.0


def test_compare_scores_requires_a_matrix() -> None:
    with pytest.raises(BadInputError, match=r"Expected a non-empty floating score matrix"):
        compare_scores("s", np.ones(4), np.ones(4))
    with pytest.raises(UsageError, match="ks must be positive integers"):
        compare_scores("s", np.ones((2, 2)), np.ones((2, 2)), ks=(0,))


# --- tolerances and evaluation ----------------------------------------------------------------------------------


def test_tolerance_table_is_the_design_table() -> None:
    assert TOLERANCES["fp32"].max_abs == 1e-4 and TOLERANCES["fp32"].top1 == 1.0
    fp16 = TOLERANCES["fp16"]
    assert (fp16.cosine, fp16.top5, fp16.spearman, fp16.max_abs) == (0.999, 0.99, 0.99, None)
    assert TOLERANCES["custom_op"].max_abs == 1e-5


def test_fp32_passes_close_outputs_and_fails_beyond_1e4(rng: np.random.Generator) -> None:
    scores = no_tie_scores(rng)
    feats = rng.standard_normal((6, 4, 8)).astype(np.float32)
    close = [compare_scores("scores", scores, scores + 5e-5), compare_tensors("feats", feats, feats - 5e-5)]
    result = evaluate(close, "fp32")
    assert result.ok and not result.failures
    assert "PASS scores top1[v2t] = 1 (needs >= 1)" in result.lines()
    far = [compare_scores("scores", scores, scores + 2e-4), compare_tensors("feats", feats, feats)]
    result = evaluate(far, "fp32")
    assert not result.ok
    assert [(f.output, f.metric) for f in result.failures] == [("scores", "max_abs")]
    assert result.output_ok("feats") and not result.output_ok("scores")


def test_fp32_fails_a_changed_top1_even_within_max_abs() -> None:
    ref = np.array([[0.50000, 0.50005], [0.1, 0.9]], dtype=np.float32)
    test = np.array([[0.50005, 0.50000], [0.1, 0.9]], dtype=np.float32)
    result = evaluate([compare_scores("scores", ref, test)], "fp32")
    assert [f.metric for f in result.failures] == ["top1[t2v]"]


def test_fp16_passes_rounding_and_fails_reordered_rows(rng: np.random.Generator) -> None:
    scores = no_tie_scores(rng, (8, 12))
    feats = rng.standard_normal((8, 32)).astype(np.float32)
    ok = evaluate([compare_scores("scores", scores, scores.astype(np.float16)),
                   compare_tensors("feats", feats, feats.astype(np.float16))], TOLERANCES["fp16"])
    assert ok.ok
    shuffled = scores.copy()
    shuffled[0] = rng.permutation(shuffled[0])
    noisy = feats + rng.standard_normal(feats.shape).astype(np.float32) * 0.1
    bad = evaluate([compare_scores("scores", scores, shuffled), compare_tensors("feats", feats, noisy)], "fp16")
    failed = {(f.output, f.metric) for f in bad.failures}
    assert ("feats", "cosine") in failed and ("scores", "spearman[t2v]") in failed


def test_evaluate_refuses_what_cannot_be_judged() -> None:
    c = compare_scores("scores", np.eye(3), np.eye(3), ks=(1,))
    with pytest.raises(UsageError, match="include 5 in compare_scores"):
        evaluate([c], "fp16")
    with pytest.raises(UsageError, match="unknown tolerance 'fp8'"):
        evaluate([c], "fp8")
    with pytest.raises(UsageError, match="no comparisons"):
        evaluate([], "fp32")
    with pytest.raises(UsageError, match="duplicate output names"):
        evaluate([c, c], "fp32")


def test_raise_if_failed_is_a_gate_error() -> None:
    result = evaluate([compare_tensors("feats", np.zeros(3), np.ones(3))], Tolerance(name="t", max_abs=0.5))
    with pytest.raises(GateFailedError, match=r"parity check 't' failed: FAIL feats max_abs = 1 \(needs <= 0.5\)") \
            as exc:
        result.raise_if_failed(hint="re-export")
    assert exc.value.exit_code == EXIT_GATE_FAILED and exc.value.hint == "re-export"
    evaluate([compare_tensors("feats", np.zeros(3), np.zeros(3))], "fp32").raise_if_failed()


def test_to_dict_is_json_and_complete(rng: np.random.Generator) -> None:
    scores = no_tie_scores(rng)
    result = evaluate([compare_scores("scores", scores, scores), compare_tensors("f", scores, scores)], "fp16")
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["ok"] is True and data["tolerance"]["name"] == "fp16"
    assert data["outputs"][0]["kind"] == "scores" and data["outputs"][0]["t2v"]["topk"]["5"] == 1.0
    assert data["outputs"][1]["kind"] == "tensor"
    assert {c["metric"] for c in data["checks"]} >= {"finite", "top5[t2v]", "spearman[v2t]", "cosine"}
    assert isinstance(result, ParityResult) and isinstance(result.comparisons[0], ScoreComparison)
    assert isinstance(result.comparisons[1], TensorComparison)


def test_render_table_is_fixed_width_and_names_failures(rng: np.random.Generator) -> None:
    scores = no_tie_scores(rng)
    result = evaluate([compare_scores("scores", scores, scores + 1e-3), compare_tensors("feats", scores, scores)],
                      "fp32")
    table = render_table(result)
    lines = table.splitlines()
    assert lines[0] == "parity: fp32 (ONNX Runtime vs PyTorch, fp32)"
    assert lines[1].split() == ["output", "max", "abs", "max", "rel", "cosine", "top1", "top5", "spearman", "result"]
    scores_row, feats_row = lines[3], lines[4]
    assert scores_row.startswith("scores") and scores_row.endswith("FAIL") and "1.00e-03" in scores_row
    assert feats_row.startswith("feats") and feats_row.endswith("PASS") and feats_row.split()[4:7] == ["-"] * 3
    assert len(scores_row) == len(feats_row) == len(lines[2])
    assert "  FAIL scores max_abs = 0.001 (needs <= 0.0001)" in lines
    assert lines[-1] == "overall: FAIL (1 of 6 checks failed)"
