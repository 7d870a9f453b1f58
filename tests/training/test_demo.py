"""The committed demo artifacts (hbi_runtime/data/demo, written by ``python -m hbi_training.demo``) work.

Nothing is trained here: the committed package indexes the committed sample videos and every example query of
queries.json retrieves its expected sample first, through the same runtime path as ``hbi-run index`` /
``hbi-run retrieve``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hbi_runtime
from hbi_runtime.index import Index, update_index
from hbi_runtime.search import search

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"

pytestmark = pytest.mark.skipif(not (DEMO / "package" / "manifest.json").is_file(),
                                reason="no demo artifacts (python -m hbi_training.demo)")


def _queries() -> list[dict]:
    return json.loads((DEMO / "queries.json").read_text())["queries"]


def test_demo_files_are_complete_and_small():
    samples = sorted(p.name for p in (DEMO / "samples").iterdir())
    assert samples and all(name.endswith(".mp4") for name in samples)
    assert {q["expected"] for q in _queries()} <= set(samples)
    assert (DEMO / "checkpoint" / "model.safetensors").is_file() and (DEMO / "checkpoint" / "config.json").is_file()
    assert "python -m hbi_training.demo" in (DEMO / "README.txt").read_text()
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    # retrieval package + its checkpoint (~23 MiB: a 4-layer, 4-pixel-patch vision tower since the caption-joint
    # demo), the QA package (~5 MiB) and the caption package (~7 MiB: the decoder in two graphs, and the frozen
    # copy of three tower blocks its spatial memory reads, frame_patches.onnx)
    assert total <= 36 * 2**20, f"demo artifacts take {total / 2**20:.1f} MiB"


def test_demo_queries_retrieve_their_sample_first(tmp_path):
    queries = _queries()
    with hbi_runtime.load(DEMO / "package") as model:  # verified (parity-checked) packages only
        summary = update_index(model, DEMO / "samples", tmp_path / "index", workers=1)
        assert not summary.failed
        index = Index.open(tmp_path / "index", model.package.manifest_sha256)
        assert len(index.rows) == len(list((DEMO / "samples").iterdir()))
        results = search(model, index, [q["query"] for q in queries], top_k=3)
    wrong = [(q["query"], q["expected"], [Path(h.path).name for h in r.hits])
             for q, r in zip(queries, results) if Path(r.hits[0].path).name != q["expected"]]
    assert not wrong, f"queries not retrieving their sample first: {wrong}"


def test_demo_checkpoint_is_the_demo_preset_and_the_package_source():
    from hbi_export.checkpoints import build_model
    from hbi_runtime.package import load_package
    from hbi_training.runs import preset_config

    model, _ = build_model(DEMO / "checkpoint")
    assert model.config.to_dict() == preset_config("demo").to_dict()
    manifest = load_package(DEMO / "package").manifest
    assert manifest.model_config == model.config.to_dict()
    assert (manifest.max_words, manifest.max_frames) == (32, 8)
