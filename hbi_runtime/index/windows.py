"""Long videos as windows: each window of ``window`` seconds (every ``stride`` seconds) is sampled as its own video.

The sampling rule inside a window is the official one (:func:`hbi_runtime.video.sample_indices`: every
round(fps / frame_rate)-th frame from the window's first frame, then uniform down to T), applied to the frames
whose time ``i / fps`` lies in ``[start, end)``. A video no longer than one window is one window ``[0, n / fps)``
sampled exactly as :func:`hbi_runtime.video.decode_video` samples the whole file, so its side is the same.

Window plan (:func:`plan_windows`): starts at ``0, stride, 2 * stride, ...``; the last window is the first one
that reaches the end of the video (it may be shorter than ``window``), so no window lies wholly inside the one
before it. A window that holds no frame (a video of under one frame per window: a slide show) is left out.

Limits (:func:`check_window`, :data:`MAX_WINDOWS_PER_VIDEO`): ``window`` and ``stride`` are at least
:data:`MIN_WINDOW_S` / :data:`MIN_STRIDE_S` (1 s: the official sampling takes one frame per second, so a shorter
window is one still frame, not a clip, and windows started less than a second apart sample nearly the same
frames); a video whose plan has more than :data:`MAX_WINDOWS_PER_VIDEO` windows is one per-file
:class:`~hbi_runtime.video.TooManyWindowsError`, its other files indexed.

Decoding runs in the worker processes of :class:`hbi_runtime.video.VideoDecoder` (timeouts, crash and memory
isolation): :class:`WindowDecoder` is that pool with a worker that understands :class:`WindowTask` (probe a file:
its frame count, fps and window plan; or decode a group of its windows). This reuses private helpers of
``hbi_runtime.video`` (``decode._read_crops``, ``decode._pad``, ``pool._Worker``); a public windowed entry point
there (``decode_video(..., window=(start_s, end_s))`` and window tasks in ``decode_many``) would replace them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from hbi_runtime.errors import UsageError
from hbi_runtime.video import pool as video_pool
from hbi_runtime.video.decode import (DecodedVideo, _check_file, _pad, _read_crops, check_preprocessing,
                                      decoder_chain)
from hbi_runtime.video.errors import TooManyWindowsError, VideoDecodeError
from hbi_runtime.video.preprocess import normalize
from hbi_runtime.video.readers import ReaderError, open_reader
from hbi_runtime.video.sampling import resolve_fps, sample_indices

WINDOWS_PER_TASK = 8  # windows decoded per worker task: each task reopens the file (decord and PyAV index it)
# Seconds. The official sampling takes one frame per second (preprocessing.frame_rate = 1): a window under 1 s
# holds one sampled frame (a still, not a clip) and, for a video of >= 1 fps, a window of >= 1 s always holds a
# frame; windows started under 1 s apart sample nearly the same frames (6,000 windows for a 6 s clip at 0.001 s).
MIN_WINDOW_S = 1.0
MIN_STRIDE_S = 1.0
# Windows of one video. Each window is a whole encoder input (up to T = 12 decoded frames) and a stored side
# (int8, about 6 KB per level at T = 12, D = 512): 10,000 windows are ~120,000 decoded and encoded frames and
# ~0.2 GB of index for one file, i.e. a 2.8 h video at the 1 s floors or a 28 h one at 10 s windows. Beyond that
# the window settings are wrong for the file, not the file too long: it fails with a hint to raise the stride.
MAX_WINDOWS_PER_VIDEO = 10_000
_EPS = 1e-6  # frame times are compared after rounding to this many seconds x fps (30 s x 30 fps is 900, not 900.0001)


@dataclass(frozen=True)
class Window:
    """One window of a video: seconds ``[start_s, end_s)`` and frames ``[first, stop)``."""

    start_s: float
    end_s: float
    first: int
    stop: int


def plan_windows(n_frames: int, fps: float, window: float, stride: float | None = None) -> list[Window]:
    """The windows of a video of ``n_frames`` frames at ``fps`` (see the module docstring).

    Raises:
        UsageError: ``window`` or ``stride`` is not a number of seconds at least the floors (:func:`check_window`),
            or the plan has more than :data:`MAX_WINDOWS_PER_VIDEO` windows (:class:`WindowPlanError`).
    """
    stride = window if stride is None else stride
    check_window(window, stride)
    duration = n_frames / fps
    limit = MAX_WINDOWS_PER_VIDEO
    out: list[Window] = []
    k = 0
    while True:
        start = k * stride
        first = math.ceil(round(start * fps, 6) - _EPS)
        if first >= n_frames:
            break
        stop = min(n_frames, math.ceil(round((start + window) * fps, 6) - _EPS))
        if stop > first:  # under one frame per window (a slide show): a window may hold none
            if len(out) == limit:  # checked as the plan grows: an absurd plan is never built
                raise WindowPlanError(duration, window, stride, limit)
            out.append(Window(float(start), float(min(start + window, duration)), first, stop))
        if start + window >= duration - _EPS:
            break
        k += 1
    return out


class WindowPlanError(UsageError):
    """A window plan with more than ``limit`` windows; ``estimate`` is about how many it would have had."""

    def __init__(self, duration: float, window: float, stride: float, limit: int) -> None:
        self.estimate = max(1, math.ceil(max(duration - window, 0.0) / stride) + 1)
        self.reason = (f"a {duration:.1f} s video at window {window:g} s, stride {stride:g} s makes about "
                       f"{self.estimate} windows, more than {limit} (the most per video)")
        super().__init__(self.reason, hint=TooManyWindowsError.default_hint)


def check_window(window: float | None, stride: float | None) -> None:
    """Refuse a window / stride that is not a finite number of seconds at least :data:`MIN_WINDOW_S` /
    :data:`MIN_STRIDE_S` (stride without window too)."""
    if window is None:
        if stride is not None:
            raise UsageError("stride needs a window (give window= in seconds too)")
        return
    for name, value, floor in (("window", window, MIN_WINDOW_S), ("stride", stride, MIN_STRIDE_S)):
        if value is None and name == "stride":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{name} must be a positive number of seconds, got {value!r}",
                             hint=f"give the {name} in seconds, {floor:g} or more")
        if value < floor:
            raise UsageError(f"{name} must be at least {floor:g} s, got {value!r}",
                             hint=f"the model samples one frame per second: a {name} under {floor:g} s gives "
                                  f"windows of one still frame or thousands of near-identical windows; use "
                                  f"{floor:g} s or more")


def window_indices(win: Window, fps: float, preprocessing) -> np.ndarray:
    """The frame numbers sampled from one window: the official rule on the window's frames, shifted to it."""
    local = sample_indices(win.stop - win.first, fps, preprocessing.max_frames, preprocessing.frame_rate)
    return local + win.first


