"""``wsiseg cellularity train`` / ``eval``: the LightGBM cellularity regressor on real data.

Data sources and their labels: :mod:`wsiseg.cellularity.labelled`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from wsiseg.cellularity.labelled import (BREASTPATHQ_MPP, class_maps, fits_input, image_inputs, label_of,
                                         load_patches, map_features, map_inputs, metrics_table,
                                         regression_metrics, split)
from wsiseg.splits import natural_key
from wsiseg.stain import StainError, resolve_spec
from wsiseg.stain import add_arguments as stain_arguments


def _stain_spec(args: argparse.Namespace, predictor):
    """The segmentation model's stain normalisation (``--stain``, ``--stain-target``, ``--clahe``;
    by default as its sidecar says it was trained), each patch fitted as one slide."""
    try:
        return resolve_spec(args.stain, args.stain_target, args.clahe, predictor.model.meta)
    except StainError as e:
        raise SystemExit(f"wsiseg: error: {e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor

    log = print
    predictor = Predictor(load_model(args.model), args.device, threads=args.threads)
    stain = _stain_spec(args, predictor)
    mpp = predictor.model.mpp
    patches = [p for spec in args.data for p in load_patches(spec, mpp, args.mpp, args.images)[:args.max_patches]]
    train, val = split(patches, args.val_every)
    log(f"{len(train)} train / {len(val)} validation patches (split by source image, every N-th group: "
        f"{args.val_every}); model {predictor.model.id} at {mpp} um/px")
    t0 = time.perf_counter()
    label = label_of(patches)
    out = Path(args.out)
    if args.regressor == "cnn":
        path, side, res = _train_cnn(args, predictor, train, val, label, out, log, stain)
    elif args.regressor == "image":
        path, side, res = _train_image_cnn(args, predictor, train, val, label, out, log)
    else:
        path, side, res = _train_lgbm(args, predictor, train, val, label, out, log, stain)
    meta = json.loads(side.read_text())
    meta.update({
        "id": out.name,
        "segmentation_model": predictor.model.id,
        "mpp": mpp,
        "label": label,
        "data": args.data,
        "validation_split": f"by source image/slide: every N-th group in natural order ({args.val_every})",
        "validation_groups": sorted({p.group for p in val}, key=natural_key),
        "validation_metrics": res,
        "segmentation_stain": None if stain is None else stain.params(),
        "budget": {"seconds": round(time.perf_counter() - t0, 1), "train_patches": len(train),
                   "val_patches": len(val), "machine": f"{predictor.device}, {__import__('torch').get_num_threads()} threads"},
    })
    side.write_text(json.dumps(meta, indent=2, default=float) + "\n")
    log(f"wrote {path} and {side}")
    return 0


def _train_lgbm(args, predictor, train, val, label, out, log, stain=None):
    from wsiseg.cellularity.features import FEATURE_NAMES
    from wsiseg.cellularity.regressors import LightGBMRegressor

    Xt, _ = map_features(predictor, train, log, stain)
    Xv, _ = map_features(predictor, val, log, stain)
    yt = np.array([p.y for p in train])
    yv = np.array([p.y for p in val])
    reg = LightGBMRegressor(n_jobs=args.threads).fit(Xt, yt, Xv if len(val) else None, yv if len(val) else None,
                                                    feature_names=FEATURE_NAMES)
    res = {}
    if len(val):
        res = regression_metrics(yv, reg.predict(Xv), label)
        log(metrics_table({"lgbm": res}))
    path = reg.save(out)
    side = out.with_name(out.name + ".json")
    meta = json.loads(side.read_text())
    meta["feature_normalisation"] = "per_pixel"
    side.write_text(json.dumps(meta, indent=2, default=float) + "\n")
    if args.importance:
        reg.plot_importance(args.importance, title=f"{out.name}: feature importance (gain)")
    return path, side, res


def _train_cnn(args, predictor, train, val, label, out, log, stain=None):
    from wsiseg.cellularity.cnn import MapCNNRegressor

    size = args.input_size
    Xt, yt = map_inputs(predictor, train, size, stain)
    Xv, yv = map_inputs(predictor, val, size, stain)
    log(f"  CNN on {len(Xt)} train / {len(Xv)} val maps of {size} px (patches larger than that are left out)")
    width = {"full": None, "quarter": {"channels": [16, 32, 64, 128]}}[args.width]
    reg = MapCNNRegressor(mode=args.mode, input_size=size, input_mpp=predictor.model.mpp, device=args.device, arch_kwargs=width)
    reg.fit(Xt, yt, Xv if len(Xv) else None, yv if len(Xv) else None, epochs=args.epochs,
            max_seconds=args.seconds, log=log, data_description={
                "label": label, "data": args.data, "maps": f"predicted by {predictor.model.id}"})
    res = {}
    if len(Xv):
        res = regression_metrics(yv, reg.predict(Xv), label)
        log(metrics_table({"cnn": res}))
    path = reg.save(out)
    return path, Path(str(path)).with_suffix(".json"), res


def _train_image_cnn(args, predictor, train, val, label, out, log):
    """Seed 003's direct baseline: ResNet-34 on the RGB patch (regression or 101-bin classes)."""
    from wsiseg.cellularity.cnn import ImageCNNRegressor

    size = args.input_size
    Xt, yt = image_inputs(train, size)
    Xv, yv = image_inputs(val, size)
    if not len(Xt):
        raise SystemExit(f"wsiseg: error: no training patch fits --input-size {size} px at {predictor.model.mpp} um/px")
    log(f"  direct image CNN ({args.mode}) on {len(Xt)} train / {len(Xv)} val RGB patches of {size} px "
        "(patches larger than that are left out)")
    width = {"full": None, "quarter": {"channels": [16, 32, 64, 128]}}[args.width]
    reg = ImageCNNRegressor(mode=args.mode, input_size=size, input_mpp=predictor.model.mpp, device=args.device,
                            arch_kwargs=width)
    reg.fit(Xt, yt, Xv if len(Xv) else None, yv if len(Xv) else None, epochs=args.epochs,
            max_seconds=args.seconds, log=log, data_description={"label": label, "data": args.data})
    res = {}
    if len(Xv):
        res = regression_metrics(yv, reg.predict(Xv), label)
        log(metrics_table({f"image-{args.mode}": res}))
    path = reg.save(out)
    return path, Path(str(path)).with_suffix(".json"), res


