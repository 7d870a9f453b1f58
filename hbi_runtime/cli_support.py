"""The one place where CLI commands turn exceptions into messages and exit codes.

Commands are thin: they call one library function inside :func:`guarded`. An :class:`HbiError` becomes
``error: <message>`` plus ``hint: <next step>`` on stderr (or ``{"error": {...}}`` on stdout in JSON mode) and
exits with the error's code. Anything else is a bug: exit 1, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sys
import traceback
from typing import Iterator

from hbi_runtime.errors import EXIT_INTERNAL, HbiError, environment_error
from hbi_runtime.names import printable


class OutputFormat(str, enum.Enum):
    """``--format`` of the commands that print either text for people or one JSON document for scripts."""

    text = "text"
    json = "json"


class TableFormat(str, enum.Enum):
    """``--format`` of the commands that print result rows: a table for people, one JSON document, JSON lines
    (one row each) or CSV. ``json`` and ``jsonl`` are the JSON modes (errors as JSON on stdout)."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"

    @property
    def is_json(self) -> bool:
        return self in (TableFormat.json, TableFormat.jsonl)


def csv_text(header: list[str], rows) -> str:
    """``header`` and ``rows`` (iterables of cells) as CSV text."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def json_text(payload, *, indent: int | None = 2, sort_keys: bool = True) -> str:
    """One JSON document as text: UTF-8 as it is, unless a string holds a lone surrogate (a non-UTF-8 file name
    decoded by ``os.fsdecode``), which cannot be written as UTF-8: then ASCII with ``\\uXXXX`` escapes."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=True)
    return text


def emit_json(payload: dict, *, one_line: bool = False) -> None:
    """Write one JSON document to stdout (sorted keys, UTF-8, newline-terminated; ``one_line`` for JSON lines)."""
    sys.stdout.write(json_text(payload, indent=None if one_line else 2) + "\n")
    sys.stdout.flush()


def _safe(text: str) -> str:
    """A message for the terminal: control characters escaped, its own line breaks kept."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


@contextlib.contextmanager
def guarded(*, json_mode: bool = False, debug: bool = False, json_lines: bool = False) -> Iterator[None]:
    """Run a command body; map exceptions to a message and ``SystemExit(code)``. In JSON mode the error is one
    JSON document on stdout (``json_lines``: on one line, as every line of a ``--format jsonl`` output is)."""
    try:
        yield
    except OSError as exc:  # a full disk, a size limit, a read-only folder: the machine, not a bug
        known = environment_error(exc, "cannot complete the command")
        if known is None:
            _internal(exc, json_mode, debug, json_lines)
        _report(known, json_mode, debug, json_lines)
    except HbiError as exc:
        _report(exc, json_mode, debug, json_lines)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except (SystemExit, GeneratorExit):
        raise
    except Exception as exc:  # a bug, not a user mistake: say so, keep the traceback for --debug
        _internal(exc, json_mode, debug, json_lines)


def _report(exc: HbiError, json_mode: bool, debug: bool, json_lines: bool = False) -> None:
    if debug:
        traceback.print_exc()
    if json_mode:
        emit_json({"error": exc.to_json()}, one_line=json_lines)
    else:  # names in messages may hold terminal escapes: never let them reach the terminal raw
        sys.stderr.write(f"error: {_safe(exc.message)}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {_safe(exc.hint)}\n")
    raise SystemExit(exc.exit_code) from None


def _internal(exc: Exception, json_mode: bool, debug: bool, json_lines: bool = False) -> None:
    if debug:
        traceback.print_exc()
    message = f"internal error: {type(exc).__name__}: {exc}"
    if json_mode:
        emit_json({"error": {"type": "InternalError", "message": message,
                             "hint": "re-run with --debug and report the traceback"}}, one_line=json_lines)
    else:
        sys.stderr.write(f"error: {_safe(message)}\nhint: re-run with --debug and report the traceback\n")
    raise SystemExit(EXIT_INTERNAL) from None
