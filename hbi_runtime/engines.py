"""TensorRT engines of a model package: the engine manifest, shared by the builder and the runtime (torch-free).

``hbi-export build-engine PKG --precision P`` writes one engine per graph into ``PKG/engines/P/`` with a manifest::

    engines/fp16/engines.json     this module's :class:`EngineSet` ("schema": "hbi.engines/1")
    engines/fp16/text_encoder.engine
    engines/fp16/video_encoder.engine
    engines/fp16/interaction.engine

An engine only runs where it was built for: the same ONNX graph, TensorRT version, GPU (name and compute
capability) and plugin library. Each :class:`EngineEntry` is keyed on all of them (plus precision and profiles),
and :func:`mismatches` lists every key that differs from a :class:`HostInfo`, so the runtime refuses an engine
with every reason at once and the command that rebuilds it (:meth:`EngineEntry.rebuild_command`).

Nothing here imports TensorRT or CUDA; the host facts are gathered by the caller (the TensorRT backend, doctor).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.package import (_Fields, _bool, _dict_of, _list_of, _one_of, _optional, _pos_int, _relpath, _sha256,
                                 _str, sha256_file)

SCHEMA = "hbi.engines/1"
ENGINES_DIR = "engines"
MANIFEST_NAME = "engines.json"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
REPRODUCE_KEYS = ("onnx", "trtexec", "polygraphy")


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis (``text_batch``) in an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) \
                or not self.min <= self.opt <= self.max:
            raise UsageError(f"an axis range needs 1 <= min <= opt <= max, got min={self.min}, opt={self.opt}, "
                             f"max={self.max}")

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class TensorProfile:
    """The min / opt / max shapes of one input in one optimization profile (what ``IOptimizationProfile`` takes)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> TensorProfile:
        f = _Fields(data, path, ("min", "opt", "max"))
        shapes = [f.get(k, _list_of(_pos_int)) for k in ("min", "opt", "max")]
        if len({len(s) for s in shapes}) != 1:
            raise BadInputError(f"{path}: min, opt and max have different ranks: {[list(s) for s in shapes]}")
        return cls(*shapes)


def dynamic_axes(inputs: Sequence[Any]) -> list[str]:
    """The named axes of a graph's inputs (``TensorSpec``s), in first-seen order."""
    names: list[str] = []
    for tensor in inputs:
        names += [a for a in tensor.shape if isinstance(a, str) and a not in names]
    return names


def profile_from_ranges(inputs: Sequence[Any], ranges: Mapping[str, AxisRange]) -> dict[str, TensorProfile]:
    """One optimization profile: input name -> min / opt / max shape, static axes as they are, every named axis
    from ``ranges`` (which must name them all)."""
    def shape(tensor_shape: Sequence[int | str], which: str) -> tuple[int, ...]:
        return tuple(getattr(ranges[a], which) if isinstance(a, str) else a for a in tensor_shape)

    return {t.name: TensorProfile(shape(t.shape, "min"), shape(t.shape, "opt"), shape(t.shape, "max"))
            for t in inputs}


