"""Calibration data: the user's own videos, through the runtime's decode and preprocessing, streamed.

- :func:`plan_split` finds the videos (``hbi_runtime.index.scan``), matches captions to them, and splits them
  deterministically into a calibration part and a held-out part (the accuracy gate never sees a calibration video).
- :class:`VideoReader` is an ``onnxruntime.quantization.CalibrationDataReader`` that decodes one video at a time
  in the runtime's worker pool (:class:`hbi_runtime.video.VideoDecoder`, the package's preprocessing contract) and
  hands it to the calibrator: memory holds one video's frames plus the few in flight, however many samples.
- :func:`decode_to_memmap` decodes the held-out videos once into a disk-backed array, which every gate attempt
  reads again without decoding.

No real sample, no calibration: a folder without decodable videos is refused (``BadInputError``, exit 3), never
replaced by random data.

Names: a video's file name may be any bytes (not UTF-8, an ESC sequence, a newline). Reports record it as
:func:`hbi_runtime.names.display_path` writes it (printable, lossless; :func:`hbi_runtime.names.parse_display_path`
gives the bytes back), and a captions file names a video by its relative path, file name or stem in that form (or,
for a UTF-8 name without backslashes, as it is). A file name or stem that several videos share must be given as
the relative path instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.inputs import read_captions
from hbi_runtime.names import display_path, printable
from hbi_runtime.package import Preprocessing

Progress = Callable[[str], None]
MIN_HELD_OUT = 2  # ranking metrics need at least two held-out videos
DEFAULT_HOLDOUT = 0.25
MAX_HELD_OUT = 64  # beyond this the gate's figures barely move; decoding and encoding them twice costs time


@dataclass(frozen=True)
class Split:
    """Which videos calibrate and which check. Paths are absolute ``str``; ``captions`` maps a held-out path to its
    captions (empty without ``--captions``)."""

    calibration: tuple[str, ...]
    held_out: tuple[str, ...]
    captions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self, root: Path) -> dict:
        rel = lambda p: display_path(os.path.relpath(p, root))  # noqa: E731
        return {"calibration_videos": len(self.calibration), "held_out_videos": len(self.held_out),
                "held_out": [rel(p) for p in self.held_out],
                "captions": sum(len(c) for c in self.captions.values())}


def _order_key(rel: bytes) -> str:
    """A stable pseudo-random order of file names: the same folder splits the same way on every machine."""
    return hashlib.sha256(rel).hexdigest()


def _keys(rel: bytes) -> tuple[tuple[str, ...], ...]:
    """The names a captions file may use for a video, most specific first: its relative path, its file name, its
    file stem; each in the escaped form (:func:`display_path`) and, for a UTF-8 name without backslashes, also as
    it is (an ESC or a non-ASCII letter included; a newline cannot be in a CSV field)."""
    forms = [display_path(rel)]
    try:
        raw = rel.decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8: only the escaped form names it
        raw = None
    if raw is not None and "\\" not in raw and raw != forms[0]:  # with a backslash, "\x41" could be two names
        forms.append(raw)
    return (tuple(forms), tuple(dict.fromkeys(PurePosixPath(f).name for f in forms)),
            tuple(dict.fromkeys(PurePosixPath(f).stem for f in forms)))


def _match_captions(files: dict[bytes, str], pairs: Sequence[tuple[str, str]],
                    captions: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """``{video path: its captions}``; each caption's video named as :func:`_keys` allows.

    Raises:
        BadInputError: a caption names no video of the folder, or a name (file name or stem) that several have.
    """
    tiers: list[dict[str, set[bytes]]] = [{}, {}, {}]  # relative paths, file names, stems
    for rel in files:
        for tier, keys in zip(tiers, _keys(rel)):
            for key in keys:
                tier.setdefault(key, set()).add(rel)
    found = {video: next((tier[video] for tier in tiers if video in tier), set()) for video, _ in pairs}
    missing = sorted(printable(video) for video, rels in found.items() if not rels)
    if missing:
        raise BadInputError(f"captions file {display_path(captions)}: {len(missing)} captioned video(s) not in the "
                            f"videos folder, e.g. {', '.join(missing[:5])}",
                            hint="captions name videos by relative path, file name or stem (a name that is not "
                                 "printable UTF-8 as hbi-toolkit prints it, e.g. clip-\\xe9.mp4); check --videos")
    ambiguous = sorted((printable(video), sorted(rels)) for video, rels in found.items() if len(rels) > 1)
    if ambiguous:
        video, rels = ambiguous[0]
        raise BadInputError(f"captions file {display_path(captions)} names the video {video}, which is the name of "
                            f"{len(rels)} videos ({', '.join(display_path(r) for r in rels[:3])})",
                            hint="name such videos by their path relative to --videos")
    matched: dict[bytes, list[str]] = {}
    for video, caption in pairs:
        matched.setdefault(next(iter(found[video])), []).append(caption)
    return {files[rel]: tuple(c) for rel, c in matched.items()}


def plan_split(videos: str | os.PathLike, *, captions: str | os.PathLike | None = None, samples: int = 64,
               holdout: float = DEFAULT_HOLDOUT) -> Split:
    """Find the videos under ``videos`` and split them into calibration and held-out parts.

    The held-out part is ``holdout`` of the videos (at least 2, at most 64), chosen by a hash of the relative path
    (deterministic, independent of the order files were written); with captions it is drawn from the captioned
    videos, since only they measure recall. At most ``samples`` of the rest calibrate.

    Raises:
        BadInputError: no folder, no videos, too few videos for both parts, or captions naming unknown videos.
        UsageError: ``samples`` < 1 or ``holdout`` outside (0, 1).
    """
    from hbi_runtime.index.scan import scan

    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be between 0 and 1, got {holdout}")
    found = scan(videos)
    files = {e.rel: os.fsdecode(e.path) for e in found.files}
    if not files:
        raise BadInputError(f"no video files in {display_path(videos)}: calibration needs real samples of your videos "
                            "(it never calibrates on random data)",
                            hint="give --videos a folder with a few dozen typical videos")
    by_caption = _match_captions(files, read_captions(captions), captions) if captions is not None else {}
    order = sorted(files, key=_order_key)
    pool = [rel for rel in order if files[rel] in by_caption] if by_caption else order
    n_held = min(MAX_HELD_OUT, max(MIN_HELD_OUT, round(holdout * len(files))), len(pool))
    held = pool[:n_held]
    held_set = set(held)
    rest = [rel for rel in order if rel not in held_set][:samples]
    if len(held) < MIN_HELD_OUT or not rest:
        captioned = f" ({len(pool)} captioned)" if by_caption else ""
        raise BadInputError(f"{len(files)} video(s) in {display_path(videos)}{captioned}: calibration needs at least "
                            f"{MIN_HELD_OUT + 1} (at least one to calibrate, {MIN_HELD_OUT} held out for the "
                            "accuracy gate)",
                            hint="add more of your videos to the folder")
    held_paths = tuple(files[rel] for rel in held)
    return Split(calibration=tuple(files[rel] for rel in rest), held_out=held_paths,
                 captions={p: by_caption[p] for p in held_paths if p in by_caption})


def _decoded(paths: Sequence[str], preprocessing: Preprocessing, workers: int, errors: list,
             progress: Progress, what: str) -> Iterator[tuple[str, object]]:
    """Decode ``paths`` in the runtime's worker pool; failures are collected in ``errors``, never raised."""
    from hbi_runtime.video import VideoDecodeError, VideoDecoder

    with VideoDecoder(preprocessing, workers=workers) as pool:
        for i, (path, result) in enumerate(pool.decode_many(paths), start=1):
            if isinstance(result, VideoDecodeError):
                errors.append(result)
                progress(f"{what}: skipped {display_path(path)}: {display_path(result.reason)}")
                continue
            if i % 8 == 0 or i == len(paths):
                progress(f"{what}: {i}/{len(paths)} videos")
            yield path, result


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


