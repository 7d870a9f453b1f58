"""The index folder on disk: ``catalog.sqlite`` + immutable side shards, and the one writer that changes them.

Layout::

    INDEX/
      catalog.sqlite      SQLite in WAL mode: meta, videos, rows, shards (schema below)
      lock                flock()ed by the one writer (update, compact); readers never take it
      shards/000017/      an immutable VideoStore (store.json + per level .npy), rows 0..n-1
      tmp/                shards being written (a crash leaves them here; removed by the next writer)

Crash safety (a kill at any moment leaves a consistent index): a shard is written completely under ``tmp/``,
fsync'ed, renamed into ``shards/`` and only *then* referenced, together with its videos and rows, in one SQLite
transaction. Until that commit the shard is an orphan that no catalog row points to; old shards are deleted only
after the transaction that stopped referencing them. The writer deletes orphans (shard folders without a
``shards`` row, everything under ``tmp/``) when it opens the index, holding the lock, so it can never delete the
shard of a writer that has not committed yet.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.scoring import VideoStore

SCHEMA_VERSION = 1
CATALOG = "catalog.sqlite"
LOCK = "lock"
SHARDS = "shards"
TMP = "tmp"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,            -- folder shards/<id:06d>
    n_rows INTEGER NOT NULL,           -- rows in the shard; those without a `rows` entry are dead
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS videos (
    id INTEGER PRIMARY KEY,
    rel BLOB NOT NULL UNIQUE,          -- path relative to the video folder, raw bytes (any file name)
    display TEXT NOT NULL,             -- printable form of rel (non-UTF-8 bytes as \\xNN)
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT,                 -- "fast:<sha256>" (size + first/last MiB) or "full:<sha256>"
    duration REAL,                     -- seconds, as the decoder saw the file
    fps REAL,                          -- the rate frame numbers were sampled with
    n_frames INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,                        -- why it failed (status 'failed')
    indexed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,
    video_id INTEGER NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    shard_id INTEGER NOT NULL REFERENCES shards(id),
    shard_row INTEGER NOT NULL,
    start_s REAL NOT NULL,             -- the window [start_s, end_s) in seconds (the whole video: 0, n/fps)
    end_s REAL NOT NULL,
    frames TEXT NOT NULL,              -- JSON list of the sampled frame numbers (timestamp = frame / fps)
    UNIQUE (shard_id, shard_row)
);
CREATE INDEX IF NOT EXISTS rows_by_video ON rows (video_id);
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows (shard_id);
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def shard_dir(index_dir: Path, shard_id: int) -> Path:
    return index_dir / SHARDS / f"{shard_id:06d}"


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit ``BEGIN IMMEDIATE`` ... ``COMMIT``)."""
    uri = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rwc'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before the writer goes on
    return conn


