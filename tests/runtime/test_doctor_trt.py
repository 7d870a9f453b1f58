"""hbi-run doctor's GPU, plugin-library and package / engine report (torch-free; fake CUDA runtime)."""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from hbi_runtime import cli, doctor
from hbi_runtime.backends.cuda import Cuda, CudaError
from hbi_runtime.engines import EngineEntry, EngineSet, TensorProfile, write_engine_set
from hbi_runtime.package import load_package

DEMO = Path(cli.__file__).resolve().parent / "data" / "demo" / "package"


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100


class FakeCudart:
    """cuda-python's runtime module as doctor uses it: (error, value) tuples."""

    def __init__(self, devices=(("NVIDIA H100 80GB HBM3", 9, 0),), error: Err = Err.cudaSuccess) -> None:
        self.devices, self.error = devices, error

    def cudaGetDeviceCount(self):
        return (self.error, len(self.devices) if self.error == Err.cudaSuccess else 0)

    def cudaGetDeviceProperties(self, i):
        name, major, minor = self.devices[i]
        return (Err.cudaSuccess, SimpleNamespace(name=name.encode() + b"\0" * 8, major=major, minor=minor,
                                                 totalGlobalMem=80 * 2**30))

    def cudaDriverGetVersion(self):
        return (Err.cudaSuccess, 12040)

    def cudaRuntimeGetVersion(self):
        return (Err.cudaSuccess, 12060)


def test_gpu_probe_reports_each_device():
    gpu = doctor.probe_gpu(FakeCudart())
    assert gpu["error"] is None
    assert gpu["devices"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                               "total_memory_gib": 80.0, "driver_cuda_version": "12.4",
                               "runtime_cuda_version": "12.6"}]


def test_gpu_probe_reports_a_failure_instead_of_raising():
    gpu = doctor.probe_gpu(FakeCudart(error=Err.cudaErrorNoDevice))
    assert gpu["devices"] == [] and gpu["error"] == "CUDA call cudaGetDeviceCount failed: cudaErrorNoDevice"
    with pytest.raises(CudaError, match="cudaErrorNoDevice"):
        Cuda(FakeCudart(error=Err.cudaErrorNoDevice)).device_count()


def test_plugin_library_status(monkeypatch, tmp_path):
    monkeypatch.delenv("HBI_TRT_PLUGINS", raising=False)
    assert doctor.probe_plugins()["next"].startswith("build it (docs/tensorrt.md) and export HBI_TRT_PLUGINS=")
    monkeypatch.setenv("HBI_TRT_PLUGINS", str(tmp_path / "missing.so"))
    assert doctor.probe_plugins()["exists"] is False
    lib = tmp_path / "libhbi_trt_plugins.so"
    lib.write_bytes(b"library")
    monkeypatch.setenv("HBI_TRT_PLUGINS", str(lib))
    assert doctor.probe_plugins() == {"library": str(lib), "exists": True, "next": None,
                                      "sha256": hashlib.sha256(b"library").hexdigest()}


def _with_engines(tmp_path: Path, gpu: str = "NVIDIA H100 80GB HBM3", cc: str = "9.0") -> Path:
    pkg_dir = Path(shutil.copytree(DEMO, tmp_path / "pkg"))
    pkg = load_package(pkg_dir)
    entries = {}
    for name, spec in pkg.manifest.graphs.items():
        rel = f"engines/fp16/{name}.engine"
        (pkg_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg_dir / rel).write_bytes(b"engine")
        profile = {t.name: TensorProfile(*[tuple(1 if isinstance(a, str) else a for a in t.shape)] * 3)
                   for t in spec.inputs}
        entries[name] = EngineEntry(graph=name, file=rel, sha256=hashlib.sha256(b"engine").hexdigest(),
                                    onnx_file=spec.file, onnx_sha256=spec.sha256, tensorrt_version="10.3.0.26",
                                    gpu_name=gpu, compute_capability=cc, precision="fp16", strongly_typed=False,
                                    profiles=(profile,), build_args=("--max-batch", "8"))
    write_engine_set(pkg_dir, EngineSet(package_sha256=pkg.manifest_sha256, precision="fp16", engines=entries))
    return pkg_dir


