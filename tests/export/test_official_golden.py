"""Our reference model against numbers produced by the official HBI code (tests/official_golden/README.md).

The weights are regenerated deterministically from ``make_weights.py`` (official key layout, fp32, Banzhaf modules
included), saved like an official checkpoint, loaded by our strict loader and run on the stored inputs.
Keys suffixed ``_idxtie`` are the official result with its random density noise replaced by our index tie-break;
they differ from the seed-0 values only for samples whose clusters the official random draw decides.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hbi_export.checkpoints import build_model
from hbi_export.model.merge import dpc_knn

GOLDEN = Path(__file__).resolve().parents[1] / "official_golden"
ATOL = 1e-5  # docs/architecture.md, tolerance table: our fp32 model vs the official code


def _load_make_weights():
    spec = importlib.util.spec_from_file_location("make_weights", GOLDEN / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "golden.npz"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The official-format checkpoint (with its Banzhaf modules) saved as the official script does, then read
    back through our strict loader, which infers the architecture from the weights."""
    mw = _load_make_weights()
    path = tmp_path_factory.mktemp("official") / "pytorch_model.bin.0"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in mw.official_state_dict(0).items()}, path)
    m, report = build_model(path)
    c = mw.TINY_OFFICIAL
    assert report.format == "official-hbi"
    assert {i.key.split(".")[0] for i in report.ignored} == {"banzhafmodel", "banzhafmodel0", "banzhafmodel1",
                                                           "banzhafteacher"}
    assert (m.config.embed_dim, m.config.vision.width, m.config.vision.heads, m.config.text.heads,
            m.config.temporal_layers, m.config.frame_positions) == (c["embed_dim"], c["vision_width"],
                                                                    c["vision_heads"], c["text_heads"],
                                                                    c["temporal_layers"], c["context_length"])
    return m


@pytest.fixture(scope="module")
def ours(model, golden):
    with torch.no_grad():
        tm = torch.from_numpy(golden["text_mask"]).float()
        vm = torch.from_numpy(golden["video_mask"]).float()
        tf = model.text_features(torch.from_numpy(golden["text_ids"]), tm)
        vf = model.video_features(torch.from_numpy(golden["video"]).float(), vm)
        t, v = model.text_side(tf, tm), model.video_side(vf, vm)
        return dict(tf=tf, vf=vf, t=t, v=v, levels=model.score_levels(t, v), tm=tm, vm=vm)


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a - torch.from_numpy(b)).abs().max())


def test_features_match_official(ours, golden):
    assert _max_diff(ours["tf"], golden["text_feat"]) <= ATOL
    assert _max_diff(ours["vf"], golden["video_feat"]) <= ATOL


def test_entity_level_matches_official(ours, golden):
    assert _max_diff(ours["levels"][0], golden["entity_score"]) <= ATOL
    assert _max_diff(ours["t"].levels[0].weights, golden["text_weight_l0"]) <= ATOL
    assert _max_diff(ours["v"].levels[0].weights, golden["video_weight_l0"]) <= ATOL
    # the official default rate [1, 0, 0] ranks with the entity level alone
    np.testing.assert_array_equal(golden["combined_score_100"], golden["entity_score"])


@pytest.mark.parametrize("level,name", [(1, "action"), (2, "event")])
def test_merge_levels_match_official_with_index_tie_break(ours, golden, level, name):
    assert _max_diff(ours["levels"][level], golden[f"{name}_score_idxtie"]) <= ATOL
    for side, kind in ((ours["t"], "text"), (ours["v"], "video")):
        lv = side.levels[level]
        assert _max_diff(lv.weights, golden[f"{kind}_weight_l{level}_idxtie"]) <= ATOL
        official_tokens = torch.from_numpy(golden[f"{kind}_tokens_l{level}_idxtie"])
        official_tokens = official_tokens / official_tokens.norm(dim=-1, keepdim=True)
        assert float((lv.tokens - official_tokens).abs().max()) <= ATOL


@pytest.mark.parametrize("name", ["entity", "action", "event"])
def test_scores_match_seed0_wherever_official_noise_does_not_decide(ours, golden, name):
    """Against the plain official run: equal wherever the official result is the same for every noise seed."""
    level = ("entity", "action", "event").index(name)
    spread = golden.get(f"spread_{name}_score")  # the entity level draws no noise: no spread stored
    stable = np.ones((5, 5), bool) if spread is None else spread == 0
    assert stable.sum() >= 16  # most pairs are not decided by the noise
    diff = (ours["levels"][level] - torch.from_numpy(golden[f"{name}_score"])).abs().numpy()
    assert diff[stable].max() <= ATOL


def test_combined_level_weights_match_official(model, ours, golden):
    combined = model.score(ours["t"], ours["v"], (0.5, 0.3, 0.2))
    expected = golden["combined_score_532_idxtie"] if "combined_score_532_idxtie" in golden else None
    if expected is None:  # derive from the tie-free official level scores
        expected = 0.5 * golden["entity_score"] + 0.3 * golden["action_score_idxtie"] + \
            0.2 * golden["event_score_idxtie"]
    assert _max_diff(combined, expected) <= ATOL


def test_level1_clusters_match_official_at_valid_positions(model, ours, golden):
    for kind, feats, mask, ctm in (("text", ours["tf"], ours["tm"], model.t_ctm0),
                                   ("video", ours["vf"], ours["vm"], model.v_ctm0)):
        with torch.no_grad():
            x = ctm.norm(ctm.conv(feats))
            assign = dpc_knn(x, ctm.clusters(x.shape[1]), 3, mask)
        official = torch.from_numpy(golden[f"{kind}_cluster_l1_idxtie"])
        valid = mask > 0
        assert torch.equal(assign[valid], official[valid]), kind
