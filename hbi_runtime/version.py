"""The toolkit's name and version, from the installed distribution's metadata.

Its own module, importing nothing of hbi_runtime: modules that :mod:`hbi_runtime`'s ``__init__`` imports
(``model`` -> ``backends`` -> ``package``) read the version from here, never from the package itself, so no
import loop depends on the order of the statements in ``__init__``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DIST_NAME = "hbi-toolkit"

try:
    __version__ = version(DIST_NAME)
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["DIST_NAME", "__version__"]
