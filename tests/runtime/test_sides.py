"""hbi_runtime.sides: the numpy reference score against a naive per-pair loop, chunking, and input validation."""

from __future__ import annotations

import numpy as np
import pytest

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.sides import LEVELS, Side, SideLevel, check_level_weights, score, score_level

DIM = 16
TEXT_VALID = (9, 4, 1, 6, 9)  # valid tokens per text; N = 9
VIDEO_VALID = (7, 2, 5, 1, 7, 3, 6)  # valid tokens per video; N = 7


def make_level(rng: np.random.Generator, valid: tuple[int, ...], length: int, dim: int = DIM,
               dtype=np.float32) -> SideLevel:
    """Random normalised tokens and softmaxed weights; padded positions hold large garbage, never used."""
    n = len(valid)
    mask = np.arange(length)[None, :] < np.asarray(valid)[:, None]  # (n, N)
    tokens = rng.standard_normal((n, length, dim))
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    tokens[~mask] = rng.uniform(-50, 50, size=(int((~mask).sum()), dim))
    logits = np.where(mask, rng.standard_normal((n, length)), -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return SideLevel(tokens.astype(dtype), weights.astype(np.float32), mask)


def make_side(rng: np.random.Generator, kind: str, valid: tuple[int, ...], length: int) -> Side:
    # entity level padded; action / event levels are merged clusters, all valid (fewer tokens)
    levels = (make_level(rng, valid, length), make_level(rng, (length // 2,) * len(valid), length // 2),
              make_level(rng, (2,) * len(valid), 2))
    return Side(levels, kind)


def naive_level(text: SideLevel, video: SideLevel) -> np.ndarray:
    """The definition, one (text, video) pair at a time, in float64."""
    out = np.zeros((text.n, video.n))
    for a in range(text.n):
        for b in range(video.n):
            s = np.zeros((text.length, video.length))
            for t in range(text.length):
                for v in range(video.length):
                    dot = float(np.dot(text.tokens[a, t].astype(np.float64), video.tokens[b, v].astype(np.float64)))
                    s[t, v] = dot if (text.mask[a, t] and video.mask[b, v]) else 0.0
            t2v = sum(float(text.weights[a, t]) * s[t].max() for t in range(text.length) if text.mask[a, t])
            v2t = sum(float(video.weights[b, v]) * s[:, v].max() for v in range(video.length) if video.mask[b, v])
            out[a, b] = 0.5 * (t2v + v2t)
    return out


@pytest.fixture
def sides(rng: np.random.Generator) -> tuple[Side, Side]:
    return make_side(rng, "text", TEXT_VALID, 9), make_side(rng, "video", VIDEO_VALID, 7)


def test_score_level_matches_naive_loop(sides):
    text, video = sides
    for lt, lv in zip(text.levels, video.levels):
        got = score_level(lt, lv)
        assert got.shape == (len(TEXT_VALID), len(VIDEO_VALID)) and got.dtype == np.float32
        np.testing.assert_allclose(got, naive_level(lt, lv), rtol=0, atol=1e-6)


def test_masked_zero_floor_wins_when_all_similarities_are_negative(rng):
    # One valid text token against a video whose valid token is its opposite: the padded video position (S = 0)
    # wins the text-side max, so t2v = 0 and only v2t = -1 counts.
    tok = np.zeros((1, 2, DIM), np.float32)
    tok[0, 0, 0] = 1.0
    text = SideLevel(tok[:, :1], np.ones((1, 1), np.float32), np.ones((1, 1), bool))
    video = SideLevel(-tok, np.array([[1.0, 0.0]], np.float32), np.array([[True, False]]))
    np.testing.assert_allclose(score_level(text, video), [[0.5 * (0.0 + -1.0)]], atol=1e-7)


def test_padding_content_never_leaks(sides):
    text, video = sides
    lt, lv = text.levels[0], video.levels[0]
    poisoned = SideLevel(np.where(lv.mask[..., None], lv.tokens, np.nan).astype(np.float32),
                         np.where(lv.mask, lv.weights, np.inf).astype(np.float32), lv.mask)
    np.testing.assert_array_equal(score_level(lt, poisoned), score_level(lt, lv))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 6, 7, 100])
def test_chunked_matches_unchunked(sides, chunk_size):
    # Chunks only partition the videos; each pair's arithmetic is the same. The tolerance (not exact equality)
    # allows BLAS to pick a different kernel for a different matrix width.
    text, video = sides
    whole = score(text, video, (0.5, 0.3, 0.2), chunk_size=len(VIDEO_VALID))
    np.testing.assert_allclose(score(text, video, (0.5, 0.3, 0.2), chunk_size=chunk_size), whole, rtol=0, atol=1e-6)


def test_score_weights_levels_and_skips_zero_weights(sides):
    text, video = sides
    per_level = [naive_level(t, v) for t, v in zip(text.levels, video.levels)]
    got = score(text, video, (0.5, 0.3, 0.2))
    np.testing.assert_allclose(got, 0.5 * per_level[0] + 0.3 * per_level[1] + 0.2 * per_level[2], atol=1e-6)
    np.testing.assert_allclose(score(text, video), per_level[0], atol=1e-6)  # default: entity level only


def test_zero_weight_level_is_not_computed(sides):
    text, video = sides
    bad_event = SideLevel(np.zeros((len(TEXT_VALID), 2, DIM + 1), np.float32),
                          np.zeros((len(TEXT_VALID), 2), np.float32), np.ones((len(TEXT_VALID), 2), bool))
    text = Side((text.levels[0], text.levels[1], bad_event), "text")  # D mismatch at the event level only
    score(text, video, (1.0, 1.0, 0.0))
    with pytest.raises(BadInputError, match="event level .* D=17 .* D=16"):
        score(text, video, (1.0, 1.0, 1.0))


def test_float16_tokens_accumulate_in_float32(rng):
    text = make_level(rng, (5, 3), 5, dtype=np.float16)
    video = make_level(rng, (4, 4, 1), 4, dtype=np.float16)
    got = score_level(text, video)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, naive_level(text, video), rtol=0, atol=1e-6)


