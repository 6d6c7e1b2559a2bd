"""Windowing + blending cost per tile, two ways, in one process, interleaved (A B B A ...):

- ``batch``: a batch of probabilities multiplied by the window into a batch buffer
  (8 x 5 x 256 x 256 float32, 10.5 MB), then added tile by tile (the tile loop before);
- ``per_tile``: each tile multiplied into one (5, 256, 256) buffer just before it is added (the
  tile loop now, on the CPU).

Inputs have the layouts the tile loop gets: a 5-channel network's channels_last output, and one
map broadcast over 5 channels (the identity model of ``wsiseg bench``'s I/O stage); random values,
tiles of 256 at stride 128 over a 2,048 x 4,096 px map in :class:`wsiseg.blend.ChunkBlender`
blocks of 512 x 1,024 (the pipeline's chunk and column sizes), blocks released as they finish.

    python benchmarks/perf/blend_weighting.py --json benchmarks/results/io_pertile_weight/blend_weighting.json
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from wsiseg.bench import machine
from wsiseg.blend import ChunkBlender

T, S, C, B = 256, 128, 5, 8
H, W = 2048, 4096
ys = list(range(-64, H - 64, S)); xs = list(range(-64, W - 64, S))
pos = [(y, x) for y in ys for x in xs]
rng = np.random.default_rng(0)


def make_nhwc():  # channels_last (N, C, T, T) view of NHWC memory, as the network leaves it
    a = rng.random((B, T, T, C), dtype=np.float32)
    return a.transpose(0, 3, 1, 2)


def make_once():  # identity model: one map broadcast over C
    a = rng.random((B, 1, T, T), dtype=np.float32)
    return np.broadcast_to(a, (B, C, T, T))


def run(mode, maker):
    bl = ChunkBlender((H, W), C, T, 512, cols=1024)
    for y, x in pos: bl.expect(y, x)
    out = np.empty((B, C, T, T), np.float32); tmp = np.empty((C, T, T), np.float32)
    probs_list = [maker() for _ in range(4)]
    t = 0.0
    for i in range(0, len(pos), B):
        where = pos[i:i + B]; p = probs_list[(i // B) % 4][:len(where)]
        t0 = time.perf_counter()
        if mode == "batch":
            o = out[:len(where)]; np.multiply(p, bl.win, out=o)
            for q, (y, x) in zip(o, where): bl.add(q, y, x, weighted=True)
        else:
            for q, (y, x) in zip(p, where):
                bl.add(np.multiply(q, bl.win, out=tmp), y, x, weighted=True)
        t += time.perf_counter() - t0
        for _ in bl.release(): pass
    return t / len(pos) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"benchmark": "blend_weighting", "unit": "ms per tile (multiply + add)", "tiles_per_run": len(pos),
           "results": {}, "machine": machine()}
    for name, maker in (("channels_last_5_channels", make_nhwc), ("one_map_broadcast_identity", make_once)):
        res = {"batch": [], "per_tile": []}
        for r in range(args.rounds):
            for mode in ("batch", "per_tile") if r % 2 == 0 else ("per_tile", "batch"):
                res[mode].append(round(run(mode, maker), 3))
        res["median_batch"] = float(np.median(res["batch"]))
        res["median_per_tile"] = float(np.median(res["per_tile"]))
        out["results"][name] = res
        print(name, res, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
