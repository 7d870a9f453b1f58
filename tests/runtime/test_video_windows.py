"""hbi_runtime.index.windows: window / stride floors, the cap on windows per video, and windows without frames.

A window shorter than the sampling period, or a stride that makes thousands of near-identical windows, is refused
up front with a UsageError naming the value; a video whose plan would still have too many windows is one per-file
error (the other files are indexed); a video slower than one frame per window never gives an empty window (which
crashed the worker). Videos are generated with the ffmpeg binary of imageio-ffmpeg.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hbi_runtime.errors import UsageError
from hbi_runtime.index.windows import Probe, WindowDecoder, WindowTask, check_window, plan_windows, run_task
from hbi_runtime.package import Preprocessing
from hbi_runtime.video import VideoDecodeError

SMALL = Preprocessing(max_frames=4, image_size=32)


def _ffmpeg(*args: str) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("av")
    d = tmp_path_factory.mktemp("window_clips")
    out = {"six.mp4": d / "six.mp4", "slow.mp4": d / "slow.mp4", "long.mp4": d / "long.mp4"}
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-t", "6", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(out["six.mp4"]))
    # a slide show: one frame every 2 s (0.5 fps), 5 frames over 10 s
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=1/2", "-frames:v", "5", "-c:v", "libx264", "-pix_fmt",
            "yuv420p", str(out["slow.mp4"]))
    # 2 h 47 min at 1 fps, 16x16 (130 KB): 10,010 windows at the 1 s floors, over the cap of 10,000
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=16x16:rate=1", "-t", "10010", "-c:v", "libx264", "-preset",
            "ultrafast", "-g", "600", "-pix_fmt", "yuv420p", str(out["long.mp4"]))
    return out


@pytest.mark.parametrize(("window", "stride", "match"), [
    (0.0001, None, r"window must be at least 1 s.*got 0\.0001"),
    (0.5, None, r"window must be at least 1 s.*got 0\.5"),
    (10.0, 0.001, r"stride must be at least 1 s.*got 0\.001"),
    (10.0, 0.5, r"stride must be at least 1 s.*got 0\.5"),
    (0.0, None, "window must be a positive number of seconds"),
    (10.0, float("nan"), "stride must be a positive number of seconds"),
])
def test_check_window_refuses_tiny_windows_and_strides(window, stride, match):
    with pytest.raises(UsageError, match=match) as info:
        check_window(window, stride)
    assert info.value.hint and info.value.exit_code == 2


def test_plan_windows_refuses_an_absurd_plan_quickly():
    """A 10 h video at the floors would be 36,000 windows: refused, without building them."""
    start = time.monotonic()
    with pytest.raises(UsageError, match=r"about 36000 windows.*more than 10000") as info:
        plan_windows(10 * 3600 * 30, 30.0, 1.0, 1.0)
    assert time.monotonic() - start < 1.0
    assert "stride" in info.value.hint
    assert len(plan_windows(10 * 3600 * 30, 30.0, 10.0)) == 3600  # the same video at 10 s windows: fine
    check_window(1.0, 1.0)  # the floors themselves are fine
    check_window(1, None)
    check_window(None, None)
    assert len(plan_windows(100, 10.0, 1.0, 1.0)) == 10


def test_plan_windows_never_plans_an_empty_window():
    """0.5 fps (a frame every 2 s) with 1 s windows: the windows without a frame are left out, every frame is in
    one window, and the windows stay in order."""
    plan = plan_windows(5, 0.5, 1.0)
    assert len(plan) == 5
    assert all(w.stop > w.first for w in plan)
    assert [(w.first, w.stop) for w in plan] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert [w.start_s for w in plan] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_tiny_window_is_a_usage_error_in_a_worker_not_a_crash(clips):
    """``--window 0.0001`` reached a worker and crashed it with a traceback (np.stack of no frames)."""
    task = WindowTask(os.fsencode(clips["six.mp4"]), 0.0001, 0.0001, "decode", 0, 8)
    with pytest.raises(UsageError, match="window must be at least 1 s"):
        run_task(task, SMALL, decoder="pyav")
    with WindowDecoder(SMALL, workers=1, timeout_s=30.0) as pool, \
            pytest.raises(UsageError, match="window must be at least 1 s"):
        list(pool.decode_many([task]))


def test_too_many_windows_is_a_per_file_error(clips):
    """In a worker, too many windows is that file's error (the index's ``failed`` list), not the run's."""
    long, six = os.fsencode(clips["long.mp4"]), os.fsencode(clips["six.mp4"])
    for decoder in ("decord", "pyav"):
        if decoder == "decord":
            pytest.importorskip("decord")
        with pytest.raises(VideoDecodeError, match=r"10010\.0 s video at window 1 s, stride 1 s makes about 10010 "
                                                   r"windows, more than 10000") as info:
            run_task(WindowTask(long, 1.0, 1.0), SMALL, decoder=decoder)
        assert type(info.value).__name__ == "TooManyWindowsError" and info.value.exit_code == 3
        assert "--stride" in info.value.hint
    probe = run_task(WindowTask(long, 2.0, 2.0), SMALL, decoder="pyav")  # the same file at 2 s: 5,005 windows
    assert isinstance(probe, Probe) and len(probe.windows) == 5005
    with WindowDecoder(SMALL, workers=2, timeout_s=60.0) as pool:
        results = list(pool.decode_many([WindowTask(long, 1.0, 1.0), WindowTask(six, 1.0, 1.0)]))
    assert len(results) == 2
    assert type(results[0][1]).__name__ == "TooManyWindowsError" and "10010 windows" in results[0][1].reason
    assert isinstance(results[1][1], Probe) and len(results[1][1].windows) == 6


def test_a_slow_video_decodes_every_window(clips):
    path = os.fsencode(clips["slow.mp4"])
    probe = run_task(WindowTask(path, 1.0, 1.0), SMALL, decoder="pyav")
    assert isinstance(probe, Probe) and probe.n_frames == 5 and len(probe.windows) == 5
    decoded = run_task(WindowTask(path, 1.0, 1.0, "decode", 0, 8), SMALL, decoder="pyav")
    assert len(decoded) == 5
    assert [dw.video.indices.tolist() for dw in decoded] == [[0], [1], [2], [3], [4]]
    assert [int(dw.video.mask.sum()) for dw in decoded] == [1] * 5
