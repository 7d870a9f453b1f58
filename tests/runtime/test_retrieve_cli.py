"""``hbi-run index / retrieve / eval`` end to end on a tiny exported model and generated videos."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_runtime.cli import app
from hbi_runtime.search import recall_metrics

runner = CliRunner()
SOURCES = ["testsrc2", "smptebars", "mandelbrot", "rgbtestsrc", "color=c=red", "color=c=blue"]


def _make_videos(folder):
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    folder.mkdir()
    for i, src in enumerate(SOURCES):
        spec = f"{src}=size=64x48:rate=4" if "=" not in src else f"{src}:size=64x48:rate=4"
        subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", spec, "-t", "3", "-pix_fmt", "yuv420p",
                        "-c:v", "libx264", str(folder / f"v{i}.mp4")], check=True)
    (folder / "broken.mp4").write_bytes(b"this is not a video")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("torch")  # the tiny package is exported here; ci runs this file in the torch venv
    from hbi_export.checkpoints.convert import init_random
    from hbi_export.onnx.package import export_package

    root = tmp_path_factory.mktemp("retrieve")
    init_random(root / "m", "tiny", seed=0)
    export_package(root / "m", root / "pkg", max_words=12, max_frames=8)
    init_random(root / "m2", "tiny", seed=1)
    export_package(root / "m2", root / "pkg2", max_words=12, max_frames=8)
    _make_videos(root / "videos")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no videos here")
    return root


def _run(*args, env=None):
    return runner.invoke(app, list(args), env=env)


@pytest.fixture
def cache_env(tmp_path):
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_index_reports_new_failed_and_then_unchanged(setup, cache_env, tmp_path):
    first = _run("index", str(setup / "videos"), "-m", str(setup / "pkg"), "--format", "json", env=cache_env)
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc["schema"] == "hbi.index/1" and doc["new"] == 6 and len(doc["failed"]) == 1
    assert doc["failed"][0]["path"] == "broken.mp4" and doc["failed"][0]["reason"]
    assert doc["index"].startswith(str(tmp_path / "cache"))  # the per-folder cache, not the video folder
    again = _run("index", str(setup / "videos"), "-m", str(setup / "pkg"), "--format", "json", env=cache_env)
    again = json.loads(again.stdout)  # the broken file is not decoded again, but still listed
    assert again["unchanged"] == 6 and [(f["path"], f["attempted"]) for f in again["failed"]] == [("broken.mp4", False)]
    strict = _run("index", str(setup / "videos"), "-m", str(setup / "pkg"), "--strict",
                  "--rebuild", env=cache_env)
    assert strict.exit_code == 3 and "failed: broken.mp4" in strict.stdout
    assert sorted(p.name for p in (setup / "videos").iterdir()) == ["broken.mp4"] + [f"v{i}.mp4" for i in range(6)]


def test_retrieve_formats_and_why(setup, cache_env):
    args = ["retrieve", "a red screen", "colour bars", "--videos", str(setup / "videos"), "-m", str(setup / "pkg"),
            "--top-k", "3"]
    table = _run(*args, env=cache_env)
    assert table.exit_code == 0, table.output
    assert 'query: "a red screen"' in table.stdout and "best frame" in table.stdout
    doc = json.loads(_run(*args, "--format", "json", env=cache_env).stdout)
    assert doc["schema"] == "hbi.retrieve/2" and len(doc["model_sha256"]) == 64
    hits = doc["queries"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert {w["word"] for w in hits[0]["words"]} == {"a", "red", "screen"}
    assert all(0 <= w["time_s"] < 3 for w in hits[0]["words"])
    lines = _run(*args, "--format", "jsonl", env=cache_env).stdout.strip().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["query"] == "a red screen"
    rows = list(csv.reader(_run(*args, "--format", "csv", env=cache_env).stdout.splitlines()))
    assert rows[0][:4] == ["query", "rank", "score", "path"] and len(rows) == 7


def test_retrieve_scores_equal_the_model_score(setup, cache_env):
    """The index path (int8 storage, scoring engine) ranks as the model's own interaction graph does."""
    import hbi_runtime
    from hbi_runtime.index import Index, default_index_dir, update_index

    with hbi_runtime.load(setup / "pkg") as model:
        index_dir = default_index_dir(setup / "videos", model)
        update_index(model, setup / "videos", index_dir)
        idx = Index.open(index_dir, model.package.manifest_sha256)
        paths = [str(setup / "videos" / row.display) for row in idx.rows]
        encoded = model.encode_videos(paths)
        texts = model.encode_text(["a red screen", "colour bars", "a fractal"])
        want = model.score(texts, encoded.side)
    from hbi_runtime.scoring import score

    got = score(texts, idx.video_store(), level_weights=model.manifest.level_weights)
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


