"""The candidate index: a training-free first stage that finds, for a query, the few videos worth exact scoring.

Why this shape (measured in docs/candidates.md): a single pooled vector per video loses HBI's answers (the
exact score is a weighted max over frame tokens, which a mean does not see). This stage keeps the token level,
in the style of late-interaction engines (ColBERT / PLAID centroid interaction):

* every valid **entity-level frame token** of every stored video is stored as the id of its nearest of ``nlist``
  spherical k-means centroids (``codes``, ``(N, T)`` uint16; hierarchical k-means above
  :data:`FLAT_MAX_NLIST` centroids, so that tens of thousands of centroids train and assign in seconds);
* a query's valid tokens are compared with every centroid once (a ``(nlist, L)`` table), and **every** stored
  video gets HBI's entity score (both halves: the text-to-video weighted max over frames and the video-to-text
  weighted max over words, padded frames and padded query positions as exact scoring has them) computed with
  each frame token replaced by its centroid: table lookups, no token is read (``_cand.c``, AVX-512 where the
  CPU has it; numpy otherwise);
* the ``K`` best videos by that score are scored exactly (:func:`hbi_runtime.search.rank_encoded`), ``K`` a
  fraction of the gallery (:func:`candidate_count`).

No training and no captions are needed: any package (the official checkpoints included) gets it from the sides
the index already stores. Building needs faiss (``pip install 'hbi-toolkit[candidates]'``: its k-means and
nearest-centroid search over millions of tokens); answering a query needs numpy (and the optional C kernel).

On disk (inside the index folder)::

    candidates/CURRENT.json     format, model, parameters and {file: [size, sha256]}: the switch, replaced atomically
    candidates/<name>/          centroids.npy (C, D) f32, codes.npy (N, T) u16, origin.npy (N, 2) i32 (shard id,
                                shard row of each row), keys.npy (N,) i64 (catalog video id of each row)

A build writes a new folder under ``candidates/tmp-*``, fsyncs it, renames it, then replaces ``CURRENT.json``
(the checksums are recorded there at that commit); old folders are deleted after the switch, leftovers of a
killed build by the next build. Readers check sizes (cheap) or every byte (``verify``), the model, that every
code is in range (the kernel indexes the table with them) and that ``origin`` equals the index's published rows:
a missing, damaged or stale candidate index is never used (exact scoring answers, with the reason), and the next
``hbi-run index`` rebuilds it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hbi_runtime.errors import MissingDependencyError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.index import verify
from hbi_runtime.index.catalog import fsync_tree

FORMAT = "hbi.candidates/2"  # 2: centroid codes only, scored exhaustively (1: inverted lists + residual codes)
FOLDER = "candidates"
POINTER = "CURRENT.json"
FILES = ("centroids.npy", "codes.npy", "origin.npy", "keys.npy")
ARRAYS = tuple(name[:-4] for name in FILES)
NO_CODE = np.uint16(0xFFFF)  # a padded (invalid) frame token
MAX_NLIST = 16384  # a query computes a (nlist, L) table: 1 MB at 16 query tokens (L2-resident); codes are uint16
FLAT_MAX_NLIST = 1024  # above this, hierarchical k-means (coarse cells, then centroids within each cell)
TOKENS_PER_CENTROID = 16  # nlist: the power of two nearest stored tokens / this (docs/candidates.md)
BUILD_MIN_ROWS = 1000  # `hbi-run index` builds the candidate index from this many rows on
RETRAIN_GROWTH = 4.0  # k-means again when the index has grown this many times since the centroids were trained
TRAIN_POINTS_PER_CENTROID = 32  # k-means sample: at most this many tokens per centroid
KMEANS_ITERATIONS = 10
ASSIGN_NPROBE = 8  # coarse cells searched when assigning a token to its centroid (hierarchical centroids)
# Chosen on the validation split's 120 captions over 20,000 indexed videos (benchmarks/bench_candidates.py: the
# least work with recall@10 >= 0.995 there; docs/candidates.md)
DEFAULT_FRACTION = 0.025  # videos scored exactly: this share of the gallery ...
DEFAULT_MIN_K = 200  # ... and at least this many (and at least 10 x top-k)
HINT = "install the candidate stage (pip install 'hbi-toolkit[candidates]', i.e. faiss-cpu) and run hbi-run index again"
REBUILD_HINT = ("the next hbi-run index rebuilds it (building needs faiss-cpu: pip install "
                "'hbi-toolkit[candidates]')")
_NEG = np.float32(-1e30)  # table lanes past the query's tokens: never the max
_LANES = 16


class CandidateIndexUnavailable(Exception):
    """Why the candidate index cannot answer (missing, stale, damaged, other model): exact scoring answers."""


def nlist_for(tokens: int) -> int:
    """Centroids for ``tokens`` stored tokens: the power of two nearest ``tokens / TOKENS_PER_CENTROID``, in
    [64, MAX_NLIST] (finer centroids approximate the score better; the table a query computes grows with them)."""
    target = max(tokens, 1) / TOKENS_PER_CENTROID
    return int(min(MAX_NLIST, max(64, 2 ** round(math.log2(max(target, 1.0))))))


def candidate_count(n: int, top_k: int, *, fraction: float | None = None, min_k: int | None = None) -> int:
    """``K``, the videos scored exactly for a gallery of ``n``: ``max(fraction * n, min_k, 10 * top_k)``."""
    fraction = DEFAULT_FRACTION if fraction is None else fraction
    min_k = DEFAULT_MIN_K if min_k is None else min_k
    return int(max(math.ceil(fraction * n), min_k, 10 * top_k))


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise MissingDependencyError("the candidate index needs faiss-cpu", hint=HINT) from None
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except MissingDependencyError:
        return False
    return True


def _entity_tokens(index, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dequantised entity-level tokens ``(n, T, D)`` float32 and the valid mask of the index's rows."""
    store = index.video_store()
    level = store.levels[0]
    ids = np.arange(store.n) if rows is None else rows
    out = np.empty((len(ids), level.length, level.dim), np.float32)
    for a in range(0, len(ids), 65536):
        out[a:a + 65536] = level.dequantize(ids[a:a + 65536])
    return out, np.asarray(level.mask[ids], bool)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    km = _faiss().Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                         max_points_per_centroid=TRAIN_POINTS_PER_CENTROID, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, np.float32))
    return _normalise(np.asarray(km.centroids, np.float32))


