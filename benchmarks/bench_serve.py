"""``hbi-run serve`` under bounded load on the loopback interface: latency, throughput, the batching gain, memory,
and the served query against the CLI's whole-process ``hbi-run retrieve``.

Two indexes, both for the demo model:

* ``demo``: ``--demo-videos`` (default 120) real videos: the 8 bundled samples copied under new names and indexed
  through the real decoder and encoder (copies have equal sides; the cost per query is that of 120 videos);
* ``synthetic``: ``--videos`` (default 100,000) random int8 sides of the demo model's shapes written straight into
  an index through the real writer (as ``bench_index_verify.py`` does), no encoding.

For each index, a server with batching (``--max-batch 32``) and one without (``--max-batch 1``) are started in
turn; each takes ``--requests`` retrieve requests (one query, top 10) from 1, 8 and 32 concurrent clients (threads
with keep-alive connections; they share the machine's cores with the server, as on any one-box load test).
Reported: p50 / p99 latency, requests/s, the batching gain (requests/s batched / unbatched at the same
concurrency), server RSS at rest and its peak under load (VmHWM), and for the demo index the median wall time of
``hbi-run retrieve QUERY --index IDX --format json`` in a new process (5 runs) against the served p50 at
concurrency 1. Goals (issue): gain >= 3x at concurrency 32 over the synthetic index; served p50 <= 1/10 of the CLI.

Usage::

    python benchmarks/bench_serve.py [--videos 100000] [--requests 300] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index_verify import make_store, write_index  # noqa: E402

import hbi_runtime  # noqa: E402
from hbi_runtime.cli import DEMO_PACKAGE  # noqa: E402
from hbi_runtime.index import Index, update_index  # noqa: E402

QUERIES = [q["query"] for q in json.loads((DEMO_PACKAGE.parent / "queries.json").read_text())["queries"]]
DEFAULT_OUT = Path("benchmarks/results/serve.json")


def demo_index(root: Path, n: int, model) -> Path:
    videos = root / "videos"
    videos.mkdir()
    samples = sorted((DEMO_PACKAGE.parent / "samples").glob("*.mp4"))
    for i in range(n):
        shutil.copy2(samples[i % len(samples)], videos / f"clip_{i:04d}.mp4")
    update_index(model, videos, root / "demo-index", workers=2)
    return root / "demo-index"


def synthetic_index(root: Path, n: int, demo: Path) -> Path:
    meta = dict(Index.open(demo).meta)
    meta.update(video_dir="/synthetic", created="bench")
    store = make_store(n, d=meta["embed_dim"], lengths=tuple(meta["tokens_per_level"]))
    write_index(root / "synthetic-index", store, meta)
    return root / "synthetic-index"


class Served:
    def __init__(self, index: Path, max_batch: int) -> None:
        cmd = [sys.executable, "-m", "hbi_runtime.cli", "serve", "--index", str(index), "--model", str(DEMO_PACKAGE),
               "--port", "0", "--format", "json", "--log-level", "warning", "--max-batch", str(max_batch),
               "--queue-size", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = json.loads(self.proc.stdout.readline())["url"].rstrip("/")

    def status(self, key: str) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def load(url: str, concurrency: int, requests: int) -> dict:
    per = max(1, requests // concurrency)
    barrier = threading.Barrier(concurrency)

    def client(k: int) -> list[float]:
        out = []
        # TCP_NODELAY: httpx writes a request's headers and body separately; with Nagle's algorithm the body then
        # waits for the server's delayed ACK (~40 ms on Linux), which would be measured as server latency
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=url, timeout=120, transport=transport) as c:
            c.get("/healthz")
            barrier.wait()
            for i in range(per):
                body = {"queries": [QUERIES[(k + i) % len(QUERIES)]], "top_k": 10}
                t0 = time.perf_counter()
                r = c.post("/v1/retrieve", json=body)
                out.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        lat = sorted(x for chunk in pool.map(client, range(concurrency)) for x in chunk)
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), "p50_ms": round(1000 * statistics.median(lat), 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "rps": round(len(lat) / wall, 1)}


def cli_retrieve(index: Path, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hbi_runtime.cli", "retrieve", QUERIES[0], "--index", str(index),
                        "--model", str(DEMO_PACKAGE), "--format", "json"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=100_000)
    ap.add_argument("--demo-videos", type=int, default=120)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    report: dict = {"machine": {"cpus": os.cpu_count()}, "indexes": {}}
    with tempfile.TemporaryDirectory() as tmp, hbi_runtime.load(DEMO_PACKAGE) as model:
        root = Path(tmp)
        demo = demo_index(root, args.demo_videos, model)
        indexes = {"demo": demo, "synthetic": synthetic_index(root, args.videos, demo)}
        for name, index in indexes.items():
            entry: dict = {"videos": len(Index.open(index).rows)}
            for mode, max_batch in (("batched", 32), ("unbatched", 1)):
                server = Served(index, max_batch)
                try:
                    rest = server.status("VmRSS")
                    runs = [load(server.url, c, args.requests if c > 1 else max(40, args.requests // 4))
                            for c in (1, 8, 32)]
                    entry[mode] = {"rss_rest_mb": round(rest, 1), "rss_peak_mb": round(server.status("VmHWM"), 1),
                                   "runs": runs}
                finally:
                    server.stop()
                for r in runs:
                    print(f"{name:9s} {mode:9s} c={r['concurrency']:>2}  p50 {r['p50_ms']:8.2f} ms  p99 "
                          f"{r['p99_ms']:8.2f} ms  {r['rps']:7.1f} req/s", flush=True)
            entry["batching_gain"] = {str(b["concurrency"]): round(b["rps"] / u["rps"], 2)
                                      for b, u in zip(entry["batched"]["runs"], entry["unbatched"]["runs"])}
            print(f"{name}: batching gain (req/s batched / unbatched) by concurrency: {entry['batching_gain']}")
            report["indexes"][name] = entry
        cli = cli_retrieve(demo)
        served_p50 = report["indexes"]["demo"]["batched"]["runs"][0]["p50_ms"] / 1000
        report["cli_vs_served"] = {"cli_whole_process_s": round(cli, 3), "served_p50_s": round(served_p50, 4),
                                   "ratio": round(served_p50 / cli, 4)}
        print(f"hbi-run retrieve (new process, demo index): {cli:.3f} s; served p50 {1000 * served_p50:.1f} ms "
              f"= {served_p50 / cli:.3f} of it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
