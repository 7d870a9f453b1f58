"""Where the hbi-train exports and the demos write (hbi_runtime.outputs.prepare_output_dir / staged_output_dir).

``caption --export`` and ``caption-joint --export`` are checked before any training; ``caption-joint-export``,
``python -m hbi_training.demo`` and ``qa demo`` never write over their inputs or over a folder of other files, and
replace a previous artifact folder only once the new one is complete. The artifact builders themselves (package
exports, parity, the runtime measurements) are replaced by stand-ins here: they are exercised for real by
test_caption_demo.py, tests/tasks and tests/export; what is tested is where, and when, the folder is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from hbi_training import demo, joint, qa  # (ruff files hbi_training with the third-party packages)
from hbi_training.caption_cli import register_export
from hbi_training.cli import app
from typer.testing import CliRunner

from hbi_runtime.cli_options import make_app
from hbi_runtime.errors import EXIT_USAGE, UsageError

runner = CliRunner()
export_app = make_app("hbi-export", "the caption exports, as hbi-export registers them")
register_export(export_app)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _model_manifest(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "graphs": {}, "tokens_per_level": {},
                                                      "manifest_sha256": "0" * 64}))


def _demo_folder(path: Path, tag: str) -> Path:
    """What ``write_artifacts`` leaves (a model package in package/ beside README.txt), marked with ``tag``."""
    _model_manifest(path / "package")
    (path / "checkpoint").mkdir()
    (path / "checkpoint" / "model.safetensors").write_text(tag)
    (path / "README.txt").write_text(tag)
    return path


def _qa_demo_folder(path: Path, tag: str) -> Path:
    (path / "package").mkdir(parents=True)
    (path / "package" / "qa_manifest.json").write_text(json.dumps({"kind": "hbi-qa", "manifest_sha256": "0" * 64}))
    (path / "README.txt").write_text(tag)
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    """Passes for a synthetic set where only ``manifest.json`` is looked at (check_data)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "train.csv").write_text("video,caption\n")
    return folder


