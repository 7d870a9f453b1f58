"""The caption commands: training in ``hbi-train`` (``caption``: the decoder alone; ``caption-joint``: retrieval
model + decoder together), exporting in ``hbi-export`` (``caption-export``, ``caption-joint-export``).

:func:`register` adds the training commands to ``hbi-train``; :func:`register_export` adds the export commands to
``hbi-export`` (through its entry point: the export layer never imports training). ``hbi-train caption-export``
and ``hbi-train caption-joint-export`` remain as hidden, deprecated aliases that say where the command went.
"""

from __future__ import annotations

import enum
import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from hbi_runtime.cli_options import (DebugAlias, FormatOption, JsonAlias, TorchDeviceOption, deprecated,
                                     output_format, overwrite_option, run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json


def _demo_package() -> Path:
    import hbi_runtime

    return Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "package"


def _demo_checkpoint() -> Path:
    return _demo_package().parent / "checkpoint"


class CaptionSet(str, enum.Enum):
    canonical = "canonical"
    all = "all"


DataOption = Annotated[Path, typer.Option("--data", help="Synthetic set (python -m hbi_training.data.synthetic).",
                                          show_default=False)]
SCRATCH_HELP = "Start from a random 'demo' preset model instead (not with --init)."
TOKEN_DROPOUT_HELP = "Probability that a caption word fed to the decoder is replaced by 'unknown' (training only)."


# ------------------------------------------------------------------------------------------ hbi-train caption
CAPTION_EXAMPLES = (
    "Examples:\n\n  hbi-train caption --data /tmp/syn --out runs/caption\n\n"
    "  hbi-train caption --data /tmp/syn --out runs/cap --steps 500 --no-qa --format json\n\n"
    "  hbi-train caption --data /tmp/syn --out runs/cap --model pkg/retrieval --memory-levels 0,1\n\n"
    "  hbi-train caption --data /tmp/syn --out runs/cap --export hbi_runtime/data/demo/caption\n\n"
    "  hbi-train caption --data /tmp/syn20k --out runs/cap --frame-deltas --token-dropout 0.3 --steps 10000\n\n"
    "  hbi-train caption --data /tmp/syn20k --out runs/cap --frame-deltas --patch-grid 4 --token-dropout 0.3")


def caption(
    ctx: typer.Context,
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: feature cache, decoder/, metrics.jsonl.",
                                      show_default=False)],
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="Retrieval model package whose video encoder is frozen (default: the demo's).",
        show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 4000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Sequences per batch.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine).")] = 3e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seeds initialisation and batches.")] = 0,
    captions: Annotated[CaptionSet, typer.Option(
        "--captions", help="canonical, or all (with the grammar's paraphrases).")] = CaptionSet.canonical,
    qa: Annotated[bool, typer.Option("--qa/--no-qa", help="Also train open-ended QA (question as prefix).")] = True,
    width: Annotated[int, typer.Option("--width", min=8, help="Decoder width.")] = 128,
    layers: Annotated[int, typer.Option("--layers", min=1, help="Decoder layers.")] = 2,
    heads: Annotated[int, typer.Option("--heads", min=1, help="Attention heads.")] = 4,
    memory_levels: Annotated[str, typer.Option(
        "--memory-levels", help="The video-side levels the decoder reads, e.g. 0,1,2 (entity, action, event); "
                                "not the level weights of --levels elsewhere.")] = "0,1,2",
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
    init_decoder: Annotated[Optional[Path], typer.Option(
        "--init-decoder",
        help="Continue this decoder folder (e.g. RUN/decoder of `hbi-train caption-joint`) instead of a new one.",
        show_default=False)] = None,
    token_dropout: Annotated[float, typer.Option("--token-dropout", min=0.0, max=1.0, help=TOKEN_DROPOUT_HELP)]
    = 0.0,
    frame_deltas: Annotated[bool, typer.Option("--frame-deltas/--no-frame-deltas", help=(
        "Add one memory token per pair of consecutive frames (their difference), so that events are single "
        "tokens (docs/captioning.md)."))] = False,
    patch_grid: Annotated[int, typer.Option("--patch-grid", min=0, help=(
        "Spatial memory: also read each frame's patch tokens pooled to an N x N map (where things are), "
        "through a frozen copy of the retrieval vision tower; 0: off (docs/captioning.md)."))] = 0,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="With --patch-grid: the retrieval checkpoint the --model package was exported from "
                             "(default: the demo's, when --model is the demo's).", show_default=False)] = None,
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Also write a caption package here (parity-checked; replaces a caption package, refuses any "
                         "other non-empty folder, the run folder and the inputs; checked before training).",
        show_default=False)] = None,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    package_alias: Annotated[Optional[Path], typer.Option("--package", hidden=True, help="Deprecated: --model.")]
    = None,
    levels_alias: Annotated[Optional[str], typer.Option("--levels", hidden=True, help="Deprecated: --memory-levels.")]
    = None,
    debug: DebugAlias = False,
) -> None:
    """Train the caption / open-ended QA decoder on the frozen retrieval video encoder (cached features)."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_runtime.errors import UsageError
        from hbi_training.caption import CaptionTrainSettings, check_data, export_run, train_caption
        from hbi_training.progress import stages

        if package_alias is not None:
            deprecated("--package", "--model")
            model = model or package_alias
        if levels_alias is not None:
            deprecated("--levels", "--memory-levels")
            memory_levels = levels_alias
        check_data(data)
        if export is not None:  # before training: a refused --export must not cost a training run
            from hbi_runtime.outputs import prepare_output_dir

            inputs = [data, model or _demo_package(), out, init_decoder,
                      (checkpoint or _demo_checkpoint()) if patch_grid else None]
            prepare_output_dir(export, kind="caption package", inputs=inputs, overwrite=True, option="--export")
        try:
            lv = tuple(int(x) for x in memory_levels.split(","))
        except ValueError:
            raise UsageError(f"--memory-levels must be comma-separated level numbers, got {memory_levels!r}",
                             hint="e.g. --memory-levels 0,1,2 (entity, action, event)") from None
        if patch_grid and checkpoint is None and model is not None:
            raise UsageError("--patch-grid with --model needs the checkpoint that package was exported from",
                             hint="pass --checkpoint DIR")
        s = CaptionTrainSettings(data_dir=data, out_dir=out, package=model or _demo_package(), steps=steps,
                                 batch_size=batch_size, lr=lr, seed=seed, captions=captions.value, qa=qa,
                                 width=width, layers=layers, heads=heads, levels=lv, threads=threads,
                                 init_decoder=init_decoder, token_dropout=token_dropout,
                                 frame_deltas=frame_deltas, patch_grid=patch_grid,
                                 checkpoint=(checkpoint or _demo_checkpoint()) if patch_grid else None)
        with stages(not json_mode) as say:
            summary = train_caption(s, progress=say, bar=say.enabled)
            if export is not None:
                summary["package"] = export_run(Path(summary["decoder"]), s.package, export, data, progress=say)
        if json_mode:
            emit_json({"schema": "hbi.train-caption/1", **summary})
        else:
            typer.echo(f"decoder: {summary['decoder']}  held-out attribute accuracy "
                       f"{100 * summary['test_attribute_accuracy']:.1f} %")


# ------------------------------------------------------------------------------------------ hbi-train caption-joint
JOINT_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-train caption-joint --data /tmp/syn --out runs/joint --estimator runs/demo/hbi/estimator\n\n"
    "  hbi-train caption-joint --data /tmp/syn --out runs/joint --steps 200 --val-every 100 --format json\n\n"
    "  hbi-train caption-joint --data /tmp/syn --out runs/j2 --init runs/joint/final --init-decoder runs/joint/decoder"
    " --aux-weight 1\n\n"
    "  hbi-train caption-joint --data /tmp/syn --out runs/joint --export /tmp/demo-artifacts\n\n"
    "  hbi-train caption-joint --data /tmp/syn --out runs/scratch --scratch --estimator runs/est --aux-weight 4"
    " --token-dropout 0.3 --device cuda")


def caption_joint(
    ctx: typer.Context,
    data: DataOption,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Run folder: final/ (retrieval checkpoint), decoder/, metrics.jsonl.",
        show_default=False)],
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Retrieval checkpoint to start from (default: the demo's).", show_default=False)] = None,
    scratch: Annotated[bool, typer.Option("--scratch", help=SCRATCH_HELP)] = False,
    estimator: Annotated[Optional[Path], typer.Option(
        "--estimator", help="Banzhaf estimator (the frozen teacher); without it the Banzhaf KL term is off.",
        show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 3000,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Videos per batch.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="HBI heads and decoder; CLIP towers at lr x --clip-lr-coef.")]
    = 1e-3,
    clip_lr_coef: Annotated[float, typer.Option("--clip-lr-coef", min=0.0, help="CLIP towers' share of --lr.")]
    = 1.0,
    caption_weight: Annotated[float, typer.Option("--caption-weight", min=0.0,
                                                  help="Weight of the caption cross entropy.")] = 1.0,
    aux_weight: Annotated[float, typer.Option("--aux-weight", min=0.0, help=(
        "Weight of the per-frame attribute loss (shape -> absent/colour + position from the scene metadata, "
        "training-only head on the frame tokens); 0: off."))] = 0.0,
    aux_events: Annotated[bool, typer.Option("--aux-events/--no-aux-events", help=(
        "The per-frame loss also names the event each frame shows (shape -> action + colour before)."))] = True,
    frame_deltas: Annotated[bool, typer.Option("--frame-deltas/--no-frame-deltas", help=(
        "Decoder memory gets one token per pair of consecutive frames (their difference)."))] = False,
    init_decoder: Annotated[Optional[Path], typer.Option(
        "--init-decoder", help="Start the decoder from this folder (e.g. RUN/decoder of an earlier caption-joint "
                               "run).", show_default=False)] = None,
    token_dropout: Annotated[float, typer.Option("--token-dropout", min=0.0, max=1.0, help=TOKEN_DROPOUT_HELP)]
    = 0.0,
    qa: Annotated[bool, typer.Option("--qa/--no-qa", help="Also train open-ended QA (question as prefix).")] = True,
    width: Annotated[int, typer.Option("--width", min=8, help="Decoder width.")] = 128,
    layers: Annotated[int, typer.Option("--layers", min=1, help="Decoder layers.")] = 2,
    heads: Annotated[int, typer.Option("--heads", min=1, help="Attention heads.")] = 4,
    val_every: Annotated[int, typer.Option("--val-every", min=0, help="Validation interval in steps (0: at the end).")]
    = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seeds initialisation, data order and sampling.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads.")] = 1,
    device: TorchDeviceOption = "cpu",
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Also write demo-style artifacts here (package/, checkpoint/, caption/, samples/ ...; "
                         "replaces an earlier artifact folder, refuses any other non-empty folder).",
        show_default=False)] = None,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    debug: DebugAlias = False,
) -> None:
    """Fine-tune the retrieval model together with a caption decoder reading its video side (CUDA runs train in
    fp32)."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_runtime.errors import UsageError
        from hbi_training.caption import check_data
        from hbi_training.joint import JointSettings, run_joint, write_joint_artifacts
        from hbi_training.progress import stages

        check_data(data)
        if scratch and init is not None:
            raise UsageError("--scratch and --init exclude each other", hint="give one of them")
        if export is not None:  # before training: a refused --export must not cost a training run
            from hbi_runtime.outputs import prepare_output_dir

            inputs = [data, out, None if scratch else (init or _demo_checkpoint()), estimator, init_decoder]
            prepare_output_dir(export, kind="demo artifact folder", inputs=inputs, overwrite=True,
                               option="--export")
        with stages(not json_mode) as say:
            s = JointSettings(data_dir=data, out_dir=out, init=None if scratch else (init or _demo_checkpoint()),
                              estimator=estimator, steps=steps, batch_size=batch_size, lr=lr,
                              clip_lr_coef=clip_lr_coef, caption_weight=caption_weight, aux_weight=aux_weight,
                              aux_events=aux_events, frame_deltas=frame_deltas, init_decoder=init_decoder,
                              token_dropout=token_dropout, qa=qa, width=width, layers=layers, heads=heads,
                              val_every=val_every, seed=seed, threads=threads, device=device,
                              progress=say.enabled)
            summary = run_joint(s, progress=say)
            if export is not None:
                summary["artifacts"] = write_joint_artifacts(out, export, data, seed=seed, progress=say)
        if json_mode:
            emit_json(summary)
        else:
            typer.echo(f"run {out}: held-out t2v R@1 {summary['test_t2v_r1']:.1f} %, attribute accuracy "
                       f"{100 * summary['test_attribute_accuracy']:.1f} %")


