"""The 81 Rakhlin features of a nuclei probability patch (Rakhlin et al. 2019, section 3.3).

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
(3 x 3 x 3 neighbourhood in (y, x, scale), 'nearest' edges) of the scale-normalised response
``C = -sigma^2 * LoG_sigma(p)`` (``ndi.gaussian_laplace``, 'reflect' edges, float32) whose
response exceeds t, after skimage's greedy overlap pruning. :func:`features_reference` runs
``blob_log`` once per threshold, the naive way; :func:`features` returns the same 81 numbers,
bit for bit (asserted by the tests on real, noisy and softmax-like maps), much faster:

1. **One scale space per map, by DCT.** 'reflect' edges are the half-sample symmetric
   extension that the type-II DCT assumes, so each ``-sigma^2 * LoG_sigma`` (a sum of two
   separable, symmetric, truncated Gaussian-derivative kernels, the exact weights scipy uses) is
   a diagonal multiplier in DCT space: one forward 2-D DCT per map and one inverse per sigma
   (float32, ``scipy.fft``, one thread) give skimage's cube up to float32 rounding (max |error|
   1.8e-7 measured on real, noisy and random maps of several sizes), instead of 4 x 5 spatial
   passes of up to 49 taps.
2. **Skip what cannot respond.** The positive lobe of the 2-D kernel sums to ``P+ ~= 0.74`` and
   reaches ``R+`` = 8 px, so C <= P+ * max(p within R+ px): where p <= 0.99 * t_min / P+ in such
   a neighbourhood no response can pass the lowest threshold. A map with no such pixel has no
   blobs (no transform at all); otherwise only the bounding box of those pixels, widened by
   R+ + kernel radius + 1 (sides rounded up to multiples of 64), is transformed. That is exact:
   no pixel that can matter reads across the box's inner edges, and the others stay below t_min.
3. **Maxima once, at the lowest threshold.** Per scale, while it is in cache: 3 x 3 maxima
   (``cv2.dilate``) give the candidates (responses > t_min - DELTA within 2 DELTA of their 3 x 3
   maximum); their 26 neighbours decide which are local maxima. Sorted by response (highest
   first, ties in C order, as ``peak_local_max`` sorts them), the peak list at threshold t is the
   prefix whose response exceeds t, exactly the list ``blob_log`` builds at t.
4. **Exact where it matters.** The DCT cube is within :data:`DELTA` (4e-6, 20x the largest error
   seen) of skimage's, so every decision with a larger margin (is a peak, exceeds t, order of two
   peaks) comes out the same. The rest (a neighbour within 2 DELTA of a candidate, a response
   within DELTA of a threshold, runs of responses less than 2 DELTA apart: a few points per map)
   are re-decided on skimage's own float32 values, recomputed at those points with the
   arithmetic of ``ndi.correlate1d`` (double accumulation in its order, float32 between the two
   passes and the two terms), which reproduces ``ndi.gaussian_laplace`` bit for bit.
5. **Pruning once.** Pairs closer than 2 sqrt(2) max sigma (``cKDTree.query_pairs``) and their
   overlaps (skimage's formulas, vectorised in float32) are computed once, for the longest peak
   list; a threshold's pairs are those inside its prefix. skimage's greedy suppression (in each
   overlapping pair the smaller blob goes, if both are still there) is order dependent only when
   a blob both removes one and can be removed; when no such chain decides a blob's fate the
   result is applied at once, otherwise the pairs are visited in the iteration order of the set
   ``query_pairs`` returns for that prefix, as ``skimage.feature.blob._prune_blobs`` does.

(``peak_local_max`` returns no peak at all for a constant cube; a constant cube is constant
across the 5 scales too, which for maps in [0, 1] means a response far below 0.02.)

Area and activation sums are exact: every float32 value above 0.02 is a multiple of 2^-29, so
their sum in float64 is exact in any order for patches under 2^24 pixels (OpenCV's ``sumElems``
accumulates float32 in double), and the fast and reference paths agree to the last bit. Blob
activations are summed with ``math.fsum`` (correctly rounded, order free) on both paths.

Threads and memory: :func:`features` runs its transforms on one thread; OpenCV may use its own
pool for the dilations and sums (``cv2.setNumThreads(1)`` pins it). :func:`features_batch` can
spread patches over a thread pool (NumPy, SciPy's FFT and OpenCV release the GIL). Scratch
arrays are kept per thread (about 10 MB for 512 x 512) and DCT multipliers per map shape (at most
48 MB in all).
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsiseg.classes import NUCLEUS_TYPES

CLASS_CHANNELS: tuple[str, ...] = NUCLEUS_TYPES
AREA_THRESHOLDS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.32, 0.5)
BLOB_THRESHOLDS: tuple[float, ...] = (0.02, 0.04, 0.08, 0.16, 0.24, 0.5)

# Bound on |DCT cube - skimage cube| for maps in [0, 1] of up to 512 x 512 (20x the largest error
# measured, 1.8e-7); scaled up for maps with larger values or sizes. Decisions closer than this
# are re-decided on skimage's exact values (step 4 of the module doc).
DELTA = 4e-6


@dataclass(frozen=True)
class LoGParams:
    """The fixed ``skimage.feature.blob_log`` parameters (pixels at 0.5 um/px); see the module doc."""

    min_sigma: float = 2.0
    max_sigma: float = 6.0
    num_sigma: int = 5
    overlap: float = 0.5


LOG_PARAMS = LoGParams()


def _names() -> list[str]:
    names: list[str] = []
    for ch in CLASS_CHANNELS:
        names += [f"{ch}_area_t{t:g}" for t in AREA_THRESHOLDS]
        names += [f"{ch}_act_t{t:g}" for t in AREA_THRESHOLDS]
        names += [f"{ch}_blobs_t{t:g}" for t in BLOB_THRESHOLDS]
        names += [f"{ch}_blobact_t{t:g}" for t in BLOB_THRESHOLDS]
        names.append(f"{ch}_total")
    return names


FEATURE_NAMES: list[str] = _names()
N_FEATURES: int = len(FEATURE_NAMES)  # 81
_PER_CHANNEL = N_FEATURES // len(CLASS_CHANNELS)  # 27


# --------------------------------------------------------------------------------------------
# input handling


def _channel_maps(probs: np.ndarray, channels: Sequence[str]) -> list[np.ndarray]:
    """The Normal, Lymphocyte, Malignant maps of ``probs`` (C, H, W) as C-contiguous float32 (H, W)."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {probs.shape}")
    lower = [str(c).lower() for c in channels]
    if len(lower) != probs.shape[0]:
        raise ValueError(f"{len(lower)} channel names for {probs.shape[0]} channels")
    missing = [c for c in CLASS_CHANNELS if c not in lower]
    if missing:
        raise ValueError(f"probs has channels {list(channels)}; the features need {list(CLASS_CHANNELS)} "
                         f"(missing {missing})")
    return [np.ascontiguousarray(probs[lower.index(c)], dtype=np.float32) for c in CLASS_CHANNELS]


