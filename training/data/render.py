"""Draw a :class:`~hbi_training.data.scenes.Scene` with numpy and write it as a real H.264 file with ffmpeg.

Shapes are drawn with 4x4 supersampling (soft edges, so that small frames and the later bicubic resize do not
alias). The video is encoded by piping raw RGB frames to the ``ffmpeg`` binary that ``imageio-ffmpeg`` ships
(libx264, yuv420p, mp4 with faststart): the same kind of file a user would index, read back through the
runtime's decoder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from hbi_runtime.errors import MissingDependencyError, UsageError
from hbi_training.data.scenes import BACKGROUND, COLOURS, RADIUS, Scene, object_state

SUPERSAMPLE = 4
CRF = 18  # near-lossless for flat colours; files stay a few KB
FFMPEG_TIMEOUT_S = 60.0


class EncodeError(UsageError):
    """ffmpeg could not write a video (its stderr tail is in the message)."""


def _patch(x: float, y: float, size: int) -> tuple[slice, slice]:
    """The pixel rows and columns an object's box centred at (x, y) can touch, clipped to the frame."""
    lo_x, hi_x = int(np.floor((x - RADIUS) * size)) - 1, int(np.ceil((x + RADIUS) * size)) + 1
    lo_y, hi_y = int(np.floor((y - RADIUS) * size)) - 1, int(np.ceil((y + RADIUS) * size)) + 1
    return slice(max(lo_y, 0), min(hi_y, size)), slice(max(lo_x, 0), min(hi_x, size))


def shape_mask(shape: str, x: float, y: float, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Coverage in [0, 1] of one shape centred at (x, y) (frame fractions), on the patch it can touch.

    Returns:
        ``((rows, cols), coverage)``: the patch's slices of the frame and float32 coverage of that patch.
    """
    rows, cols = _patch(x, y, size)
    ss = SUPERSAMPLE
    sub_y = (np.arange(rows.start * ss, rows.stop * ss, dtype=np.float32) + 0.5) / (size * ss)
    sub_x = (np.arange(cols.start * ss, cols.stop * ss, dtype=np.float32) + 0.5) / (size * ss)
    v = ((sub_y - y) / RADIUS)[:, None]  # unit box around the centre; v grows downwards
    u = ((sub_x - x) / RADIUS)[None, :]
    if shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.85  # a little smaller: about the circle's area
    elif shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "triangle":  # apex up, base down
        inside = (v <= 0.9) & (np.abs(u) <= (v + 1.0) * 0.5)
    elif shape == "cross":
        inside = ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    else:
        raise UsageError(f"unknown shape {shape!r}")
    h, w = rows.stop - rows.start, cols.stop - cols.start
    return (rows, cols), inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)


def render_frame(scene: Scene, t: float, size: int) -> np.ndarray:
    """The scene at time ``t`` seconds: uint8 (size, size, 3) RGB."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for i, obj in enumerate(scene.objects):
        state = object_state(scene, i, t)
        if not state.visible:
            continue
        (rows, cols), alpha = shape_mask(obj.shape, state.x, state.y, size)
        patch = image[rows, cols]  # (h, w, 3), a view
        patch += alpha[:, :, None] * (np.asarray(COLOURS[state.colour], dtype=np.float32) - patch)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_frames(scene: Scene, size: int, fps: int) -> np.ndarray:
    """Every frame of the video, frame ``i`` at ``i / fps`` s: uint8 (seconds * fps, size, size, 3)."""
    return np.stack([render_frame(scene, i / fps, size) for i in range(scene.seconds * fps)])


def ffmpeg_exe() -> str:
    """The ffmpeg binary of imageio-ffmpeg.

    Raises:
        MissingDependencyError: imageio-ffmpeg is not installed.
    """
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MissingDependencyError("writing synthetic videos needs imageio-ffmpeg, which is not installed",
                                     hint="pip install imageio-ffmpeg") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_h264(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """Write uint8 (N, H, W, 3) RGB frames to ``path`` as H.264 (libx264, yuv420p) in mp4 at ``fps``.

    Raises:
        UsageError: odd frame sizes (yuv420p needs even ones) or a bad array.
        EncodeError: ffmpeg failed or took longer than FFMPEG_TIMEOUT_S.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise UsageError(f"encode_h264: expected uint8 (N, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UsageError(f"encode_h264: yuv420p needs even sizes, got {w}x{h}")
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0",
           "-an", "-c:v", "libx264", "-preset", "medium", "-crf", str(CRF), "-pix_fmt", "yuv420p",
           "-threads", "1", "-movflags", "+faststart", str(path)]
    try:
        result = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True,
                                timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise EncodeError(f"{path}: ffmpeg took longer than {FFMPEG_TIMEOUT_S:g} s") from None
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip()[-500:]
        raise EncodeError(f"{path}: ffmpeg failed (exit {result.returncode}): {tail}")
