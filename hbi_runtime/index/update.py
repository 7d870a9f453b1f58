"""update_index: bring an index up to date with a video folder, incrementally and crash-safely.

Each file is compared with its catalog entry: same size and mtime -> unchanged (not even read); same size, other
mtime -> its fast hash decides (same content: only the mtime is updated); otherwise it is decoded and encoded
again. Files that are gone are dropped. Files decode in worker processes while the encoder runs; every batch of
files is committed as one shard + one SQLite transaction, so a killed run loses at most the batch in flight and
the next run resumes where it stopped (see :mod:`hbi_runtime.index.catalog`).

Window policy (``window`` / ``stride``, seconds): none by default, as the official model was trained and is
evaluated on whole clips (T frames spread over the clip). For videos much longer than T seconds (T = the
package's ``max_frames``, 12 for the official models) one side per video spreads T frames over the whole length
and loses detail: ``window=30`` is the recommended setting for such folders (each 30 s is sampled at the
official 1 fps, then uniformly to T). The policy is part of the index: an index is updated only with the policy
it was built with.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from hbi_runtime.errors import BadInputError, MismatchError, UsageError, environment_error
from hbi_runtime.index import verify as shard_checks
from hbi_runtime.index.catalog import DEAD_FRACTION, Writer, check_model, describe_io, now_iso, shard_dir
from hbi_runtime.index.scan import DEFAULT_EXTENSIONS, ScanEntry, display_path, fast_hash, path_b64, scan
from hbi_runtime.index.windows import WINDOWS_PER_TASK, Window, WindowDecoder, WindowTask, check_window
from hbi_runtime.scoring import DEFAULT_DTYPE, STORAGE_DTYPES, VideoStore

BATCH = 16  # files (or windows) per committed shard, and per video-encoder call
PROBE_CHUNK = 64  # windowed runs probe this many files ahead of decoding their windows
MAX_SHARDS = 16  # more shards than this after a run: merge them all into one (compact)
# Every run hashes this many bytes of shards against their checksums, least recently verified first (about 0.6 s
# on the reference machine): an index up to this size is fully verified by every run, a larger one over a few.
VERIFY_BUDGET_BYTES = 1 << 30
TRANSIENT, PERMANENT = "transient", "permanent"  # failures retried every run / only when the file changes

Progress = Callable[[int, int, "str | None", float], None]  # (done, total, current file, files per second)


@dataclass(frozen=True)
class FailedFile:
    """A file the index holds no side for, and why. ``kind``: ``transient`` failures (permissions, I/O errors,
    timeouts, a file that vanished) are retried by every run, ``permanent`` ones (not a video, corrupt) when the
    file changes or with ``retry_failed``. ``attempted``: this run tried it (else it failed before and did not
    change)."""

    path: str  # display form
    reason: str
    kind: str
    rel: bytes
    attempted: bool

    def to_dict(self) -> dict:
        return {"path": self.path, "path_b64": path_b64(self.rel), "reason": self.reason, "kind": self.kind,
                "attempted": self.attempted}


@dataclass
class IndexSummary:
    """What :func:`update_index` did. Counts are files.

    ``failed`` lists *every* file that has no side after the run (this run's failures and earlier ones that were
    not retried), so a summary never hides a file; ``recovered`` counts files that had failed before and were
    indexed now; ``resumed`` counts files an interrupted run had encoded (not visible to readers until this run
    published them); ``repaired`` names the damaged shards this run found (their videos were re-indexed).
    """

    index_dir: Path
    new: int = 0
    unchanged: int = 0
    reindexed: int = 0
    removed: int = 0
    recovered: int = 0
    resumed: int = 0
    failed: list[FailedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # found by the scan but not taken (links, ...)
    repaired: list[dict] = field(default_factory=list)  # {shard, videos, reason}
    verified: dict = field(default_factory=lambda: {"shards": 0, "bytes": 0})  # hashed in full by this run
    moved_aside: Path | None = None  # where --rebuild moved an unreadable catalog
    rows: int = 0  # stored sides (windows) written by this run
    seconds: float = 0.0
    # the candidate index after the run (:func:`hbi_runtime.index.candidates.build`'s report), or why there is
    # none: {"built": False, "reason": ...}; None below candidates.BUILD_MIN_ROWS rows
    candidates: dict | None = None

    def to_dict(self, model_sha256: str) -> dict:
        """The ``hbi.index/1`` document (``hbi-run index --format json``, ``hbi-run serve``'s index jobs)."""
        return {"schema": "hbi.index/1", "model_sha256": model_sha256, "index": str(self.index_dir),
                "new": self.new, "unchanged": self.unchanged, "reindexed": self.reindexed,
                "recovered": self.recovered, "resumed": self.resumed,
                "removed": self.removed, "rows": self.rows, "seconds": round(self.seconds, 2),
                "failed": [f.to_dict() for f in self.failed],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "repaired": self.repaired, "verified": self.verified,
                "moved_aside": None if self.moved_aside is None else str(self.moved_aside),
                "candidates": self.candidates}


def default_index_dir(video_dir: str | bytes | os.PathLike, model) -> Path:
    """``$XDG_CACHE_HOME/hbi-toolkit/index/<sha256(abs video_dir)[:16]>-<model manifest sha256[:12]>/``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``. One index per (folder, model package); nothing is written into
    the video folder.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = hashlib.sha256(os.path.abspath(os.fsencode(video_dir))).hexdigest()[:16]
    return Path(cache) / "hbi-toolkit" / "index" / f"{folder}-{_model_sha(model)[:12]}"


def _model_sha(model) -> str:
    return model.package.manifest_sha256


def index_meta(model, video_dir, *, dtype: str, window: float | None, stride: float | None) -> dict:
    """The meta of an index generation (what an existing index must agree with)."""
    m = model.manifest
    return {"model_sha256": _model_sha(model),
            "model_name": os.path.basename(str(model.package.dir).rstrip("/")),
            "model_source": m.source, "model_config": m.model_config, "max_frames": m.max_frames,
            "tokens_per_level": m.tokens_per_level["video"], "embed_dim": m.embed_dim,
            "storage_dtype": dtype, "window": None if window is None else {"window": window, "stride": stride},
            "video_dir": display_path(os.path.abspath(os.fsencode(video_dir))), "created": now_iso()}


@dataclass
class _Job:
    entry: ScanEntry
    kind: str  # "new" | "reindexed" | "recovered" (failed before)
    windows: list = field(default_factory=list)  # (Window, DecodedVideo) in order
    error: str | None = None
    error_kind: str | None = None
    stored: int = 0  # rows of this file in the batch's shard (dead when the file fails after encoding)

    def fail(self, reason: str, kind: str) -> None:
        if self.error is None:
            self.error, self.error_kind = reason, kind


@dataclass
class _Plan:
    jobs: list[_Job] = field(default_factory=list)
    touches: list[tuple[bytes, int]] = field(default_factory=list)  # same content, new mtime
    removals: list[bytes] = field(default_factory=list)
    known: int = 0  # files in the working view before the run


def update_index(model, video_dir: str | bytes | os.PathLike, index_dir: str | os.PathLike | None = None, *,
                 workers: int = 2, batch_size: int = BATCH, window: float | None = None,
                 stride: float | None = None, dtype: str = DEFAULT_DTYPE,
                 extensions: Iterable[str] = DEFAULT_EXTENSIONS, follow_symlinks: bool = False,
                 timeout_s: float = 120.0, retry_failed: bool = False, full_hash: bool = False,
                 rebuild: bool = False, force: bool = False, verify: bool = False,
                 verify_budget_bytes: int = VERIFY_BUDGET_BYTES, progress: Progress | None = None,
                 window_progress: Callable[[int, str], None] | None = None,
                 executor: Callable[[Work], None] | None = None, candidates: bool = True,
                 candidate_min_rows: int | None = None,
                 candidate_progress: Callable[[str], None] | None = None) -> IndexSummary:
    """Index the videos of ``video_dir`` (recursively) into ``index_dir``, re-encoding only what changed.

    Readers see the index as it was before the run until the run ends, then as it is after it (one
    transaction); a killed run is resumed by the next one.

    Args:
        model: a loaded :class:`hbi_runtime.model.Model`.
        video_dir: the folder of videos (read only).
        index_dir: the index folder (default :func:`default_index_dir`).
        workers: decoding processes. batch_size: files (windows) per encoder call and per committed shard.
        window, stride: seconds; see the module docstring (default: one side per whole video).
        dtype: storage of the stored tokens, one of :data:`hbi_runtime.scoring.STORAGE_DTYPES`.
        extensions, follow_symlinks: see :func:`hbi_runtime.index.scan.scan`.
        timeout_s: per-file decoding limit (per probe / group of windows with ``window``).
        retry_failed: decode again every file that failed before (transient failures are retried anyway).
        full_hash: fingerprint files by all their bytes instead of size + first / last MiB.
        rebuild: forget what the index holds (even from another model package) and index everything again; an
            unreadable catalog is moved aside (:attr:`IndexSummary.moved_aside`).
        force: allow a run that drops more than half of the index's videos (a wrong or emptied folder).
        verify: hash every shard against its checksums (default: :data:`VERIFY_BUDGET_BYTES` of them per run).
        progress: called after each committed file as ``progress(done, total, path, files_per_second)``, and
            once with ``(0, total, None, 0.0)`` before the first.
        window_progress: with ``window``, called as each group of windows is decoded, with the number of windows
            decoded so far and the file's display path (a long file shows progress before it is committed).
        executor: decodes and encodes the run's files elsewhere (``executor(work)``, see :class:`Work`; the
            Ray executor of :mod:`hbi_runtime.index.ray_executor`); default: here, with ``workers`` decoding
            processes. Either way this process is the one committer.
        candidates: bring the candidate index (:mod:`hbi_runtime.index.candidates`) up to date after publishing,
            from ``candidate_min_rows`` rows on (default ``candidates.BUILD_MIN_ROWS``); without faiss the
            summary says so and retrieval stays exact. candidate_progress: called with a line per step of it.
    Returns:
        :class:`IndexSummary`.
    Raises:
        MismatchError: the index was built with another model package, storage dtype or window policy, or the
            run would drop most of it (without ``force``).
        BadInputError: ``video_dir`` is not a readable folder, the index folder cannot be written (read-only,
            disk full, file size limit), or its catalog is damaged (without ``rebuild``).
        UsageError: bad arguments, a non-index folder, or another process updating the same index.
    """
    t0 = time.monotonic()
    check_window(window, stride)
    if window is not None and stride is None:
        stride = window
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    found = scan(video_dir, extensions, follow_symlinks=follow_symlinks)
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir(video_dir, model)
    summary = IndexSummary(index_dir, skipped=found.skipped)
    try:
        with Writer(index_dir, recover=rebuild) as writer:
            summary.moved_aside = writer.moved_aside
            meta = index_meta(model, video_dir, dtype=dtype, window=window, stride=stride)
            old = writer.current_meta()
            fresh = rebuild or not old
            damaged: list[dict] = []
            if not fresh:
                _check_compatible(old, meta, writer.dir)
                meta = {**old, "video_dir": meta["video_dir"]}  # the folder may have moved: files are keyed by rel
                damaged = _check_shards(writer, old, summary, full=verify, budget=verify_budget_bytes)
            pending = writer.pending()
            repair = writer.videos_in_shards([d["shard"] for d in damaged])
            plan = _Plan() if fresh else _plan(writer, found.files, summary, retry_failed=retry_failed,
                                               full_hash=full_hash, repair=repair, pending=pending)
            if fresh:
                plan.jobs = [_Job(entry, "new") for entry in found.files]
            _guard_removals(plan, writer, old, meta, force)
            writer.begin(meta, retire_all=fresh)
            for rel, mtime_ns in plan.touches:
                writer.touch(rel, mtime_ns)
            if plan.removals:
                writer.remove_videos(plan.removals)
                summary.removed = len(plan.removals)
            summary.repaired = [{**d, "shard": f"{d['shard']:06d}"} for d in damaged]
            first_new_shard = writer.next_shard_id()
            committer = Committer(writer, summary, progress, len(plan.jobs))
            if plan.jobs and executor is not None:
                executor(Work(plan.jobs, committer, model, dtype, batch_size, full_hash, window, stride, workers,
                              timeout_s))
            elif plan.jobs:
                sink = _Sink(committer, model, dtype, batch_size, full_hash)
                stream = (_decode_windows(model, plan.jobs, window, stride, workers, timeout_s, window_progress)
                          if window is not None else _decode_whole(model, plan.jobs, workers, timeout_s))
                for job in stream:
                    sink.add(job)
                sink.flush()
            writer.publish()
            _tidy(writer, first_new_shard)
            summary.failed = _failed_files(writer, {j.entry.rel for j in plan.jobs})
            if candidates:
                summary.candidates = _refresh_candidates(writer.dir, candidate_min_rows, candidate_progress)
    except OSError as exc:
        raise _write_error(index_dir, exc) from None
    except sqlite3.OperationalError as exc:
        raise BadInputError(f"cannot update the index {index_dir} ({describe_io(exc)})",
                            hint="check that the disk has room and the folder is writable; rerun to resume") from None
    summary.seconds = time.monotonic() - t0
    return summary


def _write_error(index_dir: Path, exc: OSError) -> BadInputError | OSError:
    """What the index writer says when the disk refuses (the run can be resumed: nothing committed is lost)."""
    return environment_error(exc, f"cannot write the index {display_path(index_dir)}",
                             hint="free space or fix the folder's permissions, then rerun: the run resumes where it "
                                  "stopped, and readers still see the index as it was") or exc


def _refresh_candidates(index_dir: Path, min_rows: int | None, progress) -> dict | None:
    """Rebuild what changed of the candidate index (holding the writer lock, after publishing)."""
    from hbi_runtime.errors import MissingDependencyError
    from hbi_runtime.index import candidates as cand_stage
    from hbi_runtime.index.index import Index

    index = Index.open(index_dir)
    limit = cand_stage.BUILD_MIN_ROWS if min_rows is None else min_rows
    try:
        return cand_stage.build(index, min_rows=limit, progress=progress)
    except MissingDependencyError as exc:
        return {"built": False, "reason": f"{exc.message}; {exc.hint}"}


def _check_compatible(old: dict, meta: dict, index_dir: Path) -> None:
    check_model(old, meta["model_sha256"], index_dir)
    for key, what in (("storage_dtype", "storage dtype"), ("window", "window policy"),
                      ("max_frames", "frames per video")):
        if old.get(key) != meta[key]:
            raise MismatchError(f"index {index_dir} was built with {what} {old.get(key)!r}; asked for "
                                f"{meta[key]!r}", hint="use the index's setting, a new --index folder, or --rebuild")


def _check_shards(writer: Writer, meta: dict, summary: IndexSummary, *, full: bool, budget: int) -> list[dict]:
    """Cheap checks on every shard, full hashes on ``budget`` bytes of them (all with ``full``), least recently
    verified first. Damaged shards are marked in the catalog and returned as ``{shard, videos, reason}``."""
    damaged, healthy = [], []
    for rec in writer.shard_records():
        folder = shard_dir(writer.dir, rec.id)
        reason = rec.damaged
        if reason is None:
            try:
                _, reason = shard_checks.cheap_check(folder, rec.files, rec.n_rows, meta)
            except FileNotFoundError:
                reason = "its folder is missing"
        if reason is None and rec.files is None:  # written before checksums existed: record them now
            writer.record_shard(rec.id, shard_checks.record_files(folder))
        elif reason is None:
            healthy.append(rec)
        else:
            damaged.append((rec.id, reason))
    healthy.sort(key=lambda r: (r.verified is not None, r.verified or ""))
    spent = 0
    for rec in healthy:
        size = shard_checks.recorded_bytes(rec.files)
        if not full and spent and spent + size > budget:
            break
        spent += size
        reason = shard_checks.full_check(shard_dir(writer.dir, rec.id), rec.files)
        summary.verified["shards"] += 1
        summary.verified["bytes"] += size
        if reason is None:
            writer.mark_verified(rec.id)
        else:
            damaged.append((rec.id, reason))
    out = []
    for sid, reason in damaged:
        writer.mark_damaged(sid, reason)
        out.append({"shard": sid, "videos": len(writer.videos_in_shards([sid])), "reason": reason})
    return out


def _plan(writer: Writer, files: list[ScanEntry], summary: IndexSummary, *, retry_failed: bool, full_hash: bool,
          repair: set[bytes], pending: int | None) -> _Plan:
    """Sort the scanned files into jobs (new / reindexed / recovered), unchanged and resumed ones, and removals.
    Reads only: the writer applies the plan after :func:`_guard_removals`."""
    known = writer.videos()
    plan = _Plan(known=len(known))
    for entry in files:
        old = known.pop(entry.rel, None)
        if old is None:
            plan.jobs.append(_Job(entry, "new"))
            continue
        _, size, mtime_ns, content_hash, status, error_kind, gen_added = old
        if entry.rel in repair:
            plan.jobs.append(_Job(entry, "reindexed"))
            continue
        same = size == entry.size and (mtime_ns == entry.mtime_ns or _same_content(entry, content_hash, full_hash))
        if same and mtime_ns != entry.mtime_ns:
            plan.touches.append((entry.rel, entry.mtime_ns))
        if status == "failed":
            if not same or retry_failed or error_kind == TRANSIENT:
                plan.jobs.append(_Job(entry, "recovered"))
        elif not same:
            plan.jobs.append(_Job(entry, "reindexed"))
        elif pending is not None and gen_added == pending:
            summary.resumed += 1
        else:
            summary.unchanged += 1
    plan.removals = list(known)
    return plan


def _same_content(entry: ScanEntry, content_hash: str | None, full_hash: bool) -> bool:
    """Same size, new mtime: the file is the same when its fingerprint is."""
    if not content_hash:
        return False
    try:
        return fast_hash(entry.path, entry.size, full=content_hash.startswith("full:")) == content_hash
    except OSError:
        return False


def _guard_removals(plan: _Plan, writer: Writer, old: dict, meta: dict, force: bool) -> None:
    """Refuse a run that would drop more than half of the index (at least 2 videos): a wrong, emptied or
    unmounted folder, not a library that changed."""
    n = len(plan.removals)
    if force or n < 2 or 2 * n <= plan.known:
        return
    moved = "" if old.get("video_dir") in (None, meta.get("video_dir")) else \
        f" (the index was built for {old.get('video_dir')}, this run indexes {meta.get('video_dir')})"
    raise MismatchError(f"this run would drop {n} of the {plan.known} videos of index {writer.dir}, which are not "
                        f"in the folder{moved}",
                        hint="check the folder (moved? unmounted?); pass --force to drop them, or use another "
                             "--index for another folder")


def _failed_files(writer: Writer, attempted: set[bytes]) -> list[FailedFile]:
    return [FailedFile(display_path(bytes(rel)), error, kind or PERMANENT, bytes(rel), bytes(rel) in attempted)
            for rel, error, kind in writer.conn.execute(
                "SELECT rel, error, error_kind FROM videos WHERE gen_removed IS NULL AND status = 'failed' "
                "ORDER BY rel")]


def _tidy(writer: Writer, first_new_shard: int) -> None:
    """Merge this run's shards into one; compact everything when too many shards or dead rows."""
    writer.drop_empty_shards()
    usage = writer.shard_usage()
    fresh = [sid for sid, _, _ in usage if sid >= first_new_shard]
    if len(fresh) > 1:
        writer.merge(fresh)
        usage = writer.shard_usage()
    total, live = sum(u[1] for u in usage), sum(u[2] for u in usage)
    if len(usage) > MAX_SHARDS or (total and (total - live) / total > DEAD_FRACTION):
        writer.merge([u[0] for u in usage])


