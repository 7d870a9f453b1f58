"""The ``hbi-export`` command line. Commands are thin: one library call inside ``run_guarded``.

Options come from :mod:`hbi_runtime.cli_options` (the vocabulary of the three CLIs): ``--format/-f``, ``--levels``,
``--overwrite``, ``--strict``, ``--workers``; ``--debug`` and ``--version`` are global (``hbi-export --debug onnx
...``). Long steps show what they do on a terminal (:class:`~hbi_runtime.cli_options.Steps`), never in
``--format json`` or when stderr is not a terminal.

Which commands: this module's own (``inspect``, ``convert``, ``init``, ``onnx``, ``parity``, ``check``), those of
``hbi_export``'s subpackages (``build-engine``, ``qa-export``), and the commands of the subsystems *above*
hbi_export, which this module never imports (docs/architecture.md, "Layers"): they register themselves through the
entry-point group :data:`COMMAND_GROUP` (``[project.entry-points."hbi_toolkit.export_commands"]`` in
pyproject.toml, each value a ``register(app)`` function), e.g. ``calibrate`` (hbi_calibration) and the caption
exports (hbi_training). Entry points load in the order of their names; one that needs an optional dependency that
is not installed is skipped quietly, one that fails otherwise with a warning (both in :data:`SKIPPED`), so
``hbi-export --help`` and the other commands work on any install.

Exit codes (hbi_runtime.errors): 0 ok, 1 internal error, 2 usage, 3 bad input (e.g. not a checkpoint), 5 a
parity or lint gate failed.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from hbi_export.presets import MODEL_PRESETS
from hbi_export.tasks.qa_cli import register as _register_qa
from hbi_export.triton_repo import register as _register_triton
from hbi_export.trt.cli import register as _register_trt
from hbi_runtime.cli_options import (LEVELS_HELP, DebugAlias, FormatOption, Steps, deprecated, keep_examples,
                                     make_app, overwrite_option, parse_levels, run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json
from hbi_runtime.errors import EXIT_GATE_FAILED

COMMAND_GROUP = "hbi_toolkit.export_commands"

app = make_app(
    "hbi-export", "Load, inspect and export HBI video-text retrieval models.",
    "Examples:\n\n"
    "  hbi-export inspect ckpts/pytorch_model.bin.4\n\n"
    "  hbi-export onnx --checkpoint ckpts/pytorch_model.bin.4 --out pkg/msrvtt\n\n"
    "  hbi-export --debug parity pkg/msrvtt --checkpoint ckpts/pytorch_model.bin.4")

TemporalLayersOption = Annotated[int, typer.Option(
    "--temporal-layers", min=0, help="seqTransf depth for CLIP checkpoints (official default 4).")]
Progress = Callable[[str], None]


def _run(ctx: typer.Context, fmt: OutputFormat, debug: bool, compute: Callable[[Progress], dict[str, Any]],
         render: Callable[[dict[str, Any]], str]) -> None:
    """Run a command body under ``run_guarded``, its steps shown on a terminal (text mode only), and print its
    result as JSON or as ``render``'s text."""
    json_mode = fmt is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        with Steps(enabled=not json_mode) as say:
            result = compute(say)
        if json_mode:
            emit_json(result)
        else:
            typer.echo(render(result))


INSPECT_HELP = (
    "Show a checkpoint's format, architecture, parameters per part and key report.\n\n"
    "Reads official HBI checkpoints (pytorch_model.bin.N, best.pth), OpenAI CLIP weights (ViT-B-32.pt), "
    "Hugging Face CLIP directories and hbi-toolkit directories. The load is strict: missing, unexpected or "
    "mis-shaped keys are an error (exit code 3)."
)


@app.command(help=INSPECT_HELP, epilog="Examples:\n\n  hbi-export inspect ckpts/pytorch_model.bin.4\n\n"
                                       "  hbi-export inspect ckpts/pytorch_model.bin.4 --format json")
def inspect(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.", show_default=False)],
    fmt: FormatOption = OutputFormat.text,
    temporal_layers: TemporalLayersOption = 4,
    debug: DebugAlias = False,
) -> None:
    """Describe a checkpoint (``describe_checkpoint``) as text or JSON (schema ``hbi.inspect/1``)."""

    def compute(say: Progress) -> dict[str, Any]:
        say(f"reading {checkpoint}")
        from hbi_export.checkpoints.inspect import describe_checkpoint  # torch import only when needed

        return describe_checkpoint(checkpoint, temporal_layers=temporal_layers)

    _run(ctx, fmt, debug, compute, render_text)


