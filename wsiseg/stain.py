"""Stain normalisation fitted once per slide, applied to every tile on the predictor's device.

``wsiseg run --stain reinhard|macenko|vahadane [--stain-target IMAGE] [--clahe]``. A slide's
colours are measured once, on the tissue pixels of up to :data:`FIT_TILES` tissue tiles spread
evenly over its tile grid (at the model's resolution), and turned into one
:class:`StainTransform` that every tile of the slide goes through: tiles never get transforms of
their own, so the blended map keeps no seams from colour (a per-tile fit, as TIAToolbox's
normalisers do on patches, would give each tile its own transform).

Methods (each maps the slide's stain statistics onto a target's, the model's training reference
by default, :func:`resolve_spec`):

* ``reinhard`` (Reinhard et al. 2001): each LAB channel standardised by the slide's tissue mean
  and standard deviation and rescaled to the target's. Statistics by torchstain's
  ``TorchReinhardNormalizer.fit`` (CIE LAB, L in 0..100).
* ``macenko`` (Macenko et al. 2009): H and E optical-density vectors from the robust (1st and
  99th percentile) angles of the tissue OD in its plane of largest variance, and the 99th
  percentiles of the H and E concentrations. Fitted by torchstain's ``TorchMacenkoNormalizer.fit``
  (Io 240, beta 0.15, alpha 1).
* ``vahadane`` (Vahadane et al. 2016, seeds 001/002's SPCN): H and E vectors by sparse non-negative
  dictionary learning on the tissue OD (scikit-learn's ``MiniBatchDictionaryLearning``, lambda
  0.1, positive code and dictionary, on up to :data:`VAHADANE_PIXELS` pixels).

For both stain-matrix methods the 3 x 3 stain matrix is H, E and their normalised cross product
(a residual stain, so what H and E do not explain is kept, not dropped), and a pixel is unmixed
by that matrix's inverse: a linear transform of optical density, the same for every pixel (the
lasso concentrations of Vahadane's paper are per pixel and not linear; they are not used to
apply). A transform therefore is ``OD' = OD @ A`` with ``A = inv(S_src) diag(s) S_tgt``, ``s``
the ratios of the target's to the slide's 99th-percentile H and E concentrations (1 for the
residual), computed as ``expm1(b + log1p(rgb) @ A)`` on the device (:class:`DeviceStain`).

``--clahe`` (seed 004's contrast enhancement) is contrast-limited histogram equalisation of the
LAB L channel with one look-up table for the whole slide, fitted on the same sampled pixels (after
the stain transform): OpenCV's CLAHE with a 1 x 1 grid, computed here
(:func:`clahe_lut`; the same bytes as ``cv2.createCLAHE(2.0, (1, 1))``, tested). OpenCV's
adaptive CLAHE (an 8 x 8 grid of tables per image) applied per tile cannot be made
slide-consistent: each tile would get its own grid; ``benchmarks/experiments/stain_seams.py`` measures the
seams that gives.
"""
from __future__ import annotations

import argparse
import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from wsiseg.config import STAIN_METHODS
from wsiseg.config import add_arguments as add_config_arguments

log = logging.getLogger("wsiseg")

METHODS = STAIN_METHODS
IO = 240.0  # transmitted light (Macenko; torchstain's default)
BETA = 0.15  # a pixel is tissue when its optical density exceeds this in every channel
FIT_TILES = 32  # tissue tiles sampled per slide for the fit
MAX_FIT_PIXELS = 1_000_000  # tissue pixels kept for the fit (an even subsample)
VAHADANE_PIXELS = 20_000  # of those, given to the dictionary learning (2-3 s on 2 cores)
MIN_FIT_PIXELS = 2_000  # fewer tissue pixels than this: no fit (no normalisation, a warning)
CLAHE_CLIP = 2.0  # OpenCV's clipLimit (its default is 40; 2 is the value commonly used)


class StainError(ValueError):
    """A stain option that cannot be used; the message says why and what to do."""


# ----------------------------------------------------------------------------- colour spaces

