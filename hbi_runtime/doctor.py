"""What this environment can run: toolkit, Python, platform, numpy, and each optional backend.

Used by ``hbi-run doctor``. Backends are probed without side effects on the process that matter: torch is
never imported (its presence and version come from the import system and the installed metadata), the others
are imported inside a guard so that a broken install is reported, not raised.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

import numpy as np

import hbi_runtime
from hbi_runtime.backends.cuda import probe_device
from hbi_runtime.backends.tensorrt import PLUGINS_ENV, default_plugin_library
from hbi_runtime.engines import HostInfo, built_precisions, mismatches, read_engine_set
from hbi_runtime.errors import HbiError
from hbi_runtime.package import load_package, sha256_file

SCHEMA = "hbi.doctor/1"


@dataclass(frozen=True)
class BackendProbe:
    """How to look at one optional backend.

    Attributes:
        module: the import name.
        distributions: distribution names that provide it, first installed one wins (e.g. onnxruntime-gpu).
        import_it: import the module to prove it loads; False for torch, which the runtime must never import.
    """

    module: str
    distributions: tuple[str, ...]
    import_it: bool = True


@dataclass
class BackendReport:
    found: bool  # the import system can locate the module
    version: str | None = None
    distribution: str | None = None
    imported: bool | None = None  # None: not attempted (torch), or not found
    error: str | None = None
    details: dict = field(default_factory=dict)


BACKENDS = (
    BackendProbe("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    BackendProbe("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_lean", "tensorrt_dispatch")),
    BackendProbe("torch", ("torch",), import_it=False),
    BackendProbe("decord", ("decord", "eva-decord")),
    BackendProbe("av", ("av",)),
)


def _installed_version(distributions: tuple[str, ...]) -> tuple[str | None, str | None]:
    for dist in distributions:
        try:
            return version(dist), dist
        except PackageNotFoundError:
            continue
    return None, None


def _details(module: object) -> dict:
    """Backend-specific facts worth reporting (onnxruntime's execution providers)."""
    providers = getattr(module, "get_available_providers", None)
    return {"providers": list(providers())} if callable(providers) else {}


def probe_backend(probe: BackendProbe) -> BackendReport:
    """Find, version and (unless ``import_it`` is False) import one backend; never raises for a broken install."""
    try:
        found = importlib.util.find_spec(probe.module) is not None
    except (ImportError, ValueError) as exc:  # a broken parent package or a blocked import
        return BackendReport(found=False, error=f"{type(exc).__name__}: {exc}")
    ver, dist = _installed_version(probe.distributions)
    report = BackendReport(found=found, version=ver, distribution=dist)
    if not found or not probe.import_it:
        return report
    try:
        module = importlib.import_module(probe.module)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is the finding itself
        report.imported, report.error = False, f"{type(exc).__name__}: {exc}"
        return report
    report.imported = True
    report.version = report.version or getattr(module, "__version__", None)
    report.details = _details(module)
    return report


def collect(packages: Sequence[str | os.PathLike] = (), *, cudart: Any = None) -> dict:
    """The doctor report as a JSON-ready dict carrying ``"schema": "hbi.doctor/1"``.

    Args:
        packages: model packages to judge (usable here with which backend, and the next step when not).
        cudart: the CUDA runtime module to probe GPUs with (a test seam; default: cuda-python if installed).
    """
    backends = {p.module: asdict(probe_backend(p)) for p in BACKENDS}
    gpu = probe_gpu(cudart)
    plugins = probe_plugins()
    return {
        "schema": SCHEMA,
        "toolkit": {"distribution": hbi_runtime.DIST_NAME, "version": hbi_runtime.__version__},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform()},
        "numpy": {"version": np.__version__},
        "scoring": probe_scoring(),
        "backends": backends,
        "gpu": gpu,
        "plugins": plugins,
        "packages": [judge_package(p, backends, gpu, plugins) for p in packages],
    }


