"""QA export: PyTorch vs ONNX Runtime logits (fp32, 1e-4), the package contract, and the runtime on that package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hbi_export.cli import app as export_app
from hbi_export.tasks.qa import QAConfig, QAModel
from hbi_export.tasks.qa_checkpoint import save_qa_model
from hbi_runtime.errors import EXIT_USAGE, GateFailedError, MismatchError
from hbi_runtime.tasks.qa import load_qa
from hbi_runtime.package import MANIFEST_NAME
from hbi_runtime.tasks.qa_package import QA_MANIFEST, load_qa_package, update_qa_status
from hbi_training.cli import app as train_app

pytestmark = pytest.mark.slow  # three ONNX exports: 20 s on an idle 2-core machine, minutes on a busy one

L, T = 8, 4
ANSWERS = ["red", "green", "blue", "square", "circle", "left", "two"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny QA model saved in our QA format with its answers.json, exported through `hbi-export qa-export`."""
    torch.manual_seed(0)
    model = QAModel(QAConfig.tiny(answers=len(ANSWERS), proj_dim=16, hidden_dim=32)).eval()
    root = tmp_path_factory.mktemp("qa")
    save_qa_model(model, root / "ckpt")
    (root / "ckpt" / "answers.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    result = CliRunner().invoke(export_app, ["qa-export", "--checkpoint", str(root / "ckpt"), "--out",
                                             str(root / "pkg"), "--max-words", str(L), "--max-frames", str(T),
                                             "--format", "json"])
    assert result.exit_code == 0, result.output
    return model, root / "pkg", json.loads(result.stdout)


def test_parity_verdict_recorded(exported):
    _, out, summary = exported
    assert summary["schema"] == "hbi.qa-export/1" and summary["status"] == "verified"
    assert summary["parity"]["ok"] and summary["answers"] == len(ANSWERS)
    pkg = load_qa_package(out)
    assert summary["model_sha256"] == pkg.manifest_sha256
    assert pkg.manifest.source["format"] == "hbi-toolkit-qa"
    assert pkg.manifest.status == "verified" and pkg.answers == tuple(ANSWERS)
    assert sorted(pkg.manifest.graphs) == ["answer_head", "question_encoder", "video_encoder"]
    assert json.loads((out / "answers.json").read_text()) == {a: i for i, a in enumerate(ANSWERS)}
    # the one package format: manifest.json of kind "qa", every file listed with its sha256 in "files"
    body = json.loads((out / MANIFEST_NAME).read_text())
    assert body["kind"] == "qa" and body["schema_version"] == 2 and not (out / QA_MANIFEST).exists()
    assert sorted(body["files"]) == ["answers.json", "tokenizer/bpe_simple_vocab_16e6.txt.gz"]
    assert not pkg.legacy and pkg.manifest_sha256 == body["manifest_sha256"]


def test_runtime_logits_match_pytorch(exported):
    """Fresh inputs (not the parity ones), through the torch-free runtime: logits within 1e-4, same argmax."""
    model, out, _ = exported
    g = torch.Generator().manual_seed(7)
    frames = torch.randn(3, T, 3, 32, 32, generator=g)
    fmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    frames[fmask == 0] = 0
    questions = ["what colour is the square?", "what does the circle do?", "how many shapes?"]  # fit L = 8
    with load_qa(out) as qa:
        q_vecs, truncated = qa.encode_questions(questions)
        v_vecs = qa.encode_frames(frames.numpy(), fmask.numpy())
        got = qa.logits(q_vecs, v_vecs)
        ids, mask, _ = qa.tokenizer(questions)
    assert truncated == [False, False, False]
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask), frames, fmask).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def test_tampered_packages_refused(exported, tmp_path):
    _, out, _ = exported
    copy = tmp_path / "pkg"
    shutil.copytree(out, copy)
    (copy / "answers.json").write_text(json.dumps({a: i for i, a in enumerate(reversed(ANSWERS))}))
    with pytest.raises(MismatchError, match="modified after export"):
        load_qa_package(copy)
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    body = json.loads((copy / MANIFEST_NAME).read_text())
    body["answer_weights"] = [1.0, 0.0, 0.0]
    (copy / MANIFEST_NAME).write_text(json.dumps(body))
    with pytest.raises(MismatchError, match="edited after export"):
        load_qa_package(copy)


