"""``hbi-run serve``: the API against the CLI's own answers, batching, the index reloaded without restart, the
security defaults, and every kind of bad input and fault the issue lists, on real servers (subprocesses of
``python -m hbi_runtime.cli serve`` on free ports, never a fixed one) with the demo package.

Torch-free. Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client) and httpx; skipped with the reason
where they are not installed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'hbi-toolkit[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'hbi-toolkit[serve]'")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the test client) is not installed")

import hbi_runtime  # noqa: E402
from hbi_runtime.cli import DEMO_PACKAGE  # noqa: E402
from hbi_runtime.index import Index, update_index  # noqa: E402
from hbi_runtime.index.catalog import SHARDS  # noqa: E402
from hbi_runtime.search import search  # noqa: E402

SAMPLES = DEMO_PACKAGE.parent / "samples"
QA_PKG = DEMO_PACKAGE.parent / "qa" / "package"
CAPTION_PKG = DEMO_PACKAGE.parent / "caption"
QUERIES = json.loads((DEMO_PACKAGE.parent / "queries.json").read_text())["queries"]
QUERY = QUERIES[0]["query"]


# ------------------------------------------------------------------------------------------------ harness
class Server:
    """``hbi-run serve --port 0 --format json`` in a subprocess; ``url`` from its first stdout line."""

    def __init__(self, *args, env=None, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "hbi_runtime.cli", "serve", "--port", "0", "--format", "json",
               "--log-level", "warning", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout)
            raise AssertionError(f"server did not start (exit {self.proc.returncode}): {''.join(self.stderr)}")
        self.info = json.loads(line)
        self.url = self.info["url"].rstrip("/")
        host = self.url.split("//")[1].rsplit(":", 1)
        if host[0] == "0.0.0.0":
            self.url = f"http://127.0.0.1:{host[1]}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def _copy_samples(root: Path) -> Path:
    folder = root / "videos"
    folder.mkdir(parents=True)
    for p in sorted(SAMPLES.glob("*.mp4")):
        shutil.copy2(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def model():
    with hbi_runtime.load(DEMO_PACKAGE) as m:
        yield m


@pytest.fixture(scope="module")
def library(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("serve")
    videos = _copy_samples(root)
    update_index(model, videos, root / "index", workers=1)
    return videos, root / "index"


@pytest.fixture(scope="module")
def server(library):
    videos, index = library
    s = Server("--model", DEMO_PACKAGE, "--index", index, "--qa-model", QA_PKG, "--caption-model", CAPTION_PKG,
               "--max-delay-ms", "20")
    yield s
    assert s.stop() == 0, "".join(s.stderr)


def _catalog_digest(index: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(index.rglob("*")):
        if f.is_file() and not f.name.endswith(("-wal", "-shm")) and "thumbnails" not in f.parts:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _error(r, status: int, kind: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "hint"}, body
    assert "Traceback" not in r.text
    if kind is not None:
        assert body["error"]["type"] == kind, body
    return body["error"]


# ------------------------------------------------------------------------------------------------ answers
def test_health_ready_and_metrics(server):
    assert server.client.get("/healthz").json()["status"] == "ok"
    ready = server.client.get("/readyz").json()
    assert ready["ready"] is True and ready["videos"] == 8
    server.client.post("/v1/retrieve", json={"queries": [QUERY]})
    text = server.client.get("/metrics").text
    for name in ("hbi_serve_requests_total", "hbi_serve_errors_total", "hbi_serve_request_seconds_bucket",
                 "hbi_serve_batch_size_bucket", "hbi_serve_queue_depth", "hbi_serve_index_videos 8.0"):
        assert name in text, name
    assert 'hbi_serve_requests_total{route="/v1/retrieve",status="200"}' in text


def test_retrieve_equals_the_cli_search(server, library, model):
    _, index = library
    idx = Index.open(index, model.package.manifest_sha256)
    queries = [q["query"] for q in QUERIES]
    expected = search(model, idx, queries, top_k=5)
    doc = server.client.post("/v1/retrieve", json={"queries": queries, "top_k": 5}).json()
    assert doc["schema"] == "hbi.retrieve/2" and doc["model_sha256"] == model.package.manifest_sha256
    assert len(doc["queries"]) == len(queries)
    for got, want in zip(doc["queries"], expected):
        assert got["query"] == want.query
        assert [h["path"] for h in got["hits"]] == [h.path for h in want.hits]
        np.testing.assert_allclose([h["score"] for h in got["hits"]], [h.score for h in want.hits], atol=1e-6)
        assert [h["words"] for h in got["hits"]] == [[vars(w) for w in h.words] for h in want.hits]
        for h in got["hits"]:
            assert "abs_path" not in h and "abs_path_b64" not in h  # the server's file system stays private
            assert isinstance(h["video_id"], int)
    for q, got in zip(QUERIES, doc["queries"]):
        if q["expected"]:
            assert got["hits"][0]["path"] == q["expected"]


def test_levels_and_top_k(server, library, model):
    _, index = library
    idx = Index.open(index, model.package.manifest_sha256)
    (want,) = search(model, idx, [QUERY], top_k=3, level_weights=(1.0, 0.0, 0.0))
    doc = server.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 3, "levels": [1, 0, 0]}).json()
    hits = doc["queries"][0]["hits"]
    assert len(hits) == 3
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want.hits], atol=1e-6)
    many = server.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 50}).json()
    assert len(many["queries"][0]["hits"]) == 8  # all there is


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    queries = [q["query"] for q in QUERIES] * 3
    alone = {q: server.client.post("/v1/retrieve", json={"queries": [q], "top_k": 3}).json()["queries"][0]
             for q in set(queries)}
    before = _histogram_count(server.client.get("/metrics").text, "text")
    barrier = threading.Barrier(len(queries))

    def one(q):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            return q, c.post("/v1/retrieve", json={"queries": [q], "top_k": 3}).json()["queries"][0]

    with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
        answers = list(pool.map(one, queries))
    for q, got in answers:
        assert got["query"] == q
        assert [h["path"] for h in got["hits"]] == [h["path"] for h in alone[q]["hits"]]
        np.testing.assert_allclose([h["score"] for h in got["hits"]], [h["score"] for h in alone[q]["hits"]],
                                   atol=1e-6)
    calls = _histogram_count(server.client.get("/metrics").text, "text") - before
    assert calls < len(queries), f"{len(queries)} concurrent requests took {calls} encoder calls: no batching"


def _histogram_count(metrics: str, lane: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'hbi_serve_batch_size_count{{lane="{lane}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_encode_text_equals_the_model(server, model):
    doc = server.client.post("/v1/encode-text", json={"texts": [QUERY, "a blue square"]}).json()
    assert doc["schema"] == "hbi.encode-text/1"
    side = model.encode_text([QUERY, "a blue square"])
    for i, t in enumerate(doc["texts"]):
        for k, level in enumerate(t["levels"]):
            np.testing.assert_allclose(level["tokens"], side.levels[k].tokens[i], atol=1e-6)
            assert level["mask"] == side.levels[k].mask[i].astype(bool).tolist()


def test_qa_caption_explain_and_captions_direction(server, library):
    hit = server.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1}).json()["queries"][0]["hits"][0]
    vid = hit["video_id"]
    qa = server.client.post("/v1/qa", json={"video_id": vid, "question": "what colour is the circle?"}).json()
    assert qa["schema"] == "hbi.qa/1"
    (row,) = qa["results"]
    assert row["video"] == hit["path"] and len(row["answers"]) == 5
    assert abs(sum(a["probability"] for a in row["answers"])) <= 1.0 + 1e-6
    from hbi_runtime.tasks.qa import load_qa

    videos, _ = library
    with load_qa(QA_PKG) as rt:  # the same answer as hbi-run qa gives
        (want,) = rt.ask([(str(videos / hit["path"]), "what colour is the circle?", None)], top_k=5, workers=1).rows
    assert [a["answer"] for a in row["answers"]] == [a for a, _ in want.answers]

    cap = server.client.post("/v1/caption", json={"video_id": vid}).json()
    assert cap["schema"] == "hbi.caption/1" and cap["results"][0]["text"]
    assert "circle" in cap["results"][0]["text"]  # the demo decoder names the video's shapes (docs/captioning.md)

    ex = server.client.post("/v1/explain", json={"query": QUERY, "video_id": vid, "levels": ["entity"],
                                                 "samples": 256}).json()
    assert ex["schema"] == "hbi.explain/1" and ex["video"] == hit["path"] and ex["levels"][0]["level"] == "entity"

    rc = server.client.post("/v1/retrieve-captions", json={"video_id": vid, "captions": [
        QUERY, "a blue triangle moves left"]}).json()
    assert rc["schema"] == "hbi.retrieve-captions/1"
    assert rc["captions"][0]["caption"] == QUERY  # its own caption ranks first


def test_media_range_requests_and_thumbnails(server, library):
    videos, index = library
    hit = server.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1}).json()["queries"][0]["hits"][0]
    data = (videos / hit["path"]).read_bytes()
    base = f"/v1/videos/{hit['video_id']}"
    whole = server.client.get(base + "/media")
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "video/mp4"
    part = server.client.get(base + "/media", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = server.client.get(base + "/media", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == data[-50:]
    _error(server.client.get(base + "/media", headers={"Range": f"bytes={len(data) + 10}-"}), 416)
    thumb = server.client.get(base + "/thumbnail", params={"t": 2.0})
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    cached = list((index / "thumbnails").rglob("*.jpg"))
    assert cached and not [p for p in videos.rglob("*") if p.suffix == ".jpg"]
    assert server.client.get(base + "/thumbnail", params={"t": 2.0}).content == thumb.content
    info = server.client.get(base).json()
    assert info["path"] == hit["path"] and info["duration_s"] == hit["duration_s"]
    _error(server.client.get("/v1/videos/999999/media"), 404, "UnknownVideoError")
    sneaky = server.client.get("/v1/videos/..%2F..%2Fetc%2Fpasswd/media")  # ids, never paths
    _error(sneaky, sneaky.status_code)
    assert sneaky.status_code in (404, 422) and b"root:" not in sneaky.content


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gets_the_documented_status_and_changes_nothing(server, library):
    _, index = library
    before = _catalog_digest(index)
    c = server.client
    _error(c.post("/v1/retrieve", content=b"{not json", headers={"Content-Type": "application/json"}), 422,
           "ValidationError")
    _error(c.post("/v1/retrieve", json={"queries": "a string, not a list"}), 422, "ValidationError")
    _error(c.post("/v1/retrieve", json={"queries": [QUERY], "top_k": "ten"}), 422, "ValidationError")
    _error(c.post("/v1/retrieve", json={"queries": [QUERY], "path": "/etc/passwd"}), 422, "ValidationError")
    _error(c.post("/v1/retrieve", json={"queries": []}), 422, "ValidationError")
    _error(c.post("/v1/retrieve", json={"queries": ["   "]}), 400, "BadInputError")
    _error(c.post("/v1/retrieve", json={"queries": ["x" * 5000]}), 400, "BadInputError")
    _error(c.post("/v1/retrieve", json={"queries": ["q"] * 65}), 400, "BadInputError")
    _error(c.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 10**6}), 400, "BadInputError")
    _error(c.post("/v1/retrieve", json={"queries": [QUERY], "levels": [1, 2]}), 400, "BadInputError")
    _error(c.post("/v1/qa", json={"video_id": 424242, "question": "what?"}), 404, "UnknownVideoError")
    _error(c.post("/v1/retrieve", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}), 413,
           "PayloadTooLarge")

    def chunked():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(40):
            yield b" " * 65536

    _error(c.post("/v1/retrieve", content=chunked(), headers={"Content-Type": "application/json"}), 413,
           "PayloadTooLarge")
    _error(c.get("/v1/nowhere"), 404, "NotFound")
    _error(c.get("/v1/retrieve"), 405, "MethodNotAllowed")
    _error(c.get("/v1/index/jobs/nope"), 404)
    # mixed with a good request in the same batch window: the good one is answered
    good = c.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1}).json()
    assert good["queries"][0]["hits"][0]["path"] == QUERIES[0]["expected"]
    text = c.get("/metrics").text
    assert 'hbi_serve_errors_total{route="/v1/retrieve",type="ValidationError"}' in text
    assert _catalog_digest(index) == before


def test_client_disconnects_mid_request(server):
    host, port = server.url.split("//")[1].rsplit(":", 1)
    body = json.dumps({"queries": [QUERY]}).encode()
    for cut in (len(body) // 2, len(body)):  # mid-body, and right after a whole request
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
        s.close()
    time.sleep(0.3)
    r = server.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1})
    assert r.status_code == 200
    assert server.proc.poll() is None


def test_page_docs_and_openapi_are_served_offline(server):
    page = server.client.get("/")
    assert page.status_code == 200 and "<form id=\"search-form\"" in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/api.js"):
        assert server.client.get(asset).status_code == 200
    for text in (page.text, server.client.get("/static/app.js").text, server.client.get("/docs").text):
        assert "http://" not in text and "https://" not in text  # nothing loaded from elsewhere
    spec = server.client.get("/openapi.json").json()
    assert {"/v1/retrieve", "/v1/qa", "/v1/caption", "/v1/explain", "/v1/encode-text", "/v1/index/status",
            "/v1/index/update", "/v1/retrieve-captions"} <= set(spec["paths"])


def test_index_status_is_the_cli_document(server, library):
    from hbi_runtime.index import index_status

    _, index = library
    doc = server.client.get("/v1/index/status").json()
    want = {"schema": "hbi.index-status/1", **index_status(index)}
    assert doc.keys() == want.keys()
    assert {k: doc[k] for k in ("videos", "rows", "failed", "damaged_shards", "model_sha256")} == \
           {k: want[k] for k in ("videos", "rows", "failed", "damaged_shards", "model_sha256")}


# ------------------------------------------------------------------------------------------------ security, load
@pytest.fixture(scope="module")
def guarded(library):
    _, index = library
    key = "k3y-" + "x" * 28
    s = Server("--model", DEMO_PACKAGE, "--index", index, "--host", "0.0.0.0", "--queue-size", "4",
               "--max-batch", "1", "--max-delay-ms", "0", "--request-timeout-s", "1", env={"HBI_API_KEY": key})
    s.key = key
    yield s
    assert s.stop() == 0, "".join(s.stderr)


def test_non_loopback_needs_a_key(library):
    _, index = library
    r = subprocess.run([sys.executable, "-m", "hbi_runtime.cli", "serve", "--index", index, "--host", "0.0.0.0",
                        "--port", "0"], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "HBI_API_KEY"})
    assert r.returncode == 2
    assert "needs an API key" in r.stderr and "--api-key-file" in r.stderr and "Traceback" not in r.stderr


def test_api_key_is_required_and_warned_about_without_tls(guarded):
    assert any("without TLS" in line for line in guarded.stderr) or _wait_for(
        lambda: any("without TLS" in line for line in guarded.stderr))
    c = guarded.client
    assert c.get("/healthz").status_code == 200  # public: no data
    err = _error(c.post("/v1/retrieve", json={"queries": [QUERY]}), 401, "Unauthorized")
    assert "Bearer" in err["hint"]
    _error(c.post("/v1/retrieve", json={"queries": [QUERY]}, headers={"Authorization": "Bearer wrong"}), 401)
    _error(c.get("/metrics"), 401)
    ok = c.post("/v1/retrieve", json={"queries": [QUERY]}, headers={"Authorization": f"Bearer {guarded.key}"})
    assert ok.status_code == 200
    assert c.get("/metrics", headers={"X-API-Key": guarded.key}).status_code == 200
    assert "access-control-allow-origin" not in ok.headers  # CORS off by default


def _wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_thousand_requests_over_the_queue_bound(guarded):
    headers = {"Authorization": f"Bearer {guarded.key}"}
    rss0 = guarded.rss_mb()

    def one(_):
        with httpx.Client(base_url=guarded.url, timeout=60, headers=headers) as c:
            out = []
            for _ in range(25):
                r = c.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1})
                out.append((r.status_code, r.headers.get("retry-after"), r.json()))
            return out

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = [a for chunk in pool.map(one, range(40)) for a in chunk]
    assert len(answers) == 1000
    codes = {code for code, _, _ in answers}
    assert codes <= {200, 503, 504}, codes
    shed = [a for a in answers if a[0] == 503]
    assert shed, "a queue of 4 never filled under 40 concurrent clients"
    assert all(ra == "1" and body["error"]["type"] == "Overloaded" for _, ra, body in shed)
    assert any(code == 200 for code, _, _ in answers)
    for code, _, body in answers:
        if code == 200:
            assert body["queries"][0]["hits"][0]["path"] == QUERIES[0]["expected"]
    assert guarded.client.post("/v1/retrieve", json={"queries": [QUERY]}, headers=headers).status_code == 200
    assert guarded.rss_mb() - rss0 < 150, "memory grew with the offered load"


def test_deadline(guarded):
    headers = {"Authorization": f"Bearer {guarded.key}"}
    hit = guarded.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1},
                              headers=headers).json()["queries"][0]["hits"][0]
    # 8 hits, each with a 16,384-coalition map: seconds of work against a 1 s deadline
    r = guarded.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 8, "explain": True,
                                                  "explain_samples": 16384}, headers=headers)
    assert hit
    _error(r, 504, "DeadlineExceeded")
    assert guarded.client.get("/readyz").status_code == 200


def test_missing_extra_is_a_clear_error(monkeypatch):
    from hbi_runtime.errors import MissingDependencyError
    from hbi_runtime.serve.server import import_serve_deps

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingDependencyError) as info:
        import_serve_deps()
    assert "hbi-toolkit[serve]" in info.value.hint


# ------------------------------------------------------------------------------------------------ index changes
@pytest.fixture()
def live(tmp_path, model):
    videos = _copy_samples(tmp_path)
    for extra in sorted(videos.glob("*.mp4"))[4:]:
        extra.rename(tmp_path / extra.name)  # held back: added during the test
    update_index(model, videos, tmp_path / "index", workers=1)
    s = Server("--model", DEMO_PACKAGE, "--index", tmp_path / "index", "--reload-interval-s", "0.3")
    yield s, videos, tmp_path / "index", tmp_path
    assert s.stop() == 0, "".join(s.stderr)


def _poll(client, job_id: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/index/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("index job did not finish")


def test_update_job_reloads_without_restart_one_writer_at_a_time(live):
    s, videos, index, held = live
    assert s.client.get("/readyz").json()["videos"] == 4
    for p in sorted(held.glob("*.mp4")):
        shutil.move(p, videos / p.name)
    r = s.client.post("/v1/index/update")
    assert r.status_code == 202 and r.headers["location"].endswith(r.json()["id"])
    second = s.client.post("/v1/index/update")
    if second.status_code != 202:  # the first is still running: one writer at a time
        _error(second, 409)
    job = _poll(s.client, r.json()["id"])
    assert job["state"] == "done" and job["summary"]["new"] == 4 and job["summary"]["schema"] == "hbi.index/1"
    assert s.client.get("/readyz").json()["videos"] == 8
    top = s.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 8}).json()["queries"][0]["hits"]
    assert len(top) == 8 and top[0]["path"] == QUERIES[0]["expected"]


def test_requests_during_an_external_rebuild_come_from_one_state(live):
    s, videos, index, held = live
    for p in sorted(held.glob("*.mp4")):
        shutil.move(p, videos / p.name)
    proc = subprocess.Popen([sys.executable, "-m", "hbi_runtime.cli", "index", videos, "--index", index,
                             "--rebuild", "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen = set()
    while proc.poll() is None:
        doc = s.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 8}).json()
        hits = doc["queries"][0]["hits"]
        assert len(hits) in (4, 8), doc  # the old state or the new one, never a mix
        seen.add((doc["generation"], len(hits)))
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()
    assert _wait_for(lambda: s.client.get("/readyz").json().get("videos") == 8)
    assert (min(g for g, _ in seen), 4) in seen


def test_index_damaged_under_a_running_server(live):
    s, videos, index, held = live
    assert s.client.post("/v1/retrieve", json={"queries": [QUERY]}).status_code == 200
    target = sorted((index / SHARDS).rglob("entity.tokens.npy"))[0]
    with open(target, "r+b") as f:  # bit rot in place: same size, bytes changed (never truncated under a map)
        f.seek(-64, os.SEEK_END)
        chunk = bytearray(f.read(64))
        f.seek(-64, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in chunk))
    os.utime(target)
    assert _wait_for(lambda: s.client.get("/readyz").status_code == 503), "damage not noticed"
    err = _error(s.client.post("/v1/retrieve", json={"queries": [QUERY]}), 503, "DamagedIndexError")
    assert "hbi-run index" in err["hint"]
    assert s.client.get("/healthz").status_code == 200
    job = _poll(s.client, s.client.post("/v1/index/update").json()["id"])  # the next run repairs it
    assert job["state"] == "done" and job["summary"]["repaired"], job
    assert _wait_for(lambda: s.client.get("/readyz").status_code == 200)
    assert s.client.post("/v1/retrieve", json={"queries": [QUERY]}).status_code == 200


def test_sigterm_finishes_in_flight_requests_and_exits_0(library):
    _, index = library
    s = Server("--model", DEMO_PACKAGE, "--index", index)
    hit = s.client.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1}).json()["queries"][0]["hits"][0]
    result = {}

    def slow():
        with httpx.Client(base_url=s.url, timeout=60) as c:
            result["r"] = c.post("/v1/explain", json={"query": QUERY, "video_id": hit["video_id"], "samples": 8192})

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200, result["r"].text
    assert s.proc.wait(60) == 0, "".join(s.stderr)


def test_tls(library, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate")
    _, index = library
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    s = Server("--model", DEMO_PACKAGE, "--index", index, "--tls-cert", cert, "--tls-key", key)
    try:
        assert s.info["url"].startswith("https://")
        with httpx.Client(base_url=s.url, verify=False, timeout=60) as c:
            assert c.post("/v1/retrieve", json={"queries": [QUERY], "top_k": 1}).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
            httpx.get(s.url.replace("https://", "http://") + "/healthz", timeout=10)
    finally:
        assert s.stop() == 0, "".join(s.stderr)
    key.write_text("not a key\n")
    r = subprocess.run([sys.executable, "-m", "hbi_runtime.cli", "serve", "--index", index, "--model", DEMO_PACKAGE,
                        "--port", "0", "--tls-cert", cert, "--tls-key", key], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "TLS" in r.stderr and "Traceback" not in r.stderr, r.stderr
