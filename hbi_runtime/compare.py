"""Parity metrics: how close a tested output (ONNX Runtime, TensorRT, fp16) is to a reference (PyTorch, fp32).

numpy only. Every metric is computed in float64. Two kinds of comparison:

- :func:`compare_tensors` for features (any output): max / mean absolute difference, max relative difference,
  global cosine and the worst per-row cosine.
- :func:`compare_scores` for score matrices ``[text_batch, video_batch]``: the same plus ranking agreement in both
  directions, text->video (rows) and video->text (columns): top-1 agreement, top-k overlap, Spearman.

:data:`TOLERANCES` is the tolerance table of the design (one table for every parity check) as data;
:func:`evaluate` turns comparisons and a tolerance into a :class:`ParityResult` of pass/fail checks, which
:func:`render_table` prints and :meth:`ParityResult.to_dict` serialises (non-finite numbers become ``null``).
A non-finite value anywhere in the reference or the tested output is a failure under every tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, GateFailedError, UsageError

# max_rel = |test - ref| / max(|ref|, eps) with eps = REL_EPS_SCALE * max|ref| (floored at REL_EPS_MIN): entries
# far below the tensor's own scale (a score near 0, a padded token) are measured against that scale instead of
# exploding; for entries at the tensor's scale this is the plain relative difference.
REL_EPS_SCALE = 1e-3
REL_EPS_MIN = 1e-12
# top-1 agreement: the tested argmax agrees when the reference's value there is within TIE_ATOL of the
# reference's maximum (an exact or fp32-rounding tie in the reference can go either way).
TIE_ATOL = 1e-7


# ----------------------------------------------------------------------------------------------------------------
# Comparisons


@dataclass(frozen=True, kw_only=True)
class TensorComparison:
    """Reference vs tested values of one output. Float metrics are NaN when ``failure`` is set (non-finite input).

    Attributes:
        name: the output's name.
        shape: the common shape.
        ref_dtype, test_dtype: numpy dtype names (fp32 vs fp16 is allowed).
        max_abs, mean_abs: of ``test - ref``.
        max_rel: ``max |test - ref| / max(|ref|, eps)``, eps as described at REL_EPS_SCALE.
        cosine: cosine similarity of the flattened tensors (1.0 when both are all zeros, 0.0 when one is).
        cosine_min: the lowest per-row cosine, rows = first axis, the rest flattened; None when ndim < 2.
        ref_nonfinite, test_nonfinite: counts of NaN / inf values.
        failure: why the comparison failed regardless of tolerance (non-finite values), else None.
    """

    name: str
    shape: tuple[int, ...]
    ref_dtype: str
    test_dtype: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    cosine_min: float | None
    ref_nonfinite: int = 0
    test_nonfinite: int = 0
    failure: str | None = None

    @property
    def worst_cosine(self) -> float:
        """The per-row minimum where rows exist, else the global cosine."""
        return self.cosine if self.cosine_min is None else self.cosine_min

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": "tensor", "shape": list(self.shape), "ref_dtype": self.ref_dtype,
                "test_dtype": self.test_dtype, "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
                "mean_abs": _num(self.mean_abs), "cosine": _num(self.cosine), "cosine_min": _num(self.cosine_min),
                "ref_nonfinite": self.ref_nonfinite, "test_nonfinite": self.test_nonfinite,
                "failure": self.failure}


@dataclass(frozen=True)
class RankAgreement:
    """Ranking agreement of one direction, averaged over its rows (each value in [0, 1]; Spearman in [-1, 1])."""

    top1: float
    topk: dict[int, float]  # k -> mean |top-k(ref) & top-k(test)| / k, k clipped to the number of candidates
    spearman: float

    def to_dict(self) -> dict:
        return {"top1": _num(self.top1), "topk": {str(k): _num(v) for k, v in self.topk.items()},
                "spearman": _num(self.spearman)}


@dataclass(frozen=True, kw_only=True)
class ScoreComparison(TensorComparison):
    """A score matrix ``[text_batch, video_batch]``: tensor metrics plus ranking agreement per direction."""

    t2v: RankAgreement  # rows: for each text, the ranking of the videos
    v2t: RankAgreement  # columns: for each video, the ranking of the texts

    def to_dict(self) -> dict:
        return {**super().to_dict(), "kind": "scores", "t2v": self.t2v.to_dict(), "v2t": self.v2t.to_dict()}


def _num(x: float | None) -> float | None:
    """JSON-ready number: NaN / inf become None (strict JSON has no such values)."""
    return None if x is None or not math.isfinite(x) else float(x)


def _as_pair(name: str, ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise BadInputError(f"output {name} | Received incompatible shapes: reference {ref.shape}, tested "
                            f"{test.shape}. Note: Expected equal shapes")
    kinds = {ref.dtype.kind, test.dtype.kind}
    numeric = kinds <= set("biuf")
    if not numeric or (len(kinds) > 1 and "f" in kinds):  # fp16 vs fp32 is the point; float vs int is a bug
        raise BadInputError(f"output {name} | Received incompatible dtypes: reference {ref.dtype}, tested "
                            f"{test.dtype}. Note: Expected the same kind of numbers (floating precisions may differ)")
    return ref, test


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row of 2-D float64 arrays; 1.0 where both rows are zero, 0.0 where exactly one is."""
    dot = np.einsum("ij,ij->i", a, b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero, one_zero = (na == 0) & (nb == 0), (na == 0) ^ (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    return np.clip(np.where(both_zero, 1.0, np.where(one_zero, 0.0, cos)), -1.0, 1.0)


def _tensor_fields(name: str, ref: np.ndarray, test: np.ndarray) -> dict:
    r, t = ref.astype(np.float64), test.astype(np.float64)
    bad_r, bad_t = int(np.size(r) - np.isfinite(r).sum()), int(np.size(t) - np.isfinite(t).sum())
    common = {"name": name, "shape": tuple(ref.shape), "ref_dtype": str(ref.dtype), "test_dtype": str(test.dtype),
              "ref_nonfinite": bad_r, "test_nonfinite": bad_t, "failure": None}
    if bad_r or bad_t:
        nan = float("nan")
        failure = f"non-finite values: {bad_r} in the reference, {bad_t} in the tested output"
        return {**common, "max_abs": nan, "max_rel": nan, "mean_abs": nan, "cosine": nan,
                "cosine_min": nan if r.ndim >= 2 else None, "failure": failure}
    diff = np.abs(t - r)
    scale = float(np.abs(r).max()) if r.size else 0.0
    eps = max(REL_EPS_SCALE * scale, REL_EPS_MIN)
    rows = r.reshape(r.shape[0], -1) if r.ndim >= 2 else None
    return {**common, "max_abs": float(diff.max()) if r.size else 0.0,
            "max_rel": float((diff / np.maximum(np.abs(r), eps)).max()) if r.size else 0.0,
            "mean_abs": float(diff.mean()) if r.size else 0.0,
            "cosine": float(_cosine_rows(r.reshape(1, -1), t.reshape(1, -1))[0]),
            "cosine_min": (float(_cosine_rows(rows, t.reshape(t.shape[0], -1)).min())
                           if rows is not None and rows.shape[0] else None)}


def compare_tensors(name: str, ref: np.ndarray, test: np.ndarray) -> TensorComparison:
    """Compare one output (features, tokens, weights, ...).

    Raises:
        BadInputError: the shapes differ, or the dtypes are of different kinds (float vs int / bool).
    """
    ref, test = _as_pair(name, ref, test)
    return TensorComparison(**_tensor_fields(name, ref, test))


# ----------------------------------------------------------------------------------------------------------------
# Ranking metrics (rows of 2-D float64 arrays)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along axis 1, tied values sharing their average rank (scipy.stats.rankdata 'average')."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    idx = np.broadcast_to(np.arange(n), x.shape)
    starts = np.ones(x.shape, dtype=bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]  # a new group of equal values begins here
    ends = np.ones(x.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def spearman_rows(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row (average ranks for ties).

    A row where both sides are constant (including a single column) scores 1.0; a row where exactly one side
    is constant scores 0.0 (the correlation is undefined and the rankings clearly differ).
    """
    rr, rt = _average_ranks(ref), _average_ranks(test)
    rr -= rr.mean(axis=1, keepdims=True)
    rt -= rt.mean(axis=1, keepdims=True)
    ss_r, ss_t = (rr * rr).sum(axis=1), (rt * rt).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rr * rt).sum(axis=1) / np.sqrt(ss_r * ss_t)
    const_r, const_t = ss_r == 0, ss_t == 0
    return np.clip(np.where(const_r & const_t, 1.0, np.where(const_r | const_t, 0.0, rho)), -1.0, 1.0)


def top1_agreement_rows(ref: np.ndarray, test: np.ndarray, atol: float = TIE_ATOL) -> np.ndarray:
    """1.0 per row where the tested argmax is one of the reference's maxima (within ``atol``), else 0.0."""
    picked = np.take_along_axis(ref, np.argmax(test, axis=1)[:, None], axis=1)[:, 0]
    return (picked >= ref.max(axis=1) - atol).astype(np.float64)


def topk_overlap_rows(ref: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Per row, ``|top-k(ref) & top-k(test)| / k`` with k clipped to the number of columns (ties: lower index)."""
    k = min(k, ref.shape[1])
    top_r = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_t = np.argsort(-test, axis=1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_t[:, None, :]).any(axis=2).sum(axis=1)
    return hits / k


def _rank_agreement(ref: np.ndarray, test: np.ndarray, ks: Sequence[int]) -> RankAgreement:
    return RankAgreement(top1=float(top1_agreement_rows(ref, test).mean()),
                         topk={k: float(topk_overlap_rows(ref, test, k).mean()) for k in ks},
                         spearman=float(spearman_rows(ref, test).mean()))


def compare_scores(name: str, ref: np.ndarray, test: np.ndarray, ks: Sequence[int] = (1, 5)) -> ScoreComparison:
    """Compare a score matrix ``[text_batch, video_batch]``: tensor metrics plus ranking agreement per direction.

    Raises:
        BadInputError: shapes / dtypes as :func:`compare_tensors`, not 2-D, empty, or not floating.
        UsageError: a k in ``ks`` is not a positive integer.
    """
    ref, test = _as_pair(name, ref, test)
    if ref.ndim != 2 or 0 in ref.shape or ref.dtype.kind != "f":
        raise BadInputError(f"output {name} | Received shape {ref.shape} dtype {ref.dtype}. Note: Expected a "
                            f"non-empty floating score matrix (text_batch, video_batch)")
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise UsageError(f"ks must be positive integers, got {list(ks)}")
    fields = _tensor_fields(name, ref, test)
    if fields["failure"] is not None:
        nan = float("nan")
        undefined = RankAgreement(top1=nan, topk={int(k): nan for k in ks}, spearman=nan)
        return ScoreComparison(**fields, t2v=undefined, v2t=undefined)
    r, t = ref.astype(np.float64), test.astype(np.float64)
    ks = [int(k) for k in ks]
    return ScoreComparison(**fields, t2v=_rank_agreement(r, t, ks), v2t=_rank_agreement(r.T, t.T, ks))


# ----------------------------------------------------------------------------------------------------------------
# Tolerances and evaluation


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """One row of the tolerance table. A criterion left None is not checked.

    max_abs applies to every output; cosine (the worst per-row cosine) to features only; top1, top5 and spearman
    to score matrices, in both directions (text->video and video->text).
    """

    name: str
    description: str = ""
    max_abs: float | None = None
    cosine: float | None = None
    top1: float | None = None
    top5: float | None = None
    spearman: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "max_abs": self.max_abs,
                "cosine": self.cosine, "top1": self.top1, "top5": self.top5, "spearman": self.spearman}


# The tolerance table (docs/architecture.md, "ONNX export and the model package"; engines: docs/tensorrt.md, "Engine
# parity"). INT8's R@1 criterion needs captions and lives in the calibration gate (docs/calibration.md, "The accuracy
# gate"); without captions it is the top-1 agreement below.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(name="fp32", description="ONNX Runtime vs PyTorch, fp32", max_abs=1e-4, top1=1.0),
    "fp16": Tolerance(name="fp16", description="fp16 (ONNX Runtime or TensorRT) vs fp32", cosine=0.999,
                      top5=0.99, spearman=0.99),
    "int8": Tolerance(name="int8", description="INT8 vs fp32, without captions", top1=0.95),
    "custom_op": Tolerance(name="custom_op", description="custom-op implementations against each other, fp32",
                           max_abs=1e-5),
    "reference": Tolerance(name="reference", description="our PyTorch model vs the official code, fp32",
                           max_abs=1e-5),
}


@dataclass(frozen=True)
class Check:
    """One criterion applied to one output."""

    output: str
    metric: str  # "finite", "max_abs", "cosine", "top1[t2v]", "top5[v2t]", "spearman[t2v]", ...
    value: float
    op: str  # "<=" or ">=" ("==" for finite: value is the count of non-finite values, threshold 0)
    threshold: float
    passed: bool

    def line(self) -> str:
        """``PASS scores top1[t2v] = 1 (needs >= 1)``."""
        return (f"{'PASS' if self.passed else 'FAIL'} {self.output} {self.metric} = {self.value:.6g} (needs "
                f"{self.op} {self.threshold:.6g})")

    def to_dict(self) -> dict:
        return {"output": self.output, "metric": self.metric, "value": _num(self.value), "op": self.op,
                "threshold": self.threshold, "passed": self.passed}


@dataclass(frozen=True)
class ParityResult:
    """The outcome of :func:`evaluate`: every check, and ``ok`` when all of them passed."""

    tolerance: Tolerance
    comparisons: tuple[TensorComparison, ...]
    checks: tuple[Check, ...]
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", all(c.passed for c in self.checks))

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def output_ok(self, output: str) -> bool:
        return all(c.passed for c in self.checks if c.output == output)

    def lines(self) -> list[str]:
        """One PASS / FAIL line per check."""
        return [c.line() for c in self.checks]

    def to_dict(self) -> dict:
        """JSON-ready (non-finite numbers as null); what ``update_status`` stores as the manifest's ``parity``."""
        return {"ok": self.ok, "tolerance": self.tolerance.to_dict(),
                "outputs": [c.to_dict() for c in self.comparisons], "checks": [c.to_dict() for c in self.checks]}

    def raise_if_failed(self, hint: str | None = None) -> None:
        """Raise GateFailedError (exit 5) listing the failed checks when not ``ok``."""
        if not self.ok:
            failed = "; ".join(c.line() for c in self.failures)
            raise GateFailedError(f"parity check '{self.tolerance.name}' failed: {failed}", hint=hint)


def _le(output: str, metric: str, value: float, limit: float) -> Check:
    return Check(output, metric, value, "<=", limit, bool(value <= limit))  # NaN fails


def _ge(output: str, metric: str, value: float, limit: float) -> Check:
    return Check(output, metric, value, ">=", limit, bool(value >= limit))


def _checks_for(c: TensorComparison, tol: Tolerance) -> list[Check]:
    checks = [Check(c.name, "finite", float(c.ref_nonfinite + c.test_nonfinite), "==", 0.0, c.failure is None)]
    if tol.max_abs is not None:
        checks.append(_le(c.name, "max_abs", c.max_abs, tol.max_abs))
    if not isinstance(c, ScoreComparison):
        if tol.cosine is not None:
            checks.append(_ge(c.name, "cosine", c.worst_cosine, tol.cosine))
        return checks
    for direction in ("t2v", "v2t"):
        agreement: RankAgreement = getattr(c, direction)
        if tol.top1 is not None:
            checks.append(_ge(c.name, f"top1[{direction}]", agreement.top1, tol.top1))
        if tol.top5 is not None:
            if 5 not in agreement.topk:
                raise UsageError(f"tolerance '{tol.name}' checks top-5 but {c.name} was compared with ks="
                                 f"{sorted(agreement.topk)}; include 5 in compare_scores(ks=...)")
            checks.append(_ge(c.name, f"top5[{direction}]", agreement.topk[5], tol.top5))
        if tol.spearman is not None:
            checks.append(_ge(c.name, f"spearman[{direction}]", agreement.spearman, tol.spearman))
    return checks


def evaluate(comparisons: Sequence[TensorComparison], tolerance: Tolerance | str) -> ParityResult:
    """Apply a tolerance (or the name of a row of TOLERANCES) to comparisons.

    Every output gets a ``finite`` check; the tolerance adds its criteria (see :class:`Tolerance`).

    Raises:
        UsageError: no comparisons, duplicate output names, an unknown tolerance name, or a top-5 criterion
            for a score comparison made without k = 5.
    """
    if isinstance(tolerance, str):
        if tolerance not in TOLERANCES:
            raise UsageError(f"unknown tolerance {tolerance!r}; known: {sorted(TOLERANCES)}")
        tolerance = TOLERANCES[tolerance]
    comparisons = tuple(comparisons)
    if not comparisons:
        raise UsageError("nothing to evaluate: no comparisons given (a gate over no outputs cannot pass)")
    names = [c.name for c in comparisons]
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate output names in comparisons: {names}")
    checks = tuple(check for c in comparisons for check in _checks_for(c, tolerance))
    return ParityResult(tolerance, comparisons, checks)


# ----------------------------------------------------------------------------------------------------------------
# Rendering

_COLUMNS = (("output", 24, "<"), ("max abs", 9, ">"), ("max rel", 9, ">"), ("cosine", 9, ">"), ("top1", 7, ">"),
            ("top5", 7, ">"), ("spearman", 9, ">"), ("result", 6, ">"))


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    return "nan" if math.isnan(x) else format(x, spec)


def _row(c: TensorComparison, ok: bool) -> list[str]:
    ranks = (c.t2v, c.v2t) if isinstance(c, ScoreComparison) else ()
    worst = lambda get: min((get(a) for a in ranks), default=None)  # noqa: E731 - worse of the two directions
    top5 = worst(lambda a: a.topk.get(5)) if all(5 in a.topk for a in ranks) else None
    return [c.name, _fmt(c.max_abs, ".2e"), _fmt(c.max_rel, ".2e"), _fmt(c.worst_cosine, ".6f"),
            _fmt(worst(lambda a: a.top1), ".4f"), _fmt(top5, ".4f"), _fmt(worst(lambda a: a.spearman), ".4f"),
            "PASS" if ok else "FAIL"]


def render_table(result: ParityResult) -> str:
    """A fixed-width table, one row per output (ranking columns: the worse of text->video and video->text;
    cosine: the worst row), then the failed checks, then the verdict."""
    def line(cells: list[str]) -> str:
        return "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLUMNS)).rstrip()

    out = [f"parity: {result.tolerance.name} ({result.tolerance.description})" if result.tolerance.description
           else f"parity: {result.tolerance.name}",
           line([name for name, _, _ in _COLUMNS]), line(["-" * width for _, width, _ in _COLUMNS])]
    out += [line(_row(c, result.output_ok(c.name))) for c in result.comparisons]
    out += [f"  {check.line()}" for check in result.failures]
    out.append("overall: PASS" if result.ok else f"overall: FAIL ({len(result.failures)} of {len(result.checks)} "
                                                 f"checks failed)")
    return "\n".join(out)
