"""``hbi-export convert`` and ``hbi-export init``'s library half: write a model in the hbi-toolkit format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hbi_export.checkpoints.loader import load_checkpoint
from hbi_export.checkpoints.native import WEIGHTS_NAME, save_state_dict
from hbi_export.model.config import HBIConfig
from hbi_runtime.errors import UsageError

PRESETS = {"vit-b-32": HBIConfig.vit_b_32, "vit-b-16": HBIConfig.vit_b_16, "tiny": HBIConfig.tiny}


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise UsageError(f"{out} already holds a model", hint="pass --overwrite or choose another directory")


def convert_checkpoint(source: str | Path, out: str | Path, *, overwrite: bool = False,
                       **options: Any) -> dict[str, Any]:
    """Load any supported checkpoint strictly and save it in the hbi-toolkit format.

    Returns:
        The load report as a dict, plus ``output``.

    Raises:
        CheckpointError: as ``load_checkpoint``; UsageError: ``out`` holds a model and not ``overwrite``.
    """
    out = Path(out)
    _refuse_overwrite(out, overwrite)
    state_dict, config, report = load_checkpoint(source, **options)
    save_state_dict(state_dict, config, out)
    return {**report.to_dict(), "output": str(out)}


def init_random(out: str | Path, preset: str, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write a randomly initialised model of a preset architecture (pipeline tests, benchmarks).

    Raises:
        UsageError: unknown preset, or ``out`` holds a model and not ``overwrite``.
    """
    from hbi_export.model import HBIModel

    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}", hint=f"choose one of {', '.join(PRESETS)}")
    out = Path(out)
    _refuse_overwrite(out, overwrite)
    config = PRESETS[preset]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HBIModel(config)
    save_state_dict(model.state_dict(), config, out)
    return {"output": str(out), "preset": preset, "seed": seed, "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters())}
