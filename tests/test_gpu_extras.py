"""The GPU extras of pyproject.toml (docs/tensorrt.md, "Installing") and benchmarks/check_extras.py.

The default run checks what the extras declare and the checker's parsing, offline. The `network` test (deselected by
default: `pytest -m network tests/test_gpu_extras.py`) runs the checker against PyPI: every extra resolves for every
Python / machine it is for, or fails exactly where documented. It takes minutes, and on an index without PEP 658
metadata pip downloads whole wheels (GBs; the checker reports how much).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_checker():
    spec = importlib.util.spec_from_file_location("hbi_check_extras", ROOT / "benchmarks" / "check_extras.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ce = _load_checker()
PROJECT = ce.load_project(ROOT)
GPU_EXTRAS = ("gpu-cu12", "gpu-cu13", "gpu", "jetson")
CPU_ONNXRUNTIME_EXTRAS = ("runtime", "export", "kernels", "all")


def names(extra: str) -> dict[str, str]:
    return {ce.requirement_name(r): r for r in ce.extra_requirements(PROJECT, extra)}


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extras_never_pull_torch_nor_the_cpu_onnxruntime(extra):
    reqs = names(extra)
    assert "torch" not in reqs and "onnxruntime" not in reqs, reqs
    assert "polygraphy" in reqs and "onnx" in reqs  # engine building and parity


def test_no_cpu_extra_brings_a_gpu_package():
    for extra in CPU_ONNXRUNTIME_EXTRAS:
        reqs = names(extra)
        assert not [n for n in reqs if n.startswith(("onnxruntime-gpu", "tensorrt", "cuda-python"))], (extra, reqs)


@pytest.mark.parametrize("extra,major", [("gpu-cu12", "12"), ("gpu-cu13", "13")])
def test_each_cuda_extra_holds_one_cuda_major(extra, major):
    reqs = names(extra)
    assert f"tensorrt-cu{major}" in reqs and "tensorrt" not in reqs  # the bare name resolves to CUDA 13 (and TRT 11)
    assert reqs["cuda-python"].replace(" ", "").startswith(f"cuda-python>={major}")
    ort = reqs["onnxruntime-gpu"].replace(" ", "")
    assert ort.startswith("onnxruntime-gpu[cuda,cudnn]")  # ONNX Runtime's CUDA libraries come only with the extra
    other = {"12": "13", "13": "12"}[major]
    assert not [r for r in reqs if r.endswith(f"-cu{other}")]


def test_gpu_is_an_alias_of_gpu_cu12():
    assert PROJECT["optional-dependencies"]["gpu"] == ["hbi-toolkit[gpu-cu12]"]
    assert ce.extra_requirements(PROJECT, "gpu") == ce.extra_requirements(PROJECT, "gpu-cu12")


def test_jetson_leaves_tensorrt_onnxruntime_and_cuda_python_to_jetpack():
    reqs = names("jetson")
    assert not [n for n in reqs if n.startswith(("tensorrt", "onnxruntime", "cuda-"))], reqs
    assert "<2" in reqs["numpy"]


def test_split_tensorrt_replaces_only_the_meta_package():
    reqs, notes = ce.split_tensorrt(["onnx>=1.16", "tensorrt-cu12>=10.3,<11", "tensorrt-cu12-bindings==10.3.0"])
    assert reqs == ["onnx>=1.16", "tensorrt-cu12-bindings>=10.3,<11", "tensorrt-cu12-bindings==10.3.0"]
    assert len(notes) == 1
    reqs, _ = ce.split_tensorrt(["tensorrt-cu13>=10.13.2,<11"], ("libs", "bindings"))
    assert reqs == ["tensorrt-cu13-libs>=10.13.2,<11", "tensorrt-cu13-bindings>=10.13.2,<11"]


WHEEL_STUB_LOG = """\
Collecting tensorrt-cu12<11,>=10.3 (from hbi-toolkit==0.1.0)
Collecting tensorrt_cu12_libs==10.16.1.11 (from tensorrt-cu12<11,>=10.3->hbi-toolkit==0.1.0)
  Preparing metadata (pyproject.toml): finished with status 'error'
  error: subprocess-exited-with-error
      File "/tmp/pip-build-env-x/overlay/lib/python3.11/site-packages/wheel_stub/wheel.py", line 249, in download_wheel
