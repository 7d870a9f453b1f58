"""Benchmark video decoding + preprocessing (hbi_runtime.video) with each decoder.

Generates its clips with the ffmpeg of imageio-ffmpeg (cached in --work-dir): N x 10 s 640x360 H.264 clips and
one long clip (default 1 hour, 640x360, 30 fps, ultrafast, crf 40). Then, per decoder (decord, pyav):

- the short clips through a VideoDecoder pool of --workers processes (decode_many, results in order);
- the long clip alone through a pool of one worker.

Reported: sampled frames per second, ms per video (wall time / files, and the median time the caller waited
for each in-order result), the long clip's in-process decode time, peak RSS of the worker processes (max over workers, sampled every 50 ms) and of the
parent. Prints a table and writes JSON (default benchmarks/results/decode.json).

    python benchmarks/bench_decode.py [--clips 20] [--long-seconds 3600] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hbi_runtime.package import Preprocessing
from hbi_runtime.video import VideoDecodeError, VideoDecoder

SCHEMA = "hbi.bench_decode/1"


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_clip(path: Path, seconds: float) -> float:
    """Generate one 640x360 30 fps H.264 clip unless cached; returns the seconds it took."""
    if path.exists() and path.stat().st_size > 0:
        return 0.0
    start = time.monotonic()
    src = "testsrc2=size=640x360:rate=30"
    tmp = path.with_suffix(".part.mp4")
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", src, "-t", str(seconds), "-c:v",
                    "libx264", "-preset", "ultrafast", "-crf", "40", "-pix_fmt", "yuv420p", str(tmp)], check=True)
    tmp.rename(path)
    return time.monotonic() - start


class RssSampler:
    """Peak resident memory of a set of processes (re-read each tick, so replaced workers count too)."""

    def __init__(self, pids_fn, period_s: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self._pids_fn = pids_fn
        self._period = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._pids_fn():
                try:
                    self.peak = max(self.peak, self._psutil.Process(pid).memory_info().rss)
                except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                    pass
            time.sleep(self._period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_pool(paths: list[Path], prep: Preprocessing, decoder: str, workers: int, timeout_s: float) -> dict:
    """Decode ``paths`` in a fresh pool; returns throughput, per-file latency and peak RSS."""
    with VideoDecoder(prep, workers=workers, timeout_s=timeout_s, decoder=decoder, memory_limit_mb=4096) as pool:
        # warm-up: workers have imported their decoders; the first file is not timed
        list(pool.decode_many(paths[:1]))
        latencies, frames, errors = [], 0, []
        with RssSampler(lambda: pool.worker_pids) as rss:
            start = last = time.monotonic()
            for path, result in pool.decode_many(paths):
                now = time.monotonic()
                latencies.append(now - last)  # time the caller waited for this result (in order)
                last = now
                if isinstance(result, VideoDecodeError):
                    errors.append(result.message)
                else:
                    frames += int(result.mask.sum())
            wall = time.monotonic() - start
    return {"decoder": decoder, "files": len(paths), "workers": workers, "errors": errors,
            "sampled_frames": frames, "wall_s": wall, "frames_per_s": frames / wall,
            "ms_per_video_wall": 1000 * wall / len(paths),
            "ms_per_video_median_wait": 1000 * statistics.median(latencies),
            "peak_worker_rss_mb": rss.peak / 2**20}


def single_file_latency(path: Path, prep: Preprocessing, decoder: str, repeats: int) -> list[float]:
    """ms per decode of one file, in-process (no pool), to separate decode cost from pool overhead."""
    from hbi_runtime.video import decode_video

    out = []
    for _ in range(repeats):
        start = time.monotonic()
        decode_video(path, prep, decoder=decoder, memory_limit_mb=4096)
        out.append(1000 * (time.monotonic() - start))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--long-seconds", type=float, default=3600.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=12)
    parser.add_argument("--decoders", default="decord,pyav")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hbi_bench_decode"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "decode.json")
    args = parser.parse_args(argv)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    clips = [args.work_dir / f"clip{i:02d}_{args.clip_seconds:g}s.mp4" for i in range(args.clips)]
    gen_short = sum(make_clip(p, args.clip_seconds) for p in clips)
    long_clip = args.work_dir / f"long_{args.long_seconds:g}s.mp4"
    gen_long = make_clip(long_clip, args.long_seconds)
    print(f"generated: {args.clips} short clips in {gen_short:.1f} s, long clip ({args.long_seconds:g} s, "
          f"{long_clip.stat().st_size / 2**20:.1f} MiB) in {gen_long:.1f} s (0 = cached)", flush=True)

    prep = Preprocessing(max_frames=args.max_frames, image_size=224)
    rows = []
    for decoder in args.decoders.split(","):
        short = run_pool(clips, prep, decoder, args.workers, timeout_s=120)
        rows.append({"case": f"{args.clips} x {args.clip_seconds:g} s 640x360", **short})
        long = run_pool([long_clip], prep, decoder, 1, timeout_s=600)
        long["ms_in_process"] = single_file_latency(long_clip, prep, decoder, repeats=2)
        rows.append({"case": f"1 x {args.long_seconds:g} s 640x360", **long})
        print(f"  {decoder}: done", flush=True)
    parent_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    header = (f"{'case':<26} {'decoder':<7} {'frames/s':>9} {'ms/video':>9} {'wait p50':>9} {'worker RSS':>11} "
              f"{'errors':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<26} {r['decoder']:<7} {r['frames_per_s']:>9.1f} {r['ms_per_video_wall']:>9.1f} "
              f"{r['ms_per_video_median_wait']:>9.1f} {r['peak_worker_rss_mb']:>9.0f} MB {len(r['errors']):>6}")
    print(f"parent peak RSS: {parent_peak_mb:.0f} MB")

    import av
    try:
        import decord
        decord_version = decord.__version__
    except ImportError:
        decord_version = None
    record = {"schema": SCHEMA, "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                                            "python": sys.version.split()[0]},
              "versions": {"av": av.__version__, "decord": decord_version, "numpy": np.__version__},
              "settings": vars(args) | {"work_dir": str(args.work_dir), "out": str(args.out)},
              "generation_s": {"short": gen_short, "long": gen_long}, "results": rows,
              "parent_peak_rss_mb": parent_peak_mb}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
