"""hbi_training.data: the synthetic video-caption set for training and checking a small HBI model on CPU.

- :mod:`.scenes`: shapes, events, timing and the held-out-combination split (pure, numpy only).
- :mod:`.captions`: the caption grammar and paraphrases.
- :mod:`.render`: numpy drawing and H.264 encoding through imageio-ffmpeg's ffmpeg.
- :mod:`.manifest`: the manifest's format and reader.
- :mod:`.synthetic`: :func:`generate` (files + manifest) and the ``python -m hbi_training.data.synthetic`` CLI.
- :mod:`.cache`: decoding each split once through :mod:`hbi_runtime.video` into .npy frame caches.
- :mod:`.dataset`: the torch :class:`SyntheticVideoDataset` and :class:`RandomCaptionSampler`.

Names are imported on first use: generating the videos does not load torch, and
``python -m hbi_training.data.synthetic`` does not find its module imported twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily (__getattr__)
    from hbi_training.data.cache import frame_cache
    from hbi_training.data.dataset import RandomCaptionSampler, SyntheticVideoDataset
    from hbi_training.data.manifest import read_manifest
    from hbi_training.data.synthetic import SyntheticPaths, generate

_LAZY = {"SyntheticPaths": "hbi_training.data.synthetic", "generate": "hbi_training.data.synthetic",
         "read_manifest": "hbi_training.data.manifest",
         "SyntheticVideoDataset": "hbi_training.data.dataset", "RandomCaptionSampler": "hbi_training.data.dataset",
         "frame_cache": "hbi_training.data.cache"}

__all__ = ["RandomCaptionSampler", "SyntheticPaths", "SyntheticVideoDataset", "frame_cache", "generate",
           "read_manifest"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hbi_training.data' has no attribute {name!r}")
