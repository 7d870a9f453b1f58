"""What a checkpoint load did: :class:`LoadReport`, and the strict key check that fills its error lists.

Nothing is dropped silently: every source entry that does not become a model weight is listed in
``LoadReport.ignored`` with a reason, every tensor whose dtype changed in ``upcast``, and every model part that did
not come from the file (CLIP-only sources) in ``initialised``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from hbi_export.model.config import HBIConfig
from hbi_runtime.errors import CheckpointError

KEY_LIST_LIMIT = 20  # how many keys an error message names before it says "... and N more"

# Categories of ignored entries (``IgnoredKey.category``).
TRAINING_ONLY = "training-only"
METADATA = "metadata"
BUFFER = "buffer"


@dataclass(frozen=True)
class IgnoredKey:
    """A source entry that is deliberately not loaded."""

    key: str
    reason: str
    category: str  # TRAINING_ONLY, METADATA or BUFFER
    numel: int = 0


@dataclass(frozen=True)
class UpcastKey:
    """A source tensor converted to float32 (GPU-trained checkpoints hold CLIP in fp16)."""

    key: str
    from_dtype: str
    to_dtype: str = "float32"


@dataclass(frozen=True)
class InitialisedPart:
    """A model part that the source does not contain and the loader initialised, and how."""

    part: str
    method: str
    keys: int


@dataclass
class LoadReport:
    """The outcome of :func:`hbi_export.checkpoints.load_checkpoint`.

    ``missing`` / ``unexpected`` / ``mis_shaped`` are empty on success: a load with any of them raises
    :class:`CheckpointError` whose message lists them. They are kept here so the same structure describes both.
    """

    format: str
    source: str
    config: HBIConfig
    loaded_keys: int = 0
    ignored: list[IgnoredKey] = field(default_factory=list)
    upcast: list[UpcastKey] = field(default_factory=list)
    initialised: list[InitialisedPart] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the config as :meth:`HBIConfig.to_dict`)."""
        return {
            "format": self.format,
            "source": self.source,
            "config": self.config.to_dict(),
            "loaded_keys": self.loaded_keys,
            "ignored": [vars(i) for i in self.ignored],
            "upcast": [vars(u) for u in self.upcast],
            "initialised": [vars(p) for p in self.initialised],
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mis_shaped": list(self.mis_shaped),
        }


def format_keys(keys: Iterable[str], limit: int = KEY_LIST_LIMIT) -> str:
    """``a, b, c`` or ``a, b, ... (and 17 more)`` for long lists."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} ... (and {len(keys) - limit} more)"


def compare_keys(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Compare a state dict with the expected key -> shape layout.

    Returns:
        (missing, unexpected, mis_shaped); mis-shaped entries read ``key: got (a, b), expected (c, d)``.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    mis_shaped = [
        f"{k}: got {tuple(state_dict[k].shape)}, expected {tuple(shape)}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    return missing, unexpected, mis_shaped


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    fmt: str,
) -> None:
    """Strict key check: raise unless ``state_dict`` has exactly the expected keys and shapes.

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys (first 20 of each, plus a count).
    """
    missing, unexpected, mis_shaped = compare_keys(state_dict, expected)
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if keys:
            parts.append(f"{len(keys)} {label} key(s): {format_keys(keys)}")
    raise CheckpointError(
        f"{source} ({fmt}) does not match the HBI model layout: " + "; ".join(parts),
        hint="check that the file is a complete, unmodified checkpoint of this format; "
        "run `hbi-export inspect FILE --debug` for the inferred architecture",
    )
