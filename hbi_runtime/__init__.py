"""hbi_runtime: the torch-free half of hbi-toolkit.

Everything that runs on a deployment box lives here: the side types and reference scoring
(:mod:`hbi_runtime.sides`), the error hierarchy (:mod:`hbi_runtime.errors`) and the ``hbi-run`` CLI.
This package must import in an environment without torch (tests/test_packaging.py holds it to that);
optional backends (onnxruntime, tensorrt, decord, av) are imported lazily where they are used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DIST_NAME = "hbi-toolkit"

try:
    __version__ = version(DIST_NAME)
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["DIST_NAME", "__version__"]
