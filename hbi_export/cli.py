"""The ``hbi-export`` command line. Commands are thin: one library call inside ``guarded``.

Exit codes (hbi_runtime.errors): 0 ok, 1 internal error, 2 usage, 3 bad input (e.g. not a checkpoint).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from hbi_calibration.cli import register as _register_calibrate
from hbi_export.tasks.qa_cli import register as _register_qa
from hbi_export.trt.cli import register as _register_trt
from hbi_runtime.cli_support import OutputFormat, emit_json, guarded
from hbi_runtime.errors import EXIT_GATE_FAILED

app = typer.Typer(
    name="hbi-export",
    help="Load, inspect and export HBI video-text retrieval models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # errors go through guarded(); tracebacks only with --debug
)


FormatOption = Annotated[OutputFormat, typer.Option("--format", help="Output as text or JSON.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
TemporalLayersOption = Annotated[int, typer.Option(
    "--temporal-layers", min=0, help="seqTransf depth for CLIP checkpoints (official default 4).")]


@app.callback()
def _main() -> None:
    """Load, inspect and export HBI video-text retrieval models."""


INSPECT_HELP = (
    "Show a checkpoint's format, architecture, parameters per part and key report.\n\n"
    "Reads official HBI checkpoints (pytorch_model.bin.N, best.pth), OpenAI CLIP weights (ViT-B-32.pt), "
    "Hugging Face CLIP directories and hbi-toolkit directories. The load is strict: missing, unexpected or "
    "mis-shaped keys are an error (exit code 3).\n\n"
    "Example:  hbi-export inspect ckpts/pytorch_model.bin.4 --format json"
)


@app.command(help=INSPECT_HELP)
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.", show_default=False)],
    output: FormatOption = OutputFormat.text,
    temporal_layers: TemporalLayersOption = 4,
    debug: DebugOption = False,
) -> None:
    """Describe a checkpoint (``describe_checkpoint``) as text or JSON (schema ``hbi.inspect/1``)."""

    def compute() -> dict[str, Any]:
        from hbi_export.checkpoints.inspect import describe_checkpoint  # torch import only when needed

        return describe_checkpoint(checkpoint, temporal_layers=temporal_layers)

    _run(output, debug, compute, render_text)


def _run(output: OutputFormat, debug: bool, compute: Callable[[], dict[str, Any]],
         render: Callable[[dict[str, Any]], str]) -> None:
    """Run a command body under ``guarded`` and print its result as JSON or as ``render``'s text."""
    json_mode = output is OutputFormat.json
    with guarded(json_mode=json_mode, debug=debug):
        result = compute()
        if json_mode:
            emit_json(result)
        else:
            typer.echo(render(result))


CONVERT_HELP = (
    "Convert a checkpoint to the hbi-toolkit format (model.safetensors + config.json).\n\n"
    "Reads everything `inspect` reads, strictly. CLIP weights (OpenAI or Hugging Face) initialise the HBI parts "
    "the way the official training script does. Merge ratios and level weights are stored with the model.\n\n"
    "Examples:\n\n"
    "  hbi-export convert ckpts/pytorch_model.bin.4 models/msrvtt\n\n"
    "  hbi-export convert ViT-B-32.pt models/clip-init --temporal-layers 4"
)


@app.command(help=CONVERT_HELP)
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output directory.", show_default=False)],
    text_ratios: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Text merge ratios (action, event). Default: the checkpoint's own, else 0.25 0.5.")] = None,
    video_ratios: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Video merge ratios (action, event). Default: the checkpoint's own, else 0.25 0.5.")] = None,
    level_weights: Annotated[Optional[tuple[float, float, float]], typer.Option(
        help="Entity, action, event score weights. Default: the checkpoint's own, else 1 0 0 "
             "(the official retrieval evaluation).")] = None,
    temporal_layers: TemporalLayersOption = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint folder at OUT (never the checkpoint read; any "
                                                 "other non-empty folder is refused).")] = False,
    output: FormatOption = OutputFormat.text,
    debug: DebugOption = False,
) -> None:
    """Strict load + save in our format (``convert_checkpoint``)."""

    def compute() -> dict[str, Any]:
        from hbi_export.checkpoints.convert import convert_checkpoint

        return {"schema": "hbi.convert/1", **convert_checkpoint(
            checkpoint, out, overwrite=overwrite, text_ratios=text_ratios, video_ratios=video_ratios,
            level_weights=level_weights, temporal_layers=temporal_layers)}

    _run(output, debug, compute, lambda r: f"wrote {r['output']} ({r['format']} checkpoint {r['source']})")


