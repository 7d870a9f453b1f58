"""``hbi-run bench``'s library half: load a package on a backend and device, run the stages, build the record.

::

    from hbi_runtime.bench.run import run_bench
    from hbi_runtime.bench.stages import BenchConfig

    record = run_bench("pkg/", backend="ort", device="cpu", config=BenchConfig(batch_sizes=(1, 8)))
"""

from __future__ import annotations

import os
from typing import Any, Callable

from hbi_runtime.bench.records import envelope, gpu_memory_used_mb
from hbi_runtime.bench.stages import BenchConfig, run_stages
from hbi_runtime.bench.timing import peak_rss_mb
from hbi_runtime.errors import MissingDependencyError, UsageError

DEVICES = ("cpu", "cuda", "tensorrt")  # tensorrt: ONNX Runtime's TensorRT execution provider
# Short names users type -> registry names of hbi_runtime.backends.BACKENDS, first registered one wins (an alias
# works as soon as its backend is registered).
ALIASES = {"ort": ("onnxruntime",), "trt": ("trt", "tensorrt"), "tensorrt": ("trt", "tensorrt")}
GPU_ONLY = ("trt", "tensorrt")  # backends that run on CUDA GPUs only


def resolve_backend(name: str) -> str:
    """A registry name from a registry name or an alias; UsageError naming the choices otherwise."""
    from hbi_runtime.backends import BACKENDS

    if name in BACKENDS:
        return name
    for candidate in ALIASES.get(name, ()):
        if candidate in BACKENDS:
            return candidate
    known = sorted(BACKENDS) + sorted(a for a, targets in ALIASES.items()
                                      if a not in BACKENDS and any(t in BACKENDS for t in targets))
    raise UsageError(f"unknown backend {name!r}; available: {', '.join(known)}")


def default_device(backend: str) -> str:
    """``cuda`` for a GPU-only backend, else ``cpu``."""
    return "cuda" if backend in GPU_ONLY else "cpu"


def backend_options_for(backend: str, device: str, threads: int | None,
                        precision: str | None = None) -> dict[str, Any]:
    """Options of ``backend`` that put it on ``device`` with ``threads`` CPU threads, by what it accepts.

    A backend with a ``providers`` option (ONNX Runtime) gets the ``cpu`` / ``cuda`` / ``tensorrt`` preset (with
    ``tensorrt``, ``precision`` is the TensorRT provider's: fp16, or int8 from a Q/DQ package); a GPU-only backend
    (TensorRT's engines) needs ``cuda``; ``intra_op_threads`` gets the thread count, ``precision`` the engine
    precision.

    Raises:
        UsageError: a device the backend cannot run on, a precision it cannot select, a bad thread count.
        MissingDependencyError: ``--device cuda`` / ``tensorrt`` with an onnxruntime that has no such execution
            provider.
    """
    from hbi_runtime.backends import backend_options

    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    accepted = backend_options(backend)
    options: dict[str, Any] = {}
    if "providers" in accepted:
        options["providers"] = device
        if device in ("cuda", "tensorrt"):
            check_ort_provider(device)
    elif backend in GPU_ONLY and device != "cuda":
        hint = ("--device tensorrt is ONNX Runtime's TensorRT execution provider (--backend onnxruntime); the trt "
                "backend runs its engines on --device cuda") if device == "tensorrt" else "use --device cuda"
        raise UsageError(f"backend {backend!r} runs on CUDA GPUs only, not on {device}", hint=hint)
    if "intra_op_threads" in accepted and threads is not None:
        options["intra_op_threads"] = threads
    if precision is not None:
        if "precision" in accepted:
            options["precision"] = precision
        elif "tensorrt" in accepted and device == "tensorrt":
            options["tensorrt"] = {"precision": precision}
        else:
            raise UsageError(f"backend {backend!r} runs the package's own precision; --precision selects engine "
                             "precisions of backends that build engines (trt, or onnxruntime on --device tensorrt)",
                             hint="drop --precision, or benchmark an fp16 package (hbi-export onnx --precision fp16)")
    return options


def check_ort_provider(device: str) -> None:
    """MissingDependencyError unless this onnxruntime has the execution provider of ``device`` (cuda, tensorrt)."""
    from hbi_runtime.backends.onnxruntime import CUDA, GPU_HINT, TENSORRT, import_onnxruntime

    provider = {"cuda": CUDA, "tensorrt": TENSORRT}[device]
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if provider not in available:
        raise MissingDependencyError(f"--device {device}: this onnxruntime ({ort.__version__}) has no {provider} "
                                     f"(it has {', '.join(available)})", hint=GPU_HINT + "; on a machine "
                                     "without an NVIDIA GPU, use --device cpu")


def _precision(model) -> str:
    precisions = sorted({g.precision for g in model.manifest.graphs.values()})
    return precisions[0] if len(precisions) == 1 else "+".join(precisions)


