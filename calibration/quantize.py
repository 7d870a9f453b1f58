"""Explicit-quantization (Q/DQ) INT8 graphs with ONNX Runtime's ``quantize_static`` and transformer-safe defaults.

What is quantized: MatMul and Gemm nodes of the graph's main body (their activations per tensor, their weights
int8 per output channel). Nothing else: LayerNormalization, Softmax, the residual and bias Adds, GELU, the
``hbi`` custom ops (``TokenMerge``'s DPC-kNN clustering and merge live in a model-local function, which
``quantize_static`` does not enter) and the interaction graph stay in float. ONNX Runtime shares one Q/DQ pair
between all consumers of a tensor, so a LayerNorm output feeding both a quantized MatMul and a ``TokenMerge`` (or a
residual Add) would reach the float consumer rounded; :func:`_float_inputs_for_float_nodes` rewires every node that
is not quantized back to the float tensor.

Targets (the scheme follows where the graph will run):

- ``ort-cpu``: activations uint8 asymmetric, weights int8 symmetric per channel (U8S8): ONNX Runtime's fast
  VNNI path on x86 (about 2x fp32 on this machine; S8S8 reached only 1.37x, see docs/calibration.md).
- ``tensorrt``: activations and weights int8 symmetric (zero points 0), as TensorRT's explicit quantization
  requires; TensorRT 8.x and later (Jetson included) builds it without an implicit-calibration cache.

Calibration ranges are computed once (:func:`calibrate`, streamed, into an ONNX Runtime tensor-range cache) and
reused by every :func:`quantize` call, so the gate's fallback steps re-quantize without re-reading any video.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from hbi_runtime.errors import UsageError

Progress = Callable[[str], None]
QUANTIZED_OPS = ("MatMul", "Gemm")
METHODS = ("minmax", "entropy", "percentile")
_BLOCK_RE = re.compile(r"^(?P<stack>.+\.resblocks)\.(?P<index>\d+)$")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # module path of each node, written by the torch dynamo exporter
_CALIB_CHUNK = 4  # videos whose intermediate tensors the calibrator holds at once (ViT-B/32, T = 12: ~0.2 GB each)


@dataclass(frozen=True)
class Scheme:
    """How one target wants its Q/DQ: activation type and symmetry (weights are int8 symmetric per channel)."""

    target: str
    activation: str  # "uint8" | "int8"
    symmetric_activations: bool
    why: str

    def to_dict(self) -> dict:
        return {"target": self.target, "activations": f"{self.activation} "
                f"{'symmetric' if self.symmetric_activations else 'asymmetric'} per tensor",
                "weights": "int8 symmetric per output channel", "why": self.why}


TARGETS = {
    "ort-cpu": Scheme("ort-cpu", "uint8", False, "U8S8 runs on ONNX Runtime's VNNI int8 kernels on x86"),
    "tensorrt": Scheme("tensorrt", "int8", True, "TensorRT explicit quantization needs symmetric int8 Q/DQ"),
}


@dataclass(frozen=True)
class QuantNode:
    """A node ``quantize_static`` may quantize: ``kind`` is ``linear`` (a constant weight operand) or ``attention``
    (both operands computed: Q K^T, attention x V); ``block`` is its transformer block (``...resblocks.N``) or ''."""

    name: str
    op_type: str
    kind: str
    block: str


def _block_of(node) -> str:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            blocks = [s for s in scopes if isinstance(s, str) and _BLOCK_RE.match(s)]
            return blocks[-1] if blocks else ""
    return ""


def quantizable_nodes(model, ops: Sequence[str] = QUANTIZED_OPS) -> list[QuantNode]:
    """The main-graph nodes of type ``ops``, classified (function bodies are never listed: they stay float)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ops:
            linear = node.op_type == "Gemm" or any(i in constants for i in node.input[:2])
            out.append(QuantNode(node.name, node.op_type, "linear" if linear else "attention", _block_of(node)))
    return out


def _first_last_blocks(nodes: Iterable[QuantNode]) -> set[str]:
    """The first and last block of each transformer stack (``model.clip.visual.transformer.resblocks`` ...)."""
    stacks: dict[str, list[int]] = {}
    for node in nodes:
        if m := _BLOCK_RE.match(node.block):
            stacks.setdefault(m["stack"], []).append(int(m["index"]))
    return {f"{stack}.{i}" for stack, indices in stacks.items() for i in (min(indices), max(indices))}


def resolve_excluded(nodes: Sequence[QuantNode], patterns: Sequence[str]) -> set[str]:
    """Node names matched by ``--exclude-nodes`` patterns (``fnmatch`` on the node name or its block).

    Raises:
        UsageError: a pattern matches no quantizable node (a typo must not pass silently).
    """
    import fnmatch

    out: set[str] = set()
    for pattern in patterns:
        hits = {n.name for n in nodes if fnmatch.fnmatchcase(n.name, pattern) or
                (n.block and fnmatch.fnmatchcase(n.block, pattern))}
        if not hits:
            examples = ", ".join(sorted({n.name for n in nodes})[:4])
            raise UsageError(f"--exclude-nodes {pattern!r} matches no MatMul / Gemm node (e.g. {examples}); "
                             "patterns match node names or transformer blocks such as "
                             "'*visual.transformer.resblocks.11'")
        out |= hits
    return out


@dataclass(frozen=True)
class Step:
    """One attempt of the gate: its name and the node names kept in float."""

    name: str
    excluded: frozenset[str]


