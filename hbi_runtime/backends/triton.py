"""The ``triton`` backend: a package's encoders run on a Triton Inference Server (``tritonclient``, HTTP or gRPC).

::

    model = hbi_runtime.load("pkg/b32", backend="triton", url="grpc://gpu-box:8001")

The server serves the package's encoders under their graph names (``text_encoder``, ``video_encoder``) with the
graphs' tensor names: a repository from ``hbi-export triton`` or ``hbi-run triton-host``. The interaction graph
(scoring sides the caller already holds) stays in-process on ONNX Runtime. The model name is the graph file's stem;
the ``model`` option overrides it (a server hosting several packages).

**Parity gate.** Before its first request a backend checks the server: the model is ready and has the graph's
inputs and outputs (names, datatypes, per-row shapes), and the server's answer to a deterministic probe (two rows of
padded ids or frames, :func:`probe_feed`) agrees with the package's own graph run locally by ONNX Runtime, within
the tolerance row of the graph's precision (:data:`hbi_runtime.compare.TOLERANCES`; ``tolerance`` overrides it, e.g.
``"fp16"`` for fp16 TensorRT plans of an fp32 package). A mismatch is a MismatchError naming the failed checks: a
server that serves another model is refused, never used. After the server was unreachable and came back, the gate
runs again before the next request (a restarted server may serve something else).

**Retries.** A request that fails because the server is unreachable (connection refused or reset, gRPC
UNAVAILABLE, the model not ready yet) is retried ``retries`` times, waiting ``retry_wait_s`` doubled each time; then
:class:`~hbi_runtime.errors.ServerUnavailableError` (exit 3) says what failed. Errors the server reports about the
request itself are not retried.

Each thread gets its own client (tritonclient's HTTP client is not thread-safe), so one backend can serve
concurrent callers; Triton's dynamic batcher merges their requests on the server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np

from hbi_runtime.backends.base import Backend
from hbi_runtime.errors import (BadInputError, HbiError, MismatchError, MissingDependencyError,
                                ServerUnavailableError, UsageError)
from hbi_runtime.package import GraphSpec

TRITON_HINT = "pip install 'hbi-toolkit[triton]'"
LOCAL_GRAPHS = ("interaction",)  # graphs that run in-process even with --backend triton
TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "bool": "BOOL",
                 "uint8": "UINT8", "int8": "INT8"}
PROBE_ROWS = 2
_TRANSIENT = ("unavailable", "connection", "connect", "socket closed", "broken pipe", "reset by peer",
              "not ready", "unknown model", "is not found", "timed out", "deadline", "eof")


def import_tritonclient(protocol: str) -> Any:
    """``tritonclient.http`` or ``tritonclient.grpc``, or MissingDependencyError naming the extra."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as exc:
        raise MissingDependencyError(f"the triton backend needs tritonclient ({exc})", hint=TRITON_HINT) from exc
    return client


def parse_url(url: Any) -> tuple[str, str, bool]:
    """``(protocol, host:port, ssl)`` of ``grpc://h:p``, ``http://h:p``, ``https://h:p`` or ``h:p`` (HTTP).

    Raises:
        UsageError: anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"--triton-url must be a URL such as grpc://localhost:8001 or http://localhost:8000, got "
                         f"{url!r}")
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"--triton-url {url!r} is not grpc://HOST:PORT, http://HOST:PORT or https://HOST:PORT",
                         hint="e.g. --triton-url grpc://localhost:8001")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--triton-url {url!r} has a bad port") from None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    default = 8001 if parts.scheme == "grpc" else 8000
    return ("grpc" if parts.scheme == "grpc" else "http"), f"{host}:{port or default}", parts.scheme == "https"


def probe_feed(spec: GraphSpec, rows: int = PROBE_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic feed for the parity probe: ``rows`` rows, row ``r`` padded after ``N - r * N // rows``
    positions (a full row and partly padded ones), CLIP-like ids (start and end tokens around random ids), mask 1 /
    0, and small normal floats elsewhere."""
    from hbi_runtime.tokenizer import EOT_ID, SOT_ID

    rng = np.random.default_rng(seed)
    masks = [t for t in spec.inputs if "mask" in t.name and len(t.shape) == 2]
    width = int(masks[0].shape[1]) if masks else 1
    lengths = [max(1, width - r * width // rows) for r in range(rows)]
    feed: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = (rows, *[int(a) for a in t.shape[1:]])
        if t in masks:
            value = (np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None])
        elif np.dtype(t.dtype).kind in "iu" and len(shape) == 2:  # token ids: start, random ids, end, 0 padding
            value = rng.integers(1, SOT_ID, size=shape)
            value[:, 0] = SOT_ID
            for r, n in enumerate(lengths):
                n = min(n, shape[1])
                value[r, n - 1], value[r, n:] = EOT_ID, 0
        else:
            value = rng.standard_normal(shape) * 0.5
            if masks and len(shape) >= 2 and shape[1] == width:  # zero at padded positions (frames)
                for r, n in enumerate(lengths):
                    value[r, n:] = 0
        feed[t.name] = np.ascontiguousarray(value.astype(t.dtype))
    return feed


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT)


