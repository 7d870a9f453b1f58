"""Backends: what runs one graph of a model package (docs/architecture.md, "Backends").

* :mod:`hbi_runtime.backends.base`: the contract (:class:`Backend`: ``load``, ``input_specs`` / ``output_specs``,
  ``infer(dict) -> dict``, ``close``, ``with``) and the feed validation every backend shares;
* :mod:`hbi_runtime.backends.onnxruntime`: :class:`OrtBackend` (CPU; CUDA / TensorRT providers with
  onnxruntime-gpu);
* :mod:`hbi_runtime.backends.tensorrt`: :class:`TrtBackend` (``"trt"``: engines from ``hbi-export build-engine``);
* :mod:`hbi_runtime.backends.triton`: :class:`TritonBackend` (``"triton"``: the encoders on a Triton server).

Backends are chosen by name from :data:`BACKENDS`, an explicit dict (a new backend is one line here). Importing
this package imports no runtime library: each backend imports its own in ``load()``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from hbi_runtime.backends.base import Backend, validate_feed
from hbi_runtime.backends.onnxruntime import OrtBackend
from hbi_runtime.backends.tensorrt import TrtBackend
from hbi_runtime.backends.triton import TritonBackend
from hbi_runtime.errors import UsageError
from hbi_runtime.package import GraphSpec

BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OrtBackend,
    "trt": TrtBackend,
    "triton": TritonBackend,
}


def backend_options(name: str) -> tuple[str, ...]:
    """The keyword options backend ``name`` accepts (its constructor's keyword-only parameters)."""
    params = inspect.signature(_backend_class(name).__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def create_backend(name: str, spec: GraphSpec, path: str | os.PathLike, **options: Any) -> Backend:
    """A backend of kind ``name`` for one graph, not loaded yet (call ``load()`` or use ``with``).

    Args:
        name: a key of :data:`BACKENDS`.
        spec: the graph's spec from the manifest.
        path: the graph file.
        options: the backend's options (e.g. ``providers="cuda"`` for ``onnxruntime``).
    Raises:
        UsageError: unknown backend, an option it does not have, or a bad option value.
    """
    cls = _backend_class(name)
    unknown = sorted(set(options) - set(backend_options(name)))
    if unknown:
        raise UsageError(f"backend {name!r} has no option(s) {unknown}; its options are "
                         f"{list(backend_options(name))}")
    return cls(spec, path, **options)


def _backend_class(name: str) -> type[Backend]:
    if not isinstance(name, str) or name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "Backend", "OrtBackend", "TrtBackend", "TritonBackend", "backend_options", "create_backend", "validate_feed"]
