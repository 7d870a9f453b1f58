"""Registers ``hbi-export build-engine``: TensorRT engines (fp32 / fp16 / int8) for every graph of a package."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import AllowUnverifiedOption, DebugAlias, FormatOption, Steps, run_guarded
from hbi_runtime.cli_support import OutputFormat, emit_json

BUILD_HELP = (
    "Build a TensorRT engine for every graph of a model package, on the machine that will run it.\n\n"
    "Writes PKG/engines/PRECISION/ (one .engine per graph and engines.json, keyed on the ONNX hash, TensorRT "
    "version, GPU, precision, profiles and plugin library, with the equivalent trtexec and polygraphy run command "
    "lines). Builds through NVIDIA's Polygraphy loaders; needs tensorrt, polygraphy, onnx and cuda-python, not "
    "torch. --precision auto (the default) is the package's own precision where the network is strongly typed "
    "(TensorRT 11, --strongly-typed) and fp16 where TensorRT 10 allows it (LayerNorm and softmax pinned to fp32); "
    "fp16 engines on TensorRT 11 come from an fp16 package (`hbi-export onnx --precision fp16`); int8 needs a Q/DQ "
    "package from `hbi-export calibrate`. fp32 builds clear TF32. With --plugins, the hbi custom ops run as the "
    "hbi TensorRT plugins, otherwise as their standard-op decompositions. On a terminal each graph's build is "
    "shown on stderr (it takes minutes)."
)
BUILD_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-export build-engine pkg/msrvtt --max-batch 64\n\n"
    "  hbi-export build-engine pkg/msrvtt --precision fp32\n\n"
    "  hbi-export build-engine pkg/msrvtt --axis video_batch=1:16:64\n\n"
    "  hbi-export build-engine pkg/msrvtt --plugins build/libhbi_trt_plugins.so\n\n"
    "  hbi-export build-engine pkg/msrvtt --timing-cache ~/.cache/hbi/trt.cache\n\n"
    "  hbi-export build-engine pkg/msrvtt-int8 --precision int8 --format json"
)


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("build-engine", help=BUILD_HELP, epilog=BUILD_EXAMPLES)(build_engine)


def build_engine(
    ctx: typer.Context,
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    precision: Annotated[Precision, typer.Option(
        "--precision", help="Engine precision: auto (the package's own under strong typing, fp16 on TensorRT 10, "
                            "int8 for a quantized package), fp32, fp16 or int8.")] = Precision.auto,
    min_batch: Annotated[int, typer.Option("--min-batch", min=1, help="Smallest batch of every dynamic axis.")] = 1,
    opt_batch: Annotated[int, typer.Option("--opt-batch", min=1, help="Batch TensorRT tunes for.")] = 8,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch (bigger calls are split).")] = 32,
    axis: Annotated[Optional[list[str]], typer.Option(
        "--axis", help="Override one axis: NAME=MIN:OPT:MAX (repeatable), e.g. video_batch=1:16:64.",
        show_default=False)] = None,
    workspace: Annotated[int, typer.Option("--workspace", min=16, help="Builder workspace in MiB.")] = 4096,
    timing_cache: Annotated[Optional[Path], typer.Option(
        "--timing-cache", help="Timing cache file: read if present, written after the build.",
        show_default=False)] = None,
    plugins: Annotated[Optional[Path], typer.Option(
        "--plugins", help="The hbi plugin library (libhbi_trt_plugins.so); default $HBI_TRT_PLUGINS.",
        show_default=False)] = None,
    strongly_typed: Annotated[bool, typer.Option(
        "--strongly-typed", help="TensorRT 10: strongly typed network (types from the ONNX graph); always so on "
                                 "TensorRT 11.")] = False,
    allow_unverified: AllowUnverifiedOption = False,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """Build engines (``build_package_engines``)."""
    json_mode = fmt is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_export.trt.package import EngineOptions, build_package_engines, render_text
        from hbi_export.trt.profiles import parse_axis_override
        from hbi_runtime.backends.tensorrt import default_plugin_library
        from hbi_runtime.engines import AxisRange

        options = EngineOptions(
            precision=precision.value, batch=AxisRange(min_batch, opt_batch, max_batch),
            axes=dict(parse_axis_override(a) for a in axis or []), workspace_mb=workspace,
            timing_cache=timing_cache, plugins=plugins or default_plugin_library(), strongly_typed=strongly_typed)
        with Steps(enabled=not json_mode) as say:
            summary = build_package_engines(package, options, allow_unverified=allow_unverified, progress=say)
        if json_mode:
            emit_json(summary)
        else:
            typer.echo(render_text(summary))
