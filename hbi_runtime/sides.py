"""Sides in numpy: what a text or a video becomes, and the reference score of a (texts, videos) pair of batches.

The torch-free twin of ``hbi_export.model.sides``. A side holds, per level (entity, action, event), the
L2-normalised tokens, their softmaxed weights and the valid mask; the index stores exactly the video side.
Scoring only needs the weighted max interaction, so it is computed here without torch, in float32, in chunks
of videos so that memory stays bounded however large the video batch (the index) is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError

LEVELS = ("entity", "action", "event")
KINDS = ("text", "video")
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024  # budget for one chunk's similarity block (Bt, Nt, chunk, Nv) float32


def _shape_error(what: str, shape: tuple, expected: str) -> BadInputError:
    return BadInputError(f"{what} | Received incompatible shape: {shape}. Note: Expected a shape compatible with: "
                         f"{expected}")


@dataclass(frozen=True)
class SideLevel:
    """One level of a side: ``n`` texts or videos with ``N`` tokens each.

    Attributes:
        tokens: ``(n, N, D)`` floating (float16 allowed for storage), L2-normalised at valid positions.
        weights: ``(n, N)`` floating, softmaxed over the valid positions.
        mask: ``(n, N)`` bool (1 = valid token); all ones at the action/event levels. Numeric 0/1 masks are
            converted to bool.

    Raises:
        BadInputError: on a wrong rank, non-floating tokens / weights, mismatched ``n`` / ``N``, or a mask that
            is not 0/1.
    """

    tokens: np.ndarray
    weights: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        tokens, weights, mask = (np.asarray(x) for x in (self.tokens, self.weights, self.mask))
        if tokens.ndim != 3:
            raise _shape_error("SideLevel.tokens", tokens.shape, "(n, N, D)")
        for name, arr in (("tokens", tokens), ("weights", weights)):
            if not np.issubdtype(arr.dtype, np.floating):
                raise BadInputError(f"SideLevel.{name} | Received dtype {arr.dtype}. Note: Expected a floating dtype")
        n, length, _ = tokens.shape
        for name, arr in (("weights", weights), ("mask", mask)):
            if arr.shape != (n, length):
                raise _shape_error(f"SideLevel.{name}", arr.shape, f"(n, N) = {(n, length)} from tokens {tokens.shape}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "mask", _as_bool_mask(mask))

    @property
    def n(self) -> int:
        """Number of texts or videos."""
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Tokens per text or video (``N``), padding included."""
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        """Token width ``D``."""
        return self.tokens.shape[2]


def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == np.bool_:
        return mask
    if not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
        raise BadInputError(f"SideLevel.mask | Received dtype {mask.dtype} with values other than 0/1. "
                            "Note: Expected a bool or 0/1 mask")
    return mask.astype(np.bool_)


@dataclass(frozen=True)
class Side:
    """A batch of texts or videos at the three levels (entity, action, event).

    Attributes:
        levels: three :class:`SideLevel`, in the order of :data:`LEVELS`, all with the same ``n``.
        kind: ``"text"`` or ``"video"``.

    Raises:
        BadInputError: on a wrong number of levels, an unknown kind, or levels of different batch sizes.
    """

    levels: tuple[SideLevel, SideLevel, SideLevel]
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"Side.kind | Received {self.kind!r}. Note: Expected one of {KINDS}")
        levels = tuple(self.levels)
        if len(levels) != len(LEVELS) or not all(isinstance(lv, SideLevel) for lv in levels):
            raise BadInputError(f"{self.kind} side | Received {len(levels)} levels. Note: Expected "
                                f"{len(LEVELS)} SideLevel objects ({', '.join(LEVELS)})")
        sizes = [lv.n for lv in levels]
        if len(set(sizes)) != 1:
            raise BadInputError(f"{self.kind} side | Received batch sizes {dict(zip(LEVELS, sizes))} per level. "
                                "Note: Expected the same n at every level")
        object.__setattr__(self, "levels", levels)

    @property
    def n(self) -> int:
        """Number of texts or videos."""
        return self.levels[0].n

    def __len__(self) -> int:
        return self.n

    def select(self, rows) -> Side:
        """The side of the rows ``rows`` (an index array, repeats allowed, or a slice), in that order; same type."""
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        return type(self)(tuple(SideLevel(lv.tokens[rows], lv.weights[rows], lv.mask[rows]) for lv in self.levels),
                          self.kind)


def _check_pair(text: SideLevel, video: SideLevel, level: str) -> None:
    if text.dim != video.dim:
        raise BadInputError(f"{level} level | Received text tokens of width D={text.dim} and video tokens of "
                            f"width D={video.dim}. Note: Expected the same D on both sides")


