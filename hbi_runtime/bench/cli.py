"""Registers ``hbi-run bench``: latency and throughput per stage, one JSON record, an optional plot.

The command is thin: it parses options into a :class:`~hbi_runtime.bench.stages.BenchConfig` and hands off to
:func:`hbi_runtime.bench.run.run_bench` inside :func:`hbi_runtime.cli_support.guarded`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import (AllowUnverifiedOption, BackendName, BackendOption, DeviceOption,
                                     FormatOption, ModelOption, Steps, WorkersOption, run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json

EPILOG = """Examples:

  hbi-run bench --model pkg/b32 --batch-sizes 1,8,32 --out cpu.json --plot cpu.png

  hbi-run bench --model pkg/b32 --device cuda --out gpu.json

  hbi-run bench --model pkg/b32 --backend trt --precision fp16 --out trt16.json

  hbi-run bench --stages video --batch-sizes 1,4 --iters 5 --format json

  hbi-run bench -m pkg/b32 --stages text,video --plot both.png --include cpu.json --include gpu.json
"""


def parse_int_list(value: str, option: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; UsageError (exit 2) for anything but positive integers."""
    from hbi_runtime.errors import UsageError

    items = [v.strip() for v in value.split(",")]
    if not value.strip() or not all(v.isdigit() and int(v) >= 1 for v in items):
        raise UsageError(f"{option} must be comma-separated positive integers, got {value!r}",
                         hint=f"e.g. {option} 1,8,32")
    return tuple(dict.fromkeys(int(v) for v in items))


def _read_record(path: Path) -> dict:
    from hbi_runtime.bench.records import check_record

    from hbi_runtime.inputs import read_json

    return check_record(read_json(path, what="benchmark record"), str(path))


def _write(path: Path, what: str, write) -> None:
    from hbi_runtime.errors import BadInputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # plots too
        write(path)
    except OSError as exc:
        raise BadInputError(f"cannot write {what} {path}: {exc}") from None


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""

    @app.command(epilog=EPILOG)
    def bench(
        ctx: typer.Context,
        model: ModelOption = None,
        backend: BackendOption = BackendName.onnxruntime,
        device: DeviceOption = None,
        precision: Annotated[Optional[str], typer.Option(
            help="Engine precision for trt (fp32, fp16, int8). Default: the package's / the one built.",
            show_default=False)] = None,
        batch_sizes: Annotated[str, typer.Option(help="Batch sizes of the text, video and score stages.")] = "1,8,32",
        warmup: Annotated[int, typer.Option(help="Untimed calls before each measurement.")] = 2,
        iters: Annotated[int, typer.Option(help="Timed calls per measurement (p50/p90/p99 over them).")] = 10,
        stages: Annotated[str, typer.Option(help="Comma-separated: text, video, score, decode, retrieve.")] = (
            "text,video,score,decode,retrieve"),
        gallery: Annotated[int, typer.Option(help="Stored videos the score stage scores each query against.")] = (
            10_000),
        videos: Annotated[Optional[Path], typer.Option(
            help="Video folder for the decode and retrieve stages. Default: the demo samples.",
            show_default=False)] = None,
        index_dir: Annotated[Optional[Path], typer.Option(
            "--index", help="Index (of this model) for the retrieve stage. Default: a temporary index of --videos.",
            show_default=False)] = None,
        workers: WorkersOption = 2,
        threads: Annotated[Optional[int], typer.Option(
            help="CPU threads of the encoders and the scoring engine. Default: every usable core.",
            show_default=False)] = None,
        out: Annotated[Optional[Path], typer.Option(help="Write the JSON record (hbi.bench/1) here.",
                                                    show_default=False)] = None,
        plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of latency and throughput vs batch size "
                                                          "(needs matplotlib).", show_default=False)] = None,
        include: Annotated[Optional[list[Path]], typer.Option(
            metavar="RECORD.json",
            help="Earlier records (--out files) drawn in the same --plot, e.g. another backend or precision.",
            show_default=False)] = None,
        allow_unverified: AllowUnverifiedOption = False,
        output_format: FormatOption = OutputFormat.text,
    ) -> None:
        """Measure latency (p50/p90/p99) and throughput per stage: text encoding (texts/s), video encoding
        (frames/s), scoring (query x video pairs/s), decoding (videos/s) and one retrieval end to end.

        One JSON record per run (--out) carries the device (CPU model and flags, GPU name and compute capability,
        Jetson model and power mode), library versions, precision, batch sizes, shapes and results, so runs on
        different machines compare directly (docs/bench.md).
        """
        json_mode = output_format is OutputFormat.json
        with run_guarded(ctx, json_mode):
            from hbi_runtime.bench.plot import plot_records
            from hbi_runtime.bench.records import write_record
            from hbi_runtime.bench.run import render_text, run_bench
            from hbi_runtime.bench.stages import DEMO_SAMPLES, BenchConfig, select_stages
            from hbi_runtime.errors import UsageError

            config = BenchConfig(batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), warmup=warmup,
                                 iters=iters, stages=select_stages([s.strip() for s in stages.split(",")]),
                                 gallery=gallery, threads=threads, videos_dir=videos or DEMO_SAMPLES,
                                 index_dir=index_dir, workers=workers)
            if include and plot is None:
                raise UsageError("--include only adds records to a --plot", hint="add --plot FILE.png")
            included = [_read_record(p) for p in include or []]
            with Steps(enabled=not json_mode) as say:
                record = run_bench(_package(model), backend=backend.value, device=device and device.value,
                                   precision=precision, config=config, encoder_threads=threads,
                                   allow_unverified=allow_unverified, progress=say)
            if out is not None:
                _write(out, "the record", lambda p: write_record(record, p))
            if plot is not None:
                _write(plot, "the plot", lambda p: plot_records([record, *included], p))
            if json_mode:
                emit_json(record)
            else:
                sys.stdout.write(render_text(record))
                for path, what in ((out, "record"), (plot, "plot")):
                    if path is not None:
                        sys.stdout.write(f"wrote {what} {path}\n")


def _package(model: Optional[Path]) -> Path:
    from hbi_runtime.errors import UsageError

    if model is not None:
        return model
    demo = Path(__file__).resolve().parent.parent / "data" / "demo" / "package"
    if not (demo / "manifest.json").exists():
        raise UsageError("no model package given",
                         hint="pass --model PKG; make one with `hbi-export onnx --checkpoint CKPT --out PKG`")
    return demo
