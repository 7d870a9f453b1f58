"""hbi_runtime.video: only self-contained video containers are decoded, by every decoder and every entry point.

FFmpeg follows references inside some "video" files: an HLS playlist or an ffconcat list names other files (any
absolute path, outside the indexed folder), an SDP description opens network sockets, the tty demuxer renders a
text file as frames, and image demuxers turn a PNG into a 0.04 s video. Each hostile file is generated here
(the ffmpeg binary of imageio-ffmpeg) and must give a per-file :class:`VideoDecodeError` with a clear reason, from
decord, PyAV, ``auto``, the worker pool and the index's window tasks; ordinary containers must still decode.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hbi_runtime.package import Preprocessing
from hbi_runtime.video import DecodedVideo, VideoDecodeError, VideoDecoder, decode_video

T = 4
SMALL = Preprocessing(max_frames=T, image_size=32)
SECRET_FRAMES = 60  # the file outside the folder: 6 s at 10 fps; the folder's own clips have 20 frames


def _ffmpeg(*args: str) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


LAVFI = ("-f", "lavfi", "-i")


def _hls(segment: Path) -> bytes:
    return (b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:6\n#EXTINF:6.0,\n" + os.fsencode(segment)
            + b"\n#EXT-X-ENDLIST\n")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A folder of ordinary clips and hostile files, and a secret video outside it."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("containers")
    outside, folder = root / "outside", root / "videos"
    outside.mkdir()
    folder.mkdir()
    secret = outside / "secret.ts"
    _ffmpeg(*LAVFI, "testsrc2=size=96x64:rate=10", "-t", "6", "-c:v", "libx264", "-g", "10", "-pix_fmt", "yuv420p",
            "-f", "mpegts", str(secret))
    m = {"secret.ts": secret}
    src = ("testsrc=size=96x64:rate=10", "-t", "2")
    for name, codec in (("clip.mp4", ("-c:v", "libx264", "-pix_fmt", "yuv420p")),
                        ("clip.mkv", ("-c:v", "libx264", "-pix_fmt", "yuv420p")),
                        ("clip.webm", ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-b:v", "200k")),
                        ("clip.avi", ("-c:v", "mpeg4", "-q:v", "3")),
                        ("clip.mov", ("-c:v", "libx264", "-pix_fmt", "yuv420p")),
                        ("clip.ts", ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "10", "-bf", "0")),
                        ("clip.flv", ("-c:v", "flv", "-q:v", "3")),
                        ("clip.wmv", ("-c:v", "wmv2", "-q:v", "3")),
                        ("clip.ogv", ("-c:v", "libtheora", "-q:v", "7")),
                        ("clip.mpg", ("-c:v", "mpeg2video", "-q:v", "3", "-f", "mpeg"))):
        m[name] = folder / name
        _ffmpeg(*LAVFI, *src, *codec, str(m[name]))
    # An HLS playlist named like a video, pointing at the secret file by its absolute path; the same with the
    # playlist's own extension (FFmpeg then detects it as HLS for sure).
    for name in ("innocent.mp4", "playlist.m3u8"):
        m[name] = folder / name
        m[name].write_bytes(_hls(secret))
    # A playlist header in front of a real MPEG-TS: PyAV's FFmpeg (HLS only under an .m3u8 name) reads the TS, the
    # older FFmpeg inside decord reads the playlist and decodes the secret file.
    m["poly.mp4"] = folder / "poly.mp4"
    m["poly.mp4"].write_bytes(_hls(secret) + m["clip.ts"].read_bytes())
    m["concat.mp4"] = folder / "concat.mp4"  # an ffconcat list decoding a sibling
    m["concat.mp4"].write_text("ffconcat version 1.0\nfile clip.mp4\n")
    m["sdp.mp4"] = folder / "sdp.mp4"  # an SDP description: FFmpeg would open RTP sockets
    m["sdp.mp4"].write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                            "m=video 5004 RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    text = "HBI test notes\n" + "a line of plain text, not a video\n" * 40
    for name in ("notes.txt", "notes.nfo", "notes.ans"):
        m[name] = folder / name
        m[name].write_text(text)
    m["art.ans"] = folder / "art.ans"  # ANSI art: escape codes and CP437 block characters
    m["art.ans"].write_bytes(b"\x1b[1;31m\xdb\xdb\xdb RED \x1b[0m\xb0\xb1\xb2\r\n" * 30)
    for fmt in ("png", "jpg", "gif"):
        image = root / f"image.{fmt}"
        _ffmpeg(*LAVFI, "testsrc2=size=96x64", "-frames:v", "1", str(image))
        m[f"{fmt}.mp4"] = folder / f"{fmt}.mp4"
        m[f"{fmt}.mp4"].write_bytes(image.read_bytes())
    m["cover.m4a"] = folder / "cover.m4a"  # audio with cover art: a "video" stream that is one still picture
    _ffmpeg(*LAVFI, "sine=duration=1", "-i", str(root / "image.png"), "-map", "0", "-map", "1", "-c:a", "aac",
            "-c:v", "png", "-disposition:v", "attached_pic", str(m["cover.m4a"]))
    return m


@pytest.fixture(scope="module")
def decord_ok():
    return pytest.importorskip("decord")


DECODERS = ["auto", "decord", "pyav"]

# file -> (error class name, what the reason must say)
HOSTILE = {
    "innocent.mp4": ("NotAVideoError", "HLS playlist"),
    "playlist.m3u8": ("NotAVideoError", "HLS playlist"),
    "poly.mp4": ("NotAVideoError", "HLS playlist"),
    "concat.mp4": ("NotAVideoError", "ffconcat list"),
    "sdp.mp4": ("NotAVideoError", "SDP session description"),
    "notes.txt": ("NotAVideoError", "text file"),
    "notes.nfo": ("NotAVideoError", "text file"),
    "notes.ans": ("NotAVideoError", "text file"),
    "art.ans": ("NotAVideoError", "not a video"),
    "png.mp4": ("NotAVideoError", "still image .PNG."),
    "jpg.mp4": ("NotAVideoError", "still image .JPEG."),
    "gif.mp4": ("NotAVideoError", "GIF image"),
    "cover.m4a": ("NoVideoStreamError", "no video stream.*cover"),
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_a_per_file_error(media, decord_ok, name, decoder):
    cls_name, reason = HOSTILE[name]
    with pytest.raises(VideoDecodeError, match=reason) as info:
        decode_video(media[name], SMALL, decoder=decoder)
    err = info.value
    assert type(err).__name__ == cls_name
    assert err.path == media[name] and str(media[name]) in err.message
    assert err.exit_code == 3 and err.hint


def test_no_decoder_reads_the_file_outside_the_folder(media, decord_ok):
    """The playlist's target decodes on its own (60 frames); through the playlist, nothing is decoded at all."""
    assert decode_video(media["secret.ts"], SMALL, decoder="decord").n_frames == SECRET_FRAMES
    for name in ("innocent.mp4", "poly.mp4"):
        for decoder in DECODERS:
            with pytest.raises(VideoDecodeError, match="HLS playlist.*never read"):
                decode_video(media[name], SMALL, decoder=decoder)


