from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import hbi_runtime
from hbi_runtime.errors import HbiError, UsageError
from hbi_runtime.fileio import replace_dir, write_atomic
from hbi_runtime.outputs import ARTIFACT_KINDS, prepare_output_dir, staged_output_dir


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_plain_open_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "sub" / "manifest.json", '{"a": 1}\n')
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert path.read_text() == '{"a": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_replaces_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "engines.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines.json"]


# ---------------------------------------------------------------------------------------------------------------
# output folders: prepare_output_dir, staged_output_dir, replace_dir


DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (symlinks not followed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _model_package(path: Path, tag: str = "old") -> Path:
    """A folder that passes for a model package (its manifest's fields), with one graph file carrying ``tag``."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "graphs": {}, "tokens_per_level": {},
                                                    "manifest_sha256": "0" * 64}))
    (path / "video_encoder.onnx").write_text(tag)
    return path


@pytest.fixture
def user_files(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    return folder


@pytest.mark.parametrize("path, kind", [
    ("package", "model package"), ("caption", "caption package"), ("qa/package", "QA package"),
    ("checkpoint", "checkpoint folder"), (".", "demo artifact folder"), ("qa", "QA demo folder"),
])
def test_each_shipped_artifact_is_recognised_as_its_own_kind_only(path, kind):
    folder = DEMO / path
    if not folder.is_dir():
        pytest.skip("no demo artifacts")
    assert [k for k, recognise in ARTIFACT_KINDS.items() if recognise(folder)] == [kind]
    assert prepare_output_dir(folder, kind=kind, overwrite=True) == folder  # replaceable with --overwrite
    with pytest.raises(UsageError, match="already exists and holds a") as refused:
        prepare_output_dir(folder, kind=kind)  # ... and only with it
    assert "--overwrite" in refused.value.hint
    for other in set(ARTIFACT_KINDS) - {kind}:
        with pytest.raises(UsageError, match=f"does not hold a {other}"):
            prepare_output_dir(folder, kind=other, overwrite=True)


@pytest.mark.parametrize("where, why", [("same", "is the input"), ("inside", "lies inside the input"),
                                        ("containing", "contains the input")])
def test_out_may_not_be_inside_or_contain_an_input(tmp_path, where, why):
    ckpt = tmp_path / "models" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    out = {"same": ckpt, "inside": ckpt / "pkg", "containing": tmp_path / "models"}[where]
    with pytest.raises(UsageError, match=why) as refused:
        prepare_output_dir(out, kind="model package", inputs=[None, tmp_path / "other.csv", ckpt], overwrite=True)
    assert refused.value.hint and "--out" in refused.value.message
    assert _tree(tmp_path) == {"models/ckpt/model.safetensors": b"weights"}


def test_an_input_file_counts_too(tmp_path):
    captions = tmp_path / "videos" / "captions.csv"
    captions.parent.mkdir()
    captions.write_text("video,caption\n")
    with pytest.raises(UsageError, match="contains the input"):
        prepare_output_dir(tmp_path / "videos", kind="model package", inputs=[captions], overwrite=True)
    with pytest.raises(UsageError, match="is the input"):
        prepare_output_dir(captions, kind="model package", inputs=[captions], overwrite=True)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_symlinked_out_that_leads_to_an_input_is_the_input(tmp_path):
    pkg = _model_package(tmp_path / "pkg")  # an artifact of the right kind: only the input rule can refuse it
    (tmp_path / "link").symlink_to(pkg, target_is_directory=True)
    with pytest.raises(UsageError, match="is the input"):
        prepare_output_dir(tmp_path / "link", kind="model package", inputs=[pkg], overwrite=True)
    (tmp_path / "inner").symlink_to(pkg / "video_encoder.onnx")  # and an input reached through a symlink
    with pytest.raises(UsageError, match="is the input"):
        prepare_output_dir(pkg / "video_encoder.onnx", kind="model package", inputs=[tmp_path / "inner"])


def test_a_file_at_out_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        prepare_output_dir(tmp_path / "out", kind="model package", overwrite=True)
    with pytest.raises(UsageError, match="is not a folder"):  # a file on the way to it
        prepare_output_dir(tmp_path / "out" / "deeper" / "pkg", kind="model package", overwrite=True)
    assert (tmp_path / "out").read_text() == "not a folder"


def test_a_folder_of_other_files_is_refused_even_with_overwrite(user_files):
    before = _tree(user_files)
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="non-empty folder that does not hold a model package") as refused:
            prepare_output_dir(user_files, kind="model package", overwrite=overwrite)
        assert ("even with --overwrite" in refused.value.message) == overwrite
        assert "delete" in refused.value.hint
    assert _tree(user_files) == before


def test_a_new_or_empty_folder_is_fine_without_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty", kind="QA package") == tmp_path / "empty"
    assert prepare_output_dir(tmp_path / "new" / "deeper", kind="QA package") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing written
    with pytest.raises(ValueError, match="unknown artifact kind"):
        prepare_output_dir(tmp_path / "empty", kind="package")


def test_staged_output_dir_replaces_the_previous_artifact_when_complete(tmp_path):
    out = _model_package(tmp_path / "pkg")
    with staged_output_dir(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".pkg.partial-") and not any(stage.iterdir())
        (stage / "manifest.json").write_text("new")
        assert (out / "video_encoder.onnx").read_text() == "old"  # untouched until the block completes
    assert _tree(out) == {"manifest.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temporary or old folder left


def test_a_failure_inside_staged_output_dir_keeps_the_previous_artifact(tmp_path):
    out = _model_package(tmp_path / "pkg")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="export crashed"), staged_output_dir(out) as stage:
        (stage / "manifest.json").write_text("half")
        raise RuntimeError("export crashed")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    with pytest.raises(KeyboardInterrupt), staged_output_dir(tmp_path / "fresh") as stage:  # an interrupt too
        (stage / "manifest.json").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_failed_swap_is_rolled_back(tmp_path, monkeypatch):
    out = _model_package(tmp_path / "pkg")
    before = _tree(out)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".pkg.partial-"):  # moving the new folder into place fails
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"), staged_output_dir(out) as stage:
        (stage / "manifest.json").write_text("new")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_failed_rollback_says_where_the_previous_artifact_is(tmp_path, monkeypatch):
    out = _model_package(tmp_path / "pkg")
    new = tmp_path / ".pkg.partial-x"
    new.mkdir()
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith((".pkg.partial-", ".pkg.old-")):  # the swap and its undo both fail
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(HbiError, match="the previous one is .*\\.pkg\\.old-") as failed:
        replace_dir(new, out)
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".pkg.old-")]
    assert len(old) == 1 and old[0].name in failed.value.hint and _tree(old[0])["video_encoder.onnx"] == b"old"


def test_a_crash_between_the_two_renames_leaves_both_artifacts(tmp_path, monkeypatch):
    """The documented window: a process killed after moving the previous artifact aside, before moving the new one
    in. What the folder holds at that instant (recorded when the second rename starts) is what a kill leaves."""
    out = _model_package(tmp_path / "pkg")
    new = _model_package(tmp_path / ".pkg.partial-x", tag="new")
    real_rename = os.rename
    at_kill = {}

    def rename(src, dst):
        if Path(src) == new:
            at_kill.update({p.name: _tree(p) for p in tmp_path.iterdir()})
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    replace_dir(new, out)
    old = [name for name in at_kill if name.startswith(".pkg.old-")]
    assert "pkg" not in at_kill and len(old) == 1 and len(at_kill) == 2
    assert at_kill[old[0]]["video_encoder.onnx"] == b"old" and at_kill[".pkg.partial-x"]["video_encoder.onnx"] == b"new"
    assert _tree(out)["video_encoder.onnx"] == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_symlink_at_out_is_replaced_not_followed(tmp_path):
    target = _model_package(tmp_path / "elsewhere")
    (tmp_path / "pkg").symlink_to(target, target_is_directory=True)
    prepare_output_dir(tmp_path / "pkg", kind="model package", overwrite=True)
    with staged_output_dir(tmp_path / "pkg") as stage:
        (stage / "manifest.json").write_text("new")
    assert not (tmp_path / "pkg").is_symlink() and _tree(tmp_path / "pkg") == {"manifest.json": b"new"}
    assert _tree(target)["video_encoder.onnx"] == b"old"


def test_out_given_as_dot_is_written_in_place(tmp_path, monkeypatch):
    work = _model_package(tmp_path / "pkg")
    monkeypatch.chdir(work)
    prepare_output_dir(".", kind="model package", overwrite=True)
    with staged_output_dir(".") as stage:
        (stage / "manifest.json").write_text("new")
    assert _tree(tmp_path / "pkg") == {"manifest.json": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_place_where_no_folder_can_be_made_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot create a folder in"), staged_output_dir(tmp_path / "file" / "pkg"):
        pass
    assert (tmp_path / "file").read_text() == "x"
