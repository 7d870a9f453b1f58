"""Caption metrics in pure Python / numpy (our implementations of the published definitions).

Tokenisation (all metrics): lower case, words = runs of letters / digits / apostrophes (punctuation dropped,
as the COCO evaluation's PTB tokenizer does for these captions).

* **BLEU-4** (Papineni et al. 2002), corpus level: modified n-gram precisions p_1..p_4 with each candidate
  n-gram count clipped by its maximum count in any one reference, summed over the corpus; brevity penalty
  ``BP = 1 if c > r else exp(1 - r / c)`` with ``c`` the total candidate length and ``r`` the sum over
  candidates of the reference length closest to the candidate's (shorter wins ties);
  ``BLEU = BP * exp(mean(log p_n))`` (0 when any p_n is 0; no smoothing).
* **ROUGE-L** (Lin 2004) as in the COCO evaluation: per candidate, ``P = max_r LCS / len(cand)``,
  ``R = max_r LCS / len(ref)``, ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; averaged over candidates.
* **CIDEr-D** (Vedantam et al. 2015): n = 1..4; each sentence is a vector of TF-IDF weights
  ``count(g) * log(N / max(1, df(g)))`` (``df`` = the number of items whose references contain ``g``, ``N`` =
  the number of items); per reference ``sum_g min(c_g, r_g) * r_g / (|c| |r|) * exp(-(len_c - len_r)^2 /
  (2 * 6^2))`` (lengths in words); averaged over references, then over n, times 10; the corpus score is the
  mean over items.
* **METEOR** needs WordNet synonyms and the reference Java implementation; neither is available offline here,
  so it is not computed (reported as ``null`` with the reason).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9']+")
METEOR_UNAVAILABLE = "METEOR needs WordNet and the reference Java scorer, which cannot run offline here"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (module docstring)."""
    _check(candidates, references)
    matched, total = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, refs in zip(candidates, references):
        c = words(cand)
        rs = [words(r) for r in refs]
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(c, n)
            best: Counter = Counter()
            for r in rs:
                best |= ngrams(r, n)
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    if c_len == 0 or any(m == 0 for m in matched):
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)


def lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F over candidates (module docstring)."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c = words(cand)
        p = r = 0.0
        for ref in refs:
            rw = words(ref)
            m = lcs(c, rw)
            p = max(p, m / len(c) if c else 0.0)
            r = max(r, m / len(rw) if rw else 0.0)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return sum(scores) / len(scores)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0,
            max_n: int = 4) -> float:
    """Mean CIDEr-D over items (module docstring)."""
    _check(candidates, references)
    cands = [words(c) for c in candidates]
    refs = [[words(r) for r in rs] for rs in references]
    n_items = len(cands)
    df: list[Counter] = [Counter() for _ in range(max_n)]
    for rs in refs:
        for n in range(1, max_n + 1):
            df[n - 1].update(set().union(*(ngrams(r, n).keys() for r in rs)))

    def vec(tokens, n):
        counts = ngrams(tokens, n)
        v = {g: k * math.log(n_items / max(1.0, df[n - 1][g])) for g, k in counts.items()}
        return v, math.sqrt(sum(x * x for x in v.values()))

    scores = []
    for c, rs in zip(cands, refs):
        per_n = []
        for n in range(1, max_n + 1):
            vc, nc = vec(c, n)
            sims = []
            for r in rs:
                vr, nr = vec(r, n)
                dot = sum(min(x, vr[g]) * vr[g] for g, x in vc.items() if g in vr)
                sim = dot / (nc * nr) if nc > 0 and nr > 0 else 0.0
                sims.append(sim * math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma**2)))
            per_n.append(sum(sims) / len(sims))
        scores.append(10.0 * sum(per_n) / max_n)
    return sum(scores) / n_items


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-4, ROUGE-L, CIDEr-D (and METEOR: null) of a corpus."""
    return {"bleu4": bleu(candidates, references), "rouge_l": rouge_l(candidates, references),
            "cider_d": cider_d(candidates, references), "meteor": None, "meteor_note": METEOR_UNAVAILABLE,
            "items": len(candidates)}


def _check(candidates, references) -> None:
    from hbi_runtime.errors import BadInputError

    if len(candidates) != len(references):
        raise BadInputError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not len(candidates):
        raise BadInputError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not len(refs):
            raise BadInputError(f"item {i}: references must be a non-empty list of strings")