# decord 0.6 cannot count the frames of Ogg (it refuses it, as before): PyAV decodes it
CONTROLS = [(name, decoder) for name in ("clip.mp4", "clip.mkv", "clip.webm", "clip.avi", "clip.mov", "clip.ts",
                                         "clip.flv", "clip.wmv", "clip.ogv", "clip.mpg")
            for decoder in ("decord", "pyav") if (name, decoder) != ("clip.ogv", "decord")]


@pytest.mark.parametrize(("name", "decoder"), CONTROLS)
def test_self_contained_containers_still_decode(media, decord_ok, name, decoder):
    video = decode_video(media[name], SMALL, decoder=decoder)
    assert video.decoder_used == decoder
    assert video.n_frames == 20 and video.indices.tolist() == [0, 10]
    assert video.mask.tolist() == [1, 1, 0, 0] and np.isfinite(video.frames).all() and video.frames[:2].any()


def test_the_container_probe_names_the_format(media):
    from hbi_runtime.video.container import ALLOWED_FORMATS, check_container

    for name, fmt in (("clip.mp4", "mov"), ("clip.mkv", "matroska"), ("clip.webm", "matroska"), ("clip.avi", "avi"),
                      ("clip.ts", "mpegts"), ("clip.flv", "flv"), ("clip.wmv", "asf"), ("clip.ogv", "ogg"),
                      ("clip.mpg", "mpeg")):
        info = check_container(media[name])
        assert fmt in info.format_name.split(",") and fmt in ALLOWED_FORMATS, name
        assert (info.width, info.height) == (96, 64)


@pytest.mark.parametrize("by_descriptor", [True, False])
def test_names_are_never_urls(media, decord_ok, monkeypatch, by_descriptor):
    """A relative name FFmpeg would read as a protocol (``concat:``, ``data:``): the file of that name is opened,
    never what the protocol would read; by ``/proc/self/fd`` (Linux) and by ``file:`` + the name (elsewhere)."""
    if not by_descriptor:
        from hbi_runtime.video import container

        monkeypatch.setattr(container, "PROC_FD", False)
    monkeypatch.chdir(media["clip.mp4"].parent)
    junk = Path("concat:clip.mp4")  # FFmpeg's concat protocol would decode clip.mp4
    junk.write_text("not a video, whatever its name says\n" * 10)
    legit = Path("data:clip.mp4")  # a real video whose name FFmpeg would parse as a data: URI
    legit.write_bytes(media["clip.mp4"].read_bytes())
    try:
        for decoder in DECODERS:
            with pytest.raises(VideoDecodeError, match="text file"):
                decode_video(str(junk), SMALL, decoder=decoder)
            assert decode_video(str(legit), SMALL, decoder=decoder).n_frames == 20
    finally:
        junk.unlink()
        legit.unlink()


