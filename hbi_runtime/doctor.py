"""What this environment can run: toolkit, Python, platform, numpy, and each optional backend.

Used by ``hbi-run doctor``. Backends are probed without side effects on the process that matter: torch is
never imported (its presence and version come from the import system and the installed metadata), the others
are imported inside a guard so that a broken install is reported, not raised.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np

import hbi_runtime

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


def collect() -> dict:
    """The doctor report as a JSON-ready dict carrying ``"schema": "hbi.doctor/1"``."""
    return {
        "schema": SCHEMA,
        "toolkit": {"distribution": hbi_runtime.DIST_NAME, "version": hbi_runtime.__version__},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "platform": platform.platform()},
        "numpy": {"version": np.__version__},
        "backends": {p.module: asdict(probe_backend(p)) for p in BACKENDS},
    }


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
        "backends:",
    ]
    lines += ["  " + _backend_line(name, rep) for name, rep in report["backends"].items()]
    return "\n".join(lines) + "\n"
