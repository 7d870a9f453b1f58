"""Optimization profiles as data: from a graph's named (dynamic) axes and min / opt / max per axis.

Every dynamic axis of a package graph is a batch axis (``text_batch``, ``video_batch``); all other axes are static
in the manifest. A profile gives each input the min / opt / max shape that TensorRT builds for: static axes as they
are, each named axis from its :class:`~hbi_runtime.engines.AxisRange`. ``--min-batch / --opt-batch / --max-batch``
set the range of every axis; ``--axis text_batch=1:16:64`` overrides one (the interaction graph has two).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from hbi_runtime.engines import AxisRange, TensorProfile, profile_from_ranges
from hbi_runtime.engines import dynamic_axes as _input_axes
from hbi_runtime.errors import UsageError
from hbi_runtime.package import GraphSpec

DEFAULT_BATCH = AxisRange(1, 8, 32)


def dynamic_axes(spec: GraphSpec) -> list[str]:
    """The named axes of a graph's inputs, in first-seen order."""
    return _input_axes(spec.inputs)


def parse_axis_override(text: str) -> tuple[str, AxisRange]:
    """``"text_batch=1:16:64"`` -> ``("text_batch", AxisRange(1, 16, 64))``.

    Raises:
        UsageError: not ``NAME=MIN:OPT:MAX`` with integers 1 <= min <= opt <= max.
    """
    name, sep, values = text.partition("=")
    parts = values.split(":")
    if not sep or not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--axis takes NAME=MIN:OPT:MAX, got {text!r}", hint="e.g. --axis video_batch=1:16:64")
    return name.strip(), AxisRange(*(int(p) for p in parts))


def derive_profile(spec: GraphSpec, default: AxisRange = DEFAULT_BATCH,
                   overrides: Mapping[str, AxisRange] | None = None) -> dict[str, TensorProfile]:
    """One optimization profile for ``spec``: input name -> min / opt / max shape.

    Args:
        spec: the graph's spec from the package manifest.
        default: the range of every named axis without an override.
        overrides: ranges of particular axes (names of this graph's axes only).
    Raises:
        UsageError: an override names an axis the graph does not have.
    """
    overrides = dict(overrides or {})
    axes = dynamic_axes(spec)
    unknown = sorted(set(overrides) - set(axes))
    if unknown:
        raise UsageError(f"graph inputs have no axis {unknown}; the dynamic axes are {axes}")
    return profile_from_ranges(spec.inputs, {a: overrides.get(a, default) for a in axes})


def graph_overrides(spec: GraphSpec, overrides: Mapping[str, AxisRange]) -> dict[str, AxisRange]:
    """The overrides that apply to this graph (``--axis`` options name axes of any graph of the package)."""
    axes = set(dynamic_axes(spec))
    return {k: v for k, v in overrides.items() if k in axes}


def check_overrides_known(specs: Sequence[GraphSpec], overrides: Mapping[str, AxisRange]) -> None:
    """Every ``--axis`` name belongs to some graph (a typo must not build an engine with the default range)."""
    known = {a for s in specs for a in dynamic_axes(s)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"--axis names {unknown}, which no graph has; the package's dynamic axes are "
                         f"{sorted(known)}")
