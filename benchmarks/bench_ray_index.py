"""``hbi-run index --executor ray`` vs ``--executor local`` on the same folder, and the one committer's cost.

    python benchmarks/bench_ray_index.py --package PKG [--demo] [--clips 100] [--repeats 2] [--json ...]

1. Throughput and cost: the same folder of generated 10 s 640x360 H.264 clips (benchmarks/bench_index.py's) indexed from
   scratch by the CLI, once per executor and repeat, alternating which goes first: ``hbi-run index DIR --index NEW
   --format json`` as a user runs it (a new process: imports, model load; with ``--executor ray`` also starting a
   Ray on this machine, its workers and the actors). Videos/s = clips / wall seconds of the command, and CPU
   seconds per video of the command's whole process tree (the fair comparison on a shared machine); the JSON
   keeps each run and the medians. ``--demo`` repeats it with the demo package (there Ray's fixed costs dominate).
2. The committer: the driver's serial work per 1,000 videos, measured by adopting synthetic shards of the
   package's side shapes (written and synced beforehand, as an actor does) in batches of ``--batch-size``:
   check + rename + one SQLite transaction per batch, then publish and the end-of-run merge.
3. The scaling model for N nodes: each node indexes at ``cores / (CPU s per video on Ray)``, the committer
   serialises ``commit_s`` per video, so N nodes give about ``min(N * rate, 1 / commit_s)`` videos/s after the
   start-up; the end-of-run merge of the run's shards (serial, proportional to the data) comes on top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_index import make_clips, save_record

DEMO = Path(__file__).resolve().parent.parent / "hbi_runtime" / "data" / "demo" / "package"


def run_cli(videos: Path, index: Path, package: Path, executor: str, workers: int, batch_size: int) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    cmd = [sys.executable, "-c", "from hbi_runtime.cli import main; main()", "index", str(videos), "--index",
           str(index), "--model", str(package), "--workers", str(workers), "--batch-size", str(batch_size),
           "--executor", executor, "--format", "json"]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        cpu = tree_cpu_seconds(proc)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {"executor": executor, "wall_s": round(wall, 2), "index_s": summary["seconds"], "new": summary["new"],
            "failed": len(summary["failed"]), "cpu_s": round(cpu, 1)}


def tree_cpu_seconds(proc: subprocess.Popen, every_s: float = 0.25) -> float:
    """CPU seconds (user + system) of ``proc`` and every process below it until it exits, sampled every
    ``every_s`` (a process that ends between two samples loses at most that much; Ray's own processes, started by
    the driver, are below it). On a shared machine this is the fair cost: wall time depends on how many runnable
    threads each side has against the other jobs."""
    import psutil

    root = psutil.Process(proc.pid)
    last: dict[int, float] = {}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                t = p.cpu_times()
                last[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        time.sleep(every_s)
    return sum(last.values())


def throughput(videos: Path, n: int, package: Path, work: Path, repeats: int, workers: int, batch: int) -> dict:
    runs = []
    for r in range(repeats):
        order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
        for executor in order:
            run = run_cli(videos, work / f"index-{executor}", package, executor, workers, batch)
            run["videos_per_s"] = round(n / run["wall_s"], 3)
            run["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(run), flush=True)
            runs.append(run)
    med = {e: statistics.median(r["videos_per_s"] for r in runs if r["executor"] == e) for e in ("local", "ray")}
    cpu = {e: statistics.median(r["cpu_s"] / n for r in runs if r["executor"] == e) for e in ("local", "ray")}
    return {"package": str(package), "clips": n, "workers": workers, "batch_size": batch, "runs": runs,
            "median_videos_per_s": med, "ray_slower_by": round(1 - med["ray"] / med["local"], 3),
            "median_cpu_s_per_video": {e: round(v, 3) for e, v in cpu.items()},
            "ray_cpu_overhead": round(cpu["ray"] / cpu["local"] - 1, 3)}


def committer_cost(package: Path, work: Path, videos: int, batch: int) -> dict:
    """Seconds the committer spends per 1,000 videos (synthetic shards of the package's side shapes)."""
    import numpy as np

    import hbi_runtime
    from hbi_runtime.index.catalog import TMP, Writer
    from hbi_runtime.index.scan import ScanEntry
    from hbi_runtime.index.update import Committer, FrameInfo, IndexSummary, _Job, index_meta, write_synced
    from hbi_runtime.index.windows import Window
    from hbi_runtime.scoring import DEFAULT_DTYPE, VideoStore
    from hbi_runtime.sides import Side, SideLevel

    index = work / "committer-index"
    shutil.rmtree(index, ignore_errors=True)
    rng = np.random.default_rng(0)
    with hbi_runtime.load(package) as model:
        m = model.manifest
        tokens, dim, frames = m.tokens_per_level["video"], m.embed_dim, m.max_frames
        meta = index_meta(model, work, dtype=DEFAULT_DTYPE, window=None, stride=None)
    with Writer(index) as writer:
        writer.begin(meta)
        batches = []
        for b in range(0, videos, batch):
            n = min(batch, videos - b)
            levels = []
            for t in tokens:
                x = rng.standard_normal((n, t, dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=-1, keepdims=True)
                levels.append(SideLevel(x, np.full((n, t), 1.0 / t, np.float32), np.ones((n, t), np.float32)))
            tmp = index / TMP / f"bench-{b:06d}"
            files = write_synced(VideoStore.from_sides(Side(tuple(levels), "video"), DEFAULT_DTYPE), tmp)
            jobs = []
            for i in range(n):
                job = _Job(ScanEntry(f"v{b + i:06d}.mp4".encode(), b"/nonexistent", 1000, 1), "new")
                job.stored = 1
                job.windows = [(Window(0.0, 10.0, 0, 300), FrameInfo(10.0, 30.0, 300, list(range(0, 300, 25))))]
                jobs.append(job)
            batches.append((jobs, ["fast:" + "0" * 64] * n, tmp, n, files))
        summary = IndexSummary(index)
        committer = Committer(writer, summary, None, videos)
        started = time.perf_counter()
        for jobs, hashes, tmp, n, files in batches:
            committer.adopt(jobs, hashes, tmp, n, files)
        adopt_s = time.perf_counter() - started
        started = time.perf_counter()
        writer.publish()
        first = min(r.id for r in writer.shard_records())
        writer.merge([r.id for r in writer.shard_records() if r.id >= first])
        finish_s = time.perf_counter() - started
    per_1000 = adopt_s * 1000 / videos
    return {"videos": videos, "batch_size": batch, "side_tokens": tokens, "embed_dim": dim, "frames": frames,
            "adopt_s": round(adopt_s, 3), "adopt_s_per_1000_videos": round(per_1000, 3),
            "publish_and_merge_s": round(finish_s, 3),
            "publish_and_merge_s_per_1000_videos": round(finish_s * 1000 / videos, 3)}


def scaling(rate_per_node: float, commit_s_per_video: float) -> list[dict]:
    ceiling = 1.0 / commit_s_per_video
    return [{"nodes": n, "videos_per_s": round(min(n * rate_per_node, ceiling), 2),
             "committer_busy": round(min(1.0, n * rate_per_node / ceiling), 4)} for n in (1, 2, 4, 8, 16, 64, 256)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="a ViT-B/32-size package")
    parser.add_argument("--demo", action="store_true", help="also measure with the demo package")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (per actor with ray)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--committer-videos", type=int, default=2000)
    parser.add_argument("--skip-throughput", action="store_true", help="only the committer and the model")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "hbi-bench-ray-index")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ray_index.json"))
    args = parser.parse_args()

    record = {"schema": "hbi.bench-ray-index/1", "cores": os.cpu_count(),
              "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    committer = committer_cost(args.package, args.work_dir, args.committer_videos, 16)
    print(json.dumps({"committer": committer}), flush=True)
    record["committer"] = committer
    if not args.skip_throughput:
        clips = make_clips(args.work_dir / "clips", args.clips)
        record["vit_b_32"] = throughput(args.work_dir / "clips", len(clips), args.package, args.work_dir,
                                        args.repeats, args.workers, args.batch_size)
        if args.demo:
            record["demo"] = throughput(args.work_dir / "clips", len(clips), DEMO, args.work_dir, args.repeats,
                                        args.workers, args.batch_size)
        # per node: its cores kept busy at the measured CPU cost of a video on Ray (wall rates on a shared machine
        # say more about the other jobs than about the code)
        rate = (os.cpu_count() or 2) / record["vit_b_32"]["median_cpu_s_per_video"]["ray"]
        commit_s = committer["adopt_s_per_1000_videos"] / 1000
        record["scaling_model"] = {"rate_per_node": round(rate, 3), "commit_s_per_video": commit_s,
                                   "nodes_until_committer_saturates": int(1 / commit_s / rate),
                                   "end_of_run_merge_s_per_1000_videos": committer[
                                       "publish_and_merge_s_per_1000_videos"],
                                   "nodes": scaling(rate, commit_s)}
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    save_record(record, args.json)


if __name__ == "__main__":
    main()