def test_unverified_package_refused_unless_allowed(exported, tmp_path):
    _, out, _ = exported
    copy = tmp_path / "pkg"
    shutil.copytree(out, copy)
    update_qa_status(copy, "failed", None)  # the one sanctioned manifest edit
    with pytest.raises(GateFailedError, match=r"failed its parity check .*status 'failed'"):
        load_qa_package(copy)
    assert load_qa_package(copy, allow_unverified=True).manifest.status == "failed"


def test_retrieval_package_is_not_a_qa_package(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(MismatchError, match=r"holds a model package \(kind 'retrieval'\), not a QA package"):
        load_qa_package(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# --out and --overwrite (hbi_runtime.outputs.prepare_output_dir): never the checkpoint or the answers file, never a
# folder of other files; a previous QA package is replaced only once the new one is written and parity-checked


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("command", [(train_app, "qa", "export"), (export_app, "qa-export")],
                         ids=["train-deprecated-alias", "export"])
@pytest.mark.parametrize("where", ["the checkpoint", "a folder holding it", "the answers file's folder"])
def test_out_may_not_be_an_input(exported, tmp_path, command, where):
    _, out, _ = exported
    ckpt = tmp_path / "models" / "ckpt"
    shutil.copytree(out.parent / "ckpt", ckpt)
    answers = tmp_path / "vocab" / "answers.json"
    answers.parent.mkdir()
    shutil.copy(ckpt / "answers.json", answers)
    before = _tree(tmp_path)
    target = {"the checkpoint": ckpt, "a folder holding it": ckpt.parent, "the answers file's folder": answers.parent}
    app, *name = command
    result = CliRunner().invoke(app, [*name, "--checkpoint", str(ckpt), "--answers", str(answers), "--out",
                                      str(target[where]), "--overwrite"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(exported, tmp_path):
    _, out, _ = exported
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(export_app, ["qa-export", "--checkpoint", str(out.parent / "ckpt"), "--out",
                                             str(mine), "--overwrite"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a QA package" in result.stderr and "even with --overwrite" in result.stderr
    assert _tree(mine) == {"notes.txt": b"keep me"}


def test_overwrite_replaces_a_previous_qa_package(exported, tmp_path):
    _, out, _ = exported
    pkg = tmp_path / "pkg"
    shutil.copytree(out, pkg)
    result = CliRunner().invoke(export_app, ["qa-export", "--checkpoint", str(out.parent / "ckpt"), "--out",
                                             str(pkg), "--overwrite", "--max-words", str(L), "--max-frames", "6"])
    assert result.exit_code == 0, result.output
    manifest = load_qa_package(pkg).manifest  # verified
    assert manifest.max_frames == 6 and load_qa_package(out).manifest.max_frames == T
    assert _siblings(pkg) == ["pkg"]  # no temporary or old folder left


def test_an_export_that_fails_midway_leaves_the_previous_qa_package(exported, tmp_path, monkeypatch):
    """Parity (the last step, after every file is written) crashes: the package it would replace is untouched."""
    from hbi_export.tasks import qa_export

    _, out, _ = exported
    pkg = tmp_path / "pkg"
    shutil.copytree(out, pkg)
    before = _tree(pkg)

    def write_qa_package(model, root, **_):  # (the real export takes seconds; what it writes does not matter)
        (root / MANIFEST_NAME).write_text("{}")

    def compare_qa_package(*_, **__):
        raise RuntimeError("onnxruntime crashed")

    monkeypatch.setattr(qa_export, "write_qa_package", write_qa_package)
    monkeypatch.setattr(qa_export, "compare_qa_package", compare_qa_package)
    result = CliRunner().invoke(export_app, ["qa-export", "--checkpoint", str(out.parent / "ckpt"), "--out",
                                             str(pkg), "--overwrite"])
    assert result.exit_code == 1 and "onnxruntime crashed" in result.stderr, result.output
    assert _tree(pkg) == before
    assert _siblings(pkg) == ["pkg"]
