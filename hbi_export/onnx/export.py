"""Export the three graphs of a model to ONNX (dynamo exporter, ``hbi`` custom ops, model-local functions)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch

from hbi_export.model import HBIModel
from hbi_export.onnx.functions import attach_functions
from hbi_export.onnx.graphs import GraphDef
from hbi_export.onnx.torch_ops import TRANSLATION_TABLE, custom_merge_ops
from hbi_runtime.errors import HbiError

MIN_OPSET = 17  # LayerNormalization is a standard op from 17 on
DEFAULT_OPSET = 18


class ExportError(HbiError):
    """torch.onnx could not export a graph (a bug or an unsupported model, not a user mistake)."""


def example_inputs(gdef: GraphDef, batch: dict[str, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of a graph's input spec, with padding in every mask (batch sizes per axis name)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in gdef.inputs:
        shape = tuple(batch[d] if isinstance(d, str) else d for d in spec.shape)
        if spec.name == "input_ids":
            x = torch.randint(1, 49405, shape, generator=g)
            x[:, 0], x[:, -1] = 49406, 49407
        elif spec.name in ("attention_mask", "frame_mask") or "_mask_" in spec.name:
            x = torch.ones(shape, dtype=torch.int64 if spec.dtype == "int64" else torch.float32)
            x[-1, shape[1] // 2:] = 0 if spec.name in ("attention_mask", "frame_mask") or spec.name.endswith(
                "_l0") else 1
        elif "_weights_" in spec.name:
            x = torch.rand(shape, generator=g).softmax(dim=-1)
        elif spec.name == "level_weights":
            x = torch.tensor([1.0, 0.0, 0.0])
        else:
            x = torch.randn(shape, generator=g)
        out.append(x)
    return tuple(out)


def export_graph(gdef: GraphDef, model: HBIModel, path: str | Path, opset: int = DEFAULT_OPSET, *,
                 progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """Export one graph with dynamic batch axes, attach the ``hbi`` functions, check it fully, save it
    (``progress`` hears when the check starts).

    Raises:
        ExportError: the exporter or the ONNX checker failed.
    """
    module = gdef.wrapper(model).eval()
    dims = {name: torch.export.Dim(name, min=1) for spec in gdef.inputs for name in spec.shape
            if isinstance(name, str)}
    dynamic = tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} or None
                    for spec in gdef.inputs)
    inputs = example_inputs(gdef, {"text_batch": 2, "video_batch": 3})
    with custom_merge_ops(model):
        return run_export(gdef, module, inputs, dynamic, path, opset,
                          options={"custom_translation_table": TRANSLATION_TABLE}, finish=attach_functions,
                          progress=progress)


def run_export(gdef: GraphDef, module: torch.nn.Module, inputs: tuple, dynamic: tuple, path: str | Path,
               opset: int, *, options: dict | None = None,
               finish: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
               progress: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """The shared tail of every graph export: the dynamo exporter, ``finish`` on its proto (e.g. attaching the
    ``hbi`` functions), the spec's graph and axis names, the full ONNX check, save. ``progress`` hears
    ``checking NAME`` once the exporter is done.

    Raises:
        ExportError: the exporter or the ONNX checker failed.
    """
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module, inputs, dynamo=True, opset_version=opset, verbose=False,
                input_names=[s.name for s in gdef.inputs], output_names=[s.name for s in gdef.outputs],
                dynamic_shapes=dynamic, **(options or {}))
        if progress is not None:
            progress(f"checking {gdef.name}")
        proto = finish(program.model_proto) if finish else program.model_proto
        proto.graph.name = gdef.name
        _name_dynamic_axes(proto, gdef)
        onnx.checker.check_model(proto, full_check=True)
    except HbiError:
        raise
    except Exception as exc:  # torch.onnx / onnx raise many types; report them as one export failure
        raise ExportError(f"exporting {gdef.name} failed: {type(exc).__name__}: {exc}",
                          hint="re-run with --debug and report the traceback") from exc
    onnx.save(proto, str(path))
    return proto


def _name_dynamic_axes(proto: onnx.ModelProto, gdef: GraphDef) -> None:
    """Give graph inputs and outputs the spec's axis names (text_batch, video_batch)."""
    specs = {s.name: s for s in gdef.inputs + gdef.outputs}
    for value in list(proto.graph.input) + list(proto.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str):
                dim.dim_param = want


class _quiet:
    """Silence torch.onnx's progress prints and warnings during one export."""

    def __enter__(self):
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        logging.getLogger("torch.onnx").setLevel(self._level)
        return False
