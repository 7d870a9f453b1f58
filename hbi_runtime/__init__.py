"""hbi_runtime: the torch-free half of hbi-toolkit.

Everything that runs on a deployment box lives here: model packages (:mod:`hbi_runtime.package`), the
tokenizer, video decoding (:mod:`hbi_runtime.video`), backends (:mod:`hbi_runtime.backends`), the side types and
reference scoring (:mod:`hbi_runtime.sides`), the error hierarchy (:mod:`hbi_runtime.errors`) and the ``hbi-run``
CLI. The Python API::

    import hbi_runtime
    with hbi_runtime.load("pkg/") as model:
        texts = model.encode_text(["a dog runs on the beach"])
        videos = model.encode_videos(["clip.mp4"]).side
        scores = model.score(texts, videos)  # (texts, videos)

This package must import in an environment without torch (tests/test_packaging.py holds it to that);
optional backends (onnxruntime, tensorrt, decord, av) are imported lazily where they are used.
"""

from __future__ import annotations

from hbi_runtime.model import Model, load  # imports nothing heavy
from hbi_runtime.version import DIST_NAME, __version__

__all__ = ["DIST_NAME", "Model", "__version__", "load"]
