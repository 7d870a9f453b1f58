"""The one benchmark record format (``"schema": "hbi.bench/1"``) and what it says about the machine.

A record is a JSON object (docs/bench.md has the full schema)::

    {"schema": "hbi.bench/1", "created": ISO-8601 UTC, "model_sha256": ..., "model": {...shapes, precision},
     "config": {backend, device, precision, batch_sizes, warmup, iters, threads, ...},
     "device": {"cpu": {...}, "gpus": [...], "jetson": {...} | null},
     "libraries": {"python", "numpy", "onnxruntime", "onnxruntime_providers", "tensorrt", "cuda", "torch"},
     "results": [{"stage", "batch", "unit", "items_per_call", "latency_ms": {p50, p90, p99, mean, min, max},
                  "throughput", ...}],
     "memory": {"peak_rss_mb", "gpu_used_mb"}, "load_average": {"start", "end"}}

The benchmark scripts (``benchmarks/bench_vs_torch.py``, ``bench_gpu.py``, ``bench_similarity.py``) write the
same envelope (schema, created, device, libraries, results), so records from a laptop, a Jetson and a datacenter
GPU can be laid side by side. Nothing here imports torch: its version comes from the installed metadata.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

from hbi_runtime.doctor import BACKENDS as DOCTOR_PROBES

SCHEMA = "hbi.bench/1"
# CPU features that decide which matrix-multiply kernels run (x86 and Arm spellings of /proc/cpuinfo).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "neon", "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16")
JETSON_MODEL_FILE = Path("/proc/device-tree/model")
COMMAND_TIMEOUT_S = 10


def _run(cmd: Sequence[str]) -> str | None:
    """stdout of a short command, or None when it is missing, fails or hangs (device probes never raise)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model, logical cores (total and usable by this process) and the SIMD flags that matter for GEMMs.

    Args:
        cpuinfo: the text of /proc/cpuinfo (read from the file by default; tests pass their own).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    model = (fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.processor()
             or platform.machine())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "machine": platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": usable, "simd_flags": [f for f in SIMD_FLAGS if f in flags]}


def gpu_info(smi_csv: str | None = None) -> list[dict]:
    """One entry per NVIDIA GPU from ``nvidia-smi`` (name, compute capability, memory, driver); [] without one.

    Args:
        smi_csv: the output of ``nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version
            --format=csv,noheader,nounits`` (queried by default; tests pass their own).
    """
    if smi_csv is None:
        smi_csv = _run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                        "--format=csv,noheader,nounits"]) or ""
    gpus = []
    for line in smi_csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        name, cc, memory, driver = parts
        gpus.append({"name": name, "compute_capability": cc if cc and cc != "[N/A]" else None,
                     "memory_total_mb": float(memory) if memory.replace(".", "", 1).isdigit() else None,
                     "driver": driver})
    return gpus


def jetson_info(model_file: Path = JETSON_MODEL_FILE) -> dict | None:
    """Jetson model (device tree) and power mode (``nvpmodel -q``), or None on anything that is not a Jetson."""
    try:
        model = model_file.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError:
        return None
    if "jetson" not in model.lower() and "tegra" not in model.lower():
        return None
    query = _run(["nvpmodel", "-q"]) or ""
    mode = next((line.split(":", 1)[1].strip() for line in query.splitlines() if "power mode" in line.lower()),
                None)
    release = None
    try:
        release = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    return {"model": model, "power_mode": mode, "l4t": release}


def _dist_version(names: Sequence[str]) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _cuda_version() -> dict:
    """CUDA as each layer sees it: the driver's (nvidia-smi), onnxruntime-gpu's build, the pip CUDA runtime."""
    smi = _run(["nvidia-smi"]) or ""
    driver = next((line.split("CUDA Version:", 1)[1].split()[0] for line in smi.splitlines()
                   if "CUDA Version:" in line), None)
    ort_build = None
    try:
        from onnxruntime.capi import build_and_package_info as info

        ort_build = getattr(info, "cuda_version", None) or None
    except ImportError:
        pass
    runtime = _dist_version(("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime"))
    return {"driver": driver, "onnxruntime_build": ort_build, "pip_runtime": runtime}


def library_versions() -> dict:
    """Versions of what the numbers depend on. torch and tensorrt are looked up in the metadata, never imported."""
    import numpy as np

    versions: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for probe in DOCTOR_PROBES:
        if probe.module in ("onnxruntime", "tensorrt", "torch"):
            versions[probe.module] = _dist_version(probe.distributions)
    try:
        import onnxruntime

        versions["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        versions["onnxruntime_providers"] = []
    versions["cuda"] = _cuda_version()
    return versions


def device_info() -> dict:
    """The machine: CPU, NVIDIA GPUs (may be empty) and Jetson facts (null elsewhere)."""
    return {"cpu": cpu_info(), "gpus": gpu_info(), "jetson": jetson_info(), "os": platform.platform()}


def gpu_memory_used_mb(pid: int | None = None) -> float | None:
    """GPU memory held by process ``pid`` (default: this one) per ``nvidia-smi``; None without a GPU."""
    pid = os.getpid() if pid is None else pid
    out = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    if out is None:
        return None
    used = [float(m) for p, _, m in (line.partition(",") for line in out.splitlines())
            if p.strip() == str(pid) and m.strip().replace(".", "", 1).isdigit()]
    return sum(used) if used else 0.0


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def envelope(**fields: Any) -> dict:
    """The common part of every record: schema, time, device and libraries, plus ``fields``."""
    return {"schema": SCHEMA, "created": now_iso(), "device": device_info(), "libraries": library_versions(),
            **fields}


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write a record as indented JSON (parent folders created); returns the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


REQUIRED_KEYS = ("schema", "created", "device", "libraries", "results")
RESULT_KEYS = ("stage", "batch", "unit", "items_per_call", "latency_ms", "throughput")


def check_record(record: Any, where: str = "record") -> dict:
    """A record read back from JSON (``--include``, plotting): the keys the readers rely on.

    Raises:
        BadInputError: not an ``hbi.bench/1`` record, naming what is missing.
    """
    from hbi_runtime.errors import BadInputError

    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        got = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise BadInputError(f"{where} is not a benchmark record (schema {got!r}, expected {SCHEMA!r})",
                            hint="pass a file written by `hbi-run bench --out` or a benchmarks/bench_*.py script")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise BadInputError(f"{where}: missing keys {missing}")
    for i, result in enumerate(record["results"]):
        lost = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
        if lost:
            raise BadInputError(f"{where}: results[{i}] lacks {lost}")
    return record