error: metadata-generation-failed
"""
NO_WHEEL_LOG = """\
ERROR: Could not find a version that satisfies the requirement onnxruntime-gpu[cuda,cudnn]<2,>=1.27 (from versions: \
1.22.0, 1.23.0, 1.23.2)
ERROR: No matching distribution found for onnxruntime-gpu[cuda,cudnn]<2,>=1.27
"""
CONFLICT_LOG = """\
ERROR: Cannot install hbi-toolkit because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested numpy<2
    onnx 1.99 depends on numpy>=2

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_classify_failure():
    stub = ce.classify_failure(WHEEL_STUB_LOG)
    assert stub["kind"] == "nvidia-index" and stub["requirement"] == "tensorrt_cu12_libs==10.16.1.11"
    missing = ce.classify_failure(NO_WHEEL_LOG)
    assert missing["kind"] == "no-distribution" and missing["requirement"].startswith("onnxruntime-gpu")
    assert "1.23.2" in missing["reason"]
    conflict = ce.classify_failure(CONFLICT_LOG)
    assert conflict["kind"] == "conflict" and "numpy<2" in conflict["requirement"]
    assert ce.classify_failure("ERROR: something else")["kind"] == "other"


def test_downloads_counts_index_pages_metadata_and_whole_files():
    log = """\
https://pypi.org:443 "GET /simple/polygraphy/ HTTP/1.1" 200 5925
  https://files.pythonhosted.org:443 "GET /packages/8b/16/x/polygraphy-0.53.6-py3-none-any.whl HTTP/1.1" 200 485433
  https://files.pythonhosted.org:443 "GET /packages/aa/x/onnx-1.23.2-cp311.whl.metadata HTTP/1.1" 200 9000
  https://files.pythonhosted.org:443 "GET /packages/aa/x/gone.whl HTTP/1.1" 404 10
"""
    got = ce.downloads(log)
    assert got == {"index_bytes": 5925, "metadata_bytes": 9000, "metadata_files": 1, "file_bytes": 485433,
                   "files": 1, "largest_file": 485433}


def test_targets_cover_the_supported_pythons_and_machines():
    assert [t.name for t in ce.TARGETS["gpu-cu12"]] == ["cp310-x86_64", "cp311-x86_64", "cp312-x86_64"]
    assert [t.name for t in ce.TARGETS["jetson"]] == ["cp310-aarch64", "cp312-aarch64"]
    args = ce.TARGETS["jetson"][0].pip_args()
    assert args[:3] == ["--only-binary=:all:", "--python-version", "3.10"]
    assert "manylinux_2_35_aarch64" in args and "manylinux_2_36_aarch64" not in args


@pytest.mark.network
@pytest.mark.timeout(1800)
def test_every_gpu_extra_resolves_as_documented(tmp_path):
    out = tmp_path / "extras.json"
    rc = ce.main(["--out", str(out)])
    result = json.loads(out.read_text())
    bad = [c for c in result["checks"] if not c["ok"]]
    assert rc == 0 and not bad, json.dumps(bad, indent=1)
    by = {(c["extra"], c["target"]): c for c in result["checks"]}
    assert by[("gpu-cu12", "host")]["failure"]["kind"] == "nvidia-index"  # documented: NVIDIA's index
    assert by[("gpu-cu13", "cp310-x86_64")]["status"] == "unsupported"
    for (extra, target), check in by.items():
        if check["status"] == "resolved" and extra != "jetson":
            assert check["packages"]["onnxruntime-gpu"] and not check["forbidden"], (extra, target)
