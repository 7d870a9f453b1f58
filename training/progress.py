"""Run reporting: a JSON-lines metrics log, and what a long run is doing on a terminal.

On a terminal, an ``hbi-train`` command shows one line per stage with its elapsed time (:func:`stages`: the house
:class:`hbi_runtime.cli_options.Steps`) and, while a training loop runs, a step bar with ETA and the latest loss
(:class:`ProgressBar`) nested under the stage lines: both draw on one rich console on stderr (:func:`console`).
Both are silent when disabled (``--format json``, ``--no-progress``) or when stderr is not a terminal, so logs,
pipes and JSON output stay clean; ``metrics.jsonl`` records the run either way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hbi_runtime.cli_options import Steps

Say = Callable[[str], None]  # a stage message: ``say("video side of the train split")``

_CONSOLE = None


def console():
    """The one rich console (stderr) of the stage lines and the step bars."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def stages(enabled: bool = True) -> Steps:
    """Stage lines on :func:`console` (a context manager; call it with each stage's message as the stage
    starts). Silent when ``enabled`` is False or stderr is not a terminal."""
    return Steps(enabled, console=console())


def on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class MetricsLog:
    """Appends one JSON object per line to ``path`` (a resumed run continues the same file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


class ProgressBar:
    """Steps done / total, elapsed, ETA and the latest loss, on stderr; silent when ``enabled`` is False or stderr
    is not a terminal.

    Uses ``rich`` (a Typer dependency) when importable, on :func:`console` (nested under the stage lines of
    :func:`stages` when they are showing); otherwise prints a line every ``every`` steps.
    """

    def __init__(self, total: int, start: int, description: str, enabled: bool = True, every: int = 10) -> None:
        self.total, self.done, self.every, self.enabled = total, start, every, enabled and on_terminal()
        self.t0, self.start = time.monotonic(), start
        self._rich = None
        if not self.enabled:
            return
        try:
            from rich.errors import LiveError
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
        except ImportError:
            return
        self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), console=console(), transient=False)
        self._task = self._rich.add_task(description, total=total, completed=start, info="")
        try:
            self._rich.start()
        except LiveError:  # rich before 14 cannot nest live displays: the stage line alone then
            self._rich, self.enabled = None, False

    def update(self, step: int, info: str) -> None:
        self.done = step
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.start) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            sys.stderr.write(f"step {step}/{self.total}  {info}  eta {_hms(eta)}\n")

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
