"""Banzhaf interaction maps of one (query, video) pair, at the entity, action and event levels (docs/explain.md).

:func:`explain_pair` decodes and encodes the video, encodes the query, and per level builds the game of
:mod:`hbi_runtime.explain.banzhaf` from the two sides, estimates its interaction map, and names the players:

* entity level: the query's words (BPE pieces grouped back into the words as written, the start and end tokens
  as players of their own; a word's row is the sum of its pieces' interactions) x the video's frames (with their
  times);
* action / event levels: the merged text tokens x the merged video tokens (clusters). With a package that has the
  encoders' cluster outputs, each cluster lists the words / frames it merged (frames with their time spans);
  with an older package clusters are shown without members (never guessed).

:func:`level_map` does the same from sides that are already there (``retrieve --explain`` on the index's stored
side). Everything here is numpy: no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.explain.banzhaf import (DEFAULT_SAMPLES, DEFAULT_SEED, InteractionMap, LevelGame,
                                        interaction_map)
from hbi_runtime.sides import LEVELS, Side

SCHEMA = "hbi.explain/1"
START_LABEL, END_LABEL = "⟨start⟩", "⟨end⟩"


@dataclass(frozen=True)
class Player:
    """A row (text) or column (video) of a map.

    Attributes:
        label: what the row or column shows: a word as written, ``⟨start⟩`` / ``⟨end⟩``, a frame's time, or a
            cluster's name (``A1``: the first action cluster; ``E1``: event).
        kind: ``word``, ``start``, ``end``, ``frame``, ``cluster``.
        positions: entity-level token positions (text) or frame slots (video) it covers; for a cluster, its
            members (None: unknown, a package without cluster outputs or a failed check).
        words: for a text cluster, the indices of the words it holds (into the entity level's words).
        times: for frames and video clusters, the time of each member frame, in seconds.
        start, end: a word's place in the query (``query[start:end]``), -1 when not known.
        truncated: a word that lost pieces (or all of them) to the text length.
    """

    label: str
    kind: str
    positions: tuple[int, ...] | None
    words: tuple[int, ...] | None = None
    times: tuple[float, ...] | None = None
    start: int = -1
    end: int = -1
    truncated: bool = False

    def spans(self) -> list[list[float]] | None:
        """A video player's time spans: runs of consecutive member frames as ``[first time, last time]``."""
        if self.times is None or self.positions is None:
            return None
        out: list[list[float]] = []
        prev = None
        for pos, t in zip(self.positions, self.times):
            if prev is not None and pos == prev + 1:
                out[-1][1] = t
            else:
                out.append([t, t])
            prev = pos
        return out

    def to_dict(self) -> dict:
        d: dict = {"label": self.label, "kind": self.kind}
        if self.kind in ("word", "start", "end"):
            d["positions"] = list(self.positions or ())
            if self.kind == "word":
                d.update(start=self.start, end=self.end, truncated=self.truncated)
        elif self.kind == "frame":
            d.update(frame=self.positions[0], time_s=self.times[0])
        else:
            d["members_known"] = self.positions is not None
            if self.words is not None:
                d["words"] = list(self.words)
                d["positions"] = list(self.positions or ())
            if self.times is not None:
                d["frames"] = list(self.positions or ())
                d["times_s"] = list(self.times)
                d["spans_s"] = self.spans()
        return d


@dataclass(frozen=True)
class LevelMap:
    """The interaction map of one level: ``values[r, c]`` is the Banzhaf interaction of text player ``rows[r]``
    with video player ``cols[c]`` (``stderr`` its standard error), ``score`` the pair's level score."""

    level: str
    score: float
    rows: tuple[Player, ...]
    cols: tuple[Player, ...]
    map: InteractionMap
    text_players: int  # players of the game (tokens / clusters), before grouping into rows
    video_players: int
    clusters_known: bool | None = None  # action / event: members shown (None at the entity level)

    @property
    def values(self) -> np.ndarray:
        return self.map.values

    @property
    def stderr(self) -> np.ndarray:
        return self.map.stderr

    def frame_totals(self) -> np.ndarray:
        """Per column, its total interaction with the whole query (the sum over every text player)."""
        return self.map.values.sum(axis=0)

    @property
    def col_values(self) -> np.ndarray:
        """Per column, its Banzhaf value: what it adds to the score on average over coalitions of the others."""
        return self.map.col_values

    @property
    def row_values(self) -> np.ndarray:
        return self.map.row_values

    def accuracy(self) -> dict:
        """The estimate's precision: median and largest standard error relative to the largest |interaction|."""
        top = float(np.abs(self.values).max()) if self.values.size else 0.0
        se = self.stderr
        return {"max_abs_interaction": top,
                "median_stderr": float(np.median(se)) if se.size else 0.0,
                "max_stderr": float(se.max()) if se.size else 0.0,
                "median_stderr_ratio": float(np.median(se) / top) if top > 0 else 0.0,
                "max_stderr_ratio": float(se.max() / top) if top > 0 else 0.0}

    def to_dict(self, digits: int = 6) -> dict:
        m = self.map
        return {"level": self.level, "score": round(self.score, digits),
                "estimator": {"method": "exact" if m.exact else "monte-carlo", "samples": m.samples, "seed": m.seed,
                              "players": {"text": self.text_players, "video": self.video_players},
                              **{k: round(v, 8) for k, v in self.accuracy().items()}},
                **({} if self.clusters_known is None else {"clusters_known": self.clusters_known}),
                "rows": [p.to_dict() for p in self.rows], "cols": [p.to_dict() for p in self.cols],
                "interaction": np.round(m.values, digits).tolist(), "stderr": np.round(m.stderr, digits).tolist(),
                "row_values": np.round(m.row_values, digits).tolist(),
                "row_values_stderr": np.round(m.row_stderr, digits).tolist(),
                "col_values": np.round(m.col_values, digits).tolist(),
                "col_values_stderr": np.round(m.col_stderr, digits).tolist()}


# ----------------------------------------------------------------------------------------------------------------
# players


def text_rows(words: Sequence, mask: np.ndarray, max_words: int) -> tuple[list[Player], np.ndarray]:
    """The entity level's rows: ``⟨start⟩``, each word that kept a piece, ``⟨end⟩``; and the ``(rows, valid
    tokens)`` 0/1 grouping of the game's text players (the valid positions, in order)."""
    valid = np.flatnonzero(mask)
    column = {int(p): k for k, p in enumerate(valid)}
    rows: list[Player] = []
    groups: list[list[int]] = []

    def add(player: Player) -> None:
        cols = [column[p] for p in player.positions if p in column]
        if cols:
            rows.append(player)
            groups.append(cols)

    add(Player(START_LABEL, "start", (int(valid[0]),)))
    for w in words:
        positions = tuple(w.positions(max_words))
        if positions:
            add(Player(w.text, "word", positions, start=w.start, end=w.end, truncated=len(positions) < w.pieces))
    add(Player(END_LABEL, "end", (int(valid[-1]),)))
    g = np.zeros((len(rows), len(valid)))
    for r, cols in enumerate(groups):
        g[r, cols] = 1.0
    return rows, g


def frame_cols(mask: np.ndarray, times: Sequence[float]) -> list[Player]:
    """The entity level's columns: one per valid frame slot, with its time."""
    return [Player(_clock(times[j]), "frame", (int(j),), times=(float(times[j]),)) for j in np.flatnonzero(mask)]


def _clock(t: float) -> str:
    m, s = divmod(float(t), 60)
    return f"{int(m)}:{s:04.1f}"


def _clusters(level: int, count: int, members: list[np.ndarray] | None, player) -> list[Player]:
    """The clusters of ``level``: ``A1..`` / ``E1..``; ``player(name, member indices)`` labels a known cluster."""
    prefix = "A" if level == 1 else "E"
    if members is None:
        return [Player(f"{prefix}{c + 1}", "cluster", None) for c in range(count)]
    return [player(f"{prefix}{c + 1}", tuple(sorted(int(p) for p in members[c]))) for c in range(count)]


def text_clusters(level: int, count: int, members: list[np.ndarray] | None, rows: Sequence[Player]) -> list[Player]:
    """Text clusters of ``level`` with the words (entity rows) their members fall in."""
    def player(name: str, held: tuple[int, ...]) -> Player:
        words = tuple(k for k, r in enumerate(rows) if set(held) & set(r.positions or ()))
        label = " ".join(rows[k].label for k in words) if words else "(no token)"
        return Player(f"{name}: {label}", "cluster", held, words=words)

    return _clusters(level, count, members, player)


def video_clusters(level: int, count: int, members: list[np.ndarray] | None, times: Sequence[float]) -> list[Player]:
    """Video clusters of ``level`` with their member frames and times."""
    def player(name: str, frames: tuple[int, ...]) -> Player:
        stamps = tuple(float(times[j]) for j in frames)
        spans = Player("", "cluster", frames, times=stamps).spans()
        label = ", ".join(_clock(a) if a == b else f"{_clock(a)}-{_clock(b)}" for a, b in spans) or "(no frame)"
        return Player(f"{name}: {label}", "cluster", frames, times=stamps)

    return _clusters(level, count, members, player)


# ----------------------------------------------------------------------------------------------------------------
# one level


def level_game(text: Side, t_row: int, video: Side, v_row: int, level: int,
               video_tokens: np.ndarray | None = None) -> LevelGame:
    """The game of text row ``t_row`` and video row ``v_row`` at ``level`` (0 entity, 1 action, 2 event).
    ``video_tokens``: the video row's tokens at that level when they come from elsewhere (a dequantised store)."""
    t, v = text.levels[level], video.levels[level]
    tm, vm = np.asarray(t.mask[t_row], bool), np.asarray(v.mask[v_row], bool)
    vt = np.asarray(v.tokens[v_row] if video_tokens is None else video_tokens, np.float64)
    sim = np.asarray(t.tokens[t_row], np.float64)[tm] @ vt[vm].T
    return LevelGame(sim, np.asarray(t.weights[t_row], np.float64)[tm], np.asarray(v.weights[v_row], np.float64)[vm],
                     text_padded=not tm.all(), video_padded=not vm.all())


def level_map(text: Side, video: Side, level: int, *, words: Sequence, max_words: int, times: Sequence[float],
              t_row: int = 0, v_row: int = 0, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
              video_tokens: np.ndarray | None = None) -> LevelMap:
    """The :class:`LevelMap` of one pair at one level.

    Args:
        text, video: sides holding the pair (rows ``t_row`` / ``v_row``); their ``clusters`` give the members of
            action / event clusters when present.
        level: 0 entity, 1 action, 2 event.
        words: :meth:`hbi_runtime.tokenizer.ClipTokenizer.words` of the query.
        max_words: the package's text length.
        times: the time of each frame slot of the video, in seconds.
        samples, seed: the Monte-Carlo estimate (exact enumeration for small games).
        video_tokens: the video row's tokens at ``level`` when they come from a store.
    """
    game = level_game(text, t_row, video, v_row, level, video_tokens)
    t_mask = np.asarray(text.levels[0].mask[t_row], bool)
    v_mask = np.asarray(video.levels[0].mask[v_row], bool)
    rows, groups = text_rows(words, t_mask, max_words)
    if level == 0:
        cols = frame_cols(v_mask, times)
        result = interaction_map(game, samples=samples, seed=seed, text_groups=groups)
        return LevelMap(LEVELS[0], game.score(), tuple(rows), tuple(cols), result, *game.shape)
    t_clusters, v_clusters = getattr(text, "clusters", None), getattr(video, "clusters", None)
    nt, nv = game.shape  # every cluster is a player (the action / event levels have no mask)
    t_members = t_clusters.members(t_row, level, nt, t_mask) if t_clusters is not None else None
    v_members = v_clusters.members(v_row, level, nv, v_mask) if v_clusters is not None else None
    result = interaction_map(game, samples=samples, seed=seed)
    return LevelMap(LEVELS[level], game.score(), tuple(text_clusters(level, nt, t_members, rows)),
                    tuple(video_clusters(level, nv, v_members, times)), result, nt, nv,
                    clusters_known=t_members is not None and v_members is not None)


# ----------------------------------------------------------------------------------------------------------------
# a pair, from a query and a video file


@dataclass
class PairExplanation:
    """What :func:`explain_pair` returns; :meth:`to_dict` is the ``hbi.explain/1`` document."""

    query: str
    video: str | bytes | os.PathLike
    truncated: bool
    levels: list[LevelMap]
    words: list
    times: list[float]
    thumbnails: np.ndarray  # (frames, S, S, 3) uint8: what the model saw at each valid frame slot
    model_sha256: str
    samples: int
    seed: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from hbi_runtime.names import exact_text, path_b64

        return {"schema": SCHEMA, "model_sha256": self.model_sha256, "query": self.query,
                "truncated": self.truncated, "video": exact_text(self.video), "video_b64": path_b64(self.video),
                "frame_times_s": [round(t, 3) for t in self.times], "samples": self.samples, "seed": self.seed,
                "levels": [m.to_dict() for m in self.levels], **self.extra}


def check_levels(names: Sequence[str] | None, carried: Sequence[str]) -> list[int]:
    """Level names -> indices, in the order of :data:`LEVELS`; default: every level the package carries.

    Raises:
        UsageError: a name that is not a level. MismatchError: a level the package does not carry.
    """
    if not names:
        return [LEVELS.index(n) for n in LEVELS if n in carried]
    out = set()
    for name in names:
        key = str(name).strip().lower()
        if key not in LEVELS:
            raise UsageError(f"--level {name!r} is not a level", hint=f"use {', '.join(LEVELS)} (repeatable)")
        if key not in carried:
            raise MismatchError(f"the model package does not carry the {key} level (it has {', '.join(carried)})",
                                hint=f"drop --level {key}")
        out.add(LEVELS.index(key))
    return sorted(out)


def check_samples(samples: int) -> int:
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"--samples must be a positive number of coalitions, got {samples}",
                         hint=f"the default, {DEFAULT_SAMPLES}, reaches the accuracy stated in docs/explain.md")
    return int(samples)


