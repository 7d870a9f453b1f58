"""``hbi-export calibrate`` end to end on the demo model and its real sample videos (no torch needed).

The demo package (hbi_runtime/data/demo) is a trained model, and its eight samples are real H.264 files decoded
through hbi_runtime.video; queries.json gives a caption per sample, so the gate can be run with and without
captions. Each calibration takes ~5 s on 2 cores, so the runs are module fixtures shared by the tests.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import hbi_runtime
from hbi_export.cli import app
from hbi_runtime.compare import compare_tensors
from hbi_runtime.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_MISMATCH, EXIT_USAGE, UsageError
from hbi_runtime.names import display_path, parse_display_path
from hbi_runtime.package import MANIFEST_NAME, load_package, sha256_file

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"
PKG, SAMPLES = DEMO / "package", DEMO / "samples"
runner = CliRunner()
DEMO_PRODUCTS = 50  # MatMul/Gemm/Conv of the demo video encoder (counted in the written graph below)


def _calibrate(*args: str):
    return runner.invoke(app, ["calibrate", str(PKG), "--workers", "1", *args])


@pytest.fixture(scope="module")
def captions_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("caps") / "captions.csv"
    queries = json.loads((DEMO / "queries.json").read_text())["queries"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows((q["expected"], q["query"]) for q in queries)
    return path


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> tuple[Path, dict]:
    """ort-cpu, minmax, no captions."""
    out = tmp_path_factory.mktemp("int8") / "pkg"
    result = _calibrate("--videos", str(SAMPLES), "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def int8_trt(tmp_path_factory, captions_csv) -> tuple[Path, dict]:
    """tensorrt target, percentile, with captions, half the videos held out."""
    out = tmp_path_factory.mktemp("trt") / "pkg"
    result = _calibrate("--videos", str(SAMPLES), "--captions", str(captions_csv), "--target", "tensorrt",
                        "--method", "percentile", "--holdout", "0.5", "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _video_graph(pkg: Path):
    return onnx.load(str(pkg / "video_encoder.onnx"))


# ---------------------------------------------------------------------------------------------------------------
# the INT8 package


@pytest.mark.slow
def test_calibration_writes_a_gated_int8_package(int8):
    out, report = int8
    assert report["schema"] == "hbi.calibrate/1" and report["outcome"] == "int8"
    package = load_package(out)  # verified, hashes match
    assert report["package_sha256"] == package.manifest_sha256
    graphs = package.manifest.graphs
    assert graphs["video_encoder"].precision == "int8"
    assert graphs["text_encoder"].precision == "fp32" and graphs["interaction"].precision == "fp32"
    source = load_package(PKG).manifest.graphs
    assert graphs["text_encoder"].sha256 == source["text_encoder"].sha256  # untouched
    assert graphs["video_encoder"].sha256 != source["video_encoder"].sha256
    stored = package.manifest.calibration
    assert stored["gate"] == report["gate"] and stored["outcome"] == "int8"
    assert stored["data"]["calibration_decoded"] == 6 and stored["data"]["held_out_decoded"] == 2
    assert len(stored["data"]["held_out"]) == 2
    attempt = report["gate"]["attempts"][0]
    # the report's count is the number of products the written graph feeds from DequantizeLinear (every vision,
    # temporal and projection product of the demo model's video encoder: 50 since its 4-layer vision tower)
    nodes = list(_video_graph(out).graph.node)
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    fed = [n for n in nodes if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in dq for i in n.input)]
    assert attempt["passed"] and attempt["quantized_nodes"] == len(fed) == DEMO_PRODUCTS and attempt["float_nodes"] == []


@pytest.mark.slow
def test_qdq_graph_keeps_transformer_sensitive_ops_in_float(int8):
    out, _ = int8
    model = _video_graph(out)
    nodes = list(model.graph.node)
    dq_outputs = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    q_nodes = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert q_nodes and dq_outputs
    for n in nodes:
        if n.op_type in ("LayerNormalization", "Softmax", "Add", "TokenMerge", "Mul", "Div", "Sigmoid"):
            assert not dq_outputs & set(n.input), f"{n.op_type} {n.name} reads a quantized tensor"
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    assert all(dq_outputs & set(n.input) for n in matmuls)  # every MatMul quantized (attempt 1)
    # the merge math: the model-local function bodies are the source's, byte for byte
    source = _video_graph(PKG)
    assert [f.SerializeToString() for f in model.functions] == [f.SerializeToString() for f in source.functions]
    # ort-cpu: uint8 activations, int8 per-channel weights
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q_nodes]
    assert {z.data_type for z in zero_points} == {onnx.TensorProto.UINT8}
    weight_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq
               if inits[n.input[0]].dims[-1] > 1)  # one scale per output channel


@pytest.mark.slow
def test_tensorrt_target_is_symmetric_int8(int8_trt):
    out, report = int8_trt
    model = _video_graph(out)
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any(), n.name
    assert report["scheme"]["target"] == "tensorrt" and report["method"] == "percentile"


@pytest.mark.slow
def test_int8_package_runs_through_the_runtime(int8, tmp_path):
    out, _ = int8
    files = sorted(str(p) for p in SAMPLES.glob("*.mp4"))
    with hbi_runtime.load(PKG) as ref, hbi_runtime.load(out) as test:
        a, b = ref.encode_videos(files, workers=1), test.encode_videos(files, workers=1)
        assert not a.errors and not b.errors
        cos = compare_tensors("tokens", a.side.levels[0].tokens, b.side.levels[0].tokens).cosine_min
        assert 0.99 < cos < 1.0  # quantized (not identical), and close
        queries = [q["query"] for q in json.loads((DEMO / "queries.json").read_text())["queries"]]
        top_ref = ref.score(ref.encode_text(queries), a.side).argmax(axis=1)
        top_test = test.score(test.encode_text(queries), b.side).argmax(axis=1)
    assert (top_ref == top_test).mean() >= 0.9
    from hbi_runtime.cli import app as run_app

    expected = json.loads((DEMO / "queries.json").read_text())["queries"][0]
    result = CliRunner().invoke(run_app, ["retrieve", expected["query"], "--videos", str(SAMPLES), "-m", str(out),
                                          "--top-k", "1", "-f", "json", "--workers", "1"],
                                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model_sha256"] == load_package(out).manifest_sha256
    assert Path(doc["queries"][0]["hits"][0]["path"]).name == expected["expected"]


@pytest.mark.slow
def test_an_index_built_with_the_int8_package_is_queried_with_it_never_with_its_source(int8, tmp_path):
    # the documented use of a calibrated package (docs/calibration.md, "Using an INT8 package"): --model PKG-int8
    # for index and retrieve alike; the index is tied to the INT8 package's manifest, so its source is refused
    from hbi_runtime.cli import app as run_app

    out, _ = int8
    index, env = tmp_path / "index", {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    built = CliRunner().invoke(run_app, ["index", str(SAMPLES), "--index", str(index), "-m", str(out),
                                         "--workers", "1"], env=env)
    assert built.exit_code == 0, built.output
    expected = json.loads((DEMO / "queries.json").read_text())["queries"][0]
    ok = CliRunner().invoke(run_app, ["retrieve", expected["query"], "--index", str(index), "-m", str(out),
                                      "--top-k", "1", "-f", "json"], env=env)
    assert ok.exit_code == 0, ok.output
    assert Path(json.loads(ok.stdout)["queries"][0]["hits"][0]["path"]).name == expected["expected"]
    refused = CliRunner().invoke(run_app, ["retrieve", expected["query"], "--index", str(index), "-m", str(PKG)],
                                 env=env)
    assert refused.exit_code == EXIT_MISMATCH, refused.output
    assert load_package(out).manifest_sha256 in refused.output and "--rebuild" in refused.output


# ---------------------------------------------------------------------------------------------------------------
# the gate


@pytest.mark.slow
def test_gate_recall_matches_an_independent_measurement(int8_trt, captions_csv):
    """The report's R@1 of both packages, recomputed here through hbi_runtime on the held-out videos."""
    out, report = int8_trt
    gate = report["gate"]
    assert gate["criterion"].startswith("t2v R@1 drop") and gate["passed"]
    held = [str(SAMPLES / rel) for rel in report["data"]["held_out"]]
    assert len(held) == 4
    pairs = [(r["video"], r["caption"]) for r in csv.DictReader(open(captions_csv))]
    texts = [c for v in held for name, c in pairs if name == Path(v).name]
    truth = np.array([i for i, v in enumerate(held) for name, _ in pairs if name == Path(v).name])
    recall = {}
    for name, pkg in (("reference", PKG), ("int8", out)):
        with hbi_runtime.load(pkg) as model:
            scores = model.score(model.encode_text(texts), model.encode_videos(held, workers=1).side)
        rank = (scores > scores[np.arange(len(truth)), truth][:, None]).sum(axis=1)
        recall[name] = 100 * float((rank == 0).mean())
    metrics = gate["attempts"][-1]["metrics"]
    assert metrics["scores"]["captions"] == len(texts)
    assert metrics["recall"]["reference"]["R@1"] == pytest.approx(recall["reference"], abs=0.01)
    assert metrics["recall"]["int8"]["R@1"] == pytest.approx(recall["int8"], abs=0.01)
    assert metrics["recall"]["r1_drop"] == pytest.approx(recall["reference"] - recall["int8"], abs=0.01)


