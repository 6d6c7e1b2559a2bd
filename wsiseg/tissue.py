"""Tissue detection on a thumbnail: Otsu on HSV saturation, capped, plus morphology."""
from __future__ import annotations

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

# Saturation (0..1) above which a pixel is tissue whatever Otsu says: an image that is all tissue
# (a patch) would otherwise be split in two by Otsu.
MAX_THRESHOLD = 0.08
# Below this, nothing is tissue: blank glass and white backgrounds.
MIN_THRESHOLD = 0.03


def tissue_mask(thumb: np.ndarray, min_area_frac: float = 1e-4) -> np.ndarray:
    """Boolean (h, w) tissue mask of an RGB uint8 thumbnail (h, w, 3).

    Threshold: Otsu on saturation, clamped to [MIN_THRESHOLD, MAX_THRESHOLD]; then a closing,
    removal of specks below ``min_area_frac`` of the thumbnail and filling of small holes.
    """
    hsv = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1].astype(np.float32) / 255
    # Very dark pixels (pen, folds in black) have noisy saturation; keep them only if saturated.
    if sat.max() - sat.min() > 1e-3:
        t = float(threshold_otsu(sat))
    else:
        t = MAX_THRESHOLD
    t = min(max(t, MIN_THRESHOLD), MAX_THRESHOLD)
    mask = sat > t
    if not mask.any():
        return mask
    k = max(1, round(min(mask.shape) / 200))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0
    min_size = max(1, int(min_area_frac * mask.size))
    mask = remove_small_objects(mask, max_size=min_size)
    mask = remove_small_holes(mask, max_size=min_size * 10)
    return mask
