"""Labelled patches for the cellularity regressors, from the data sets in ../shared/data.

Data sources (``--data KIND:PATH``, repeatable):

* ``breastpathq:LABELS.csv``: the BreastPathQ layout, a CSV ``slide,rid,y`` (y = cellularity
  in [0, 1]) and images ``<slide>_<rid>.tif`` beside it (or in ``--images``);
  ``--mpp`` gives the patches' resolution (default 0.5 um/px: BreastPathQ's patches are 20x.
  The files do not say it; on the one public patch the default model's nuclei measure a median
  7.0 um across read at 0.5 um/px and 3.9 um read at 0.25, against 5.5 um for MoNuSeg's annotated
  breast nuclei at their known 0.25 um/px: ``benchmarks/experiments/breastpathq_scale.py``).
* ``consep:DIR`` (a CoNSeP split: ``images/``, ``classes/``) and ``monusac:DIR``
  (``images/``, ``masks/``): class-labelled nuclei; the label is the PROXY
  tumour nuclear area / all nuclear area (see :mod:`wsiseg.cellularity.proxy`), never the pathologists'
  cellularity, and it is named ``proxy`` wherever it is reported.

Each patch goes through the segmentation model (``--model``, which must have the Normal,
Lymphocyte, Malignant and Background channels) at the model's resolution, exactly as in
``wsiseg run``; its 81 features (per pixel, see :mod:`wsiseg.scoring`) feed LightGBM. The
validation split is by source image/slide (every ``--val-every``-th group in natural order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.scoring import CLASS_INPUTS, patch_features
from wsiseg.splits import every_nth, split_by
from wsiseg.stain import for_image


BREASTPATHQ_MPP = 0.5  # um/px of BreastPathQ's 512 px patches (20x; see the module's docstring)


@dataclass
class Patch:
    name: str
    group: str  # split unit: source image or slide
    image: np.ndarray  # RGB at the model's mpp
    y: float
    label: str  # "proxy" or "cellularity"


def load_patches(spec: str, mpp: float, src_mpp: float | None = None, images: str | None = None) -> list[Patch]:
    """Patches of one ``KIND:PATH`` source at the model's ``mpp``."""
    from wsiseg.train.datasets import load_consep, load_monusac

    kind, _, path = spec.partition(":")
    if not path:
        raise ValueError(f"--data {spec!r}: expected KIND:PATH with KIND breastpathq, consep or monusac")
    if kind in ("consep", "monusac"):
        samples = (load_consep if kind == "consep" else load_monusac)(path, mpp)
        mal = CLASS_INPUTS.index("malignant")
        bg = CLASS_INPUTS.index("background")
        out = []
        for s in samples:
            nuclei = np.count_nonzero(s.classes != bg)
            y = float(np.count_nonzero(s.classes == mal) / nuclei) if nuclei else 0.0
            out.append(Patch(f"{kind}/{s.name}", f"{kind}/{s.group}", s.image, y, "proxy"))
        return out
    if kind == "breastpathq":
        from wsiseg.cellularity.data import load_breastpathq
        from wsiseg.train.datasets import resample

        csv_path = Path(path)
        imgs, y, ids = load_breastpathq(csv_path, images or csv_path.parent)
        scale = (src_mpp or BREASTPATHQ_MPP) / mpp
        return [Patch(f"breastpathq/{i}", f"breastpathq/{str(i).split('_')[0]}", resample(np.asarray(im), scale),
                      float(v), "cellularity") for im, v, i in zip(imgs, y, ids)]
    raise ValueError(f"--data {spec!r}: unknown kind {kind!r} (breastpathq, consep or monusac)")


def class_maps(predictor, image: np.ndarray, stain=None) -> np.ndarray:
    """(4, H, W) Normal/Lymphocyte/Malignant/Background probabilities of one image; ``stain``
    (a :class:`wsiseg.stain.StainSpec`): the image normalised as one slide first, as
    ``wsiseg run --stain`` would."""
    chans = [c.lower() for c in predictor.channels]
    missing = [c for c in CLASS_INPUTS if c not in chans]
    if missing:
        raise ValueError(f"model {predictor.model.id} has no {', '.join(missing)} channels: use a class model "
                         "(e.g. unet-bn-nuclei-classes-20x)")
    probs = predictor.with_stain(for_image(stain, image)).whole_image(image)
    return probs[[chans.index(c) for c in CLASS_INPUTS]]


