"""Agreement metrics for cellularity scores (Rakhlin et al. 2019, section 3.5; BreastPathQ).

All functions take ``y_true`` and ``y_pred``: 1-D arrays of N cellularity scores in [0, 1]
(any float dtype; converted to float64), one per patch, in the same order.

- :func:`mse` and :func:`mse_ci`: mean squared error with a percentile bootstrap 95% CI
  (patches resampled with replacement), as in the paper's Table 2.
- :func:`cohen_kappa`: Cohen's kappa after binning both scores into the 4 clinical classes
  0-25 %, 26-50 %, 51-75 %, 76-100 % (right-closed: (0.25, 0.5] is the second bin), unweighted
  by default as in Peikari et al. 2017 and the paper's Table 3.
- :func:`icc`: intraclass correlation between the two "raters" (reference and prediction) over
  the N patches. Default ICC(2,1) of Shrout & Fleiss 1979 (two-way random effects, absolute
  agreement, single rater; McGraw & Wong's ICC(A,1)), which penalises a systematic bias, with the
  F-distribution 95% CI of McGraw & Wong 1996 (Satterthwaite degrees of freedom). ICC(3,1)
  (consistency, bias ignored) is available with ``kind="3,1"``.
- :func:`prediction_probability`: PK of Smith, Dutton & Smith 1996, BreastPathQ's main metric:
  over all pairs of patches whose reference scores differ, the probability that the predictions
  order them the same way, a tie in prediction counting one half:
  PK = (C + T/2) / (C + D + T) = (1 + Somers' d(pred | true)) / 2. Computed in O(N log N) from
  ``scipy.stats.kendalltau`` (tau-b) and the tie counts, since ``scipy.stats.somersd`` builds a
  dense contingency table and takes minutes for a few thousand continuous scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import stats

KAPPA_EDGES: tuple[float, ...] = (0.25, 0.5, 0.75)  # 0-25 %, 26-50 %, 51-75 %, 76-100 %


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values, y_pred {p.size}")
    if t.size == 0:
        raise ValueError("no scores")
    return t, p


# ------------------------------------------------------------------------------------------- MSE


def mse(y_true, y_pred) -> float:
    """Mean squared error (float)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean((t - p) ** 2))


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true, y_pred, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``(lower, upper)`` of ``metric(y_true, y_pred)`` over resampled patches.

    ``n_boot`` resamples of N patches with replacement (numpy Generator seeded with ``seed``);
    resamples where the metric is NaN (e.g. kappa of a single class) are left out.
    """
    t, p = _pair(y_true, y_pred)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, t.size, t.size)
        vals[b] = metric(t[i], p[i])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mse_ci(y_true, y_pred, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """``(mse, lower, upper)``: MSE and its percentile bootstrap CI (95% for ``alpha=0.05``).

    Vectorised: the squared errors are resampled in blocks, so 2000 resamples of a few thousand
    patches take milliseconds.
    """
    t, p = _pair(y_true, y_pred)
    se = (t - p) ** 2
    rng = np.random.default_rng(seed)
    n = se.size
    means = np.empty(n_boot)
    block = max(1, 2_000_000 // n)
    for s in range(0, n_boot, block):
        e = min(n_boot, s + block)
        means[s:e] = se[rng.integers(0, n, (e - s, n))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(se.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------------------- kappa


def cellularity_bins(y, edges: tuple[float, ...] = KAPPA_EDGES) -> np.ndarray:
    """Class index 0..3 of each score in [0, 1]: (.., 0.25] -> 0, (0.25, 0.5] -> 1,
    (0.5, 0.75] -> 2, (0.75, ..) -> 3. Returns int64 of the input's shape."""
    return np.digitize(np.asarray(y, dtype=np.float64), edges, right=True).astype(np.int64)


def cohen_kappa(y_true, y_pred, weights: str | None = None, binned: bool = False) -> float:
    """Cohen's kappa of the 4-class binned scores.

    ``binned=True`` takes class indices 0..3 as given instead of binning scores. ``weights``:
    None (unweighted, the paper's), ``"linear"`` or ``"quadratic"``. Returns NaN when the
    expected disagreement is zero (both raters put everything in one and the same class).
    """
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true has {t.size} values, y_pred {p.size}")
    if not binned:
        t, p = cellularity_bins(t), cellularity_bins(p)
    k = len(KAPPA_EDGES) + 1
    t, p = t.astype(np.int64), p.astype(np.int64)
    if t.min() < 0 or p.min() < 0 or t.max() >= k or p.max() >= k:
        raise ValueError(f"class indices must lie in 0..{k - 1}")
    obs = np.bincount(t * k + p, minlength=k * k).reshape(k, k) / t.size
    exp = np.outer(obs.sum(axis=1), obs.sum(axis=0))
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    den = float((w * exp).sum())
    if den == 0:
        return float("nan")
    return 1.0 - float((w * obs).sum()) / den


# ------------------------------------------------------------------------------------------- ICC


