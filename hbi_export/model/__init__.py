"""The PyTorch reference HBI model (needs torch)."""

from hbi_export.model.config import HBIConfig, TextConfig, VisionConfig
from hbi_export.model.hbi import HBIModel
from hbi_export.model.sides import LEVELS, Side, SideLevel, TextSide, VideoSide, score, score_level, score_levels

__all__ = ["HBIConfig", "HBIModel", "LEVELS", "Side", "SideLevel", "TextConfig", "TextSide", "VideoSide",
           "VisionConfig", "score", "score_level", "score_levels"]
