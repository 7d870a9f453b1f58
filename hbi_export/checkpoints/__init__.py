"""Checkpoint loading and saving: official HBI, OpenAI CLIP, Hugging Face CLIP and the hbi-toolkit format.

Every load is strict (exact key set and shapes) and returns a :class:`LoadReport` that says what was ignored,
upcast or initialised. See ``docs/architecture.md`` ("Checkpoints") for the formats.
"""

from hbi_export.checkpoints.hf_clip import hf_to_openai, openai_to_hf
from hbi_export.checkpoints.layout import PARTS, expected_shapes, part_of
from hbi_export.checkpoints.loader import build_model, load_checkpoint, parameter_counts
from hbi_export.checkpoints.native import save_model, save_state_dict
from hbi_export.checkpoints.openai_clip import clip_to_openai
from hbi_export.checkpoints.readers import HF, NATIVE, OFFICIAL, OPENAI
from hbi_export.checkpoints.report import IgnoredKey, InitialisedPart, LoadReport, UpcastKey


def to_openai_clip_state_dict(state_dict: dict) -> dict:
    """Our ``clip.*`` tensors as an OpenAI CLIP state dict (``visual.*``, ``transformer.*``, ...)."""
    return clip_to_openai(state_dict)


def to_hf_clip_state_dict(state_dict: dict) -> dict:
    """Our ``clip.*`` tensors as a Hugging Face ``CLIPModel`` state dict."""
    return openai_to_hf(clip_to_openai(state_dict))


__all__ = [
    "HF", "NATIVE", "OFFICIAL", "OPENAI", "PARTS", "IgnoredKey", "InitialisedPart", "LoadReport", "UpcastKey",
    "build_model", "expected_shapes", "hf_to_openai", "load_checkpoint", "openai_to_hf", "parameter_counts",
    "part_of", "save_model", "save_state_dict", "to_hf_clip_state_dict", "to_openai_clip_state_dict",
]
