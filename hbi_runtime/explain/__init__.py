"""Banzhaf interaction maps of a (query, video) match: which words cooperate with which moments, per level
(``hbi-run explain``, ``retrieve --explain``; docs/explain.md). numpy only, no torch.

- :mod:`~hbi_runtime.explain.banzhaf`: the game of one pair at one level and its estimator (vectorised Monte Carlo
  with a fixed seed and standard errors; exact enumeration for small games);
- :mod:`~hbi_runtime.explain.explainer`: the players (words as written, frames with their times, clusters with
  their members) and :func:`explain_pair`;
- :mod:`~hbi_runtime.explain.render`: text, PNG (matplotlib, optional) and one self-contained HTML page;
- :mod:`~hbi_runtime.explain.faithfulness`: the deletion test;
- :mod:`~hbi_runtime.explain.cli`: ``hbi-run explain``.
"""

from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES, InteractionMap, LevelGame, interaction_map
from hbi_runtime.explain.explainer import LevelMap, PairExplanation, Player, explain_pair, level_map

__all__ = ["DEFAULT_SAMPLES", "InteractionMap", "LevelGame", "LevelMap", "PairExplanation", "Player", "explain_pair",
           "interaction_map", "level_map"]