def test_numeric_mask_becomes_bool(rng):
    level = make_level(rng, (3, 1), 4)
    again = SideLevel(level.tokens, level.weights, level.mask.astype(np.float32))
    assert again.mask.dtype == np.bool_ and (again.mask == level.mask).all()


def test_side_properties(sides):
    text, video = sides
    assert (text.n, len(video), video.levels[0].length, video.levels[0].dim) == (5, 7, 7, DIM)
    assert len(LEVELS) == len(text.levels) == 3


def test_select_takes_rows_in_order_with_repeats(sides):
    _, video = sides
    picked = video.select([4, 0, 4])
    assert type(picked) is Side and picked.kind == "video" and picked.n == 3
    for lv, src in zip(picked.levels, video.levels):
        for row, was in enumerate((4, 0, 4)):
            assert np.array_equal(lv.tokens[row], src.tokens[was]) and np.array_equal(lv.weights[row], src.weights[was])
            assert np.array_equal(lv.mask[row], src.mask[was])
    assert video.select(slice(1, 3)).n == 2


@pytest.mark.parametrize(
    ("tokens", "weights", "mask", "match"),
    [
        ((2, 4), (2, 4), (2, 4), r"SideLevel.tokens \| Received incompatible shape: \(2, 4\)"),
        ((2, 4, 8), (2, 5), (2, 4), r"SideLevel.weights \| Received incompatible shape: \(2, 5\).*\(2, 4\)"),
        ((2, 4, 8), (2, 4), (3, 4), r"SideLevel.mask \| Received incompatible shape: \(3, 4\)"),
    ],
)
def test_side_level_shape_errors(tokens, weights, mask, match):
    with pytest.raises(BadInputError, match=match):
        SideLevel(np.zeros(tokens, np.float32), np.zeros(weights, np.float32), np.ones(mask, bool))


