"""hbi_runtime.video: the official sampling rule, the official preprocessing, both decoders, and the worker pool.

Videos are generated into a temporary folder with the ffmpeg binary of imageio-ffmpeg (small: at most 320x240,
a few seconds). decord, av, Pillow and imageio-ffmpeg are needed; tests that need one that is missing skip.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hbi_runtime.errors import ConfigError, UsageError
from hbi_runtime.package import CLIP_MEAN, CLIP_STD, Preprocessing
from hbi_runtime.video import (DecodedVideo, DecodeTimeoutError, DecoderCrashedError, NotAVideoError,
                               NoVideoStreamError, VideoDecodeError, VideoDecoder, VideoTooLargeError, decode_video,
                               preprocess_frames, resolve_fps, sample_indices)
from hbi_runtime.video.readers import open_reader

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

T = 12
PREP = Preprocessing(max_frames=T, image_size=224)
SMALL = Preprocessing(max_frames=T, image_size=32)  # fast preprocessing where only decoding is under test
NON_UTF8 = b"clip-\xe9\xff.mp4"  # Latin-1 bytes: not valid UTF-8


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the official rule (dataloader_retrieval.py, _get_rawvideo_dec)


def official_positions(n_frames: int, fps: float, max_frames: int, framerate: int = 1) -> list[int]:
    """The official loop, written out as it reads (f_start = 0, f_end = len - 1, range to f_end + 1)."""
    f_start, f_end = 0, int(min(1000000000, n_frames - 1))
    t_stride = int(round(float(fps) / int(framerate)))
    all_pos = list(range(f_start, f_end + 1, t_stride))
    if len(all_pos) > max_frames:
        return [all_pos[i] for i in np.linspace(0, len(all_pos) - 1, num=max_frames, dtype=int)]
    return all_pos


@pytest.mark.parametrize(("n_frames", "fps", "expected"), [
    (300, 30.0, list(range(0, 300, 30))),  # 30 fps, 10 s: 10 positions, the last at 270
    (182, 25.0, [0, 25, 50, 75, 100, 125, 150, 175]),  # 25 fps, 7.3 s (182 frames)
    (183, 25.0, [0, 25, 50, 75, 100, 125, 150, 175]),
    (1, 30.0, [0]),  # one frame
    (6000, 60.0, [i * 60 for i in (0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99)]),  # 60 fps, 100 s: 12 of 100
    (361, 30.0, [0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330]),  # 13 positions -> 12: index 6 dropped
    (100, 12.5, list(range(0, 100, 12))[:9]),  # round(12.5) == 12: Python's half-to-even, as official
])
def test_sample_indices_official_cases(n_frames, fps, expected):
    got = sample_indices(n_frames, fps, T)
    if n_frames == 361:
        expected = official_positions(361, 30.0, T)
    assert got.dtype == np.int64
    assert got.tolist() == expected
    assert got.tolist() == official_positions(n_frames, fps, T)


def test_sample_indices_matches_official_loop_on_many_inputs(rng):
    for _ in range(300):
        n = int(rng.integers(1, 20000))
        fps = float(rng.choice([23.976, 24, 25, 29.97, 30, 50, 59.94, 60, 120, rng.uniform(0.6, 240)]))
        t = int(rng.choice([1, 4, 12, 64]))
        assert sample_indices(n, fps, t).tolist() == official_positions(n, fps, t), (n, fps, t)


def test_sample_indices_edges():
    assert sample_indices(0, 30.0, T).tolist() == []
    assert sample_indices(5, 0.2, T).tolist() == [0, 1, 2, 3, 4]  # stride would be 0 officially: at least 1
    assert sample_indices(100, 30.0, T, frame_rate=2.0).tolist()[:3] == [0, 15, 30]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="avg_fps"):
            sample_indices(100, bad, T)
    with pytest.raises(UsageError, match="max_frames"):
        sample_indices(100, 30.0, 0)


def test_resolve_fps_falls_back_with_a_warning():
    assert resolve_fps(29.97, 300, 10.0) == (29.97, None)
    fps, warning = resolve_fps(float("nan"), 300, 10.0)
    assert fps == 30.0 and "300 frames / 10.000 s" in warning
    fps, warning = resolve_fps(90000.0, 250, 10.0)  # a time base, not a frame rate
    assert fps == 25.0 and "unusable" in warning
    fps, warning = resolve_fps(0.0, 10, None)
    assert fps == 25.0 and "as if 25 fps" in warning


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing against a reference written with PIL and numpy here


def reference_preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on PIL, by hand; returns uint8 (size, size, 3)."""
    h, w = frame.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = Image.fromarray(frame).convert("RGB")
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return arr[top:top + size, left:left + size]


