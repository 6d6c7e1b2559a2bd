"""Normalising stain-jittered copies of the sample slide back: colour and nucleus-map distances.

    python benchmarks/experiments/stain_jitter.py [--seeds 5] [--json benchmarks/results/stain_jitter.json]

A 512 x 512 all-tissue crop of the bundled sample slide (CMU-1-Small-Region, 0.5 um/px) is
jittered, then normalised to the original crop's own reference (each method's fit of its tissue
pixels) with a transform fitted on the jittered crop, as ``wsiseg run --stain M --stain-target
ORIGINAL`` would. Distances to the original: mean |dRGB| of the image the network sees, and mean
|dp| of the nucleus map of ``unet-bn-monuseg-20x`` (the crop as one input). Jitters:

* ``hed_jitter``: the training augmentation itself (``wsiseg.train.augment.hed_jitter``, its
  defaults: each HED stain scaled by U(0.95, 1.05) and shifted by U(-0.05, 0.05) x the crop's
  largest amount of that stain; skimage's rgb2hed clips negative amounts to zero first);
* ``hed_scale``: hed_jitter's per-stain scaling alone, U(0.75, 1.25), as the linear map of optical
  density it is without that clipping (what tests/test_stain.py asserts on).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from wsiseg import stain
from wsiseg.models import load_model
from wsiseg.predict import Predictor
from wsiseg.slide import SAMPLE, ScaledView, open_slide
from wsiseg.train.augment import hed_jitter

METHODS = ("reinhard", "macenko", "vahadane")


def hed_scale(img: np.ndarray, rng) -> np.ndarray:
    A = hed_from_rgb @ np.diag(rng.uniform(0.75, 1.25, 3)) @ rgb_from_hed
    od = stain.optical_density(img).reshape(-1, 3)
    return np.clip(np.round(stain.IO * np.exp(-(od @ A)) - 1), 0, 255).astype(np.uint8).reshape(img.shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", default="benchmarks/results/stain_jitter.json")
    a = p.parse_args(argv)
    r = open_slide(SAMPLE)
    try:
        crop = ScaledView.create(r, 0.5).read(1792, 1024, 512, 512)
    finally:
        r.close()
    pred = Predictor(load_model("unet-bn-monuseg-20x"), "cpu")
    p0 = pred(crop[None])[0, 0]
    refs = {m: stain.fit_reference(stain.tissue_pixels(crop), m, "the original crop") for m in METHODS}
    rows = []
    for kind, jitter in (("hed_jitter", hed_jitter), ("hed_scale", hed_scale)):
        per = {m: {"rgb": [], "map": []} for m in ("none",) + METHODS}
        for seed in range(a.seeds):
            jit = jitter(crop, np.random.default_rng(seed))
            per["none"]["rgb"].append(float(np.abs(jit.astype(np.float32) - crop).mean()))
            per["none"]["map"].append(float(np.abs(pred(jit[None])[0, 0] - p0).mean()))
            for m in METHODS:
                t = stain.fit_transform(stain.StainSpec(m, False, refs[m]), jit)
                per[m]["rgb"].append(float(np.abs(t.apply_numpy(jit).astype(np.float32) - crop).mean()))
                per[m]["map"].append(float(np.abs(pred.with_stain(t)(jit[None])[0, 0] - p0).mean()))
        for m, d in per.items():
            rows.append({"jitter": kind, "stain": m, "mean_abs_drgb": round(float(np.mean(d["rgb"])), 3),
                         "mean_abs_dp": round(float(np.mean(d["map"])), 4),
                         "per_seed_drgb": [round(v, 2) for v in d["rgb"]],
                         "per_seed_dp": [round(v, 4) for v in d["map"]]})
            print(json.dumps(rows[-1]), flush=True)
    out = {"benchmark": "stain-jittered copies normalised back (issue 21)", "command": "python benchmarks/experiments/stain_jitter.py",
           "crop": "CMU-1-Small-Region at 0.5 um/px, rows 1792:2304, columns 1024:1536 (all tissue)",
           "model": "unet-bn-monuseg-20x", "seeds": a.seeds, "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
