"""Pixel-level evaluation of a segmentation model *through the engine* on the validation split.

Each validation image goes through ``run_slide`` exactly as a user's image would (resampling to
the model's resolution, tiling, blending). Dice and Jaccard are computed at the model's
resolution (against the mask resampled the same way as for training) and at the data's native
resolution (probabilities upsampled bilinearly to the original mask). Instance metrics (AJI,
PQ, mAP, F1 at IoU 0.5/0.7; :mod:`wsiseg.metrics`) compare the ground-truth instances at native
resolution with instances from :func:`wsiseg.postprocess.instances_from_probability` applied to
the upsampled probabilities (distance-transform watershed by default).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import zarr
from PIL import Image

from wsiseg.metrics import instance_metrics, mean_metrics
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.postprocess import PostprocessConfig, instances_from_probability, search_threshold
from wsiseg.predict import Predictor, pad_to_multiple
from wsiseg.stain import from_record
from wsiseg.train.datasets import MONUSEG_MPP, MONUSEG_VAL, resample


def _scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    tp = float(np.logical_and(pred, gt).sum())
    fp = float(np.logical_and(pred, ~gt).sum())
    fn = float(np.logical_and(~pred, gt).sum())
    tn = float(pred.size) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _summarise(c: dict) -> dict:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "dice": 2 * tp / max(2 * tp + fp + fn, 1),
        "jaccard": tp / max(tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1),
    }


def _channel(classes: list[str], name: str) -> int | None:
    return classes.index(name) if name in classes else None


def evaluate_monuseg(predictor: Predictor, root: str | Path, names: list[str] = MONUSEG_VAL,
                     threshold: float = 0.5, post: PostprocessConfig | None = PostprocessConfig(),
                     tune: bool = False, stain: tuple = (None, None, None)) -> dict:
    """Pixel metrics pooled over the validation images, at the model's and at native resolution;
    instance metrics (mean per image) from ``post`` (predicted shape markers when the model has a
    ``marker`` channel); the engine's tiles/s over these images.

    ``tune``: also search the probability threshold (and the marker threshold of a mask + marker
    model) that maximises the mean AJI over these same images (:func:`search_threshold`); the
    result's ``"tuned"`` holds the chosen post-processing and its metrics, which are then
    optimistic for this split.

    ``stain``: (method, target image, clahe) as ``wsiseg run --stain --stain-target --clahe``
    (None: as the model's sidecar says); each image is normalised as one slide, fitted on itself.
    """
    root = Path(root)
    run_cfg = RunConfig.of(mpp=MONUSEG_MPP, tissue=False, cellularity=False, stain=stain[0], stain_target=stain[1],
                        clahe=stain[2])
    stain_used = None
    pooled = {"model_mpp": dict.fromkeys(("tp", "fp", "fn", "tn"), 0.0), "native": dict.fromkeys(("tp", "fp", "fn", "tn"), 0.0)}
    per_image = {}
    inst = []
    classes = list(predictor.model.classes)
    ci = _channel(classes, "nucleus")
    ci = 0 if ci is None else ci
    mi = _channel(classes, "marker")
    n_tiles, seconds = 0, 0.0
    own = hasattr(predictor.model.network, "instances")  # Mask R-CNN: its own instances too
    own_inst = []
    maps = []  # (native probability, native marker or None, ground-truth instances) for tuning
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            files = sorted((root / "images").glob(f"{name}*.png"))
            if not files:
                raise FileNotFoundError(f"{root}/images: no image {name}*.png")
            f = files[0]
            t0 = time.perf_counter()
            res = run_slide(f, Path(tmp) / f.stem, predictor, run_cfg)
            if res.summary.get("stain"):
                stain_used = {k: res.summary["stain"].get(k) for k in ("method", "clahe", "target_origin")}
            seconds += time.perf_counter() - t0
            n_tiles += int(res.summary.get("tiles_inferred_this_run") or 0)
            arr = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")["0"]
            prob = arr[ci].astype(np.float32) / 255
            marker = None if mi is None else arr[mi].astype(np.float32) / 255
            gt_native = np.asarray(Image.open(root / "masks" / f.name)) > 0
            scale = MONUSEG_MPP / predictor.model.mpp
            gt_model = resample(gt_native.astype(np.float32), scale) >= 0.5
            gt_model = gt_model[: prob.shape[0], : prob.shape[1]]
            prob = prob[: gt_model.shape[0], : gt_model.shape[1]]
            up = cv2.resize(prob, gt_native.shape[::-1], interpolation=cv2.INTER_LINEAR)
            up_marker = None
            if marker is not None:
                marker = marker[: gt_model.shape[0], : gt_model.shape[1]]
                up_marker = cv2.resize(marker, gt_native.shape[::-1], interpolation=cv2.INTER_LINEAR)
            c_model = _scores(prob >= threshold, gt_model)
            c_native = _scores(up >= threshold, gt_native)
            for k in c_model:
                pooled["model_mpp"][k] += c_model[k]
                pooled["native"][k] += c_native[k]
            per_image[f.stem] = {"model_mpp": _summarise(c_model), "native": _summarise(c_native)}
            if post is not None:
                gt_inst = np.asarray(Image.open(root / "instances" / f.name)).astype(np.int64)
                pred_inst = instances_from_probability(up, MONUSEG_MPP, post, marker_prob=up_marker)
                m = instance_metrics(gt_inst, pred_inst)
                per_image[f.stem]["instances"] = m
                inst.append(m)
                if tune:
                    maps.append((up, up_marker, gt_inst))
                if own:  # with the image's own stain transform, as run_slide fitted it
                    pst = predictor.with_stain(from_record(res.summary.get("stain")))
                    lab = own_instances(pst, np.asarray(Image.open(f).convert("RGB")), scale)
                    lab = cv2.resize(lab, gt_native.shape[::-1], interpolation=cv2.INTER_NEAREST)
                    m = instance_metrics(gt_inst, lab.astype(np.int64))
                    per_image[f.stem]["own_instances"] = m
                    own_inst.append(m)
    out = {
        "model": predictor.model.id,
        "images": list(per_image),
        "threshold": threshold,
        "model_mpp": predictor.model.mpp,
        "native_mpp": MONUSEG_MPP,
        "pooled": {k: _summarise(v) for k, v in pooled.items()},
        "instances_mean_per_image": mean_metrics(inst) if inst else None,
        "postprocess": None if post is None else dataclasses.asdict(post),
        "marker_channel": mi is not None,
        "own_instances_mean_per_image": mean_metrics(own_inst) if own_inst else None,
        "tiles": n_tiles,
        "seconds": round(seconds, 3),
        "tiles_per_second": round(n_tiles / seconds, 2) if seconds > 0 else None,
        "device": str(predictor.device),
        "stain": stain_used,
        "per_image": per_image,
    }
    if tune and maps:
        out["tuned"] = tune_postprocess(maps, post)
    return out


def tnbc_validation_names(root: str | Path, val_patients=("05", "11")) -> list[str]:
    """The TNBC validation images (by patient, as the default model's training split)."""
    return sorted(f.stem for f in (Path(root) / "images").glob("tnbc_*.png")
                  if f.stem.split("_")[1] in set(val_patients))


def evaluate_class_split(predictor: Predictor, consep: str | Path | None, monusac: str | Path | None,
                         consep_every: int = 5, monusac_every: int = 4) -> dict:
    """Per-class pixel Dice of seed 003's channels on the class validation split (CoNSeP every
    ``consep_every``-th source image, MoNuSAC every ``monusac_every``-th slide, as the class models
    were trained), pooled over the images, two ways: each channel thresholded at 0.5
    (``dice_threshold``), and the 4-class segmentation by the channel of highest probability
    (``dice_argmax``, seed 003's reading of its maps). ``nucleus_dice`` pools the nucleus channel."""
    from wsiseg.train.datasets import CLASS_CHANNELS, load_consep, load_monusac, split_groups

    classes = [c.lower() for c in predictor.model.classes]
    missing = [c for c in CLASS_CHANNELS if c not in classes]
    if missing:
        raise ValueError(f"model {predictor.model.id} has no {', '.join(missing)} channels")
    idx = [classes.index(c) for c in CLASS_CHANNELS]
    samples = []
    if consep:
        samples += split_groups(load_consep(consep, predictor.model.mpp), consep_every)[1]
    if monusac:
        samples += split_groups(load_monusac(monusac, predictor.model.mpp), monusac_every)[1]
    k = len(CLASS_CHANNELS)
    thr, arg = np.zeros((k, 2)), np.zeros((k, 2))
    nuc = np.zeros(2)
    for s in samples:
        probs = predictor.whole_image(s.image)
        cp = probs[idx]
        top = cp.argmax(0)
        for c in range(k):
            t = s.classes == c
            for acc, pred in ((thr, cp[c] >= 0.5), (arg, top == c)):
                acc[c] += (np.logical_and(pred, t).sum(), pred.sum() + t.sum())
        if "nucleus" in classes:
            pred, t = probs[classes.index("nucleus")] >= 0.5, s.mask > 0
            nuc += (np.logical_and(pred, t).sum(), pred.sum() + t.sum())
    out = {"images": len(samples), "split": f"CoNSeP every {consep_every}th source image, MoNuSAC every "
                                             f"{monusac_every}th slide"}
    for name, acc in (("dice_threshold", thr), ("dice_argmax", arg)):
        out[name] = {c: float(2 * acc[i, 0] / acc[i, 1]) if acc[i, 1] else None for i, c in enumerate(CLASS_CHANNELS)}
        out[name]["mean_nlm"] = float(np.mean([out[name][c] or 0.0 for c in CLASS_CHANNELS[:3]]))
    if nuc[1]:
        out["nucleus_dice"] = float(2 * nuc[0] / nuc[1])
    return out


def own_instances(predictor: Predictor, image: np.ndarray, scale: float) -> np.ndarray:
    """(h, w) int32 labels from a network with its own instance head (``network.instances``,
    e.g. Mask R-CNN) on the whole image at the model's resolution (``scale`` = native / model
    um/px), reflect-padded to the network's input multiple."""

    img = np.ascontiguousarray(resample(image, scale))
    h, w = img.shape[:2]
    x = predictor.inputs(pad_to_multiple(img, predictor.model.input_multiple)[None])  # the engine's normalisation
    net = predictor.model.network
    dev = next(net.parameters()).device
    return net.instances(x.to(dev))[0][:h, :w]


def tune_postprocess(maps, post: PostprocessConfig, thresholds=tuple(np.round(np.arange(0.3, 0.91, 0.05), 2)),
                     marker_thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), reliefs=("distance", "marker")) -> dict:
    """Grid search of the probability threshold (and, with a marker map, the marker threshold and
    the watershed relief) for the mean AJI over ``maps`` [(probability, marker or None,
    ground-truth instances)] at native resolution."""
    probs = [m[0] for m in maps]
    gts = [m[2] for m in maps]
    has_marker = maps[0][1] is not None
    best = (-1.0, None)
    grid = {}
    combos = [(mt, r) for r in reliefs for mt in marker_thresholds] if has_marker else [(post.marker_threshold, post.relief)]
    for mt, relief in combos:
        cfg = dataclasses.replace(post, marker_threshold=float(mt), relief=relief)
        thr, scores = search_threshold(probs, gts, "aji", MONUSEG_MPP, thresholds, cfg,
                                       markers_list=[m[1] for m in maps] if has_marker else None)
        for t, v in scores.items():
            grid[f"threshold={t},marker_threshold={mt},relief={relief}" if has_marker else f"threshold={t}"] = v
        if scores[thr] > best[0]:
            best = (scores[thr], dataclasses.replace(cfg, threshold=float(thr)))
    cfg = best[1]
    inst = [instance_metrics(g, instances_from_probability(p, MONUSEG_MPP, cfg, marker_prob=mk)) for p, mk, g in maps]
    return {"postprocess": dataclasses.asdict(cfg), "instances_mean_per_image": mean_metrics(inst),
            "aji_grid": grid, "note": "chosen on the same images: optimistic for this split"}


PIXEL_COLUMNS = (("Jaccard", "jaccard"), ("F1", "dice"), ("Recall", "recall"), ("Precision", "precision"),
                 ("Accuracy", "accuracy"))
INSTANCE_COLUMNS = (("AJI", "aji"), ("PQ", "pq"), ("mAP", "map"), ("F1(0.7)", "f1@0.7"), ("Recall(0.7)", "recall@0.7"),
                    ("Precision(0.7)", "precision@0.7"), ("F1(0.5)", "f1@0.5"), ("Recall(0.5)", "recall@0.5"),
                    ("Precision(0.5)", "precision@0.5"))


def results_tables(results: list[dict], resolution: str = "native") -> str:
    """Markdown tables in the seeds' layouts: pixel metrics and tiles/s as seed 000's Table III,
    instance metrics as seed 001's Table 2 (plus PQ)."""
    lines = ["| Model | " + " | ".join(c for c, _ in PIXEL_COLUMNS) + " | tiles/s |",
             "|---" * (len(PIXEL_COLUMNS) + 2) + "|"]
    for r in results:
        p = r["pooled"][resolution]
        tps = r.get("tiles_per_second")
        lines.append(f"| {r['model']} | " + " | ".join(f"{p[k]:.3f}" for _, k in PIXEL_COLUMNS)
                     + f" | {tps if tps is not None else '-'} |")
    rows = []
    for r in results:
        if r.get("instances_mean_per_image"):
            rows.append((r["model"], r["instances_mean_per_image"]))
        if r.get("tuned"):
            rows.append((r["model"] + " (thresholds tuned on this split)", r["tuned"]["instances_mean_per_image"]))
        if r.get("own_instances_mean_per_image"):
            rows.append((r["model"] + " (its own instance head)", r["own_instances_mean_per_image"]))
    if rows:
        lines += ["", "| Model | " + " | ".join(c for c, _ in INSTANCE_COLUMNS) + " |",
                  "|---" * (len(INSTANCE_COLUMNS) + 1) + "|"]
        for name, m in rows:
            lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for _, k in INSTANCE_COLUMNS) + " |")
    return "\n".join(lines)
