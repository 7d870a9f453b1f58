"""The two runs behind ``hbi-train``: fit the HBI model, or pre-train the Banzhaf estimator, on a data folder.

Each takes one settings object, builds the data, model and task, calls :func:`hbi_training.loop.fit` and returns a
JSON-ready summary. The data folder is a set written by ``python -m hbi_training.data.synthetic`` (splits
``train`` and ``test``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# the one preset registry; MODEL_PRESETS / preset_config stay importable from here too
from hbi_export.presets import MODEL_PRESETS, preset_config  # noqa: F401
from hbi_runtime.errors import UsageError
from hbi_training.estimator import ESTIMATOR_NAME, EstimatorConfig, EstimatorTask
from hbi_training.loop import FINAL_DIR, LoopConfig, fit, seed_everything
from hbi_training.losses import HBILoss, LossConfig
from hbi_training.optim import OptimConfig, preset
from hbi_training.tasks import HBITask


@dataclass(frozen=True)
class RunSettings:
    """What both runs share."""

    data_dir: Path
    out_dir: Path
    model_preset: str = "tiny"  # hbi_export.presets name: architecture when ``init`` is not given (random init)
    init: Path | None = None  # any checkpoint build_model reads (official HBI, OpenAI / HF CLIP, hbi-toolkit)
    steps: int | None = None  # exactly one of steps / epochs
    epochs: float | None = None
    batch_size: int = 32
    recipe: str | None = None  # optimiser preset; None: "finetune" with --init, else "scratch"
    lr: float | None = None  # overrides the recipe's
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    grad_clip: float | None = 1.0
    max_frames: int = 8
    max_words: int = 32
    num_workers: int = 0
    val_every: int = 0
    ckpt_every: int = 0
    log_every: int = 10
    resume: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class FitSettings(RunSettings):
    loss: LossConfig = field(default_factory=LossConfig)
    estimator: Path | None = None  # the Banzhaf teacher (required unless loss.banzhaf is False)


@dataclass(frozen=True)
class EstimatorSettings(RunSettings):
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda`` without a GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible", hint="use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu, cuda or cuda:N")
    return name


def build_start_model(settings: RunSettings):
    """The model to train: loaded from ``init`` or randomly initialised from ``model_preset`` (seeded)."""
    from hbi_export.model import HBIModel

    if settings.init is not None:
        from hbi_export.checkpoints import build_model

        return build_model(settings.init, seed=settings.seed)[0].train()
    return HBIModel(preset_config(settings.model_preset))


def open_split(settings: RunSettings, split: str, config) -> Any:
    """One split of the data folder at the model's input size."""
    from hbi_training.data import SyntheticVideoDataset

    if not (Path(settings.data_dir) / "manifest.json").is_file():
        raise UsageError(f"{settings.data_dir} is not a generated data folder (no manifest.json)",
                         hint="create one with `python -m hbi_training.data.synthetic --out DIR`")
    return SyntheticVideoDataset(settings.data_dir, split, max_words=settings.max_words,
                                 max_frames=settings.max_frames, image_size=config.vision.image_size)


def loop_config(settings: RunSettings, optim: OptimConfig, batches_per_epoch: int) -> LoopConfig:
    if (settings.steps is None) == (settings.epochs is None):
        raise UsageError("give exactly one of --steps and --epochs")
    steps = settings.steps if settings.steps is not None else max(1, round(settings.epochs * batches_per_epoch))
    return LoopConfig(steps=steps, batch_size=settings.batch_size, optim=optim, seed=settings.seed,
                      device=resolve_device(settings.device), amp=settings.amp, grad_clip=settings.grad_clip,
                      log_every=settings.log_every, val_every=settings.val_every, ckpt_every=settings.ckpt_every,
                      num_workers=settings.num_workers, progress=settings.progress)