def _auto_chunk(text: SideLevel, video: SideLevel, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    per_video = max(1, text.n * text.length * video.length * 4)  # float32 bytes of S for one video
    return max(1, chunk_bytes // per_video)


def _valid_f32(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` as float32 with masked positions set to exactly 0 (whatever they held, even inf / nan)."""
    if x.ndim == 3:
        mask = mask[..., None]
    return np.where(mask, x.astype(np.float32, copy=False), np.float32(0))


def score_level(text: SideLevel, video: SideLevel, *, chunk_size: int | None = None,
                level: str = "level") -> np.ndarray:
    """Weighted token-wise max interaction of one level: ``(Bt, Bv)`` float32.

    ``S[a,b,t,v] = <t_at, v_bv> * tmask[a,t] * vmask[b,v]`` (masked entries are 0, not -inf, so a padded
    position can win the max when all real similarities are negative, exactly as the official entity level);
    ``score[a,b] = 0.5 * (sum_t wt[a,t] max_v S + sum_v wv[b,v] max_t S)``.

    Args:
        text: the text side at this level, ``n = Bt``.
        video: the video side at this level, ``n = Bv``.
        chunk_size: videos per chunk; the ``(Bt, Nt, chunk, Nv)`` similarity block is the peak memory. ``None``
            picks the largest chunk within a 64 MiB block.
        level: the level's name, for error messages.

    Raises:
        BadInputError: the two sides have different token widths.
        UsageError: ``chunk_size`` is not a positive integer.
    """
    _check_pair(text, video, level)
    if chunk_size is None:
        chunk_size = _auto_chunk(text, video)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise UsageError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    t_tok = _valid_f32(text.tokens, text.mask)  # (Bt, Nt, D)
    t_w = _valid_f32(text.weights, text.mask)  # (Bt, Nt)
    bt, nt, dim = t_tok.shape
    t_flat = t_tok.reshape(bt * nt, dim)  # (Bt*Nt, D)
    out = np.empty((bt, video.n), dtype=np.float32)
    for start in range(0, video.n, chunk_size):
        stop = min(start + chunk_size, video.n)
        v_tok = _valid_f32(video.tokens[start:stop], video.mask[start:stop])  # (c, Nv, D)
        v_w = _valid_f32(video.weights[start:stop], video.mask[start:stop])  # (c, Nv)
        c, nv, _ = v_tok.shape
        sim = (t_flat @ v_tok.reshape(c * nv, dim).T).reshape(bt, nt, c, nv)  # (Bt, Nt, c, Nv)
        t2v = np.einsum("atb,at->ab", sim.max(axis=3), t_w)  # max over video tokens -> (Bt, c)
        v2t = np.einsum("abv,bv->ab", sim.max(axis=1), v_w)  # max over text tokens -> (Bt, c)
        out[:, start:stop] = np.float32(0.5) * (t2v + v2t)
    return out


def check_level_weights(level_weights: Sequence[float]) -> np.ndarray:
    """Three finite entity / action / event weights, not all zero, as float64; else UsageError.

    Any sign is allowed: a negative weight subtracts its level's score (weights summing to 0 are not all zero).
    """
    try:
        weights = np.asarray(level_weights, dtype=np.float64)
    except (TypeError, ValueError):
        weights = np.full(1, np.nan)  # reported below, with the value received
    if weights.shape != (len(LEVELS),) or not np.isfinite(weights).all() or not weights.any():
        raise UsageError(f"level_weights must be {len(LEVELS)} finite numbers ({', '.join(LEVELS)}), "
                         f"not all zero; got {level_weights!r}")
    return weights


def score(text_side: Side, video_side: Side, level_weights: Sequence[float] = (1.0, 0.0, 0.0), *,
          chunk_size: int | None = None) -> np.ndarray:
    """``sum_l w_l * score_level_l``: ``(Bt, Bv)`` float32. Levels of weight 0 are not computed.

    Args:
        text_side: a side of kind ``"text"``.
        video_side: a side of kind ``"video"``.
        level_weights: one weight per level, in the order of :data:`LEVELS`.
        chunk_size: videos per chunk, see :func:`score_level`.

    Raises:
        UsageError: the sides are not (text, video) in that order, or ``level_weights`` is not three finite
            numbers with at least one non-zero.
        BadInputError: the sides do not fit together (token widths differ).
    """
    if not (isinstance(text_side, Side) and isinstance(video_side, Side)
            and text_side.kind == "text" and video_side.kind == "video"):
        raise UsageError("score(text_side, video_side): arguments must be a text Side and a video Side, in order")
    weights = check_level_weights(level_weights)
    total = np.zeros((text_side.n, video_side.n), dtype=np.float32)
    for name, w, t, v in zip(LEVELS, weights, text_side.levels, video_side.levels):
        if w != 0.0:
            total += np.float32(w) * score_level(t, v, chunk_size=chunk_size, level=name)
    return total
