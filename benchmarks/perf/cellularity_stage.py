"""What the cellularity stage adds to `wsiseg run`, back to back on the same slide, each run in a
fresh process (imports and model loading count, as for a user):

- ``off``: ``--no-cellularity``;
- ``before``: the stage as it was (regressors loaded after the tiles, the map CNN in
  contiguous NCHW torch), by switching off the two changes inside the child;
- ``on``: as shipped (on a GPU the regressors load in a thread while the tiles are inferred; on the
  CPU the map CNN moves to OpenVINO, when exact, for slides of 100 windows or more).

``benchmarks/results/cellularity_stage_cpu.json`` was measured with an earlier version of ``on``
(the thread on the CPU too, OpenVINO for every slide); its ``finding`` says what that showed and
why the stage is as it is now.

Also the map CNN alone on the same windows: contiguous torch, channels_last torch and OpenVINO
(seconds, max score change against contiguous).

    python benchmarks/perf/cellularity_stage.py --rounds 2 --json benchmarks/results/cellularity_stage_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, sys, time
mode, slide, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
import wsiseg.pipeline as pl
import wsiseg.scoring as sc
if mode == "before":
    pl._preload_regressors = lambda *a: None
    sc._CNN.prepare = lambda self, n: None  # the network as loaded: torch, whatever the slide's size
from wsiseg.models import load_model
from wsiseg.predict import Predictor
pred = Predictor(load_model(), "cpu", backend="auto")
r = pl.run_slide(slide, out, pred, pl.RunConfig.of(cellularity=mode != "off"))
s = r.summary
print("RESULT " + json.dumps({"process_seconds": time.perf_counter() - t0, "summary_total": s["seconds"]["total"],
                              "tiles_loop": s["seconds"]["tiles_loop"], "cellularity": s["seconds"].get("cellularity"),
                              "backend": s.get("backend"),
                              "scores": s.get("cellularity", {}).get("cellularity_cnn")}))
'''


def child(mode: str, slide: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, mode, slide, str(Path(tmp) / "o")], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(f"the {mode!r} child failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        out = r.stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


def cnn_alone(slide_out: Path) -> dict:
    import numpy as np
    import torch
    import zarr

    from wsiseg import scoring

    from wsiseg.cellularity.cnn import MapCNNRegressor

    c = scoring._CNN.__new__(scoring._CNN)  # the scorer without its runtime choice: the network as loaded
    c.model = MapCNNRegressor.load(scoring._find("cellularity-cnn-proxy", (".safetensors",)))
    c.size = int(c.model.input_size)
    g = zarr.open_group(str(slide_out / "probabilities.zarr"), mode="r")
    ch = [x.lower() for x in g.attrs["wsiseg"]["classes"]]
    idx = [ch.index(k) for k in scoring.CLASS_INPUTS]
    lv = g["0"]
    H, W = lv.shape[1:]
    maps = [lv[:, y:y + 512, x:x + 512][idx].astype(np.float32) / 255 for y in range(0, H - 511, 512)
            for x in range(0, W - 511, 512)]
    from wsiseg.predict import OpenVINONet

    torch_net = c.model.model_
    nets = {"contiguous": torch_net.to(memory_format=torch.contiguous_format)}
    nets["channels_last"] = torch_net.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    nets["openvino"] = OpenVINONet(torch_net, torch.get_num_threads(), in_channels=c.model.in_chans)
    compile_s = time.perf_counter() - t
    res = {}
    for name, net in nets.items():
        c.model.model_ = net
        c.predict(maps[:2])
        t = time.perf_counter()
        p = c.predict(maps)
        res[name] = (round(time.perf_counter() - t, 3), p)
    base = res["contiguous"]
    return {"windows": len(maps), "openvino_compile_seconds": round(compile_s, 3),
            **{f"{k}_seconds": v[0] for k, v in res.items()},
            **{f"{k}_speed_up": round(base[0] / v[0], 2) for k, v in res.items() if k != "contiguous"},
            **{f"{k}_max_abs_score_difference": float(np.abs(v[1] - base[1]).max()) for k, v in res.items()
               if k != "contiguous"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?", default="wsiseg/data/CMU-1-Small-Region.svs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"off": [], "before": [], "on": []}
    for _ in range(a.rounds):  # interleaved, so drifts in the machine's load hit every mode alike
        for mode in runs:
            runs[mode].append(child(mode, a.slide))
            print(mode, runs[mode][-1], flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("process_seconds", "summary_total", "tiles_loop")}
           | {"cellularity": statistics.median(r["cellularity"] for r in rs) if rs[0]["cellularity"] is not None else None}
           for m, rs in runs.items()}
    off = med["off"]["process_seconds"]
    out = {"benchmark": "cellularity stage: what it adds to wsiseg run (fresh process each)",
           "command": "python benchmarks/perf/cellularity_stage.py " + " ".join(argv or sys.argv[1:]),
           "slide": a.slide, "machine": "2-core CPU", "rounds": a.rounds, "median": med,
           "added_share_of_run": {m: round(med[m]["process_seconds"] / off - 1, 4) for m in ("before", "on")},
           "same_scores": runs["before"][0]["scores"] == runs["on"][0]["scores"],
           "scores": {m: runs[m][0]["scores"] for m in ("before", "on")}, "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        from wsiseg.models import load_model
        from wsiseg.pipeline import RunConfig, run_slide
        from wsiseg.predict import Predictor

        r = run_slide(a.slide, Path(tmp) / "o", Predictor(load_model(), "cpu"), RunConfig.of(cellularity=False))
        out["cnn_alone"] = cnn_alone(r.out_dir)
    print(json.dumps({k: out[k] for k in ("median", "added_share_of_run", "same_scores", "cnn_alone")}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