def cmd_eval(args: argparse.Namespace) -> int:
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor
    from wsiseg.scoring import _find, load_regressor

    predictor = Predictor(load_model(args.model), args.device)
    stain = _stain_spec(args, predictor)
    patches = [p for spec in args.data
               for p in load_patches(spec, predictor.model.mpp, args.mpp, args.images)[:args.max_patches]]
    if args.split == "val":
        _, patches = split(patches, args.val_every)
    print(f"{len(patches)} patches ({args.split}); model {predictor.model.id}")
    map_regs = [(k, n) for k, n in (("lgbm", args.lgbm), ("cnn", args.cnn)) if n and n != "none"]
    maps = [class_maps(predictor, p.image, stain) for p in patches] if map_regs else []
    y = np.array([p.y for p in patches])
    label = label_of(patches)
    rows = {}
    per_patch: dict[str, list] = {}  # regressor -> one prediction per patch (None: not scored)
    for kind, name in map_regs:
        reg = load_regressor(kind, name)
        if reg is None:
            print(f"wsiseg: warning: regressor {name} ({kind}) not found, skipped", file=sys.stderr)
            continue
        from wsiseg.scoring import pad_to

        pred = reg.predict([pad_to(m, 16) for m in maps])
        rows[kind] = regression_metrics(y, pred, label)
        per_patch[kind] = [float(v) for v in pred]
    for name in args.image_cnn or []:
        from wsiseg.cellularity.cnn import ImageCNNRegressor

        path = _find(name, (".safetensors",))
        if path is None:
            raise SystemExit(f"wsiseg: error: --image-cnn {name}: no {name}.safetensors with its .json sidecar "
                             "(looked at the path and among the shipped weights)")
        reg = ImageCNNRegressor.load(path, device=args.device)
        X, yi = image_inputs(patches, int(reg.input_size))
        if not len(X):
            print(f"wsiseg: warning: no patch fits {name}'s {reg.input_size} px input, skipped", file=sys.stderr)
            continue
        key = f"image-{reg.mode} ({Path(name).name})"
        pred = reg.predict(X)
        rows[key] = regression_metrics(yi, pred, label)
        fits = iter(float(v) for v in pred)  # image_inputs keeps the patches that fit, in order
        per_patch[key] = [next(fits) if fits_input(p, int(reg.input_size)) else None for p in patches]
    if maps:  # the no-learning baseline: the malignant share of the maps' nuclear mass
        from wsiseg.scoring import malignant_share

        pred = [malignant_share(m) for m in maps]
        rows["share (no learning)"] = regression_metrics(y, pred, label)
        per_patch["share"] = pred
    print(metrics_table(rows))
    if args.predictions:
        _write_csv(args.predictions, ["patch", "group", "label", "y", *per_patch],
                   [[p.name, p.group, p.label, p.y, *(v[i] for v in per_patch.values())] for i, p in enumerate(patches)])
        print(f"wrote {args.predictions} ({len(patches)} patches)")
    if args.json:
        Path(args.json).write_text(json.dumps({"patches": len(patches), "split": args.split, "rows": rows,
                                               "model": predictor.model.id, "data": args.data}, indent=2,
                                              default=float) + "\n")
    return 0


