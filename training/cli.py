"""The ``hbi-train`` command line: ``fit`` the HBI model, or pre-train its Banzhaf ``estimator``.

Commands are thin: they build one settings object and call one library function (``hbi_training.runs``) inside
``guarded``. Exit codes (hbi_runtime.errors): 0 ok, 1 internal error, 2 usage, 3 bad input.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_support import emit_json, guarded
from hbi_training import caption_cli, qa_cli

app = typer.Typer(
    name="hbi-train",
    help="Train HBI video-text retrieval models and their Banzhaf interaction estimator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # errors go through guarded(); tracebacks only with --debug
)


class ModelPreset(str, enum.Enum):
    tiny = "tiny"
    vit_b_32 = "vit-b-32"


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
PresetOption = Annotated[ModelPreset, typer.Option("--preset", help="Architecture when --init is not given.")]
InitOption = Annotated[Optional[Path], typer.Option(
    "--init", help="Start from a checkpoint: official HBI, OpenAI / HF CLIP, or an hbi-toolkit folder.")]
StepsOption = Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimiser steps (or --epochs).")]
EpochsOption = Annotated[Optional[float], typer.Option("--epochs", min=0.0, help="Epochs (or --steps).")]
BatchOption = Annotated[int, typer.Option("--batch-size", "-b", min=2, help="Pairs per batch.")]
LrOption = Annotated[Optional[float], typer.Option("--lr", help="Base learning rate (overrides the recipe's).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds initialisation, data order and sampling.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
AmpOption = Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 autocast + GradScaler on CUDA.")]
ClipOption = Annotated[float, typer.Option("--grad-clip", min=0.0, help="Global gradient-norm clip; 0 = off.")]
ResumeOption = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue from a run directory or one of its checkpoints/step_* folders.")]
FramesOption = Annotated[int, typer.Option("--max-frames", min=1, help="Frames per video (T).")]
WordsOption = Annotated[int, typer.Option("--max-words", min=2, help="Text length (L).")]
WorkersOption = Annotated[int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")]
ValEveryOption = Annotated[int, typer.Option("--val-every", min=0, help="Validate every N steps (0: at the end).")]
CkptEveryOption = Annotated[int, typer.Option("--ckpt-every", min=0, help="Checkpoint every N steps (0: at the end).")]
LogEveryOption = Annotated[int, typer.Option("--log-every", min=1, help="Metrics-log interval in steps.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary (and errors) as JSON.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


@app.callback()
def _main() -> None:
    """Train HBI video-text retrieval models and their Banzhaf interaction estimator."""


FIT_HELP = (
    "Train the HBI model: per-level InfoNCE, Banzhaf KL against a frozen estimator, self-distillation.\n\n"
    "Without --init a randomly initialised --preset model trains from scratch (recipe `scratch`: every part at "
    "the full rate); with --init it fine-tunes (recipe `finetune`, the official one: CLIP at lr x 1e-3). "
    "--no-banzhaf and --no-hierarchy are the ablations; both together train plain WTI at the entity level. "
    "Validation R@1 on the test split is logged to OUT/metrics.jsonl; the trained model is OUT/final "
    "(load it with `hbi-export inspect` / build_model).\n\n"
    "Examples:\n\n"
    "  hbi-train estimator data/synth --out runs/est --steps 300\n\n"
    "  hbi-train fit data/synth --out runs/hbi --estimator runs/est --epochs 20 --batch-size 32\n\n"
    "  hbi-train fit data/synth --out runs/wti --no-banzhaf --no-hierarchy --steps 2000\n\n"
    "  hbi-train fit data/synth --out runs/hbi --estimator runs/est --epochs 20 --resume runs/hbi"
)


@app.command(help=FIT_HELP)
def fit(
    data: DataArg,
    out: OutOption,
    estimator: Annotated[Optional[Path], typer.Option(
        "--estimator", help="Banzhaf teacher: estimator.safetensors, its run folder, or an official file.")] = None,
    no_banzhaf: Annotated[bool, typer.Option("--no-banzhaf", help="Drop the Banzhaf KL (ablation).")] = False,
    no_hierarchy: Annotated[bool, typer.Option(
        "--no-hierarchy", help="Entity level only, no self-distillation (ablation).")] = False,
    kl: Annotated[float, typer.Option("--kl", min=0.0, help="Self-distillation weight (official README: 2).")] = 2.0,
    skl: Annotated[float, typer.Option("--skl", min=0.0, help="Banzhaf KL weight.")] = 1.0,
    transpose: Annotated[Transpose, typer.Option(
        "--banzhaf-transpose", help="Banzhaf KL second term: fixed (words) or official (batch axis).")]
    = Transpose.fixed,
    preset: PresetOption = ModelPreset.tiny,
    init: InitOption = None,
    recipe: Annotated[Optional[Recipe], typer.Option(
        "--recipe", help="Optimiser preset (default: finetune with --init, else scratch).")] = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = 32,
    lr: LrOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
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
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Fit the HBI model (``hbi_training.runs.run_fit``)."""
    with guarded(json_mode=json_output, debug=debug):
        from hbi_training.losses import LossConfig
        from hbi_training.runs import FitSettings, run_fit

        loss = LossConfig(kl=kl, skl=skl, banzhaf=not no_banzhaf, hierarchy=not no_hierarchy,
                          transpose=transpose.value)
        settings = FitSettings(
            data_dir=data, out_dir=out, model_preset=preset.value, init=init, steps=steps, epochs=epochs,
            batch_size=batch_size, recipe=recipe.value if recipe else None, lr=lr, seed=seed, device=device,
            amp=amp, grad_clip=grad_clip or None, max_frames=max_frames, max_words=max_words,
            num_workers=num_workers, val_every=val_every, ckpt_every=ckpt_every, log_every=log_every,
            resume=resume, progress=progress, loss=loss, estimator=estimator)
        _report(run_fit(settings), json_output)