@pytest.fixture
def user_files(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished caption-joint run folder, as far as write_joint_artifacts reads it before the builders."""
    folder = tmp_path / "run"
    (folder / "final").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"test_t2v_r1": 50.0, "train_seconds": 1.0}))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# hbi-train caption --export, caption-joint --export: refused before training


@pytest.mark.parametrize("command", ["caption", "caption-joint"])
@pytest.mark.parametrize("where", ["the data set", "the run folder", "a folder of other files"])
def test_a_refused_export_folder_costs_no_training(tmp_path, data, user_files, command, where):
    out = tmp_path / "runs" / "r"
    export = {"the data set": data, "the run folder": out / "export", "a folder of other files": user_files}[where]
    before = _tree(tmp_path)
    result = runner.invoke(app, [command, "--data", str(data), "--out", str(out), "--export", str(export)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert ("the input" if where != "a folder of other files" else "does not hold a") in result.stderr
    assert _tree(tmp_path) == before and not out.exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------------------------------------------
# hbi-export caption-joint-export (write_joint_artifacts)


@pytest.mark.parametrize("where", ["the run folder", "a folder inside it", "the data set"])
def test_joint_export_refuses_its_inputs(tmp_path, run, data, where):
    before = _tree(tmp_path)
    out = {"the run folder": run, "a folder inside it": run / "final", "the data set": data}[where]
    result = runner.invoke(export_app, ["caption-joint-export", "--run", str(run), "--data", str(data), "--out",
                                        str(out)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_joint_export_refuses_a_folder_of_other_files(tmp_path, run, data, user_files):
    result = runner.invoke(export_app, ["caption-joint-export", "--run", str(run), "--data", str(data), "--out",
                                        str(user_files)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a demo artifact folder" in result.stderr
    assert _tree(user_files) == {"notes.txt": b"keep me"}


@pytest.fixture
def joint_builders(monkeypatch):
    """Stand-ins for the exports and measurements of write_joint_artifacts; ``failing["caption"]`` makes the
    caption export fail after the retrieval part of the folder is written."""
    import hbi_training.caption

    import hbi_export.tasks.decoder

    failing = {"caption": False}

    def build_artifacts(dest, **_):
        _demo_folder(dest, "new")
        return {"package_t2v_r1": 0.5, "queries_first": 1, "queries": 1, "joint": {}}, []

    def export_run(decoder_dir, package, out, data_dir, **_):
        _model_manifest(out)
        if failing["caption"]:
            raise RuntimeError("caption parity crashed")
        return {"status": "verified"}

    decoder = SimpleNamespace(config=SimpleNamespace(to_dict=dict), parameters=list)
    monkeypatch.setattr(demo, "build_artifacts", build_artifacts)
    monkeypatch.setattr(hbi_training.caption, "export_run", export_run)
    monkeypatch.setattr(hbi_export.tasks.decoder, "load_decoder", lambda _: (decoder, {}))
    monkeypatch.setattr(joint, "runtime_caption_figures", lambda *_: {"attribute_accuracy": 0.5,
                                                                      "qa_exact_match": 0.5})
    monkeypatch.setattr(joint, "caption_readme", lambda *_: "caption")
    return failing


def test_joint_export_replaces_a_previous_artifact_folder(tmp_path, run, data, joint_builders):
    dest = _demo_folder(tmp_path / "artifacts", "old")
    joint.write_joint_artifacts(run, dest, data, history=["h"], command="c")
    assert _tree(dest)["README.txt"] == b"new" and (dest / "caption" / "README.txt").read_text() == "caption"
    assert _tree(dest)["checkpoint/model.safetensors"] == b"new"
    assert _siblings(dest) == ["artifacts", "data", "run"]  # no temporary or old folder left


def test_a_joint_export_that_fails_in_the_caption_stage_leaves_the_previous_folder(tmp_path, run, data,
                                                                                   joint_builders):
    """The retrieval package, checkpoint and samples are written, then the caption export fails: the previous
    folder stays as it was (not the new retrieval part without its caption/)."""
    dest = _demo_folder(tmp_path / "artifacts", "old")
    before = _tree(dest)
    joint_builders["caption"] = True
    with pytest.raises(RuntimeError, match="caption parity crashed"):
        joint.write_joint_artifacts(run, dest, data, history=["h"], command="c")
    assert _tree(dest) == before
    assert _siblings(dest) == ["artifacts", "data", "run"]


def test_the_decoder_stage_records_the_final_folder_not_the_temporary_one(tmp_path, run, data, joint_builders,
                                                                           monkeypatch):
    import hbi_training.caption

    seen = {}

    def train_caption(settings, progress=None):
        seen["settings"] = settings
        return {"decoder": str(tmp_path / "decoder"), "train_videos": 1, "train_seconds": 1.0,
                "settings": {"steps": 1, "batch_size": 1, "lr": 1.0, "token_dropout": 0.0, "frame_deltas": False}}

    monkeypatch.setattr(hbi_training.caption, "train_caption", train_caption)
    monkeypatch.setattr(demo, "readme", lambda *_: "readme")
    monkeypatch.setattr(demo, "pick_samples", lambda *_: [])
    dest = tmp_path / "artifacts"
    joint.write_joint_artifacts(run, dest, data, history=["h"], command="c", decoder_stage={"patch_grid": 2})
    s = seen["settings"]
    assert s.package.parent.name.startswith(".artifacts.partial-")  # it trained on the folder being built ...
    recorded = {k: hbi_training.caption._recorded(getattr(s, k), s.recorded_as) for k in ("package", "checkpoint")}
    assert recorded == {"package": str(dest / "package"), "checkpoint": str(dest / "checkpoint")}  # ... named final


# ---------------------------------------------------------------------------------------------------------------
# python -m hbi_training.demo (write_artifacts)


def test_demo_refuses_artifacts_in_its_work_folder_before_rendering_anything(tmp_path, capsys):
    work = tmp_path / "w"
    assert demo.main(["--out", str(work), "--artifacts", str(work / "artifacts")]) == EXIT_USAGE
    assert "lies inside the input" in capsys.readouterr().err and not work.exists()


@pytest.mark.parametrize("where", ["the data set", "the checkpoint", "a folder of other files"])
def test_write_artifacts_refuses_its_inputs_and_other_files(tmp_path, data, user_files, where):
    final = tmp_path / "hbi" / "final"
    final.mkdir(parents=True)
    before = _tree(tmp_path)
    dest = {"the data set": data, "the checkpoint": final.parent, "a folder of other files": user_files}[where]
    with pytest.raises(UsageError, match="the input" if where != "a folder of other files" else "does not hold"):
        demo.write_artifacts(dest, data=data, final=final, recipe=demo.DemoRecipe(), seed=0, summary={}, ablation=None)
    assert _tree(tmp_path) == before


@pytest.fixture
def demo_builder(monkeypatch):
    def build_artifacts(tmp, **_):
        _demo_folder(tmp, "new")
        return {"bytes": 1}, [{"rank": 1}]

    monkeypatch.setattr(demo, "build_artifacts", build_artifacts)


def test_write_artifacts_replaces_a_previous_demo_folder(tmp_path, data, demo_builder):
    dest = _demo_folder(tmp_path / "artifacts", "old")
    (dest / "stale.txt").write_text("of the old demo")
    assert demo.write_artifacts(dest, data=data, final=tmp_path / "final", recipe=demo.DemoRecipe(), seed=0,
                                summary={}, ablation=None) == {"bytes": 1}
    assert sorted(_tree(dest)) == ["README.txt", "checkpoint/model.safetensors", "package/manifest.json"]
    assert _tree(dest)["README.txt"] == b"new" and _siblings(dest) == ["artifacts", "data"]


@pytest.mark.parametrize("swap", ["demo", "qa"])
def test_a_failed_swap_leaves_the_previous_demo_folder(tmp_path, data, monkeypatch, demo_builder, swap):
    """The new folder is complete, moving it into place fails: the previous folder is as it was."""
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in Path(src).name:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    make = _demo_folder if swap == "demo" else _qa_demo_folder
    dest = make(tmp_path / "artifacts", "old")
    before = _tree(dest)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        if swap == "demo":
            demo.write_artifacts(dest, data=data, final=tmp_path / "final", recipe=demo.DemoRecipe(), seed=0,
                                 summary={}, ablation=None)
        else:
            _qa_demo(tmp_path, data, dest, monkeypatch)
    assert _tree(dest) == before
    assert "artifacts" in _siblings(dest) and not [n for n in _siblings(dest) if n.startswith(".artifacts")]


# ---------------------------------------------------------------------------------------------------------------
# hbi-train qa demo (hbi_training.qa.run_demo)


def _qa_demo(tmp_path: Path, data: Path, artifacts: Path, monkeypatch) -> dict:
    """run_demo on a finished run, with stand-ins for the data set, the model and the artifact builder."""
    import hbi_training.data

    import hbi_export.tasks.qa_checkpoint

    trained = tmp_path / "trained"
    trained.mkdir(exist_ok=True)
    (trained / "summary.json").write_text(json.dumps({"test": {}}))

    def build_qa_artifacts(tmp, model, summary, **_):
        _qa_demo_folder(tmp, "new")
        return {"bytes": 1}

    monkeypatch.setattr(hbi_training.data, "generate", lambda root, *_: SimpleNamespace(root=Path(root)))
    monkeypatch.setattr(hbi_export.tasks.qa_checkpoint, "build_qa_model", lambda *_: (object(), None, None))
    monkeypatch.setattr(qa, "build_qa_artifacts", build_qa_artifacts)
    (tmp_path / "qa-run").mkdir(exist_ok=True)
    return qa.run_demo(data, tmp_path / "qa-run", artifacts=artifacts, trained=trained)


@pytest.mark.parametrize("where", ["the data set", "the run folder", "the demo samples' folder",
                                   "a folder of other files"])
def test_qa_demo_refuses_its_inputs_before_rendering_anything(tmp_path, data, user_files, monkeypatch, where):
    shipped = _demo_folder(tmp_path / "demo", "shipped")  # stands for hbi_runtime/data/demo, whose samples it reads
    (shipped / "samples").mkdir()
    monkeypatch.setattr(qa, "DEMO_DIR", shipped)
    out = tmp_path / "qa-run"
    artifacts = {"the data set": data, "the run folder": out, "the demo samples' folder": shipped,
                 "a folder of other files": user_files}[where]
    before = _tree(tmp_path)
    result = runner.invoke(app, ["qa", "demo", "--data", str(data), "--out", str(out), "--artifacts", str(artifacts)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert ("does not hold a QA demo folder" if where == "a folder of other files" else "the input") in result.stderr
    assert _tree(tmp_path) == before and not out.exists()


def test_qa_demo_replaces_a_previous_qa_demo_folder_but_not_a_retrieval_demo(tmp_path, data, monkeypatch):
    dest = _qa_demo_folder(tmp_path / "qa", "old")
    assert _qa_demo(tmp_path, data, dest, monkeypatch) == {"bytes": 1}
    assert _tree(dest)["README.txt"] == b"new" and not [n for n in _siblings(dest) if n.startswith(".qa")]
    retrieval = _demo_folder(tmp_path / "retrieval-demo", "old")
    before = _tree(retrieval)
    with pytest.raises(UsageError, match="does not hold a QA demo folder"):
        _qa_demo(tmp_path, data, retrieval, monkeypatch)
    assert _tree(retrieval) == before
