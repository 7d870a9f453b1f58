"""A real Triton server for the tests: ``hbi-run triton-host`` (PyTriton's tritonserver, the demo package's ONNX
Runtime encoders) in its own process group on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 120
ACCESS_TOKEN = "hbi-tests-token"  # for Triton's restricted statistics endpoint


def free_ports(n: int = 3) -> tuple[int, ...]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


@dataclass
class HostedServer:
    """One ``hbi-run triton-host`` process (and the tritonserver it starts, in the same process group)."""

    ports: tuple[int, int, int]
    log: Path
    queue_delay_us: int = 20000
    proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.ports[1]}"

    def start(self, wait: bool = True) -> HostedServer:
        exe = Path(sys.executable).with_name("hbi-run")
        cmd = [str(exe), "triton-host", "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
               "--metrics-port", str(self.ports[2]), "--queue-delay-us", str(self.queue_delay_us)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "HBI_TRITON_ACCESS_TOKEN": ACCESS_TOKEN})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import tritonclient.http as th

        deadline = time.monotonic() + START_TIMEOUT_S
        client = th.InferenceServerClient(f"127.0.0.1:{self.ports[0]}")
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"triton-host exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    if all(client.is_model_ready(m) for m in ("text_encoder", "video_encoder", "text")):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        raise RuntimeError(f"triton-host not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the host and its tritonserver): a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._wait_ports_closed()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        with contextlib_suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)  # a tritonserver left behind by its parent
        self._wait_ports_closed()

    def _wait_ports_closed(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.ports[0])) != 0:
                    return
            time.sleep(0.2)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class contextlib_suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


@pytest.fixture
def make_host(tmp_path):
    """A factory of servers of this test, on new free ports (started by the caller, stopped at the end)."""
    pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install 'hbi-toolkit[triton-host]' "
                                           "(.ci/run runs these tests in its triton-host venv)")
    hosts = []

    def make() -> HostedServer:
        hosts.append(HostedServer(free_ports(), tmp_path / f"host{len(hosts)}.log"))
        return hosts[-1]

    yield make
    for host in hosts:
        host.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install 'hbi-toolkit[triton-host]' "
                                           "(.ci/run runs these tests in its triton-host venv)")
    host = HostedServer(free_ports(), tmp_path_factory.mktemp("triton") / "host.log").start()
    yield host
    host.stop()