def test_side_level_dtype_and_mask_value_errors():
    with pytest.raises(BadInputError, match="SideLevel.tokens .* dtype int64"):
        SideLevel(np.zeros((1, 2, 3), np.int64), np.zeros((1, 2), np.float32), np.ones((1, 2), bool))
    with pytest.raises(BadInputError, match="SideLevel.mask .* other than 0/1"):
        SideLevel(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), np.float32), np.full((1, 2), 0.5))


def test_side_errors(rng):
    a, b = make_level(rng, (2, 2), 2), make_level(rng, (2, 2, 2), 2)
    with pytest.raises(BadInputError, match="Side.kind .* 'audio'"):
        Side((a, a, a), "audio")
    with pytest.raises(BadInputError, match="Received 2 levels"):
        Side((a, a), "text")
    with pytest.raises(BadInputError, match=r"batch sizes \{'entity': 2, 'action': 3, 'event': 2\}"):
        Side((a, b, a), "video")


def test_score_usage_errors(sides):
    text, video = sides
    with pytest.raises(UsageError, match="text Side and a video Side, in order"):
        score(video, text)
    with pytest.raises(UsageError, match="not all zero"):
        score(text, video, (0, 0, 0))
    with pytest.raises(UsageError, match="3 finite numbers"):
        score(text, video, (1.0, 0.0))
    with pytest.raises(UsageError, match="chunk_size must be a positive integer"):
        score(text, video, chunk_size=0)


def test_negative_level_weights_subtract_their_level(sides):
    # The contract (check_level_weights, score): any three finite weights, not all zero; a negative weight is used
    # as given, so its level is subtracted. Weights that sum to zero are not "all zero".
    text, video = sides
    per_level = [naive_level(t, v) for t, v in zip(text.levels, video.levels)]
    np.testing.assert_array_equal(check_level_weights((-0.5, 0, 2)), [-0.5, 0.0, 2.0])
    np.testing.assert_allclose(score(text, video, (1.0, -1.0, 0.0)), per_level[0] - per_level[1], atol=1e-6)
    np.testing.assert_allclose(score(text, video, (0.0, 0.0, -0.5)), -0.5 * per_level[2], atol=1e-6)
    np.testing.assert_allclose(score(text, video, (-1.0, 0.0, 0.0)), -score(text, video), atol=0)


def test_padding_content_never_leaks_on_the_text_side(sides):
    # Padded *text* positions may hold anything (NaN, inf) in tokens and weights: the scores equal those of the
    # same texts with zeros there, at every level and in every chunking.
    text, video = sides
    clean = Side(tuple(SideLevel(np.where(lt.mask[..., None], lt.tokens, 0).astype(np.float32),
                                 np.where(lt.mask, lt.weights, 0).astype(np.float32), lt.mask)
                       for lt in text.levels), "text")
    lt = text.levels[0]
    assert not lt.mask.all()  # the entity level has padded texts
    for token_junk, weight_junk in ((np.nan, np.nan), (np.inf, -np.inf), (-np.inf, np.inf)):
        poisoned_level = SideLevel(np.where(lt.mask[..., None], lt.tokens, token_junk).astype(np.float32),
                                   np.where(lt.mask, lt.weights, weight_junk).astype(np.float32), lt.mask)
        poisoned = Side((poisoned_level, *clean.levels[1:]), "text")
        np.testing.assert_array_equal(score_level(poisoned_level, video.levels[0]),
                                      score_level(clean.levels[0], video.levels[0]))
        for chunk in (1, 3, None):
            np.testing.assert_array_equal(score(poisoned, video, (0.5, 0.3, 0.2), chunk_size=chunk),
                                          score(clean, video, (0.5, 0.3, 0.2), chunk_size=chunk))
