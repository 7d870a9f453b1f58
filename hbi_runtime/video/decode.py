"""decode_video: one file -> the model's ``frames`` and ``frame_mask``, in this process.

This is what each worker of :class:`hbi_runtime.video.pool.VideoDecoder` runs; call it directly only where a
hang or a native crash of a decoder may take the caller down with it (tests, one-off scripts).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

import numpy as np

from hbi_runtime.errors import ConfigError, MissingDependencyError, UsageError
from hbi_runtime.video.errors import (DecodeTimeoutError, NoVideoStreamError, VideoDecodeError,
                                      VideoTooLargeError)
from hbi_runtime.video.preprocess import normalize, resize_crop
from hbi_runtime.video.readers import AVAILABLE, DECORD_CHUNK, ReaderError, ShortReadError, open_reader
from hbi_runtime.video.sampling import resolve_fps, sample_indices

DECODERS = ("auto", "decord", "pyav")
SUPPORTED = {"sampling": "1fps-then-uniform", "resize": "shortest-side-bicubic", "crop": "center"}
DECODER_REF_FRAMES = 16  # frames a decoder may hold (H.264 DPB); part of the memory estimate
DEFAULT_MEMORY_LIMIT_MB = 2048


@dataclass(frozen=True)
class DecodedVideo:
    """One video as the video encoder takes it.

    ``frames`` float32 ``(T, 3, S, S)`` normalised, zero (in the normalised space) where ``mask`` is 0;
    ``mask`` int64 ``(T,)``, 1 for the first ``len(indices)`` frames; ``indices`` the decoded frame numbers;
    ``fps`` the rate the sampling used; ``n_frames`` / ``duration`` as the decoder saw the file.
    """

    frames: np.ndarray  # (T, 3, S, S) float32
    mask: np.ndarray  # (T,) int64
    indices: np.ndarray  # (n_valid,) int64
    fps: float
    n_frames: int
    duration: float | None
    decoder_used: str
    warnings: tuple[str, ...] = ()


def check_preprocessing(preprocessing) -> None:
    """Refuse a preprocessing contract this runtime does not implement (rather than silently doing another)."""
    for field, supported in SUPPORTED.items():
        value = getattr(preprocessing, field)
        if value != supported:
            raise ConfigError(f"preprocessing.{field} = {value!r} is not supported by this runtime "
                              f"(supported: {supported!r})", hint="upgrade hbi-toolkit or re-export the package")
    if preprocessing.max_frames < 1 or preprocessing.image_size < 1:
        raise ConfigError(f"preprocessing needs max_frames >= 1 and image_size >= 1, got "
                          f"{preprocessing.max_frames} and {preprocessing.image_size}")


def decoder_chain(decoder: str) -> list[str]:
    """The decoders to try, in order: ``auto`` is decord then PyAV (whichever are installed).

    PyAV is needed in any case: :mod:`hbi_runtime.video.container` checks each file with it before any decoder
    opens it (only self-contained video containers are decoded).
    """
    if decoder.startswith("fault-"):
        return [decoder]
    if decoder not in DECODERS:
        raise UsageError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    names = ["decord", "pyav"] if decoder == "auto" else [decoder]
    chain = [n for n in names if AVAILABLE[n]()]
    if not chain:
        wanted = "decord or av" if decoder == "auto" else {"decord": "decord", "pyav": "av"}[decoder]
        raise MissingDependencyError(f"video decoding needs {wanted}, which is not installed",
                                     hint=f"pip install {wanted.split()[0]}")
    if not AVAILABLE["pyav"]():  # every file's container is checked with PyAV before decord opens it
        raise MissingDependencyError("video decoding needs av (PyAV), which is not installed: it checks every "
                                     "file's container before decord opens it", hint="pip install av")
    return chain


def _check_file(path) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise VideoDecodeError(path, "no such file", hint="check the path") from None
    except OSError as exc:
        raise VideoDecodeError(path, f"cannot read it: {exc.strerror}", hint="check the path and permissions",
                               transient=True) from None
    if not stat.S_ISREG(info.st_mode):
        raise VideoDecodeError(path, "not a regular file", hint="give a video file, not a folder or device")
    if info.st_size == 0:
        raise VideoDecodeError(path, "the file is empty (0 bytes)", hint="skip it, or copy the file again")


def estimate_bytes(width: int, height: int, n_sampled: int, image_size: int) -> int:
    """Peak bytes of one decode: the decoder's reference frames and one chunk of RGB frames, plus the output."""
    raw = (DECODER_REF_FRAMES + DECORD_CHUNK) * width * height * 3
    return raw + 2 * n_sampled * 3 * image_size * image_size * 4


