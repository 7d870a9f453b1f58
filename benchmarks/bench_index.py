"""End-to-end index throughput (decode + encode) against what the two cores allow.

    python benchmarks/bench_index.py --package pkg/b32 [--clips 16] [--workers 1] [--json ...]

Generates 10 s 640x360 H.264 clips, then measures in one run: decode core-seconds per video (in-process, one
thread), encode core-seconds per video (ONNX Runtime video encoder on decoded frames), and the throughput of
``update_index`` (decoding in worker processes overlapping encoding). The bound is
2 / (decode core-s + encode core-s) videos/s on this 2-core machine; the goal is >= 80% of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def make_clips(folder: Path, n: int) -> list[Path]:
    import imageio_ffmpeg

    folder.mkdir(parents=True, exist_ok=True)
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    clips = []
    for i in range(n):
        path = folder / f"clip{i:03d}.mp4"
        if not path.exists():
            subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i",
                            f"testsrc2=size=640x360:rate=30,hue=h={i * 23}", "-t", "10", "-c:v", "libx264",
                            "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)], check=True)
        clips.append(path)
    return clips


def cpu_seconds(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of fn(); CPU covers every thread of this process."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "hbi-bench-index")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/index.json"))
    args = parser.parse_args()

    import numpy as np

    import hbi_runtime
    from hbi_runtime.index import update_index
    from hbi_runtime.video import decode_video

    clips = make_clips(args.work_dir / "clips", args.clips)
    with hbi_runtime.load(args.package) as model:
        prep = model.manifest.preprocessing
        decoded = []
        dec_cpu, dec_wall = cpu_seconds(lambda: decoded.extend(decode_video(str(c), prep) for c in clips))
        frames = np.stack([d.frames for d in decoded])
        masks = np.stack([d.mask for d in decoded])
        model.encode_frames(frames[:1], masks[:1])  # session start-up outside the measurement
        enc_cpu, enc_wall = cpu_seconds(lambda: model.encode_frames(frames, masks, batch_size=args.batch_size))
        decode_cs, encode_cs = dec_cpu / len(clips), enc_cpu / len(clips)
        bound = (os.cpu_count() or 2) / (decode_cs + encode_cs)
        index_dir = args.work_dir / "index"
        started = time.perf_counter()
        summary = update_index(model, args.work_dir / "clips", index_dir, workers=args.workers,
                               batch_size=args.batch_size, rebuild=True)
        wall = time.perf_counter() - started
    rate = len(clips) / wall
    index_bytes = sum(f.stat().st_size for f in (index_dir / "shards").rglob("*") if f.is_file())
    record = {"schema": "hbi.bench-index/1", "clips": len(clips), "cores": os.cpu_count(),
              "decode_core_s_per_video": round(decode_cs, 4), "encode_core_s_per_video": round(encode_cs, 4),
              "bound_videos_per_s": round(bound, 3), "index_videos_per_s": round(rate, 3),
              "fraction_of_bound": round(rate / bound, 3), "failed": len(summary.failed),
              "index_bytes_per_video": int(index_bytes / len(clips)),
              "load_average": os.getloadavg()}
    save_record(record, args.json)


def save_record(record: dict, path: Path) -> None:
    """Print the benchmark's record and write it as JSON to ``path``."""
    print(json.dumps(record, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