# sRGB (D65) -> XYZ and the reference white, as in torchstain's rgb2lab
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) float RGB in 0..255 -> (..., 3) CIE LAB (D65; L in 0..100), by the formulas
    and constants of torchstain's ``rgb2lab`` and ``lab_split`` (channel last here)."""
    c = rgb / 255
    lin = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    m = torch.as_tensor((_RGB2XYZ / _WHITE[:, None]).T, dtype=rgb.dtype, device=rgb.device)
    t = lin @ m
    f = torch.where(t > 0.008856, t.clamp(min=1e-12).pow(1 / 3), 7.787 * t + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`: (..., 3) CIE LAB -> RGB in 0..255 (clamped)."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -1)
    t = torch.where(f > 0.2068966, f.pow(3), (f - 16 / 116) / 7.787)
    m = torch.as_tensor((np.linalg.inv(_RGB2XYZ) * _WHITE[None, :]).T, dtype=lab.dtype, device=lab.device)
    lin = (t @ m).clamp(0, 1)
    c = torch.where(lin > 0.0031308, 1.055 * lin.pow(1 / 2.4) - 0.055, lin * 12.92)
    return (c * 255).clamp_(0, 255)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> float64 optical density ``-log((rgb + 1) / IO)``."""
    return -np.log((np.asarray(rgb, np.float64) + 1) / IO)


# ----------------------------------------------------------------------------- references


@dataclass(frozen=True)
class StainReference:
    """The stain statistics of an image or slide, as one method measures them.

    ``stain_matrix``: rows H, E, residual, unit OD vectors (macenko, vahadane);
    ``max_concentrations``: the 99th percentiles of the H and E concentrations (unmixed by that
    matrix) over the tissue pixels; ``lab_mean`` / ``lab_std``: of the tissue pixels in CIE LAB
    (L 0..100; reinhard). ``pixels``: how many tissue pixels the fit used; ``origin``:
    where they came from."""

    method: str
    stain_matrix: tuple | None = None
    max_concentrations: tuple | None = None
    lab_mean: tuple | None = None
    lab_std: tuple | None = None
    pixels: int = 0
    origin: str = ""

    def to_dict(self) -> dict:
        d = {"method": self.method, "pixels": self.pixels, "origin": self.origin}
        if self.stain_matrix is not None:
            d["stain_matrix"] = [list(r) for r in self.stain_matrix]
            d["max_concentrations"] = list(self.max_concentrations)
        if self.lab_mean is not None:
            d["lab_mean"], d["lab_std"] = list(self.lab_mean), list(self.lab_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StainReference":
        sm = d.get("stain_matrix")
        return cls(d["method"], None if sm is None else tuple(tuple(float(v) for v in r) for r in sm),
                   None if d.get("max_concentrations") is None else tuple(float(v) for v in d["max_concentrations"]),
                   None if d.get("lab_mean") is None else tuple(float(v) for v in d["lab_mean"]),
                   None if d.get("lab_std") is None else tuple(float(v) for v in d["lab_std"]),
                   int(d.get("pixels", 0)), str(d.get("origin", "")))


def tissue_pixels(images, max_pixels: int = MAX_FIT_PIXELS) -> np.ndarray:
    """(n, 3) uint8: the pixels of ``images`` (arrays (..., 3) uint8, or one) whose optical density
    exceeds :data:`BETA` in every channel, an even subsample of at most ``max_pixels``."""
    if isinstance(images, np.ndarray):
        images = [images]
    px = [im.reshape(-1, 3) for im in images if im.size]
    if not px:
        return np.zeros((0, 3), np.uint8)
    px = np.concatenate(px)
    # OD > BETA in every channel <=> rgb + 1 < IO * exp(-BETA)
    px = px[(px.astype(np.float32) + 1 < IO * math.exp(-BETA)).all(1)]
    if len(px) > max_pixels:
        px = px[np.linspace(0, len(px) - 1, max_pixels).round().astype(np.int64)]
    return np.ascontiguousarray(px)


def _with_residual(he: np.ndarray) -> np.ndarray:
    """(2, 3) H and E OD vectors -> (3, 3) unit rows H, E, their normalised cross product."""
    he = he / np.linalg.norm(he, axis=1, keepdims=True)
    r = np.cross(he[0], he[1])
    return np.vstack([he, r / np.linalg.norm(r)])


def _he_order(he: np.ndarray) -> np.ndarray:
    """H first: the vector that absorbs more red (Macenko's heuristic, as torchstain's)."""
    return he if he[0, 0] >= he[1, 0] else he[::-1]


def _max_concentrations(od: np.ndarray, stains: np.ndarray) -> tuple:
    c = od @ np.linalg.inv(stains)
    return tuple(float(v) for v in np.percentile(c[:, :2], 99, axis=0))


def _stain_vectors(pixels: np.ndarray, method: str) -> np.ndarray:
    """(2, 3) unit H, E OD vectors of tissue pixels (n, 3) uint8."""
    if method == "macenko":
        import torchstain

        n = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        n.fit(torch.from_numpy(pixels.T.reshape(3, 1, -1).copy()), Io=IO, alpha=1, beta=BETA)
        he = n.HERef.double().numpy().T  # (3, 2) columns H, E -> rows
    elif method == "vahadane":
        from sklearn.decomposition import MiniBatchDictionaryLearning

        od = optical_density(pixels[np.linspace(0, len(pixels) - 1, min(len(pixels), VAHADANE_PIXELS))
                                    .round().astype(np.int64)])
        dl = MiniBatchDictionaryLearning(n_components=2, alpha=0.1, positive_code=True, positive_dict=True,
                                         fit_algorithm="cd", transform_algorithm="lasso_cd", batch_size=1024,
                                         max_iter=10, random_state=0)
        with warnings.catch_warnings():  # coordinate descent's convergence notes, per batch
            warnings.simplefilter("ignore")
            dl.fit(od.astype(np.float32))
        he = dl.components_.astype(np.float64)
    else:
        raise StainError(f"unknown stain method {method!r}; use {', '.join(METHODS)}")
    return _he_order(he / np.linalg.norm(he, axis=1, keepdims=True))


def fit_reference(pixels: np.ndarray, method: str, origin: str = "") -> StainReference:
    """The ``method`` statistics of tissue pixels (n, 3) uint8 (see :func:`tissue_pixels`).
    Raises :class:`StainError` when there are too few pixels or the fit is degenerate."""
    if method not in METHODS or method == "none":
        raise StainError(f"unknown stain method {method!r}; use {', '.join(m for m in METHODS if m != 'none')}")
    if len(pixels) < MIN_FIT_PIXELS:
        raise StainError(f"{len(pixels)} tissue pixels (optical density over {BETA} in every channel), "
                         f"fewer than the {MIN_FIT_PIXELS} a fit needs")
    if method == "reinhard":
        import torchstain

        n = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        n.fit(torch.from_numpy(pixels.T.reshape(3, 1, -1).copy()))
        mean = tuple(float(v) for v in n.target_means)
        std = tuple(float(v) for v in n.target_stds)
        if not all(math.isfinite(v) for v in mean + std) or min(std) < 1e-3:
            raise StainError(f"degenerate LAB statistics (std {std}): the pixels have no colour spread")
        return StainReference(method, lab_mean=mean, lab_std=std, pixels=len(pixels), origin=origin)
    stains = _with_residual(_stain_vectors(pixels, method))
    if not np.isfinite(stains).all() or np.linalg.cond(stains) > 1e4:
        raise StainError("degenerate stain matrix (H and E vectors almost parallel): the tissue shows one stain")
    maxc = _max_concentrations(optical_density(pixels), stains)
    if not all(math.isfinite(v) and v > 1e-3 for v in maxc):
        raise StainError(f"degenerate stain concentrations {maxc}")
    return StainReference(method, tuple(tuple(float(v) for v in r) for r in stains), maxc,
                          pixels=len(pixels), origin=origin)


@lru_cache(maxsize=8)
def _image_reference(path: str, size: int, mtime_ns: int, method: str) -> StainReference:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (4096, 4096))  # JPEG: decode at a reduced size if it is huge
            img = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise StainError(f"--stain-target {path}: cannot read it as an image ({e}); give a PNG, JPEG "
                         "or TIFF of H&E tissue") from None
    try:
        return fit_reference(tissue_pixels(img), method, origin=f"image {Path(path).name}")
    except StainError as e:
        raise StainError(f"--stain-target {path}: {e}; give an image with H&E tissue") from None


def reference_from_image(path: str | Path, method: str) -> StainReference:
    """The ``method`` reference of an image file's tissue pixels (a user's ``--stain-target``)."""
    p = Path(path)
    if not p.is_file():
        raise StainError(f"--stain-target {p}: no such file; give a PNG, JPEG or TIFF of H&E tissue")
    st = p.stat()
    return _image_reference(str(p), st.st_size, st.st_mtime_ns, method)


def median_reference(refs: list[StainReference], origin: str) -> StainReference:
    """The typical one of several images' references (each fitted as one slide): the median of
    each statistic (stain vectors renormalised, the residual recomputed). Not one fit of their
    pooled pixels, whose spread between images would widen the LAB deviations and pull the
    percentile angles and concentrations outwards (measured on MoNuSeg's 23 training images:
    Reinhard's L, a, b deviations 14.8, 8.3, 7.4 pooled against medians 12.3, 5.0, 6.5)."""
    method = refs[0].method
    pixels = int(sum(r.pixels for r in refs))
    if method == "reinhard":
        return StainReference(method, lab_mean=tuple(float(v) for v in np.median([r.lab_mean for r in refs], 0)),
                              lab_std=tuple(float(v) for v in np.median([r.lab_std for r in refs], 0)),
                              pixels=pixels, origin=origin)
    he = np.median([np.asarray(r.stain_matrix)[:2] for r in refs], 0)
    return StainReference(method, tuple(tuple(float(v) for v in row) for row in _with_residual(he)),
                          tuple(float(v) for v in np.median([r.max_concentrations for r in refs], 0)),
                          pixels=pixels, origin=origin)


def training_references(images: list, origin: str,
                        methods: tuple[str, ...] = ("reinhard", "macenko", "vahadane")) -> dict:
    """The sidecar's ``stain_reference``: every method's reference of a training set, the
    median of its slides' own fits (:func:`median_reference`). ``images``: one (H, W, 3) uint8
    image per slide, or a list of the tiles of one slide (e.g. CoNSeP's tiles of a source
    image); slides with too little tissue are left out."""
    out = {}
    for m in methods:
        refs = []
        for im in images:
            try:
                refs.append(fit_reference(tissue_pixels(im), m))
            except StainError:
                continue
        if not refs:
            raise StainError(f"no training image has the tissue for a {m} fit")
        out[m] = median_reference(refs, f"median of {len(refs)} per-image fits of {origin}").to_dict()
    out["from"] = origin
    return out


# ----------------------------------------------------------------------------- CLAHE


def clahe_lut(hist: np.ndarray, clip: float = CLAHE_CLIP) -> np.ndarray:
    """(256,) float64 look-up table of contrast-limited histogram equalisation of a (256,)
    histogram, as OpenCV's CLAHE computes one tile's table (clip at ``clip`` x the mean bin,
    the excess spread over all bins, its remainder one count each at even steps; the table the
    cumulative count x 255 / total). OpenCV rounds the table to bytes; this keeps it in float."""
    hist = np.asarray(hist, np.int64).copy()
    total = int(hist.sum())
    if total == 0:
        return np.arange(256, dtype=np.float64)
    limit = max(int(clip * total / 256), 1)
    excess = int(np.maximum(hist - limit, 0).sum())
    hist = np.minimum(hist, limit)
    batch, residual = divmod(excess, 256)
    hist += batch
    if residual:
        step = max(256 // residual, 1)
        idx = np.arange(0, 256, step)[:residual]
        hist[idx] += 1
    return np.cumsum(hist) * (255.0 / total)


# ----------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class StainTransform:
    """One slide's colour transform: its own statistics (``source``) mapped onto ``target``'s,
    then (``clahe_lut``: 256 L values) contrast-limited equalisation of L. Frozen, picklable
    (Dask workers), JSON by :meth:`to_dict` / :meth:`from_dict`. ``fit``: how it was fitted
    (tiles, pixels), for the record."""

    method: str  # none | reinhard | macenko | vahadane
    source: StainReference | None = None
    target: StainReference | None = None
    clahe_lut: tuple | None = None
    fit: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def identity(self) -> bool:
        return self.method == "none" and self.clahe_lut is None

    def od_matrix(self) -> np.ndarray:
        """(3, 3) float64 ``A`` with OD' = OD @ A (row vectors), for macenko / vahadane."""
        s_src, s_tgt = np.asarray(self.source.stain_matrix), np.asarray(self.target.stain_matrix)
        scale = np.array([*(t / s for t, s in zip(self.target.max_concentrations, self.source.max_concentrations)), 1.0])
        return np.linalg.inv(s_src) @ np.diag(scale) @ s_tgt

    def to_dict(self) -> dict:
        d = {"method": self.method, "clahe": self.clahe_lut is not None}
        if self.source is not None:
            d["source"], d["target"] = self.source.to_dict(), self.target.to_dict()
        if self.method in ("macenko", "vahadane"):
            d["od_matrix"] = self.od_matrix().tolist()
        if self.clahe_lut is not None:
            d["clahe_clip"] = CLAHE_CLIP
            d["clahe_lut"] = list(self.clahe_lut)
        if self.fit:
            d["fit"] = dict(self.fit)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StainTransform":
        lut = d.get("clahe_lut")
        return cls(d["method"], None if d.get("source") is None else StainReference.from_dict(d["source"]),
                   None if d.get("target") is None else StainReference.from_dict(d["target"]),
                   None if lut is None else tuple(float(v) for v in lut), dict(d.get("fit") or {}))

    def on(self, device: torch.device | str) -> "DeviceStain":
        """The transform's tensors on ``device``, ready to apply to batches there."""
        return DeviceStain(self, torch.device(device))

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or float RGB in 0..255 (any memory layout) -> float32 (N, 3, H, W)
        in 0..255, channels_last memory, on ``x``'s device. See :class:`DeviceStain`."""
        return self.on(x.device)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def apply_numpy(self, image: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 -> the same shape, uint8 (rounded), on the CPU (training data)."""
        y = self.on("cpu").cpu(image)
        return np.clip(np.round(y), 0, 255).astype(np.uint8)


class DeviceStain:
    """A :class:`StainTransform` with its constants on a device. ``__call__`` maps an
    (N, H, W, 3) uint8 or float RGB tensor (channel last, 0..255) to float32 (N, H, W, 3) RGB in
    0..255 by batched tensor ops: macenko / vahadane ``expm1(b + log1p(rgb) @ A)`` (optical
    density through the 3 x 3 matrix and back, ``b = log(IO) (1 - 1 A)``), reinhard LAB
    ``lab * scale + shift``, CLAHE a linearly interpolated table on L; clamped to 0..255."""

    def __init__(self, t: StainTransform, device: torch.device):
        self.transform = t
        f32 = dict(dtype=torch.float32, device=device)
        self.A = self.b = self.scale = self.shift = self.lut = None
        if t.method in ("macenko", "vahadane"):
            A = t.od_matrix()
            self.A = torch.tensor(A, **f32)
            self.b = torch.tensor(math.log(IO) * (1 - A.sum(0)), **f32)
        elif t.method == "reinhard":
            s, g = t.source, t.target
            scale = np.array(g.lab_std) / np.array(s.lab_std)
            self.scale = torch.tensor(scale, **f32)
            self.shift = torch.tensor(np.array(g.lab_mean) - np.array(s.lab_mean) * scale, **f32)
        elif t.method != "none":
            raise StainError(f"unknown stain method {t.method!r}; use {', '.join(METHODS)}")
        if t.clahe_lut is not None:
            self.lut = torch.tensor(t.clahe_lut, **f32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        v = x.reshape(-1, 3)
        if self.A is None and self.scale is None and self.lut is None:  # identity: a float copy
            return v.to(torch.float32, copy=True).reshape(shape)
        v = v.float()
        if self.A is not None:  # new tensors from here on: the caller's is never written
            v = torch.addmm(self.b, torch.log1p(v), self.A).expm1_().clamp_(0, 255)
        if self.scale is not None or self.lut is not None:
            lab = rgb_to_lab(v)
            if self.scale is not None:
                lab = lab * self.scale + self.shift
            if self.lut is not None:  # on L in bytes (x 2.55, OpenCV's 8-bit L), interpolated
                L = (lab[:, 0] * 2.55).clamp_(0, 255)
                i0 = L.floor().clamp_(max=254)
                frac = L - i0
                i0 = i0.long()
                L = (self.lut[i0] * (1 - frac) + self.lut[i0 + 1] * frac) / 2.55
                lab = torch.cat([L[:, None], lab[:, 1:]], 1)
            v = lab_to_rgb(lab)
        return v.reshape(shape)

    def cpu(self, tiles: np.ndarray, mean=None, std=None) -> np.ndarray:
        """The same transform of (..., H, W, 3) uint8 tiles on the CPU by OpenCV kernels, into
        float32 (..., H, W, 3), then ``(v - mean) / std`` per channel when given (v in 0..255).
        On a CPU shared with reader threads and other jobs, torch's multi-threaded elementwise
        kernels cost about 100 ms per batch of 8 tiles of 256 px (13% of the network's time,
        measured on 2 cores), these 2-3 ms (optical density) to 10-30 ms (LAB, CLAHE). They agree
        with :meth:`__call__` to float rounding for the OD path, to about 0.1 level for LAB."""
        import cv2

        t = self.transform
        shape = tiles.shape
        a = np.ascontiguousarray(tiles).reshape(-1, shape[-2], 3)
        if a.dtype != np.uint8:
            raise ValueError(f"expected uint8 tiles, got {a.dtype}")
        v1 = None  # v + 1 after the OD transform
        if self.A is not None:
            A = t.od_matrix()
            b = math.log(IO) * (1 - A.sum(0))
            z = cv2.transform(cv2.LUT(a, _LOG1P_LUT), np.hstack([A.T, b[:, None]]).astype(np.float32))
            v1 = np.clip(cv2.exp(z), 1, 256, out=z)
        if self.scale is not None or self.lut is not None:
            # linear RGB exactly as rgb_to_lab has it (OpenCV's own sRGB curve is a spline)
            lin = cv2.LUT(a, _LINEAR_LUT) if v1 is None else _linearise((v1 - 1) * np.float32(1 / 255))
            lab = cv2.cvtColor(lin, cv2.COLOR_LRGB2Lab)
            if self.scale is not None:
                sc, sh = self.scale.cpu().numpy(), self.shift.cpu().numpy()
                lab = cv2.transform(lab, np.hstack([np.diag(sc), sh[:, None]]).astype(np.float32))
            if self.lut is not None:  # the table on L in bytes, linearly interpolated (a remap)
                mx = np.ascontiguousarray(lab[..., 0] * np.float32(2.55))
                lut = np.asarray(t.clahe_lut, np.float32)[None] / np.float32(2.55)
                lab[..., 0] = cv2.remap(lut, mx, np.zeros_like(mx), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            v, k, off = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0, 1), 255.0, 0.0
        elif v1 is not None:
            v, k, off = v1, 1.0, -1.0
        else:
            v, k, off = a.astype(np.float32), 1.0, 0.0
        m = np.zeros(3) if mean is None else np.asarray(mean, np.float64).reshape(3)
        s = np.ones(3) if std is None else np.asarray(std, np.float64).reshape(3)
        # (k v + off - m) / s per channel, one affine pass
        aff = np.hstack([np.diag(k / s), ((off - m) / s)[:, None]]).astype(np.float32)
        return cv2.transform(v, aff).reshape(shape)


def _srgb_to_linear(c):
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


def _linearise(c: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 (float32) -> linear RGB, the curve of :func:`rgb_to_lab`."""
    import cv2

    hi = cv2.pow((c + np.float32(0.055)) * np.float32(1 / 1.055), 2.4)
    return np.where(c > np.float32(0.04045), hi, c * np.float32(1 / 12.92)).astype(np.float32)


_LOG1P_LUT = np.repeat(np.log1p(np.arange(256, dtype=np.float64)).astype(np.float32)[None, :, None], 3, axis=2)
_LINEAR_LUT = np.repeat(_srgb_to_linear(np.arange(256) / 255).astype(np.float32)[None, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- per-slide fit


@dataclass(frozen=True)
class StainSpec:
    """What to do to a slide: the method, CLAHE, and the target reference (with its origin)."""

    method: str
    clahe: bool = False
    target: StainReference | None = None

    def params(self) -> dict:
        """The choice as it goes into a run's parameters (a resumed run must not mix others)."""
        return {"method": self.method, "clahe": self.clahe,
                "target_origin": None if self.target is None else self.target.origin}


def resolve_spec(method: str | None, target: str | Path | None, clahe: bool | None, meta: dict) -> StainSpec | None:
    """The normalisation to apply with a model of sidecar ``meta``: ``method`` / ``clahe`` as
    given, or (``None``) as the sidecar's ``stain`` says the model was trained (else none).
    Target: the image ``target`` when given, else the model's own reference (the ``stain``
    reference it was trained with, else its ``stain_reference`` for that method). ``None`` when
    there is nothing to do. Raises :class:`StainError` for an unknown method, an unreadable
    target or a model without a reference."""
    trained = meta.get("stain") or {}
    method = trained.get("method", "none") if method is None else method
    clahe = bool(trained.get("clahe", False)) if clahe is None else bool(clahe)
    if method not in METHODS:
        raise StainError(f"unknown stain method {method!r}; use {', '.join(METHODS)}")
    if method == "none":
        return StainSpec("none", True) if clahe else None
    if target is not None:
        return StainSpec(method, clahe, reference_from_image(target, method))
    mid = meta.get("id", "unknown")
    if trained.get("method") == method and trained.get("reference"):
        ref = StainReference.from_dict(trained["reference"])
    elif (meta.get("stain_reference") or {}).get(method):
        ref = StainReference.from_dict(meta["stain_reference"][method])
    else:
        raise StainError(f"model {mid} records no {method} stain reference in its sidecar (stain_reference); "
                         "give --stain-target IMAGE")
    return StainSpec(method, clahe, StainReference(ref.method, ref.stain_matrix, ref.max_concentrations,
                                                   ref.lab_mean, ref.lab_std, ref.pixels, f"model {mid}: {ref.origin}"))


def fit_transform(spec: StainSpec, images, tiles: int | None = None) -> StainTransform:
    """One transform for all of ``images`` ((H, W, 3) uint8 samples of one slide or image):
    ``spec``'s target, the source fitted on their tissue pixels, CLAHE's table on their L
    channel after the stain transform. Raises :class:`StainError` (too little tissue)."""
    if isinstance(images, np.ndarray):
        images = [images]
    px = tissue_pixels(images)
    fit = {"tiles": len(images) if tiles is None else tiles, "tissue_pixels": int(len(px))}
    t = StainTransform("none", fit=fit)
    if spec.method != "none":
        src = fit_reference(px, spec.method, origin="this slide")
        t = StainTransform(spec.method, src, spec.target, fit=fit)
    if spec.clahe:
        if len(px) < MIN_FIT_PIXELS:
            raise StainError(f"{len(px)} tissue pixels, fewer than the {MIN_FIT_PIXELS} a fit needs")
        import cv2

        hist = np.zeros(256, np.int64)
        dev = t.on("cpu")
        for im in images:  # L after the stain transform, in OpenCV's 8-bit scale (x 2.55)
            rgb = dev.cpu(np.ascontiguousarray(im)).reshape(-1, im.shape[-2], 3)
            L = cv2.cvtColor(_linearise(np.clip(rgb, 0, 255) * np.float32(1 / 255)), cv2.COLOR_LRGB2Lab)[..., 0]
            hist += np.bincount(np.clip(np.round(L * 2.55), 0, 255).astype(np.int64).ravel(), minlength=256)[:256]
        t = StainTransform(t.method, t.source, t.target, tuple(float(v) for v in clahe_lut(hist)), fit)
    return t


def sample_tiles(view, grid, keep: np.ndarray, n: int = FIT_TILES) -> list[np.ndarray]:
    """Up to ``n`` tissue tiles of a slide (those ``keep`` marks, evenly spaced in grid order),
    each the part of its tile inside the image (no mirrored margin), read from ``view`` at the
    model's resolution: the pixels a per-slide fit sees."""
    rows, cols = np.nonzero(keep)
    if not len(rows):
        return []
    pick = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(np.int64))
    out = []
    for i in pick:
        y0, x0, y1, x1 = view.inner(int(grid.ys[rows[i]]), int(grid.xs[cols[i]]), grid.tile, grid.tile)
        out.append(view.read(y0, x0, y1 - y0, x1 - x0))
    return out


def for_slide(spec: StainSpec | None, view, grid, keep: np.ndarray,
              given: StainTransform | None = None) -> tuple[StainTransform | None, dict | None]:
    """(the slide's transform or None, its record for summary.json and the Zarr attributes):
    ``given`` (fitted elsewhere) as it is, else fitted to ``spec`` on :func:`sample_tiles`.
    A slide with too little tissue to fit from is not normalised: (None, a record with
    ``status: skipped`` and the ``warning``), never an error. (None, None): nothing to do."""
    if given is not None:
        return given, {"status": "given", **given_params(given), **given.to_dict()}
    if spec is None:
        return None, None
    tiles = sample_tiles(view, grid, keep)
    try:
        t = fit_transform(spec, tiles)
    except StainError as e:
        msg = f"stain normalisation ({spec.method}{', clahe' if spec.clahe else ''}) skipped, not normalised: {e}"
        return None, {"status": "skipped", "warning": msg, **spec.params()}
    return t, {"status": "fitted", **spec.params(), **t.to_dict()}


def given_params(t: StainTransform) -> dict:
    """A transform handed to the run (not fitted by it), as it goes into the run's parameters."""
    return {"method": t.method, "clahe": t.clahe_lut is not None,
            "target_origin": None if t.target is None else t.target.origin, "given": True}


def from_record(record: dict | None) -> StainTransform | None:
    """The transform a run recorded (:func:`for_slide`'s record), for resuming; None if none."""
    if not record or record.get("status") not in ("fitted", "given"):
        return None
    return StainTransform.from_dict(record)


def for_image(spec: StainSpec | None, image: np.ndarray) -> StainTransform | None:
    """The transform of one (H, W, 3) uint8 image normalised as a slide of its own (fitted on its
    tissue pixels); None when ``spec`` is None or the image has too little tissue to fit."""
    if spec is None:
        return None
    try:
        return fit_transform(spec, image)
    except StainError:
        return None


def normalise_image(image: np.ndarray, spec: StainSpec | None) -> np.ndarray:
    """An (H, W, 3) uint8 image normalised as one slide (fitted on its own tissue pixels),
    uint8; unchanged when ``spec`` is None or the image has too little tissue."""
    if spec is None:
        return image
    try:
        return fit_transform(spec, image).apply_numpy(image)
    except StainError:
        return image


def training_stain(method: str, target: str | None, clahe: bool, images: dict[str, np.ndarray],
                   origin: str, slides: list | None = None) -> tuple[StainSpec | None, dict]:
    """What a trainer's ``stain:`` / ``stain_target:`` / ``clahe:`` config means for its training
    ``images`` (name -> (H, W, 3) uint8): (the spec to normalise every training and validation
    image with, as one slide each; None for none) and the sidecar entries: ``stain_reference``
    (every method's reference of these images, :func:`training_references`: the default target of
    ``wsiseg run --stain`` with this model) and, when normalised, ``stain`` (what the engine then applies by
    default). ``target``: None (the training reference), the name of a training image (seed 002
    picks one) or an image file. ``slides``: the images grouped by slide for the reference
    (default: each image its own slide)."""
    if method not in METHODS:
        raise StainError(f"stain: {method!r}: unknown stain method; use {', '.join(METHODS)}")
    refs = training_references(list(images.values()) if slides is None else slides, origin)
    entries: dict = {"stain_reference": refs}
    if method == "none" and not clahe:
        return None, entries
    ref = None
    if method != "none":
        if target is None:
            ref = StainReference.from_dict(refs[method])
        elif target in images:
            ref = fit_reference(tissue_pixels(images[target]), method, f"training image {target}")
        else:
            ref = reference_from_image(target, method)
    spec = StainSpec(method, bool(clahe), ref)
    entries["stain"] = {"method": method, "clahe": bool(clahe), "reference": None if ref is None else ref.to_dict(),
                        "target_origin": None if ref is None else ref.origin,
                        "applied": "every training and validation image normalised as one slide, fitted on its "
                                   "own tissue pixels (wsiseg.stain.normalise_image)"}
    return spec, entries


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--stain``, ``--stain-target``, ``--clahe`` / ``--no-clahe`` (run, eval, bench, cellularity):
    the ``stain`` concern of :class:`wsiseg.config.RunConfig`'s table."""
    return add_config_arguments(p, "stain")
