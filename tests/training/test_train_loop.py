"""The training loop on a tiny model and dataset: learning, determinism, exact resume, outputs; optimiser set-up."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hbi_runtime.errors import CheckpointError, UsageError
from hbi_training.estimator import EstimatorConfig, EstimatorTask
from hbi_training.evaluate import retrieval_recall
from hbi_training.loop import LoopConfig, fit
from hbi_training.losses import HBILoss, LossConfig
from hbi_training.optim import OptimConfig, param_groups, preset, warmup_cosine
from hbi_training.tasks import HBITask


def _hbi_task(make_model, seed=0, **loss):
    return HBITask(make_model(seed), HBILoss(LossConfig(**loss)))


def _config(steps, **kw):
    return LoopConfig(steps=steps, batch_size=8, optim=preset("scratch"), seed=0, progress=False, **kw)


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


# ------------------------------------------------------------------ learning
def test_a_short_run_lowers_the_loss(make_model, pairs):
    losses = _losses(fit(_hbi_task(make_model), pairs, _config(10)))
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_the_estimator_mse_falls(make_model, make_pairs):
    """One batch seen every step, so only the Monte-Carlo label noise varies between steps.

    Unscaled labels (scale 1) and lr 1e-3: the same fit as the official x1000 at lr 1e-2, in fewer steps.
    """
    task = EstimatorTask(make_model(), EstimatorConfig(samples=32, scale=1.0))
    config = LoopConfig(steps=20, batch_size=8, optim=OptimConfig(lr=1e-3, warmup=0.0), progress=False)
    losses = _losses(fit(task, make_pairs(8), config))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert all(p.grad is None for p in task.model.parameters())  # the model stays frozen


# ------------------------------------------------------------------ determinism and resume
def test_two_runs_with_one_seed_give_the_same_curve(make_model, pairs):
    a = _losses(fit(_hbi_task(make_model), pairs, _config(4)))
    b = _losses(fit(_hbi_task(make_model), pairs, _config(4)))
    assert a == b


def test_resume_continues_exactly(make_model, pairs, tmp_path):
    straight = _hbi_task(make_model)
    full = fit(straight, pairs, _config(6, ckpt_every=3), tmp_path / "a")
    # A fresh process would build a differently initialised model; the checkpoint must overwrite everything.
    resumed = _hbi_task(make_model, seed=123)
    rest = fit(resumed, pairs, _config(6), tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step_0000003")
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert _losses(rest) == pytest.approx(_losses(full)[3:], abs=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    for p, q in zip(straight.criterion.parameters(), resumed.criterion.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)


def test_resume_refuses_another_batch_size_and_non_checkpoints(make_model, pairs, tmp_path):
    fit(_hbi_task(make_model), pairs, _config(2), tmp_path / "a")
    other = LoopConfig(steps=4, batch_size=4, optim=preset("scratch"), progress=False)
    with pytest.raises(UsageError, match="batch_size"):
        fit(_hbi_task(make_model), pairs, other, resume=tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        fit(_hbi_task(make_model), pairs, _config(2), resume=tmp_path)


# ------------------------------------------------------------------ outputs
def test_run_directory_holds_log_checkpoints_and_a_loadable_model(make_model, pairs, tmp_path):
    from hbi_export.checkpoints import build_model

    task = _hbi_task(make_model, banzhaf=False)
    fit(task, pairs, _config(4, log_every=2, ckpt_every=2, keep_checkpoints=1), tmp_path, val_dataset=pairs)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert {"loss", "nce_entity", "distill", "lr", "samples_per_s", "grad_norm"} <= set(train[0])
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["t2v_r1"] <= 100.0
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000004"]  # keep_checkpoints=1; no temporary folder left
    model, report = build_model(tmp_path / "final")
    assert report.format == "hbi-toolkit"
    for p, q in zip(task.model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(q, p.cpu())


def test_retrieval_recall_of_a_perfect_scorer(make_model, pairs, monkeypatch):
    model = make_model()
    monkeypatch.setattr(model, "score", lambda t, v, w=None: torch.eye(len(t), len(v)))
    r = retrieval_recall(model, pairs, batch_size=5)
    assert r == {"t2v_r1": 100.0, "v2t_r1": 100.0, "texts": 16, "videos": 16}


# ------------------------------------------------------------------ optimiser and schedule
def test_param_groups_follow_the_official_split(make_model):
    model = make_model()
    groups = {g["name"]: g for g in param_groups(model.named_parameters(), OptimConfig(lr=1e-4))}
    assert set(groups) == {"clip/decay", "clip/no_decay", "new/decay", "new/no_decay"}
    assert groups["clip/decay"]["lr"] == pytest.approx(1e-7) and groups["new/decay"]["lr"] == 1e-4
    assert groups["clip/no_decay"]["weight_decay"] == 0.0 and groups["new/decay"]["weight_decay"] == 0.2
    no_decay = {id(p) for p in groups["clip/no_decay"]["params"] + groups["new/no_decay"]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "clip.logit_scale" in names and "clip.ln_final.weight" in names and "t_ctm0.score.bias" in names
    assert "clip.text_projection" not in names
    official = param_groups(model.named_parameters(), OptimConfig(no_decay="official"))
    official_no_decay = {id(p) for g in official if g["weight_decay"] == 0 for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in official_no_decay} == \
        {n for n, _ in model.named_parameters() if "bias" in n}  # CLIP's ln_* are decayed by the official rule


def test_warmup_cosine_matches_the_official_formula():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0)


def test_presets_and_bad_settings():
    assert preset("finetune").clip_lr_coef == 1e-3 and preset("scratch").clip_lr_coef == 1.0
    assert preset("finetune", lr=3e-4, warmup=None).lr == 3e-4
    with pytest.raises(UsageError, match="preset"):
        preset("fast")
    with pytest.raises(UsageError, match="batch_size"):
        LoopConfig(steps=3, batch_size=1)
