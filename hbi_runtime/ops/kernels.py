"""Numpy kernels of the two custom ops of domain ``hbi`` v1 (docs/custom_ops.md), torch-free.

These are the CPU implementations that :mod:`hbi_runtime.ops.ort` registers with ONNX Runtime, and plain numpy
functions that the runtime may call directly. Both follow the op contract to the letter (float32 accumulation,
fp16 in -> fp16 out) and agree with the PyTorch reference (``hbi_export.model.merge`` / ``.sides``) and with the
standard-op decomposition to 1e-5 in fp32.
"""

from __future__ import annotations

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.sides import DEFAULT_CHUNK_BYTES, SideLevel, score_level

FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))
MERGE_EPS = np.float32(1e-6)  # the contract's "+ 1e-6" in the merge denominator


def _float_array(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in FLOAT_TYPES:
        raise BadInputError(f"{name} | Received dtype {arr.dtype}. Note: Expected float32 or float16")
    return arr


def _shape_error(name: str, shape: tuple, expected: str) -> BadInputError:
    return BadInputError(f"{name} | Received incompatible shape: {shape}. Note: Expected a shape compatible with: "
                         f"{expected}")


# ---------------------------------------------------------------------------------------------------------------
# WeightedTokenInteraction
# ---------------------------------------------------------------------------------------------------------------

def weighted_token_interaction(text_tokens, text_weights, text_mask, video_tokens, video_weights, video_mask, *,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """``hbi::WeightedTokenInteraction``: the weighted max interaction of every (text, video) pair, ``(Bt, Bv)``.

    The math is :func:`hbi_runtime.sides.score_level` (float32, chunked over videos); this adds the op's
    signature, the output dtype, and a chunking over texts too, so that the ``(texts, Lt, videos, Lv)`` similarity
    block never exceeds ``chunk_bytes`` however large both batches are.

    Args:
        text_tokens: ``(Bt, Lt, D)`` float32 / float16, L2-normalised.
        text_weights: ``(Bt, Lt)``.
        text_mask: ``(Bt, Lt)``, 1 valid / 0 padded.
        video_tokens: ``(Bv, Lv, D)``, same dtype as ``text_tokens``.
        video_weights: ``(Bv, Lv)``.
        video_mask: ``(Bv, Lv)``.
        chunk_bytes: bound on one float32 similarity block.

    Returns:
        ``(Bt, Bv)`` scores in the dtype of ``text_tokens`` (accumulated in float32).

    Raises:
        BadInputError: wrong ranks, shapes, dtypes or widths, or a mask that is not 0/1.
    """
    dtype = _float_array("text_tokens", text_tokens).dtype
    text = SideLevel(text_tokens, _float_array("text_weights", text_weights), text_mask)
    video = SideLevel(_float_array("video_tokens", video_tokens), _float_array("video_weights", video_weights),
                      video_mask)
    per_text = max(1, text.length * video.length * 4)  # float32 bytes of S for one (text, video) pair
    text_chunk = max(1, chunk_bytes // per_text)
    out = np.empty((text.n, video.n), dtype=np.float32)  # (Bt, Bv)
    for start in range(0, text.n, text_chunk):
        rows = slice(start, start + text_chunk)
        part = SideLevel(text.tokens[rows], text.weights[rows], text.mask[rows])
        video_chunk = max(1, chunk_bytes // (per_text * part.n))
        out[rows] = score_level(part, video, chunk_size=video_chunk, level="WeightedTokenInteraction")
    return out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# TokenMerge
# ---------------------------------------------------------------------------------------------------------------

def _check_merge_inputs(x: np.ndarray, score: np.ndarray, mask: np.ndarray, clusters, k) -> None:
    if x.ndim != 3:
        raise _shape_error("TokenMerge x", x.shape, "(B, N, C)")
    for name, arr in (("score", score), ("mask", mask)):
        if arr.shape != x.shape[:2]:
            raise _shape_error(f"TokenMerge {name}", arr.shape, f"(B, N) = {x.shape[:2]} from x {x.shape}")
    for name, value, high in (("clusters", clusters, x.shape[1]), ("k", k, None)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 \
                or (high is not None and value > high):
            bound = f" and at most N = {high}" if high is not None else ""
            raise UsageError(f"TokenMerge attribute {name} must be an integer >= 1{bound}, got {value!r}")


def _distances(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(B, N, C)`` float32 -> ``(B, N, N)`` matmul-form distances / sqrt(C), masked columns = per-sample fill.

    Symmetrised with an exact zero diagonal, like the direct form: rounding then cannot break the exact density
    ties of duplicated tokens or two-token samples one way for i and another for j."""
    sq = np.einsum("bnc,bnc->bn", x, x)  # (B, N)
    gram = x @ x.transpose(0, 2, 1)  # (B, N, N)
    d2 = (sq[:, :, None] + sq[:, None, :]) - np.float32(2) * gram
    d2 = (d2 + d2.transpose(0, 2, 1)) * np.float32(0.5)  # exactly symmetric, zero diagonal (docs/custom_ops.md)
    d2[:, np.arange(x.shape[1]), np.arange(x.shape[1])] = 0
    dist = np.sqrt(np.maximum(d2, np.float32(0))) / np.float32(np.sqrt(x.shape[-1]))
    fill = dist.max(axis=(1, 2)) + np.float32(1)  # (B,) per sample, never the batch maximum
    return np.where(valid[:, None, :], dist, fill[:, None, None])


def _density(dist: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """``exp(-mean of the k' smallest squared distances of each row) * mask``: ``(B, N)`` float32."""
    kk = min(k, dist.shape[-1])
    nearest = np.sort(np.partition(dist, kk - 1, axis=-1)[..., :kk], axis=-1)  # (B, N, k') ascending, as TopK
    return np.exp(-np.mean(nearest * nearest, axis=-1, dtype=np.float32)) * valid.astype(np.float32)


def _centres(dist: np.ndarray, density: np.ndarray, clusters: int) -> np.ndarray:
    """Indices of the ``clusters`` highest centre scores, descending, lower index first on ties: ``(B, clusters)``."""
    n = dist.shape[-1]
    idx = np.arange(n)
    d_i, d_j = density[:, :, None], density[:, None, :]  # (B, N, 1), (B, 1, N)
    outranks = (d_j > d_i) | ((d_j == d_i) & (idx[None, None, :] < idx[None, :, None]))  # (B, i, j)
    dist_max = dist.max(axis=(1, 2))[:, None, None]  # (B, 1, 1), after the fill as in the reference
    parent = np.where(outranks, dist, dist_max).min(axis=-1)  # (B, N)
    centre_score = parent * density
    return np.argsort(-centre_score, axis=-1, kind="stable")[:, :clusters]


def _assign(dist: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Cluster of each token: centres own their cluster, others go to the nearest centre (first on ties)."""
    b, clusters = centres.shape
    to_centre = np.take_along_axis(dist, centres[:, :, None], axis=1)  # (B, clusters, N)
    assign = to_centre.argmin(axis=1)  # (B, N)
    np.put_along_axis(assign, centres, np.broadcast_to(np.arange(clusters), (b, clusters)), axis=1)
    return assign


def token_merge(x, score, mask, clusters: int, k: int = 3) -> np.ndarray:
    """``hbi::TokenMerge``: DPC-kNN clustering then the score-weighted mean of each cluster, ``(B, clusters, C)``.

    Exactly the algorithm of docs/custom_ops.md ("TokenMerge"), vectorised over the batch, in float32.

    Args:
        x: ``(B, N, C)`` float32 / float16 tokens (after the CTM conv + LayerNorm).
        score: ``(B, N)`` CTM scores, already ``-1e4`` at padded positions.
        mask: ``(B, N)``, 1 valid / 0 padded.
        clusters: number of output tokens, ``1 <= clusters <= N``.
        k: kNN size of the density.

    Returns:
        ``(B, clusters, C)`` merged tokens in the dtype of ``x``.

    Raises:
        BadInputError: wrong ranks, shapes or dtypes.
        UsageError: ``clusters`` or ``k`` out of range.
    """
    x_in = _float_array("TokenMerge x", x)
    score = _float_array("TokenMerge score", score)
    mask = np.asarray(mask)
    _check_merge_inputs(x_in, score, mask, clusters, k)
    xf = x_in.astype(np.float32, copy=False)  # (B, N, C)
    valid = mask > 0  # (B, N)
    dist = _distances(xf, valid)  # (B, N, N)
    centres = _centres(dist, _density(dist, valid, int(k)), int(clusters))  # (B, clusters)
    assign = _assign(dist, centres)  # (B, N)
    weight = np.exp(score.astype(np.float32, copy=False))  # (B, N)
    onehot = (assign[:, None, :] == np.arange(clusters)[None, :, None]).astype(np.float32)  # (B, clusters, N)
    norm = onehot @ weight[:, :, None] + MERGE_EPS  # (B, clusters, 1)
    share = weight / np.take_along_axis(norm[:, :, 0], assign, axis=1)  # (B, N)
    merged = (onehot * share[:, None, :]) @ xf  # (B, clusters, C)
    return merged.astype(x_in.dtype, copy=False)
