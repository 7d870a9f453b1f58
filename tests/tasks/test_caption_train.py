"""The caption trainer's pieces: the attribute checker (against the caption grammar), QA pairs, and a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hbi_training.caption import attribute_match, parse_events, qa_pairs, scene_events
from hbi_training.data.captions import paraphrases
from hbi_training.data.scenes import ACTIONS, COLOURS, SHAPES, Scene, random_scene

VOCAB = {"colours": list(COLOURS), "shapes": list(SHAPES), "actions": list(ACTIONS)}
DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo"


def _scenes(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [random_scene(rng, 8, int(rng.integers(2, 4))) for _ in range(n)]


def test_every_paraphrase_of_a_scene_names_its_attributes():
    rng = np.random.default_rng(1)
    for scene in _scenes():
        d = scene.to_dict()
        for caption in paraphrases(scene, rng, 8):
            assert attribute_match(caption, d, VOCAB), caption


def test_wrong_captions_are_rejected():
    scene = Scene.from_dict({"seconds": 8, "objects": [
        {"colour": "red", "shape": "square", "x": 0.3, "y": 0.3},
        {"colour": "blue", "shape": "circle", "x": 0.7, "y": 0.7}], "events": [
        {"obj": 0, "action": "left", "start": 0, "end": 4, "colour_to": None},
        {"obj": 1, "action": "turn", "start": 4, "end": 8, "colour_to": "green"}]}).to_dict()
    assert attribute_match("a red square moves left, then a blue circle turns green", scene, VOCAB)
    assert attribute_match("after the red square slides to the left, the blue circle becomes green", scene, VOCAB)
    for wrong in ("a blue circle turns green, then a red square moves left",  # order
                  "a red square moves right, then a blue circle turns green",  # direction
                  "a red square moves left, then a blue circle turns yellow",  # new colour
                  "a red circle moves left, then a blue circle turns green",  # shape
                  "a green square moves left, then a blue circle turns green",  # colour
                  "a red square moves left",  # missing event
                  "a red square moves left, then a blue circle turns green, then a red square appears"):  # extra
        assert not attribute_match(wrong, scene, VOCAB), wrong
    assert parse_events("a red square moves", VOCAB) == [("red", "square", "move?", None)]
    assert scene_events(scene)[1] == ("blue", "circle", "turn", "green")


def test_qa_pairs():
    scene = _scenes(1, seed=3)[0]
    pairs = dict(qa_pairs(scene.to_dict()))
    assert pairs["how many events are there?"] == {2: "two", 3: "three"}[len(scene.events)]
    first = scene.objects[scene.events[0].obj]
    assert pairs["what happens first?"].startswith(f"a {first.colour} {first.shape} ")
    assert any(q.startswith(f"what does the {first.colour} {first.shape}") for q in pairs)


@pytest.mark.slow
def test_tiny_training_run(tmp_path):
    """Render 12 + 4 videos, train 20 steps on the demo retrieval package's frozen sides, export nothing."""
    from hbi_training.caption import CaptionTrainSettings, train_caption
    from hbi_training.data import generate

    data = generate(tmp_path / "data", 12, 4, 0).root
    s = CaptionTrainSettings(data_dir=data, out_dir=tmp_path / "run", package=DEMO / "package", steps=20,
                             batch_size=8, width=32, layers=1, heads=2, log_every=10, threads=1)
    summary = train_caption(s)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20] and lines[1]["loss"] < lines[0]["loss"]
    assert (tmp_path / "run" / "decoder" / "decoder.safetensors").is_file()
    assert 0.0 <= summary["test_attribute_accuracy"] <= 1.0 and summary["test_videos"] == 4
    assert list((tmp_path / "run" / "cache").glob("sides-train-*.npz"))  # the frozen sides, cached once
