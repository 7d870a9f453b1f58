"""How file names and other user-controlled text are shown to people, and recorded losslessly.

A file name is any byte sequence but ``/`` and NUL: it may hold bytes that are not UTF-8, newlines, or terminal
escape sequences (``ESC [ 2 J`` clears the screen). Every human-facing output (tables, progress lines, messages)
and every record of a name (manifests, reports) uses :func:`display_path`: printable characters as they are, a
backslash as ``\\\\``, every other byte below 0x80 as ``\\xNN`` (``\\x1b``, ``\\x0a``), a byte that is not part
of valid UTF-8 as ``\\xNN`` (``\\xe9``), any other non-printable character as ``\\uNNNN`` / ``\\UNNNNNNNN``. The
form is printable and lossless: two different names never print alike, nothing a name holds reaches a terminal
as a control code, and :func:`parse_display_path` gives the bytes back. JSON output carries the exact text where
it can (:func:`exact_text`; JSON escapes control characters itself) and, beside it, :func:`path_b64`: the raw
bytes from which a script reopens any file.
"""

from __future__ import annotations

import base64
import os
import re


def _escape_char(ch: str, backslash: str) -> str:
    cp = ord(ch)
    if ch == "\\":
        return backslash
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that is not part of valid UTF-8 (surrogateescape)
        return f"\\x{cp - 0xDC00:02x}"
    if ch.isprintable():
        return ch
    if cp < 0x80:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def display_path(path: str | bytes | os.PathLike) -> str:
    """The printable, lossless form of a path (see the module docstring); a printable UTF-8 name without
    backslashes is unchanged. ``str`` paths are taken as ``os.fsdecode`` gives them."""
    text = os.fsencode(path).decode("utf-8", errors="surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(ch, "\\\\") for ch in text)


def printable(text: str) -> str:
    """``text`` (a query, a reason, a message) for a terminal: non-printable characters escaped as
    :func:`display_path` does, a backslash left as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape_char(ch, "\\") for ch in text)


_ESCAPE = re.compile(r"\\(?:(\\)|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def parse_display_path(text: str) -> bytes:
    """The raw bytes of a name written by :func:`display_path`.

    Raises:
        ValueError: ``text`` holds a backslash that starts no escape.
    """
    out, pos = bytearray(), 0
    while (start := text.find("\\", pos)) >= 0:
        out += text[pos:start].encode("utf-8", errors="surrogateescape")
        m = _ESCAPE.match(text, start)
        if m is None:
            raise ValueError(f"{text!r} is not a displayed name: the backslash at {start} starts no escape")
        backslash, byte, short, long = m.groups()
        if backslash:
            out += b"\\"
        elif byte:
            out.append(int(byte, 16))
        else:
            out += chr(int(short or long, 16)).encode("utf-8", errors="surrogatepass")
        pos = m.end()
    return bytes(out + text[pos:].encode("utf-8", errors="surrogateescape"))


def exact_text(path: str | bytes | os.PathLike) -> str:
    """The path as text for JSON: exact when it is UTF-8, else :func:`display_path` (see :func:`path_b64`)."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return display_path(raw)


def path_b64(path: str | bytes | os.PathLike) -> str:
    """The raw bytes of a path, base64 (standard alphabet): lossless whatever the name holds."""
    return base64.b64encode(os.fsencode(path)).decode("ascii")


__all__ = ["display_path", "exact_text", "parse_display_path", "path_b64", "printable"]