def _train_data(settings: RunSettings, config):
    from hbi_training.data import RandomCaptionSampler

    train = open_split(settings, "train", config)
    sampler = RandomCaptionSampler(train, seed=settings.seed)
    if len(sampler) < settings.batch_size:
        raise UsageError(f"the training split has {len(sampler)} videos, fewer than one batch of "
                         f"{settings.batch_size}", hint="lower --batch-size or generate more videos")
    return train, sampler, len(sampler) // settings.batch_size


def resolve_estimator(path: Path) -> Path:
    """An estimator file, or a folder holding ``estimator.safetensors`` (directly or in ``final/``)."""
    path = Path(path)
    for candidate in (path, path / ESTIMATOR_NAME, path / FINAL_DIR / ESTIMATOR_NAME):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no estimator weights at {path}", hint="train one with `hbi-train estimator`")


def _say_model(settings: RunSettings, say: Callable[[str], None]) -> None:
    say(f"model: {settings.init}" if settings.init is not None else f"model: preset '{settings.model_preset}', random weights")


def run_fit(settings: FitSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the HBI model; returns a summary (schema ``hbi.train-fit/1``). ``progress`` is told each stage as
    it starts (``hbi_training.progress.stages``)."""
    from hbi_training.banzhaf import load_estimator_state

    say = progress or (lambda _: None)
    teacher = None
    if settings.loss.banzhaf:
        if settings.estimator is None:
            raise UsageError("the Banzhaf KL needs a trained estimator (the frozen teacher)",
                             hint="pass --estimator (from `hbi-train estimator`), or --no-banzhaf")
        teacher = load_estimator_state(resolve_estimator(settings.estimator), settings.loss.planes)
    seed_everything(settings.seed)
    _say_model(settings, say)
    model = build_start_model(settings)
    say("data: the train split (its videos are decoded on first use)")
    train, sampler, per_epoch = _train_data(settings, model.config)
    say("data: the test split")
    test = open_split(settings, "test", model.config)
    recipe = settings.recipe or ("finetune" if settings.init is not None else "scratch")
    config = loop_config(settings, preset(recipe, lr=settings.lr), per_epoch)
    say(f"training: {config.steps} steps, validation, final weights")
    history = fit(HBITask(model, HBILoss(settings.loss, teacher)), train, config, settings.out_dir,
                  val_dataset=test, sampler=sampler, resume=settings.resume)
    return _summary("hbi.train-fit/1", settings, config, history, recipe)


def run_estimator(settings: EstimatorSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pre-train the Banzhaf estimator on a frozen model; returns a summary (``hbi.train-estimator/1``).
    ``progress`` is told each stage as it starts."""
    say = progress or (lambda _: None)
    seed_everything(settings.seed)
    _say_model(settings, say)
    model = build_start_model(settings)
    say("data: the train split (its videos are decoded on first use)")
    train, sampler, per_epoch = _train_data(settings, model.config)
    # Official estimator recipe: lr 1e-2 ("Estimator_1e-2_epoch6"); only the estimator trains.
    config = loop_config(settings, OptimConfig(lr=settings.lr or 1e-2), per_epoch)
    say(f"training: {config.steps} steps (Monte-Carlo labels), final weights")
    task = EstimatorTask(model, settings.estimator)
    history = fit(task, train, config, settings.out_dir, sampler=sampler, resume=settings.resume)
    return _summary("hbi.train-estimator/1", settings, config, history, "estimator")


def _summary(schema: str, settings: RunSettings, config: LoopConfig, history: list[dict], recipe: str) -> dict:
    steps = [r for r in history if "loss" in r]
    vals = [r for r in history if r.get("kind") == "val"]
    return {"schema": schema, "run_dir": str(settings.out_dir), "final": str(Path(settings.out_dir) / FINAL_DIR),
            "steps": config.steps, "device": config.device, "recipe": recipe,
            "last_loss": steps[-1]["loss"] if steps else None,
            "validation": {k: v for k, v in vals[-1].items() if k not in ("kind",)} if vals else None}
