"""Nucleus instances for a whole slide, window by window, from a finished run folder.

:func:`write_instances` reads level 0 of the nucleus channel of ``OUT/<stem>/probabilities.zarr``
(the model's resolution, ``wsiseg.mpp`` um/px), runs
:func:`wsiseg.postprocess.instances_from_probability` on overlapping windows and writes

* ``probabilities.zarr/labels/nuclei``: an NGFF 0.4 label image (Zarr format 2, like
  :mod:`wsiseg.store`): group ``labels`` with ``{"labels": ["nuclei"]}``; the label group has its
  own ``multiscales`` (the parent image's axes c, y, x and scales), ``image-label`` with
  ``source.image = "../../"`` and ``wsiseg`` attributes (``mpp``, ``scale_from_level0``, counts,
  ``complete``). Level ``0`` is (1, H, W) uint32 instance ids (0 = background) **at the stored
  map's level-0 resolution, i.e. the model's resolution, not the slide's**: stored pixel (y, x)
  covers slide level-0 pixels ``[y * s, (y + 1) * s) x [x * s, (x + 1) * s)`` with
  ``s = scale_from_level0``. Chunks (1, 512, 512); levels 1.. are ``[::2, ::2]`` of the level
  above (labels are never averaged), aligned with the probability map's levels.
* ``nuclei.geojson``: a GeoJSON FeatureCollection, one Polygon feature per instance (a
  MultiPolygon only if an instance came out in several pieces), in **slide level-0 pixel
  coordinates** (pixel corners at integers, as QuPath uses them), QuPath's conventions
  (0.4+): feature ``id`` a UUID, ``properties.objectType = "detection"``,
  ``properties.classification = {"name": TYPE, "color": [r, g, b]}``,
  ``properties.measurements`` (area in um^2 and px, the label id, the type probabilities).
  With a map that has seed 003's class channels (normal, lymphocyte, malignant), every nucleus
  is typed by its mean class probability over its pixels: TYPE is ``Malignant``, ``Lymphocyte``
  or ``Normal`` (the class with the highest mean), and its probability is that mean divided by
  the sum of the three means (the three shares sum to 1); maps without class channels give
  ``Nucleus``. Outlines are smooth polygons (see :func:`_smooth_ring`): the exact pixel-edge
  outline of the instance with its staircase corners cut (through the edge midpoints) and
  simplified by Douglas-Peucker to within :data:`SIMPLIFY_PX` stored px; ``area_um2`` is the
  pixel count times mpp^2.
* ``nuclei.csv`` (and ``nuclei.parquet`` with pyarrow): one row per instance: ``id`` (the label
  id), ``centroid_x``, ``centroid_y`` (the pixels' mean, slide level-0 px), ``area_um2``,
  ``type``, ``type_probability``, ``p_normal``, ``p_lymphocyte``, ``p_malignant`` (mean
  probabilities inside the nucleus), ``clipped``.

Features and rows are written as each window finishes (never all held in memory); the files
appear atomically at the end.

Memory is bounded by one window: ``window`` x ``window`` core plus margins, never the whole slide.

Seams: each window writes its own core, ids keyed by the first pixel, a guard band for exactness
-----------------------------------------------------------------------------------------------
The map is cut into disjoint **cores** (``window`` x ``window``, raster order). Each core is
processed in an **extended window**: the core grown by ``margin + guard`` on every side that
is not the image edge, where the whole post-processing runs unchanged. Each window then writes
**only its core** of the label image (cores are disjoint, so nothing is written twice and
every pixel is written once). An instance is identified by its **first pixel** (lowest row,
then lowest column, in map coordinates), a property of the instance itself, so all windows that
see a piece of it give that piece the same id (ids are handed out in order of first encounter
from a table that keeps only the keys of the last rows of windows). Its GeoJSON feature is
written once, by the window whose core holds the first pixel, from its full extent.

Ids and pieces agree across seams if every window labels its core exactly as the *whole* map
would be labelled by :func:`instances_from_probability` (with one change, below). That holds
for the instances of
a connected component ``K`` of the cleaned mask (8-connectivity: touching nuclei form one
``K``) that lies at least ``guard`` px inside every side of the extended window that is not the
image edge. Why: the steps are local except through component sizes, and each size test looks no
further than its threshold:

* ``remove_small_objects`` (``a = min_area`` in px): only a component that touches the window
  side and has <= ``a`` px in the window can be decided differently, and all its pixels lie
  within ``a`` px of that side;
* ``remove_small_holes`` (``h = max_hole`` in px): only a background component that touches the
  side, or one next to such a removed speck, can be decided differently: within ``a + h`` px;
* the distance transform of ``K`` needs the mask one pixel around ``K``; its Gaussian smoothing
  (radius ``r = int(4 sigma + 0.5)``) mixes values within ``r`` px, and those values need the
  mask within another ``r + 1`` px;
* markers (``peak_local_max`` per connected component, on ``K``'s bounding box, above the
  image minimum, 0 in any window that holds background), the watershed and the labelling of
  marker-less components are per component. The watershed is a priority flood ordered by
  (value, age); ages are handed out in push order, which restricted to one component does not
  depend on the others, except for the markers: skimage pushes them all with age 0, so equally
  deep markers leave the heap in an order set by the heap's layout, i.e. by all markers of the
  image. :func:`wsiseg.postprocess.split_watershed` therefore floods order-preserving integer
  keys in which such ties go by raster order (:func:`wsiseg.postprocess.tie_broken_relief`), so
  a cluster is split alike in every window and in the whole map.
* predicted shape markers (a mask + marker model: ``marker_channel``) are the connected
  components of the thresholded marker map inside the cleaned mask, specks of at most
  ``min_marker_um2`` removed: local within that many px, which the guard includes; with
  ``relief="marker"`` the flooded landscape is minus the marker probability, pixel by pixel,
  which no window side can change.

Hence ``guard = a + h + 2 r + 4`` px (``a`` the larger of the two speck sizes) (one of them slack): 60 px at 0.5 um/px with the default
config (``a`` = 12, ``h`` = 40, ``r`` = 2).
A window is accepted when every component touching its core passes this test. If one does
not (a cluster reaching more than ``margin`` px beyond the core), the window is redone with
twice the margin, up to ``max_margin``. Beyond that, what the window sees of such a cluster is
cut at the core borders: each instance's part inside the core becomes an instance of its own
(keyed by its first pixel in that core; flagged ``"clipped": true`` in the GeoJSON), counted
(``clipped``) and reported in a warning; the label image still has every pixel written once.
The argument covers ``split="none"`` and the default ``markers="peaks"``;
``markers="hmaxima"`` reconstructs through the background and is exact except, rarely, for tiny
components whose distance never exceeds ``h_um``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import cv2
import numcodecs
import numpy as np
import zarr
from scipy import ndimage as ndi

from wsiseg.classes import NUCLEUS_TYPES
from wsiseg.postprocess import (
    PostprocessConfig,
    instances_from_probability,
    um2_to_px,
    um_to_px,
)
from wsiseg.slide import SlideError

__all__ = ["InstancesError", "guard_px", "write_instances"]

LABEL_NAME = "nuclei"
GEOJSON_NAME = "nuclei.geojson"
TABLE_NAME = "nuclei.csv"
PARQUET_NAME = "nuclei.parquet"
NUCLEUS_COLOR = [255, 0, 0]
# the map's class channels -> the names a QuPath user reads, and their colours
TYPE_CHANNELS = NUCLEUS_TYPES
TYPE_NAMES = {"normal": "Normal", "lymphocyte": "Lymphocyte", "malignant": "Malignant"}
TYPE_COLORS = {"Normal": [40, 170, 60], "Lymphocyte": [40, 90, 220], "Malignant": [220, 30, 30],
               "Nucleus": NUCLEUS_COLOR}
TABLE_COLUMNS = ["id", "centroid_x", "centroid_y", "area_um2", "type", "type_probability",
                 "p_normal", "p_lymphocyte", "p_malignant", "clipped"]
SIMPLIFY_PX = 0.5  # Douglas-Peucker tolerance of the outlines, stored (model) px
_UUID_NS = uuid.UUID("8c1f3a52-3d0e-4a57-9a55-5f0f6b1d2e11")  # fixed: feature ids are reproducible


class InstancesError(SlideError):
    """A run folder whose probability map cannot be turned into instances (missing, incomplete)."""


def guard_px(mpp: float, cfg: PostprocessConfig) -> int:
    """Pixels between a window side and any component whose instances are exact (see module doc)."""
    a = int(um2_to_px(max(cfg.min_area_um2, cfg.min_marker_um2), mpp))
    h = int(um2_to_px(cfg.max_hole_um2, mpp))
    r = int(4.0 * um_to_px(cfg.smooth_um, mpp) + 0.5) if cfg.smooth_um > 0 else 0
    return a + h + 2 * r + 4


# ------------------------------------------------------------------------------ outlines


def _simplify(pts: list) -> list | None:
    """An open ring [[x, y], ...] without repeated and collinear vertices (None if degenerate).
    Plain Python: rings have tens of vertices, where numpy's per-call cost dominates."""
    r = [p for i, p in enumerate(pts) if p != pts[i - 1]] or pts[:1]
    if len(r) >= 3:
        n = len(r)
        keep = []
        for i in range(n):
            (ax, ay), (bx, by), (cx, cy) = r[i - 1], r[i], r[(i + 1) % n]
            if (bx - ax) * (cy - by) != (by - ay) * (cx - bx):
                keep.append(r[i])
        r = keep
    return r if len(r) >= 3 else None


