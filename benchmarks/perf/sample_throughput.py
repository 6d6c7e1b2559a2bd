"""Tiles/s and peak memory of `wsiseg run` on the bundled sample slide, beside the model-only ceiling.

    python benchmarks/perf/sample_throughput.py [--model NAME] [--device cpu] [--json benchmarks/results/sample_cpu.json]

Both numbers come from the same run of this script, on the same machine, model, tile size (256)
and batch size, so their ratio says how much of the model's speed the whole pipeline keeps
(reading, tissue detection, blending, Zarr writing and the pyramid included).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

from wsiseg.bench import machine  # noqa: E402  (the same machine description as `wsiseg bench`)


def model_only(model_name: str | None, device: str, batch: int, n_batches: int) -> dict:
    """Tiles/s of the Predictor alone on real 256 px tiles cut from the sample slide."""
    from wsiseg.cli import SAMPLE
    from wsiseg.models import load_model
    from wsiseg.predict import Predictor
    from wsiseg.slide import ScaledView, open_slide

    pred = Predictor(load_model(model_name), device)
    view = ScaledView.create(open_slide(SAMPLE), pred.model.mpp)
    tiles = np.stack([view.read(1000 + 128 * (i // 4), 500 + 128 * (i % 4), 256, 256) for i in range(batch)])
    for _ in range(2):
        pred(tiles)
    t = time.perf_counter()
    for _ in range(n_batches):
        pred(tiles)
    dt = time.perf_counter() - t
    return {"tiles": batch * n_batches, "seconds": round(dt, 3), "tiles_per_second": round(batch * n_batches / dt, 2)}


def end_to_end(model_name: str | None, device: str, batch: int) -> dict:
    """`wsiseg run --sample` in a fresh process (so its peak RSS is its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wsiseg.cli", "run", "--sample", "-q", "-o", tmp, "--device", device,
               "--batch-size", str(batch)]
        if model_name:
            cmd += ["--model", model_name]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        s = json.loads((Path(tmp) / "CMU-1-Small-Region" / "summary.json").read_text())
    return {"tiles": s["tiles_inferred_this_run"], "tiles_total": s["tiles_total"],
            "tiles_per_second": s["tiles_per_second"], "seconds": s["seconds"],
            "peak_rss_mb": s["peak_rss_mb"], "process_wall_seconds_with_imports": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {"benchmark": "sample_throughput", "slide": "CMU-1-Small-Region.svs", "tile": 256, "overlap": 0.5,
           "batch_size": a.batch_size, "device": a.device, "machine": machine()}
    res["model_only"] = model_only(a.model, a.device, a.batch_size, a.batches)
    res["end_to_end"] = end_to_end(a.model, a.device, a.batch_size)
    res["end_to_end_over_model_only"] = round(res["end_to_end"]["tiles_per_second"] / res["model_only"]["tiles_per_second"], 3)
    out = json.dumps(res, indent=2)
    print(out)
    if a.json:
        Path(a.json).write_text(out + "\n")


if __name__ == "__main__":
    main()
