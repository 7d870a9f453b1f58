"""``hbi-export inspect``'s library half: a JSON-ready description of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hbi_export.checkpoints.loader import load_checkpoint, parameter_counts
from hbi_export.model.config import HBIConfig

SCHEMA = "hbi.inspect/1"


def architecture(config: HBIConfig) -> dict[str, Any]:
    """The inferred architecture, grouped by tower (the sizes a reader checks first)."""
    v, t = config.vision, config.text
    return {
        "vision": {"width": v.width, "layers": v.layers, "heads": v.heads, "patch_size": v.patch_size,
                   "image_size": v.image_size},
        "text": {"width": t.width, "layers": t.layers, "heads": t.heads, "context_length": t.context_length,
                 "vocab_size": t.vocab_size},
        "embed_dim": config.embed_dim,
        "temporal": {"layers": config.temporal_layers, "heads": config.temporal_heads,
                     "frame_positions": config.frame_positions},
        "merge": {"heads": config.merge_heads, "text_ratios": list(config.text_ratios),
                  "video_ratios": list(config.video_ratios), "knn_k": config.knn_k},
        "level_weights": list(config.level_weights),
    }


def describe_checkpoint(path: str | Path, **options: Any) -> dict[str, Any]:
    """Load ``path`` strictly and describe it: format, architecture, parameters per part, key report.

    Args:
        path: any checkpoint :func:`load_checkpoint` accepts.
        **options: passed to :func:`load_checkpoint`.

    Returns:
        A dict with ``schema`` = ``hbi.inspect/1``, ``format``, ``source``, ``architecture``, ``config``,
        ``parameters`` and ``keys`` (``loaded``, ``ignored``, ``upcast``, ``initialised``).

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    state_dict, config, report = load_checkpoint(path, **options)
    full = report.to_dict()
    return {
        "schema": SCHEMA,
        "format": report.format,
        "source": report.source,
        "architecture": architecture(config),
        "config": full["config"],
        "parameters": parameter_counts(state_dict, report),
        "keys": {"loaded": report.loaded_keys, "ignored": full["ignored"], "upcast": full["upcast"],
                 "initialised": full["initialised"]},
    }