# ------------------------------------------------------------------------------------------ hbi-export caption-export
CAPTION_EXPORT_EXAMPLES = (
    "Examples:\n\n  hbi-export caption-export --decoder runs/caption/decoder --out pkg/caption\n\n"
    "  hbi-export caption-export --decoder runs/caption/decoder --out pkg/caption --model pkg/b32 --overwrite "
    "--format json")


def caption_export(
    ctx: typer.Context,
    decoder: Annotated[Path, typer.Option(
        "--decoder", help="A decoder folder written by `hbi-train caption` or `hbi-train caption-joint`.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Caption package folder to write.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(
        "--model", "-m", help="The retrieval model package the decoder was trained on (default: the demo's).",
        show_default=False)] = None,
    overwrite: overwrite_option("a caption package") = False,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    retrieval_alias: Annotated[Optional[Path], typer.Option("--retrieval", hidden=True,
                                                            help="Deprecated: --model.")] = None,
    debug: DebugAlias = False,
) -> None:
    """Export a trained caption decoder as a caption package (three ONNX graphs + manifest), parity-checked.

    Exit code 5 when the parity check fails (the package is written and marked failed)."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_training.caption import export_run
        from hbi_training.progress import stages

        if retrieval_alias is not None:
            deprecated("--retrieval", "--model")
            model = model or retrieval_alias
        with stages(not json_mode) as say:
            manifest = export_run(decoder, model or _demo_package(), out, None, overwrite=overwrite, progress=say)
        if json_mode:
            emit_json({"schema": "hbi.caption-export/1", "status": manifest["status"],
                       "manifest_sha256": manifest["manifest_sha256"], "parity": manifest["parity"]})
        else:
            typer.echo(f"caption package {out}: status {manifest['status']}")
        if manifest["status"] != "verified":
            raise SystemExit(5)


JOINT_EXPORT_EXAMPLES = (
    "Examples:\n\n  hbi-export caption-joint-export --run runs/joint --data /tmp/syn --out /tmp/demo-artifacts\n\n"
    "  hbi-export caption-joint-export --run runs/joint --data /tmp/syn --out /tmp/demo-artifacts --format json")


def caption_joint_export(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option("--run", help="A finished `hbi-train caption-joint` run folder.",
                                      show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="The synthetic set it was trained on.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write (an earlier artifact folder there is "
                                                    "replaced, any other non-empty folder refused).",
                                      show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample / query choice.")] = 0,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    debug: DebugAlias = False,
) -> None:
    """Export a caption-joint run as demo-style artifacts: retrieval package + checkpoint + caption package."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_runtime.errors import UsageError
        from hbi_training.caption import check_data
        from hbi_training.joint import write_joint_artifacts
        from hbi_training.progress import stages

        check_data(data)
        if not (run / "summary.json").is_file():
            raise UsageError(f"{run} is not a finished caption-joint run (no summary.json)",
                             hint="train one with `hbi-train caption-joint --data DIR --out RUN`")
        with stages(not json_mode) as say:
            report = write_joint_artifacts(run, out, data, seed=seed, progress=say)
        if json_mode:
            emit_json({"schema": "hbi.caption-joint-export/1", **report})
        else:
            typer.echo(f"artifacts {out}: t2v R@1 {100 * report['package_t2v_r1']:.1f} %, held-out attribute "
                       f"accuracy {100 * report['caption']['attribute_accuracy']:.1f} % (runtime)")


