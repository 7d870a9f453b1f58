"""On a CUDA GPU: the PyTorch CUDA reference (fp32 and fp16) and whatever of our path runs there, one record.

Measured per batch size (videos of T frames per call; texts per call): the reference model
(``hbi_export.model``) on ``cuda`` in fp32 and in fp16 (``torch.autocast``), and our runtime through ONNX
Runtime's CUDA execution provider when this onnxruntime has it (the fp32 package, and ``--package-fp16`` when
given), ONNX Runtime's TensorRT execution provider when it has that, and the TensorRT backend (``trt`` in
``hbi_runtime.backends``) on the engines of ``hbi-export build-engine`` of each package (skipped, with a note,
where tensorrt or the engines are missing). GPU work is timed with ``torch.cuda.synchronize()`` around each call
(ORT returns host arrays, so its calls are synchronous). The record is ``hbi.bench/1`` (docs/bench.md), rows tagged
``runtime`` and ``precision``.

Usage::

    python benchmarks/bench_gpu.py --package PKG [--package-fp16 PKG16] [--checkpoint CKPT] \\
        [--batches 1,8,32] [--texts 1,64] [--repeats 20] [--out benchmarks/results/gpu.json]

Without a CUDA GPU it stops with exit code 2 and says what is missing. ``--allow-cpu`` runs the same code on the
CPU (torch ``cpu``, ORT CPU), only to check the script on a machine without a GPU: its numbers mean nothing.
No test imports this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from hbi_runtime.bench.records import envelope, gpu_memory_used_mb, write_record
from hbi_runtime.bench.stages import captions
from hbi_runtime.bench.timing import result_row

DEFAULT_OUT = Path("benchmarks/results/gpu.json")


def fail(message: str, hint: str) -> None:
    sys.stderr.write(f"error: {message}\nhint: {hint}\n")
    raise SystemExit(2)


def time_synced(fn, sync, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def checkpoint_of(pkg: Path, given: Path | None) -> Path:
    """``--checkpoint``, else the package's source checkpoint (relative paths are relative to the package's
    parent folder, as ``hbi-export onnx`` writes them)."""
    if given is not None:
        return given
    import hbi_runtime

    source = Path(hbi_runtime.load(pkg).manifest.source["checkpoint"])
    return source if source.is_absolute() else pkg.parent / source


def torch_rows(ckpt: Path, device: str, pre, text_ids, batches, text_batches, warmup, repeats) -> list[dict]:
    """The reference model on ``device``, fp32 and fp16 (``torch.autocast``, as PyTorch users run fp16 inference:
    matmuls and convolutions in fp16, reductions such as LayerNorm, softmax and cdist in fp32)."""
    import contextlib

    import torch

    from hbi_export.checkpoints.loader import build_model

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = build_model(ckpt)[0].to(device)
    rows = []
    for precision in ("fp32", "fp16"):
        def context():
            if precision == "fp32":
                return contextlib.nullcontext()
            return torch.autocast(device_type=device, dtype=torch.float16)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for b in batches:
            frames = torch.randn(b, pre.max_frames, 3, pre.image_size, pre.image_size, device=device)
            mask = torch.ones(b, pre.max_frames, device=device)

            def video(frames=frames, mask=mask):
                with torch.inference_mode(), context():
                    model.encode_video(frames, mask)

            rows.append(result_row("video", b, "frames/s", b * pre.max_frames,
                                   time_synced(video, sync, warmup, repeats), runtime="torch", device=device,
                                   precision=precision))
        for b in text_batches:
            ids, mask = (torch.from_numpy(a[:b]).to(device) for a in text_ids)

            def text(ids=ids, mask=mask):
                with torch.inference_mode(), context():
                    model.encode_text(ids, mask)

            rows.append(result_row("text", b, "texts/s", b, time_synced(text, sync, warmup, repeats),
                                   runtime="torch", device=device, precision=precision))
        if device == "cuda":
            for r in rows:
                if r["precision"] == precision:
                    r["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return rows


def ours_rows(pkg: Path, backend: str, options: dict, label: str, batches, text_batches, warmup, repeats,
              device: str) -> list[dict]:
    import hbi_runtime

    rows = []
    with hbi_runtime.load(pkg, backend=backend, **options) as model:
        pre, precision = model.manifest.preprocessing, model.manifest.graphs["video_encoder"].precision
        if backend == "trt":  # the engines' precision, not the package's
            precision = model.backends["video_encoder"].load().entry.precision
        rng = np.random.default_rng(0)
        for b in batches:
            frames = rng.standard_normal((b, pre.max_frames, 3, pre.image_size, pre.image_size), dtype=np.float32)
            mask = np.ones((b, pre.max_frames), dtype=np.int64)
            seconds = time_synced(lambda: model.encode_frames(frames, mask, batch_size=b), lambda: None, warmup,
                                  repeats)
            rows.append(result_row("video", b, "frames/s", b * pre.max_frames, seconds, runtime=label,
                                   device=device, precision=precision))
        for b in text_batches:
            texts = captions(b)
            seconds = time_synced(lambda: model.encode_text(texts, batch_size=b), lambda: None, warmup, repeats)
            rows.append(result_row("text", b, "texts/s", b, seconds, runtime=label, device=device,
                                   precision=precision))
    used = gpu_memory_used_mb()
    for r in rows:
        r["gpu_used_mb_after"] = used
    return rows


def our_backends(device: str) -> list[tuple[str, dict, str]]:
    """(backend, options, label) of our paths that can run on ``device`` here."""
    from hbi_runtime.backends import BACKENDS

    found = []
    if "onnxruntime" in BACKENDS:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if device == "cpu":
            found.append(("onnxruntime", {"providers": "cpu"}, "ort-cpu"))
        elif "CUDAExecutionProvider" in available:
            found.append(("onnxruntime", {"providers": "cuda"}, "ort-cuda"))
            if "TensorrtExecutionProvider" in available:
                found.append(("onnxruntime", {"providers": "tensorrt"}, "ort-tensorrt"))
        else:
            print(f"note: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider; skipping ORT CUDA "
                  "(pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url https://pypi.nvidia.com)", file=sys.stderr)
    if "trt" in BACKENDS and device == "cuda":  # the registry key is "trt" (the module is tensorrt)
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            print("note: tensorrt is not installed; skipping the trt backend (pip install 'hbi-toolkit[gpu-cu12]' "
                  "--extra-index-url https://pypi.nvidia.com)", file=sys.stderr)
        else:
            found.append(("trt", {}, "tensorrt"))
    return found


def has_engines(pkg: Path) -> bool:
    from hbi_runtime.engines import built_precisions

    return bool(built_precisions(pkg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="fp32 model package")
    parser.add_argument("--package-fp16", type=Path, help="fp16 model package of the same checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="default: the package's source checkpoint")
    parser.add_argument("--batches", default="1,8,32", help="videos per call")
    parser.add_argument("--texts", default="1,64", help="texts per call")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="check the script on a CPU (numbers meaningless)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        text_batches = [int(b) for b in args.texts.split(",")]
    except ValueError:
        fail(f"--batches / --texts must be comma-separated integers, got {args.batches!r} / {args.texts!r}",
             "e.g. --batches 1,8,32 --texts 1,64")
    try:
        import torch
    except ImportError:
        fail("bench_gpu.py needs torch for the PyTorch reference", "pip install 'hbi-toolkit[export]' with a CUDA "
             "build of torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        fail(f"no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is False)",
             "run this on a machine with an NVIDIA GPU and a CUDA build of torch; `nvidia-smi` must list the GPU")

    import hbi_runtime

    ckpt = checkpoint_of(args.package, args.checkpoint)
    with hbi_runtime.load(args.package) as m:
        pre, sha = m.manifest.preprocessing, m.package.manifest_sha256
        ids, mask, _ = m.tokenizer(captions(max(text_batches)))
    load_start = os.getloadavg()
    rows = torch_rows(ckpt, device, pre, (ids, mask), batches, text_batches, args.warmup, args.repeats)
    packages = [args.package] + ([args.package_fp16] if args.package_fp16 else [])
    for backend, options, label in our_backends(device):
        for pkg in packages:
            if backend == "trt" and not has_engines(pkg):
                print(f"note: {pkg} has no TensorRT engines; skipping the trt backend (hbi-export build-engine "
                      f"{pkg})", file=sys.stderr)
                continue
            print(f"ours: {label} {pkg} ...", file=sys.stderr, flush=True)
            rows += ours_rows(pkg, backend, options, label, batches, text_batches, args.warmup, args.repeats,
                              device)

    print(f"{'runtime':10} {'precision':9} {'stage':6} {'batch':>5} {'p50 ms':>9} {'throughput':>12}")
    for r in rows:
        print(f"{r['runtime']:10} {r['precision']:9} {r['stage']:6} {r['batch']:>5} {r['latency_ms']['p50']:>9.2f} "
              f"{r['throughput']:>12.1f} {r['unit']}")
    record = envelope(benchmark="bench_gpu", model_sha256=sha,
                      config={"device": device, "batches": batches, "texts": text_batches, "warmup": args.warmup,
                              "repeats": args.repeats, "package": str(args.package),
                              "package_fp16": str(args.package_fp16) if args.package_fp16 else None,
                              "checkpoint": str(ckpt), "cpu_check_only": device == "cpu"},
                      results=rows, load_average={"start": list(load_start), "end": list(os.getloadavg())})
    print(f"wrote {write_record(record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
