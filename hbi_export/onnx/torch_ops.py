"""The HBI custom ops as torch custom ops, and their translation to ``hbi.*`` ONNX nodes.

``torch.ops.hbi.token_merge`` and ``torch.ops.hbi.weighted_token_interaction`` run the reference code eagerly
(``hbi_export.model.merge.token_merge``, ``hbi_export.model.sides.score_level``), so exporting through them changes
nothing numerically; the exporter turns each call into one node of domain ``hbi`` (translation table below) and
``functions.attach_functions`` adds the decomposition. The op schemas are registered with ``onnx.defs`` for the
export process only, so the exporter can build and type the nodes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import onnx
import torch
from onnx.defs import OpSchema

from hbi_export.model import HBIModel
from hbi_export.model.merge import token_merge as _token_merge
from hbi_export.model.sides import SideLevel, score_level
from hbi_export.onnx.functions import DOMAIN, HBI, VERSION

PLUGIN = {"plugin_namespace": "hbi", "plugin_version": "1"}


@torch.library.custom_op("hbi::token_merge", mutates_args=())
def token_merge(x: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, clusters: int, k: int) -> torch.Tensor:
    return _token_merge(x, score, mask, clusters, k)


@token_merge.register_fake
def _(x, score, mask, clusters, k):
    return x.new_empty(x.shape[0], clusters, x.shape[2])


@torch.library.custom_op("hbi::weighted_token_interaction", mutates_args=())
def weighted_token_interaction(t: torch.Tensor, tw: torch.Tensor, tm: torch.Tensor, v: torch.Tensor,
                               vw: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    return score_level(SideLevel(t, tw, tm), SideLevel(v, vw, vm))


@weighted_token_interaction.register_fake
def _(t, tw, tm, v, vw, vm):
    return t.new_empty(t.shape[0], v.shape[0])


def _register_schemas() -> None:
    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    types = [("T", ["tensor(float)", "tensor(float16)"], "fp32 or fp16")]
    plugin = [a(name, OpSchema.AttrType.STRING, "TensorRT plugin matching") for name in PLUGIN]
    schemas = [
        OpSchema("WeightedTokenInteraction", DOMAIN, VERSION, type_constraints=types,
                 inputs=[p(n, "T") for n in ("text_tokens", "text_weights", "text_mask", "video_tokens",
                                             "video_weights", "video_mask")],
                 outputs=[p("scores", "T")], attributes=plugin),
        OpSchema("TokenMerge", DOMAIN, VERSION, type_constraints=types, inputs=[p(n, "T") for n in ("x", "score", "mask")],
                 outputs=[p("merged", "T")],
                 attributes=[a("clusters", OpSchema.AttrType.INT, "merged tokens"),
                             a("k", OpSchema.AttrType.INT, "kNN size"), *plugin]),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


_register_schemas()


def _translate_merge(x, score, mask, clusters: int, k: int):
    return HBI.TokenMerge(x, score, mask, clusters=clusters, k=k, **PLUGIN)


def _translate_wti(t, tw, tm, v, vw, vm):
    return HBI.WeightedTokenInteraction(t, tw, tm, v, vw, vm, **PLUGIN)


TRANSLATION_TABLE = {
    torch.ops.hbi.token_merge.default: _translate_merge,
    torch.ops.hbi.weighted_token_interaction.default: _translate_wti,
}


def _merge_op(x, score, mask, clusters, k):
    mask = torch.ones_like(score) if mask is None else mask.to(score.dtype)  # the event level is unmasked
    return torch.ops.hbi.token_merge(x, score, mask, clusters, k)


@contextlib.contextmanager
def custom_merge_ops(model: HBIModel) -> Iterator[HBIModel]:
    """Within the block, the model's CTMs merge through ``torch.ops.hbi.token_merge`` (restored afterwards)."""
    ctms = [m for name, m in model.named_children() if "_ctm" in name]
    saved = [ctm.merge_fn for ctm in ctms]
    try:
        for ctm in ctms:
            ctm.merge_fn = _merge_op
        yield model
    finally:
        for ctm, fn in zip(ctms, saved):
            ctm.merge_fn = fn
