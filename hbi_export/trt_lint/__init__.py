"""TensorRT readiness lint: is every graph of a model package importable by TensorRT's ONNX parser?

Runs without TensorRT (it is data-driven: ``trt_10.3.json`` for JetPack 6 / Jetson Orin, ``trt_current.json``
for the latest TensorRT 10 release, both read from onnx/onnx-tensorrt ``docs/operators.md``). Behind
``hbi-export check PKG``.

    from hbi_export.trt_lint import lint_package, render_text
    report = lint_package("pkg/", trt_versions=("10.3", "current"))
    print(render_text(report)); report.ok
"""

from hbi_export.trt_lint.model import lint_model
from hbi_export.trt_lint.package import DEFAULT_TRT_VERSIONS, lint_package
from hbi_export.trt_lint.report import SCHEMA, Finding, LintReport, render_text
from hbi_export.trt_lint.support import TrtSupport, available_versions, load_support

__all__ = ["DEFAULT_TRT_VERSIONS", "SCHEMA", "Finding", "LintReport", "TrtSupport", "available_versions",
           "lint_model", "lint_package", "load_support", "render_text"]