def query_words(tokenizer, query: str) -> list:
    """The query's words; BadInputError when the model reads no token of it."""
    if not isinstance(query, str):
        raise BadInputError(f"the query must be text, not {type(query).__name__}")
    words = tokenizer.words(query)
    if not words:
        raise BadInputError("the query has no token the model can read (nothing is left once white space and "
                            "control characters are removed)", hint='give a query with words, e.g. "a dog runs"')
    return words


def thumbnails(frames: np.ndarray, mask: np.ndarray, preprocessing) -> np.ndarray:
    """The valid frame slots of ``frames (T, 3, S, S)`` (normalised) back to ``(n, S, S, 3)`` uint8 RGB."""
    mean = np.asarray(preprocessing.mean, np.float32)[:, None, None]
    std = np.asarray(preprocessing.std, np.float32)[:, None, None]
    rgb = frames[np.asarray(mask, bool)] * std + mean  # (n, 3, S, S) in [0, 1]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def decode_one(model, video, *, timeout_s: float = 120.0):
    """Decode one video file with the package's preprocessing (in a worker process)."""
    from hbi_runtime.video import VideoDecoder

    if not os.path.exists(video):
        raise BadInputError(f"video {_shown(video)} does not exist")
    if not os.path.isfile(video):
        raise BadInputError(f"video {_shown(video)} is not a file")
    with VideoDecoder(model.manifest.preprocessing, workers=1, timeout_s=timeout_s) as pool:
        return pool.decode(video)


