"""Tumour cellularity from nuclei probability maps (Rakhlin et al. 2019, section 3.3).

Modules:

- :mod:`wsiseg.cellularity.features`: the 81 hand-crafted features of a (C, H, W) probability patch
  (thresholded areas/activations and Laplacian-of-Gaussian blobs of the Normal, Lymphocyte and
  Malignant maps), with a fast path (one LoG scale-space per map) and the naive
  ``skimage.feature.blob_log`` reference.
- :mod:`wsiseg.cellularity.metrics`: MSE with a bootstrap CI, Cohen's kappa on 4 bins, ICC(2,1) with an
  F-based CI, prediction probability PK.
- :mod:`wsiseg.cellularity.regressors`: a LightGBM regressor with an sklearn-style fit/predict contract
  and pickle-free save/load (LightGBM text model + JSON sidecar).
- :mod:`wsiseg.cellularity.proxy`: *proxy* cellularity labels (tumour nuclear area / all nuclear area)
  and a CoNSeP loader that turns class labels into 4-channel class maps.
- :mod:`wsiseg.cellularity.cnn`: ResNet-34 regressors (timm): the "SR" model on 4-channel maps and the
  direct model on RGB patches (regression or 101-bin classification); safetensors + JSON sidecar.
- :mod:`wsiseg.cellularity.data`: the BreastPathQ layout (``slide,rid,y`` CSV + ``<slide>_<rid>.tif``)
  and CoNSeP as arrays with PROXY labels.

``import wsiseg.cellularity`` imports none of the submodules, so it does not pull in LightGBM, torch or
matplotlib; import the one you need.
"""
from __future__ import annotations

__all__ = ["cnn", "data", "features", "metrics", "proxy", "regressors"]
