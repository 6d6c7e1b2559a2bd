"""From a nucleus probability map to nucleus instances, and the classical baselines of seed 001.

Every size is given in micrometres (lengths) or square micrometres (areas) together with the
image's resolution ``mpp`` (micrometres per pixel), so one configuration works at 0.25 um/px
(40x, MoNuSeg native) and at 0.5 um/px (20x, the default model) alike.

The deep-learning path (:func:`instances_from_probability`)::

    probability (H, W) float32 in [0, 1]
      -> threshold                       (choose it on a validation set: search_threshold)
      -> remove specks, fill small holes (skimage.morphology, sizes in um^2)
      -> split touching nuclei:
           markers = peaks of the distance transform (peak_local_max, min distance in um)
                  or h-maxima of the distance transform (h in um)
                  or a predicted marker map (USE-Net "shape markers", seed 002, sec. II-C)
           watershed of -distance from the markers inside the mask (skimage.segmentation)
      -> instance map (H, W) uint32, 0 = background, 1..N

The classical baselines (seed 001, "Classical segmentation techniques" and Table 2a):
:func:`otsu_hed` (Otsu on the haematoxylin channel of ``skimage.color.rgb2hed``, connected
components), :func:`watershed_hed` (the same mask split by a distance-transform watershed) and
:func:`fiji_like` (grey levels, Gaussian blur, ImageJ-style IsoData threshold, hole filling,
ImageJ-style binary watershed, particle size filter). Seed 001 colour-normalised the images
first; these functions do not (no stain normaliser here yet).

Everything is built from scipy/scikit-image calls; the only hand-written steps are the few lines
that give a label to mask components no marker reached (:func:`_label_orphans`) and that
place point markers (:func:`distance_markers`), both vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_isodata, threshold_otsu
from skimage.measure import label as cc_label
from skimage.morphology import h_maxima, remove_small_holes, remove_small_objects
from skimage.segmentation import watershed

__all__ = [
    "PostprocessConfig",
    "clean_mask",
    "distance_markers",
    "tie_broken_relief",
    "fiji_like",
    "haematoxylin",
    "instances_from_probability",
    "otsu_hed",
    "search_threshold",
    "split_watershed",
    "um2_to_px",
    "um_to_px",
    "watershed_hed",
]


def um_to_px(length_um: float, mpp: float) -> float:
    """A length in micrometres as pixels at ``mpp`` um/px."""
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0 um/px, got {mpp}")
    return float(length_um) / float(mpp)


def um2_to_px(area_um2: float, mpp: float) -> float:
    """An area in square micrometres as pixels at ``mpp`` um/px."""
    return um_to_px(1.0, mpp) ** 2 * float(area_um2)


@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of :func:`instances_from_probability`; sizes in um / um^2.

    Attributes:
        threshold: foreground where probability > threshold.
        min_area_um2: objects of at most this area are removed (3 um^2 is 48 px at 0.25 um/px;
            the smallest real nuclei, e.g. lymphocytes of 5-7 um across, are 20-40 um^2).
        max_hole_um2: holes of at most this area inside the mask are filled.
        split: "watershed" to separate touching nuclei, "none" for connected components.
        markers: "peaks" (peak_local_max of the distance transform, ``min_distance_um`` apart)
            or "hmaxima" (h-maxima of the distance transform with height ``h_um``); ignored when
            a marker map is passed to :func:`instances_from_probability`.
        min_distance_um: least distance between two peak markers.
        h_um: h of the h-maxima markers (the depth a saddle needs to split two nuclei).
        smooth_um: Gaussian sigma applied to the distance transform before finding markers
            (0 = none); damps the jagged maxima of rasterised outlines.
        marker_threshold: threshold of a predicted marker map (USE-Net shape markers).
        min_marker_um2: predicted markers of at most this area are dropped.
        compactness: watershed compactness (0 = classical watershed).
        relief: what the watershed floods from predicted markers: ``"distance"`` (minus the
            distance transform of the mask, seed 002's choice) or ``"marker"`` (minus the marker
            probability: the basins follow the predicted shape markers, which separates touching
            nuclei whose mask has no neck). Without a marker map the distance is always used.
    """

    threshold: float = 0.5
    min_area_um2: float = 3.0
    max_hole_um2: float = 10.0
    split: str = "watershed"
    markers: str = "peaks"
    min_distance_um: float = 1.5
    h_um: float = 0.5
    smooth_um: float = 0.25
    marker_threshold: float = 0.5
    min_marker_um2: float = 1.0
    compactness: float = 0.0
    relief: str = "distance"


