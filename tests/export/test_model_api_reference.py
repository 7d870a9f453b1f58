"""hbi_runtime.model against its PyTorch reference: the tiny model exported once per module, loaded by the runtime.

Needs torch and hbi_export (to build the package and the reference). The rest of the Python API is tested without
torch, on the shipped demo package, in tests/runtime/test_model_api.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hbi_export.checkpoints import build_model
from hbi_export.checkpoints.convert import init_random
from hbi_export.onnx.package import export_package
from hbi_runtime.model import TextSide, VideoSide, load

pytestmark = pytest.mark.slow  # one export of the tiny model (~20 s on 2 cores)

MAX_WORDS, MAX_FRAMES = 12, 8
TEXTS = ["a dog runs", "a cat"]
ATOL = 1e-4  # ONNX Runtime vs PyTorch, fp32 (docs/architecture.md tolerance table)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    init_random(root / "m", "tiny")
    manifest, parity = export_package(root / "m", root / "pkg", max_words=MAX_WORDS, max_frames=MAX_FRAMES)
    assert manifest.status == "verified" and parity.ok
    return {"root": root, "checkpoint": root / "m", "pkg": root / "pkg"}


@pytest.fixture(scope="module")
def reference(built):
    model, _ = build_model(built["checkpoint"])
    return model


@pytest.fixture(scope="module")
def model(built):
    with load(built["pkg"]) as m:
        yield m


@pytest.fixture(scope="module")
def videos() -> tuple[np.ndarray, np.ndarray]:
    """Three preprocessed-looking videos: 8, 5 and 1 valid frames, zero frames at padding."""
    rng = np.random.default_rng(7)
    frames = rng.standard_normal((3, MAX_FRAMES, 3, 32, 32)).astype(np.float32)
    mask = np.zeros((3, MAX_FRAMES), dtype=np.int64)
    for i, n in enumerate((8, 5, 1)):
        mask[i, :n] = 1
        frames[i, n:] = 0
    return frames, mask


def assert_side_close(side, ref, atol: float) -> None:
    for level, (got, want) in enumerate(zip(side.levels, ref.levels)):
        for part in ("tokens", "weights", "mask"):
            np.testing.assert_allclose(getattr(got, part).astype(np.float32), getattr(want, part).numpy(),
                                       rtol=0, atol=atol, err_msg=f"level {level} {part}")


def test_encode_text_matches_pytorch(model, reference):
    side = model.encode_text(TEXTS)
    assert isinstance(side, TextSide) and side.kind == "text" and side.n == 2 and side.truncated == (False, False)
    assert [lv.tokens.shape for lv in side.levels] == [(2, 12, 64), (2, 3, 64), (2, 2, 64)]
    ids, mask, _ = model.tokenizer(TEXTS)
    with torch.no_grad():
        ref = reference.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert_side_close(side, ref, ATOL)


def test_encode_frames_and_scores_match_pytorch(model, reference, videos):
    frames, mask = videos
    text, video = model.encode_text(TEXTS), model.encode_frames(frames, mask)
    assert isinstance(video, VideoSide) and video.kind == "video" and video.n == 3
    ids, text_mask, _ = model.tokenizer(TEXTS)
    with torch.no_grad():
        ref_text = reference.encode_text(torch.from_numpy(ids), torch.from_numpy(text_mask))
        ref_video = reference.encode_video(torch.from_numpy(frames), torch.from_numpy(mask))
        ref_levels = reference.score_levels(ref_text, ref_video).numpy()
        ref_scores = reference.score(ref_text, ref_video).numpy()
    assert_side_close(video, ref_video, ATOL)
    np.testing.assert_allclose(model.score(text, video), ref_scores, rtol=0, atol=ATOL)
    np.testing.assert_allclose(model.score_levels(text, video), ref_levels, rtol=0, atol=ATOL)