class TritonBackend(Backend):
    """A graph served by a Triton Inference Server (see the module docstring).

    Args:
        spec: the graph's spec from the manifest.
        path: the graph's ``.onnx`` file in the package (the parity probe's reference, and the interaction graph).
        url: the server: ``grpc://HOST:PORT``, ``http://HOST:PORT`` (default scheme) or ``https://HOST:PORT``.
        model: the model name on the server (default: the graph file's stem, e.g. ``video_encoder``).
        timeout_s: per-request network timeout.
        retries: retries of a request that failed because the server was unreachable (0: none).
        retry_wait_s: the first wait before a retry (doubled after each).
        tolerance: the parity probe's tolerance row (default: ``fp32`` for fp32 graphs, else ``fp16``).
    """

    name = "triton"

    def __init__(self, spec: GraphSpec, path: str | os.PathLike, *, url: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3, retry_wait_s: float = 1.0,
                 tolerance: str | None = None) -> None:
        super().__init__(spec, path)
        from hbi_runtime.compare import TOLERANCES

        if url is None:
            raise UsageError("the triton backend needs the server's URL",
                             hint="pass --triton-url grpc://HOST:PORT (hbi-run) or url= (API)")
        self.url = url
        self.protocol, self.address, self.ssl = parse_url(url)
        self.model = model if model is not None else Path(spec.file).stem
        if not isinstance(self.model, str) or not self.model:
            raise UsageError(f"model must be a model name, got {model!r}")
        for label, value in (("timeout_s", timeout_s), ("retry_wait_s", retry_wait_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UsageError(f"{label} must be a number >= 0, got {value!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UsageError(f"retries must be an integer >= 0, got {retries!r}")
        self.timeout_s, self.retries, self.retry_wait_s = float(timeout_s), retries, float(retry_wait_s)
        self.tolerance = tolerance or ("fp32" if spec.precision == "fp32" else "fp16")
        if self.tolerance not in TOLERANCES:
            raise UsageError(f"unknown tolerance {self.tolerance!r}; known: {sorted(TOLERANCES)}")
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._tc = None
        self._local: Backend | None = None  # the in-process graph (interaction), when this graph is not served
        self._threads = threading.local()
        self._verified = False
        self.parity: dict | None = None  # the last probe's ParityResult.to_dict()
        self.gate_runs = 0  # how often the parity gate ran (once, and again after each reconnection)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model}

    @property
    def served(self) -> bool:
        """False for the graphs that run in-process (:data:`LOCAL_GRAPHS`)."""
        return Path(self.spec.file).stem not in LOCAL_GRAPHS

    # ------------------------------------------------------------------ Backend

    def _load(self) -> None:
        if not self.served:
            from hbi_runtime.backends.onnxruntime import OrtBackend

            self._local = OrtBackend(self.spec, self.path).load()
            return
        self._tc = import_tritonclient(self.protocol)
        with self._lock:
            self._with_retries("checking the model", self._verify_locked)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._local is not None:
            return self._local.infer(feed)

        def request() -> dict[str, np.ndarray]:
            if not self._verified:
                with self._lock:
                    if not self._verified:
                        self._verify_locked()
            return self._request(feed)

        return self._with_retries("running the request", request)

    def _close(self) -> None:
        if self._local is not None:
            self._local.close()
        self._drop_client()  # this thread's; other threads' clients go with their thread-local storage
        self._reset()

    # ------------------------------------------------------------------ server calls

    def _client(self) -> Any:
        client = getattr(self._threads, "client", None)
        if client is None:
            kwargs = {"network_timeout": self.timeout_s, "connection_timeout": self.timeout_s,
                      "ssl": self.ssl} if self.protocol == "http" else {"ssl": self.ssl}
            client = self._tc.InferenceServerClient(self.address, **kwargs)
            self._threads.client = client
        return client

    def _drop_client(self) -> None:
        client = getattr(self._threads, "client", None)
        self._threads.client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
                pass

    def _with_retries(self, doing: str, call: Callable[[], Any]) -> Any:
        wait, attempt = self.retry_wait_s, 0
        while True:
            try:
                return call()
            except HbiError:
                raise
            except Exception as exc:  # noqa: BLE001 - tritonclient raises its own and socket / gevent errors
                if not _transient(exc):
                    raise BadInputError(f"Triton server {self.url} refused {doing} (model {self.model!r}): {exc}",
                                        hint="check the server's log") from exc
                self._drop_client()
                self._verified = False  # a server that went away may come back with another model
                if attempt >= self.retries:
                    raise ServerUnavailableError(
                        f"Triton server {self.url} did not answer ({doing}, model {self.model!r}; {attempt + 1} "
                        f"attempt(s) over about {self._waited(attempt):.0f} s): {exc}",
                        hint="start the server (or check --triton-url), then run the command again") from exc
                time.sleep(wait)
                wait, attempt = wait * 2, attempt + 1

    def _waited(self, attempts: int) -> float:
        return sum(self.retry_wait_s * 2 ** i for i in range(attempts))

    def _request(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tc = self._tc
        inputs = []
        for spec in self.input_specs:
            value = np.ascontiguousarray(feed[spec.name])
            item = tc.InferInput(spec.name, list(value.shape), TRITON_DTYPES[spec.dtype])
            item.set_data_from_numpy(value)
            inputs.append(item)
        outputs = [tc.InferRequestedOutput(s.name) for s in self.output_specs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._client().infer(self.model, inputs, outputs=outputs, **kwargs)
        out = {}
        rows = next(iter(feed.values())).shape[0]
        for spec in self.output_specs:
            value = result.as_numpy(spec.name)
            want = (rows, *spec.shape[1:])
            if value is None or tuple(value.shape) != want:
                raise MismatchError(f"Triton model {self.model!r} at {self.url} returned {spec.name} of shape "
                                    f"{None if value is None else tuple(value.shape)}; expected {want}",
                                    hint="serve this package's graphs (`hbi-export triton`, `hbi-run triton-host`)")
            out[spec.name] = value.astype(spec.dtype, copy=False)
        return out

    # ------------------------------------------------------------------ the gate

    def _verify_locked(self) -> None:
        """Model ready, signature equal, probe within tolerance; sets ``_verified`` (caller holds the lock)."""
        client = self._client()
        if not client.is_server_live():
            raise ConnectionError(f"server {self.url} is not live")
        if not client.is_model_ready(self.model):
            raise ConnectionError(f"model {self.model!r} is not ready on {self.url}")
        self._check_signature(client.get_model_metadata(self.model))
        self.gate_runs += 1
        self._probe()
        self._verified = True

    def _check_signature(self, metadata: Any) -> None:
        if not isinstance(metadata, dict):  # gRPC: a protobuf message
            from google.protobuf.json_format import MessageToDict

            metadata = MessageToDict(metadata, preserving_proto_field_name=True)
        served = {side: {t["name"]: (t["datatype"], [int(d) for d in t.get("shape", [])])
                         for t in metadata.get(side, [])} for side in ("inputs", "outputs")}
        problems = []
        for side, specs in (("inputs", self.input_specs), ("outputs", self.output_specs)):
            for spec in specs:
                got = served[side].get(spec.name)
                want = (TRITON_DTYPES[spec.dtype], [int(a) for a in spec.shape[1:]])
                if got is None:
                    problems.append(f"no {side[:-1]} {spec.name}")
                elif got[0] != want[0] or got[1][1:] != want[1]:  # the served shape leads with the batch (-1)
                    problems.append(f"{spec.name} is {got[0]} {got[1]}, expected {want[0]} [-1, "
                                    f"{', '.join(map(str, want[1]))}]")
        extra = sorted(set(served["inputs"]) - {s.name for s in self.input_specs})
        if extra:
            problems.append(f"extra inputs {extra}")
        if problems:
            raise MismatchError(f"Triton model {self.model!r} at {self.url} is not this package's "
                                f"{Path(self.spec.file).stem}: {'; '.join(problems)}",
                                hint="serve this package's repository (`hbi-export triton PKG OUT`), or name the "
                                     "right model")

    def _probe(self) -> None:
        from hbi_runtime.backends.onnxruntime import OrtBackend
        from hbi_runtime.compare import compare_tensors, evaluate

        feed = probe_feed(self.spec)
        with OrtBackend(self.spec, self.path) as local:
            reference = local.infer(feed)
        served = self._request(feed)
        result = evaluate([compare_tensors(n, reference[n], served[n]) for n in reference], self.tolerance)
        self.parity = result.to_dict()
        if not result.ok:
            failed = "; ".join(c.line() for c in result.failures[:4])
            more = f" (and {len(result.failures) - 4} more)" if len(result.failures) > 4 else ""
            raise MismatchError(f"Triton model {self.model!r} at {self.url} fails the parity probe against "
                                f"{self.path.name} ({self.tolerance} tolerance): {failed}{more}",
                                hint="the server serves another model or another version of it: export this "
                                     "package's repository again (`hbi-export triton`) and reload the server")

