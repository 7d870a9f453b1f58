"""``hbi-export build-engine``: every graph of a model package -> a TensorRT engine + the engine manifest.

The orchestration only; how one graph is built is :mod:`hbi_export.trt.builder`. Seams for tests: ``trt`` (the
tensorrt module) and ``device`` (:class:`hbi_runtime.backends.cuda.DeviceInfo`); production passes neither.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from hbi_export.trt.builder import (BuildPlan, build_serialized, has_qdq, import_polygraphy, parse_version,
                                    plan_build, prepare_onnx, reproducer_lines, require_qdq, resolve_precision)
from hbi_export.trt.profiles import DEFAULT_BATCH, check_overrides_known, derive_profile, graph_overrides
from hbi_runtime.backends.cuda import Cuda, DeviceInfo
from hbi_runtime.backends.tensorrt import import_tensorrt, load_plugin_library
from hbi_runtime.engines import AxisRange, EngineEntry, EngineSet, engines_dir, write_engine_set
from hbi_runtime.errors import MissingDependencyError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.package import GRAPH_NAMES, load_package

SCHEMA = "hbi.build-engine/1"


@dataclass(frozen=True)
class EngineOptions:
    """What ``hbi-export build-engine`` was asked for (``build_args`` rebuild it: they go into the manifest)."""

    precision: str = "auto"  # or fp32 / fp16 / int8 (builder.resolve_precision)
    batch: AxisRange = DEFAULT_BATCH
    axes: Mapping[str, AxisRange] = field(default_factory=dict)
    workspace_mb: int = 4096
    timing_cache: Path | None = None
    plugins: Path | None = None
    strongly_typed: bool = False
    graphs: tuple[str, ...] = GRAPH_NAMES

    def build_args(self) -> tuple[str, ...]:
        args = ["--min-batch", str(self.batch.min), "--opt-batch", str(self.batch.opt), "--max-batch",
                str(self.batch.max), "--workspace", str(self.workspace_mb)]
        for name, r in sorted(self.axes.items()):
            args += ["--axis", f"{name}={r.min}:{r.opt}:{r.max}"]
        if self.plugins is not None:
            args += ["--plugins", str(self.plugins)]
        if self.strongly_typed:
            args.append("--strongly-typed")
        return tuple(args)


def _load_onnx(path: Path) -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(f"onnx is not installed ({exc}); building engines needs it",
                                     hint="pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url "
                                          "https://pypi.nvidia.com") from exc
    return onnx.load(str(path))


def _write_atomic(path: Path, data: bytes) -> str:
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def build_package_engines(pkg_dir: str | os.PathLike, options: EngineOptions, *, allow_unverified: bool = False,
                          trt: Any = None, device: DeviceInfo | None = None,
                          progress: Callable[[str], None] = lambda _: None) -> dict:
    """Build one engine per graph into ``PKG/engines/<precision>/`` and write its engine manifest.

    Returns:
        The JSON-ready summary (``"schema": "hbi.build-engine/1"``).
    Raises:
        MissingDependencyError: no tensorrt / onnx / cuda-python. UsageError: a precision this package or this
        TensorRT cannot give, an unknown ``--axis``. MismatchError: a graph TensorRT cannot parse. BadInputError,
        GateFailedError: the package (as ``load_package``).
    """
    package = load_package(pkg_dir, allow_unverified=allow_unverified)
    specs = [package.graph(g) for g in options.graphs]
    check_overrides_known(specs, options.axes)
    trt = trt if trt is not None else import_tensorrt()
    version = parse_version(trt.__version__)
    import_polygraphy(version)  # the install hint before any work
    device = device if device is not None else Cuda().device_info(0)
    plugin_sha = load_plugin_library(trt, options.plugins) if options.plugins is not None else None
    models = {name: _load_onnx(package.graph_path(name)) for name in options.graphs}
    quantized = {name: has_qdq(m) for name, m in models.items()}
    precision, auto_note = resolve_precision(options.precision, version, strongly_typed=options.strongly_typed,
                                             graph_precisions={g: s.precision for g, s in zip(options.graphs, specs)},
                                             quantized=quantized)
    require_qdq(precision, quantized)
    plans: dict[str, BuildPlan] = {
        name: plan_build(version, precision, graph_precision=spec.precision, has_qdq=quantized[name],
                         strongly_typed=options.strongly_typed, plugins_loaded=plugin_sha is not None)
        for name, spec in zip(options.graphs, specs)}  # every graph planned (and refused) before any build
    out_dir = engines_dir(package.dir, precision)
    entries, report = {}, []
    for name, spec in zip(options.graphs, specs):
        model, plan = models[name], plans[name]
        original = model.SerializeToString()
        model, dropped = prepare_onnx(model, drop_plugin_functions=plan.drop_plugin_functions)
        data = model.SerializeToString()
        onnx_path = package.graph_path(name)
        parsed_path = onnx_path
        if data != original:  # what TensorRT parses differs from the package's file: keep it for the reproducers
            parsed_path = out_dir / f"{name}.parsed.onnx"
            write_atomic(parsed_path, data)
        profile = derive_profile(spec, options.batch, graph_overrides(spec, options.axes))
        progress(f"building {name} ({precision}, TensorRT {trt.__version__}, {device.name})")
        result = build_serialized(trt, data, onnx_path, plan, profile, workspace_mb=options.workspace_mb,
                                  timing_cache=options.timing_cache)
        rel = f"{out_dir.relative_to(package.dir).as_posix()}/{name}.engine"
        digest = _write_atomic(package.dir / rel, result.engine)
        reproduce = reproducer_lines(
            plan, profile, onnx=str(parsed_path), package_onnx=str(onnx_path), workspace_mb=options.workspace_mb,
            timing_cache=str(options.timing_cache) if options.timing_cache is not None else None,
            plugins=str(options.plugins) if options.plugins is not None else None, pinned=result.pinned)
        entries[name] = EngineEntry(
            graph=name, file=rel, sha256=digest, onnx_file=spec.file, onnx_sha256=spec.sha256,
            tensorrt_version=str(trt.__version__), gpu_name=device.name,
            compute_capability=device.compute_capability, precision=precision,
            strongly_typed=plan.strongly_typed, profiles=(profile,),
            plugin_library=str(options.plugins) if options.plugins is not None else None,
            plugin_library_sha256=plugin_sha, build_args=options.build_args(), reproduce=reproduce)
        report.append({"graph": name, "engine": rel, "bytes": len(result.engine), "precision": plan.precision,
                       "flags": list(plan.flags), "cleared_flags": list(plan.clear_flags), "tf32": plan.tf32,
                       "strongly_typed": plan.strongly_typed, "pinned_fp32_layers": result.pinned_layers,
                       "plugin_layers": result.plugin_layers, "functions_dropped": dropped,
                       "notes": list(plan.notes), "warnings": result.warnings,
                       "profile": {k: p.to_dict() for k, p in profile.items()}, "reproduce": reproduce})
    manifest = write_engine_set(package.dir, EngineSet(package_sha256=package.manifest_sha256,
                                                       precision=precision, engines=entries))
    return {"schema": SCHEMA, "package": str(package.dir), "package_sha256": package.manifest_sha256,
            "precision": precision, "requested_precision": options.precision,
            "notes": [auto_note] if auto_note else [], "tensorrt_version": str(trt.__version__),
            "gpu": {"name": device.name, "compute_capability": device.compute_capability},
            "plugin_library_sha256": plugin_sha, "engine_manifest": str(manifest), "engines": report}


def render_text(summary: dict) -> str:
    lines = [f"{summary['precision']} engines for {summary['package']} (TensorRT {summary['tensorrt_version']}, "
             f"{summary['gpu']['name']}, sm {summary['gpu']['compute_capability']})"]
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    for e in summary["engines"]:
        lines.append(f"  {e['graph']:<14} {e['engine']}  {e['bytes'] / 2**20:.1f} MiB  plugin layers "
                     f"{e['plugin_layers']}  fp32-pinned {e['pinned_fp32_layers']}  "
                     f"tf32 {'on' if e['tf32'] else 'off'}")
        lines += [f"      note: {n}" for n in e["notes"]]
        if e["warnings"]:
            lines.append(f"      {len(e['warnings'])} TensorRT / Polygraphy warning(s) (--format json lists them)")
        lines.append(f"      trtexec:    {e['reproduce']['trtexec']}")
        lines.append(f"      polygraphy: {e['reproduce']['polygraphy']}")
    lines.append(f"engine manifest: {summary['engine_manifest']}")
    return "\n".join(lines)
