"""Precision variants of the model for export.

fp16: a copy whose weights are fp16 except the LayerNorms' (which compute in fp32 anyway, see
``hbi_export.model.layers.LayerNorm``); softmaxes compute in fp32, the ``hbi`` op decompositions reduce in fp32, and
every mask constant is ``MASK_NEG = -1e4`` (finite in fp16). Graph inputs and outputs stay fp32 (sides are always
fp32), so a package's I/O contract does not depend on its precision.
"""

from __future__ import annotations

import copy

import torch

from hbi_export.model import HBIModel
from hbi_export.model.layers import LayerNorm

PRECISIONS = ("fp32", "fp16")


def for_precision(model: HBIModel, precision: str) -> HBIModel:
    """The model itself for fp32; an fp16 copy (LayerNorm parameters kept fp32) for fp16."""
    if precision == "fp32":
        return model
    half = copy.deepcopy(model)
    for module in half.modules():
        if isinstance(module, LayerNorm):
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(torch.float16)
    return half
