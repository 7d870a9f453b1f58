"""Decoder backends: open a file, say how many frames it has, and hand out chosen frames as RGB uint8.

Both readers number frames the way decord does, so that one sampling rule gives the same indices whichever
decoder runs:

- ``n_frames`` is the number of video *packets* in the file (decord ``VideoReader.IndexKeyframes`` reads every
  packet at open; ``len(vr)`` is that count), and frame ``i`` is the ``i``-th packet in presentation (pts) order.
  The PyAV reader demuxes the file once (no decoding) to build the same sorted pts list; it never uses the
  header's frame count or duration x fps, which differ from decord on webm/mkv and on truncated files.
- ``avg_fps`` is the stream's ``avg_frame_rate`` (decord ``get_avg_fps``, PyAV ``stream.average_rate``).
- The display rotation of the container (display matrix, or the legacy ``rotate`` tag) is applied in multiples
  of 90 degrees, as decord 0.6 does (its filter graph adds ``transpose``); other angles are ignored by both.
- Frames are converted to RGB24 by FFmpeg's swscale in both (decord: ``buffersink`` with ``rgb24``; PyAV:
  ``to_ndarray(format="rgb24")``), whatever the source pixel format (10-bit, gray, 4:4:4, ...).

Seeking: to read frame ``i`` a reader seeks to the last keyframe at or before it and decodes forward, unless it
is already positioned in that group of pictures; so an hour-long file costs one short decode per sampled frame.
Library exceptions are wrapped in :class:`ReaderError` with the reason; :mod:`hbi_runtime.video.decode` turns
them into per-file errors or a fallback to the next decoder.

Opening: both readers open a file only through :mod:`hbi_runtime.video.container` (PyAV under a format and
protocol allow-list; decord by the descriptor of the checked file), so playlists, concat lists, manifests, text
and image files are refused with a final per-file error before any decoder reads them.
"""

from __future__ import annotations

import bisect
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hbi_runtime.video.container import Source, check_container, first_video_stream, open_container
from hbi_runtime.video.errors import DecodeTimeoutError, VideoDecodeError

DECORD_CHUNK = 4  # frames per decord get_batch call: bounds the raw-frame memory at 4 x H x W x 3 bytes


class ReaderError(Exception):
    """A decoder could not open or read the file; ``reason`` says why (another decoder may still succeed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ShortReadError(ReaderError):
    """The file ends before a frame its index promised: only frames ``[0, readable)`` can be decoded."""

    def __init__(self, reason: str, readable: int) -> None:
        super().__init__(reason)
        self.readable = readable


@dataclass(frozen=True)
class VideoInfo:
    """What a reader knows after opening a file, before decoding any frame."""

    n_frames: int  # video packets, as decord counts them
    avg_fps: float | None  # the stream's avg_frame_rate (None or 0 when the container has none)
    duration: float | None  # seconds from the first frame's start to the last frame's end
    width: int | None  # coded size (before rotation); None when unknown until a frame is decoded
    height: int | None


def _rotation_ccw(degrees: float | None) -> int:
    """A display rotation (counter-clockwise degrees) as 0/90/180/270; other angles are not applied (as decord)."""
    if not degrees:
        return 0
    value = int(round(degrees)) % 360
    return value if value % 90 == 0 else 0


def _check_deadline(deadline: float | None, path) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DecodeTimeoutError(path, "decoding took longer than the timeout")


class Reader:
    """A file opened by one decoder. Use as a context manager; ``frames(indices)`` yields them in order."""

    name = "base"
    info: VideoInfo
    warnings: list[str]  # what the caller should pass on (a damaged tail, an ignored rotation, ...)

    def frames(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def utf8_str_path(path: str | bytes | os.PathLike) -> str | None:
    """The path as a str that encodes to UTF-8, or None when its name is not valid UTF-8."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# decord


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


