"""The named evaluation splits (validation / test) of the synthetic set: ranges of a seed's held-out stream.

Checked on scenes alone (no video) for the real ranges and the demo's seed; a few tiny videos are rendered to check
that a later range is named and rendered like the same positions of a larger set.
"""

from __future__ import annotations

import json

import pytest

from hbi_runtime.errors import UsageError
from hbi_training.data import synthetic
from hbi_training.data.scenes import DIAGNOSTIC_RANGE, EVAL_SPLITS, HeldOutRange, eval_split, plan_split
from hbi_training.demo import DemoRecipe

SEED = 0  # the demo's: the one the quoted figures come from


@pytest.fixture(scope="module")
def stream():
    """Seed 0's held-out stream up to the end of the test split, and the demo's 2400 train scenes."""
    return plan_split(DemoRecipe().n_train, EVAL_SPLITS["test"].stop, SEED)


def test_the_ranges_are_the_demo_test_set_and_a_disjoint_later_one():
    validation, test = EVAL_SPLITS["validation"], EVAL_SPLITS["test"]
    assert (validation.start, validation.stop) == (0, DemoRecipe().n_test)  # the demo's 120 test videos
    assert test.size >= 360
    assert not test.overlaps(validation) and not test.overlaps(DIAGNOSTIC_RANGE)
    assert not validation.overlaps(DIAGNOSTIC_RANGE)
    assert HeldOutRange(0, 2).overlaps(HeldOutRange(1, 3)) and not HeldOutRange(0, 2).overlaps(HeldOutRange(2, 4))
    assert eval_split("test") == test
    with pytest.raises(UsageError, match="unknown evaluation split 'train'"):
        eval_split("train")


def test_test_scenes_overlap_neither_training_nor_validation(stream):
    test_range, validation_range = EVAL_SPLITS["test"], EVAL_SPLITS["validation"]
    test = plan_split(0, test_range.size, SEED, test_start=test_range.start)
    validation = plan_split(0, validation_range.size, SEED, test_start=validation_range.start)
    assert test.held_out == validation.held_out == stream.held_out
    # a range is the same scenes whether drawn alone or as part of a longer stream
    assert test.test == stream.test[test_range.start:test_range.stop]
    assert validation.test == stream.test[:validation_range.stop] == plan_split(0, DemoRecipe().n_test, SEED).test
    test_keys = {s.key() for s in test.test}
    assert len(test_keys) == test_range.size  # distinct captions
    assert not test_keys & {s.key() for s in validation.test}
    assert not test_keys & {s.key() for s in stream.train}
    # like validation, every test video has a combination that training never shows (train has none of them)
    assert all(set(s.triples()) & test.held_out for s in test.test)
    assert not {t for s in stream.train for t in s.triples()} & test.held_out


def test_a_later_range_renders_the_same_videos_under_their_positions(tmp_path):
    tail = synthetic.generate(tmp_path / "tail", 0, 2, SEED, size=32, test_start=3)
    whole = synthetic.generate(tmp_path / "whole", 0, 5, SEED, size=32)
    tail_m, whole_m = (json.loads(p.manifest.read_text()) for p in (tail, whole))
    assert tail_m["config"]["test_start"] == 3 and "test_start" not in whole_m["config"]
    assert [v["id"] for v in tail_m["videos"]] == ["test_00003", "test_00004"]
    assert tail_m["videos"] == whole_m["videos"][3:]
    for v in tail_m["videos"]:
        assert (tail.root / v["file"]).read_bytes() == (whole.root / v["file"]).read_bytes()
    assert synthetic.generate(tmp_path / "tail", 0, 2, SEED, size=32, test_start=3).reused


def test_generate_split_renders_the_named_range_alone(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: calls.append((a, k)))
    synthetic.generate_split(tmp_path, "test", SEED, size=32)
    synthetic.generate_split(tmp_path, "validation", SEED)
    assert calls == [((tmp_path, 0, 360, SEED), {"test_start": 360, "size": 32}),
                     ((tmp_path, 0, 120, SEED), {"test_start": 0})]  # validation: the demo set's test videos
    with pytest.raises(UsageError):
        synthetic.generate_split(tmp_path, "diagnostic", SEED)


def test_cli_split_refuses_explicit_sizes(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path / "s"), "--split", "test", "--test", "10"]) == 2
    assert "leave out --train and --test" in capsys.readouterr().err
