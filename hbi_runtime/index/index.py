"""Index: read-only access to an index folder — its rows (what each stored side is) and the sides themselves.

A reader takes no lock and never blocks the writer: it reads one snapshot of the catalog (one read transaction)
and memory-maps the shards that snapshot names. Shards are immutable, and a shard that a later compaction
deletes stays readable through an open memory map (POSIX unlink semantics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hbi_runtime.errors import BadInputError
from hbi_runtime.index.catalog import (SHARDS, Writer, check_model, collect_garbage, open_catalog, read_meta,
                                       shard_dir, try_lock)
from hbi_runtime.index.update import DEAD_FRACTION
from hbi_runtime.scoring import VideoStore


@dataclass(frozen=True)
class IndexRow:
    """One stored side: a whole video or one window of it.

    ``path`` opens the file (``str``; undecodable bytes as surrogate escapes, as ``os.fsdecode``); ``display``
    prints it. ``frames`` are the sampled frame numbers: frame ``f`` is at ``f / fps`` seconds.
    """

    row: int  # position in video_store()
    video_id: int
    rel: bytes
    path: str
    display: str
    start_s: float
    end_s: float
    frames: tuple[int, ...]
    fps: float
    duration: float | None

    def timestamps(self) -> tuple[float, ...]:
        """Seconds of each sampled frame."""
        return tuple(f / self.fps for f in self.frames)


@dataclass(frozen=True)
class ShardView:
    """One shard: its store (memory-mapped, dead rows included) and which of its rows are live, in row order."""

    shard_id: int
    store: VideoStore
    positions: np.ndarray  # rows of ``store`` that are live
    rows: np.ndarray  # their positions in :meth:`Index.video_store` / :attr:`Index.rows`


class Index:
    """An index folder opened for reading (use :meth:`open`)."""

    def __init__(self, index_dir: Path, meta: dict, rows: list[IndexRow], shards: list[ShardView],
                 videos: dict) -> None:
        self.dir = index_dir
        self.meta = meta
        self.rows = rows
        self.shards = shards
        self._videos = videos

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model_sha256: str | None = None) -> Index:
        """Open an index read-only.

        Args:
            index_dir: the index folder.
            model_sha256: when given, the model package the index must have been built with.
        Raises:
            BadInputError: no index there, or a shard is missing / damaged.
            MismatchError: built with another model package, or an unknown catalog schema.
        """
        index_dir = Path(index_dir)
        _collect_if_idle(index_dir)
        for attempt in range(3):  # a compaction may delete a shard between our snapshot and our mmap: retry
            try:
                return cls._load(index_dir, model_sha256)
            except FileNotFoundError:
                if attempt == 2:
                    raise BadInputError(f"index {index_dir}: a shard named by the catalog is missing",
                                        hint="rebuild the index (--rebuild)") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, index_dir: Path, model_sha256: str | None) -> Index:
        conn = open_catalog(index_dir)
        try:
            conn.execute("BEGIN")  # one snapshot for meta, rows and shards
            meta = read_meta(conn)
            check_model(meta, model_sha256, index_dir)
            root = os.fsencode(meta.get("video_dir", ""))
            records = conn.execute(
                "SELECT r.shard_id, r.shard_row, v.id, v.rel, v.display, r.start_s, r.end_s, r.frames, v.fps, "
                "v.duration FROM rows r JOIN videos v ON v.id = r.video_id "
                "ORDER BY r.shard_id, r.shard_row").fetchall()
            videos = {name: n for name, n in conn.execute("SELECT status, COUNT(*) FROM videos GROUP BY status")}
            shard_rows = dict(conn.execute("SELECT id, n_rows FROM shards").fetchall())
            conn.execute("COMMIT")
        finally:
            conn.close()
        rows, by_shard = [], {}
        for i, (sid, srow, vid, rel, display, start, end, frames, fps, duration) in enumerate(records):
            rel = bytes(rel)
            rows.append(IndexRow(i, vid, rel, os.fsdecode(os.path.join(root, rel)), display, start, end,
                                 tuple(json.loads(frames)), fps, duration))
            by_shard.setdefault(sid, []).append((srow, i))
        shards = []
        for sid, pairs in by_shard.items():
            folder = shard_dir(index_dir, sid)
            if not folder.is_dir():
                raise FileNotFoundError(folder)
            store = VideoStore.open(folder, mmap=True)
            if store.n != shard_rows.get(sid):
                raise BadInputError(f"index {index_dir}: shard {sid} holds {store.n} rows, the catalog says "
                                    f"{shard_rows.get(sid)}", hint="rebuild the index (--rebuild)")
            shards.append(ShardView(sid, store, np.array([p for p, _ in pairs], dtype=np.int64),
                                    np.array([r for _, r in pairs], dtype=np.int64)))
        return cls(index_dir, meta, rows, shards, {**videos, "shard_rows": sum(shard_rows.values())})

    @property
    def model_sha256(self) -> str:
        return self.meta["model_sha256"]

    def __len__(self) -> int:
        return len(self.rows)

    def video_store(self) -> VideoStore:
        """Every live row as one :class:`VideoStore`, row ``i`` = :attr:`rows` ``[i]``.

        Zero-copy (the memory-mapped shard) when the index is one shard without dead rows, which is what an
        update leaves after compaction in the common case; otherwise the live rows are copied into memory
        (score :attr:`shards` one by one to avoid that).
        """
        if len(self.shards) == 1 and len(self.shards[0].positions) == self.shards[0].store.n:
            return self.shards[0].store
        if not self.shards:
            return _empty_store(self.meta)
        return VideoStore.concat([s.store.take(s.positions) for s in self.shards])

    def stats(self) -> dict:
        """Counts and sizes: videos (ok / failed), rows, shards, dead rows, bytes on disk, and the meta."""
        shard_rows = self._videos["shard_rows"]
        disk = sum(f.stat().st_size for f in (self.dir / SHARDS).rglob("*") if f.is_file())
        return {"videos": self._videos.get("ok", 0), "failed": self._videos.get("failed", 0), "rows": len(self.rows),
                "shards": len(self.shards), "dead_rows": shard_rows - len(self.rows), "shard_bytes": disk,
                "storage_dtype": self.meta.get("storage_dtype"), "window": self.meta.get("window"),
                "model_sha256": self.meta.get("model_sha256"), "video_dir": self.meta.get("video_dir"),
                "created": self.meta.get("created")}

    def failed(self) -> list[tuple[str, str]]:
        """``(display path, reason)`` of every file that could not be indexed."""
        conn = open_catalog(self.dir)
        try:
            return [tuple(r) for r in conn.execute("SELECT display, error FROM videos WHERE status = 'failed' "
                                                   "ORDER BY rel")]
        finally:
            conn.close()


def _empty_store(meta: dict) -> VideoStore:
    """A zero-row store of the index's shapes (an index with no video yet)."""
    from hbi_runtime.scoring import StoreLevel

    dtype = meta["storage_dtype"]
    token_dtype = {"float32": np.float32, "float16": np.float16, "int8": np.uint8}[dtype]
    levels = []
    for length in meta["tokens_per_level"]:
        scales = np.zeros((0, length), np.float32) if dtype == "int8" else None
        levels.append(StoreLevel(dtype, np.zeros((0, length, meta["embed_dim"]), token_dtype),
                                 np.zeros((0, length), np.float32), np.zeros((0, length), bool), scales))
    return VideoStore(tuple(levels), dtype)