def shape_spec(profile: Mapping[str, TensorProfile], which: str) -> str:
    """``input_ids:1x32,attention_mask:1x32``: one of a profile's shapes (``min``, ``opt``, ``max``) in the form
    trtexec (``--minShapes``) and ONNX Runtime's TensorRT provider (``trt_profile_min_shapes``) take."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(p, which))}" for name, p in profile.items())


def _reproduce(value: Any, path: str) -> dict[str, str]:
    items = _dict_of(_str)(value, path)
    unknown = sorted(set(items) - set(REPRODUCE_KEYS))
    if unknown:
        raise BadInputError(f"{path}: unknown field(s) {unknown}; this schema has {list(REPRODUCE_KEYS)}")
    return items


def _profiles(value: Any, path: str) -> tuple[dict[str, TensorProfile], ...]:
    items = _list_of(_dict_of(TensorProfile.from_dict))(value, path)
    if not items:
        raise BadInputError(f"{path}: an engine needs at least one optimization profile")
    return items


@dataclass(frozen=True, kw_only=True)
class EngineEntry:
    """One engine: its file and every input of its build (the keys the runtime checks).

    ``build_args`` are the ``hbi-export build-engine`` options that made it (for the rebuild command); the
    ``plugin_library`` path is informational, its ``plugin_library_sha256`` is the key.
    """

    graph: str
    file: str  # relative to the package
    sha256: str  # of the engine file
    onnx_file: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    precision: str  # ENGINE_PRECISIONS
    strongly_typed: bool
    profiles: tuple[dict[str, TensorProfile], ...]
    plugin_library: str | None = None
    plugin_library_sha256: str | None = None
    build_args: tuple[str, ...] = ()
    built: str = field(default_factory=_now_iso)
    # NVIDIA's tools on the same build: {"onnx": the graph as parsed, "trtexec": ..., "polygraphy": ...} (None in
    # manifests written before they were recorded)
    reproduce: Mapping[str, str] | None = None

    def to_dict(self) -> dict:
        return {"graph": self.graph, "file": self.file, "sha256": self.sha256, "onnx_file": self.onnx_file,
                "onnx_sha256": self.onnx_sha256, "tensorrt_version": self.tensorrt_version,
                "gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
                "precision": self.precision, "strongly_typed": self.strongly_typed,
                "profiles": [{k: p.to_dict() for k, p in prof.items()} for prof in self.profiles],
                "plugin_library": self.plugin_library, "plugin_library_sha256": self.plugin_library_sha256,
                "build_args": list(self.build_args), "built": self.built,
                "reproduce": dict(self.reproduce) if self.reproduce is not None else None}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> EngineEntry:
        names = ("graph", "file", "sha256", "onnx_file", "onnx_sha256", "tensorrt_version", "gpu_name",
                 "compute_capability", "precision", "strongly_typed", "profiles", "plugin_library",
                 "plugin_library_sha256", "build_args", "built", "reproduce")
        f = _Fields(data, path, names)
        return cls(graph=f.get("graph", _str), file=f.get("file", _relpath), sha256=f.get("sha256", _sha256),
                   onnx_file=f.get("onnx_file", _relpath), onnx_sha256=f.get("onnx_sha256", _sha256),
                   tensorrt_version=f.get("tensorrt_version", _str), gpu_name=f.get("gpu_name", _str),
                   compute_capability=f.get("compute_capability", _str),
                   precision=f.get("precision", _one_of(ENGINE_PRECISIONS)),
                   strongly_typed=f.get("strongly_typed", _bool), profiles=f.get("profiles", _profiles),
                   plugin_library=f.get("plugin_library", _optional(_str), None),
                   plugin_library_sha256=f.get("plugin_library_sha256", _optional(_sha256), None),
                   build_args=f.get("build_args", _list_of(_str), ()), built=f.get("built", _str),
                   reproduce=f.get("reproduce", _optional(_reproduce), None))

    def rebuild_command(self, pkg_dir: str | os.PathLike) -> str:
        """The ``hbi-export build-engine`` command that builds this engine again for the machine it runs on."""
        args = ["hbi-export", "build-engine", str(pkg_dir), "--precision", self.precision, *self.build_args]
        return " ".join(shlex.quote(a) for a in args)


@dataclass(frozen=True, kw_only=True)
class EngineSet:
    """The engines of one precision of one package (``engines/<precision>/engines.json``)."""

    package_sha256: str
    precision: str
    engines: dict[str, EngineEntry]
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return {"schema": self.schema, "package_sha256": self.package_sha256, "precision": self.precision,
                "engines": {k: e.to_dict() for k, e in self.engines.items()}}

    @classmethod
    def from_dict(cls, data: Any, path: str = "engines.json") -> EngineSet:
        f = _Fields(data, path, ("schema", "package_sha256", "precision", "engines"))
        schema = f.get("schema", _str)
        if schema != SCHEMA:
            raise MismatchError(f"{path}: engine manifest schema {schema!r} is not {SCHEMA!r}, the one this "
                                "toolkit reads", hint="rebuild the engines with this toolkit: "
                                                      "`hbi-export build-engine PKG`")
        engines = f.get("engines", _dict_of(EngineEntry.from_dict))
        return cls(package_sha256=f.get("package_sha256", _sha256),
                   precision=f.get("precision", _one_of(ENGINE_PRECISIONS)), engines=engines)

    def entry_for(self, onnx_file: str) -> EngineEntry | None:
        """The engine built from the package graph file ``onnx_file``, or None."""
        return next((e for e in self.engines.values() if e.onnx_file == onnx_file), None)


def engines_dir(pkg_dir: str | os.PathLike, precision: str) -> Path:
    """``PKG/engines/<precision>``."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"precision must be one of {list(ENGINE_PRECISIONS)}, got {precision!r}")
    return Path(pkg_dir) / ENGINES_DIR / precision


def built_precisions(pkg_dir: str | os.PathLike) -> list[str]:
    """The precisions that have an engine manifest in the package, in ENGINE_PRECISIONS order."""
    return [p for p in ENGINE_PRECISIONS if (engines_dir(pkg_dir, p) / MANIFEST_NAME).is_file()]


def read_engine_set(pkg_dir: str | os.PathLike, precision: str) -> EngineSet:
    """Read and validate ``PKG/engines/<precision>/engines.json``.

    Raises:
        BadInputError: no such manifest (hint: the build command), unreadable or malformed.
        MismatchError: an unknown engine manifest schema.
    """
    path = engines_dir(pkg_dir, precision) / MANIFEST_NAME
    if not path.is_file():
        built = built_precisions(pkg_dir)
        raise BadInputError(f"model package {pkg_dir} has no {precision} TensorRT engines ({path} is missing)"
                            + (f"; it has {', '.join(built)}" if built else ""),
                            hint=f"build them on this machine: `hbi-export build-engine {pkg_dir} --precision "
                                 f"{precision}`")
    from hbi_runtime.inputs import read_json

    raw = read_json(path, what="engine manifest",
                    hint=f"rebuild the engines: `hbi-export build-engine {pkg_dir} --precision {precision}`")
    return EngineSet.from_dict(raw, str(path))


