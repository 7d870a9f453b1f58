"""Index: read-only access to an index folder — its rows (what each stored side is) and the sides themselves.

A reader takes no lock and never blocks the writer: it reads one snapshot of the catalog's *published*
generation (one read transaction; see :mod:`hbi_runtime.index.catalog`) and memory-maps the shards that snapshot
names, after the cheap checks of :mod:`hbi_runtime.index.verify` (``verify=True``: every byte hashed). Shards are
immutable; a shard that a concurrent compaction deletes after our snapshot is told from a damaged one by reading
the catalog again (no longer named: a new snapshot is taken; still named: it is damaged).

A damaged or missing shard, or one the writer marked damaged, makes :meth:`Index.open` raise
:class:`~hbi_runtime.index.catalog.DamagedIndexError` (exit 3) naming every such shard and the command that
repairs it: an index never answers from part of its content silently.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hbi_runtime.errors import BadInputError
from hbi_runtime.index import verify as shard_checks
from hbi_runtime.index.catalog import (DEAD_FRACTION, SHARDS, DamagedIndexError, View, Writer, check_model,
                                       damaged_catalog, open_catalog, read_view, repair_hint, shard_dir)
from hbi_runtime.index.scan import display_path
from hbi_runtime.scoring import VideoStore

_ATTEMPTS = 5  # snapshots tried while a concurrent writer keeps deleting the shards a snapshot names


@dataclass(frozen=True)
class IndexRow:
    """One stored side: a whole video or one window of it.

    ``path`` opens the file (``str``; undecodable bytes as surrogate escapes, as ``os.fsdecode``); ``display``
    prints it (control characters, backslashes and undecodable bytes escaped: two names never print alike);
    ``abs_bytes`` is the absolute path as raw bytes. ``frames`` are the sampled frame numbers: frame ``f`` is at
    ``f / fps`` seconds.
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
    abs_bytes: bytes = b""

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


@dataclass(frozen=True)
class DamagedShard:
    shard_id: int
    videos: int  # videos of the published view with rows there (they count as not indexed)
    reason: str

    def to_dict(self) -> dict:
        return {"shard": f"{self.shard_id:06d}", "videos": self.videos, "reason": self.reason}


class _Rows(Sequence):
    """The rows of a snapshot, built on first access (a query reads its top-k of 100,000s)."""

    def __init__(self, records: list, root: bytes) -> None:
        self._records = records
        self._root = root
        self._built: dict[int, IndexRow] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, IndexError
        row = self._built.get(i)
        if row is None:
            _, _, vid, rel, start, end, frames, fps, duration = self._records[i]
            rel = bytes(rel)
            absolute = os.path.join(self._root, rel)
            row = self._built[i] = IndexRow(i, vid, rel, os.fsdecode(absolute), display_path(rel), start, end,
                                            tuple(json.loads(frames)), fps, duration, absolute)
        return row


class _ShardGone(Exception):
    def __init__(self, shard_id: int) -> None:
        super().__init__(shard_id)
        self.shard_id = shard_id


@dataclass
class _Snapshot:
    view: View
    records: list  # (shard_id, shard_row, video_id, rel, start_s, end_s, frames, fps, duration)
    counts: dict  # status -> videos
    shards: dict  # shard_id -> (n_rows, files, verified, damaged)
    failed: list  # (rel, error, error_kind)
    pending_videos: int


def _read_snapshot(index_dir: Path) -> _Snapshot:
    conn = open_catalog(index_dir)
    try:
        conn.execute("BEGIN")  # one snapshot for meta, rows and shards
        view = read_view(conn, index_dir)
        vis = view.visible
        records = conn.execute(
            "SELECT r.shard_id, r.shard_row, v.id, v.rel, r.start_s, r.end_s, r.frames, v.fps, v.duration "
            f"FROM rows r JOIN videos v ON v.id = r.video_id WHERE {vis} ORDER BY r.shard_id, r.shard_row").fetchall()
        counts = dict(conn.execute(f"SELECT v.status, COUNT(*) FROM videos v WHERE {vis} GROUP BY v.status"))
        shards = {r[0]: (r[1], shard_checks.loads(r[2]), r[3], r[4])
                  for r in conn.execute(f"SELECT {view.shard_columns} FROM shards")}
        kind = "v.error_kind" if view.schema > 1 else "'transient'"
        failed = conn.execute(f"SELECT v.rel, v.error, {kind} FROM videos v WHERE {vis} AND v.status = 'failed' "
                              "ORDER BY v.rel").fetchall()
        pending = 0
        if view.pending is not None:
            (pending,) = conn.execute("SELECT COUNT(*) FROM videos WHERE gen_added = ?", (view.pending[0],)).fetchone()
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise damaged_catalog(index_dir, exc) from None
    finally:
        conn.close()
    return _Snapshot(view, records, counts, shards, [(bytes(r), e, k) for r, e, k in failed], pending)


