"""run_slide(): reader -> tissue mask -> tile grid -> block reads -> model -> blending -> OME-Zarr.

The only module that knows all the pieces. Outputs for a slide, in ``out_dir``:
``probabilities.zarr`` (see :mod:`wsiseg.store`), ``summary.json`` (written last: its presence
with ``complete: true`` and the store's run id means the run finished), ``progress.json`` (for
resuming), ``thumbnail.png`` and ``tissue.png``; the folder's names, lock and state are
:mod:`wsiseg.run_folder`'s.
"""
from __future__ import annotations

import json
import logging
import resource
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import wsiseg
from wsiseg import stain as stain_norm
from wsiseg.blend import ChunkBlender, DeviceChunkBlender, trim_heap
from wsiseg.config import RunConfig
from wsiseg.predict import Predictor
from wsiseg.run_folder import RunFolder
from wsiseg.schedule import TileStream
from wsiseg.sinks import BlockWriter, SerialRunner, ThreadedRunner, make_sink
from wsiseg.slide import ScaledView, SlideError, check_resolution, open_slide
from wsiseg.store import ProbabilityStore, atomic_write_json
from wsiseg.tiling import TileGrid, window_blocks
from wsiseg.tissue import tissue_mask

log = logging.getLogger("wsiseg")


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


