"""hbi_runtime.scoring: the chunked engine against the numpy reference score, storage formats, top k, explain."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.scoring import (STORAGE_DTYPES, StoreLevel, VideoStore, explain, quantize_int8, score, score_level,
                                 score_levels, topk)
from hbi_runtime.scoring.engine import ort_available
from hbi_runtime.scoring.native import native_available
from hbi_runtime.scoring.score import query_groups, resolve_backend
from hbi_runtime.sides import LEVELS, Side, SideLevel
from hbi_runtime.sides import score as reference_score
from hbi_runtime.sides import score_level as reference_level

DIM = 32
TEXT_VALID = (9, 4, 1, 6, 9, 0)  # valid tokens per query; L = 9; 9 = no padding, 0 = an empty query
VIDEO_VALID = (7, 2, 5, 1, 7, 3, 6, 7, 4)  # valid frames per video; T = 7
BACKENDS = ["numpy"] + (["ort"] if ort_available() else [])


def make_level(rng: np.random.Generator, valid: tuple[int, ...], length: int, dim: int = DIM) -> SideLevel:
    """Normalised tokens, softmaxed weights; padded positions hold garbage that must never be used."""
    n = len(valid)
    mask = np.arange(length)[None, :] < np.asarray(valid)[:, None]  # (n, N)
    tokens = rng.standard_normal((n, length, dim))
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    tokens[~mask] = rng.uniform(-50, 50, size=(int((~mask).sum()), dim))
    logits = np.where(mask, rng.standard_normal((n, length)), -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True, initial=-1e30))
    weights = np.where(mask, weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30), 7.0)
    return SideLevel(tokens.astype(np.float32), weights.astype(np.float32), mask)


def make_side(rng: np.random.Generator, kind: str, valid: tuple[int, ...], length: int) -> Side:
    levels = (make_level(rng, valid, length), make_level(rng, (length // 2,) * len(valid), length // 2),
              make_level(rng, (2,) * len(valid), 2))
    return Side(levels, kind)


@pytest.fixture
def sides(rng) -> tuple[Side, Side]:
    return make_side(rng, "text", TEXT_VALID, 9), make_side(rng, "video", VIDEO_VALID, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_equals_reference_with_padding_and_empty_query(sides, backend):
    text, video = sides
    store = VideoStore.from_sides(video, "float32")
    weights = (1.0, 0.5, 0.25)
    got = score(text, store, level_weights=weights, backend=backend)
    assert got.shape == (len(TEXT_VALID), len(VIDEO_VALID)) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_score(text, video, weights), rtol=0, atol=1e-5)
    entity = score_levels(text, store, levels=("entity",), backend=backend)["entity"]
    np.testing.assert_array_equal(entity[-1], 0.0)  # no valid entity token: S is all zeros in the reference too


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_similarities_use_the_zero_floor_exactly_when_padding_exists(backend):
    # every video frame is the opposite of every text token: all valid similarities are -1
    e = np.zeros(DIM, np.float32)
    e[0] = 1.0
    text_mask = np.array([[True, True, False], [True, True, True]])  # query 0 padded, query 1 not
    text = SideLevel(np.broadcast_to(e, (2, 3, DIM)).copy(), np.where(text_mask, 0.5, 0.0).astype(np.float32),
                     text_mask)
    video_mask = np.array([[True, False], [True, True]])  # video 0 padded, video 1 not
    video = SideLevel(np.broadcast_to(-e, (2, 2, DIM)).copy(), np.where(video_mask, 0.5, 0.0).astype(np.float32),
                      video_mask)
    # t2v: max over frames is 0 with video padding else -1; v2t: max over tokens is 0 with query padding else -1
    expected = np.array([[0.5 * (0.0 + 0.0), 0.5 * (-1.0 + 0.0)], [0.5 * (0.0 - 0.5), 0.5 * (-1.5 - 1.0)]])
    ref = reference_level(text, video)
    np.testing.assert_allclose(ref, expected, atol=1e-6)  # the reference agrees with the hand computation
    for dtype in STORAGE_DTYPES:
        got = score_level(text, StoreLevel.from_side_level(video, dtype), backend=backend)
        np.testing.assert_allclose(got, expected, atol=1e-5 if dtype != "int8" else 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_frame_videos_and_single_token_queries(rng, backend):
    text = make_level(rng, (1, 1, 3), 3)
    video = make_level(rng, (1, 1, 1, 1), 1)
    got = score_level(text, StoreLevel.from_side_level(video, "float32"), backend=backend)
    np.testing.assert_allclose(got, reference_level(text, video), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_scores(rng, backend):
    text = make_level(rng, (5, 3, 8), 8)
    video = make_level(rng, tuple(rng.integers(1, 7, 300)), 6)
    store = StoreLevel.from_side_level(video, "float32")
    tiny = score_level(text, store, memory_limit_mb=0.001, backend=backend)  # one video per chunk
    large = score_level(text, store, memory_limit_mb=4096, backend=backend)
    np.testing.assert_allclose(tiny, large, rtol=0, atol=1e-6)
    np.testing.assert_allclose(large, reference_level(text, video), atol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.5, 0.3, 0.2)])
def test_scoring_rows_equals_scoring_the_taken_store(sides, weights):
    """``rows=`` (what the two-stage rerank uses) gives exactly the scores of the store cut to those rows."""
    text, video = sides
    store = VideoStore.from_sides(video, "int8")
    rows = np.array([0, 3, 4, 8])
    np.testing.assert_array_equal(score(text, store, level_weights=weights, rows=rows),
                                  score(text, store.take(rows), level_weights=weights))


@pytest.mark.skipif(not ort_available(), reason="onnxruntime not installed")
@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_backends_agree(sides, dtype):
    text, video = sides
    store = VideoStore.from_sides(video, dtype)
    a = score_levels(text, store, backend="ort")
    b = score_levels(text, store, backend="numpy")
    for name in LEVELS:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5)


def retrieval_fixture(seed: int = 7, n_videos: int = 400, dim: int = 128) -> tuple[Side, Side]:
    """Random sides where each query has 11 planted videos of clearly decreasing similarity (no near ties)."""
    rng = np.random.default_rng(seed)
    text = make_side(rng, "text", (12, 7, 12), 16)
    video = make_side(rng, "video", tuple(rng.integers(3, 13, n_videos)), 12)
    planted = rng.permutation(n_videos)[:3 * 11].reshape(3, 11)  # (Bt, rank)
    levels = []
    for t, v in zip(text.levels, video.levels):
        tokens = v.tokens.copy()
        for a in range(text.n):
            valid = t.tokens[a, t.mask[a]]  # (n_a, D)
            for rank, b in enumerate(planted[a]):
                pick = valid[np.arange(v.length) % len(valid)]  # (T, D)
                noise = rng.standard_normal(pick.shape)
                noise -= (noise * pick).sum(axis=-1, keepdims=True) * pick  # orthogonal to pick
                noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
                cos = 0.9 - 0.05 * rank  # similarity to the query token it copies
                x = cos * pick + np.sqrt(1 - cos**2) * noise
                tokens[b] = np.where(v.mask[b, :, None], x, tokens[b])
        levels.append(SideLevel(tokens, v.weights, v.mask))
    return text, Side(tuple(levels), "video")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_reduced_storage_keeps_scores_and_top10(dtype):
    text, video = retrieval_fixture()
    ref = reference_score(text, video, (1.0, 0.5, 0.25))
    ref_idx, ref_val = topk(ref, 11)
    gaps = np.abs(np.diff(ref_val, axis=1)).min()
    got = score(text, VideoStore.from_sides(video, dtype), level_weights=(1.0, 0.5, 0.25))
    err = np.abs(got - ref).max()
    assert err < (1e-3 if dtype == "float16" else 1e-2)
    assert gaps > 2 * err, "fixture has near ties: pick another seed"
    np.testing.assert_array_equal(topk(got, 10)[0], ref_idx[:, :10])


def test_int8_quantisation_round_trip(rng):
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x[0, 0] = 0.0
    codes, scales = quantize_int8(x)
    assert codes.dtype == np.uint8 and codes.min() >= 1 and scales[0, 0] == 0
    back = (codes.astype(np.float32) - 128) * scales[..., None]
    assert np.abs(back - x).max() <= scales.max() / 2 + 1e-7
    np.testing.assert_array_equal(back[0, 0], 0.0)


def test_topk_orders_by_score_then_index():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.5, -1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
    idx, val = topk(scores, 3)
    np.testing.assert_array_equal(idx, [[3, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(val, np.array([[0.9, 0.5, 0.5], [3.0, 3.0, 3.0]], np.float32))
    assert topk(scores, 100)[0].shape == (2, 6)
    with pytest.raises(UsageError, match="positive integer"):
        topk(scores, 0)


def naive_explain(text: SideLevel, video: SideLevel, a: int, b: int) -> tuple[int, list[int]]:
    pos = [i for i in range(text.length) if text.mask[a, i]]
    frames = [j for j in range(video.length) if video.mask[b, j]]
    sim = {(i, j): float(np.dot(text.tokens[a, i].astype(np.float64), video.tokens[b, j])) for i in pos for j in frames}
    per_token = [max(frames, key=lambda j: (sim[i, j], -j)) for i in pos]
    floor = 0.0 if len(pos) < text.length else -np.inf
    contrib = {j: float(video.weights[b, j]) * max([floor] + [sim[i, j] for i in pos]) for j in frames}
    return max(frames, key=lambda j: (contrib[j], -j)), per_token


def test_explain_matches_a_naive_loop(sides):
    text, video = sides
    store = VideoStore.from_sides(video, "float32")
    ids = topk(score(text, store), 3)[0]  # (Bt, 3), different videos per query
    result = explain(text, store, ids)
    assert len(result) == text.n and all(len(row) == 3 for row in result)
    for a, row in enumerate(result):
        for j, ex in zip(ids[a], row):
            best, per_token = naive_explain(text.levels[0], video.levels[0], a, int(j))
            assert (ex.query, ex.video, ex.best_frame) == (a, j, best)
            assert list(ex.per_token_best_frame) == per_token
            assert list(ex.token_positions) == list(np.flatnonzero(text.levels[0].mask[a]))
    shared = explain(text, store, [0, 4], level=1)  # the same videos for every query
    assert [ex.video for ex in shared[2]] == [0, 4]
    with pytest.raises(UsageError, match="video_ids"):
        explain(text, store, [len(VIDEO_VALID)])


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_save_open_mmap_round_trip(tmp_path, sides, dtype):
    text, video = sides
    store = VideoStore.from_sides(video, dtype)
    store.save(tmp_path / "s")
    opened = VideoStore.open(tmp_path / "s")
    assert isinstance(opened.levels[0].tokens, np.memmap) and opened.dtype == dtype and opened.n == store.n
    for lv_a, lv_b in zip(store.levels, opened.levels):
        for name, arr in lv_a.arrays().items():
            np.testing.assert_array_equal(arr, lv_b.arrays()[name])
    np.testing.assert_array_equal(score(text, opened), score(text, store))
    header = json.loads((tmp_path / "s" / "store.json").read_text())
    assert header["n"] == store.n and [lv["name"] for lv in header["levels"]] == list(LEVELS)


def test_append_grows_in_place_and_survives_an_interrupted_append(tmp_path, sides):
    text, video = sides
    full = VideoStore.from_sides(video, "int8")
    folder = tmp_path / "index"
    assert full.take(slice(0, 4)).append_to(folder) == 4
    assert full.take(slice(4, 6)).append_to(folder) == 6
    # an interrupted append: rows written, store.json not updated
    header = json.loads((folder / "store.json").read_text())
    full.take(slice(6, 8)).append_to(folder)
    (folder / "store.json").write_text(json.dumps(header))
    assert VideoStore.open(folder).n == 6
    assert full.take(slice(6, None)).append_to(folder) == full.n
    opened = VideoStore.open(folder)
    np.testing.assert_array_equal(score(text, opened), score(text, full))
    np.testing.assert_array_equal(VideoStore.concat([full.take(slice(0, 3)), full.take(slice(3, None))])
                                  .levels[0].tokens, full.levels[0].tokens)
    with pytest.raises(MismatchError, match="cannot append"):
        VideoStore.from_sides(video, "float16").append_to(folder)


def test_errors(tmp_path, sides):
    text, video = sides
    store = VideoStore.from_sides(video, "float32")
    with pytest.raises(UsageError, match="storage dtype"):
        VideoStore.from_sides(video, "bfloat16")
    with pytest.raises(UsageError, match="level_weights"):
        score(text, store, level_weights=(0, 0, 0))
    with pytest.raises(UsageError, match="text Side"):
        score(video, store)
    with pytest.raises(UsageError, match="memory_limit_mb"):
        score(text, store, memory_limit_mb=0)
    with pytest.raises(UsageError, match="backend"):
        score(text, store, backend="cuda")
    other = make_side(np.random.default_rng(0), "text", (3,), 4)
    wide = Side(tuple(SideLevel(np.pad(lv.tokens, ((0, 0), (0, 0), (0, 1))), lv.weights, lv.mask)
                      for lv in other.levels), "text")
    with pytest.raises(BadInputError, match="width"):
        score(wide, store)
    with pytest.raises(BadInputError, match="not a video store"):
        VideoStore.open(tmp_path)


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return platform.machine() == "x86_64" and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags)


def test_native_kernel_is_built_and_used_where_the_cpu_runs_it():
    # the install builds the kernel with the platform's C compiler; a failed build would silently cost the 2x
    assert native_available() == _cpu_has_vnni()
    assert resolve_backend("auto", "int8") == ("native" if _cpu_has_vnni() else "ort" if ort_available() else "numpy")
    assert resolve_backend("auto", "float16") != "native"
    with pytest.raises(UsageError, match="int8"):
        resolve_backend("native", "float32")


@pytest.mark.skipif(not native_available(), reason="the native int8 kernel needs x86-64 with AVX-512 VNNI")
@pytest.mark.parametrize("dim", [32, 100, 512])  # below, off and at the kernel's 64-byte step
def test_native_int8_equals_numpy_int8(rng, dim):
    # ragged queries (length 9 with padding, one empty), padded and single-frame videos, T=7 (not a multiple of
    # the kernel's 4-frame tile) and 6 queries (not a multiple of its 4-query tile)
    text = Side((make_level(rng, TEXT_VALID, 9, dim), make_level(rng, (3,) * 6, 4, dim),
                 make_level(rng, (2,) * 6, 2, dim)), "text")
    video = Side((make_level(rng, VIDEO_VALID, 7, dim), make_level(rng, (2,) * 9, 3, dim),
                  make_level(rng, (1,) * 9, 2, dim)), "video")
    store = VideoStore.from_sides(video, "int8")
    for limit in (0.001, 64):  # one video per chunk (each thread gets 0 or 1), and everything in one chunk
        native = score_levels(text, store, backend="native", memory_limit_mb=limit)
        numpy_ = score_levels(text, store, backend="numpy", memory_limit_mb=limit)
        for name in LEVELS:  # the same exact int32 products; only the float scaling may round differently
            np.testing.assert_allclose(native[name], numpy_[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(score(text, store, backend="native"), reference_score(text, video), rtol=0,
                               atol=2e-2)  # int8 quantisation of both sides


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_large_batch_of_queries_of_mixed_lengths_is_scored_in_groups_and_exactly(rng, backend):
    valid = tuple(int(v) for v in rng.integers(0, 17, 70))  # 0 (empty) to 16 valid of L = 16; 16 = no padding
    text = make_level(rng, valid, 16)
    video = make_level(rng, VIDEO_VALID, 7)
    groups = query_groups(text)
    assert len(groups) > 1  # lengths 1 .. 16 rows cannot share one group of spread <= 1.25
    assert sorted(np.concatenate(groups).tolist()) == list(range(70))
    got = score_level(text, StoreLevel.from_side_level(video, "float32"), backend=backend)
    np.testing.assert_allclose(got, reference_level(text, video), rtol=0, atol=1e-5)


def test_small_batches_and_equal_lengths_stay_one_pass(rng):
    assert query_groups(make_level(rng, (1, 9, 4), 9)) == [None]  # few queries: one pass over the store
    assert query_groups(make_level(rng, (8,) * 100 + (9,) * 100, 9)) == [None]  # 9 and 10 rows: spread 1.11


@pytest.mark.skipif(not native_available(), reason="the native int8 kernel needs x86-64 with AVX-512 VNNI")
def test_native_kernel_writes_each_group_of_a_large_batch_in_place(rng):
    # 70 queries of 0 .. 16 valid tokens: several groups, each written by the kernel through a row stride
    text = make_level(rng, tuple(int(v) for v in rng.integers(0, 17, 70)), 16, 100)
    store = StoreLevel.from_side_level(make_level(rng, VIDEO_VALID, 7, 100), "int8")
    assert len(query_groups(text)) > 1
    np.testing.assert_allclose(score_level(text, store, backend="native", memory_limit_mb=0.01),
                               score_level(text, store, backend="numpy"), rtol=0, atol=1e-6)
