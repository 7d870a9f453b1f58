"""``hbi-export onnx / parity / check``: a verified package from a checkpoint, refusals, loud parity failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from hbi_export.checkpoints.convert import init_random
from hbi_export.cli import app
from hbi_export.trt_lint import lint_model
from hbi_runtime.errors import EXIT_USAGE, GateFailedError, MismatchError
from hbi_runtime.package import load_package

runner = CliRunner()
L, T = 12, 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    # seed 2: with seed 0 the fp16 graph flips one DPC-kNN cluster assignment of the video action level (a near
    # tie between the random tiny model's frame features under fp16 rounding), which parity rightly fails
    init_random(root / "model", "tiny", seed=2)
    init_random(root / "other", "tiny", seed=1)  # same architecture, different weights
    return root


@pytest.fixture(scope="module")
def packages(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    out = {}
    for precision in ("fp32", "fp16"):
        result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(root / precision),
                                     "--max-words", str(L), "--max-frames", str(T), "--precision", precision,
                                     "--levels", "0.5,0.3,0.2", "--format", "json"])
        assert result.exit_code == 0, result.output
        out[precision] = (root / precision, json.loads(result.stdout))
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_writes_a_verified_package(packages, precision):
    path, doc = packages[precision]
    assert doc["schema"] == "hbi.onnx/1" and doc["status"] == "verified" and doc["parity"]["ok"]
    pkg = load_package(path)
    m = pkg.manifest
    assert (m.max_words, m.max_frames, m.level_weights) == (L, T, (0.5, 0.3, 0.2))
    assert m.tokens_per_level == {"text": (12, 3, 2), "video": (8, 2, 1)}
    assert m.graphs["text_encoder"].precision == precision and m.graphs["interaction"].precision == "fp32"
    assert m.graphs["interaction"].custom_ops == ("hbi.WeightedTokenInteraction",)
    assert doc["package_sha256"] == pkg.manifest_sha256
    body = json.loads((path / "manifest.json").read_text())  # the one package format
    assert (body["kind"], body["schema_version"], body["manifest_sha256"]) == ("retrieval", 2, pkg.manifest_sha256)
    assert body["files"] == m.tokenizer.files and not pkg.legacy
    names = {c["name"] for c in doc["parity"]["outputs"]}
    assert {"scores", "score_entity", "score_action", "score_event", "video_tokens_l1"} <= names
    for name in ("text_encoder", "video_encoder", "interaction"):
        model = onnx.load(str(pkg.graph_path(name)))
        onnx.checker.check_model(model, full_check=True)
        errors = [f for f in lint_model(model, "10.3", graph=name, precision=precision) if f.severity == "error"]
        assert errors == [], errors


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cluster_outputs_name_the_members_of_every_merged_token(packages, precision):
    """New packages carry the encoders' cluster outputs (parity-checked with the rest); the runtime reads them as
    Clusters, and every valid frame / token falls in exactly one cluster of each merged level."""
    import numpy as np
    import torch

    from hbi_runtime.model import load

    path, doc = packages[precision]
    assert {"text_clusters_l1", "video_clusters_ok"} <= {c["name"] for c in doc["parity"]["outputs"]}
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(2, T, 3, 32, 32, generator=g).numpy()
    fmask = np.array([[1] * T, [1] * 3 + [0] * (T - 3)], dtype=np.int64)
    frames[1, 3:] = 0
    with load(path) as model:
        video = model.encode_frames(frames, fmask)
        text = model.encode_text(["a red circle turns green", "a hippopotamus"])
    for side, valid in ((video, fmask.astype(bool)), (text, np.asarray(text.levels[0].mask, bool))):
        assert side.clusters is not None and side.clusters.ok.all()
        for row in range(2):
            for level in (1, 2):
                count = side.levels[level].length
                members = side.clusters.members(row, level, count, valid[row])
                covered = np.sort(np.concatenate(members))
                assert len(members) == count and np.array_equal(covered, np.flatnonzero(valid[row]))


def test_explain_shows_cluster_spans_with_a_new_package(packages, tmp_path):
    from hbi_runtime.cli import app as run_app

    video = tmp_path / "clip.mp4"
    video.write_bytes((Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo" / "samples"
                       / "test_00056.mp4").read_bytes())
    result = runner.invoke(run_app, ["explain", "a red circle turns green", str(video), "-m",
                                     str(packages["fp32"][0]), "--samples", "128", "--format", "json"])
    assert result.exit_code == 0, result.output
    action = json.loads(result.stdout)["levels"][1]
    assert action["clusters_known"] is True
    frames = sorted(f for c in action["cols"] for f in c["frames"])
    assert frames == list(range(T)) and all(c["spans_s"] is not None for c in action["cols"])
    positions = sorted(p for r in action["rows"] for p in r["positions"])
    assert positions == list(range(7))  # start, 5 words, end: every valid token in one cluster


def test_check_command_passes_our_package(packages):
    result = runner.invoke(app, ["check", str(packages["fp16"][0]), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "hbi.check/1"


def test_parity_against_other_weights_fails_loudly_and_marks_the_package(packages, ckpt, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["fp32"][0], pkg)
    result = runner.invoke(app, ["parity", str(pkg), "--checkpoint", str(ckpt / "other")])
    assert result.exit_code == 5, result.output
    assert "FAIL" in result.stdout and "overall: FAIL" in result.stdout
    with pytest.raises(GateFailedError, match="failed"):
        load_package(pkg)
    assert load_package(pkg, allow_unverified=True).manifest.status == "failed"
    # re-checking against the right checkpoint restores it
    assert runner.invoke(app, ["parity", str(pkg), "--checkpoint", str(ckpt / "model")]).exit_code == 0
    assert load_package(pkg).manifest.status == "verified"


def test_edited_graph_or_manifest_is_refused(packages, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["fp32"][0], pkg)
    with open(pkg / "interaction.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MismatchError, match="interaction.onnx was modified"):
        load_package(pkg)
    shutil.rmtree(pkg)
    shutil.copytree(packages["fp32"][0], pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["max_frames"] = 9
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MismatchError, match="manifest.json was edited"):
        load_package(pkg)


def test_parity_with_a_different_architecture_is_a_mismatch(packages, tmp_path):
    init_random(tmp_path / "b16ish", "tiny", seed=0)
    cfg = json.loads((tmp_path / "b16ish" / "config.json").read_text())
    cfg["config"]["text_ratios"] = [0.25, 0.125]
    (tmp_path / "b16ish" / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["parity", str(packages["fp32"][0]), "--checkpoint", str(tmp_path / "b16ish")])
    assert result.exit_code == 4 and "different model" in result.stderr and "text_ratios" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--levels", "1,0"], "--levels must be three"),
    (["--opset", "16"], "opset 16 is too old"),
    (["--max-words", "40"], "--max-words 40 is outside"),
    (["--precision", "int4"], "--precision must be one of"),
])
def test_bad_options_exit_2(ckpt, tmp_path, args, message):
    result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


def test_checkpoint_and_clip_together_or_neither(ckpt, tmp_path):
    both = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--clip", str(ckpt / "model"),
                               "--out", str(tmp_path / "p")])
    neither = runner.invoke(app, ["onnx", "--out", str(tmp_path / "p")])
    assert both.exit_code == neither.exit_code == 2 and "exactly one of --checkpoint and --clip" in both.stderr


def test_existing_package_needs_overwrite(packages, ckpt):
    result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(packages["fp32"][0])])
    assert result.exit_code == 2 and "already exists" in result.stderr
    load_package(packages["fp32"][0])  # untouched


# ---------------------------------------------------------------------------------------------------------------
# --out and --overwrite (hbi_runtime.outputs.prepare_output_dir): never the checkpoint, never a folder of other
# files; a previous package is replaced only once the new one is written and parity-checked


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("where", ["the checkpoint", "a folder holding it", "a symlink to it"])
def test_out_may_not_be_the_checkpoint(ckpt, tmp_path, where):
    source = tmp_path / "models" / "model"
    shutil.copytree(ckpt / "model", source)
    before = _tree(tmp_path)
    out = {"the checkpoint": source, "a folder holding it": source.parent,
           "a symlink to it": tmp_path / "link"}[where]
    if where == "a symlink to it":
        os.symlink(source, out)
        before = _tree(tmp_path)
    result = runner.invoke(app, ["onnx", "--checkpoint", str(source), "--out", str(out), "--overwrite"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(ckpt, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(mine), "--overwrite"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a model package" in result.stderr and "even with --overwrite" in result.stderr
    assert _tree(mine) == {"thesis.tex": b"years of work"}


def test_overwrite_replaces_a_previous_package(packages, ckpt, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["fp16"][0], pkg)
    result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(pkg), "--overwrite",
                                 "--max-words", str(L), "--max-frames", str(T), "--levels", "1,0,0"])
    assert result.exit_code == 0, result.output
    manifest = load_package(pkg).manifest  # verified
    assert manifest.graphs["video_encoder"].precision == "fp32" and manifest.level_weights == (1.0, 0.0, 0.0)
    assert _siblings(pkg) == ["pkg"]  # no temporary or old folder left


def test_an_export_that_fails_midway_leaves_the_previous_package(packages, ckpt, tmp_path, monkeypatch):
    """Parity (the last step of the export, after every file is written) crashes: the package it would have
    replaced is untouched."""
    import hbi_export.onnx.package as package_module
    import hbi_export.onnx.parity as parity_module

    pkg = tmp_path / "pkg"
    shutil.copytree(packages["fp32"][0], pkg)
    before = _tree(pkg)

    def write_package(model, root, **_):  # (the real export takes 15 s; what it writes does not matter here)
        (root / "manifest.json").write_text("{}")

    def check_package(*_, **__):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(package_module, "write_package", write_package)
    monkeypatch.setattr(parity_module, "check_package", check_package)
    result = runner.invoke(app, ["onnx", "--checkpoint", str(ckpt / "model"), "--out", str(pkg), "--overwrite"])
    assert result.exit_code == 1 and "onnxruntime crashed" in result.stderr, result.output
    assert _tree(pkg) == before
    assert _siblings(pkg) == ["pkg"]
