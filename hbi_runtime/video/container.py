"""The container check: only self-contained video files reach a decoder.

FFmpeg follows references inside some files that may carry any name: an HLS playlist or an ffconcat list decodes
the files it names (any absolute path: outside an indexed folder, past its symlink rule), a DASH or IMF manifest
does the same, an SDP description opens RTP sockets, the ``tty`` demuxer renders a text file as frames, and image
demuxers turn a PNG into a 0.04 s video. The readers (:mod:`hbi_runtime.video.readers`) open every file through
this module, so every decode (``decode_video``, the worker pool, the index's window tasks) is checked:

1. The file is opened once (a file descriptor): FFmpeg reads it by ``/proc/self/fd/N`` on Linux, a name with no
   extension and no URL scheme, naming the very inode that was checked. Elsewhere by ``file:`` + the path, so a
   name such as ``concat:a.ts|b.ts`` or ``data:x.mp4`` is a local file name, never a protocol.
2. PyAV opens it with ``format_whitelist`` = :data:`ALLOWED_FORMATS` (FFmpeg refuses any other demuxer after
   probing, before reading a header) and ``protocol_whitelist=file``, which nested opens inherit (it bounds what
   a demuxer may open to local files, but would not stop a playlist reading ``/etc/...``: the format allow-list
   does that). The mov demuxer's external data references (``enable_drefs``) are off by FFmpeg's default, in
   PyAV's FFmpeg and in decord's 4.1 alike; they are switched off explicitly here too. The format name must be an
   allowed one and the file must have a video stream that is not an attached picture (cover art).
3. decord takes no options and bundles an older FFmpeg (4.1) whose probing differs: a file that PyAV reads as
   MPEG-TS may be an HLS playlist to decord's FFmpeg (a playlist header in front of TS packets). Before decord
   opens a file, its leading bytes are checked for what that FFmpeg's text probes detect: ``#EXTM3U`` (HLS) or
   ``ffconcat version`` at the start, ``<MPD`` / ``<CompositionPlaylist`` or a ``c=IN IP`` line before the
   first NUL byte (these probes are string functions). With the ``/proc/self/fd`` name, decord's extension-only
   probes (``tty`` for .txt / .nfo / .ans, ``image2`` and its ``%d`` sequences) never match.

A refused file is a per-file :class:`NotAVideoError` (or :class:`NoVideoStreamError`) whose reason says what the
file is; it is final: no other decoder tries it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from hbi_runtime.video.errors import NoVideoStreamError, NotAVideoError, VideoDecodeError

# FFmpeg demuxer names (one component of AVInputFormat.name, e.g. "mov" of "mov,mp4,m4a,3gp,3g2,mj2") of
# self-contained containers and raw video streams: none of them opens another file or URL.
ALLOWED_FORMATS: dict[str, str] = {
    "mov": "MP4 / MOV / 3GP",
    "matroska": "Matroska / WebM",
    "avi": "AVI",
    "mpegts": "MPEG-TS",
    "mpeg": "MPEG-PS",
    "flv": "FLV",
    "ogg": "Ogg",
    "asf": "ASF / WMV",
    "mpegvideo": "raw MPEG-1/2 video",
    "m4v": "raw MPEG-4 video",
    "h264": "raw H.264",
    "hevc": "raw HEVC",
}
ALLOWED_TEXT = ", ".join(ALLOWED_FORMATS.values())
CONTAINER_OPTIONS = {
    "format_whitelist": ",".join(ALLOWED_FORMATS),
    "protocol_whitelist": "file",
    "enable_drefs": "0",  # mov: never open the files a track's data reference names (FFmpeg's default)
}
PROC_FD = os.path.isdir("/proc/self/fd")  # Linux: FFmpeg opens the checked file by descriptor
HEAD_BYTES = 1 << 16  # leading bytes read at first; more (up to FFmpeg's probe size) only while there is no NUL
PROBE_BYTES = 1 << 20  # FFmpeg's default format_probesize: its probes never look further

# what FFmpeg's text probes (4.1 in decord, and newer) detect as a format that reads other files or URLs
_ANCHORED = ((b"#EXTM3U", "an HLS playlist"), (b"ffconcat version", "an ffconcat list"))
_ANYWHERE = ((b"<mpd", "a DASH manifest"), (b"<compositionplaylist", "an IMF composition playlist"))
_SDP_LINE = re.compile(rb"(?:^|[\r\n])c=IN IP")
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
           (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
           (b"\xff\x0a", "JPEG XL"))
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\x1a\x1b")  # tab, newlines, form feed, DOS EOF, ANSI escape


@dataclass(frozen=True)
class ContainerInfo:
    """What the check learnt: FFmpeg's format name and the first video stream's coded size (None if unknown)."""

    format_name: str
    width: int | None
    height: int | None


class Source:
    """A video file opened once for FFmpeg: ``url`` is the name to open it by (see the module docstring), ``head``
    its leading bytes. Use as a context manager; the descriptor may be closed once FFmpeg has opened ``url``.

    Raises:
        VideoDecodeError: the file cannot be opened (permissions, gone).
    """

    def __init__(self, path: str | bytes | os.PathLike) -> None:
        self.path = path
        self._file = None
        try:  # O_NONBLOCK: a FIFO put in the file's place cannot block the open (and is refused below)
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:  # permissions, I/O: may pass by itself (gone: not)
            raise VideoDecodeError(path, f"cannot read it: {exc.strerror}", hint="check the path and permissions",
                                   transient=not isinstance(exc, FileNotFoundError)) from None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise VideoDecodeError(path, "not a regular file", hint="give a video file, not a folder or device")
            self.head = _read_head(self._fd)
        except OSError as exc:
            self.close()
            raise VideoDecodeError(path, f"cannot read it: {exc.strerror}", transient=True) from None
        except BaseException:
            self.close()
            raise
        text = _utf8(path)
        if PROC_FD:
            self.url: str | None = f"/proc/self/fd/{self._fd}"
        else:
            self.url = "file:" + text if text is not None else None  # None: open through a Python file object

    def file(self):
        """The file as a Python file object (for PyAV where ``url`` is None); closed with the source."""
        if self._file is None:
            self._file = os.fdopen(os.dup(self._fd), "rb")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _utf8(path) -> str | None:
    try:
        return os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_head(fd: int) -> bytes:
    """The first HEAD_BYTES, extended up to PROBE_BYTES while they hold no NUL (text probes read that far)."""
    head = os.pread(fd, HEAD_BYTES, 0)
    while b"\x00" not in head and len(head) < PROBE_BYTES and len(head) % HEAD_BYTES == 0 and head:
        more = os.pread(fd, HEAD_BYTES, len(head))
        if not more:
            break
        head += more
    return head


def referencing_kind(head: bytes) -> str | None:
    """What FFmpeg's text probes would take these leading bytes for, when that format reads other files or URLs
    (HLS, ffconcat, DASH, IMF, SDP); None otherwise."""
    text = head.split(b"\x00", 1)[0]  # the probes are string functions: they stop at the first NUL
    start = text.lstrip(b"\xef\xbb\xbf \t\r\n")
    for marker, kind in _ANCHORED:
        if text.startswith(marker) or start.startswith(marker):
            return kind
    lower = text.lower()
    for marker, kind in _ANYWHERE:
        if marker in lower:
            return kind
    if _SDP_LINE.search(text):
        return "an SDP session description"
    return None


def describe(head: bytes) -> str | None:
    """A short description of a file that is not a video, from its leading bytes (None when nothing is known)."""
    kind = referencing_kind(head)
    if kind:
        return f"{kind}, which makes FFmpeg read the files or URLs it names (they are never read)"
    for magic, name in _IMAGES:
        if head.startswith(magic):
            if name == "GIF":
                return "a GIF image (animated or not, GIF is not a video container)"
            return f"a still image ({name})"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a still image (WebP)"
    sample = head[:4096]
    if sample and not any(b < 0x20 and b not in _TEXT_CONTROLS for b in sample) and b"\x7f" not in sample:
        return "a text file (FFmpeg would render its text as frames)"
    return None


def _refuse(path, head: bytes, fallback: str) -> NotAVideoError:
    kind = describe(head)
    return NotAVideoError(path, f"not a video: {kind}" if kind else fallback)


def open_container(source: Source):
    """Open ``source`` with PyAV under the allow-lists; the open ``av`` container of an allowed format that has a
    video stream, else a final error.

    Raises:
        NotAVideoError: a playlist, list, manifest, text or image file, or any format outside ALLOWED_FORMATS.
        NoVideoStreamError: an allowed container without a video stream (audio, or only cover art).
        VideoDecodeError: FFmpeg cannot open it (damaged, truncated).
    """
    import av

    path = source.path
    kind = referencing_kind(source.head)
    if kind:  # decord's FFmpeg would follow it whatever PyAV's makes of it: never open it
        raise _refuse(path, source.head, "")
    target = source.url if source.url is not None else source.file()
    try:
        container = av.open(target, container_options=dict(CONTAINER_OPTIONS), metadata_errors="ignore")
    except av.FFmpegError as exc:
        if exc.errno == errno.EINVAL:  # FFmpeg's probe chose a demuxer that is not on the format allow-list
            raise _refuse(path, source.head, f"not a video container this runtime decodes (FFmpeg reads it as "
                                             f"another format; decoded are: {ALLOWED_TEXT})") from None
        if describe(source.head):
            raise _refuse(path, source.head, "") from None
        raise VideoDecodeError(path, f"cannot decode it (PyAV cannot open it: {exc.strerror})") from None
    except OSError as exc:
        raise VideoDecodeError(path, f"cannot read it: {exc.strerror or exc}") from None
    try:
        _check_opened(path, container)
    except BaseException:
        container.close()
        raise
    return container


def _check_opened(path, container) -> None:
    import av

    names = container.format.name.split(",")
    if not set(names) & set(ALLOWED_FORMATS):  # the allow-list again, should an FFmpeg ignore the option
        raise NotAVideoError(path, f"not a video container this runtime decodes ({container.format.name}; "
                                   f"decoded are: {ALLOWED_TEXT})")
    video = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        cover = " except a cover picture" if container.streams.video else ""
        raise NoVideoStreamError(path, f"no video stream{cover} (streams: {', '.join(kinds)})")


def check_container(path: str | bytes | os.PathLike, *, source: Source | None = None) -> ContainerInfo:
    """Check one file (see the module docstring) without decoding anything; the format and the coded size.

    Raises:
        NotAVideoError, NoVideoStreamError, VideoDecodeError: see :func:`open_container`.
    """
    if source is None:
        with Source(path) as own:
            return check_container(path, source=own)
    container = open_container(source)
    try:
        ctx = first_video_stream(container).codec_context
        return ContainerInfo(container.format.name, ctx.width or None, ctx.height or None)
    finally:
        container.close()


def first_video_stream(container):
    """The first video stream that is not an attached picture (``open_container`` made sure there is one)."""
    import av

    return next(s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic)


__all__ = ["ALLOWED_FORMATS", "CONTAINER_OPTIONS", "ContainerInfo", "Source", "check_container", "describe",
           "first_video_stream", "open_container", "referencing_kind"]
