"""Starting and stopping ``hbi-run serve``: the listening socket, the security checks of the address, uvicorn in
this one process, and a graceful stop on SIGTERM / SIGINT (stop accepting, finish what is in flight, exit 0).

One process on purpose: a second uvicorn worker would load the model and memory-map the index a second time, and
the two would batch separately. Scale out with more servers behind a load balancer (docs/serve.md).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Callable, Optional

from hbi_runtime.errors import BadInputError, MissingDependencyError, UsageError

KEY_ENV = "HBI_API_KEY"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
MIN_KEY_CHARS = 16


def import_serve_deps() -> None:
    """fastapi, uvicorn and prometheus-client, or a clear install hint."""
    missing = []
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"hbi-run serve needs {', '.join(missing)}, which is not installed",
                                     hint="pip install 'hbi-toolkit[serve]'")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(key_file: Optional[Path], warn: Callable[[str], None]) -> Optional[str]:
    """The API key from ``key_file`` (first line) or the environment variable ``HBI_API_KEY``; never from a
    command-line argument (``ps`` shows those to every user)."""
    if key_file is not None:
        try:
            st = os.stat(key_file)
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"cannot read the API key file {key_file}: {exc}",
                                hint="give a readable UTF-8 file whose first line is the key") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warn(f"the API key file {key_file} can be read by other users (chmod 600 {key_file})")
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise BadInputError(f"the API key file {key_file} is empty", hint="write the key on its first line")
    else:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            return None
    if len(key) < MIN_KEY_CHARS:
        warn(f"the API key has {len(key)} characters; use at least {MIN_KEY_CHARS} random ones "
             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


def check_address(host: str, key: Optional[str], tls: bool, warn: Callable[[str], None]) -> None:
    """Loopback is the default; any other address needs an API key, and gets a warning without TLS."""
    if is_loopback(host):
        return
    if key is None:
        raise UsageError(f"serving on {host} (not this machine's loopback) needs an API key",
                         hint=f"put a key in a file and pass --api-key-file FILE (or set {KEY_ENV}); add "
                              "--tls-cert/--tls-key so the key does not travel in clear")
    if not tls:
        warn(f"serving on {host} without TLS: the API key and every answer travel in clear; pass --tls-cert and "
             "--tls-key (or put a TLS proxy in front)")


def check_tls(cert: Path, key: Path) -> None:
    """The certificate and key load (before anything else starts). Raises BadInputError."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise BadInputError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}",
                            hint="give a PEM certificate (--tls-cert) and its unencrypted PEM key (--tls-key)") \
            from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (``port`` 0: a free one). Raises UsageError when the address is taken or invalid."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve --host {host}: {exc.strerror}", hint="give an IP address") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit TCP_NODELAY from the listening socket (Linux). asyncio sets it on the sockets it
    # accepts for servers it binds itself, not on a socket handed to it: without it, a response written as headers
    # then body waits for the client's delayed ACK, about 40 ms on every request after a connection's first.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         hint="choose another --port (0 picks a free one), or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/"


def run(app, sock: socket.socket, *, tls_cert: Optional[Path], tls_key: Optional[Path], log_level: str,
        grace_s: float, on_stop: Callable[[], None]) -> None:
    """Serve until SIGTERM / SIGINT, then stop accepting, let in-flight requests finish (at most ``grace_s``),
    call ``on_stop`` (lanes finish their queue, models close) and return: the command exits 0."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, ssl_certfile=str(tls_cert) if tls_cert else None,
                            ssl_keyfile=str(tls_key) if tls_key else None, timeout_graceful_shutdown=int(grace_s),
                            lifespan="off", server_header=False, proxy_headers=False, access_log=log_level == "debug"
                            or log_level == "info")
    server = uvicorn.Server(config)
    # uvicorn re-raises the stop signal after its graceful shutdown (so that the default action kills the
    # process); with these handlers in place, that re-raise is a no-op and the command returns normally (exit 0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            on_stop()
        finally:
            sock.close()
    if not server.started:
        sys.stderr.write("error: the server did not start (see the messages above)\n")
        raise SystemExit(1)
