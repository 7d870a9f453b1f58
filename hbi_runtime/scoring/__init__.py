"""Exact HBI scoring of queries against a stored video collection (what ``hbi-run retrieve`` calls per batch).

* :class:`VideoStore` (:mod:`.store`): the video sides of N videos, per level contiguous ``(N, T, D)`` tokens in
  the storage dtype + ``(N, T)`` weights / mask (+ per-token scales for int8); ``.npy`` files + ``store.json``,
  memory-mapped on open, grown in place by :meth:`VideoStore.append_to`.
* :func:`score` / :func:`score_levels` / :func:`score_level` (:mod:`.score`, :mod:`.engine`): one matrix
  product per chunk of videos over the valid query tokens only, then segmented max / weighted-sum reductions;
  exact against :func:`hbi_runtime.sides.score`.
* :func:`topk` and :func:`explain`: the best videos, and for them the best frame and each token's best frame.

Storage dtype: int8 (per-token symmetric) is the default. On the reference 2-core CPU it is the smallest
(6.2 KB per video at the entity level, T=12, D=512, vs 12.3 KB fp16 and 24.6 KB fp32) and the fastest to score,
because a single query is bandwidth-bound and this CPU has no fast fp16 product (fp16 must be cast to fp32
first, which makes it no faster than fp32). Measured numbers: ``benchmarks/results/scoring.json``
(``python benchmarks/bench_scoring.py``).
"""

from hbi_runtime.scoring.engine import BACKENDS
from hbi_runtime.scoring.score import (DEFAULT_MEMORY_LIMIT_MB, Explanation, explain, score, score_level,
                                       score_levels, topk)
from hbi_runtime.scoring.store import DEFAULT_DTYPE, STORAGE_DTYPES, StoreLevel, VideoStore, quantize_int8

__all__ = ["BACKENDS", "DEFAULT_DTYPE", "DEFAULT_MEMORY_LIMIT_MB", "STORAGE_DTYPES", "Explanation", "StoreLevel",
           "VideoStore", "explain", "quantize_int8", "score", "score_level", "score_levels", "topk"]
