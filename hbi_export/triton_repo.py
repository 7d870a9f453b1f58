"""``hbi-export triton PKG OUT``: a Triton Inference Server model repository for a retrieval package (torch-free).

What it writes (docs/scale.md, "Encoders behind Triton")::

    OUT/README.md                      how to start tritonserver on it (and the TensorRT plugin library)
    OUT/hbi_repository.json            which package (manifest sha256) and which graph files it was made from
    OUT/text_encoder/config.pbtxt      platform onnxruntime_onnx (1/model.onnx) or tensorrt_plan (1/model.plan)
    OUT/video_encoder/config.pbtxt     the same for the video encoder
    OUT/tokenizer/config.pbtxt         Python backend: strings -> input_ids, attention_mask, truncated
    OUT/tokenizer/1/model.py           (needs hbi-toolkit's runtime in the server's Python: ftfy, regex)
    OUT/text/config.pbtxt              ensemble tokenizer -> text_encoder: clients send strings, get a text side

Model names are the package's graph names, tensor names the graphs' own, so the ``triton`` backend of hbi_runtime
talks to this repository (and to ``hbi-run triton-host``) without a mapping. The first named axis of a graph's
inputs is its batch axis (``text_batch``, ``video_batch``): it becomes Triton's implicit batch dimension
(``max_batch_size``) with dynamic batching; every other axis is static in the manifest and keeps its size. The
interaction graph is not exported: scoring runs in-process on sides the index already holds.

The ONNX graphs are copied as they are: their custom ops carry the standard-op decompositions as model-local
functions, which ONNX Runtime inlines, so Triton's onnxruntime backend needs no custom-op library. With
``--engines DIR`` (a ``PKG/engines/<precision>`` folder of ``hbi-export build-engine``) the encoders are the
TensorRT plans instead, ``max_batch_size`` the engines' profile maximum, and the README says how to load the
plugin library the engines were built with (``LD_PRELOAD``, as Triton documents for TensorRT plugins).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Callable, Optional, Sequence

import typer

from hbi_runtime.cli_options import AllowUnverifiedOption, FormatOption, Steps, overwrite_option, run_guarded
from hbi_runtime.cli_support import OutputFormat, emit_json
from hbi_runtime.engines import MANIFEST_NAME, EngineSet
from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
from hbi_runtime.package import GraphSpec, Package, TensorSpec, load_package, sha256_file

ENCODERS = ("text_encoder", "video_encoder")
TOKENIZER_MODEL = "tokenizer"
TEXT_MODEL = "text"  # the ensemble: strings in, a text side out
TEXT_INPUT = "TEXT"
TRUNCATED = "truncated"
REPOSITORY_MANIFEST = "hbi_repository.json"
REPOSITORY_SCHEMA = "hbi.triton-repository/1"
DEFAULT_MAX_BATCH = {"text_encoder": 64, "video_encoder": 16}
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8"}
INSTANCE_KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class Serving:
    """How the encoders are served: instances per model, their kind, and the dynamic batcher's queue delay."""

    instances: int = 1
    kind: str = "cpu"  # "cpu" | "gpu"; TensorRT plans are always gpu
    queue_delay_us: int = 2000
    max_batch: dict[str, int] | None = None  # graph -> max_batch_size (default DEFAULT_MAX_BATCH, or the engines')

    def __post_init__(self) -> None:
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise UsageError(f"instances must be a positive integer, got {self.instances!r}")
        if self.kind not in INSTANCE_KINDS:
            raise UsageError(f"instance kind must be one of {list(INSTANCE_KINDS)}, got {self.kind!r}")
        if isinstance(self.queue_delay_us, bool) or not isinstance(self.queue_delay_us, int) \
                or self.queue_delay_us < 0:
            raise UsageError(f"queue delay must be >= 0 microseconds, got {self.queue_delay_us!r}")


def batch_axis(spec: GraphSpec) -> str:
    """The graph's batch axis: the first named axis of its first input, which every input and output must lead
    with (BadInputError otherwise: Triton's implicit batch dimension is the first one)."""
    first = spec.inputs[0].shape[0] if spec.inputs and spec.inputs[0].shape else None
    if not isinstance(first, str):
        raise BadInputError(f"graph {spec.file} has no named batch axis first (its first input is "
                            f"{spec.inputs[0].shape if spec.inputs else 'missing'})",
                            hint="re-export the package with this toolkit version")
    for t in (*spec.inputs, *spec.outputs):
        if not t.shape or t.shape[0] != first or any(isinstance(a, str) for a in t.shape[1:]):
            raise BadInputError(f"graph {spec.file}: tensor {t.name} has shape {list(t.shape)}; Triton's batching "
                                f"needs {first!r} first and static axes after it",
                                hint="re-export the package with this toolkit version")
    return first


