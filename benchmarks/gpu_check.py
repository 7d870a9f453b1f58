"""Everything about the hbi CUDA / TensorRT-plugin code that one GPU machine without TensorRT can check, in one go.

Prepared before any GPU was at hand; run it from the repository root on the GPU machine:

    python benchmarks/gpu_check.py --out gpu_check.json            # TensorRT headers from the environment, if any
    python benchmarks/gpu_check.py --out gpu_check.json --trt-include /path/to/TensorRT/include

Stages, each with its own timeout, within one time budget (default 270 s; expected about 1.5 minutes on one H100),
the JSON rewritten after every stage so that a cut-off run still reports what it did:

 1. environment     GPU, driver, nvcc, CMake, compute-sanitizer, Python modules; which TensorRT headers are used
 2. install         the project into a venv (--system-site-packages) without dependencies: pip -e --no-deps
 3. cmake_build     hbi_export/trt/plugins for this GPU only (CMAKE_CUDA_ARCHITECTURES=native): libhbi_kernels.so,
                    both plugin libraries (static CUDA runtime), the harness and the stub libnvinfer
 4. kernel_checks   benchmarks/gpu_kernels.py --only checks: both kernels against the numpy reference (fp32 <= 1e-5,
                    fp16 <= 2e-3; TokenMerge fp16 8e-3) and TokenMerge's adversarial inputs against the emulation
 5. plugin_harness  hbi_plugin_harness --gpu: the CPU part, then enqueue of both plugins (fp32, fp16, adversarial);
                    outputs compared here with the numpy reference / emulation
 6. sanitizer_*     compute-sanitizer memcheck, racecheck, initcheck on small shapes (the harness' GPU part; the
                    kernel checks where the harness was not built)
 7. cuda_backend    hbi_runtime/backends/cuda.py: stream, pinned buffers, async copies, a CUDA graph capturing
                    copies + the TokenMerge kernel, replayed on new inputs
 8. kernel_timings  benchmarks/gpu_kernels.py --only timings: against the copy bandwidth and the HBM peak
 9. doctor          hbi-run doctor --format json, with $HBI_TRT_PLUGINS set to the built library

A missing piece (no TensorRT headers, no compute-sanitizer, a refused device) is recorded as "not run: <reason>",
never as passed. TensorRT itself is not on that machine: parsing, building and the plugins inside an engine stay
unverified (listed in the report). Exit code: 0 when no stage failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "hbi_export" / "trt" / "plugins"
UNVERIFIED = [
    "TensorRT parse / build of the model packages (no TensorRT on this machine)",
    "the plugins inside a TensorRT engine: the ONNX parser's fields, TensorRT's registry and loadLibrary, "
    "serialization inside an engine, enqueue by TensorRT (the harness calls the same methods itself)",
    "registration into TensorRT's own registry on plain dlopen (the harness' registry is a stub)",
    "Jetson (sm_87, JetPack 6)",
]


# pip's words when the build backend is absent or older than pyproject.toml needs (not the project's fault).
BACKEND_MISSING = (r"No module named '?setuptools|BackendUnavailable|Cannot import 'setuptools"
                   r"|must not contain \{'ext-modules'\}|No matching distribution found for setuptools")


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | not run
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    log_tail: str = ""


class Report:
    """The JSON file, rewritten after every stage."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget_s, self.started = path, budget_s, time.time()
        self.stages: list[Stage] = []
        self.context: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        self.write()
        mark = {"passed": "ok  ", "failed": "FAIL", "not run": "--  "}[stage.status]
        print(f"[{time.time() - self.started:6.1f}s] {mark} {stage.name}{': ' + stage.reason if stage.reason else ''}",
              flush=True)
        return stage

    def write(self) -> None:
        counts = {s: sum(st.status == s for st in self.stages) for s in ("passed", "failed", "not run")}
        data = {"schema": "hbi.gpu-check/1", "context": self.context, "budget_s": self.budget_s,
                "seconds": round(time.time() - self.started, 1), "summary": counts,
                "stages": [vars(s) for s in self.stages], "unverified": UNVERIFIED}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def run(cmd: list[str], timeout: float, **kwargs) -> tuple[int | None, str]:
    """(exit code, or None when it ran past ``timeout`` and its whole process group was killed; stdout + stderr)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True, **kwargs)
    except OSError as exc:
        return 127, str(exc)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # compute-sanitizer's target, cmake's compilers: the whole group
        out, _ = proc.communicate()
        return None, out


def _bench():
    spec = importlib.util.spec_from_file_location("hbi_gpu_kernels_bench", ROOT / "benchmarks" / "gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Finding things


def find_trt_include(explicit: str | None) -> Path | None:
    """--trt-include, $HBI_TRT_INCLUDE, the newest version under $HBI_TRT_HEADERS_ROOT, shared/trt-headers (in or
    beside the repository), a system install."""
    if explicit:
        return Path(explicit) if (Path(explicit) / "NvInferRuntime.h").is_file() else None
    if os.environ.get("HBI_TRT_INCLUDE") and (Path(os.environ["HBI_TRT_INCLUDE"]) / "NvInferRuntime.h").is_file():
        return Path(os.environ["HBI_TRT_INCLUDE"])
    roots = [os.environ.get("HBI_TRT_HEADERS_ROOT"), ROOT / "shared" / "trt-headers",
             ROOT.parent / "shared" / "trt-headers"]
    for root in filter(None, roots):
        found = [p for p in Path(root).glob("*/include") if (p / "NvInferRuntime.h").is_file()]
        if found:
            return max(found, key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,))
    for system in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu"):
        if (Path(system) / "NvInferRuntime.h").is_file():
            return Path(system)
    return None


def find_tool(name: str) -> str | None:
    nvcc = shutil.which("nvcc")
    cuda = Path(nvcc).resolve().parents[1] if nvcc else Path("/usr/local/cuda")
    for candidate in (shutil.which(name), cuda / "bin" / name, cuda / name / name, Path("/usr/local/cuda/bin") / name,
                      Path("/usr/local/cuda") / name / name):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def gpu_facts() -> dict:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    code, out = run([smi, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"], 20)
    if code != 0 or not out.strip():
        return {"nvidia_smi_error": out.strip()[-500:]}
    name, driver, cc, memory = [x.strip() for x in out.splitlines()[0].split(",")]
    return {"name": name, "driver": driver, "compute_capability": cc, "memory": memory}


# ----------------------------------------------------------------------------------------------------------------
# Stages


def stage_environment(report: Report, args) -> Stage:
    gpu = gpu_facts()
    versions = {}
    for tool in ("nvcc", "cmake"):
        code, out = run([tool, "--version"], 20)
        versions[tool] = out.strip().splitlines()[-1] if code == 0 and out.strip() else None
    modules = {m: importlib.util.find_spec(m.split(".")[0]) is not None for m in
               ("numpy", "onnxruntime", "cuda", "typer", "tensorrt", "av", "decord")}
    include = find_trt_include(args.trt_include)
    report.context.update(gpu=gpu, tools=versions, python=sys.version.split()[0], modules=modules,
                          trt_include=str(include) if include else None,
                          compute_sanitizer=find_tool("compute-sanitizer"))
    if not gpu.get("compute_capability"):
        return Stage("environment", "failed", f"no GPU visible through nvidia-smi {gpu}")
    return Stage("environment", "passed", details=dict(report.context))


def stage_install(report: Report, args) -> Stage:
    """pip install -e . --no-deps into a venv that sees the machine's packages (numpy, onnxruntime, cuda-bindings,
    typer); where no venv can be made (no ensurepip), into the user site. No network: nothing is downloaded."""
    venv = args.work / "venv"
    pip = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "--no-index", "-e", str(ROOT)]
    code, out = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], min(60, report.left()))
    if code == 0:
        python = str(venv / "bin" / "python")
        code, more = run([python, *pip], min(120, report.left()))
        out += more
        how = "into a --system-site-packages venv"
    if code != 0:
        python = sys.executable
        code, more = run([python, *pip, "--user", "--break-system-packages"], min(120, report.left()))
        out += more
        how = "into the user site (no venv could be made)"
    report.context["python"] = python if code == 0 else sys.executable
    if code == 0:
        return Stage("install", "passed", f"pip install -e . --no-deps {how}", log_tail=out[-1500:])
    # The stages below still run, from the source tree (PYTHONPATH=<repository>).
    if re.search(BACKEND_MISSING, out):  # offline, pip cannot fetch the build backend pyproject asks for
        return Stage("install", reason="not run: no usable setuptools offline (pyproject's [build-system]); later "
                     "stages use PYTHONPATH=<repository>", log_tail=out[-2000:])
    return Stage("install", "failed", "pip install -e . --no-deps failed; later stages use PYTHONPATH=<repository>",
                 log_tail=out[-3000:])


def _cuda_architecture(report: Report, args) -> str:
    """--cuda-arch, else 'native' (CMake >= 3.24), else this GPU's compute capability from nvidia-smi."""
    if args.cuda_arch:
        return args.cuda_arch
    code, out = run(["cmake", "--version"], 20)
    found = re.findall(r"(\d+)\.(\d+)", out) if code == 0 else []
    if found and tuple(int(x) for x in found[0]) >= (3, 24):
        return "native"
    return str(report.context.get("gpu", {}).get("compute_capability", "9.0")).replace(".", "")


