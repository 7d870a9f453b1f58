"""The Banzhaf interaction of every (text player, video player) pair of one level, in numpy (docs/explain.md).

The game. For one (text, video) pair at one level the players are the level's valid text tokens and valid video
tokens; the value of a coalition ``(T, V)`` is the model's own level score computed with only those tokens present,
absent ones masked as the score masks padding: their similarities are 0 (and can win a max, exactly as a padded
position does) and the token weights are the level's weights renormalised over the present tokens (what the
masked softmax gives when only those tokens exist)::

    v(T, V) = 1/2 [ sum_{t in T} w~_t max_v S'[t, v] + sum_{v in V} u~_v max_t S'[t, v] ],
    S'[t, v] = S[t, v] if t in T and v in V else 0        (padded positions: always 0),

so ``v`` of every valid player is the level score. The Banzhaf interaction of text player ``i`` and video player
``j`` is ``I(i, j) = E_C [v(C+i+j) - v(C+i) - v(C+j) + v(C)]`` over coalitions ``C`` of the *other* players, each
present with probability 1/2: the ``"textbook"`` variant of ``hbi_training.banzhaf.banzhaf_labels`` before its
final ``scale`` (``tests/training/test_explain_agreement.py`` holds the two together).

The estimator. One random coalition of *all* players per sample serves every cell: for cell ``(i, j)`` its members
other than ``i`` and ``j`` are a coalition of the others with the right distribution, and the four values are
derived from shared per-sample quantities (the best and second-best present similarity of every row and column), so
one sample costs ``O(Nt * Nv)`` for the whole map, not ``O((Nt * Nv)^2)``. Each cell's standard error is that of
the mean of its per-sample differences (the samples are independent; cells share them, so their errors are
correlated). Sums over groups of players (the BPE pieces of one word) are formed per sample, so their standard
errors are right too. With at most ``EXACT_MAX_PLAYERS`` players every coalition is enumerated instead (each
coalition of the others is then counted four times, once per presence of ``i`` and ``j``): exact, standard error 0.

numpy only (no torch): this is the runtime's explainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError

DEFAULT_SAMPLES = 2048
DEFAULT_SEED = 0
EXACT_MAX_PLAYERS = 12  # 2^12 = 4096 coalitions: enumerating them costs what 4096 samples cost
CHUNK_ELEMENTS = 1 << 20  # samples x Nt x Nv per chunk (a few MB per intermediate)


@dataclass(frozen=True)
class LevelGame:
    """The game of one (text, video) pair at one level.

    Attributes:
        sim: ``(Nt, Nv)`` similarities between the valid text and video tokens (float64).
        text_weights, video_weights: ``(Nt,)``, ``(Nv,)`` the level's softmaxed weights at those tokens.
        text_padded, video_padded: whether the level has positions outside the players (padding), whose zero
            similarities always take part in the max.
    """

    sim: np.ndarray
    text_weights: np.ndarray
    video_weights: np.ndarray
    text_padded: bool = False
    video_padded: bool = False

    def __post_init__(self) -> None:
        sim = np.asarray(self.sim, dtype=np.float64)
        wt = np.asarray(self.text_weights, dtype=np.float64)
        wv = np.asarray(self.video_weights, dtype=np.float64)
        if sim.ndim != 2 or wt.shape != (sim.shape[0],) or wv.shape != (sim.shape[1],):
            raise UsageError(f"LevelGame: sim (Nt, Nv), text_weights (Nt,), video_weights (Nv,); got {sim.shape}, "
                             f"{wt.shape}, {wv.shape}")
        if not (np.isfinite(sim).all() and np.isfinite(wt).all() and np.isfinite(wv).all()):
            raise BadInputError("LevelGame: non-finite similarities or weights")
        object.__setattr__(self, "sim", sim)
        object.__setattr__(self, "text_weights", wt)
        object.__setattr__(self, "video_weights", wv)

    @property
    def shape(self) -> tuple[int, int]:
        return self.sim.shape

    @property
    def players(self) -> int:
        return self.sim.shape[0] + self.sim.shape[1]

    def value(self, text_present: np.ndarray, video_present: np.ndarray) -> np.ndarray:
        """``v`` of coalitions: ``text_present (..., Nt)``, ``video_present (..., Nv)`` bool -> ``(...)`` float64."""
        t = np.asarray(text_present, dtype=bool)
        v = np.asarray(video_present, dtype=bool)
        s = np.where(t[..., :, None] & v[..., None, :], self.sim, 0.0)  # (..., Nt, Nv)
        row = np.where(~v.all(axis=-1, keepdims=True) | self.video_padded, np.maximum(s.max(axis=-1), 0.0),
                       s.max(axis=-1)) if s.shape[-1] else np.zeros(s.shape[:-1])
        col = np.where(~t.all(axis=-1, keepdims=True) | self.text_padded, np.maximum(s.max(axis=-2), 0.0),
                       s.max(axis=-2)) if s.shape[-2] else np.zeros(s.shape[:-2] + s.shape[-1:])
        return 0.5 * ((_renormalised(self.text_weights, t) * row).sum(-1)
                      + (_renormalised(self.video_weights, v) * col).sum(-1))

    def score(self) -> float:
        """``v`` of all players: the pair's level score."""
        return float(self.value(np.ones(self.shape[0], bool), np.ones(self.shape[1], bool)))


