"""Where a mask + shape-marker model loses AJI: its masks or its markers (the validation split).

The model runs through the engine on each validation image (as ``wsiseg eval``: resampled to the
model's um/px, tiled, blended, probabilities upsampled to native resolution). Its predicted
nucleus mask and marker maps are then combined with ground-truth parts, and each combination's
AJI (mean per image, at native resolution) says how much of the gap each part accounts for:

- ``model``: the model's own mask and markers, the sidecar's post-processing (what ``wsiseg eval``
  reports);
- ``pred_mask_gt_markers``: the model's mask (threshold and cleaning as the sidecar's), split by
  a marker-controlled watershed (relief 1 - mask probability) from ground-truth markers: the core
  of each true nucleus, the pixels at least half its inscribed radius from its outline;
- ``pred_mask_target_markers``: the same, from the markers the model was trained to predict
  (:func:`wsiseg.train.targets.shape_markers` of the instances at the model's um/px, ratio 0.5,
  binary and labelled by connected components as a predicted map would be; upsampled);
- ``pred_mask_gt_identities``: the model's mask with every foreground pixel given the id of the
  nearest true nucleus: perfect separation, the predicted extent (the best any split of this mask
  can do);
- ``gt_mask_pred_markers``: the true foreground split from the model's markers;
- ``gt_mask_gt_markers``: the true foreground split from the true markers (the watershed's own
  loss).

``--sweep`` also tries other ways to get markers from the model's own maps (h-maxima of the marker
probability, smoothed or not, and of the marker probability plus a weighted distance transform)
over a small grid, each at mask thresholds 0.6 and 0.7 (a few minutes more).

    python benchmarks/experiments/aji_oracle.py --model unet-bn-marker-monuseg-20x [--sweep] \\
        --json benchmarks/results/aji_oracle.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import zarr
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import gaussian
from skimage.measure import label as cc_label
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from wsiseg.bench import machine
from wsiseg.metrics import instance_metrics, mean_metrics
from wsiseg.models.registry import load_model
from wsiseg.pipeline import RunConfig, postprocess_config, run_slide
from wsiseg.postprocess import _label_orphans, clean_mask, instances_from_probability
from wsiseg.predict import Predictor
from wsiseg.train.datasets import MONUSEG_MPP, MONUSEG_VAL, load_monuseg
from wsiseg.train.targets import shape_markers


def core_markers(gt: np.ndarray, frac: float = 0.5) -> np.ndarray:
    """Each true nucleus's pixels at least ``frac`` x its inscribed radius from its outline."""
    out = np.zeros(gt.shape, np.int32)
    for i, sl in enumerate(ndi.find_objects(gt), start=1):
        if sl is None:
            continue
        sub = gt[sl] == i
        d = ndi.distance_transform_edt(np.pad(sub, 1))[1:-1, 1:-1]
        out[sl][(d >= frac * d.max()) & sub] = i
    return out


def flood(mask: np.ndarray, markers: np.ndarray, relief: np.ndarray) -> np.ndarray:
    """Marker-controlled watershed inside ``mask``; mask parts no marker reaches are nuclei of
    their own (:func:`wsiseg.postprocess.split_watershed`'s rule)."""
    return _label_orphans(watershed(relief, markers * mask, mask=mask), mask)


