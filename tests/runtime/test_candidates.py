"""The candidate stage (hbi_runtime.index.candidates) and the two-stage path of hbi_runtime.search.rank_encoded.

One module-wide set: 1,000 synthetic videos rendered by hbi_training.data (small: 32 px, 6 s at 2 fps) and
indexed through the real decoder and the demo package, as benchmarks/bench_candidates.py does at 20,000.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import hbi_runtime
from hbi_runtime.fileio import write_atomic
from hbi_runtime.index import Index, index_status, update_index
from hbi_runtime.index import candidates as cand_stage
from hbi_runtime.scoring import score, topk
from hbi_runtime.search import rank_encoded, search

pytest.importorskip("faiss", reason="the candidate stage's builder needs faiss-cpu (the candidates extra)")
synthetic = pytest.importorskip("hbi_training.data.synthetic", reason="renders the videos (hbi_training.data)")

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "package"
VIDEOS = 1000
K = 200  # 20 % of this small gallery (the benchmark's figures: docs/candidates.md)


def recall_at_10(exact: np.ndarray, rows: np.ndarray) -> float:
    """Share of the returned top 10 whose exhaustive score reaches the 10th best exhaustive score (so a tie at
    the 10th place counts as a hit whichever of the tied videos was returned)."""
    theta = np.sort(exact)[-10]
    return float(np.mean(exact[rows[:10]] >= theta))


@pytest.fixture(scope="module")
def model():
    with hbi_runtime.load(DEMO) as m:
        yield m


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("cand")
    paths = synthetic.generate(root / "set", VIDEOS, 0, seed=5, size=32, fps=2, seconds=6, workers=2)
    manifest = json.loads(paths.manifest.read_text())
    summary = update_index(model, root / "set" / "videos", root / "index", workers=2)
    captions = [v["captions"][0] for v in manifest["videos"]][:: VIDEOS // 100]  # 100 queries
    return root, summary, captions


@pytest.fixture
def index_copy(gallery, tmp_path):
    """A copy of the built index that a test may damage."""
    shutil.copytree(gallery[0] / "index", tmp_path / "index")
    return tmp_path / "index"


def test_index_builds_the_candidate_index_within_half_the_store(gallery):
    root, summary, _ = gallery
    report = summary.candidates
    assert report["built"] and report["rows"] == VIDEOS and report["coded"] == VIDEOS
    index = Index.open(root / "index")
    cand = cand_stage.load(index, verify_bytes=True)
    store_bytes = sum(f.stat().st_size for f in (root / "index" / "shards").rglob("*.npy"))
    assert sum(cand.nbytes().values()) <= 0.5 * store_bytes
    pointer = json.loads((root / "index" / "candidates" / "CURRENT.json").read_text())
    assert set(pointer["files"]) == set(cand_stage.FILES)
    state = index_status(root / "index")["candidates"]  # what `hbi-run index --status` reports
    assert state["state"] == "ready" and state["rows"] == VIDEOS and state["nlist"] == report["nlist"]


def test_two_stage_keeps_the_exact_top_10(gallery, model):
    root, _, captions = gallery
    index = Index.open(root / "index")
    store = index.video_store()
    text = model.encode_text(captions)
    exact = score(text, store)
    results = rank_encoded(model, index, captions, text, top_k=10, mode="two-stage", candidate_k=K)
    assert all(r.ranking == {"path": "two-stage", "gallery": VIDEOS, "candidates": K} for r in results)
    recalls = []
    for q, r in enumerate(results):
        rows = np.array([next(i for i, row in enumerate(index.rows) if row.rel.decode() == h.path) for h in r.hits])
        # the two-stage scores are the exact scores of those videos
        np.testing.assert_allclose([h.score for h in r.hits], exact[q, rows], atol=1e-5)
        recalls.append(recall_at_10(exact[q], rows))
    assert np.mean(recalls) >= 0.99, np.mean(recalls)


def test_two_stage_equals_exact_when_the_candidates_hold_the_top(gallery, model):
    """Same ranks, values and tie order as exhaustive scoring wherever the candidate set holds its top 10."""
    root, _, captions = gallery
    index = Index.open(root / "index")
    text = model.encode_text(captions[:20])
    exact_best, exact_values = topk(score(text, index.video_store()), 10)
    cand = cand_stage.load(index)
    for q in range(20):
        lv = text.levels[0]
        rows = cand.candidates(lv.tokens[q], lv.weights[q], lv.mask[q], index.video_store().levels[0].weights, K)
        if not np.isin(exact_best[q], rows).all():
            continue
        two = rank_encoded(model, index, [captions[q]], text.select([q]), mode="two-stage", candidate_k=K,
                           candidates=cand)[0]
        assert [h.path for h in two.hits] == [index.rows[int(i)].rel.decode() for i in exact_best[q]]
        np.testing.assert_allclose([h.score for h in two.hits], exact_values[q], atol=1e-6)


def test_auto_uses_exact_below_the_threshold_and_exact_flag(gallery, model):
    root, _, captions = gallery
    index = Index.open(root / "index")
    auto = search(model, index, captions[:2])
    assert auto[0].ranking == {"path": "exact", "gallery": VIDEOS}  # below AUTO_MIN_GALLERY: no reason, no warning
    forced = search(model, index, captions[:2], mode="exact")
    assert forced[0].ranking == {"path": "exact", "gallery": VIDEOS}
    assert [h.path for h in auto[0].hits] == [h.path for h in forced[0].hits]


def test_auto_switches_above_the_threshold_where_the_kernel_is_built(gallery, model, monkeypatch):
    from hbi_runtime import search as search_module

    root, _, captions = gallery
    index = Index.open(root / "index")
    monkeypatch.setattr(search_module, "AUTO_MIN_GALLERY", VIDEOS // 2)
    monkeypatch.setattr(cand_stage, "DEFAULT_MIN_K", K)
    assert search(model, index, captions[:1])[0].ranking == {"path": "two-stage", "gallery": VIDEOS, "candidates": K}
    monkeypatch.setattr(cand_stage, "kernel_path", lambda: "numpy")  # no C kernel: exhaustive is the faster path
    assert search(model, index, captions[:1])[0].ranking == {"path": "exact", "gallery": VIDEOS}


def test_top_k_larger_than_k(gallery, model):
    root, _, captions = gallery
    index = Index.open(root / "index")
    text = model.encode_text(captions[:1])
    wide = rank_encoded(model, index, captions[:1], text, top_k=30, mode="two-stage", candidate_k=K)[0]
    assert wide.ranking["path"] == "two-stage" and wide.ranking["candidates"] == 300  # 10 x top-k
    assert len(wide.hits) == 30
    huge = rank_encoded(model, index, captions[:1], text, top_k=60, mode="two-stage", candidate_k=K)[0]
    assert huge.ranking["path"] == "exact" and "at least half" in huge.ranking["reason"]
    assert len(huge.hits) == 60


def test_levels_beyond_the_entity_level_are_exact(gallery, model):
    root, _, captions = gallery
    index = Index.open(root / "index")
    r = search(model, index, captions[:1], level_weights=(0.5, 0.5, 0.0), mode="two-stage")[0]
    assert r.ranking["path"] == "exact" and "entity level only" in r.ranking["reason"]


def _two_stage(model, index_dir, captions):
    text = model.encode_text(captions[:1])
    return rank_encoded(model, Index.open(index_dir), captions[:1], text, mode="two-stage", candidate_k=K)[0]


def test_missing_candidate_index_falls_back_with_a_reason(index_copy, gallery, model):
    (index_copy / "candidates" / "CURRENT.json").unlink()
    r = _two_stage(model, index_copy, gallery[2])
    assert r.ranking["path"] == "exact" and "no candidate index" in r.ranking["reason"]
    assert "hbi-run index" in r.ranking["reason"]
    assert index_status(index_copy)["candidates"]["state"] == "none"


def test_damaged_candidate_index_falls_back(index_copy, gallery, model):
    pointer = json.loads((index_copy / "candidates" / "CURRENT.json").read_text())
    codes = index_copy / "candidates" / pointer["folder"] / "codes.npy"
    with open(codes, "r+b") as f:  # a truncated file: the cheap check sees it
        f.truncate(codes.stat().st_size - 8)
    r = _two_stage(model, index_copy, gallery[2])
    assert r.ranking["path"] == "exact" and "damaged" in r.ranking["reason"]


def test_flipped_bytes_are_seen_by_the_full_check_and_rebuilt(index_copy, gallery, model):
    pointer = json.loads((index_copy / "candidates" / "CURRENT.json").read_text())
    codes = index_copy / "candidates" / pointer["folder"] / "codes.npy"
    raw = bytearray(codes.read_bytes())
    raw[-2:] = b"\xfe\x7f"  # a centroid id far out of range (the kernel would read outside its table), same size
    codes.write_bytes(bytes(raw))
    with pytest.raises(cand_stage.CandidateIndexUnavailable, match="checksum"):
        cand_stage.load(Index.open(index_copy), verify_bytes=True)
    with pytest.raises(cand_stage.CandidateIndexUnavailable, match="impossible values"):  # the cheap check too
        cand_stage.load(Index.open(index_copy))
    state = index_status(index_copy)["candidates"]
    assert state["state"] == "unusable" and "impossible values" in state["reason"]
    r = _two_stage(model, index_copy, gallery[2])
    assert r.ranking["path"] == "exact" and "damaged" in r.ranking["reason"]
    report = cand_stage.build(Index.open(index_copy))  # the next `index` run: the damaged files are not reused
    assert report["built"] and report["reused"] == 0
    cand_stage.load(Index.open(index_copy), verify_bytes=True)


def test_an_older_format_falls_back_and_is_rebuilt(index_copy, gallery, model):
    path = index_copy / "candidates" / "CURRENT.json"
    pointer = json.loads(path.read_text())
    path.write_text(json.dumps({**pointer, "format": "hbi.candidates/1"}))
    r = _two_stage(model, index_copy, gallery[2])
    assert r.ranking["path"] == "exact" and "another format (hbi.candidates/1" in r.ranking["reason"]
    report = cand_stage.build(Index.open(index_copy))
    assert report["built"] and report["reused"] == 0 and report["retrained"]
    assert _two_stage(model, index_copy, gallery[2]).ranking["path"] == "two-stage"


def test_stale_candidate_index_falls_back_and_the_next_run_rebuilds(tmp_path, gallery, model):
    root, _, captions = gallery
    videos = tmp_path / "videos"
    shutil.copytree(root / "set" / "videos", videos)
    shutil.copytree(root / "index", tmp_path / "index")
    for p in sorted(videos.iterdir())[:3]:
        p.unlink()
    update_index(model, videos, tmp_path / "index", workers=1, candidates=False)
    r = _two_stage(model, tmp_path / "index", captions)
    assert r.ranking["path"] == "exact" and "stale" in r.ranking["reason"]
    summary = update_index(model, videos, tmp_path / "index", workers=1, candidate_min_rows=VIDEOS // 2)
    assert summary.candidates["built"] and summary.candidates["rows"] == VIDEOS - 3
    assert summary.candidates["reused"] > 0 and not summary.candidates["retrained"]  # incremental
    r = _two_stage(model, tmp_path / "index", captions)
    assert r.ranking["path"] == "two-stage"


def test_a_killed_build_leaves_the_old_candidate_index(index_copy, monkeypatch):
    before = (index_copy / "candidates" / "CURRENT.json").read_text()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cand_stage, "_reusable", lambda *a: None)  # build everything again
    monkeypatch.setattr(cand_stage, "write_atomic", killed)  # killed after the new folder, before the switch
    with pytest.raises(KeyboardInterrupt):
        cand_stage.build(Index.open(index_copy))
    assert (index_copy / "candidates" / "CURRENT.json").read_text() == before
    assert len([p for p in (index_copy / "candidates").iterdir() if p.is_dir()]) == 2  # the orphan folder
    cand_stage.load(Index.open(index_copy), verify_bytes=True)  # the old one: whole and current
    monkeypatch.setattr(cand_stage, "write_atomic", write_atomic)
    cand_stage.build(Index.open(index_copy))
    assert (index_copy / "candidates" / "CURRENT.json").read_text() != before
    assert len([p for p in (index_copy / "candidates").iterdir() if p.is_dir()]) == 1  # orphan and old collected
    cand_stage.load(Index.open(index_copy), verify_bytes=True)


def test_without_faiss_index_says_so_and_retrieve_stays_exact(tmp_path, gallery, model, monkeypatch):
    root = gallery[0]
    shutil.copytree(root / "index", tmp_path / "index")
    shutil.rmtree(tmp_path / "index" / "candidates")

    def missing():
        raise hbi_runtime.errors.MissingDependencyError("the candidate index needs faiss-cpu", hint=cand_stage.HINT)

    monkeypatch.setattr(cand_stage, "_faiss", missing)
    summary = update_index(model, root / "set" / "videos", tmp_path / "index", workers=1)
    assert summary.candidates["built"] is False and "faiss-cpu" in summary.candidates["reason"]
    r = _two_stage(model, tmp_path / "index", gallery[2])
    assert r.ranking["path"] == "exact" and "no candidate index" in r.ranking["reason"]


def test_retrieve_cli_says_which_path_answered(gallery, monkeypatch):
    from typer.testing import CliRunner

    from hbi_runtime import search as search_module
    from hbi_runtime.cli import app

    root, _, captions = gallery
    args = ["retrieve", captions[0], "--index", str(root / "index"), "-m", str(DEMO), "--format", "json"]
    runner = CliRunner()
    small = runner.invoke(app, args)
    assert small.exit_code == 0, small.output
    assert json.loads(small.stdout)["ranking"] == {"path": "exact", "gallery": VIDEOS}
    assert "warning" not in small.stderr
    monkeypatch.setattr(cand_stage, "DEFAULT_MIN_K", K)  # 20 % of this small gallery (5 % would be 50)
    asked = runner.invoke(app, [*args, "--two-stage"])  # below the automatic switch: asked for
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["ranking"] == {"path": "two-stage", "gallery": VIDEOS, "candidates": K}
    both = runner.invoke(app, [*args, "--two-stage", "--exact"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    monkeypatch.setattr(search_module, "AUTO_MIN_GALLERY", 100)  # as if the gallery were past the switch
    two = runner.invoke(app, args)
    assert two.exit_code == 0, two.output
    assert json.loads(two.stdout)["ranking"] == {"path": "two-stage", "gallery": VIDEOS, "candidates": K}
    exact = runner.invoke(app, [*args, "--exact"])
    assert json.loads(exact.stdout)["ranking"] == {"path": "exact", "gallery": VIDEOS}
    assert json.loads(exact.stdout)["queries"][0]["hits"][0] == json.loads(two.stdout)["queries"][0]["hits"][0]
    wide = runner.invoke(app, [*args, "--top-k", "60"])  # 600 candidates: more than half of the gallery
    assert json.loads(wide.stdout)["ranking"]["path"] == "exact"
    assert "warning: every video was scored" in wide.stderr and "at least half" in wide.stderr