INIT_HELP = (
    "Write a randomly initialised model of a preset architecture, in the hbi-toolkit format.\n\n"
    "For pipeline tests and benchmarks: random weights retrieve nothing meaningful. To start training from CLIP, "
    "use `hbi-export convert ViT-B-32.pt OUT` instead.\n\n"
    "Example:  hbi-export init models/random-b32 --preset vit-b-32"
)


@app.command(help=INIT_HELP)
def init(
    out: Annotated[Path, typer.Argument(help="Output directory.", show_default=False)],
    preset: Annotated[str, typer.Option(help="vit-b-32, vit-b-16 or tiny.")] = "vit-b-32",
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint folder at OUT (any other non-empty folder is "
                                                 "refused).")] = False,
    output: FormatOption = OutputFormat.text,
    debug: DebugOption = False,
) -> None:
    """Random model of a preset (``init_random``)."""

    def compute() -> dict[str, Any]:
        from hbi_export.checkpoints.convert import init_random

        return {"schema": "hbi.init/1", **init_random(out, preset, seed=seed, overwrite=overwrite)}

    _run(output, debug, compute,
         lambda r: f"wrote {r['output']}: random {preset}, seed {seed}, {r['parameters']:,} parameters")


# ------------------------------------------------------------------------------------------ ONNX packages
def _say(message: str) -> None:
    """Progress goes to stderr, so stdout stays the result (table or JSON)."""
    typer.echo(message, err=True)


