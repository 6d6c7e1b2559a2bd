"""PROXY cellularity labels from class-labelled nuclei, and a CoNSeP loader.

No public cellularity-scored patches exist offline (BreastPathQ's are not redistributable), so
the regressors are trained and checked here on a *proxy*: for a patch, the tumour (malignant /
epithelial) nuclear area divided by all nuclear area, 0 when the patch has no nuclei. It is a
stand-in with the same range and meaning of "share of tumour", not the pathologists' tumour
cellularity (which is the share of tumour bed area occupied by malignant cells); call it a proxy
wherever it is reported.

CoNSeP (Graham et al. 2019; colorectal adenocarcinoma, 40x = 0.25 um/px) class maps are uint8:
0 background, 1 other, 2 inflammatory, 3 epithelial, 4 spindle. The mapping to the paper's
classes: inflammatory -> Lymphocyte, epithelial -> Malignant (CoNSeP's epithelium is mostly
malignant), other and spindle -> Normal. Each tile becomes a 4-channel class "probability" map
(one-hot from the labels, area-averaged to the target resolution, optionally Gaussian-smoothed)
in the order :data:`CHANNELS` = Normal, Lymphocyte, Malignant, Background.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from wsiseg.classes import CLASS_CHANNELS, CONSEP_MPP, CONSEP_TUMOUR_CLASSES, read_class_map, source_image
from wsiseg.classes import CONSEP_TO_CHANNEL as CONSEP_CLASS_TO_CHANNEL
from wsiseg.splits import split_by

CHANNELS: tuple[str, ...] = CLASS_CHANNELS


def proxy_cellularity(classes: np.ndarray, tumour_classes: Iterable[int] = CONSEP_TUMOUR_CLASSES,
                      background: int = 0) -> float:
    """The proxy label of one patch: tumour nuclear area / all nuclear area (0 with no nuclei).

    ``classes``: (H, W) integer class map at any resolution (areas are pixel counts);
    ``background`` marks non-nucleus pixels, every other value is a nucleus of some class.
    Returns a float in [0, 1].
    """
    c = np.asarray(classes)
    nuclei = np.count_nonzero(c != background)
    if nuclei == 0:
        return 0.0
    return float(np.count_nonzero(np.isin(c, list(tumour_classes))) / nuclei)


def class_maps(classes: np.ndarray, mapping: Mapping[int, int] = CONSEP_CLASS_TO_CHANNEL, scale: float = 1.0,
               smooth_sigma: float = 0.0, n_channels: int = len(CHANNELS)) -> np.ndarray:
    """One-hot class maps from a label image, resized and smoothed.

    ``classes``: (H, W) integer labels; ``mapping``: label -> channel index (labels not in it
    raise). ``scale`` = output px / input px (0.5 halves each side; area averaging, so a map
    pixel is the fraction of its area in each class). ``smooth_sigma``: Gaussian sigma in output
    pixels (0 = none), mode 'reflect', so channels still sum to 1. Returns
    (n_channels, round(H * scale), round(W * scale)) float32 in [0, 1].
    """
    c = np.asarray(classes)
    unknown = set(np.unique(c).tolist()) - set(mapping)
    if unknown:
        raise ValueError(f"class ids {sorted(unknown)} have no channel in the mapping {dict(mapping)}")
    lut = np.zeros(max(mapping) + 1, dtype=np.intp)
    for k, v in mapping.items():
        lut[k] = v
    idx = lut[c]
    maps = np.stack([(idx == ch).astype(np.float32) for ch in range(n_channels)])
    if scale != 1.0:
        import cv2

        h, w = c.shape
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        maps = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA) for m in maps])
    if smooth_sigma > 0:
        maps = np.stack([ndi.gaussian_filter(m, smooth_sigma, mode="reflect") for m in maps])
    return np.clip(maps, 0.0, 1.0, out=maps).astype(np.float32, copy=False)


@dataclass
class ProxyTile:
    """One labelled tile: class maps and its PROXY cellularity."""

    name: str  # e.g. "train_12_003"
    image_id: str  # the source image, e.g. "train_12" (split by this, never by tile)
    probs: np.ndarray  # (4, h, w) float32, channels CHANNELS, at the loader's target mpp
    proxy: float  # tumour nuclear area / all nuclear area, from the full-resolution labels
    channels: tuple[str, ...] = CHANNELS


def consep_image_id(name: str) -> str:
    """``train_12_003`` -> ``train_12`` (CoNSeP tiles are ``<image>_<tile>``)."""
    return source_image(Path(name).stem)


def load_consep(root: str | Path, names: Sequence[str] | None = None, target_mpp: float = 0.5,
                smooth_sigma: float = 1.0) -> list[ProxyTile]:
    """CoNSeP tiles as 4-channel class maps plus PROXY cellularity labels.

    ``root``: a CoNSeP split folder with ``classes/<name>.png`` (uint8 class ids; ``images/`` and
    ``instances/`` are not needed here). ``names``: tile stems (default: all, sorted).
    ``target_mpp``: resolution of the maps (default 0.5 um/px, the engine's, so 256 px tiles at
    0.25 um/px become 128 px); ``smooth_sigma`` in target pixels (1.0 softens the one-hot edges
    the way a network's probabilities are soft). The proxy is computed on the full-resolution
    labels. Returns a list of :class:`ProxyTile` in ``names`` order.
    """

    cdir = Path(root) / "classes"
    if not cdir.is_dir():
        raise FileNotFoundError(f"{cdir}: no CoNSeP class maps here (expected <root>/classes/<name>.png)")
    if names is None:
        names = sorted(p.stem for p in cdir.glob("*.png"))
    scale = CONSEP_MPP / target_mpp
    tiles = []
    for name in names:
        labels = read_class_map(cdir / f"{name}.png", CONSEP_CLASS_TO_CHANNEL)
        tiles.append(ProxyTile(
            name=name,
            image_id=consep_image_id(name),
            probs=class_maps(labels, CONSEP_CLASS_TO_CHANNEL, scale=scale, smooth_sigma=smooth_sigma),
            proxy=proxy_cellularity(labels, CONSEP_TUMOUR_CLASSES),
        ))
    return tiles


def split_by_image(tiles: Sequence[ProxyTile], val_images: Iterable[str]) -> tuple[list[ProxyTile], list[ProxyTile]]:
    """``(train, val)``: tiles whose ``image_id`` is in ``val_images`` go to val, the rest to train."""
    return split_by(tiles, lambda t: t.image_id, val_images)
