"""The accuracy gate on its own (hbi_calibration.gate.measure / decide): the sign of the R@1 drop and the bounds.

The score matrices are made by hand, so the recalls are known exactly: the reference ranks each of the four
captions' own video first (R@1 100 %); the "INT8" side ranks one of them second (R@1 75 %), a drop of 25 points.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hbi_calibration import gate  # (ruff files hbi_calibration with the third-party packages)

N = 4
PERFECT = np.eye(N, dtype=np.float32) + 0.1  # each caption's own video (the diagonal) first
ONE_MISS = PERFECT.copy()
ONE_MISS[2, 3] = 2.0  # caption 2 ranks video 3 above its own: R@1 3/4


def _side(seed: int) -> SimpleNamespace:
    tokens = np.random.default_rng(seed).standard_normal((N, 3, 8)).astype(np.float32)
    return SimpleNamespace(n=N, levels=[SimpleNamespace(tokens=tokens)])


def _measure(reference_scores: np.ndarray, int8_scores: np.ndarray) -> dict:
    """``gate.measure`` with a model whose scores of the reference and of the INT8 video side are the ones given."""
    ref_side, int8_side = _side(0), _side(0)
    scores = {id(ref_side): reference_scores, id(int8_side): int8_scores}
    model = SimpleNamespace(score=lambda text, video: scores[id(video)])
    ref = gate.Reference(video=ref_side, text=SimpleNamespace(n=N), truth=np.arange(N),
                         level_weights=np.ones(3, dtype=np.float32))
    return gate.measure(model, ref, int8_side)


def test_the_drop_is_reference_minus_int8():
    worse = _measure(PERFECT, ONE_MISS)["recall"]
    assert (worse["reference"]["R@1"], worse["int8"]["R@1"], worse["r1_drop"]) == (100.0, 75.0, 25.0)
    better = _measure(ONE_MISS, PERFECT)["recall"]
    assert (better["reference"]["R@1"], better["int8"]["R@1"], better["r1_drop"]) == (75.0, 100.0, -25.0)


@pytest.mark.parametrize("reference, int8, max_drop, passed", [
    (PERFECT, ONE_MISS, 30.0, True),  # a positive drop (INT8 worse) within the bound
    (PERFECT, ONE_MISS, 25.0, True),  # exactly at the bound: "at most" includes it
    (PERFECT, ONE_MISS, 24.99, False),  # above the bound
    (PERFECT, ONE_MISS, 0.0, False),  # any loss fails a zero bound ...
    (ONE_MISS, PERFECT, 0.0, True),  # ... a negative drop (INT8 better) passes it
    (ONE_MISS, PERFECT, -20.0, True),  # and a bound that asks INT8 to gain 20 points
    (ONE_MISS, PERFECT, -30.0, False),  # but not 30
], ids=["within", "at-bound", "above", "loss-vs-zero", "gain-vs-zero", "gain-vs-negative", "gain-too-small"])
def test_the_gate_passes_a_drop_of_at_most_the_bound(reference, int8, max_drop, passed):
    metrics = _measure(reference, int8)
    ok, lines = gate.decide(metrics, gate.Criteria(max_r1_drop=max_drop))
    assert ok is passed
    recall = metrics["recall"]
    assert lines == ["PASS all outputs finite",
                     (f"{'PASS' if passed else 'FAIL'} t2v R@1 {recall['reference']['R@1']:.2f} -> "
                      f"{recall['int8']['R@1']:.2f} (drop {recall['r1_drop']:.2f} points, needs <= {max_drop:g})")]


@pytest.mark.parametrize("top1, min_top1, passed", [(0.95, 0.95, True), (0.9499, 0.95, False), (1.0, 0.95, True)])
def test_without_captions_top1_agreement_must_reach_the_bound(top1, min_top1, passed):
    metrics = {"features": {"video_tokens_l0": {"finite": True}},
               "scores": {"kind": "video->video (self excluded)", "top1": top1, "finite": True}}
    ok, lines = gate.decide(metrics, gate.Criteria(min_top1=min_top1))
    assert ok is passed and len(lines) == 2 and lines[1].startswith("PASS" if passed else "FAIL")


def test_a_non_finite_output_fails_whatever_the_drop():
    metrics = _measure(PERFECT, PERFECT)
    metrics["features"]["video_tokens_l0"]["finite"] = False
    ok, lines = gate.decide(metrics, gate.Criteria(max_r1_drop=100.0))
    assert not ok and lines[0] == "FAIL all outputs finite" and lines[1].startswith("FAIL")
