"""The index folder on disk: ``catalog.sqlite`` + immutable side shards, and the one writer that changes them.

Layout::

    INDEX/
      catalog.sqlite      SQLite in WAL mode: meta, generations, videos, rows, shards (schema below)
      lock                flock()ed by the one writer (update, compact); readers never take it
      shards/000017/      an immutable VideoStore (store.json + per level .npy), rows 0..n-1
      tmp/                shards being written (a crash leaves them here; removed by the next writer)
      damaged-<time>/     a catalog that could not be read, moved aside by ``--rebuild`` (with its shards)

Crash safety (a kill at any moment leaves a consistent index): a shard is written completely under ``tmp/``,
fsync'ed, renamed into ``shards/`` and only *then* referenced, together with its videos, rows and the size and
sha256 of each of its files, in one SQLite transaction. Until that commit the shard is an orphan that no catalog
row points to; old shards are deleted only after the transaction that stopped referencing them. The writer
deletes orphans (shard folders without a ``shards`` row, everything under ``tmp/``) when it opens the index,
holding the lock, so it can never delete the shard of a writer that has not committed yet.

Readers see whole runs (generations): a run works in generation ``W`` = the last published one + 1. A video it
adds carries ``gen_added = W``; a video it replaces or drops gets ``gen_removed = W`` and stays (with its rows)
until the run publishes ``W`` in one transaction at its end. A reader reads the last *published* generation ``P``:
the videos with ``gen_added <= P`` and no ``gen_removed <= P``. So a reader sees the index as it was before a run
or after it, never half of one, and a killed run's committed batches are neither visible nor lost: the next run
resumes generation ``W`` (``--rebuild`` too: it retires every video in ``W`` and publishes the new content at once).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.index import verify
from hbi_runtime.scoring import VideoStore

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: before generations and shard checksums; upgraded in place by the next writer
CATALOG = "catalog.sqlite"
LOCK = "lock"
SHARDS = "shards"
TMP = "tmp"
DAMAGED_PREFIX = "damaged-"
DEAD_FRACTION = 0.25  # more dead rows than this fraction of the stored rows: an update (or compact) merges shards

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    gen INTEGER PRIMARY KEY,
    meta TEXT NOT NULL,                -- JSON: model, storage dtype, window policy, video folder, ...
    started TEXT NOT NULL,
    published TEXT                     -- NULL while the run that writes it has not finished
);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY,            -- folder shards/<id:06d>
    n_rows INTEGER NOT NULL,           -- rows in the shard; those without a `rows` entry are dead
    created TEXT NOT NULL,
    files TEXT,                        -- JSON {file name: [size, sha256]} recorded at commit (see verify.py)
    verified TEXT,                     -- last time every byte was hashed against `files`
    damaged TEXT                       -- why the shard cannot be trusted (its videos are re-indexed)
);
CREATE TABLE IF NOT EXISTS videos (
    id INTEGER PRIMARY KEY,
    rel BLOB NOT NULL,                 -- path relative to the video folder, raw bytes (any file name)
    display TEXT NOT NULL,             -- printable form of rel
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT,                 -- "fast:<sha256>" (size + first/last MiB) or "full:<sha256>"
    duration REAL,                     -- seconds, as the decoder saw the file
    fps REAL,                          -- the rate frame numbers were sampled with
    n_frames INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,                        -- why it failed (status 'failed')
    error_kind TEXT,                   -- 'transient' (retried every run) or 'permanent' (retried when it changes)
    indexed_at TEXT NOT NULL,
    gen_added INTEGER NOT NULL,
    gen_removed INTEGER                -- replaced or dropped by that generation
);
CREATE UNIQUE INDEX IF NOT EXISTS videos_live ON videos (rel) WHERE gen_removed IS NULL;
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


class DamagedIndexError(BadInputError):
    """An index file is damaged or missing: named in the message, with the command that repairs it."""


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
    if model_sha256 is not None and meta and meta.get("model_sha256") != model_sha256:
        raise MismatchError(f"index {index_dir} was built with model package {meta.get('model_sha256')}; this "
                            f"model package is {model_sha256}",
                            hint="use a new --index folder, or --rebuild to re-index with this package")


def describe_io(exc: Exception) -> str:
    """SQLite's text for a failed write, with the likely cause it cannot name (a file size limit)."""
    import resource

    text = str(exc)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if "I/O" in text and soft != resource.RLIM_INFINITY:
        text += f"; a file size limit of {soft} bytes is set (ulimit -f)"
    return text