def _renormalised(w: np.ndarray, present: np.ndarray) -> np.ndarray:
    w = np.where(present, w, 0.0)
    total = w.sum(axis=-1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


@dataclass(frozen=True)
class InteractionMap:
    """Banzhaf interactions of groups of text players (rows) with groups of video players (columns), and each
    group's Banzhaf value (its own main effect, ``E_C[v(C+i) - v(C)]``, summed over the group's players).

    Attributes:
        values: ``(rows, cols)`` the interactions (summed over the players of each group).
        stderr: ``(rows, cols)`` their Monte-Carlo standard errors (0 when exact).
        exact: every coalition was enumerated.
        samples: coalitions drawn (or enumerated).
        seed: the seed of the draws (None when exact).
        row_values, col_values: ``(rows,)``, ``(cols,)`` the groups' Banzhaf values; ``row_stderr``,
            ``col_stderr`` their standard errors.
    """

    values: np.ndarray
    stderr: np.ndarray
    exact: bool
    samples: int
    seed: int | None
    row_values: np.ndarray | None = None
    row_stderr: np.ndarray | None = None
    col_values: np.ndarray | None = None
    col_stderr: np.ndarray | None = None


def interaction_map(game: LevelGame, *, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                    text_groups: np.ndarray | None = None, video_groups: np.ndarray | None = None,
                    exact: bool | None = None) -> InteractionMap:
    """The Banzhaf interaction map of ``game`` with standard errors.

    Args:
        game: the level game.
        samples: Monte-Carlo coalitions (ignored when exact).
        seed: seed of the draws (``numpy.random.default_rng``): the same inputs give the same map.
        text_groups: ``(rows, Nt)`` 0/1, which text players each row sums (default: one row per player).
        video_groups: ``(cols, Nv)`` likewise for the columns.
        exact: force enumeration (True) or sampling (False); default: enumerate when the game has at most
            ``EXACT_MAX_PLAYERS`` players.

    Raises:
        UsageError: ``samples`` < 1, groups of the wrong width, or ``exact=True`` for more than 24 players.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise UsageError(f"samples must be a positive integer, got {samples!r}")
    nt, nv = game.shape
    gt = np.eye(nt) if text_groups is None else np.asarray(text_groups, dtype=np.float64)
    gv = np.eye(nv) if video_groups is None else np.asarray(video_groups, dtype=np.float64)
    if gt.ndim != 2 or gt.shape[1] != nt or gv.ndim != 2 or gv.shape[1] != nv:
        raise UsageError(f"groups must be (rows, {nt}) and (cols, {nv}); got {gt.shape} and {gv.shape}")
    if exact is None:
        exact = game.players <= EXACT_MAX_PLAYERS
    if exact and game.players > 24:
        raise UsageError(f"exact enumeration of {game.players} players (2^{game.players} coalitions) is too costly")
    if nt == 0 or nv == 0:
        zeros = np.zeros((gt.shape[0], gv.shape[0]))
        r0, c0 = np.zeros(gt.shape[0]), np.zeros(gv.shape[0])
        return InteractionMap(zeros, zeros.copy(), True, 0, None, r0, r0.copy(), c0, c0.copy())
    total = np.zeros((gt.shape[0], gv.shape[0]))
    squares = np.zeros_like(total)
    sums = {"rows": np.zeros(gt.shape[0]), "cols": np.zeros(gv.shape[0])}
    sq = {"rows": np.zeros(gt.shape[0]), "cols": np.zeros(gv.shape[0])}
    if exact:
        count = 1 << game.players
        draws = _enumerate(game.players, nt)
    else:
        count = int(samples)
        draws = _draw(np.random.default_rng(seed), count, nt, nv)
    chunk = max(1, CHUNK_ELEMENTS // (nt * nv))
    for start in range(0, count, chunk):
        a, b = draws(start, min(count, start + chunk))
        d, text_marg, video_marg = _differences(game, a, b)  # (m, Nt, Nv), (m, Nt), (m, Nv)
        g = np.einsum("rt,mtv,cv->mrc", gt, d, gv, optimize=True)
        total += g.sum(axis=0)
        squares += (g * g).sum(axis=0)
        for key, marg, groups in (("rows", text_marg, gt), ("cols", video_marg, gv)):
            grouped = marg @ groups.T
            sums[key] += grouped.sum(axis=0)
            sq[key] += (grouped * grouped).sum(axis=0)

    def mean_se(s: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = s / count
        if exact:
            return mean, np.zeros_like(mean)
        var = np.maximum(s2 / count - mean * mean, 0.0) * (count / max(count - 1, 1))
        return mean, np.sqrt(var / count)

    mean, se = mean_se(total, squares)
    rows, rows_se = mean_se(sums["rows"], sq["rows"])
    cols, cols_se = mean_se(sums["cols"], sq["cols"])
    return InteractionMap(mean, se, bool(exact), count, None if exact else int(seed), rows, rows_se, cols, cols_se)


def _draw(rng: np.random.Generator, count: int, nt: int, nv: int):
    """Coalitions chunk by chunk (called in order), so memory stays bounded however many samples."""
    def chunk(lo: int, hi: int):
        return rng.random((hi - lo, nt)) < 0.5, rng.random((hi - lo, nv)) < 0.5
    return chunk


def _enumerate(players: int, nt: int):
    def chunk(lo: int, hi: int):
        codes = np.arange(lo, hi, dtype=np.int64)[:, None]
        bits = ((codes >> np.arange(players, dtype=np.int64)[None, :]) & 1).astype(bool)
        return bits[:, :nt], bits[:, nt:]
    return chunk


def _best_two(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values (m, R, K)`` over the present ``(m, 1, K)`` entries: best, its index, second best
    (``-inf`` where there is none)."""
    masked = np.where(present, values, -np.inf)
    first = masked.argmax(axis=-1)  # (m, R)
    best = np.take_along_axis(masked, first[..., None], axis=-1)[..., 0]
    np.put_along_axis(masked, first[..., None], -np.inf, axis=-1)
    return best, first, masked.max(axis=-1)


def _side_part(sim: np.ndarray, w_rows: np.ndarray, rows_in: np.ndarray, cols_in: np.ndarray,
               cols_padded: bool) -> tuple[np.ndarray, np.ndarray]:
    """The row half of the four-term difference, ``sum_{x,y} (-1)^(x+y) A(i, x; j, y)``, per sample and cell.

    ``A(i, x; j, y) = sum_{t in T_ix} w~_t m_t(V_jy)``: ``T_ix`` is the sampled row coalition with row ``i`` set to
    ``x``, ``V_jy`` the column coalition with column ``j`` set to ``y``, ``m_t(V)`` row ``t``'s max over the present
    columns (an absent or padded column is a masked zero). ``sim (R, K)``; ``rows_in (m, R)``, ``cols_in (m, K)``
    the sampled coalitions. Returns ``(m, R, K)`` indexed ``[s, i, j]``, and this half's share of each column's
    marginal, ``A(a; j, 1) - A(a; j, 0)`` ``(m, K)`` (``a``: the sampled rows).

    With ``W`` the present rows' weight and ``P_y[j] = sum_{t present} w_t m_t(V_jy)``,
    ``A(i, x; j, y) = (P_y[j] + (x - a_i) w_i m_i(V_jy)) / (W + (x - a_i) w_i)``, so the alternating sum is
    ``(P_1 - P_0)[j] (1/W_i1 - 1/W_i0) + w_i (m_i(V_j1) - m_i(V_j0)) ((1 - a_i)/W_i1 + a_i/W_i0)``.
    """
    m, k = cols_in.shape
    best, first, second = _best_two(np.broadcast_to(sim, (m, *sim.shape)), cols_in[:, None, :])  # (m, R)
    # max over the coalition's columns other than j: the best one unless j is it
    j_is_best = (first[..., None] == np.arange(k)) & cols_in[:, None, :]  # (m, R, K)
    others = np.where(j_is_best, second[..., None], best[..., None])  # (m, R, K)
    # V_j0 lacks j, so it always holds a masked zero; V_j1 lacks nothing only if every other column is present
    full_with_j = (cols_in.sum(axis=1)[:, None] + ~cols_in) == k  # (m, K)
    m0 = np.maximum(others, 0.0)
    m1 = np.maximum(others, sim[None])
    if not cols_padded:
        np.maximum(m1, np.where(full_with_j, -np.inf, 0.0)[:, None, :], out=m1)
    else:
        np.maximum(m1, 0.0, out=m1)
    delta = np.subtract(m1, m0, out=m1)  # (m, R, K)
    a = rows_in.astype(np.float64)
    w_in = a * w_rows  # (m, R)
    w_sum = w_in.sum(axis=1, keepdims=True)  # (m, 1)
    n_in = rows_in.sum(axis=1, keepdims=True)  # (m, 1)
    w1 = np.where(rows_in, w_sum, w_sum + w_rows)  # W_i1: weight of the coalition with row i, (m, R)
    w0 = np.where(rows_in, w_sum - w_rows, w_sum)  # W_i0: without row i
    alone = (n_in - rows_in) == 0  # no other row present: W_i0 is exactly 0
    inv1 = np.divide(1.0, w1, out=np.zeros_like(w1), where=w1 > 0)
    inv0 = np.divide(1.0, w0, out=np.zeros_like(w0), where=(w0 > 0) & ~alone)
    c1 = (inv1 - inv0)[..., None]  # (m, R, 1)
    c2 = (w_rows * ((1.0 - a) * inv1 + a * inv0))[..., None]
    p_delta = np.einsum("mr,mrk->mk", w_in, delta)[:, None, :]  # (m, 1, K)
    w_all = w_sum[:, 0]
    col_marginal = np.divide(p_delta[:, 0, :], w_all[:, None], out=np.zeros_like(p_delta[:, 0, :]),
                             where=w_all[:, None] > 0)  # this half's A(a; j, 1) - A(a; j, 0), (m, K)
    delta *= c2
    delta += p_delta * c1
    return delta, col_marginal


def _row_marginal(sim: np.ndarray, w_rows: np.ndarray, rows_in: np.ndarray, cols_in: np.ndarray,
                  cols_padded: bool) -> np.ndarray:
    """This half's ``A(T_i1; V) - A(T_i0; V)`` for the sampled columns ``V``: ``(m, R)``."""
    k = cols_in.shape[1]
    masked = np.where(cols_in[:, None, :], sim[None], -np.inf)
    best = masked.max(axis=-1)  # (m, R)
    lacks = ~cols_in.all(axis=1, keepdims=True) | cols_padded if k else np.ones((len(cols_in), 1), bool)
    n_best = np.where(lacks, np.maximum(best, 0.0), best)  # m_t(V)
    n_best = np.where(np.isfinite(n_best), n_best, 0.0)
    a = rows_in.astype(np.float64)
    w_in = a * w_rows
    w_sum = w_in.sum(axis=1, keepdims=True)
    q = (w_in * n_best).sum(axis=1, keepdims=True)
    own = w_rows * n_best
    w1 = np.where(rows_in, w_sum, w_sum + w_rows)
    w0 = np.where(rows_in, w_sum - w_rows, w_sum)
    alone = (rows_in.sum(axis=1, keepdims=True) - rows_in) == 0
    with_i = np.divide(q + (1.0 - a) * own, w1, out=np.zeros_like(w1), where=w1 > 0)
    without = np.divide(q - a * own, w0, out=np.zeros_like(w0), where=(w0 > 0) & ~alone)
    return with_i - without


def _differences(game: LevelGame, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: ``v(C+i+j) - v(C+i) - v(C+j) + v(C)`` per cell, ``C`` the sample minus ``i`` and ``j``
    ``(m, Nt, Nv)``; and each player's marginal ``v(C+i) - v(C)``, ``C`` the sample minus ``i``: text ``(m, Nt)``,
    video ``(m, Nv)`` (their means are the players' Banzhaf values)."""
    text_half, text_cols = _side_part(game.sim, game.text_weights, a, b, game.video_padded)  # [s, i, j]
    video_half, video_cols = _side_part(game.sim.T, game.video_weights, b, a, game.text_padded)  # [s, j, i]
    text_half += video_half.transpose(0, 2, 1)
    text_half *= 0.5
    text_marg = 0.5 * (video_cols + _row_marginal(game.sim, game.text_weights, a, b, game.video_padded))
    video_marg = 0.5 * (text_cols + _row_marginal(game.sim.T, game.video_weights, b, a, game.text_padded))
    return text_half, text_marg, video_marg