CONVERT_HELP = (
    "Convert a checkpoint to the hbi-toolkit format (model.safetensors + config.json).\n\n"
    "Reads everything `inspect` reads, strictly. CLIP weights (OpenAI or Hugging Face) initialise the HBI parts "
    "the way the official training script does. Merge ratios and level weights are stored with the model."
)


@app.command(help=CONVERT_HELP, epilog=(
    "Examples:\n\n"
    "  hbi-export convert ckpts/pytorch_model.bin.4 models/msrvtt\n\n"
    "  hbi-export convert ckpts/pytorch_model.bin.4 models/qa --levels 0.4,0.4,0.2\n\n"
    "  hbi-export convert ViT-B-32.pt models/clip-init --temporal-layers 4"))
def convert(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file or directory.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output directory.", show_default=False)],
    text_ratios: Annotated[Optional[tuple[float, float]], typer.Option(
        "--text-ratios", help="Text merge ratios (action, event). Default: the checkpoint's own, else 0.25 0.5.",
        show_default=False)] = None,
    video_ratios: Annotated[Optional[tuple[float, float]], typer.Option(
        "--video-ratios", help="Video merge ratios (action, event). Default: the checkpoint's own, else 0.25 0.5.",
        show_default=False)] = None,
    levels: Annotated[Optional[str], typer.Option(
        "--levels", help=LEVELS_HELP + " Default: the checkpoint's own, else 1,0,0.", show_default=False)] = None,
    level_weights: Annotated[Optional[tuple[float, float, float]], typer.Option(
        "--level-weights", hidden=True, help="Deprecated: --levels A,B,C.", show_default=False)] = None,
    temporal_layers: TemporalLayersOption = 4,
    overwrite: overwrite_option("a checkpoint folder") = False,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """Strict load + save in our format (``convert_checkpoint``)."""

    def compute(say: Progress) -> dict[str, Any]:
        weights = _levels_or_deprecated(levels, level_weights)
        say(f"converting {checkpoint}")
        from hbi_export.checkpoints.convert import convert_checkpoint

        return {"schema": "hbi.convert/1", **convert_checkpoint(
            checkpoint, out, overwrite=overwrite, text_ratios=text_ratios, video_ratios=video_ratios,
            level_weights=weights, temporal_layers=temporal_layers)}

    _run(ctx, fmt, debug, compute, lambda r: f"wrote {r['output']} ({r['format']} checkpoint {r['source']})")


def _levels_or_deprecated(levels: Optional[str], level_weights: Optional[tuple[float, float, float]]):
    """``--levels A,B,C``, or the deprecated ``--level-weights A B C`` (with a warning); not both."""
    if level_weights is None:
        return parse_levels(levels)
    from hbi_runtime.errors import UsageError

    if levels is not None:
        raise UsageError("give --levels only (--level-weights is its deprecated spelling)")
    deprecated("--level-weights A B C", "--levels A,B,C")
    return parse_levels(",".join(repr(float(v)) for v in level_weights), option="--level-weights")


INIT_HELP = (
    "Write a randomly initialised model of a preset architecture, in the hbi-toolkit format.\n\n"
    "For pipeline tests and benchmarks: random weights retrieve nothing meaningful. To start training from CLIP, "
    "use `hbi-export convert ViT-B-32.pt OUT` instead."
)


@app.command(help=INIT_HELP, epilog="Examples:\n\n  hbi-export init models/random-b32 --preset vit-b-32\n\n"
                                    "  hbi-export init models/tiny --preset tiny --seed 3 --format json")
def init(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Output directory.", show_default=False)],
    preset: Annotated[str, typer.Option(
        "--preset", help=f"Model preset: {', '.join(MODEL_PRESETS)}.")] = "vit-b-32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random initialisation.")] = 0,
    overwrite: overwrite_option("a checkpoint folder") = False,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """Random model of a preset (``init_random``)."""

    def compute(say: Progress) -> dict[str, Any]:
        say(f"initialising a random {preset} model")
        from hbi_export.checkpoints.convert import init_random

        return {"schema": "hbi.init/1", **init_random(out, preset, seed=seed, overwrite=overwrite)}

    _run(ctx, fmt, debug, compute,
         lambda r: f"wrote {r['output']}: random {preset}, seed {seed}, {r['parameters']:,} parameters")


# ------------------------------------------------------------------------------------------ ONNX packages
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
    "Parity fails loudly: exit code 5 and the package is marked failed (the runtime refuses it). On a terminal "
    "each step (loading, exporting and checking each graph, parity) is shown on stderr; the parity table (or "
    "--format json) goes to stdout."
)


