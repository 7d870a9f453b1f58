"""VideoDecoder: decode files in worker processes, with a per-file timeout and memory cap, in order.

A bad file must never hang, crash or exhaust the caller: each file is decoded by :func:`decode_video` in a
worker process (``spawn`` by default: no inherited threads or locks). The pool is reused across files; a worker
that hangs past the timeout, dies (a native crash), or grows past the memory limit is killed and replaced, and
that file gets a :class:`VideoDecodeError` subclass naming it. Up to ``workers`` files decode at once, and
:meth:`VideoDecoder.decode_many` yields results in input order while later files keep decoding, so decoding
overlaps whatever the caller does with each result (inference).

Timeouts: the worker gets ``timeout_s`` as a soft limit (checked between packets and frames; the worker lives
on); the parent kills it at ``timeout_s + grace``, for a decoder stuck in native code. With ``decoder="auto"``
a file whose worker was killed that way is tried once more with PyAV alone (decord hangs on files that
over-report their frame count: decord #373), so such a file can take up to twice the timeout.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Iterable, Iterator

from hbi_runtime.errors import HbiError, UsageError
from hbi_runtime.video.decode import (DEFAULT_MEMORY_LIMIT_MB, DecodedVideo, check_preprocessing, decode_video,
                                      decoder_chain)
from hbi_runtime.video.errors import DecodeTimeoutError, DecoderCrashedError, VideoDecodeError, VideoTooLargeError

POLL_S = 0.1  # how often the parent checks deadlines and worker memory while waiting
STARTUP_TIMEOUT_S = 120.0  # a worker that has not imported its decoders by then is an environment problem
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM} if hasattr(signal, "pthread_sigmask") else set()


def _worker_main(conn, preprocessing, threads: int, memory_limit_mb: float | None, run=decode_video) -> None:
    """Worker loop: receive (task_id, item, decoder, timeout), send back ("ok" | "error" | "bug", task_id, x).

    ``run(item, preprocessing, decoder=, threads=, timeout=, memory_limit_mb=)`` does one task: a file for
    :func:`decode_video`, a group of windows for the index (``hbi_runtime.index.windows.run_task``)."""
    _silence_native_logs()
    # Ctrl+C reaches the whole process group and a service manager's SIGTERM the whole control group: the parent
    # decides what stops (it finishes or abandons the work, then closes the pool; a worker whose parent died
    # reads EOF and ends), so one keystroke never kills a decode the parent still waits for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _STOP_SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the parent while we started
    conn.send(("ready", os.getpid(), None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent went away
            return
        if task is None:
            return
        task_id, item, decoder, timeout = task
        try:
            reply = ("ok", task_id, run(item, preprocessing, decoder=decoder, threads=threads, timeout=timeout,
                                        memory_limit_mb=memory_limit_mb))
        except VideoDecodeError as exc:
            reply = ("error", task_id, exc)
        except HbiError as exc:  # not about this file (configuration, missing decoder): re-raised in the parent
            reply = ("fatal", task_id, (type(exc).__name__, exc.message, exc.hint))
        except MemoryError:
            reply = ("error", task_id, VideoTooLargeError(getattr(item, "path", item),
                                                          "the decoder ran out of memory"))
        except Exception:  # a bug: reported with its traceback and re-raised in the parent, never hidden
            reply = ("bug", task_id, traceback.format_exc())
        conn.send(reply)


def _silence_native_logs() -> None:
    """decord and FFmpeg print their own messages on file descriptor 2 for every bad file; each failure already
    reaches the caller as a typed error with its reason, so the worker's native stderr goes to /dev/null (set
    HBI_VIDEO_WORKER_STDERR=1 to keep it when debugging a decoder)."""
    if os.environ.get("HBI_VIDEO_WORKER_STDERR") == "1":
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc); None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Task:
    task_id: int
    path: object
    decoder: str
    hard_deadline: float = 0.0


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self, ctx, args: tuple, run=decode_video, name: str = "hbi-video-decoder") -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, *args, run), daemon=True, name=name)
        # Started with SIGINT / SIGTERM blocked (the mask is inherited): a Ctrl+C or a service stop that reaches
        # the process group while the worker still starts cannot kill it before it ignores them (_worker_main).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _STOP_SIGNALS else None
        try:
            self.proc.start()
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.baseline_rss = 0
        self.task: _Task | None = None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VideoDecoder:
    """A reusable pool of decoding workers. Use as a context manager.

    Args:
        preprocessing: the model package's :class:`hbi_runtime.package.Preprocessing`.
        workers: processes decoding at once.
        timeout_s: per-file limit (see the module docstring).
        memory_limit_mb: per-file decode budget: files whose estimate is over it are refused before decoding,
            and a worker whose resident memory grows past its idle size plus this much is killed.
        decoder: ``auto`` (decord, PyAV as fallback), ``decord`` or ``pyav``.
        threads: decoder threads inside each worker.
        start_method: ``spawn`` (default) or ``forkserver``; the caller's main module must be import-safe
            (``if __name__ == "__main__":``), as for any spawned process.
        max_pending: files decoded ahead of the one the caller is waiting for (default ``2 * workers``): bounds
            the memory of results waiting to be consumed.
    """

    worker_class = _Worker  # a subclass with another task function (windows) sets its own

    def __init__(self, preprocessing, *, workers: int = 2, timeout_s: float = 120.0,
                 memory_limit_mb: float | None = DEFAULT_MEMORY_LIMIT_MB, decoder: str = "auto", threads: int = 1,
                 start_method: str = "spawn", max_pending: int | None = None) -> None:
        check_preprocessing(preprocessing)
        decoder_chain(decoder)  # fails now, in the caller, when no decoder is installed
        if workers < 1 or timeout_s <= 0:
            raise UsageError(f"VideoDecoder needs workers >= 1 and timeout_s > 0, got {workers} and {timeout_s}")
        self.decoder = decoder
        self.timeout_s = float(timeout_s)
        self.grace_s = 1.0 + 0.1 * self.timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.max_pending = max_pending or 2 * workers
        self._n_workers = workers
        self._ctx = mp.get_context(start_method)
        self._args = (preprocessing, threads, memory_limit_mb)
        self._workers: list[_Worker] = []
        self._next_id = 0
        self.restarts = 0  # workers killed and replaced (timeouts, crashes, memory)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> VideoDecoder:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        while len(self._workers) < self._n_workers:
            self._workers.append(self.worker_class(self._ctx, self._args))

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:  # already gone
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            w.kill()
        self._workers = []

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # -- public API -----------------------------------------------------------------------------------------

    def decode(self, path, *, decoder: str | None = None) -> DecodedVideo:
        """Decode one file in a worker. Raises its :class:`VideoDecodeError` (subclass) when it cannot."""
        ((_, result),) = list(self.decode_many([path], decoder=decoder))
        if isinstance(result, VideoDecodeError):
            raise result
        return result

    def decode_many(self, paths: Iterable, *, decoder: str | None = None
                    ) -> Iterator[tuple[object, DecodedVideo | VideoDecodeError]]:
        """Decode files across the workers; yield ``(path, DecodedVideo or VideoDecodeError)`` in input order.

        ``decoder`` overrides the pool's for these files. Errors about a file are yielded, never raised; a
        configuration problem (:class:`HbiError` from a worker) or a bug in the worker raises.
        """
        decoder = decoder or self.decoder
        decoder_chain(decoder)
        self._start()
        try:
            yield from self._run(iter(paths), decoder)
        finally:  # the caller stopped early or an error was raised: drop the work still in flight
            for w in list(self._workers):
                if w.task is not None:
                    self._replace(w, None, None)

    def _run(self, source: Iterator, decoder: str) -> Iterator[tuple[object, DecodedVideo | VideoDecodeError]]:
        retry: collections.deque[_Task] = collections.deque()
        done: dict[int, tuple[object, DecodedVideo | VideoDecodeError]] = {}
        next_out = self._next_id
        exhausted = False
        while True:
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            busy = sum(w.task is not None for w in self._workers)
            for w in self._workers:
                if w.task is not None or not w.ready:
                    continue
                task = retry.popleft() if retry else None  # retried files go first and are never held back
                if task is None and not exhausted and busy + len(done) < self.max_pending:
                    try:
                        task = _Task(self._next_id, next(source), decoder)
                        self._next_id += 1
                    except StopIteration:
                        exhausted = True
                if task is None:
                    break
                self._assign(w, task)
                busy += 1
            if exhausted and not retry and next_out == self._next_id:
                return
            self._wait(done, retry)

    # -- scheduling -----------------------------------------------------------------------------------------

    def _assign(self, worker: _Worker, task: _Task) -> None:
        task.hard_deadline = time.monotonic() + self.timeout_s + self.grace_s
        worker.task = task
        try:
            worker.conn.send((task.task_id, task.path, task.decoder, self.timeout_s))
        except OSError:  # died while idle: the wait loop sees its sentinel and treats it as a crash
            pass

    def _wait(self, done: dict, retry: collections.deque) -> None:
        """Wait for a message, a death, a deadline or a memory check; handle what happened."""
        watched = [w for w in self._workers if w.task is not None or not w.ready]
        now = time.monotonic()
        timeout = min([POLL_S] + [w.task.hard_deadline - now for w in watched if w.task is not None])
        ready = mp.connection.wait([w.conn for w in watched] + [w.proc.sentinel for w in watched],
                                   timeout=max(timeout, 0.0))
        for w in watched:
            if w.conn in ready or w.proc.sentinel in ready:
                self._receive(w, done, retry)
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now > w.task.hard_deadline:
                self._on_timeout(w, done, retry)
            elif w.task is not None and self._over_memory(w):
                self._replace(w, done, VideoTooLargeError(
                    w.task.path, f"the decoder went over the {self.memory_limit_mb:g} MiB memory limit; "
                                 "the worker was killed"))
            elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                raise RuntimeError(f"a video decoding worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _receive(self, w: _Worker, done: dict, retry: collections.deque) -> None:
        try:
            kind, task_id, payload = w.conn.recv() if w.conn.poll() else (None, None, None)
        except (EOFError, OSError):
            kind = task_id = payload = None
        if kind is None:  # nothing to read and the process is gone: it died
            w.proc.join(timeout=5)
            if not w.ready:
                raise RuntimeError(f"a video decoding worker exited while starting (exit code {w.proc.exitcode})")
            if w.task is None:  # died while idle: just replace it
                self._replace(w, None, None)
                return
            self._replace(w, done, DecoderCrashedError(
                w.task.path, f"the decoder process died (exit code {w.proc.exitcode}); it was replaced"))
        elif kind == "ready":
            w.ready = True
            w.baseline_rss = _rss_bytes(w.proc.pid) or 0
        elif kind in ("ok", "error"):
            done[task_id] = (w.task.path, payload)
            w.task = None
        elif kind == "fatal":
            w.task = None
            name, message, hint = payload
            raise _fatal(name, message, hint)
        else:  # "bug"
            path = w.task.path
            w.task = None
            raise RuntimeError(f"internal error in the video decoding worker while decoding {path!r}:\n{payload}")

    def _on_timeout(self, w: _Worker, done: dict, retry: collections.deque) -> None:
        task = w.task
        if task.decoder == "auto" and "pyav" in decoder_chain("auto") and "decord" in decoder_chain("auto"):
            self._replace(w, None, None)
            retry.append(_Task(task.task_id, task.path, "pyav"))
            return
        self._replace(w, done, DecodeTimeoutError(
            task.path, f"no result within {self.timeout_s + self.grace_s:.0f} s; the decoder was killed"))

    def _over_memory(self, w: _Worker) -> bool:
        if self.memory_limit_mb is None:
            return False
        rss = _rss_bytes(w.proc.pid)
        return rss is not None and rss - w.baseline_rss > self.memory_limit_mb * 2**20

    def _replace(self, w: _Worker, done: dict | None, error: VideoDecodeError | None) -> None:
        """Kill a worker, record its file's error (unless retried), and start a fresh worker in its place."""
        if error is not None:
            done[w.task.task_id] = (w.task.path, error)
        w.task = None
        w.kill()
        self.restarts += 1
        self._workers[self._workers.index(w)] = self.worker_class(self._ctx, self._args)


def _fatal(name: str, message: str, hint: str | None) -> HbiError:
    """Rebuild an error that is not about one file (configuration, missing dependency) from a worker."""
    from hbi_runtime import errors

    cls = getattr(errors, name, HbiError)
    return cls(message, hint=hint)
