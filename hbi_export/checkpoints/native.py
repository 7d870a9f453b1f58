"""The hbi-toolkit checkpoint format: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` = ``{"format": "hbi-toolkit", "format_version": 1, "config": HBIConfig.to_dict()}``. Safetensors
holds only tensors (no pickle, nothing executable); the config travels with the weights, so nothing needs to be
inferred and the merge ratios / level weights are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from hbi_export.checkpoints.base import Converted, LoadOptions
from hbi_export.checkpoints.readers import NATIVE, RawCheckpoint
from hbi_export.model.config import HBIConfig
from hbi_runtime.errors import CheckpointError, ConfigError, UsageError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_state_dict(state_dict: Mapping[str, torch.Tensor], config: HBIConfig, directory: str | Path) -> Path:
    """Write ``state_dict`` + ``config`` in the hbi-toolkit format; files are replaced atomically.

    Args:
        state_dict: our key layout (as ``HBIModel.state_dict()``).
        config: the model's config.
        directory: created if needed.

    Returns:
        The directory.

    Raises:
        UsageError: ``directory`` exists and is not a directory.
    """
    meta = {"format": NATIVE, "format_version": FORMAT_VERSION, "config": config.to_dict()}
    return write_folder(state_dict, meta, directory)


def write_folder(state_dict: Mapping[str, torch.Tensor], meta: dict, directory: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` (= ``meta``, whose ``format`` also tags the weights), each atomically.

    Raises:
        UsageError: ``directory`` exists and is not a directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory", hint="choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    _atomic_write(directory / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": meta["format"]}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save an :class:`hbi_export.model.HBIModel` (its ``state_dict`` and ``config``) in the hbi-toolkit format.

    Raises:
        UsageError: the model has no ``config``, or ``directory`` is a file.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, HBIConfig):
        raise UsageError(f"{type(model).__name__} has no HBIConfig `config` attribute",
                         hint="save an hbi_export.model.HBIModel")
    return save_state_dict(model.state_dict(), config, directory)


def convert_native(raw: RawCheckpoint, options: LoadOptions) -> Converted:
    """Our own format: the state dict as stored, the config from ``config.json`` (options override ratios).

    Raises:
        CheckpointError: unknown ``format_version`` or an invalid config.
    """
    meta = raw.side_config or {}
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{raw.path.parent / CONFIG_NAME}: format_version {version!r} is not supported "
                              f"(this hbi-toolkit reads version {FORMAT_VERSION})",
                              hint="re-export the checkpoint with this version of hbi-toolkit")
    try:
        stored = HBIConfig.from_dict(meta.get("config") or {})
        config = HBIConfig.from_dict({**stored.to_dict(), **options.config_fields(stored)})
    except ConfigError as exc:
        raise CheckpointError(f"{raw.path.parent / CONFIG_NAME}: invalid model config: {exc.message}",
                              hint="the config.json was edited or written by another tool") from None
    return Converted(dict(raw.tensors), config)
