"""Exact HBI scores of a batch of queries against a :class:`VideoStore`, the top k, and the "why" of a match.

The result equals :func:`hbi_runtime.sides.score` on the same sides (float32 storage: to rounding; float16 /
int8 storage: to their quantisation), but never materialises ``(Bt, N, Lt, T)``: see
:mod:`hbi_runtime.scoring.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.scoring.engine import (BACKENDS, OrtLevelKernel, Queries, chunk_videos, default_threads,
                                        numpy_level, ort_available)
from hbi_runtime.scoring.native import NativeLevelKernel, native_available
from hbi_runtime.scoring.store import StoreLevel, VideoStore
from hbi_runtime.sides import LEVELS, Side, SideLevel, check_level_weights

DEFAULT_MEMORY_LIMIT_MB = 256


@lru_cache(maxsize=8)
def _ort_kernel(threads: int) -> OrtLevelKernel:
    return OrtLevelKernel(threads)  # sessions are built once per (threads, storage dtype) and reused


@lru_cache(maxsize=8)
def _native_kernel(threads: int) -> NativeLevelKernel:
    return NativeLevelKernel(threads)  # keeps its thread pool


def _check_text(text_side: Side, store: VideoStore) -> None:
    if not (isinstance(text_side, Side) and text_side.kind == "text"):
        raise UsageError("scoring: the first argument must be a text Side")
    if not isinstance(store, VideoStore):
        raise UsageError("scoring: the second argument must be a VideoStore")
    for name, t, v in zip(LEVELS, text_side.levels, store.levels):
        if t.dim != v.dim:
            raise BadInputError(f"{name} level | Received text tokens of width D={t.dim} and stored video tokens "
                                f"of width D={v.dim}. Note: Expected the same D (model package vs index?)")


def resolve_backend(backend: str, dtype: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and dtype != "int8":
        raise UsageError(f"the native scoring backend reads int8 stores, not {dtype}; use backend='auto'")
    if backend == "auto":
        if dtype == "int8" and native_available():
            return "native"
        return "ort" if ort_available() else "numpy"
    return backend


def score_level(text: SideLevel, level: StoreLevel, *, threads: int | None = None,
                memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB, backend: str = "auto") -> np.ndarray:
    """The exact score of one level: ``(Bt, N)`` float32 (a query without valid tokens scores 0, as in the
    reference).

    Args:
        text: the text side at this level.
        level: the stored video side at the same level.
        threads: intra-op threads of the ORT backend (default: the CPUs this process may use). The numpy
            backend uses numpy's BLAS threads as configured.
        memory_limit_mb: bound on one chunk's intermediates (the stored arrays are memory-mapped, not counted).
        backend: ``"native"`` (int8 stores, AVX-512 VNNI), ``"ort"``, ``"numpy"``, or ``"auto"`` (native for
            int8 where it runs, else ORT when onnx and onnxruntime are installed, else numpy).
    """
    backend = resolve_backend(backend, level.dtype)
    out = np.zeros((text.n, level.n), dtype=np.float32)
    if level.n == 0 or text.n == 0:
        return out
    for rows in query_groups(text):
        part = text if rows is None else SideLevel(text.tokens[rows], text.weights[rows], text.mask[rows])
        target = out if rows is None else np.zeros((len(rows), level.n), dtype=np.float32)
        queries = Queries.from_level(part)  # a query without valid tokens scores 0
        chunk = chunk_videos(level, queries, memory_limit_mb)
        if backend == "native":
            _native_kernel(threads or default_threads()).run(queries, level, chunk, target)
        elif backend == "ort":
            _ort_kernel(threads or default_threads()).run(queries, level, chunk, target)
        else:
            numpy_level(queries, level, chunk, target)
        if rows is not None:
            out[rows] = target
    return out


GROUP_MIN_QUERIES = 64  # below this a batch is one pass over the store (few queries: bound by streaming it)
GROUP_MAX_SPREAD = 1.25  # longest / shortest row count within one group


def query_groups(text: SideLevel) -> list[np.ndarray | None]:
    """How to split a batch of queries into passes over the store: ``[None]`` for one pass with all of them.

    :class:`Queries` pads every query to the longest one's row count by copying rows, which costs products
    (MSR-VTT captions: 5 to 24 tokens, about 2x). A large batch (>= ``GROUP_MIN_QUERIES``, where the product,
    not streaming the store, is the cost) is split into groups of similar row counts (longest <= 1.25 x
    shortest), each one pass; a small batch stays one pass, since every pass streams the whole store again.
    """
    counts = text.mask.sum(axis=1)
    used = np.maximum(1, counts)  # the rows a query takes in Queries
    if text.n < GROUP_MIN_QUERIES or used.min() * GROUP_MAX_SPREAD >= used.max():
        return [None]
    groups, start = [], None
    for value in np.unique(used):
        if start is None or value > start * GROUP_MAX_SPREAD:
            groups.append([])
            start = value
        groups[-1].append(value)
    return [np.flatnonzero(np.isin(used, values)) for values in groups]


def score_levels(text_side: Side, store: VideoStore, *, levels: Sequence[str] = LEVELS, threads: int | None = None,
                 memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB, backend: str = "auto",
                 rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per level name in ``levels``, the ``(Bt, N)`` float32 level score (``rows``: only these videos, an index
    array; ``N`` is then ``len(rows)`` and only the levels in ``levels`` are copied out of the store)."""
    _check_text(text_side, store)
    unknown = set(levels) - set(LEVELS)
    if unknown:
        raise UsageError(f"unknown levels {sorted(unknown)}; expected names from {LEVELS}")
    return {name: score_level(text_side.levels[i], store.levels[i] if rows is None else store.levels[i].take(rows),
                              threads=threads, memory_limit_mb=memory_limit_mb, backend=backend)
            for i, name in enumerate(LEVELS) if name in levels}


