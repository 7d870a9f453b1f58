"""TensorRT's ONNX operator support, per TensorRT version, as data.

The tables live beside this module (``trt_10.3.json``, ``trt_current.json``): one entry per ONNX operator with
``supported``, the tensor ``types`` TensorRT lists for it, a short ``restrictions`` text and the restrictions that
can be checked on a graph (``checks``, see ``checks.py``). Each file records the onnx-tensorrt source it was read
from (``source``) and the opset range that TensorRT version documents.

Type names are the ones onnx-tensorrt's ``docs/operators.md`` uses (FP32, FP16, BF16, INT32, ...).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from onnx import TensorProto

from hbi_runtime.errors import UsageError

# One data file per supported target; the aliases inside each file (e.g. "current", "10.15") select it too.
DATA_FILES = ("trt_10.3.json", "trt_current.json")

# operators.md type names -> ONNX TensorProto element types (FP8 is E4M3FN, FP4 is E2M1 in TensorRT).
TYPE_TOKENS: dict[str, int] = {
    "FP32": TensorProto.FLOAT, "FP16": TensorProto.FLOAT16, "BF16": TensorProto.BFLOAT16,
    "DOUBLE": TensorProto.DOUBLE, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "INT8": TensorProto.INT8, "UINT8": TensorProto.UINT8, "BOOL": TensorProto.BOOL,
    "FP8": TensorProto.FLOAT8E4M3FN, "INT4": TensorProto.INT4, "FP4": TensorProto.FLOAT4E2M1,
}
ONNX_TO_TOKEN = {v: k for k, v in TYPE_TOKENS.items()}


def dtype_name(elem_type: int) -> str:
    """ONNX element type -> readable name (``FLOAT16``, ``STRING``, ...)."""
    return TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)


@dataclass(frozen=True)
class OpSupport:
    """One operator row of a TensorRT support table."""

    name: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str
    checks: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class TrtSupport:
    """TensorRT's ONNX support for one version: operators, accepted tensor types, opset range, source."""

    version: str            # the TensorRT version the table describes, e.g. "10.3", "10.15"
    aliases: tuple[str, ...]
    opset_min: int
    opset_max: int
    ops: dict[str, OpSupport]
    accepted_types: frozenset[str]
    io_only_types: frozenset[str]
    cast_down_types: frozenset[str]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def minor(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def plugin_before_function(self) -> bool:
        """From TensorRT 10.7 a registered plugin wins over a model-local function of the same name."""
        return self.minor >= (10, 7)


def _parse(data: dict[str, Any]) -> TrtSupport:
    types = data["tensor_types"]
    ops = {name: OpSupport(name, bool(row["supported"]), tuple(row.get("types", ())),
                           row.get("restrictions", ""), tuple(row.get("checks", ())))
           for name, row in data["ops"].items()}
    return TrtSupport(
        version=data["tensorrt"], aliases=tuple(data.get("aliases", ())), opset_min=data["opset"]["min"],
        opset_max=data["opset"]["max"], ops=ops, accepted_types=frozenset(types["accepted"]),
        io_only_types=frozenset(types.get("io_only", ())), cast_down_types=frozenset(types.get("cast_down", ())),
        source=data.get("source", {}))


@functools.lru_cache(maxsize=None)
def _all_tables() -> tuple[TrtSupport, ...]:
    root = resources.files(__package__)
    return tuple(_parse(json.loads(root.joinpath(name).read_text(encoding="utf-8"))) for name in DATA_FILES)


def available_versions() -> list[str]:
    """Every name ``load_support`` accepts (versions and aliases)."""
    return sorted({name for t in _all_tables() for name in (t.version, *t.aliases)})


def load_support(trt_version: str = "current") -> TrtSupport:
    """The support table for ``trt_version`` ("10.3", "current", "10.15", ...).

    Raises:
        UsageError: no table describes that version.
    """
    for table in _all_tables():
        if trt_version == table.version or trt_version in table.aliases:
            return table
    raise UsageError(f"no TensorRT support table for version {trt_version!r}",
                     hint=f"use one of: {', '.join(available_versions())}")
