"""The nucleus classes of seed 003 (Rakhlin et al.), defined once for every module.

The class models' channels after ``nucleus`` (and the cellularity regressors' inputs) are
``CLASS_CHANNELS`` in this order; ``NUCLEUS_TYPES`` are the nucleus types among them, what the
GeoJSON and the features name.
"""
from __future__ import annotations

NUCLEUS_TYPES: tuple[str, ...] = ("normal", "lymphocyte", "malignant")
CLASS_CHANNELS: tuple[str, ...] = (*NUCLEUS_TYPES, "background")
