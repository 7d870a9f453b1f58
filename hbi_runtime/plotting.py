"""matplotlib, for the commands that draw (``bench --plot``, ``explain``'s heatmaps): optional (the ``plot``
extra), imported only when drawing, and through its object API (no pyplot: no global state, no display)."""

from __future__ import annotations

from hbi_runtime.errors import MissingDependencyError


def figure_class(what: str, instead: str):
    """matplotlib's ``Figure``; without matplotlib a :class:`MissingDependencyError` saying that ``what`` needs
    it and what works ``instead``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(f"{what} need(s) matplotlib ({exc})",
                                     hint=f"pip install 'hbi-toolkit[plot]' (or pip install matplotlib); {instead}"
                                     ) from exc
    return Figure
