"""Encode throughput through a Triton server vs in-process, at 1 and 8 concurrent clients (loopback only).

Starts ``hbi-run triton-host`` (PyTriton's tritonserver, the package's ONNX Runtime encoders, Triton's dynamic
batcher) on free 127.0.0.1 ports, then measures, alternating the two paths in every repeat:

- in-process: ``hbi_runtime.load(PKG)``; C client threads share the model, as `hbi-run serve`'s threads would;
- triton: ``hbi_runtime.load(PKG, backend="triton", url=grpc://127.0.0.1:PORT)``; the same C threads, one gRPC
  client each; the server batches what arrives together.

Each client sends single-item requests (one video of T frames, or one text): the serving pattern, where batching
across clients is the server's job. A cell is a fixed number of requests (bounded load, no open-loop flood) split
across the C clients; throughput = requests / wall time. Reported per encoder and C: the medians over repeats
of items/s on both paths, the overhead ratio in-process / triton (> 1: Triton is slower; of the medians, and the
median of the per-repeat ratios, which pairs runs made close in time), and the server's
batching (requests per execution, from Triton's statistics). Both paths share this machine's cores (the server
computes, the clients wait), as they would on one box.

    python benchmarks/bench_triton.py [--package PKG] [--repeats 5] [--video-requests 48] [--text-requests 96]

Needs `pip install 'hbi-toolkit[triton-host]'`. Writes benchmarks/results/triton.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hbi_runtime.model import load

SCHEMA = "hbi.bench_triton/1"
TOKEN = "bench-triton"


def free_ports(n: int = 3) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_host(package: Path, ports: list[int], log: Path, timeout_s: float = 180) -> subprocess.Popen:
    import tritonclient.http as th

    exe = Path(sys.executable).with_name("hbi-run")
    cmd = [str(exe), "triton-host", "-m", str(package), "--http-port", str(ports[0]), "--grpc-port",
           str(ports[1]), "--metrics-port", str(ports[2]), "--max-batch", "16"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HBI_TRITON_ACCESS_TOKEN": TOKEN})
    client = th.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"triton-host exited: {log.read_text()[-3000:]}")
        try:
            if client.is_model_ready("video_encoder") and client.is_model_ready("text_encoder"):
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"triton-host not ready after {timeout_s} s")


def stats(port: int, model: str) -> tuple[int, int]:
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    s = client.get_inference_statistics(model, headers={"triton-access-token": TOKEN})["model_stats"][0]
    client.close()
    return int(s["inference_count"]), int(s["execution_count"])


def run_cell(call, requests: int, clients: int) -> float:
    """Seconds for ``requests`` calls of ``call(i)`` spread over ``clients`` threads (request i by thread i % C)."""
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def worker(w: int) -> None:
        start.wait()
        try:
            for i in range(w, requests, clients):
                call(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=None, help="model package (default: the demo model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--video-requests", type=int, default=48)
    parser.add_argument("--text-requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "triton.json")
    args = parser.parse_args()
    from hbi_runtime.cli import DEMO_PACKAGE

    package = args.package or DEMO_PACKAGE
    local = load(package)
    vspec = local.backends["video_encoder"].spec.inputs[0]
    shape = tuple(int(a) for a in vspec.shape[1:])
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((8, *shape)).astype(np.float32)  # 8 distinct videos, reused
    mask = np.ones((frames.shape[0], shape[0]), np.int64)
    texts = [f"a clip number {i} of a dog running on a beach" for i in range(args.text_requests)]
    tok = local.tokenizer(texts)
    ids, amask = tok[0], tok[1]

    ports = free_ports()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_triton_host_{os.getpid()}.log"
    print(f"starting triton-host on 127.0.0.1:{ports} (log {log})", flush=True)
    t0 = time.monotonic()
    proc = start_host(package, ports, log)
    startup_s = time.monotonic() - t0
    remote = load(package, backend="triton", url=f"grpc://127.0.0.1:{ports[1]}")
    try:
        paths = {"in-process": local, "triton": remote}
        backends = {name: {g: model.backends[g].load() for g in ("video_encoder", "text_encoder")}
                    for name, model in paths.items()}

        def video_call(backend):
            return lambda i: backend.infer({"frames": frames[i % len(frames)][None],
                                            "frame_mask": mask[i % len(frames)][None]})

        def text_call(backend):
            return lambda i: backend.infer({"input_ids": ids[i:i + 1], "attention_mask": amask[i:i + 1]})

        cells = {("video_encoder", c): {"in-process": [], "triton": [], "batching": []} for c in args.clients}
        cells.update({("text_encoder", c): {"in-process": [], "triton": [], "batching": []} for c in args.clients})
        # warm-up: one request each way (sessions, connections, the parity gate)
        for name in paths:
            video_call(backends[name]["video_encoder"])(0)
            text_call(backends[name]["text_encoder"])(0)
        for r in range(args.repeats):
            for (graph, clients), cell in cells.items():
                requests = args.video_requests if graph == "video_encoder" else args.text_requests
                order = ("in-process", "triton") if r % 2 == 0 else ("triton", "in-process")
                for name in order:
                    make = video_call if graph == "video_encoder" else text_call
                    before = stats(ports[0], graph) if name == "triton" else None
                    seconds = run_cell(make(backends[name][graph]), requests, clients)
                    cell[name].append(requests / seconds)
                    if before is not None:
                        inf, exe = (a - b for a, b in zip(stats(ports[0], graph), before))
                        cell["batching"].append(inf / max(exe, 1))
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    finally:
        remote.close()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = []
    for (graph, clients), cell in cells.items():
        local_rate, triton_rate = statistics.median(cell["in-process"]), statistics.median(cell["triton"])
        paired = statistics.median(a / b for a, b in zip(cell["in-process"], cell["triton"]))
        rows.append({"encoder": graph, "clients": clients, "in_process_per_s": round(local_rate, 2),
                     "triton_per_s": round(triton_rate, 2), "overhead_ratio": round(local_rate / triton_rate, 3),
                     "paired_ratio": round(paired, 3),
                     "requests_per_execution": round(statistics.median(cell["batching"]), 2),
                     "in_process_runs": [round(x, 2) for x in cell["in-process"]],
                     "triton_runs": [round(x, 2) for x in cell["triton"]]})
    print(f"\npackage {package} (video input {shape}), {args.repeats} repeats, medians; server startup "
          f"{startup_s:.1f} s; machine shared with other jobs")
    print(f"{'encoder':<14} {'clients':>7} {'in-process/s':>13} {'triton/s':>9} {'ratio':>6} {'paired':>6} "
          f"{'req/exec':>8}")
    for row in rows:
        print(f"{row['encoder']:<14} {row['clients']:>7} {row['in_process_per_s']:>13} {row['triton_per_s']:>9} "
              f"{row['overhead_ratio']:>6} {row['paired_ratio']:>6} {row['requests_per_execution']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": SCHEMA, "package": str(package), "package_sha256": local.package.manifest_sha256,
              "video_input": list(shape), "repeats": args.repeats, "video_requests": args.video_requests,
              "text_requests": args.text_requests, "server_startup_s": round(startup_s, 1),
              "host": {"python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count()},
              "command": " ".join(sys.argv), "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