def make_video_reader(paths: Sequence[str], preprocessing: Preprocessing, *, workers: int = 2,
                      progress: Progress = lambda _: None):
    """A ``CalibrationDataReader`` over ``paths``: one decoded video per ``get_next()`` (frames ``[1, T, 3, S, S]``,
    ``frame_mask [1, T]``). ``reader.used`` counts the videos delivered, ``reader.errors`` the decode failures.

    Raises (from ``get_next``, at the end): BadInputError when not a single video could be decoded.
    """

    class VideoReader(_reader_base()):
        def __init__(self) -> None:
            self.errors: list = []
            self.used = 0
            self._it = _decoded(paths, preprocessing, workers, self.errors, progress, "calibration")

        def get_next(self) -> dict | None:
            item = next(self._it, None)
            if item is None:
                if self.used == 0:
                    raise no_samples_error(self.errors, len(paths), "calibration")
                return None
            self.used += 1
            decoded = item[1]
            return {"frames": decoded.frames[None], "frame_mask": decoded.mask[None]}  # (1, T, 3, S, S), (1, T)

    return VideoReader()


def no_samples_error(errors: list, n: int, what: str) -> BadInputError:
    reasons = "; ".join(f"{display_path(e.path)}: {display_path(e.reason)}" for e in errors[:3])
    return BadInputError(f"none of the {n} {what} videos could be decoded ({reasons}): calibration needs real "
                         "samples and never falls back to random data",
                         hint="check the files with `hbi-run doctor`, or give --videos a folder of playable videos")


@dataclass
class HeldOut:
    """The held-out videos, decoded once: ``frames`` is a disk-backed ``(n, T, 3, S, S)`` float32 array."""

    paths: list[str]
    frames: np.ndarray
    mask: np.ndarray
    errors: list


def decode_to_memmap(paths: Sequence[str], preprocessing: Preprocessing, work_dir: Path, *, workers: int = 2,
                     progress: Progress = lambda _: None) -> HeldOut:
    """Decode ``paths`` into ``work_dir/held_out_frames.npy`` (memory-mapped; RAM holds one video at a time).

    Raises:
        BadInputError: fewer than 2 of them could be decoded.
    """
    t, s = preprocessing.max_frames, preprocessing.image_size
    frames = np.lib.format.open_memmap(work_dir / "held_out_frames.npy", mode="w+", dtype=np.float32,
                                       shape=(len(paths), t, 3, s, s))
    mask = np.zeros((len(paths), t), dtype=np.int64)
    kept: list[str] = []
    errors: list = []
    for path, decoded in _decoded(paths, preprocessing, workers, errors, progress, "held-out"):
        frames[len(kept)] = decoded.frames
        mask[len(kept)] = decoded.mask
        kept.append(path)
    if len(kept) < MIN_HELD_OUT:
        raise no_samples_error(errors, len(paths), "held-out") if not kept else BadInputError(
            f"only {len(kept)} of the {len(paths)} held-out videos could be decoded; the gate needs "
            f"{MIN_HELD_OUT}", hint="add more playable videos to the folder")
    frames.flush()
    return HeldOut(kept, frames[:len(kept)], mask[:len(kept)], errors)
