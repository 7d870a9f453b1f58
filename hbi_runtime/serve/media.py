"""Files the search page shows: a video's bytes (HTTP range requests, for seeking) and one frame as a thumbnail.

Only files in the served index are ever opened: the client names a video by its catalog id, the path comes from
the index (``hbi_runtime.serve.state.Served.row_of``), never from the request.

Thumbnails are extracted on demand (PyAV, through the container gate of :mod:`hbi_runtime.video.container`: the
file was decoded when it was indexed) and cached as JPEG files in ``INDEX/thumbnails/`` (the index folder, never
the video folder), keyed by the file's path, size and modification time and the time asked for (rounded to 0.1 s),
so a changed video never shows a stale frame. A read-only index folder still gets thumbnails, uncached.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from hbi_runtime.errors import BadInputError
from hbi_runtime.fileio import write_atomic

THUMB_DIR = "thumbnails"
THUMB_WIDTH = 320
MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".mpg": "video/mpeg", ".mpeg": "video/mpeg",
               ".ts": "video/mp2t", ".ogv": "video/ogg", ".3gp": "video/3gpp", ".flv": "video/x-flv",
               ".wmv": "video/x-ms-wmv"}
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_extracting = threading.BoundedSemaphore(2)  # thumbnail decodes at once: the model needs the cores too


class RangeNotSatisfiable(BadInputError):
    """A Range header outside the file (HTTP 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the requested range is outside the file ({size} bytes)",
                         hint=f"ask for bytes within 0-{max(0, size - 1)}")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive
    size: int  # the whole file
    partial: bool

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def media_type(path: str) -> str:
    return MEDIA_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


def byte_range(header: str | None, size: int) -> ByteRange:
    """The one byte range to send for a ``Range`` header (None: the whole file). A multi-range or malformed
    header is answered with the whole file (RFC 9110 lets a server ignore Range); a range outside the file raises
    RangeNotSatisfiable."""
    whole = ByteRange(0, max(0, size - 1), size, False)
    if not header:
        return whole
    m = _RANGE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return whole
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - n), size - 1, size, True)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, end, size, True)


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """An fd on a regular file (never a FIFO, device or folder put where the video was). Raises BadInputError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BadInputError(f"the video file cannot be read now: {exc.strerror}",
                            hint="it was moved or deleted since it was indexed: run an index update") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadInputError("the indexed path is no longer a regular file", hint="run an index update")
    return fd, st


def read_chunks(fd: int, start: int, length: int, chunk: int = 1 << 16):
    """Yield ``length`` bytes of ``fd`` from ``start``; closes ``fd`` when done or abandoned."""
    try:
        left, pos = length, start
        while left > 0:
            data = os.pread(fd, min(chunk, left), pos)
            if not data:
                return
            pos += len(data)
            left -= len(data)
            yield data
    finally:
        os.close(fd)


def thumbnail(index_dir: Path, path: str, t: float) -> bytes:
    """A JPEG of the frame at ``t`` seconds (the first frame at or after it; the last one past the end), cached.

    Raises:
        BadInputError: the file is gone, or cannot be decoded now.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadInputError(f"the video file cannot be read now: {exc.strerror}",
                            hint="it was moved or deleted since it was indexed: run an index update") from None
    tenth = max(0, int(round(t * 10)))
    key = hashlib.sha256(os.fsencode(path) + f"|{st.st_size}|{st.st_mtime_ns}|{tenth}".encode()).hexdigest()[:32]
    cached = index_dir / THUMB_DIR / key[:2] / f"{key}.jpg"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    with _extracting:
        data = _extract(path, tenth / 10)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, data)
    except OSError:
        pass  # a read-only index folder: served uncached
    return data


def _extract(path: str, t: float) -> bytes:
    import av

    from hbi_runtime.video.container import Source, first_video_stream, open_container
    from hbi_runtime.video.errors import VideoDecodeError

    try:
        with Source(path) as source:
            container = open_container(source)
            try:
                stream = first_video_stream(container)
                stream.thread_type = "AUTO"
                if t > 0 and stream.time_base:
                    container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
                chosen = None
                for frame in container.decode(stream):
                    chosen = frame
                    if frame.time is None or frame.time >= t - 0.05:
                        break
                if chosen is None:
                    raise VideoDecodeError(path, "no frame could be decoded")
                image = chosen.to_image()
            finally:
                container.close()
    except av.FFmpegError as exc:
        raise VideoDecodeError(path, f"cannot decode a frame: {exc}") from None
    if image.width > THUMB_WIDTH:
        image = image.resize((THUMB_WIDTH, max(1, round(image.height * THUMB_WIDTH / image.width))))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()
