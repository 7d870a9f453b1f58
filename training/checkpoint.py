"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A run directory holds ``checkpoints/step_NNNNNNN/`` folders and a ``checkpoints/latest`` file naming the newest.
Each folder has the task's weights in their own format (the HBI model via ``hbi_export.checkpoints.save_model``:
``model.safetensors`` + ``config.json``, loadable by ``build_model``; the estimator as ``estimator.safetensors``)
and ``training_state.pt``: optimiser, scheduler, AMP scaler, step / epoch position, every RNG state, the task's
extra state (e.g. the Banzhaf students) and the run's settings. The folder is written under a temporary name and
renamed into place, and ``latest`` is replaced atomically, so an interrupted save never leaves a half checkpoint
where a resume would look. ``training_state.pt`` holds tensors and plain Python values only and is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hbi_runtime.errors import CheckpointError

STATE_NAME = "training_state.pt"
LATEST_NAME = "latest"
CHECKPOINTS_DIR = "checkpoints"


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) CUDA generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    """random.setstate wants tuples where a round trip may give lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, step: int, write_weights: Callable[[Path], None], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_{step}`` atomically, point ``latest`` at it, keep the newest ``keep`` folders."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_weights(tmp)
    torch.save(state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST_NAME}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST_NAME)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory (then its latest checkpoint).

    Raises:
        CheckpointError: neither exists or the folder has no ``training_state.pt``.
    """
    path = Path(path)
    latest = path / CHECKPOINTS_DIR / LATEST_NAME
    if latest.is_file():
        path = path / CHECKPOINTS_DIR / latest.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (no {STATE_NAME})",
                              hint="pass a run directory written by `hbi-train` or one of its "
                                   f"{CHECKPOINTS_DIR}/step_* folders")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint / STATE_NAME}: unreadable training state ({exc})") from None
