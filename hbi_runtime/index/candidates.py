"""The candidate index: a training-free first stage that finds, for a query, the few videos worth exact scoring.

Why this shape (measured in docs/candidates.md): a single pooled vector per video loses HBI's answers (the
exact score is a weighted max over frame tokens, which a mean does not see). This stage keeps the token level,
in the style of late-interaction engines (ColBERT / PLAID centroid pruning):

* every valid **entity-level frame token** of every stored video is assigned to its nearest of ``nlist``
  spherical k-means centroids (``codes``, ``(N, T)`` uint16); an inverted file lists, per centroid, the rows
  that have a token there (``offsets`` / ``members``);
* a query's valid tokens ``t`` (weights ``w_t``) are compared with the centroids; each token probes its
  ``nprobe`` nearest centroids, and a video's approximate score is ``sum_t w_t max(floor_t, max over its probed
  tokens of <t, centroid>)`` (``floor_t``: the best centroid the token did not probe), the text-to-video half of
  HBI's entity score with each frame token replaced by its centroid;
* the ``K`` best videos by that score are scored exactly (:func:`hbi_runtime.search.rank_encoded`).

No training and no captions are needed: any package (the official checkpoints included) gets it from the sides
the index already stores. Building needs faiss (``pip install 'hbi-toolkit[candidates]'``: its k-means and
nearest-centroid search over millions of tokens); answering a query needs numpy only.

On disk (inside the index folder)::

    candidates/CURRENT.json     format, model, parameters and {file: [size, sha256]}: the switch, replaced atomically
    candidates/<name>/          centroids.npy (C, D) f32, codes.npy (N, T) u16, offsets.npy (C+1,) i64,
                                members.npy (M,) i32, origin.npy (N, 2) i32 (shard id, shard row of each row),
                                keys.npy (N,) i64 (catalog video id of each row)

A build writes a new folder under ``candidates/tmp-*``, fsyncs it, renames it, then replaces ``CURRENT.json``
(the checksums are recorded there at that commit); old folders are deleted after the switch, leftovers of a
killed build by the next build. Readers check sizes (cheap) or every byte (``verify``), the model and that
``origin`` equals the index's published rows: a missing, damaged or stale candidate index is never used (exact
scoring answers, with the reason), and the next ``hbi-run index`` rebuilds it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hbi_runtime.errors import MissingDependencyError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.index import verify
from hbi_runtime.index.catalog import fsync_tree

FORMAT = "hbi.candidates/1"
FOLDER = "candidates"
POINTER = "CURRENT.json"
FILES = ("centroids.npy", "codes.npy", "offsets.npy", "members.npy", "origin.npy", "keys.npy", "codebooks.npy",
         "residuals.npy")
ARRAYS = tuple(name[:-4] for name in FILES)
NO_CODE = np.uint16(0xFFFF)  # a padded (invalid) frame token
BUILD_MIN_ROWS = 1000  # `hbi-run index` builds the candidate index from this many rows on
RETRAIN_GROWTH = 4.0  # k-means again when the index has grown this many times since the centroids were trained
TRAIN_POINTS_PER_CENTROID = 32  # k-means sample: at most this many tokens per centroid
KMEANS_ITERATIONS = 10
# Chosen on the validation split's 120 captions over 20,000 indexed videos (benchmarks/bench_candidates.py: the
# least work with recall@10 >= 0.995 there; docs/candidates.md)
DEFAULT_NPROBE = 32  # centroids probed per query token
DEFAULT_K = 1000  # videos scored exactly (at least 10 x top-k)
DEFAULT_POOL = 8  # the probe hands this many times K rows to the compressed interaction
HINT = "install the candidate stage (pip install 'hbi-toolkit[candidates]', i.e. faiss-cpu) and run hbi-run index again"


class CandidateIndexUnavailable(Exception):
    """Why the candidate index cannot answer (missing, stale, damaged, other model): exact scoring answers."""


def nlist_for(tokens: int) -> int:
    """Centroids for ``tokens`` stored tokens: the power of two nearest ``2 sqrt(tokens)``, in [64, 32768] (the
    build's cost is the nearest-centroid search of every token, proportional to it; the residual codes carry the
    precision)."""
    target = 2.0 * math.sqrt(max(tokens, 1))
    return int(min(32768, max(64, 2 ** round(math.log2(target)))))


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


def pq_subspaces(dim: int) -> int:
    """Residual sub-quantizers: one per 4 dimensions (a byte per 4 dimensions of each token)."""
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return m


def train_residuals(residuals: np.ndarray, *, seed: int = 0, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """A product quantizer of the token residuals (8 bits per sub-vector): codebooks ``(M, 256, D/M)``, Lloyd's
    k-means per sub-space on a sample (numpy: sub-spaces of 4 dimensions are too small for BLAS to pay)."""
    dim = residuals.shape[1]
    m = pq_subspaces(dim)
    sub = dim // m
    rng = np.random.default_rng(seed)
    sample = np.asarray(residuals[rng.permutation(len(residuals))[: 256 * TRAIN_POINTS_PER_CENTROID]], np.float32)
    books = np.zeros((m, 256, sub), np.float32)
    for j in range(m):
        x = sample[:, j * sub:(j + 1) * sub]
        book = x[rng.choice(len(x), size=min(256, len(x)), replace=False)].copy()
        for _ in range(iterations):
            near = np.argmin((book * book).sum(1)[None] - 2 * x @ book.T, axis=1)
            counts = np.bincount(near, minlength=len(book))
            sums = np.zeros_like(book)
            np.add.at(sums, near, x)
            filled = counts > 0
            book[filled] = sums[filled] / counts[filled, None]
        books[j, :len(book)] = book
    return books


def encode_residuals(residuals: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """The nearest codeword of each sub-vector: ``(n, M)`` uint8."""
    m, _, sub = codebooks.shape
    out = np.empty((len(residuals), m), np.uint8)
    for j in range(m):
        part = np.ascontiguousarray(residuals[:, j * sub:(j + 1) * sub], np.float32)
        book = codebooks[j]
        for a in range(0, len(part), 1 << 18):
            x = part[a:a + (1 << 18)]
            d = (book * book).sum(1)[None] - 2 * x @ book.T
            out[a:a + (1 << 18), j] = np.argmin(d, axis=1)
    return out


def train_centroids(tokens: np.ndarray, nlist: int, *, seed: int = 0) -> np.ndarray:
    """Spherical k-means (faiss) on a sample of at most ``TRAIN_POINTS_PER_CENTROID * nlist`` tokens."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    sample = tokens[rng.permutation(len(tokens))[: TRAIN_POINTS_PER_CENTROID * nlist]]
    nlist = min(nlist, len(sample))
    km = faiss.Kmeans(tokens.shape[1], nlist, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=TRAIN_POINTS_PER_CENTROID, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(sample, np.float32))
    centroids = np.asarray(km.centroids, np.float32)
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)