def failure_kind(error: Exception) -> str:
    """``transient`` for failures that may pass by themselves (permissions, I/O, timeouts), else ``permanent``."""
    from hbi_runtime.video import DecodeTimeoutError

    transient = getattr(error, "transient", None)
    if transient is None:
        transient = isinstance(error, (DecodeTimeoutError, OSError))
    return TRANSIENT if transient else PERMANENT


# ---------------------------------------------------------------------------------------------------------------
# decoding streams: yield each job once all its windows are decoded (or it failed), in job order


def _decode_whole(model, jobs: list[_Job], workers: int, timeout_s: float, pool=None) -> Iterator[_Job]:
    from hbi_runtime.video import VideoDecodeError, VideoDecoder

    opened = VideoDecoder(model.manifest.preprocessing, workers=workers, timeout_s=timeout_s) if pool is None else \
        contextlib.nullcontext(pool)
    with opened as pool:
        for job, (_, result) in zip(jobs, pool.decode_many(job.entry.path for job in jobs)):
            if isinstance(result, VideoDecodeError):
                job.fail(result.reason, failure_kind(result))
            else:
                end = result.n_frames / result.fps
                job.windows.append((Window(0.0, end, 0, result.n_frames), result))
            yield job


def _decode_windows(model, jobs: list[_Job], window: float, stride: float, workers: int, timeout_s: float,
                    on_windows: Callable[[int, str], None] | None = None, pool=None) -> Iterator[_Job]:
    from hbi_runtime.video import VideoDecodeError

    decoded = 0
    opened = WindowDecoder(model.manifest.preprocessing, workers=workers, timeout_s=timeout_s) if pool is None \
        else contextlib.nullcontext(pool)
    with opened as pool:
        for start in range(0, len(jobs), PROBE_CHUNK):
            chunk = jobs[start:start + PROBE_CHUNK]
            tasks, owners = [], []
            probes = pool.decode_many(WindowTask(j.entry.path, window, stride) for j in chunk)
            for job, (_, probe) in zip(chunk, probes):
                if isinstance(probe, VideoDecodeError):
                    job.fail(probe.reason, failure_kind(probe))
                    continue
                for first in range(0, len(probe.windows), WINDOWS_PER_TASK):
                    tasks.append(WindowTask(job.entry.path, window, stride, "decode", first, WINDOWS_PER_TASK))
                    owners.append(job)
            results = pool.decode_many(tasks)
            pending = {id(j): sum(o is j for o in owners) for j in chunk}
            queue = collections.deque(chunk)
            for job, (_, result) in zip(owners, results):
                if isinstance(result, VideoDecodeError):
                    job.fail(result.reason, failure_kind(result))
                elif job.error is None:
                    job.windows.extend((dw.window, dw.video) for dw in result)
                    decoded += len(result)
                    if on_windows is not None:
                        on_windows(decoded, job.entry.display)
                pending[id(job)] -= 1
                while queue and pending[id(queue[0])] == 0:  # in job order, as soon as complete
                    yield queue.popleft()
            yield from queue


