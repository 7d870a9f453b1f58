"""``hbi-run triton-host PKG``: a Triton Inference Server on this machine hosting a package's ONNX Runtime encoders.

PyTriton (``pip install 'hbi-toolkit[triton-host]'``) starts NVIDIA's tritonserver and binds Python callables to it
behind Triton's own HTTP / gRPC endpoints and dynamic batcher. The callables here run the package's encoders on
ONNX Runtime (CPU), under the model and tensor names of an ``hbi-export triton`` repository, so the ``triton``
backend (``--backend triton --triton-url ...``) talks to either the same way:

* ``text_encoder``: ``input_ids``, ``attention_mask`` -> the text side;
* ``video_encoder``: ``frames``, ``frame_mask`` -> the video side;
* ``text``: ``TEXT`` (strings) -> the text side and ``truncated`` (the repository's ensemble).

What this is for: serving encoders from a CPU box, and testing the ``triton`` backend against a real Triton server
without a GPU. What it is not: the repository of ``hbi-export triton`` under a full tritonserver (that runs the
ONNX / TensorRT models in Triton's own backends; docs/scale.md, "What remains unverified").

Triton's Python-backend stub links ``libpython``; where the system's libpython is another build than the running
interpreter's (Debian's 3.11.2 beside a 3.11.7 venv), binding fails inside the stub. :func:`python_library_env`
puts the running interpreter's library directory first on ``LD_LIBRARY_PATH`` of this process, which the server and
its stubs inherit.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from hbi_runtime.cli_options import AllowUnverifiedOption, ModelOption, run_guarded
from hbi_runtime.errors import MissingDependencyError, UsageError

HOST_HINT = "pip install 'hbi-toolkit[triton-host]' (Linux)"
DEFAULT_PORTS = (8010, 8011, 8012)  # http, grpc, metrics: clear of `hbi-run serve`'s 8000 and Triton's 8000-8002
DEFAULT_MAX_BATCH = {"text_encoder": 64, "video_encoder": 16, "text": 64}
ACCESS_TOKEN_ENV = "HBI_TRITON_ACCESS_TOKEN"
DEMO_PACKAGE = Path(__file__).resolve().parent / "data" / "demo" / "package"  # hbi-run's default model


def import_pytriton() -> Any:
    """``pytriton.triton``, or MissingDependencyError naming the extra."""
    try:
        import pytriton.triton as triton
    except ImportError as exc:
        raise MissingDependencyError(f"hbi-run triton-host needs PyTriton ({exc})", hint=HOST_HINT) from exc
    return triton


def python_library_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``, changed in place) with the running interpreter's libpython directory first
    on ``LD_LIBRARY_PATH``, when that directory holds a shared libpython (nothing changes otherwise)."""
    env = os.environ if env is None else env
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and name and name.endswith(".so") and (Path(libdir) / name).exists():
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if not parts or parts[0] != libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in parts if p != libdir]])
    return env


def _check_ports(ports: tuple[int, int, int]) -> None:
    if len(set(ports)) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536
                                   for p in ports):
        raise UsageError(f"--http-port, --grpc-port and --metrics-port must be three different ports, got {ports}")


def _tensors(tensor_type: Any, specs) -> list:
    return [tensor_type(name=s.name, dtype=np.dtype(s.dtype).type, shape=tuple(int(a) for a in s.shape[1:]))
            for s in specs]


