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
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from hbi_runtime.errors import MismatchError, UsageError
from hbi_runtime.index.catalog import SCHEMA_VERSION, Writer, check_model, now_iso
from hbi_runtime.index.scan import DEFAULT_EXTENSIONS, ScanEntry, display_path, fast_hash, scan
from hbi_runtime.index.windows import WINDOWS_PER_TASK, Window, WindowDecoder, WindowTask, check_window
from hbi_runtime.scoring import DEFAULT_DTYPE, STORAGE_DTYPES, VideoStore

BATCH = 16  # files (or windows) per committed shard, and per video-encoder call
PROBE_CHUNK = 64  # windowed runs probe this many files ahead of decoding their windows
MAX_SHARDS = 16  # more shards than this after a run: merge them all into one (compact)
DEAD_FRACTION = 0.25  # more dead rows than this fraction: compact

Progress = Callable[[int, int, "str | None", float], None]  # (done, total, current file, files per second)


@dataclass
class IndexSummary:
    """What :func:`update_index` did. Counts are files; ``failed`` / ``skipped`` are ``(path, reason)``.

    ``failed`` lists the files that failed in this run; a file that failed before and has not changed since is
    not decoded again (``retry_failed=True`` does) and counts as ``unchanged``: :meth:`Index.failed` lists them all.
    """

    index_dir: Path
    new: int = 0
    unchanged: int = 0
    reindexed: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # found by the scan but not taken (links, ...)
    rows: int = 0  # stored sides (windows) written by this run
    seconds: float = 0.0


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
    """The meta rows of a new index (also what an existing one must agree with)."""
    m = model.manifest
    return {"schema_version": SCHEMA_VERSION, "model_sha256": _model_sha(model),
            "model_name": os.path.basename(str(model.package.dir).rstrip("/")),
            "model_source": m.source, "model_config": m.model_config, "max_frames": m.max_frames,
            "tokens_per_level": m.tokens_per_level["video"], "embed_dim": m.embed_dim,
            "storage_dtype": dtype, "window": None if window is None else {"window": window, "stride": stride},
            "video_dir": display_path(os.path.abspath(os.fsencode(video_dir))), "created": now_iso()}


@dataclass
class _Job:
    entry: ScanEntry
    kind: str  # "new" | "reindexed"
    windows: list = field(default_factory=list)  # (Window, DecodedVideo) in order
    error: str | None = None
    stored: int = 0  # rows of this file in the batch's shard (dead when the file fails after encoding)


