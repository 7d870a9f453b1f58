"""The candidate stage's approximate scorer (hbi_runtime/index/_cand.c and its numpy twin) and its top-K selection.

The reference is independent of both: the project's exact HBI scorer (numpy backend, float32 store) run on videos
whose frame tokens *are* the centroids their codes name. The approximate score is that entity score x 2 (the
kernel leaves out HBI's 1/2, which changes no order).
"""

from __future__ import annotations

import numpy as np
import pytest

from hbi_runtime.index import candidates as cand_stage
from hbi_runtime.scoring import StoreLevel, score_level
from hbi_runtime.sides import SideLevel


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _case(seed: int, n: int = 257, t: int = 6, d: int = 24, nlist: int = 50, length: int = 20):
    rng = np.random.default_rng(seed)
    centroids = _normalise(rng.normal(size=(nlist, d)))
    codes = rng.integers(0, nlist, (n, t)).astype(np.uint16)
    frames = rng.integers(1, t + 1, n)  # valid frames per video (padding at the end, as the index stores it)
    mask = np.arange(t)[None] < frames[:, None]
    codes[~mask] = cand_stage.NO_CODE
    weights = np.where(mask, rng.random((n, t)), 0).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    tokens = np.where(mask[..., None], centroids[np.where(mask, codes, 0).astype(np.int64)], 0).astype(np.float32)
    store = StoreLevel("float32", tokens, weights, mask)
    q_tokens = _normalise(rng.normal(size=(1, length, d)))
    return centroids, codes, store, q_tokens, rng


PATHS = [p for p in ("numpy", "c", "auto") if p == "numpy" or cand_stage.kernel_path() != "numpy"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("valid", [1, 7, 16, 17, 20])  # lanes: one block, two, a padded query or not
def test_approximate_score_is_the_exact_score_of_the_centroid_tokens(path, valid):
    centroids, codes, store, q_tokens, rng = _case(valid)
    length = q_tokens.shape[1]
    q_mask = np.arange(length) < valid
    q_weights = np.where(q_mask, rng.random(length), 0).astype(np.float32)
    q_weights /= q_weights.sum()
    q_tokens = np.where(q_mask[None, :, None], q_tokens, 0).astype(np.float32)
    text = SideLevel(q_tokens, q_weights[None], q_mask[None])
    exact = score_level(text, store, backend="numpy")[0]
    cand = cand_stage.CandidateIndex(None, {}, centroids, codes, np.zeros((len(codes), 2), np.int32),
                                     np.zeros(len(codes), np.int64))
    approx = cand.approximate(q_tokens[0], q_weights, q_mask, store.weights, path=path)
    np.testing.assert_allclose(approx, 2 * exact, atol=2e-5)


@pytest.mark.skipif(cand_stage.kernel_path() == "numpy", reason="the C kernel is not built here")
def test_long_queries_take_the_portable_loop_and_agree():
    """Past 64 query tokens the AVX-512 path hands over to the portable loop: same values."""
    centroids, codes, store, q_tokens, _ = _case(3, length=70)
    length = q_tokens.shape[1]
    weights = np.full(length, 1 / length, np.float32)
    mask = np.ones(length, bool)
    cand = cand_stage.CandidateIndex(None, {}, centroids, codes, np.zeros((len(codes), 2), np.int32),
                                     np.zeros(len(codes), np.int64))
    np.testing.assert_allclose(cand.approximate(q_tokens[0], weights, mask, store.weights, path="auto"),
                               cand.approximate(q_tokens[0], weights, mask, store.weights, path="numpy"), atol=2e-5)


def test_a_query_without_tokens_has_no_approximate_score():
    centroids, codes, store, q_tokens, _ = _case(4)
    cand = cand_stage.CandidateIndex(None, {}, centroids, codes, np.zeros((len(codes), 2), np.int32),
                                     np.zeros(len(codes), np.int64))
    mask = np.zeros(q_tokens.shape[1], bool)
    assert cand.approximate(q_tokens[0], np.zeros(len(mask), np.float32), mask, store.weights) is None
    assert np.array_equal(cand.candidates(q_tokens[0], np.zeros(len(mask), np.float32), mask, store.weights, 5),
                          np.arange(5))


@pytest.mark.parametrize("n,k,levels", [(10, 3, None), (200_000, 5_000, None), (200_000, 5_000, 50),
                                        (300_000, 1_000, 3), (131_072, 65_000, None)])
def test_top_rows_is_the_top_k_with_lower_rows_first_on_ties(n, k, levels):
    """Against a full sort (value descending, then row ascending); ``levels`` makes heavy ties (the sample-based
    threshold must still hand every tied row at the k-th value to the tie order)."""
    rng = np.random.default_rng(n + k)
    values = (rng.integers(0, levels, n) if levels else rng.normal(size=n)).astype(np.float32)
    expected = np.sort(np.lexsort((np.arange(n), -values))[:k])
    assert np.array_equal(cand_stage.top_rows(values, k), expected)


def test_nlist_grows_with_the_stored_tokens_within_bounds():
    assert cand_stage.nlist_for(10) == 64
    assert cand_stage.nlist_for(160_000) == 8192  # 20,000 demo videos: 16 tokens per centroid
    assert cand_stage.nlist_for(8_000_000) == cand_stage.MAX_NLIST
    assert cand_stage.MAX_NLIST < int(cand_stage.NO_CODE)  # the padding code is never a centroid id


def test_candidate_count_is_a_fraction_of_the_gallery():
    assert cand_stage.candidate_count(1_000_000, 10) == int(cand_stage.DEFAULT_FRACTION * 1_000_000)
    assert cand_stage.candidate_count(5_000, 10) == cand_stage.DEFAULT_MIN_K
    assert cand_stage.candidate_count(5_000, 500) == 5_000  # 10 x top-k
