"""QA checkpoints: the official MSRVTT-QA model (jpthu17/HBI ``main_vqa.py``) and the hbi-toolkit QA format.

This lives with the QA model, not in :mod:`hbi_export.checkpoints`: it reuses that package's reader, key check and
report, and ``hbi_export.checkpoints`` imports nothing of ``hbi_export.tasks`` (no cycle between the two).

The official QA script saves ``torch.save(model.state_dict())`` of ``modeling_qa.HBI``: the retrieval layout
(``clip.*``, ``transformerClip.*``, ``frame_position_embeddings``, ``*_weight_fc*``, ``{t,v}_ctm*``,
``{t,v}_block*``), the four training-only Banzhaf estimators, and per level (suffix ``""`` / ``0`` / ``1``) the answer
head: ``t_weight{s}.{0,2}``, ``v_weight{s}.{0,2}`` (Linear(D, D), Linear(D, 1)), ``t_proj{s}`` / ``v_proj{s}``
(Linear(D, 4D)) and ``classifier{s}.{0,2}`` (Linear(8D, 16D), Linear(16D, 1500)). Loading is strict, as for
retrieval checkpoints: missing, unexpected or mis-shaped keys raise :class:`CheckpointError`; the Banzhaf
entries are reported as ignored; fp16 CLIP tensors are upcast and reported.

Our own QA format is a folder with ``model.safetensors`` and ``config.json`` =
``{"format": "hbi-toolkit-qa", "format_version": 1, "config": QAConfig.to_dict()}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from hbi_export.checkpoints.layout import _shape, expected_shapes, infer_hbi_config
from hbi_export.checkpoints.native import CONFIG_NAME, write_folder
from hbi_export.checkpoints.official import split_training_only
from hbi_export.checkpoints.readers import RawCheckpoint, read_checkpoint
from hbi_export.checkpoints.report import LoadReport, check_keys
from hbi_export.tasks.qa import (LEVEL_SUFFIXES, OFFICIAL_TEXT_RATIOS, OFFICIAL_VIDEO_RATIOS, QAConfig, QAModel)
from hbi_runtime.errors import CheckpointError, ConfigError

QA_FORMAT = "hbi-toolkit-qa"
OFFICIAL_QA = "official-hbi-qa"
FORMAT_VERSION = 1
Shape = tuple[int, ...]


def qa_head_shapes(config: QAConfig) -> dict[str, Shape]:
    """The answer-head keys of a QA config (three levels)."""
    d, p, h, a = config.model.embed_dim, config.proj, config.hidden, config.answers
    shapes: dict[str, Shape] = {}
    for s in LEVEL_SUFFIXES:
        for m in ("t", "v"):
            shapes.update({f"{m}_weight{s}.0.weight": (d, d), f"{m}_weight{s}.0.bias": (d,),
                           f"{m}_weight{s}.2.weight": (1, d), f"{m}_weight{s}.2.bias": (1,),
                           f"{m}_proj{s}.weight": (p, d), f"{m}_proj{s}.bias": (p,)})
        shapes.update({f"classifier{s}.0.weight": (h, 2 * p), f"classifier{s}.0.bias": (h,),
                       f"classifier{s}.2.weight": (a, h), f"classifier{s}.2.bias": (a,)})
    return shapes


def expected_qa_shapes(config: QAConfig) -> dict[str, Shape]:
    """Every key of ``QAModel(config).state_dict()`` with its shape."""
    return {**expected_shapes(config.model), **qa_head_shapes(config)}


def is_qa_state_dict(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys carry the answer classifier (``classifier.2.weight``)."""
    return "classifier.2.weight" in tensors