def parse_every(spec) -> dict[str, int] | int:
    """``5`` or ``consep=5,monusac=4`` (per source; sources not named use 5)."""
    if isinstance(spec, int):
        return spec
    if "=" not in str(spec):
        return int(spec)
    return {k.strip(): int(v) for k, v in (part.split("=") for part in str(spec).split(","))}


def split(patches: list[Patch], every) -> tuple[list[Patch], list[Patch]]:
    """(train, val) by source image: every ``every``-th group of each source, in natural order.

    The default class model's own validation images are CoNSeP every 5th source image and MoNuSAC
    every 4th slide: ``consep=5,monusac=4`` keeps the regressor's validation unseen by both."""
    every = parse_every(every)
    by_source: dict[str, set[str]] = {}
    for p in patches:
        by_source.setdefault(p.group.split("/")[0], set()).add(p.group)
    val = set().union(*(every_nth(gs, every if isinstance(every, int) else every.get(src, 5))
                        for src, gs in by_source.items()))
    return split_by(patches, lambda p: p.group, val)


def map_features(predictor, patches: list[Patch], log, stain=None) -> tuple[np.ndarray, list[np.ndarray]]:
    t0 = time.perf_counter()
    maps = [class_maps(predictor, p.image, stain) for p in patches]
    t1 = time.perf_counter()
    X = np.stack([patch_features(m) for m in maps]) if maps else np.empty((0, 81))
    log(f"  {len(patches)} patches: maps {t1 - t0:.1f} s, features {time.perf_counter() - t1:.1f} s")
    return X, maps


def metrics_table(rows: dict[str, dict]) -> str:
    """A Markdown table of :func:`wsiseg.cellularity.metrics.evaluate` rows; a metric that needs more
    patches than there are (None) reads ``n/a``."""
    def f(v, d):
        return "n/a" if v is None else f"{v:.{d}f}"

    head = "| regressor | label | n | MSE [95% CI] | kappa (4 bins) | ICC(2,1) [95% CI] | PK |\n|---|---|---|---|---|---|---|\n"
    out = []
    for name, m in rows.items():
        out.append(f"| {name} | {m['label']} | {m['n']} | {f(m['mse'], 4)} [{f(m['mse_ci'][0], 4)}, {f(m['mse_ci'][1], 4)}] | "
                   f"{f(m['kappa'], 3)} | {f(m['icc'], 3)} [{f(m['icc_ci'][0], 3)}, {f(m['icc_ci'][1], 3)}] | {f(m['pk'], 3)} |")
    return head + "\n".join(out)


def regression_metrics(y, p, label: str) -> dict:
    from wsiseg.cellularity.metrics import evaluate

    m = evaluate(np.asarray(y), np.asarray(p))
    return {"label": label, **m}


def label_of(patches: list[Patch]) -> str:
    labels = sorted({p.label for p in patches})
    return "proxy" if labels == ["proxy"] else "+".join(labels)


def map_inputs(predictor, patches: list[Patch], size: int, stain=None):
    """Class maps of the patches that fit one network input (smaller ones padded with background)."""
    from wsiseg.scoring import pad_to

    maps, ys = [], []
    for p in patches:
        m = class_maps(predictor, p.image, stain)
        if m.shape[1] <= size and m.shape[2] <= size:
            maps.append(pad_to(m, size)[:, :size, :size])
            ys.append(p.y)
    return np.stack(maps).astype(np.float32), np.array(ys)


def fits_input(p: Patch, size: int) -> bool:
    """Whether the patch fits one ``size`` px network input."""
    return max(p.image.shape[:2]) <= size


def image_inputs(patches: list[Patch], size: int):
    """RGB patches (at the model's mpp) that fit one network input, padded with white glass.

    The same patches as :func:`map_inputs` keeps the map CNN and the direct regressor comparable."""
    ims, ys = [], []
    for p in patches:
        if fits_input(p, size):
            h, w = p.image.shape[:2]
            im = np.full((size, size, 3), 255, np.uint8)
            im[:h, :w] = p.image
            ims.append(im)
            ys.append(p.y)
    if not ims:
        return np.empty((0, size, size, 3), np.uint8), np.empty(0)
    return np.stack(ims), np.array(ys)