def stage_cmake_build(report: Report, args) -> Stage:
    include = report.context.get("trt_include")
    build = args.work / "build"
    arch = _cuda_architecture(report, args)
    nvcc = find_tool("nvcc")
    configure = ["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
    configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}"] if nvcc else []
    if include:
        configure += [f"-DTENSORRT_INCLUDE_DIR={include}", "-DHBI_BUILD_HARNESS=ON", "-DHBI_NVINFER_STUB=ON"]
    code, out = run(configure, min(90, report.left()))
    if code == 0:
        code, more = run(["cmake", "--build", str(build), f"-j{os.cpu_count() or 4}"], min(240, report.left()))
        out += more
    built = {p.name: str(p) for p in sorted(build.glob("*.so")) + sorted(build.glob("hbi_plugin_harness"))}
    report.context["build"] = built
    details = {"cuda_architectures": arch, "built": sorted(built), "needed": {}}
    for name in ("libhbi_trt_plugins.so", "libhbi_trt_plugins_dlopen.so"):
        if name in built and shutil.which("readelf"):
            _, elf = run(["readelf", "-d", built[name]], 20)
            details["needed"][name] = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", elf)
    static_cudart = not any("cudart" in n for needed in details["needed"].values() for n in needed)
    if code != 0 or "libhbi_kernels.so" not in built:
        return Stage("cmake_build", "failed", "timed out" if code is None else f"exit {code}", details=details,
                     log_tail=out[-4000:])
    if not include:
        return Stage("cmake_build", "passed", "kernels only: no TensorRT headers (pass --trt-include): the plugin "
                     "libraries and the harness were NOT built", details=details, log_tail=out[-1500:])
    if not static_cudart:
        return Stage("cmake_build", "failed", "a plugin library needs libcudart", details=details)
    return Stage("cmake_build", "passed", details=details, log_tail=out[-1500:])


