"""Segmentation metrics for nuclei: pixel scores on masks, object scores on instance maps.

Inputs
------
* a *mask* is a (H, W) array, bool or any number type; non-zero = nucleus;
* an *instance map* is a (H, W) array of non-negative integers (uint8..uint64, int32, ...);
  0 = background, every other value one nucleus. Labels need not be consecutive; a nucleus is
  the set of pixels with one label (it need not be connected).

Every object score starts from one sparse contingency table (:func:`overlap_table`): the pixel
counts of each (ground-truth nucleus, predicted nucleus) pair that intersects, counted with one
``np.unique`` over the pixels where both maps are foreground. No dense N x M matrix and no loop
over nuclei is built for AJI, PQ or the detection scores; only the optional Hungarian matching
below an IoU of 0.5 builds a dense matrix, over the pairs that can match.

Definitions (what :func:`instance_metrics` returns)
---------------------------------------------------
* **IoU** of two nuclei: |G n S| / |G u S| in pixels.
* **Matching at threshold t** (t >= 0.5): a pair matches when IoU > t (strictly greater, as in the
  Kaggle Data Science Bowl 2018 and HoVer-Net's ``get_fast_pq``). For t >= 0.5 each nucleus has at
  most one partner with IoU > t, so the matching is unique and needs no assignment solver.
  For t < 0.5 the pairs with IoU > t are matched one-to-one by maximum total IoU
  (``scipy.optimize.linear_sum_assignment``, as HoVer-Net does). TP = matched pairs,
  FP = unmatched predictions, FN = unmatched ground-truth nuclei.
* **precision@t, recall@t, f1@t** (seed 001, Table 2, at t = 0.5 and 0.7): TP/(TP+FP),
  TP/(TP+FN), 2TP/(2TP+FP+FN).
* **AJI** (Kumar et al. 2017, IEEE TMI; the MoNuSeg 2018 challenge code; seed 002, eqs. 4-5):
  each ground-truth nucleus G_i is paired with the predicted nucleus S_j of maximum IoU (ties: the
  lowest predicted label); C += |G_i n S_j|, U += |G_i u S_j|; a G_i that meets no prediction adds
  |G_i| to U; every predicted nucleus that was nobody's partner adds its area to U. AJI = C / U.
  A prediction may partner several ground-truth nuclei (then it counts in U once per partner),
  as in the challenge code and HoVer-Net's ``get_fast_aji``. Note: seed 002's prose (line 129)
  defines the added set N as "segmented objects with none intersection to ground truth"; the
  challenge code (which seed 002 points to, line 137) adds every
  *unpaired* prediction, also those that touch a nucleus without being its best match. We follow
  the code.
* **PQ** (Kirillov et al. 2019, for one class, as HoVer-Net's ``get_fast_pq`` with match_iou 0.5):
  DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matched pairs (0 when TP = 0), PQ = DQ x SQ.
* **mAP** (seed 001, line 80: "average precision over multiple IoU thresholds ... ten IoU thresholds
  starting at 0.5 and increasing linearly by 0.05 to 0.95"): the mean over t in
  {0.50, 0.55, ..., 0.95} of precision@t = TP/(TP+FP). Seed 001 gives no formula; its Table 2
  argues against the DSB form: TP/(TP+FP+FN) = 1/(1/P + 1/R - 1) falls with t, so taking the
  table's P and R at 0.5 and 0.7 as one pool of nuclei, its mean over the ten thresholds is at most
  0.173 for Fiji (line 102: P 0.5986/0.2481, R 0.3493/0.1447) and 0.359 for GB U-Net (line 113),
  below the reported mAP 0.2370 and 0.3909.
  The precision form fits those bounds, and interpolating between its values at 0.5 and 0.7 lands
  near every reported mAP (closer than the mean F1 does), so we read "average precision" literally.
  (An inference from the table, not a definition the seed states.)
* **mAP_dsb** (Kaggle Data Science Bowl 2018, the evaluation of seed 004, lines 170-176): the mean
  over the same ten thresholds of TP/(TP+FP+FN). Stricter than ``map`` (it also penalises misses).

Empty cases: when both maps are empty every score is 1.0 (nothing to find, nothing found); a
ratio 0/0 otherwise scores 0.0 (e.g. the precision of an empty prediction against real nuclei).

Scores are per image. For a data set, seed 002 (line 149: "the average of the 14 obtained
individual AJI") averages per-image scores (seed 001 does not say): :func:`mean_metrics` does that.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAP_THRESHOLDS",
    "Overlap",
    "aji",
    "detection_counts",
    "instance_metrics",
    "match",
    "mean_metrics",
    "overlap_table",
    "panoptic_quality",
    "pixel_metrics",
]

# IoU thresholds 0.50:0.05:0.95 (rounded so that 0.7 is exactly 0.7 for dictionary keys).
MAP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """num / den; 0/0 is 1.0 when both maps are empty, else 0.0."""
    if den > 0:
        return float(num) / float(den)
    return 1.0 if both_empty else 0.0


# ----------------------------------------------------------------------------------- pixels


def pixel_metrics(gt_mask: np.ndarray, pred_mask: np.ndarray) -> dict[str, float]:
    """Pixel scores of a predicted foreground mask against the ground truth.

    Args:
        gt_mask: (H, W) ground truth; non-zero = nucleus (a binary mask or an instance map).
        pred_mask: (H, W) prediction, same convention and shape.

    Returns:
        dict with the pixel counts ``tp, fp, fn, tn`` and ``jaccard`` = TP/(TP+FP+FN),
        ``dice`` (= ``f1``) = 2TP/(2TP+FP+FN), ``precision`` = TP/(TP+FP),
        ``recall`` = TP/(TP+FN), ``accuracy`` = (TP+TN)/(H*W). All floats.
    """
    g = np.asarray(gt_mask)
    p = np.asarray(pred_mask)
    if g.shape != p.shape:
        raise ValueError(f"pixel_metrics: shapes differ, gt {g.shape} vs pred {p.shape}")
    g = g != 0
    p = p != 0
    n = g.size
    tp = int(np.count_nonzero(g & p))
    ng, np_ = int(np.count_nonzero(g)), int(np.count_nonzero(p))
    fp, fn = np_ - tp, ng - tp
    tn = n - tp - fp - fn
    empty = ng == 0 and np_ == 0
    dice = _ratio(2 * tp, 2 * tp + fp + fn, empty)
    return {
        "tp": float(tp), "fp": float(fp), "fn": float(fn), "tn": float(tn),
        "jaccard": _ratio(tp, tp + fp + fn, empty),
        "dice": dice,
        "f1": dice,
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "accuracy": _ratio(tp + tn, n, True),
    }


# ------------------------------------------------------------------------ contingency table


def _relabel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the labels of an instance map to 0 (background) and 1..n in increasing order.

    Returns (index map (H*W,) int64, original labels (n,)). Uses a lookup table when the
    largest label is small compared with the image (one ``bincount``), else ``np.unique``.
    """
    flat = np.asarray(x).ravel()
    if flat.dtype.kind not in "iub":
        raise TypeError(f"instance map must be integer or bool, got {flat.dtype}")
    if flat.dtype.kind == "b":
        flat = flat.astype(np.uint8)
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0:
        raise ValueError("instance map has negative labels; 0 must be background, nuclei > 0")
    if hi <= 4 * flat.size + 1024:
        present = np.flatnonzero(np.bincount(flat, minlength=1))
        labels = present[present > 0]
        lut = np.zeros(hi + 1, np.int64)
        lut[labels] = np.arange(1, labels.size + 1)
        return lut[flat], labels.astype(np.int64)
    labels, inv = np.unique(flat, return_inverse=True)
    inv = inv.astype(np.int64).ravel()
    if labels[0] == 0:
        return inv, labels[1:].astype(np.int64)
    return inv + 1, labels.astype(np.int64)


