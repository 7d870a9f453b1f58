"""The TensorRT plugin libraries without TensorRT: compiled against every TensorRT header version at hand, built by
the CMake tree, inspected with readelf / nm, loaded with ctypes, and driven by the C++ harness (CPU part).

Headers: every ``<version>/include`` under ``$HBI_TRT_HEADERS_ROOT`` (``.ci/run`` points it at a
folder of TensorRT headers beside the checkout when there is one), else ``$HBI_TRT_INCLUDE``, else a system install
(libnvinfer-dev). Without any, every test here is skipped and says so: nothing was compiled.

What this proves (docs/tensorrt.md, "Checking the plugins without TensorRT"): the sources compile warning-free
against each version; both plugin libraries link the CUDA runtime statically and export only their entry points; a
plain dlopen of libhbi_trt_plugins_dlopen.so registers both creators under namespace "hbi" (and dlclose removes
them), while libhbi_trt_plugins.so registers only through loadLibrary's getCreators; the creators and plugins answer
every build-time and serialization method as TensorRT expects. The registry is a stub: TensorRT's own registry,
parser, builder and enqueue inside an engine are not run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hbi_export.trt as trt_pkg

PLUGINS = Path(trt_pkg.__file__).resolve().parent / "plugins"
SOURCES = ("hbi_plugins.cpp", "hbi_stub_nvinfer.cpp", "hbi_plugin_harness.cpp")
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
SYSTEM_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")
LOADLIBRARY_EXPORTS = {"getCreators", "setLoggerFinder"}
KERNEL_EXPORTS = {"hbi_kernels_version", "hbi_wti_forward", "hbi_token_merge_forward",
                  "hbi_token_merge_workspace_size"}


def trt_header_sets() -> list[tuple[str, Path]]:
    """``(label, include dir)`` for every TensorRT header set named by the environment (or installed)."""
    root = os.environ.get("HBI_TRT_HEADERS_ROOT")
    if root:
        found = [(p.parent.name, p) for p in sorted(Path(root).glob("*/include")) if (p / "NvInferRuntime.h").is_file()]
        if found:
            return found
    for candidate in (os.environ.get("HBI_TRT_INCLUDE"), *SYSTEM_INCLUDES):
        if candidate and (Path(candidate) / "NvInferRuntime.h").is_file():
            return [(_version_of(Path(candidate)), Path(candidate))]
    return []


def _version_of(include: Path) -> str:
    text = (include / "NvInferVersion.h").read_text(errors="replace")
    parts = [re.search(rf"#define (?:NV_TENSORRT_{k}|TRT_{k}_ENTERPRISE) +(\d+)", text) for k in ("MAJOR", "MINOR")]
    return ".".join(m.group(1) for m in parts) if all(parts) else include.as_posix()


HEADERS = trt_header_sets()
NO_HEADERS = ("no TensorRT headers (set HBI_TRT_HEADERS_ROOT=<folder of <version>/include> or HBI_TRT_INCLUDE="
              "<dir with NvInferRuntime.h>): the plugin libraries were NOT compiled")
header_params = pytest.mark.parametrize("headers", HEADERS or [None], ids=[h[0] for h in HEADERS] or ["none"])


def _need(headers, *tools: str) -> None:
    if headers is None:
        pytest.skip(NO_HEADERS)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH: the plugin libraries were NOT built")
    if not (CUDA_INCLUDE / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA headers in {CUDA_INCLUDE} (set CUDA_HOME): the plugin libraries were NOT compiled")


@pytest.mark.slow
@header_params
def test_plugins_compile_against_tensorrt_headers(headers, tmp_path):
    """g++ -Wall -Wextra -Werror: both plugin variants, the stub libnvinfer and the harness (host code only)."""
    _need(headers, "g++")
    builds = [(source, []) for source in SOURCES] + [("hbi_plugins.cpp", ["-DHBI_REGISTER_ON_LOAD"])]
    for source, defines in builds:
        cmd = ["g++", "-std=c++17", "-fPIC", "-Wall", "-Wextra", "-Werror", *defines, "-isystem", str(headers[1]),
               "-isystem", str(CUDA_INCLUDE), "-c", str(PLUGINS / source), "-o", str(tmp_path / "out.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{source} {defines} against TensorRT {headers[0]}:\n{done.stderr}"


@pytest.fixture(scope="module")
def built(request, tmp_path_factory) -> dict:
    """The CMake tree built against one header set (sm_80 only, -Werror, harness + stub libnvinfer)."""
    headers = request.param
    _need(headers, "cmake", "nvcc")
    build = tmp_path_factory.mktemp(f"trt-{headers[0]}")
    configure = ["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DTENSORRT_INCLUDE_DIR={headers[1]}",
                 "-DCMAKE_CUDA_ARCHITECTURES=80", "-DCMAKE_CXX_FLAGS=-Werror", "-DHBI_BUILD_HARNESS=ON",
                 "-DHBI_NVINFER_STUB=ON"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    major = _version_of(headers[1]).split(".")[0]
    return {"version": headers[0], "major": major, "loadlibrary": build / "libhbi_trt_plugins.so",
            "dlopen": build / "libhbi_trt_plugins_dlopen.so", "kernels": build / "libhbi_kernels.so",
            "stub": build / "stub" / f"libnvinfer.so.{major}", "harness": build / "hbi_plugin_harness"}


built_params = pytest.mark.parametrize("built", HEADERS or [None], ids=[h[0] for h in HEADERS] or ["none"],
                                       indirect=True)


def _needed(library: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def _symbols(library: Path, which: str) -> set[str]:
    out = subprocess.run(["nm", "-D", which, str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip() and line.split()[-2] in "TUDBR"}


@pytest.mark.slow
@built_params
def test_the_plugin_libraries_link_the_cuda_runtime_statically_and_export_only_their_entry_points(built):
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("readelf / nm (binutils) not on PATH: the libraries were NOT inspected")
    for name in ("loadlibrary", "dlopen"):
        assert not [n for n in _needed(built[name]) if "cudart" in n], (name, _needed(built[name]))
    assert "libcudart.so" in " ".join(_needed(built["kernels"]))  # the ctypes library shares its caller's runtime
    assert not [n for n in _needed(built["loadlibrary"]) if "nvinfer" in n]
    assert f"libnvinfer.so.{built['major']}" in _needed(built["dlopen"])
    assert _symbols(built["loadlibrary"], "--defined-only") == LOADLIBRARY_EXPORTS | KERNEL_EXPORTS
    assert _symbols(built["dlopen"], "--defined-only") == KERNEL_EXPORTS  # registers itself: no getCreators
    assert {"getPluginRegistry", "getLogger"} <= _symbols(built["dlopen"], "--undefined-only")
    assert "getPluginRegistry" not in _symbols(built["loadlibrary"], "--undefined-only")
    assert not [s for s in _symbols(built["loadlibrary"], "--defined-only") if s.startswith("cuda")]


REGISTRATION_PROBE = r"""
import ctypes, json, sys
stub_path, dlopen_path, loadlibrary_path = sys.argv[1:4]

