"""Loaders for the nuclei data sets in ../shared/data, resampled to the model's resolution.

Every loader returns a list of :class:`Sample`: an RGB uint8 image (H, W, 3) and a binary
nucleus mask (H, W) uint8 in {0, 1}, both at ``target_mpp`` micrometres per pixel, plus the
instance map (H, W) int32 when the data set has one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsiseg.splits import every_nth, split_by
from wsiseg.classes import (CLASS_CHANNELS, CONSEP_MPP, CONSEP_TO_CHANNEL, MONUSAC_MPP,
                            MONUSAC_TO_CHANNEL, read_class_map, source_image)

MONUSEG_MPP = 0.25

# MoNuSeg 2018 training images by organ (TCGA tissue source sites), for a split by image.
MONUSEG_ORGANS = {
    "breast": ["TCGA-A7-A13E", "TCGA-A7-A13F", "TCGA-AR-A1AK", "TCGA-AR-A1AS", "TCGA-E2-A14V", "TCGA-E2-A1B5"],
    "kidney": ["TCGA-B0-5698", "TCGA-B0-5710", "TCGA-B0-5711", "TCGA-HE-7128", "TCGA-HE-7129", "TCGA-HE-7130"],
    "liver": ["TCGA-18-5592", "TCGA-21-5784", "TCGA-21-5786", "TCGA-38-6178", "TCGA-49-4488", "TCGA-50-5931"],
    "prostate": ["TCGA-CH-5767", "TCGA-G9-6336", "TCGA-G9-6348", "TCGA-G9-6356", "TCGA-G9-6362", "TCGA-G9-6363"],
    "bladder": ["TCGA-DK-A2I6", "TCGA-G2-A2EK"],
    "colon": ["TCGA-AY-A8YK", "TCGA-NH-A8F7"],
    "stomach": ["TCGA-KB-A93J", "TCGA-RD-A8N9"],
}
# Validation split: the first image of each organ (7 of 30), never seen in training.
MONUSEG_VAL = [ids[0] for ids in MONUSEG_ORGANS.values()]


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB at the target mpp
    mask: np.ndarray  # (H, W) uint8 {0, 1}
    instances: np.ndarray | None = None  # (H, W) int32 ids, 0 = background


def resample(img: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    """Resize by ``scale`` (output/input); area averaging when shrinking, nearest for labels."""
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return cv2.resize(img, size, interpolation=interp)


def load_monuseg(root: str | Path, target_mpp: float, names: list[str] | None = None,
                 source_mpp: float = MONUSEG_MPP) -> list[Sample]:
    """Load MoNuSeg images (``images/``, ``masks/``, ``instances/``) at ``target_mpp``.

    ``names`` selects images by id prefix (e.g. ``TCGA-A7-A13E``); None loads all.
    The mask is re-derived from the resampled mask by a 0.5 threshold of its area average,
    so a nucleus keeps its area when shrunk. ``source_mpp`` is the files' resolution (0.25 as
    MoNuSeg is distributed; a copy written by :func:`write_monuseg` at the model's resolution
    loads the same pixels without resampling).
    """
    root = Path(root)
    files = sorted((root / "images").glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{root}: no images/*.png (expected the MoNuSeg layout)")
    scale = source_mpp / target_mpp
    out = []
    for f in files:
        if names is not None and not any(f.stem.startswith(n) for n in names):
            continue
        img = np.asarray(Image.open(f).convert("RGB"))
        mask = (np.asarray(Image.open(root / "masks" / f.name)) > 0).astype(np.float32)
        inst = np.asarray(Image.open(root / "instances" / f.name)).astype(np.int32)
        img = resample(img, scale)
        mask = (resample(mask, scale) >= 0.5).astype(np.uint8)
        inst = resample(inst, scale, nearest=True)
        out.append(Sample(f.stem, np.ascontiguousarray(img), mask, inst))
    return out


def split_monuseg(root: str | Path, target_mpp: float,
                  source_mpp: float = MONUSEG_MPP) -> tuple[list[Sample], list[Sample]]:
    """(train, val) by image: validation is :data:`MONUSEG_VAL`, one image per organ."""
    all_ids = [i for ids in MONUSEG_ORGANS.values() for i in ids]
    train_ids = [i for i in all_ids if i not in MONUSEG_VAL]
    return (load_monuseg(root, target_mpp, train_ids, source_mpp),
            load_monuseg(root, target_mpp, MONUSEG_VAL, source_mpp))


def write_monuseg(samples: list[Sample], root: str | Path) -> Path:
    """Write samples in the MoNuSeg layout (``images/``, ``masks/``, ``instances/`` PNGs,
    lossless): e.g. the data set resampled to the model's resolution, a quarter of the bytes to
    copy to a training machine (load it with ``source_mpp`` = that resolution)."""
    root = Path(root)
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in samples:
        Image.fromarray(s.image).save(root / "images" / f"{s.name}.png")
        Image.fromarray((s.mask > 0).astype(np.uint8) * 255).save(root / "masks" / f"{s.name}.png")
        if s.instances is None:
            raise ValueError(f"{s.name}: no instance map to write")
        if int(s.instances.max()) > 65535:
            raise ValueError(f"{s.name}: more than 65535 instances do not fit a uint16 PNG")
        Image.fromarray(s.instances.astype(np.uint16)).save(root / "instances" / f"{s.name}.png")
    return root


def data_hash(samples: list[Sample]) -> str:
    """A short SHA-256 over names and pixels: stored with the weights to identify the data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(s.image.tobytes())
        h.update(s.mask.tobytes())
    return h.hexdigest()[:16]


