"""Command line: ``wsiseg run``, ``wsiseg train``, ``wsiseg models``. Thin: parse, call, report."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsiseg.slide import INPUT_SUFFIXES, SAMPLE, SlideError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given; folders expand to the slides and images directly inside them."""
    files, errors = [], []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES)
            if not found:
                errors.append(f"{p}: folder holds no slides or images ({', '.join(sorted(INPUT_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(p)
    return files, errors


def _out_names(files: list[Path]) -> list[str]:
    """Output folder names: the file stem, made unique with the parent folder's name if needed."""
    stems = [f.name.split(".")[0] if f.name.lower().endswith((".ome.tif", ".ome.tiff")) else f.stem for f in files]
    names = []
    for f, s in zip(files, stems):
        names.append(s if stems.count(s) == 1 else f"{f.parent.name}_{s}")
    return names


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from wsiseg.models.registry import ModelError, load_model
    from wsiseg.pipeline import BLEND_THREAD, RunConfig, run_slide
    from wsiseg.predict import Predictor

    inputs = list(args.inputs)
    if args.sample:
        inputs.insert(0, str(SAMPLE))
    if not inputs:
        print("wsiseg run: give one or more slides, images or folders (or --sample)", file=sys.stderr)
        return EXIT_USAGE
    files, errors = _expand_inputs(inputs)
    for e in errors:
        print(f"wsiseg: error: {e}", file=sys.stderr)
    try:
        model = load_model(args.model)
        predictor = Predictor(model, args.device, threads=args.threads, tta=args.tta, backend=args.backend)
        cfg = RunConfig(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, workers=args.workers,
                        mpp=args.mpp, overwrite=args.overwrite, window=args.window, tissue=not args.no_tissue_mask,
                        cellularity=not args.no_cellularity, cell_window=args.cell_window,
                        cell_stride=args.cell_stride, cell_min_tissue=args.cell_min_tissue,
                        lgbm=None if args.lgbm == "none" else args.lgbm,
                        cnn=None if args.cnn == "none" else args.cnn, instances=args.instances,
                        blend_thread=BLEND_THREAD[args.blend_thread], blend_on_device=args.blend_on_device)
    except (ModelError, ValueError) as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.tile % model.input_multiple:
        print(f"wsiseg: error: --tile {cfg.tile} must be a multiple of {model.input_multiple} for model {model.id}", file=sys.stderr)
        return EXIT_USAGE
    out_root = Path(args.output)
    failed = len(errors)
    if args.split and not (args.cluster or args.scheduler):
        print("wsiseg: error: --split needs --cluster local:N or --scheduler ADDRESS", file=sys.stderr)
        return EXIT_USAGE
    if args.cluster or args.scheduler:
        return failed_code(failed + _run_cluster(args, files, out_root, cfg, predictor))
    for f, name in zip(files, _out_names(files)):
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
        except KeyboardInterrupt:
            bar.close()
            print(f"wsiseg: interrupted during {f}; run the same command again to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # an unexpected failure on one input must not stop the batch
            bar.close()
            logging.getLogger("wsiseg").debug("traceback", exc_info=True)
            print(f"wsiseg: error: {f}: failed ({type(e).__name__}: {e}); run with -v for the traceback", file=sys.stderr)
            failed += 1
            continue
        bar.close()
        _report(f, res.status, res.message, res.summary, res.out_dir)
    return failed_code(failed)


def failed_code(failed: int) -> int:
    if failed:
        print(f"wsiseg: {failed} input(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


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
        print(f"  {n['instances']} nuclei -> nuclei.geojson, probabilities.zarr/labels/nuclei")
    if message:
        print(f"wsiseg: warning: {f}: {message}", file=sys.stderr)


def _run_cluster(args: argparse.Namespace, files: list[Path], out_root: Path, cfg, predictor) -> int:
    """Spread the inputs (or, with --split, each input's bands) over Dask workers; returns the
    number of inputs that failed."""
    from wsiseg.cluster import make_client, run_distributed, split_band_runner
    from wsiseg.pipeline import run_slide

    model = args.model
    if model is not None and (Path(model).exists() or Path(model + ".safetensors").exists()):
        model = str(Path(model).resolve())
    jobs = [(f.resolve(), (out_root / name).resolve()) for f, name in zip(files, _out_names(files))]
    failed = 0
    try:
        client = make_client(args.cluster, args.scheduler)
    except (ValueError, OSError) as e:
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return len(files)
    with client:
        if args.split:
            for f, o in jobs:
                runner = split_band_runner(client, f, o, model, args.device, cfg, args.split, args.threads, args.tta,
                                            args.backend)
                try:
                    res = run_slide(f, o, predictor, cfg, band_runner=runner)
                except SlideError as e:
                    print(f"wsiseg: error: {e}", file=sys.stderr)
                    failed += 1
                    continue
                _report(f, res.status, res.message, res.summary, res.out_dir)
            return failed
        for r in run_distributed(client, jobs, model, args.device, cfg, args.threads, args.tta, args.backend):
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
        for d in (cfg.monuseg, cfg.consep, cfg.monusac):
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

    for name in list_models():
        meta = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        val = meta.get("metrics", {}).get("validation", {}).get("dice_pooled")
        tag = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{tag}: {meta['architecture']}, classes {meta['classes']}, {meta['mpp']} um/px"
              + (f", validation Dice {val:.3f}" if val is not None else ""))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from wsiseg.evaluate import evaluate_monuseg, results_tables
    from wsiseg.models.registry import ModelError, load_model
    from wsiseg.pipeline import postprocess_config
    from wsiseg.predict import Predictor
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
            predictor = Predictor(model, args.device, tta=args.tta, backend=args.backend)
        except ValueError as e:
            print(f"wsiseg: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        res = evaluate_monuseg(predictor, args.data, names=args.image or MONUSEG_VAL,
                               post=postprocess_config(model.meta), tune=args.tune)
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

    p = argparse.ArgumentParser(prog="wsiseg", description="Nuclei probability maps from whole-slide images.")
    p.add_argument("--version", action="version", version=f"wsiseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="segment slides or images into OME-Zarr probability maps")
    r.add_argument("inputs", nargs="*", help="slides (SVS, NDPI, MRXS, TIFF...), images (PNG/JPEG/TIFF) or folders")
    r.add_argument("--sample", action="store_true", help="also run the bundled sample slide (CMU-1-Small-Region.svs)")
    r.add_argument("-o", "--output", default="wsiseg-out", help="output root; each input goes to OUT/<stem>/")
    r.add_argument("--model", default=None, help="shipped model name or path to NAME.safetensors (default: the shipped U-Net)")
    r.add_argument("--mpp", type=float, default=None, help="um/px of inputs that do not carry it (plain images)")
    r.add_argument("--tile", type=int, default=256)
    r.add_argument("--overlap", type=float, default=0.5)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--workers", type=int, default=2, help="reader threads")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    r.add_argument("--tta", default="none", choices=["none", "flips", "d4"],
                   help="test-time augmentation: mean probability over 4 flips or the 8 rotations/flips of each tile (4x or 8x the model's time)")
    r.add_argument("--backend", default="torch", choices=["torch", "openvino", "openvino-int8"],
                   help="the network's runtime on the CPU: torch (eager), openvino (the same weights compiled "
                        "by OpenVINO) or openvino-int8 (those quantised to 8-bit integers by NNCF, calibrated "
                        "on the bundled sample slide: faster, probabilities change slightly); "
                        "pip install 'wsiseg[openvino]'")
    r.add_argument("--blend-thread", default="auto", choices=["auto", "on", "off"],
                   help="blend each batch in a thread while the next is inferred (auto: on with CUDA, off on CPU)")
    r.add_argument("--blend-on-device", action="store_true",
                   help="blend on the GPU: accumulate and quantise there, copy back uint8 blocks only (not yet measured on a GPU)")
    r.add_argument("--window", default="hann", choices=["hann", "gaussian", "flat"], help="blending window")
    r.add_argument("--no-tissue-mask", action="store_true", help="infer every tile, background too")
    r.add_argument("--overwrite", action="store_true", help="discard existing output and start again")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument("--instances", action="store_true",
                   help="also write nucleus instances: probabilities.zarr/labels/nuclei and nuclei.geojson (QuPath)")
    r.add_argument("--no-cellularity", action="store_true", help="skip the cellularity stage")
    r.add_argument("--cell-window", type=int, default=512, help="cellularity window, model px (default 512)")
    r.add_argument("--cell-stride", type=int, default=None, help="cellularity window stride (default: the window)")
    r.add_argument("--cell-min-tissue", type=float, default=0.05, help="score windows with at least this tissue share")
    r.add_argument("--lgbm", default="cellularity-lgbm-proxy", help="LightGBM regressor name/path, or none")
    r.add_argument("--cnn", default="cellularity-cnn-proxy", help="CNN regressor name/path, or none")
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
    e.add_argument("--device", default="auto")
    e.add_argument("--tta", default="none", choices=["none", "flips", "d4"],
                   help="test-time augmentation (as wsiseg run --tta)")
    e.add_argument("--backend", default="torch", choices=["torch", "openvino", "openvino-int8"], help="as wsiseg run --backend")
    e.add_argument("--json", default=None, help="write the metrics here")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="tiles/s per stage (reads, model, blend+write, end to end) and peak memory")
    from wsiseg import bench as _bench

    _bench.add_arguments(b)
    b.set_defaults(func=_bench.run_args)

    from wsiseg import cellularity_cli

    cellularity_cli.add_parser(sub)

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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("wsiseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