# ---------------------------------------------------------------------------------------------------------------
# worker side


@dataclass(frozen=True)
class WindowTask:
    """A file and what to do with it in a worker; a PathLike, so every pool error names the file.

    ``op``: ``"probe"`` (returns a :class:`Probe`) or ``"decode"`` (returns ``list[DecodedWindow]`` for the
    windows ``plan[first:first + count]``).
    """

    path: bytes
    window: float
    stride: float
    op: str = "probe"
    first: int = 0
    count: int = 0

    def __fspath__(self) -> bytes:
        return self.path


@dataclass(frozen=True)
class Probe:
    n_frames: int
    fps: float
    duration: float | None
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class DecodedWindow:
    window: Window
    video: DecodedVideo  # indices are frame numbers of the whole file; fps / n_frames / duration of the file


def run_task(task: WindowTask, preprocessing, *, decoder: str = "auto", threads: int = 1,
             timeout: float | None = None, memory_limit_mb: float | None = None) -> Probe | list[DecodedWindow]:
    """Do ``task`` in this process, trying the decoders of ``decoder`` in turn (as :func:`decode_video` does).

    Raises:
        VideoDecodeError: no decoder can do it; the message names the file and each decoder's reason.
    """
    check_preprocessing(preprocessing)
    path = task.path
    _check_file(path)
    deadline = time.monotonic() + timeout if timeout else None
    failures = []
    for name in decoder_chain(decoder):
        try:
            with open_reader(name, path, threads=threads, deadline=deadline) as reader:
                return _run_with(reader, task, preprocessing, memory_limit_mb, deadline)
        except ReaderError as exc:  # (ShortReadError included) this decoder cannot; the next one may
            failures.append(f"{name}: {exc.reason}")
    raise VideoDecodeError(path, "cannot decode it (" + "; ".join(failures) + ")")


def _run_with(reader, task: WindowTask, preprocessing, memory_limit_mb, deadline) -> Probe | list[DecodedWindow]:
    info = reader.info
    if info.n_frames < 1:
        raise ReaderError("the video stream has no frames")
    fps, _ = resolve_fps(info.avg_fps, info.n_frames, info.duration)
    try:
        plan = plan_windows(info.n_frames, fps, task.window, task.stride)
    except WindowPlanError as exc:  # about this file and these settings: a per-file error, the others go on
        raise TooManyWindowsError(task.path, exc.reason) from None
    if task.op == "probe":
        return Probe(info.n_frames, fps, info.duration, tuple(plan))
    out = []
    for win in plan[task.first:task.first + task.count]:
        indices = window_indices(win, fps, preprocessing)
        crops = _read_crops(reader, indices, preprocessing, task.path, memory_limit_mb, deadline)
        frames, mask = _pad(normalize(np.stack(crops), preprocessing.mean, preprocessing.std),
                            preprocessing.max_frames)
        video = DecodedVideo(frames=frames, mask=mask, indices=indices, fps=fps, n_frames=info.n_frames,
                             duration=info.duration, decoder_used=reader.name, warnings=tuple(reader.warnings))
        out.append(DecodedWindow(win, video))
    return out


class _WindowWorker(video_pool._Worker):
    """A pool worker (same protocol, stderr handling and limits) whose task is :func:`run_task`."""

    def __init__(self, ctx, args: tuple) -> None:
        super().__init__(ctx, args, run=run_task, name="hbi-window-decoder")


class WindowDecoder(video_pool.VideoDecoder):
    """A :class:`~hbi_runtime.video.VideoDecoder` whose ``decode_many`` takes :class:`WindowTask` items and yields
    ``(task, Probe | list[DecodedWindow] | VideoDecodeError)`` in order. Same arguments; ``timeout_s`` is per
    task (a probe, or up to :data:`WINDOWS_PER_TASK` windows)."""

    worker_class = _WindowWorker


__all__ = ["DecodedWindow", "MAX_WINDOWS_PER_VIDEO", "MIN_STRIDE_S", "MIN_WINDOW_S", "Probe", "WINDOWS_PER_TASK",
           "Window", "WindowDecoder", "WindowPlanError", "WindowTask", "check_window", "plan_windows", "run_task",
           "window_indices"]
