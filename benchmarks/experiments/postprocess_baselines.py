"""Classical nucleus segmentation baselines (seed 001, Table 2a) on the MoNuSeg validation split.

    python benchmarks/experiments/postprocess_baselines.py [--data ../shared/data/monuseg/train]
                                               [--json benchmarks/results/postprocess_baselines.json]

Methods (``wsiseg.postprocess``), all at MoNuSeg's native 0.25 um/px, no colour normalisation:

* ``otsu``: Otsu on the haematoxylin channel (rgb2hed), specks removed, connected components;
* ``watershed``: the same mask split by a distance-transform watershed (peak markers 1.5 um apart);
* ``fiji_like``: grey levels, Gaussian blur (0.5 um), IsoData threshold, fill holes, binary
  watershed (h-maxima 0.125 um of the distance map), particles > 3 um^2;
* ``fiji_like_hed``: the same pipeline on the haematoxylin channel instead of grey levels.

For scale, two rows that start from the ground-truth *binary* mask (not baselines: they show what
the instance step alone can reach): ``gt_mask_components`` and ``gt_mask_watershed``.

Images: ``wsiseg.train.datasets.MONUSEG_VAL`` (the first image of each of the 7 organs).
Scores per image (``wsiseg.metrics``: pixel Dice; AJI; PQ; mAP as in seed 001 = mean precision
over IoU 0.50:0.05:0.95; mAP_dsb = DSB 2018 mean TP/(TP+FP+FN); F1/precision/recall at IoU 0.5
and 0.7), then the mean over images.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wsiseg.metrics import instance_metrics, mean_metrics, pixel_metrics
from wsiseg.postprocess import PostprocessConfig, fiji_like, instances_from_probability, otsu_hed, watershed_hed
from wsiseg.train.datasets import MONUSEG_MPP, MONUSEG_VAL

REPO = Path(__file__).resolve().parents[2]
KEYS = ("dice", "aji", "pq", "map", "map_dsb", "f1@0.5", "f1@0.7", "precision@0.5", "recall@0.5", "n_pred", "n_gt")

METHODS = {
    "otsu": lambda rgb, mask, mpp: otsu_hed(rgb, mpp),
    "watershed": lambda rgb, mask, mpp: watershed_hed(rgb, mpp),
    "fiji_like": lambda rgb, mask, mpp: fiji_like(rgb, mpp),
    "fiji_like_hed": lambda rgb, mask, mpp: fiji_like(rgb, mpp, channel="haematoxylin"),
    "gt_mask_components": lambda rgb, mask, mpp: instances_from_probability(
        mask.astype(np.float32), mpp, PostprocessConfig(split="none")),
    "gt_mask_watershed": lambda rgb, mask, mpp: instances_from_probability(mask.astype(np.float32), mpp),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "monuseg" / "train")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "postprocess_baselines.json")
    args = ap.parse_args(argv)

    per_method: dict[str, dict] = {m: {"images": {}, "seconds": 0.0} for m in METHODS}
    for name in MONUSEG_VAL:
        files = sorted((args.data / "images").glob(f"{name}*.png"))
        if not files:
            raise SystemExit(f"{args.data}/images: no {name}*.png (expected the MoNuSeg layout: images/, masks/, instances/)")
        f = files[0]
        rgb = np.asarray(Image.open(f).convert("RGB"))
        mask = np.asarray(Image.open(args.data / "masks" / f.name)) > 0
        gt = np.asarray(Image.open(args.data / "instances" / f.name))
        for method, fn in METHODS.items():
            t0 = time.perf_counter()
            inst = fn(rgb, mask, MONUSEG_MPP)
            per_method[method]["seconds"] += time.perf_counter() - t0
            m = instance_metrics(gt, inst)
            m["dice"] = pixel_metrics(gt, inst)["dice"]
            per_method[method]["images"][f.stem] = {k: m[k] for k in KEYS}
        print(f"{f.stem}: " + "  ".join(f"{k} AJI {per_method[k]['images'][f.stem]['aji']:.3f}" for k in METHODS),
              flush=True)

    result = {
        "what": "classical baselines (seed 001) on MoNuSeg validation images at native 0.25 um/px",
        "images": MONUSEG_VAL,
        "mpp": MONUSEG_MPP,
        "metrics": "per-image scores averaged over images (n_pred, n_gt summed); dice = pixel Dice vs "
                   "instances > 0; map = mean precision TP/(TP+FP) over IoU 0.50:0.05:0.95 (seed 001); "
                   "map_dsb = mean TP/(TP+FP+FN) (DSB 2018)",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "note": "CPU shared with other jobs; seconds are indicative only"},
        "methods": {},
    }
    print(f"\n{'method':20s}" + "".join(f"{k:>10s}" for k in KEYS[:7]) + f"{'s/img':>8s}")
    for method, r in per_method.items():
        mean = mean_metrics(list(r["images"].values()))
        s_img = r["seconds"] / len(r["images"])
        result["methods"][method] = {"mean": mean, "seconds_per_image": s_img, "per_image": r["images"]}
        print(f"{method:20s}" + "".join(f"{mean[k]:10.4f}" for k in KEYS[:7]) + f"{s_img:8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