def _python_env(report: Report) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def stage_kernels(report: Report, args, only: str) -> Stage:
    name = "kernel_checks" if only == "checks" else "kernel_timings"
    lib = report.context.get("build", {}).get("libhbi_kernels.so")
    if lib is None:
        return Stage(name, reason="not run: libhbi_kernels.so was not built")
    out_json = args.work / f"gpu_kernels_{only}.json"
    cmd = [report.context.get("python", sys.executable), str(ROOT / "benchmarks" / "gpu_kernels.py"), "--lib", lib,
           "--only", only, "--repeats", "10", "--out", str(out_json)]
    code, out = run(cmd, min(150, report.left()), env=_python_env(report))
    result = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if only == "checks":
        checks = result.get("checks", [])
        failed = [f"{c['op']} {c['case']} {c['dtype']}" for c in checks if not c["passed"]]
        details = {"checks": len(checks), "failed": failed,
                   "max_abs": {f"{c['op']} {c['case']} {c['dtype']}": c.get("max_abs") for c in checks
                               if "max_abs" in c}}
    else:
        details = {k: result.get(k) for k in ("copy_bandwidth_gbs", "hbm_peak_gbs", "timings")}
    status = "passed" if code == 0 else "failed"
    cannot = re.findall(r"cannot run here: (.+)", out)
    reason = "timed out" if code is None else ("" if code == 0 else f"exit {code} {cannot[-1] if cannot else ''}")
    return Stage(name, status, reason, details=details, log_tail=out[-3000:] if code != 0 else "")