def coarse_cells(nlist: int) -> int:
    """Coarse cells of hierarchical centroids (1: flat k-means): the power of two nearest ``sqrt(nlist)``."""
    return 1 if nlist <= FLAT_MAX_NLIST else 2 ** round(math.log2(math.sqrt(nlist)))


def train_centroids(tokens: np.ndarray, nlist: int, *, seed: int = 0) -> np.ndarray:
    """Spherical k-means (faiss) on a sample of at most ``TRAIN_POINTS_PER_CENTROID * nlist`` tokens; above
    :data:`FLAT_MAX_NLIST`, hierarchical: :func:`coarse_cells` coarse centroids, then ``nlist / cells`` centroids
    within each cell's sample (at most ``nlist`` in all)."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    sample = np.ascontiguousarray(tokens[rng.permutation(len(tokens))[: TRAIN_POINTS_PER_CENTROID * nlist]],
                                  np.float32)
    nlist = min(nlist, len(sample))
    cells = coarse_cells(nlist)
    if cells == 1:
        return _kmeans(sample, nlist, seed)
    coarse = _kmeans(sample, cells, seed)
    flat = faiss.IndexFlatIP(coarse.shape[1])
    flat.add(coarse)
    cell = flat.search(sample, 1)[1][:, 0]
    per = nlist // cells
    parts = []
    for j in range(cells):
        points = sample[cell == j]
        if len(points):
            parts.append(_normalise(points) if len(points) <= per else _kmeans(points, per, seed + 1 + j))
    return np.concatenate(parts).astype(np.float32)


def assign(tokens: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (largest inner product) of each token, ``(n,)`` int64: faiss flat search, or, for
    hierarchical centroids, an inverted file over them searched in :data:`ASSIGN_NPROBE` coarse cells (the
    nearest in those cells; measured 99.6 % the exact nearest, docs/candidates.md)."""
    faiss = _faiss()
    dim = centroids.shape[1]
    cent = np.ascontiguousarray(centroids, np.float32)
    cells = coarse_cells(len(cent))
    if cells == 1:
        search = faiss.IndexFlatIP(dim)
    else:
        search = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        search.train(cent)
        search.nprobe = ASSIGN_NPROBE
    search.add(cent)
    out = np.empty(len(tokens), np.int64)
    for a in range(0, len(tokens), 1 << 18):
        _, ids = search.search(np.ascontiguousarray(tokens[a:a + (1 << 18)], np.float32), 1)
        out[a:a + (1 << 18)] = ids[:, 0]
    return out