@dataclass(frozen=True)
class ICCResult:
    """An intraclass correlation with its F-based CI and the F test of ICC = 0."""

    kind: str  # "2,1" (absolute agreement) or "3,1" (consistency)
    value: float
    lower: float
    upper: float
    F: float  # MSR / MSE
    df1: int
    df2: int
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def icc_matrix(ratings, kind: str = "2,1", alpha: float = 0.05) -> ICCResult:
    """ICC of an (n targets, k raters) matrix (two-way ANOVA, Shrout & Fleiss 1979).

    With MSR (targets), MSC (raters), MSE (residual) mean squares:
    ICC(3,1) = (MSR - MSE) / (MSR + (k-1) MSE), CI from F = MSR/MSE on (n-1, (n-1)(k-1)) df;
    ICC(2,1) = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n), CI from McGraw & Wong 1996
    (their ICC(A,1) interval with Satterthwaite df). Returns an :class:`ICCResult`.
    """
    y = np.asarray(ratings, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"ratings must be (n >= 2 targets, k >= 2 raters), got {y.shape}")
    if kind not in ("2,1", "3,1"):
        raise ValueError(f"kind must be '2,1' or '3,1', got {kind!r}")
    n, k = y.shape
    gm = y.mean()
    ssr = k * ((y.mean(axis=1) - gm) ** 2).sum()
    ssc = n * ((y.mean(axis=0) - gm) ** 2).sum()
    sse = ((y - gm) ** 2).sum() - ssr - ssc
    df1, df2 = n - 1, (n - 1) * (k - 1)
    msr, msc, mse_ = ssr / df1, ssc / (k - 1), max(sse, 0.0) / df2
    q = 1 - alpha / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        f = msr / mse_ if mse_ > 0 else float("inf")
        p_value = float(stats.f.sf(f, df1, df2)) if np.isfinite(f) else 0.0
        if kind == "3,1":
            value = (msr - mse_) / (msr + (k - 1) * mse_)
            if mse_ == 0:
                lower = upper = value
            else:
                fl = f / stats.f.ppf(q, df1, df2)
                fu = f * stats.f.ppf(q, df2, df1)
                lower = (fl - 1) / (fl + k - 1)
                upper = (fu - 1) / (fu + k - 1)
        else:
            value = (msr - mse_) / (msr + (k - 1) * mse_ + k * (msc - mse_) / n)
            if mse_ == 0:
                lower = upper = value
            else:
                fj = msc / mse_
                kr = k * value
                b = n * (1 + (k - 1) * value) - kr
                v = (k - 1) * (n - 1) * (kr * fj + b) ** 2 / ((n - 1) * (kr * fj) ** 2 + b**2)
                fl = stats.f.ppf(q, n - 1, v)
                fu = stats.f.ppf(q, v, n - 1)
                c = k * msc + (k * n - k - n) * mse_
                lower = n * (msr - fl * mse_) / (fl * c + n * msr)
                upper = n * (fu * msr - mse_) / (c + n * fu * msr)
    return ICCResult(kind, float(value), float(lower), float(upper), float(f), int(df1), int(df2), p_value)


def icc(y_true, y_pred, kind: str = "2,1", alpha: float = 0.05) -> ICCResult:
    """ICC between reference and prediction (N patches x 2 raters); see :func:`icc_matrix`."""
    t, p = _pair(y_true, y_pred)
    return icc_matrix(np.stack([t, p], axis=1), kind=kind, alpha=alpha)


# -------------------------------------------------------------------------------------------- PK


def _tied_pairs(x: np.ndarray) -> int:
    _, counts = np.unique(x, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def prediction_probability(y_true, y_pred) -> float:
    """PK (Smith et al. 1996) of predictions against reference scores, in [0, 1].

    Pairs with equal reference scores are ignored; of the others, C are ordered the same way by
    the prediction, D the opposite way and T tied in prediction: PK = (C + T/2) / (C + D + T).
    1 = perfect ordering, 0.5 = chance (or constant predictions), 0 = reversed. NaN when all
    reference scores are equal. O(N log N).
    """
    t, p = _pair(y_true, y_pred)
    n0 = t.size * (t.size - 1) // 2
    untied_t = n0 - _tied_pairs(t)  # C + D + T
    if untied_t == 0:
        return float("nan")
    untied_p = n0 - _tied_pairs(p)
    if untied_p == 0:
        return 0.5
    tau_b = stats.kendalltau(t, p, variant="b").statistic  # (C - D) / sqrt(untied_t * untied_p)
    c_minus_d = round(tau_b * np.sqrt(float(untied_t) * float(untied_p)))  # an integer count
    return float(0.5 * (1.0 + c_minus_d / untied_t))


# ------------------------------------------------------------------------------------ everything


def evaluate(y_true, y_pred, n_boot: int = 2000, seed: int = 0) -> dict:
    """All the paper's metrics in one dict (JSON-ready floats).

    Keys: ``n``, ``mse``, ``mse_ci`` [lo, hi], ``kappa``, ``kappa_ci`` (bootstrap), ``icc``
    (ICC(2,1)), ``icc_ci`` (F-based), ``icc31``, ``pk``. With one patch only ``n`` and ``mse``
    are numbers (its squared error); agreement over patches (kappa, ICC, PK, the intervals) needs
    two or more, and is None.
    """
    t, p = _pair(y_true, y_pred)
    if t.size < 2:
        m = mse(t, p)
        return {"n": int(t.size), "mse": m, "mse_ci": [None, None], "kappa": None, "kappa_ci": [None, None],
                "icc": None, "icc_ci": [None, None], "icc31": None, "pk": None}
    m, lo, hi = mse_ci(t, p, n_boot=n_boot, seed=seed)
    i21 = icc(t, p, "2,1")
    return {
        "n": int(t.size),
        "mse": m,
        "mse_ci": [lo, hi],
        "kappa": cohen_kappa(t, p),
        "kappa_ci": list(bootstrap_ci(cohen_kappa, t, p, n_boot=n_boot, seed=seed)),
        "icc": i21.value,
        "icc_ci": [i21.lower, i21.upper],
        "icc31": icc(t, p, "3,1").value,
        "pk": prediction_probability(t, p),
    }