def assign(tokens: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (largest inner product) of each token, ``(n,)`` int64 (faiss flat search)."""
    faiss = _faiss()
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, np.float32))
    out = np.empty(len(tokens), np.int64)
    for a in range(0, len(tokens), 1 << 18):
        _, ids = flat.search(np.ascontiguousarray(tokens[a:a + (1 << 18)], np.float32), 1)
        out[a:a + (1 << 18)] = ids[:, 0]
    return out


def inverted_lists(codes: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (nlist+1,), members)``: the rows with a token at centroid ``c`` are
    ``members[offsets[c]:offsets[c+1]]`` (each row once per centroid, ascending)."""
    n, t = codes.shape
    flat = codes.reshape(-1).astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), t)
    keep = flat != int(NO_CODE)
    key = np.unique(flat[keep] * n + rows[keep])  # sorted by centroid, then row; a row's duplicates merge
    counts = np.bincount(key // n, minlength=nlist)
    offsets = np.zeros(nlist + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, (key % n).astype(np.int32)


@dataclass
class CandidateIndex:
    """A loaded candidate index (see the module docstring). ``folder`` is where its files live."""

    folder: Path
    meta: dict
    centroids: np.ndarray
    codes: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    origin: np.ndarray
    keys: np.ndarray
    codebooks: np.ndarray  # (M, 256, D/M) residual product quantizer
    residuals: np.ndarray  # (N, T, M) uint8 codes of each token's residual from its centroid

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    def nbytes(self) -> dict[str, int]:
        """Bytes of each array (what the candidate index adds to memory / disk)."""
        return {name: int(getattr(self, name).nbytes) for name in ARRAYS}

    def candidates(self, tokens: np.ndarray, weights: np.ndarray, mask: np.ndarray, video_weights, k: int, *,
                   nprobe: int = DEFAULT_NPROBE, pool: int = DEFAULT_POOL) -> np.ndarray:
        """The ``k`` rows of largest approximate score for one query (entity-level text tokens ``(L, D)``, weights
        and mask ``(L,)``; ``video_weights``: the store's entity-level weights ``(N, T)``), ascending.

        1. probe: each valid query token probes its ``nprobe`` nearest centroids; a row's probe score is
           ``sum_t w_t max(floor_t, best probed <t, centroid>)``; the ``pool * k`` best rows go on (rows touched
           by no probe tie at the bottom and come by lower row, deterministically);
        2. compressed interaction: HBI's entity score of those rows with every frame token replaced by its
           centroid plus its product-quantised residual (both halves, the video weights and padded frames as
           exact scoring has them); the ``k`` best are returned.
        """
        valid = np.flatnonzero(mask)
        n = self.n
        k = min(k, n)
        if len(valid) == 0 or k >= n:
            return np.arange(k, dtype=np.int64)
        t = np.asarray(tokens[valid], np.float32)
        w = np.asarray(weights[valid], np.float32)
        sims = t @ self.centroids.T  # (Lv, C)
        rows = self._probe(sims, w, min(n, pool * k), nprobe)
        codes = np.asarray(self.codes[rows], np.int64)  # (P, T)
        ok = codes != int(NO_CODE)
        m = self.codebooks.shape[0]
        res = np.asarray(self.residuals[rows])  # (P, T, M)
        # each token as the index has it: its centroid + its product-quantised residual
        flat = self.codebooks.reshape(m * 256, -1)  # codeword j of sub-space i at row 256 i + j
        recon = np.take(self.centroids, np.where(ok, codes, 0).reshape(-1), axis=0)  # (P*T, D)
        recon += np.take(flat, (res + 256 * np.arange(m)).reshape(-1), axis=0).reshape(len(recon), -1)
        inter = (recon @ t.T).T.reshape(len(t), *codes.shape)  # (Lv, P, T) (this operand order: OpenBLAS's fast
        # path here; t @ recon.T measured 100x slower on the reference machine)
        inter = np.where(ok[None], inter, np.float32(0))  # padded frames give S = 0, as in exact scoring
        t2v = w @ inter.max(axis=2)  # (P,)
        per_frame = inter.max(axis=0)  # (P, T)
        if len(valid) < len(mask):  # padded query positions give S = 0: the official floor of the max over tokens
            per_frame = np.maximum(per_frame, 0)
        v2t = np.einsum("pt,pt->p", per_frame, np.asarray(video_weights[rows], np.float32) * ok)
        approx = t2v + v2t
        best = rows[np.lexsort((rows, -approx))[:k]]
        return np.sort(best)

    def _probe(self, sims: np.ndarray, w: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        n, nlist = self.n, sims.shape[1]
        if k >= n:
            return np.arange(n, dtype=np.int64)
        nprobe = max(1, min(nprobe, nlist - 1))
        order = np.argpartition(-sims, nprobe, axis=1)
        acc = np.zeros(n, np.float32)
        best = np.empty(n, np.float32)
        for i in range(sims.shape[0]):
            probed = order[i, :nprobe]
            floor = sims[i, order[i, nprobe:]].max()  # the best centroid this token did not probe
            probed = probed[np.argsort(sims[i, probed])]  # ascending: the last write of a row is its best
            starts, stops = self.offsets[probed], self.offsets[probed + 1]
            rows = np.concatenate([self.members[a:b] for a, b in zip(starts, stops)])
            if rows.size == 0:
                continue
            best[rows] = np.repeat(sims[i, probed], stops - starts)
            acc[rows] = acc[rows] + np.maximum(best[rows] - floor, 0) * w[i]  # duplicates: the same value, once
        kth = np.partition(acc, n - k)[n - k]
        above = np.flatnonzero(acc > kth)
        ties = np.flatnonzero(acc == kth)[: k - len(above)]
        return np.sort(np.concatenate([above, ties])).astype(np.int64)


# ------------------------------------------------------------------------------------------ reading
def _pointer(index_dir: Path) -> dict:
    path = Path(index_dir) / FOLDER / POINTER
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        raise CandidateIndexUnavailable("the index has no candidate index") from None
    except (OSError, ValueError) as exc:
        raise CandidateIndexUnavailable(f"its pointer {path} cannot be read ({exc})") from None
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
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
    cand = CandidateIndex(folder, pointer, **{k: (np.asarray(v) if k in ("centroids", "codebooks") else v)
                                              for k, v in arrays.items()})
    n, nlist = cand.codes.shape[0], cand.centroids.shape[0]
    if (cand.centroids.ndim != 2 or cand.centroids.shape[1] != index.meta.get("embed_dim")
            or cand.offsets.shape != (nlist + 1,) or int(cand.offsets[-1]) != cand.members.shape[0]
            or cand.origin.shape != (n, 2) or cand.keys.shape != (n,)
            or cand.residuals.shape[:2] != cand.codes.shape or cand.residuals.shape[2] != cand.codebooks.shape[0]):
        raise CandidateIndexUnavailable(f"the arrays in {folder} do not fit together: damaged")
    # Values that would index out of range (flipped bytes the size check cannot see): a few ms at a million rows.
    # Bytes that stay in range can only make worse candidates; the scores are always exact.
    codes = cand.codes.reshape(-1)
    if (len(cand.members) and (int(cand.members.min()) < 0 or int(cand.members.max()) >= n)
            or np.any(np.diff(cand.offsets) < 0) or int(cand.offsets[0]) != 0
            or np.any((codes >= nlist) & (codes != NO_CODE))
            or not (np.isfinite(cand.centroids).all() and np.isfinite(cand.codebooks).all())):
        raise CandidateIndexUnavailable(f"the arrays in {folder} hold impossible values: damaged")
    if not np.array_equal(cand.origin, index_origin(index)):
        raise CandidateIndexUnavailable("it is stale (the index changed after it was built)")
    return cand


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
        centroids, codebooks = train(tokens, mask, seed=seed)
        trained_rows = n
        codes = np.full(mask.shape, NO_CODE, np.uint16)
        residuals = np.zeros((*mask.shape, codebooks.shape[0]), np.uint8)
    else:
        centroids, codebooks = np.asarray(old.centroids), np.asarray(old.codebooks)
        codes, residuals, ok = _reuse(old, origin, keys, mask.shape)
    todo = np.flatnonzero(~ok)
    if progress and len(todo):
        progress(f"coding the frame tokens of {len(todo)} video(s) ({len(centroids)} centroids)")
    if len(todo):
        codes[todo], residuals[todo] = encode(tokens[todo], mask[todo], centroids, codebooks)
    offsets, members = inverted_lists(codes, len(centroids))
    arrays = {"centroids": centroids.astype(np.float32), "codes": codes, "offsets": offsets, "members": members,
              "origin": origin, "keys": keys, "codebooks": codebooks, "residuals": residuals}
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


def train(tokens: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, residual codebooks)`` learnt from the valid tokens ``tokens[mask]`` of ``(n, T, D)``."""
    x = tokens[mask]
    centroids = train_centroids(x, nlist_for(len(x)), seed=seed)
    sample = np.random.default_rng(seed).permutation(len(x))[: 256 * TRAIN_POINTS_PER_CENTROID]
    x = x[np.sort(sample)]
    return centroids, train_residuals(x - centroids[assign(x, centroids)], seed=seed)


def encode(tokens: np.ndarray, mask: np.ndarray, centroids: np.ndarray,
           codebooks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (n, T) uint16, residual codes (n, T, M) uint8)`` of tokens ``(n, T, D)`` (padded: NO_CODE, 0)."""
    x = tokens[mask]
    assigned = assign(x, centroids)
    codes = np.full(mask.shape, NO_CODE, np.uint16)
    codes[mask] = assigned.astype(np.uint16)
    residuals = np.zeros((*mask.shape, codebooks.shape[0]), np.uint8)
    residuals[mask] = encode_residuals(x - centroids[assigned], codebooks)
    return codes, residuals


def _reuse(old: CandidateIndex, origin: np.ndarray, keys: np.ndarray, shape: tuple
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes of the rows ``old`` already holds (same shard, shard row and video id): codes, residuals, ok."""
    lookup = {(int(a), int(b), int(k)): i for i, (a, b, k) in enumerate(zip(old.origin[:, 0], old.origin[:, 1],
                                                                         old.keys))}
    hit = np.array([lookup.get((int(a), int(b), int(k)), -1) for (a, b), k in zip(origin, keys)], np.int64)
    ok = hit >= 0
    codes = np.full(shape, NO_CODE, np.uint16)
    residuals = np.zeros((*shape, old.codebooks.shape[0]), np.uint8)
    codes[ok] = old.codes[hit[ok]]
    residuals[ok] = old.residuals[hit[ok]]
    return codes, residuals, ok


def from_store(store, *, seed: int = 0) -> CandidateIndex:
    """An in-memory candidate index of a :class:`~hbi_runtime.scoring.VideoStore` (benchmarks; no folder, no
    origin checks): what :func:`build` writes for an index of that store."""
    level = store.levels[0]
    mask = np.asarray(level.mask, bool)
    tokens = np.empty((store.n, level.length, level.dim), np.float32)
    for a in range(0, store.n, 65536):
        tokens[a:a + 65536] = level.dequantize(np.arange(a, min(a + 65536, store.n)))
    centroids, codebooks = train(tokens, mask, seed=seed)
    codes = np.empty(mask.shape, np.uint16)
    residuals = np.empty((*mask.shape, codebooks.shape[0]), np.uint8)
    for a in range(0, store.n, 65536):
        codes[a:a + 65536], residuals[a:a + 65536] = encode(tokens[a:a + 65536], mask[a:a + 65536], centroids,
                                                            codebooks)
    offsets, members = inverted_lists(codes, len(centroids))
    return CandidateIndex(Path(), {"nlist": len(centroids)}, centroids, codes, offsets, members,
                          np.zeros((store.n, 2), np.int32), np.zeros(store.n, np.int64), codebooks, residuals)


def _collect(root: Path, keep: str | None) -> None:
    """Delete every folder of ``root`` but ``keep`` (old builds, leftovers of a killed build)."""
    for item in sorted(root.iterdir()) if root.is_dir() else []:
        if item.is_dir() and item.name != keep:
            shutil.rmtree(item, ignore_errors=True)