class DecordReader(Reader):
    """decord 0.6: the decoder the official model was trained with (``VideoReader(path, ctx=cpu(0))``).

    decord takes no FFmpeg options: the file is first checked by :func:`hbi_runtime.video.container.check_container`
    (PyAV under the format / protocol allow-lists, and the leading bytes against what decord's older FFmpeg would
    read as a playlist), and decord then opens the same checked file by descriptor (``Source.url``).
    """

    name = "decord"

    def __init__(self, path, *, threads: int = 1, deadline: float | None = None) -> None:
        import decord

        # DECORDError from the C++ checks; RuntimeError from decord's Python wrapper ("Error reading ...")
        self._error = (decord.DECORDError, RuntimeError)
        self.path = path
        self.warnings = []
        if utf8_str_path(path) is None:  # decord passes names through a UTF-8 std::string and fails (see measured.md)
            raise ReaderError("decord cannot open file names that are not valid UTF-8")
        with Source(path) as source:
            checked = check_container(path, source=source)  # a final VideoDecodeError when the file is refused
            url = source.url if source.url is not None else "file:" + utf8_str_path(path)
            try:
                self._vr = decord.VideoReader(url, ctx=decord.cpu(0), num_threads=threads)
                n = len(self._vr)
                fps = float(self._vr.get_avg_fps())
                stamps = self._vr.get_frame_timestamp([0, n - 1]) if n > 0 else None
            except self._error as exc:
                raise ReaderError(_last_line(exc).replace(url, "the file")) from None
        duration = float(stamps[1, 1] - stamps[0, 0]) if stamps is not None else None
        # decord gives no size before decoding; the memory budget is checked before any frame is decoded
        self.info = VideoInfo(n_frames=n, avg_fps=fps, duration=duration, width=checked.width, height=checked.height)

    def frames(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), DECORD_CHUNK):
            chunk = [int(i) for i in indices[start:start + DECORD_CHUNK]]
            try:
                batch = self._vr.get_batch(chunk).asnumpy()  # (n, H, W, 3) uint8, rotated by decord
            except self._error as exc:
                raise ReaderError(f"decord failed reading frames {chunk}: {_last_line(exc)}") from None
            yield from batch

    def close(self) -> None:
        self._vr = None


