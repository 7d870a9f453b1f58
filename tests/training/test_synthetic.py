"""hbi_training.data: the synthetic video-caption set (scenes, split, captions, H.264 files, decoding, dataset).

Tiny sets (a handful of 64x64, 8-second, 4-fps videos) are rendered into ``tmp_path`` with imageio-ffmpeg's
ffmpeg and read back through hbi_runtime.video; the split and grammar are checked on scenes alone (no video).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess

import numpy as np
import pytest

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.package import CLIP_MEAN, CLIP_STD, Preprocessing
from hbi_runtime.tokenizer import VOCAB_SIZE, ClipTokenizer
from hbi_training.data import captions as grammar
from hbi_training.data.cache import frame_cache
from hbi_training.data.render import encode_h264, ffmpeg_exe, render_frames
from hbi_training.data.scenes import (ACTIONS, COLOURS, MOVES, SHAPES, Event, Scene, SceneObject, object_state,
                                      plan_split, segments, words)
from hbi_training.data.synthetic import generate, main

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("PIL")  # the runtime's preprocessing

SEED = 3
N_TRAIN, N_TEST = 4, 2
T, S = 8, 32


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Paths of a 4 + 2 video set (seed SEED, defaults: 64x64, 4 fps, 8 s)."""
    return generate(tmp_path_factory.mktemp("synthetic") / "set", N_TRAIN, N_TEST, SEED)