def update_index(model, video_dir: str | bytes | os.PathLike, index_dir: str | os.PathLike | None = None, *,
                 workers: int = 2, batch_size: int = BATCH, window: float | None = None,
                 stride: float | None = None, dtype: str = DEFAULT_DTYPE,
                 extensions: Iterable[str] = DEFAULT_EXTENSIONS, follow_symlinks: bool = False,
                 timeout_s: float = 120.0, retry_failed: bool = False, full_hash: bool = False,
                 rebuild: bool = False, progress: Progress | None = None) -> IndexSummary:
    """Index the videos of ``video_dir`` (recursively) into ``index_dir``, re-encoding only what changed.

    Args:
        model: a loaded :class:`hbi_runtime.model.Model`.
        video_dir: the folder of videos (read only).
        index_dir: the index folder (default :func:`default_index_dir`).
        workers: decoding processes. batch_size: files (windows) per encoder call and per committed shard.
        window, stride: seconds; see the module docstring (default: one side per whole video).
        dtype: storage of the stored tokens, one of :data:`hbi_runtime.scoring.STORAGE_DTYPES`.
        extensions, follow_symlinks: see :func:`hbi_runtime.index.scan.scan`.
        timeout_s: per-file decoding limit (per probe / group of windows with ``window``).
        retry_failed: decode again files that failed before and did not change since.
        full_hash: fingerprint files by all their bytes instead of size + first / last MiB.
        rebuild: forget what the index holds (even from another model package) and index everything again.
        progress: called after each committed file as ``progress(done, total, path, files_per_second)``, and
            once with ``(0, total, None, 0.0)`` before the first.
    Returns:
        :class:`IndexSummary`.
    Raises:
        MismatchError: the index was built with another model package, storage dtype or window policy.
        BadInputError: ``video_dir`` is not a readable folder. UsageError: bad arguments, a non-index folder,
            or another process updating the same index.
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
    with Writer(index_dir) as writer:
        _prepare(writer, index_meta(model, video_dir, dtype=dtype, window=window, stride=stride), rebuild)
        jobs = _plan(writer, found.files, summary, retry_failed=retry_failed, full_hash=full_hash)
        first_new_shard = writer.next_shard_id()
        sink = _Sink(writer, model, dtype, batch_size, full_hash, summary, progress, len(jobs))
        if jobs:
            stream = (_decode_windows(model, jobs, window, stride, workers, timeout_s) if window is not None
                      else _decode_whole(model, jobs, workers, timeout_s))
            for job in stream:
                sink.add(job)
            sink.flush()
        _tidy(writer, first_new_shard)
    summary.seconds = time.monotonic() - t0
    return summary


def _prepare(writer: Writer, meta: dict, rebuild: bool) -> None:
    old = writer.meta
    if rebuild or not old:
        writer.reset(meta)
        return
    check_model(old, meta["model_sha256"], writer.dir)
    for key, what in (("storage_dtype", "storage dtype"), ("window", "window policy"),
                      ("max_frames", "frames per video")):
        if old.get(key) != meta[key]:
            raise MismatchError(f"index {writer.dir} was built with {what} {old.get(key)!r}; asked for "
                                f"{meta[key]!r}", hint="use the index's setting, a new --index folder, or --rebuild")
    writer.set_meta({"video_dir": meta["video_dir"]})  # the folder may have moved: files are keyed relative to it


def _plan(writer: Writer, files: list[ScanEntry], summary: IndexSummary, *, retry_failed: bool,
          full_hash: bool) -> list[_Job]:
    """Sort the scanned files into jobs (new / reindexed) and unchanged; drop catalogued files that are gone."""
    known = writer.videos()
    jobs = []
    for entry in files:
        old = known.pop(entry.rel, None)
        if old is None:
            jobs.append(_Job(entry, "new"))
            continue
        _, size, mtime_ns, content_hash, status = old
        same = size == entry.size and (mtime_ns == entry.mtime_ns or _same_content(entry, content_hash, writer,
                                                                                   full_hash))
        if same and not (retry_failed and status == "failed"):
            summary.unchanged += 1
        else:
            jobs.append(_Job(entry, "reindexed"))
    if known:
        writer.remove_videos(list(known))
        summary.removed = len(known)
    return jobs


def _same_content(entry: ScanEntry, content_hash: str | None, writer: Writer, full_hash: bool) -> bool:
    """Same size, new mtime: compare hashes; when equal, keep the entry and record the new mtime."""
    if not content_hash:
        return False
    try:
        same = fast_hash(entry.path, entry.size, full=content_hash.startswith("full:")) == content_hash
    except OSError:
        return False
    if same:
        writer.touch(entry.rel, entry.mtime_ns)
    return same


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


# ---------------------------------------------------------------------------------------------------------------
# decoding streams: yield each job once all its windows are decoded (or it failed), in job order


def _decode_whole(model, jobs: list[_Job], workers: int, timeout_s: float) -> Iterator[_Job]:
    from hbi_runtime.video import VideoDecodeError, VideoDecoder

    with VideoDecoder(model.manifest.preprocessing, workers=workers, timeout_s=timeout_s) as pool:
        for job, (_, result) in zip(jobs, pool.decode_many(job.entry.path for job in jobs)):
            if isinstance(result, VideoDecodeError):
                job.error = result.reason
            else:
                end = result.n_frames / result.fps
                job.windows.append((Window(0.0, end, 0, result.n_frames), result))
            yield job


def _decode_windows(model, jobs: list[_Job], window: float, stride: float, workers: int,
                    timeout_s: float) -> Iterator[_Job]:
    from hbi_runtime.video import VideoDecodeError

    with WindowDecoder(model.manifest.preprocessing, workers=workers, timeout_s=timeout_s) as pool:
        for start in range(0, len(jobs), PROBE_CHUNK):
            chunk = jobs[start:start + PROBE_CHUNK]
            tasks, owners = [], []
            probes = pool.decode_many(WindowTask(j.entry.path, window, stride) for j in chunk)
            for job, (_, probe) in zip(chunk, probes):
                if isinstance(probe, VideoDecodeError):
                    job.error = probe.reason
                    continue
                for first in range(0, len(probe.windows), WINDOWS_PER_TASK):
                    tasks.append(WindowTask(job.entry.path, window, stride, "decode", first, WINDOWS_PER_TASK))
                    owners.append(job)
            results = pool.decode_many(tasks)
            pending = {id(j): sum(o is j for o in owners) for j in chunk}
            queue = collections.deque(chunk)
            for job, (_, result) in zip(owners, results):
                if isinstance(result, VideoDecodeError):
                    job.error = job.error or result.reason
                elif job.error is None:
                    job.windows.extend((dw.window, dw.video) for dw in result)
                pending[id(job)] -= 1
                while queue and pending[id(queue[0])] == 0:  # in job order, as soon as complete
                    yield queue.popleft()
            yield from queue


# ---------------------------------------------------------------------------------------------------------------
# encoding and committing


class _Sink:
    """Encodes decoded windows as they come (frames are dropped once encoded) and commits whole files in batches."""

    def __init__(self, writer: Writer, model, dtype: str, batch_size: int, full_hash: bool, summary: IndexSummary,
                 progress: Progress | None, total: int) -> None:
        self.writer, self.model, self.dtype = writer, model, dtype
        self.batch_size, self.full_hash, self.summary = batch_size, full_hash, summary
        self.progress, self.total, self.done = progress, total, 0
        self.t0 = time.monotonic()
        self.frames: list[np.ndarray] = []  # decoded, not yet encoded
        self.masks: list[np.ndarray] = []
        self.stores: list[VideoStore] = []  # encoded, not yet committed
        self.jobs: list[_Job] = []  # files of the batch, in row order
        self.rows = 0
        if progress is not None:
            progress(0, total, None, 0.0)

    def add(self, job: _Job) -> None:
        if job.error is None and not job.windows:
            job.error = "no frames to sample"
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
        """Write the batch's shard and commit it with its files' catalog entries (one transaction)."""
        if not self.jobs:
            return
        self._encode()
        hashes = {id(job): self._hash(job) for job in self.jobs}
        shard_id = self.writer.write_shard(VideoStore.concat(self.stores)) if self.stores else None
        row = 0
        with self.writer.transaction():
            if shard_id is not None:
                self.writer.add_shard(shard_id, self.rows)
            for job in self.jobs:
                row = self._commit_job(job, hashes[id(job)], shard_id, row)
        self._report()
        self.jobs, self.stores, self.rows = [], [], 0

    def _hash(self, job: _Job) -> str | None:
        try:
            return fast_hash(job.entry.path, job.entry.size, full=self.full_hash)
        except OSError as exc:
            job.error = job.error or f"cannot read it to fingerprint it ({exc.strerror})"
            return None

    def _commit_job(self, job: _Job, content_hash: str | None, shard_id: int | None, row: int) -> int:
        e = job.entry
        video = job.windows[0][1] if job.windows else None
        vid = self.writer.put_video(
            e.rel, e.display, size=e.size, mtime_ns=e.mtime_ns, content_hash=content_hash,
            duration=video.duration if video else None, fps=video.fps if video else None,
            n_frames=video.n_frames if video else None, error=job.error)
        if job.error is None:
            self.writer.add_rows([(vid, shard_id, row + i, w.start_s, w.end_s, v.indices.tolist())
                                  for i, (w, v) in enumerate(job.windows)])
        return row + job.stored  # a file that failed after encoding (fingerprint) leaves dead rows behind

    def _report(self) -> None:
        for job in self.jobs:
            if job.error is not None:
                self.summary.failed.append((job.entry.display, job.error))
            else:
                setattr(self.summary, job.kind, getattr(self.summary, job.kind) + 1)
                self.summary.rows += len(job.windows)
            job.windows = []
            self.done += 1
            if self.progress is not None:
                elapsed = time.monotonic() - self.t0
                self.progress(self.done, self.total, job.entry.display, self.done / elapsed if elapsed else 0.0)
