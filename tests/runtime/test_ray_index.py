"""``hbi-run index --executor ray`` on a real local multi-node Ray cluster (``ray.cluster_utils.Cluster``).

One cluster for the module: a head and two worker nodes, 2 logical CPUs each (with 1, Ray Data's own tasks and
one-CPU actors starve each other), a small object store, no dashboard. The worker nodes carry a custom resource
``encode`` that the actors need, so actors run there and a worker node can be taken away under them. The demo model
package (shipped in hbi_runtime/data/demo) encodes, over clips generated here plus files that are not videos.

Checked: the index equals a local ``update_index`` of the same folder (same scores to 1e-6, same failed files with
the same reasons and kinds); a worker node removed mid-run (Ray restarts its actor elsewhere and retries its
batch); the driver killed mid-run, then a rerun that resumes (what was committed is kept, every referenced shard is
complete and checksummed, no orphan remains). Skipped, with the reason, where the ``ray`` extra is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'hbi-toolkit[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'hbi-toolkit[ray]')")
pytest.importorskip("av", reason="video decoding needs the `runtime` extra")

from ray.cluster_utils import Cluster  # noqa: E402

from hbi_runtime.index import Index, update_index  # noqa: E402
from hbi_runtime.index.catalog import CATALOG, SHARDS, TMP  # noqa: E402
from hbi_runtime.index.ray_executor import RayExecutor, RayOptions  # noqa: E402
from hbi_runtime.model import load  # noqa: E402
from hbi_runtime.search import search  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo" / "package"
NODE = dict(num_cpus=2, object_store_memory=128 << 20)
ACTOR = {"encode": 1}
QUERIES = ["a person is cooking", "a dog runs on grass", "a man plays guitar"]
BATCH = 2


def _ffmpeg(*args: str) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args], check=True, capture_output=True,
                   timeout=60)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """24 short clips of different content and length, a corrupt .mp4, a text file named .mkv, an empty .webm."""
    folder = tmp_path_factory.mktemp("ray-videos")
    patterns = ["testsrc2", "testsrc", "smptebars", "rgbtestsrc", "mandelbrot", "yuvtestsrc"]
    for i in range(24):
        sub = folder / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        _ffmpeg("-f", "lavfi", "-i", f"{patterns[i % len(patterns)]}=size=64x48:rate=10", "-t",
                str(1 + (i % 4) * 0.5), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(sub / f"clip{i:02d}.mp4"))
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "notes.mkv").write_text("not a video\n")
    (folder / "empty.webm").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, connect=False,
                head_node_args=dict(**NODE, include_dashboard=False))
    workers = [c.add_node(**NODE, resources={"encode": 2}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.workers = workers
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model():
    with load(DEMO) as m:
        yield m


@pytest.fixture(scope="module")
def local_index(videos, model, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("local") / "index"
    update_index(model, videos, target, batch_size=BATCH)
    return target


def _scores(model, index_dir: Path) -> dict[str, list[float]]:
    """{path: [score of each query]} over the whole index."""
    index = Index.open(index_dir, model.package.manifest_sha256, verify=True)
    out: dict[str, list[float]] = {}
    for result in search(model, index, QUERIES, top_k=len(index.rows)):
        for hit in result.hits:
            out.setdefault(hit.path, []).append(hit.score)
    return out


def _failed(index_dir: Path) -> list[tuple]:
    conn = sqlite3.connect(index_dir / CATALOG)
    try:
        return conn.execute("SELECT display, error, error_kind FROM videos WHERE status = 'failed' AND "
                            "gen_removed IS NULL ORDER BY rel").fetchall()
    finally:
        conn.close()


def _assert_same_index(model, ours: Path, reference: Path) -> None:
    mine, theirs = _scores(model, ours), _scores(model, reference)
    assert sorted(mine) == sorted(theirs) and len(mine) == 24
    for path, scores in theirs.items():
        np.testing.assert_allclose(mine[path], scores, atol=1e-6, rtol=0, err_msg=path)
    assert _failed(ours) == _failed(reference)
    assert [f[0] for f in _failed(reference)] == ["corrupt.mp4", "empty.webm", "notes.mkv"]


def _assert_tidy(index_dir: Path) -> None:
    """Every shard folder is referenced by the catalog and vice versa; nothing is left under tmp/."""
    conn = sqlite3.connect(index_dir / CATALOG)
    try:
        referenced = {f"{r[0]:06d}" for r in conn.execute("SELECT id FROM shards")}
    finally:
        conn.close()
    assert {p.name for p in (index_dir / SHARDS).iterdir()} == referenced
    assert list((index_dir / TMP).iterdir()) == []


def test_ray_index_equals_local_index(cluster, videos, model, local_index, tmp_path):
    executor = RayExecutor(RayOptions(actors=2, resources=ACTOR), DEMO)
    target = tmp_path / "index"
    summary = update_index(model, videos, target, batch_size=BATCH, executor=executor)
    assert summary.new == 24 and len(summary.failed) == 3
    assert {f.kind for f in summary.failed} == {"permanent"}
    _assert_same_index(model, target, local_index)
    _assert_tidy(target)
    worker_ids = {n.node_id for n in cluster.workers}
    assert set(executor.batches_by_node) <= worker_ids  # the actors ran on the worker nodes only

    again = update_index(model, videos, target, batch_size=BATCH, executor=executor)  # incremental: nothing to do
    assert (again.new, again.unchanged, len(again.failed)) == (0, 24, 3)
    assert not any(f.attempted for f in again.failed)  # permanent failures are not retried for an unchanged file


def test_worker_node_removed_mid_run(cluster, videos, model, local_index, tmp_path):
    executor = RayExecutor(RayOptions(actors=2, resources=ACTOR), DEMO)
    removed = {}

    def progress(done, total, path, rate):
        if done >= BATCH and not removed and executor.last_node is not None:
            node = next(n for n in cluster.workers if n.node_id == executor.last_node)
            cluster.remove_node(node)  # the node that just delivered a batch: its actor is at work on the next
            removed["node"], removed["at"] = node.node_id, executor.batches_by_node.copy()

    target = tmp_path / "index"
    try:
        summary = update_index(model, videos, target, batch_size=BATCH, executor=executor, progress=progress)
    finally:
        if removed:
            cluster.workers = [n for n in cluster.workers if n.node_id != removed["node"]]
            cluster.workers.append(cluster.add_node(**NODE, resources={"encode": 2}))
            cluster.wait_for_nodes()
    assert removed, "no batch was committed, so no node was removed"
    assert summary.new == 24
    survivors = {n for n in executor.batches_by_node if n != removed["node"]}
    assert sum(executor.batches_by_node[n] - removed["at"][n] for n in survivors) > 0  # work went on elsewhere
    _assert_same_index(model, target, local_index)
    _assert_tidy(target)


def test_windows_on_ray_equal_local(cluster, videos, model, tmp_path):
    """--window: actors probe and decode windows with the same window decoder as a local run."""
    small = tmp_path / "videos"
    small.mkdir()
    for name in ("clip03.mp4", "clip06.mp4", "clip07.mp4"):
        src = next(videos.rglob(name))
        shutil.copy(src, small / name)
    shutil.copy(videos / "corrupt.mp4", small / "corrupt.mp4")
    local = update_index(model, small, tmp_path / "local", batch_size=BATCH, window=1.0)
    executor = RayExecutor(RayOptions(actors=1, resources=ACTOR), DEMO)
    remote = update_index(model, small, tmp_path / "ray", batch_size=BATCH, window=1.0, executor=executor)
    assert (remote.new, remote.rows, len(remote.failed)) == (local.new, local.rows, 1) and local.rows > 3
    mine = Index.open(tmp_path / "ray", verify=True)
    theirs = Index.open(tmp_path / "local")
    key = [(r.rel, r.start_s, r.end_s, tuple(r.frames)) for r in theirs.rows]
    assert sorted((r.rel, r.start_s, r.end_s, tuple(r.frames)) for r in mine.rows) == sorted(key)
    assert _failed(tmp_path / "ray") == _failed(tmp_path / "local")
    _assert_tidy(tmp_path / "ray")


def _committed(index_dir: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{index_dir / CATALOG}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM videos WHERE status = 'ok'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_driver_killed_mid_run_then_rerun_resumes(cluster, videos, model, local_index, tmp_path):
    target = tmp_path / "index"
    cli = [sys.executable, "-c", "from hbi_runtime.cli import main; main()"]
    args = ["index", str(videos), "--index", str(target), "--model", str(DEMO), "--batch-size", str(BATCH),
            "--executor", "ray", "--ray-address", cluster.address, "--actors", "1", "--format", "json"]
    driver = subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while _committed(target) < BATCH and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and anything it started
    _, err = driver.communicate(timeout=30)
    committed = _committed(target)
    assert driver.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert BATCH <= committed < 24, f"the kill did not land mid-run ({committed} committed)"
    assert len(Index.open(target).rows) == 0  # nothing of the killed run is published

    executor = RayExecutor(RayOptions(actors=2, resources=ACTOR), DEMO)
    summary = update_index(model, videos, target, batch_size=BATCH, executor=executor)
    assert summary.resumed >= committed and summary.new + summary.resumed == 24
    _assert_same_index(model, target, local_index)
    _assert_tidy(target)


def test_local_ray_start_and_cli(videos, tmp_path, local_index, model, monkeypatch):
    """The CLI path with a Ray started for the run when no --ray-address is given is not run here: the module's
    cluster is this process's Ray. What the CLI adds is checked: options, JSON summary, same failed files."""
    from typer.testing import CliRunner

    from hbi_runtime.cli import app

    small = tmp_path / "videos"
    shutil.copytree(videos, small)
    result = CliRunner().invoke(app, ["index", str(small), "--index", str(tmp_path / "index"), "-m", str(DEMO),
                                      "--executor", "ray", "--actors", "1", "--batch-size", "4",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"new": 24' in result.output
    assert _failed(tmp_path / "index") == _failed(local_index)
