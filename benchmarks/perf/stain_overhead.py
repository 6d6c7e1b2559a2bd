"""What ``--stain`` costs the CPU pipeline: ``wsiseg bench`` without and with it, back to back.

    python benchmarks/perf/stain_overhead.py [--slide wsiseg/data/CMU-1-Small-Region.svs] [--rounds 2]
                                        [--stain macenko] [--json benchmarks/results/stain_overhead_cpu.json]

Runs :func:`wsiseg.bench.bench` (stages ``model_only`` and ``end_to_end``, each in a fresh
process, on the CPU) alternately without normalisation and with ``--stain`` (to the model's
training reference), ``rounds`` times each, so that other jobs on the machine slow both alike;
reports every run and the ratio of the medians. ``end_to_end`` includes the once-per-slide fit
(``seconds_by_step.stain_fit``); ``loop`` rates leave out the setup.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from wsiseg.bench import bench, machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", default="wsiseg/data/CMU-1-Small-Region.svs")
    p.add_argument("--model", default=None)
    p.add_argument("--stain", default="macenko")
    p.add_argument("--clahe", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model-seconds", type=float, default=15.0)
    p.add_argument("--json", default="benchmarks/results/stain_overhead_cpu.json")
    a = p.parse_args(argv)
    runs = {"none": [], a.stain + ("+clahe" if a.clahe else ""): []}
    keys = list(runs)
    for r in range(a.rounds):
        for key, stain in zip(keys, ("none", a.stain)):
            res = bench(a.slide, a.model, "cpu", stages=("model_only", "end_to_end"), model_seconds=a.model_seconds,
                        verbose=False, stain=stain, clahe=a.clahe if stain != "none" else None)
            st = res["stages"]
            row = {"round": r, "model_only_tiles_per_second": st["model_only"]["tiles_per_second"],
                   "model_only_cpu_ms_per_tile": st["model_only"]["cpu_ms_per_tile"],
                   "end_to_end_tiles_per_second": st["end_to_end"]["tiles_per_second"],
                   "end_to_end_loop_tiles_per_second": st["end_to_end"]["loop_tiles_per_second"],
                   "end_to_end_cpu_ms_per_tile": st["end_to_end"]["cpu_ms_per_tile"],
                   "stain_fit_seconds": st["end_to_end"]["seconds_by_step"].get("stain_fit"),
                   "tiles": st["end_to_end"]["tiles"], "load_average": res["machine"]["load_average"]}
            runs[key].append(row)
            print(key, json.dumps(row), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if m.endswith(("per_second", "per_tile"))}
           for k, v in runs.items()}
    ratio = {m: round(med[keys[1]][m] / med[keys[0]][m], 4) for m in med[keys[0]]}
    out = {"benchmark": "stain normalisation overhead on the CPU pipeline (issue 21)",
           "command": f"python benchmarks/perf/stain_overhead.py --stain {a.stain}" + (" --clahe" if a.clahe else "")
                      + f" --rounds {a.rounds}",
           "slide": a.slide, "model": a.model or "default", "device": "cpu", "machine": machine(),
           "runs": runs, "medians": med, "with_over_without": ratio}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratio))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
