"""Per-file video errors: every one names the file and the reason, and survives a trip between processes."""

from __future__ import annotations

import os

from hbi_runtime.errors import BadInputError
from hbi_runtime.names import display_path


class VideoDecodeError(BadInputError):
    """A video file cannot be turned into frames: unreadable, malformed, not a video, too large, too slow.

    Args:
        path: the file at fault (str, bytes or PathLike; kept as given).
        reason: what went wrong, in one sentence.
        hint: the next step for the user.
        transient: True when the failure may pass by itself (the file cannot be read now: permissions, an I/O
            error); None when nothing is known (an index retries transient failures on every run).
    """

    default_hint = "check the file with `ffprobe`; re-encode it (e.g. `ffmpeg -i in -c:v libx264 out.mp4`) or skip it"

    def __init__(self, path: str | bytes | os.PathLike, reason: str, *, hint: str | None = None,
                 transient: bool | None = None) -> None:
        self.path = path
        self.reason = reason
        self.transient = transient
        super().__init__(f"{display_path(path)}: {reason}", hint=hint or self.default_hint)

    def __reduce__(self):  # keyword-only constructor: pickle by the fields, for the worker -> parent trip
        return _rebuild, (type(self), self.path, self.reason, self.hint, self.transient)


def _rebuild(cls: type[VideoDecodeError], path, reason: str, hint: str | None,
             transient: bool | None = None) -> VideoDecodeError:
    return cls(path, reason, hint=hint, transient=transient)


class NoVideoStreamError(VideoDecodeError):
    """The file opens but has no video stream (audio-only, subtitles, an image sequence container)."""

    default_hint = "the file has no video stream: skip it"


class NotAVideoError(VideoDecodeError):
    """The file is not a self-contained video container: a playlist, list or manifest that names other files, a
    text file, a still image, or a format outside :data:`hbi_runtime.video.container.ALLOWED_FORMATS`."""

    default_hint = ("give a video file (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg, ASF/WMV); files that "
                    "name other files, text and images are never decoded")


class TooManyWindowsError(VideoDecodeError):
    """The window plan of a long video has more windows than one file may have (see ``hbi_runtime.index.windows``)."""

    default_hint = "use a longer --stride (and --window), or split the file"


class VideoTooLargeError(VideoDecodeError):
    """Decoding would exceed the memory budget (resolution x sampled frames), or the worker went over it."""

    default_hint = "raise memory_limit_mb, or downscale the file (e.g. `ffmpeg -i in -vf scale=-2:720 out.mp4`)"


class DecodeTimeoutError(VideoDecodeError):
    """Decoding took longer than the per-file timeout; the worker was killed and replaced."""

    default_hint = "raise the per-file timeout, or re-encode the file"


class DecoderCrashedError(VideoDecodeError):
    """The decoder process died while decoding (a crash inside a native library); it was replaced."""