def _facts(trt_version: str | None, devices=(("NVIDIA H100 80GB HBM3", 9, 0),)):
    backends = {"onnxruntime": {"imported": True}, "tensorrt": {"imported": trt_version is not None,
                                                                "version": trt_version}}
    plugins = {"library": None, "exists": False, "sha256": None, "next": "build it"}
    return backends, doctor.probe_gpu(FakeCudart(devices)), plugins


def test_package_with_matching_engines_is_usable(tmp_path):
    pkg = _with_engines(tmp_path)
    report = doctor.judge_package(pkg, *_facts("10.3.0.26"))
    assert report["ok"] and report["onnxruntime"] == {"usable": True, "next": None}
    assert report["engines"] == [{"precision": "fp16", "usable": True, "reasons": [], "next": None}]


def test_engines_for_another_gpu_get_the_rebuild_command(tmp_path):
    pkg = _with_engines(tmp_path, gpu="NVIDIA Jetson AGX Orin", cc="8.7")
    report = doctor.judge_package(pkg, *_facts("10.3.0.26"))
    [item] = report["engines"]
    assert not item["usable"] and len(item["reasons"]) == 6  # 3 graphs x (compute capability, GPU name)
    assert "interaction: it was built for compute capability 8.7, this GPU has 9.0" in item["reasons"]
    assert item["next"] == f"hbi-export build-engine {pkg} --precision fp16 --max-batch 8"


def test_without_gpu_or_tensorrt_engines_are_not_usable_and_say_why(tmp_path):
    pkg = _with_engines(tmp_path)
    [item] = doctor.judge_package(pkg, *_facts(None))["engines"]
    assert item["reasons"] == ["TensorRT is not importable here: pip install 'hbi-toolkit[gpu-cu12]' "
                               "--extra-index-url https://pypi.nvidia.com (Jetson: JetPack's TensorRT)"]
    [item] = doctor.judge_package(pkg, *_facts("10.3.0.26", devices=()))["engines"]
    assert item["reasons"][0].startswith("no CUDA GPU visible")
    demo = doctor.judge_package(DEMO, *_facts(None))
    assert demo["engines"] == [] and demo["engines_next"].startswith("build engines on a machine with an NVIDIA GPU")
    assert doctor.judge_package(DEMO, *_facts("10.3.0.26"))["engines_next"] == (
        f"hbi-export build-engine {DEMO} --precision fp16")


def test_a_broken_package_is_reported_with_its_next_step(tmp_path):
    report = doctor.judge_package(tmp_path / "nope", *_facts(None))
    assert not report["ok"] and "does not exist" in report["error"]["message"]
    assert report["error"]["next"].startswith("re-export the package")


def test_doctor_cli_judges_the_packages_it_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv("HBI_TRT_PLUGINS", raising=False)
    pkg = _with_engines(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["doctor", "--model", str(pkg), "--model", str(tmp_path / "nope"), "-f", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"gpu", "plugins", "packages"} <= set(report) and len(report["packages"]) == 2
    assert report["packages"][0]["engines"][0]["precision"] == "fp16"
    text = runner.invoke(cli.app, ["doctor", "--model", str(pkg)])
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    ort_line = "- onnxruntime: usable" if importlib.util.find_spec("onnxruntime") else (
        "- onnxruntime: not usable -> pip install onnxruntime (or 'hbi-toolkit[runtime]')")
    assert f"package {pkg}:" in lines and ort_line in lines
    assert any(line.startswith("- trt fp16 engines: NOT usable") for line in lines)
    assert any(line.startswith("gpu ") for line in lines) and any(line.startswith("plugins ") for line in lines)