def manifest_of(paths) -> dict:
    return json.loads(paths.manifest.read_text())


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """Normalised (T, 3, S, S) float32 -> (T, S, S, 3) float RGB in 0..255."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CLIP_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((frames * std + mean) * 255.0).transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_identical_captions_and_frames(tiny_set, tmp_path):
    again = generate(tmp_path / "again", N_TRAIN, N_TEST, SEED)
    first, second = manifest_of(tiny_set), manifest_of(again)
    assert [v["captions"] for v in first["videos"]] == [v["captions"] for v in second["videos"]]
    assert first["held_out"] == second["held_out"]
    for split in ("train", "test"):
        frames_a, mask_a = frame_cache(tiny_set.root, split, max_frames=T, image_size=S)
        frames_b, mask_b = frame_cache(again.root, split, max_frames=T, image_size=S)
        np.testing.assert_array_equal(frames_a, frames_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    other = generate(tmp_path / "other", N_TRAIN, N_TEST, SEED + 1)
    assert [v["captions"] for v in manifest_of(other)["videos"]] != [v["captions"] for v in first["videos"]]


def test_identical_set_is_reused_other_config_regenerated_foreign_folder_refused(tiny_set, tmp_path):
    assert generate(tiny_set.root, N_TRAIN, N_TEST, SEED).reused
    assert not generate(tmp_path / "ours", 1, 1, SEED, size=32).reused
    bigger = generate(tmp_path / "ours", 2, 1, SEED, size=32)
    assert not bigger.reused and len(manifest_of(bigger)["videos"]) == 3
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and was not made by this generator"):
        generate(tmp_path, 1, 1, SEED)


def test_test_gallery_does_not_depend_on_train_size():
    small, large = plan_split(10, 20, SEED), plan_split(200, 20, SEED)
    assert small.test == large.test and small.held_out == large.held_out


# ----------------------------------------------------------------------------------------------------------------
# The held-out split


def test_held_out_combinations_never_in_train_but_every_word_is():
    plan = plan_split(300, 100, SEED)
    train_triples = {t for s in plan.train for t in s.triples()}
    assert not train_triples & plan.held_out
    assert all(any(t in plan.held_out for t in s.triples()) for s in plan.test)
    # every single attribute, and every pair of attributes, still occurs in train
    assert {t[0] for t in train_triples} == set(COLOURS)
    assert {t[1] for t in train_triples} == set(SHAPES) and {t[2] for t in train_triples} == set(ACTIONS)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert {(t[i], t[j]) for t in plan.held_out} <= {(t[i], t[j]) for t in train_triples}
    train_words = words(grammar.canonical_caption(s) for s in plan.train)
    test_words = words(grammar.canonical_caption(s) for s in plan.test)
    assert test_words <= train_words
    test_captions = [grammar.canonical_caption(s) for s in plan.test]
    assert len(set(test_captions)) == len(test_captions)  # a gallery without two answers to one query
    assert not set(test_captions) & {grammar.canonical_caption(s) for s in plan.train}


def test_manifest_and_csvs_describe_the_split(tiny_set):
    manifest = manifest_of(tiny_set)
    assert manifest["config"]["seed"] == SEED
    held = {tuple(t) for t in manifest["held_out"]}
    by_split = {s: [v for v in manifest["videos"] if v["split"] == s] for s in ("train", "test")}
    assert [len(by_split["train"]), len(by_split["test"])] == [N_TRAIN, N_TEST]
    for split, videos in by_split.items():
        for video in videos:
            has_held = bool(set(Scene.from_dict(video["scene"]).triples()) & held)
            assert has_held == (split == "test")
            assert (tiny_set.root / video["file"]).is_file()
        with open(tiny_set.csv[split], newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows == [{"video": v["file"], "caption": c} for v in videos for c in v["captions"]]
    assert all(len(v["captions"]) == 1 for v in by_split["test"])
    assert all(len(v["captions"]) > 1 for v in by_split["train"])


def test_too_many_events_for_the_length_is_refused():
    with pytest.raises(UsageError, match="3 events need at least 6 s"):
        plan_split(2, 2, SEED, seconds=5, events=(2, 3))
    assert segments(3, 8) == [(0, 3), (3, 6), (6, 8)]


# ----------------------------------------------------------------------------------------------------------------
# Files and decoding


def test_files_are_h264_yuv420p(tiny_set):
    video = tiny_set.root / manifest_of(tiny_set)["videos"][0]["file"]
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(video)], capture_output=True, text=True)
    stream = re.search(r"Stream #0:0.*Video: (\w+).*?(yuv420p).*?(\d+)x(\d+).*?(\d+) fps", probe.stderr)
    assert stream is not None, probe.stderr
    assert stream.groups() == ("h264", "yuv420p", "64", "64", "4")
    av = pytest.importorskip("av")
    with av.open(str(video)) as container:
        s = container.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert sum(1 for _ in container.decode(s)) == 8 * 4


def test_decoded_frames_show_the_red_square_where_the_scene_puts_it(tmp_path):
    """A red square starts left of centre and moves right: first second left half, last second further right."""
    from hbi_runtime.video import decode_video

    scene = Scene(objects=(SceneObject("red", "square", 0.2, 0.5),), events=(Event(0, "right", 0, 4),), seconds=4)
    path = tmp_path / "one.mp4"
    encode_h264(render_frames(scene, 64, 4), path, fps=4)
    video = decode_video(path, Preprocessing(max_frames=4, image_size=S))
    assert video.mask.tolist() == [1, 1, 1, 1] and video.indices.tolist() == [0, 4, 8, 12]
    rgb = to_rgb(video.frames)  # (4, S, S, 3)
    row = S // 2

    def is_red(pixel):
        return pixel[0] > 180 and pixel[1] < 90 and pixel[2] < 90

    first, last = rgb[0], rgb[3]
    assert is_red(first[row, int(0.2 * S)]) and not is_red(first[row, int(0.5 * S)])
    assert first[:, S // 2 + 2:].max() < 60  # nothing but background in the right half
    assert is_red(last[row, int(0.5 * S)]) and not is_red(last[row, int(0.2 * S)])


def test_event_states_change_between_sampled_seconds():
    """Each event's before and after states fall on whole seconds, which the 1-fps sampling keeps."""
    scene = Scene(objects=(SceneObject("blue", "circle", 0.3, 0.3), SceneObject("green", "cross", 0.7, 0.7),
                           SceneObject("yellow", "triangle", 0.3, 0.7)),
                  events=(Event(0, "turn", 0, 2, colour_to="red"), Event(1, "appear", 2, 4),
                          Event(2, "disappear", 4, 6)), seconds=6)
    states = [[object_state(scene, i, t) for t in range(6)] for i in range(3)]
    assert [s.colour for s in states[0]] == ["blue"] + ["red"] * 5
    assert [s.visible for s in states[1]] == [False, False, False, True, True, True]
    assert [s.visible for s in states[2]] == [True, True, True, True, True, False]
    mover = Scene(objects=(SceneObject("red", "square", 0.5, 0.6),), events=(Event(0, "up", 0, 3),), seconds=3)
    ys = [object_state(mover, 0, t).y for t in range(3)]
    assert ys[0] == 0.6 and ys[-1] == pytest.approx(0.6 - 0.3) and ys[1] < ys[0]


def test_frame_cache_refuses_fewer_frames_than_seconds(tiny_set):
    with pytest.raises(UsageError, match="max_frames=4 is shorter than the 8-second videos"):
        frame_cache(tiny_set.root, "test", max_frames=4, image_size=S)


