"""Captions of a :class:`~hbi_training.data.scenes.Scene` from a small grammar, with paraphrases for training.

One clause per event, e.g. ``a red square moves left`` / ``a blue circle appears`` / ``a green cross turns
yellow``, joined in time order: the canonical caption is ``"<clause>, then <clause>[, then <clause>]"``.
Paraphrases vary

* the article (``a`` / ``the``) and the verb (``moves`` / ``slides``, ``appears`` / ``shows up``,
  ``disappears`` / ``vanishes``, ``turns`` / ``becomes`` / ``changes to``, ``left`` / ``to the left``);
* the joining: ``, then`` / ``, and then`` / ``first ..., then ..., and finally ...`` / ``after A, B[, then C]``
  (a word-order variant: the second event is named after the first, not before).

Every word of every variant is in CLIP's vocabulary (one BPE token each, except ``vanishes``: two); the longest
caption is under 32 tokens with SOT and EOT (``MAX_WORDS``).
"""

from __future__ import annotations

import numpy as np

from hbi_training.data.scenes import MOVES, Event, Scene

MAX_WORDS = 32  # a max_words that fits every caption of the grammar (tests check it)
JOINS = ("then", "and then", "first", "after")
ARTICLES = ("a", "the")
VERBS = {
    "move": ("moves", "slides"),
    "appear": ("appears", "shows up"),
    "disappear": ("disappears", "vanishes"),
    "turn": ("turns", "becomes", "changes to"),
}
PARAPHRASE_TRIES = 50  # random draws per wanted paraphrase before settling for fewer


def clause(scene: Scene, event: Event, article: str = "a", verb: int = 0, long_direction: bool = False) -> str:
    """One event as words: ``<article> <colour> <shape> <verb phrase>``.

    Args:
        article: ``a`` or ``the``.
        verb: which synonym of the action's verb (wraps around).
        long_direction: ``to the left`` instead of ``left`` (left / right only).
    """
    obj = scene.objects[event.obj]
    kind = "move" if event.action in MOVES else event.action
    synonyms = VERBS[kind]
    phrase = synonyms[verb % len(synonyms)]
    if kind == "move":
        direction = event.action
        if long_direction and direction in ("left", "right"):
            direction = f"to the {direction}"
        phrase = f"{phrase} {direction}"
    elif kind == "turn":
        phrase = f"{phrase} {event.colour_to}"
    return f"{article} {obj.colour} {obj.shape} {phrase}"


def join(clauses: list[str], how: str = "then") -> str:
    """Clauses in time order as one caption, joined as ``how`` (one of JOINS) says."""
    if len(clauses) == 1:
        return clauses[0]
    if how == "then":
        return ", then ".join(clauses)
    if how == "and then":
        return ", and then ".join(clauses)
    if how == "first":
        middle = "".join(f", then {c}" for c in clauses[1:-1])
        last = f", and finally {clauses[-1]}" if len(clauses) > 2 else f", then {clauses[-1]}"
        return f"first {clauses[0]}{middle}{last}"
    if how == "after":
        rest = "".join(f", then {c}" for c in clauses[2:])
        return f"after {clauses[0]}, {clauses[1]}{rest}"
    raise ValueError(f"join: how must be one of {JOINS}, got {how!r}")


def canonical_caption(scene: Scene) -> str:
    """The one caption a test query uses: ``a <colour> <shape> <verb> ...``, joined with ``, then``."""
    return join([clause(scene, e) for e in scene.events], "then")


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One paraphrase, every choice drawn from ``rng``."""
    clauses = [clause(scene, e, article=ARTICLES[int(rng.integers(2))], verb=int(rng.integers(6)),
                      long_direction=bool(rng.integers(2))) for e in scene.events]
    return join(clauses, JOINS[int(rng.integers(len(JOINS)))])


def paraphrases(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """Up to ``n`` distinct captions of ``scene``: the canonical one first, then random paraphrases."""
    captions = [canonical_caption(scene)]
    for _ in range(PARAPHRASE_TRIES * n):
        if len(captions) >= n:
            break
        caption = random_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
    return captions[:n]