def score(text_side: Side, store: VideoStore, *, level_weights: Sequence[float] = (1.0, 0.0, 0.0),
          threads: int | None = None, memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB,
          backend: str = "auto", rows: np.ndarray | None = None) -> np.ndarray:
    """``sum_l w_l * level score``: ``(Bt, N)`` float32; levels of weight 0 are not computed. ``rows``: score
    only these videos (an index array; ``N = len(rows)``), the same values as ``score(text, store.take(rows))``
    without copying the levels that are not computed.

    Raises:
        UsageError: wrong argument types, bad ``level_weights`` / ``memory_limit_mb`` / ``backend``.
        BadInputError: text and stored tokens of different widths, non-finite text tokens.
        MissingDependencyError: ``backend="ort"`` without onnx / onnxruntime.
    """
    weights = check_level_weights(level_weights)
    names = [name for name, w in zip(LEVELS, weights) if w != 0.0]
    per_level = score_levels(text_side, store, levels=names, threads=threads, memory_limit_mb=memory_limit_mb,
                             backend=backend, rows=rows)
    total = np.zeros((text_side.n, store.n if rows is None else len(rows)), dtype=np.float32)
    for name, w in zip(LEVELS, weights):
        if w != 0.0:
            total += np.float32(w) * per_level[name]
    return total


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best videos per query: ``(indices (Bt, k) int64, values (Bt, k))``, best first.

    Equal scores are ordered by lower video index, deterministically (also at the k-th place). ``k`` larger than
    ``N`` returns all ``N``.
    """
    scores = np.atleast_2d(np.asarray(scores))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), scores.shape[1])
    indices = np.empty((scores.shape[0], k), dtype=np.int64)
    for row, s in enumerate(scores):
        kth = s[np.argpartition(-s, k - 1)[:k]].min()  # the k-th best value
        cand = np.flatnonzero(s >= kth)  # every tie of the k-th value, so that the lowest indices win
        order = np.lexsort((cand, -s[cand]))  # by score descending, then index ascending
        indices[row] = cand[order[:k]]
    return indices, np.take_along_axis(scores, indices, axis=1)


@dataclass(frozen=True)
class Explanation:
    """Why video ``video`` matched query ``query`` at one level.

    Attributes:
        query, video: indices into the text batch and the store.
        best_frame: the frame with the largest weighted v2t contribution ``w_v[j] * max_i S[i, j]`` (valid
            frames only; ties: lower frame).
        token_positions: positions of the query's valid tokens, in order.
        per_token_best_frame: per valid query token, the valid frame of largest similarity (ties: lower frame);
            -1 where the video has no valid frame.
        frame_contributions: ``(T,)`` float32, ``w_v[j] * max_i S[i, j]`` (0 at padded frames).
        similarity: ``(n_a, T)`` float32, ``S`` itself (rows: ``token_positions``; 0 at padded frames), from which
            callers group tokens (e.g. the BPE pieces of one word).
    """

    query: int
    video: int
    best_frame: int
    token_positions: tuple[int, ...]
    per_token_best_frame: tuple[int, ...]
    frame_contributions: np.ndarray
    similarity: np.ndarray | None = None


def _explain_pair(tokens: np.ndarray, floor: float, video: np.ndarray, weights: np.ndarray, mask: np.ndarray,
                  ) -> tuple[int, tuple[int, ...], np.ndarray, np.ndarray]:
    sim = tokens @ video.T  # (n_a, T); padded frames hold zero tokens -> 0
    valid = np.flatnonzero(mask)
    if len(valid) == 0:
        return -1, (-1,) * len(tokens), np.zeros(len(mask), np.float32), sim
    per_token = tuple(int(valid[j]) for j in sim[:, valid].argmax(axis=1)) if len(tokens) else ()
    frame_max = np.maximum(sim.max(axis=0), floor) if len(tokens) else np.zeros(len(mask), np.float32)
    contrib = np.where(mask, weights * frame_max, np.float32(0)).astype(np.float32)  # (T,)
    best = int(valid[np.argmax(contrib[valid])])
    return best, per_token, contrib, sim


def explain(text_side: Side, store: VideoStore, video_ids: np.ndarray | Sequence[int], level: int = 0,
            ) -> list[list[Explanation]]:
    """Per query and per video of ``video_ids``, the best frame and each query token's best frame.

    Computed in float32 from the (dequantised) stored tokens, for the few videos given only.

    Args:
        text_side: the queries.
        store: the index's video store.
        video_ids: ``(k,)`` videos for every query, or ``(Bt, k)`` per query (e.g. the indices of :func:`topk`).
        level: the level index into :data:`~hbi_runtime.sides.LEVELS` (0 = entity).

    Returns:
        ``result[a][j]`` explains video ``video_ids[a, j]`` (or ``video_ids[j]``) for query ``a``.
    """
    _check_text(text_side, store)
    if level not in range(len(LEVELS)):
        raise UsageError(f"level must be an index into {LEVELS}, got {level!r}")
    text, stored = text_side.levels[level], store.levels[level]
    ids = np.asarray(video_ids, dtype=np.int64)
    ids = np.broadcast_to(ids, (text.n, ids.shape[-1])) if ids.ndim == 1 else ids  # (Bt, k)
    if ids.shape[0] != text.n or ids.ndim != 2 or (ids.size and (ids.min() < 0 or ids.max() >= stored.n)):
        raise UsageError(f"video_ids must be (k,) or (Bt={text.n}, k) indices below {stored.n}; got shape {ids.shape}")
    uniq, inverse = np.unique(ids, return_inverse=True)
    videos = stored.dequantize(uniq)  # (u, T, D) float32
    weights, masks = np.asarray(stored.weights[uniq]), np.asarray(stored.mask[uniq])
    result = []
    for a in range(text.n):
        positions = np.flatnonzero(text.mask[a])
        tokens = text.tokens[a, positions].astype(np.float32)  # (n_a, D)
        floor = 0.0 if len(positions) < text.length else -np.inf
        row = []
        for j, u in zip(ids[a], inverse.reshape(ids.shape)[a]):
            best, per_token, contrib, sim = _explain_pair(tokens, floor, videos[u], weights[u], masks[u])
            row.append(Explanation(a, int(j), best, tuple(int(p) for p in positions), per_token, contrib,
                                   sim.astype(np.float32, copy=False)))
        result.append(row)
    return result
