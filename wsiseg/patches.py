"""Folders of small images (``wsiseg run FOLDER --patches``): many images, one batched pass.

Patch collections (BreastPathQ's 512 px patches, PanNuke's 256 px ones, CoNSeP tiles) are run
as one job instead of one slide per image: the tiles of many images go through the network
together in full batches, each image is blended in memory on its own extent (the same grid,
Hann window, weighted sums and uint8 rounding as ``wsiseg run``), and each is scored for
cellularity on its own extent (the whole map is one window, as the regressors were trained),
LightGBM's features over a batch of images at a time, the map CNN on a batch of maps.

Outputs, in ``OUT/`` (not one folder per image):

* ``patches.zarr``: a Zarr v2 group, one (C, h, w) uint8 array per image (round(p x 255) at the
  model's resolution, named by the image's output name), group attributes ``wsiseg`` with the
  model, classes, mpp, tile, overlap, window and the arrays' ``complete`` flags;
* ``patches.csv`` (+ ``.parquet`` with pyarrow): one row per image: ``image`` (its path),
  ``name`` (its array), ``width``, ``height`` (model px), ``slide_mpp``, ``nuclear_fraction``
  (mean nucleus probability), ``cellularity_share`` (the no-learning malignant share of the
  nuclear mass) and one ``cellularity_<regressor>`` column per regressor;
* ``patches_summary.json``: counts, seconds per stage, patches/s; written last.

Resuming: every image's row is appended to ``patches.csv`` (flushed) once its array is written,
so a re-run of an interrupted job skips the images already there. Images larger than
``max_px`` a side at the model's resolution are not patches (run them as slides, without
``--patches``); unreadable images are reported and the others still processed.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from wsiseg.blend import normalise, window
from wsiseg.pipeline import RunConfig, open_view
from wsiseg.predict import Predictor
from wsiseg.run_folder import RunFolder
from wsiseg.scoring import CLASS_INPUTS, load_regressor, malignant_share
from wsiseg.slide import SlideError
from wsiseg.store import ProbabilityStore
from wsiseg.tiling import TileGrid

log = logging.getLogger("wsiseg")

STORE_NAME = "patches.zarr"
TABLE_NAME = "patches.csv"
SUMMARY_NAME = "patches_summary.json"
_FLUSH_EVERY = 16  # finished images scored and written together (LightGBM's features in a thread pool)
PATCH_OUTPUTS = (STORE_NAME, TABLE_NAME, TABLE_NAME + ".tmp", "patches.parquet", SUMMARY_NAME, SUMMARY_NAME + ".tmp")
# (the folder's lock, wsiseg.run_folder's .wsiseg.lock, stays: it is released, never removed)


@dataclass
class _Image:
    """One image in flight: its pixels at the model's resolution and its blend accumulators."""

    path: Path
    name: str
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's mpp
    slide_mpp: float
    tiles: list[tuple[int, int]]  # (y, x) of its tiles (may start before the image)
    sums: np.ndarray = field(init=False)  # (C, H, W) float32 weighted sums
    weights: np.ndarray = field(init=False)  # (H, W) float32
    done: int = 0


def _read(path: Path, model_mpp: float, cfg: RunConfig, max_px: int) -> tuple[np.ndarray, float]:
    """(the image at the model's resolution (H, W, 3) uint8, its own um/px), after the checks
    ``wsiseg run`` makes before reading pixels (resolution, resampling, size, mode)."""
    reader, view = open_view(path, model_mpp, cfg)
    try:
        h, w = view.shape
        if max(h, w) > max_px:
            raise SlideError(f"{path}: {w} x {h} px at the model's {model_mpp} um/px is not a patch (more than "
                             f"{max_px} px a side): run it without --patches")
        return view.read(0, 0, h, w), float(reader.mpp)
    finally:
        reader.close()


def _tile_pixels(img: np.ndarray, y: int, x: int, t: int) -> np.ndarray:
    """The (t, t, 3) tile at (y, x) of an image, mirrored beyond its edges (as ``ScaledView.read``)."""
    h, w = img.shape[:2]
    y0, y1, x0, x1 = max(y, 0), min(y + t, h), max(x, 0), min(x + t, w)
    inner = img[y0:y1, x0:x1]
    pad = ((y0 - y, y + t - y1), (x0 - x, x + t - x1), (0, 0))
    if not any(p for p in pad[0] + pad[1]):
        return inner
    return np.pad(inner, pad, mode="symmetric")