def _write_csv(path, header: list[str], rows: list[list]) -> None:
    """A CSV with ``header``; floats with 6 decimals, None as an empty field."""
    import csv

    def cell(v):
        return "" if v is None else f"{v:.6f}" if isinstance(v, float) else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([cell(v) for v in r] for r in rows)


def read_patch(path: Path, mpp: float | None, model_mpp: float, max_px: int = 4096) -> tuple[np.ndarray, float]:
    """(RGB at ``model_mpp``, the file's um/px): the whole image, read as ``wsiseg run`` reads a
    slide (its own resolution if it has one, else ``mpp``; the same checks, before any pixel is
    decoded). Raises :class:`wsiseg.slide.SlideError` with a message naming the file."""
    from wsiseg.slide import ScaledView, SlideError, check_resolution, open_slide

    reader = open_slide(path, mpp)
    try:
        check_resolution(reader, model_mpp)
        view = ScaledView.create(reader, model_mpp)
        h, w = view.shape
        if max(h, w) > max_px:
            raise SlideError(f"{path}: {w} x {h} px at {model_mpp} um/px is a slide, not a patch "
                             f"(over {max_px} px a side): use wsiseg run, which scores it window by window")
        return view.read(0, 0, h, w), float(reader.mpp)
    finally:
        reader.close()


