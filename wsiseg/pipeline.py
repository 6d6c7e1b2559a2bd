"""run_slide(): reader -> tissue mask -> tile grid -> block reads -> model -> blending -> OME-Zarr.

The only module that knows all the pieces. Outputs for a slide, in ``out_dir``:
``probabilities.zarr`` (see :mod:`wsiseg.store`), ``summary.json`` (written last: its presence
with ``complete: true`` means the run finished), ``progress.json`` (for resuming),
``thumbnail.png`` and ``tissue.png``.
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import wsiseg
from wsiseg.blend import ChunkBlender, DeviceChunkBlender, trim_heap
from wsiseg.predict import Predictor
from wsiseg.schedule import BlockPrefetcher
from wsiseg.slide import ScaledView, SlideError, open_slide
from wsiseg.store import ProbabilityStore, atomic_write_json
from wsiseg.tiling import TileGrid, window_blocks
from wsiseg.tissue import tissue_mask

log = logging.getLogger("wsiseg")

# Everything run_slide writes into an output folder (so a half-made folder can be cleaned).
OUTPUT_NAMES = {"probabilities.zarr", "summary.json", "summary.json.tmp", "progress.json", "progress.json.tmp",
                "thumbnail.png", "tissue.png", "cellularity.csv", "cellularity.csv.tmp", "cellularity.parquet",
                "heatmap.png", "nuclei.geojson", "nuclei.geojson.tmp"}


@dataclass(frozen=True)
class RunConfig:
    tile: int = 256
    overlap: float = 0.5
    batch_size: int = 8
    workers: int = 2
    mpp: float | None = None  # resolution of inputs that carry none
    window: str = "hann"
    chunk: int = 512
    block_tiles: int = 8
    # blend and release blocks in a thread while the next batch is inferred: True, False, or None
    # (auto: on with a GPU, off on a CPU, where the network already uses every core)
    blend_thread: bool | None = None
    # blend on the predictor's device (a GPU): accumulators there, only uint8 blocks come back
    blend_on_device: bool = False
    thumbnail_size: int = 2048
    tissue: bool = True  # False: every tile is inferred
    overwrite: bool = False
    # cellularity stage (seed 003), on the finished map; see wsiseg.scoring
    cellularity: bool = True
    cell_window: int = 512
    cell_stride: int | None = None
    cell_min_tissue: float = 0.05
    lgbm: str | None = "cellularity-lgbm-proxy"
    cnn: str | None = "cellularity-cnn-proxy"
    # nucleus instances (label image + GeoJSON) from the finished map; see wsiseg.instances
    instances: bool = False


BLEND_THREAD = {"auto": None, "on": True, "off": False}  # --blend-thread -> RunConfig.blend_thread


@dataclass
class SlideResult:
    path: Path
    out_dir: Path
    status: str  # ok | resumed | skipped | no_tissue | error
    message: str = ""
    summary: dict = field(default_factory=dict)


def postprocess_config(meta: dict):
    """The instance post-processing a model's sidecar asks for (``"postprocess"``: the fields of
    :class:`wsiseg.postprocess.PostprocessConfig`, e.g. a threshold tuned on the validation
    split), or the defaults."""
    from wsiseg.postprocess import PostprocessConfig

    post = meta.get("postprocess") or {}
    known = set(PostprocessConfig.__dataclass_fields__)
    return PostprocessConfig(**{k: v for k, v in post.items() if k in known})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _params(cfg: RunConfig, predictor: Predictor, view: ScaledView, path: Path) -> dict:
    extra = {} if predictor.tta == "none" else {"tta": predictor.tta}  # (absent without TTA: older outputs still resume)
    if predictor.backend == "openvino-int8":  # other maps than float32's: a resumed run must not mix them
        extra["backend"] = predictor.backend
    return extra | {
        "input": path.name,
        "input_bytes": path.stat().st_size,
        "model": predictor.model.id,
        "tile": cfg.tile,
        "overlap": cfg.overlap,
        "window": cfg.window,
        "chunk": cfg.chunk,
        "mpp": round(view.mpp, 6),
        "shape": list(view.shape),
        "tissue": cfg.tissue,
    }


def _existing_state(out_dir: Path, params: dict) -> tuple[str, int]:
    """('complete' | 'partial' | 'none' | 'mismatch', bands_done) for an output folder."""
    summary = out_dir / "summary.json"
    progress = out_dir / "progress.json"
    store = out_dir / "probabilities.zarr"
    if not progress.exists() or not store.exists():
        # A run killed before its first progress record: only our own files may be there.
        foreign = [p for p in out_dir.iterdir() if p.name not in OUTPUT_NAMES and not p.name.startswith("progress-bands-")] \
            if out_dir.exists() else []
        return ("mismatch" if foreign else "none"), 0
    try:
        prog = json.loads(progress.read_text())
    except (json.JSONDecodeError, OSError):
        return "mismatch", 0
    if prog.get("params") != params:
        return "mismatch", 0
    if summary.exists():
        try:
            if json.loads(summary.read_text()).get("complete"):
                return "complete", int(prog.get("bands_done", 0))
        except (json.JSONDecodeError, OSError):
            pass
    return "partial", int(prog.get("bands_done", 0))


@dataclass
class Prepared:
    """An open slide with its view at the model's resolution, tissue mask and tile grid."""

    reader: object
    view: ScaledView
    thumb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, tissue on the thumbnail
    grid: TileGrid
    keep: np.ndarray  # (rows, cols) bool, tiles holding tissue
    seconds: dict