def compare_harness_dump(dump: Path) -> list[dict]:
    """The harness' enqueue outputs against the numpy reference (the emulation for adversarial inputs)."""
    bench = _bench()
    sys.path.insert(0, str(ROOT))
    from hbi_runtime.ops.kernels import token_merge, weighted_token_interaction

    rows = []
    for case in json.loads((dump / "cases.json").read_text()):
        dtype = np.float16 if case["dtype"] == "float16" else np.float32
        shapes = case["shapes"]
        inputs = [np.fromfile(dump / f, dtype=dtype).reshape(s).astype(np.float32)
                  for f, s in zip(case["inputs"], shapes[:-1], strict=True)]
        got = np.fromfile(dump / case["output"], dtype=dtype).reshape(shapes[-1]).astype(np.float32)
        adversarial = "adversarial" in case["name"]
        if case["op"] == "WeightedTokenInteraction":
            want, tol = weighted_token_interaction(*inputs), bench.TOL_FP32 if dtype == np.float32 else bench.TOL_FP16
        elif adversarial:
            want = bench.emulate_token_merge(*inputs, clusters=case["clusters"], k=case["k"]).merged
            tol = bench.TOL_FP32 if dtype == np.float32 else bench.TOL_FP16 * 4
        else:
            want = token_merge(*inputs, clusters=case["clusters"], k=case["k"])
            tol = bench.TOL_FP32 if dtype == np.float32 else bench.TOL_FP16 * 4
        close = np.allclose(got, want, rtol=1e-5 if adversarial else 0, atol=tol, equal_nan=adversarial)
        with np.errstate(invalid="ignore"):
            err = float(np.nanmax(np.abs(got - want))) if np.isfinite(got - want).any() else None
        rows.append({"case": case["name"], "op": case["op"], "enqueue_status": case["enqueue_status"],
                     "max_abs": err, "tolerance": tol, "passed": bool(close and case["enqueue_status"] == 0)})
    return rows


def stage_harness(report: Report, args) -> Stage:
    built = report.context.get("build", {})
    if "hbi_plugin_harness" not in built:
        return Stage("plugin_harness", reason="not run: the harness was not built (no TensorRT headers)")
    dump = args.work / "harness_dump"
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [built["hbi_plugin_harness"], built["libhbi_trt_plugins.so"], built.get("libhbi_trt_plugins_dlopen.so", ""),
           "--gpu", str(dump)]
    code, out = run([c for c in cmd if c], min(60, report.left()))
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    passed = sum(line.startswith("PASS") for line in out.splitlines())
    try:
        compared = compare_harness_dump(dump)
    except (OSError, ValueError, KeyError) as exc:
        compared = [{"case": "dump", "passed": False, "error": f"{type(exc).__name__}: {exc}"}]
    ok = code == 0 and not failed and compared and all(c["passed"] for c in compared)
    return Stage("plugin_harness", "passed" if ok else "failed", "" if ok else f"exit {code}, {len(failed)} FAIL",
                 details={"harness_passed": passed, "harness_failed": failed, "enqueue_vs_numpy": compared},
                 log_tail="" if ok else out[-3000:])


