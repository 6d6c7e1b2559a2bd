"""The nucleus classes of seed 003 (Rakhlin et al.), defined once for every module.

The class models' channels after ``nucleus`` (and the cellularity regressors' inputs) are
``CLASS_CHANNELS`` in this order; ``NUCLEUS_TYPES`` are the nucleus types among them, what the
GeoJSON and the features name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NUCLEUS_TYPES: tuple[str, ...] = ("normal", "lymphocyte", "malignant")
CLASS_CHANNELS: tuple[str, ...] = (*NUCLEUS_TYPES, "background")

# --- the class-labelled sources, mapped onto CLASS_CHANNELS (indices), defined once ---------------
# CoNSeP classes/<name>.png: 0 background, 1 other, 2 inflammatory, 3 epithelial, 4 spindle.
CONSEP_TO_CHANNEL: dict[int, int] = {0: 3, 1: 0, 2: 1, 3: 2, 4: 0}
CONSEP_TUMOUR_CLASSES: tuple[int, ...] = (3,)  # epithelial: the malignant nuclei of the proxy label
# MoNuSAC masks/<name>.png: 0 none, 1 epithelial, 2 lymphocyte, 3 macrophage, 4 neutrophil
# (macrophages and neutrophils are inflammatory cells: the Lymphocyte channel, as CoNSeP's
# inflammatory class is).
MONUSAC_TO_CHANNEL: dict[int, int] = {0: 3, 1: 2, 2: 1, 3: 1, 4: 1}
CONSEP_MPP = MONUSAC_MPP = 0.25  # um/px of both sources' images (40x)


def source_image(tile_name: str) -> str:
    """The source image (CoNSeP) or slide (MoNuSAC) of a tile named ``<image>_<n>``:
    ``train_12_003`` -> ``train_12``. Splits are by this, never by tile."""
    image, sep, n = tile_name.rpartition("_")
    if not sep or not image or not n.isdigit():
        raise ValueError(f"{tile_name}: not a tile name of the form <image>_<number>")
    return image


def read_class_map(path: str | Path, mapping: dict[int, int], shape: tuple[int, int] | None = None) -> np.ndarray:
    """A source's class map (``classes/<name>.png``, ``masks/<name>.png``) as read for every use:
    a single-channel image of the class ids in ``mapping``, of ``shape`` (its image's) when given.
    Raises ValueError naming the file otherwise."""
    from PIL import Image

    path = Path(path)
    try:
        labels = np.asarray(Image.open(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the class map ({e})") from None
    if labels.ndim != 2 or (shape is not None and labels.shape != tuple(shape)):
        want = f"a {tuple(shape)}" if shape is not None else "a"
        raise ValueError(f"{path}: expected {want} single-channel class map, got shape {labels.shape}")
    unknown = set(np.unique(labels).tolist()) - set(mapping)
    if unknown:
        raise ValueError(f"{path}: class ids {sorted(unknown)} are not in the mapping {mapping}")
    return labels