ESTIMATOR_HELP = (
    "Pre-train the Banzhaf interaction estimator (the frozen teacher of `fit`) with MSE on Monte-Carlo labels.\n\n"
    "The model (from --init, else a random --preset one, as the official script starts from CLIP) is frozen; "
    "only the estimator learns (default lr 1e-2, the official). Labels: --variant textbook (the definition, "
    "default) or official (reproduces the released estimator's labels). Writes OUT/final/estimator.safetensors."
    "\n\nExamples:\n\n"
    "  hbi-train estimator data/synth --out runs/est --steps 300\n\n"
    "  hbi-train estimator data/synth --out runs/est --init ViT-B-32.pt --preset vit-b-32 --variant official "
    "--samples 100 --epochs 6"
)


@app.command(help=ESTIMATOR_HELP)
def estimator(
    data: DataArg,
    out: OutOption,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Monte-Carlo samples per cell.")] = 100,
    variant: Annotated[Variant, typer.Option("--variant", help="Label variant.")] = Variant.textbook,
    scale: Annotated[float, typer.Option("--scale", help="Label scale (official x1000).")] = 1000.0,
    preset: PresetOption = ModelPreset.tiny,
    init: InitOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = 32,
    lr: LrOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    amp: AmpOption = True,
    grad_clip: ClipOption = 1.0,
    resume: ResumeOption = None,
    max_frames: FramesOption = 8,
    max_words: WordsOption = 32,
    num_workers: WorkersOption = 0,
    ckpt_every: CkptEveryOption = 0,
    log_every: LogEveryOption = 10,
    progress: ProgressOption = True,
    json_output: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Pre-train the estimator (``hbi_training.runs.run_estimator``)."""
    with guarded(json_mode=json_output, debug=debug):
        from hbi_training.estimator import EstimatorConfig
        from hbi_training.runs import EstimatorSettings, run_estimator

        settings = EstimatorSettings(
            data_dir=data, out_dir=out, model_preset=preset.value, init=init, steps=steps, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, device=device, amp=amp, grad_clip=grad_clip or None,
            max_frames=max_frames, max_words=max_words, num_workers=num_workers, ckpt_every=ckpt_every,
            log_every=log_every, resume=resume, progress=progress,
            estimator=EstimatorConfig(samples=samples, variant=variant.value, scale=scale, seed=seed))
        _report(run_estimator(settings), json_output)


def _report(summary: dict, json_output: bool) -> None:
    if json_output:
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