def clean_mask(mask: np.ndarray, mpp: float, min_area_um2: float = 3.0, max_hole_um2: float = 10.0) -> np.ndarray:
    """Remove small objects and fill small holes of a binary mask.

    Args:
        mask: (H, W) bool (or non-zero = foreground).
        mpp: resolution in um/px.
        min_area_um2: objects with at most this area (um^2) are removed (8-connectivity).
        max_hole_um2: holes with at most this area (um^2) are filled (4-connected holes).

    Returns:
        (H, W) bool mask.
    """
    m = np.asarray(mask) != 0
    obj = int(um2_to_px(min_area_um2, mpp))
    hole = int(um2_to_px(max_hole_um2, mpp))
    if obj > 0:
        m = remove_small_objects(m, max_size=obj, connectivity=2)
    if hole > 0:
        m = remove_small_holes(m, max_size=hole, connectivity=1)
    return m


def _distance(mask: np.ndarray, mpp: float, smooth_um: float) -> np.ndarray:
    """Euclidean distance to the background in um, (H, W) float32, optionally Gaussian-smoothed."""
    d = ndi.distance_transform_edt(mask).astype(np.float32) * np.float32(mpp)
    if smooth_um > 0:
        d = gaussian(d, sigma=um_to_px(smooth_um, mpp), preserve_range=True).astype(np.float32)
        d[~mask] = 0
    return d


def distance_markers(mask: np.ndarray, mpp: float, method: str = "peaks", min_distance_um: float = 1.5,
                     h_um: float = 0.5, smooth_um: float = 0.25,
                     distance: np.ndarray | None = None) -> np.ndarray:
    """Seeds for the watershed from the distance transform of a binary mask.

    Args:
        mask: (H, W) bool foreground.
        mpp: resolution in um/px.
        method: "peaks": ``skimage.feature.peak_local_max`` with ``min_distance`` (px) =
            ``min_distance_um`` / mpp, computed per connected component; "hmaxima":
            ``skimage.morphology.h_maxima`` with h = ``h_um`` (the distance is in um), each
            maximal plateau one marker.
        min_distance_um, h_um, smooth_um: see :class:`PostprocessConfig`.
        distance: the distance map in um if already computed (from ``_distance``).

    Returns:
        (H, W) int32 marker labels, 0 = no marker.
    """
    mask = np.asarray(mask, bool)
    d = _distance(mask, mpp, smooth_um) if distance is None else distance
    if method == "peaks":
        comps = cc_label(mask, connectivity=2)
        md = max(1, int(round(um_to_px(min_distance_um, mpp))))
        coords = peak_local_max(d, min_distance=md, labels=comps, exclude_border=False)
        markers = np.zeros(mask.shape, np.int32)
        # hand-written: one label per peak (vectorised)
        markers[coords[:, 0], coords[:, 1]] = np.arange(1, len(coords) + 1, dtype=np.int32)
        return markers
    if method == "hmaxima":
        # h_maxima needs h above the image's float resolution; the distance is >= mpp inside.
        peaks = h_maxima(d.astype(np.float64), max(float(h_um), 1e-6)).astype(bool) & mask
        return cc_label(peaks, connectivity=2).astype(np.int32)
    raise ValueError(f"markers must be 'peaks' or 'hmaxima', got {method!r}")