def _referenced(index_dir: Path) -> set[int]:
    """Shards the current published view still reads (a fresh snapshot)."""
    snap = _read_snapshot(index_dir)
    return {r[0] for r in snap.records}


def _open_shards(index_dir: Path, snap: _Snapshot, full: bool) -> tuple[dict[int, VideoStore], list[DamagedShard]]:
    """Every shard the snapshot reads, checked; raises _ShardGone for a shard folder that vanished."""
    stores, damaged = {}, []
    for sid in sorted({r[0] for r in snap.records}):
        if sid not in snap.shards:
            damaged.append(DamagedShard(sid, _videos_in(snap, sid), "named by rows but not by the shard table"))
            continue
        n_rows, files, _, marked = snap.shards[sid]
        folder = shard_dir(index_dir, sid)
        if marked:
            damaged.append(DamagedShard(sid, _videos_in(snap, sid), marked))
            continue
        try:
            store, reason = shard_checks.cheap_check(folder, files, n_rows, snap.view.meta)
            if reason is None and full:
                reason = shard_checks.full_check(folder, files)
        except FileNotFoundError:
            raise _ShardGone(sid) from None
        if reason is not None:
            damaged.append(DamagedShard(sid, _videos_in(snap, sid), reason))
        else:
            stores[sid] = store
    return stores, damaged


def _videos_in(snap: _Snapshot, shard_id: int) -> int:
    return len({r[2] for r in snap.records if r[0] == shard_id})


def _checked_snapshot(index_dir: Path, full: bool, model_sha256: str | None = None
                      ) -> tuple[_Snapshot, dict[int, VideoStore], list[DamagedShard]]:
    """A snapshot, its shards opened and checked, and the damaged ones. A shard that fails its checks but that
    a fresh snapshot no longer names was being replaced by a writer (compaction, a finished run): take a new
    snapshot instead of calling it damaged."""
    for attempt in range(_ATTEMPTS):
        snap = _read_snapshot(index_dir)
        check_model(snap.view.meta, model_sha256, index_dir)
        try:
            stores, damaged = _open_shards(index_dir, snap, full)
        except _ShardGone as gone:
            stores = {}
            damaged = [DamagedShard(gone.shard_id, _videos_in(snap, gone.shard_id), "its folder is missing")]
        if not damaged or attempt + 1 == _ATTEMPTS:
            return snap, stores, damaged
        if {d.shard_id for d in damaged} <= _referenced(index_dir):
            return snap, stores, damaged
    raise AssertionError("unreachable")


def _damage_error(index_dir: Path, meta: dict, damaged: list[DamagedShard]) -> DamagedIndexError:
    listed = "; ".join(f"shard {d.shard_id:06d} ({d.videos} video(s)): {d.reason}" for d in damaged[:5])
    more = f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""
    err = DamagedIndexError(f"index {index_dir} is damaged: {listed}{more}", hint=repair_hint(index_dir, meta))
    err.damaged = damaged
    return err


