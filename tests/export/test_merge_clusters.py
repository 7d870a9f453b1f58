"""The encoders' cluster outputs (which tokens each merged token merged; docs/explain.md, "Spans"): the tie-free
assignment exported beside ``hbi.TokenMerge`` is the reference merge's own, and the merge check tells a wrong one."""

from __future__ import annotations

import pytest
import torch

from hbi_export.model import HBIConfig, HBIModel
from hbi_export.model.merge import CLUSTER_CHECK_RTOL, cluster_assignment, dpc_knn, merge_check, token_merge


@pytest.mark.parametrize("n,clusters,valid", [(12, 3, (12, 6, 2, 1)), (8, 2, (8, 3, 1, 8)), (2, 1, (2, 1, 2, 1)),
                                              (24, 6, (24, 11, 3, 2)), (32, 8, (32, 7, 3, 2))])
def test_the_exported_assignment_is_the_merges_own(n, clusters, valid):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        b, c = len(valid), 16
        x = torch.randn(b, n, c, generator=g)
        x[3, 1] = x[3, 0]  # a duplicated token: a density tie
        mask = torch.zeros(b, n)
        for i, v in enumerate(valid):
            mask[i, :v] = 1
        assert torch.equal(cluster_assignment(x, mask, clusters, 3), dpc_knn(x, clusters, 3, mask))
        assert torch.equal(cluster_assignment(x, None, clusters, 3), dpc_knn(x, clusters, 3, None))
        score = torch.where(mask > 0, torch.randn(b, n, generator=g), torch.full((b, n), -1e4))
        merged = token_merge(x, score, mask, clusters, 3)
        assign = cluster_assignment(x, mask, clusters, 3)
        assert merge_check(x, score, assign, merged).max() < 1e-5


def test_identical_tokens_keep_the_index_rule():
    x = torch.ones(1, 4, 8) * torch.arange(1, 9.0)
    assert torch.equal(cluster_assignment(x, None, 2, 3), dpc_knn(x, 2, 3, None))


def test_the_check_tells_a_wrong_assignment():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 16, generator=g)
    score = torch.randn(2, 8, generator=g)
    merged = token_merge(x, score, None, 3, 3)
    assign = cluster_assignment(x, None, 3, 3)
    wrong = assign.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % 3
    assert (merge_check(x, score, wrong, merged) > 10 * CLUSTER_CHECK_RTOL).all()


def test_model_clusters_come_with_the_same_side():
    torch.manual_seed(0)
    model = HBIModel(HBIConfig.tiny()).eval()
    ids = torch.randint(1, 49000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 5:] = 0
    frames = torch.randn(2, 8, 3, 32, 32)
    fmask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    with torch.no_grad():
        for plain, (side, (l1, l2, ok)) in (
                (model.encode_text(ids, mask), model.encode_text_clusters(ids, mask)),
                (model.encode_video(frames, fmask), model.encode_video_clusters(frames, fmask))):
            for a, b in zip(plain.levels, side.levels):
                assert torch.equal(a.tokens, b.tokens) and torch.equal(a.weights, b.weights)
            n0, n1, n2 = (lv.tokens.shape[1] for lv in side.levels)
            assert l1.shape == (2, n0) and l2.shape == (2, n1) and ok.shape == (2, 2)
            assert l1.max() < n1 and l2.max() < n2 and (ok == 1).all()
            assert l1.dtype == torch.float32 and torch.equal(l1, l1.round())
