"""Registers ``hbi-export calibrate`` through the entry point ``calibrate`` of the group
``hbi_toolkit.export_commands`` (pyproject.toml): hbi_export never imports hbi_calibration, the layer above it.
Import-light: hbi-export loads this at start, so everything heavy (onnx, onnxruntime.quantization, the runtime
model) is imported inside the command."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hbi_runtime.cli_options import (DebugAlias, FormatOption, Steps, WorkersOption, overwrite_option, run_guarded,
                                     strict_option)
from hbi_runtime.cli_support import OutputFormat

CALIBRATE_HELP = (
    "INT8 from your own videos: calibrate the video encoder of a model package, check it against the package on "
    "held-out videos, and write an INT8 package (explicit Q/DQ ONNX).\n\n"
    "Videos are decoded and preprocessed exactly as the runtime does (the package's contract); a deterministic "
    "part of them is held out for the accuracy gate. MatMul/Gemm are quantized (weights int8 per channel); "
    "LayerNorm, softmax, residual adds, the hbi ops and the interaction graph stay in float. --target ort-cpu: "
    "uint8 asymmetric activations (fast VNNI kernels on x86); --target tensorrt: symmetric int8.\n\n"
    "Gate: with --captions, text->video R@1 may drop by at most --max-r1-drop points (default 1); without, the "
    "video->video top-1 agreement must reach --min-top1 (default 0.95). On failure more of the graph is kept in "
    "float (first/last transformer blocks, then attention matmuls) and the gate runs again. If every attempt "
    "fails, OUT is a copy of the fp32/fp16 package (exit 0, said on stderr), or with --strict nothing is written "
    "and the exit code is 5. The report is printed and stored in OUT's manifest.json. No videos: exit code 3 "
    "(never calibrates on random data). On a terminal each phase (decoding, collecting ranges, each quantize and "
    "gate attempt) is shown on stderr."
)
CALIBRATE_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-export calibrate pkg/msrvtt --videos clips/ --out pkg/msrvtt-int8\n\n"
    "  hbi-export calibrate pkg/b32 --videos clips/ --captions c.csv --out pkg/int8\n\n"
    "  hbi-export calibrate pkg/b32 --videos clips/ --target tensorrt --out pkg/trt\n\n"
    "  hbi-export calibrate pkg/b32 --videos clips/ --method entropy --out pkg/e\n\n"
    "  hbi-export calibrate pkg/b32 --videos clips/ --out pkg/int8 --strict -f json"
)


class _Target(str, enum.Enum):
    ort_cpu = "ort-cpu"
    tensorrt = "tensorrt"


class _Method(str, enum.Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


def _split_list(values: Optional[list[str]]) -> list[str]:
    """``--exclude-nodes a,b --exclude-nodes c`` -> ``[a, b, c]``."""
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def render_text(report: dict[str, Any]) -> str:
    """Attempts, verdict and where the package is, for the terminal."""
    g = report["gate"]
    lines = [f"calibrate: {report['method']} on {report['data']['calibration_decoded']} videos, "
             f"{report['data']['held_out_decoded']} held out; target {report['scheme']['target']} "
             f"({report['scheme']['activations']} activations, {report['scheme']['weights']} weights)",
             f"gate: {g['criterion']}"]
    for i, a in enumerate(g["attempts"], start=1):
        cos = min(f["cosine_min"] for f in a["metrics"]["features"].values())
        lines.append(f"  attempt {i}: {a['step']}: {a['quantized_nodes']} nodes int8, {len(a['float_nodes'])} "
                     f"kept float; worst feature cosine {cos:.5f}")
        lines += [f"    {c}" for c in a["checks"]]
    lines.append(f"{report['outcome'].upper()}: {report['message']}")
    lines.append(f"wrote {report['package']} (manifest_sha256 {report['package_sha256'][:12]}...)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to ``app``."""

    @app.command("calibrate", help=CALIBRATE_HELP, epilog=CALIBRATE_EXAMPLES)
    def calibrate(
        ctx: typer.Context,
        package: Annotated[Path, typer.Argument(help="Source model package (fp32 or fp16).", show_default=False)],
        videos: Annotated[Path, typer.Option("--videos", help="Folder of your videos (searched recursively).",
                                             show_default=False)],
        out: Annotated[Path, typer.Option("--out", help="Package folder to write.", show_default=False)],
        captions: Annotated[Optional[Path], typer.Option(
            "--captions", help="CSV video,caption (or MSR-VTT's video_id,sentence): gate on R@1.",
            show_default=False)] = None,
        target: Annotated[_Target, typer.Option("--target", help="Where the INT8 graph will run.")] = _Target.ort_cpu,
        samples: Annotated[int, typer.Option("--samples", help="At most this many calibration videos.")] = 64,
        method: Annotated[_Method, typer.Option("--method", help="Activation range calibration.")] = _Method.minmax,
        exclude_ops: Annotated[Optional[list[str]], typer.Option(
            "--exclude-ops", help="Op types to keep in float (MatMul, Gemm); repeat or comma-separate.",
            show_default=False)] = None,
        exclude_nodes: Annotated[Optional[list[str]], typer.Option(
            "--exclude-nodes", help="Nodes to keep in float: names or block patterns, e.g. "
                                    "'*visual.transformer.resblocks.11'; repeat or comma-separate.",
            show_default=False)] = None,
        holdout: Annotated[float, typer.Option("--holdout", help="Fraction of the videos held out for the gate "
                                                                 "(2 to 64 videos).")] = 0.25,
        max_r1_drop: Annotated[float, typer.Option("--max-r1-drop", help="Gate with captions: largest allowed "
                                                                         "drop of t2v R@1, in points.")] = 1.0,
        min_top1: Annotated[float, typer.Option("--min-top1", help="Gate without captions: least video->video "
                                                                   "top-1 agreement.")] = 0.95,
        strict: strict_option("Gate failure is an error (exit 5, nothing written) instead of a fp32/fp16 "
                              "fallback.") = False,
        workers: WorkersOption = 2,
        overwrite: overwrite_option("a model package") = False,
        fmt: FormatOption = OutputFormat.text,
        debug: DebugAlias = False,
    ) -> None:
        """Package + videos -> gated INT8 package (``hbi_calibration.pipeline.calibrate_package``)."""
        from hbi_runtime.cli_support import emit_json

        json_mode = fmt is OutputFormat.json
        with run_guarded(ctx, json_mode, debug):
            from hbi_calibration.gate import Criteria
            from hbi_calibration.pipeline import calibrate_package

            with Steps(enabled=not json_mode) as say:
                report = calibrate_package(
                    package, videos, out, captions=captions, target=target.value, samples=samples,
                    method=method.value, exclude_ops=_split_list(exclude_ops),
                    exclude_nodes=_split_list(exclude_nodes), holdout=holdout,
                    criteria=Criteria(max_r1_drop=max_r1_drop, min_top1=min_top1), strict=strict,
                    overwrite=overwrite, workers=workers, progress=say)
            emit_json(report) if json_mode else typer.echo(render_text(report))
            if report["outcome"] == "fallback":
                typer.echo(f"warning: INT8 failed the accuracy gate; {report['package']} holds the source "
                           "package's video encoder unchanged (use --strict to make this an error)", err=True)