class Index:
    """An index folder opened for reading (use :meth:`open`)."""

    def __init__(self, index_dir: Path, snap: _Snapshot, rows: list[IndexRow], shards: list[ShardView]) -> None:
        self.dir = index_dir
        self.meta = snap.view.meta
        self.rows = rows
        self.shards = shards
        self._snap = snap
        self.verified = False

    @classmethod
    def open(cls, index_dir: str | os.PathLike, model_sha256: str | None = None, *, verify: bool = False) -> Index:
        """Open an index read-only (its last published state), after checking every shard it reads.

        Args:
            index_dir: the index folder.
            model_sha256: when given, the model package the index must have been built with.
            verify: hash every byte of every shard against the checksums recorded when it was written
                (``retrieve --verify``; about 0.6 s per GB) instead of only the cheap checks.
        Raises:
            BadInputError: no index there. DamagedIndexError (a BadInputError): a shard is missing or damaged,
                or the catalog cannot be read; the message names each, the hint the repair command.
            MismatchError: built with another model package, or an unknown catalog schema.
        """
        index_dir = Path(index_dir)
        snap, stores, damaged = _checked_snapshot(index_dir, verify, model_sha256)
        if damaged:
            raise _damage_error(index_dir, snap.view.meta, damaged)
        index = cls._build(index_dir, snap, stores)
        index.verified = verify  # the candidate index is then hashed in full too, when a query loads it
        return index

    @classmethod
    def _build(cls, index_dir: Path, snap: _Snapshot, stores: dict[int, VideoStore]) -> Index:
        n = len(snap.records)
        sids = np.fromiter((r[0] for r in snap.records), np.int64, n)
        positions = np.fromiter((r[1] for r in snap.records), np.int64, n)
        starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]]) if n else np.zeros(0, np.int64)
        shards = [ShardView(int(sids[a]), stores[int(sids[a])], positions[a:b], np.arange(a, b, dtype=np.int64))
                  for a, b in zip(starts, [*starts[1:], n])]
        rows = _Rows(snap.records, os.fsencode(snap.view.meta.get("video_dir", "")))
        return cls(index_dir, snap, rows, shards)

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

    def shard_of_row(self, row: int) -> int:
        """The shard id that stores row ``row``."""
        for shard in self.shards:
            if shard.rows.size and shard.rows[0] <= row <= shard.rows[-1]:
                return shard.shard_id
        raise IndexError(row)

    def stats(self) -> dict:
        """Counts and sizes: videos (ok / failed), rows, shards, dead rows, bytes on disk, and the meta."""
        shard_rows = sum(s.store.n for s in self.shards)
        disk = sum(f.stat().st_size for f in (self.dir / SHARDS).rglob("*") if f.is_file())
        return {"videos": self._snap.counts.get("ok", 0), "failed": self._snap.counts.get("failed", 0),
                "rows": len(self.rows), "shards": len(self.shards), "dead_rows": shard_rows - len(self.rows),
                "shard_bytes": disk, "storage_dtype": self.meta.get("storage_dtype"),
                "window": self.meta.get("window"), "model_sha256": self.meta.get("model_sha256"),
                "video_dir": self.meta.get("video_dir"), "created": self.meta.get("created")}

    def failed(self) -> list[tuple[str, str]]:
        """``(display path, reason)`` of every file that could not be indexed."""
        return [(display_path(rel), error) for rel, error, _ in self._snap.failed]


def index_status(index_dir: str | os.PathLike, *, verify: bool = False) -> dict:
    """What ``hbi-run index --status`` reports, reading only (nothing is indexed, repaired or locked).

    Keys: ``index``, ``video_dir``, ``model_sha256``, ``model_name``, ``storage_dtype``, ``window``, ``created``,
    ``last_commit`` (when the last run published), ``videos`` (indexed and readable), ``not_indexed`` (in damaged
    shards), ``failed_count``, ``rows``, ``shards``, ``shard_bytes``, ``failed`` ([{path, path_b64, reason,
    kind}]), ``damaged_shards`` ([{shard, videos, reason}]), ``pending`` (an unfinished run: {generation, started,
    videos} or None), ``verified`` ("cheap" or "full"), ``candidates`` (the candidate index:
    :func:`hbi_runtime.index.candidates.status`).

    Raises:
        BadInputError: no index there; DamagedIndexError: the catalog cannot be read.
    """
    from hbi_runtime.index.scan import path_b64

    index_dir = Path(index_dir)
    snap, _, damaged = _checked_snapshot(index_dir, verify)
    meta = snap.view.meta
    bad = {d.shard_id for d in damaged}
    lost = {r[2] for r in snap.records if r[0] in bad}
    published = _published_at(index_dir)
    disk = sum(f.stat().st_size for f in (index_dir / SHARDS).rglob("*") if f.is_file())
    pending = None
    if snap.view.pending is not None:
        pending = {"generation": snap.view.pending[0], "started": snap.view.pending[1], "videos": snap.pending_videos}
    return {"index": str(index_dir), "video_dir": meta.get("video_dir"), "model_sha256": meta.get("model_sha256"),
            "model_name": meta.get("model_name"), "storage_dtype": meta.get("storage_dtype"),
            "window": meta.get("window"), "created": meta.get("created"), "last_commit": published,
            "videos": snap.counts.get("ok", 0) - len(lost), "not_indexed": len(lost),
            "failed_count": snap.counts.get("failed", 0), "rows": sum(r[0] not in bad for r in snap.records),
            "shards": len({r[0] for r in snap.records}), "shard_bytes": disk,
            "failed": [{"path": display_path(rel), "path_b64": path_b64(rel), "reason": error, "kind": kind}
                       for rel, error, kind in snap.failed],
            "damaged_shards": [d.to_dict() for d in damaged], "pending": pending,
            "verified": "full" if verify else "cheap",
            "candidates": _candidate_status(index_dir, verify, damaged)}


