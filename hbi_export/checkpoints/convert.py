"""``hbi-export convert`` and ``hbi-export init``'s library half: write a model in the hbi-toolkit format.

The output folder follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``checkpoint folder``: never the source,
never a folder of other files, ``overwrite`` to replace a checkpoint folder) and is written into a temporary
sibling that replaces it when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hbi_export.checkpoints.loader import load_checkpoint
from hbi_export.checkpoints.native import save_state_dict
from hbi_export.presets import preset_config
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir


def convert_checkpoint(source: str | Path, out: str | Path, *, overwrite: bool = False,
                       **options: Any) -> dict[str, Any]:
    """Load any supported checkpoint strictly and save it in the hbi-toolkit format.

    Returns:
        The load report as a dict, plus ``output``.

    Raises:
        CheckpointError: as ``load_checkpoint``; UsageError: ``out`` may not be written (see the module).
    """
    out = prepare_output_dir(out, kind="checkpoint folder", inputs=[source], overwrite=overwrite,
                             option="OUT")
    state_dict, config, report = load_checkpoint(source, **options)
    with staged_output_dir(out) as tmp:
        save_state_dict(state_dict, config, tmp)
    return {**report.to_dict(), "output": str(out)}


def init_random(out: str | Path, preset: str, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write a randomly initialised model of a preset architecture (:mod:`hbi_export.presets`; pipeline tests,
    benchmarks).

    Raises:
        UsageError: unknown preset, or ``out`` may not be written (see the module).
    """
    from hbi_export.model import HBIModel

    config = preset_config(preset)
    out = prepare_output_dir(out, kind="checkpoint folder", overwrite=overwrite, option="OUT")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HBIModel(config)
    with staged_output_dir(out) as tmp:
        save_state_dict(model.state_dict(), config, tmp)
    return {"output": str(out), "preset": preset, "seed": seed, "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters())}
