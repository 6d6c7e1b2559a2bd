"""wsiseg beside MONAI's PatchInferer (WSISlidingWindowSplitter + ZarrAvgMerger): the same weights,
slide, tile and stride.

The second peer of the throughput issue. Both engines run the same torch network (wsiseg's model
loaded with ``wsiseg.models.load_model``), the same normalisation, tile 256, stride 128, batch
size and torch threads, on the same slide at the model's resolution, each in a fresh process
(imports and model loading excluded from the time, reported apart; output writing included):

* wsiseg: ``run_slide`` (``wsiseg.bench`` stage ``end_to_end``): OME-Zarr uint8, Hann blending.
* MONAI 1.6: ``PatchInferer(splitter=WSISlidingWindowSplitter(256, overlap=0.5,
  reader="OpenSlide", level=L), merger_cls=ZarrAvgMerger, batch_size=B)`` called on the slide's
  path, as MONAI's WSI tutorial does; ``L`` is the pyramid level at the model's resolution (the
  run is refused when no level is within 1% of it: MONAI's splitter does not resample).
  ``preprocessing`` normalises the uint8 NCHW batch, ``postprocessing`` applies the sigmoid (or
  softmax); the merger averages float32 values in Zarr stores (its defaults, in a temporary
  folder) and ``finalize`` writes the float32 map.

Tissue: MONAI has no tissue detection; with the mask on (the default), its ``filter_fn`` keeps
the patches that touch tissue in wsiseg's own thumbnail mask (:func:`wsiseg.tissue.tissue_mask`),
so both infer the tissue tiles (the filter sees a patch after it is read: MONAI reads every
patch). ``--all-tiles``: no mask for either.

``--monai-channels-last`` also gives MONAI's network channels_last memory (MONAI's patches are
NCHW, the slower layout on CPU; TIAToolbox's NHWC batches get channels_last by its ``permute``).

MONAI needs only torch and numpy, both in wsiseg's venv; it is installed beside the repository,
not into the venv (not in git)::

    pip install --no-deps --target .peer-monai monai==1.6.1
    python benchmarks/peers/peer_monai.py wsiseg/data/CMU-1-Small-Region.svs --repeat 2 \\
        --json benchmarks/results/peer_monai_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MONAI_PATH = REPO / ".peer-monai"
_TAG = "PEER_MONAI_RESULT "


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def monai_child(slide: str, model: str, device: str = "cpu", batch_size: int = 8, tile: int = 256,
                overlap: float = 0.5, tissue: bool = True, threads: int | None = None, merger: str = "ZarrAvgMerger",
                channels_last: bool = False) -> dict:
    """Run MONAI's PatchInferer once on ``slide``; returns timings, counts, RSS, output layout."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    import monai
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter

    from wsiseg.models.registry import load_model
    from wsiseg.pipeline import peak_rss_mb
    from wsiseg.slide import ScaledView, open_slide
    from wsiseg.tissue import tissue_mask

    import_s = time.perf_counter() - t0
    torch.set_num_threads(threads or os.cpu_count() or 1)
    dev = torch.device(device)
    m = load_model(model)
    net = m.network.to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    mean = torch.tensor(m.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(m.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1) * 255

    reader = open_slide(Path(slide))
    try:
        view = ScaledView.create(reader, m.mpp)
        if abs(view.factor - 1) > 0.01:
            raise SystemExit(f"peer_monai: {slide} has no pyramid level within 1% of {m.mpp} um/px "
                             "(MONAI's WSI splitter reads a level as it is)")
        level, (H, W) = view.level, view.shape
        mask = tissue_mask(reader.thumbnail(min(2048, max(reader.level_dimensions[0])))) if tissue else None
    finally:
        reader.close()

    counts = {"read": 0, "kept": 0}

    def keep(patch, location) -> bool:  # location (y, x) in level px; may reach past the image
        counts["read"] += 1
        if mask is not None:
            mh, mw = mask.shape
            y, x = max(int(location[0]), 0), max(int(location[1]), 0)
            y0, x0 = min(y * mh // H, mh - 1), min(x * mw // W, mw - 1)
            y1 = max(y0 + 1, min(mh, -(-min(y + tile, H) * mh // H)))
            x1 = max(x0 + 1, min(mw, -(-min(x + tile, W) * mw // W)))
            if not mask[y0:y1, x0:x1].any():
                return False
        counts["kept"] += 1
        return True

    stats = {"infer_seconds": 0.0, "batches": 0}

    def pre(x: torch.Tensor) -> torch.Tensor:
        x = (x.to(dev, torch.float32) - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def post(z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z, 1) if m.activation == "softmax" else torch.sigmoid(z)

    def network(x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        with torch.inference_mode():
            y = net(x)
        stats["infer_seconds"] += time.perf_counter() - t
        stats["batches"] += 1
        return y

    rss_setup = round(peak_rss_mb(), 1)
    with tempfile.TemporaryDirectory(prefix="peer-monai-") as tmp:
        import monai.inferers.merger as merger_mod

        kwargs = {"store": str(Path(tmp) / "merged.zarr")} if merger == "ZarrAvgMerger" else {}
        splitter = WSISlidingWindowSplitter(patch_size=tile, overlap=overlap, filter_fn=keep, reader="OpenSlide",
                                            level=level)
        inferer = PatchInferer(splitter=splitter, merger_cls=getattr(merger_mod, merger), batch_size=batch_size,
                               preprocessing=pre, postprocessing=post, **kwargs)
        t1 = time.perf_counter()
        with torch.inference_mode(False):
            out = inferer(str(slide), network)
        run_s = time.perf_counter() - t1
        peak = round(peak_rss_mb(), 1)
        layout = {"shape": list(out.shape), "dtype": str(out.dtype)}
        nbytes = _dir_bytes(Path(tmp))
        # where no patch reached, MONAI's average is 0 / 0 (NaN): count those values (after the timing)
        nan = sum(int(np.isnan(np.asarray(out[:, :, r:r + 512])).sum()) for r in range(0, out.shape[2], 512))
    n = counts["kept"]
    return {
        "engine": f"monai {monai.__version__} PatchInferer + WSISlidingWindowSplitter + {merger}",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "channels_last": channels_last,
        "tiles": n, "patches_read": counts["read"], "batches": stats["batches"], "seconds": round(run_s, 3),
        "tiles_per_second": round(n / run_s, 2) if run_s > 0 else None,
        "infer_batch_seconds": round(stats["infer_seconds"], 3),
        "infer_batch_fraction": round(stats["infer_seconds"] / run_s, 3) if run_s > 0 else None,
        "model_tiles_per_second_inside_engine": round(n / stats["infer_seconds"], 2) if stats["infer_seconds"] else None,
        "import_seconds": round(import_s, 2), "rss_after_setup_mb": rss_setup, "peak_rss_mb": peak,
        "output_bytes": nbytes, "output": layout, "level": level, "tissue_mask": tissue, "device": device,
        "output_nan_fraction": round(nan / max(1, int(np.prod(out.shape))), 4),
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_tiatoolbox import peer_arguments, side_by_side

    ap = peer_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--merger", default="ZarrAvgMerger", choices=["ZarrAvgMerger", "AvgMerger"],
                    help="MONAI's merger (AvgMerger: the whole map in memory)")
    ap.add_argument("--monai-channels-last", action="store_true", help="channels_last network and batches for MONAI")
    ap.add_argument("--monai-path", default=str(DEFAULT_MONAI_PATH), help="where monai is installed (--target)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child-monai", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if a.child_monai:
        sys.path.insert(0, a.monai_path)
        r = monai_child(a.slide, a.model, a.device, a.batch_size, tissue=not a.all_tiles, threads=a.threads,
                        merger=a.merger, channels_last=a.monai_channels_last)
        print(_TAG + json.dumps(r), flush=True)
        return 0
    if not (Path(a.monai_path) / "monai").is_dir():
        print(f"peer_monai: monai not found in {a.monai_path}: pip install --no-deps --target {a.monai_path} "
              "monai==1.6.1", file=sys.stderr)
        return 1
    from wsiseg.bench import run_tagged
    from wsiseg.models.registry import ModelError
    from wsiseg.slide import SlideError

    def run_peer(path: str) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-monai", a.slide, "--model", path,
               "--device", a.device, "--batch-size", str(a.batch_size), "--merger", a.merger,
               "--monai-path", a.monai_path]
        cmd += (["--all-tiles"] if a.all_tiles else []) + (["--threads", str(a.threads)] if a.threads else [])
        cmd += ["--monai-channels-last"] if a.monai_channels_last else []
        return run_tagged(cmd, _TAG, "MONAI run")

    try:
        res = side_by_side("monai", run_peer, a.slide, a.model, a.device, a.batch_size, not a.all_tiles, a.threads,
                           a.repeat, not a.no_model_only, None,
                           {"monai_merger": a.merger, "monai_channels_last": a.monai_channels_last},
                           backend=a.wsiseg_backend)
    except (ModelError, SlideError, RuntimeError) as e:
        print(f"peer_monai: error: {e}", file=sys.stderr)
        return 1
    res["monai"]["infer_batch_fraction"] = statistics.median(r["infer_batch_fraction"] for r in res["monai_runs"])
    out = json.dumps(res, indent=2)
    print(out)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