def _total(m: np.ndarray) -> float:
    return float(m.sum(dtype=np.float64))


# --------------------------------------------------------------------------------------------
# area / activation above thresholds


def _area_act_fast(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and probability sum above each of ``AREA_THRESHOLDS``: two (7,) float64.

    ``m``: (H, W) float32. Per threshold, ``cv2.threshold(TOZERO)`` keeps the values > t (t as
    its float32 value, so the comparison is the float32 one), ``countNonZero`` counts them and
    ``sumElems`` sums them in double: exact, as the module doc explains.
    """
    import cv2

    n = len(AREA_THRESHOLDS)
    area = np.zeros(n)
    act = np.zeros(n)
    if m.size == 0:
        return area, act
    mx = float(m.max())
    z = np.empty_like(m)
    for j, t in enumerate(AREA_THRESHOLDS):
        t32 = float(np.float32(t))
        if not mx > t32:
            break  # nothing above this threshold, nor above the larger ones
        cv2.threshold(m, t32, 0.0, cv2.THRESH_TOZERO, dst=z)
        area[j] = cv2.countNonZero(z)
        act[j] = cv2.sumElems(z)[0]
    return area, act


def _area_act_reference(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The naive loop: one mask per threshold. ``m``: (H, W) float32 -> two (7,) float64."""
    area = np.empty(len(AREA_THRESHOLDS))
    act = np.empty(len(AREA_THRESHOLDS))
    for j, t in enumerate(AREA_THRESHOLDS):
        sel = m > np.float32(t)
        area[j] = np.count_nonzero(sel)
        act[j] = m[sel].sum(dtype=np.float64)
    return area, act


# --------------------------------------------------------------------------------------------
# LoG kernels, exactly as ndi.gaussian_laplace builds them


def _sigma_list(p: LoGParams) -> np.ndarray:
    """Sigmas exactly as ``blob_log`` builds them for a 2-D float32 image: (num_sigma, 2) float32."""
    return np.linspace(np.full(2, p.min_sigma, np.float32), np.full(2, p.max_sigma, np.float32), p.num_sigma)


def _ndi_kernel(sigma: np.float32, order: int) -> np.ndarray:
    """The float64 weights ``ndi.gaussian_filter1d(..., sigma, order=order)`` correlates with.

    ``sigma`` must be the np.float32 that ``blob_log`` passes (its sigma list is float32, and
    scipy builds the kernel from it in float32 arithmetic, which changes the weights' last
    digits). Obtained through the public API: the filter's response to a unit impulse (mode
    'constant') is the reversed weight vector, exactly (one product by 1.0, sums with zeros).
    """
    r = int(4.0 * float(sigma) + 0.5)  # truncate=4.0, as gaussian_filter1d computes the radius
    imp = np.zeros(2 * r + 1)
    imp[r] = 1.0
    return ndi.gaussian_filter1d(imp, sigma, order=order, mode="constant")[::-1].copy()


@dataclass(frozen=True)
class _LoGSetup:
    sigmas: np.ndarray  # (S, 2) float32, blob_log's sigma_list
    radii: tuple[int, ...]  # kernel radius per sigma
    k0: tuple[np.ndarray, ...]  # Gaussian weights per sigma, float64 (2r+1,)
    k2: tuple[np.ndarray, ...]  # second-derivative weights per sigma
    norm: tuple[np.float32, ...]  # np.mean(s) ** 2 per sigma, float32 as blob_log computes it
    p_plus: float  # max over sigmas of the positive mass of the 2-D kernel -norm * (k2 x k0 + k0 x k2)
    r_plus: int  # Chebyshev radius of the positive part of that kernel (max over sigmas)
    r_max: int


@lru_cache(maxsize=8)
def _setup(params: LoGParams) -> _LoGSetup:
    sigmas = _sigma_list(params)
    radii, k0s, k2s, norms = [], [], [], []
    p_plus, r_plus = 0.0, 0
    for s in sigmas:
        k0, k2 = _ndi_kernel(s[0], 0), _ndi_kernel(s[1], 2)
        r = (len(k0) - 1) // 2
        if not (np.array_equal(k0, k0[::-1]) and np.array_equal(k2, k2[::-1])):
            raise RuntimeError("the Gaussian kernels are not exactly symmetric; the fast LoG assumes they are")
        norm = np.mean(s) ** 2
        k2d = -float(norm) * (np.outer(k2, k0) + np.outer(k0, k2))
        pos = k2d > 0
        p_plus = max(p_plus, float(k2d[pos].sum()))
        yy, xx = np.nonzero(pos)
        r_plus = max(r_plus, int(np.abs(np.concatenate([yy - r, xx - r])).max()))
        radii.append(r)
        k0s.append(k0)
        k2s.append(k2)
        norms.append(norm)
    return _LoGSetup(sigmas, tuple(radii), tuple(k0s), tuple(k2s), tuple(norms), p_plus, r_plus, max(radii))


@lru_cache(maxsize=256)
def _dct_gain(n: int, kernel_key: tuple[LoGParams, int, int]) -> np.ndarray:
    """DCT-II multiplier of a symmetric kernel on a length-n line with 'reflect' edges: (n,) float64.

    ``h_0 + 2 * sum_j h_j cos(pi k j / n)`` -- correlating the half-sample symmetric extension
    (period 2n, which is also what 'reflect' does for kernels longer than the line) with a
    symmetric kernel multiplies DCT-II coefficient k by this.
    """
    params, i, order = kernel_key
    st = _setup(params)
    k = (st.k0 if order == 0 else st.k2)[i]
    r = st.radii[i]
    j = np.arange(1, r + 1)
    return k[r] + 2.0 * (np.cos(np.pi * np.arange(n)[:, None] * j[None, :] / n) * k[r + 1:][None, :]).sum(axis=1)


class _GainCache:
    """LRU of the (S, h, w) float32 DCT multipliers per shape, bounded in bytes."""

    def __init__(self, max_bytes: int = 48 << 20):
        self.max_bytes = max_bytes
        self._d: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, h: int, w: int, params: LoGParams) -> np.ndarray:
        key = (h, w, params)
        with self._lock:
            g = self._d.get(key)
            if g is not None:
                self._d.move_to_end(key)
                return g
        st = _setup(params)
        g = np.empty((len(st.radii), h, w), dtype=np.float32)
        for i in range(len(st.radii)):
            a0y, a2y = _dct_gain(h, (params, i, 0)), _dct_gain(h, (params, i, 2))
            a0x, a2x = _dct_gain(w, (params, i, 0)), _dct_gain(w, (params, i, 2))
            g[i] = -float(st.norm[i]) * (a2y[:, None] * a0x[None, :] + a0y[:, None] * a2x[None, :])
        with self._lock:
            if key not in self._d:
                self._d[key] = g
                self._bytes += g.nbytes
                while self._bytes > self.max_bytes and len(self._d) > 1:
                    _, old = self._d.popitem(last=False)
                    self._bytes -= old.nbytes
        return g


