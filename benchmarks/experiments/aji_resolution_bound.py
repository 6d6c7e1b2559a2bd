"""How much AJI a model working at 0.5 um/px can lose to resolution alone on MoNuSeg (0.25 um/px).

Each ground-truth nucleus of the validation images is resampled to half size (area average) and
back (bilinear), and kept where it is >= 0.5 (the nucleus with the highest value wins); the AJI
of that map against the original is the best a perfect model at 0.5 um/px, evaluated at native
resolution as ``wsiseg eval`` does, could reach.

    python benchmarks/experiments/aji_resolution_bound.py --json benchmarks/results/aji_resolution_bound.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsiseg.metrics import instance_metrics, mean_metrics
from wsiseg.train.datasets import MONUSEG_VAL


def resampled(gt: np.ndarray, factor: int = 2) -> np.ndarray:
    h, w = gt.shape
    out = np.zeros_like(gt)
    best = np.zeros(gt.shape, np.float32)
    for i in np.unique(gt)[1:]:
        m = (gt == i).astype(np.float32)
        up = cv2.resize(cv2.resize(m, (w // factor, h // factor), interpolation=cv2.INTER_AREA), (w, h),
                        interpolation=cv2.INTER_LINEAR)
        sel = (up >= 0.5) & (up > best)
        out[sel] = i
        best[sel] = up[sel]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/monuseg/train")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    per = {}
    for n in MONUSEG_VAL:
        f = sorted((Path(a.data) / "instances").glob(f"{n}*.png"))[0]
        gt = np.asarray(Image.open(f)).astype(np.int64)
        per[n] = instance_metrics(gt, resampled(gt))
        print(n, round(per[n]["aji"], 4), flush=True)
    res = {"what": "ground truth resampled 0.25 -> 0.5 -> 0.25 um/px against itself", "per_image": per,
           "mean_per_image": mean_metrics(list(per.values()))}
    print("mean AJI", round(res["mean_per_image"]["aji"], 4))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
