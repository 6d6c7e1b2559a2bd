"""Seams from colour: the 96 px shift test (tests/test_blend.py) with each normaliser, fitted
once per slide, once per image, or once per tile.

    python benchmarks/experiments/stain_seams.py [--json benchmarks/results/stain_seams.json]

An image (a 600 x 600 MoNuSeg breast crop, read as 0.5 um/px) and the same image shifted by
96 px (not a multiple of the 128 px stride) go through ``run_slide`` with the default model and
Hann blending at 50% overlap; away from the borders the two maps should agree: mean and 99th
percentile of |dp| over the common area. Rows:

* ``slide``: one transform, fitted on the first image, given to both runs (what ``wsiseg run``
  does for every tile of a slide, and a resumed or split run reuses);
* ``prenormalised``: no ``--stain``, on the image normalised beforehand by the ``slide``
  transform (rounded to bytes) and its shifted copy: what the network's tiling does on those
  colours, the baseline for the ``slide`` row;
* ``image``: each of the two images fitted on its own pixels (two slides that differ by a
  shift: the fits see different pixels, so this measures the fit's stability, not seams);
* ``tile``: every tile fitted on its own pixels before the network, as per-patch normalisers
  do (TIAToolbox's on patches); for CLAHE, OpenCV's adaptive CLAHE (8 x 8 grid, clip 2) per
  tile on the 8-bit L channel, as seed 004 enhances each image.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import zarr
from PIL import Image

from wsiseg.models import load_model
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.predict import Predictor
from wsiseg.stain import CLAHE_CLIP, StainError, fit_transform, resolve_spec

IMAGE = "TCGA-A7-A13E-01Z-00-DX1"
SHIFT = 96


class PerTile(torch.nn.Module):
    """The network after a per-tile colour operation ``op`` ((H, W, 3) uint8 -> uint8) on each
    tile of the (normalised) batch: denormalised, op, normalised again."""

    def __init__(self, net, op, mean255: torch.Tensor, std255: torch.Tensor):
        super().__init__()
        self.net, self.op, self.mean, self.std = net, op, mean255, std255

    def forward(self, x):
        v = (x * self.std + self.mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        v = np.stack([self.op(t) for t in v])
        y = (torch.from_numpy(v).float() - self.mean.view(3)) / self.std.view(3)
        return self.net(y.permute(0, 3, 1, 2))


def per_tile_predictor(pred: Predictor, op) -> Predictor:
    p = copy.copy(pred)
    p.net = PerTile(pred.net, op, pred._mean, pred._std)
    return p


def clahe_tile(t: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(t, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(8, 8)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def shift_difference(tmp: Path, pred, img, cfg, tag, stain_a=None, stain_b=None) -> dict:
    maps = []
    for name, im, st in (("a", img, stain_a), ("b", np.ascontiguousarray(img[SHIFT:, SHIFT:]), stain_b)):
        f = tmp / f"{tag}-{name}.png"
        Image.fromarray(im).save(f)
        res = run_slide(f, tmp / f"{tag}-{name}", pred, cfg, stain=st)
        maps.append(zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")["0"][0].astype(np.float32) / 255)
    a, b = maps[0][SHIFT:, SHIFT:], maps[1]
    m = 48
    d = np.abs(a[m:-m, m:-m] - b[m:-m, m:-m])
    return {"mean_abs_dp": round(float(d.mean()), 5), "p99_abs_dp": round(float(np.quantile(d, 0.99)), 4),
            "nucleus_fraction": round(float((b > 0.5).mean()), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/monuseg/train")
    p.add_argument("--model", default=None)
    p.add_argument("--json", default="benchmarks/results/stain_seams.json")
    a = p.parse_args(argv)
    model = load_model(a.model)
    pred = Predictor(model, "cpu")
    img = np.asarray(Image.open(Path(a.data) / "images" / f"{IMAGE}.png").convert("RGB"))[:600, :600]
    cfg = RunConfig.of(mpp=model.mpp, tissue=False, cellularity=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def add(method, clahe, fit, p=pred, stain_a=None, stain_b=None):
            r = {"stain": method, "clahe": clahe, "fit": fit,
                 **shift_difference(tmp, p, img, cfg, f"{method}{clahe}{fit}", stain_a, stain_b)}
            rows.append(r)
            print(json.dumps(r), flush=True)

        add("none", False, "-")
        for method, clahe in (("reinhard", False), ("macenko", False), ("vahadane", False), ("none", True)):
            spec = resolve_spec(method, None, clahe, model.meta)
            t = fit_transform(spec, img)
            add(method, clahe, "slide", stain_a=t, stain_b=t)
            rows.append({"stain": method, "clahe": clahe, "fit": "prenormalised",
                         **shift_difference(tmp, pred, t.apply_numpy(img), cfg, f"{method}{clahe}pre")})
            print(json.dumps(rows[-1]), flush=True)
            add(method, clahe, "image", stain_a=t, stain_b=fit_transform(spec, np.ascontiguousarray(img[SHIFT:, SHIFT:])))
            if method != "none":
                def op(tile, spec=spec):
                    try:
                        return fit_transform(spec, tile).apply_numpy(tile)
                    except StainError:
                        return tile
            else:
                op = clahe_tile
            add(method, clahe, "tile", p=per_tile_predictor(pred, op))
    out = {"benchmark": "seams from colour: 96 px shift (issue 21)", "command": "python benchmarks/experiments/stain_seams.py",
           "model": model.id, "image": f"MoNuSeg {IMAGE}[:600, :600] read as {model.mpp} um/px", "shift_px": SHIFT,
           "target": "the model's sidecar stain_reference", "window": cfg.tiling.window, "overlap": cfg.tiling.overlap,
           "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
