"""hbi_runtime.model on a real package: the shipped demo package (hbi_runtime/data/demo/package), without torch.

Needs onnxruntime and onnxruntime-extensions (the kernel-path test; deliberately not skipped when they are missing:
the test environment has them) and PyAV (the video-file tests). Shapes come from the package's manifest. The
comparison with the PyTorch reference, on a freshly exported tiny model, is tests/export/test_model_api_reference.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hbi_runtime import model as model_module
from hbi_runtime import sides
from hbi_runtime.errors import BadInputError, GateFailedError, UsageError
from hbi_runtime.model import Model, TextSide, VideoSide, load, side_tensor_names
from hbi_runtime.package import update_status

DEMO_PACKAGE = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo" / "package"
TEXTS = ["a dog runs", "a cat"]
SAME = 1e-5  # two runtime paths of the same computation


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    """The package (read only: tests that change one work on a copy)."""
    return {"pkg": DEMO_PACKAGE}


@pytest.fixture(scope="module")
def model(built):
    with load(built["pkg"]) as m:
        yield m


@pytest.fixture(scope="module")
def dims(model) -> dict:
    """The package's sizes: frames per video T, frame size, embedding width D, tokens per level per side."""
    m = model.manifest
    assert m.max_frames >= 8  # the videos below have up to 8 valid frames
    return {"T": m.max_frames, "size": m.preprocessing.image_size, "D": m.embed_dim,
            "text": m.tokens_per_level["text"], "video": m.tokens_per_level["video"]}


@pytest.fixture(scope="module")
def videos(dims) -> tuple[np.ndarray, np.ndarray]:
    """Three preprocessed-looking videos: 8, 5 and 1 valid frames, zero frames at padding."""
    rng = np.random.default_rng(7)
    frames = rng.standard_normal((3, dims["T"], 3, dims["size"], dims["size"])).astype(np.float32)
    mask = np.zeros((3, dims["T"]), dtype=np.int64)
    for i, n in enumerate((8, 5, 1)):
        mask[i, :n] = 1
        frames[i, n:] = 0
    return frames, mask


