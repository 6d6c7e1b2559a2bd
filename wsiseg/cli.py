"""Command line: ``wsiseg run``, ``wsiseg train``, ``wsiseg models``. Thin: parse, call, report."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from wsiseg.inputs import EXIT_OK, expand_inputs, failed_code, out_names
from wsiseg.slide import SAMPLE, SlideError

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, systemd, Docker, SLURM), raised in the main thread as Ctrl-C's
    KeyboardInterrupt is, so that the same clean-up runs: the readers stop, what is final is
    flushed, temporary files are removed, and the next run resumes."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second must not cut the clean-up short
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM handled like SIGINT for the block (main thread only; the old handler restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _interrupt_code(e: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wsiseg.config import RunConfig
    from wsiseg.models.registry import ModelError, load_model
    from wsiseg.pipeline import run_slide
    from wsiseg.predict import PredictorSpec
    from wsiseg.stain import resolve_spec

    inputs = list(args.inputs)
    if args.sample:
        inputs.insert(0, str(SAMPLE))
    if not inputs:
        print("wsiseg run: give one or more slides, images or folders (or --sample)", file=sys.stderr)
        return EXIT_USAGE
    if not args.max_rescale >= 1 or args.max_image_pixels < 1:
        print("wsiseg: error: --max-rescale must be at least 1 and --max-image-pixels at least 1", file=sys.stderr)
        return EXIT_USAGE
    files, errors = expand_inputs(inputs)
    for e in errors:
        print(f"wsiseg: error: {e}", file=sys.stderr)
    try:
        model = load_model(args.model)
        predictor = PredictorSpec.from_args(args).build(model)
        cfg = RunConfig.from_args(args)
        resolve_spec(cfg.stain.method, cfg.stain.target, cfg.stain.clahe, model.meta)  # a bad method or target: before any slide
    except (ModelError, ValueError) as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.tiling.tile % model.input_multiple:
        print(f"wsiseg: error: --tile {cfg.tiling.tile} must be a multiple of {model.input_multiple} for model {model.id}", file=sys.stderr)
        return EXIT_USAGE
    out_root = Path(args.output)
    failed = len(errors)
    if args.split and not (args.cluster or args.scheduler):
        print("wsiseg: error: --split needs --cluster local:N or --scheduler ADDRESS", file=sys.stderr)
        return EXIT_USAGE
    if args.cluster or args.scheduler:
        return failed_code(failed + _run_cluster(args, files, out_root, cfg, predictor))
    if args.patches:
        return failed_code(failed + _run_patches(args, files, out_root, cfg, predictor))
    for f, name in zip(files, out_names(files)):
        bar = tqdm(total=0, unit="tile", desc=f.name, disable=None if not args.quiet else True, leave=False,
                   dynamic_ncols=True)

        def set_total(n: int, bar=bar) -> None:
            bar.total = n
            bar.refresh()

        try:
            res = run_slide(f, out_root / name, predictor, cfg, progress=bar.update, progress_total=set_total)
        except SlideError as e:
            bar.close()
            print(f"wsiseg: error: {e}", file=sys.stderr)
            failed += 1
            continue
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see Terminated)
            bar.close()
            print(f"wsiseg: {f}: interrupted: re-run the same command to resume", file=sys.stderr)
            return _interrupt_code(e)
        except Exception as e:  # an unexpected failure on one input must not stop the batch
            bar.close()
            logging.getLogger("wsiseg").debug("traceback", exc_info=True)
            print(f"wsiseg: error: {f}: failed ({type(e).__name__}: {e}); run with -v for the traceback", file=sys.stderr)
            failed += 1
            continue
        bar.close()
        _report(f, res.status, res.message, res.summary, res.out_dir)
    return failed_code(failed)


def _run_patches(args: argparse.Namespace, files: list[Path], out_root: Path, cfg, predictor) -> int:
    """``--patches``: the images as one batched job into OUT (see :mod:`wsiseg.patches`); returns
    the number of inputs that failed."""
    from tqdm import tqdm

    from wsiseg.patches import run_patches

    if cfg.instances.enabled:
        print("wsiseg: error: --instances is not available with --patches (run the images without --patches)",
              file=sys.stderr)
        return len(files)
    regs = cfg.cellularity.regressors()
    with tqdm(total=len(files), unit="patch", disable=None if not args.quiet else True, leave=False) as bar:
        try:
            s = run_patches(files, out_names(files), out_root, predictor, cfg, regressors=regs, progress=bar.update)
        except SlideError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return len(files)
    print(f"{s['patches']} patches ({s['skipped']} already done) in {s['seconds']['total']:.1f} s, "
          f"{s['patches_per_second']} patches/s on {s['device']} ({s['backend']}) -> {out_root / 'patches.csv'}")
    return len(s["failed"])


def _report(f: Path, status: str, message: str, s: dict, out_dir: Path) -> None:
    """The one-line summary of an input."""
    if status == "skipped":
        print(f"{f.name}: {message}: {out_dir}")
        return
    note = {"resumed": " (resumed)", "no_tissue": " (no tissue)"}.get(status, "")
    print(
        f"{f.name}: {s['tiles_inferred_this_run']} tiles ({s['tiles_with_tissue']}/{s['tiles_total']} with tissue) "
        f"in {s['seconds']['total']:.1f} s, {s['tiles_per_second']} tiles/s on {s['device']}{note} -> {out_dir}"
    )
    c = s.get("cellularity") or {}
    if c.get("status") == "ok":
        parts = [f"{k[len('cellularity_'):]} {v['tissue_weighted_mean']:.2f}" for k, v in c.items()
                 if k.startswith("cellularity_")]
        print(f"  cellularity (tissue-weighted mean of {c['windows']} windows of {c['window_um']:g} um): "
              f"{', '.join(parts)}; per window in cellularity.csv, heatmap.png")
    elif c.get("status") == "skipped":
        print(f"  cellularity skipped: {c['reason']}")
    n = s.get("instances") or {}
    if "instances" in n:
        types = ", ".join(f"{v} {k}" for k, v in (n.get("types") or {}).items())
        print(f"  {n['instances']} nuclei" + (f" ({types})" if types else "")
              + " -> nuclei.geojson, nuclei.csv, probabilities.zarr/labels/nuclei")
    if message:
        print(f"wsiseg: warning: {f}: {message}", file=sys.stderr)


def _run_cluster(args: argparse.Namespace, files: list[Path], out_root: Path, cfg, predictor) -> int:
    """Spread the inputs (or, with --split, each input's bands) over Dask workers; returns the
    number of inputs that failed."""
    from wsiseg.cluster import make_client, run_distributed, split_band_runner
    from wsiseg.pipeline import run_slide
    from wsiseg.predict import PredictorSpec

    spec = PredictorSpec.from_args(args)
    jobs = [(f.resolve(), (out_root / name).resolve()) for f, name in zip(files, out_names(files))]
    failed = 0
    try:
        client = make_client(args.cluster, args.scheduler)
    except (ValueError, OSError) as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return len(files)
    with client:
        if args.split:
            for f, o in jobs:
                runner = split_band_runner(client, f, o, spec, cfg, args.split)
                try:
                    res = run_slide(f, o, predictor, cfg, band_runner=runner)
                except SlideError as e:
                    print(f"wsiseg: error: {e}", file=sys.stderr)
                    failed += 1
                    continue
                _report(f, res.status, res.message, res.summary, res.out_dir)
            return failed
        for r in run_distributed(client, jobs, spec, cfg):
            if r["status"] == "error":
                print(f"wsiseg: error: {r['message']}", file=sys.stderr)
                failed += 1
            else:
                _report(Path(r["path"]), r["status"], r["message"], r["summary"], Path(r["out_dir"]))
    return failed


def _set_overrides(cls, items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as config overrides (values parsed as YAML)."""
    import dataclasses

    import yaml

    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    if raw.get("task") == "nuclei_classes":
        from wsiseg.train.multitask import MultitaskConfig, train_multitask

        cfg = MultitaskConfig.from_yaml(args.config)
        overrides = {k: v for k, v in (("steps", args.steps), ("out", args.out), ("monuseg", args.data)) if v is not None}
        try:
            overrides.update(_set_overrides(MultitaskConfig, args.set))
        except ValueError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        cfg = dataclasses.replace(cfg, **overrides)
        for d in (cfg.monuseg, cfg.consep, cfg.monusac, cfg.tnbc):
            if d and not Path(d).exists():
                print(f"wsiseg: error: training data {d} not found (set it in the config)", file=sys.stderr)
                return EXIT_USAGE
        train_multitask(cfg)
        return EXIT_OK
    from wsiseg.train.loop import TrainConfig, train

    cfg = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("out", args.out), ("data", args.data)) if v is not None}
    try:
        overrides.update(_set_overrides(TrainConfig, args.set))
    except ValueError as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if not Path(cfg.data).exists():
        print(f"wsiseg: error: training data {cfg.data} not found (set data: in the config or --data)", file=sys.stderr)
        return EXIT_USAGE
    train(cfg)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    import json

    from wsiseg.models.registry import DEFAULT_MODEL, WEIGHTS_DIR, list_models

    print("segmentation models (--model NAME):")
    for name in list_models():
        meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        val = (meta.get("metrics") or {}).get("validation", {}).get("dice_pooled")
        tag = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name}{tag}: {meta.get('architecture')}, classes {meta.get('classes')}, {meta.get('mpp')} um/px"
              + (f", validation Dice {val:.3f}" if isinstance(val, (int, float)) else ""))
    print("cellularity regressors (--lgbm NAME, --cnn NAME):")
    for name in list_models("cellularity"):
        meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        flag = "--lgbm" if "lightgbm" in str(meta.get("format")) else "--cnn"
        print(f"  {name}: {flag}, {meta.get('label', 'unknown')} labels, on the class maps of "
              f"{meta.get('segmentation_model', 'a class model')} at {meta.get('mpp')} um/px")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from wsiseg.evaluate import evaluate_monuseg, results_tables
    from wsiseg.models.registry import ModelError, load_model
    from wsiseg.pipeline import postprocess_config
    from wsiseg.predict import PredictorSpec
    from wsiseg.stain import resolve_spec
    from wsiseg.train.datasets import MONUSEG_VAL

    results = []
    for name in args.model or [None]:
        try:
            model = load_model(name)
        except ModelError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"evaluating {model.id} on {args.data} (validation split) ...", file=sys.stderr)
        try:
            predictor = PredictorSpec.from_args(args, threads=None).build(model)
        except ValueError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        try:
            resolve_spec(args.stain, args.stain_target, args.clahe, model.meta)
        except ValueError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        res = evaluate_monuseg(predictor, args.data, names=args.image or MONUSEG_VAL,
                               post=postprocess_config(model.meta), tune=args.tune,
                               stain=(args.stain, args.stain_target, args.clahe))
        if args.tnbc:
            from wsiseg.evaluate import tnbc_validation_names

            res["tnbc"] = evaluate_monuseg(predictor, args.tnbc, names=tnbc_validation_names(args.tnbc),
                                           post=postprocess_config(model.meta),
                                           stain=(args.stain, args.stain_target, args.clahe))
            t = res["tnbc"]
            print(f"TNBC validation ({len(t['images'])} images, patients 05, 11): pixel F1 "
                  f"{t['pooled']['native']['dice']:.4f}, AJI {t['instances_mean_per_image']['aji']:.4f} "
                  "(TNBC's instances are connected components: touching nuclei count as one)")
        if args.classes:
            from wsiseg.evaluate import evaluate_class_split

            try:
                res["classes"] = evaluate_class_split(predictor, args.consep, args.monusac)
            except ValueError as e:
                print(f"wsiseg: warning: {e}: no class metrics", file=sys.stderr)
            else:
                c = res["classes"]
                print(f"classes ({c['images']} images: {c['split']}): Dice (argmax) " + ", ".join(
                    f"{k} {v:.3f}" for k, v in c["dice_argmax"].items() if v is not None)
                      + "; Dice (p >= 0.5) " + ", ".join(
                    f"{k} {v:.3f}" for k, v in c["dice_threshold"].items() if v is not None))
        results.append(res)
        print(f"{'image':32s} {'Dice@model':>10s} {'Dice@native':>11s} {'AJI':>7s}")
        for img, m in res["per_image"].items():
            print(f"{img:32s} {m['model_mpp']['dice']:10.4f} {m['native']['dice']:11.4f} "
                  f"{m.get('instances', {}).get('aji', float('nan')):7.4f}")
        if res.get("tuned"):
            t = res["tuned"]["postprocess"]
            print(f"tuned on these images: threshold {t['threshold']}"
                  + (f", marker threshold {t['marker_threshold']}, relief {t['relief']}" if res["marker_channel"] else ""))
    print()
    print(results_tables(results))
    if args.json:
        out = results[0] if len(results) == 1 else {"models": results}
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from wsiseg.models.registry import ModelError, ensemble_model

    try:
        print(ensemble_model(args.members, args.out, model_id=args.id))
    except ModelError as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from wsiseg.models.registry import ModelError, export_model

    try:
        print(export_model(args.src, args.dst, half=not args.float32))
    except ModelError as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from wsiseg import __version__
    from wsiseg.config import add_arguments as add_config_arguments
    from wsiseg.stain import add_arguments as stain_arguments

    p = argparse.ArgumentParser(prog="wsiseg", description="Nuclei probability maps from whole-slide images.")
    p.add_argument("--version", action="version", version=f"wsiseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="segment slides or images into OME-Zarr probability maps")
    r.add_argument("inputs", nargs="*", help="slides (SVS, NDPI, MRXS, TIFF...), images (PNG/JPEG/TIFF) or folders")
    r.add_argument("--sample", action="store_true", help="also run the bundled sample slide (CMU-1-Small-Region.svs)")
    r.add_argument("-o", "--output", default="wsiseg-out", help="output root; each input goes to OUT/<stem>/")
    r.add_argument("--model", default=None, help="shipped model name or path to NAME.safetensors (default: the shipped U-Net)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    r.add_argument("--tta", default="none", choices=["none", "flips", "d4"],
                   help="test-time augmentation: mean probability over 4 flips or the 8 rotations/flips of each tile (4x or 8x the model's time)")
    r.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "openvino-int8"],
                   help="the network's runtime on the CPU: auto (default: openvino when installed and the network "
                        "converts, else torch; the summary says which), torch (eager), openvino (the same weights compiled "
                        "by OpenVINO) or openvino-int8 (those quantised to 8-bit integers by NNCF, calibrated "
                        "on the bundled sample slide: faster, probabilities change slightly); "
                        "pip install 'wsiseg[openvino]'")
    add_config_arguments(r)  # tiling, limits, engine, stain, stages, output: wsiseg.config's table
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument("--patches", action="store_true",
                   help="the inputs are small images (patches): batch their tiles together and write one "
                        "OUT/patches.zarr + OUT/patches.csv instead of a folder per image")
    r.add_argument("--cluster", default=None, help="local:N: spread inputs over N Dask worker processes")
    r.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://HOST:PORT)")
    r.add_argument("--split", type=int, default=0, metavar="N",
                   help="with --cluster/--scheduler: cut each slide into N band ranges inferred by the workers in parallel")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("train", help="train a segmentation model from a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--data", default=None)
    t.add_argument("--out", default=None)
    t.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set device=cuda --set workers=4 "
                        "--set max_seconds=600; repeatable")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="pixel and instance metrics (Dice, Jaccard, AJI, PQ, mAP, F1@0.5/0.7) and tiles/s of models on the MoNuSeg validation split, through the engine")
    e.add_argument("--model", action="append", default=None,
                   help="a registry model or weights file; repeat to put several in one table (default: the default model)")
    e.add_argument("--data", default="../shared/data/monuseg/train")
    e.add_argument("--image", action="append", default=None,
                   help="evaluate only these validation images (name prefixes; default: the whole split)")
    e.add_argument("--tune", action="store_true",
                   help="also search the thresholds that maximise AJI on these images (optimistic; reported apart)")
    e.add_argument("--tnbc", default=None, help="also the TNBC train folder's validation patients (05, 11): pixel F1, AJI")
    e.add_argument("--classes", action="store_true",
                   help="also the class channels' Dice on the CoNSeP/MoNuSAC validation split (--consep, --monusac)")
    e.add_argument("--consep", default="../shared/data/consep/train")
    e.add_argument("--monusac", default="../shared/data/monusac")
    e.add_argument("--device", default="auto")
    e.add_argument("--tta", default="none", choices=["none", "flips", "d4"],
                   help="test-time augmentation (as wsiseg run --tta)")
    e.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "openvino-int8"], help="as wsiseg run --backend")
    stain_arguments(e)  # as wsiseg run: each image normalised as one slide
    e.add_argument("--json", default=None, help="write the metrics here")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="tiles/s per stage (reads, model, blend+write, end to end) and peak memory")
    from wsiseg import bench as _bench

    _bench.add_arguments(b)
    b.set_defaults(func=_bench.run_args)

    from wsiseg import cellularity_cli, viewer

    cellularity_cli.add_parser(sub)
    viewer.add_parser(sub)

    en = sub.add_parser("ensemble", help="combine trained models into one U-Net ensemble model (mean of their probabilities, seed 001)")
    en.add_argument("members", nargs="+", help="trained models: shipped names or NAME.safetensors paths")
    en.add_argument("-o", "--out", required=True, help="destination NAME(.safetensors); its NAME.json sidecar is written beside it")
    en.add_argument("--id", default=None, help="model id in the sidecar (default: the file name)")
    en.set_defaults(func=cmd_ensemble)

    x = sub.add_parser("export", help="copy trained weights for shipping (float16 storage)")
    x.add_argument("src", help="NAME.safetensors with its NAME.json")
    x.add_argument("dst", help="destination NAME(.safetensors)")
    x.add_argument("--float32", action="store_true", help="keep float32")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("PIL").setLevel(logging.WARNING)
    with _sigterm_as_interrupt():
        try:
            return args.func(args)
        except KeyboardInterrupt as e:
            print("wsiseg: interrupted", file=sys.stderr)
            return _interrupt_code(e)
        except ValueError as e:  # a model that cannot be used, from any command: one line, no traceback
            from wsiseg.models.registry import ModelError

            if not isinstance(e, ModelError):
                raise
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