# ----------------------------------------------------------------------------------------------------------------
# config.pbtxt text (protobuf text format of Triton's ModelConfig)


def _q(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal for the ASCII names used here


def _tensor_block(t: TensorSpec | tuple[str, str, Sequence[int]]) -> str:
    name, dtype, dims = (t.name, TRITON_DTYPES[t.dtype], list(t.shape[1:])) if isinstance(t, TensorSpec) else t
    return f"  {{\n    name: {_q(name)}\n    data_type: {dtype}\n    dims: [ {', '.join(map(str, dims))} ]\n  }}"


def _io(label: str, tensors: Sequence[Any]) -> str:
    return f"{label} [\n" + ",\n".join(_tensor_block(t) for t in tensors) + "\n]\n"


def _preferred(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b * 2 <= max_batch:
        b *= 2
        sizes.append(b)
    return sizes if max_batch in sizes else sizes + [max_batch]


def encoder_config(name: str, spec: GraphSpec, *, platform: str, max_batch: int, serving: Serving,
                   graph_sha256: str) -> str:
    """The config.pbtxt of one encoder."""
    batch_axis(spec)
    kind = "KIND_GPU" if platform == "tensorrt_plan" or serving.kind == "gpu" else "KIND_CPU"
    preferred = ", ".join(map(str, _preferred(max_batch)))
    return (f"name: {_q(name)}\nplatform: {_q(platform)}\nmax_batch_size: {max_batch}\n"
            + _io("input", spec.inputs) + _io("output", spec.outputs)
            + f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
              f"  max_queue_delay_microseconds: {serving.queue_delay_us}\n}}\n"
            + f"instance_group [\n  {{\n    count: {serving.instances}\n    kind: {kind}\n  }}\n]\n"
            + f"parameters {{\n  key: \"hbi_graph_sha256\"\n  value: {{ string_value: {_q(graph_sha256)} }}\n}}\n")


def tokenizer_config(spec: GraphSpec, max_batch: int, serving: Serving) -> str:
    """The Python-backend tokenizer: TEXT (bytes) -> the text encoder's inputs and a truncation flag."""
    ids = next(t for t in spec.inputs if t.name == "input_ids")
    outputs = [*spec.inputs, (TRUNCATED, "TYPE_BOOL", [1])]
    return (f"name: {_q(TOKENIZER_MODEL)}\nbackend: \"python\"\nmax_batch_size: {max_batch}\n"
            + _io("input", [(TEXT_INPUT, "TYPE_STRING", [1])]) + _io("output", outputs)
            + f"instance_group [\n  {{\n    count: {serving.instances}\n    kind: KIND_CPU\n  }}\n]\n"
            + f"parameters {{\n  key: \"max_words\"\n  value: {{ string_value: \"{ids.shape[1]}\" }}\n}}\n")


def ensemble_config(spec: GraphSpec, max_batch: int) -> str:
    """Strings in, the text side out: tokenizer -> text_encoder."""
    inputs = [(TEXT_INPUT, "TYPE_STRING", [1])]
    outputs = [*spec.outputs, (TRUNCATED, "TYPE_BOOL", [1])]

    def maps(kind: str, names: Sequence[str]) -> str:
        return "".join(f"      {kind} {{ key: {_q(n)} value: {_q(n)} }}\n" for n in names)

    tok_out = [t.name for t in spec.inputs] + [TRUNCATED]
    steps = (f"    {{\n      model_name: {_q(TOKENIZER_MODEL)}\n      model_version: -1\n"
             + maps("input_map", [TEXT_INPUT]) + maps("output_map", tok_out) + "    },\n"
             + "    {\n      model_name: \"text_encoder\"\n      model_version: -1\n"
             + maps("input_map", [t.name for t in spec.inputs]) + maps("output_map", [t.name for t in spec.outputs])
             + "    }\n")
    return (f"name: {_q(TEXT_MODEL)}\nplatform: \"ensemble\"\nmax_batch_size: {max_batch}\n"
            + _io("input", inputs) + _io("output", outputs)
            + f"ensemble_scheduling {{\n  step [\n{steps}  ]\n}}\n")


TOKENIZER_PY = '''"""Triton Python-backend model: CLIP BPE tokenization of an hbi package (by `hbi-export triton`).

Needs hbi-toolkit's runtime in the Python environment of the server's Python backend
(`pip install 'hbi-toolkit[runtime]'`): the tokenizer is hbi_runtime's, so ids equal what `hbi-run` sends.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from hbi_runtime.tokenizer import ClipTokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        max_words = int(config["parameters"]["max_words"]["string_value"])
        here = Path(__file__).resolve().parent
        self.tokenizer = ClipTokenizer(here / VOCAB_FILE, max_words=max_words)

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            try:
                ids, mask, truncated = self.tokenizer(texts)
            except Exception as exc:  # an empty or non-text query: an error response, not a dead model
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("input_ids", ids.astype(np.int64)),
                pb_utils.Tensor("attention_mask", mask.astype(np.int64)),
                pb_utils.Tensor("truncated", np.asarray(truncated, dtype=bool).reshape(-1, 1)),
            ]))
        return responses
'''


# ----------------------------------------------------------------------------------------------------------------
# The repository


def _engine_set(engines: Path) -> EngineSet:
    from hbi_runtime.inputs import read_json

    path = engines / MANIFEST_NAME
    if not path.is_file():
        raise BadInputError(f"{engines} has no {MANIFEST_NAME}",
                            hint="pass the folder `hbi-export build-engine PKG` wrote: PKG/engines/<precision>")
    return EngineSet.from_dict(read_json(path, what="engine manifest"), str(path))


def _copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return sha256_file(dst)


def write_repository(pkg_dir: str | os.PathLike, out: str | os.PathLike, *, engines: str | os.PathLike | None = None,
                     serving: Serving = Serving(), allow_unverified: bool = False, overwrite: bool = False,
                     progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write the model repository for package ``pkg_dir`` into ``out`` (the rules of every ``--out``:
    :mod:`hbi_runtime.outputs`; written beside and swapped in when complete).

    Returns:
        A summary: ``repository``, ``models`` (name -> platform / backend and max_batch_size), ``package_sha256``,
        ``graphs``, ``plugin_library`` (TensorRT plans only) and ``files``.
    Raises:
        BadInputError: not a retrieval package, no engine for an encoder, an engine of another graph.
        UsageError: ``out`` may not be written (an input, a non-empty folder of something else, no --overwrite).
        GateFailedError: the package's parity failed or never ran (unless ``allow_unverified``).
    """
    pkg = load_package(pkg_dir, allow_unverified=allow_unverified)
    out = prepare_output_dir(out, kind="Triton model repository", inputs=[pkg_dir, engines], overwrite=overwrite,
                             option="OUT")
    engine_set = _engine_set(Path(engines)) if engines is not None else None
    with staged_output_dir(out) as tmp:
        summary = _write(pkg, Path(tmp), engine_set, Path(engines) if engines is not None else None, serving,
                         progress, out)
    return summary


def _write(pkg: Package, root: Path, engine_set: EngineSet | None, engines: Path | None, serving: Serving,
           progress: Callable[[str], None], out: Path) -> dict[str, Any]:
    models: dict[str, Any] = {}
    files: dict[str, str] = {}
    plugin = None
    for name in ENCODERS:
        spec = pkg.graph(name)
        axis = batch_axis(spec)
        progress(f"{name}: copying the graph")
        if engine_set is None:
            platform, max_batch = "onnxruntime_onnx", (serving.max_batch or DEFAULT_MAX_BATCH).get(
                name, DEFAULT_MAX_BATCH[name])
            files[f"{name}/1/model.onnx"] = _copy(pkg.graph_path(name), root / name / "1" / "model.onnx")
            graph_dir = PurePosixPath(spec.file).parent
            for rel in spec.external_data:  # weights stored beside the graph keep their relative place
                inner = PurePosixPath(rel).relative_to(graph_dir) if str(graph_dir) != "." else PurePosixPath(rel)
                files[f"{name}/1/{inner}"] = _copy(pkg.dir / rel, root / name / "1" / inner)
        else:
            entry = engine_set.entry_for(spec.file)
            if entry is None:
                raise BadInputError(f"the engines in {engines} include none for {spec.file}",
                                    hint=f"build them: `hbi-export build-engine {pkg.dir}`")
            if entry.onnx_sha256 != spec.sha256:
                raise BadInputError(f"the engine {entry.file} was built from another {spec.file} (sha256 "
                                    f"{entry.onnx_sha256[:12]}..., the package's is {spec.sha256[:12]}...)",
                                    hint=f"rebuild it: `{entry.rebuild_command(pkg.dir)}`")
            platform = "tensorrt_plan"
            max_batch = min(p[t.name].max[0] for p in entry.profiles for t in spec.inputs if t.name in p)
            engine_file = engines / PurePosixPath(entry.file).name
            files[f"{name}/1/model.plan"] = _copy(engine_file, root / name / "1" / "model.plan")
            if entry.plugin_library_sha256:
                plugin = {"path": entry.plugin_library, "sha256": entry.plugin_library_sha256}
        (root / name / "config.pbtxt").write_text(encoder_config(name, spec, platform=platform, max_batch=max_batch,
                                                                  serving=serving, graph_sha256=spec.sha256))
        models[name] = {"platform": platform, "max_batch_size": max_batch, "batch_axis": axis}
    text = pkg.graph("text_encoder")
    vocab = pkg.tokenizer_path(next(iter(pkg.manifest.tokenizer.files)))
    progress("tokenizer and ensemble")
    files[f"{TOKENIZER_MODEL}/1/{vocab.name}"] = _copy(vocab, root / TOKENIZER_MODEL / "1" / vocab.name)
    (root / TOKENIZER_MODEL / "1" / "model.py").write_text(
        TOKENIZER_PY.replace("VOCAB_FILE", repr(vocab.name)))
    tmax = models["text_encoder"]["max_batch_size"]
    (root / TOKENIZER_MODEL / "config.pbtxt").write_text(tokenizer_config(text, tmax, serving))
    (root / TEXT_MODEL / "1").mkdir(parents=True)  # an ensemble has an empty version folder
    (root / TEXT_MODEL / "config.pbtxt").write_text(ensemble_config(text, tmax))
    models[TOKENIZER_MODEL] = {"backend": "python", "max_batch_size": tmax}
    models[TEXT_MODEL] = {"platform": "ensemble", "max_batch_size": tmax}
    summary = {"schema": REPOSITORY_SCHEMA, "package": str(pkg.dir), "package_sha256": pkg.manifest_sha256,
               "graphs": {n: pkg.graph(n).sha256 for n in ENCODERS}, "models": models, "plugin_library": plugin,
               "files": files}
    write_atomic(root / REPOSITORY_MANIFEST, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["repository"] = str(out)
    (root / "README.md").write_text(readme(summary, engine_set is not None))
    return summary


def readme(summary: dict[str, Any], plans: bool) -> str:
    """How to start tritonserver on the repository (and, for TensorRT plans, with the plugin library)."""
    plugin = summary.get("plugin_library")
    lines = [
        "# Triton model repository for an hbi-toolkit package",
        "",
        f"Written by `hbi-export triton` from the package `{summary['package']}` (manifest sha256 "
        f"`{summary['package_sha256']}`). Models:",
        "",
        *(f"- `{name}`: {m.get('platform') or m.get('backend')}, max_batch_size {m['max_batch_size']}"
          for name, m in summary["models"].items()),
        "",
        "`text` takes strings (`TEXT`, BYTES, one per row) and returns the text side; `text_encoder` takes token",
        "ids; `video_encoder` takes preprocessed frames and their mask (the package manifest's `preprocessing`).",
        "",
        "## Starting the server",
        "",
        "The `tokenizer` model runs on Triton's Python backend and imports hbi-toolkit's tokenizer: install it in",
        "the Python that the backend uses (in NVIDIA's container: `pip install 'hbi-toolkit[runtime]'`).",
        "",
        "```bash",
    ]
    if plans and plugin:
        lines += [
            "# the engines run the hbi custom ops as TensorRT plugins: Triton loads plugin libraries that are",
            "# preloaded into the server process (build the library for this GPU / TensorRT: docs/tensorrt.md)",
            f"# the engines were built with {plugin['path']} (sha256 {plugin['sha256']}); load that same file:",
            "LD_PRELOAD=/path/to/libhbi_trt_plugins.so \\",
        ]
    lines += [
        f"tritonserver --model-repository={Path(summary['repository']).absolute()} \\",
        "    --http-port 8010 --grpc-port 8011 --metrics-port 8012",
        "```",
        "",
    ]
    if plans:
        lines += ["The TensorRT plans only run on the GPU model and TensorRT version they were built for; the",
                  "server's TensorRT must be the engines' (`hbi_repository.json`, engines.json).", ""]
    lines += [
        "## Using it from hbi-toolkit",
        "",
        "```bash",
        "hbi-run index VIDEOS -m PKG --backend triton --triton-url grpc://localhost:8011",
        "hbi-run retrieve 'a dog runs' --index IDX -m PKG --backend triton --triton-url http://localhost:8010",
        "```",
        "",
        "The client checks the server's outputs against the package's own graphs on its first call (a parity",
        "probe) and refuses a server that serves another model.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


TRITON_HELP = (
    "Write a Triton Inference Server model repository for a model package: the text and video encoders (the "
    "package's ONNX graphs on the onnxruntime platform, or with --engines the TensorRT plans of `hbi-export "
    "build-engine`), a Python-backend tokenizer and an ensemble `text` so clients can send strings, dynamic "
    "batching and instance groups, and a README on starting tritonserver. See docs/scale.md."
)
TRITON_EXAMPLES = (
    "Examples:\n\n"
    "  hbi-export triton pkg/b32 triton-repo\n\n"
    "  hbi-export triton pkg/b32 triton-repo --instances 2 --kind gpu --max-batch video_encoder=32\n\n"
    "  hbi-export triton pkg/b32 triton-repo --engines pkg/b32/engines/fp16 --format json"
)


def _max_batch(values: Sequence[str] | None) -> dict[str, int] | None:
    if not values:
        return None
    parsed = dict(DEFAULT_MAX_BATCH)
    for value in values:
        name, _, size = value.partition("=")
        if name not in ENCODERS or not size.isdigit() or int(size) < 1:
            raise UsageError(f"--max-batch takes GRAPH=N with GRAPH one of {list(ENCODERS)}, got {value!r}",
                             hint="e.g. --max-batch video_encoder=32")
        parsed[name] = int(size)
    return parsed


def _render(summary: dict[str, Any]) -> str:
    lines = [f"wrote {summary['repository']}"]
    lines += [f"  {name:<14} {m.get('platform') or m.get('backend'):<17} max_batch_size {m['max_batch_size']}"
              for name, m in summary["models"].items()]
    if summary.get("plugin_library"):
        lines.append(f"  TensorRT plugin library: {summary['plugin_library']['path']} (LD_PRELOAD it; README.md)")
    lines.append(f"start the server: see {summary['repository']}/README.md")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``hbi-export triton`` to ``app``."""
    app.command("triton", help=TRITON_HELP, epilog=TRITON_EXAMPLES)(triton_command)


def triton_command(
    ctx: typer.Context,
    package: Annotated[Path, typer.Argument(help="Model package folder.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Model repository folder to write.", show_default=False)],
    engines: Annotated[Optional[Path], typer.Option(
        "--engines", help="A PKG/engines/<precision> folder of `hbi-export build-engine`: serve TensorRT plans.",
        show_default=False)] = None,
    instances: Annotated[int, typer.Option("--instances", min=1, help="Model instances per encoder.")] = 1,
    kind: Annotated[str, typer.Option("--kind", help="Instance kind of the ONNX models: cpu or gpu.")] = "cpu",
    max_batch: Annotated[Optional[list[str]], typer.Option(
        "--max-batch", help="GRAPH=N: max_batch_size of an encoder (default text_encoder=64, video_encoder=16; "
                            "engines: their profile's max).", show_default=False)] = None,
    queue_delay_us: Annotated[int, typer.Option(
        "--queue-delay-us", min=0, help="Dynamic batcher: longest wait for a fuller batch.")] = 2000,
    allow_unverified: AllowUnverifiedOption = False,
    overwrite: overwrite_option("a Triton model repository") = False,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    json_mode = output_format is OutputFormat.json
    with run_guarded(ctx, json_mode):
        serving = Serving(instances=instances, kind=kind.lower(), queue_delay_us=queue_delay_us,
                          max_batch=_max_batch(max_batch))
        with Steps(enabled=not json_mode) as say:
            summary = write_repository(package, out, engines=engines, serving=serving,
                                       allow_unverified=allow_unverified, overwrite=overwrite, progress=say)
        if json_mode:
            emit_json(summary)
        else:
            typer.echo(_render(summary))