def _collect_if_idle(index_dir: Path) -> None:
    """Garbage-collect orphan shards when no writer is at work (never while one may be about to commit)."""
    if not (index_dir / "catalog.sqlite").is_file():
        return
    fd = try_lock(index_dir)
    if fd is None:
        return
    try:
        conn = open_catalog(index_dir)
        try:
            collect_garbage(index_dir, conn)
        finally:
            conn.close()
    except OSError:  # a read-only index: leave the orphans for the next writer
        pass
    finally:
        os.close(fd)


def compact(index_dir: str | os.PathLike, *, dead_fraction: float = DEAD_FRACTION, force: bool = False) -> bool:
    """Rewrite all shards into one when dead rows exceed ``dead_fraction`` of the stored rows (or ``force``).

    Crash-safe like an update (new shard written, renamed, committed; old ones deleted after). Returns whether
    it rewrote anything. Raises UsageError when another process is updating the index.
    """
    open_catalog(Path(index_dir)).close()  # an existing index, never a new one
    with Writer(index_dir) as writer:
        writer.drop_empty_shards()
        usage = writer.shard_usage()
        total, live = sum(u[1] for u in usage), sum(u[2] for u in usage)
        if not usage or not (force or (total and (total - live) / total > dead_fraction)):
            return False
        if len(usage) == 1 and total == live:
            return False
        writer.merge([u[0] for u in usage])
        return True
