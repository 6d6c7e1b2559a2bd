"""What a tiled map owes to tiling: each model's blended map (256 px tiles, Hann, 50% overlap) against
one forward pass over the whole image (no tile borders at all), and the shift test at several shifts.

The image is a MoNuSeg breast crop brought to the model's 0.5 um/px (cv2 INTER_AREA) beforehand, so
the engine does not resample and a shift in image px is a shift in the network's px. A strided
encoder is shift-equivariant only for shifts that are multiples of its total stride (input_multiple:
16 for the U-Net, 32 for EfficientNet-Lite0), so the shift test mixes aliasing with seams unless the
shift is such a multiple; the whole-image comparison isolates the tiling.

    python benchmarks/experiments/seams_vs_whole.py --sample --models unet-bn-nuclei-classes-20x \
        runs/lite0-unet-joint-20x/lite0-unet-joint-20x.safetensors \
        runs/lite0-unet-joint-20x-consistency/lite0-unet-joint-20x.safetensors --shifts 32 64 96 --json benchmarks/results/default_model/seams_vs_whole_cpu.json
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import zarr
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import BREAST_ID, MONUSEG  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.pipeline import RunConfig, run_slide  # noqa: E402
from wsiseg.predict import Predictor  # noqa: E402
from wsiseg.slide import SAMPLE  # noqa: E402


def tiled(pred, img, tmp, tag, overlap=0.5, tile=256):
    p = Path(tmp) / f"{tag}.png"
    Image.fromarray(img).save(p)
    r = run_slide(p, Path(tmp) / tag, pred, RunConfig.of(mpp=pred.model.mpp, mpp_override=pred.model.mpp,
                                                      tissue=False, overlap=overlap, tile=tile))
    return zarr.open_group(str(r.out_dir / "probabilities.zarr"), mode="r")["0"][0].astype(np.float32) / 255


def whole(pred, img):
    m = pred.model.input_multiple
    h, w = img.shape[:2]
    ph, pw = -h % m + m, -w % m + m
    pad = np.pad(img, ((m // 2, ph - m // 2), (m // 2, pw - m // 2), (0, 0)), mode="reflect")
    return pred.probabilities(pad[None])[0, 0, m // 2:m // 2 + h, m // 2:m // 2 + w]


def stats(d):
    return {"mean_abs_dp": round(float(d.mean()), 5), "p99_abs_dp": round(float(np.quantile(d, 0.99)), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["unet-bn-nuclei-classes-20x"])
    ap.add_argument("--shifts", nargs="+", type=int, default=[16, 32, 48, 64])
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--sample", action="store_true", help="also a 1,024 px crop of the bundled sample slide (20x)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    src = np.asarray(Image.open(MONUSEG / "images" / f"{BREAST_ID}.png").convert("RGB"))
    images = {"monuseg": cv2.resize(src, (500, 500), interpolation=cv2.INTER_AREA)}
    if a.sample:
        import openslide

        with openslide.OpenSlide(str(SAMPLE)) as s:  # 0.499 um/px: the model's resolution
            images["sample"] = np.asarray(s.read_region((600, 800), 0, (1024, 1024)).convert("RGB"))
    rows = {}
    m = 24  # away from the image borders
    for (src_name, img), name in ((i, n) for i in images.items() for n in a.models):
        pred = Predictor(load_model(name), "cpu", backend="torch")
        with tempfile.TemporaryDirectory() as tmp:
            t = tiled(pred, img, tmp, "t", tile=a.tile)
            t0 = tiled(pred, img, tmp, "t0", overlap=0.0, tile=a.tile)
            q = np.round(whole(pred, img) * 255) / 255  # the store's uint8 steps
            row = {"input_multiple": pred.model.input_multiple, "tile": a.tile,
                   "tiled_vs_whole": stats(np.abs(t - q)[m:-m, m:-m]),
                   "tiled_no_overlap_vs_whole": stats(np.abs(t0 - q)[m:-m, m:-m]), "shift": {}}
            for s in a.shifts:
                b = tiled(pred, np.ascontiguousarray(img[s:, s:]), tmp, f"s{s}", tile=a.tile)
                row["shift"][str(s)] = stats(np.abs(t[s:, s:] - b)[m:-m, m:-m])
        key = f"{src_name} / {pred.model.id}" + ("" if name == pred.model.id else f" ({name})")
        rows[key] = row
        print(key, json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "benchmark": "seams against one whole-image forward pass, and the shift test by shift (px at the model's 0.5 um/px)",
            "command": "python benchmarks/experiments/seams_vs_whole.py " + " ".join(sys.argv[1:]),
            "images": {"monuseg": f"MoNuSeg {BREAST_ID}, resized 1000 -> 500 px (INTER_AREA)",
                       "sample": "wsiseg/data/CMU-1-Small-Region.svs, 1,024 px from (600, 800), read at 0.499 um/px"},
            "tile": a.tile, "machine": "2-core CPU, torch",
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
