"""Cellularity data sets: the BreastPathQ layout, and CoNSeP as a PROXY-labelled set.

- :func:`load_breastpathq`: the SPIE-AAPM-NCI BreastPathQ 2019 layout, a CSV with the header
  ``slide,rid,y`` (y = the pathologist's tumour cellularity in [0, 1]) and one RGB TIFF per row
  named ``<slide>_<rid>.tif``.
- :func:`consep_proxy_set`: every CoNSeP tile as 4-channel class maps (and optionally its RGB
  image), with the PROXY cellularity of :mod:`wsiseg.cellularity.proxy` (tumour nuclear area / all
  nuclear area; not a pathologist's score) and its source image for splitting.
- :func:`every_nth_image`: a validation split by source image (every n-th in natural order).
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from wsiseg.cellularity.proxy import CHANNELS, CONSEP_MPP, load_consep

BREASTPATHQ_HEADER = ("slide", "rid", "y")


def read_rgb(path: str | Path) -> np.ndarray:
    """An RGB image file as (H, W, 3) uint8 (TIFF via tifffile, falling back to PIL; alpha dropped)."""
    path = Path(path)
    img = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            img = tifffile.imread(str(path))
        except Exception:  # e.g. a compression tifffile cannot decode without imagecodecs
            img = None
    if img is None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB") if im.mode not in ("RGB", "RGBA") else im)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the image ({e})") from None
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{path}: expected an RGB image (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{path}: expected 8-bit RGB, got dtype {img.dtype}")
    return np.ascontiguousarray(img)


def read_breastpathq_csv(csv_path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(ids, y)`` from a BreastPathQ label CSV: ids ``<slide>_<rid>``, y (N,) float64 in [0, 1].

    The header must be exactly ``slide,rid,y`` (whitespace and a UTF-8 BOM tolerated); blank lines
    are skipped; a bad row, a y outside [0, 1] or a repeated ``<slide>_<rid>`` raises ValueError
    naming the line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: label CSV not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{csv_path}: empty file, expected the header {','.join(BREASTPATHQ_HEADER)}")
    header = tuple(c.strip().lower() for c in rows[0][1])
    if header != BREASTPATHQ_HEADER:
        raise ValueError(f"{csv_path}: header is {','.join(rows[0][1])!r}, expected "
                         f"{','.join(BREASTPATHQ_HEADER)!r} (BreastPathQ layout: one row per patch <slide>_<rid>.tif)")
    ids, ys, seen = [], [], {}
    for line, r in rows[1:]:
        if len(r) != 3:
            raise ValueError(f"{csv_path}:{line}: expected 3 fields slide,rid,y, got {len(r)}: {r}")
        slide, rid, yv = (c.strip() for c in r)
        if not slide or not rid:
            raise ValueError(f"{csv_path}:{line}: empty slide or rid")
        try:
            y = float(yv)
        except ValueError:
            raise ValueError(f"{csv_path}:{line}: y {yv!r} is not a number") from None
        if not math.isfinite(y) or not 0.0 <= y <= 1.0:
            raise ValueError(f"{csv_path}:{line}: y = {yv} is outside [0, 1] (cellularity as a fraction)")
        pid = f"{slide}_{rid}"
        if pid in seen:
            raise ValueError(f"{csv_path}:{line}: patch {pid} already listed on line {seen[pid]}")
        seen[pid] = line
        ids.append(pid)
        ys.append(y)
    if not ids:
        raise ValueError(f"{csv_path}: no rows after the header")
    return ids, np.asarray(ys, dtype=np.float64)


def load_breastpathq(csv_path: str | Path, image_dir: str | Path | None = None, ext: str = ".tif",
                     stack: bool = True):
    """``(images, y, ids)`` of a BreastPathQ-layout data set.

    ``csv_path``: the label CSV (header ``slide,rid,y``); ``image_dir``: the folder of the
    ``<slide>_<rid><ext>`` patches (default: the CSV's folder). All image files are checked
    before any is read; missing ones raise FileNotFoundError naming them. ``images``: (N, H, W, 3)
    uint8 when ``stack`` (ValueError if sizes differ), else a list of (H, W, 3) uint8; ``y`` (N,)
    float64 in [0, 1]; ``ids`` the ``<slide>_<rid>`` strings in CSV order.
    """
    ids, y = read_breastpathq_csv(csv_path)
    image_dir = Path(image_dir) if image_dir is not None else Path(csv_path).parent
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    paths = [image_dir / f"{i}{ext}" for i in ids]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {csv_path} are missing from "
                                f"{image_dir}: {', '.join(missing[:10])}{more}")
    images = [read_rgb(p) for p in paths]
    if stack:
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            odd = [i for i, im in zip(ids, images) if im.shape != images[0].shape][:5]
            raise ValueError(f"images differ in size ({sorted(shapes)}), e.g. {odd} vs {ids[0]} "
                             f"{images[0].shape}; pass stack=False for a list")
        images = np.stack(images)
    return images, y, ids


# ------------------------------------------------------------------------------- CoNSeP proxy


def natural_key(s: str):
    """Sort key with digit runs compared as numbers: train_2 < train_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def every_nth_image(image_ids: Sequence[str], n: int = 5, start: int = 0) -> list[str]:
    """Every ``n``-th distinct source image in natural order, from index ``start``.

    For CoNSeP's train_1..train_27 with n = 5: train_1, train_6, train_11, train_16, train_21,
    train_26.
    """
    uniq = sorted(set(image_ids), key=natural_key)
    return uniq[start::n]


@dataclass
class ProxySet:
    """CoNSeP tiles as arrays; ``y`` is the PROXY cellularity, not a pathologist's score."""

    maps: np.ndarray  # (N, 4, h, w) float32 in [0, 1], channels CHANNELS, at ``mpp``
    y: np.ndarray  # (N,) float64 PROXY cellularity (tumour nuclear area / all nuclear area)
    names: list[str]  # tile stems, e.g. train_12_003
    image_ids: list[str]  # source image per tile, e.g. train_12 (split by this)
    mpp: float
    images: np.ndarray | None = None  # (N, h, w, 3) uint8 RGB at ``mpp`` when asked for
    channels: tuple[str, ...] = CHANNELS
    label: str = "PROXY cellularity: tumour (epithelial) nuclear area / all nuclear area, CoNSeP class labels"

    def subset(self, mask) -> ProxySet:
        idx = np.flatnonzero(np.asarray(mask))
        return ProxySet(self.maps[idx], self.y[idx], [self.names[i] for i in idx],
                        [self.image_ids[i] for i in idx], self.mpp,
                        None if self.images is None else self.images[idx], self.channels, self.label)

    def split(self, val_images: Sequence[str]) -> tuple[ProxySet, ProxySet]:
        """``(train, val)`` by source image."""
        v = np.isin(self.image_ids, list(val_images))
        return self.subset(~v), self.subset(v)


def consep_proxy_set(root: str | Path, names: Sequence[str] | None = None, target_mpp: float = 0.5,
                     smooth_sigma: float = 1.0, with_images: bool = False) -> ProxySet:
    """CoNSeP tiles (``root``/classes, and ``root``/images if ``with_images``) as a :class:`ProxySet`.

    Maps come from :func:`wsiseg.cellularity.proxy.load_consep` (one-hot class maps area-averaged to
    ``target_mpp`` and smoothed by ``smooth_sigma`` target px: ground-truth stand-ins for a
    segmentation network's output); images are resized to the same mpp with area averaging.
    """
    tiles = load_consep(root, names, target_mpp=target_mpp, smooth_sigma=smooth_sigma)
    if not tiles:
        raise ValueError(f"{root}: no CoNSeP tiles found")
    images = None
    if with_images:
        import cv2
        from PIL import Image

        scale = CONSEP_MPP / target_mpp
        imgs = []
        for t in tiles:
            p = Path(root) / "images" / f"{t.name}.jpg"
            if not p.is_file():
                p = p.with_suffix(".png")
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
            h, w = t.probs.shape[1:]
            if a.shape[:2] != (h, w):
                a = cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            imgs.append(a)
        images = np.stack(imgs)
    return ProxySet(maps=np.stack([t.probs for t in tiles]), y=np.array([t.proxy for t in tiles]),
                    names=[t.name for t in tiles], image_ids=[t.image_id for t in tiles], mpp=float(target_mpp),
                    images=images)