def _candidate_status(index_dir: Path, verify: bool, damaged: list) -> dict:
    from hbi_runtime.errors import HbiError
    from hbi_runtime.index import candidates as cand_stage

    if damaged:
        return {"state": "unusable", "reason": "damaged shards: repair them with hbi-run index first"}
    try:
        return cand_stage.status(Index.open(index_dir), verify=verify)
    except HbiError as exc:
        return {"state": "unusable", "reason": str(exc)}


def published_state(index_dir: str | os.PathLike) -> tuple:
    """A cheap token of what a reader would see now: the published generation and the shards with their row
    counts. It changes when a run publishes or a compaction moves rows between shards, so a
    long-running reader (``hbi-run serve``) polls it to know when to open the index again.

    Raises:
        BadInputError: no index there; DamagedIndexError: the catalog cannot be read.
    """
    index_dir = Path(index_dir)
    conn = open_catalog(index_dir)
    try:
        conn.execute("BEGIN")
        view = read_view(conn, index_dir)
        shards = tuple(conn.execute("SELECT id, n_rows FROM shards ORDER BY id").fetchall())
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise damaged_catalog(index_dir, exc) from None
    finally:
        conn.close()
    return (view.schema, view.gen, shards)


def _published_at(index_dir: Path) -> str | None:
    conn = open_catalog(index_dir)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'generations'").fetchone():
            return None
        row = conn.execute("SELECT MAX(published) FROM generations").fetchone()
        return row[0] if row else None
    except sqlite3.DatabaseError as exc:
        raise damaged_catalog(index_dir, exc) from None
    finally:
        conn.close()


def _empty_store(meta: dict) -> VideoStore:
    """A zero-row store of the index's shapes (an index with no video yet)."""
    from hbi_runtime.scoring import StoreLevel

    if not meta:
        raise BadInputError("the index holds no video yet (its first run has not finished)",
                            hint="run (or finish) `hbi-run index VIDEO_DIR`")
    dtype = meta["storage_dtype"]
    token_dtype = {"float32": np.float32, "float16": np.float16, "int8": np.uint8}[dtype]
    levels = []
    for length in meta["tokens_per_level"]:
        scales = np.zeros((0, length), np.float32) if dtype == "int8" else None
        levels.append(StoreLevel(dtype, np.zeros((0, length, meta["embed_dim"]), token_dtype),
                                 np.zeros((0, length), np.float32), np.zeros((0, length), bool), scales))
    return VideoStore(tuple(levels), dtype)


def compact(index_dir: str | os.PathLike, *, dead_fraction: float = DEAD_FRACTION, force: bool = False) -> bool:
    """Rewrite all shards into one when dead rows exceed ``dead_fraction`` of the stored rows (or ``force``).

    Crash-safe like an update (new shard written, renamed, committed; old ones deleted after), and invisible to
    readers (the rows keep their content; only where they are stored changes, in one transaction). Returns
    whether it rewrote anything. Raises UsageError when another process is updating the index.
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
        return writer.merge([u[0] for u in usage]) is not None