def model_fingerprint(model) -> str:
    """A short SHA-256 of the network's weights (in state_dict order), so that two weight files
    with the same id never resume each other's output."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.network.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _params(cfg: RunConfig, predictor: Predictor, view: ScaledView, path: Path) -> dict:
    """What decides the stored map (compared whole on resume): the input, the model's identity
    and weights, the backend when it changes the maps (INT8), TTA, and :data:`MAP_FIELDS`."""
    extra = {} if predictor.tta == "none" else {"tta": predictor.tta}
    if predictor.backend == "openvino-int8":  # other maps than float32's: a resumed run must not mix them
        extra["backend"] = predictor.backend
    return extra | cfg.part("tiling") | {
        "input": path.name,
        "input_bytes": path.stat().st_size,
        "model": predictor.model.id,
        "model_weights": model_fingerprint(predictor.model),
        "view_mpp": round(view.mpp, 6),
        "shape": list(view.shape),
    }


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


def open_view(path: Path, model_mpp: float, cfg: RunConfig) -> tuple[object, ScaledView]:
    """The slide opened and viewed at the model's resolution, after every check that reads no
    pixels (the file, its resolution and the resampling it needs, a plain image's size and mode).
    Raises :class:`SlideError` for bad input."""
    reader = open_slide(path, cfg.tiling.mpp, mpp_override=cfg.tiling.mpp_override, max_image_pixels=cfg.limits.max_image_pixels)
    try:
        check_resolution(reader, model_mpp, cfg.limits.max_rescale)
        return reader, ScaledView.create(reader, model_mpp)
    except BaseException:
        reader.close()
        raise


def _survey(reader, view: ScaledView, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, TileGrid, np.ndarray]:
    """(thumbnail, tissue mask, tile grid, tissue tiles): the first pixels read."""
    thumb = reader.thumbnail(min(cfg.tiling.thumbnail_size, max(reader.level_dimensions[0])))
    mask = tissue_mask(thumb) if cfg.tiling.tissue else np.ones(thumb.shape[:2], bool)
    grid = TileGrid(view.shape, cfg.tiling.tile, cfg.tiling.overlap)
    keep = grid.tissue_tiles(mask)
    trim_heap()  # the thumbnail's and the mask's working arrays are gone
    return thumb, mask, grid, keep


def prepare_slide(path: Path, model_mpp: float, cfg: RunConfig) -> Prepared:
    """Open a slide and compute what every stage needs; deterministic, so several processes
    preparing the same slide agree on the grid. Raises :class:`SlideError` for bad input."""
    t0 = time.perf_counter()
    reader, view = open_view(path, model_mpp, cfg)
    t1 = time.perf_counter()
    try:
        thumb, mask, grid, keep = _survey(reader, view, cfg)
    except BaseException:
        reader.close()
        raise
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
    of a band's rows (:class:`wsiseg.schedule.TileStream`), and blocks of one band by ``2 * chunk``
    columns are written as soon as no later tile touches them, so memory does not follow the
    slide's size (the strip that a band's tiles reach into the next waits on disk beyond 16 MB,
    see :class:`~wsiseg.blend.ChunkBlender`); the map is bit-identical to a row-major pass.
    Each tile's probabilities are multiplied by the blending window just before they are added
    (on a GPU, the predictor does it there for the whole batch); with ``cfg.engine.blend_thread`` (auto:
    on CUDA) one thread blends and releases batch n while batch n + 1 is inferred (the same bytes
    either way); the store encodes and writes blocks in a background thread, and
    ``progress_file`` (default the store's ``progress.json``) records the bands written, after
    each band's last block; everything is on disk when this returns (or raises).
    Returns seconds per stage and the number of tiles inferred (``tiles``).
    """
    ch = cfg.tiling.chunk
    n_bands = -(-view.shape[0] // ch)
    stop_band = n_bands if stop_band is None else min(stop_band, n_bands)
    if cfg.engine.blend_on_device:
        blender = DeviceChunkBlender(view.shape, len(predictor.channels), cfg.tiling.tile, ch, cfg.tiling.window,
                                     first_band=first_band, stop_band=stop_band, cols=2 * ch, device=predictor.device)
    else:
        # a spill folder goes in the run folder: a killed run leaves nothing elsewhere
        blender = ChunkBlender(view.shape, len(predictor.channels), cfg.tiling.tile, ch, cfg.tiling.window,
                               first_band=first_band, stop_band=stop_band, cols=2 * ch,
                               spill_dir=str(Path(store.path).parent))
    xs = grid.xs
    todo = window_blocks(grid, keep, ch, first_band, stop_band, cfg.engine.block_tiles)
    for blk in todo:
        for c in blk.cols:
            blender.expect(blk.y, int(xs[c]))
    stream = TileStream(view, grid, todo, cfg.engine.batch_size, workers=cfg.engine.workers, cols=cfg.engine.block_tiles * grid.stride)
    n_todo = stream.tiles
    if progress_total:
        progress_total(n_todo)
    t = dict.fromkeys(("infer", "blend", "write", "read_wait", "blend_wait"), 0.0)
    threaded = predictor.device.type != "cpu" if cfg.engine.blend_thread is None else cfg.engine.blend_thread
    writer = BlockWriter(blender, store, view.shape[1], progress_file, t)
    sink = make_sink(predictor, writer, len(predictor.channels), cfg.tiling.tile, cfg.engine.batch_size, cfg.engine.blend_on_device, threaded)
    t_loop = time.perf_counter()
    batches = iter(stream)
    try:
        with blender, (ThreadedRunner(sink, t, progress) if threaded else SerialRunner(sink, progress)) as runner:
            sink.release()  # blocks that no tile touches, before the first tile
            for tiles, where in batches:
                ti = time.perf_counter()
                probs = sink.infer(tiles, len(where))
                t["infer"] += time.perf_counter() - ti
                runner.add(probs, where)
                del probs  # not alive during the next batch's forward pass (peak RSS)
            runner.drain()
            sink.release()
    finally:
        batches.close()  # stops the reader threads now, also on an error (before the slide closes)
        tw = time.perf_counter()
        store.flush()  # the blocks and progress records queued in the writer thread
        t["write"] += time.perf_counter() - tw
    t["read_wait"] = stream.wait_seconds
    t["read"] = stream.read_seconds
    t["tiles_loop"] = time.perf_counter() - t_loop
    t["tiles"] = n_todo
    return t


def _plan(folder: RunFolder, params: dict, cfg: RunConfig, path: Path) -> tuple[str, int, str]:
    """('complete' | 'partial' | 'new', bands done, a note for the user) for a run into
    ``folder``; refuses output of other parameters without ``--overwrite``."""
    state, bands = folder.state(params)
    if state == "mismatch" and not cfg.output.overwrite:
        raise SlideError(
            f"{path}: {folder.path} holds output of a different run (other model, tile, "
            "overlap or input); use --overwrite to replace it or -o for another folder"
        )
    note = ""
    if state == "stale" and not cfg.output.overwrite:
        note = (f"{folder.path} was written by two runs at once (its summary is not its store's); "
                "started again")
    if cfg.output.overwrite or state in ("none", "mismatch", "stale"):
        return "new", 0, note  # (state "none" may be a folder killed before its first progress record)
    return state, bands, note


def _skipped(path: Path, out_dir: Path) -> SlideResult:
    summary = json.loads((out_dir / "summary.json").read_text())
    return SlideResult(path, out_dir, "skipped", "already complete (use --overwrite to redo)", summary)


def _preload_regressors(regs: dict[str, str], channels, on_device: bool) -> threading.Thread | None:
    """Load the cellularity regressors (LightGBM, the map CNN, and the imports they need: 2-3 s
    on 2 cores) in a thread while the tiles are inferred on a GPU (``on_device``), instead of
    after. Not on the CPU, where the network already uses every core: there the thread slowed the
    tile loop by what it saved (benchmarks/results/cellularity_stage_cpu.json). Only for a model
    with the class channels the stage reads. A regressor that fails to load here is left to
    :func:`wsiseg.scoring.score_map`, which loads it again and reports the error."""
    from wsiseg.scoring import CLASS_INPUTS

    if not on_device or not regs or any(c not in [str(x).lower() for x in channels] for c in CLASS_INPUTS):
        return None

    def load():
        from wsiseg.scoring import load_regressor

        for kind, name in regs.items():
            try:
                load_regressor(kind, name)
            except Exception:  # noqa: BLE001 (reported by score_map, on the main thread)
                pass

    th = threading.Thread(target=load, name="wsiseg-regressors", daemon=True)
    th.start()
    return th


def _store_attrs(path: Path, reader, view, predictor: Predictor, cfg: RunConfig, grid, params: dict) -> dict:
    """The probability store's ``wsiseg`` attributes: what was read, how, and by which model."""
    return {
        "version": wsiseg.__version__,
        "mpp": view.mpp,
        "slide_mpp": reader.mpp,
        "scale_from_level0": view.scale,  # slide level-0 px per stored level-0 px
        "pyramid_level_read": view.level,
        "model": predictor.model.id,
        "model_mpp": predictor.model.mpp,
        "classes": predictor.channels,
        "tile": cfg.tiling.tile,
        "overlap": cfg.tiling.overlap,
        "stride": grid.stride,
        "window": cfg.tiling.window,
        "source": str(path.name),
        "slide_dimensions": list(reader.level_dimensions[0]),
        "params": params,
    }


def _derived_stages(out_dir: Path, predictor: Predictor, cfg: RunConfig, regs: dict, preload, times: dict) -> dict:
    """The stages that read the finished map (instances, cellularity), timed into ``times``;
    their results by name for the summary."""
    extra = {}
    if cfg.instances.enabled:
        from wsiseg.instances import write_instances

        t = time.perf_counter()
        extra["instances"] = write_instances(out_dir, postprocess_config(predictor.model.meta))
        times["instances"] = time.perf_counter() - t
    if cfg.cellularity.enabled:
        from wsiseg.scoring import score_map

        t = time.perf_counter()
        if preload is not None:
            preload.join()  # (loaded while the tiles were inferred; score_map finds them cached)
        extra["cellularity"] = score_map(out_dir, regs, cfg.cellularity.window, cfg.cellularity.stride, cfg.cellularity.min_tissue)
        times["cellularity"] = time.perf_counter() - t
    return extra


def _run_record(reader, view, predictor: Predictor, cfg: RunConfig, times: dict, n_todo: int) -> dict:
    """The summary's record of how the run went: timings, engine, resolution, config, memory."""
    total = times["total"]
    return {
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "tiles_per_second": round(n_todo / total, 2) if total > 0 else None,
        "device": str(predictor.device),
        "torch_threads": __import__("torch").get_num_threads(),
        "model": predictor.model.id,
        "tta": predictor.tta,
        "backend": predictor.backend,
        "backend_reason": getattr(predictor, "backend_reason", "requested"),
        "mpp": view.mpp,
        "slide_mpp": reader.mpp,
        "slide_mpp_source": reader.mpp_source,  # file, --mpp or --mpp-override
        "file_mpp": reader.file_mpp,  # what the file says (None: nothing)
        "shape": list(view.shape),
        "channels": predictor.channels,
        "config": cfg.flat(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wsiseg_version": wsiseg.__version__,
    }


def run_slide(path: str | Path, out_dir: str | Path, predictor: Predictor, cfg: RunConfig = RunConfig(),
              progress: Callable[[int], None] | None = None, progress_total: Callable[[int], None] | None = None,
              band_runner: Callable[[int, int], dict] | None = None,
              stain: stain_norm.StainTransform | None = None) -> SlideResult:
    """Segment one slide or image into ``out_dir``. Raises :class:`SlideError` for bad input.

    ``progress(n)`` is called with the number of tiles finished since the last call;
    ``progress_total(n)`` once with the number of tiles this run will infer.
    ``band_runner(first_band, n_bands)``, when given, does the inference of the level-0 bands
    instead of this process (e.g. split over Dask workers, see :mod:`wsiseg.cluster`) and
    returns :func:`infer_bands`'s statistics; this function still owns the store's creation,
    resumption, pyramid, completion flag and summary.
    ``stain``: a stain transform fitted elsewhere, applied instead of fitting one to this slide
    (``cfg.stain`` etc.: see :mod:`wsiseg.stain`); a resumed run reuses the one it recorded.
    """
    path, out_dir = Path(path), Path(out_dir)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    regs = cfg.cellularity.regressors()
    folder = RunFolder(out_dir, path)
    reader, view = open_view(path, predictor.model.mpp, cfg)
    times["open"] = time.perf_counter() - t_start
    with ExitStack() as held:
        held.callback(reader.close)
        params = _params(cfg, predictor, view, path)
        # --- stain normalisation: what to do (absent from params and attrs when nothing)
        try:
            spec = None if stain is not None else stain_norm.resolve_spec(cfg.stain.method, cfg.stain.target, cfg.stain.clahe,
                                                                          predictor.model.meta)
        except stain_norm.StainError as e:
            raise SlideError(f"{path}: {e}") from None
        if spec is not None or stain is not None:
            params["stain"] = spec.params() if spec is not None else {**stain_norm.given_params(stain)}
        folder.check()  # a folder that is not wsiseg's is refused before any pixel is read
        state, bands_done, _ = _plan(folder, params, cfg, path)
        if state == "complete":
            return _skipped(path, out_dir)
        preload = _preload_regressors(regs, predictor.channels, predictor.device.type != "cpu")
        t = time.perf_counter()
        thumb, mask, grid, keep = _survey(reader, view, cfg)
        times["tissue"] = time.perf_counter() - t
        held.enter_context(folder.locked())  # one run at a time; the OS releases it when the process ends
        folder.check()  # again, now that no other run changes the folder
        state, bands_done, note = _plan(folder, params, cfg, path)
        if state == "complete":
            return _skipped(path, out_dir)
        if state == "new":
            folder.clear()  # wsiseg's own files only
        else:
            folder.remove_spill()  # a killed run's spill folder: nothing in it is reused
        store_path = out_dir / "probabilities.zarr"
        channels = predictor.channels
        if state == "partial":
            store = ProbabilityStore.open_existing(store_path)
            log.info("%s: resuming: %d of %d bands already written", path.name, bands_done, -(-view.shape[0] // cfg.tiling.chunk))
            stain_record = store.group.attrs["wsiseg"].get("stain")  # the transform fitted then, not refitted
            stain_t = stain_norm.from_record(stain_record)
        else:
            attrs = _store_attrs(path, reader, view, predictor, cfg, grid, params)
            t = time.perf_counter()
            stain_t, stain_record = stain_norm.for_slide(spec, view, grid, keep, stain)
            if stain_record is not None:
                attrs["stain"] = stain_record
                times["stain_fit"] = time.perf_counter() - t
            store = ProbabilityStore.create(store_path, view.shape, channels, view.mpp, attrs, cfg.tiling.chunk)
            # zlib level 1: a 2048 px thumbnail in about 0.4 s instead of 0.65 s, 2.5% larger
            Image.fromarray(thumb).save(out_dir / "thumbnail.png", compress_level=1)
            Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / "tissue.png", compress_level=1)

        n_tissue = int(keep.sum())
        if band_runner is None:
            stats = infer_bands(view, grid, keep, predictor.with_stain(stain_t), store, cfg, bands_done, None,
                                progress=progress, progress_total=progress_total)
        else:
            stats = band_runner(bands_done, -(-view.shape[0] // cfg.tiling.chunk))
            store.mark_bands_done(-(-view.shape[0] // cfg.tiling.chunk))
            store.flush()
        n_todo = stats.pop("tiles")
        times.update(stats)

        t = time.perf_counter()
        store.build_pyramid()
        times["pyramid"] = time.perf_counter() - t
        # the map is whole: mark it so before the stages that read it (instances refuse an
        # incomplete map); the run counts as complete only once summary.json says so, so a crash
        # in a later stage is redone by the next run
        store.mark_complete({"tiles_with_tissue": n_tissue, "tissue_fraction": float(mask.mean())})
        extra = _derived_stages(out_dir, predictor, cfg, regs, preload, times)
        total = time.perf_counter() - t_start
        times["total"] = total
        status = "no_tissue" if n_tissue == 0 else ("resumed" if state == "partial" else "ok")
        summary = {"complete": True, "run_id": store.run_id, "status": status, "input": str(path),
                   "output": str(store_path), "tiles_total": grid.n_tiles, "tiles_with_tissue": n_tissue,
                   "tiles_inferred_this_run": n_todo, "tissue_fraction": float(mask.mean()),
                   **_run_record(reader, view, predictor, cfg, times, n_todo), **extra}
        if stain_record is not None:
            summary["stain"] = stain_record
        store.check_owner()  # the summary is this run's only while the store is
        atomic_write_json(out_dir / "summary.json", summary)
        msg = "no tissue found: wrote an empty (all-zero) probability map" if n_tissue == 0 else ""
        warning = stain_record.get("warning") if stain_record is not None else None
        return SlideResult(path, out_dir, status, "; ".join(m for m in (note, msg, warning) if m), summary)