def fallback_steps(nodes: Sequence[QuantNode], user_excluded: set[str]) -> list[Step]:
    """The attempts, each excluding more: the defaults (plus the user's exclusions); then the first and last block
    of every transformer stack in float; then every attention MatMul too. A step that would exclude nothing new
    is dropped."""
    steps = [Step("all MatMul/Gemm", frozenset(user_excluded))]
    edges = _first_last_blocks(nodes)
    candidates = (("+ first/last transformer blocks in float", {n.name for n in nodes if n.block in edges}),
                  ("+ attention matmuls in float", {n.name for n in nodes if n.kind == "attention"}))
    for name, more in candidates:
        excluded = steps[-1].excluded | more
        if excluded != steps[-1].excluded:
            steps.append(Step(name, frozenset(excluded)))
    return steps


def check_options(target: str, method: str, exclude_ops: Sequence[str]) -> tuple[str, ...]:
    """Validate the CLI's scheme options; returns the op types to quantize.

    Raises:
        UsageError: unknown target, method or op type, or every op type excluded.
    """
    if target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    unknown = sorted(set(exclude_ops) - set(QUANTIZED_OPS))
    if unknown:
        raise UsageError(f"--exclude-ops {unknown}: only {list(QUANTIZED_OPS)} are quantized (everything else "
                         "already stays in float)")
    ops = tuple(op for op in QUANTIZED_OPS if op not in exclude_ops)
    if not ops:
        raise UsageError("--exclude-ops excludes every quantized op type: nothing would be quantized")
    return ops


@contextlib.contextmanager
def _quiet_ort_advice():
    """Drop ``quantize_static``'s "consider pre-processing" root-logger warning (we deliberately skip ORT's
    pre-processing: its optimizer would inline the ``hbi`` functions and quantize the merge math)."""
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing" not in record.getMessage()

    filt, root = _Filter(), logging.getLogger()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


class _Window:
    """At most ``size`` items of ``reader`` per pass: the calibrator keeps one pass's intermediates in memory."""

    def __init__(self, reader, size: int) -> None:
        self.reader, self.size, self.left, self.done = reader, size, size, False

    def get_next(self):
        if self.left == 0 or self.done:
            return None
        self.left -= 1
        item = self.reader.get_next()
        self.done = item is None
        return item


def calibrate(model_path: Path, reader, method: str, cache_path: Path, work_dir: Path, *,
              ops: Sequence[str] = QUANTIZED_OPS, progress: Progress = lambda _: None) -> None:
    """Collect the activation ranges of ``model_path``'s quantizable nodes from ``reader`` into ``cache_path``.

    Intermediate tensors are reduced every ``_CALIB_CHUNK`` samples (min/max merged, histograms accumulated), so
    memory does not grow with the number of samples.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_path, list(ops), augmented_model_path=str(work_dir / "augmented.onnx"),
                                   calibrate_method=_method(method))
    try:
        # ORT's histogram collector print()s its settings: keep stdout for the command's result (JSON).
        with contextlib.redirect_stdout(sys.stderr):
            window = _Window(reader, _CALIB_CHUNK)
            while not window.done:
                window.left = _CALIB_CHUNK
                _collect(calibrator, window)
            save_tensors_data(calibrator.compute_data(), cache_path)
    finally:
        del calibrator
    progress(f"calibration: ranges of {method} collected")


def _collect(calibrator, window: _Window) -> None:
    """One pass of the calibrator; ORT raises ValueError('No data is collected') on an empty pass, which is not an
    error between two passes (the reader ran out exactly at a window edge)."""
    try:
        calibrator.collect_data(window)
    except ValueError as exc:
        if "No data is collected" not in str(exc):
            raise


def quantize(model_path: Path, out_path: Path, *, target: str, method: str, cache_path: Path,
             excluded: Iterable[str] = (), ops: Sequence[str] = QUANTIZED_OPS) -> dict:
    """Write the Q/DQ graph of ``model_path`` to ``out_path`` with the cached ranges; returns a summary.

    Returns:
        ``{"quantized": [node names], "float": [excluded node names]}``.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    scheme = TARGETS[target]
    model = onnx.load(str(model_path))
    nodes = [n for n in quantizable_nodes(model, ops)]
    excluded = set(excluded)
    quantized = [n.name for n in nodes if n.name not in excluded]
    activation = QuantType.QUInt8 if scheme.activation == "uint8" else QuantType.QInt8
    extra = {"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True,
             "OpTypesToExcludeOutputQuantization": list(ops), "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    with _quiet_ort_advice():
        quantize_static(str(model_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activation, weight_type=QuantType.QInt8, op_types_to_quantize=list(ops),
                        nodes_to_quantize=quantized or None, nodes_to_exclude=sorted(excluded),
                        calibrate_method=_method(method), calibration_cache_path=str(cache_path),
                        extra_options=extra)
    qmodel = onnx.load(str(out_path))
    _float_inputs_for_float_nodes(qmodel, set(quantized))
    onnx.checker.check_model(qmodel, full_check=False)
    onnx.save(qmodel, str(out_path))
    return {"quantized": sorted(quantized), "float": sorted(n.name for n in nodes if n.name in excluded)}


def _float_inputs_for_float_nodes(model, quantized: set[str]) -> None:
    """Feed every node that is not quantized the float tensor, not its rounded Q/DQ copy; drop unused Q/DQ nodes."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    float_of = {}
    for node in graph.node:  # activation pairs: x -> QuantizeLinear -> DequantizeLinear -> x'
        if node.op_type == "DequantizeLinear" and node.input[0] in producer:
            q = producer[node.input[0]]
            if q.op_type == "QuantizeLinear" and q.input[0] not in initializers:
                float_of[node.output[0]] = q.input[0]
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)