def cmd_predict(args: argparse.Namespace) -> int:
    """Cellularity of whole patches (BreastPathQ-style), one row per image, into a CSV. As
    ``wsiseg run`` does, a file that cannot be scored is reported (one line each) and the others
    are still scored; the exit code is then 1."""
    import logging

    from wsiseg.inputs import expand_inputs, failed_code
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor
    from wsiseg.scoring import load_regressor, pad_to
    from wsiseg.slide import SlideError, link_problem

    files, errors = expand_inputs(args.inputs)  # the same inputs as wsiseg run takes
    errors += [(link_problem(f) or ("", f"{f}: no such file"))[1] for f in files if not f.is_file()]
    files = [f for f in files if f.is_file()]
    for e in errors:  # (every input that cannot be found, before any work)
        print(f"wsiseg: error: {e}", file=sys.stderr)
    regs = {}
    for kind, name in (("lgbm", args.lgbm), ("cnn", args.cnn)):
        if name and name != "none":
            reg = load_regressor(kind, name)
            if reg is None:
                raise SystemExit(f"wsiseg: error: --{kind} {name}: not found (a path or a shipped regressor's name)")
            regs[kind] = reg
    if not regs:
        raise SystemExit("wsiseg: error: no regressor: give --lgbm and/or --cnn (not both none)")
    predictor = Predictor(load_model(args.model), args.device, threads=args.threads)
    failed = len(errors)
    stain = _stain_spec(args, predictor)
    rows = []
    for path in files:
        try:
            image, mpp = read_patch(path, args.mpp, predictor.model.mpp)
            m = pad_to(class_maps(predictor, image, stain), 16)
            scores = [float(r.predict([m])[0]) for r in regs.values()]
        except SlideError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            failed += 1
            continue
        except Exception as e:  # an unexpected failure on one file must not stop the batch
            logging.getLogger("wsiseg").debug("traceback", exc_info=True)
            print(f"wsiseg: error: {path}: failed ({type(e).__name__}: {e}); run with -v for the traceback",
                  file=sys.stderr)
            failed += 1
            continue
        slide, _, rid = path.stem.rpartition("_")
        if not (slide and rid):  # not a BreastPathQ <slide>_<rid> name
            slide = rid = ""
        rows.append([path.name, slide, rid, mpp, *scores])
        if not args.quiet:
            print(f"{path.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in zip(regs, scores)))
    if rows:
        _write_csv(args.out, ["image", "slide", "rid", "mpp", *regs], rows)
        print(f"wrote {args.out} ({len(rows)} patches; model {predictor.model.id}; "
              f"regressors {', '.join(f'{k} {n}' for k, n in (('lgbm', args.lgbm), ('cnn', args.cnn)) if k in regs)})")
    elif failed:
        print(f"wsiseg: no patch could be scored; {args.out} not written", file=sys.stderr)
    return failed_code(failed)


def add_parser(sub) -> None:
    c = sub.add_parser("cellularity", help="train / evaluate the cellularity regressors")
    csub = c.add_subparsers(dest="cell_command", required=True)
    for name, fn in (("train", cmd_train), ("eval", cmd_eval)):
        p = csub.add_parser(name, help=f"{name} the LightGBM regressor (features of the model's class maps)")
        p.add_argument("--data", action="append", required=True,
                       help="KIND:PATH, KIND = breastpathq (labels CSV), consep or monusac (PROXY labels); repeatable")
        p.add_argument("--model", default="unet-bn-nuclei-classes-20x", help="segmentation model with class channels")
        p.add_argument("--mpp", type=float, default=None, help=f"um/px of breastpathq patches (default {BREASTPATHQ_MPP}: 20x)")
        p.add_argument("--images", default=None, help="folder of breastpathq images (default: beside the CSV)")
        p.add_argument("--val-every", default="consep=5,monusac=4",
                       help="validation = every Nth source image/slide; N or per source, e.g. consep=5,monusac=4 "
                            "(the default: the class model's own validation images)")
        p.add_argument("--max-patches", type=int, default=None, help="use only the first N patches of each source")
        p.add_argument("--device", default="auto")
        stain_arguments(p)  # of the segmentation model's input, each patch as one slide
        if name == "train":
            p.add_argument("-o", "--out", required=True, help="output stem: writes STEM.txt and STEM.json")
            p.add_argument("--importance", default=None, help="write the feature importance plot (PNG) here")
            p.add_argument("--threads", type=int, default=None)
            p.add_argument("--regressor", choices=["lgbm", "cnn", "image"], default="lgbm",
                           help="lgbm: LightGBM on the 81 features; cnn: ResNet-34 on the 4-channel maps; "
                                "image: the direct baseline, ResNet-34 on the RGB patch")
            p.add_argument("--mode", choices=["regression", "classification"], default="regression",
                           help="cnn / image: sigmoid regression (MSE) or 101-bin classification")
            p.add_argument("--input-size", type=int, default=128, help="cnn: maps per network input, px")
            p.add_argument("--epochs", type=int, default=30, help="cnn: epochs")
            p.add_argument("--width", choices=["full", "quarter"], default="full",
                           help="cnn: ResNet-34 at full width (21 M parameters) or 1/4 width (1.4 M; what is shipped)")
            p.add_argument("--seconds", type=float, default=None, help="cnn: wall-clock budget")
        else:
            p.add_argument("--split", choices=["val", "all"], default="val")
            p.add_argument("--lgbm", default="cellularity-lgbm-proxy")
            p.add_argument("--cnn", default="cellularity-cnn-proxy")
            p.add_argument("--image-cnn", action="append", default=None,
                           help="also evaluate a direct image regressor (name or path; repeatable)")
            p.add_argument("--json", default=None)
            p.add_argument("--predictions", default=None,
                           help="write each patch's reference and predictions to this CSV")
        p.set_defaults(func=fn)
    p = csub.add_parser("predict", help="cellularity of whole patches (e.g. BreastPathQ's), one CSV row per image",
                        description="Scores each image as one patch: the segmentation model's class maps of the "
                                    "whole image at the model's resolution, then the regressors (the same path as "
                                    "cellularity train/eval). For slides use wsiseg run, which scores windows.")
    p.add_argument("inputs", nargs="+", help="image files or folders of them (tif, png, jpg)")
    p.add_argument("-o", "--out", required=True, help="CSV: image, slide, rid (from <slide>_<rid> names), mpp, "
                                                      "one column per regressor")
    p.add_argument("--mpp", type=float, default=None,
                   help="um/px of images that do not say it (BreastPathQ's patches: 0.5)")
    p.add_argument("--model", default="unet-bn-nuclei-classes-20x", help="segmentation model with class channels")
    p.add_argument("--lgbm", default="cellularity-lgbm-proxy", help="LightGBM regressor, or none")
    p.add_argument("--cnn", default="cellularity-cnn-proxy", help="map CNN regressor, or none")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no line per image")
    stain_arguments(p)
    p.set_defaults(func=cmd_predict)