def prepare_slide(path: Path, model_mpp: float, cfg: RunConfig) -> Prepared:
    """Open ``path`` and compute what every stage needs; deterministic, so several processes
    preparing the same slide agree on the grid. Raises :class:`SlideError` for bad input."""
    t0 = time.perf_counter()
    reader = open_slide(path, cfg.mpp)
    try:
        view = ScaledView.create(reader, model_mpp)
        t1 = time.perf_counter()
        thumb = reader.thumbnail(min(cfg.thumbnail_size, max(reader.level_dimensions[0])))
        mask = tissue_mask(thumb) if cfg.tissue else np.ones(thumb.shape[:2], bool)
        grid = TileGrid(view.shape, cfg.tile, cfg.overlap)
        keep = grid.tissue_tiles(mask)
    except BaseException:
        reader.close()
        raise
    trim_heap()  # the thumbnail's and the mask's working arrays are gone
    t2 = time.perf_counter()
    return Prepared(reader, view, thumb, mask, grid, keep, {"open": t1 - t0, "tissue": t2 - t1})


def infer_bands(view: ScaledView, grid: TileGrid, keep: np.ndarray, predictor: Predictor, store: ProbabilityStore,
                cfg: RunConfig, first_band: int = 0, stop_band: int | None = None, progress_file: Path | None = None,
                progress: Callable[[int], None] | None = None,
                progress_total: Callable[[int], None] | None = None) -> dict:
    """Infer, blend and write the level-0 bands [first_band, stop_band) (None: to the end).

    Only the tiles that touch those bands are read and inferred; their contributions to other
    bands are dropped, so several processes can each write a disjoint band range of one store.
    Tiles go band by band in column windows (:func:`wsiseg.tiling.window_blocks`), read in pieces
    of a band's rows (:class:`wsiseg.tiling.TileStream`), and blocks of one band by ``2 * chunk``
    columns are written as soon as no later tile touches them, so memory does not follow the
    slide's size (the strip that a band's tiles reach into the next waits on disk beyond 16 MB,
    see :class:`~wsiseg.blend.ChunkBlender`); the map is bit-identical to a row-major pass.
    Each tile's probabilities are multiplied by the blending window just before they are added
    (on a GPU, the predictor does it there for the whole batch); with ``cfg.blend_thread`` (auto:
    on CUDA) one thread blends and releases batch n while batch n + 1 is inferred (the same bytes
    either way); the store encodes and writes blocks in a background thread, and
    ``progress_file`` (default the store's ``progress.json``) records the bands written, after
    each band's last block; everything is on disk when this returns (or raises).
    Returns seconds per stage and the number of tiles inferred (``tiles``).
    """
    from wsiseg.tiling import TileStream

    ch = cfg.chunk
    n_bands = -(-view.shape[0] // ch)
    stop_band = n_bands if stop_band is None else min(stop_band, n_bands)
    if cfg.blend_on_device:
        blender = DeviceChunkBlender(view.shape, len(predictor.channels), cfg.tile, ch, cfg.window,
                                     first_band=first_band, stop_band=stop_band, cols=2 * ch, device=predictor.device)
    else:
        blender = ChunkBlender(view.shape, len(predictor.channels), cfg.tile, ch, cfg.window,
                               first_band=first_band, stop_band=stop_band, cols=2 * ch)
    xs = grid.xs
    todo = window_blocks(grid, keep, ch, first_band, stop_band, cfg.block_tiles)
    for blk in todo:
        for c in blk.cols:
            blender.expect(blk.y, int(xs[c]))
    stream = TileStream(view, grid, todo, cfg.batch_size, workers=cfg.workers, cols=cfg.block_tiles * grid.stride)
    n_todo = stream.tiles
    if progress_total:
        progress_total(n_todo)
    t = dict.fromkeys(("infer", "blend", "write", "read_wait", "blend_wait"), 0.0)
    # two output buffers: the predictor fills one while the other's tiles are being blended
    threaded = cfg.blend_thread
    if threaded is None:
        threaded = predictor.device.type != "cpu"
    # On the CPU the predictor's probabilities are weighted one tile at a time, into a buffer that
    # stays in the cache while the blender adds it (the same float32 products as weighting the
    # whole batch, without writing and reading back a batch of them). On a GPU the window is
    # applied there, and each batch comes back into one of two reused host buffers: the predictor
    # fills one while the other's tiles are being blended.
    per_tile = predictor.device.type == "cpu" and not cfg.blend_on_device
    weighted = np.empty((len(predictor.channels), cfg.tile, cfg.tile), np.float32) if per_tile else None
    outs = [] if cfg.blend_on_device or per_tile else [
        np.empty((cfg.batch_size, len(predictor.channels), cfg.tile, cfg.tile), np.float32)
        for _ in range(2 if threaded else 1)]

    def write_ready() -> None:
        tw = time.perf_counter()
        for b, x, probs in blender.release():
            store.write_block(b, x, probs)
            if x + probs.shape[2] >= view.shape[1]:  # the band's last block
                store.mark_bands_done(b + 1, progress_file)
            trim_heap(every=0.5)
        t["write"] += time.perf_counter() - tw

    def blend(probs: np.ndarray, where: list) -> int:
        tb = time.perf_counter()
        for p, (y, x) in zip(probs, where):
            if per_tile:
                p = np.multiply(p, blender.win, out=weighted)
            blender.add(p, y, x, weighted=True)
        t["blend"] += time.perf_counter() - tb
        write_ready()
        return len(where)

    # The blender and the store are used by one thread at a time: the blend thread runs one
    # batch's job at most, and the main thread waits for it before touching either again.
    pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-blend") if threaded else None
    pending: Future | None = None

    def finish_pending() -> None:
        nonlocal pending
        if pending is not None:
            tw = time.perf_counter()
            job, pending = pending, None
            n = job.result()  # raises what the blend thread raised
            t["blend_wait"] += time.perf_counter() - tw
            if progress:
                progress(n)

    t_loop = time.perf_counter()
    batches = iter(stream)
    try:
        with blender:  # removes the blender's spill folder, whatever happens
            write_ready()  # blocks that no tile touches, before the first tile
            for i, (tiles, where) in enumerate(batches):
                ti = time.perf_counter()
                if cfg.blend_on_device:  # probabilities x window, a new tensor on the device for each batch
                    probs = predictor.on_device(tiles, weight=blender.win)
                elif per_tile:  # the network's own output, weighted in blend()
                    probs = predictor.probabilities(tiles)
                else:  # probabilities x window (as add() would weight each tile), into a reused buffer
                    probs = predictor(tiles, weight=blender.win, out=outs[i % len(outs)][: len(where)])
                t["infer"] += time.perf_counter() - ti
                if pool is None:
                    n = blend(probs, where)
                    del probs  # not alive during the next batch's forward pass (peak RSS)
                    if progress:
                        progress(n)
                    continue
                finish_pending()  # the previous batch (its buffer is the one filled next)
                pending = pool.submit(blend, probs, where)
            finish_pending()
            write_ready()
    finally:
        if pending is not None:  # an error or interrupt in the main thread: let the job end first
            try:
                pending.result()
            except BaseException:  # the main thread's error is the one raised
                pass
        if pool is not None:
            pool.shutdown(wait=True)
        batches.close()  # stops the reader threads now, also on an error (before the slide closes)
        tw = time.perf_counter()
        store.flush()  # the blocks and progress records queued in the writer thread
        t["write"] += time.perf_counter() - tw
    t["read_wait"] = stream.wait_seconds
    t["read"] = stream.read_seconds
    t["tiles_loop"] = time.perf_counter() - t_loop
    t["tiles"] = n_todo
    return t


def run_slide(path: str | Path, out_dir: str | Path, predictor: Predictor, cfg: RunConfig = RunConfig(),
              progress: Callable[[int], None] | None = None, progress_total: Callable[[int], None] | None = None,
              band_runner: Callable[[int, int], dict] | None = None) -> SlideResult:
    """Segment one slide or image into ``out_dir``. Raises :class:`SlideError` for bad input.

    ``progress(n)`` is called with the number of tiles finished since the last call;
    ``progress_total(n)`` once with the number of tiles this run will infer.
    ``band_runner(first_band, n_bands)``, when given, does the inference of the level-0 bands
    instead of this process (e.g. split over Dask workers, see :mod:`wsiseg.cluster`) and
    returns :func:`infer_bands`'s statistics; this function still owns the store's creation,
    resumption, pyramid, completion flag and summary.
    """
    path, out_dir = Path(path), Path(out_dir)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    prep = prepare_slide(path, predictor.model.mpp, cfg)
    reader, view, thumb, mask, grid, keep = prep.reader, prep.view, prep.thumb, prep.mask, prep.grid, prep.keep
    times.update(prep.seconds)
    try:
        params = _params(cfg, predictor, view, path)
        state, bands_done = _existing_state(out_dir, params)
        if state == "mismatch" and not cfg.overwrite:
            raise SlideError(
                f"{path}: {out_dir} holds output of a different run (other model, tile, "
                "overlap or input); use --overwrite to replace it or -o for another folder"
            )
        if cfg.overwrite or state in ("none", "mismatch"):
            # start clean (state "none" may be a folder killed before its first progress record)
            shutil.rmtree(out_dir, ignore_errors=True)
            state, bands_done = "none", 0
        if state == "complete":
            summary = json.loads((out_dir / "summary.json").read_text())
            return SlideResult(path, out_dir, "skipped", "already complete (use --overwrite to redo)", summary)
        out_dir.mkdir(parents=True, exist_ok=True)
        store_path = out_dir / "probabilities.zarr"
        channels = predictor.channels
        attrs = {
            "version": wsiseg.__version__,
            "mpp": view.mpp,
            "slide_mpp": reader.mpp,
            "scale_from_level0": view.scale,  # slide level-0 px per stored level-0 px
            "pyramid_level_read": view.level,
            "model": predictor.model.id,
            "model_mpp": predictor.model.mpp,
            "classes": channels,
            "tile": cfg.tile,
            "overlap": cfg.overlap,
            "stride": grid.stride,
            "window": cfg.window,
            "source": str(path.name),
            "slide_dimensions": list(reader.level_dimensions[0]),
            "params": params,
        }
        if state == "partial":
            store = ProbabilityStore.open_existing(store_path)
            log.info("%s: resuming: %d of %d bands already written", path.name, bands_done, -(-view.shape[0] // cfg.chunk))
        else:
            store = ProbabilityStore.create(store_path, view.shape, channels, view.mpp, attrs, cfg.chunk)
            # zlib level 1: a 2048 px thumbnail in about 0.4 s instead of 0.65 s, 2.5% larger
            Image.fromarray(thumb).save(out_dir / "thumbnail.png", compress_level=1)
            Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / "tissue.png", compress_level=1)

        n_tissue = int(keep.sum())
        if band_runner is None:
            stats = infer_bands(view, grid, keep, predictor, store, cfg, bands_done, None,
                                progress=progress, progress_total=progress_total)
        else:
            stats = band_runner(bands_done, -(-view.shape[0] // cfg.chunk))
            prog = json.loads(store.progress_path.read_text())
            prog["bands_done"] = -(-view.shape[0] // cfg.chunk)
            atomic_write_json(store.progress_path, prog)
        n_todo = stats.pop("tiles")
        times.update(stats)

        t = time.perf_counter()
        store.build_pyramid()
        times["pyramid"] = time.perf_counter() - t
        # the map is whole: mark it so before the stages that read it (instances refuse an
        # incomplete map); the run counts as complete only once summary.json says so, so a crash
        # in a later stage is redone by the next run
        store.mark_complete({"tiles_with_tissue": n_tissue, "tissue_fraction": float(mask.mean())})
        extra = {}
        if cfg.instances:
            from wsiseg.instances import write_instances

            t = time.perf_counter()
            extra["instances"] = write_instances(out_dir, postprocess_config(predictor.model.meta))
            times["instances"] = time.perf_counter() - t
        if cfg.cellularity:
            from wsiseg.scoring import score_map

            t = time.perf_counter()
            regs = {k: v for k, v in (("lgbm", cfg.lgbm), ("cnn", cfg.cnn)) if v}
            extra["cellularity"] = score_map(out_dir, regs, cfg.cell_window, cfg.cell_stride, cfg.cell_min_tissue)
            times["cellularity"] = time.perf_counter() - t
        total = time.perf_counter() - t_start
        times["total"] = total
        status = "no_tissue" if n_tissue == 0 else ("resumed" if state == "partial" else "ok")
        summary = {
            "complete": True,
            "status": status,
            "input": str(path),
            "output": str(store_path),
            "tiles_total": grid.n_tiles,
            "tiles_with_tissue": n_tissue,
            "tiles_inferred_this_run": n_todo,
            "tissue_fraction": float(mask.mean()),
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "tiles_per_second": round(n_todo / total, 2) if total > 0 else None,
            "device": str(predictor.device),
            "torch_threads": __import__("torch").get_num_threads(),
            "model": predictor.model.id,
            "tta": predictor.tta,
            "backend": predictor.backend,
            "mpp": view.mpp,
            "slide_mpp": reader.mpp,
            "shape": list(view.shape),
            "channels": channels,
            "config": asdict(cfg),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wsiseg_version": wsiseg.__version__,
            **extra,
        }
        atomic_write_json(out_dir / "summary.json", summary)
        msg = "no tissue found: wrote an empty (all-zero) probability map" if n_tissue == 0 else ""
        return SlideResult(path, out_dir, status, msg, summary)
    finally:
        reader.close()