@app.command("onnx", help=ONNX_HELP, epilog=(
    "Examples:\n\n"
    "  hbi-export onnx --checkpoint ckpts/pytorch_model.bin.4 --out pkg/msrvtt\n\n"
    "  hbi-export onnx --checkpoint models/b32 --out pkg/b32-fp16 --precision fp16\n\n"
    "  hbi-export onnx --clip ViT-B-32.pt --out pkg/clip --max-words 24 -f json"))
def onnx_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Package folder to write.", show_default=False)],
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Checkpoint (any format `inspect` reads).", show_default=False)] = None,
    clip: Annotated[Optional[Path], typer.Option(
        "--clip", help="Export a CLIP-initialised HBI model from CLIP weights instead of --checkpoint.",
        show_default=False)] = None,
    levels: Annotated[Optional[str], typer.Option(
        "--levels", help=LEVELS_HELP + " The package's default (the runtime may override it per query). Default: "
                         "the checkpoint's own, else 1,0,0.", show_default=False)] = None,
    max_words: Annotated[int, typer.Option("--max-words", help="Text length L (fixed in the graphs).")] = 32,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Frames per video T (fixed in the graphs).")] = 12,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 18,
    precision: Annotated[str, typer.Option(
        "--precision", metavar="<fp32|fp16>",
        help="Of the encoders (LayerNorm, softmax, reductions stay fp32).")] = "fp32",
    skip_parity: Annotated[bool, typer.Option(
        "--skip-parity", help="Do not run parity (the package stays unverified).")] = False,
    overwrite: overwrite_option("a model package") = False,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """Checkpoint -> model package -> parity (``export_package``)."""
    holder: dict[str, Any] = {}

    def compute(say: Progress) -> dict[str, Any]:
        from hbi_export.onnx.package import export_package
        from hbi_runtime.errors import UsageError

        if (checkpoint is None) == (clip is None):
            raise UsageError("give exactly one of --checkpoint and --clip",
                             hint="--checkpoint for an HBI (or any supported) checkpoint, --clip for CLIP weights")
        _, result = export_package(checkpoint or clip, out, level_weights=parse_levels(levels),
                                   max_words=max_words, max_frames=max_frames, opset=opset, precision=precision,
                                   overwrite=overwrite, parity=not skip_parity, progress=say)
        holder["failed"] = result is not None and not result.ok
        holder["result"] = result
        return _parity_payload("hbi.onnx/1", out, result)

    _run(ctx, fmt, debug, compute, lambda _: _parity_text(holder["result"]))
    if holder.get("failed"):
        typer.echo(f"parity failed: {out} is marked failed; fix the cause or re-check with "
                   f"`hbi-export parity {out} --checkpoint CKPT`", err=True)
        raise SystemExit(EXIT_GATE_FAILED)


PARITY_HELP = (
    "Check a model package against the PyTorch model of its checkpoint and record the verdict in its manifest.\n\n"
    "Reports per output max abs / rel error and cosine, and for score matrices top-1 / top-5 agreement and Spearman "
    "rank correlation, against the tolerance of the package's precision. Exit code 5 when a check fails.\n\n"
    "With --engine PRECISION it checks the package's TensorRT engines instead (built by `hbi-export build-engine`; "
    "needs the GPU and TensorRT they were built for): fp16 by feature cosine, top-5 agreement and Spearman rank "
    "correlation, int8 by top-1 agreement; the package's status is not changed."
)


@app.command(help=PARITY_HELP, epilog=(
    "Examples:\n\n"
    "  hbi-export parity pkg/msrvtt --checkpoint ckpts/pytorch_model.bin.4\n\n"
    "  hbi-export parity pkg/msrvtt --checkpoint models/msrvtt --format json\n\n"
    "  hbi-export parity pkg/msrvtt --checkpoint models/msrvtt --engine fp16"))
