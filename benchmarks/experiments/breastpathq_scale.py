"""At what resolution are BreastPathQ's patches? Nucleus sizes against MoNuSeg's, and the scores.

BreastPathQ's images carry no resolution (TIFF resolution 1 x 1, no unit). This script measures
the nuclei of the one public patch (``../shared/data/breastpathq/99788_1.tif``, 512 x 512,
pathologist cellularity 0.97) as the default model segments them when the patch is read as 20x
(0.5 um/px) and as 40x (0.25 um/px), beside MoNuSeg's annotated nuclei at their known 0.25 um/px,
and scores the patch with the shipped cellularity regressors both ways (``wsiseg cellularity
predict``'s path: class maps of the whole patch, then the regressors).

Diameters are equivalent-circle diameters (um) of connected components of the model's nucleus
map at p >= 0.5 (touching nuclei merge, so the model's sizes lean high) and of MoNuSeg's instance
labels (all 30 training images, and the 6 breast ones).

    python benchmarks/experiments/breastpathq_scale.py --json benchmarks/results/breastpathq_scale.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def diameters(labels: np.ndarray, mpp: float, min_px: int = 10) -> np.ndarray:
    from skimage.measure import regionprops

    return np.array([r.equivalent_diameter_area * mpp for r in regionprops(labels) if r.area >= min_px])


def summary(d: np.ndarray) -> dict:
    q = np.percentile(d, [25, 50, 75])
    return {"n": int(d.size), "median_um": round(float(q[1]), 3), "iqr_um": [round(float(q[0]), 3), round(float(q[2]), 3)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", default=str(SHARED / "breastpathq" / "99788_1.tif"))
    ap.add_argument("--monuseg", default=str(SHARED / "monuseg" / "train" / "instances"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from skimage.io import imread
    from skimage.measure import label

    from wsiseg.cellularity.data import read_rgb
    from wsiseg.cellularity.labelled import class_maps
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor
    from wsiseg.scoring import DEFAULT_REGRESSORS, load_regressor, pad_to
    from wsiseg.train.datasets import resample

    files = sorted(Path(a.monuseg).glob("*.png"))
    breast = ("TCGA-A7", "TCGA-AR", "TCGA-E2")
    gt_all = np.concatenate([diameters(imread(f), 0.25) for f in files])
    gt_breast = np.concatenate([diameters(imread(f), 0.25) for f in files if f.name.startswith(breast)])

    predictor = Predictor(load_model("unet-bn-nuclei-classes-20x"), "cpu")
    nucleus = [c.lower() for c in predictor.channels].index("nucleus")
    regs = {k: load_regressor(k, n) for k, n in DEFAULT_REGRESSORS.items()}
    img = read_rgb(a.patch)
    read_as = {}
    for mpp in (0.5, 0.25):
        x = resample(img, mpp / predictor.model.mpp)  # the patch at the model's 0.5 um/px
        probs = predictor(x[None])[0]
        d = diameters(label(probs[nucleus] >= 0.5), predictor.model.mpp)
        m = pad_to(class_maps(predictor, x), 16)
        read_as[f"{mpp}"] = {"model_px": list(x.shape[:2]), "nuclei": summary(d),
                             "scores": {k: round(float(r.predict([m])[0]), 4) for k, r in regs.items()}}
    res = {"benchmark": "breastpathq_scale", "patch": Path(a.patch).name, "pathologist_score": 0.97,
           "monuseg_annotated_nuclei_0.25um": {"all_30_images": summary(gt_all), "breast_6_images": summary(gt_breast)},
           "patch_read_as_um_per_px": read_as, "model": predictor.model.id,
           "regressors": DEFAULT_REGRESSORS}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
