"""Named model architectures: the one table that every ``--preset`` reads.

``hbi-export init --preset``, ``hbi-train fit`` / ``estimator --preset``, and the training recipes
(``hbi_training.runs``, ``.demo``, ``.qa``, ``.joint``) name an architecture by one of :data:`MODEL_PRESETS` and
build it with :func:`preset_config`. A preset is an :class:`~hbi_export.model.config.HBIConfig` constructor of the
same name, dashes for underscores (``vit-b-32`` -> ``HBIConfig.vit_b_32``); a new preset is one constructor there
and one name here.

This module imports neither torch nor the model: a command line can offer the names as choices before anything
heavy loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hbi_runtime.errors import UsageError

if TYPE_CHECKING:
    from hbi_export.model.config import HBIConfig

# tiny: the test-sized model; demo: the synthetic-data demo's; vit-b-32: the official retrieval model; vit-b-16:
# the official QA model's backbone
MODEL_PRESETS: tuple[str, ...] = ("tiny", "demo", "vit-b-32", "vit-b-16")


def preset_config(name: str) -> HBIConfig:
    """The :class:`~hbi_export.model.config.HBIConfig` of the model preset ``name``.

    Raises:
        UsageError: ``name`` is not one of :data:`MODEL_PRESETS`.
    """
    if name not in MODEL_PRESETS:
        raise UsageError(f"unknown model preset {name!r}", hint=f"use one of {', '.join(MODEL_PRESETS)}")
    from hbi_export.model.config import HBIConfig

    return getattr(HBIConfig, name.replace("-", "_"))()


__all__ = ["MODEL_PRESETS", "preset_config"]