def infer_qa_config(sd: Mapping[str, torch.Tensor], source: str, *,
                    answer_weights: Sequence[float] | None = None) -> QAConfig:
    """The QA config implied by an official-layout QA state dict (QA merge ratios, which are not in the weights).

    Raises:
        CheckpointError: anchor keys missing or shapes inconsistent.
    """
    model = infer_hbi_config(sd, source, text_ratios=OFFICIAL_TEXT_RATIOS, video_ratios=OFFICIAL_VIDEO_RATIOS,
                             level_weights=(1.0, 0.0, 0.0))
    proj = _shape(sd, "v_proj.weight", 2, source)[0]
    answers, hidden = _shape(sd, "classifier.2.weight", 2, source)
    d = model.embed_dim
    try:
        return QAConfig(model=model, answers=answers, proj_dim=None if proj == 4 * d else proj,
                        hidden_dim=None if hidden == 4 * proj else hidden,
                        **({"answer_weights": tuple(answer_weights)} if answer_weights is not None else {}))
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the weights imply an invalid QA model: {exc.message}") from None


def _not_qa(raw: RawCheckpoint) -> CheckpointError:
    return CheckpointError(
        f"{raw.path} has no answer classifier (classifier.*, t_proj, v_proj): it is not a QA checkpoint",
        hint="pass an official MSRVTT-QA checkpoint (main_vqa.py) or a folder written by save_qa_model; "
             "retrieval checkpoints go to `hbi-export onnx`")


def load_qa_checkpoint(path: str | Path, *, answer_weights: Sequence[float] | None = None
                       ) -> tuple[dict[str, torch.Tensor], QAConfig, LoadReport]:
    """Load an official QA checkpoint or an hbi-toolkit QA folder, strictly.

    Args:
        path: ``pytorch_model.bin.N`` / ``best.pth`` of ``main_vqa.py`` (``state_dict`` / ``module.`` wrappers
            accepted), or a folder with ``config.json`` (format ``hbi-toolkit-qa``) + ``model.safetensors``.
        answer_weights: entity / action / event logit weights; default: the folder's, else 0.4 / 0.4 / 0.2.

    Returns:
        (state dict with exactly ``expected_qa_shapes(config)``'s keys, config, report).

    Raises:
        CheckpointError: unreadable file, not a QA checkpoint, or missing / unexpected / mis-shaped keys.
    """
    raw = read_checkpoint(path)
    meta = raw.side_config
    if meta is not None and meta.get("format") == QA_FORMAT:
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{raw.path.parent / CONFIG_NAME}: format_version {meta.get('format_version')!r} "
                                  f"is not supported (this toolkit reads {FORMAT_VERSION})",
                                  hint="re-save the model with this version of hbi-toolkit")
        try:
            config = QAConfig.from_dict(meta.get("config") or {})
            if answer_weights is not None:
                config = config.replace(answer_weights=tuple(answer_weights))
        except ConfigError as exc:
            raise CheckpointError(f"{raw.path.parent / CONFIG_NAME}: invalid QA config: {exc.message}") from None
        state, ignored, fmt = dict(raw.tensors), [], QA_FORMAT
    else:
        if not any(k.startswith("clip.") for k in raw.tensors) or not is_qa_state_dict(raw.tensors):
            raise _not_qa(raw)
        state, ignored = split_training_only(raw.tensors)
        config, fmt = infer_qa_config(state, str(raw.path), answer_weights=answer_weights), OFFICIAL_QA
    check_keys(state, expected_qa_shapes(config), source=str(raw.path), fmt=fmt)
    report = LoadReport(format=fmt, source=str(raw.path), config=config.model, loaded_keys=len(state),
                        ignored=ignored, upcast=raw.upcast)
    return state, config, report


def build_qa_model(path: str | Path, **options) -> tuple[QAModel, QAConfig, LoadReport]:
    """:func:`load_qa_checkpoint` into a :class:`QAModel` in eval mode: (model, config, report)."""
    state, config, report = load_qa_checkpoint(path, **options)
    model = QAModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), config, report


def save_qa_model(model: QAModel, directory: str | Path) -> Path:
    """Write a QA model in the hbi-toolkit QA format (``model.safetensors`` + ``config.json``), atomically per file.

    Raises:
        UsageError: ``directory`` exists and is not a directory.
    """
    meta = {"format": QA_FORMAT, "format_version": FORMAT_VERSION, "config": model.qa_config.to_dict()}
    return write_folder(model.state_dict(), meta, directory)