def probe_scoring() -> dict:
    """Which scorer ``auto`` takes for int8 indexes: the native kernel when built and runnable here, and which of
    its paths (``amx``, ``avx512``) this machine runs, with AMX's status (``ok``, ``no-cpu``, ``refused``)."""
    from hbi_runtime.scoring.native import amx_status, available_paths, native_available

    native = native_available()
    return {"native_int8": native, "paths": list(available_paths()), "amx": amx_status() if native else "no-cpu",
            "next": None if native else "int8 indexes are scored with ONNX Runtime (the native kernel needs x86-64 "
                                        "with AVX-512 VNNI and a C compiler at install time)"}


# ----------------------------------------------------------------------------------------------------------------
# GPU, plugin library, packages and engines (TensorRT)


def probe_gpu(cudart: Any = None) -> dict:
    """cuda-python's version and every visible GPU (name, compute capability, memory, driver / runtime CUDA)."""
    ver, dist = _installed_version(("cuda-python", "cuda-bindings"))
    if cudart is None and ver is None:
        return {"cuda_python": None, "devices": [], "error": "cuda-python is not installed (pip install cuda-python)"}
    devices, error = probe_device(cudart)
    return {"cuda_python": ver, "devices": [d.to_dict() for d in devices], "error": error}


def probe_plugins() -> dict:
    """The hbi TensorRT plugin library named by $HBI_TRT_PLUGINS: present? sha256?"""
    path = default_plugin_library()
    if path is None:
        return {"library": None, "exists": False, "sha256": None,
                "next": f"build it (docs/tensorrt.md) and export {PLUGINS_ENV}=/path/libhbi_trt_plugins.so"}
    if not path.is_file():
        return {"library": str(path), "exists": False, "sha256": None,
                "next": f"{PLUGINS_ENV} names a missing file; build the library (docs/tensorrt.md)"}
    return {"library": str(path), "exists": True, "sha256": sha256_file(path), "next": None}


def _host(backends: dict, gpu: dict, plugins: dict) -> HostInfo | None:
    trt = backends.get("tensorrt", {})
    if not trt.get("imported") or not gpu["devices"]:
        return None
    dev = gpu["devices"][0]
    return HostInfo(str(trt["version"]), dev["name"], dev["compute_capability"], plugins["sha256"])


def _trt_blocker(backends: dict, gpu: dict) -> str | None:
    trt = backends.get("tensorrt", {})
    if not gpu["devices"]:
        return f"no CUDA GPU visible ({gpu['error'] or 'none found'}): TensorRT engines cannot run here"
    if not trt.get("imported"):
        return ("TensorRT is not importable here: pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url "
                "https://pypi.nvidia.com (Jetson: JetPack's TensorRT)")
    return None


def judge_packages(report: dict, packages: Sequence[str | os.PathLike]) -> list[dict]:
    """:func:`judge_package` for each package, against the facts of a :func:`collect` report."""
    return [judge_package(p, report["backends"], report["gpu"], report["plugins"]) for p in packages]


def judge_package(pkg_dir: str | os.PathLike, backends: dict, gpu: dict, plugins: dict) -> dict:
    """Is the package usable here with onnxruntime and with TensorRT (each engine set), and what to do if not."""
    out: dict = {"package": str(pkg_dir), "ok": False, "error": None, "onnxruntime": None, "engines": []}
    try:
        package = load_package(pkg_dir)
    except HbiError as exc:
        out["error"] = {"message": exc.message, "next": exc.hint}
        return out
    out["ok"] = True
    ort = backends.get("onnxruntime", {})
    out["onnxruntime"] = ({"usable": True, "next": None} if ort.get("imported") else
                          {"usable": False, "next": "pip install onnxruntime (or 'hbi-toolkit[runtime]')"})
    host, blocker = _host(backends, gpu, plugins), _trt_blocker(backends, gpu)
    for precision in built_precisions(package.dir):
        item: dict = {"precision": precision, "usable": False, "reasons": [], "next": None}
        try:
            engine_set = read_engine_set(package.dir, precision)
        except HbiError as exc:
            item["reasons"], item["next"] = [exc.message], exc.hint
            out["engines"].append(item)
            continue
        missing = [g for g in package.manifest.graphs if g not in engine_set.engines]
        item["reasons"] = [blocker] if blocker else [f"no engine for graph {g}" for g in missing]
        for name, entry in sorted(engine_set.engines.items()):
            spec = package.manifest.graphs.get(name)
            reasons = [] if blocker else mismatches(entry, host, onnx_sha256=spec.sha256 if spec else None)
            item["reasons"] += [f"{name}: {r}" for r in reasons]
            if reasons or missing:
                item["next"] = entry.rebuild_command(package.dir)
        item["usable"] = not item["reasons"]
        out["engines"].append(item)
    if not out["engines"]:
        out["engines_next"] = (f"hbi-export build-engine {package.dir} --precision fp16" if blocker is None else
                               "build engines on a machine with an NVIDIA GPU and TensorRT")
    return out


