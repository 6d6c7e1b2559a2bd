"""Model-only tiles/s of two models on this CPU, torch and OpenVINO, interleaved in one process.

``python benchmarks/perf/model_speed.py --models lite0-unet-joint-20x unet-bn-nuclei-classes-20x
--json benchmarks/results/default_model/model_speed_cpu.json`` times each (model, backend) on the
same batches of real tissue tiles of the sample slide (batch 8 of 256 px, the engine's own
Predictor: channels_last, folded BatchNorm), round after round, so drifts in the machine's speed
fall on every pair alike; it reports the median tiles/s of each and the ratios to the first model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--backends", nargs="+", default=["torch", "openvino"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per (model, backend) and round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)


    from wsiseg.bench import machine
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor, calibration_tiles

    tiles = calibration_tiles(0.5, n=32)  # real tissue tiles of the bundled sample slide, 256 px
    batches = [tiles[i:i + a.batch_size] for i in range(0, len(tiles) - a.batch_size + 1, a.batch_size)]
    preds = {(m, b): Predictor(load_model(m), "cpu", threads=a.threads, backend=b) for m in a.models for b in a.backends}
    for p in preds.values():  # warm-up
        p.probabilities(batches[0])
    rates = {k: [] for k in preds}
    for _ in range(a.rounds):
        for k, p in preds.items():
            t = time.perf_counter()
            for i in range(a.batches):
                p.probabilities(batches[i % len(batches)])
            rates[k].append(a.batches * a.batch_size / (time.perf_counter() - t))
    med = {f"{m} / {b}": round(statistics.median(r), 2) for (m, b), r in rates.items()}
    ratios = {f"{m} / {b} vs {a.models[0]} / {b}": round(statistics.median(rates[(m, b)]) / statistics.median(rates[(a.models[0], b)]), 3)
              for m in a.models[1:] for b in a.backends}
    params = {m: int(sum(p.numel() for p in load_model(m).network.parameters())) for m in a.models}
    out = {"benchmark": "model_speed", "tiles_per_second_median": med, "ratios": ratios, "rounds": a.rounds,
           "per_round": {f"{m} / {b}": [round(v, 2) for v in r] for (m, b), r in rates.items()},
           "parameters": params, "batch_size": a.batch_size, "tile": 256, "machine": machine(),
           "command": "python benchmarks/perf/model_speed.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps({"tiles_per_second_median": med, "ratios": ratios}, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
