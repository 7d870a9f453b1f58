"""Lint every graph of a model package for every TensorRT target: ``lint_package`` (``hbi-export check``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import onnx
from google.protobuf.message import DecodeError

from hbi_export.trt_lint.model import lint_model
from hbi_export.trt_lint.report import LintReport, merge_versions, sort_findings
from hbi_export.trt_lint.support import load_support
from hbi_runtime.errors import BadInputError, UsageError

DEFAULT_TRT_VERSIONS = ("10.3", "current")


def _read_manifest(pkg_dir: Path) -> tuple[dict[str, Any], str]:
    """The manifest's graphs and the package hash (a minimal reader: the lint needs only ``graphs``, and must work
    on packages that the full reader, hbi_runtime.package, would refuse for unrelated fields)."""
    path = pkg_dir / "manifest.json"
    if not path.is_file():
        raise BadInputError(f"{pkg_dir} is not a model package: {path.name} is missing",
                            hint="point to a folder written by `hbi-export onnx`")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from None
    graphs = manifest.get("graphs") if isinstance(manifest, dict) else None
    if not isinstance(graphs, dict) or not graphs:
        raise BadInputError(f"{path} lists no graphs (expected a non-empty \"graphs\" object)")
    # The package's identity is the hash its writer recorded (hbi_runtime.package); a bare manifest gets its bytes'.
    recorded = manifest.get("manifest_sha256")
    return graphs, recorded if isinstance(recorded, str) else hashlib.sha256(raw).hexdigest()


def _load_graph(pkg_dir: Path, name: str, entry: Any) -> onnx.ModelProto:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise BadInputError(f"manifest graph {name!r} has no \"file\"")
    path = pkg_dir / entry["file"]
    if not path.is_file():
        raise BadInputError(f"graph {name!r}: {path} is missing", hint="re-export the package")
    try:
        return onnx.load(str(path))
    except (DecodeError, OSError, ValueError, onnx.checker.ValidationError) as exc:  # damaged file / external data
        raise BadInputError(f"graph {name!r}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def lint_package(pkg_dir: str | Path, trt_versions: Iterable[str] = DEFAULT_TRT_VERSIONS) -> LintReport:
    """Check every graph a package's manifest lists against each TensorRT version.

    Args:
        pkg_dir: the model package folder (``manifest.json`` with ``graphs: {name: {"file", "precision"?}}``).
        trt_versions: TensorRT targets ("10.3", "current", ...); findings say which ones they hold for.

    Returns:
        A ``LintReport``; ``report.ok`` is False when any finding is an error.

    Raises:
        BadInputError: no manifest, no graphs, or a graph file missing / unreadable.
        UsageError: an unknown TensorRT version, or none at all.
    """
    pkg_dir = Path(pkg_dir)
    versions = list(dict.fromkeys(trt_versions))
    if not versions:
        raise UsageError("no TensorRT version to check against", hint="pass e.g. --trt 10.3 --trt current")
    resolved = {v: load_support(v).version for v in versions}  # fails early on an unknown version
    graphs, manifest_sha = _read_manifest(pkg_dir)
    findings, described = [], []
    for name, entry in graphs.items():
        model = _load_graph(pkg_dir, name, entry)
        precision = str(entry.get("precision", "fp32"))
        described.append({"name": name, "file": entry["file"], "precision": precision})
        for version in versions:
            findings += lint_model(model, version, graph=name, precision=precision)
    return LintReport(findings=sort_findings(merge_versions(findings)), trt_versions=resolved, graphs=described,
                      package={"path": str(pkg_dir), "manifest_sha256": manifest_sha})