def _backend_line(name: str, rep: dict) -> str:
    if not rep["found"]:
        return f"{name:<12} not installed" + (f" ({rep['error']})" if rep["error"] else "")
    state = {True: "ok", False: "import FAILED", None: "found (not imported)"}[rep["imported"]]
    line = f"{name:<12} {rep['version'] or '?':<18} {state}"
    if rep["error"]:
        line += f": {rep['error']}"
    if "providers" in rep["details"]:
        line += f"  providers: {', '.join(rep['details']['providers']) or 'none'}"
    return line


def render_text(report: dict) -> str:
    """The report as aligned plain text, one fact per line."""
    lines = [
        f"{'hbi-toolkit':<12} {report['toolkit']['version']}",
        f"{'python':<12} {report['python']['version']} ({report['python']['executable']})",
        f"{'platform':<12} {report['platform']['platform']}",
        f"{'numpy':<12} {report['numpy']['version']}",
        f"{'scoring':<12} " + (f"native int8 kernel ({', '.join(report['scoring']['paths'])}; AMX: "
                               f"{report['scoring']['amx']})" if report["scoring"]["native_int8"]
                               else f"onnxruntime -> {report['scoring']['next']}"),
        "backends:",
    ]
    lines += ["  " + _backend_line(name, rep) for name, rep in report["backends"].items()]
    lines += _gpu_lines(report["gpu"]) + _plugin_lines(report["plugins"])
    for pkg in report.get("packages", []):
        lines += _package_lines(pkg)
    return "\n".join(lines) + "\n"


# Lines below never start with two spaces: those are the backend lines.
def _gpu_lines(gpu: dict) -> list[str]:
    head = f"{'cuda-python':<12} {gpu['cuda_python'] or 'not installed'}"
    if not gpu["devices"]:
        return [head, f"{'gpu':<12} none ({gpu['error'] or 'no device found'})"]
    return [head] + [f"{'gpu':<12} #{d['index']} {d['name']}, compute capability {d['compute_capability']}, "
                     f"{d['total_memory_gib']} GiB, driver CUDA {d['driver_cuda_version']}, runtime CUDA "
                     f"{d['runtime_cuda_version']}" for d in gpu["devices"]]


def _plugin_lines(plugins: dict) -> list[str]:
    if plugins["exists"]:
        return [f"{'plugins':<12} {plugins['library']} (sha256 {plugins['sha256'][:12]}...)"]
    return [f"{'plugins':<12} {plugins['library'] or 'not set'} -> {plugins['next']}"]


def _package_lines(pkg: dict) -> list[str]:
    if not pkg["ok"]:
        return [f"package {pkg['package']}: NOT usable: {pkg['error']['message']}",
                f"- next: {pkg['error']['next']}"]
    ort = pkg["onnxruntime"]
    lines = [f"package {pkg['package']}:",
             "- onnxruntime: " + ("usable" if ort["usable"] else f"not usable -> {ort['next']}")]
    for e in pkg["engines"]:
        state = "usable" if e["usable"] else "NOT usable: " + "; ".join(e["reasons"])
        lines.append(f"- trt {e['precision']} engines: {state}" + (f" -> {e['next']}" if e["next"] else ""))
    if not pkg["engines"]:
        lines.append(f"- trt: no engines -> {pkg['engines_next']}")
    return lines