def test_pool_and_window_tasks_report_per_file_errors(media, decord_ok):
    """The worker pool (index, caption, qa, retrieve --video) and the index's window tasks: one error per file,
    the other files decode."""
    from hbi_runtime.index.windows import Probe, WindowDecoder, WindowTask

    names = ["clip.mp4", "innocent.mp4", "concat.mp4", "notes.nfo", "png.mp4", "poly.mp4", "clip.webm"]
    paths = [media[n] for n in names]
    with VideoDecoder(SMALL, workers=2, timeout_s=30.0) as pool:
        results = list(pool.decode_many(paths))
    assert len(results) == len(names)
    assert [type(r).__name__ for _, r in results] == ["DecodedVideo", "NotAVideoError", "NotAVideoError",
                                                      "NotAVideoError", "NotAVideoError", "NotAVideoError",
                                                      "DecodedVideo"]
    assert isinstance(results[0][1], DecodedVideo) and results[0][1].n_frames == 20
    assert "HLS playlist" in results[1][1].reason and "ffconcat" in results[2][1].reason
    with WindowDecoder(SMALL, workers=2, timeout_s=30.0) as pool:
        probes = list(pool.decode_many(WindowTask(os.fsencode(p), 1.0, 1.0) for p in paths))
    assert len(probes) == len(names)
    assert isinstance(probes[0][1], Probe) and isinstance(probes[-1][1], Probe)
    kinds = [type(r).__name__ for _, r in probes[1:-1]]
    assert kinds == ["NotAVideoError"] * 5
    assert "HLS playlist" in probes[1][1].reason


def test_errors_survive_the_trip_from_a_worker(media):
    import pickle

    with pytest.raises(VideoDecodeError) as info:
        decode_video(media["innocent.mp4"], SMALL, decoder="pyav")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is type(info.value) and type(back).__name__ == "NotAVideoError"
    assert back.reason == info.value.reason and "HLS playlist" in back.reason and back.hint == info.value.hint


def test_ffmpeg_refuses_what_is_not_on_the_allow_list(media):
    """FFmpeg's own ``format_whitelist`` refuses these after probing and before reading a header (EINVAL), without
    the leading-bytes check; a playlist header in front of MPEG-TS is the one that needs that check."""
    import av

    from hbi_runtime.video.container import CONTAINER_OPTIONS

    refused = ["playlist.m3u8", "concat.mp4", "sdp.mp4", "notes.txt", "notes.nfo", "notes.ans", "art.ans", "png.mp4",
               "jpg.mp4", "gif.mp4"]
    for name in refused:
        with pytest.raises(av.FFmpegError) as info:
            av.open(str(media[name]), container_options=dict(CONTAINER_OPTIONS))
        assert info.value.errno == 22, name
    with av.open(str(media["notes.ans"])) as c:  # without the allow-list: text rendered as video frames
        assert c.format.name == "tty" and c.streams.video
    with av.open(str(media["png.mp4"])) as c:
        assert c.format.name == "png_pipe" and c.streams.video
    with av.open(str(media["poly.mp4"]), container_options=dict(CONTAINER_OPTIONS)) as c:
        assert c.format.name == "mpegts"


def test_other_formats_are_refused_with_the_allowed_list(media, tmp_path):
    wav = tmp_path / "tone.mp4"
    _ffmpeg(*LAVFI, "sine=duration=1", "-c:a", "pcm_s16le", "-f", "wav", str(wav))
    for decoder in DECODERS:
        with pytest.raises(VideoDecodeError, match="not a video container this runtime decodes.*MP4") as info:
            decode_video(wav, SMALL, decoder=decoder)
        assert type(info.value).__name__ == "NotAVideoError"


def test_an_unreadable_file_is_a_transient_per_file_error(media, decord_ok, tmp_path, monkeypatch):
    """Permissions (or an I/O error) may pass by themselves: the error says so (an index retries such files every
    run), and keeps saying so after the trip from a worker. Tests may run as root, so the refusal is simulated."""
    import errno
    import pickle

    locked = tmp_path / "locked.mp4"
    locked.write_bytes(media["clip.mp4"].read_bytes())
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.fsencode(path) == os.fsencode(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    for decoder in DECODERS:
        with pytest.raises(VideoDecodeError, match="locked.mp4: cannot read it: Permission denied") as info:
            decode_video(locked, SMALL, decoder=decoder)
        assert info.value.transient is True
        assert pickle.loads(pickle.dumps(info.value)).transient is True
    with pytest.raises(VideoDecodeError) as info:
        decode_video(media["concat.mp4"], SMALL)
    assert info.value.transient is None  # a file that is not a video stays so
