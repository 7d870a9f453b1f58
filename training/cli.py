"""The ``hbi-train`` command line: ``fit`` the HBI model, or pre-train its Banzhaf ``estimator``; the caption
(``caption``, ``caption-joint``) and QA (``qa demo``, ``qa questions``) trainers register themselves.

Commands are thin: they build one settings object and call one library function (``hbi_training.runs``) inside
``run_guarded``. Options come from the one vocabulary of the three command lines (``hbi_runtime.cli_options``):
``--format/-f text|json``, global ``--debug`` and ``--version``, ``-h``; ``--out/-o`` is the run folder of every
``hbi-train`` command. Exit codes (hbi_runtime.errors): 0 ok, 1 internal error, 2 usage, 3 bad input.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_export.presets import MODEL_PRESETS
from hbi_runtime.cli_options import (DebugAlias, FormatOption, JsonAlias, TorchDeviceOption, deprecated,
                                     keep_examples, make_app, output_format, run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json
from hbi_training import caption_cli, qa_cli

app = make_app(
    "hbi-train", "Train HBI video-text retrieval models, their Banzhaf interaction estimator, and the caption and QA "
    "models on the synthetic set.",
    "Examples:\n\n  hbi-train estimator data/synth --out runs/est --steps 300\n\n"
    "  hbi-train fit data/synth --out runs/hbi --estimator runs/est --epochs 20\n\n"
    "  hbi-train --debug caption --data data/synth --out runs/caption --format json")

# one registry of architectures (hbi_export.presets): the choices of --preset
ModelPreset = enum.Enum("ModelPreset", [(name.replace("-", "_"), name) for name in MODEL_PRESETS], type=str)


class Recipe(str, enum.Enum):
    scratch = "scratch"
    finetune = "finetune"


class Transpose(str, enum.Enum):
    fixed = "fixed"
    official = "official"


class Variant(str, enum.Enum):
    textbook = "textbook"
    official = "official"


DataArg = Annotated[Path, typer.Argument(help="Data folder from `python -m hbi_training.data.synthetic`.",
                                         show_default=False)]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Run directory (metrics.jsonl, checkpoints/, final/).",
                                         show_default=False)]
PresetOption = Annotated[ModelPreset, typer.Option(
    "--preset", help=f"Architecture when --init is not given (hbi_export.presets: {', '.join(MODEL_PRESETS)}).")]
InitOption = Annotated[Optional[Path], typer.Option(
    "--init", help="Start from a checkpoint: official HBI, OpenAI / HF CLIP, or an hbi-toolkit folder.",
    show_default=False)]
StepsOption = Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimiser steps (or --epochs).",
                                                    show_default=False)]
EpochsOption = Annotated[Optional[float], typer.Option("--epochs", min=0.0, help="Epochs (or --steps).",
                                                       show_default=False)]
BatchOption = Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Pairs per batch.")]
LrOption = Annotated[Optional[float], typer.Option("--lr", help="Base learning rate (overrides the recipe's).",
                                                   show_default=False)]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds initialisation, data order and sampling.")]
AmpOption = Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 autocast + GradScaler on CUDA.")]
ClipOption = Annotated[float, typer.Option("--grad-clip", min=0.0, help="Global gradient-norm clip; 0 = off.")]
ResumeOption = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue from a run directory or one of its checkpoints/step_* folders.", show_default=False)]
FramesOption = Annotated[int, typer.Option("--max-frames", min=1, help="Frames per video (T).")]
WordsOption = Annotated[int, typer.Option("--max-words", min=2, help="Text length (L).")]
# --workers of the shared vocabulary, but DataLoader workers: 0 loads in the main process
WorkersOption = Annotated[int, typer.Option("--workers", min=0,
                                            help="DataLoader worker processes (0: load in the main process).")]
NumWorkersAlias = Annotated[Optional[int], typer.Option("--num-workers", min=0, hidden=True,
                                                        help="Deprecated: --workers.")]
ValEveryOption = Annotated[int, typer.Option("--val-every", min=0, help="Validate every N steps (0: at the end).")]
CkptEveryOption = Annotated[int, typer.Option("--ckpt-every", min=0, help="Checkpoint every N steps (0: at the end).")]
LogEveryOption = Annotated[int, typer.Option("--log-every", min=1, help="Metrics-log interval in steps.")]
ProgressOption = Annotated[bool, typer.Option(
    "--progress/--no-progress", help="On a terminal: a line per stage and a step bar (never with --format json).")]


def workers(value: int, alias: Optional[int]) -> int:
    """``--workers``, honouring the deprecated ``--num-workers`` (with a warning)."""
    if alias is not None:
        deprecated("--num-workers", "--workers")
        return alias
    return value


FIT_HELP = (
    "Train the HBI model: per-level InfoNCE, Banzhaf KL against a frozen estimator, self-distillation.\n\n"
    "Without --init a randomly initialised --preset model trains from scratch (recipe `scratch`: every part at "
    "the full rate); with --init it fine-tunes (recipe `finetune`, the official one: CLIP at lr x 1e-3). "
    "--no-banzhaf and --no-hierarchy are the ablations; both together train plain WTI at the entity level. "
    "Validation R@1 on the test split is logged to OUT/metrics.jsonl; the trained model is OUT/final "
    "(load it with `hbi-export inspect` / build_model)."
)
FIT_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-train estimator data/synth --out runs/est --steps 300\n\n"
    "  hbi-train fit data/synth --out runs/hbi --estimator runs/est --epochs 20 --batch-size 32\n\n"
    "  hbi-train fit data/synth --out runs/demo --preset demo --estimator runs/est --steps 2000 --format json\n\n"
    "  hbi-train fit data/synth --out runs/wti --no-banzhaf --no-hierarchy --steps 2000\n\n"
    "  hbi-train fit data/synth --out runs/hbi --estimator runs/est --epochs 20 --resume runs/hbi"
)


@app.command(help=FIT_HELP, epilog=FIT_EXAMPLES)
def fit(
    ctx: typer.Context,
    data: DataArg,
    out: OutOption,
    estimator: Annotated[Optional[Path], typer.Option(
        "--estimator", help="Banzhaf teacher: estimator.safetensors, its run folder, or an official file.",
        show_default=False)] = None,
    no_banzhaf: Annotated[bool, typer.Option("--no-banzhaf", help="Drop the Banzhaf KL (ablation).")] = False,
    no_hierarchy: Annotated[bool, typer.Option(
        "--no-hierarchy", help="Entity level only, no self-distillation (ablation).")] = False,
    kl: Annotated[float, typer.Option("--kl", min=0.0, help="Self-distillation weight (official README: 2).")] = 2.0,
    skl: Annotated[float, typer.Option("--skl", min=0.0, help="Banzhaf KL weight.")] = 1.0,
    transpose: Annotated[Transpose, typer.Option(
        "--banzhaf-transpose", help="Banzhaf KL second term: fixed (words) or official (batch axis).")]
    = Transpose.fixed,
    preset: PresetOption = ModelPreset("tiny"),
    init: InitOption = None,
    recipe: Annotated[Optional[Recipe], typer.Option(
        "--recipe", help="Optimiser preset (default: finetune with --init, else scratch).", show_default=False)]
    = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = 32,
    lr: LrOption = None,
    seed: SeedOption = 0,
    device: TorchDeviceOption = "auto",
    amp: AmpOption = True,
    grad_clip: ClipOption = 1.0,
    resume: ResumeOption = None,
    max_frames: FramesOption = 8,
    max_words: WordsOption = 32,
    num_workers: WorkersOption = 0,
    val_every: ValEveryOption = 0,
    ckpt_every: CkptEveryOption = 0,
    log_every: LogEveryOption = 10,
    progress: ProgressOption = True,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    num_workers_alias: NumWorkersAlias = None,
    debug: DebugAlias = False,
) -> None:
    """Fit the HBI model (``hbi_training.runs.run_fit``)."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_training.losses import LossConfig
        from hbi_training.progress import stages
        from hbi_training.runs import FitSettings, run_fit

        show = progress and not json_mode
        loss = LossConfig(kl=kl, skl=skl, banzhaf=not no_banzhaf, hierarchy=not no_hierarchy,
                          transpose=transpose.value)
        settings = FitSettings(
            data_dir=data, out_dir=out, model_preset=preset.value, init=init, steps=steps, epochs=epochs,
            batch_size=batch_size, recipe=recipe.value if recipe else None, lr=lr, seed=seed, device=device,
            amp=amp, grad_clip=grad_clip or None, max_frames=max_frames, max_words=max_words,
            num_workers=workers(num_workers, num_workers_alias), val_every=val_every, ckpt_every=ckpt_every,
            log_every=log_every, resume=resume, progress=show, loss=loss, estimator=estimator)
        with stages(show) as say:
            summary = run_fit(settings, progress=say)
        _report(summary, json_mode)