def stage_sanitizer(report: Report, args, tool: str) -> Stage:
    name = f"sanitizer_{tool}"
    sanitizer = report.context.get("compute_sanitizer")
    if sanitizer is None:
        return Stage(name, reason="not run: compute-sanitizer not found (PATH, $CUDA/bin, $CUDA/compute-sanitizer)")
    built = report.context.get("build", {})
    if "hbi_plugin_harness" in built:
        target = [built["hbi_plugin_harness"], built["libhbi_trt_plugins.so"], "--gpu", str(args.work / "sanitized")]
        (args.work / "sanitized").mkdir(parents=True, exist_ok=True)
    elif "libhbi_kernels.so" in built:
        target = [report.context.get("python", sys.executable), str(ROOT / "benchmarks" / "gpu_kernels.py"), "--lib",
                  built["libhbi_kernels.so"], "--only", "checks"]
    else:
        return Stage(name, reason="not run: nothing was built")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", *target]
    code, out = run(cmd, min(75, report.left()), env=_python_env(report))
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", out)
    details = {"target": Path(target[0]).name, "errors": int(summary[-1]) if summary else None}
    if code is None:
        return Stage(name, "failed", "timed out", details=details, log_tail=out[-3000:])
    if not summary and re.search(r"not supported|unsupported|permission|not available|Could not", out, re.I):
        return Stage(name, reason=f"not run: compute-sanitizer refused: {out.strip().splitlines()[-1][:300]}",
                     details=details, log_tail=out[-2000:])
    ok = code == 0 and details["errors"] == 0
    return Stage(name, "passed" if ok else "failed", "" if ok else f"exit {code}", details=details,
                 log_tail="" if ok else out[-4000:])


def stage_cuda_backend(report: Report, args) -> Stage:
    lib = report.context.get("build", {}).get("libhbi_kernels.so")
    if lib is None:
        return Stage("cuda_backend", reason="not run: libhbi_kernels.so was not built")
    cmd = [report.context.get("python", sys.executable), str(Path(__file__).resolve()), "--cuda-backend-probe", lib]
    code, out = run(cmd, min(60, report.left()), env=_python_env(report))
    lines = [line for line in out.splitlines() if line.startswith("{")]
    details = json.loads(lines[-1]) if lines else {}
    if code != 0 and "cuda-python" in out and "not installed" in out:
        return Stage("cuda_backend", reason="not run: cuda-python (cuda-bindings) is not installed",
                     log_tail=out[-1500:])
    ok = code == 0 and details.get("passed") is True
    return Stage("cuda_backend", "passed" if ok else "failed", "" if ok else f"exit {code}", details=details,
                 log_tail="" if ok else out[-3000:])


def cuda_backend_probe(kernels: str) -> dict:
    """Run in a child process: hbi_runtime.backends.cuda end to end, ending with a CUDA graph replayed on new inputs."""
    import ctypes

    from hbi_runtime.backends.cuda import Cuda
    from hbi_runtime.ops.kernels import token_merge

    bench = _bench()
    lib = bench.load_library(Path(kernels))
    cuda = Cuda()
    result: dict = {"device": cuda.device_info(0).to_dict()}
    stream = cuda.stream()
    handle = int(stream)  # cuda-python's cudaStream_t: int() is the handle (getPtr() would be its address)
    n = 1 << 20
    src_ptr, src = cuda.host_array(n * 4, np.float32, (n,))
    dst_ptr, dst = cuda.host_array(n * 4, np.float32, (n,))
    src[:] = np.arange(n, dtype=np.float32)
    dev = cuda.malloc(n * 4)
    cuda.copy_to_device(dev, src, stream)
    cuda.copy_to_host(dst, dev, stream)
    cuda.synchronize(stream)
    result["pinned_async_round_trip"] = bool((dst == src).all())

    case = bench.MergeCase("graph", 8, 12, 64, 4)
    shapes = [(case.b, case.n, case.c), (case.b, case.n), (case.b, case.n)]
    pinned = [cuda.host_array(int(np.prod(s)) * 4, np.float32, s) for s in shapes]
    out_ptr, out = cuda.host_array(case.b * case.clusters * case.c * 4, np.float32, (case.b, case.clusters, case.c))
    device = [cuda.malloc(a.nbytes) for _, a in pinned]
    d_out = cuda.malloc(out.nbytes)
    workspace = cuda.malloc(lib.hbi_token_merge_workspace_size(case.b, case.n))
    cuda.begin_capture(stream)
    for d, (_, a) in zip(device, pinned, strict=True):
        cuda.copy_to_device(d, a, stream)
    launched = lib.hbi_token_merge_forward(0, *device, d_out, workspace, case.b, case.n, case.c, case.clusters, case.k,
                                           ctypes.c_void_p(handle))
    cuda.copy_to_host(out, d_out, stream)
    graph = cuda.end_capture(stream)
    errors, outputs = [], []
    for seed in range(3):  # new inputs in the same pinned buffers: the replay must see them
        for (_, a), value in zip(pinned, bench.merge_inputs(case, seed), strict=True):
            a[...] = value
        cuda.launch_graph(graph, stream)
        cuda.synchronize(stream)
        want = token_merge(*[a for _, a in pinned], clusters=case.clusters, k=case.k)
        errors.append(float(np.abs(out - want).max()))
        outputs.append(out.copy())
    cuda.destroy_graph(graph)
    for ptr in (dev, *device, d_out, workspace):
        cuda.free(ptr)
    for ptr in (src_ptr, dst_ptr, out_ptr, *(p for p, _ in pinned)):
        cuda.free_host(ptr)
    cuda.destroy_stream(stream)
    changed = all(not np.array_equal(outputs[i], outputs[i + 1]) for i in range(len(outputs) - 1))
    result.update(kernel_status_in_capture=launched, graph_replay_max_abs=errors, replays_see_new_inputs=changed)
    result["passed"] = bool(result["pinned_async_round_trip"] and launched == 0 and max(errors) <= 1e-5 and changed)
    return result


