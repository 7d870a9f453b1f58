"""The backend contract: one ONNX graph (or engine) that turns a feed of named arrays into named arrays.

A backend is built in two steps, as Polygraphy's runners are: the constructor only records the graph's spec, its
file and the options (and checks the options); :meth:`Backend.load` does the heavy work (an ONNX Runtime session,
later a TensorRT engine). :meth:`Backend.infer` validates the feed against the spec *once, here in the base*, then
calls the concrete :meth:`Backend._infer`, so a concrete backend only maps a checked feed to its runtime.

Feed rules (the manifest's :class:`~hbi_runtime.package.TensorSpec`): exactly the graph's input names; numpy
arrays of the spec's dtype and rank; static axes equal; a named (dynamic) axis at least 1 and of the same size in
every input that shares the name (``text_batch`` of ``input_ids`` and ``attention_mask``). Errors read as
Polygraphy's::

    Input tensor: frames | Received incompatible shape: (2, 8, 3, 224). Note: Expected a shape compatible with:
    (video_batch, 12, 3, 224, 224)
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.package import GraphSpec, TensorSpec


def format_shape(shape: Sequence[int | str]) -> str:
    """``(video_batch, 12, 3)``: axis names unquoted, a 1-d shape as ``(3,)`` (Python's tuple spelling)."""
    items = [str(d) for d in shape]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _shape_error(spec: TensorSpec, shape: tuple, note: str = "") -> BadInputError:
    return BadInputError(f"Input tensor: {spec.name} | Received incompatible shape: {format_shape(shape)}. "
                         f"Note: Expected a shape compatible with: {format_shape(spec.shape)}{note}")


def validate_feed(specs: Sequence[TensorSpec], feed: Any) -> None:
    """Check a feed against a graph's input specs (see the module docstring for the rules).

    Raises:
        BadInputError: the first violation, naming the input tensor, what was received and what was expected.
    """
    if not isinstance(feed, Mapping):
        raise BadInputError(f"Feed | Received {type(feed).__name__}. Note: Expected a dict of input name -> "
                            "numpy array")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feed]
    if missing:
        raise BadInputError(f"Input tensor: {', '.join(missing)} | Missing from the feed. Note: Expected "
                            f"inputs: {names}")
    extra = [str(n) for n in feed if n not in names]
    if extra:
        raise BadInputError(f"Input tensor: {', '.join(extra)} | Not an input of this graph. Note: Expected "
                            f"inputs: {names}")
    axes: dict[str, tuple[int, str]] = {}  # dynamic axis name -> (size, input that fixed it)
    for spec in specs:
        _check_tensor(spec, feed[spec.name], axes)


def _check_tensor(spec: TensorSpec, value: Any, axes: dict[str, tuple[int, str]]) -> None:
    if not isinstance(value, np.ndarray):
        raise BadInputError(f"Input tensor: {spec.name} | Received {type(value).__name__}. Note: Expected a "
                            f"numpy.ndarray of dtype {spec.dtype}")
    if value.dtype != np.dtype(spec.dtype):
        raise BadInputError(f"Input tensor: {spec.name} | Received unexpected dtype: {value.dtype}. "
                            f"Note: Expected type: {spec.dtype}")
    if value.ndim != len(spec.shape):
        raise _shape_error(spec, value.shape)
    for size, axis in zip(value.shape, spec.shape):
        if isinstance(axis, int):
            if size != axis:
                raise _shape_error(spec, value.shape)
        elif size < 1:
            raise _shape_error(spec, value.shape, f", with {axis} >= 1")
        elif axis in axes and axes[axis][0] != size:
            known, source = axes[axis]
            raise _shape_error(spec, value.shape, f", where {axis} = {known} (from input {source})")
        else:
            axes.setdefault(axis, (size, spec.name))


class Backend(abc.ABC):
    """One graph of a model package, runnable: ``load()`` -> ``infer(feed)`` ... -> ``close()``.

    Usable as a context manager (``with backend: ...`` loads and closes). Subclasses set :attr:`name`, take their
    options as keyword-only constructor arguments (checked there, without importing anything heavy) and implement
    :meth:`_load`, :meth:`_infer` and :meth:`_close`.

    Args:
        spec: the graph's spec from the manifest (input / output names, dtypes, axes).
        path: the graph file (``.onnx``; an engine for later backends).
    """

    name: ClassVar[str] = "backend"

    def __init__(self, spec: GraphSpec, path: str | os.PathLike) -> None:
        if not isinstance(spec, GraphSpec):
            raise UsageError(f"{type(self).__name__} needs a GraphSpec, got {type(spec).__name__}")
        self.spec = spec
        self.path = Path(path)
        self._active = False

    # ------------------------------------------------------------------ contract

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The graph inputs, in graph order."""
        return self.spec.inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The graph outputs, in graph order (the keys of :meth:`infer`'s result)."""
        return self.spec.outputs

    @property
    def is_active(self) -> bool:
        """True between :meth:`load` and :meth:`close`."""
        return self._active

    def load(self) -> Backend:
        """Build the runtime object (session, engine). Idempotent; returns ``self``.

        Raises:
            MissingDependencyError, UsageError, BadInputError, MismatchError: as the concrete backend documents.
        """
        if not self._active:
            self._load()
            self._active = True
        return self

    def validate(self, feed: Mapping[str, np.ndarray]) -> None:
        """Check ``feed`` against :attr:`input_specs` without running anything (BadInputError on a violation)."""
        validate_feed(self.input_specs, feed)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on one feed.

        Args:
            feed: input name -> numpy array, exactly the graph's inputs.
        Returns:
            Output name -> numpy array, for every output of :attr:`output_specs`, in that order.
        Raises:
            UsageError: the backend is not loaded.
            BadInputError: the feed does not fit the input specs.
        """
        if not self._active:
            raise UsageError(f"{self!r} is not loaded", hint="call load() first, or use it in a `with` block")
        self.validate(feed)
        return self._infer(feed)

    def close(self) -> None:
        """Release the runtime object. Idempotent; a closed backend can be loaded again."""
        if self._active:
            self._close()
            self._active = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({str(self.path)!r}{options}, {'loaded' if self._active else 'not loaded'})"

    # ------------------------------------------------------------------ for subclasses

    def describe(self) -> dict[str, Any]:
        """The options worth showing in ``repr`` and in reports."""
        return {}

    @abc.abstractmethod
    def _load(self) -> None:
        """Build the runtime object."""

    @abc.abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a validated feed; return every output by name."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the runtime object."""