@dataclass(frozen=True)
class Overlap:
    """The sparse contingency table of a ground-truth and a predicted instance map.

    Nuclei are indexed 0..n_gt-1 and 0..n_pred-1 in increasing order of their labels
    (``gt_labels[i]`` is the label of ground-truth nucleus i).

    Attributes:
        gt_area: (n_gt,) int64 pixel count of each ground-truth nucleus.
        pred_area: (n_pred,) int64 pixel count of each predicted nucleus.
        gt_idx, pred_idx: (K,) int64, the K intersecting pairs, sorted by (gt_idx, pred_idx).
        inter: (K,) int64 intersection of each pair in pixels.
        gt_labels, pred_labels: the original labels.
    """

    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_idx: np.ndarray
    pred_idx: np.ndarray
    inter: np.ndarray
    gt_labels: np.ndarray
    pred_labels: np.ndarray

    @property
    def n_gt(self) -> int:
        return int(self.gt_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    @property
    def union(self) -> np.ndarray:
        """(K,) int64 union of each intersecting pair in pixels."""
        return self.gt_area[self.gt_idx] + self.pred_area[self.pred_idx] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """(K,) float64 IoU of each intersecting pair (all pairs not listed have IoU 0)."""
        return self.inter / self.union

    def iou_matrix(self):
        """The (n_gt, n_pred) IoU matrix as a ``scipy.sparse.csr_array`` (zeros not stored)."""
        from scipy.sparse import csr_array

        return csr_array((self.iou, (self.gt_idx, self.pred_idx)), shape=(self.n_gt, self.n_pred))


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Areas and pairwise intersections of two (H, W) integer instance maps (0 = background).

    Cost: one pass over the pixels for each map's areas (``bincount``) and one ``np.unique`` over
    the pixels where both are foreground; memory O(H*W + K) with K the intersecting pairs.
    """
    g = np.asarray(gt)
    p = np.asarray(pred)
    if g.shape != p.shape:
        raise ValueError(f"instance maps differ in shape: gt {g.shape} vs pred {p.shape}")
    gi, g_labels = _relabel(g)
    pi, p_labels = _relabel(p)
    n_g, n_p = g_labels.size, p_labels.size
    g_area = np.bincount(gi, minlength=n_g + 1)[1:].astype(np.int64)
    p_area = np.bincount(pi, minlength=n_p + 1)[1:].astype(np.int64)
    both = (gi > 0) & (pi > 0)
    key = (gi[both] - 1) * np.int64(max(n_p, 1)) + (pi[both] - 1)
    keys, counts = np.unique(key, return_counts=True)
    return Overlap(g_area, p_area, keys // max(n_p, 1), keys % max(n_p, 1), counts.astype(np.int64),
                   g_labels, p_labels)


# --------------------------------------------------------------------------------- matching


def match(ov: Overlap, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of nuclei with IoU > ``iou_threshold``.

    For thresholds >= 0.5 the pairs above the threshold are already one-to-one (two nuclei with
    IoU > 0.5 to the same nucleus would need more than its whole area), so they are the
    matching. Below 0.5 the candidate pairs are matched by maximum total IoU with
    ``scipy.optimize.linear_sum_assignment`` on the dense block of nuclei that have a candidate.

    Returns:
        (gt_idx, pred_idx, iou) of the matched pairs, int64, int64, float64 arrays of equal length.
    """
    iou = ov.iou
    keep = iou > iou_threshold
    gi, pi, iou = ov.gt_idx[keep], ov.pred_idx[keep], iou[keep]
    if iou_threshold >= 0.5 or iou.size == 0:
        return gi, pi, iou
    from scipy.optimize import linear_sum_assignment

    rows, r_inv = np.unique(gi, return_inverse=True)
    cols, c_inv = np.unique(pi, return_inverse=True)
    dense = np.zeros((rows.size, cols.size))
    dense[r_inv, c_inv] = iou
    r, c = linear_sum_assignment(-dense)
    ok = dense[r, c] > iou_threshold
    return rows[r[ok]], cols[c[ok]], dense[r[ok], c[ok]]


def detection_counts(ov: Overlap, iou_threshold: float = 0.5) -> tuple[int, int, int, float]:
    """(TP, FP, FN, sum of matched IoU) of the matching at ``iou_threshold`` (see :func:`match`)."""
    _, _, iou = match(ov, iou_threshold)
    tp = int(iou.size)
    return tp, ov.n_pred - tp, ov.n_gt - tp, float(iou.sum())


# ------------------------------------------------------------------------- object scores


def aji(ov: Overlap) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, MoNuSeg challenge code); see the module doc.

    Vectorised: the best partner of each ground-truth nucleus is the first entry of its group
    after a stable sort of the pairs by (gt index, -IoU), so ties go to the lowest predicted label.
    """
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    iou = ov.iou
    order = np.lexsort((-iou, ov.gt_idx))
    g_sorted = ov.gt_idx[order]
    first = np.ones(order.size, bool)
    first[1:] = g_sorted[1:] != g_sorted[:-1]
    best = order[first]  # one entry per ground-truth nucleus that meets a prediction
    bg, bp = ov.gt_idx[best], ov.pred_idx[best]
    inter = int(ov.inter[best].sum())
    union = int((ov.gt_area[bg] + ov.pred_area[bp] - ov.inter[best]).sum())
    unmatched_gt = np.ones(ov.n_gt, bool)
    unmatched_gt[bg] = False
    unused_pred = np.ones(ov.n_pred, bool)
    unused_pred[bp] = False
    union += int(ov.gt_area[unmatched_gt].sum()) + int(ov.pred_area[unused_pred].sum())
    return _ratio(inter, union, False)


def panoptic_quality(ov: Overlap, iou_threshold: float = 0.5) -> dict[str, float]:
    """PQ, DQ and SQ (Kirillov et al. 2019) for one class; see the module doc.

    Returns:
        {"pq", "dq", "sq"} as floats; all 1.0 when both maps are empty.
    """
    if ov.n_gt == 0 and ov.n_pred == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0}
    tp, fp, fn, iou_sum = detection_counts(ov, iou_threshold)
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, False)
    sq = _ratio(iou_sum, tp, False)
    return {"pq": dq * sq, "dq": dq, "sq": sq}


def instance_metrics(gt: np.ndarray, pred: np.ndarray,
                     thresholds: tuple[float, ...] = (0.5, 0.7)) -> dict[str, float]:
    """All object scores of a predicted instance map against the ground truth.

    Args:
        gt: (H, W) integer instance map, 0 = background.
        pred: (H, W) integer instance map, same shape.
        thresholds: IoU thresholds for the ``precision@t``, ``recall@t``, ``f1@t`` keys
            (seed 001 reports 0.5 and 0.7).

    Returns:
        dict of floats: ``n_gt``, ``n_pred``, ``aji``, ``pq``, ``dq``, ``sq``, ``map`` (seed 001:
        mean precision over IoU 0.50:0.05:0.95), ``map_dsb`` (DSB 2018: mean TP/(TP+FP+FN) over
        the same thresholds), and ``tp@t``, ``fp@t``, ``fn@t``, ``precision@t``, ``recall@t``,
        ``f1@t`` for each t in ``thresholds`` (keys formatted with ``f"{t:g}"``, e.g. ``f1@0.5``).
    """
    ov = overlap_table(gt, pred)
    empty = ov.n_gt == 0 and ov.n_pred == 0
    out: dict[str, float] = {"n_gt": float(ov.n_gt), "n_pred": float(ov.n_pred), "aji": aji(ov)}
    out.update(panoptic_quality(ov, 0.5))
    # All pairs with IoU > 0.5 are one-to-one, so the counts at every t >= 0.5 are one sort away.
    iou = ov.iou
    matched = np.sort(iou[iou > 0.5])
    prec, dsb = [], []
    for t in MAP_THRESHOLDS:
        tp = int(matched.size - np.searchsorted(matched, t, side="right"))
        fp, fn = ov.n_pred - tp, ov.n_gt - tp
        prec.append(_ratio(tp, tp + fp, empty))
        dsb.append(_ratio(tp, tp + fp + fn, empty))
    out["map"] = float(np.mean(prec))
    out["map_dsb"] = float(np.mean(dsb))
    for t in thresholds:
        tp, fp, fn, _ = detection_counts(ov, t)
        k = f"{t:g}"
        out[f"tp@{k}"], out[f"fp@{k}"], out[f"fn@{k}"] = float(tp), float(fp), float(fn)
        out[f"precision@{k}"] = _ratio(tp, tp + fp, empty)
        out[f"recall@{k}"] = _ratio(tp, tp + fn, empty)
        out[f"f1@{k}"] = _ratio(2 * tp, 2 * tp + fp + fn, empty)
    return out


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over images (the per-image averaging of seeds 001 and 002).

    Count keys (``n_*``, ``tp*``, ``fp*``, ``fn*``, ``tn``) are summed instead of averaged.
    """
    if not per_image:
        return {}
    out = {}
    for k in per_image[0]:
        vals = np.array([m[k] for m in per_image], dtype=np.float64)
        counts = k.startswith(("n_", "tp", "fp", "fn")) or k == "tn"
        out[k] = float(vals.sum() if counts else vals.mean())
    return out