_GAINS = _GainCache()


_LOCAL = threading.local()


def _workspace(h: int, w: int, s_n: int) -> dict:
    """Per-thread scratch arrays for an (h, w) crop with s_n scales, reused across calls."""
    key = (h, w, s_n)
    ws = getattr(_LOCAL, "ws", None)
    if ws is None or ws["key"] != key:
        ws = {"key": key, "cube": np.empty((s_n, h, w), np.float32), "dil": np.empty((h, w), np.float32),
              "ok": np.empty((h, w), bool)}
        _LOCAL.ws = ws
    return ws


def _dct2(a: np.ndarray) -> np.ndarray:
    """Unnormalised 2-D DCT-II of a float32 (h, w) array (``scipy.fft``, one thread)."""
    import scipy.fft as sfft

    return sfft.dctn(a, type=2, workers=1)


def _idct2(a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_dct2`; may overwrite ``a``."""
    import scipy.fft as sfft

    return sfft.idctn(a, type=2, workers=1, overwrite_x=True)


def log_scale_space(m: np.ndarray, params: LoGParams = LOG_PARAMS) -> np.ndarray:
    """Scale-normalised ``-sigma^2 * LoG_sigma(m)`` for each sigma, by DCT: (S, H, W) float32.

    ``m``: (H, W) float32. The cube ``blob_log`` builds (``ndi.gaussian_laplace``, mode
    'reflect'), stored scale-first, to within float32 rounding of the transforms (see
    :data:`DELTA`); :func:`log_scale_space_reference` is skimage's own.
    """
    m = np.ascontiguousarray(m, dtype=np.float32)
    h, w = m.shape
    gain = _GAINS.get(h, w, params)
    spec = _dct2(m)
    return np.stack([_idct2(g * spec) for g in gain])


def log_scale_space_reference(m: np.ndarray, params: LoGParams = LOG_PARAMS) -> np.ndarray:
    """``blob_log``'s cube, computed as it does (``ndi.gaussian_laplace`` per sigma): (S, H, W) float32."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    sigmas = _sigma_list(params)
    cube = np.empty((len(sigmas),) + m.shape, dtype=np.float32)
    for i, s in enumerate(sigmas):
        cube[i] = -ndi.gaussian_laplace(m, s) * np.mean(s) ** 2
    return cube


def _corr_pass(x: np.ndarray, wt: np.ndarray, n_out: int) -> np.ndarray:
    """``ndi.correlate1d``'s arithmetic for symmetric kernels, in double, along axis 0 of ``x``.

    ``x``: (L, ...) float64 lines along axis 0; ``wt``: (2r+1, ...) float64 weights, broadcast
    against ``x[:n_out]`` (one symmetric kernel per line; shorter kernels zero-padded to the
    common radius r: adding ``(a + b) * 0.0`` leaves a double unchanged, so the padding is exact).
    Output o (0 <= o < n_out) is centred on input o + r. NI_Correlate1D computes ``x[0]*w[0]``,
    then adds ``(x[-j] + x[j]) * w[-j]`` for j = r, r-1, ..., 1, each step rounded in double;
    this does the same, elementwise, so each result is the same double.
    """
    r = (len(wt) - 1) // 2
    out = np.arange(n_out)
    j = np.arange(r, 0, -1)[:, None]  # r, r-1, ..., 1
    terms = np.empty((r + 1, n_out) + np.broadcast_shapes(x.shape[1:], wt.shape[1:]))
    np.multiply(x[r:r + n_out], wt[r], out=terms[0])
    np.multiply(x[r - j + out] + x[r + j + out], wt[r - j[:, 0]][:, None], out=terms[1:])
    return np.add.accumulate(terms, axis=0)[-1]  # sequential, left to right, like the C loop


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Indices into a line of length n under 'reflect' (half-sample symmetric, period 2n)."""
    j = np.mod(i, 2 * n)
    return np.where(j >= n, 2 * n - 1 - j, j)


@lru_cache(maxsize=8)
def _padded_kernels(params: LoGParams) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2 r_max + 1) float64 order-0 and order-2 weights, zero-padded to the largest radius."""
    st = _setup(params)
    k0 = np.zeros((len(st.radii), 2 * st.r_max + 1))
    k2 = np.zeros_like(k0)
    for i, r in enumerate(st.radii):
        k0[i, st.r_max - r:st.r_max + r + 1] = st.k0[i]
        k2[i, st.r_max - r:st.r_max + r + 1] = st.k2[i]
    return k0, k2


def _exact_block(m: np.ndarray, level: np.ndarray, y: np.ndarray, x: np.ndarray, half: int,
                 params: LoGParams) -> np.ndarray:
    """skimage's float32 cube values, bit-exact, around points: (n, 2h+1, 2h+1) float32.

    Values at rows y-h..y+h, columns x-h..x+h of scale ``level`` (one per point; positions
    outside the map are computed as if reflected, callers drop them). Emulates
    ``-ndi.gaussian_laplace(m, sigma) * mean(sigma)**2`` = -(A + B) * norm, A being the axis-1
    pass (order 0) of the axis-0 pass (order 2) and B the other way round, each pass rounded to
    float32 as ``ndi.gaussian_filter`` stores it, each output accumulated in double as
    NI_Correlate1D does (:func:`_corr_pass`), on the 'reflect' extension of the map.
    """
    st = _setup(params)
    level = np.asarray(level, dtype=np.intp)
    r = st.r_max
    k0, k2 = _padded_kernels(params)
    n_out = 2 * half + 1
    off = np.arange(-half - r, half + r + 1)
    ry = _reflect(y[:, None] + off[None, :], m.shape[0])
    rx = _reflect(x[:, None] + off[None, :], m.shape[1])
    win = m[ry.T[:, None, :], rx.T[None, :, :]].astype(np.float64)[:, :, None, :]  # (L rows, L cols, 1, n)
    # axis-0 pass, both terms at once: term 0 (A) with the order-2 kernel, term 1 (B) order 0
    w1 = np.stack([k2[level].T, k0[level].T], axis=1)[:, None, :, :]  # (K, 1, 2, n)
    # lines along rows: x (L_rows, L_cols, 1, n) against weights (K, 1, 2, n) -> (n_out, L_cols, 2, n)
    p1 = _corr_pass(win, w1, n_out).astype(np.float32).astype(np.float64)
    # axis-1 pass: lines along columns -> (n_out cols, n_out rows, 2, n); A with order 0, B order 2
    w2 = np.stack([k0[level].T, k2[level].T], axis=1)[:, None, :, :]  # (K, 1, 2, n)
    p2 = _corr_pass(p1.transpose(1, 0, 2, 3), w2, n_out).astype(np.float32)
    norm = np.array(st.norm, dtype=np.float32)[level]
    out = -(p2[:, :, 0, :] + p2[:, :, 1, :]) * norm  # (cols, rows, n) float32
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def _exact_values(m: np.ndarray, s: np.ndarray, y: np.ndarray, x: np.ndarray, params: LoGParams) -> np.ndarray:
    """skimage's float32 cube values at points (scale index s, y, x) of map ``m``: (n,) float32, bit-exact."""
    if len(s) == 0:
        return np.empty(0, dtype=np.float32)
    return _exact_block(m, s, y, x, 0, params)[:, 0, 0]


# --------------------------------------------------------------------------------------------
# Laplacian-of-Gaussian blobs: maxima


_OFF8 = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
_OFF26 = np.array([(ds, dy, dx) for ds in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if ds or dy or dx])


def _crop_box(m: np.ndarray, t_min: float, st: _LoGSetup) -> tuple[int, int, int, int] | None:
    """The box (y0, y1, x0, x1) outside which no response can exceed ``t_min``; None: nowhere.

    See step 2 of the module doc (which assumes p >= 0: a map with negative values gets the whole
    map). Box sides are rounded up to multiples of 64 (fewer distinct DCT shapes), within the map.
    """
    h, w = m.shape
    if float(m.min()) < 0:  # the bound needs p >= 0; not a probability map: no skipping
        return 0, h, 0, w
    eps = 0.99 * float(np.float32(t_min)) / st.p_plus
    mask = m > np.float32(eps)
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    pad = st.r_plus + st.r_max + 1

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        lo, hi = max(0, lo - pad), min(n, hi + pad + 1)
        size = min(n, -(-(hi - lo) // 64) * 64)
        lo = max(0, min(lo, n - size))
        return lo, lo + size

    y0, y1 = span(int(rows[0]), int(rows[-1]), h)
    x0, x1 = span(int(cols[0]), int(cols[-1]), w)
    return y0, y1, x0, x1


def _sorted_maxima(m: np.ndarray, t_min: float, params: LoGParams = LOG_PARAMS,
                   thresholds: Sequence[float] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Scale-space local maxima of ``m`` with response > ``t_min``, ordered like ``peak_local_max``.

    ``m``: (H, W) float32. Returns ``blobs`` (K, 3) float32 rows (y, x, scale index) sorted by
    response, highest first, ties in the C order of a (H, W, S) cube (skimage's layout), and
    ``resp`` (K,) float32, non-increasing; exactly skimage's peaks and responses wherever a
    decision depends on them (steps 2-4 of the module doc). Responses within DELTA of one of
    ``thresholds`` are exact too, so prefixes at those thresholds are exact.
    """
    import cv2

    st = _setup(params)
    s_n = len(st.radii)
    h, w = m.shape
    empty = np.empty((0, 3), np.float32), np.empty(0, np.float32)
    if m.size == 0:
        return empty
    box = _crop_box(m, t_min, st)
    if box is None:
        return empty
    y0, y1, x0, x1 = box
    ch, cw = y1 - y0, x1 - x0
    scale = max(1.0, float(m.max()), -float(m.min())) * max(1.0, math.sqrt(m.size) / 512.0)
    delta = DELTA * scale
    tau0 = np.float32(t_min)

    # The cube, one scale at a time (DCT multiply, inverse DCT), and while that scale is in
    # cache its candidates: near-maxima of its 3 x 3 window above t_min - delta. Written into
    # per-thread buffers reused across calls.
    ws = _workspace(ch, cw, s_n)
    cube, dil, ok = ws["cube"], ws["dil"], ws["ok"]
    spec = _dct2(m[y0:y1, x0:x1])
    gain = _GAINS.get(ch, cw, params)
    kern = np.ones((3, 3), np.uint8)
    # c is a candidate iff c > lo and c >= dilate(c) - 2 delta, i.e. c >= max(dilate(c) - 2 delta, lo+)
    # (lo+: the next float32 above lo); dil is one scale's scratch, kept hot in cache
    lo_plus = np.nextafter(np.float32(float(tau0) - delta), np.float32(np.inf))
    two_d = np.float32(2 * delta)
    found = []
    for i in range(s_n):
        np.multiply(gain[i], spec, out=cube[i])
        res = _idct2(cube[i])
        if res.__array_interface__["data"][0] != cube[i].__array_interface__["data"][0]:
            cube[i] = res
        cv2.dilate(cube[i], kern, dst=dil, borderType=cv2.BORDER_REPLICATE)
        np.subtract(dil, two_d, out=dil)
        cv2.max(dil, float(lo_plus), dst=dil)  # float32 max with a float32 value (np.maximum is slower)
        np.greater_equal(cube[i], dil, out=ok)
        found.append(np.flatnonzero(ok) + i * ch * cw)
    idx = np.concatenate(found)
    if len(idx) == 0:
        return empty
    si, rem = np.divmod(idx, ch * cw)
    yi, xi = np.divmod(rem, cw)
    v = cube.reshape(-1)[idx]
    # most candidates are maxima of their scale only: a larger response at the same place one
    # scale up or down (by more than 2 delta) rules them out before the full neighbourhood check
    drop = np.zeros(len(idx), dtype=bool)
    for ds in (-1, 1):
        adj = (si + ds >= 0) & (si + ds < s_n)
        drop[adj] |= cube[si[adj] + ds, yi[adj], xi[adj]] > v[adj] + two_d
    if drop.any():
        keep = ~drop
        si, yi, xi, v = si[keep], yi[keep], xi[keep], v[keep]
        if len(si) == 0:
            return empty

    # max over the 26 neighbours (those inside the cube; 'nearest' adds only the point itself)
    ss, yy, xx = si[:, None] + _OFF26[:, 0], yi[:, None] + _OFF26[:, 1], xi[:, None] + _OFF26[:, 2]
    inside = (ss >= 0) & (ss < s_n) & (yy >= 0) & (yy < ch) & (xx >= 0) & (xx < cw)
    nbv = cube[np.clip(ss, 0, s_n - 1), np.clip(yy, 0, ch - 1), np.clip(xx, 0, cw - 1)]
    nb = np.where(inside, nbv, -np.inf).max(axis=1)
    gap = v.astype(np.float64) - nb
    sure = (gap > 2 * delta) & (v > float(tau0) + delta)
    unsure = ~sure & (gap >= -2 * delta)

    pot = np.flatnonzero(sure | unsure)  # the peaks are among these
    if len(pot) == 0:
        return empty
    yi, xi = yi + y0, xi + x0  # full-map coordinates from here on
    key = (yi.astype(np.int64) * w + xi) * s_n + si  # C order of skimage's (H, W, S) cube

    # Exact values (one batch) where a decision could depend on the last digits:
    # - undecided candidates, and those of their 26 neighbours within 2 delta of them (the
    #   other neighbours are surely below);
    # - responses within delta of a threshold, and runs of responses less than 2 delta apart
    #   in sorted order (computed over all potential peaks, a superset of the final ones: every
    #   near-tie between two final peaks is inside such a run).
    u = np.flatnonzero(unsure)
    vu = v[u].astype(np.float64)
    close = inside[u] & (np.abs(nbv[u] - vu[:, None]) <= 2 * delta)
    owner, which = np.nonzero(close)
    need = np.zeros(len(v), dtype=bool)
    o = pot[np.lexsort((key[pot], -v[pot]))]
    near = (v[o[:-1]].astype(np.float64) - v[o[1:]]) <= 2 * delta
    need[o[:-1][near]] = True
    need[o[1:][near]] = True
    for t in thresholds:
        need[pot] |= np.abs(v[pot].astype(np.float64) - float(np.float32(t))) <= delta
    need[u] = False
    k = np.flatnonzero(need)
    if len(u) or len(k):
        ev = _exact_values(m, np.concatenate([si[u], si[k], ss[u][owner, which]]),
                           np.concatenate([yi[u], yi[k], yy[u][owner, which] + y0]),
                           np.concatenate([xi[u], xi[k], xx[u][owner, which] + x0]), params)
        centre = ev[:len(u)]
        v[k] = ev[len(u):len(u) + len(k)]
        bmax = np.full(len(u), -np.inf, dtype=np.float32)
        np.maximum.at(bmax, owner, ev[len(u) + len(k):])
        sure[u] = (centre >= bmax) & (centre > tau0)
        v[u] = centre
    if not sure.any():
        return empty
    si, yi, xi, v, key = si[sure], yi[sure], xi[sure], v[sure], key[sure]
    order = np.lexsort((key, -v))

    blobs = np.empty((len(order), 3), dtype=np.float32)
    blobs[:, 0] = yi[order]
    blobs[:, 1] = xi[order]
    blobs[:, 2] = si[order]  # the scale index; the caller maps it to sigma
    return blobs, v[order]


# --------------------------------------------------------------------------------------------
# Laplacian-of-Gaussian blobs: overlap pruning


def _pair_overlap(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Overlap fraction of blob pairs, vectorised ``skimage.feature.blob._blob_overlap`` (2-D).

    ``b1``, ``b2``: (P, 3) float32 rows (y, x, sigma), sigma > 0. Computed in float32 with the
    same operation order as skimage's scalar code (which runs on float32 rows), so the
    ``> overlap`` decisions agree. Returns (P,) float32.
    """
    s1, s2 = b1[:, 2], b2[:, 2]
    big1 = s1 > s2
    max_sigma = np.where(big1, s1, s2)
    one = np.float32(1)
    r1 = np.where(big1, one, s1 / s2)
    r2 = np.where(big1, s2 / s1, one)
    scale = max_sigma * np.float32(math.sqrt(2))
    pos1 = b1[:, :2] / scale[:, None]
    pos2 = b2[:, :2] / scale[:, None]
    diff = pos2 - pos1
    d = np.sqrt(diff[:, 0] ** 2 + diff[:, 1] ** 2)
    out = np.zeros(len(d), dtype=np.float32)
    inside = d <= np.abs(r1 - r2)
    out[inside] = 1
    part = ~inside & ~(d > r1 + r2)
    if part.any():
        d, r1, r2 = d[part], r1[part], r2[part]
        ratio1 = np.clip((d**2 + r1**2 - r2**2) / (2 * d * r1), -1, 1)
        ratio2 = np.clip((d**2 + r2**2 - r1**2) / (2 * d * r2), -1, 1)
        acos1 = np.arccos(ratio1.astype(np.float64)).astype(np.float32)
        acos2 = np.arccos(ratio2.astype(np.float64)).astype(np.float32)
        a = -d + r2 + r1
        b = d - r2 + r1
        c = d + r2 - r1
        e = d + r2 + r1
        root = (0.5 * np.sqrt(np.abs(a * b * c * e).astype(np.float64))).astype(np.float32)
        area = r1**2 * acos1 + r2**2 * acos2 - root
        out[part] = area / (np.float32(math.pi) * np.minimum(r1, r2) ** 2)
    return out


def _prune_prefixes(blobs: np.ndarray, prefixes: Sequence[int], overlap: float) -> list[np.ndarray]:
    """skimage's overlap pruning of each prefix ``blobs[:k]``: a bool mask (k,) of survivors per k.

    ``blobs``: (K, 3) float32 rows (y, x, sigma) in ``peak_local_max`` order. Pairs closer than
    2 sqrt(2) max sigma (``cKDTree.query_pairs``) and their overlaps (float32, skimage's formulas)
    are computed once, for all K; a prefix's candidate pairs are those inside it. A pair
    overlapping by more than ``overlap`` removes its smaller-sigma blob (the first of the pair on
    a tie) if both are still there. If every such pair either has a remover that nothing removes
    or a victim that such a remover removes anyway, the result does not depend on the order of
    the pairs and is applied at once; otherwise the pairs are visited in the order of skimage's
    loop: the iteration order of the set ``query_pairs`` returns for that prefix, with its own
    search distance.
    """
    n = len(blobs)
    out = [np.ones(k, dtype=bool) for k in prefixes]
    if n < 2 or max(prefixes, default=0) < 2:
        return out
    kmax = max(prefixes)
    b = blobs[:kmax]
    distance = 2 * b[:, 2].max() * math.sqrt(2)
    pairs = cKDTree(b[:, :2]).query_pairs(distance, output_type="ndarray")
    if len(pairs) == 0:
        return out
    ov = _pair_overlap(b[pairs[:, 0]], b[pairs[:, 1]])
    hit = pairs[ov > np.float32(overlap)]
    if len(hit) == 0:
        return out
    sig = b[:, 2]
    done: dict[int, np.ndarray] = {}
    for alive, k in zip(out, prefixes):
        if k in done:  # same prefix as another threshold
            alive[:] = done[k]
            continue
        done[k] = alive
        h = hit[(hit[:, 0] < k) & (hit[:, 1] < k)]
        if len(h) == 0:
            continue
        i, j = h[:, 0], h[:, 1]
        first_dies = ~(sig[i] > sig[j])
        victim, killer = np.where(first_dies, i, j), np.where(first_dies, j, i)
        is_victim = np.zeros(k, dtype=bool)
        is_victim[victim] = True
        # a victim whose killer is never removed dies whatever the order; the other pairs matter
        # only if their victim is not such a sure death
        sure_dead = np.zeros(k, dtype=bool)
        sure_dead[victim[~is_victim[killer]]] = True
        if not (is_victim[killer] & ~sure_dead[victim]).any():
            alive[victim] = False
            continue
        hits = set(map(tuple, h.tolist()))
        bk = blobs[:k]
        dist_k = 2 * bk[:, 2].max() * math.sqrt(2)  # skimage's distance for this list
        for i, j in cKDTree(bk[:, :2]).query_pairs(dist_k):  # the set skimage iterates
            if (i, j) in hits and alive[i] and alive[j]:
                if sig[i] > sig[j]:
                    alive[j] = False
                else:
                    alive[i] = False
    return out


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
    blobs, resp = _sorted_maxima(m, min(thresholds), params, thresholds)
    blobs[:, 2] = _sigma_list(params)[blobs[:, 2].astype(np.intp), 0]
    prefixes = [int(np.count_nonzero(resp > np.float32(t))) for t in thresholds]  # resp sorted: prefixes
    masks = _prune_prefixes(blobs, prefixes, params.overlap)
    return [blobs[:k][alive] for k, alive in zip(prefixes, masks)]


def _blob_features(m: np.ndarray, blob_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Blob counts and the sum of ``m`` at the blob centres (``math.fsum``): two (len(blob_sets),) float64."""
    n = np.array([len(b) for b in blob_sets], dtype=np.float64)
    act = np.array([math.fsum(m[b[:, 0].astype(np.intp), b[:, 1].astype(np.intp)].tolist()) for b in blob_sets],
                   dtype=np.float64)
    return n, act


# --------------------------------------------------------------------------------------------
# public API


def _features_maps(maps: list[np.ndarray]) -> np.ndarray:
    out = np.empty(N_FEATURES, dtype=np.float64)
    for k, m in enumerate(maps):
        area, act = _area_act_fast(m)
        nblob, bact = _blob_features(m, blobs_at_thresholds(m, BLOB_THRESHOLDS, LOG_PARAMS))
        out[k * _PER_CHANNEL:(k + 1) * _PER_CHANNEL] = np.concatenate([area, act, nblob, bact, [_total(m)]])
    return out


def features(probs: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The 81 features of one patch (fast path).

    ``probs``: (C, H, W) probabilities in [0, 1] (float32 preferred), ``channels``: C names, among
    them normal, lymphocyte and malignant. Returns (81,) float64 in :data:`FEATURE_NAMES` order,
    equal to :func:`features_reference`.
    """
    return _features_maps(_channel_maps(probs, channels))


def features_reference(probs: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The 81 features the naive way: one mask per threshold and one ``blob_log`` per threshold.

    Same input and output as :func:`features`; 6 LoG scale-space computations per map instead
    of one. Kept as the definition the fast path is tested against.
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


def features_batch(probs: np.ndarray | Sequence[np.ndarray], channels: Sequence[str], reference: bool = False,
                   n_threads: int = 1) -> np.ndarray:
    """Features of a batch: ``probs`` (N, C, H, W) or a sequence of (C, H, W) -> (N, 81) float64.

    ``n_threads`` > 1 computes patches concurrently in a thread pool (the heavy parts release the
    GIL); rows keep the input order. ``reference=True`` uses :func:`features_reference`.
    """
    fn = features_reference if reference else features
    n = len(probs)
    if n == 0:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    if n_threads <= 1 or n == 1:
        rows = [fn(p, channels) for p in probs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(n_threads, n)) as pool:
            rows = list(pool.map(lambda p: fn(p, channels), probs))
    return np.stack(rows)
