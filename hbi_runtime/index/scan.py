"""Find the video files of a folder, and fingerprint them: what the index compares to decide what to re-encode.

:func:`scan` walks a folder recursively with ``os.scandir`` and never writes into it. Names are kept as bytes
(``os.fsencode``), so a file whose name is not valid UTF-8 is found, stored and reopened like any other.
Everything it cannot or will not enter is reported with a reason, never raised: an unreadable folder
(``PermissionError``), a file that vanished between listing and ``stat``, a symlink loop, a symlink that leads
outside the folder (followed only with ``follow_symlinks=True``), a broken symlink.

:func:`fast_hash`: sha256 of the file size (8 bytes, little endian) + its first and last MiB (the whole file
when it is at most 2 MiB). It catches a re-encoded or replaced file without reading gigabytes; it does not catch
a same-size edit in the middle of a large file (``full=True`` hashes every byte).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable

from hbi_runtime.errors import BadInputError
from hbi_runtime.names import display_path, path_b64

DEFAULT_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov", "m4v", "mpg", "mpeg", "wmv", "flv", "ts")
HASH_EDGE_BYTES = 1 << 20  # fast_hash reads this much from the start and from the end
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class ScanEntry:
    """One video file found by :func:`scan`.

    ``rel``: the path relative to the scanned folder, as bytes (``/``-separated): the file's key in the index.
    ``path``: the absolute path as bytes (open it with ``open(entry.path, "rb")`` or ``os.fsdecode``).
    """

    rel: bytes
    path: bytes
    size: int
    mtime_ns: int

    @property
    def display(self) -> str:
        return display_path(self.rel)


@dataclass
class ScanResult:
    """The video files of a folder (sorted by ``rel``) and what was skipped, as ``(display path, reason)``."""

    files: list[ScanEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def normalize_extensions(extensions: Iterable[str]) -> frozenset[bytes]:
    """``("MP4", ".mkv")`` -> ``{b".mp4", b".mkv"}`` (matching is case-insensitive)."""
    if isinstance(extensions, (str, bytes)):
        extensions = [extensions]
    out = set()
    for ext in extensions:
        text = os.fsencode(ext).strip().lower().lstrip(b".")
        if not text:
            raise BadInputError(f"video extensions | Received an empty extension in {list(extensions)!r}")
        out.add(b"." + text)
    return frozenset(out)


def scan(video_dir: str | bytes | os.PathLike, extensions: Iterable[str] = DEFAULT_EXTENSIONS, *,
         follow_symlinks: bool = False) -> ScanResult:
    """Every video file under ``video_dir``, recursively; nothing is ever written there.

    Args:
        video_dir: the folder.
        extensions: file name endings to take (case-insensitive, with or without the dot).
        follow_symlinks: also follow symlinks (files and folders) that lead outside ``video_dir``; symlinks
            inside it are always followed. Loops are detected either way (each real folder is entered once).

    Returns:
        A :class:`ScanResult`: files sorted by relative path; skipped entries with the reason.

    Raises:
        BadInputError: ``video_dir`` does not exist, is not a folder, or cannot be listed.
    """
    root = os.path.realpath(os.fsencode(video_dir))
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.exists(root) else "is not a folder"
        raise BadInputError(f"video folder {display_path(video_dir)} {what}", hint="give a folder of video files")
    try:
        os.scandir(root).close()
    except OSError as exc:
        raise BadInputError(f"video folder {display_path(video_dir)} cannot be listed ({exc.strerror})",
                            hint="check its permissions") from None
    result = ScanResult()
    _Walker(root, normalize_extensions(extensions), follow_symlinks, result).walk(root, b"")
    result.files.sort(key=lambda e: e.rel)
    return result


class _Walker:
    def __init__(self, root: bytes, extensions: frozenset[bytes], follow: bool, result: ScanResult) -> None:
        self.root = root
        self.extensions = extensions
        self.follow = follow
        self.result = result
        self.seen_dirs: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every folder entered: no loops

    def skip(self, rel: bytes, reason: str) -> None:
        self.result.skipped.append((display_path(rel), reason))

    def inside(self, real: bytes) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(b"/") + b"/")

    def walk(self, folder: bytes, rel: bytes) -> None:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in self.seen_dirs:
            self.skip(rel or b".", "symlink loop (this folder was already scanned)")
            return
        self.seen_dirs.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            self.skip(rel, "the folder vanished during the scan")
            return
        except OSError as exc:
            self.skip(rel or b".", f"cannot list the folder ({exc.strerror})")
            return
        for entry in entries:
            self.visit(entry, rel + b"/" + entry.name if rel else entry.name)

    def visit(self, entry: os.DirEntry, rel: bytes) -> None:
        try:
            is_link = entry.is_symlink()
            if is_link:
                real = os.path.realpath(entry.path)
                if not os.path.exists(real):
                    if self._wanted(rel):
                        self.skip(rel, "broken symlink")
                    return
                if not self.follow and not self.inside(real):
                    if entry.is_dir() or self._wanted(rel):
                        self.skip(rel, "symlink leads outside the folder (not followed; follow_symlinks=True "
                                       "to follow it)")
                    return
            if entry.is_dir():  # follows the link, if any
                self.walk(entry.path, rel)
            elif self._wanted(rel) and entry.is_file():
                self.add(entry, rel, is_link)
        except FileNotFoundError:
            self.skip(rel, "vanished during the scan")
        except OSError as exc:
            self.skip(rel, f"cannot read it ({exc.strerror})")

    def _wanted(self, rel: bytes) -> bool:
        return os.path.splitext(rel)[1].lower() in self.extensions

    def add(self, entry: os.DirEntry, rel: bytes, is_link: bool) -> None:
        info = entry.stat()  # follows symlinks: size and mtime of the video itself
        if not stat.S_ISREG(info.st_mode):
            self.skip(rel, "not a regular file")
            return
        self.result.files.append(ScanEntry(rel=rel, path=os.path.join(self.root, rel), size=info.st_size,
                                           mtime_ns=info.st_mtime_ns))


def fast_hash(path: str | bytes | os.PathLike, size: int | None = None, *, full: bool = False) -> str:
    """``"fast:<sha256 hex>"`` of (size, first MiB, last MiB), or ``"full:<sha256 hex>"`` of every byte.

    Raises:
        OSError: the file cannot be read (the caller records it as a failure of that file).
    """
    digest = hashlib.sha256()
    with open(os.fsencode(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size if size is None else size
        if full:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
            return "full:" + digest.hexdigest()
        digest.update(int(size).to_bytes(8, "little"))
        digest.update(f.read(HASH_EDGE_BYTES))
        if size > 2 * HASH_EDGE_BYTES:
            f.seek(size - HASH_EDGE_BYTES)
            digest.update(f.read(HASH_EDGE_BYTES))
        elif size > HASH_EDGE_BYTES:
            digest.update(f.read())
    return "fast:" + digest.hexdigest()


__all__ = ["DEFAULT_EXTENSIONS", "ScanEntry", "ScanResult", "display_path", "fast_hash", "normalize_extensions",
           "path_b64", "scan"]
