"""The one preprocessing: the official torchvision transform, reproduced on PIL and numpy (no torch).

Official (``dataloader_retrieval.py`` lines 56-62, applied to ``Image.fromarray(rgb_frame)``)::

    Resize(S, BICUBIC) -> CenterCrop(S) -> convert("RGB") -> ToTensor() -> Normalize(mean, std)

- Resize(int): the short side becomes S, the long side ``int(S * long / short)`` (truncated; torchvision
  ``_compute_resized_output_size``), PIL bicubic (PIL antialiases when shrinking, as torchvision on PIL does).
- CenterCrop: offsets ``int(round((h - S) / 2.0))`` and ``int(round((w - S) / 2.0))`` (torchvision
  ``center_crop``); after the resize no side is smaller than S, so there is never padding.
- ToTensor: uint8 HWC -> float32 CHW / 255. Normalize: (x - mean) / std per channel.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hbi_runtime.errors import UsageError


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) of torchvision ``Resize(size)`` on a ``width x height`` image."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision ``CenterCrop(size)``."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """One uint8 frame (HWC RGB, HW gray, or HWC with 1 / 4 channels) -> uint8 ``(size, size, 3)`` RGB."""
    from PIL import Image  # lazily: only decoding needs Pillow

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        raise UsageError(f"expected a uint8 HxW or HxWxC (C in 1, 3, 4) frame, got {frame.dtype} {frame.shape}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    image = Image.fromarray(frame)
    if image.mode != "RGB":  # the official transform converts to RGB after the crop; per-pixel, so order is moot
        image = image.convert("RGB")
    width, height = image.size
    new_size = resized_size(width, height, size)
    if new_size != (width, height):  # torchvision returns the image untouched when the size already matches
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    image = image.crop(center_crop_box(*new_size, size))
    return np.asarray(image, dtype=np.uint8)


def normalize(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(n, S, S, 3)`` -> float32 ``(n, 3, S, S)``: ToTensor then Normalize."""
    x = crops.astype(np.float32) / np.float32(255.0)  # (n, S, S, 3)
    x = x.transpose(0, 3, 1, 2)  # (n, 3, S, S)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def preprocess_frames(frames: Sequence[np.ndarray] | np.ndarray, image_size: int, mean: Sequence[float],
                      std: Sequence[float]) -> np.ndarray:
    """Decoded frames -> the model's input frames.

    Args:
        frames: n uint8 frames, each HxWx3 RGB (or HxW gray); a list (sizes may differ) or an (n, H, W, 3) array.
        image_size: S, the square side.
        mean, std: per-channel normalisation in [0, 1] pixel units.

    Returns:
        float32 ``(n, 3, S, S)``.

    Raises:
        UsageError: a frame that is not uint8 HxW / HxWxC.
    """
    if image_size < 1:
        raise UsageError(f"image_size must be >= 1, got {image_size}")
    crops = [resize_crop(f, image_size) for f in frames]
    if not crops:
        return np.zeros((0, 3, image_size, image_size), dtype=np.float32)
    return normalize(np.stack(crops), mean, std)