def _parse_levels(levels: str) -> tuple[float, float, float]:
    from hbi_runtime.errors import UsageError

    try:
        values = tuple(float(v) for v in levels.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UsageError(f"--levels must be three comma-separated numbers (entity,action,event), got {levels!r}",
                         hint="e.g. --levels 1,0,0 (the official retrieval evaluation) or --levels 0.4,0.4,0.2")
    return values


def _parity_payload(schema: str, pkg: Path, result) -> dict[str, Any]:
    from hbi_runtime.package import load_package

    package = load_package(pkg, allow_unverified=True)
    return {"schema": schema, "package": str(pkg), "package_sha256": package.manifest_sha256,
            "status": package.manifest.status, "parity": result.to_dict() if result is not None else None}


def _parity_text(result) -> str:
    from hbi_runtime.compare import render_table

    return render_table(result) if result is not None else "parity skipped (--skip-parity): package unverified"


ONNX_HELP = (
    "Export a checkpoint to a model package: three ONNX graphs (text encoder, video encoder, interaction) with "
    "the hbi custom ops, the tokenizer, and manifest.json; then check parity against PyTorch.\n\n"
    "Parity fails loudly: exit code 5 and the package is marked failed (the runtime refuses it). Progress goes to "
    "stderr, the parity table (or --format json) to stdout.\n\n"
    "Examples:\n\n"
    "  hbi-export onnx --checkpoint ckpts/pytorch_model.bin.4 --out pkg/msrvtt\n\n"
    "  hbi-export onnx --checkpoint models/random-b32 --out pkg/b32-fp16 --precision fp16 --max-words 24"
)


@app.command("onnx", help=ONNX_HELP)
def onnx_command(
    out: Annotated[Path, typer.Option("--out", help="Package folder to write.", show_default=False)],
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Checkpoint (any format `inspect` reads).", show_default=False)] = None,
    clip: Annotated[Optional[Path], typer.Option(
        "--clip", help="Export a CLIP-initialised HBI model from CLIP weights instead of --checkpoint.",
        show_default=False)] = None,
    levels: Annotated[Optional[str], typer.Option(
        help="Default level weights entity,action,event (the runtime may override per query). "
             "Default: the checkpoint's own, else 1,0,0.", show_default=False)] = None,
    max_words: Annotated[int, typer.Option(help="Text length L (fixed in the graphs).")] = 32,
    max_frames: Annotated[int, typer.Option(help="Frames per video T (fixed in the graphs).")] = 12,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 18,
    precision: Annotated[str, typer.Option(help="fp32 or fp16 (LayerNorm, softmax, reductions stay fp32).")] = "fp32",
    skip_parity: Annotated[bool, typer.Option(help="Do not run parity (the package stays unverified).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a model package at --out (never the checkpoint; any other "
                                                 "non-empty folder is refused).")] = False,
    output: FormatOption = OutputFormat.text,
    debug: DebugOption = False,
) -> None:
    """Checkpoint -> model package -> parity (``export_package``)."""
    holder: dict[str, Any] = {}

    def compute() -> dict[str, Any]:
        from hbi_export.onnx.package import export_package
        from hbi_runtime.errors import UsageError

        if (checkpoint is None) == (clip is None):
            raise UsageError("give exactly one of --checkpoint and --clip",
                             hint="--checkpoint for an HBI (or any supported) checkpoint, --clip for CLIP weights")
        _, result = export_package(checkpoint or clip, out, level_weights=_parse_levels(levels) if levels else None,
                                   max_words=max_words, max_frames=max_frames, opset=opset, precision=precision,
                                   overwrite=overwrite, parity=not skip_parity, progress=_say)
        holder["failed"] = result is not None and not result.ok
        holder["result"] = result
        return _parity_payload("hbi.onnx/1", out, result)

    _run(output, debug, compute, lambda _: _parity_text(holder["result"]))
    if holder.get("failed"):
        _say(f"parity failed: {out} is marked failed; fix the cause or re-check with "
             f"`hbi-export parity {out} --checkpoint CKPT`")
        raise SystemExit(EXIT_GATE_FAILED)


PARITY_HELP = (
    "Check a model package against the PyTorch model of its checkpoint and record the verdict in its manifest.\n\n"
    "Reports per output max abs / rel error and cosine, and for score matrices top-1 / top-5 agreement and Spearman "
    "rank correlation, against the tolerance of the package's precision. Exit code 5 when a check fails.\n\n"
    "With --engine PRECISION it checks the package's TensorRT engines instead (built by `hbi-export build-engine`; "
    "needs the GPU and TensorRT they were built for): fp16 by feature cosine, top-5 agreement and Spearman rank "
    "correlation, int8 by top-1 agreement; the package's status is not changed.\n\n"
    "Examples:\n\n"
    "  hbi-export parity pkg/msrvtt --checkpoint ckpts/pytorch_model.bin.4 --format json\n\n"
    "  hbi-export parity pkg/msrvtt --checkpoint ckpts/pytorch_model.bin.4 --engine fp16 --plugins "
    "build/libhbi_trt_plugins.so"
)


@app.command(help=PARITY_HELP)
def parity(
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The checkpoint it was exported from.",
                                             show_default=False)],
    engine: Annotated[Optional[str], typer.Option(
        help="Check the TensorRT engines of this precision (fp32, fp16, int8) instead of the ONNX graphs.",
        show_default=False)] = None,
    plugins: Annotated[Optional[Path], typer.Option(
        help="With --engine: the hbi plugin library the engines were built with (default $HBI_TRT_PLUGINS).",
        show_default=False)] = None,
    output: FormatOption = OutputFormat.text,
    debug: DebugOption = False,
) -> None:
    """Re-run parity (``check_package``), or check engines (``compare_engines``)."""
    holder: dict[str, Any] = {}

    def compute() -> dict[str, Any]:
        from hbi_export.checkpoints import build_model
        from hbi_export.onnx.parity import check_package, compare_engines
        from hbi_runtime.errors import UsageError

        if engine is None and plugins is not None:
            raise UsageError("--plugins goes with --engine")
        if engine is not None and engine not in ("fp32", "fp16", "int8"):
            raise UsageError(f"--engine must be fp32, fp16 or int8, got {engine!r}")
        if engine is not None:
            from hbi_runtime.backends.tensorrt import import_tensorrt

            import_tensorrt()  # before loading the model: fail fast where TensorRT is missing
        model, _ = build_model(checkpoint)
        if engine is not None:
            options = {"plugins": plugins} if plugins is not None else {}
            holder["result"] = compare_engines(package, model, engine, **options)
            _say(f"engine parity ({engine}) {'passed' if holder['result'].ok else 'FAILED'}")
            return {**_parity_payload("hbi.parity/1", package, holder["result"]), "engine": engine}
        holder["result"] = check_package(package, model, progress=_say)
        return _parity_payload("hbi.parity/1", package, holder["result"])

    _run(output, debug, compute, lambda _: _parity_text(holder["result"]))
    if not holder["result"].ok:
        raise SystemExit(EXIT_GATE_FAILED)


