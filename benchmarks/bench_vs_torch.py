"""Our runtime (ONNX Runtime, fp32) against eager PyTorch of the reference model, and against the GEMM bound.

On one machine, in one run, at ViT-B/32 size (T = 12 frames of 224^2 per video, L = 24 words):

* video encoder: ``hbi_runtime.load(PKG).encode_frames`` vs ``HBIModel.encode_video`` under
  ``torch.inference_mode()`` with default torch CPU settings and the same thread count (``torch.set_num_threads``
  = ORT ``intra_op_num_threads``); the two take turns call by call, so load from other processes hits both alike;
* text encoder (``--texts`` per call) the same way;
* the fp32 GEMM peak (:func:`hbi_runtime.bench.peak.gemm_peak`: best of numpy sgemm in a clean subprocess and ORT
  MatMul; torch.matmul for information), measured before and after the encoders; the bound uses the larger;
* fraction of the fp32 GEMM bound = frames/s x 8.9 GFLOP (ViT-B/32 is ~4.45 GMACs per 224^2 frame) / peak.

Usage::

    python benchmarks/bench_vs_torch.py --package PKG [--checkpoint CKPT] [--threads 2] [--batches 1,4]
        [--repeats 7] [--out benchmarks/results/vs_torch.json]

Without ``--package`` a random-weight ViT-B/32 package is exported to a temporary folder first (~1-2 min, 700 MB);
``--checkpoint`` defaults to the checkpoint the package was exported from (its manifest's ``source``). Also tries
ONNX Runtime session options (``--sweep``): graph optimisation levels and intra-op thread counts.
Needs torch (the ``export`` extra).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hbi_runtime.bench.peak import gemm_peak
from hbi_runtime.bench.records import envelope, write_record
from hbi_runtime.bench.timing import result_row

GFLOP_PER_FRAME = 8.9  # ViT-B/32 at 224^2: ~4.45 GMACs
DEFAULT_OUT = Path("benchmarks/results/vs_torch.json")


def make_package(root: Path) -> tuple[Path, Path]:
    from hbi_export.checkpoints.convert import init_random
    from hbi_export.onnx.package import export_package

    print(f"exporting a random ViT-B/32 package to {root} ...", flush=True)
    init_random(root / "ckpt", "vit-b-32", overwrite=True)
    export_package(root / "ckpt", root / "pkg", max_words=24, max_frames=12, precision="fp32", overwrite=True)
    return root / "pkg", root / "ckpt"


def torch_matmul_gflops(threads: int, n: int = 2048) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(8))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def take_turns(fns: dict, repeats: int, pause_s: float = 0.05) -> dict[str, list[float]]:
    """Time each function once per round, in turn, after one warm-up call each; a short pause between turns lets
    the other runtime's spinning threads go idle."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause_s)
            times[name].append(_timed(fn))
    return times


def frames_input(batch: int, frames: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, 3, size, size), dtype=np.float32)
    return x, np.ones((batch, frames), dtype=np.int64)


def compare_video(ours, ref, threads: int, batch: int, repeats: int) -> tuple[list[dict], float]:
    import torch

    pre = ours.manifest.preprocessing
    frames, mask = frames_input(batch, pre.max_frames, pre.image_size)
    frames_t, mask_t = torch.from_numpy(frames), torch.from_numpy(mask)

    def run_torch():
        with torch.inference_mode():
            return ref.encode_video(frames_t, mask_t)

    times = take_turns({"onnxruntime": lambda: ours.encode_frames(frames, mask, batch_size=batch),
                        "torch": run_torch}, repeats)
    diff = float(np.abs(ours.encode_frames(frames, mask).levels[0].tokens
                        - run_torch().levels[0].tokens.numpy()).max())
    n = batch * pre.max_frames
    rows = [result_row("video", batch, "frames/s", n, times[name], runtime=name, threads=threads)
            for name in ("onnxruntime", "torch")]
    return rows, diff


def compare_text(ours, ref, threads: int, batch: int, repeats: int) -> list[dict]:
    import torch

    from hbi_runtime.bench.stages import captions

    texts = captions(batch)
    ids, mask, _ = ours.tokenizer(texts)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def run_torch():
        with torch.inference_mode():
            return ref.encode_text(ids_t, mask_t)

    times = take_turns({"onnxruntime": lambda: ours.encode_text(texts, batch_size=batch), "torch": run_torch},
                       repeats)
    return [result_row("text", batch, "texts/s", batch, times[name], runtime=name, threads=threads)
            for name in ("onnxruntime", "torch")]