@pytest.mark.parametrize("args,code,message", [
    ([], 2, "no query given"),
    (["", "--videos", "VIDEOS"], 3, "query 1 is empty"),
    (["x", "--videos", "VIDEOS", "--top-k", "0"], 2, "--top-k must be at least 1"),
    (["x"], 2, "exactly one of --videos DIR and --index DIR"),
    (["x", "--videos", "NOWHERE"], 3, "NOWHERE"),
    (["x", "--videos", "VIDEOS", "--levels", "1,0"], 2, "--levels must be three"),
    (["x", "--videos", "EMPTY"], 3, "no video files in"),
])
def test_retrieve_bad_input(setup, cache_env, args, code, message):
    names = {"VIDEOS": "videos", "NOWHERE": "nowhere", "EMPTY": "empty"}
    args = [str(setup / names[a]) if a in names else a for a in args]
    result = _run("retrieve", *args, "-m", str(setup / "pkg"), env=cache_env)
    assert result.exit_code == code, result.output
    assert message.replace("NOWHERE", "nowhere") in result.stderr and "Traceback" not in result.output


def test_index_built_with_another_model_is_refused(setup, cache_env, tmp_path):
    built = _run("index", str(setup / "videos"), "-m", str(setup / "pkg"), "--index", str(tmp_path / "idx"),
                 env=cache_env)
    assert built.exit_code == 0, built.output
    other = _run("retrieve", "x", "--index", str(tmp_path / "idx"), "-m", str(setup / "pkg2"), env=cache_env)
    assert other.exit_code == 4, other.output
    assert "model package" in other.stderr and "hint:" in other.stderr


def test_long_query_is_truncated_with_a_warning(setup, cache_env):
    long = " ".join(["red"] * 40)
    result = _run("retrieve", long, "--videos", str(setup / "videos"), "-m", str(setup / "pkg"), env=cache_env)
    assert result.exit_code == 0, result.output
    assert "truncated" in result.stderr


def test_top_k_larger_than_the_index_shows_all(setup, cache_env):
    result = _run("retrieve", "red", "--videos", str(setup / "videos"), "-m", str(setup / "pkg"), "--top-k", "50",
                  "--format", "json", env=cache_env)
    assert result.exit_code == 0 and len(json.loads(result.stdout)["queries"][0]["hits"]) == 6
    assert "more than the 6 indexed videos" in result.stderr


def test_captions_for_a_video(setup, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red screen\ncolour bars\n\na fractal\n")
    result = _run("retrieve", "--video", str(setup / "videos" / "v0.mp4"), "--captions", str(captions), "-m",
                  str(setup / "pkg"), "--format", "json")
    assert result.exit_code == 0, result.output
    ranked = json.loads(result.stdout)["captions"]
    assert sorted(r["caption"] for r in ranked) == ["a fractal", "a red screen", "colour bars"]
    assert ranked[0]["score"] >= ranked[-1]["score"]
    broken = _run("retrieve", "--video", str(setup / "videos" / "broken.mp4"), "--captions", str(captions), "-m",
                  str(setup / "pkg"))
    assert broken.exit_code == 3 and "broken.mp4" in broken.stderr


def test_eval_reports_recall_metrics(setup, cache_env, tmp_path):
    table = tmp_path / "caps.csv"
    table.write_text("video,caption\n" + "".join(f"v{i},video number {i}\n" for i in range(6)))
    result = _run("eval", "--captions", str(table), "--videos", str(setup / "videos"), "-m", str(setup / "pkg"),
                  "--format", "json", env=cache_env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "hbi.eval/1" and doc["captions"] == 6 and doc["gallery"] == 6
    assert set(doc["t2v"]) == {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"} and doc["t2v"]["R@10"] == 100.0
    missing = tmp_path / "missing.csv"
    missing.write_text("video,caption\nnothere,a caption\n")
    bad = _run("eval", "--captions", str(missing), "--videos", str(setup / "videos"), "-m", str(setup / "pkg"),
               env=cache_env)
    assert bad.exit_code == 3 and "not in the index" in bad.stderr


def test_recall_metrics_by_hand():
    m = recall_metrics(np.array([0, 0, 1, 4, 9, 60]))
    assert m["R@1"] == pytest.approx(100 * 2 / 6, abs=0.01) and m["R@5"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert m["R@10"] == pytest.approx(100 * 5 / 6, abs=0.01) and m["R@50"] == pytest.approx(100 * 5 / 6, abs=0.01)
    assert m["MdR"] == 3.5 and m["MnR"] == pytest.approx(13.33, abs=0.01)
