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

from hbi_runtime.errors import EXIT_INTERNAL, HbiError


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


def emit_json(payload: dict) -> None:
    """Write one JSON document to stdout (sorted keys, UTF-8, newline-terminated)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def guarded(*, json_mode: bool = False, debug: bool = False) -> Iterator[None]:
    """Run a command body; map exceptions to a message and ``SystemExit(code)``."""
    try:
        yield
    except HbiError as exc:
        if debug:
            traceback.print_exc()
        if json_mode:
            emit_json({"error": exc.to_json()})
        else:
            sys.stderr.write(f"error: {exc.message}\n")
            if exc.hint:
                sys.stderr.write(f"hint: {exc.hint}\n")
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    except (SystemExit, GeneratorExit):
        raise
    except Exception as exc:  # a bug, not a user mistake: say so, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        message = f"internal error: {type(exc).__name__}: {exc}"
        if json_mode:
            emit_json({"error": {"type": "InternalError", "message": message,
                                 "hint": "re-run with --debug and report the traceback"}})
        else:
            sys.stderr.write(f"error: {message}\nhint: re-run with --debug and report the traceback\n")
        raise SystemExit(EXIT_INTERNAL) from None