def repair_hint(index_dir: Path, meta: dict | None) -> str:
    folder = (meta or {}).get("video_dir") or "VIDEO_DIR"
    return (f"run `hbi-run index {folder} --index {index_dir}`: it re-indexes the videos of damaged shards "
            "(`--rebuild` starts over)")


# ---------------------------------------------------------------------------------------------------------------
# the published view: what readers see


@dataclass(frozen=True)
class View:
    """One read snapshot's idea of the index: the published generation and how to select its videos."""

    schema: int
    meta: dict  # the published generation's meta ({} before the first run finished)
    gen: int | None  # the published generation (None: nothing published yet; schema 1: 0)
    pending: tuple[int, str] | None  # (generation, started) of an unfinished run

    @property
    def visible(self) -> str:
        """SQL condition on ``v`` (the videos table) for the videos of this view."""
        if self.schema == 1:
            return "1"
        if self.gen is None:
            return "0"
        return f"(v.gen_added <= {int(self.gen)} AND (v.gen_removed IS NULL OR v.gen_removed > {int(self.gen)}))"

    @property
    def shard_columns(self) -> str:
        return "id, n_rows, NULL, NULL, NULL" if self.schema == 1 else "id, n_rows, files, verified, damaged"


def read_view(conn: sqlite3.Connection, index_dir: Path) -> View:
    """The published view (call inside a read transaction for a consistent snapshot)."""
    meta = read_meta(conn)
    version = meta.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise MismatchError(f"index {index_dir} has catalog schema {version!r}; this runtime reads "
                            f"{', '.join(map(str, READABLE_SCHEMAS))}",
                            hint="rebuild the index with this version (--rebuild)")
    if version == 1:
        return View(1, meta, 0, None)
    published = conn.execute("SELECT gen, meta FROM generations WHERE published IS NOT NULL "
                             "ORDER BY gen DESC LIMIT 1").fetchone()
    pending = conn.execute("SELECT gen, started FROM generations WHERE published IS NULL "
                           "ORDER BY gen DESC LIMIT 1").fetchone()
    return View(2, json.loads(published[1]) if published else {}, published[0] if published else None,
                tuple(pending) if pending else None)


def open_catalog(index_dir: Path) -> sqlite3.Connection:
    """A read-only connection to an existing index's catalog.

    Raises:
        BadInputError: there is no index there. DamagedIndexError: the catalog cannot be read.
        MismatchError: the catalog has a schema version this runtime does not read.
    """
    path = index_dir / CATALOG
    if not path.is_file():
        raise BadInputError(f"{index_dir} is not an index (no {CATALOG})",
                            hint="build one with `hbi-run index VIDEO_DIR` (or check the --index path)")
    conn = None
    try:
        conn = connect(path, readonly=True)
        version = read_meta(conn).get("schema_version")
    except sqlite3.OperationalError as exc:
        if conn is not None:
            conn.close()
        if os.access(index_dir, os.W_OK) and "readonly" not in str(exc):
            raise damaged_catalog(index_dir, exc) from None
        # a read-only folder: WAL readers need to create the shared-memory file; read the file as immutable
        # instead (no writer can be at work in a folder nobody may write)
        conn = _connect_immutable(path)
        version = _read_version(conn, index_dir)
    except (sqlite3.Error, ValueError) as exc:
        if conn is not None:
            conn.close()
        raise damaged_catalog(index_dir, exc) from None
    if version not in READABLE_SCHEMAS:
        conn.close()
        raise MismatchError(f"index {index_dir} has catalog schema {version!r}; this runtime reads "
                            f"{', '.join(map(str, READABLE_SCHEMAS))}",
                            hint="rebuild the index with this version (--rebuild)")
    return conn