def assert_sides_equal(a, b, atol: float = 0.0) -> None:
    for got, want in zip(a.levels, b.levels):
        for part in ("tokens", "weights", "mask"):
            np.testing.assert_allclose(getattr(got, part), getattr(want, part), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# Scores (against the PyTorch reference: tests/export/test_model_api_reference.py)
# ---------------------------------------------------------------------------------------------------------------

def test_graph_scores_equal_numpy_scores(model, videos):
    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    weights = model.manifest.level_weights
    np.testing.assert_allclose(model.score(text, video), sides.score(text, video, weights), rtol=0, atol=SAME)
    levels = model.score_levels(text, video)
    assert levels.shape == (3, 2, 3) and levels.dtype == np.float32
    for i, (t, v) in enumerate(zip(text.levels, video.levels)):
        np.testing.assert_allclose(levels[i], sides.score_level(t, v), rtol=0, atol=SAME)


def test_level_weights_override(model, videos):
    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    weights = (0.2, 0.3, 0.5)
    got = model.score(text, video, level_weights=weights)
    np.testing.assert_allclose(got, np.tensordot(np.float32(weights), model.score_levels(text, video), axes=1),
                               rtol=0, atol=SAME)
    np.testing.assert_allclose(got, sides.score(text, video, weights), rtol=0, atol=SAME)
    assert not np.allclose(got, model.score(text, video), atol=1e-4)  # the default is entity only


@pytest.mark.parametrize("weights", [(1.0, 0.0), (1.0, float("nan"), 0.0), ("a", "b", "c"), (0, 0, 0),
                                     (1.0, float("inf"), 0.0)])
def test_bad_level_weights(model, videos, weights):
    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    with pytest.raises(UsageError, match=r"^level_weights must be 3 finite numbers \(entity, action, event\), not "
                                         r"all zero; got "):
        model.score(text, video, level_weights=weights)


def test_stored_fp16_video_side_scores_like_fp32(model, videos):
    """An index stores fp16 tokens: the interaction graph's float32 inputs take them (upcast)."""
    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    half = VideoSide(tuple(sides.SideLevel(lv.tokens.astype(np.float16), lv.weights.astype(np.float16), lv.mask)
                           for lv in video.levels))
    np.testing.assert_allclose(model.score(text, half), sides.score(text, half, model.manifest.level_weights),
                               rtol=0, atol=SAME)


# ---------------------------------------------------------------------------------------------------------------
# Custom-op paths
# ---------------------------------------------------------------------------------------------------------------

def test_kernel_path_equals_function_path(built, model, videos):
    import onnxruntime_extensions  # noqa: F401  - the test environment has it; fail loudly, never skip

    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    with load(built["pkg"], custom_ops="kernel") as kernel_model:
        k_text, k_video = kernel_model.encode_text(TEXTS), kernel_model.encode_frames(*videos)
        weights = (0.2, 0.3, 0.5)
        k_scores = kernel_model.score_levels(k_text, k_video), kernel_model.score(k_text, k_video, weights)
        assert {n: b.custom_op_path for n, b in kernel_model.backends.items()} == dict.fromkeys(
            ("text_encoder", "video_encoder", "interaction"), "kernel")
    assert {n: b.custom_op_path for n, b in model.backends.items()} == dict.fromkeys(
        ("text_encoder", "video_encoder", "interaction"), "function")
    assert_sides_equal(k_text, text, SAME)
    assert_sides_equal(k_video, video, SAME)
    np.testing.assert_allclose(k_scores[0], model.score_levels(text, video), rtol=0, atol=SAME)
    np.testing.assert_allclose(k_scores[1], model.score(text, video, weights), rtol=0, atol=SAME)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------

def test_text_batches_do_not_change_sides(model):
    texts = TEXTS + ["a man is cooking pasta in a small kitchen", "two kids play football", "rain"]
    one, many = model.encode_text(texts, batch_size=1), model.encode_text(texts, batch_size=64)
    assert_sides_equal(one, many, 1e-6)
    assert_sides_equal(model.encode_text(texts, batch_size=2), many, 1e-6)


def test_video_batches_do_not_change_sides(model, videos):
    one, many = model.encode_frames(*videos, batch_size=1), model.encode_frames(*videos)
    assert_sides_equal(one, many, 1e-6)


def test_interaction_chunks_do_not_change_scores(model, videos, dims, monkeypatch):
    text = model.encode_text(TEXTS + ["a bird sings"])
    video = model.encode_frames(*videos)
    whole = model.score_levels(text, video), model.score(text, video, (0.2, 0.3, 0.5))
    pair_bytes = dims["text"][0] * dims["video"][0] * 4  # the entity level's similarity block of one pair
    backend = model.backends["interaction"]
    calls = []
    monkeypatch.setattr(backend, "_infer", lambda feed, run=backend._infer: calls.append(feed) or run(feed))
    for pairs, n_calls in ((1, 9), (2, 6), (6, 2)):  # (texts, videos) per call: (1, 1), (2, 1), (3, 2)
        monkeypatch.setattr(model_module, "INTERACTION_CHUNK_BYTES", pairs * pair_bytes)
        calls.clear()
        np.testing.assert_allclose(model.score_levels(text, video), whole[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(model.score(text, video, (0.2, 0.3, 0.5)), whole[1], rtol=0, atol=1e-6)
        assert len(calls) == 2 * n_calls


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "8"])
def test_bad_batch_size(model, videos, batch_size):
    with pytest.raises(UsageError, match="batch_size must be a positive integer"):
        model.encode_text(TEXTS, batch_size=batch_size)
    with pytest.raises(UsageError, match="batch_size must be a positive integer"):
        model.encode_frames(*videos, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Texts, sides and inputs
# ---------------------------------------------------------------------------------------------------------------

def test_tokenizer_comes_from_the_package(model, built):
    assert model.tokenizer.max_words == model.manifest.max_words
    assert model.tokenizer.vocab_path == built["pkg"] / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"


def test_truncation_is_reported_per_text(model):
    side = model.encode_text(["a cat", " ".join(["word"] * model.manifest.max_words)])  # + start and end tokens
    assert side.truncated == (False, True)


def test_empty_text_list_gives_an_empty_side(model, videos, dims):
    side = model.encode_text([])
    assert side.n == 0 and side.truncated == ()
    assert [lv.tokens.shape for lv in side.levels] == [(0, n, dims["D"]) for n in dims["text"]]
    assert model.score(side, model.encode_frames(*videos)).shape == (0, 3)


def test_text_errors(model):
    with pytest.raises(UsageError, match="texts must be a list of strings"):
        model.encode_text("a dog")
    with pytest.raises(BadInputError, match="text 1 is empty"):
        model.encode_text(["a dog", "   "])


def test_frame_errors(model, videos, dims):
    frames, mask = videos
    t, size = dims["T"], dims["size"]
    with pytest.raises(BadInputError) as exc:
        model.encode_frames(frames[:, :4], mask)
    assert str(exc.value) == (f"Input tensor: frames | Received incompatible shape: (3, 4, 3, {size}, {size}). Note: "
                              f"Expected a shape compatible with: (video_batch, {t}, 3, {size}, {size})")
    with pytest.raises(BadInputError, match=rf"^Input tensor: frame_mask \| Received incompatible shape: \(2, {t}\)\. "
                                            rf"Note: Expected a shape compatible with: \(video_batch, {t}\), where "
                                            r"video_batch = 3 \(from input frames\)$"):
        model.encode_frames(frames, mask[:2], batch_size=1)  # checked whole, before any batch runs
    with pytest.raises(BadInputError, match="Received unexpected dtype: float64. Note: Expected type: float32"):
        model.encode_frames(frames.astype(np.float64), mask)
    with pytest.raises(BadInputError, match=r"^Input tensor: frame_mask \| Received values other than 0 and 1"):
        model.encode_frames(frames, mask * 2)


def test_score_needs_a_text_and_a_video_side(model, videos, dims):
    text, video = model.encode_text(TEXTS), model.encode_frames(*videos)
    with pytest.raises(UsageError, match="must be a text Side and a video Side, in order"):
        model.score(video, text)
    short = VideoSide(tuple(sides.SideLevel(lv.tokens[:, :1], lv.weights[:, :1], lv.mask[:, :1])
                            for lv in video.levels))
    with pytest.raises(BadInputError, match=rf"^Input tensor: video_tokens_l0 \| Received incompatible shape: "
                                            rf"\(3, 1, {dims['D']}\)\. Note: Expected a shape compatible with: "
                                            rf"\(video_batch, {dims['video'][0]}, {dims['D']}\)$"):
        model.score(text, short)


def test_text_side_checks_its_flags(model):
    levels = model.encode_text(TEXTS).levels
    assert TextSide(levels).truncated == (False, False)
    with pytest.raises(BadInputError, match=r"^TextSide\.truncated \| Received 1 flags\. Note: Expected one per "
                                            r"text \(2\)$"):
        TextSide(levels, truncated=(True,))
    with pytest.raises(BadInputError, match="TextSide.kind"):
        TextSide(levels, kind="video")


def test_side_tensor_names_are_the_graph_layout(model):
    assert side_tensor_names("text")[:3] == ("text_tokens_l0", "text_weights_l0", "text_mask_l0")
    assert tuple(t.name for t in model.manifest.graphs["video_encoder"].outputs) == side_tensor_names("video")


# ---------------------------------------------------------------------------------------------------------------
# Video files
# ---------------------------------------------------------------------------------------------------------------

def write_video(path: Path, n_frames: int, fps: int = 4, seed: int = 0) -> Path:
    """A small MPEG-4 clip of smooth random colour fields (PyAV; no ffmpeg binary needed)."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(n_frames):
            coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
            image = np.kron(coarse, np.ones((16, 16, 1), np.uint8))[:48]  # (48, 64, 3)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def video_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    broken = root / "broken.mp4"
    broken.write_bytes(b"this is not a video file")
    return {"short": write_video(root / "short.mp4", 12, seed=1),  # 3 s at 4 fps: 3 frames + 5 padding
            "long": write_video(root / "long.mp4", 60, seed=2),  # 15 s: 15 positions, uniform down to 8
            "broken": broken}


def test_encode_videos_equals_encoding_the_decoded_frames(model, video_files, dims):
    from hbi_runtime.video import VideoDecodeError, decode_video

    files = [video_files["short"], video_files["broken"], video_files["long"]]
    side, paths, errors = model.encode_videos(files, batch_size=1, workers=1)
    assert paths == [video_files["short"], video_files["long"]]
    assert len(errors) == 1 and isinstance(errors[0], VideoDecodeError) and errors[0].path == video_files["broken"]
    decoded = [decode_video(p, model.manifest.preprocessing) for p in paths]
    assert [int(d.mask.sum()) for d in decoded] == [3, dims["T"]]
    want = model.encode_frames(np.stack([d.frames for d in decoded]), np.stack([d.mask for d in decoded]))
    assert isinstance(side, VideoSide) and side.n == 2
    assert_sides_equal(side, want, 1e-6)


def test_encode_videos_with_a_shared_decoder(model, video_files, dims):
    from hbi_runtime.video import VideoDecoder

    with VideoDecoder(model.manifest.preprocessing, workers=1) as decoder:
        first = model.encode_videos([video_files["long"], video_files["short"]], video_decoder=decoder)
        none = model.encode_videos([video_files["broken"]], video_decoder=decoder)
        assert decoder.worker_pids  # still open: the caller owns it
    assert first.paths == [video_files["long"], video_files["short"]] and first.errors == []
    assert none.side.n == 0 and none.paths == [] and len(none.errors) == 1
    assert [lv.tokens.shape for lv in none.side.levels] == [(0, n, dims["D"]) for n in dims["video"]]


# ---------------------------------------------------------------------------------------------------------------
# Loading and lifetime
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["failed", "unverified"])
def test_refuses_a_package_that_is_not_verified(built, tmp_path, status):
    pkg = tmp_path / "pkg"
    shutil.copytree(built["pkg"], pkg)
    update_status(pkg, status, None)
    with pytest.raises(GateFailedError, match=f"status '{status}'"):
        load(pkg)
    with load(pkg, allow_unverified=True) as m:
        assert m.manifest.status == status
        assert m.encode_text(["a cat"]).n == 1


def test_graphs_load_on_first_use_and_close_with_the_model(built):
    with load(built["pkg"]) as m:
        assert isinstance(m, Model) and not any(b.is_active for b in m.backends.values())
        m.encode_text(TEXTS)
        assert [n for n, b in m.backends.items() if b.is_active] == ["text_encoder"]
        assert repr(m) == f"Model({str(built['pkg'])!r}, backend=onnxruntime, loaded=['text_encoder'])"
    assert not any(b.is_active for b in m.backends.values())
    m.close()  # idempotent


def test_backend_options_reach_every_graph(built):
    with load(built["pkg"], intra_op_threads=1, custom_ops="function") as m:
        assert {b.intra_op_threads for b in m.backends.values()} == {1}


def test_load_errors(built, tmp_path):
    with pytest.raises(UsageError,
                       match=r"unknown backend 'tensorrt'; known backends: \['onnxruntime', 'triton', 'trt'\]"):
        load(built["pkg"], backend="tensorrt")
    with pytest.raises(UsageError, match=r"backend 'onnxruntime' has no option\(s\) \['threads'\]"):
        load(built["pkg"], threads=2)
    with pytest.raises(UsageError, match="unknown providers 'gpu'"):
        load(built["pkg"], providers="gpu")
    with pytest.raises(BadInputError, match="does not exist"):
        load(tmp_path / "nowhere")
