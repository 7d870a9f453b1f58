"""One entry point for every checkpoint format: read, recognise, convert, check strictly, report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from hbi_export.checkpoints.base import DEFAULT_SEED, DEFAULT_TEMPORAL_LAYERS, Converted, LoadOptions
from hbi_export.checkpoints.hf_clip import convert_hf
from hbi_export.checkpoints.layout import PARTS, expected_shapes, part_of
from hbi_export.checkpoints.native import convert_native
from hbi_export.checkpoints.official import convert_official
from hbi_export.checkpoints.openai_clip import convert_openai
from hbi_export.checkpoints.readers import HF, NATIVE, OFFICIAL, OPENAI, RawCheckpoint, detect_format, read_checkpoint
from hbi_export.checkpoints.report import TRAINING_ONLY, LoadReport, check_keys
from hbi_export.model.config import HBIConfig

CONVERTERS: dict[str, Callable[[RawCheckpoint, LoadOptions], Converted]] = {
    OFFICIAL: convert_official,
    OPENAI: convert_openai,
    HF: convert_hf,
    NATIVE: convert_native,
}


def load_checkpoint(
    path: str | Path,
    *,
    text_ratios: Sequence[float] | None = None,
    video_ratios: Sequence[float] | None = None,
    level_weights: Sequence[float] | None = None,
    temporal_layers: int = DEFAULT_TEMPORAL_LAYERS,
    seed: int = DEFAULT_SEED,
) -> tuple[dict[str, torch.Tensor], HBIConfig, LoadReport]:
    """Load any supported checkpoint into our state-dict layout, strictly.

    Args:
        path: official HBI checkpoint, OpenAI CLIP weights (TorchScript or state dict), Hugging Face CLIP
            directory (or its weights file / config.json), or an hbi-toolkit directory.
        text_ratios, video_ratios: (action, event) merge ratios; not in the weights. Default: the
            checkpoint's own (hbi-toolkit), else the official 0.25 / 0.5.
        level_weights: entity / action / event score weights; default as above, official [1, 0, 0].
        temporal_layers: seqTransf depth for CLIP-initialised models (official default 4).
        seed: seed of the random initialisation of HBI parts a CLIP checkpoint lacks.

    Returns:
        (state_dict in float32 with exactly ``expected_shapes(config)``'s keys, config, report).

    Raises:
        CheckpointError: unreadable file, unknown format, inconsistent shapes, or missing / unexpected /
            mis-shaped keys.
    """
    options = LoadOptions(
        text_ratios=tuple(text_ratios) if text_ratios is not None else None,
        video_ratios=tuple(video_ratios) if video_ratios is not None else None,
        level_weights=tuple(level_weights) if level_weights is not None else None,
        temporal_layers=temporal_layers, seed=seed)
    raw = read_checkpoint(path)
    fmt = detect_format(raw)
    converted = CONVERTERS[fmt](raw, options)
    check_keys(converted.state_dict, expected_shapes(converted.config), source=str(raw.path), fmt=fmt)
    report = LoadReport(format=fmt, source=str(raw.path), config=converted.config,
                        loaded_keys=len(converted.state_dict) - sum(p.keys for p in converted.initialised),
                        ignored=converted.ignored, upcast=raw.upcast, initialised=converted.initialised)
    return converted.state_dict, converted.config, report


def build_model(path: str | Path, **options) -> tuple[torch.nn.Module, LoadReport]:
    """Load a checkpoint (see :func:`load_checkpoint` for ``options``) into an ``HBIModel`` in eval mode.

    Returns:
        (model, report).

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    from hbi_export.model import HBIModel  # the model module is heavier than the format code

    state_dict, config, report = load_checkpoint(path, **options)
    model = HBIModel(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), report


def parameter_counts(state_dict: dict[str, torch.Tensor], report: LoadReport) -> dict[str, int]:
    """Parameters per model part (see ``layout.PARTS``), the training-only ones ignored, and the total."""
    counts = {name: 0 for name in PARTS}
    for key, value in state_dict.items():
        part = part_of(key)
        counts[part] = counts.get(part, 0) + value.numel()
    counts["total"] = sum(counts.values())
    counts["ignored training-only"] = sum(i.numel for i in report.ignored if i.category == TRAINING_ONLY)
    return counts
