"""The caption commands of ``hbi-train``: ``caption`` (train the decoder) and ``caption-export`` (caption package)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_support import emit_json, guarded

def _demo_package() -> Path:
    import hbi_runtime

    return Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "package"


def _log(message: str) -> None:
    sys.stderr.write(f"[caption] {message}\n")
    sys.stderr.flush()


def _demo_checkpoint() -> Path:
    return _demo_package().parent / "checkpoint"


def register(app: typer.Typer) -> None:
    """Add ``caption``, ``caption-export``, ``caption-joint`` and ``caption-joint-export`` to ``app``."""
    register_joint(app)

    @app.command("caption", epilog=(
        "Examples:\n\n  hbi-train caption --data /tmp/syn --out runs/caption\n\n"
        "  hbi-train caption --data /tmp/syn --out runs/cap --steps 500 --no-qa --json\n\n"
        "  hbi-train caption --data /tmp/syn --out runs/cap --export hbi_runtime/data/demo/caption\n\n"
        "  hbi-train caption --data /tmp/syn20k --out runs/cap --frame-deltas --token-dropout 0.3 --steps 10000\n\n"
        "  hbi-train caption --data /tmp/syn20k --out runs/cap --frame-deltas --patch-grid 4 --token-dropout 0.3"))
    def caption(
        data: Annotated[Path, typer.Option(help="Synthetic set (python -m hbi_training.data.synthetic).",
                                           show_default=False)],
        out: Annotated[Path, typer.Option(help="Run folder: feature cache, decoder/, metrics.jsonl.",
                                          show_default=False)],
        package: Annotated[Optional[Path], typer.Option(
            help="Retrieval package whose video encoder is frozen (default: the demo's).",
            show_default=False)] = None,
        steps: Annotated[int, typer.Option(min=1)] = 4000,
        batch_size: Annotated[int, typer.Option(min=1)] = 64,
        lr: Annotated[float, typer.Option()] = 3e-3,
        seed: Annotated[int, typer.Option()] = 0,
        captions: Annotated[str, typer.Option(help="canonical or all (with paraphrases).")] = "canonical",
        qa: Annotated[bool, typer.Option(help="Also train open-ended QA (question as prefix).")] = True,
        width: Annotated[int, typer.Option(min=8)] = 128,
        layers: Annotated[int, typer.Option(min=1)] = 2,
        heads: Annotated[int, typer.Option(min=1)] = 4,
        levels: Annotated[str, typer.Option(help="Memory levels, e.g. 0,1,2 (entity, action, event).")] = "0,1,2",
        threads: Annotated[int, typer.Option(min=1)] = 1,
        init_decoder: Annotated[Optional[Path], typer.Option(
            help="Continue this decoder folder (e.g. RUN/decoder of `hbi-train caption-joint`) instead of a new one.",
            show_default=False)] = None,
        token_dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
            "Probability that a caption word fed to the decoder is replaced by 'unknown' (training only)."))] = 0.0,
        frame_deltas: Annotated[bool, typer.Option(help=(
            "Add one memory token per pair of consecutive frames (their difference), so that events are single "
            "tokens (docs/captioning.md)."))] = False,
        patch_grid: Annotated[int, typer.Option(min=0, help=(
            "Spatial memory: also read each frame's patch tokens pooled to an N x N map (where things are), "
            "through a frozen copy of the retrieval vision tower; 0: off (docs/captioning.md)."))] = 0,
        checkpoint: Annotated[Optional[Path], typer.Option(
            help="With --patch-grid: the retrieval checkpoint the package was exported from (default: the demo's "
                 "when --package is the demo's).", show_default=False)] = None,
        export: Annotated[Optional[Path], typer.Option(
            help="Also write a caption package here (parity-checked; replaces a caption package, refuses any other "
                 "non-empty folder, the run folder and the inputs; checked before training).",
            show_default=False)] = None,
        json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
        debug: Annotated[bool, typer.Option("--debug")] = False,
    ) -> None:
        """Train the caption / open-ended QA decoder on the frozen retrieval video encoder (cached features)."""
        with guarded(json_mode=json_output, debug=debug):
            from hbi_runtime.errors import UsageError
            from hbi_training.caption import CaptionTrainSettings, check_data, export_run, train_caption

            check_data(data)
            if export is not None:  # before training: a refused --export must not cost a training run
                from hbi_runtime.fileio import prepare_output_dir

                inputs = [data, package or _demo_package(), out, init_decoder,
                          (checkpoint or _demo_checkpoint()) if patch_grid else None]
                prepare_output_dir(export, kind="caption package", inputs=inputs, overwrite=True, option="--export")
            try:
                lv = tuple(int(x) for x in levels.split(","))
            except ValueError:
                raise UsageError(f"--levels must be comma-separated level numbers, got {levels!r}") from None
            if patch_grid and checkpoint is None and package is not None:
                raise UsageError("--patch-grid with --package needs the checkpoint that package was exported from",
                                 hint="pass --checkpoint DIR")
            s = CaptionTrainSettings(data_dir=data, out_dir=out, package=package or _demo_package(), steps=steps,
                                     batch_size=batch_size, lr=lr, seed=seed, captions=captions, qa=qa,
                                     width=width, layers=layers, heads=heads, levels=lv, threads=threads,
                                     init_decoder=init_decoder, token_dropout=token_dropout,
                                     frame_deltas=frame_deltas, patch_grid=patch_grid,
                                     checkpoint=(checkpoint or _demo_checkpoint()) if patch_grid else None)
            summary = train_caption(s, progress=None if json_output else _log)
            if export is not None:
                summary["package"] = export_run(Path(summary["decoder"]), s.package, export, data,
                                                progress=None if json_output else _log)
            if json_output:
                emit_json({"schema": "hbi.train-caption/1", **summary})
            else:
                typer.echo(f"decoder: {summary['decoder']}  held-out attribute accuracy "
                           f"{100 * summary['test_attribute_accuracy']:.1f} %")

    @app.command("caption-export", epilog=(
        "Examples:\n\n  hbi-train caption-export --decoder runs/caption/decoder --out pkg/caption\n\n"
        "  hbi-train caption-export --decoder runs/caption/decoder --out pkg/caption --retrieval pkg/b32 "
        "--overwrite"))
    def caption_export(
        decoder: Annotated[Path, typer.Option(help="A decoder folder written by `hbi-train caption`.",
                                              show_default=False)],
        out: Annotated[Path, typer.Option(help="Caption package folder to write.", show_default=False)],
        retrieval: Annotated[Optional[Path], typer.Option(
            help="The retrieval package the decoder was trained on (default: the demo's).",
            show_default=False)] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace a caption package at --out.")] = False,
        json_output: Annotated[bool, typer.Option("--json")] = False,
        debug: Annotated[bool, typer.Option("--debug")] = False,
    ) -> None:
        """Export a trained decoder as a caption package (three ONNX graphs + manifest), parity-checked."""
        with guarded(json_mode=json_output, debug=debug):
            from hbi_training.caption import export_run

            manifest = export_run(decoder, retrieval or _demo_package(), out, None, overwrite=overwrite,
                                  progress=None if json_output else _log)
            if json_output:
                emit_json({"schema": "hbi.caption-export/1", "status": manifest["status"],
                           "manifest_sha256": manifest["manifest_sha256"], "parity": manifest["parity"]})
            else:
                typer.echo(f"caption package {out}: status {manifest['status']}")
            if manifest["status"] != "verified":
                raise SystemExit(5)


def register_joint(app: typer.Typer) -> None:
    """``caption-joint`` (fine-tune retrieval model + decoder together) and ``caption-joint-export``."""

    @app.command("caption-joint", epilog=(
        "Examples:\n\n  hbi-train caption-joint --data /tmp/syn --out runs/joint --estimator runs/demo/hbi/estimator\n\n"
        "  hbi-train caption-joint --data /tmp/syn --out runs/joint --steps 200 --val-every 100 --json\n\n"
        "  hbi-train caption-joint --data /tmp/syn --out runs/j2 --init runs/joint/final --init-decoder runs/joint/decoder"
        " --aux-weight 1\n\n"
        "  hbi-train caption-joint --data /tmp/syn --out runs/joint --export /tmp/demo-artifacts\n\n"
        "  hbi-train caption-joint --data /tmp/syn --out runs/scratch --scratch --estimator runs/est --aux-weight 4"
        " --token-dropout 0.3 --device cuda"))
    def caption_joint(
        data: Annotated[Path, typer.Option(help="Synthetic set (python -m hbi_training.data.synthetic).",
                                           show_default=False)],
        out: Annotated[Path, typer.Option(help="Run folder: final/ (retrieval checkpoint), decoder/, metrics.jsonl.",
                                          show_default=False)],
        init: Annotated[Optional[Path], typer.Option(
            help="Retrieval checkpoint to start from (default: the demo's).", show_default=False)] = None,
        scratch: Annotated[bool, typer.Option(
            "--scratch", help="Start from a random 'demo' preset model instead (not with --init).")] = False,
        estimator: Annotated[Optional[Path], typer.Option(
            help="Banzhaf estimator (the frozen teacher); without it the Banzhaf KL term is off.",
            show_default=False)] = None,
        steps: Annotated[int, typer.Option(min=1)] = 3000,
        batch_size: Annotated[int, typer.Option(min=2)] = 64,
        lr: Annotated[float, typer.Option(help="HBI heads and decoder; CLIP towers at lr x --clip-lr-coef.")] = 1e-3,
        clip_lr_coef: Annotated[float, typer.Option(min=0.0)] = 1.0,
        caption_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the caption cross entropy.")] = 1.0,
        aux_weight: Annotated[float, typer.Option(min=0.0, help=(
            "Weight of the per-frame attribute loss (shape -> absent/colour + position from the scene metadata, "
            "training-only head on the frame tokens); 0: off."))] = 0.0,
        aux_events: Annotated[bool, typer.Option(help=(
            "The per-frame loss also names the event each frame shows (shape -> action + colour before)."))] = True,
        frame_deltas: Annotated[bool, typer.Option(help=(
            "Decoder memory gets one token per pair of consecutive frames (their difference)."))] = False,
        init_decoder: Annotated[Optional[Path], typer.Option(
            help="Start the decoder from this folder (e.g. RUN/decoder of an earlier caption-joint run).",
            show_default=False)] = None,
        token_dropout: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
            "Probability that a caption word fed to the decoder is replaced by 'unknown' (training only)."))] = 0.0,
        qa: Annotated[bool, typer.Option(help="Also train open-ended QA (question as prefix).")] = True,
        width: Annotated[int, typer.Option(min=8)] = 128,
        layers: Annotated[int, typer.Option(min=1)] = 2,
        heads: Annotated[int, typer.Option(min=1)] = 4,
        val_every: Annotated[int, typer.Option(min=0, help="Validation interval in steps (0: at the end).")] = 500,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(min=1)] = 1,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (CUDA runs train in fp32).")] = "cpu",
        export: Annotated[Optional[Path], typer.Option(
            help="Also write demo-style artifacts here (package/, checkpoint/, caption/, samples/ ...; replaces an "
                 "earlier artifact folder, refuses any other non-empty folder).",
            show_default=False)] = None,
        json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
        debug: Annotated[bool, typer.Option("--debug")] = False,
    ) -> None:
        """Fine-tune the retrieval model together with a caption decoder reading its video side."""
        with guarded(json_mode=json_output, debug=debug):
            from hbi_training.caption import check_data
            from hbi_training.joint import JointSettings, run_joint, write_joint_artifacts

            from hbi_runtime.errors import UsageError

            check_data(data)
            if scratch and init is not None:
                raise UsageError("--scratch and --init exclude each other", hint="give one of them")
            if export is not None:  # before training: a refused --export must not cost a training run
                from hbi_runtime.fileio import prepare_output_dir

                inputs = [data, out, None if scratch else (init or _demo_checkpoint()), estimator, init_decoder]
                prepare_output_dir(export, kind="demo artifact folder", inputs=inputs, overwrite=True,
                                   option="--export")
            s = JointSettings(data_dir=data, out_dir=out, init=None if scratch else (init or _demo_checkpoint()),
                              estimator=estimator, steps=steps, batch_size=batch_size, lr=lr,
                              clip_lr_coef=clip_lr_coef, caption_weight=caption_weight, aux_weight=aux_weight,
                              aux_events=aux_events, frame_deltas=frame_deltas, init_decoder=init_decoder,
                              token_dropout=token_dropout, qa=qa, width=width, layers=layers, heads=heads,
                              val_every=val_every, seed=seed, threads=threads, device=device,
                              progress=not json_output)
            log = None if json_output else _log
            summary = run_joint(s, progress=log)
            if export is not None:
                summary["artifacts"] = write_joint_artifacts(out, export, data, seed=seed, progress=log)
            if json_output:
                emit_json(summary)
            else:
                typer.echo(f"run {out}: held-out t2v R@1 {summary['test_t2v_r1']:.1f} %, attribute accuracy "
                           f"{100 * summary['test_attribute_accuracy']:.1f} %")

    @app.command("caption-joint-export", epilog=(
        "Examples:\n\n  hbi-train caption-joint-export --run runs/joint --data /tmp/syn --out /tmp/demo-artifacts"))
    def caption_joint_export(
        run: Annotated[Path, typer.Option(help="A finished `hbi-train caption-joint` run folder.", show_default=False)],
        data: Annotated[Path, typer.Option(help="The synthetic set it was trained on.", show_default=False)],
        out: Annotated[Path, typer.Option(help="Artifact folder to write (an earlier artifact folder there is "
                                               "replaced, any other non-empty folder refused).", show_default=False)],
        seed: Annotated[int, typer.Option(help="Seed of the sample / query choice.")] = 0,
        json_output: Annotated[bool, typer.Option("--json")] = False,
        debug: Annotated[bool, typer.Option("--debug")] = False,
    ) -> None:
        """Export a joint run as demo-style artifacts: retrieval package + checkpoint + caption package."""
        with guarded(json_mode=json_output, debug=debug):
            from hbi_runtime.errors import UsageError
            from hbi_training.caption import check_data
            from hbi_training.joint import write_joint_artifacts

            check_data(data)
            if not (run / "summary.json").is_file():
                raise UsageError(f"{run} is not a finished caption-joint run (no summary.json)",
                                 hint="train one with `hbi-train caption-joint --data DIR --out RUN`")
            report = write_joint_artifacts(run, out, data, seed=seed, progress=None if json_output else _log)
            if json_output:
                emit_json({"schema": "hbi.caption-joint-export/1", **report})
            else:
                typer.echo(f"artifacts {out}: t2v R@1 {100 * report['package_t2v_r1']:.1f} %, held-out attribute "
                           f"accuracy {100 * report['caption']['attribute_accuracy']:.1f} % (runtime)")