class _Steps:
    """Stands for hbi_runtime.cli_options.Steps: records every step, shown or not."""

    made: list = []

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.messages = enabled, []
        _Steps.made.append(self)

    def __enter__(self):
        return self

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.slow
def test_impossible_gate_falls_back_to_the_source_graphs(tmp_path, captions_csv, monkeypatch):
    import hbi_calibration.cli

    _Steps.made = []
    monkeypatch.setattr(hbi_calibration.cli, "Steps", _Steps)
    out = tmp_path / "pkg"
    result = _calibrate("--videos", str(SAMPLES), "--captions", str(captions_csv), "--holdout", "0.5",
                        "--max-r1-drop", "-200", "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: INT8 failed the accuracy gate")  # no progress in JSON mode
    # each phase is announced before it starts (shown on a terminal, in text mode)
    [steps] = _Steps.made
    assert not steps.enabled
    phases = [m for m in steps.messages if not m.startswith(("held-out:", "calibration:"))]
    assert phases[:4] == ["videos: 4 to calibrate, 4 held out for the gate (with captions)",
                          "decoding 4 held-out videos",
                          "encoding the held-out videos with the source package (the reference)",
                          "collecting activation ranges (minmax) on up to 4 videos"]
    assert phases[4:7] == ["gate attempt 1/3 (all MatMul/Gemm): quantizing",
                           "gate attempt 1/3 (all MatMul/Gemm): encoding the held-out videos",
                           phases[6]] and phases[6].startswith("gate attempt 1/3 (all MatMul/Gemm, 50 nodes int8): FAIL")
    assert len(phases) == 4 + 3 * 3 + 1 and phases[-1] == f"writing {out}"
    report = json.loads(result.stdout)
    assert report["outcome"] == "fallback" and not report["gate"]["passed"]
    attempts = report["gate"]["attempts"]
    assert [a["step"] for a in attempts] == ["all MatMul/Gemm", "+ first/last transformer blocks in float",
                                             "+ attention matmuls in float"]
    floats = [set(a["float_nodes"]) for a in attempts]
    assert floats[0] == set() and floats[0] < floats[1] < floats[2]  # each step widens the float set
    assert [a["quantized_nodes"] for a in attempts] == [DEMO_PRODUCTS - len(f) for f in floats]
    assert all(not a["passed"] and a["metrics"]["recall"]["r1_drop"] > -200 for a in attempts)
    package = load_package(out)
    assert package.manifest.graphs["video_encoder"].precision == "fp32"
    assert sha256_file(out / "video_encoder.onnx") == sha256_file(PKG / "video_encoder.onnx")
    assert package.manifest.calibration["outcome"] == "fallback"