def sweep_markers(maps: list[tuple[np.ndarray, np.ndarray, np.ndarray]], post) -> dict[str, float]:
    """Mean AJI over ``maps`` [(mask probability, marker probability, true instances)] of marker
    variants from the model's own maps, each flooded inside the thresholded, cleaned mask."""
    def hmax_marker(p, m, t, h, sigma):
        mask = clean_mask(p > t, MONUSEG_MPP, post.min_area_um2, post.max_hole_um2)
        ms = gaussian(m, sigma) if sigma else m
        mk = cc_label(h_maxima(np.where(mask, ms, 0).astype(np.float32), h) & mask, connectivity=2)
        return flood(mask, mk, 1 - ms)

    def hmax_combined(p, m, t, alpha, h):
        mask = clean_mask(p > t, MONUSEG_MPP, post.min_area_um2, post.max_hole_um2)
        e = m + alpha * np.minimum(ndi.distance_transform_edt(mask) * MONUSEG_MPP / 3.0, 1.0)
        mk = cc_label(h_maxima(np.where(mask, e, 0).astype(np.float32), h) & mask, connectivity=2)
        return flood(mask, mk, -e)

    out = {}
    for t in (0.6, 0.7):
        for h in (0.1, 0.2, 0.3, 0.4):
            for sigma in (0, 1, 2):
                out[f"hmaxima_marker t={t} h={h} sigma={sigma}"] = float(np.mean(
                    [instance_metrics(g, hmax_marker(p, m, t, h, sigma))["aji"] for p, m, g in maps]))
        for alpha in (0.25, 0.5, 1.0):
            for h in (0.1, 0.2, 0.3):
                out[f"hmaxima_marker_plus_distance t={t} alpha={alpha} h={h}"] = float(np.mean(
                    [instance_metrics(g, hmax_combined(p, m, t, alpha, h))["aji"] for p, m, g in maps]))
    for t in (0.6, 0.7):  # the sidecar's own method at the same mask thresholds, for comparison
        cfg = dataclasses.replace(post, threshold=t)
        out[f"sidecar_markers t={t}"] = float(np.mean(
            [instance_metrics(g, instances_from_probability(p, MONUSEG_MPP, cfg, marker_prob=m))["aji"] for p, m, g in maps]))
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unet-bn-marker-monuseg-20x")
    ap.add_argument("--data", default="../shared/data/monuseg/train")
    ap.add_argument("--sweep", action="store_true", help="also sweep marker variants from the model's maps")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.data)
    model = load_model(args.model)
    if "marker" not in model.classes:
        raise SystemExit(f"{model.id} has no marker channel (classes {model.classes})")
    post = postprocess_config(model.meta)
    ci, mi = model.classes.index("nucleus"), model.classes.index("marker")
    predictor = Predictor(model, "cpu")
    targets = {s.name: s.instances for s in load_monuseg(root, model.mpp, names=MONUSEG_VAL)}
    rows: dict[str, list[dict]] = {k: [] for k in (
        "model", "pred_mask_gt_markers", "pred_mask_target_markers", "pred_mask_gt_identities",
        "gt_mask_pred_markers", "gt_mask_gt_markers")}
    counts = {}
    maps = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in MONUSEG_VAL:
            f = sorted((root / "images").glob(f"{name}*.png"))[0]
            res = run_slide(f, Path(tmp) / f.stem, predictor, RunConfig.of(mpp=MONUSEG_MPP, tissue=False, cellularity=False))
            arr = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")["0"]
            gt = np.asarray(Image.open(root / "instances" / f.name)).astype(np.int32)
            gt = np.unique(gt, return_inverse=True)[1].reshape(gt.shape).astype(np.int32)  # ids 1..N
            H, W = gt.shape
            h, w = round(H * MONUSEG_MPP / model.mpp), round(W * MONUSEG_MPP / model.mpp)
            p, m = (cv2.resize(arr[c][:h, :w].astype(np.float32) / 255, (W, H), interpolation=cv2.INTER_LINEAR)
                    for c in (ci, mi))
            own = instances_from_probability(p, MONUSEG_MPP, post, marker_prob=m)
            rows["model"].append(instance_metrics(gt, own))
            mask = clean_mask(p > post.threshold, MONUSEG_MPP, post.min_area_um2, post.max_hole_um2)
            core = core_markers(gt)
            rows["pred_mask_gt_markers"].append(instance_metrics(gt, flood(mask, core, 1 - p)))
            tgt = cc_label(shape_markers(targets[f.stem], ratio=0.5) > 0, connectivity=2).astype(np.float32)
            tgt = cv2.resize(tgt, (W, H), interpolation=cv2.INTER_NEAREST).astype(np.int32)
            rows["pred_mask_target_markers"].append(instance_metrics(gt, flood(mask, tgt, 1 - p)))
            idx = ndi.distance_transform_edt(gt == 0, return_distances=False, return_indices=True)
            rows["pred_mask_gt_identities"].append(instance_metrics(gt, np.where(mask, gt[idx[0], idx[1]], 0)))
            fg = gt > 0
            pm = clean_mask((m > post.marker_threshold) & fg, MONUSEG_MPP, post.min_marker_um2, 0.0)
            rows["gt_mask_pred_markers"].append(instance_metrics(gt, flood(fg, cc_label(pm, connectivity=2), 1 - m)))
            rows["gt_mask_gt_markers"].append(instance_metrics(gt, flood(fg, core, -ndi.distance_transform_edt(fg))))
            if args.sweep:
                maps.append((p, m, gt))
            counts[f.stem] = {"true_nuclei": int(gt.max()), "model_nuclei": int(own.max())}
            print(f"{f.stem}: {counts[f.stem]}, model AJI {rows['model'][-1]['aji']:.4f}", flush=True)
    summary = {k: {m: round(v, 4) for m, v in mean_metrics(r).items() if m in ("aji", "pq", "f1@0.5", "map")}
               for k, r in rows.items()}
    per_image = {k: [round(r["aji"], 4) for r in v] for k, v in rows.items()}
    print(f"\n{'combination':28s} {'AJI':>7s} {'PQ':>7s} {'F1@0.5':>7s}")
    for k, v in summary.items():
        print(f"{k:28s} {v['aji']:7.4f} {v['pq']:7.4f} {v['f1@0.5']:7.4f}")
    sweep = None
    if args.sweep:
        sweep = sweep_markers(maps, post)
        best = max(sweep, key=sweep.get)
        print(f"\nmarker variants: best {best}: AJI {sweep[best]:.4f} (model, sidecar: {summary['model']['aji']:.4f})")
    if args.json:
        out = {"sweep_mean_aji": sweep, "benchmark": "aji_oracle", "model": model.id, "images": MONUSEG_VAL,
               "postprocess": {k: getattr(post, k) for k in ("threshold", "marker_threshold", "relief")},
               "mean_per_image": summary, "aji_per_image": per_image, "nuclei": counts,
               "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