def write_engine_set(pkg_dir: str | os.PathLike, engine_set: EngineSet) -> Path:
    """Validate ``engine_set`` and write it atomically to ``PKG/engines/<precision>/engines.json``."""
    body = EngineSet.from_dict(engine_set.to_dict()).to_dict()
    folder = engines_dir(pkg_dir, engine_set.precision)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / MANIFEST_NAME, json.dumps(body, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Matching an engine to the machine


@dataclass(frozen=True)
class HostInfo:
    """What this machine offers: TensorRT version, GPU, and the sha256 of the plugin library it would load."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    plugin_library_sha256: str | None = None


def mismatches(entry: EngineEntry, host: HostInfo, *, onnx_sha256: str | None = None) -> list[str]:
    """Every reason why ``entry`` cannot run on ``host`` (empty: it can).

    Args:
        entry: the engine's manifest entry.
        host: this machine.
        onnx_sha256: the package's current hash of the graph (None: not checked).
    """
    reasons = []
    if onnx_sha256 is not None and entry.onnx_sha256 != onnx_sha256:
        reasons.append(f"it was built from another export of {entry.onnx_file} (sha256 {entry.onnx_sha256[:12]}..., "
                       f"the package now has {onnx_sha256[:12]}...)")
    if entry.tensorrt_version != host.tensorrt_version:
        reasons.append(f"it was built with TensorRT {entry.tensorrt_version}, this machine has "
                       f"{host.tensorrt_version}")
    if entry.compute_capability != host.compute_capability:
        reasons.append(f"it was built for compute capability {entry.compute_capability}, this GPU has "
                       f"{host.compute_capability}")
    if entry.gpu_name != host.gpu_name:
        reasons.append(f"it was built on a {entry.gpu_name}, this GPU is a {host.gpu_name}")
    if entry.plugin_library_sha256 != host.plugin_library_sha256:
        if entry.plugin_library_sha256 is None:
            reasons.append("it was built without the hbi plugin library, which is loaded here")
        elif host.plugin_library_sha256 is None:
            reasons.append(f"it needs the hbi plugin library (sha256 {entry.plugin_library_sha256[:12]}...), "
                           "which is not loaded here")
        else:
            reasons.append(f"it was built with another hbi plugin library (sha256 "
                           f"{entry.plugin_library_sha256[:12]}..., here {host.plugin_library_sha256[:12]}...)")
    return reasons


def check_engine(pkg_dir: str | os.PathLike, entry: EngineEntry, host: HostInfo, *,
                 onnx_sha256: str | None = None, verify_hash: bool = True) -> Path:
    """The engine file of ``entry``, after checking that it exists, is intact and fits ``host``.

    Raises:
        BadInputError: the engine file is missing.
        MismatchError: the file was modified, or the engine does not fit this machine; every reason and the
            rebuild command are in the message and hint.
    """
    path = Path(pkg_dir) / entry.file
    rebuild = entry.rebuild_command(pkg_dir)
    if not path.is_file():
        raise BadInputError(f"engine {path} listed in the engine manifest is missing", hint=f"rebuild: `{rebuild}`")
    reasons = mismatches(entry, host, onnx_sha256=onnx_sha256)
    if verify_hash and (actual := sha256_file(path)) != entry.sha256:
        reasons.insert(0, f"the file was modified after the build (sha256 {actual[:12]}..., the manifest says "
                          f"{entry.sha256[:12]}...)")
    if reasons:
        raise MismatchError(f"refusing TensorRT engine {path}: " + "; ".join(reasons),
                            hint=f"rebuild it on this machine: `{rebuild}`")
    return path


def profile_covers(profiles: Sequence[Mapping[str, TensorProfile]], shapes: Mapping[str, Sequence[int]]) -> int:
    """The index of the first profile whose [min, max] range holds every shape of ``shapes``; -1 if none."""
    for i, profile in enumerate(profiles):
        if all(name in profile and len(shape) == len(profile[name].min)
               and all(lo <= s <= hi for s, lo, hi in zip(shape, profile[name].min, profile[name].max))
               for name, shape in shapes.items()):
            return i
    return -1


__all__ = ["ENGINE_PRECISIONS", "ENGINES_DIR", "MANIFEST_NAME", "REPRODUCE_KEYS", "SCHEMA", "AxisRange",
           "EngineEntry", "EngineSet", "HostInfo", "TensorProfile", "built_precisions", "check_engine",
           "dynamic_axes", "engines_dir", "mismatches", "profile_covers", "profile_from_ranges", "read_engine_set",
           "shape_spec", "write_engine_set"]