def _last_line(exc: BaseException) -> str:
    """decord's messages carry a C++ stack and a "[time] file.cc:line: " prefix; keep what failed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# PyAV


def pyav_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class PyAVReader(Reader):
    """PyAV (maintained FFmpeg bindings): the fallback, reproducing decord's frame numbering (module docstring)."""

    name = "pyav"

    def __init__(self, path, *, threads: int = 1, deadline: float | None = None) -> None:
        import av

        self._av_error = av.FFmpegError
        self.path = path
        self.warnings = []
        self._deadline = deadline
        self._source = Source(path)
        try:
            # the checked open (hbi_runtime.video.container): a final VideoDecodeError when the file is refused
            self._container = open_container(self._source)
        except BaseException:
            self._source.close()
            raise
        try:
            self._open(threads)
        except BaseException:
            self.close()
            raise

    def _open(self, threads: int) -> None:
        self._stream = stream = first_video_stream(self._container)
        stream.codec_context.thread_count = threads
        pts, keys, end = self._index()
        self._pts = pts  # sorted presentation timestamps, one per frame index
        self._pts_to_index = {p: i for i, p in enumerate(pts)}
        self._keys = keys  # frame indices of keyframes, ascending
        tb = float(stream.time_base) if stream.time_base else 0.0
        duration = (end - pts[0]) * tb if pts and tb else None
        rate = stream.average_rate
        ctx = stream.codec_context
        self.info = VideoInfo(n_frames=len(pts), avg_fps=float(rate) if rate else None, duration=duration,
                              width=ctx.width or None, height=ctx.height or None)
        self._frames_iter = None  # the decode generator after the last seek
        self._cur = -1  # index of the last frame taken from it
        self._rotation: int | None = None

    def _index(self) -> tuple[list[int], list[int], int]:
        """Demux every packet of the stream once: sorted pts, keyframe indices, and the end pts of the last frame."""
        entries: list[tuple[int, bool]] = []
        end = None
        try:
            for n, packet in enumerate(self._container.demux(self._stream)):
                if packet.size == 0:  # PyAV's flush packet at the end, not a frame
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    raise ReaderError("a video packet has neither pts nor dts: frames cannot be numbered")
                entries.append((ts, bool(packet.is_keyframe)))
                stop = ts + (packet.duration or 0)
                end = stop if end is None else max(end, stop)
                if n % 4096 == 0:
                    _check_deadline(self._deadline, self.path)
        except self._av_error as exc:
            if not entries:
                raise ReaderError(f"PyAV cannot read packets: {exc}") from None
            # A damaged tail (decord refuses the whole file here): number the frames before the damage.
            self.warnings.append(f"the file is damaged after {len(entries)} video packets ({exc}); "
                                 "sampled from the frames before the damage")
        entries.sort(key=lambda e: e[0])
        keys = [i for i, (_, key) in enumerate(entries) if key] or [0]
        return [ts for ts, _ in entries], keys, end if end is not None else 0

    def frames(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        for target in indices:
            frame = self._frame_at(int(target))
            yield self._to_rgb(frame)

    def _frame_at(self, target: int):
        key = self._keys[bisect.bisect_right(self._keys, target) - 1] if self._keys[0] <= target else 0
        if self._frames_iter is None or target <= self._cur or key > self._cur + 1:
            self._seek(key)
        target_pts = self._pts[target]
        while True:
            _check_deadline(self._deadline, self.path)
            try:
                frame = next(self._frames_iter)
            except StopIteration:
                raise ShortReadError(f"the file ends before frame {target} (of {len(self._pts)} indexed)",
                                     readable=max(self._cur + 1, 0)) from None
            except self._av_error as exc:
                raise ShortReadError(f"PyAV failed decoding near frame {target}: {exc}",
                                     readable=max(self._cur + 1, 0)) from None
            ts = frame.pts
            index = self._pts_to_index.get(ts) if ts is not None else self._cur + 1
            if index is None:  # a pts that no packet had (decoder reordering oddities): place it by value
                index = bisect.bisect_left(self._pts, ts)
            if index >= target or (ts is not None and ts >= target_pts):
                self._cur = target
                return frame
            self._cur = index

    def _seek(self, key: int) -> None:
        try:
            self._container.seek(self._pts[key], stream=self._stream, backward=True, any_frame=False)
        except self._av_error as exc:
            raise ReaderError(f"PyAV cannot seek to frame {key}: {exc}") from None
        self._frames_iter = self._container.decode(self._stream)
        self._cur = key - 1

    def _to_rgb(self, frame) -> np.ndarray:
        if self._rotation is None:
            angle = getattr(frame, "rotation", 0) or 0
            self._rotation = _rotation_ccw(angle)
            if angle and not self._rotation:
                self.warnings.append(f"display rotation {angle} degrees is not a multiple of 90: not applied")
        try:
            rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8 via swscale, as decord
        except (self._av_error, ValueError) as exc:
            raise ReaderError(f"PyAV cannot convert {frame.format.name} frames to RGB: {exc}") from None
        if self._rotation:
            rgb = np.ascontiguousarray(np.rot90(rgb, k=self._rotation // 90))  # np.rot90 turns counter-clockwise
        return rgb

    def close(self) -> None:
        self._frames_iter = None
        self._container.close()
        self._source.close()


READERS: dict[str, type[Reader]] = {"decord": DecordReader, "pyav": PyAVReader}
AVAILABLE = {"decord": decord_available, "pyav": pyav_available}


def open_reader(name: str, path, *, threads: int, deadline: float | None) -> Reader:
    """Open ``path`` with the reader registered as ``name`` (``decord``, ``pyav``, or a ``fault-*`` test reader)."""
    if name.startswith("fault-"):
        from hbi_runtime.video import _faults

        return _faults.open_fault_reader(name, path)
    return READERS[name](path, threads=threads, deadline=deadline)


__all__ = ["AVAILABLE", "READERS", "Reader", "ReaderError", "ShortReadError", "VideoInfo", "VideoDecodeError",
           "open_reader"]