def decode_video(path: str | bytes | os.PathLike, preprocessing, *, decoder: str = "auto", threads: int = 1,
                 timeout: float | None = None, memory_limit_mb: float | None = DEFAULT_MEMORY_LIMIT_MB
                 ) -> DecodedVideo:
    """Decode the sampled frames of one file and preprocess them, as the official loader does.

    Args:
        path: the video (str, bytes - any file name, PathLike).
        preprocessing: a :class:`hbi_runtime.package.Preprocessing` (max_frames, frame_rate, image_size, mean,
            std); its sampling / resize / crop must be the official ones.
        decoder: ``auto`` (decord, then PyAV when decord cannot open or read the file), ``decord`` or ``pyav``.
        threads: decoder threads (1 in a pool of workers, which parallelises across files).
        timeout: seconds; a soft limit checked between packets and frames (a pool enforces a hard one).
        memory_limit_mb: refuse a file whose decode would need more (see :func:`estimate_bytes`); None: no limit.

    Returns:
        A :class:`DecodedVideo`.

    Raises:
        VideoDecodeError (or a subclass): the file cannot be decoded; the message names it and says why.
        ConfigError: an unsupported preprocessing contract. MissingDependencyError: no decoder installed.
    """
    check_preprocessing(preprocessing)
    chain = decoder_chain(decoder)
    _check_file(path)
    deadline = time.monotonic() + timeout if timeout else None
    failures: list[str] = []
    for name in chain:
        try:
            video = _decode_with(name, path, preprocessing, threads=threads, deadline=deadline,
                                 memory_limit_mb=memory_limit_mb)
        except ReaderError as exc:  # this decoder cannot do it; the next one may
            failures.append(f"{name}: {exc.reason}")
            continue
        if failures:
            video = _with_warnings(video, [f"{failure}; decoded with {name} instead" for failure in failures])
        return video
    raise VideoDecodeError(path, "cannot decode it (" + "; ".join(failures) + ")")


def _with_warnings(video: DecodedVideo, extra: list[str]) -> DecodedVideo:
    return DecodedVideo(**{**video.__dict__, "warnings": tuple(extra) + video.warnings})


def _decode_with(name: str, path, preprocessing, *, threads: int, deadline: float | None,
                 memory_limit_mb: float | None) -> DecodedVideo:
    """One decoder, start to end; ReaderError means "try another decoder", VideoDecodeError is final."""
    with open_reader(name, path, threads=threads, deadline=deadline) as reader:
        info = reader.info
        if info.n_frames < 1:
            raise ReaderError("the video stream has no frames")
        fps, fps_warning = resolve_fps(info.avg_fps, info.n_frames, info.duration)
        indices = sample_indices(info.n_frames, fps, preprocessing.max_frames, preprocessing.frame_rate)
        if info.width and info.height:
            _check_budget(path, info.width, info.height, len(indices), preprocessing, memory_limit_mb)
        try:
            crops = _read_crops(reader, indices, preprocessing, path, memory_limit_mb, deadline)
            n_frames = info.n_frames
        except ShortReadError as exc:
            if exc.readable < 1:
                raise ReaderError(exc.reason) from None
            # The index promised more frames than decode (decord #373's over-report): sample again within what
            # can be read, once, and say so.
            n_frames = exc.readable
            indices = sample_indices(n_frames, fps, preprocessing.max_frames, preprocessing.frame_rate)
            crops = _read_crops(reader, indices, preprocessing, path, memory_limit_mb, deadline)
            reader.warnings.append(f"{exc.reason}; sampled again from the {n_frames} readable frames")
        warnings = [w for w in [fps_warning, *reader.warnings] if w]
    frames, mask = _pad(normalize(np.stack(crops), preprocessing.mean, preprocessing.std), preprocessing.max_frames)
    return DecodedVideo(frames=frames, mask=mask, indices=indices, fps=fps, n_frames=n_frames,
                        duration=info.duration, decoder_used=name, warnings=tuple(warnings))


def _read_crops(reader, indices: np.ndarray, preprocessing, path, memory_limit_mb, deadline) -> list[np.ndarray]:
    crops = []
    for frame in reader.frames(indices):
        if not crops:  # the size is known for sure only now (decord gives none before decoding)
            _check_budget(path, frame.shape[1], frame.shape[0], len(indices), preprocessing, memory_limit_mb)
        crops.append(resize_crop(frame, preprocessing.image_size))
        if deadline is not None and time.monotonic() > deadline:
            raise DecodeTimeoutError(path, "decoding took longer than the timeout")
    return crops


def _check_budget(path, width: int, height: int, n_sampled: int, preprocessing, memory_limit_mb) -> None:
    if memory_limit_mb is None:
        return
    need = estimate_bytes(width, height, n_sampled, preprocessing.image_size)
    if need > memory_limit_mb * 2**20:
        raise VideoTooLargeError(path, f"{width}x{height} video needs about {need / 2**20:.0f} MiB to decode, "
                                       f"over the {memory_limit_mb:g} MiB limit")


def _pad(frames: np.ndarray, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, S, S) -> zero-padded (T, 3, S, S) and the int64 mask (T,), as the official loader."""
    n = frames.shape[0]
    out = np.zeros((max_frames,) + frames.shape[1:], dtype=np.float32)
    out[:n] = frames
    mask = np.zeros(max_frames, dtype=np.int64)
    mask[:n] = 1
    return out, mask


__all__ = ["DECODERS", "DecodedVideo", "NoVideoStreamError", "check_preprocessing", "decode_video",
           "estimate_bytes"]
