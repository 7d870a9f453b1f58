"""The one frame-sampling rule: the official HBI decord loader's, as a pure function.

Official code (jpthu17/HBI, ``HBI/dataloaders/dataloader_retrieval.py``, ``_get_rawvideo_dec``, lines 205-218)::

    fps = vreader.get_avg_fps()                       # the stream's avg_frame_rate
    f_start = 0; f_end = min(1e9, len(vreader) - 1)   # whole clip, last frame included in the range
    t_stride = int(round(float(fps) / int(video_framerate)))
    all_pos = range(f_start, f_end + 1, t_stride)
    if len(all_pos) > max_frames: keep all_pos[np.linspace(0, len(all_pos) - 1, num=max_frames, dtype=int)]

Differences, on purpose: ``t_stride`` is at least 1 (the official code fails with a zero step when
fps / rate < 0.5), and ``frame_rate`` is not truncated to an int (identical for the default 1.0).
An invalid average fps is never passed here: :func:`resolve_fps` replaces it first and says so.
"""

from __future__ import annotations

import math

import numpy as np

from hbi_runtime.errors import UsageError

MAX_SANE_FPS = 1000.0  # above this an "average fps" is a broken time base, not a camera
DEFAULT_FPS = 25.0  # last resort when neither the stream rate nor frames / duration is usable


def sample_indices(n_frames: int, avg_fps: float, max_frames: int, frame_rate: float = 1.0) -> np.ndarray:
    """Frame indices to decode: every round(avg_fps / frame_rate)-th frame from 0, then uniform to max_frames.

    Args:
        n_frames: frames in the clip, as the decoder counts them (decord: video packets).
        avg_fps: the stream's average frame rate (finite, > 0; see :func:`resolve_fps`).
        max_frames: T, the most frames kept.
        frame_rate: sampling rate in frames per second before the uniform step (the official 1 fps).

    Returns:
        int64 array of at most ``max_frames`` strictly increasing indices in ``[0, n_frames)``; empty when
        ``n_frames <= 0``. Fewer than ``max_frames`` means the clip is padded (zero frames, mask 0).

    Raises:
        UsageError: a non-finite or non-positive ``avg_fps`` / ``frame_rate``, or ``max_frames < 1``.
    """
    if not (math.isfinite(avg_fps) and avg_fps > 0):
        raise UsageError(f"sample_indices: avg_fps must be finite and > 0, got {avg_fps!r}")
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise UsageError(f"sample_indices: frame_rate must be finite and > 0, got {frame_rate!r}")
    if max_frames < 1:
        raise UsageError(f"sample_indices: max_frames must be >= 1, got {max_frames!r}")
    if n_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    t_stride = max(1, int(round(float(avg_fps) / frame_rate)))  # Python round: half to even, as official
    positions = np.arange(0, int(n_frames), t_stride, dtype=np.int64)  # == range(0, (n_frames - 1) + 1, stride)
    if len(positions) > max_frames:
        positions = positions[np.linspace(0, len(positions) - 1, num=max_frames, dtype=int)]
    return positions


def resolve_fps(avg_fps: float | None, n_frames: int, duration: float | None) -> tuple[float, str | None]:
    """The fps to sample with, and a warning when the stream's average rate could not be used.

    Order: the stream's average rate when finite and in (0, MAX_SANE_FPS]; else ``n_frames / duration``
    when that is; else DEFAULT_FPS.
    """
    if avg_fps is not None and math.isfinite(avg_fps) and 0 < avg_fps <= MAX_SANE_FPS:
        return float(avg_fps), None
    if duration and math.isfinite(duration) and duration > 0 and n_frames > 0:
        derived = n_frames / duration
        if 0 < derived <= MAX_SANE_FPS:
            return derived, (f"average frame rate {avg_fps!r} is unusable; sampled with "
                             f"{n_frames} frames / {duration:.3f} s = {derived:.3f} fps")
    return DEFAULT_FPS, (f"average frame rate {avg_fps!r} is unusable and no duration to derive one from; "
                         f"sampled as if {DEFAULT_FPS:g} fps")
