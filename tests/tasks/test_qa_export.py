"""QA export: PyTorch vs ONNX Runtime logits (fp32, 1e-4), the package contract, and the runtime on that package."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hbi_export.checkpoints.qa import save_qa_model
from hbi_export.tasks.qa import QAConfig, QAModel
from hbi_runtime.errors import GateFailedError, MismatchError
from hbi_runtime.tasks.qa import load_qa
from hbi_runtime.tasks.qa_package import QA_MANIFEST, load_qa_package, update_qa_status
from hbi_training.cli import app as train_app

pytestmark = pytest.mark.slow  # three ONNX exports: 20 s on an idle 2-core machine, minutes on a busy one

L, T = 8, 4
ANSWERS = ["red", "green", "blue", "square", "circle", "left", "two"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny QA model saved in our QA format with its answers.json, exported through `hbi-train qa export`."""
    torch.manual_seed(0)
    model = QAModel(QAConfig.tiny(answers=len(ANSWERS), proj_dim=16, hidden_dim=32)).eval()
    root = tmp_path_factory.mktemp("qa")
    save_qa_model(model, root / "ckpt")
    (root / "ckpt" / "answers.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    result = CliRunner().invoke(train_app, ["qa", "export", "--checkpoint", str(root / "ckpt"), "--out",
                                            str(root / "pkg"), "--max-words", str(L), "--max-frames", str(T),
                                            "--json"])
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
    body = json.loads((copy / QA_MANIFEST).read_text())
    body["answer_weights"] = [1.0, 0.0, 0.0]
    (copy / QA_MANIFEST).write_text(json.dumps(body))
    with pytest.raises(MismatchError, match="edited after export"):
        load_qa_package(copy)


def test_unverified_package_refused_unless_allowed(exported, tmp_path):
    _, out, _ = exported
    copy = tmp_path / "pkg"
    shutil.copytree(out, copy)
    update_qa_status(copy, "failed", None)  # the one sanctioned manifest edit
    with pytest.raises(GateFailedError, match="parity status 'failed'"):
        load_qa_package(copy)
    assert load_qa_package(copy, allow_unverified=True).manifest.status == "failed"


def test_retrieval_package_is_not_a_qa_package(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(MismatchError, match="retrieval model package"):
        load_qa_package(tmp_path)
