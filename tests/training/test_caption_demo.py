"""The caption demo pipeline (``python -m hbi_training.demo --caption-joint``, ``hbi_training.demo.caption_demo``):
estimator, two joint stages, the decoder stage on the exported package, artifacts - on a tiny model and set."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # a few training steps, two package exports and their parity checks (~1-2 min)


def test_caption_demo_writes_loadable_artifacts_with_their_history(tmp_path):
    from hbi_runtime.tasks.caption import load_caption
    from hbi_training.data import generate
    from hbi_training.demo import CaptionDemoRecipe, DemoRecipe, caption_demo

    data = generate(tmp_path / "data", 12, 4, 0).root
    # the demo preset (its artifacts fit the size limit) on the tiny set
    recipe = DemoRecipe(n_train=12, n_test=4, estimator_steps=1, estimator_batch=4)
    caption = CaptionDemoRecipe(stage1_steps=2, stage2_steps=1, decoder_steps=2, batch_size=4, device="cpu",
                                decoder_train_videos=16)  # a larger set for the decoder stage, as the demo does
    art = tmp_path / "artifacts"
    report = caption_demo(data, tmp_path / "work", art, recipe, caption, seed=0)

    for stage, steps in (("joint1", 2), ("joint2", 1)):
        summary = json.loads((tmp_path / "work" / stage / "summary.json").read_text())
        assert summary["settings"]["steps"] == steps and summary["settings"]["aux_weight"] == 4.0
    second = json.loads((tmp_path / "work" / "joint2" / "summary.json").read_text())["settings"]
    assert second["init"].endswith("joint1/final") and second["lr"] == caption.stage2_lr
    # the decoder stage trained on the larger set of the same seed: the same test videos, more train videos
    stage = json.loads((tmp_path / "work" / "joint2" / "decoder-stage" / "summary.json").read_text())
    assert stage["train_videos"] == 16 and stage["settings"]["frame_deltas"] is True
    from hbi_training.caption import read_splits

    assert [v["scene"] for v in read_splits(data)[2]] == \
        [v["scene"] for v in read_splits(tmp_path / "work" / "data-decoder")[2]]
    # the shipped decoder is the decoder stage's (frame deltas on), not the joint run's
    manifest = json.loads((art / "caption" / "manifest.json").read_text())
    assert manifest["status"] == "verified" and manifest["decoder"]["frame_deltas"] is True
    # ... with the spatial memory: the frozen tower copy is the shipped checkpoint's, exported as frame_patches
    assert stage["settings"]["patch_grid"] == 4 and stage["settings"]["checkpoint"].endswith("artifacts/checkpoint")
    assert manifest["decoder"]["patch_grid"] == 4 and "frame_patches" in manifest["graphs"]
    assert manifest["parity"]["graphs"]["frame_patches_videos"]["max_abs"] <= 1e-4
    readme = (art / "caption" / "README.txt").read_text()
    assert "from a random 'demo' model" in readme and "joint1/final" in readme and "decoder alone" in readme
    assert "python -m hbi_training.demo" in (art / "README.txt").read_text()
    assert report["caption"]["videos"] == 4 and 0.0 <= report["caption"]["attribute_accuracy"] <= 1.0
    with load_caption(art / "caption") as model:
        samples = sorted((art / "samples").iterdir())
        results, errors = model.caption_videos([str(samples[0])])
    assert not errors and results[0].text.strip()


@pytest.mark.parametrize("argv, message", [
    (["--caption-joint", "--ablation"], "belong to the retrieval-only demo"),
    (["--caption-joint", "--steps", "5"], "belong to the retrieval-only demo"),
    (["--device", "cuda"], "--device applies to --caption-joint"),
])
def test_demo_command_refuses_options_of_the_other_demo(tmp_path, capsys, argv, message):
    from hbi_training.demo import main

    assert main(["--out", str(tmp_path / "w"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything was rendered or trained