# ------------------------------------------------------------------------------------------ registration
EXPORTS: dict[str, tuple[Callable[..., None], str]] = {
    "caption-export": (caption_export, CAPTION_EXPORT_EXAMPLES),
    "caption-joint-export": (caption_joint_export, JOINT_EXPORT_EXAMPLES),
}


def register(app: typer.Typer) -> None:
    """Add ``caption`` and ``caption-joint`` to ``hbi-train`` (and the hidden, deprecated export aliases)."""
    app.command("caption", epilog=CAPTION_EXAMPLES)(caption)
    app.command("caption-joint", epilog=JOINT_EXAMPLES)(caption_joint)
    for name, (command, _) in EXPORTS.items():
        app.command(name, hidden=True, help=f"Deprecated: use `hbi-export {name}`.")(_moved(command, name))


def register_export(app: typer.Typer) -> None:
    """Add ``caption-export`` and ``caption-joint-export`` to ``app`` (``hbi-export``, through its entry point)."""
    for name, (command, examples) in EXPORTS.items():
        app.command(name, epilog=examples)(command)


def _moved(command: Callable[..., None], name: str) -> Callable[..., None]:
    """``command`` under its old ``hbi-train`` name: the same options, after a deprecation warning."""

    @functools.wraps(command)
    def alias(*args, **kwargs):
        deprecated(f"`hbi-train {name}`", f"`hbi-export {name}`")
        return command(*args, **kwargs)

    return alias