def to_pixels(frames: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """Undo Normalize and ToTensor: float (n, 3, S, S) -> (n, S, S, 3) in [0, 255]."""
    x = frames * np.asarray(std, np.float32)[None, :, None, None] + np.asarray(mean, np.float32)[None, :, None, None]
    return x.transpose(0, 2, 3, 1) * 255.0


@pytest.mark.parametrize(("height", "width"), [(241, 321), (321, 241), (224, 224), (240, 320), (50, 100), (7, 500)])
def test_preprocess_matches_pil_reference(rng, height, width):
    frames = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    out = preprocess_frames(frames, 224, CLIP_MEAN, CLIP_STD)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    ref = np.stack([reference_preprocess(f, 224) for f in frames]).astype(np.float32)
    assert np.abs(to_pixels(out) - ref).mean() <= 1.0  # <= 1/255 in [0, 1] units
    # Normalize itself, channel by channel, as torchvision writes it
    r = ref[0, :, :, 1] / 255.0
    assert np.allclose(out[0, 1], (r - CLIP_MEAN[1]) / CLIP_STD[1], atol=1e-5)


def test_preprocess_grayscale_and_list_of_sizes(rng):
    gray = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    color = rng.integers(0, 256, size=(30, 20, 3), dtype=np.uint8)
    out = preprocess_frames([gray, rgb, color], 32, CLIP_MEAN, CLIP_STD)
    assert out.shape == (3, 3, 32, 32)
    assert np.array_equal(out[0], out[1])
    with pytest.raises(UsageError, match="uint8"):
        preprocess_frames([np.zeros((4, 4, 3), np.float32)], 32, CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------------------------------------------------------
# Generated videos


def _ffmpeg(*args: str) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


SRC = "testsrc2=size={size}:rate={rate}"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Every test video, made once per module."""
    pytest.importorskip("av")
    d = tmp_path_factory.mktemp("videos")
    v = {name: d / name for name in ("h264.mp4", "vp9.webm", "gray.mp4", "10bit.mp4", "odd.webm", "rot90.mp4",
                                     "vfr.mp4", "vfr.mkv", "one.mp4", "audio.m4a", "faststart.mp4")}
    lavfi = ("-f", "lavfi", "-i")
    _ffmpeg(*lavfi, SRC.format(size="320x240", rate=30), "-t", "4", "-c:v", "libx264", "-g", "20", "-bf", "2",
            "-pix_fmt", "yuv420p", str(v["h264.mp4"]))
    _ffmpeg(*lavfi, SRC.format(size="160x120", rate=25), "-t", "3", "-c:v", "libvpx-vp9", "-g", "25",
            "-deadline", "realtime", "-b:v", "300k", str(v["vp9.webm"]))
    _ffmpeg(*lavfi, SRC.format(size="128x96", rate=25), "-t", "2", "-c:v", "libx264", "-pix_fmt", "gray",
            str(v["gray.mp4"]))
    _ffmpeg(*lavfi, SRC.format(size="128x96", rate=25), "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p10le",
            str(v["10bit.mp4"]))
    _ffmpeg(*lavfi, SRC.format(size="320x240", rate=25), "-t", "2", "-vf", "scale=321:241", "-c:v", "libvpx-vp9",
            "-deadline", "realtime", "-b:v", "300k", str(v["odd.webm"]))
    _ffmpeg("-display_rotation", "90", "-i", str(v["h264.mp4"]), "-c", "copy", str(v["rot90.mp4"]))
    # variable frame rate: 2 s at 30 fps, then 2 s at 10 fps (80 frames in 4 s)
    for name in ("vfr.mp4", "vfr.mkv"):
        _ffmpeg(*lavfi, SRC.format(size="96x64", rate=30), "-t", "4", "-vf", "select='lt(n\\,60)+not(mod(n\\,3))'",
                "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(v[name]))
    _ffmpeg(*lavfi, SRC.format(size="64x48", rate=30), "-frames:v", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(v["one.mp4"]))
    _ffmpeg(*lavfi, "sine=duration=1", "-c:a", "aac", str(v["audio.m4a"]))
    _ffmpeg("-i", str(v["h264.mp4"]), "-c", "copy", "-movflags", "+faststart", str(v["faststart.mp4"]))
    data = v["h264.mp4"].read_bytes()
    v["truncated.mp4"] = d / "truncated.mp4"  # moov atom at the end: cut in half, nothing indexes the frames
    v["truncated.mp4"].write_bytes(data[: len(data) // 2])
    fast = v["faststart.mp4"].read_bytes()
    v["cut_tail.mp4"] = d / "cut_tail.mp4"  # moov first: the index promises frames the file no longer has
    v["cut_tail.mp4"].write_bytes(fast[: len(fast) * 6 // 10])
    v["empty.mp4"] = d / "empty.mp4"
    v["empty.mp4"].write_bytes(b"")
    v["text.mp4"] = d / "text.mp4"
    v["text.mp4"].write_text("this is not a video\n" * 100)
    v["non_utf8"] = Path(os.fsdecode(os.path.join(os.fsencode(d), NON_UTF8)))
    os.link(v["h264.mp4"], os.fsencode(v["non_utf8"]))
    return v


@pytest.fixture(scope="module")
def decord_ok():
    return pytest.importorskip("decord")


def raw_frames(name: str, path, indices) -> np.ndarray:
    """The RGB uint8 frames a reader gives, before preprocessing."""
    with open_reader(name, path, threads=1, deadline=None) as reader:
        return np.stack(list(reader.frames(np.asarray(indices))))


def assert_same_video(a: DecodedVideo, b: DecodedVideo) -> None:
    assert a.indices.tolist() == b.indices.tolist()
    assert a.n_frames == b.n_frames and a.fps == pytest.approx(b.fps)
    assert np.array_equal(a.mask, b.mask)
    assert np.abs(to_pixels(a.frames) - to_pixels(b.frames)).mean() <= 1.0


# Raw-frame tolerance (mean abs, 0-255): 8-bit 4:2:0 converts bit-exactly in both. For 10-bit, decord's bundled
# FFmpeg and PyAV's newer one convert 10-bit 4:2:0 to RGB24 differently (chroma upsampling / dithering): on
# testsrc2's sharp colour edges the mean is ~5 (max ~100), also at 224 px; at the 32 px SMALL size it averages out.
# Known and reported: not a sampling difference (indices are identical).
RAW_TOLERANCE = {"10bit.mp4": 8.0}


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "gray.mp4", "10bit.mp4", "odd.webm", "rot90.mp4",
                                  "vfr.mp4", "vfr.mkv"])
def test_decord_and_pyav_agree(videos, decord_ok, name):
    a = decode_video(videos[name], SMALL, decoder="decord")
    b = decode_video(videos[name], SMALL, decoder="pyav")
    assert (a.decoder_used, b.decoder_used) == ("decord", "pyav")
    assert a.warnings == () and b.warnings == ()
    assert_same_video(a, b)
    raw_a, raw_b = raw_frames("decord", videos[name], a.indices), raw_frames("pyav", videos[name], a.indices)
    assert raw_a.shape == raw_b.shape
    assert np.abs(raw_a.astype(np.int16) - raw_b).mean() <= RAW_TOLERANCE.get(name, 1.0)


def test_h264_sampling_padding_and_preprocessing(videos):
    video = decode_video(videos["h264.mp4"], PREP, decoder="pyav")
    assert (video.n_frames, video.fps, video.duration) == (120, 30.0, pytest.approx(4.0))
    assert video.indices.tolist() == [0, 30, 60, 90]  # 4 s at 1 fps: shorter than T
    assert video.frames.shape == (T, 3, 224, 224) and video.frames.dtype == np.float32
    assert video.mask.dtype == np.int64 and video.mask.tolist() == [1] * 4 + [0] * 8
    assert not video.frames[4:].any()  # padding is zero in the normalised space, as the official loader
    raw = raw_frames("pyav", videos["h264.mp4"], video.indices)
    ref = np.stack([reference_preprocess(f, 224) for f in raw]).astype(np.float32)
    assert np.abs(to_pixels(video.frames[:4]) - ref).mean() <= 1.0


def test_long_clip_is_sampled_uniformly(videos):
    """T smaller than the 1 fps positions: uniform subset, same in both decoders."""
    prep = Preprocessing(max_frames=3, image_size=32)
    video = decode_video(videos["h264.mp4"], prep, decoder="pyav")
    assert video.indices.tolist() == [0, 30, 90] == official_positions(120, 30.0, 3)
    assert video.mask.tolist() == [1, 1, 1]


def test_grayscale_becomes_rgb(videos):
    raw = raw_frames("pyav", videos["gray.mp4"], [0])
    assert raw.shape == (1, 96, 128, 3)
    assert np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2])


def test_odd_size_and_10bit(videos):
    odd = decode_video(videos["odd.webm"], PREP, decoder="pyav")
    assert odd.frames.shape == (T, 3, 224, 224) and odd.indices.tolist() == [0, 25]
    assert raw_frames("pyav", videos["odd.webm"], [0]).shape == (1, 241, 321, 3)
    ten = raw_frames("pyav", videos["10bit.mp4"], [0, 25])
    eight = raw_frames("pyav", videos["h264.mp4"], [0])  # same test pattern, other size: just sanity
    assert ten.dtype == np.uint8 == eight.dtype and ten.shape == (2, 96, 128, 3)


@pytest.mark.parametrize("name", ["pyav", "decord"])
def test_display_rotation_is_applied(videos, name):
    if name == "decord":
        pytest.importorskip("decord")
    upright = raw_frames(name, videos["h264.mp4"], [0, 30])
    rotated = raw_frames(name, videos["rot90.mp4"], [0, 30])
    assert rotated.shape == (2, 320, 240, 3)  # displayed portrait
    # -display_rotation 90 means "turn 90 degrees counter-clockwise to display" (ffmpeg's convention)
    assert np.array_equal(rotated, np.rot90(upright, k=1, axes=(1, 2)))


def test_vfr_numbers_frames_not_seconds(videos):
    """VFR (2 s at 30 fps, then 2 s at 10 fps): positions are frame numbers at the container's average rate,
    as the official loader does; mp4 reports about frames / duration (~21), Matroska its default duration (30)."""
    mp4 = decode_video(videos["vfr.mp4"], SMALL, decoder="pyav")
    assert mp4.n_frames == 80 and 19.0 < mp4.fps < 22.0
    assert mp4.indices.tolist() == official_positions(80, mp4.fps, T) == [0, 21, 42, 63]
    mkv = decode_video(videos["vfr.mkv"], SMALL, decoder="pyav")
    assert mkv.n_frames == 80 and mkv.fps == 30.0 and mkv.indices.tolist() == [0, 30, 60]


def test_one_frame_clip(videos):
    video = decode_video(videos["one.mp4"], SMALL)
    assert video.indices.tolist() == [0] and video.mask.tolist() == [1] + [0] * (T - 1)
    assert video.frames[0].any() and not video.frames[1:].any()


def test_non_utf8_name_falls_back_to_pyav(videos, decord_ok):
    path = os.fsencode(videos["non_utf8"])
    video = decode_video(path, SMALL)
    assert video.decoder_used == "pyav"
    assert any("UTF-8" in w for w in video.warnings)
    assert_same_video(video, decode_video(videos["h264.mp4"], SMALL, decoder="pyav"))
    with pytest.raises(VideoDecodeError, match=r"clip-\\xe9\\xff\.mp4.*UTF-8"):
        decode_video(path, SMALL, decoder="decord")


@pytest.mark.parametrize(("name", "error", "match"), [
    ("empty.mp4", VideoDecodeError, "empty"),
    ("truncated.mp4", VideoDecodeError, r"cannot decode it \(PyAV cannot open it: Invalid data"),
    ("text.mp4", NotAVideoError, "not a video: a text file"),
    ("audio.m4a", NoVideoStreamError, "no video stream"),
])
def test_bad_files_give_a_clear_error(videos, name, error, match):
    with pytest.raises(error, match=match) as info:
        decode_video(videos[name], SMALL)
    assert info.value.path == videos[name] and str(videos[name]) in info.value.message
    assert info.value.exit_code == 3 and info.value.hint


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such file"):
        decode_video(tmp_path / "nope.mp4", SMALL)
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        decode_video(tmp_path, SMALL)


def test_cut_tail_decodes_what_is_there(videos, decord_ok):
    """moov first, mdat cut at 60%: decord fails reading packets; PyAV samples the frames that are there."""
    with pytest.raises(VideoDecodeError, match="cut_tail.mp4: cannot decode it .decord: "):
        decode_video(videos["cut_tail.mp4"], SMALL, decoder="decord")
    video = decode_video(videos["cut_tail.mp4"], SMALL)
    assert video.decoder_used == "pyav" and any("decord" in w for w in video.warnings)
    assert 0 < video.n_frames < 120 and video.indices.max() < video.n_frames
    assert video.mask.sum() == len(video.indices) and video.frames.shape == (T, 3, 32, 32)
    assert np.isfinite(video.frames).all()


def test_memory_budget_refuses_before_decoding(videos):
    with pytest.raises(VideoTooLargeError, match="320x240 video needs about .* over the 1 MiB limit"):
        decode_video(videos["h264.mp4"], PREP, memory_limit_mb=1)


def test_unsupported_contract_and_decoder():
    other = Preprocessing(max_frames=T, image_size=224, sampling="uniform-8")
    with pytest.raises(ConfigError, match="sampling"):
        decode_video("x.mp4", other)
    with pytest.raises(UsageError, match="decoder must be one of"):
        decode_video("x.mp4", SMALL, decoder="opencv")


# ---------------------------------------------------------------------------------------------------------------
# The worker pool


@pytest.fixture(scope="module")
def pool():
    pytest.importorskip("av")
    with VideoDecoder(SMALL, workers=2, timeout_s=2.0, memory_limit_mb=256) as dec:
        yield dec


def test_pool_decodes_in_order_and_reports_per_file(pool, videos):
    names = ["h264.mp4", "empty.mp4", "vp9.webm", "text.mp4", "audio.m4a", "one.mp4", "truncated.mp4"]
    results = list(pool.decode_many([videos[n] for n in names]))
    assert [p for p, _ in results] == [videos[n] for n in names]
    kinds = [type(r).__name__ for _, r in results]
    assert kinds == ["DecodedVideo", "VideoDecodeError", "DecodedVideo", "NotAVideoError", "NoVideoStreamError",
                     "DecodedVideo", "VideoDecodeError"]
    assert_same_video(results[0][1], decode_video(videos["h264.mp4"], SMALL))
    assert pool.decode(os.fsencode(videos["non_utf8"])).decoder_used == "pyav"


def test_pool_kills_a_hung_worker_and_goes_on(pool, videos):
    pids = set(pool.worker_pids)
    start = time.monotonic()
    with pytest.raises(DecodeTimeoutError, match="no result within") as info:
        pool.decode(videos["h264.mp4"], decoder="fault-hang")
    assert time.monotonic() - start < 10
    assert info.value.path == videos["h264.mp4"]
    assert set(pool.worker_pids) != pids  # replaced
    assert pool.decode(videos["vp9.webm"]).mask.sum() == 3


def test_pool_survives_a_crashing_worker(pool, videos):
    results = list(pool.decode_many([videos["one.mp4"], videos["h264.mp4"]], decoder="fault-crash"))
    assert len(results) == 2
    assert all(isinstance(r, DecoderCrashedError) and "exit code 139" in r.message for _, r in results)
    assert pool.decode(videos["one.mp4"]).mask.sum() == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the memory watchdog reads /proc (Linux)")
def test_pool_kills_a_worker_over_its_memory_limit(pool, videos):
    with pytest.raises(VideoTooLargeError, match="over the 256 MiB memory limit"):
        pool.decode(videos["h264.mp4"], decoder="fault-memory")
    assert pool.decode(videos["one.mp4"]).mask.sum() == 1


def test_pool_stops_cleanly_when_the_caller_stops_early(pool, videos):
    it = pool.decode_many([videos["h264.mp4"]] * 6)
    path, first = next(it)
    assert isinstance(first, DecodedVideo)
    it.close()
    assert len(pool._workers) == 2
    assert all(w.task is None for w in pool._workers)
    assert len(list(pool.decode_many([videos["vp9.webm"]] * 3))) == 3
