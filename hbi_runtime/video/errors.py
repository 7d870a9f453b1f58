"""Per-file video errors: every one names the file and the reason, and survives a trip between processes."""

from __future__ import annotations

import os

from hbi_runtime.errors import BadInputError


def display_path(path: str | bytes | os.PathLike) -> str:
    """A printable form of any path, including non-UTF-8 byte names (undecodable bytes as \\xNN escapes)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


class VideoDecodeError(BadInputError):
    """A video file cannot be turned into frames: unreadable, malformed, not a video, too large, too slow.

    Args:
        path: the file at fault (str, bytes or PathLike; kept as given).
        reason: what went wrong, in one sentence.
        hint: the next step for the user.
    """

    default_hint = "check the file with `ffprobe`; re-encode it (e.g. `ffmpeg -i in -c:v libx264 out.mp4`) or skip it"

    def __init__(self, path: str | bytes | os.PathLike, reason: str, *, hint: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{display_path(path)}: {reason}", hint=hint or self.default_hint)

    def __reduce__(self):  # keyword-only constructor: pickle by the fields, for the worker -> parent trip
        return _rebuild, (type(self), self.path, self.reason, self.hint)


def _rebuild(cls: type[VideoDecodeError], path, reason: str, hint: str | None) -> VideoDecodeError:
    return cls(path, reason, hint=hint)


class NoVideoStreamError(VideoDecodeError):
    """The file opens but has no video stream (audio-only, subtitles, an image sequence container)."""

    default_hint = "the file has no video stream: skip it"


class VideoTooLargeError(VideoDecodeError):
    """Decoding would exceed the memory budget (resolution x sampled frames), or the worker went over it."""

    default_hint = "raise memory_limit_mb, or downscale the file (e.g. `ffmpeg -i in -vf scale=-2:720 out.mp4`)"


class DecodeTimeoutError(VideoDecodeError):
    """Decoding took longer than the per-file timeout; the worker was killed and replaced."""

    default_hint = "raise the per-file timeout, or re-encode the file"


class DecoderCrashedError(VideoDecodeError):
    """The decoder process died while decoding (a crash inside a native library); it was replaced."""
