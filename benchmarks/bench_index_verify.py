"""What checking an index costs a query: 1 query against ``--videos`` stored videos, at each verification level.

An index of ``--videos`` synthetic videos (ViT-B/32 size: D = 512, T = 12 frames at the entity level, 3 and 2
merged tokens at the action and event levels; int8 storage, the default; one shard, as compaction leaves it) is
written through the real writer (:class:`hbi_runtime.index.catalog.Writer`, checksums recorded at commit). Then,
``--repeats`` times each, taking turns:

* ``open_cheap``: :meth:`Index.open` as every query does (catalog snapshot and one row object per video, then
  the cheap checks: sizes of every shard file, the ``store.json`` hash, the ``.npy`` headers);
* ``checks_cheap``: the cheap checks alone (what verification adds to an open);
* ``open_full``: :meth:`Index.open` with ``verify=True`` (``retrieve --verify``: sha256 of every byte; the files are
  in the page cache, so this is hashing speed, not disk speed);
* ``score``: the exact score of one 10-word query (entity level, the native int8 kernel where it runs);
* ``guard``: the score check that refuses impossible scores (non-finite or beyond the level-weight bound);

and reports the medians, the query latency at each level (open + score + guard), the overhead of each level
over the scoring alone, and what a run of ``hbi-run index`` spends on its verification budget. Threads: as the
code runs (``--threads``, default 2 = this machine's cores).

Usage::

    python benchmarks/bench_index_verify.py [--videos 100000] [--repeats 7] [--out benchmarks/results/verify.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hbi_runtime.index import Index
from hbi_runtime.index.index import _open_shards, _read_snapshot
from hbi_runtime.index.catalog import Writer
from hbi_runtime.index.update import VERIFY_BUDGET_BYTES
from hbi_runtime.scoring import StoreLevel, VideoStore, quantize_int8, score
from hbi_runtime.search import _check_scores
from hbi_runtime.sides import Side, SideLevel

DEFAULT_OUT = Path("benchmarks/results/verify.json")
D, LENGTHS, L_TEXT, VALID = 512, (12, 3, 2), 24, 12


def make_store(n: int, seed: int = 0, block: int = 10_000, *, d: int = D, lengths=LENGTHS) -> VideoStore:
    """``n`` random unit-token int8 sides (``bench_serve.py`` uses other shapes: the demo model's)."""
    rng = np.random.default_rng(seed)
    levels = []
    for length in lengths:
        codes = np.empty((n, length, d), np.uint8)
        scales = np.empty((n, length), np.float32)
        for start in range(0, n, block):
            x = rng.standard_normal((min(block, n - start), length, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
            codes[start:start + block], scales[start:start + block] = quantize_int8(x)
        w = rng.random((n, length)).astype(np.float32)
        levels.append(StoreLevel("int8", codes, w / w.sum(axis=1, keepdims=True), np.ones((n, length), bool), scales))
    return VideoStore(tuple(levels), "int8")


def write_index(folder: Path, store: VideoStore, meta: dict | None = None) -> None:
    """``store`` as an index through the real writer; ``meta``: the index meta (default: ViT-B/32 shapes)."""
    meta = meta or {"model_sha256": "0" * 64, "storage_dtype": "int8", "tokens_per_level": list(LENGTHS),
                    "embed_dim": D, "window": None, "max_frames": LENGTHS[0], "video_dir": "/synthetic",
                    "created": "bench"}
    with Writer(folder) as writer:
        writer.begin(meta)
        shard_id, files = writer.write_shard(store)
        with writer.transaction():
            writer.add_shard(shard_id, store.n, files)
            for i in range(store.n):
                vid = writer.put_video(f"v{i:07d}.mp4".encode(), f"v{i:07d}.mp4", size=1, mtime_ns=1,
                                       content_hash=None, duration=12.0, fps=1.0, n_frames=12, error=None)
                writer.add_rows([(vid, shard_id, i, 0.0, 12.0, list(range(12)))])
        writer.publish()


def make_query(seed: int = 1) -> Side:
    rng = np.random.default_rng(seed)
    levels = []
    for length in (L_TEXT, 6, 3):
        tokens = rng.standard_normal((1, length, D)).astype(np.float32)
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        mask = np.arange(length)[None, :] < min(VALID, length)
        weights = np.where(mask, rng.random((1, length)), 0).astype(np.float32)
        levels.append(SideLevel(tokens, weights / weights.sum(), mask))
    return Side(tuple(levels), "text")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hbi-verify-") as tmp:
        folder = Path(tmp) / "index"
        t0 = time.perf_counter()
        store = make_store(args.videos)
        write_index(folder, store)
        del store
        built = time.perf_counter() - t0
        shard_bytes = sum(p.stat().st_size for p in (folder / "shards").rglob("*") if p.is_file())
        query = make_query()
        weights = (1.0, 0.0, 0.0)
        times: dict[str, list[float]] = {k: [] for k in ("open_cheap", "checks_cheap", "open_full", "score", "guard")}
        for _ in range(args.repeats):
            t = time.perf_counter()
            idx = Index.open(folder)
            times["open_cheap"].append(time.perf_counter() - t)
            snap = _read_snapshot(folder)
            t = time.perf_counter()
            _open_shards(folder, snap, False)
            times["checks_cheap"].append(time.perf_counter() - t)
            t = time.perf_counter()
            Index.open(folder, verify=True)
            times["open_full"].append(time.perf_counter() - t)
            t = time.perf_counter()
            scores = score(query, idx.video_store(), level_weights=weights, threads=args.threads)
            times["score"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _check_scores(idx, scores, weights)
            times["guard"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        base = med["score"]
        latency = {"cheap": med["open_cheap"] + base + med["guard"], "full": med["open_full"] + base + med["guard"]}
        result = {
            "videos": args.videos, "shard_bytes": shard_bytes, "threads": args.threads, "repeats": args.repeats,
            "build_s": round(built, 1), "median_ms": {k: round(v, 3) for k, v in med.items()},
            "query_latency_ms": {k: round(v, 2) for k, v in latency.items()},
            "verification_ms": {"cheap": round(med["checks_cheap"] + med["guard"], 3),
                                "full": round(med["open_full"] - med["open_cheap"] + med["checks_cheap"] + med["guard"],
                                              2)},
            "full_hash_gb_per_s": round(shard_bytes / (med["open_full"] - med["open_cheap"]) / 1e6, 2),
            "index_run_budget": {"bytes": VERIFY_BUDGET_BYTES,
                                 "ms": round(VERIFY_BUDGET_BYTES / shard_bytes * (med["open_full"] - med["open_cheap"]),
                                             1)},
        }
    print(f"{args.videos} videos, {shard_bytes / 2**20:.0f} MiB of shards (int8), {args.threads} threads, "
          f"median of {args.repeats}:")
    for k, v in med.items():
        print(f"  {k:<11} {v:9.2f} ms")
    print(f"  query latency: cheap checks {latency['cheap']:.1f} ms, --verify {latency['full']:.1f} ms "
          f"(scoring alone {base:.1f} ms); verification itself: cheap {result['verification_ms']['cheap']:.2f} ms, "
          f"full {result['verification_ms']['full']:.1f} ms")
    print(f"  an index run hashes {VERIFY_BUDGET_BYTES >> 20} MiB per run: about "
          f"{result['index_run_budget']['ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