# --- class-labelled nuclei: CoNSeP and MoNuSAC, mapped to seed 003's channels -----------------
# Channel order of the class head (seed 003): CLASS_CHANNELS; the sources' mappings: wsiseg.classes.


@dataclass
class ClassSample:
    name: str
    group: str  # the source image (CoNSeP) or slide (MoNuSAC): split by this, never by tile
    image: np.ndarray  # (H, W, 3) uint8 RGB at the target mpp
    classes: np.ndarray  # (H, W) uint8 channel index into CLASS_CHANNELS
    instances: np.ndarray | None = None  # (H, W) int32 nucleus ids where the data set has them (CoNSeP)

    @property
    def mask(self) -> np.ndarray:
        return (self.classes != CLASS_CHANNELS.index("background")).astype(np.uint8)


def _map_labels(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(mapping) + 1, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[labels]


def _load_class_set(img_files: list[Path], label_of, mapping, group_of, src_mpp, target_mpp, instances_of=None):
    scale = src_mpp / target_mpp
    out = []
    for f in img_files:
        inst = None
        if instances_of is not None:
            inst = np.asarray(Image.open(instances_of(f))).astype(np.int32)
            inst = np.ascontiguousarray(resample(inst, scale, nearest=True))
        img = np.asarray(Image.open(f).convert("RGB"))
        ch = _map_labels(read_class_map(label_of(f), mapping, img.shape[:2]), mapping)
        out.append(ClassSample(f.stem, group_of(f.stem), np.ascontiguousarray(resample(img, scale)),
                               np.ascontiguousarray(resample(ch, scale, nearest=True)), inst))
    return out


def load_consep(root: str | Path, target_mpp: float = 0.5, instances: bool = False) -> list[ClassSample]:
    """CoNSeP tiles (``images/<name>.jpg``, ``classes/<name>.png``, with ``instances`` also
    ``instances/<name>.png``) at ``target_mpp``."""
    root = Path(root)
    files = sorted((root / "images").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{root}: no images/*.jpg (expected the CoNSeP tile layout)")
    return _load_class_set(files, lambda f: root / "classes" / f"{f.stem}.png", CONSEP_TO_CHANNEL,
                           source_image, CONSEP_MPP, target_mpp,
                           (lambda f: root / "instances" / f"{f.stem}.png") if instances else None)


def load_monusac(root: str | Path, target_mpp: float = 0.5) -> list[ClassSample]:
    """MoNuSAC images (``images/<name>.jpg``, ``masks/<name>.png`` class maps) at ``target_mpp``."""
    root = Path(root)
    files = sorted((root / "images").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{root}: no images/*.jpg (expected the MoNuSAC layout)")
    return _load_class_set(files, lambda f: root / "masks" / f"{f.stem}.png", MONUSAC_TO_CHANNEL,
                           source_image, MONUSAC_MPP, target_mpp)


TNBC_MPP = 0.25


def split_tnbc(root: str | Path, target_mpp: float, val_patients=("05", "11")) -> tuple[list[Sample], list[Sample]]:
    """TNBC (Naylor et al. 2018; ``images/``, ``masks/``, ``instances/`` of ``tnbc_<patient>_<n>.png``)
    at ``target_mpp``, split by patient: (train, val) with ``val_patients`` held out."""
    samples = load_monuseg(root, target_mpp, source_mpp=TNBC_MPP)
    return split_by(samples, lambda s: s.name.split("_")[1], val_patients)


def split_groups(samples: list[ClassSample], every: int) -> tuple[list[ClassSample], list[ClassSample]]:
    """(train, val) by source image: every ``every``-th group in natural sort order is validation."""
    return split_by(samples, lambda s: s.group, every_nth((s.group for s in samples), every))
