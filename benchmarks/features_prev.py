"""PREVIOUS fast path of :mod:`cellularity.features` (commit 781f3e1), kept only for the speed
comparison in ``benchmarks/features_speed.py``; not part of the package, not maintained.

Its scale space is ``ndi.gaussian_laplace`` once per sigma (bit-identical to blob_log's), its
maxima ``ndi.maximum_filter`` over the whole (S, H, W) cube, its pruning one ``cKDTree`` query
per threshold. The original module docstring follows.

The 81 Rakhlin features of a nuclei probability patch (Rakhlin et al. 2019, section 3.3).

Input: ``probs``, an array (C, H, W) of class probabilities in [0, 1] (float32, or anything
castable to it) with one name per channel. Only the ``normal``, ``lymphocyte`` and ``malignant``
channels are used (names matched case-insensitively; a ``background`` channel may be present
and is ignored). For each of the three maps, in this order:

- ``<ch>_area_t<t>``: number of pixels with p > t, for the 7 ``AREA_THRESHOLDS``;
- ``<ch>_act_t<t>``: sum of p over those pixels (the "total activation above t");
- ``<ch>_blobs_t<t>``: number of Laplacian-of-Gaussian blobs at threshold t, for the 6
  ``BLOB_THRESHOLDS``;
- ``<ch>_blobact_t<t>``: sum of p at the blob centres;
- ``<ch>_total``: sum of p over the whole patch.

3 x (7 + 7 + 6 + 6 + 1) = 81 features, named in :data:`FEATURE_NAMES`, returned as float64.
Thresholds are compared in float32, the maps' precision (``p > np.float32(t)``), the way
``skimage`` compares a float32 image with a Python float.

Blobs
-----
The paper used OpenCV's LoG; here the reference is ``skimage.feature.blob_log`` with fixed
parameters (:data:`LOG_PARAMS`), chosen for maps at 0.5 um/px (the engine's resolution, 20x):
nuclei of about 3-8 um diameter are 6-16 px across, radius r = 3-8 px, and a 2-D LoG blob of
scale sigma has radius sqrt(2) * sigma, so sigma = 2.1-5.7 px. Hence ``min_sigma=2``,
``max_sigma=6``, ``num_sigma=5`` (sigmas 2, 3, 4, 5, 6 px, linear steps of 1 px),
``overlap=0.5`` (skimage's default: of two blobs whose discs overlap by more than half of the
smaller one, the smaller-scale one is dropped) and ``exclude_border=False`` (nuclei cut by the
patch edge still count). Maps at another resolution should be resampled to 0.5 um/px first, or
the sigmas scaled by 0.5 / mpp.

A blob at threshold t is exactly what ``blob_log(..., threshold=t)`` returns: a local maximum
(3 x 3 x 3 neighbourhood in (y, x, scale)) of the scale-normalised response
``-sigma^2 * LoG_sigma(p)`` whose response exceeds t, after overlap pruning.

The fast path (:func:`features`) computes the scale-space cube and its maximum filter ONCE per
map, keeps the maxima above the lowest threshold sorted by response (highest first, ties in
C order, as ``peak_local_max`` sorts them), and for each threshold takes the prefix of that list
whose response exceeds t, which is the exact peak list ``blob_log`` builds at that threshold.
Only the overlap pruning is redone per threshold, on a few hundred points: overlaps of all
candidate pairs are computed vectorised in float32 with skimage's formulas, and the pairs that
overlap too much are resolved in the order ``skimage.feature.blob._prune_blobs`` visits them
(the iteration order of ``cKDTree.query_pairs``), because that greedy suppression is order
dependent. The result is the same blob set as the reference; :func:`features_reference` runs
``blob_log`` once per threshold, the naive way, and the tests compare the two.

Activation sums are exact: every float32 value above 0.02 is a multiple of 2^-29, so their sum
in float64 is exact in any order for patches under 2^24 pixels, and the fast and reference paths
agree to the last bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

# unchanged since that commit: shared with the package rather than copied
from cellularity.features import (  # noqa: F401  (re-exported for the comparison)
    AREA_THRESHOLDS,
    BLOB_THRESHOLDS,
    CLASS_CHANNELS,
    FEATURE_NAMES,
    LOG_PARAMS,
    N_FEATURES,
    _PER_CHANNEL,
    LoGParams,
    _area_act_reference,
    _channel_maps,
    _pair_overlap,
    _sigma_list,
    _total,
)


# --------------------------------------------------------------------------------------------
# area / activation above thresholds


def _area_act_fast(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and probability sum above each of ``AREA_THRESHOLDS``, in one pass.

    ``m``: (H, W) float32. Each pixel is binned by how many thresholds lie strictly below it
    (float32 comparisons); the counts/sums above threshold j are the sums of the bins above j.
    Returns two float64 arrays of shape (7,).
    """
    thr = np.asarray(AREA_THRESHOLDS, dtype=np.float32)
    flat = m.ravel()
    bins = np.searchsorted(thr, flat, side="left")  # thr[i-1] < p <= thr[i]
    nb = len(thr) + 1
    cnt = np.bincount(bins, minlength=nb).astype(np.float64)
    act = np.bincount(bins, weights=flat, minlength=nb)
    area_above = np.cumsum(cnt[::-1])[::-1][1:]
    act_above = np.cumsum(act[::-1])[::-1][1:]
    return area_above, act_above


