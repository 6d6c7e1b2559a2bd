"""Stain normalisation ablation: a MoNuSeg-trained model on CoNSeP (another lab and scanner).

    python benchmarks/experiments/stain_ablation.py [--data ../shared/data/consep/train] [--model unet-bn-monuseg-20x]
                                        [--json benchmarks/results/stain_ablation.json]

Data: CoNSeP's validation split as the class model uses it (``load_consep(root, 0.5,
instances=True)`` then ``split_groups(samples, 5)``: every 5th source image, 116 tiles of 128 px
at 0.5 um/px). Model: ``unet-bn-monuseg-20x`` (trained on MoNuSeg only). Each row normalises
every tile to the model's training reference (its sidecar's ``stain_reference``) and runs the
model on the tile (``Predictor``, one 128 px input):

* ``per_source_image`` (the default rows): one transform per CoNSeP source image, fitted on the
  tissue pixels of all its validation tiles together, as ``wsiseg run`` fits one per slide;
* ``per_tile`` rows: each tile fitted on its own pixels (what a per-patch normaliser does).

Scores: pixel Dice pooled over all tiles (nucleus = any labelled CoNSeP nucleus) and the mean
AJI per tile of the instances from ``instances_from_probability`` (the model's sidecar
post-processing; tiles without nuclei in both maps count as AJI 1, as ``wsiseg.metrics.aji``
returns). The transforms are fitted once per row (fitting seconds reported apart).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from wsiseg.metrics import aji, overlap_table
from wsiseg.models import load_model
from wsiseg.pipeline import postprocess_config
from wsiseg.postprocess import instances_from_probability
from wsiseg.predict import Predictor
from wsiseg.stain import StainError, fit_transform, resolve_spec
from wsiseg.train.datasets import load_consep, split_groups

ROWS = (("none", False), ("reinhard", False), ("macenko", False), ("vahadane", False), ("none", True),
        ("macenko", True))
PER_TILE = (("reinhard", False), ("macenko", False), ("vahadane", False))


def evaluate(pred: Predictor, samples, transforms: dict, post, mpp: float) -> dict:
    """Pooled Dice and mean AJI of ``pred`` on ``samples``; ``transforms[name]``: the tile's
    StainTransform (or None)."""
    inter = denom = 0.0
    ajis = []
    for s in samples:
        p = pred.with_stain(transforms.get(s.name))(s.image[None])[0, 0]
        m, gt = p > post.threshold, s.mask > 0
        inter += float(np.logical_and(m, gt).sum())
        denom += float(m.sum() + gt.sum())
        lab = instances_from_probability(p, mpp, post)
        ajis.append(aji(overlap_table(s.instances.astype(np.int64), lab.astype(np.int64))))
    return {"dice_pooled": 2 * inter / max(denom, 1.0), "aji_mean": float(np.mean(ajis)), "tiles": len(samples)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/consep/train")
    p.add_argument("--model", default="unet-bn-monuseg-20x")
    p.add_argument("--json", default="benchmarks/results/stain_ablation.json")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    model = load_model(a.model)
    pred = Predictor(model, "cpu", threads=a.threads)
    post = postprocess_config(model.meta)
    _, val = split_groups(load_consep(a.data, model.mpp, instances=True), 5)
    groups = defaultdict(list)
    for s in val:
        groups[s.group].append(s)
    print(f"{len(val)} validation tiles from {len(groups)} source images; model {model.id}")
    rows = []
    for per_tile, options in ((False, ROWS), (True, PER_TILE)):
        for method, clahe in options:
            spec = resolve_spec(method, None, clahe, model.meta)
            t0 = time.perf_counter()
            transforms, skipped = {}, 0
            units = [[s] for s in val] if per_tile else list(groups.values())
            for unit in units:
                if spec is None:
                    break
                try:
                    t = fit_transform(spec, [s.image for s in unit])
                except StainError:  # too little tissue: not normalised, as wsiseg run does
                    skipped += len(unit)
                    continue
                transforms.update({s.name: t for s in unit})
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate(pred, val, transforms, post, model.mpp)
            name = "clahe" if method == "none" and clahe else method + (" + clahe" if clahe else "")
            row = {"stain": method, "clahe": clahe, "fit": "per_tile" if per_tile else "per_source_image",
                   "row": name, **res, "tiles_not_normalised": skipped if spec is not None else len(val),
                   "fit_seconds": round(fit_s, 2), "predict_seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"{name:16s} {row['fit']:17s} Dice {res['dice_pooled']:.4f}  AJI {res['aji_mean']:.4f}"
                  f"  (fit {fit_s:.1f} s, {skipped} tiles not normalised)", flush=True)
    out = {
        "benchmark": "stain normalisation ablation (issue 21)",
        "command": "python benchmarks/experiments/stain_ablation.py",
        "model": model.id, "model_training": model.meta.get("training", {}).get("data"),
        "target": "the model's sidecar stain_reference: " + model.meta["stain_reference"]["from"],
        "data": "CoNSeP train, validation split: every 5th source image (split_groups(samples, 5)), "
                f"{len(val)} tiles of 128 px at {model.mpp} um/px from {len(groups)} source images",
        "postprocess": dataclasses.asdict(post), "machine": {"cpu": platform.processor() or platform.machine(),
                                                  "python": platform.python_version()},
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
