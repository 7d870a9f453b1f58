"""What the server keeps hot: the index it serves (one committed state at a time, reloaded when an index run
commits) and the background index update job (one writer at a time).

Consistency: a :class:`Served` is one published state of the index (its rows, its memory-mapped store, the token
of :func:`hbi_runtime.index.published_state` it was opened at). A batch of requests takes one ``Served`` and
answers every request of the batch from it; a reload builds a new ``Served`` and swaps one reference, so no answer
mixes two states. A ``Served`` that a batch still uses stays alive (and its maps open) until the batch ends.

Damage: the watcher also looks at the size and modification time of every shard file the served state maps. Shard
files are immutable once written, so a change there means someone changed bytes under the server: the index is
opened again with every byte hashed (``verify=True``), and while it does not pass, requests that need it get
:class:`~hbi_runtime.index.DamagedIndexError` (503) with the repair command, never answers from damaged bytes.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hbi_runtime.errors import HbiError, UsageError
from hbi_runtime.index import DamagedIndexError, Index, index_status, published_state
from hbi_runtime.index.catalog import shard_dir


@dataclass(frozen=True)
class Served:
    """One committed state of the index, opened and checked."""

    index: Index
    store: Any  # hbi_runtime.scoring.VideoStore, row i = index.rows[i]
    token: tuple
    files: tuple  # ((path, size, mtime_ns), ...) of the shard files this state maps
    by_video: dict  # catalog video id -> its first row
    loaded_at: float

    @property
    def videos(self) -> int:
        return len(self.by_video)

    def row_of(self, video_id: int):
        row = self.by_video.get(video_id)
        return None if row is None else self.index.rows[row]


def _shard_files(index: Index) -> tuple:
    out = []
    for shard in index.shards:
        folder = shard_dir(index.dir, shard.shard_id)
        for f in sorted(folder.iterdir()):
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _files_changed(files: tuple) -> bool:
    for path, size, mtime in files:
        try:
            st = os.stat(path)
        except OSError:
            return True  # a compaction deletes shards only after publishing a state without them: the token moves too
        if st.st_size != size or st.st_mtime_ns != mtime:
            return True
    return False


class IndexHolder:
    """The served index: :meth:`current` for requests, :meth:`check` from the watcher thread (and after a job).

    Args:
        index_dir: the index folder. model_sha256: the served package's hash (an index of another package is
            refused, as ``retrieve`` does). interval_s: how often the watcher looks for a new committed state.
        on_load: called with each new :class:`Served` (metrics).
    """

    def __init__(self, index_dir: Path, model_sha256: str, *, interval_s: float = 2.0,
                 on_load: Callable[[Served], None] | None = None) -> None:
        self.dir, self.model_sha256, self.interval_s = Path(index_dir), model_sha256, interval_s
        self.on_load = on_load
        self._served: Served | None = None
        self._error: HbiError | None = None
        self._lock = threading.Lock()  # one reload at a time
        self._stop = threading.Event()
        self.reloads = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ requests
    def current(self) -> Served:
        """The state to answer from. Raises the index's error (DamagedIndexError, MismatchError, ...) while it
        cannot be served."""
        served, error = self._served, self._error
        if error is not None or served is None:
            raise error or DamagedIndexError(f"index {self.dir} is not loaded yet", hint="retry in a moment")
        return served

    @property
    def ready(self) -> bool:
        return self._served is not None and self._error is None

    @property
    def error(self) -> HbiError | None:
        return self._error

    def report_damage(self, exc: DamagedIndexError, served: Served) -> None:
        """A query found impossible scores in ``served``: stop serving it until a check passes."""
        with self._lock:
            if self._served is served:
                self._error = exc

    # ------------------------------------------------------------------ loading
    def load(self, *, verify: bool = False) -> Served:
        """Open the published state now (first load, or a forced reload). Raises what Index.open raises."""
        with self._lock:
            return self._load(verify)

    def _load(self, verify: bool) -> Served:
        try:
            token = published_state(self.dir)
            index = Index.open(self.dir, self.model_sha256, verify=verify)
            store = index.video_store() if len(index.rows) else None
            by_video: dict[int, int] = {}
            for row in index.rows:
                by_video.setdefault(row.video_id, row.row)
            served = Served(index, store, token, _shard_files(index), by_video, time.time())
        except HbiError as exc:
            self._error = exc
            raise
        self._served, self._error = served, None
        self.reloads += 1
        if self.on_load is not None:
            self.on_load(served)
        return served

    def check(self, *, force: bool = False) -> bool:
        """Reload when a run committed (or ``force``), or re-verify when shard bytes changed. Returns whether a
        new state is served. Errors are kept (requests see them), never raised."""
        with self._lock:
            served = self._served
            try:
                token = published_state(self.dir)
            except HbiError as exc:
                self._error = exc
                return False
            changed_bytes = served is not None and _files_changed(served.files)
            stale = served is None or token != served.token
            if not (force or stale or changed_bytes or self._error is not None):
                return False
            try:
                self._load(verify=changed_bytes or isinstance(self._error, DamagedIndexError))
            except HbiError:
                return False
            return True

    def start_watching(self) -> None:
        def watch() -> None:
            while not self._stop.wait(self.interval_s):
                self.check()

        self._thread = threading.Thread(target=watch, name="hbi-serve-index-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def status(self, *, verify: bool = False) -> dict:
        """The ``hbi.index-status/1`` document of ``hbi-run index --status``."""
        return {"schema": "hbi.index-status/1", **index_status(self.dir, verify=verify)}


# ---------------------------------------------------------------------------------------------- index jobs
@dataclass
class Job:
    id: str
    state: str = "queued"  # queued, running, done, failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    total: int | None = None
    current: str | None = None
    rate: float = 0.0
    summary: dict | None = None
    error: dict | None = None

    def to_dict(self) -> dict:
        eta = None
        if self.state == "running" and self.total and self.rate > 0:
            eta = round(max(0, self.total - self.done) / self.rate, 1)
        return {"schema": "hbi.index-job/1", "id": self.id, "state": self.state, "created": self.created,
                "started": self.started, "finished": self.finished, "done": self.done, "total": self.total,
                "current": self.current, "files_per_second": round(self.rate, 3), "eta_s": eta,
                "summary": self.summary, "error": self.error}


class IndexJobs:
    """Incremental ``index`` runs of the served folder, one at a time, in a background thread.

    Args:
        run: ``run(progress) -> summary dict`` (``hbi.index/1``): one index run, calling
            ``progress(done, total, path, rate)``.
        after: called when a run ends (the holder's forced reload).
        keep: finished jobs remembered for polling.
    """

    def __init__(self, run: Callable[[Callable], dict], after: Callable[[], Any], *, keep: int = 32) -> None:
        self._run, self._after, self._keep = run, after, keep
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._active: Job | None = None

    def start(self) -> Job:
        """Start a run. Raises UsageError (409) while one is running."""
        with self._lock:
            if self._active is not None:
                err = UsageError(f"index job {self._active.id} is still running: one writer at a time",
                                 hint=f"poll GET /v1/index/jobs/{self._active.id} and start another when it ends")
                err.status = 409
                err.job = self._active.id
                raise err
            job = Job(f"{int(time.time())}-{next(self._ids)}")
            self._jobs[job.id] = job
            self._active = job
            finished = [j for j in self._jobs.values() if j.state in ("done", "failed")]
            while len(self._jobs) > self._keep and finished:
                del self._jobs[finished.pop(0).id]
        threading.Thread(target=self._work, args=(job,), name=f"hbi-serve-index-job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @property
    def active(self) -> Job | None:
        return self._active

    def _work(self, job: Job) -> None:
        job.state, job.started = "running", time.time()

        def progress(done: int, total: int, path, rate: float) -> None:
            job.done, job.total, job.current, job.rate = done, total, path, rate

        state, summary, error = "failed", None, None
        try:
            summary, state = self._run(progress), "done"
        except HbiError as exc:
            error = exc.to_json()
        except Exception as exc:  # noqa: BLE001 - a job must end with a state, whatever happened
            error = {"type": "InternalError", "message": f"the index run failed: {type(exc).__name__}: {exc}",
                     "hint": "see the server log; run `hbi-run index` by hand to see the error"}
        finally:
            try:
                self._after()  # the new state is served before the job says it is done
            finally:
                job.summary, job.error, job.current, job.finished = summary, error, None, time.time()
                job.state = state
                with self._lock:
                    self._active = None