# --------------------------------------------------------------------------------------------
# Laplacian-of-Gaussian blobs


def log_scale_space(m: np.ndarray, params: LoGParams = LOG_PARAMS) -> np.ndarray:
    """Scale-normalised ``-sigma^2 * LoG_sigma(m)`` for each sigma: (S, H, W) float32.

    ``m``: (H, W) float32. Bit-identical to the cube ``blob_log`` builds (same
    ``ndi.gaussian_laplace`` calls, mode 'reflect', same float32 arithmetic), stored scale-first
    so every slice is contiguous.
    """
    sigmas = _sigma_list(params)
    cube = np.empty((len(sigmas),) + m.shape, dtype=np.float32)
    for i, s in enumerate(sigmas):
        cube[i] = -ndi.gaussian_laplace(m, s) * np.mean(s) ** 2
    return cube


def _sorted_maxima(cube: np.ndarray, t_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale-space local maxima with response > ``t_min``, ordered like ``peak_local_max``.

    ``cube``: (S, H, W) float32. A maximum equals the maximum of its 3 x 3 x 3 neighbourhood
    (``ndi.maximum_filter``, mode 'nearest', as ``peak_local_max`` uses). Returns ``blobs``
    (K, 3) float32 rows (y, x, scale index) sorted by response, highest first, ties in the C order of
    a (H, W, S) cube (skimage's layout), and ``resp`` (K,) float32, non-increasing.
    """
    s, h, w = cube.shape
    maxf = ndi.maximum_filter(cube, size=3, mode="nearest")
    peak = (cube == maxf) & (cube > np.float32(t_min))
    si, yi, xi = np.nonzero(peak)
    if len(si) and cube.min() == cube.max():  # peak_local_max: no peak in a constant image
        si = yi = xi = np.empty(0, dtype=np.intp)
    resp = cube[si, yi, xi]
    order = np.lexsort(((yi * w + xi) * s + si, -resp))  # by -response, then (y, x, s) C order
    blobs = np.empty((len(order), 3), dtype=np.float32)
    blobs[:, 0] = yi[order]
    blobs[:, 1] = xi[order]
    blobs[:, 2] = si[order]  # the scale index; the caller maps it to sigma
    return blobs, resp[order]


def _prune(blobs: np.ndarray, overlap: float) -> np.ndarray:
    """Drop the smaller of two blobs that overlap by more than ``overlap``, like skimage.

    ``blobs``: (K, 3) float32 rows (y, x, sigma) in ``peak_local_max`` order. Candidate pairs
    come from ``cKDTree.query_pairs`` within 2 * sqrt(2) * max sigma, visited in the order of
    that set, as ``skimage.feature.blob._prune_blobs`` visits them; a pair whose overlap exceeds
    ``overlap`` removes its smaller-sigma blob (the first of the pair on a tie), and a removed
    blob no longer removes others. Returns the surviving rows, order kept.
    """
    k = len(blobs)
    if k < 2:
        return blobs
    distance = 2 * blobs[:, 2].max() * math.sqrt(2)
    pairs = np.array(list(cKDTree(blobs[:, :2]).query_pairs(distance)), dtype=np.intp)
    if len(pairs) == 0:
        return blobs
    ov = _pair_overlap(blobs[pairs[:, 0]], blobs[pairs[:, 1]])
    hit = pairs[ov > np.float32(overlap)]
    if len(hit) == 0:
        return blobs
    alive = np.ones(k, dtype=bool)
    sig = blobs[:, 2]
    for i, j in hit.tolist():  # order dependent: sequential, few pairs
        if alive[i] and alive[j]:
            if sig[i] > sig[j]:
                alive[j] = False
            else:
                alive[i] = False
    return blobs[alive]


def blobs_at_thresholds(m: np.ndarray, thresholds: Sequence[float] = BLOB_THRESHOLDS,
                        params: LoGParams = LOG_PARAMS) -> list[np.ndarray]:
    """LoG blobs of one map at several thresholds from ONE scale-space computation.

    ``m``: (H, W) float32 probabilities. Returns, per threshold, an array (K_t, 3) float32 of
    rows (y, x, sigma) in pixels, equal to
    ``blob_log(m, params.min_sigma, params.max_sigma, params.num_sigma, threshold=t,
    overlap=params.overlap)``.
    """
    m = np.ascontiguousarray(m, dtype=np.float32)
    if len(thresholds) == 0:
        return []
    cube = log_scale_space(m, params)
    blobs, resp = _sorted_maxima(cube, min(thresholds))
    blobs[:, 2] = _sigma_list(params)[blobs[:, 2].astype(np.intp), 0]
    out = []
    for t in thresholds:
        k = int(np.count_nonzero(resp > np.float32(t)))  # resp is sorted: a prefix
        out.append(_prune(blobs[:k].copy(), params.overlap))
    return out


def _blob_features(m: np.ndarray, blob_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Blob counts and the sum of ``m`` at the blob centres: two (len(blob_sets),) float64."""
    n = np.array([len(b) for b in blob_sets], dtype=np.float64)
    act = np.array([m[b[:, 0].astype(np.intp), b[:, 1].astype(np.intp)].astype(np.float64).sum()
                    for b in blob_sets])
    return n, act


# --------------------------------------------------------------------------------------------
# public API


def features(probs: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The 81 features of one patch (fast path).

    ``probs``: (C, H, W) probabilities in [0, 1] (float32 preferred), ``channels``: C names, among
    them normal, lymphocyte and malignant. Returns (81,) float64 in :data:`FEATURE_NAMES` order.
    """
    out = np.empty(N_FEATURES, dtype=np.float64)
    for k, m in enumerate(_channel_maps(probs, channels)):
        area, act = _area_act_fast(m)
        nblob, bact = _blob_features(m, blobs_at_thresholds(m, BLOB_THRESHOLDS, LOG_PARAMS))
        out[k * _PER_CHANNEL:(k + 1) * _PER_CHANNEL] = np.concatenate([area, act, nblob, bact, [_total(m)]])
    return out


def features_reference(probs: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The 81 features the naive way: one mask per threshold and one ``blob_log`` per threshold.

    Same input and output as :func:`features`; about 6 LoG scale-space computations per map
    instead of one. Kept as the definition the fast path is tested against.
    """
    from skimage.feature import blob_log

    p = LOG_PARAMS
    out = np.empty(N_FEATURES, dtype=np.float64)
    for k, m in enumerate(_channel_maps(probs, channels)):
        area, act = _area_act_reference(m)
        blob_sets = [blob_log(m, min_sigma=p.min_sigma, max_sigma=p.max_sigma, num_sigma=p.num_sigma,
                              threshold=t, overlap=p.overlap, exclude_border=False)
                     for t in BLOB_THRESHOLDS]
        nblob, bact = _blob_features(m, blob_sets)
        out[k * _PER_CHANNEL:(k + 1) * _PER_CHANNEL] = np.concatenate([area, act, nblob, bact, [_total(m)]])
    return out


def features_batch(probs: np.ndarray, channels: Sequence[str], reference: bool = False) -> np.ndarray:
    """Features of a batch: ``probs`` (N, C, H, W) or a sequence of (C, H, W) -> (N, 81) float64."""
    fn = features_reference if reference else features
    rows = [fn(p, channels) for p in probs]
    return np.stack(rows) if rows else np.empty((0, N_FEATURES), dtype=np.float64)