def model_facts(model) -> dict:
    """The package's identity and the shapes every stage runs at."""
    m = model.manifest
    return {"package": str(model.package.dir), "precision": _precision(model), "text_length": m.max_words,
            "frames": m.preprocessing.max_frames, "image_size": m.preprocessing.image_size,
            "embed_dim": m.embed_dim, "tokens_per_level": {k: list(v) for k, v in m.tokens_per_level.items()},
            "level_weights": list(m.level_weights), "status": m.status}


def run_bench(pkg_dir: str | os.PathLike, *, backend: str = "onnxruntime", device: str | None = None,
              precision: str | None = None, config: BenchConfig | None = None, encoder_threads: int | None = None,
              allow_unverified: bool = False, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Measure the configured stages of one model package; returns an ``hbi.bench/1`` record.

    Args:
        pkg_dir: the model package.
        backend: a backend name of :data:`hbi_runtime.backends.BACKENDS` or an alias of :data:`ALIASES`.
        device: ``cpu``, ``cuda`` or ``tensorrt`` (ONNX Runtime's TensorRT execution provider; default: ``cuda``
            for GPU-only backends, else ``cpu``); the scoring engine and decoding always run on the CPU.
        precision: engine precision for backends that build engines (trt); default: the package's / the built one.
        config: what to measure (default :class:`BenchConfig`).
        encoder_threads: CPU threads of the encoders' backend (default: the backend's, all usable cores for ORT).
        allow_unverified: accept a package whose parity check failed or never ran.
        progress: called with one line before each measurement.
    Raises:
        UsageError, MissingDependencyError: bad options, a device or backend this machine lacks.
        BadInputError, MismatchError, GateFailedError: the package, the videos folder or the index.
    """
    from hbi_runtime.model import load

    config = config or BenchConfig()
    name = resolve_backend(backend)
    device = device or default_device(name)
    options = backend_options_for(name, device, encoder_threads, precision)
    load_start = os.getloadavg()
    with load(pkg_dir, backend=name, allow_unverified=allow_unverified, **options) as model:
        for graph in _graphs_needed(config):
            model.backends[graph].load()  # a missing provider or library fails here, before any measurement
        results = run_stages(model, config, progress)
        facts = model_facts(model)
        sha = model.package.manifest_sha256
        gpu_mb = gpu_memory_used_mb() if device in ("cuda", "tensorrt") else None
    return envelope(
        model_sha256=sha, model=facts,
        config={"backend": name, "device": device, "precision": precision or facts["precision"],
                "batch_sizes": list(config.batch_sizes), "warmup": config.warmup, "iters": config.iters,
                "stages": list(config.stages), "encoder_threads": encoder_threads,
                "scoring_threads": config.threads, "gallery": config.gallery, "workers": config.workers,
                "videos": str(config.videos_dir), "backend_options": options},
        results=results,
        memory={"peak_rss_mb": peak_rss_mb(), "gpu_used_mb": gpu_mb},
        load_average={"start": list(load_start), "end": list(os.getloadavg())})


def _graphs_needed(config: BenchConfig) -> list[str]:
    graphs = set()
    if {"text", "score", "retrieve"} & set(config.stages):
        graphs.add("text_encoder")
    if {"video", "retrieve"} & set(config.stages) and (config.index_dir is None or "video" in config.stages):
        graphs.add("video_encoder")
    return sorted(graphs)


def render_text(record: dict) -> str:
    """A readable table of a record: one line per stage and batch."""
    cfg, model = record["config"], record["model"]
    cpu = record["device"]["cpu"]
    gpus = ", ".join(f"{g['name']} (sm {g['compute_capability']})" for g in record["device"]["gpus"]) or "none"
    lines = [f"model {model['package']} ({model['precision']}, sha256 {record['model_sha256'][:12]}), backend "
             f"{cfg['backend']} on {cfg['device']}",
             f"cpu {cpu['model']} ({cpu['usable_cores']} usable cores), gpu {gpus}",
             f"{'stage':<9} {'batch':>6} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'throughput':>14}  unit"]
    for r in record["results"]:
        lat = r["latency_ms"]
        lines.append(f"{r['stage']:<9} {r['batch']:>6} {lat['p50']:>10.2f} {lat['p90']:>10.2f} {lat['p99']:>10.2f} "
                     f"{r['throughput']:>14,.1f}  {r['unit']}")
    mem = record["memory"]
    lines.append(f"peak RSS {mem['peak_rss_mb']:.0f} MiB (this process; decoding workers not included)"
                 + (f", GPU {mem['gpu_used_mb']:.0f} MiB" if mem.get("gpu_used_mb") is not None else ""))
    lines.append(f"load average {record['load_average']['start'][0]:.2f} -> {record['load_average']['end'][0]:.2f}; "
                 f"{cfg['iters']} timed calls after {cfg['warmup']} warm-up per row; throughput = items / p50")
    return "\n".join(lines) + "\n"


__all__ = ["ALIASES", "DEVICES", "GPU_ONLY", "backend_options_for", "check_ort_provider", "default_device",
           "model_facts", "render_text", "resolve_backend", "run_bench"]