ESTIMATOR_HELP = (
    "Pre-train the Banzhaf interaction estimator (the frozen teacher of `fit`) with MSE on Monte-Carlo labels.\n\n"
    "The model (from --init, else a random --preset one, as the official script starts from CLIP) is frozen; "
    "only the estimator learns (default lr 1e-2, the official). Labels: --variant textbook (the definition, "
    "default) or official (reproduces the released estimator's labels). Writes OUT/final/estimator.safetensors."
)
ESTIMATOR_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-train estimator data/synth --out runs/est --steps 300\n\n"
    "  hbi-train estimator data/synth --out runs/est --init ViT-B-32.pt --preset vit-b-32 --variant official "
    "--samples 100 --epochs 6"
)


@app.command(help=ESTIMATOR_HELP, epilog=ESTIMATOR_EXAMPLES)
def estimator(
    ctx: typer.Context,
    data: DataArg,
    out: OutOption,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Monte-Carlo samples per cell.")] = 100,
    variant: Annotated[Variant, typer.Option("--variant", help="Label variant.")] = Variant.textbook,
    scale: Annotated[float, typer.Option("--scale", help="Label scale (official x1000).")] = 1000.0,
    preset: PresetOption = ModelPreset("tiny"),
    init: InitOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = 32,
    lr: LrOption = None,
    seed: SeedOption = 0,
    device: TorchDeviceOption = "auto",
    amp: AmpOption = True,
    grad_clip: ClipOption = 1.0,
    resume: ResumeOption = None,
    max_frames: FramesOption = 8,
    max_words: WordsOption = 32,
    num_workers: WorkersOption = 0,
    ckpt_every: CkptEveryOption = 0,
    log_every: LogEveryOption = 10,
    progress: ProgressOption = True,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    num_workers_alias: NumWorkersAlias = None,
    debug: DebugAlias = False,
) -> None:
    """Pre-train the estimator (``hbi_training.runs.run_estimator``)."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_training.estimator import EstimatorConfig
        from hbi_training.progress import stages
        from hbi_training.runs import EstimatorSettings, run_estimator

        show = progress and not json_mode
        settings = EstimatorSettings(
            data_dir=data, out_dir=out, model_preset=preset.value, init=init, steps=steps, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, device=device, amp=amp, grad_clip=grad_clip or None,
            max_frames=max_frames, max_words=max_words, num_workers=workers(num_workers, num_workers_alias),
            ckpt_every=ckpt_every, log_every=log_every, resume=resume, progress=show,
            estimator=EstimatorConfig(samples=samples, variant=variant.value, scale=scale, seed=seed))
        with stages(show) as say:
            summary = run_estimator(settings, progress=say)
        _report(summary, json_mode)


def _report(summary: dict, json_mode: bool) -> None:
    if json_mode:
        emit_json(summary)
        return
    typer.echo(f"trained {summary['steps']} steps on {summary['device']}; last loss {summary['last_loss']:.4f}")
    if summary.get("validation"):
        v = summary["validation"]
        typer.echo(f"validation: text-to-video R@1 {v['t2v_r1']:.1f}, video-to-text R@1 {v['v2t_r1']:.1f}")
    typer.echo(f"weights: {summary['final']}")


# Task commands that live with their trainers register themselves here.
qa_cli.register(app)
caption_cli.register(app)
keep_examples(app)  # last: every command is registered


def main() -> None:
    app()


if __name__ == "__main__":
    main()
