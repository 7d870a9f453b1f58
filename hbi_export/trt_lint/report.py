"""Findings of the TensorRT readiness lint and the report that carries them (JSON schema ``hbi.check/1``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

SCHEMA = "hbi.check/1"
ERROR, WARNING, INFO = "error", "warning", "info"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}


@dataclass(frozen=True)
class Finding:
    """One problem (or note) about one node, initializer or tensor of one graph.

    ``trt`` lists the TensorRT versions (as the user asked for them: "10.3", "current") the finding holds for;
    ``function`` names the model-local function (``hbi.TokenMerge``) when the node sits in its body.
    """

    severity: str      # "error" (the build will fail or be wrong), "warning" (check it), "info" (a note)
    code: str          # short check id: unsupported-op, attribute, input-constant, dtype, fp16-range, ...
    graph: str
    node: str
    op_type: str
    message: str
    trt: tuple[str, ...] = ()
    function: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "graph": self.graph, "node": self.node,
                "op_type": self.op_type, "message": self.message, "trt": list(self.trt), "function": self.function}


def merge_versions(findings: Iterable[Finding]) -> list[Finding]:
    """Fold findings that differ only in their TensorRT version into one (keeping the first order seen)."""
    merged: dict[tuple, Finding] = {}
    for f in findings:
        key = (f.severity, f.code, f.graph, f.node, f.op_type, f.message, f.function)
        if key in merged:
            merged[key] = replace(merged[key], trt=merged[key].trt + tuple(v for v in f.trt if v not in merged[key].trt))
        else:
            merged[key] = f
    return list(merged.values())


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.graph, _SEVERITY_ORDER.get(f.severity, 9)))


@dataclass
class LintReport:
    """What ``hbi-export check`` reports: findings over every graph of a package and every TensorRT target."""

    findings: list[Finding]
    trt_versions: dict[str, str]            # requested name -> TensorRT version of its table ("current" -> "10.15")
    graphs: list[dict[str, Any]] = field(default_factory=list)   # {"name", "file", "precision"} per linted graph
    package: dict[str, Any] = field(default_factory=dict)        # {"path", "manifest_sha256"}

    @property
    def ok(self) -> bool:
        """True when no finding is an error (warnings and notes do not fail the check)."""
        return not any(f.severity == ERROR for f in self.findings)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "package": dict(self.package),
            "trt_versions": dict(self.trt_versions),
            "graphs": list(self.graphs),
            "summary": {"errors": self.count(ERROR), "warnings": self.count(WARNING), "info": self.count(INFO)},
            "findings": [f.to_dict() for f in self.findings],
        }


_COLUMNS = ("severity", "trt", "graph", "node", "op", "message")
_MAX_CELL = 40  # node names from exporters can be long paths; the JSON output keeps them whole


def _cell(text: str) -> str:
    return text if len(text) <= _MAX_CELL else "..." + text[-(_MAX_CELL - 3):]


def render_text(report: LintReport) -> str:
    """A readable table (severity, TensorRT versions, graph, node, op, message) and a one-line verdict."""
    targets = ", ".join(f"{k} (TensorRT {v})" if k != v else f"TensorRT {v}" for k, v in report.trt_versions.items())
    lines = [f"TensorRT readiness of {report.package.get('path', 'model')} for {targets}"]
    if report.findings:
        rows = [(f.severity, ",".join(f.trt), f.graph, _cell(f.node or "-"),
                 _cell(f"{f.function}/{f.op_type}" if f.function else f.op_type), f.message)
                for f in report.findings]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines += ["", fmt.format(*(c.upper() for c in _COLUMNS)), *(fmt.format(*r) for r in rows)]
    verdict = "ok" if report.ok else "FAILED"
    lines += ["", f"{verdict}: {report.count(ERROR)} error(s), {report.count(WARNING)} warning(s), "
                  f"{report.count(INFO)} note(s) over {len(report.graphs)} graph(s)"]
    return "\n".join(lines)