def _label_orphans(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give a new label to each connected part of ``mask`` that ``labels`` left at 0.

    Hand-written (two lines): a mask component that received no marker would otherwise vanish.
    """
    orphans = mask & (labels == 0)
    if orphans.any():
        extra = cc_label(orphans, connectivity=2)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    return labels


def tie_broken_relief(relief: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``relief`` as float64 keys in the same order, but with ties between marker pixels broken by
    raster order (and marker pixels still before other pixels of equal value).

    skimage's watershed pushes all markers with age 0, so markers of equal value leave its heap in
    an order set by the heap's layout, i.e. by every other marker in the image: two touching
    nuclei with equally deep centres could be split differently depending on what else is in the
    image (a tile, a window, the whole slide). With distinct keys every tie is decided by value,
    then age, both local to the connected component, so the split of a cluster does not depend on
    the crop it is seen in (:mod:`wsiseg.instances` relies on this at window seams).
    """
    inside = np.asarray(mask, bool).ravel()
    vals = np.asarray(relief).ravel()[inside]
    _, rank = np.unique(vals, return_inverse=True)  # dense rank of the value: order-preserving
    mk = (np.asarray(markers).ravel()[inside] != 0)
    n_mk = int(np.count_nonzero(mk))
    key = rank.astype(np.int64) * (n_mk + 1) + n_mk  # non-markers: after the markers of their value
    key[mk] -= n_mk - np.arange(n_mk)  # markers: raster rank among markers
    out = np.zeros(inside.size, np.float64)  # float64 holds these integers exactly (< 2**53)
    out[inside] = key
    return out.reshape(np.shape(relief))


def split_watershed(mask: np.ndarray, mpp: float, markers: np.ndarray | None = None,
                    relief: np.ndarray | None = None, cfg: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Split a binary mask into nuclei with a marker-controlled watershed.

    Args:
        mask: (H, W) bool foreground.
        mpp: resolution in um/px.
        markers: (H, W) integer seeds (0 = none), e.g. labelled predicted markers; None derives
            them from the distance transform (:func:`distance_markers` with ``cfg``).
        relief: (H, W) float landscape to flood (low = basin centre); None uses minus the
            distance transform of the mask.
        cfg: marker and watershed parameters.

    Returns:
        (H, W) uint32 instance map; every mask pixel is labelled (components without a marker
        become one nucleus each), labels are 1..N.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.uint32)
    d = None
    if relief is None or markers is None:
        d = _distance(mask, mpp, cfg.smooth_um)
    if markers is None:
        markers = distance_markers(mask, mpp, cfg.markers, cfg.min_distance_um, cfg.h_um, cfg.smooth_um, distance=d)
    else:
        markers = np.where(mask, np.asarray(markers), 0)
    if relief is None:
        relief = -d
    if cfg.compactness == 0:
        relief = tie_broken_relief(relief, markers, mask)
    lab = watershed(relief, markers=markers, mask=mask, compactness=cfg.compactness)
    lab = _label_orphans(lab, mask)
    return _consecutive(lab)


def _consecutive(lab: np.ndarray) -> np.ndarray:
    """Relabel to 1..N in order of first label value, as uint32."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(lab.astype(np.uint32, copy=False))[0].astype(np.uint32, copy=False)


def instances_from_probability(prob: np.ndarray, mpp: float, cfg: PostprocessConfig = PostprocessConfig(),
                               marker_prob: np.ndarray | None = None) -> np.ndarray:
    """Nucleus instances from a probability map (and optionally a predicted marker map).

    Args:
        prob: (H, W) float nucleus probability in [0, 1] (uint8 0..255 is accepted and scaled).
        mpp: resolution of ``prob`` in um/px.
        cfg: threshold, cleaning and splitting parameters (sizes in um).
        marker_prob: optional (H, W) marker probability (USE-Net shape markers, seed 002,
            sec. II-C: "After thresholding shape marker, connected component is applied to it
            ... labeled shape marker map along with the binarized mask are given as inputs to the
            watershed"). Thresholded at ``cfg.marker_threshold``, specks removed, labelled; the
            watershed then floods minus the distance transform of the mask (``cfg.relief =
            "distance"``) or minus the marker probability (``"marker"``) from those markers.

    Returns:
        (H, W) uint32 instance map, 0 = background, nuclei 1..N.
    """
    p = np.asarray(prob)
    if p.dtype == np.uint8:
        p = p.astype(np.float32) / 255
    if p.ndim != 2:
        raise ValueError(f"probability map must be (H, W), got shape {p.shape}")
    mask = clean_mask(p > cfg.threshold, mpp, cfg.min_area_um2, cfg.max_hole_um2)
    if marker_prob is not None:
        mp = np.asarray(marker_prob)
        if mp.dtype == np.uint8:
            mp = mp.astype(np.float32) / 255
        if mp.shape != p.shape:
            raise ValueError(f"marker map shape {mp.shape} differs from the probability map {p.shape}")
        mk = clean_mask((mp > cfg.marker_threshold) & mask, mpp, cfg.min_marker_um2, 0.0)
        if cfg.relief not in ("distance", "marker"):
            raise ValueError(f"relief must be 'distance' or 'marker', got {cfg.relief!r}")
        relief = -mp.astype(np.float32, copy=False) if cfg.relief == "marker" else None
        return split_watershed(mask, mpp, markers=cc_label(mk, connectivity=2), relief=relief, cfg=cfg)
    if cfg.split == "none":
        return _consecutive(cc_label(mask, connectivity=2))
    if cfg.split == "watershed":
        return split_watershed(mask, mpp, cfg=cfg)
    raise ValueError(f"split must be 'watershed' or 'none', got {cfg.split!r}")


def search_threshold(probs_list: Sequence[np.ndarray], gt_list: Sequence[np.ndarray], metric: str | Callable = "aji",
                     mpp: float = 0.5, thresholds: Sequence[float] = tuple(np.round(np.arange(0.3, 0.71, 0.05), 2)),
                     cfg: PostprocessConfig = PostprocessConfig(),
                     markers_list: Sequence[np.ndarray] | None = None) -> tuple[float, dict[float, float]]:
    """Choose the probability threshold that maximises a metric averaged over validation images.

    Seed 001 ("Post-processing the probability map ... involved calculating a threshold that
    maximized precision at a given IoU threshold") is ``metric="precision@0.5"``; AJI is the
    default here because precision alone rewards keeping only the surest nuclei.

    Args:
        probs_list: N probability maps (H_i, W_i) float in [0, 1] at ``mpp``.
        gt_list: N ground-truth instance maps (H_i, W_i), 0 = background.
        metric: a key of :func:`wsiseg.metrics.instance_metrics` (``"aji"``, ``"pq"``, ``"map"``,
            ``"f1@0.5"``...), a key of :func:`wsiseg.metrics.pixel_metrics` (``"dice"``,
            ``"jaccard"``), or a callable (gt, pred_instances) -> float (higher is better).
        mpp: resolution of the maps in um/px.
        thresholds: candidates.
        cfg: the other post-processing parameters (its ``threshold`` is replaced).
        markers_list: optional predicted marker maps, one per image.

    Returns:
        (best threshold, {threshold: mean score over the images}). Ties go to the lowest threshold.
    """
    from wsiseg.metrics import instance_metrics, pixel_metrics

    if len(probs_list) != len(gt_list) or not probs_list:
        raise ValueError("search_threshold needs as many ground-truth maps as probability maps (>= 1)")
    pixel_keys = {"dice", "jaccard", "f1", "precision", "recall", "accuracy"}
    if callable(metric):
        score = metric
    elif metric in pixel_keys:
        def score(g, p):
            return pixel_metrics(g, p)[metric]
    else:
        def score(g, p):
            m = instance_metrics(g, p)
            if metric not in m:
                raise KeyError(f"unknown metric {metric!r}; instance keys: {sorted(m)}, pixel keys: {sorted(pixel_keys)}")
            return m[metric]
    scores: dict[float, float] = {}
    for t in thresholds:
        c = replace(cfg, threshold=float(t))
        vals = []
        for i, (p, g) in enumerate(zip(probs_list, gt_list)):
            mk = None if markers_list is None else markers_list[i]
            vals.append(float(score(g, instances_from_probability(p, mpp, c, marker_prob=mk))))
        scores[float(t)] = float(np.mean(vals))
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


# ----------------------------------------------------------------------- classical baselines


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float haematoxylin optical density from an RGB image (H, W, 3) uint8 (rgb2hed)."""
    return rgb2hed(np.asarray(rgb)[..., :3])[..., 0]


def otsu_hed(rgb: np.ndarray, mpp: float, min_area_um2: float = 3.0, max_hole_um2: float = 10.0) -> np.ndarray:
    """Seed 001's "Otsu threshold" baseline: Otsu on the haematoxylin channel, connected components.

    Args:
        rgb: (H, W, 3) uint8 RGB H&E image.
        mpp: resolution in um/px.
        min_area_um2, max_hole_um2: cleaning of the mask (:func:`clean_mask`; 0 disables).

    Returns:
        (H, W) uint32 instance map (8-connected components of the cleaned mask).
    """
    h = haematoxylin(rgb)
    mask = clean_mask(h > threshold_otsu(h), mpp, min_area_um2, max_hole_um2)
    return _consecutive(cc_label(mask, connectivity=2))


def watershed_hed(rgb: np.ndarray, mpp: float, cfg: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Seed 001's "Watershed transform" baseline: the Otsu-HED mask split by a distance watershed.

    Args:
        rgb: (H, W, 3) uint8 RGB H&E image.
        mpp: resolution in um/px.
        cfg: cleaning and marker parameters (its ``threshold`` is unused: Otsu decides).

    Returns:
        (H, W) uint32 instance map.
    """
    h = haematoxylin(rgb)
    mask = clean_mask(h > threshold_otsu(h), mpp, cfg.min_area_um2, cfg.max_hole_um2)
    return split_watershed(mask, mpp, cfg=cfg)


def fiji_like(rgb: np.ndarray, mpp: float, sigma_um: float = 0.5, h_um: float = 0.125,
              min_area_um2: float = 3.0, channel: str = "grey") -> np.ndarray:
    """Seed 001's "Fiji" baseline, approximated with scikit-image.

    Seed 001: "converted to gray-scale ... a Gaussian filter, thresholding the images, followed
    by applying the watershed transform". Our reading of the usual Fiji macro
    (8-bit, Gaussian Blur, setAutoThreshold("Default"), Convert to Mask, Fill Holes, Watershed,
    Analyze Particles size=...):

    * grey = ``rgb2gray``; Gaussian blur with sigma ``sigma_um`` (0.5 um = Fiji's sigma 2 px at
      0.25 um/px);
    * threshold = ``threshold_isodata`` (ImageJ's "Default" method is a variant of IsoData);
      nuclei are the dark side;
    * ``ndi.binary_fill_holes`` (Fill Holes fills every hole);
    * ImageJ's binary "Watershed" floods the Euclidean distance map from its maxima of
      prominence 0.5 px: here h-maxima of the distance with ``h_um`` (0.125 um = 0.5 px at
      0.25 um/px) and a watershed of minus the distance;
    * particles of at most ``min_area_um2`` removed (Analyze Particles' size filter).

    ``channel="haematoxylin"`` thresholds the haematoxylin density of ``rgb2hed`` instead of the
    grey levels (Fiji's Colour Deconvolution plugin, H&E vector), nuclei on the bright side:
    grey levels alone also catch eosin-dense stroma on images that are not colour-normalised.

    Returns:
        (H, W) uint32 instance map.
    """
    if channel == "grey":
        img = -gaussian(rgb2gray(np.asarray(rgb)[..., :3]), sigma=um_to_px(sigma_um, mpp))
    elif channel == "haematoxylin":
        img = gaussian(haematoxylin(rgb), sigma=um_to_px(sigma_um, mpp))
    else:
        raise ValueError(f"channel must be 'grey' or 'haematoxylin', got {channel!r}")
    mask = ndi.binary_fill_holes(img > threshold_isodata(img))
    mask = clean_mask(mask, mpp, min_area_um2, 0.0)
    cfg = PostprocessConfig(markers="hmaxima", h_um=h_um, smooth_um=0.0)
    return split_watershed(mask, mpp, cfg=cfg)


# ------------------------------------------------------------- USE-Net mask + shape markers


def marker_watershed(mask_prob: np.ndarray, marker_prob: np.ndarray, mpp: float,
                     cfg: PostprocessConfig = PostprocessConfig(), relief: str = "distance") -> np.ndarray:
    """USE-Net's post-processing (seed 002, sec. II-C): nuclei from a predicted mask and a
    predicted shape-marker map by a marker-controlled watershed.

    The mask probability is thresholded at ``cfg.threshold`` and cleaned (specks removed, small
    holes filled, :func:`clean_mask`); the marker probability is thresholded at
    ``cfg.marker_threshold`` inside the mask, markers of at most ``cfg.min_marker_um2`` dropped,
    and labelled by connected components; ``skimage.segmentation.watershed`` then floods from
    those labels within the mask. Mask parts no marker reached become nuclei of their own.

    Args:
        mask_prob, marker_prob: (H, W) probabilities in [0, 1] (uint8 0..255 accepted), e.g. the
            two channels of a ``use_net`` model.
        mpp: resolution in um/px.
        cfg: thresholds and sizes (um / um^2).
        relief: landscape flooded: "distance" (minus the distance transform of the mask, as
            :func:`instances_from_probability`), "probability" (1 - mask probability: borders
            follow the valleys of the predicted mask) or "marker" (1 - marker probability).

    Returns:
        (H, W) uint32 instance map, 0 = background, nuclei 1..N.
    """
    def _unit(a):
        a = np.asarray(a)
        return a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32, copy=False)

    p, mp = _unit(mask_prob), _unit(marker_prob)
    if p.ndim != 2 or mp.shape != p.shape:
        raise ValueError(f"mask and marker maps must be (H, W) of one shape, got {p.shape} and {mp.shape}")
    if relief == "distance":
        return instances_from_probability(p, mpp, cfg, marker_prob=mp)
    if relief not in ("probability", "marker"):
        raise ValueError(f"relief must be 'distance', 'probability' or 'marker', got {relief!r}")
    mask = clean_mask(p > cfg.threshold, mpp, cfg.min_area_um2, cfg.max_hole_um2)
    mk = clean_mask((mp > cfg.marker_threshold) & mask, mpp, cfg.min_marker_um2, 0.0)
    land = 1.0 - (p if relief == "probability" else mp)
    return split_watershed(mask, mpp, markers=cc_label(mk, connectivity=2), relief=land, cfg=cfg)


__all__ += ["marker_watershed"]
