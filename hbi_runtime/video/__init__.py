"""Video decoding and preprocessing for the video encoder: one sampling rule, one preprocessing, two decoders.

- :func:`sample_indices`: the official HBI frame sampling (1 fps positions from frame 0, then uniform down to
  ``max_frames``), a pure function.
- :func:`preprocess_frames`: the official torchvision transform (short side to S bicubic, center crop,
  ToTensor, Normalize) on PIL and numpy.
- :func:`decode_video`: one file -> :class:`DecodedVideo` in this process (decord, PyAV as fallback); only
  self-contained video containers are opened (:mod:`hbi_runtime.video.container`), anything else is a
  :class:`NotAVideoError`.
- :class:`VideoDecoder`: the same in a pool of worker processes with per-file timeouts and a memory cap; a
  bad file gives a :class:`VideoDecodeError` and never hangs, crashes or exhausts the caller.

decord, PyAV and Pillow are imported lazily, only when a video is decoded.
"""

from __future__ import annotations

from hbi_runtime.video.decode import DECODERS, DecodedVideo, decode_video
from hbi_runtime.video.errors import (DecodeTimeoutError, DecoderCrashedError, NotAVideoError, NoVideoStreamError,
                                      TooManyWindowsError, VideoDecodeError, VideoTooLargeError)
from hbi_runtime.video.pool import VideoDecoder
from hbi_runtime.video.preprocess import preprocess_frames
from hbi_runtime.video.sampling import resolve_fps, sample_indices

__all__ = ["DECODERS", "DecodeTimeoutError", "DecodedVideo", "DecoderCrashedError", "NoVideoStreamError",
           "NotAVideoError", "TooManyWindowsError", "VideoDecodeError", "VideoDecoder", "VideoTooLargeError",
           "decode_video", "preprocess_frames", "resolve_fps", "sample_indices"]
