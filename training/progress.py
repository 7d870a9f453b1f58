"""Run reporting: a JSON-lines metrics log and a progress bar with ETA (rich when installed, else stderr lines)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


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
    """Steps done / total, elapsed, ETA and the latest loss; silent when ``enabled`` is False.

    Uses ``rich`` (a Typer dependency) when importable; otherwise prints a line to stderr every ``every`` steps.
    """

    def __init__(self, total: int, start: int, description: str, enabled: bool = True, every: int = 10) -> None:
        self.total, self.done, self.every, self.enabled = total, start, every, enabled
        self.t0, self.start = time.monotonic(), start
        self._rich = None
        if not enabled:
            return
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
        except ImportError:
            return
        self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), transient=False)
        self._task = self._rich.add_task(description, total=total, completed=start, info="")
        self._rich.start()

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
