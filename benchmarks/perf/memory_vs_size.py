"""Peak memory and tiles/s of the pipeline as the slide grows: is the peak RSS flat in the slide's size?

For each size, a square slide of real H&E pixels is built with ``make_slide.py`` (cached under
``--slides``) and ``run_slide`` runs on it in a fresh Python process (so each peak RSS is that
run's own), by default with the I/O-only stand-in network of ``wsiseg.bench`` (stage
``blend_write_only``: reading, tissue mask, blending, Zarr writing and the pyramid, with no
learned compute; the real model is too slow on 2 CPU cores for a 60k px slide). The model given
with ``--model`` then only supplies its sidecar: resolution (um/px), classes and normalisation.
``--stage end_to_end`` runs the real model instead.

Nothing large that the pipeline holds follows the slide's width or area any more: the blender
(:class:`wsiseg.blend.ChunkBlender`) keeps blocks of one band (``chunk`` = 512 rows) by two chunk
widths, each (classes + 1) x 512 x 1024 x 4 bytes, a few at a time, and the strip that a band's
tiles reach into the next band waits in memory up to 16 MB, beyond that on disk; the reader
(:class:`wsiseg.schedule.TileStream`) holds pieces of a band's rows (about (512 + 256) x
(1024 + 128) x 3 bytes each) that blocks still need plus a few read ahead; the store writes in
whole chunks and builds the pyramid in blocks of a few chunks. The JSON gives the computed sizes
next to each measured peak: ``blend_block_mb`` (one block), ``blend_bound_mb`` (three open
blocks plus the 16 MB strip budget) and ``read_pieces_mb`` (the pieces alive and in flight), all
independent of the slide's size.

Full run (about 20-30 min on 2 cores with nothing else running, most of it building the 60k px
slide once and blending about 30,000 tissue tiles; slides are kept for next time)::

    python benchmarks/perf/memory_vs_size.py --sizes 10000,30000,60000 \\
        --json benchmarks/results/memory_vs_size_cpu.json

Smoke test (seconds)::

    python benchmarks/perf/memory_vs_size.py --sizes 4000,8000 --slides /tmp/wsiseg-slides --json /tmp/mem.json

Sizes are level-0 px a side at ``--mpp`` (default 0.25 um/px, a 40x scan); the pipeline reads
the level at the model's 0.5 um/px, so a 60k px slide is a 30k x 30k px map.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_slide import DEFAULT_DATA, parse_size, verify, write_slide  # noqa: E402

from wsiseg.bench import machine, resolve_model_arg, run_stage_subprocess  # noqa: E402


def slide_for(size: int, slides_dir: Path, mpp: float, data_dir: Path, seed: int = 0, tissue: float = 0.55) -> tuple[Path, dict]:
    """The cached slide of ``size`` px a side (built if missing) and how it was made."""
    path = slides_dir / f"mosaic-{size}px-mpp{mpp:g}-seed{seed}.tif"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    print(f"memory_vs_size: building {path} ...", file=sys.stderr, flush=True)
    info = write_slide(path, size, size, mpp=mpp, tissue=tissue, seed=seed, data_dir=data_dir)
    info["verify"] = verify(path)
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return path, info


def measure(sizes: list[int], model: str | None = None, stage: str = "blend_write_only", batch_size: int = 8,
            mpp: float = 0.25, slides_dir: Path = REPO / "benchmarks" / "out" / "slides",
            data_dir: Path = DEFAULT_DATA, device: str = "cpu", workers: int = 2, chunk: int = 512) -> dict:
    """Peak RSS and tiles/s of ``stage`` per slide size; each run in its own process."""
    from wsiseg.models.registry import ModelError, load_model

    res: dict = {"benchmark": "memory_vs_size", "stage": stage, "batch_size": batch_size, "device": device,
                 "slide_mpp": mpp, "tile": 256, "overlap": 0.5, "machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="wsiseg-mem-") as mtmp:
        if model is None:
            try:
                load_model(None)
            except ModelError:
                if stage != "blend_write_only":
                    raise
                model = "untrained"  # the identity stage only needs a sidecar (mpp, classes, normalisation)
        res["model_arg"] = model
        model_path = resolve_model_arg(model, mtmp)
        m = load_model(model_path)
        res["model"] = m.id
        for size in sizes:
            path, info = slide_for(size, Path(slides_dir), mpp, Path(data_dir))
            t = time.perf_counter()
            r = run_stage_subprocess(stage, path, model_path, device=device, batch_size=batch_size, workers=workers)
            block = (len(m.classes) + 1) * chunk * 2 * chunk * 4 / 2**20
            pieces = (2 * workers + 3) * (chunk + 256) * (8 * 128 + 128) * 3 / 2**20
            run = {"size_px": size, "slide_bytes": info["bytes"], "slide_levels": info["levels"],
                   "map_shape": r["shape"], "tiles_total": r["tiles_total"], "tiles": r["tiles"],
                   "tissue_fraction": r["tissue_fraction"], "tiles_per_second": r["tiles_per_second"],
                   "loop_tiles_per_second": r["loop_tiles_per_second"], "seconds": r["seconds"],
                   "seconds_by_step": r["seconds_by_step"], "peak_rss_mb": r["peak_rss_mb"],
                   "rss_after_setup_mb": r["rss_after_setup_mb"],
                   "peak_minus_setup_mb": round(r["peak_rss_mb"] - r["rss_after_setup_mb"], 1),
                   "blend_block_mb": round(block, 1), "blend_bound_mb": round(3 * block + 16, 1),
                   "read_pieces_mb": round(pieces, 1), "zarr_bytes": r["zarr_bytes"],
                   "process_wall_seconds": round(time.perf_counter() - t, 1)}
            res["runs"].append(run)
            print(f"memory_vs_size: {size} px: {run['tiles']} tiles, {run['tiles_per_second']} tiles/s, "
                  f"peak RSS {run['peak_rss_mb']} MB (after setup {run['rss_after_setup_mb']} MB, "
                  f"blender bound {run['blend_bound_mb']} MB, read pieces {run['read_pieces_mb']} MB)",
                  file=sys.stderr, flush=True)
    res["machine"]["load_average_end"] = machine()["load_average"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,60000", help="level-0 px a side, comma-separated (30k ok)")
    ap.add_argument("--model", default=None, help="name, .safetensors path or 'untrained' (default: the shipped "
                    "model, or an untrained one's sidecar when none is shipped)")
    ap.add_argument("--stage", default="blend_write_only", choices=["blend_write_only", "end_to_end"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2, help="reader threads")
    ap.add_argument("--mpp", type=float, default=0.25, help="slides' level-0 um/px")
    ap.add_argument("--slides", default=str(REPO / "benchmarks" / "out" / "slides"), help="where slides are cached")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (real pixels)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    sizes = [parse_size(s)[0] for s in a.sizes.split(",") if s.strip()]
    res = measure(sizes, a.model, a.stage, a.batch_size, a.mpp, Path(a.slides), Path(a.data), a.device, a.workers)
    out = json.dumps(res, indent=2)
    print(out)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