def read_meta(conn: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def check_model(meta: dict, model_sha256: str | None, index_dir: Path) -> None:
    """MismatchError when the index was built with another model package."""
    if model_sha256 is not None and meta.get("model_sha256") != model_sha256:
        raise MismatchError(f"index {index_dir} was built with model package {meta.get('model_sha256')}; this "
                            f"model package is {model_sha256}",
                            hint="use a new --index folder, or --rebuild to re-index with this package")


def _fsync_tree(folder: Path) -> None:
    for item in folder.iterdir():
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(index_dir: Path) -> int | None:
    """The writer lock's fd when taken now, else None (another writer holds it, or the folder is read-only)."""
    try:
        fd = os.open(index_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Writer:
    """The one process that changes an index: holds the lock from open to :meth:`close`.

    Args:
        index_dir: the index folder (created when absent; an existing folder must be empty or an index).
    Raises:
        UsageError: the folder holds other files, or another process is updating the index.
    """

    def __init__(self, index_dir: str | os.PathLike) -> None:
        self.dir = Path(index_dir)
        if self.dir.exists() and not (self.dir / CATALOG).exists() and any(
                p.name not in (SHARDS, TMP, LOCK) for p in self.dir.iterdir()):
            raise UsageError(f"{self.dir} is not an index folder (no {CATALOG}) and is not empty: refusing to "
                             "write there", hint="give a new or empty folder as the index")
        (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.dir / TMP).mkdir(exist_ok=True)
        self._lock = try_lock(self.dir)
        if self._lock is None:
            raise UsageError(f"another process is updating the index {self.dir}",
                             hint="wait for it to finish (or stop it); readers are not blocked")
        self.conn = connect(self.dir / CATALOG, readonly=False)
        self.conn.executescript(_SCHEMA)
        collect_garbage(self.dir, self.conn)

    # -- meta ------------------------------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return read_meta(self.conn)

    def set_meta(self, values: dict) -> None:
        with self.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                  [(k, json.dumps(v)) for k, v in values.items()])

    def reset(self, values: dict) -> None:
        """Forget every video and shard and start over with ``values`` as meta (``--rebuild``), atomically."""
        with self.transaction():
            for table in ("rows", "videos", "shards", "meta"):
                self.conn.execute(f"DELETE FROM {table}")
            self.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                  [(k, json.dumps(v)) for k, v in values.items()])
        collect_garbage(self.dir, self.conn)

    # -- transactions ----------------------------------------------------------------------------------------

    def transaction(self):
        return _Transaction(self.conn)

    def videos(self) -> dict[bytes, tuple]:
        """``rel -> (id, size, mtime_ns, content_hash, status)`` of every catalogued video."""
        return {bytes(r[0]): tuple(r[1:]) for r in
                self.conn.execute("SELECT rel, id, size, mtime_ns, content_hash, status FROM videos")}

    def write_shard(self, store: VideoStore) -> int:
        """Write ``store`` as a new immutable shard and return its id; it is live only once committed."""
        shard_id = self.next_shard_id()
        tmp = self.dir / TMP / f"{shard_id:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        store.save(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, shard_dir(self.dir, shard_id))
        _fsync_dir(self.dir / SHARDS)
        return shard_id

    def add_shard(self, shard_id: int, n_rows: int) -> None:
        """Reference a written shard (inside a transaction)."""
        self.conn.execute("INSERT INTO shards (id, n_rows, created) VALUES (?, ?, ?)", (shard_id, n_rows, now_iso()))

    def put_video(self, rel: bytes, display: str, *, size: int, mtime_ns: int, content_hash: str | None,
                  duration: float | None, fps: float | None, n_frames: int | None, error: str | None) -> int:
        """Replace the video ``rel`` (its old rows die) and return its new id (inside a transaction)."""
        self.conn.execute("DELETE FROM videos WHERE rel = ?", (rel,))
        cur = self.conn.execute(
            "INSERT INTO videos (rel, display, size, mtime_ns, content_hash, duration, fps, n_frames, status, "
            "error, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rel, display, size, mtime_ns, content_hash, duration, fps, n_frames,
             "failed" if error else "ok", error, now_iso()))
        return cur.lastrowid

    def add_rows(self, rows: list[tuple]) -> None:
        """``(video_id, shard_id, shard_row, start_s, end_s, frames list)`` rows (inside a transaction)."""
        self.conn.executemany("INSERT INTO rows (video_id, shard_id, shard_row, start_s, end_s, frames) "
                              "VALUES (?, ?, ?, ?, ?, ?)", [(*r[:5], json.dumps([int(f) for f in r[5]]))
                                                              for r in rows])

    def remove_videos(self, rels: list[bytes]) -> None:
        with self.transaction():
            self.conn.executemany("DELETE FROM videos WHERE rel = ?", [(r,) for r in rels])

    def touch(self, rel: bytes, mtime_ns: int) -> None:
        with self.transaction():
            self.conn.execute("UPDATE videos SET mtime_ns = ? WHERE rel = ?", (mtime_ns, rel))

    # -- shards ----------------------------------------------------------------------------------------------

    def shard_usage(self) -> list[tuple[int, int, int]]:
        """``(shard_id, n_rows, live rows)`` per shard, by id."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT s.id, s.n_rows, COUNT(r.id) FROM shards s LEFT JOIN rows r ON r.shard_id = s.id "
            "GROUP BY s.id ORDER BY s.id")]

    def merge(self, shard_ids: list[int]) -> int | None:
        """Rewrite the live rows of ``shard_ids`` into one new shard (row order kept); returns its id.

        Memory: one source shard at a time (the new store grows with :meth:`VideoStore.append_to`).
        """
        if not shard_ids:
            return None
        tmp = self.dir / TMP / f"merge-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        moves = []  # (row id, new shard row)
        for sid in shard_ids:
            live = self.conn.execute("SELECT id, shard_row FROM rows WHERE shard_id = ? ORDER BY shard_row",
                                     (sid,)).fetchall()
            if not live:
                continue
            store = VideoStore.open(shard_dir(self.dir, sid))
            positions = [r[1] for r in live]
            start = len(moves)
            store.take(positions).append_to(tmp)
            moves.extend((row_id, start + i) for i, (row_id, _) in enumerate(live))
        new_id = None
        if moves:
            _fsync_tree(tmp)
            new_id = self.next_shard_id()
            os.rename(tmp, shard_dir(self.dir, new_id))
            _fsync_dir(self.dir / SHARDS)
        with self.transaction():
            if new_id is not None:
                self.add_shard(new_id, len(moves))
                # two steps: (shard_id, shard_row) is unique, and new rows may collide with not-yet-moved ones
                self.conn.executemany("UPDATE rows SET shard_id = ?, shard_row = ? WHERE id = ?",
                                      [(new_id, -1 - new_row, row_id) for row_id, new_row in moves])
                self.conn.execute("UPDATE rows SET shard_row = -1 - shard_row WHERE shard_id = ?", (new_id,))
            self.conn.executemany("DELETE FROM shards WHERE id = ?", [(s,) for s in shard_ids])
        collect_garbage(self.dir, self.conn)
        return new_id

    def drop_empty_shards(self) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM shards WHERE id NOT IN (SELECT DISTINCT shard_id FROM rows)")
        collect_garbage(self.dir, self.conn)

    def next_shard_id(self) -> int:
        used = [int(p.name) for p in (self.dir / SHARDS).iterdir() if p.name.isdigit()]
        (top,) = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM shards").fetchone()
        return max([top, *used]) + 1

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Transaction:
    """``with writer.transaction():`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def collect_garbage(index_dir: Path, conn: sqlite3.Connection) -> list[str]:
    """Delete shard folders that no committed ``shards`` row names, and everything under ``tmp/``.

    Call only while holding the writer lock. Returns the names deleted.
    """
    live = {r[0] for r in conn.execute("SELECT id FROM shards")}
    removed = []
    shards = index_dir / SHARDS
    for item in sorted(shards.iterdir()) if shards.is_dir() else []:
        if not (item.name.isdigit() and int(item.name) in live):
            _remove(item)
            removed.append(f"{SHARDS}/{item.name}")
    tmp = index_dir / TMP
    for item in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        _remove(item)
        removed.append(f"{TMP}/{item.name}")
    return removed


def _remove(item: Path) -> None:
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item)
    else:
        item.unlink()


def open_catalog(index_dir: Path) -> sqlite3.Connection:
    """A read-only connection to an existing index's catalog.

    Raises:
        BadInputError: there is no index there.
        MismatchError: the catalog has a schema version this runtime does not read.
    """
    path = index_dir / CATALOG
    if not path.is_file():
        raise BadInputError(f"{index_dir} is not an index (no {CATALOG})",
                            hint="build one with `hbi-run index VIDEO_DIR` (or check the --index path)")
    conn = connect(path, readonly=True)
    try:
        version = read_meta(conn).get("schema_version")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise BadInputError(f"{path} is not a readable index catalog ({exc})",
                            hint="rebuild the index (--rebuild)") from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise MismatchError(f"index {index_dir} has catalog schema {version!r}; this runtime reads "
                            f"{SCHEMA_VERSION}", hint="rebuild the index with this version (--rebuild)")
    return conn