# ------------------------------------------------------------------------------------------ scoring
_MODULE = "hbi_runtime.index._cand"
_P = ctypes.c_void_p


@lru_cache(maxsize=1)
def _library() -> Any | None:
    """The approximate-score kernel (``_cand.c``), or None where it was not built."""
    from hbi_runtime.scoring.native import extension_library  # noqa: PLC0415

    lib = extension_library(_MODULE)
    if lib is None:
        return None
    lib.hbi_cand_avx512.restype = ctypes.c_int
    lib.hbi_cand_table.restype = ctypes.c_int
    lib.hbi_cand_table.argtypes = [_P, ctypes.c_int64, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int, _P, _P]
    lib.hbi_cand_approx.restype = ctypes.c_int
    lib.hbi_cand_approx.argtypes = [_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, _P, _P, ctypes.c_int, _P,
                                    ctypes.c_float, _P, ctypes.c_int]
    return lib


def kernel_path() -> str:
    """Which approximate scorer runs here: ``avx512``, ``c`` (the portable C loop) or ``numpy``."""
    lib = _library()
    if lib is None:
        return "numpy"
    return "avx512" if lib.hbi_cand_avx512() == 1 else "c"


@lru_cache(maxsize=1)
def _pool() -> tuple[int, ThreadPoolExecutor | None]:
    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return threads, (ThreadPoolExecutor(threads, thread_name_prefix="hbi-cand") if threads > 1 else None)


