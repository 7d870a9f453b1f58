"""hbi-run bench (hbi_runtime/bench): percentiles, the record format, device probes, the CLI on the demo package,
plotting, and every bad input giving a message and an exit code (never a traceback). Torch-free."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_runtime import cli
from hbi_runtime.bench import records
from hbi_runtime.bench.cli import parse_int_list
from hbi_runtime.bench.plot import plot_records
from hbi_runtime.bench.stages import BenchConfig, captions, random_video_side
from hbi_runtime.bench.timing import latency_summary, result_row
from hbi_runtime.errors import BadInputError, MissingDependencyError, UsageError
from hbi_runtime.package import load_package

DEMO = cli.DEMO_PACKAGE
FAST = ("--warmup", "0", "--iters", "2", "--gallery", "40")


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), prog_name="hbi-run")


def assert_clean_error(result, code: int, *needles: str) -> None:
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, text
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text


# ------------------------------------------------------------------ timing


def test_percentiles_interpolate_linearly():
    # 1..100 ms: the q-th percentile sits at position (n - 1) q / 100 of the sorted samples
    summary = latency_summary([i / 1000 for i in range(100, 0, -1)])
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p90"] == pytest.approx(90.1)
    assert summary["p99"] == pytest.approx(99.01)
    assert (summary["min"], summary["max"], summary["mean"]) == pytest.approx((1, 100, 50.5))


def test_single_sample_and_empty():
    assert latency_summary([0.004])["p99"] == pytest.approx(4.0)
    with pytest.raises(ValueError):
        latency_summary([])


def test_result_row_throughput_is_items_over_median():
    row = result_row("video", 2, "frames/s", 24, [0.1, 0.2, 0.3], frames_per_video=12)
    assert row["throughput"] == pytest.approx(24 / 0.2)
    assert row["iters"] == 3 and row["frames_per_video"] == 12 and row["batch"] == 2


# ------------------------------------------------------------------ device probes

X86 = "processor\t: 0\nmodel name\t: Fake CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimdhp asimddp\nCPU part\t: 0xd42\nModel\t: NVIDIA Jetson Orin Nano\n"


def test_cpu_info_reads_model_and_simd_flags():
    info = records.cpu_info(X86)
    assert info["model"] == "Fake CPU 9000"
    assert info["simd_flags"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    arm = records.cpu_info(ARM)
    assert arm["model"] == "NVIDIA Jetson Orin Nano"
    assert arm["simd_flags"] == ["asimd", "asimdhp", "asimddp"]
    assert info["usable_cores"] >= 1


def test_gpu_info_parses_nvidia_smi_csv():
    csv = "NVIDIA H100 80GB HBM3, 9.0, 81559, 550.54.15\nOrin (nvgpu), [N/A], [N/A], 540.3.0\nbroken line\n"
    gpus = records.gpu_info(csv)
    assert gpus[0] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mb": 81559.0,
                       "driver": "550.54.15"}
    assert gpus[1]["compute_capability"] is None and gpus[1]["memory_total_mb"] is None
    assert len(gpus) == 2
    assert records.gpu_info("") == []


def test_jetson_info_from_device_tree(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    monkeypatch.setattr(records, "_run", lambda cmd: "NV Power Mode: MAXN\n0\n" if cmd[0] == "nvpmodel" else None)
    info = records.jetson_info(model)
    assert info["model"] == "NVIDIA Jetson AGX Orin Developer Kit" and info["power_mode"] == "MAXN"
    model.write_bytes(b"Some x86 board\0")
    assert records.jetson_info(model) is None
    assert records.jetson_info(tmp_path / "absent") is None


def test_library_versions_never_import_torch():
    had_torch = "torch" in sys.modules
    versions = records.library_versions()
    assert {"python", "numpy", "onnxruntime", "tensorrt", "torch", "cuda", "onnxruntime_providers"} <= set(versions)
    assert versions["numpy"] == np.__version__
    if not had_torch:
        assert "torch" not in sys.modules


def test_check_record_names_what_is_wrong():
    with pytest.raises(BadInputError, match="not a benchmark record"):
        records.check_record({"schema": "hbi.doctor/1"})
    with pytest.raises(BadInputError, match=r"missing keys \['device'"):
        records.check_record({"schema": records.SCHEMA, "created": "x", "libraries": {}, "results": []})
    bad = {"schema": records.SCHEMA, "created": "x", "device": {}, "libraries": {}, "results": [{"stage": "text"}]}
    with pytest.raises(BadInputError, match=r"results\[0\] lacks"):
        records.check_record(bad)


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize("value", ["0", "abc", "1,,2", "", "-1", "1.5", "8,0"])
def test_batch_sizes_must_be_positive_integers(value):
    with pytest.raises(UsageError, match="positive integers"):
        parse_int_list(value, "--batch-sizes")


def test_batch_sizes_parse_and_deduplicate():
    assert parse_int_list(" 1, 8,8,32", "--batch-sizes") == (1, 8, 32)


def test_config_rejects_bad_counts():
    with pytest.raises(UsageError, match="iters"):
        BenchConfig(iters=0)
    with pytest.raises(UsageError, match="warmup"):
        BenchConfig(warmup=-1)
    with pytest.raises(UsageError, match="unknown stage"):
        BenchConfig(stages=("video", "nope"))


def test_synthetic_inputs_have_the_package_shapes():
    with __import__("hbi_runtime").load(DEMO) as model:
        side = random_video_side(model, 5)
        counts = model.manifest.tokens_per_level["video"]
        assert [lv.tokens.shape for lv in side.levels] == [(5, n, model.manifest.embed_dim) for n in counts]
        for lv in side.levels:
            assert np.allclose(lv.weights.sum(axis=1), 1, atol=1e-5)
            norms = np.linalg.norm(lv.tokens, axis=-1)[lv.mask]
            assert np.allclose(norms, 1, atol=1e-5)
    assert len(captions(7)) == 7 and captions(3) == captions(3)


# ------------------------------------------------------------------ CLI


def test_bench_json_record_on_demo_package(tmp_path):
    out = tmp_path / "r.json"
    result = invoke("bench", "--stages", "text,video,score", "--batch-sizes", "1,2", *FAST, "--format", "json",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == json.loads(out.read_text())
    records.check_record(record)
    assert record["schema"] == "hbi.bench/1"
    assert record["model_sha256"] == load_package(DEMO).manifest_sha256
    assert record["config"]["backend"] == "onnxruntime" and record["config"]["device"] == "cpu"
    assert record["model"]["precision"] == "fp32" and record["model"]["frames"] == 8
    assert [(r["stage"], r["batch"]) for r in record["results"]] == [
        ("text", 1), ("text", 2), ("video", 1), ("video", 2), ("score", 1), ("score", 2)]
    units = {r["stage"]: r["unit"] for r in record["results"]}
    assert units == {"text": "texts/s", "video": "frames/s", "score": "pairs/s"}
    video2 = record["results"][3]
    assert video2["items_per_call"] == 2 * 8  # 2 videos of T = 8 frames
    assert record["results"][5]["items_per_call"] == 2 * 40  # 2 queries x --gallery 40
    for r in record["results"]:
        lat = r["latency_ms"]
        assert r["iters"] == 2 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput"] == pytest.approx(r["items_per_call"] / lat["p50"] * 1e3, rel=1e-3)
    assert record["memory"]["peak_rss_mb"] > 10
    assert record["device"]["cpu"]["usable_cores"] >= 1


def test_bench_decode_and_retrieve_text_table():
    result = invoke("bench", "--stages", "decode,retrieve", "--warmup", "0", "--iters", "1", "--workers", "1")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["decode"][1] == "8" and lines["decode"][-1] == "videos/s"  # the 8 demo samples
    assert lines["retrieve"][-1] == "queries/s"
    assert result.stderr == ""  # progress is shown on a terminal only


@pytest.mark.parametrize("args,needle", [
    (("--batch-sizes", "0"), "--batch-sizes must be comma-separated positive integers"),
    (("--batch-sizes", "abc"), "--batch-sizes must be comma-separated positive integers"),
    (("--iters", "0"), "iters must be at least 1"),
    (("--stages", "video,warp"), "unknown stage(s) ['warp']"),
    (("--backend", "nonsense"), "'nonsense' is not one of onnxruntime, trt"),
    (("--precision", "fp16"), "runs the package's own precision"),
    (("--device", "tpu"), "'tpu' is not one of 'cpu', 'cuda', 'tensorrt'"),
    (("--threads", "0"), "--threads must be a positive integer"),
    (("--include", "x.json"), "--include only adds records to a --plot"),
])
def test_bad_options_exit_2_without_traceback(args, needle):
    assert_clean_error(invoke("bench", "--stages", "text", *FAST, *args), 2, needle)


def test_bad_option_in_json_mode_is_a_json_error():
    result = invoke("bench", "--batch-sizes", "abc", "--format", "json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["type"] == "UsageError"


def test_cuda_without_cuda_names_what_is_missing():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the error path needs a CPU-only build")
    assert_clean_error(invoke("bench", "--device", "cuda", "--stages", "text", *FAST), 2,
                       "no CUDAExecutionProvider", "onnxruntime-gpu")


def test_missing_package_and_videos_are_bad_input(tmp_path):
    assert_clean_error(invoke("bench", "--model", str(tmp_path / "nope"), "--stages", "text", *FAST), 3)
    assert_clean_error(invoke("bench", "--stages", "decode", "--videos", str(tmp_path), *FAST), 3,
                       f"no video files in {tmp_path}")


# ------------------------------------------------------------------ plot


def _record(backend: str, precision: str, rows: list[tuple[str, int, float]]) -> dict:
    return {"schema": records.SCHEMA, "created": "t", "device": {"gpus": [], "jetson": None}, "libraries": {},
            "config": {"backend": backend, "precision": precision, "device": "cpu"},
            "results": [result_row(stage, b, "frames/s", b * 12, [s, s * 1.1]) for stage, b, s in rows]}


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    plot_records([_record("onnxruntime", "fp32", [("video", 1, 0.3), ("video", 8, 2.0), ("decode", 8, 0.1)]),
                  _record("onnxruntime", "fp16", [("video", 1, 0.2), ("video", 8, 1.1)])], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_without_batched_stage_or_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="nothing to plot"):
        plot_records([_record("onnxruntime", "fp32", [("decode", 8, 0.1)])], tmp_path / "p.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match="--plot need\(s\) matplotlib") as info:
        plot_records([_record("onnxruntime", "fp32", [("video", 1, 0.1)])], tmp_path / "p.png")
    assert "hbi-toolkit[plot]" in info.value.hint


def test_cli_plot_includes_earlier_records(tmp_path):
    pytest.importorskip("matplotlib")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(_record("tensorrt", "fp16", [("text", 1, 0.001), ("text", 2, 0.0015)])))
    png = tmp_path / "out" / "p.png"
    result = invoke("bench", "--stages", "text", "--batch-sizes", "1,2", *FAST, "--plot", str(png),
                    "--include", str(earlier))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote plot {png}" in result.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "hbi.doctor/1"}')
    assert_clean_error(invoke("bench", "--stages", "text", *FAST, "--plot", str(png), "--include", str(bad)), 3,
                       "is not a benchmark record")


def test_gpu_only_backend_needs_cuda():
    from hbi_runtime import backends
    from hbi_runtime.bench.run import GPU_ONLY, default_device, resolve_backend

    name = next((n for n in GPU_ONLY if n in backends.BACKENDS), None)
    if name is None:
        pytest.skip("no TensorRT backend registered in this build")
    assert resolve_backend("trt") == resolve_backend("tensorrt") == name and default_device(name) == "cuda"
    assert_clean_error(invoke("bench", "--backend", "trt", "--device", "cpu", "--stages", "text", *FAST), 2,
                       "runs on CUDA GPUs only")
    # on this machine (no TensorRT, no GPU) the default device, cuda, fails on loading, with what to install
    result = invoke("bench", "--backend", "trt", "--stages", "text", *FAST, "--format", "json")
    if result.exit_code != 0:
        assert result.exit_code in (2, 3, 4) and "Traceback" not in result.output
        assert json.loads(result.stdout)["error"]["hint"]