def stage_doctor(report: Report, args) -> Stage:
    python = report.context.get("python", sys.executable)
    script = Path(python).parent / "hbi-run"
    cmd = [str(script)] if script.is_file() else [python, "-c", "import sys; from hbi_runtime.cli import main; "
                                                                "sys.argv[0] = 'hbi-run'; sys.exit(main())"]
    env = _python_env(report)
    plugins = report.context.get("build", {}).get("libhbi_trt_plugins.so")
    if plugins:
        env["HBI_TRT_PLUGINS"] = plugins
    code, out = run([*cmd, "doctor", "--format", "json"], min(60, report.left()), env=env)
    start = out.find("{")
    try:
        doctor = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        doctor = {}
    details = {k: doctor.get(k) for k in ("gpu", "plugins")}
    sees_gpu = bool((doctor.get("gpu") or {}).get("devices")) or not report.context.get("gpu", {}).get("name")
    ok = code == 0 and bool(doctor) and sees_gpu
    reason = "" if ok else f"exit {code}" if code != 0 or not doctor else "doctor lists no GPU (cuda-python?)"
    return Stage("doctor", "passed" if ok else "failed", reason, details=details,
                 log_tail="" if ok else out[-3000:])


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                        help="the JSON report (rewritten as it goes)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "gpu_check", help="build and scratch folder")
    parser.add_argument("--trt-include", help="TensorRT headers (a folder with NvInferRuntime.h)")
    parser.add_argument("--budget", type=float, default=270, help="seconds for all stages together")
    parser.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES (default: native, i.e. this GPU only)")
    parser.add_argument("--cuda-backend-probe", metavar="LIB", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cuda_backend_probe:
        print(json.dumps(cuda_backend_probe(args.cuda_backend_probe)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(args.out.resolve(), args.budget)
    plan = [("environment", lambda: stage_environment(report, args)),
            ("install", lambda: stage_install(report, args)),
            ("cmake_build", lambda: stage_cmake_build(report, args)),
            ("kernel_checks", lambda: stage_kernels(report, args, "checks")),
            ("plugin_harness", lambda: stage_harness(report, args)),
            *[(f"sanitizer_{tool}", lambda tool=tool: stage_sanitizer(report, args, tool))
              for tool in ("memcheck", "racecheck", "initcheck")],
            ("cuda_backend", lambda: stage_cuda_backend(report, args)),
            ("kernel_timings", lambda: stage_kernels(report, args, "timings")),
            ("doctor", lambda: stage_doctor(report, args))]
    for name, stage in plan:
        if report.left() < 5:
            report.add(Stage(name, reason=f"not run: the time budget ({args.budget:.0f} s) was spent"))
            continue
        started = time.time()
        try:
            result = stage()
        except Exception as exc:  # noqa: BLE001 - one broken stage must not hide the others' results
            result = Stage(name, "failed", f"{type(exc).__name__}: {exc}")
        result.seconds = round(time.time() - started, 1)
        report.add(result)
    report.write()
    failed = [s.name for s in report.stages if s.status == "failed"]
    print(f"gpu_check: {len(report.stages) - len(failed)} stages passed or not run, failed: {failed or 'none'}; "
          f"report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
