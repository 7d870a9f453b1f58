"""Torch-free autoregressive search: greedy and beam search, batched across items, over any step model.

A *step model* (:class:`StepModel`) scores next tokens for a batch of rows; each row belongs to an item (a video)
and carries its own state (e.g. a key/value cache). The search only asks it to

* ``init(items, prefix)``: start rows for ``items`` (int array) with the same-length ``prefix`` ``[n, S]``;
  returns log-probabilities ``[n, V]`` of the next token and a state;
* ``step(state, parents, tokens)``: keep the rows ``parents`` of ``state`` (in that order, repeats allowed: beam
  reordering), append ``tokens`` (one per kept row); returns ``[len(parents), V]`` log-probabilities and the new
  state.

Semantics (:func:`generate`), per item:

* ``beam_size = 1`` is greedy search: the arg-max token each step (lowest token id on ties).
* Beam search keeps up to ``beam_size`` live hypotheses, starting from the prefix alone. Each step, every
  candidate extension is scored by its summed log-probability; the candidates are visited best first (ties:
  lower parent row, then lower token id) among the best ``2 * beam_size``: one ending in ``eos`` becomes a
  finished hypothesis, any other becomes a live one until ``beam_size`` live ones exist. An item stops when it
  has ``beam_size`` finished hypotheses, when no live one is left, or after ``max_length`` generated tokens
  (EOS included); live hypotheses left at ``max_length`` count as finished (without EOS).
* The answer is the finished hypothesis with the best ``logprob / length ** length_penalty`` (``length`` = the
  generated tokens, EOS included; ``length_penalty = 0`` ranks by the raw sum; > 0 favours longer ones). Ties
  go to the hypothesis finished first.
* ``no_repeat_ngram = n > 0``: a token that would complete an n-gram already present in the *generated* tokens
  (the prefix does not count) gets log-probability -inf. EOS is never banned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from hbi_runtime.errors import UsageError


class StepModel(Protocol):
    def init(self, items: np.ndarray, prefix: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def step(self, state: Any, parents: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, Any]: ...


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 1
    max_length: int = 40
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.beam_size, int) and self.beam_size >= 1):
            raise UsageError(f"beam size must be an integer >= 1, got {self.beam_size!r}")
        if not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise UsageError(f"max length must be an integer >= 1, got {self.max_length!r}")
        if not (isinstance(self.no_repeat_ngram, int) and self.no_repeat_ngram >= 0):
            raise UsageError(f"no-repeat n-gram size must be an integer >= 0, got {self.no_repeat_ngram!r}")
        if not np.isfinite(self.length_penalty):
            raise UsageError(f"length penalty must be finite, got {self.length_penalty!r}")


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, without the prefix and without EOS
    logprob: float  # summed log-probability of the generated tokens (EOS included when it ended with one)
    score: float  # logprob / length ** length_penalty
    ended: bool  # True when it ended with EOS (False: cut at max_length)


def banned_tokens(generated: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``generated`` (its last n - 1 tokens followed by them)."""
    if n <= 0 or len(generated) < n - 1:
        return set()
    if n == 1:
        return set(generated)
    tail = tuple(generated[len(generated) - n + 1:])
    return {generated[i + n - 1] for i in range(len(generated) - n + 1) if tuple(generated[i:i + n - 1]) == tail}


def _normalised(logprob: float, length: int, penalty: float) -> float:
    return logprob / (max(length, 1) ** penalty)


def generate(model: StepModel, prefixes: Sequence[Sequence[int]], eos: int,
             options: SearchOptions = SearchOptions()) -> list[Hypothesis]:
    """The best hypothesis per item (row ``i`` of ``prefixes`` is item ``i``); module docstring for semantics.

    Items whose prefixes differ in length are searched in groups of equal length (each group batched).
    """
    if not len(prefixes):
        return []
    out: list[Hypothesis | None] = [None] * len(prefixes)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        if not len(p):
            raise UsageError(f"item {i} has an empty prefix (it needs at least the start token)")
        by_length.setdefault(len(p), []).append(i)
    for items in by_length.values():
        prefix = np.array([list(prefixes[i]) for i in items], dtype=np.int64)
        for i, hyp in zip(items, _search(model, np.array(items), prefix, eos, options)):
            out[i] = hyp
    return out  # type: ignore[return-value]


def _search(model: StepModel, items: np.ndarray, prefix: np.ndarray, eos: int,
            o: SearchOptions) -> list[Hypothesis]:
    n_items, beam = len(items), o.beam_size
    logp, state = model.init(items, prefix)
    # live rows: item (position in `items`), generated tokens, summed logprob
    row_item = list(range(n_items))
    row_tokens: list[tuple[int, ...]] = [()] * n_items
    row_score = [0.0] * n_items
    finished: list[list[Hypothesis]] = [[] for _ in range(n_items)]
    for t in range(o.max_length):
        logp = np.asarray(logp, dtype=np.float64)
        if o.no_repeat_ngram:
            logp = logp.copy()
            for r, toks in enumerate(row_tokens):
                ban = banned_tokens(toks, o.no_repeat_ngram) - {eos}
                if ban:
                    logp[r, list(ban)] = -np.inf
        new_item, new_tokens, new_score, parents, next_tok = [], [], [], [], []
        rows_of: dict[int, list[int]] = {}
        for r, it in enumerate(row_item):
            rows_of.setdefault(it, []).append(r)
        for it, rows in rows_of.items():
            cand = np.asarray(row_score)[rows][:, None] + logp[rows]  # (beams, V)
            flat = cand.ravel()
            k = min(2 * beam, flat.size)
            top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
            # best first; ties: lower parent row, then lower token (= lower flat index)
            top = top[np.lexsort((top, -flat[top]))]
            live = 0
            for f in top:
                score = float(flat[f])
                if score == -np.inf:
                    break
                parent, tok = rows[f // cand.shape[1]], int(f % cand.shape[1])
                toks = row_tokens[parent]
                if tok == eos:
                    if len(finished[it]) < beam:
                        finished[it].append(Hypothesis(toks, score, _normalised(score, len(toks) + 1,
                                                                                 o.length_penalty), True))
                    continue
                if live < beam and t + 1 < o.max_length:
                    new_item.append(it)
                    new_tokens.append(toks + (tok,))
                    new_score.append(score)
                    parents.append(parent)
                    next_tok.append(tok)
                    live += 1
                elif live < beam:  # the last allowed token: the hypothesis ends here, cut
                    finished[it].append(Hypothesis(toks + (tok,), score, _normalised(score, len(toks) + 1,
                                                                                     o.length_penalty), False))
                    live += 1
                if live >= beam:
                    break
        keep = [j for j, it in enumerate(new_item) if len(finished[it]) < beam]
        if not keep:
            break
        row_item = [new_item[j] for j in keep]
        row_tokens = [new_tokens[j] for j in keep]
        row_score = [new_score[j] for j in keep]
        logp, state = model.step(state, np.array([parents[j] for j in keep], dtype=np.int64),
                                 np.array([next_tok[j] for j in keep], dtype=np.int64))
    results = []
    for it in range(n_items):
        hyps = finished[it]
        if not hyps:  # every continuation was banned: an empty, unended hypothesis
            hyps = [Hypothesis((), 0.0, 0.0, False)]
        best = max(range(len(hyps)), key=lambda j: (hyps[j].score, -j))
        results.append(hyps[best])
    return results