class _Scorer:
    """Cellularity of finished maps, a batch of images at a time."""

    def __init__(self, regressors: dict[str, str]):
        self.models = {}
        for kind, name in regressors.items():
            m = load_regressor(kind, name)
            if m is None:
                log.warning("cellularity regressor %s (%s) not found: column cellularity_%s left out", name, kind, kind)
            else:
                self.models[kind] = m

    def __call__(self, maps: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = {"share": np.array([malignant_share(m) for m in maps])}
        for kind, m in self.models.items():
            out[kind] = np.asarray(m.predict(maps), np.float64)
        return out


def _existing(out_dir: Path, params: dict, overwrite: bool) -> dict[str, dict]:
    """Rows already written by an earlier run with the same parameters (image path -> row)."""
    store, table = out_dir / STORE_NAME, out_dir / TABLE_NAME
    if overwrite:
        import shutil

        try:  # only a store wsiseg wrote (its own attributes) is removed, never a user's folder
            own = not store.exists() or "params" in zarr.open_group(
                str(store), mode="r").attrs["wsiseg"]
        except (KeyError, ValueError, FileNotFoundError, TypeError):
            own = False
        if not own or (store.exists() and store.is_symlink()):
            raise SlideError(f"{store}: not a patches store wsiseg wrote; --overwrite leaves it: move it away "
                             "or give -o another folder")
        for n in PATCH_OUTPUTS:
            p = out_dir / n
            if p.is_symlink():
                continue
            if p == store and p.is_dir():
                shutil.rmtree(p)  # (its attributes say wsiseg wrote it: checked above)
            elif p.is_file():  # wsiseg writes only files under the other names; a folder stays
                p.unlink()
        return {}
    if not store.exists():
        return {}
    try:
        old = dict(zarr.open_group(str(store), mode="r").attrs["wsiseg"]["params"])
    except (KeyError, ValueError, FileNotFoundError):
        old = None
    if old != params:
        raise SlideError(f"{store}: holds patches made with other parameters ({old}); use another -o or "
                         "--overwrite (which removes only the patch outputs)")
    if not table.exists():
        return {}
    with open(table, newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def run_patches(files: list[Path], names: list[str], out_dir: Path, predictor: Predictor,
                cfg: RunConfig = RunConfig(), regressors: dict[str, str] | None = None, max_px: int = 2048,
                progress: Callable[[int], None] | None = None) -> dict:
    """Run ``files`` (small images; output names ``names``) into ``out_dir`` (see the module doc)
    with ``cfg``'s tiling, batch size, window, resolution options and ``overwrite``; the
    cellularity ``regressors`` ({kind: name}; None: none). One job at a time holds ``out_dir``.

    Returns the summary (also written to ``patches_summary.json``): ``patches``, ``failed``
    (``[{"image", "error"}]``), ``skipped`` (already done), ``seconds`` per stage,
    ``patches_per_second`` and ``network_seconds_per_patch``."""
    if not files:
        raise SlideError("no images to run")
    with RunFolder(out_dir, out_dir).locked():
        return _run_patches(files, names, Path(out_dir), predictor, cfg, regressors, max_px, progress)


class _PatchOutputs:
    """A patch job's outputs in ``out_dir``: one Zarr array per image (with the group's
    attributes), the table (a row per image, flushed and fsynced after each group written) and,
    with ``scorer``, the images' cellularity; ``close()`` closes the table."""

    def __init__(self, out_dir: Path, params: dict, model, channels: list[str], scorer, secs: dict, progress):
        self.group = zarr.open_group(str(out_dir / STORE_NAME), mode="a", zarr_format=2)
        if "wsiseg" not in self.group.attrs:
            self.group.attrs["wsiseg"] = {"params": params, "mpp": model.mpp, "classes": channels, "model": model.id,
                                          "resolution": "each array at the model's resolution (mpp um/px)"}
        self.scorer, self.secs, self.progress, self.n_done = scorer, secs, progress, 0
        self.nucleus = channels.index("nucleus") if "nucleus" in channels else 0
        self.cls_idx = [channels.index(c) for c in CLASS_INPUTS] if scorer is not None else None
        cols = ["image", "name", "width", "height", "slide_mpp", "nuclear_fraction"]
        if scorer is not None:
            cols += ["cellularity_share"] + [f"cellularity_{k}" for k in scorer.models]
        self.table_path = out_dir / TABLE_NAME
        new_table = not self.table_path.exists()
        self.table_f = open(self.table_path, "a", newline="")
        self.table = csv.DictWriter(self.table_f, fieldnames=cols)
        if new_table:
            self.table.writeheader()
            self.table_f.flush()

    def write(self, finished: list[_Image]) -> None:
        """Score and write these blended images."""
        ts = time.perf_counter()
        maps_u8 = [ProbabilityStore.to_uint8(normalise(im.sums, im.weights, im.sums)) for im in finished]
        scores = self.scorer([m[self.cls_idx].astype(np.float32) / 255.0 for m in maps_u8]) if self.scorer is not None else {}
        self.secs["score"] += time.perf_counter() - ts
        tw = time.perf_counter()
        for k, (im, m) in enumerate(zip(finished, maps_u8)):
            arr = self.group.create_array(im.name, shape=m.shape, chunks=m.shape, dtype="uint8", overwrite=True)
            arr[...] = m
            row = {"image": str(im.path), "name": im.name, "width": m.shape[2], "height": m.shape[1],
                   "slide_mpp": round(im.slide_mpp, 6),
                   "nuclear_fraction": round(float(m[self.nucleus].mean()) / 255.0, 4)}
            for kind, v in scores.items():
                row[f"cellularity_{kind}"] = round(float(v[k]), 4)
            self.table.writerow(row)
            self.n_done += 1
            if self.progress:
                self.progress(1)
        self.table_f.flush()
        os.fsync(self.table_f.fileno())
        self.secs["write"] += time.perf_counter() - tw

    def close(self) -> None:
        self.table_f.close()


def _blend_batch(predictor: Predictor, items: list[tuple[_Image, int, int]], tile: int, win: np.ndarray,
                 secs: dict) -> list[_Image]:
    """Infer one batch of tiles (``(image, y, x)``) and blend each into its image; returns the
    images that this batch finished (their pixels released)."""
    tiles = np.stack([_tile_pixels(im.pixels, y, x, tile) for im, y, x in items])
    ti = time.perf_counter()
    probs = predictor.probabilities(tiles)
    secs["infer"] += time.perf_counter() - ti
    tb = time.perf_counter()
    finished = []
    for p, (im, y, x) in zip(probs, items):
        h, w = im.weights.shape
        y0, y1, x0, x1 = max(y, 0), min(y + tile, h), max(x, 0), min(x + tile, w)
        wv = win[y0 - y:y1 - y, x0 - x:x1 - x]
        im.sums[:, y0:y1, x0:x1] += p[:, y0 - y:y1 - y, x0 - x:x1 - x] * wv
        im.weights[y0:y1, x0:x1] += wv
        im.done += 1
        if im.done == len(im.tiles):
            finished.append(im)
            im.pixels = None
    secs["blend"] += time.perf_counter() - tb
    return finished


def _run_patches(files, names, out_dir: Path, predictor: Predictor, cfg: RunConfig, regressors, max_px: int,
                 progress) -> dict:
    t_start = time.perf_counter()
    tile, overlap, batch_size, window_kind = cfg.tiling.tile, cfg.tiling.overlap, cfg.engine.batch_size, cfg.tiling.window
    mpp = cfg.tiling.mpp_override or cfg.tiling.mpp
    model = predictor.model
    channels = list(predictor.channels)
    params = {"model": model.id, "classes": channels, "mpp": model.mpp, "tile": tile, "overlap": overlap,
              "window": window_kind, "input_mpp": mpp}
    done_rows = _existing(out_dir, params, cfg.output.overwrite)
    has_classes = all(c in channels for c in CLASS_INPUTS)
    scorer = _Scorer(regressors if regressors is not None else {}) if has_classes else None
    secs = dict.fromkeys(("read", "infer", "blend", "score", "write"), 0.0)
    outputs = _PatchOutputs(out_dir, params, model, channels, scorer, secs, progress)
    grid_win = window(tile, window_kind)
    failed, skipped = [], 0
    queue: list[tuple[_Image, int, int]] = []  # tiles waiting for a batch
    finished: list[_Image] = []  # blended images waiting to be scored and written

    def run_batch(items: list[tuple[_Image, int, int]]) -> None:
        finished.extend(_blend_batch(predictor, items, tile, grid_win, secs))
        if len(finished) >= _FLUSH_EVERY:
            outputs.write(finished)
            finished.clear()

    try:
        for path, name in zip(files, names):
            if str(path) in done_rows:
                skipped += 1
                if progress:
                    progress(1)
                continue
            tr = time.perf_counter()
            try:
                pixels, slide_mpp = _read(Path(path), model.mpp, cfg, max_px)
            except SlideError as e:
                failed.append({"image": str(path), "error": str(e)})
                log.error("wsiseg: error: %s", e)
                continue
            grid = TileGrid(pixels.shape[:2], tile, overlap)
            im = _Image(Path(path), name, pixels, slide_mpp, [(int(y), int(x)) for y in grid.ys for x in grid.xs])
            im.sums = np.zeros((len(channels), *pixels.shape[:2]), np.float32)
            im.weights = np.zeros(pixels.shape[:2], np.float32)
            secs["read"] += time.perf_counter() - tr
            queue.extend((im, y, x) for y, x in im.tiles)
            while len(queue) >= batch_size:
                run_batch(queue[:batch_size])
                del queue[:batch_size]
        if queue:
            run_batch(queue)
            queue.clear()
        if finished:
            outputs.write(finished)
    finally:
        outputs.close()
    _write_parquet(outputs.table_path)
    total = time.perf_counter() - t_start
    n_done = outputs.n_done
    summary = {
        "patches": n_done, "skipped": skipped, "failed": failed, "model": model.id, "backend": predictor.backend,
        "device": str(predictor.device), "mpp": model.mpp, "tile": tile, "overlap": overlap,
        "seconds": {k: round(v, 3) for k, v in secs.items()} | {"total": round(total, 3)},
        "patches_per_second": round(n_done / total, 3) if total > 0 and n_done else None,
        "network_seconds_per_patch": round(secs["infer"] / n_done, 4) if n_done else None,
        "seconds_per_patch": round(total / n_done, 4) if n_done else None,
        "regressors": sorted(scorer.models) if scorer is not None else [],
        "complete": not failed,
    }
    tmp = out_dir / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / SUMMARY_NAME)
    return summary


def _write_parquet(table_path: Path) -> None:
    try:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
    except ImportError:
        return
    pq.write_table(pcsv.read_csv(str(table_path)), str(table_path.with_suffix(".parquet")))