def query_table(tokens: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(table (C, lp), best (C,))`` for the valid query tokens ``(L, D)``: ``table[c, l] = <centroid c, token
    l>`` with lanes ``l >= L`` at a large negative value (``lp``: ``L`` rounded up to 16), ``best[c]`` its max."""
    lp = _LANES * max(1, -(-len(tokens) // _LANES))
    lib = _library()
    if lib is None:
        sims = centroids @ tokens.T  # (C, L) (OpenBLAS: ~14x faster than tokens @ centroids.T here)
        table = np.full((len(centroids), lp), _NEG, np.float32)
        table[:, :len(tokens)] = sims
        return table, sims.max(axis=1)
    centroids = np.ascontiguousarray(centroids, np.float32)
    tokens_t = np.zeros((centroids.shape[1], lp), np.float32)
    tokens_t[:, :len(tokens)] = tokens.T
    table = np.empty((len(centroids), lp), np.float32)
    best = np.empty(len(centroids), np.float32)
    if lib.hbi_cand_table(centroids.ctypes.data, len(centroids), centroids.shape[1], tokens_t.ctypes.data,
                          len(tokens), lp, table.ctypes.data, best.ctypes.data):
        raise ValueError(f"the candidate kernel refused the table sizes (L={len(tokens)}, lp={lp})")
    return table, best


def approximate_scores(codes: np.ndarray, video_weights: np.ndarray, table: np.ndarray, best: np.ndarray,
                       weights: np.ndarray, floor: float, *, path: str = "auto") -> np.ndarray:
    """The approximate entity score of every row (module docstring): ``(N,)`` float32. ``codes`` ``(N, T)``
    uint16, ``video_weights`` ``(N, T)`` float32 (0 at padding), ``table`` / ``best`` from :func:`query_table`,
    ``weights`` the valid query tokens' weights, ``floor`` 0 when the query has padded positions (they score 0
    in exact scoring), else -inf. ``path``: ``auto`` (the C kernel where built), ``c`` (its portable loop) or
    ``numpy``."""
    n, t = codes.shape
    lp = table.shape[1]
    w = np.zeros(lp, np.float32)
    w[:len(weights)] = weights
    floor32 = np.float32(max(floor, -3.0e38))
    lib = _library() if path != "numpy" else None
    if lib is None:
        return _approximate_numpy(codes, video_weights, table, best, w, floor32)
    codes = np.ascontiguousarray(codes, np.uint16)
    video_weights = np.ascontiguousarray(video_weights, np.float32)
    table = np.ascontiguousarray(table, np.float32)
    best = np.ascontiguousarray(best, np.float32)
    out = np.empty(n, np.float32)
    threads, pool = _pool()
    bounds = np.linspace(0, n, min(threads, max(1, n // 32768)) + 1).astype(np.int64)  # a thread: >= 32k rows
    use_avx512 = 0 if path == "c" else 1

    def run(i: int) -> int:
        a, b = int(bounds[i]), int(bounds[i + 1])
        return lib.hbi_cand_approx(codes.ctypes.data, video_weights.ctypes.data, a, b, t, table.ctypes.data,
                                   best.ctypes.data, lp, w.ctypes.data, floor32, out[a:].ctypes.data, use_avx512)

    parts = range(len(bounds) - 1)
    codes_back = list(pool.map(run, parts)) if pool is not None and len(parts) > 1 else [run(i) for i in parts]
    if any(codes_back):
        raise ValueError(f"the candidate kernel refused its sizes (lp={lp}, T={t})")
    return out


def _approximate_numpy(codes, video_weights, table, best, w, floor32) -> np.ndarray:
    n = codes.shape[0]
    out = np.empty(n, np.float32)
    for a in range(0, n, 65536):
        c = np.asarray(codes[a:a + 65536])
        ok = c != NO_CODE
        c = np.where(ok, c, 0).astype(np.int64)
        g = np.where(ok[..., None], table[c], np.float32(0))  # (n, T, lp): padded frames give 0
        t2v = g.max(axis=1) @ w
        v2t = np.einsum("nt,nt->n", np.maximum(best[c], floor32), np.asarray(video_weights[a:a + 65536]) * ok)
        out[a:a + 65536] = t2v + v2t
    return out


def top_rows(values: np.ndarray, k: int) -> np.ndarray:
    """The rows of the ``k`` largest ``values`` (equal values: lower row first), ascending. A threshold taken
    from a strided sample keeps the exact selection to about ``1.25 k`` rows (all rows when too few pass it)."""
    n = len(values)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    passing = None
    step = n // 65536
    if step >= 2:
        sample = values[::step]
        rank = int(1.25 * k / step) + 16  # from the top: about 1.25 k rows reach the sample's value there
        if rank < len(sample) // 2:
            thr = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
            passing = np.flatnonzero(values >= thr)
            if len(passing) < k:  # the sample misled (rare): select over every row
                passing = None
    if passing is None:
        passing = np.arange(n, dtype=np.int64)
    v = values[passing]
    kth = np.partition(v, len(v) - k)[len(v) - k]
    above = passing[v > kth]
    ties = passing[v == kth][: k - len(above)]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


@dataclass
class CandidateIndex:
    """A loaded candidate index (see the module docstring). ``folder`` is where its files live."""

    folder: Path
    meta: dict
    centroids: np.ndarray
    codes: np.ndarray
    origin: np.ndarray
    keys: np.ndarray

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    def nbytes(self) -> dict[str, int]:
        """Bytes of each array (what the candidate index adds to memory / disk)."""
        return {name: int(getattr(self, name).nbytes) for name in ARRAYS}

    def approximate(self, tokens: np.ndarray, weights: np.ndarray, mask: np.ndarray, video_weights,
                    *, path: str = "auto") -> np.ndarray | None:
        """The approximate entity score of every row for one query (entity-level text tokens ``(L, D)``, weights
        and mask ``(L,)``; ``video_weights``: the store's entity-level weights ``(N, T)``); None when the query
        has no valid token."""
        valid = np.flatnonzero(mask)
        if len(valid) == 0:
            return None
        t = np.asarray(tokens[valid], np.float32)
        table, best = query_table(t, self.centroids)
        floor = 0.0 if len(valid) < len(mask) else -np.inf  # padded query positions score 0 in exact scoring
        return approximate_scores(self.codes, video_weights, table, best, np.asarray(weights[valid], np.float32),
                                  floor, path=path)

    def candidates(self, tokens: np.ndarray, weights: np.ndarray, mask: np.ndarray, video_weights, k: int, *,
                   path: str = "auto") -> np.ndarray:
        """The ``k`` rows of largest approximate score for one query (:meth:`approximate`), ascending (equal
        scores: lower row first)."""
        n = self.n
        k = min(k, n)
        approx = self.approximate(tokens, weights, mask, video_weights, path=path)
        if approx is None or k >= n:
            return np.arange(k, dtype=np.int64)
        return top_rows(approx, k)


# ------------------------------------------------------------------------------------------ reading
def _pointer(index_dir: Path) -> dict:
    path = Path(index_dir) / FOLDER / POINTER
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        raise CandidateIndexUnavailable("the index has no candidate index") from None
    except (OSError, ValueError) as exc:
        raise CandidateIndexUnavailable(f"its pointer {path} cannot be read ({exc})") from None
    fmt = pointer.get("format") if isinstance(pointer, dict) else None
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("hbi.candidates/"):
            raise CandidateIndexUnavailable(f"it is of another format ({fmt}; this version reads {FORMAT})")
        raise CandidateIndexUnavailable(f"{path} is not a {FORMAT} pointer")
    return pointer


def index_origin(index) -> np.ndarray:
    """``(N, 2)`` int32: (shard id, shard row) of each of the index's published rows, in row order."""
    if not index.shards:
        return np.zeros((0, 2), np.int32)
    return np.concatenate([np.stack([np.full(len(s.positions), s.shard_id), s.positions], axis=1)
                           for s in index.shards]).astype(np.int32)


def load(index, *, verify_bytes: bool = False) -> CandidateIndex:
    """The candidate index of an opened :class:`~hbi_runtime.index.Index`, checked (sizes, or every byte with
    ``verify_bytes``; model; rows). Raises :class:`CandidateIndexUnavailable` with the reason."""
    pointer = _pointer(index.dir)
    if pointer.get("model_sha256") != index.meta.get("model_sha256"):
        raise CandidateIndexUnavailable("it was built with another model package")
    folder = Path(index.dir) / FOLDER / str(pointer.get("folder", ""))
    files = pointer.get("files") or {}
    arrays = {}
    for name in FILES:
        path = folder / name
        record = files.get(name)
        try:
            size = path.stat().st_size
        except OSError:
            raise CandidateIndexUnavailable(f"{path} is missing") from None
        if not record or size != record[0]:
            raise CandidateIndexUnavailable(f"{path} has {size} bytes, {record and record[0]} recorded: damaged")
        if verify_bytes and verify.sha256_of(path) != record[1]:
            raise CandidateIndexUnavailable(f"{path} does not match its checksum: damaged")
        try:
            arrays[name[:-4]] = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        except (OSError, ValueError) as exc:
            raise CandidateIndexUnavailable(f"{path} cannot be read ({exc}): damaged") from None
    cand = CandidateIndex(folder, pointer, **{k: (np.asarray(v) if k == "centroids" else v)
                                              for k, v in arrays.items()})
    n, nlist = cand.codes.shape[0], cand.centroids.shape[0]
    if (cand.centroids.ndim != 2 or cand.centroids.shape[1] != index.meta.get("embed_dim")
            or not 0 < nlist <= MAX_NLIST or cand.codes.dtype != np.uint16 or cand.codes.ndim != 2
            or cand.origin.shape != (n, 2) or cand.keys.shape != (n,)):
        raise CandidateIndexUnavailable(f"the arrays in {folder} do not fit together: damaged")
    # Codes out of range (flipped bytes the size check cannot see) would make the kernel read outside its table:
    # checked on every load (a few ms at a million rows). Bytes that stay in range can only make worse
    # candidates; the scores are always exact.
    codes = cand.codes.reshape(-1)
    if np.any((codes >= nlist) & (codes != NO_CODE)) or not np.isfinite(cand.centroids).all():
        raise CandidateIndexUnavailable(f"the arrays in {folder} hold impossible values: damaged")
    if not np.array_equal(cand.origin, index_origin(index)):
        raise CandidateIndexUnavailable("it is stale (the index changed after it was built)")
    return cand


def status(index, *, verify: bool = False) -> dict:
    """What ``hbi-run index --status`` says of the candidate index of an opened index: ``{"state": "ready",
    "rows", "nlist", "bytes", "created", "scorer"}``, or ``{"state": "none" | "unusable", "reason"}`` (then
    retrieval is exhaustive)."""
    root = Path(index.dir)
    try:
        cand = load(index, verify_bytes=verify)
    except CandidateIndexUnavailable as exc:
        if not (root / FOLDER / POINTER).exists():
            return {"state": "none",
                    "reason": f"none yet (built by hbi-run index from {BUILD_MIN_ROWS} videos on, with faiss-cpu)"}
        return {"state": "unusable", "reason": f"{exc}; {REBUILD_HINT}"}
    return {"state": "ready", "rows": cand.n, "nlist": int(cand.centroids.shape[0]),
            "bytes": int(sum(cand.nbytes().values())), "created": cand.meta.get("created"), "scorer": kernel_path()}


# ------------------------------------------------------------------------------------------ building
def _row_keys(index) -> np.ndarray:
    """The catalog video id of each row (with the origin, what a rebuild reuses codes by)."""
    return np.fromiter((r[2] for r in index._snap.records), np.int64, len(index.rows))  # pylint: disable=W0212


def _reusable(index_dir: Path, model_sha256: str) -> CandidateIndex | None:
    """The current candidate index when its files are intact and of this model (stale or not), else None."""
    try:
        pointer = _pointer(index_dir)
    except CandidateIndexUnavailable:
        return None
    if pointer.get("model_sha256") != model_sha256:
        return None
    folder = Path(index_dir) / FOLDER / str(pointer.get("folder", ""))
    try:
        for name in FILES:
            if verify.sha256_of(folder / name) != pointer["files"][name][1]:
                return None
        arrays = {name[:-4]: np.load(folder / name, allow_pickle=False) for name in FILES}
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return CandidateIndex(folder, pointer, **arrays)


def build(index, *, min_rows: int = BUILD_MIN_ROWS, seed: int = 0,
          progress: Callable[[str], None] | None = None) -> dict | None:
    """Bring the candidate index of an opened index up to date (call holding the writer lock, after publishing).

    Reuses the codes of rows already coded (same video id, same position in a shard, same centroids) and the
    centroids unless the index has grown :data:`RETRAIN_GROWTH` times since they were trained. Returns what it
    did (``{"built": ..., "rows", "nlist", "coded", "reused", "seconds", "bytes"}``) or None when the index holds
    fewer than ``min_rows`` rows (an old candidate index is then removed). Raises MissingDependencyError
    without faiss.
    """
    t0 = time.monotonic()
    root = Path(index.dir) / FOLDER
    n = len(index.rows)
    if n < min_rows:
        if (root / POINTER).exists():
            (root / POINTER).unlink()
        _collect(root, keep=None)
        return None
    _faiss()
    origin = index_origin(index)
    keys = _row_keys(index)
    old = _reusable(index.dir, index.meta["model_sha256"])
    if old is not None and np.array_equal(old.origin, origin) and np.array_equal(old.keys, keys):
        return {"built": False, "rows": n, "nlist": int(old.centroids.shape[0]), "coded": 0, "reused": n,
                "seconds": time.monotonic() - t0, "bytes": sum(old.nbytes().values())}
    tokens, mask = _entity_tokens(index)
    trained_rows = int(old.meta.get("trained_rows", 0)) if old is not None else 0
    retrain = old is None or n > RETRAIN_GROWTH * trained_rows
    ok = np.zeros(n, bool)
    if retrain:
        if progress:
            progress(f"training {nlist_for(int(mask.sum()))} centroids on the stored frame tokens")
        centroids = train(tokens, mask, seed=seed)
        trained_rows = n
        codes = np.full(mask.shape, NO_CODE, np.uint16)
    else:
        centroids = np.asarray(old.centroids)
        codes, ok = _reuse(old, origin, keys, mask.shape)
    todo = np.flatnonzero(~ok)
    if progress and len(todo):
        progress(f"coding the frame tokens of {len(todo)} video(s) ({len(centroids)} centroids)")
    if len(todo):
        codes[todo] = encode(tokens[todo], mask[todo], centroids)
    arrays = {"centroids": centroids.astype(np.float32), "codes": codes, "origin": origin, "keys": keys}
    root.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="tmp-"))
    for name in FILES:
        np.save(tmp / name, arrays[name[:-4]], allow_pickle=False)
    fsync_tree(tmp)
    name = f"c{int(time.time() * 1e3):x}-{os.getpid()}"
    os.rename(tmp, root / name)
    files = verify.record_files(root / name)
    pointer = {"format": FORMAT, "folder": name, "model_sha256": index.meta["model_sha256"], "rows": n,
               "nlist": len(centroids), "trained_rows": trained_rows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                  time.gmtime()),
               "files": files}
    write_atomic(root / POINTER, json.dumps(pointer, indent=1, sort_keys=True) + "\n")
    _collect(root, keep=name)
    return {"built": True, "rows": n, "nlist": len(centroids), "coded": int(len(todo)), "reused": int(ok.sum()),
            "retrained": retrain, "seconds": time.monotonic() - t0,
            "bytes": int(sum(a.nbytes for a in arrays.values()))}


