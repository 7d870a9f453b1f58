"""Reading the files users and packages hand us, with limits hostile input cannot pass; every problem is a
:class:`BadInputError` (exit 3) naming the file (and, for text, the line).

* :func:`read_text_capped`: UTF-8 text of at most N bytes (``--queries /dev/zero`` is refused, not read).
* :func:`read_csv` / :func:`read_captions`: CSV read strictly. Python's ``csv`` module, left lenient, merges the
  rest of a file into one field after an unterminated quote and says nothing; here a record must end on the line
  it starts on (captions and questions never hold newlines) and a quote must be closed.
* :func:`read_json`: JSON with a size cap, no ``NaN`` / ``Infinity``, and a nesting limit (a file of 100,000
  ``[`` is an error, not a ``RecursionError``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hbi_runtime.errors import BadInputError
from hbi_runtime.names import display_path

MAX_CSV_BYTES = 256 << 20  # larger files are refused before they are read into memory
MAX_JSON_BYTES = 16 << 20  # a manifest is kilobytes (a caption vocabulary list: hundreds); 16 MiB is no package
MAX_JSON_DEPTH = 64  # manifests nest 6 levels deep


def read_csv(path: str | os.PathLike, what: str, *, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """``(line number, row dict)`` for every record of a CSV file with a header line.

    Args:
        path: the file. what: what it holds, for messages ("captions", "questions").
        required: column names the header must hold.
    Raises:
        BadInputError: unreadable, too large, not UTF-8, a record spanning lines or with an unterminated
            quote, a record with more or fewer cells than the header, no record at all.
    """
    shown = display_path(path)
    text = read_text_capped(path, what, MAX_CSV_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise BadInputError(f"{what} file {shown}, line 1: {exc}") from None
    if not header:
        raise BadInputError(f"{what} file {shown} is empty", hint="the first line names the columns")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise BadInputError(f"{what} file {shown}: no column {', '.join(missing)} in the header {header}")
    rows, line = [], reader.line_num
    while True:
        start = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise BadInputError(f"{what} file {shown}, line {start}: {exc} (an unterminated quote?)",
                                hint="close the quote, or escape a quote inside a field as two quotes") from None
        line = reader.line_num
        if line != start:
            raise BadInputError(f"{what} file {shown}, line {start}: a quoted field runs on to line {line} "
                                "(an unterminated quote?)", hint="close the quote; fields cannot hold newlines")
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise BadInputError(f"{what} file {shown}, line {start}: {len(cells)} field(s), the header has "
                                f"{len(header)}", hint="quote fields that contain commas")
        rows.append((start, dict(zip(header, cells))))
    if not rows:
        raise BadInputError(f"{what} file {shown} holds no record below its header")
    return rows


def read_text_capped(path: str | os.PathLike, what: str, limit: int) -> str:
    """The UTF-8 text of a file of at most ``limit`` bytes (a device or a huge file is refused, not read)."""
    shown = display_path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise BadInputError(f"cannot read {what} file {shown} ({exc.strerror})", hint="check the path") from None
    if len(data) > limit:
        raise BadInputError(f"{what} file {shown} is larger than {limit >> 20} MiB",
                            hint="split it, or check that it is the file you meant") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadInputError(f"{what} file {shown}, line {line}: not UTF-8 text", hint="save it as UTF-8") from None


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(video key, caption)`` pairs from MSR-VTT's JSFusion CSV (``key,vid_key,video_id,sentence``) or a
    plain ``video,caption`` CSV (with that header), read strictly (:func:`read_csv`).

    Raises:
        BadInputError: unreadable file, unknown header, a malformed record or an empty video name or caption
            (naming its line), no caption.
    """
    rows = read_csv(path, "captions")
    header = set(rows[0][1])
    for keys in (("video_id", "sentence"), ("video", "caption")):
        if set(keys) <= header:
            break
    else:
        raise BadInputError(f"captions file {display_path(path)} has columns {sorted(header)}",
                            hint="use MSR-VTT's JSFusion layout key,vid_key,video_id,sentence or video,caption")
    pairs = []
    for line, row in rows:
        video, caption = (row[k].strip() for k in keys)
        if not video or not caption:
            raise BadInputError(f"captions file {display_path(path)}, line {line}: empty "
                                f"{keys[0] if not video else keys[1]}",
                                hint=f"every row needs a {keys[0]} and a {keys[1]}")
        pairs.append((video, caption))
    return pairs


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (hbi-toolkit never writes it)")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists / objects nest more than ``limit`` levels (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_json(path: str | os.PathLike, *, what: str = "manifest", hint: str | None = None,
                      max_bytes: int | None = None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file of a package (a manifest, ``answers.json``) with limits that hostile input cannot pass.

    Refuses a file over ``max_bytes`` (default :data:`MAX_JSON_BYTES`), one that is not UTF-8 or not JSON, one
    holding ``NaN`` / ``Infinity`` (not JSON; no writer of this toolkit emits them), and one nesting lists /
    objects deeper than ``max_depth`` (so no later step can hit Python's recursion limit).

    Args:
        path: the file.
        what: what the file is, for messages ("QA package manifest").
        hint: the next step for the user, attached to every error.
    Returns:
        The parsed value (any JSON type: the caller checks it is the object it expects).
    Raises:
        BadInputError: the file is unreadable, too large, not JSON, or nested too deeply (exit 3).
    """
    path = Path(path)
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BadInputError(f"cannot read {what} {path}: {exc.strerror or exc}", hint=hint) from None
    if len(data) > limit:
        raise BadInputError(f"{what} {path} is larger than {limit / 2**20:g} MiB; no {what} is that large", hint=hint)
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{what} {path} is not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})",
                            hint=hint) from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} {path} is not valid JSON ({exc})", hint=hint) from None
    except ValueError as exc:  # NaN / Infinity
        raise BadInputError(f"{what} {path} is not valid JSON ({exc})", hint=hint) from None
    except RecursionError:
        raise BadInputError(f"{what} {path} nests lists / objects too deeply to parse (the limit for {what}: "
                            f"{max_depth} levels)", hint=hint) from None
    if isinstance(value, (dict, list)) and _too_deep(value, max_depth):
        raise BadInputError(f"{what} {path} nests lists / objects more than {max_depth} levels deep (the limit for "
                            f"{what})", hint=hint)
    return value