def parity(
    ctx: typer.Context,
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The checkpoint it was exported from.",
                                             show_default=False)],
    engine: Annotated[Optional[str], typer.Option(
        "--engine", help="Check the TensorRT engines of this precision (fp32, fp16, int8) instead of the ONNX "
                         "graphs.", show_default=False)] = None,
    plugins: Annotated[Optional[Path], typer.Option(
        "--plugins", help="With --engine: the hbi plugin library the engines were built with (default "
                          "$HBI_TRT_PLUGINS).", show_default=False)] = None,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """Re-run parity (``check_package``), or check engines (``compare_engines``)."""
    holder: dict[str, Any] = {}

    def compute(say: Progress) -> dict[str, Any]:
        from hbi_runtime.errors import UsageError

        if engine is None and plugins is not None:
            raise UsageError("--plugins goes with --engine")
        if engine is not None and engine not in ("fp32", "fp16", "int8"):
            raise UsageError(f"--engine must be fp32, fp16 or int8, got {engine!r}")
        if engine is not None:
            from hbi_runtime.backends.tensorrt import import_tensorrt

            import_tensorrt()  # before loading the model: fail fast where TensorRT is missing
        say(f"loading checkpoint {checkpoint}")
        from hbi_export.checkpoints import build_model
        from hbi_export.onnx.parity import check_package, compare_engines

        model, _ = build_model(checkpoint)
        if engine is not None:
            options = {"plugins": plugins} if plugins is not None else {}
            holder["result"] = compare_engines(package, model, engine, progress=say, **options)
            return {**_parity_payload("hbi.parity/1", package, holder["result"]), "engine": engine}
        holder["result"] = check_package(package, model, progress=say)
        return _parity_payload("hbi.parity/1", package, holder["result"])

    _run(ctx, fmt, debug, compute, lambda _: _parity_text(holder["result"]))
    if not holder["result"].ok:
        raise SystemExit(EXIT_GATE_FAILED)


CHECK_HELP = (
    "Check a model package's graphs against TensorRT's ONNX operator support (no TensorRT needed): every op, "
    "attribute and dtype, the hbi custom ops' plugin attributes and function bodies, and constants that overflow "
    "FP16. Exit code 5 when any finding is an error."
)


@app.command(help=CHECK_HELP, epilog="Examples:\n\n  hbi-export check pkg/msrvtt --trt 10.3\n\n"
                                     "  hbi-export check pkg/msrvtt --format json")
def check(
    ctx: typer.Context,
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    trt: Annotated[Optional[list[str]], typer.Option(
        "--trt", help="TensorRT target: 10.3 (Jetson, JetPack 6) or current; repeatable. Default: both.",
        show_default=False)] = None,
    fmt: FormatOption = OutputFormat.text,
    debug: DebugAlias = False,
) -> None:
    """TensorRT readiness lint (``lint_package``)."""
    holder: dict[str, Any] = {}

    def compute(say: Progress) -> dict[str, Any]:
        from hbi_export.trt_lint import DEFAULT_TRT_VERSIONS, lint_package

        say(f"checking {package}")
        holder["report"] = lint_package(package, trt_versions=tuple(trt or DEFAULT_TRT_VERSIONS))
        return holder["report"].to_dict()

    def render(_: dict[str, Any]) -> str:
        from hbi_export.trt_lint import render_text

        return render_text(holder["report"])

    _run(ctx, fmt, debug, compute, render)
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


# ------------------------------------------------------------------------------------------ command registration
SKIPPED: dict[str, str] = {}
"""Entry points of :data:`COMMAND_GROUP` that were not registered: name -> why."""

_OUR_PACKAGES = ("hbi_runtime", "hbi_export", "hbi_calibration", "hbi_training")


def _missing_optional(exc: BaseException) -> bool:
    """True when ``exc`` is an optional third-party dependency that is not installed (torch on a deployment box),
    not a module of this toolkit (that would be a broken install or a wrong entry point)."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and bool(name) and name.split(".")[0] not in _OUR_PACKAGES


def register_entry_points(target: typer.Typer, group: str = COMMAND_GROUP) -> list[str]:
    """Call every ``register(app)`` of the entry-point ``group`` on ``target``, in the order of their names.

    An entry point that needs an optional dependency that is not installed is skipped quietly. One that fails
    otherwise (a wrong entry point, a broken install, a bug in its ``register``) is skipped with a warning on
    stderr: the other commands, and ``--help``, keep working. Both are listed in :data:`SKIPPED`.

    Returns:
        The names of the entry points registered.
    """
    from importlib.metadata import entry_points

    done = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            ep.load()(target)
        except Exception as exc:  # noqa: BLE001 - one broken subsystem must not take the whole CLI down
            if _missing_optional(exc):
                SKIPPED[ep.name] = f"{ep.value}: needs {exc.name}, which is not installed"
                continue
            SKIPPED[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
            sys.stderr.write(f"warning: {target.info.name}: the commands of entry point {ep.name!r} "
                             f"({SKIPPED[ep.name]}) are not available\n")
            continue
        done.append(ep.name)
    return done


# hbi_export's own subsystems register directly; the subsystems above it through their entry points
_register_trt(app)
_register_qa(app)
_register_triton(app)
register_entry_points(app)
keep_examples(app)  # last: every command is registered


def main() -> None:
    """Console-script entry point (``hbi-export``)."""
    app()


if __name__ == "__main__":
    main()