def _signed_area(r: list) -> float:
    """Shoelace area of an open ring [[x, y], ...]: > 0 counter-clockwise in x-right, y-up axes."""
    return 0.5 * sum(r[i - 1][0] * r[i][1] - r[i][0] * r[i - 1][1] for i in range(len(r)))


def _outline(mask: np.ndarray) -> list[list[list]]:
    """The exact pixel-edge outline of a binary mask: polygons, each [exterior, *holes], as open
    rings of integer [x, y] pixel-corner coordinates (the polygon's area is the pixel count).

    OpenCV traces borders through pixel centres; on the mask upsampled 2x every border sub-pixel
    centre lies a quarter pixel inside the pixel edge it belongs to, so rounding each sub-pixel
    coordinate ``u`` to the nearest edge, ``(u + 1) // 2``, gives the pixel-edge polygon exactly.
    """
    h, w = mask.shape
    m2 = np.zeros((2 * h + 4, 2 * w + 4), np.uint8)  # 1 px of padding, upsampled
    m2[2:-2, 2:-2] = cv2.resize(mask.astype(np.uint8, copy=False), (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    contours, hier = cv2.findContours(m2, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None:
        return []
    hier = hier[0]
    polys: dict[int, list] = {}
    for i, c in enumerate(contours):
        r = _simplify(((c[:, 0, :] + 1) // 2 - 1).tolist())  # snap to pixel edges, undo the padding
        if r is None:
            continue
        parent = int(hier[i][3])
        if parent < 0:
            polys.setdefault(i, []).insert(0, r if _signed_area(r) > 0 else r[::-1])
        else:
            polys.setdefault(parent, []).append(r if _signed_area(r) < 0 else r[::-1])
    return [rings for rings in polys.values() if rings and _signed_area(rings[0]) > 0]


def _smooth_ring(r: list, tol: float = SIMPLIFY_PX) -> list:
    """A pixel-edge ring (integer corners) as a smooth one: the ring walked in unit steps, each
    step replaced by its midpoint (so a staircase becomes its diagonal and a corner is cut by half
    a pixel), then simplified by Douglas-Peucker (``cv2.approxPolyDP``) to within ``tol`` px. The
    orientation is kept; rings too small to smooth come back unchanged."""
    pts = np.asarray(r, np.float64)
    nxt = np.roll(pts, -1, axis=0)
    steps = np.abs(nxt - pts).max(axis=1).astype(int)  # edges are axis-parallel: whole pixels long
    dense = np.concatenate([pts[i] + (nxt[i] - pts[i]) * (np.arange(n)[:, None] / n)
                            for i, n in enumerate(steps) if n > 0])
    mid = (dense + np.roll(dense, -1, axis=0)) / 2
    out = cv2.approxPolyDP(mid.astype(np.float32)[:, None, :], tol, True)[:, 0, :].astype(np.float64)
    if len(out) < 3:
        return r
    return out.tolist()


def _geometry(mask: np.ndarray, x0: float, y0: float, scale: float, smooth: bool = True) -> dict | None:
    """GeoJSON geometry of a binary mask whose pixel (0, 0) is map pixel (y0, x0), in slide
    level-0 px (map px * scale): smooth outlines (:func:`_smooth_ring`), or with ``smooth=False``
    the exact pixel-edge outline. Exteriors counter-clockwise, holes clockwise (in x, y numbers)."""
    polys = _outline(mask)
    if not polys:
        return None
    if smooth:
        polys = [[_smooth_ring(r) for r in rings] for rings in polys]
    x0, y0, scale = float(x0), float(y0), float(scale)

    def coords(r: list) -> list:
        return [[round((x + x0) * scale, 3), round((y + y0) * scale, 3)] for x, y in r + r[:1]]

    parts = [[coords(r) for r in rings] for rings in polys]
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": parts[0]}
    return {"type": "MultiPolygon", "coordinates": parts}


def nucleus_type(class_means: np.ndarray | None) -> tuple[str, float | None]:
    """(type name, its probability) from a nucleus' mean probabilities of :data:`TYPE_CHANNELS`
    (None: the map has no class channels -> ("Nucleus", None)). The probability is the chosen
    class's mean over the sum of the three means."""
    if class_means is None:
        return "Nucleus", None
    total = float(np.sum(class_means))
    k = int(np.argmax(class_means))
    return TYPE_NAMES[TYPE_CHANNELS[k]], (float(class_means[k]) / total if total > 0 else 1.0 / len(class_means))


def _feature(mask: np.ndarray, x0: int, y0: int, scale: float, mpp: float, gid: int, source: str,
             clipped: bool = False, class_means: np.ndarray | None = None) -> tuple[str, dict]:
    """One QuPath detection as a GeoJSON Feature (JSON text) and its row of ``nuclei.csv``.
    ``class_means``: the mean probabilities (0..1) of :data:`TYPE_CHANNELS` inside the nucleus."""
    area_px = int(np.count_nonzero(mask))
    area_um2 = round(area_px * mpp * mpp, 4)
    name, prob = nucleus_type(class_means)
    measurements = {"Label": gid, "Area µm^2": area_um2, "Area px (stored)": area_px}
    row = {"id": gid, "area_um2": area_um2, "type": name, "clipped": bool(clipped)}
    ys, xs = np.nonzero(mask)
    row["centroid_x"] = round((float(xs.mean()) + 0.5 + x0) * scale, 3)
    row["centroid_y"] = round((float(ys.mean()) + 0.5 + y0) * scale, 3)
    if class_means is not None:
        measurements["Type probability"] = round(prob, 4)
        row["type_probability"] = round(prob, 4)
        for ch, v in zip(TYPE_CHANNELS, class_means):
            measurements[f"p {ch}"] = round(float(v), 4)
            row[f"p_{ch}"] = round(float(v), 4)
    props = {
        "objectType": "detection",
        "classification": {"name": name, "color": TYPE_COLORS[name]},
        "isLocked": False,
        "measurements": measurements,
        "label": gid,
        "area_um2": area_um2,
    }
    if clipped:
        props["clipped"] = True
    feat = {"type": "Feature", "id": str(uuid.uuid5(_UUID_NS, f"{source}/{gid}")),
            "geometry": _geometry(mask, x0, y0, scale), "properties": props}
    return json.dumps(feat, separators=(",", ":")), row


# ------------------------------------------------------------------------------ windows


class _Window:
    """The instances of one extended window, seen from its core."""

    def __init__(self, lab, origin, core, first, exact, cls=None):
        self.lab = lab  # (h, w) uint32 labels 1..n of the extended window
        self.cls = cls  # (3, h, w) uint8 class probabilities (TYPE_CHANNELS) or None
        self.origin = origin  # (y, x) of the extended window in the map
        self.core = core  # (y0, y1, x0, x1) of the core inside the extended window
        self.first = first  # (n,) flat index (in the window) of each label's first pixel
        self.exact = exact  # (n,) bool: the label's component is exact (see module doc)


def _process_window(arr, c: int, core: tuple[int, int, int, int], shape: tuple[int, int], margin: int,
                    max_margin: int, guard: int, mpp: float, cfg: PostprocessConfig,
                    mc: int | None = None, tc: list[int] | None = None) -> tuple[_Window | None, int]:
    """Instances of the window around ``core`` (y0, y1, x0, x1 in the map), grown until every
    component touching the core is exact or the margin is ``max_margin``; (None if the core
    holds no instance, retries)."""
    H, W = shape
    y0, y1, x0, x1 = core
    m, retries = margin, 0
    thr = np.float32(cfg.threshold)
    while True:
        pad = m + guard
        ey0, ey1, ex0, ex1 = max(0, y0 - pad), min(H, y1 + pad), max(0, x0 - pad), min(W, x1 + pad)
        prob = np.asarray(arr[c, ey0:ey1, ex0:ex1])
        if not (prob.astype(np.float32) / np.float32(255) > thr).any():
            return None, retries
        marker = None if mc is None else np.asarray(arr[mc, ey0:ey1, ex0:ex1])
        lab = instances_from_probability(prob, mpp, cfg, marker_prob=marker)  # labels 1..n
        cy0, cy1, cx0, cx1 = y0 - ey0, y1 - ey0, x0 - ex0, x1 - ex0
        in_core = np.unique(lab[cy0:cy1, cx0:cx1])
        in_core = in_core[in_core > 0]
        if not len(in_core):
            return None, retries
        flat = lab.ravel()
        nz = np.flatnonzero(flat)
        _, idx = np.unique(flat[nz], return_index=True)
        first = nz[idx]  # nz is ascending: the first (raster) pixel of labels 1..n
        comp, _ = ndi.label(lab > 0, structure=np.ones((3, 3), bool))
        eh, ew = lab.shape
        ty0, ty1 = (guard if ey0 > 0 else 0), (eh - guard if ey1 < H else eh)
        tx0, tx1 = (guard if ex0 > 0 else 0), (ew - guard if ex1 < W else ew)
        ok = np.array([s[0].start >= ty0 and s[0].stop <= ty1 and s[1].start >= tx0 and s[1].stop <= tx1
                       for s in ndi.find_objects(comp)], bool)
        exact = ok[comp.ravel()[first] - 1]
        if not exact[in_core - 1].all() and m < max_margin:
            m, retries = min(2 * m if m > 0 else guard, max_margin), retries + 1
            continue
        cls = None if tc is None else np.stack([np.asarray(arr[t, ey0:ey1, ex0:ex1]) for t in tc])
        return _Window(lab, (ey0, ex0), (cy0, cy1, cx0, cx1), first, exact, cls), retries


# ------------------------------------------------------------------------------ output


def _open_run(out_dir: Path, channel: str):
    store = out_dir / "probabilities.zarr"
    if not store.exists():
        raise InstancesError(f"{out_dir}: no probabilities.zarr (run `wsiseg run` first)")
    try:
        grp = zarr.open_group(str(store), mode="r+")
        attrs = dict(grp.attrs["wsiseg"])
        level0 = grp["0"]
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise InstancesError(f"{store}: not a wsiseg probability map ({e})") from None
    if not attrs.get("complete"):
        raise InstancesError(
            f"{store}: the probability map is not complete (the run was interrupted or is still "
            "running); finish it with `wsiseg run` before computing instances"
        )
    classes = list(attrs.get("classes") or [ch["label"] for ch in grp.attrs["omero"]["channels"]])
    if channel not in classes:
        raise InstancesError(f"{store}: no channel {channel!r} (channels: {', '.join(classes)})")
    return grp, attrs, level0, classes.index(channel)


def _create_labels(grp: zarr.Group, store: Path, shapes: list[tuple[int, int]], chunk: int, attrs: dict):
    labels_path = store / "labels"
    zarr.open_group(str(labels_path), mode="a", zarr_format=2)
    lg = zarr.open_group(str(labels_path / LABEL_NAME), mode="w", zarr_format=2)
    compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    for i, (h, w) in enumerate(shapes):
        lg.create_array(str(i), shape=(1, h, w), chunks=(1, min(chunk, h), min(chunk, w)), dtype="uint32",
                        compressors=compressor, fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
    ms = grp.attrs["multiscales"][0]
    lg.attrs.update({
        "multiscales": [{
            "version": "0.4",
            "name": LABEL_NAME,
            "axes": ms["axes"],
            "datasets": [{"path": str(i), "coordinateTransformations": ms["datasets"][i]["coordinateTransformations"]}
                         for i in range(len(shapes))],
            "type": "nearest",
            "metadata": {"description": "every second pixel of the level above ([::2, ::2])"},
        }],
        "image-label": {"version": "0.4", "source": {"image": "../../"},
                        "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}]},
        "wsiseg": {**attrs, "complete": False},
    })
    return lg


def _label_pyramid(lg: zarr.Group, n: int, chunk: int) -> None:
    """Levels 1.. as [::2, ::2] of the level above, block by block (memory: 2 x 2 chunk rows x 4 chunks)."""
    for i in range(1, n):
        src, dst = lg[str(i - 1)], lg[str(i)]
        H, W = dst.shape[1:]
        for r0 in range(0, H, chunk):
            r1 = min(H, r0 + chunk)
            for c0 in range(0, W, 4 * chunk):
                c1 = min(W, c0 + 4 * chunk)
                block = np.asarray(src[0, 2 * r0 : 2 * r1, 2 * c0 : 2 * c1])[::2, ::2]
                if block.any():
                    dst[0, r0:r1, c0:c1] = block[: r1 - r0, : c1 - c0]


def _write_parquet(table_path: Path, parquet_path: Path) -> bool:
    """``nuclei.parquet`` from the finished ``nuclei.csv`` (with pyarrow; False without it)."""
    try:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
    except ImportError:
        return False
    tmp = parquet_path.with_name(parquet_path.name + ".tmp")
    pq.write_table(pcsv.read_csv(str(table_path)), str(tmp))
    os.replace(tmp, parquet_path)
    return True


def write_instances(out_dir: str | Path, cfg: PostprocessConfig | None = None, channel: str = "nucleus",
                    marker_channel: str | None = "auto", window: int = 2048, margin: int = 64, max_margin: int = 512,
                    log: logging.Logger | None = None,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Nucleus instances of a finished run folder: label image + QuPath GeoJSON (see module doc).

    Args:
        out_dir: ``OUT/<stem>/`` of a complete ``wsiseg run`` (holds ``probabilities.zarr``).
        cfg: post-processing (threshold, cleaning, splitting; sizes in um); default
            ``PostprocessConfig()``.
        channel: the probability channel to segment.
        marker_channel: the predicted shape-marker channel for a marker-controlled watershed
            (seed 002); "auto" uses the channel ``marker`` when the map has one, None never.
        window: core size in stored (model) px; multiples of the chunk (512) read best.
        margin: how far (px) an instance cluster may reach beyond a core and still be exact on the
            first try; windows with larger clusters are redone with doubled margin.
        max_margin: the largest margin tried; clusters reaching further are cut at the core
            borders (counted in ``clipped`` and warned about).
        log: logger for the warning about clipped instances (default ``logging.getLogger("wsiseg")``).
        progress: called with 1 after each window.

    Returns:
        ``{"instances"`` (GeoJSON features), ``"windows"``, ``"windows_with_nuclei"``,
        ``"retried_windows"`` (redone with a larger margin), ``"clipped"`` (instances cut at a
        core border, 0 when every cluster fit), ``"label_ids"`` (ids used in the label image;
        equals ``instances`` unless something was clipped), ``"seconds"``, ``"guard"``, ``"mpp"``,
        ``"scale_from_level0"``, ``"labels"`` (path of the label group), ``"geojson"`` (path)}``.

    Raises:
        InstancesError: no store, a store that is not complete, or no such channel.
    """
    t0 = time.perf_counter()
    log = log or logging.getLogger("wsiseg")
    cfg = cfg or PostprocessConfig()
    out_dir = Path(out_dir)
    if window < 16 or margin < 0 or max_margin < margin:
        raise ValueError(f"need window >= 16 and 0 <= margin <= max_margin (got {window}, {margin}, {max_margin})")
    grp, attrs, level0, c = _open_run(out_dir, channel)
    marker_channel, mc, tc = _marker_and_type_channels(out_dir, grp, attrs, marker_channel)
    store = out_dir / "probabilities.zarr"
    mpp = float(attrs["mpp"])
    scale = float(attrs.get("scale_from_level0", 1.0))
    H, W = level0.shape[1:]
    chunk = int(attrs.get("params", {}).get("chunk", 512))
    n_levels = len(grp.attrs["multiscales"][0]["datasets"])
    shapes = [tuple(grp[str(i)].shape[1:]) for i in range(n_levels)]
    guard = guard_px(mpp, cfg)
    source = str(attrs.get("source", out_dir.name))

    geo_path = out_dir / GEOJSON_NAME
    table_path, parquet_path = out_dir / TABLE_NAME, out_dir / PARQUET_NAME
    for stale in (geo_path, table_path, parquet_path):  # never leave a stale file beside a new label image
        stale.unlink(missing_ok=True)
    lattrs = {
        "channel": channel,
        "marker_channel": marker_channel,
        "type_channels": list(TYPE_CHANNELS) if tc is not None else None,
        "mpp": mpp,
        "scale_from_level0": scale,
        "resolution": "stored map level 0 (the model's resolution); slide level-0 px = stored px * scale_from_level0",
        "postprocess": asdict(cfg),
        "window": window,
        "margin": margin,
        "max_margin": max_margin,
        "guard": guard,
        "source": source,
    }
    lg = _create_labels(grp, store, shapes, chunk, lattrs)
    tmp = geo_path.with_name(geo_path.name + ".tmp")
    table_tmp = table_path.with_name(table_path.name + ".tmp")
    n_windows = n_busy = n_retried = 0
    with _FeatureWriter(tmp, table_tmp, lg["0"], W, scale, mpp, source) as writer:
        for y0 in range(0, H, window):
            writer.forget_above(y0 - max_margin - 1)  # instances starting there can no longer be met
            for x0 in range(0, W, window):
                core = (y0, min(H, y0 + window), x0, min(W, x0 + window))
                win, retries = _process_window(level0, c, core, (H, W), margin, max_margin, guard, mpp, cfg, mc, tc)
                n_windows += 1
                n_retried += retries > 0
                if progress:
                    progress(1)
                if win is not None:
                    n_busy += 1
                    writer.add(win, core)
    _label_pyramid(lg, n_levels, chunk)
    result = {
        "instances": writer.n_inst,
        "windows": n_windows,
        "windows_with_nuclei": n_busy,
        "retried_windows": n_retried,
        "clipped": writer.n_clipped,
        "label_ids": writer.n_ids,
        "seconds": round(time.perf_counter() - t0, 3),
        "guard": guard,
        "mpp": mpp,
        "scale_from_level0": scale,
        "types": dict(sorted(writer.types.items())),
        "labels": str(store / "labels" / LABEL_NAME),
        "geojson": str(geo_path),
        "table": str(table_path),
    }
    os.replace(table_tmp, table_path)
    if _write_parquet(table_path, parquet_path):
        result["parquet"] = str(parquet_path)
    os.replace(tmp, geo_path)
    lg.attrs["wsiseg"] = {**lattrs, **{k: result[k] for k in ("instances", "windows", "retried_windows", "clipped",
                                                                  "label_ids", "types")}, "complete": True}
    labels_grp = zarr.open_group(str(store / "labels"), mode="a", zarr_format=2)
    names = [n for n in labels_grp.attrs.get("labels", []) if n != LABEL_NAME]
    labels_grp.attrs["labels"] = names + [LABEL_NAME]
    if writer.n_clipped:
        log.warning("%s: %d nucleus instance(s) are parts of clusters reaching more than %d px beyond a %d px "
                    "window: cut at the window borders (flagged 'clipped' in %s)", out_dir.name, writer.n_clipped,
                    max_margin, window, GEOJSON_NAME)
    return result


def _marker_and_type_channels(out_dir: Path, grp: zarr.Group, attrs: dict, marker_channel: str | None):
    """The marker channel's name and index (None, None without one) and the type channels'
    indices (None unless the map has all of TYPE_CHANNELS)."""
    classes = list(attrs.get("classes") or [ch["label"] for ch in grp.attrs["omero"]["channels"]])
    if marker_channel == "auto":
        marker_channel = "marker" if "marker" in classes else None
    if marker_channel is not None and marker_channel not in classes:
        raise InstancesError(f"{out_dir}: no marker channel {marker_channel!r} (channels: {', '.join(classes)})")
    mc = None if marker_channel is None else classes.index(marker_channel)
    tc = [classes.index(t) for t in TYPE_CHANNELS] if all(t in classes for t in TYPE_CHANNELS) else None
    return marker_channel, mc, tc


class _FeatureWriter:
    """The label image's level 0, the GeoJSON and the nuclei table, filled window by window.

    Each instance gets one id, wherever it is met: the key of an exact instance is the map flat
    index of its first pixel (so the windows that see it agree), and it is written (feature, table
    row) by the window whose core holds that pixel. A clipped part is an instance of its own core."""

    def __init__(self, geo_tmp: Path, table_tmp: Path, labels0, width: int, scale: float, mpp: float, source: str):
        self._paths, self._labels0, self._W = (geo_tmp, table_tmp), labels0, width
        self._scale, self._mpp, self._source = scale, mpp, source
        self.n_inst = self.n_ids = self.n_clipped = 0
        self.types: dict[str, int] = {}
        self._ids: dict[int, int] = {}  # instance key -> id
        self._sep = "\n"

    def __enter__(self):
        self._f = open(self._paths[0], "w")
        self._tf = open(self._paths[1], "w", newline="")
        self._table = csv.DictWriter(self._tf, fieldnames=TABLE_COLUMNS)
        self._table.writeheader()
        self._f.write('{"type":"FeatureCollection","features":[')
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self._f.write("\n]}\n")
                for fh in (self._f, self._tf):
                    fh.flush()
                    os.fsync(fh.fileno())
        finally:
            self._f.close()
            self._tf.close()

    def forget_above(self, row: int) -> None:
        """Drop the keys of instances whose first pixel lies above map row ``row``."""
        self._ids = {k: v for k, v in self._ids.items() if k // self._W >= row}

    def _id(self, key: int) -> int:
        gid = self._ids.get(key)
        if gid is None:
            self.n_ids += 1
            gid = self._ids[key] = self.n_ids
        return gid

    def add(self, win: _Window, core: tuple[int, int, int, int]) -> None:
        """The instances of ``win`` whose part lies in ``core`` (y0, y1, x0, x1 in the map)."""
        y0, y1, x0, x1 = core
        W = self._W
        lab, (oy, ox), (cy0, cy1, cx0, cx1) = win.lab, win.origin, win.core
        ew = lab.shape[1]
        core_lab = lab[cy0:cy1, cx0:cx1]
        cflat = core_lab.ravel()
        cnz = np.flatnonzero(cflat)
        in_core, idx = np.unique(cflat[cnz], return_index=True)
        cfirst = cnz[idx]  # first pixel of each label's part inside the core
        lut = np.zeros(len(win.first) + 1, np.uint32)
        slices = core_slices = None
        for k, cf in zip(in_core.tolist(), cfirst.tolist()):
            exact = bool(win.exact[k - 1])
            if exact:
                fy, fx = divmod(int(win.first[k - 1]), ew)
                key = (oy + fy) * W + ox + fx
                owner = cy0 <= fy < cy1 and cx0 <= fx < cx1
            else:  # clipped: the part inside this core is an instance of its own
                fy, fx = divmod(cf, x1 - x0)
                key = (y0 + fy) * W + x0 + fx
                owner = True
            gid = lut[k] = self._id(key)
            if not owner:
                continue
            if exact:
                if slices is None:
                    slices = ndi.find_objects(lab)
                sl = slices[k - 1]
                mask, gy, gx = lab[sl] == k, oy + sl[0].start, ox + sl[1].start
                wsl = sl
            else:
                if core_slices is None:
                    core_slices = ndi.find_objects(core_lab)
                sl = core_slices[k - 1]
                mask, gy, gx = core_lab[sl] == k, y0 + sl[0].start, x0 + sl[1].start
                wsl = (slice(sl[0].start + cy0, sl[0].stop + cy0), slice(sl[1].start + cx0, sl[1].stop + cx0))
                self.n_clipped += 1
            means = None if win.cls is None else win.cls[:, wsl[0], wsl[1]][:, mask].mean(axis=1) / 255.0
            self.n_inst += 1
            text, row = _feature(mask, gx, gy, self._scale, self._mpp, int(gid), self._source, clipped=not exact,
                                 class_means=means)
            self._f.write(self._sep + text)
            self._table.writerow(row)
            self.types[row["type"]] = self.types.get(row["type"], 0) + 1
            self._sep = ",\n"
        self._labels0[0, y0:y1, x0:x1] = lut[core_lab]
