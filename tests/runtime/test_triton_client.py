"""The ``triton`` backend's parts that need no server: URL parsing, options, the probe feed, the missing-extra error
and the CLI's option checks. The backend against a real Triton server: tests/triton/test_triton_server.py."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_runtime.backends import backend_options, create_backend
from hbi_runtime.backends.triton import TritonBackend, parse_url, probe_feed
from hbi_runtime.cli import DEMO_PACKAGE, app
from hbi_runtime.errors import MissingDependencyError, ServerUnavailableError, UsageError
from hbi_runtime.package import load_package
from hbi_runtime.tokenizer import EOT_ID, SOT_ID


@pytest.fixture(scope="module")
def package():
    return load_package(DEMO_PACKAGE)


@pytest.mark.parametrize("url, expected", [
    ("grpc://localhost:8011", ("grpc", "localhost:8011", False)),
    ("http://127.0.0.1:9000", ("http", "127.0.0.1:9000", False)),
    ("https://triton.example:443", ("http", "triton.example:443", True)),
    ("gpu-box:8000", ("http", "gpu-box:8000", False)),
    ("grpc://gpu-box", ("grpc", "gpu-box:8001", False)),
    ("http://[::1]:8010", ("http", "[::1]:8010", False)),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["", "ftp://x:1", "grpc://x:1/models", "http://x:notaport", None, 8000])
def test_bad_urls_are_usage_errors(url):
    with pytest.raises(UsageError, match="triton-url"):
        parse_url(url)


def test_backend_registered_with_its_options(package):
    assert set(backend_options("triton")) == {"url", "model", "timeout_s", "retries", "retry_wait_s", "tolerance"}
    backend = create_backend("triton", package.graph("video_encoder"), package.graph_path("video_encoder"),
                             url="grpc://h:1")
    assert isinstance(backend, TritonBackend) and backend.model == "video_encoder" and backend.served
    assert backend.tolerance == "fp32"  # the demo graphs are fp32
    local = TritonBackend(package.graph("interaction"), package.graph_path("interaction"), url="grpc://h:1")
    assert not local.served  # scoring stays in-process


@pytest.mark.parametrize("options, match", [
    ({}, "needs the server's URL"),
    ({"url": "grpc://h:1", "retries": -1}, "retries"),
    ({"url": "grpc://h:1", "retry_wait_s": "x"}, "retry_wait_s"),
    ({"url": "grpc://h:1", "tolerance": "loose"}, "unknown tolerance"),
])
def test_bad_options(package, options, match):
    with pytest.raises(UsageError, match=match):
        TritonBackend(package.graph("text_encoder"), package.graph_path("text_encoder"), **options)


def test_probe_feed_is_valid_and_deterministic(package):
    for graph in ("text_encoder", "video_encoder"):
        spec = package.graph(graph)
        feed = probe_feed(spec)
        TritonBackend(spec, package.graph_path(graph), url="h:1").validate(feed)  # dtypes, shapes
        again = probe_feed(spec)
        assert all(np.array_equal(feed[k], again[k]) for k in feed)
    text = probe_feed(package.graph("text_encoder"))
    ids, mask = text["input_ids"], text["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] == ids.shape[1] and 1 <= lengths[1] < ids.shape[1]  # a full row and a padded one
    for row, n in zip(ids, lengths):
        assert row[0] == SOT_ID and row[n - 1] == EOT_ID and not row[n:].any()
    video = probe_feed(package.graph("video_encoder"))
    n = int(video["frame_mask"][1].sum())
    assert not video["frames"][1, n:].any() and video["frames"][1, :n].any()


def test_missing_tritonclient_names_the_extra(package, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    backend = TritonBackend(package.graph("text_encoder"), package.graph_path("text_encoder"), url="grpc://h:1")
    with pytest.raises(MissingDependencyError) as err:
        backend.load()
    assert "pip install 'hbi-toolkit[triton]'" in err.value.hint
    result = CliRunner().invoke(app, ["retrieve", "--video", "x.mp4", "--captions", "c.txt",
                                      "--backend", "triton", "--triton-url", "grpc://h:1"])
    assert result.exit_code == 2 and "hbi-toolkit[triton]" in result.output


@pytest.mark.parametrize("args", [["--backend", "triton"], ["--triton-url", "grpc://h:1"],
                                  ["--backend", "triton", "--triton-url", "grpc://h:1", "--device", "cuda"]])
def test_cli_option_pairs(args, tmp_path):
    captions = tmp_path / "c.txt"
    captions.write_text("a dog\n")
    result = CliRunner().invoke(app, ["retrieve", "--video", str(tmp_path / "v.mp4"), "--captions", str(captions),
                                      *args])
    assert result.exit_code == 2, result.output
    assert "--backend triton" in result.output


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_nobody_listening_is_a_bounded_clear_error(package, scheme):
    pytest.importorskip(f"tritonclient.{scheme}", reason="tritonclient is not installed: pip install "
                                                          "'hbi-toolkit[triton]'")
    import socket

    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"{scheme}://127.0.0.1:{port}"
    backend = TritonBackend(package.graph("text_encoder"), package.graph_path("text_encoder"), url=url, retries=2,
                            retry_wait_s=0.05, timeout_s=5)
    with pytest.raises(ServerUnavailableError) as err:
        backend.load()
    assert url in err.value.message and "3 attempt(s)" in err.value.message
    assert err.value.exit_code == 3 and "--triton-url" in err.value.hint
