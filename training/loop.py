"""The training loop: seeded, resumable, mixed precision on CUDA, logged.

``fit(task, dataset, config, run_dir)`` runs ``config.steps`` optimiser steps of a task (``hbi_training.tasks``):
AdamW with the official parameter groups and warmup-cosine schedule (``hbi_training.optim``), optional global
gradient clipping, fp16 autocast + GradScaler on CUDA, a JSON-lines metrics log (``run_dir/metrics.jsonl``),
periodic validation, atomic checkpoints (``hbi_training.checkpoint``) and a progress bar.

Determinism: ``seed`` seeds every generator (Python, numpy, torch) and the data order; with ``deterministic``
PyTorch is asked for deterministic kernels where it has them (``warn_only``: ops without one warn rather than fail).
Two runs with the same settings give the same loss curve, and a run resumed from a checkpoint continues exactly
as the uninterrupted run would have (CPU; on CUDA up to the non-determinism PyTorch cannot remove).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic

from hbi_runtime.errors import HbiError, UsageError
from hbi_training.batches import epoch_batches
from hbi_training.checkpoint import capture_rng, load_state, resolve_checkpoint, restore_rng, save_checkpoint
from hbi_training.optim import OptimConfig, build_optimizer, build_scheduler
from hbi_training.progress import MetricsLog, ProgressBar
from hbi_training.tasks import Task, to_device

FINAL_DIR = "final"


@dataclass(frozen=True)
class LoopConfig:
    steps: int  # optimiser steps in the whole run (the schedule spans them)
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # fp16 autocast + GradScaler, on CUDA only (ignored on CPU)
    grad_clip: float | None = 1.0  # global gradient-norm clip (official 1.0); None: off
    log_every: int = 10  # metrics-log interval in steps (every step's loss is kept in the returned history)
    val_every: int = 0  # validation interval in steps; 0: only at the end (when a validation set is given)
    val_batch_size: int = 64
    ckpt_every: int = 0  # checkpoint interval in steps; 0: only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    deterministic: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise UsageError(f"need steps >= 1 and batch_size >= 2 (contrastive loss), got steps={self.steps}, "
                             f"batch_size={self.batch_size}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UsageError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch (all devices); optionally request deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        if torch.cuda.is_available():
            # cuBLAS needs this to be deterministic; only set when the user has not chosen a value.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN by default, a debugging aid that made steps
        # ~50x slower on CPU here; results do not depend on it (nothing reads uninitialised memory).
        torch.utils.deterministic.fill_uninitialized_memory = False


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer:
    """One run of a task; see :func:`fit`."""

    def __init__(self, task: Task, config: LoopConfig, run_dir: Path | None) -> None:
        self.task, self.config, self.run_dir = task, config, Path(run_dir) if run_dir else None
        self.device = torch.device(config.device)
        self.amp = config.amp and self.device.type == "cuda"
        task.to(self.device)
        self.params = [p for _, p in task.named_trainable() if p.requires_grad]
        self.optimizer = build_optimizer(task.named_trainable(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.steps, config.optim.warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.pos = Position()
        self.log = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"position": asdict(self.pos), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": capture_rng(), "task": self.task.extra_state(), "task_name": self.task.name,
                "config": _plain(asdict(self.config))}

    def resume(self, path: str | Path) -> Path:
        """Restore everything from a checkpoint folder or run directory (see ``hbi_training.checkpoint``)."""
        ckpt = resolve_checkpoint(path)
        state = load_state(ckpt)
        saved = state["config"]
        if state.get("task_name") != self.task.name:
            raise UsageError(f"{ckpt} is a {state.get('task_name')!r} checkpoint, not {self.task.name!r}")
        for key in ("batch_size", "seed"):
            if saved[key] != getattr(self.config, key):
                raise UsageError(f"cannot resume {ckpt}: {key} was {saved[key]}, now {getattr(self.config, key)}",
                                 hint=f"resume with the original {key}")
        self.task.load_weights(ckpt)
        self.task.load_extra_state(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.pos = Position(**state["position"])
        return ckpt

    def checkpoint(self) -> Path | None:
        if self.run_dir is None:
            return None
        return save_checkpoint(self.run_dir, self.pos.step, self.task.save_weights, self.state(),
                               keep=self.config.keep_checkpoints)

    # ------------------------------------------------------------------ steps
    def step(self, batch) -> dict[str, float]:
        cfg = self.config
        batch = to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.task.loss(batch)
        self.scaler.scale(out.total).backward()
        record = {}
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_step()
        names = ["loss", *out.parts, *record]
        values = torch.stack([out.total.detach().float(), *(v.detach().float() for v in out.parts.values()),
                              *(v.float() for v in record.values())]).tolist()  # one device sync
        if not self.amp and not np.isfinite(values[0]):
            raise HbiError(f"the loss is not finite at step {self.pos.step + 1}",
                           hint="lower --lr, keep gradient clipping on, or check the data")
        return {**dict(zip(names, values)), "lr": lrs}

    def run(self, dataset, val_dataset=None, sampler=None) -> list[dict[str, Any]]:
        cfg = self.config
        bar = ProgressBar(cfg.steps, self.pos.step, self.task.name, enabled=cfg.progress, every=cfg.log_every)
        self.task.train(True)
        t_last, n_last = time.monotonic(), self.pos.step
        try:
            while self.pos.step < cfg.steps:
                produced = 0
                for batch in epoch_batches(dataset, cfg.batch_size, seed=cfg.seed, epoch=self.pos.epoch,
                                           skip=self.pos.batch_in_epoch, sampler=sampler,
                                           num_workers=cfg.num_workers,
                                           pin_memory=self.device.type == "cuda"):
                    produced += 1
                    record = {"step": self.pos.step + 1, "epoch": self.pos.epoch, **self.step(batch)}
                    self.pos.step += 1
                    self.pos.batch_in_epoch += 1
                    self.history.append(record)
                    bar.update(self.pos.step, f"loss {record['loss']:.4f}")
                    if self.pos.step % cfg.log_every == 0 or self.pos.step == cfg.steps:
                        now = time.monotonic()
                        rate = (self.pos.step - n_last) * cfg.batch_size / max(now - t_last, 1e-9)
                        self.log.write({"kind": "train", **record, "samples_per_s": rate})
                        t_last, n_last = now, self.pos.step
                    if val_dataset is not None and cfg.val_every and self.pos.step % cfg.val_every == 0:
                        self.validate(val_dataset)
                    if cfg.ckpt_every and self.pos.step % cfg.ckpt_every == 0:
                        self.checkpoint()
                    if self.pos.step >= cfg.steps:
                        break
                else:
                    if produced == 0 and self.pos.batch_in_epoch == 0:
                        raise UsageError("the training set yields no full batch",
                                         hint="lower --batch-size or use a larger dataset")
                    self.pos.epoch += 1
                    self.pos.batch_in_epoch = 0
        finally:
            bar.close()
        if val_dataset is not None and not (cfg.val_every and self.pos.step % cfg.val_every == 0):
            self.validate(val_dataset)
        if self.run_dir is not None:
            if not (cfg.ckpt_every and self.pos.step % cfg.ckpt_every == 0):
                self.checkpoint()
            self.task.save_weights(_fresh_dir(self.run_dir / FINAL_DIR))
        return self.history

    def validate(self, dataset) -> dict[str, float]:
        metrics = self.task.validate(dataset, self.config.val_batch_size, self.device)
        self.task.train(True)
        if metrics:
            record = {"kind": "val", "step": self.pos.step, **metrics}
            self.log.write(record)
            self.history.append(record)
        return metrics


def fit(task: Task, dataset, config: LoopConfig, run_dir: str | Path | None = None, *, val_dataset=None,
        sampler=None, resume: str | Path | None = None) -> list[dict[str, Any]]:
    """Train ``task`` for ``config.steps`` steps (continuing from ``resume``) and return the step records.

    Seeds everything from ``config.seed`` first, so build the model *before* calling ``fit`` with
    :func:`seed_everything` of the same seed if its initialisation should be reproducible too.

    Args:
        task: an :class:`~hbi_training.tasks.HBITask` or ``hbi_training.estimator.EstimatorTask``.
        dataset: map-style or iterable dataset of ``(input_ids, text_mask, frames, frame_mask, video_id)``.
        config: loop settings.
        run_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``final/`` go; None: nothing is written.
        val_dataset: validated every ``config.val_every`` steps and at the end (R@1 for the HBI task).
        sampler: optional epoch sampler giving each epoch's item order (``hbi_training.batches``).
        resume: a checkpoint folder or run directory to continue from.

    Returns:
        One dict per step (``step``, ``epoch``, ``loss``, the loss parts, ``grad_norm``, ``lr`` per group) and
        one per validation (``kind="val"``).

    Raises:
        UsageError: inconsistent settings, or a resume with another batch size / seed / task.
        CheckpointError: ``resume`` is not a readable checkpoint.
    """
    seed_everything(config.seed, config.deterministic)
    trainer = Trainer(task, config, run_dir)
    if resume is not None:
        trainer.resume(resume)
    return trainer.run(dataset, val_dataset, sampler)


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(x):
    """Dataclass dicts with tuples as lists (for torch.load(weights_only=True) and JSON)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