@pytest.mark.slow
def test_strict_gate_failure_exits_5_and_writes_nothing(tmp_path):
    out = tmp_path / "pkg"
    result = _calibrate("--videos", str(SAMPLES), "--min-top1", "1.5", "--strict", "--out", str(out))
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    assert "failed the accuracy gate" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_user_exclusions_are_kept_in_float(tmp_path):
    out = tmp_path / "pkg"
    result = _calibrate("--videos", str(SAMPLES), "--exclude-nodes", "*visual.transformer.resblocks.1",
                        "--exclude-ops", "Gemm", "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["gate"]["attempts"][0]
    assert len(first["float_nodes"]) == 6  # qkv, q k^T, attn v, out proj, fc, proj of that block
    model = _video_graph(out)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in model.graph.node:
        if n.name in first["float_nodes"]:
            assert not dq & set(n.input)


# ---------------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("setup, message", [
    ("empty", "no video files"),
    ("broken", "could be decoded"),
    ("two", "needs at least 3"),
])
def test_no_real_samples_is_refused(tmp_path, setup, message):
    videos = tmp_path / "videos"
    videos.mkdir()
    if setup == "broken":
        for i in range(4):
            (videos / f"v{i}.mp4").write_bytes(b"not a video at all")
    if setup == "two":
        for p in sorted(SAMPLES.glob("*.mp4"))[:2]:
            shutil.copy(p, videos / p.name)
    out = tmp_path / "pkg"
    result = _calibrate("--videos", str(videos), "--out", str(out))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert message in result.stderr and "hint:" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--exclude-ops", "Conv"], "only ['MatMul', 'Gemm'] are quantized"),
    (["--exclude-nodes", "no_such_node"], "matches no MatMul / Gemm node"),
    (["--holdout", "1.5"], "--holdout must be between 0 and 1"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = _calibrate("--videos", str(SAMPLES), "--out", str(tmp_path / "pkg"), *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.stderr


def test_int8_package_cannot_be_calibrated_again(int8, tmp_path):
    out, _ = int8
    result = runner.invoke(app, ["calibrate", str(out), "--videos", str(SAMPLES), "--out", str(tmp_path / "x")])
    assert result.exit_code == EXIT_USAGE and "already an INT8 package" in result.stderr


def test_captions_naming_unknown_videos_are_refused(tmp_path):
    caps = tmp_path / "c.csv"
    caps.write_text("video,caption\nmissing.mp4,a red circle\n")
    result = _calibrate("--videos", str(SAMPLES), "--captions", str(caps), "--out", str(tmp_path / "pkg"))
    assert result.exit_code == EXIT_BAD_INPUT and "not in the videos folder" in result.stderr


def test_derived_package_refuses_to_overwrite_its_source():
    from hbi_runtime.package import write_derived_package

    with pytest.raises(UsageError, match="is the source package itself"):
        write_derived_package(load_package(PKG), PKG, graphs={}, status="verified")
    assert MANIFEST_NAME in {p.name for p in PKG.iterdir()}


# ---------------------------------------------------------------------------------------------------------------
# --out and --overwrite (hbi_runtime.outputs.prepare_output_dir): never the source package, the videos or the
# captions file, never a folder of other files; a previous package is replaced only once the new one is complete


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("where", ["the source package", "the videos", "the captions file's folder"])
def test_out_may_not_be_an_input(tmp_path, captions_csv, where):
    source, videos, captions = tmp_path / "pkg", tmp_path / "videos", tmp_path / "caps" / "captions.csv"
    shutil.copytree(PKG, source)
    shutil.copytree(SAMPLES, videos)
    captions.parent.mkdir()
    shutil.copy(captions_csv, captions)
    before = _tree(tmp_path)
    out = {"the source package": source, "the videos": videos, "the captions file's folder": captions.parent}[where]
    result = runner.invoke(app, ["calibrate", str(source), "--videos", str(videos), "--captions", str(captions),
                                 "--out", str(out), "--overwrite", "--workers", "1"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "hint:" in result.stderr and "Traceback" not in result.output
    assert "to calibrate" not in result.stderr  # refused at once, not after minutes of calibration
    assert _tree(tmp_path) == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = _calibrate("--videos", str(SAMPLES), "--out", str(mine), "--overwrite")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a model package" in result.stderr and "even with --overwrite" in result.stderr
    assert _tree(mine) == {"notes.txt": b"keep me"}


@pytest.mark.slow
def test_overwrite_replaces_a_previous_package(int8, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(PKG, out)  # the fp32 package: an INT8 one replaces it
    result = _calibrate("--videos", str(SAMPLES), "--out", str(out), "--overwrite", "--format", "json")
    assert result.exit_code == 0, result.output
    package = load_package(out)
    assert package.manifest.graphs["video_encoder"].precision == "int8"
    assert json.loads(result.stdout)["package_sha256"] == package.manifest_sha256
    assert _siblings(out) == ["pkg"]  # no temporary or old folder left


@pytest.mark.slow
def test_a_calibration_that_fails_while_writing_leaves_the_previous_package(int8, tmp_path, monkeypatch):
    """Moving the finished package into place fails (a full disk, say): the package at --out is untouched."""
    out = tmp_path / "pkg"
    shutil.copytree(int8[0], out)
    before = _tree(out)
    real_rename = os.rename

    def rename(src, dst):  # the swap of the finished package into place (hbi_runtime.fileio.replace_dir)
        if ".partial-" in Path(src).name:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    result = _calibrate("--videos", str(SAMPLES), "--out", str(out), "--overwrite")
    assert result.exit_code == 3 and "the disk is full (No space left" in result.stderr, result.output
    assert _tree(out) == before
    assert _siblings(out) == ["pkg"]


# ---------------------------------------------------------------------------------------------------------------
# file names that are not text


WEIRD = {b"clip-\xe9\xff.mp4": "not UTF-8", b"esc-\x1b[2J.mp4": "a terminal escape", b"new\nline.mp4": "a newline"}
BROKEN = b"broken-\xe9\x1b[31m\n.mp4"


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="byte file names")
def test_any_file_name_is_recorded_losslessly(tmp_path):
    """Videos whose names are not UTF-8, hold an ESC sequence or a newline, captioned and held out, and a broken
    one that fails to decode: the package is written, its manifest is UTF-8 JSON, and every recorded name parses
    back (parse_display_path) to the exact bytes."""
    videos = tmp_path / "videos"
    videos.mkdir()
    queries = json.loads((DEMO / "queries.json").read_text())["queries"]
    renamed = dict(zip(dict.fromkeys(q["expected"] for q in queries), WEIRD))  # 3 samples get a weird name
    for sample in sorted(SAMPLES.glob("*.mp4")):
        shutil.copy(sample, os.path.join(os.fsencode(videos), renamed.get(sample.name, os.fsencode(sample.name))))
    with open(os.path.join(os.fsencode(videos), BROKEN), "wb") as f:
        f.write(b"not a video at all")
    caps = tmp_path / "captions.csv"
    with open(caps, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        for q in (q for q in queries if q["expected"] in renamed):
            name = renamed[q["expected"]]
            # as hbi-toolkit prints it, or (a UTF-8 name a CSV field can hold) as it is
            writer.writerow([name.decode() if name.startswith(b"esc") else display_path(name), q["query"]])
    out = tmp_path / "out"
    result = _calibrate("--videos", str(videos), "--captions", str(caps), "--holdout", "0.5", "--out", str(out),
                        "--format", "json")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output  # no name reaches the terminal raw
    manifest = json.loads((out / MANIFEST_NAME).read_bytes().decode("utf-8"))  # strict UTF-8
    data = manifest["calibration"]["data"]
    assert sorted(parse_display_path(name) for name in data["held_out"]) == sorted(WEIRD)
    assert [parse_display_path(f.partition(": ")[0]) for f in data["decode_failures"]] == [BROKEN]
    assert data["calibration_decoded"] == 5 and data["held_out_decoded"] == 3
    assert json.loads(result.stdout)["data"] == data
    load_package(out)  # verified, hashes match


@pytest.mark.parametrize("content, line, message", [
    ('video,caption\ntest_00056.mp4,a red square\ntest_00063.mp4,"a blue circle\ntest_00069.mp4,x\n', 3,
     "unterminated quote"),
    ("video,caption\ntest_00056.mp4,a red square\ntest_00063.mp4,a blue circle,moves left\n", 3, "3 field(s)"),
])
def test_a_malformed_captions_file_names_the_file_and_the_line(tmp_path, content, line, message):
    caps = tmp_path / "my-captions.csv"
    caps.write_text(content)
    result = _calibrate("--videos", str(SAMPLES), "--captions", str(caps), "--out", str(tmp_path / "pkg"))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"{caps}, line {line}:" in result.stderr and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()
