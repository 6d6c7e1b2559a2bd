"""The per-batch cost of applying a slide's stain transform in the predictor, on this CPU.

    python benchmarks/perf/stain_transform_cost.py [--json benchmarks/results/stain_transform_cost_cpu.json]

``Predictor.inputs`` on a batch of 8 tiles of 256 px (MoNuSeg breast image, shipped MoNuSeg
model, transforms to its training reference): the CPU path (OpenCV kernels on the batch, what a
CPU run uses), the tensor path (torch ops, what a GPU run uses, here on the CPU) and the plain
input normalisation without a transform (a table look-up), median of 20 calls after 3 warm-up
calls; and the network on the same batch for scale.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsiseg.bench import machine
from wsiseg.models import load_model
from wsiseg.predict import Predictor
from wsiseg.stain import fit_transform, resolve_spec


def median_ms(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(ts), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="../shared/data/monuseg/train/images/TCGA-A7-A13E-01Z-00-DX1.png")
    p.add_argument("--json", default="benchmarks/results/stain_transform_cost_cpu.json")
    a = p.parse_args(argv)
    img = np.asarray(Image.open(a.image).convert("RGB"))
    tiles = np.stack([img[y:y + 256, x:x + 256] for y in (0, 256) for x in (0, 256, 512, 700)])
    model = load_model("unet-bn-monuseg-20x")
    pred = Predictor(model, "cpu")
    rows = []
    with torch.inference_mode():
        network = median_ms(lambda: pred(tiles), 5)
        rows.append({"stain": "none", "clahe": False, "cpu_path_ms": median_ms(lambda: pred.inputs(tiles)),
                     "tensor_path_ms": median_ms(lambda: pred.inputs(tiles, torch_input=True))})
        for method, clahe in (("reinhard", False), ("macenko", False), ("vahadane", False), ("none", True),
                              ("macenko", True)):
            ps = pred.with_stain(fit_transform(resolve_spec(method, None, clahe, model.meta), img))
            rows.append({"stain": method, "clahe": clahe, "cpu_path_ms": median_ms(lambda: ps.inputs(tiles)),
                         "tensor_path_ms": median_ms(lambda: ps.inputs(tiles, torch_input=True))})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["cpu_path_share_of_network"] = round(r["cpu_path_ms"] / network, 4)
    out = {"benchmark": "stain transform cost per batch (issue 21)", "command": "python benchmarks/perf/stain_transform_cost.py",
           "batch": "8 x 256 x 256 x 3 uint8", "model": model.id, "network_ms_per_batch": network,
           "torch_threads": torch.get_num_threads(), "machine": machine(), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"network {network} ms per batch; wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