def _shown(path) -> str:
    from hbi_runtime.names import display_path

    return display_path(path)


def explain_pair(model, query: str, video, *, levels: Sequence[str] | None = None, samples: int = DEFAULT_SAMPLES,
                 seed: int = DEFAULT_SEED, progress=lambda _: None) -> PairExplanation:
    """The interaction maps of ``query`` and the video file ``video`` (see the module docstring).

    Args:
        model: a loaded :class:`hbi_runtime.model.Model`.
        query: the text.
        video: a video file.
        levels: level names (default: every level the package carries).
        samples, seed: Monte-Carlo coalitions and their seed.
        progress: hears each step before it starts.

    Raises:
        UsageError: ``samples`` < 1, an unknown level. MismatchError: a level the package does not carry.
        BadInputError: a query with no readable token, a file that is not a video (or cannot be decoded), a video
            with fewer than two frames the model sees.
    """
    samples = check_samples(samples)
    chosen = check_levels(levels, model.manifest.levels)
    words = query_words(model.tokenizer, query)
    progress("decoding the video")
    decoded = decode_one(model, video)
    valid = int(np.asarray(decoded.mask).sum())
    if valid < 2:
        raise BadInputError(f"video {_shown(video)} gives {valid} frame{'s' if valid != 1 else ''} at the model's "
                            "sampling: an interaction map needs at least two moments to compare",
                            hint="give a video of at least 2 seconds (the model samples one frame per second)")
    progress("encoding")
    text = model.encode_text([query])
    side = model.encode_frames(np.asarray(decoded.frames)[None], np.asarray(decoded.mask)[None])
    times = _frame_times(decoded)
    maps = []
    for level in chosen:
        progress(f"{LEVELS[level]} level")
        maps.append(level_map(text, side, level, words=words, max_words=model.manifest.max_words, times=times,
                              samples=samples, seed=seed))
    return PairExplanation(query, video, bool(text.truncated[0]), maps, words, times,
                           thumbnails(np.asarray(decoded.frames), decoded.mask, model.manifest.preprocessing),
                           model.package.manifest_sha256, samples, seed)


def _frame_times(decoded) -> list[float]:
    """The time of every frame slot (valid ones from their frame numbers; padding after the last at +1 s)."""
    fps = float(decoded.fps) or 1.0
    times = [round(float(i) / fps, 3) for i in np.asarray(decoded.indices)]
    while len(times) < len(decoded.mask):
        times.append(round((times[-1] if times else -1.0) + 1.0, 3))
    return times


__all__ = ["SCHEMA", "LevelMap", "PairExplanation", "Player", "check_levels", "check_samples", "decode_one",
           "explain_pair", "frame_cols", "level_game", "level_map", "query_words", "text_rows", "thumbnails"]
