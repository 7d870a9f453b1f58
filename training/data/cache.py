"""Decode a generated split once through the runtime's video path and keep the frames as .npy files.

The frames a model trains on must be the frames the runtime gives it at inference, so every video is decoded
by :func:`hbi_runtime.video.decode_video` (official 1-fps-then-uniform sampling, bicubic resize, centre crop,
CLIP normalisation) and nothing else. Decoding runs in this process: the files are our own, so the worker
pool's protection against hostile files is not needed.

Cache files: ``OUT/cache/<split>-<key>.frames.npy`` float32 ``(N, T, 3, S, S)`` and ``.mask.npy`` int64
``(N, T)``, rows in manifest order. ``key`` hashes everything the frames depend on: the preprocessing, the
runtime version, and every video's path and sha256. A stale cache is never read; it is left for the user to
delete. Files are written under a temporary name and renamed, so an interrupted run leaves no half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

import hbi_runtime
from hbi_runtime.errors import UsageError
from hbi_runtime.package import Preprocessing
from hbi_training.data.manifest import Progress, read_manifest

KEY_CHARS = 16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # our videos are a few KB each


def cache_key(root: Path, files: list[str], preprocessing: Preprocessing) -> str:
    """A hash of every input of the decoded frames (see the module docstring)."""
    body = {"preprocessing": preprocessing.to_dict(), "runtime": hbi_runtime.__version__,
            "videos": [[f, _sha256(root / f)] for f in files]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def frame_cache(root: str | os.PathLike, split: str, *, max_frames: int, image_size: int,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The decoded frames of one split, decoding and caching them on first use.

    Args:
        root: a folder written by :func:`hbi_training.data.synthetic.generate`.
        split: ``train`` or ``test``.
        max_frames: T; must be >= the videos' length in seconds, so that the 1-fps sampling keeps every second
            (an event's before and after states are one second apart).
        image_size: S, the model's input side.
        progress: called as ``progress("decode <split>", done, total)`` while decoding.

    Returns:
        ``(frames, mask)``: float32 ``(N, T, 3, S, S)`` (memory-mapped, read-only) and int64 ``(N, T)``.

    Raises:
        UsageError: an unknown split, or ``max_frames`` shorter than the videos.
        BadInputError: no or an unreadable manifest. VideoDecodeError: a video cannot be decoded.
    """
    from hbi_runtime.video import decode_video  # Pillow / decoders load only when decoding

    root = Path(root)
    manifest = read_manifest(root)
    seconds = manifest["config"]["seconds"]
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    if max_frames < seconds:
        raise UsageError(f"max_frames={max_frames} is shorter than the {seconds}-second videos: the 1-fps "
                         "sampling would drop seconds and with them events", hint=f"use max_frames >= {seconds}")
    files = [v["file"] for v in manifest["videos"] if v["split"] == split]
    preprocessing = Preprocessing(max_frames=max_frames, image_size=image_size)
    stem = root / "cache" / f"{split}-{cache_key(root, files, preprocessing)}"
    frames_path, mask_path = stem.with_name(stem.name + ".frames.npy"), stem.with_name(stem.name + ".mask.npy")
    if not files:  # nothing to decode (and a zero-length file cannot be memory-mapped)
        return (np.zeros((0, max_frames, 3, image_size, image_size), dtype=np.float32),
                np.zeros((0, max_frames), dtype=np.int64))
    if not (frames_path.is_file() and mask_path.is_file()):
        frames_path.parent.mkdir(exist_ok=True)
        tmp_frames, tmp_mask = (p.with_name(p.name + ".tmp.npy") for p in (frames_path, mask_path))
        out = np.lib.format.open_memmap(tmp_frames, mode="w+", dtype=np.float32,
                                        shape=(len(files), max_frames, 3, image_size, image_size))
        mask = np.zeros((len(files), max_frames), dtype=np.int64)
        for i, name in enumerate(files):
            video = decode_video(root / name, preprocessing)
            out[i], mask[i] = video.frames, video.mask  # (T, 3, S, S), (T,)
            if progress:
                progress(f"decode {split}", i + 1, len(files))
        out.flush()
        del out
        np.save(tmp_mask, mask)
        os.replace(tmp_mask, mask_path)
        os.replace(tmp_frames, frames_path)  # last: its presence means the pair is complete
    return np.load(frames_path, mmap_mode="r"), np.load(mask_path)
