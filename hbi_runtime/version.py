"""The toolkit's name and version: the one place the version is written (pyproject reads it from here).

A literal, not a lookup in the installed distribution's metadata: ``importlib.metadata`` costs about 25 ms of every
``hbi-run`` start (docs/bench.md, "Cold start"), and pyproject's ``[tool.setuptools.dynamic]`` reads this
assignment without importing the package, so the installed metadata and ``__version__`` cannot differ
(tests/test_packaging.py checks them against each other).

Its own module, importing nothing of hbi_runtime: modules that :mod:`hbi_runtime`'s ``__init__`` imports
(``model`` -> ``backends`` -> ``package``) read the version from here, never from the package itself, so no
import loop depends on the order of the statements in ``__init__``.
"""

from __future__ import annotations

DIST_NAME = "hbi-toolkit"
__version__ = "0.1.0"

__all__ = ["DIST_NAME", "__version__"]