def registered(stub):
    buffer = ctypes.create_string_buffer(1 << 14)
    stub.hbi_stub_registered(buffer, len(buffer))
    return [line for line in buffer.value.decode().split("\n") if line]

stub = ctypes.CDLL(stub_path)  # RTLD_LOCAL, like Python's tensorrt module loading libnvinfer
report = {"before": registered(stub)}
ctypes.CDLL(loadlibrary_path)
report["after_loadlibrary_variant"] = registered(stub)
ctypes.CDLL(dlopen_path)
report["after_dlopen_variant"] = registered(stub)
print(json.dumps(report))
"""


@pytest.mark.slow
@built_params
def test_a_plain_dlopen_registers_the_creators_under_namespace_hbi(built):
    """ctypes.CDLL is a plain dlopen: the dlopen variant registers both creators in the registry of the libnvinfer
    that is loaded (here the stub, found by its soname); the loadLibrary variant registers nothing by itself."""
    args = [str(built["stub"]), str(built["dlopen"]), str(built["loadlibrary"])]
    done = subprocess.run([sys.executable, "-c", REGISTRATION_PROBE, *args], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["before"] == [] and report["after_loadlibrary_variant"] == []
    assert report["after_dlopen_variant"] == ["WeightedTokenInteraction|1|hbi|hbi|registerCreator",
                                              "TokenMerge|1|hbi|hbi|registerCreator"]


@pytest.mark.slow
@built_params
def test_the_dlopen_variant_needs_a_tensorrt_in_the_process(built):
    """Without libnvinfer the dlopen variant does not load (it must reach TensorRT's registry); the loadLibrary
    variant loads anywhere."""
    probe = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    missing = subprocess.run([sys.executable, "-c", probe, str(built["dlopen"])], capture_output=True, text=True,
                             env=env, check=False)
    if missing.returncode == 0:
        pytest.skip("a libnvinfer is installed on this machine: the refusal cannot be shown here")
    assert f"libnvinfer.so.{built['major']}" in missing.stderr
    plain = subprocess.run([sys.executable, "-c", probe, str(built["loadlibrary"])], capture_output=True, text=True,
                           check=False)
    assert plain.returncode == 0, plain.stderr


@pytest.mark.slow
@built_params
def test_the_cpu_harness_drives_both_libraries_through_the_tensorrt_facing_methods(built):
    done = subprocess.run([str(built["harness"]), str(built["loadlibrary"]), str(built["dlopen"])],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert done.returncode == 0 and not failed, "\n".join(failed) or done.stdout[-3000:] + done.stderr[-3000:]
    passed = {line[5:] for line in lines if line.startswith("PASS")}
    for route in ("loadLibrary library:", "dlopen library:"):
        for op in ("WeightedTokenInteraction", "TokenMerge"):
            for what in ("creator name / version / namespace", "capability interfaces core / build / runtime",
                         "serialize -> createPlugin(kRUNTIME) -> the same fields",
                         "clone: a new object with the same fields",
                         "getWorkspaceSize for the profile's largest shape"):
                assert f"{route} {op} {what}" in passed, f"{route} {op} {what}"
    assert "dlopen library: a plain dlopen registers both creators under namespace hbi" in passed
    assert "dlopen library: dlclose deregisters both creators" in passed
    assert "loadLibrary library: a plain dlopen registers nothing" in passed
    assert lines[0].startswith(f"harness: TensorRT headers {built['version']}")
