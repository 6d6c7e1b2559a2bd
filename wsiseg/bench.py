"""Where the time goes: tiles/s of each stage of the engine, on one slide, side by side.

``wsiseg bench SLIDE [--model M] [--device D] [--batch-size N] [--json FILE]`` measures, on the
same slide, model, tile size, overlap, batch size and device, in one command:

===================  =========================================================================
stage                what runs
===================  =========================================================================
``read_only``        open, thumbnail + tissue mask, tile grid, then the tissue tiles read the
                     way the pipeline reads them (:class:`~wsiseg.schedule.TileStream` over
                     :func:`~wsiseg.tiling.window_blocks`: pieces of a band's rows read in the
                     pipeline's reader threads) and cut into batches; no model
``model_only``       the :class:`~wsiseg.predict.Predictor` alone on batches of real tiles cut
                     from the slide, after two warm-up batches: the compute ceiling
``blend_write_only`` the I/O-only pipeline: :func:`wsiseg.pipeline.run_slide` with a network
                     that computes nothing (every class's logit is the pixel's normalised green
                     value, copied from its input), so reading, tile cutting, the predictor's
                     normalisation, activation (of one map) and window weighting, blending, Zarr
                     writing and the pyramid are what is measured
``end_to_end``       :func:`wsiseg.pipeline.run_slide` with the real model, as ``wsiseg run``
``features``         the cellularity stage alone (:func:`wsiseg.scoring.score_map` on a finished
                     map: window reads, the 81 features + LightGBM, the map CNN, CSV and
                     heatmap), in windows (patches) per second; needs a model with class channels
===================  =========================================================================

Each stage runs in its own fresh Python process (``isolate=True``, the default), so its peak RSS
(``ru_maxrss``) is its own; ``rss_after_setup_mb`` is the high-water mark after imports and model
loading, before the stage's work. With CUDA, the network's forward is bracketed by CUDA events
(``gpu_forward_seconds``: GPU stream time from the first to the last kernel of each forward,
summed) and ``gpu_forward_fraction`` is that over the stage's timed loop, i.e. how busy the
GPU was kept; ``cuda_max_allocated_mb`` is the allocator's peak.

``cpu_seconds`` (and ``cpu_ms_per_tile``) is the CPU time of all the stage process's threads
over the stage, setup included: less sensitive than wall time to other jobs on the machine.

Two rates per stage: ``tiles_per_second`` over the stage's whole wall time (for the run_slide
stages: exactly the ``tiles_per_second`` of ``summary.json``, opening, tissue detection and the
pyramid included), and ``loop_tiles_per_second`` over the tile loop only (reads + inference +
blending + band writes), the steady-state rate that the slide's size multiplies. ``model_only``
has no setup: both are the same. The JSON also carries ``end_to_end_tiles_per_second``,
``model_only_tiles_per_second`` (etc.) at the top level, their ratios and a ``machine``
description, including the load average before and after (other jobs on the machine slow
every stage; compare numbers only from one run).

``--model untrained`` uses an untrained U-Net of the default architecture (``unet_bn``, base 16,
depth 4): the same compute as the shipped model, meaningless output; for timing only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

STAGES = ("read_only", "model_only", "blend_write_only", "end_to_end", "features")

_RESULT_TAG = "WSISEG_BENCH_RESULT "


# ----------------------------------------------------------------------------- helpers


def _rss_mb() -> dict[str, float | None]:
    """Current and high-water RSS of this process in MB (Linux /proc; else ru_maxrss only)."""
    cur = hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"current": None if cur is None else round(cur, 1), "peak": round(hwm, 1)}


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU and library versions of this machine, and its load right now."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import numpy
    import torch

    try:
        import openslide

        osl = f"{openslide.__version__} (library {openslide.__library_version__})"
    except Exception:  # pragma: no cover - reported, not required
        osl = None
    import wsiseg

    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "openslide": osl,
        "wsiseg": wsiseg.__version__,
        "cuda": None,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": p.name, "memory_gb": round(p.total_memory / 1024**3, 1),
                        "capability": f"{p.major}.{p.minor}", "cuda_runtime": torch.version.cuda}
    return info


def save_untrained(path: str | Path) -> Path:
    """An untrained U-Net of the default architecture (unet_bn, base 16, depth 4) as safetensors +
    sidecar: the shipped model's compute with meaningless weights, for timing when the trained
    weights are not at hand. Returns the ``.safetensors`` path."""
    import torch

    from wsiseg.models.registry import build_model, save_model

    torch.manual_seed(0)
    net = build_model("unet_bn", base=16, depth=4).eval()
    meta = {"id": "unet-bn-untrained-bench", "architecture": "unet_bn", "arch_kwargs": {"base": 16, "depth": 4},
            "classes": ["nucleus"], "mpp": 0.5, "activation": "sigmoid", "input_multiple": 16,
            "normalization": {"mean": [0.65, 0.5, 0.68], "std": [0.17, 0.2, 0.15], "input_range": "RGB / 255"},
            "note": "untrained: for timing only"}
    return save_model(net, meta, Path(path))


def resolve_model_arg(model: str | None, tmp_dir: str | Path) -> str | None:
    """``untrained`` -> a freshly saved untrained U-Net in ``tmp_dir``; anything else unchanged."""
    if model == "untrained":
        return str(save_untrained(Path(tmp_dir) / "unet-bn-untrained-bench"))
    return model


class _CudaForwardTimer:
    """Sums the GPU stream time of a module's forward calls with CUDA events (pre/post hooks).

    The Predictor copies results to the host after each forward, so the previous pair of events
    has completed by the next forward; it is read then (no extra synchronisation, O(1) memory).
    """

    def __init__(self, module):
        import torch

        self.torch = torch
        self.ms = 0.0
        self.calls = 0
        self._pending: tuple | None = None
        self._start = None
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _collect(self) -> None:
        if self._pending is not None:
            a, b = self._pending
            b.synchronize()
            self.ms += a.elapsed_time(b)
            self._pending = None

    def _pre(self, module, args) -> None:
        self._collect()
        self._start = self.torch.cuda.Event(enable_timing=True)
        self._start.record()

    def _post(self, module, args, out) -> None:
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending = (self._start, end)
        self.calls += 1

    def close(self) -> float:
        """Remove the hooks; GPU seconds in forward, all calls."""
        self._collect()
        for h in self._h:
            h.remove()
        return self.ms / 1000


def _gpu_start(predictor) -> _CudaForwardTimer | None:
    if predictor.device.type != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return _CudaForwardTimer(predictor.net)


def _gpu_stop(timer: _CudaForwardTimer | None, loop_seconds: float) -> dict:
    if timer is None:
        return {}
    import torch

    s = timer.close()
    return {"gpu_forward_seconds": round(s, 3), "gpu_forward_calls": timer.calls,
            "gpu_forward_fraction": round(s / loop_seconds, 3) if loop_seconds > 0 else None,
            "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 1024**2, 1)}


def identity_model(model):
    """A LoadedModel with ``model``'s metadata (mpp, classes, normalisation) and a network that
    computes nothing: every class's logit is the pixel's normalised green value (copied out of the
    input, repeated over the classes by ``expand``), so the pipeline around it is what runs.
    The Predictor applies the activation once to such a repeated map and writes it, times the
    blending window, into every class: the blender, the store and the pyramid see as many
    channels as with ``model``."""
    import numpy as np
    import torch
    from torch import nn

    from wsiseg.models.registry import LoadedModel

    class GreenPassThrough(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # a dense copy (on CPU in NumPy: one thread, whatever torch's count), repeated by expand
            if x.is_cuda:
                g = x[:, 1:2].contiguous()
            else:
                g = torch.from_numpy(np.ascontiguousarray(x[:, 1:2].numpy()))
            return g.expand(-1, self.channels, -1, -1)

    meta = {**model.meta, "id": f"{model.id}+green-passthrough-bench", "architecture": "green_passthrough_bench"}
    return LoadedModel(GreenPassThrough(len(model.classes)).eval(), meta)


# ----------------------------------------------------------------------------- stages (in-process)


def _setup(slide: Path, mpp: float, cfg):
    """The pipeline's own first steps (:func:`wsiseg.pipeline.prepare_slide`): open, view at the
    model's mpp, tissue mask, tile grid; plus the tissue tiles' blocks in the pipeline's order
    (:func:`wsiseg.tiling.window_blocks`, all bands)."""
    from wsiseg.pipeline import prepare_slide
    from wsiseg.tiling import window_blocks

    prep = prepare_slide(Path(slide), mpp, cfg)
    return prep.reader, prep.view, prep.grid, prep.keep, window_blocks(prep.grid, prep.keep, cfg.tiling.chunk,
                                                                          max_tiles=cfg.engine.block_tiles)


def stage_read_only(slide: Path, model, cfg, spec=None, **_: Any) -> dict:
    """The tissue tiles read and cut into batches as :func:`wsiseg.pipeline.infer_bands` does
    (:class:`~wsiseg.schedule.TileStream`), no model."""
    from wsiseg.schedule import TileStream

    t0 = time.perf_counter()
    reader, view, grid, keep, todo = _setup(slide, model.mpp, cfg)
    try:
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        stream = TileStream(view, grid, todo, cfg.engine.batch_size, workers=cfg.engine.workers, cols=cfg.engine.block_tiles * grid.stride)
        n = 0
        for tiles, where in stream:
            n += len(tiles)
        loop = time.perf_counter() - t1
    finally:
        reader.close()
    total = time.perf_counter() - t0
    return {"tiles": n, "seconds": round(total, 3), "loop_seconds": round(loop, 3), "setup_seconds": round(setup, 3),
            "read_seconds_in_threads": round(stream.read_seconds, 3), "read_wait_seconds": round(stream.wait_seconds, 3),
            "read_mode": "pieces" if stream.pieces else "blocks", "reads": len(stream.reads),
            "pixels_read_per_tile": round(stream.pixels_read / n, 1) if n else None,
            "tiles_per_second": round(n / total, 2) if total > 0 else None,
            "loop_tiles_per_second": round(n / loop, 2) if loop > 0 else None}


def stage_model_only(slide: Path, model, cfg, spec, min_seconds: float = 10.0, max_batches: int = 1000,
                     **_: Any) -> dict:
    """The Predictor alone on batches of real tissue tiles from the slide (after 2 warm-up batches)
    until ``min_seconds`` have passed (at least 3 batches, at most ``max_batches``)."""
    import numpy as np

    from wsiseg.stain import for_slide, resolve_spec

    reader, view, grid, keep, todo = _setup(slide, model.mpp, cfg)
    try:
        # the slide's stain transform, as run_slide fits it (untimed: once per slide)
        stain, _ = for_slide(resolve_spec(cfg.stain.method, cfg.stain.target, cfg.stain.clahe, model.meta), view, grid, keep)
        rows, cols = np.nonzero(keep) if keep.any() else np.nonzero(np.ones_like(keep))
        k = min(len(rows), 4 * cfg.engine.batch_size)
        pick = np.linspace(0, len(rows) - 1, k).round().astype(int)
        tiles = [view.read(int(grid.ys[rows[i]]), int(grid.xs[cols[i]]), cfg.tiling.tile, cfg.tiling.tile) for i in pick]
    finally:
        reader.close()
    while len(tiles) < cfg.engine.batch_size:
        tiles += tiles
    batches = [np.stack([tiles[(b * cfg.engine.batch_size + j) % len(tiles)] for j in range(cfg.engine.batch_size)])
               for b in range(max(1, len(tiles) // cfg.engine.batch_size))]
    predictor, setup = _timed_predictor(model, spec)
    predictor = predictor.with_stain(stain)
    for i in range(2):
        predictor(batches[i % len(batches)])
    timer = _gpu_start(predictor)
    n_batches = 0
    t0 = time.perf_counter()
    while n_batches < max_batches and (n_batches < 3 or time.perf_counter() - t0 < min_seconds):
        predictor(batches[n_batches % len(batches)])
        n_batches += 1
    dt = time.perf_counter() - t0
    n = n_batches * cfg.engine.batch_size
    out = {"tiles": n, "batches": n_batches, "seconds": round(dt, 3), "loop_seconds": round(dt, 3),
           "tiles_per_second": round(n / dt, 2), "loop_tiles_per_second": round(n / dt, 2),
           "distinct_tiles": len(tiles), "device": str(predictor.device),
           "backend": predictor.backend, "predictor_setup_seconds": round(setup, 3)}
    out.update(_gpu_stop(timer, dt))
    return out


def _timed_predictor(model, spec):
    """(the spec's Predictor of the loaded ``model``, seconds its construction took: OpenVINO's
    compilation and INT8 quantisation happen there, outside the stages' timed loops)."""
    t = time.perf_counter()
    predictor = spec.build(model)
    return predictor, time.perf_counter() - t


def _run_pipeline(slide: Path, model, cfg, spec) -> dict:
    from wsiseg.pipeline import run_slide

    predictor, setup = _timed_predictor(model, spec)
    timer = _gpu_start(predictor)
    with tempfile.TemporaryDirectory(prefix="wsiseg-bench-") as tmp:
        res = run_slide(slide, Path(tmp) / "out", predictor, cfg)
        s = res.summary
        zbytes = sum(f.stat().st_size for f in (Path(tmp) / "out" / "probabilities.zarr").rglob("*") if f.is_file())
    sec = s["seconds"]
    n = s["tiles_inferred_this_run"]
    loop = sec.get("tiles_loop", 0.0)
    out = {"tiles": n, "tiles_total": s["tiles_total"], "tiles_with_tissue": s["tiles_with_tissue"],
           "tissue_fraction": round(s["tissue_fraction"], 4), "seconds": sec["total"], "loop_seconds": loop,
           "tiles_per_second": s["tiles_per_second"],
           "loop_tiles_per_second": round(n / loop, 2) if loop > 0 else None,
           "seconds_by_step": sec, "status": s["status"], "device": s["device"], "torch_threads": s["torch_threads"],
           "zarr_bytes": zbytes, "shape": s["shape"], "model": s["model"], "backend": s.get("backend"),
           "predictor_setup_seconds": round(setup, 3)}
    out.update(_gpu_stop(timer, loop))
    return out


def stage_blend_write_only(slide: Path, model, cfg, spec, **_: Any) -> dict:
    """run_slide with a network that has no learned compute (see :func:`identity_model`), on the
    torch backend whatever backend the other stages use (there is no network to compile)."""
    from dataclasses import replace

    return _run_pipeline(slide, identity_model(model), cfg, replace(spec, backend="torch"))


def stage_end_to_end(slide: Path, model, cfg, spec, **_: Any) -> dict:
    """run_slide with the real model, as ``wsiseg run`` does it."""
    return _run_pipeline(slide, model, cfg, spec)


def stage_features(slide: Path, model, cfg, spec, **_: Any) -> dict:
    """The cellularity stage on the slide's finished map (made first, untimed): windows/s."""
    from wsiseg.pipeline import run_slide
    from wsiseg.scoring import score_map

    predictor = spec.build(model)
    with tempfile.TemporaryDirectory(prefix="wsiseg-bench-") as tmp:
        out = Path(tmp) / "out"
        run_slide(slide, out, predictor, cfg)
        t = time.perf_counter()
        c = score_map(out, None, cfg.cellularity.window, cfg.cellularity.stride, cfg.cellularity.min_tissue)
        dt = time.perf_counter() - t
    if c.get("status") == "skipped":
        return {"tiles": 0, "tiles_per_second": None, "status": "skipped: " + c["reason"], "seconds": round(dt, 3)}
    n = c["windows"]
    return {"tiles": n, "patches": n, "window_px": c["window_px"], "seconds": round(dt, 3),
            "tiles_per_second": round(n / dt, 2) if dt > 0 else None,
            "patches_per_second": round(n / dt, 2) if dt > 0 else None,
            "regressors": c.get("regressors"), "status": c["status"]}


_STAGE_FUNCS: dict[str, Callable[..., dict]] = {
    "read_only": stage_read_only,
    "model_only": stage_model_only,
    "blend_write_only": stage_blend_write_only,
    "end_to_end": stage_end_to_end,
    "features": stage_features,
}


def run_stage(stage: str, slide: str | Path, model: str | None = None, device: str = "cpu", batch_size: int = 8,
              tile: int = 256, overlap: float = 0.5, workers: int = 2, threads: int | None = None,
              tissue: bool = True, model_seconds: float = 10.0, blend_thread: str = "auto",
              blend_on_device: bool = False, backend: str = "auto", stain: str | None = None,
              stain_target: str | None = None, clahe: bool | None = None) -> dict:
    """One stage in this process; adds ``peak_rss_mb`` (this process's peak so far) and
    ``rss_after_setup_mb`` (the peak after imports and model loading, before the stage)."""
    import torch  # imports (torch, and the pipeline's below) count as setup, as for run_slide

    from wsiseg.models.registry import load_model
    from wsiseg.config import BLEND_THREAD, RunConfig
    from wsiseg.predict import PredictorSpec, resolve_device

    if stage not in _STAGE_FUNCS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    resolve_device(device)  # fail early on a bad device
    m = load_model(model)
    # the tile pipeline's stages without the cellularity stage, which is measured on its own
    cfg = RunConfig.of(tile=tile, overlap=overlap, batch_size=batch_size, workers=workers, tissue=tissue, overwrite=True,
                    cellularity=False, blend_thread=BLEND_THREAD[blend_thread],
                    blend_on_device=blend_on_device, stain=stain, stain_target=stain_target, clahe=clahe)
    before = _rss_mb()
    cpu0 = time.process_time()
    spec = PredictorSpec(model, device, threads, backend=backend)
    res = _STAGE_FUNCS[stage](Path(slide), m, cfg, spec, min_seconds=model_seconds)
    cpu = time.process_time() - cpu0
    after = _rss_mb()
    # CPU time of all the process's threads over the stage (setup included): on a shared machine
    # a steadier measure of the work done than wall time
    res["cpu_seconds"] = round(cpu, 3)
    res["cpu_ms_per_tile"] = round(1000 * cpu / res["tiles"], 3) if res.get("tiles") else None
    res["torch"] = torch.__version__
    res["python_executable"] = sys.executable
    res["rss_after_setup_mb"] = before["peak"]
    res["peak_rss_mb"] = round(max(after["peak"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 1)
    return res


def run_stage_subprocess(stage: str, slide: str | Path, model: str | None = None, device: str = "cpu",
                         batch_size: int = 8, tile: int = 256, overlap: float = 0.5, workers: int = 2,
                         threads: int | None = None, tissue: bool = True, model_seconds: float = 10.0,
                         python: str | None = None, timeout: float | None = None, blend_thread: str = "auto",
                         blend_on_device: bool = False, backend: str = "auto", stain: str | None = None,
                         stain_target: str | None = None, clahe: bool | None = None) -> dict:
    """:func:`run_stage` in a fresh Python process, so the peak RSS is the stage's own."""
    cmd = [python or sys.executable, "-m", "wsiseg.bench", "--child-stage", stage, str(slide), "--device", device,
           "--batch-size", str(batch_size), "--tile", str(tile), "--overlap", str(overlap), "--workers", str(workers),
           "--model-seconds", str(model_seconds)]
    if model is not None:
        cmd += ["--model", str(model)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if not tissue:
        cmd += ["--no-tissue-mask"]
    cmd += ["--blend-thread", blend_thread] + (["--blend-on-device"] if blend_on_device else [])
    cmd += ["--backend", backend]
    cmd += (["--stain", stain] if stain else []) + (["--stain-target", str(stain_target)] if stain_target else [])
    cmd += [] if clahe is None else (["--clahe"] if clahe else ["--no-clahe"])
    return run_tagged(cmd, _RESULT_TAG, f"bench stage {stage}", timeout)


def run_tagged(cmd: list[str], tag: str, what: str, timeout: float | None = None) -> dict:
    """Run ``cmd`` with the repository on PYTHONPATH and return the JSON it printed on the last
    line starting with ``tag``, plus ``process_wall_seconds``; RuntimeError with its stderr if none."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(tag):
            res = json.loads(line[len(tag):])
            res["process_wall_seconds"] = round(wall, 2)
            return res
    raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")


# ----------------------------------------------------------------------------- the benchmark


def _slide_info(slide: Path, model: str | None) -> dict:
    from wsiseg.models.registry import load_model
    from wsiseg.slide import ScaledView, open_slide

    m = load_model(model)
    r = open_slide(slide)
    try:
        v = ScaledView.create(r, m.mpp)
        return {"path": str(slide), "bytes": slide.stat().st_size, "vendor": getattr(r, "vendor", None),
                "mpp": r.mpp, "level_dimensions": [list(d) for d in r.level_dimensions],
                "model_mpp": m.mpp, "view_shape": list(v.shape), "view_level": v.level, "view_factor": v.factor,
                "model": m.id}
    finally:
        r.close()


def format_table(results: dict) -> str:
    """The stages as a text table."""
    head = f"{'stage':18s} {'tiles':>7s} {'seconds':>8s} {'tiles/s':>8s} {'loop t/s':>9s} {'peak RSS MB':>12s} {'GPU fwd %':>9s}"
    lines = [head, "-" * len(head)]
    for st in STAGES:
        r = results["stages"].get(st)
        if r is None:
            continue
        if r.get("tiles_per_second") is None:
            lines.append(f"{st:18s} {r.get('status', 'no number')}")
            continue
        g = r.get("gpu_forward_fraction")
        lines.append(f"{st:18s} {r['tiles']:7d} {r['seconds']:8.2f} {r['tiles_per_second']:8.2f} "
                     f"{(r.get('loop_tiles_per_second') or 0):9.2f} {r.get('peak_rss_mb', 0):12.1f} "
                     f"{'' if g is None else f'{100 * g:.0f}':>9s}")
    rat = results.get("ratios", {})
    if rat:
        lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in rat.items()))
    return "\n".join(lines)


def bench(slide_path: str | Path, model: str | None = None, device: str = "cpu", batch_size: int = 8, tile: int = 256,
          overlap: float = 0.5, out_json: str | Path | None = None, *, stages: tuple[str, ...] = STAGES,
          workers: int = 2, threads: int | None = None, tissue: bool = True, model_seconds: float = 10.0,
          isolate: bool = True, verbose: bool = True, blend_thread: str = "auto",
          blend_on_device: bool = False, backend: str = "auto", stain: str | None = None,
          stain_target: str | None = None, clahe: bool | None = None) -> dict:
    """Measure every stage on ``slide_path``; return (and write to ``out_json``) the results.

    ``model``: a shipped name, a ``.safetensors`` path, ``None`` (the default model) or
    ``"untrained"`` (the default architecture, untrained: timing only). ``isolate``: each stage in
    a fresh process (its own peak RSS); otherwise all in this process (peaks are cumulative).
    """
    from wsiseg.predict import resolve_device

    slide = Path(slide_path)
    dev = str(resolve_device(device))
    with tempfile.TemporaryDirectory(prefix="wsiseg-bench-model-") as mtmp:
        model = resolve_model_arg(model, mtmp)
        res: dict[str, Any] = {
            "benchmark": "wsiseg.bench", "slide": _slide_info(slide, model), "device": dev, "batch_size": batch_size,
            "tile": tile, "overlap": overlap, "workers": workers, "threads": threads, "tissue_mask": tissue,
            "isolated_processes": isolate, "blend_thread": blend_thread,
            "blend_on_device": blend_on_device, "backend": backend,
            "stain": {"method": stain, "target": stain_target, "clahe": clahe}, "machine": machine(), "stages": {},
        }
        for st in stages:
            if st not in _STAGE_FUNCS:
                raise ValueError(f"unknown stage {st!r}; known: {', '.join(STAGES)}")
            kw = dict(model=model, device=dev, batch_size=batch_size, tile=tile, overlap=overlap, workers=workers,
                      threads=threads, tissue=tissue, model_seconds=model_seconds, blend_thread=blend_thread,
                      blend_on_device=blend_on_device, backend=backend, stain=stain, stain_target=stain_target,
                      clahe=clahe)
            if verbose:
                print(f"bench: {st} ...", file=sys.stderr, flush=True)
            r = run_stage_subprocess(st, slide, **kw) if isolate else run_stage(st, slide, **kw)
            res["stages"][st] = r
            if verbose:
                print(f"bench: {st}: {r['tiles']} tiles, {r['tiles_per_second']} tiles/s, "
                      f"peak RSS {r['peak_rss_mb']} MB", file=sys.stderr, flush=True)
    f = res["stages"].get("features")
    res["features_patches_per_second"] = f.get("patches_per_second") if f else None
    for st in STAGES:
        r = res["stages"].get(st)
        res[f"{st}_tiles_per_second"] = r["tiles_per_second"] if r else None
        res[f"{st}_loop_tiles_per_second"] = r.get("loop_tiles_per_second") if r else None
        res[f"{st}_peak_rss_mb"] = r["peak_rss_mb"] if r else None
    ratios = {}
    mo = res["model_only_tiles_per_second"]
    for st in ("end_to_end", "blend_write_only", "read_only"):
        v = res[f"{st}_loop_tiles_per_second"]
        if v and mo:
            ratios[f"{st}_loop_over_model_only"] = round(v / mo, 3)
    if res["end_to_end_tiles_per_second"] and mo:
        ratios["end_to_end_over_model_only"] = round(res["end_to_end_tiles_per_second"] / mo, 3)
    res["ratios"] = ratios
    res["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(res, indent=2) + "\n")
    if verbose:
        print(format_table(res))
    return res


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench options, for ``wsiseg bench`` (a subparser) or ``python -m wsiseg.bench``."""
    from wsiseg.stain import add_arguments as stain_arguments

    p.add_argument("slide", help="a whole-slide image (anything OpenSlide opens)")
    p.add_argument("--model", default=None, help="shipped name, NAME.safetensors path, or 'untrained' (timing only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2, help="reader threads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-tissue-mask", action="store_true", help="every tile, background too")
    p.add_argument("--blend-thread", default="auto", choices=["auto", "on", "off"],
                   help="blend each batch in a thread beside the next batch's inference (auto: on with CUDA)")
    p.add_argument("--blend-on-device", action="store_true",
                   help="blend on the GPU (accumulators there, uint8 blocks copied back)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "openvino-int8"],
                   help="the network's runtime on the CPU: torch (eager), openvino (same weights) or openvino-int8 "
                        "(quantised by NNCF); wsiseg[openvino]")
    stain_arguments(p)  # as wsiseg run (none: as the model's sidecar says)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--model-seconds", type=float, default=10.0, help="how long model_only runs (after warm-up)")
    p.add_argument("--in-process", action="store_true", help="all stages in this process (peak RSS cumulative)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child-stage", default=None, help=argparse.SUPPRESS)
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="wsiseg bench",
                                                 description="tiles/s of each engine stage on one slide"))


def run_args(a: argparse.Namespace) -> int:
    """Run the benchmark for parsed options; returns the exit code (0 ok, 1 a stage failed, 2 bad input)."""
    from wsiseg.models.registry import ModelError
    from wsiseg.slide import SlideError

    try:
        if a.child_stage:
            res = run_stage(a.child_stage, a.slide, a.model, a.device, a.batch_size, a.tile, a.overlap, a.workers,
                            a.threads, not a.no_tissue_mask, a.model_seconds, a.blend_thread, a.blend_on_device,
                            a.backend, a.stain, a.stain_target, a.clahe)
            print(_RESULT_TAG + json.dumps(res), flush=True)
            return 0
        stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
        bench(a.slide, a.model, a.device, a.batch_size, a.tile, a.overlap, a.json, stages=stages, workers=a.workers,
              threads=a.threads, tissue=not a.no_tissue_mask, model_seconds=a.model_seconds,
              isolate=not a.in_process, blend_thread=a.blend_thread,
              blend_on_device=a.blend_on_device, backend=a.backend, stain=a.stain, stain_target=a.stain_target,
              clahe=a.clahe)
    except (SlideError, ModelError, ValueError) as e:
        print(f"wsiseg bench: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a stage's subprocess failed: its stderr is in the message
        print(f"wsiseg bench: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m wsiseg.bench SLIDE ...`` (argv without a leading ``bench``)."""
    return run_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