def test_reading_a_folder_without_manifest_names_it(tmp_path):
    with pytest.raises(BadInputError, match="manifest.json: no such file"):
        frame_cache(tmp_path, "train", max_frames=T, image_size=S)


# ----------------------------------------------------------------------------------------------------------------
# Captions and tokens


def test_every_caption_tokenises_within_max_words():
    plan = plan_split(150, 50, SEED)
    rng = np.random.default_rng(0)
    texts = [c for s in plan.train + plan.test for c in grammar.paraphrases(s, rng, 8)]
    # the longest variant: three clauses with "the", long directions / verbs, joined with "first ... finally"
    long_scene = Scene(objects=(SceneObject("yellow", "triangle", 0.2, 0.2), SceneObject("green", "square", 0.5, 0.5),
                                SceneObject("yellow", "circle", 0.8, 0.8)),
                       events=(Event(0, "right", 0, 2), Event(1, "turn", 2, 4, colour_to="yellow"),
                               Event(2, "left", 4, 6)), seconds=6)
    for how in grammar.JOINS:
        texts.append(grammar.join([grammar.clause(long_scene, e, "the", 2, True) for e in long_scene.events], how))
    ids, mask, truncated = ClipTokenizer(max_words=grammar.MAX_WORDS)(texts)
    assert not any(truncated)
    assert ids.max() < VOCAB_SIZE and mask.sum(axis=1).max() <= grammar.MAX_WORDS


def test_paraphrases_are_distinct_and_start_with_the_canonical_caption():
    scene = plan_split(1, 0, SEED).train[0]
    captions = grammar.paraphrases(scene, np.random.default_rng(1), 8)
    assert captions[0] == grammar.canonical_caption(scene) and len(set(captions)) == len(captions) == 8
    assert re.fullmatch(r"a \w+ \w+ [\w ]+(, then a \w+ \w+ [\w ]+)+", captions[0])


def test_moves_and_directions_use_the_grammar_words():
    scene = Scene(objects=(SceneObject("red", "square", 0.5, 0.5),), events=(Event(0, "left", 0, 2),), seconds=2)
    assert grammar.canonical_caption(scene) == "a red square moves left"
    assert grammar.clause(scene, scene.events[0], "the", 1, True) == "the red square slides to the left"
    assert set(MOVES) <= set(ACTIONS)


# ----------------------------------------------------------------------------------------------------------------
# Dataset and sampler


def test_dataset_items_and_one_caption_per_video_sampler(tiny_set):
    torch = pytest.importorskip("torch")
    from hbi_training.data.dataset import RandomCaptionSampler, SyntheticVideoDataset

    train = SyntheticVideoDataset(tiny_set.root, "train", max_frames=T, image_size=S)
    test = SyntheticVideoDataset(tiny_set.root, "test", max_frames=T, image_size=S)
    assert len(test) == N_TEST and len(train) == sum(len(c) for c in train.captions) > N_TRAIN
    input_ids, text_mask, frames, frame_mask, video_id = train[0]
    assert (input_ids.shape, input_ids.dtype, text_mask.dtype) == ((grammar.MAX_WORDS,), torch.int64, torch.int64)
    assert (frames.shape, frames.dtype) == ((T, 3, S, S), torch.float32)
    assert (frame_mask.shape, frame_mask.dtype, int(frame_mask.sum())) == ((T,), torch.int64, 8)
    assert video_id == "train_00000" and int(text_mask.sum()) == int((input_ids != 0).sum())
    sampler = RandomCaptionSampler(train, seed=0)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0 and len(epoch0) == N_TRAIN
    assert sorted(int(train.pairs[k, 0]) for k in epoch0) == list(range(N_TRAIN))
    draws = set()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        draws |= set(sampler)
    assert len(draws) > N_TRAIN  # other captions are drawn in other epochs
    with pytest.raises(UsageError, match="captions longer than max_words=8"):
        SyntheticVideoDataset(tiny_set.root, "train", max_words=8, max_frames=T, image_size=S)


def test_cli_renders_and_decodes_with_a_progress_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--train", "2", "--test", "1", "--seed", "0", "--size", "32"]) == 0
    err = capsys.readouterr().err
    assert "render: 3/3 videos" in err and "decode test: 1/1 videos" in err
    assert main(["--out", str(tmp_path / "cli"), "--train", "2", "--test", "1", "--seed", "0", "--size", "31"]) == 2
    assert "size must be even" in capsys.readouterr().err