# ---------------------------------------------------------------------------------------------------------------
# encoding and committing


@dataclass(frozen=True)
class Work:
    """What an executor gets from :func:`update_index`: the files to decode and encode (``jobs``, in scan order),
    the settings of the run, and the :class:`Committer` to hand each finished batch to (in this process)."""

    jobs: list[_Job]
    committer: Committer
    model: object  # the loaded Model (its package and manifest; an executor may load the package elsewhere)
    dtype: str
    batch_size: int
    full_hash: bool
    window: float | None
    stride: float | None
    workers: int
    timeout_s: float


@dataclass(frozen=True)
class FrameInfo:
    """What the catalog keeps of a decoded window once its frames are encoded (a DecodedVideo without frames)."""

    duration: float
    fps: float
    n_frames: int
    indices: list[int]


class Committer:
    """The one committer of a run: adds finished batches (a written shard + its files' catalog entries) to the
    catalog, one transaction each, and counts them into the summary and the progress callback."""

    def __init__(self, writer: Writer, summary: IndexSummary, progress: Progress | None, total: int) -> None:
        self.writer, self.summary = writer, summary
        self.progress, self.total, self.done = progress, total, 0
        self.t0 = time.monotonic()
        if progress is not None:
            progress(0, total, None, 0.0)

    def commit(self, jobs: list[_Job], hashes: list[str | None], shard_id: int | None, n_rows: int,
               files: dict | None) -> None:
        """Reference shard ``shard_id`` (already in place under ``shards/``; None when no file of the batch has a
        side) and record ``jobs`` (their windows in shard row order) in one transaction."""
        row = 0
        with self.writer.transaction():
            if shard_id is not None:
                self.writer.add_shard(shard_id, n_rows, files)
            for job, content_hash in zip(jobs, hashes):
                row = self._commit_job(job, content_hash, shard_id, row)
        self._report(jobs)

    def adopt(self, jobs: list[_Job], hashes: list[str | None], tmp: Path | None, n_rows: int,
              files: dict | None) -> None:
        """:meth:`commit` a batch whose shard another process wrote, complete and synced, to ``tmp`` (a folder
        under the index's ``tmp/``) with the record ``files``: the shard is checked against the record's names
        and sizes, moved into ``shards/`` and then referenced."""
        shard_id = self.writer.adopt_shard(tmp, files) if tmp is not None else None
        self.commit(jobs, hashes, shard_id, n_rows, files)

    def _commit_job(self, job: _Job, content_hash: str | None, shard_id: int | None, row: int) -> int:
        e = job.entry
        video = job.windows[0][1] if job.windows else None
        vid = self.writer.put_video(
            e.rel, e.display, size=e.size, mtime_ns=e.mtime_ns, content_hash=content_hash,
            duration=video.duration if video else None, fps=video.fps if video else None,
            n_frames=video.n_frames if video else None, error=job.error, error_kind=job.error_kind)
        if job.error is None:
            self.writer.add_rows([(vid, shard_id, row + i, w.start_s, w.end_s, v.indices)
                                  for i, (w, v) in enumerate(job.windows)])
        return row + job.stored  # a file that failed after encoding (fingerprint) leaves dead rows behind

    def _report(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.error is None:
                setattr(self.summary, job.kind, getattr(self.summary, job.kind) + 1)
                self.summary.rows += len(job.windows)
            job.windows = []
            self.done += 1
            if self.progress is not None:
                elapsed = time.monotonic() - self.t0
                self.progress(self.done, self.total, job.entry.display, self.done / elapsed if elapsed else 0.0)


def fingerprint(job: _Job, full_hash: bool) -> str | None:
    """The file's content hash for the catalog; a file that cannot be read fails (transient)."""
    try:
        return fast_hash(job.entry.path, job.entry.size, full=full_hash)
    except OSError as exc:
        job.fail(f"cannot read it to fingerprint it ({exc.strerror})", TRANSIENT)
        return None


class _Sink:
    """Encodes decoded windows as they come (frames are dropped once encoded) and hands whole files in batches
    to the committer (``committer=None``: keeps the batches in :attr:`batches`, for an executor elsewhere)."""

    def __init__(self, committer: Committer | None, model, dtype: str, batch_size: int, full_hash: bool,
                 shard_prefix: Path | None = None) -> None:
        self.committer, self.model, self.dtype = committer, model, dtype
        self.batch_size, self.full_hash = batch_size, full_hash
        self.shard_prefix = shard_prefix  # an executor's shards go to <shard_prefix>-0000, -0001, ...
        self.batches: list[tuple[list[_Job], list, Path | None, int, dict | None]] = []
        self.frames: list[np.ndarray] = []  # decoded, not yet encoded
        self.masks: list[np.ndarray] = []
        self.stores: list[VideoStore] = []  # encoded, not yet committed
        self.jobs: list[_Job] = []  # files of the batch, in row order
        self.rows = 0

    def add(self, job: _Job) -> None:
        if job.error is None and not job.windows:
            job.fail("no frames to sample", PERMANENT)
        if job.error is None:
            job.stored = len(job.windows)
            for _, video in job.windows:
                self.frames.append(video.frames)
                self.masks.append(video.mask)
                self.rows += 1
                if len(self.frames) >= self.batch_size:
                    self._encode()
        self.jobs.append(job)
        if self.rows >= self.batch_size or len(self.jobs) >= self.batch_size:
            self.flush()

    def _encode(self) -> None:
        if self.frames:
            side = self.model.encode_frames(np.stack(self.frames), np.stack(self.masks), batch_size=self.batch_size)
            self.stores.append(VideoStore.from_sides(side, self.dtype))
            self.frames, self.masks = [], []

    def flush(self) -> None:
        """Write the batch's shard and commit it with its files' catalog entries (one transaction); for an
        executor, write it to a new folder ``<shard_prefix>-NNNN`` (synced, with its files' record) instead."""
        if not self.jobs:
            return
        self._encode()
        hashes = [fingerprint(job, self.full_hash) for job in self.jobs]
        if self.committer is None:
            tmp = files = None
            if self.stores:
                tmp = Path(f"{self.shard_prefix}-{len(self.batches):04d}")
                files = write_synced(VideoStore.concat(self.stores), tmp)
            for job in self.jobs:  # the frames are encoded: keep what the catalog needs
                job.windows = [(w, FrameInfo(v.duration, v.fps, v.n_frames, [int(f) for f in v.indices]))
                               for w, v in job.windows]
            self.batches.append((self.jobs, hashes, tmp, self.rows, files))
        else:
            shard_id, files = (self.committer.writer.write_shard(VideoStore.concat(self.stores)) if self.stores
                               else (None, None))
            self.committer.commit(self.jobs, hashes, shard_id, self.rows, files)
        self.jobs, self.stores, self.rows = [], [], 0


def write_synced(store: VideoStore, folder: Path) -> dict:
    """Write ``store`` as a shard folder, fsync it, and return its files' record (sizes and sha256)."""
    from hbi_runtime.index.catalog import fsync_tree

    store.save(folder)
    fsync_tree(folder)
    return shard_checks.record_files(folder)


def encode_batches(model, pool, jobs: list[_Job], shard_prefix: Path, *, dtype: str, batch_size: int,
                   full_hash: bool, window: float | None, stride: float | None, timeout_s: float) -> list:
    """Decode (with the open decoder ``pool``) and encode ``jobs`` as :func:`update_index` does, writing each
    batch's shard to ``<shard_prefix>-NNNN`` instead of committing it: what an executor's worker runs. Returns the
    batches as ``(jobs, hashes, shard folder or None, rows, files record or None)``, for
    :meth:`Committer.adopt`."""
    sink = _Sink(None, model, dtype, batch_size, full_hash, shard_prefix)
    stream = (_decode_windows(model, jobs, window, stride, 1, timeout_s, pool=pool) if window is not None
              else _decode_whole(model, jobs, 1, timeout_s, pool=pool))
    for job in stream:
        sink.add(job)
    sink.flush()
    return sink.batches