def train(tokens: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The centroids learnt from the valid tokens ``tokens[mask]`` of ``(n, T, D)``."""
    x = tokens[mask]
    return train_centroids(x, nlist_for(len(x)), seed=seed)


def encode(tokens: np.ndarray, mask: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The codes ``(n, T)`` uint16 of tokens ``(n, T, D)`` (padded: NO_CODE)."""
    codes = np.full(mask.shape, NO_CODE, np.uint16)
    codes[mask] = assign(tokens[mask], centroids).astype(np.uint16)
    return codes


def _reuse(old: CandidateIndex, origin: np.ndarray, keys: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The codes of the rows ``old`` already holds (same shard, shard row and video id): codes, ok."""
    lookup = {(int(a), int(b), int(k)): i for i, (a, b, k) in enumerate(zip(old.origin[:, 0], old.origin[:, 1],
                                                                         old.keys))}
    hit = np.array([lookup.get((int(a), int(b), int(k)), -1) for (a, b), k in zip(origin, keys)], np.int64)
    ok = hit >= 0
    codes = np.full(shape, NO_CODE, np.uint16)
    codes[ok] = old.codes[hit[ok]]
    return codes, ok


def from_store(store, *, seed: int = 0) -> CandidateIndex:
    """An in-memory candidate index of a :class:`~hbi_runtime.scoring.VideoStore` (benchmarks; no folder, no
    origin checks): what :func:`build` writes for an index of that store."""
    level = store.levels[0]
    mask = np.asarray(level.mask, bool)
    tokens = np.empty((store.n, level.length, level.dim), np.float32)
    for a in range(0, store.n, 65536):
        tokens[a:a + 65536] = level.dequantize(np.arange(a, min(a + 65536, store.n)))
    centroids = train(tokens, mask, seed=seed)
    codes = np.empty(mask.shape, np.uint16)
    for a in range(0, store.n, 1 << 18):
        codes[a:a + (1 << 18)] = encode(tokens[a:a + (1 << 18)], mask[a:a + (1 << 18)], centroids)
    return CandidateIndex(Path(), {"nlist": len(centroids)}, centroids, codes, np.zeros((store.n, 2), np.int32),
                          np.zeros(store.n, np.int64))


def _collect(root: Path, keep: str | None) -> None:
    """Delete every folder of ``root`` but ``keep`` (old builds, leftovers of a killed build)."""
    for item in sorted(root.iterdir()) if root.is_dir() else []:
        if item.is_dir() and item.name != keep:
            shutil.rmtree(item, ignore_errors=True)