def _connect_immutable(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, isolation_level=None)


def _read_version(conn: sqlite3.Connection, index_dir: Path):
    try:
        return read_meta(conn).get("schema_version")
    except (sqlite3.Error, ValueError) as exc:
        conn.close()
        raise damaged_catalog(index_dir, exc) from None


def damaged_catalog(index_dir: Path, exc: Exception) -> DamagedIndexError:
    return DamagedIndexError(f"the catalog of index {index_dir} cannot be read ({exc})",
                             hint="rebuild it: `hbi-run index VIDEO_DIR --index "
                                  f"{index_dir} --rebuild` moves the damaged catalog aside and starts over")


# ---------------------------------------------------------------------------------------------------------------
# the writer


def fsync_tree(folder: Path) -> None:
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


def _index_entries(name: str) -> bool:
    return name in (SHARDS, TMP, LOCK) or name.startswith((CATALOG, DAMAGED_PREFIX))


@dataclass(frozen=True)
class ShardRecord:
    id: int
    n_rows: int
    files: dict | None
    verified: str | None
    damaged: str | None


class Writer:
    """The one process that changes an index: holds the lock from open to :meth:`close`.

    Args:
        index_dir: the index folder (created when absent; an existing folder must be empty or an index).
        recover: when the catalog cannot be read, move it (with its shards) aside into ``damaged-<time>/`` and
            start an empty index (``--rebuild``); :attr:`moved_aside` says where. Without it such a catalog
            raises :class:`DamagedIndexError`.
    Raises:
        UsageError: the folder holds other files, or another process is updating the index.
        BadInputError: the folder cannot be written (read-only, permissions).
    """

    def __init__(self, index_dir: str | os.PathLike, *, recover: bool = False) -> None:
        self.dir = Path(index_dir)
        self.conn = None
        self._lock = None
        self.moved_aside: Path | None = None
        if self.dir.exists() and not (self.dir / CATALOG).exists() and any(
                not _index_entries(p.name) for p in self.dir.iterdir()):
            raise UsageError(f"{self.dir} is not an index folder (no {CATALOG}) and is not empty: refusing to "
                             "write there", hint="give a new or empty folder as the index")
        try:
            (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
            (self.dir / TMP).mkdir(exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot write to the index folder {self.dir} ({exc.strerror})",
                                hint="check its permissions and free space, or give another --index") from None
        self._lock = try_lock(self.dir)
        if self._lock is None:
            if not os.access(self.dir, os.W_OK):
                raise BadInputError(f"cannot write to the index folder {self.dir} (read-only)",
                                    hint="give a writable --index folder; reading it still works")
            raise UsageError(f"another process is updating the index {self.dir}",
                             hint="wait for it to finish (or stop it); readers are not blocked")
        try:
            self._open(recover)
        except BaseException:
            self.close()
            raise
        self.gen: int | None = None  # the working generation, once begin() ran

    def _open(self, recover: bool) -> None:
        fresh = not (self.dir / CATALOG).exists()
        try:
            self.conn = connect(self.dir / CATALOG, readonly=False)
            if not fresh:
                (check,) = self.conn.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise sqlite3.DatabaseError(f"integrity check: {check}")
                version = read_meta(self.conn).get("schema_version")
                if version == 1:
                    self._upgrade_from_1()
                elif version != SCHEMA_VERSION:
                    raise MismatchError(f"index {self.dir} has catalog schema {version!r}; this runtime writes "
                                        f"{SCHEMA_VERSION}", hint="use a new --index folder")
            else:
                self._create()
        except (sqlite3.DatabaseError, ValueError) as exc:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            if isinstance(exc, sqlite3.OperationalError):  # the folder or disk, not the catalog's content
                raise BadInputError(f"cannot open the catalog of index {self.dir} for writing ({describe_io(exc)})",
                                    hint="check that the folder is writable and the disk has room") from None
            if not recover:
                raise damaged_catalog(self.dir, exc) from None
            self._move_aside()
            self.conn = connect(self.dir / CATALOG, readonly=False)
            self._create()
        collect_garbage(self.dir, self.conn)

    def _create(self) -> None:
        self.conn.executescript(_TABLES)
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                              (json.dumps(SCHEMA_VERSION),))

    def _move_aside(self) -> None:
        target = self.dir / f"{DAMAGED_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
        target.mkdir()
        for item in sorted(self.dir.iterdir()):
            if item.name.startswith(CATALOG) or item.name == SHARDS:
                os.rename(item, target / item.name)
        (self.dir / SHARDS).mkdir()
        _fsync_dir(self.dir)
        self.moved_aside = target

    def _upgrade_from_1(self) -> None:
        """Schema 1 -> 2 in one transaction: one published generation holding everything; failed files are
        marked transient so that the next run retries them; shard records are added by the next check."""
        old = read_meta(self.conn)
        self.conn.execute("PRAGMA foreign_keys = OFF")  # dropping the old videos table must not cascade to rows
        try:
            with self.transaction():
                c = self.conn
                c.execute("CREATE TABLE generations (gen INTEGER PRIMARY KEY, meta TEXT NOT NULL, "
                          "started TEXT NOT NULL, published TEXT)")
                meta = {k: v for k, v in old.items() if k != "schema_version"}
                c.execute("INSERT INTO generations VALUES (1, ?, ?, ?)",
                          (json.dumps(meta), meta.get("created") or now_iso(), now_iso()))
                # SQLite's recipe for changing a table: create the new one, copy, drop the old, rename the new
                # (renaming the *old* table would rewrite the foreign key of `rows` to follow it)
                ddl = _TABLES[_TABLES.index("CREATE TABLE IF NOT EXISTS videos"):_TABLES.index("CREATE UNIQUE")]
                c.execute(ddl.replace("IF NOT EXISTS videos", "videos_v2"))
                c.execute("INSERT INTO videos_v2 SELECT id, rel, display, size, mtime_ns, content_hash, duration, "
                          "fps, n_frames, status, error, CASE WHEN status = 'failed' THEN 'transient' END, "
                          "indexed_at, 1, NULL FROM videos")
                c.execute("DROP TABLE videos")
                c.execute("ALTER TABLE videos_v2 RENAME TO videos")
                c.execute("CREATE UNIQUE INDEX videos_live ON videos (rel) WHERE gen_removed IS NULL")
                for column in ("files", "verified", "damaged"):
                    c.execute(f"ALTER TABLE shards ADD COLUMN {column} TEXT")
                c.execute("DELETE FROM meta")
                c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
                broken = c.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise sqlite3.DatabaseError(f"foreign keys broken by the upgrade: {broken[:3]}")
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")

    # -- generations -----------------------------------------------------------------------------------------

    def current_meta(self) -> dict:
        """The meta of the newest generation, published or not ({} for a new index)."""
        row = self.conn.execute("SELECT meta FROM generations ORDER BY gen DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else {}

    def pending(self) -> int | None:
        """The generation of an unfinished run (killed, or still running elsewhere before it took the lock)."""
        row = self.conn.execute("SELECT gen FROM generations WHERE published IS NULL ORDER BY gen DESC "
                                "LIMIT 1").fetchone()
        return row[0] if row else None

    def begin(self, meta: dict, *, retire_all: bool = False) -> int:
        """Start (or resume) the working generation with ``meta``; ``retire_all`` drops every video from it
        (``--rebuild``: readers keep the old content until :meth:`publish`). Returns the generation."""
        with self.transaction():
            gen = self.pending()
            if gen is None:
                (top,) = self.conn.execute("SELECT COALESCE(MAX(gen), 0) FROM generations").fetchone()
                gen = top + 1
                self.conn.execute("INSERT INTO generations (gen, meta, started) VALUES (?, ?, ?)",
                                  (gen, json.dumps(meta), now_iso()))
            else:
                self.conn.execute("UPDATE generations SET meta = ? WHERE gen = ?", (json.dumps(meta), gen))
            self.gen = gen
            if retire_all:
                self.conn.execute("DELETE FROM videos WHERE gen_added = ? AND gen_removed IS NULL", (gen,))
                self.conn.execute("UPDATE videos SET gen_removed = ? WHERE gen_removed IS NULL", (gen,))
        return gen

    def publish(self) -> None:
        """Make the working generation what readers see, in one transaction; drop what it replaced."""
        with self.transaction():
            self.conn.execute("UPDATE generations SET published = ? WHERE gen = ?", (now_iso(), self.gen))
            self.conn.execute("DELETE FROM videos WHERE gen_removed IS NOT NULL AND gen_removed <= ?", (self.gen,))
            self.conn.execute("DELETE FROM generations WHERE gen < ?", (self.gen,))
        self.drop_empty_shards()

    # -- transactions ----------------------------------------------------------------------------------------

    def transaction(self):
        return _Transaction(self.conn)

    def videos(self) -> dict[bytes, tuple]:
        """``rel -> (id, size, mtime_ns, content_hash, status, error_kind, gen_added)`` of the working view."""
        return {bytes(r[0]): tuple(r[1:]) for r in self.conn.execute(
            "SELECT rel, id, size, mtime_ns, content_hash, status, error_kind, gen_added FROM videos "
            "WHERE gen_removed IS NULL")}

    def write_shard(self, store: VideoStore) -> tuple[int, dict]:
        """Write ``store`` as a new immutable shard; returns its id and its files' record (live once committed)."""
        shard_id = self.next_shard_id()
        tmp = self.dir / TMP / f"{shard_id:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        store.save(tmp)
        return shard_id, self._install(tmp, shard_id)

    def _install(self, tmp: Path, shard_id: int) -> dict:
        fsync_tree(tmp)
        files = verify.record_files(tmp)
        os.rename(tmp, shard_dir(self.dir, shard_id))
        _fsync_dir(self.dir / SHARDS)
        return files

    def adopt_shard(self, tmp: Path, files: dict) -> int:
        """Move a shard that another process wrote and synced under ``tmp/`` into ``shards/`` and return its id
        (reference it with :meth:`add_shard`). The folder must hold exactly the files of the record ``files``, at
        their recorded sizes (a partial or foreign write is refused: ``BadInputError``)."""
        tmp = Path(tmp)
        if tmp.parent.resolve() != (self.dir / TMP).resolve():
            raise UsageError(f"a shard to adopt must lie in {self.dir / TMP}, not {tmp}")
        present = {p.name: p.stat().st_size for p in tmp.iterdir()} if tmp.is_dir() else {}
        if present != {name: size for name, (size, _) in files.items()}:
            raise BadInputError(f"the shard {tmp} does not hold the files its writer recorded (found {present})",
                                hint="rerun the index command: the batch is encoded again")
        shard_id = self.next_shard_id()
        os.rename(tmp, shard_dir(self.dir, shard_id))
        _fsync_dir(self.dir / SHARDS)
        return shard_id

    def add_shard(self, shard_id: int, n_rows: int, files: dict) -> None:
        """Reference a written shard with its files' record (inside a transaction)."""
        now = now_iso()
        self.conn.execute("INSERT INTO shards (id, n_rows, created, files, verified) VALUES (?, ?, ?, ?, ?)",
                          (shard_id, n_rows, now, verify.dumps(files), now))

    def _retire(self, rel: bytes) -> None:
        self.conn.execute("DELETE FROM videos WHERE rel = ? AND gen_removed IS NULL AND gen_added = ?",
                          (rel, self.gen))
        self.conn.execute("UPDATE videos SET gen_removed = ? WHERE rel = ? AND gen_removed IS NULL", (self.gen, rel))

    def put_video(self, rel: bytes, display: str, *, size: int, mtime_ns: int, content_hash: str | None,
                  duration: float | None, fps: float | None, n_frames: int | None, error: str | None,
                  error_kind: str | None = None) -> int:
        """Replace the video ``rel`` in the working generation and return its new id (inside a transaction)."""
        self._retire(rel)
        cur = self.conn.execute(
            "INSERT INTO videos (rel, display, size, mtime_ns, content_hash, duration, fps, n_frames, status, "
            "error, error_kind, indexed_at, gen_added) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rel, display, size, mtime_ns, content_hash, duration, fps, n_frames,
             "failed" if error else "ok", error, (error_kind or "permanent") if error else None, now_iso(),
             self.gen))
        return cur.lastrowid

    def add_rows(self, rows: list[tuple]) -> None:
        """``(video_id, shard_id, shard_row, start_s, end_s, frames list)`` rows (inside a transaction)."""
        self.conn.executemany("INSERT INTO rows (video_id, shard_id, shard_row, start_s, end_s, frames) "
                              "VALUES (?, ?, ?, ?, ?, ?)", [(*r[:5], json.dumps([int(f) for f in r[5]]))
                                                              for r in rows])

    def remove_videos(self, rels: list[bytes]) -> None:
        with self.transaction():
            for rel in rels:
                self._retire(rel)

    def touch(self, rel: bytes, mtime_ns: int) -> None:
        with self.transaction():
            self.conn.execute("UPDATE videos SET mtime_ns = ? WHERE rel = ? AND gen_removed IS NULL", (mtime_ns, rel))

    # -- shards ----------------------------------------------------------------------------------------------

    def shard_records(self) -> list[ShardRecord]:
        return [ShardRecord(r[0], r[1], verify.loads(r[2]), r[3], r[4]) for r in self.conn.execute(
            "SELECT id, n_rows, files, verified, damaged FROM shards ORDER BY id")]

    def record_shard(self, shard_id: int, files: dict) -> None:
        """Record the files of a shard committed before records existed (trusting them as they are now)."""
        with self.transaction():
            self.conn.execute("UPDATE shards SET files = ?, verified = ? WHERE id = ?",
                              (verify.dumps(files), now_iso(), shard_id))

    def mark_verified(self, shard_id: int) -> None:
        with self.transaction():
            self.conn.execute("UPDATE shards SET verified = ? WHERE id = ?", (now_iso(), shard_id))

    def mark_damaged(self, shard_id: int, reason: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE shards SET damaged = ? WHERE id = ?", (reason, shard_id))

    def videos_in_shards(self, shard_ids: list[int]) -> set[bytes]:
        """The working view's videos that have rows in ``shard_ids``."""
        if not shard_ids:
            return set()
        marks = ",".join("?" * len(shard_ids))
        return {bytes(r[0]) for r in self.conn.execute(
            f"SELECT DISTINCT v.rel FROM rows r JOIN videos v ON v.id = r.video_id WHERE v.gen_removed IS NULL "
            f"AND r.shard_id IN ({marks})", shard_ids)}

    def shard_usage(self) -> list[tuple[int, int, int]]:
        """``(shard_id, n_rows, live rows)`` per shard, by id."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT s.id, s.n_rows, COUNT(r.id) FROM shards s LEFT JOIN rows r ON r.shard_id = s.id "
            "GROUP BY s.id ORDER BY s.id")]

    def merge(self, shard_ids: list[int]) -> int | None:
        """Rewrite the live rows of ``shard_ids`` into one new shard (row order kept); returns its id.

        Each source shard is hashed against its record first: a damaged one is marked (its videos are
        re-indexed by the next run) and the merge is not done, so damage is never copied into a fresh shard.
        Memory: one source shard at a time (the new store grows with :meth:`VideoStore.append_to`).
        """
        if not shard_ids:
            return None
        records = {r.id: r for r in self.shard_records()}
        for sid in shard_ids:
            reason = records[sid].damaged or verify.full_check(shard_dir(self.dir, sid), records[sid].files)
            if reason is not None:
                self.mark_damaged(sid, reason)
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
        new_id = files = None
        if moves:
            new_id = self.next_shard_id()
            files = self._install(tmp, new_id)
        with self.transaction():
            if new_id is not None:
                self.add_shard(new_id, len(moves), files)
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
