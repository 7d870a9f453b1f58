"""The ``triton`` backend end to end against a real Triton server on this CPU machine (``hbi-run triton-host``:
PyTriton's tritonserver with Triton's dynamic batcher, hosting the demo package's ONNX Runtime encoders): parity over
HTTP and gRPC, strings in, batching of concurrent clients, a refused mismatched model, the CLI, and a server that
restarts mid-run or never comes back."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install 'hbi-toolkit[triton-host]' (.ci/run "
                                       "runs these tests in its triton-host venv)")
import tritonclient.http as th  # noqa: E402

from hbi_runtime.backends.triton import TritonBackend  # noqa: E402
from hbi_runtime.cli import DEMO_PACKAGE, app  # noqa: E402
from hbi_runtime.errors import MismatchError, ServerUnavailableError  # noqa: E402
from hbi_runtime.model import load  # noqa: E402

TEXTS = ["a dog runs on the beach", "a man is cooking", "word " * 40]


@pytest.fixture(scope="module")
def local():
    with load(DEMO_PACKAGE) as model:
        yield model


def frames(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, 8, 3, 32, 32)).astype(np.float32)
    mask = np.ones((n, 8), np.int64)
    mask[1::2, 5:] = 0
    f[mask == 0] = 0
    return f, mask


def max_diff(a, b) -> float:
    return max(float(np.abs(x.tokens - y.tokens).max()) for x, y in zip(a.levels, b.levels))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_parity_through_the_server(server, local, protocol):
    with load(DEMO_PACKAGE, backend="triton", url=getattr(server, protocol)) as remote:
        text = remote.encode_text(TEXTS)
        video = remote.encode_frames(*frames(5))
        for graph in ("text_encoder", "video_encoder"):
            parity = remote.backends[graph].parity
            assert parity["ok"] and parity["tolerance"]["name"] == "fp32"
        assert remote.backends["interaction"].served is False
        scores = remote.score(text, video)
    ref_text, ref_video = local.encode_text(TEXTS), local.encode_frames(*frames(5))
    assert max_diff(text, ref_text) <= 1e-5 and max_diff(video, ref_video) <= 1e-5
    assert text.truncated == ref_text.truncated == (False, False, True)
    np.testing.assert_allclose(scores, local.score(ref_text, ref_video), atol=1e-5)


def test_strings_in(server, local):
    client = th.InferenceServerClient(server.http.removeprefix("http://"))
    data = np.array([[t.encode()] for t in TEXTS], dtype=object)
    item = th.InferInput("TEXT", list(data.shape), "BYTES")
    item.set_data_from_numpy(data)
    result = client.infer("text", [item])
    ref = local.encode_text(TEXTS)
    np.testing.assert_allclose(result.as_numpy("text_tokens_l0"), ref.levels[0].tokens, atol=1e-5)
    assert result.as_numpy("truncated").reshape(-1).tolist() == list(ref.truncated)
    client.close()


def _stats(server) -> tuple[int, int]:
    client = th.InferenceServerClient(server.http.removeprefix("http://"))
    s = client.get_inference_statistics("video_encoder", headers={"triton-access-token": "hbi-tests-token"})
    client.close()
    s = s["model_stats"][0]
    return s["inference_count"], s["execution_count"]


def test_concurrent_clients_are_batched(server, local):
    """8 threads, one backend (a client per thread), 3 single-video requests each, sent together."""
    clients, rounds = 8, 3
    f, mask = frames(clients * rounds, seed=7)
    backend = load(DEMO_PACKAGE, backend="triton", url=server.grpc).backends["video_encoder"].load()
    before = _stats(server)
    results, errors = {}, []
    barrier = threading.Barrier(clients)

    def run(worker: int) -> None:
        try:
            for r in range(rounds):
                i = r * clients + worker
                barrier.wait()
                results[i] = backend.infer({"frames": f[i:i + 1], "frame_mask": mask[i:i + 1]})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    backend.close()
    assert not errors, errors
    inferences, executions = (a - b for a, b in zip(_stats(server), before))
    assert inferences == clients * rounds
    assert executions < inferences  # Triton's dynamic batcher merged requests of different clients
    ref = local.backends["video_encoder"].load().infer({"frames": f, "frame_mask": mask})
    for i, out in results.items():
        for name, value in out.items():
            np.testing.assert_allclose(value[0], ref[name][i], atol=1e-5)


def test_mismatched_model_is_refused(server, tmp_path, local):
    import onnx
    from onnx import numpy_helper

    spec = local.package.graph("text_encoder")
    graph = onnx.load(str(local.package.graph_path("text_encoder")))
    big = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    changed = numpy_helper.to_array(big) * 1.05  # the same signature, other weights: another model
    big.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), big.name))
    path = tmp_path / "text_encoder.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(MismatchError, match="fails the parity probe") as err:
        TritonBackend(spec, path, url=server.grpc).load()
    assert "hbi-export triton" in err.value.hint
    with pytest.raises(MismatchError, match="is not this package's text_encoder"):
        TritonBackend(spec, local.package.graph_path("text_encoder"), url=server.http, model="video_encoder").load()


def test_cli_index_and_retrieve(server, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for src in sorted((DEMO_PACKAGE.parent / "samples").glob("*.mp4"))[:4]:
        shutil.copy(src, videos / src.name)
    runner, outputs = CliRunner(), {}
    for name, extra in (("local", []), ("triton", ["--backend", "triton", "--triton-url", server.grpc])):
        index = tmp_path / f"index-{name}"
        done = runner.invoke(app, ["index", str(videos), "--index", str(index), "--workers", "1", "--format", "json",
                                   *extra])
        assert done.exit_code == 0, done.output
        found = runner.invoke(app, ["retrieve", "a dog runs", "a person cooking", "--index", str(index), "--format",
                                    "json", *extra])
        assert found.exit_code == 0, found.output
        outputs[name] = json.loads(found.stdout)
    rows = {name: [(h["path"], h["score"]) for q in out["queries"] for h in q["hits"]]
            for name, out in outputs.items()}
    assert [p for p, _ in rows["triton"]] == [p for p, _ in rows["local"]] and rows["local"]
    np.testing.assert_allclose([s for _, s in rows["triton"]], [s for _, s in rows["local"]], atol=1e-5)


@pytest.mark.slow
def test_server_restart_mid_run_then_gone(make_host, local):
    """A crash (SIGKILL of the server's process group) between requests: the client retries until the restarted
    server answers, runs the parity gate again, and goes on; a server that stays down ends in a clear error."""
    host = make_host().start()
    model = load(DEMO_PACKAGE, backend="triton", url=host.grpc, retries=6, retry_wait_s=0.5)
    f, mask = frames(4, seed=3)
    first = model.encode_frames(f[:2], mask[:2])
    backend = model.backends["video_encoder"]
    assert backend.gate_runs == 1
    host.kill()
    restarter = threading.Timer(1.0, host.start, kwargs={"wait": False})
    restarter.start()
    t0 = time.monotonic()
    second = model.encode_frames(f[2:], mask[2:])  # sent while the server is down: retried until it is back
    waited = time.monotonic() - t0
    restarter.join()
    assert backend.gate_runs == 2  # the restarted server was checked again before it was used
    ref = local.encode_frames(f, mask)
    assert max_diff(first, local.encode_frames(f[:2], mask[:2])) <= 1e-5
    assert max_diff(second, local.encode_frames(f[2:], mask[2:])) <= 1e-5 and ref.n == 4
    assert waited > 1.0
    host.kill()  # and now for good
    quick = load(DEMO_PACKAGE, backend="triton", url=host.grpc, retries=2, retry_wait_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="did not answer") as err:
        quick.encode_frames(f[:1], mask[:1])
    assert time.monotonic() - t0 < 20  # bounded: 3 attempts, 0.6 s of waiting, plus connection timeouts
    assert host.grpc in err.value.message and "3 attempt(s)" in err.value.message
    assert err.value.exit_code == 3 and "start the server" in err.value.hint
    model.close()