CHECK_HELP = (
    "Check a model package's graphs against TensorRT's ONNX operator support (no TensorRT needed): every op, "
    "attribute and dtype, the hbi custom ops' plugin attributes and function bodies, and constants that overflow "
    "FP16. Exit code 5 when any finding is an error.\n\n"
    "Example:  hbi-export check pkg/msrvtt --trt 10.3"
)


@app.command(help=CHECK_HELP)
def check(
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    trt: Annotated[Optional[list[str]], typer.Option(
        "--trt", help="TensorRT target: 10.3 (Jetson, JetPack 6) or current; repeatable. Default: both.")] = None,
    output: FormatOption = OutputFormat.text,
    debug: DebugOption = False,
) -> None:
    """TensorRT readiness lint (``lint_package``)."""
    holder: dict[str, Any] = {}

    def compute() -> dict[str, Any]:
        from hbi_export.trt_lint import DEFAULT_TRT_VERSIONS, lint_package

        holder["report"] = lint_package(package, trt_versions=tuple(trt or DEFAULT_TRT_VERSIONS))
        return holder["report"].to_dict()

    def render(_: dict[str, Any]) -> str:
        from hbi_export.trt_lint import render_text

        return render_text(holder["report"])

    _run(output, debug, compute, render)
    if not holder["report"].ok:
        raise SystemExit(EXIT_GATE_FAILED)


# ------------------------------------------------------------------------------------------ text output
def _rows(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]


def _architecture_rows(arch: dict[str, Any]) -> list[tuple[str, str]]:
    v, t, tm, mg = arch["vision"], arch["text"], arch["temporal"], arch["merge"]
    return [
        ("vision tower", f"ViT width {v['width']}, {v['layers']} layers, {v['heads']} heads, "
                         f"patch {v['patch_size']}, image {v['image_size']}"),
        ("text tower", f"width {t['width']}, {t['layers']} layers, {t['heads']} heads, "
                       f"context {t['context_length']}, vocabulary {t['vocab_size']}"),
        ("embed dim", str(arch["embed_dim"])),
        ("temporal", f"{tm['layers']} layers, {tm['heads']} heads, {tm['frame_positions']} frame positions"),
        ("token merge", f"{mg['heads']} heads, text ratios {mg['text_ratios']}, video ratios {mg['video_ratios']}"),
        ("level weights", str(arch["level_weights"])),
    ]


def _key_rows(keys: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("loaded", f"{keys['loaded']} tensors")]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for item in keys["ignored"]:
        by_reason[item["reason"]].append(item["key"])
    for reason, names in by_reason.items():
        more = f", ... (+{len(names) - 3})" if len(names) > 3 else ""
        rows.append(("ignored", f"{len(names)} keys, {reason}: {', '.join(names[:3])}{more}"))
    by_dtype: dict[str, int] = defaultdict(int)
    for item in keys["upcast"]:
        by_dtype[item["from_dtype"]] += 1
    rows += [("upcast", f"{n} tensors {dtype} -> float32") for dtype, n in by_dtype.items()]
    rows += [("initialised", f"{p['part']}: {p['method']}") for p in keys["initialised"]]
    return rows


def render_text(summary: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_checkpoint`'s result."""
    params = summary["parameters"]
    lines = [f"checkpoint  {summary['source']}", f"format      {summary['format']}", "architecture"]
    lines += _rows(_architecture_rows(summary["architecture"]))
    lines.append("parameters")
    lines += _rows([(name, f"{count:>13,}") for name, count in params.items()])
    lines.append("keys")
    lines += _rows(_key_rows(summary["keys"]))
    return "\n".join(lines)


# Commands that live with their subsystem register themselves here (one line each).
_register_calibrate(app)
_register_trt(app)
_register_qa(app)


def main() -> None:
    """Console-script entry point (``hbi-export``)."""
    app()


if __name__ == "__main__":
    main()