def sweep_session_options(pkg: Path, threads: int, batch: int, repeats: int) -> list[dict]:
    """Video encoder frames/s under other ORT session options (what a backend option could change)."""
    import hbi_runtime

    frames, mask = None, None
    rows = []
    for optimization in ("basic", "extended", "all"):
        for intra in sorted({1, threads}):
            with hbi_runtime.load(pkg, intra_op_threads=intra, optimization=optimization) as m:
                if frames is None:
                    pre = m.manifest.preprocessing
                    frames, mask = frames_input(batch, pre.max_frames, pre.image_size)
                times = take_turns({"x": lambda: m.encode_frames(frames, mask, batch_size=batch)}, repeats)["x"]
            row = result_row("video", batch, "frames/s", batch * frames.shape[1], times, runtime="onnxruntime",
                             optimization=optimization, intra_op_threads=intra)
            print(f"  sweep: optimization={optimization:8} intra_op_threads={intra}: "
                  f"{row['throughput']:.1f} frames/s", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batches", default="1", help="videos per call, comma-separated (12 frames each)")
    parser.add_argument("--texts", type=int, default=32, help="texts per call for the text-encoder comparison")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also try ORT optimisation levels / thread counts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    import hbi_runtime
    from hbi_export.checkpoints.loader import build_model

    tmp = None
    pkg, ckpt = args.package, args.checkpoint
    if pkg is None:
        tmp = tempfile.TemporaryDirectory(prefix="hbi-vs-torch-")
        pkg, ckpt = make_package(Path(tmp.name))
    load_start = os.getloadavg()
    print("measuring the fp32 GEMM peak ...", flush=True)
    peak_before = gemm_peak(args.threads)
    torch_peak = torch_matmul_gflops(args.threads)
    torch.set_num_threads(args.threads)
    ours = hbi_runtime.load(pkg, intra_op_threads=args.threads)
    ckpt = ckpt or Path(ours.manifest.source["checkpoint"])
    ref, _ = build_model(ckpt)
    results, diffs = [], {}
    for batch in batches:
        print(f"video encoder, {batch} video(s) x 12 frames per call, {args.repeats} turns ...", flush=True)
        rows, diffs[f"video_batch{batch}_max_abs_tokens_l0"] = compare_video(ours, ref, args.threads, batch,
                                                                             args.repeats)
        results += rows
    print(f"text encoder, {args.texts} texts per call ...", flush=True)
    results += compare_text(ours, ref, args.threads, args.texts, args.repeats)
    ours.close()
    sweep = sweep_session_options(pkg, args.threads, batches[0], max(3, args.repeats // 2)) if args.sweep else []
    peak_after = gemm_peak(args.threads)
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])

    summary = []
    print(f"\nfp32 GEMM peak {peak:.0f} GFLOP/s (numpy {peak_before['numpy']['gflops']:.0f}/"
          f"{peak_after['numpy']['gflops']:.0f}, ORT MatMul {peak_before['onnxruntime']['gflops']:.0f}/"
          f"{peak_after['onnxruntime']['gflops']:.0f}, before/after; torch.matmul {torch_peak:.0f}); "
          f"{args.threads} threads")
    for stage, batch in [("video", b) for b in batches] + [("text", args.texts)]:
        pair = {r["runtime"]: r for r in results if r["stage"] == stage and r["batch"] == batch}
        ratio = pair["onnxruntime"]["throughput"] / pair["torch"]["throughput"]
        line = {"stage": stage, "batch": batch, "unit": pair["torch"]["unit"],
                "onnxruntime": pair["onnxruntime"]["throughput"], "torch": pair["torch"]["throughput"],
                "speedup_vs_torch": ratio}
        if stage == "video":
            line["fraction_of_gemm_bound"] = pair["onnxruntime"]["throughput"] * GFLOP_PER_FRAME / peak
            line["torch_fraction_of_gemm_bound"] = pair["torch"]["throughput"] * GFLOP_PER_FRAME / peak
        summary.append(line)
        extra = (f", {line['fraction_of_gemm_bound']:.0%} of the fp32 GEMM bound (torch "
                 f"{line['torch_fraction_of_gemm_bound']:.0%})" if stage == "video" else "")
        print(f"{stage:5} batch {batch:3}: ORT {line['onnxruntime']:8.1f} {line['unit']}, torch "
              f"{line['torch']:8.1f} -> {ratio:.2f}x{extra}")
    print(f"max |ORT - torch| on video tokens (entity level): {max(diffs.values()):.2e}")
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f} ({os.cpu_count()} cores; other processes share "
          "them)")

    record = envelope(benchmark="bench_vs_torch", model_sha256=hbi_runtime.load(pkg).package.manifest_sha256,
                      config={"threads": args.threads, "batches": batches, "texts": args.texts,
                              "repeats": args.repeats, "package": str(pkg), "checkpoint": str(ckpt),
                              "gflop_per_frame": GFLOP_PER_FRAME},
                      results=results + sweep, summary=summary,
                      peak={"before": peak_before, "after": peak_after, "peak_gflops": peak,
                            "torch_matmul_gflops": torch_peak},
                      agreement=diffs, load_average={"start": list(load_start), "end": list(load_end)})
    print(f"wrote {write_record(record, args.out)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