@contextlib.contextmanager
def hosted(pkg_dir: str | os.PathLike, *, ports: tuple[int, int, int] = DEFAULT_PORTS, address: str = "127.0.0.1",
           queue_delay_us: int = 2000, allow_unverified: bool = False,
           max_batch: dict[str, int] | None = None) -> Iterator[Any]:
    """Start the server with the package's encoders bound; yields PyTriton's ``Triton`` (``.serve()`` blocks).

    Raises:
        MissingDependencyError: PyTriton is not installed. UsageError: bad ports. BadInputError, MismatchError,
            GateFailedError: the package (as :func:`hbi_runtime.model.load`).
    """
    from hbi_runtime.model import load

    _check_ports(ports)
    python_library_env()
    triton_mod = import_pytriton()
    if int(np.__version__.split(".")[0]) >= 2:  # measured: 0.7's proxy then answers every request with empty outputs
        raise MissingDependencyError(f"PyTriton needs NumPy < 2 (this is {np.__version__})",
                                     hint="install the extra into its own environment: " + HOST_HINT)
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    sizes = {**DEFAULT_MAX_BATCH, **(max_batch or {})}
    model = load(pkg_dir, allow_unverified=allow_unverified)
    text, video = (model.backends[g].load() for g in ("text_encoder", "video_encoder"))

    def encoder(backend):
        @batch
        def infer(**feed):
            return backend.infer(feed)
        return infer

    @batch
    def infer_text(TEXT):  # noqa: N803 - the tensor's name
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in TEXT.reshape(-1)]
        ids, mask, truncated = model.tokenizer(texts)
        out = text.infer({"input_ids": ids, "attention_mask": mask})
        return {**out, "truncated": np.asarray(truncated, dtype=bool).reshape(-1, 1)}

    http, grpc, metrics = ports
    # PyTriton restricts Triton's admin endpoints (statistics, model repository, ...) to a random token; a caller that
    # reads the statistics sets its own in $HBI_TRITON_ACCESS_TOKEN (header "triton-access-token")
    security = triton_mod.TritonSecurityConfig(access_token=os.environ.get(ACCESS_TOKEN_ENV) or None)
    config = triton_mod.TritonConfig(http_address=address, http_port=http, grpc_address=address, grpc_port=grpc,
                                     metrics_port=metrics, exit_on_error=True,
                                     exit_timeout_secs=5)
    try:
        with triton_mod.Triton(config=config, security_config=security) as server:
            for name, backend in (("text_encoder", text), ("video_encoder", video)):
                server.bind(model_name=name, infer_func=encoder(backend),
                            inputs=_tensors(Tensor, backend.input_specs),
                            outputs=_tensors(Tensor, backend.output_specs),
                            config=ModelConfig(max_batch_size=sizes[name],
                                               batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                            strict=True)
            server.bind(model_name="text", infer_func=infer_text,
                        inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
                        outputs=[*_tensors(Tensor, text.output_specs),
                                 Tensor(name="truncated", dtype=np.bool_, shape=(1,))],
                        config=ModelConfig(max_batch_size=sizes["text"],
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
                        strict=True)
            yield server
    finally:
        model.close()


# ----------------------------------------------------------------------------------------------------------------
# hbi-run triton-host

HOST_HELP = (
    "Serve a model package's encoders from a Triton Inference Server on this machine (PyTriton; ONNX Runtime on "
    "the CPU) until interrupted: models text_encoder, video_encoder and text (strings), with Triton's dynamic "
    "batcher, on HTTP and gRPC; clients pass --backend triton --triton-url URL to index and retrieve. Listens on "
    "127.0.0.1 unless --address says otherwise. Needs `pip install 'hbi-toolkit[triton-host]'` (Linux). See "
    "docs/scale.md."
)
HOST_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-run triton-host -m pkg/b32\n\n"
    "  hbi-run triton-host -m pkg/b32 --http-port 9010 --grpc-port 9011 --metrics-port 9012\n\n"
    "  hbi-run index ~/Videos -m pkg/b32 --backend triton --triton-url grpc://localhost:8011"
)


def register(app: typer.Typer) -> None:
    """Add ``hbi-run triton-host`` to ``app``."""
    app.command("triton-host", help=HOST_HELP, epilog=HOST_EXAMPLES)(triton_host)


def triton_host(
    ctx: typer.Context,
    model: ModelOption = None,
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP port.")] = DEFAULT_PORTS[0],
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port.")] = DEFAULT_PORTS[1],
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")] = DEFAULT_PORTS[2],
    address: Annotated[str, typer.Option("--address", help="Address to listen on.")] = "127.0.0.1",
    queue_delay_us: Annotated[int, typer.Option(
        "--queue-delay-us", min=0, help="Dynamic batcher: longest wait for a fuller batch.")] = 2000,
    max_batch: Annotated[Optional[int], typer.Option(
        "--max-batch", min=1, help="Largest batch of the video encoder (texts: 64).", show_default=False)] = None,
    allow_unverified: AllowUnverifiedOption = False,
) -> None:
    with run_guarded(ctx, False):
        pkg = model if model is not None else DEMO_PACKAGE
        with hosted(pkg, ports=(http_port, grpc_port, metrics_port), address=address,
                    queue_delay_us=queue_delay_us, allow_unverified=allow_unverified,
                    max_batch={"video_encoder": max_batch} if max_batch else None) as server:
            typer.echo(f"serving {pkg} on http://{address}:{http_port} and grpc://{address}:{grpc_port} "
                       "(Ctrl+C stops)", err=True)
            server.serve()
