"""wsiseg beside TIAToolbox's SemanticSegmentor: the same weights, slide, tile and stride.

Both engines run the same torch network (wsiseg's model loaded with ``wsiseg.models.load_model``
from its ``.safetensors`` + ``.json``), with the same normalisation (inside the network for
TIAToolbox, in the Predictor for wsiseg), tile 256, stride 128, batch size and torch threads, on
the same slide at the model's resolution, each with its own tissue mask (``--all-tiles``: no
mask for either, so both infer every tile of the slide). Each engine runs in its own fresh
process, so each peak RSS is its own; both processes are timed from the start of the engine call
to its end (imports and model loading excluded, reported apart), output writing included:

* wsiseg: ``run_slide`` (``wsiseg.bench`` stage ``end_to_end``): OME-Zarr uint8, Hann blending.
* TIAToolbox 2.1.x: ``SemanticSegmentor.run([slide], patch_mode=False, ioconfig=...,
  output_type="zarr")`` with an ``IOSegmentorConfig`` at the model's mpp; the network is wrapped
  in a ``ModelABC`` whose ``infer_batch`` mirrors TIAToolbox's own ``UNetModel.infer_batch``
  (NHWC uint8 batch -> float, ``permute`` to NCHW, forward under ``inference_mode``, sigmoid,
  back to NHWC numpy). The time spent inside ``infer_batch`` is reported too.

TIAToolbox pins versions that clash with wsiseg's environment, so it lives in its own venv,
``.venv-tia`` beside ``.venv`` (not in git); build it once::

    python3 -m venv .venv-tia
    .venv-tia/bin/pip install torch==2.14.1 torchvision==0.29.1 safetensors \\
        $(python3 benchmarks/peers/peer_tiatoolbox.py --print-tia-requirements)
    .venv-tia/bin/pip install --no-deps tiatoolbox==2.1.3

(tiatoolbox 2.1.3 declares ``torch<2.13``; it runs with torch 2.14.1, the only torch beside a
working torchvision on this machine's disk, hence ``--no-deps``.) Then, with wsiseg's venv::

    python benchmarks/peers/peer_tiatoolbox.py wsiseg/data/CMU-1-Small-Region.svs \\
        --json benchmarks/results/peer_tiatoolbox_cpu.json          # default model
    python benchmarks/peers/peer_tiatoolbox.py SLIDE --model untrained     # no trained weights yet

Slides from ``benchmarks/tools/make_slide.py`` (generic TIFF): TIAToolbox 2.1.3 opens a ``.tif`` as a
``VirtualWSIReader`` without an mpp and stops ("MPP is None"); give it a link with the ``.svs``
suffix (``ln -s mosaic.tif mosaic.svs``) and it uses its OpenSlide reader, which finds the mpp
(OpenSlide itself reads the file by its content, so wsiseg reads the same slide either way).

The TIAToolbox side runs as ``.venv-tia/bin/python benchmarks/peers/peer_tiatoolbox.py --child-tia``
with the repository on ``PYTHONPATH`` (for ``wsiseg.models``; it needs only torch and
safetensors there). The two venvs hold different torch builds (wsiseg's: 2.13.0 CPU; TIA's:
2.14.1); ``--same-env`` runs wsiseg in TIAToolbox's venv too, so both use one torch (its
CUDA-enabled build also raises wsiseg's RSS by the libraries it maps).
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
DEFAULT_TIA_PYTHON = REPO / ".venv-tia" / "bin" / "python"
SAMPLE = REPO / "wsiseg" / "data" / "CMU-1-Small-Region.svs"
_TAG = "PEER_TIA_RESULT "
TIA_REQUIREMENTS = [  # tiatoolbox 2.1.3's own pins, less torch/torchvision (see the docstring)
    "aiohttp<3.14.2,>=3.8.1", "bokeh<3.9.1,>=3.8.2", "Click<8.4.2,>=8.2.0", "dask<2026.7.1,>=2026.1.2",
    "defusedxml<=0.7.1,>=0.7.1", "filelock<3.29.0,>=3.9.0", "flask<3.1.3,>=2.2.2", "flask-cors<6.0.5,>=4.0.0",
    "glymur<0.14.8,>=0.12.7", "huggingface_hub<1.24.0,>=0.33.3", "imagecodecs<2026.3.6,>=2022.9.26",
    "ipywidgets<8.1.8,>=8.1.7", "joblib<1.5.3,>=1.1.1", "jupyterlab<4.6.1,>=3.5.2", "matplotlib<3.11.1,>=3.10.0",
    "numba<0.66.0,>=0.57.0", "numpy<2.4.4,>=2.0.0", "opencv-python<5.0.0,>=4.6.0", "openslide-bin<4.0.1.2,>=4.0.0.2",
    "openslide-python<1.4.6,>=1.4.0", "pandas<3.0.3,>=2.0.0", "pillow<12.2.0,>=9.3.0", "pydicom<3.0.2,>=2.3.1",
    "pyyaml<6.0.3,>=6.0", "requests<2.34.2,>=2.28.1", "s3fs<2026.6.0,>=2024.12.0", "scikit-image<0.26.1,>=0.26.0",
    "scikit-learn<1.9.0,>=1.2.0", "scipy<1.17.1,>=1.8", "shapely<=2.1.2,>=2.0.0", "SimpleITK<2.5.5,>=2.2.1",
    "sphinx<9.0.4,>=9.0.0", "tifffile<2026.3.3,>=2025.5.21", "timm<1.0.28,>=1.0.3", "tqdm<4.69.0,>=4.64.1",
    "transformers<5.14.1,>=4.51.1", "umap-learn<0.5.12,>=0.5.3", "wsidicom<0.34.0,>=0.18.0", "zarr<3.2.0,>=3.0.8",
]


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------- TIAToolbox side (child)


def _tia_model(network, mean: list[float], std: list[float], activation: str):
    """wsiseg's network as a TIAToolbox ``ModelABC`` (built here: tiatoolbox is importable only in
    the child's venv)."""
    import numpy as np
    import torch
    from tiatoolbox.models.models_abc import ModelABC

    class WsisegNetwork(ModelABC):
        """Normalisation + wsiseg's network; ``infer_batch`` as TIAToolbox's ``UNetModel`` does it."""

        def __init__(self) -> None:
            super().__init__()
            self.net = network
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
            self.activation = activation
            self.infer_seconds = 0.0
            self.patches = 0
            self.batches = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

        @staticmethod
        def infer_batch(model, batch_data, *, device: str) -> np.ndarray:
            t = time.perf_counter()
            m = getattr(model, "module", model)
            model.eval()
            x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)  # NHWC -> NCHW view
            with torch.inference_mode():
                logits = model(x)
                probs = torch.softmax(logits, 1) if m.activation == "softmax" else torch.sigmoid(logits)
                out = probs.permute(0, 2, 3, 1).cpu().numpy()  # NHWC, as TIAToolbox expects
            m.infer_seconds += time.perf_counter() - t
            m.patches += int(x.shape[0])
            m.batches += 1
            return out

        @staticmethod
        def postproc(image):
            """Class map: probability > 0.5 for one sigmoid output, argmax otherwise."""
            if image.shape[-1] == 1:
                return (image[..., 0] > 0.5).astype("uint8")
            return image.argmax(axis=-1)

    return WsisegNetwork()


def tia_child(slide: str, model: str, device: str = "cpu", batch_size: int = 8, tile: int = 256, stride: int = 128,
              tissue: bool = True, num_workers: int = 0, threads: int | None = None,
              compile_mode: str | None = None) -> dict:
    """Run TIAToolbox's SemanticSegmentor once on ``slide``; returns timings, counts, RSS, output layout."""
    t0 = time.perf_counter()
    import torch
    import tiatoolbox
    from tiatoolbox import rcParam
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor

    from wsiseg.models.registry import load_model

    import_s = time.perf_counter() - t0
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if compile_mode:
        rcParam["torch_compile_mode"] = compile_mode
    m = load_model(model)
    net = _tia_model(m.network, m.mean, m.std, m.activation)
    seg = SemanticSegmentor(model=net, batch_size=batch_size, num_workers=num_workers, device=device, verbose=False)
    res_mpp = {"units": "mpp", "resolution": m.mpp}
    ioconfig = IOSegmentorConfig(
        input_resolutions=[res_mpp], output_resolutions=[res_mpp], patch_input_shape=(tile, tile),
        patch_output_shape=(tile, tile), stride_shape=(stride, stride), save_resolution=res_mpp,
    )
    setup_s = time.perf_counter() - t0
    rss_setup = _peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="peer-tia-") as tmp:
        t1 = time.perf_counter()
        out = seg.run([slide], patch_mode=False, ioconfig=ioconfig, save_dir=Path(tmp) / "out", overwrite=True,
                      output_type="zarr", auto_get_mask=tissue, return_probabilities=True)
        run_s = time.perf_counter() - t1
        peak = _peak_rss_mb()
        paths = list(out.values()) if isinstance(out, dict) else [out]
        layout = {}
        nbytes = 0
        for p in paths:
            p = Path(p)
            if p.exists():
                nbytes += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
                try:
                    import zarr

                    g = zarr.open(str(p), mode="r")
                    for name, arr in (g.arrays() if hasattr(g, "arrays") else []):
                        layout[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks)}
                except Exception as e:  # layout is informative only
                    layout["error"] = f"{type(e).__name__}: {e}"
    n = net.patches
    return {
        "engine": f"tiatoolbox {tiatoolbox.__version__} SemanticSegmentor", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_compile_mode": rcParam.get("torch_compile_mode"),
        "tiles": n, "batches": net.batches, "seconds": round(run_s, 3),
        "tiles_per_second": round(n / run_s, 2) if run_s > 0 else None,
        "infer_batch_seconds": round(net.infer_seconds, 3),
        "infer_batch_fraction": round(net.infer_seconds / run_s, 3) if run_s > 0 else None,
        "model_tiles_per_second_inside_engine": round(n / net.infer_seconds, 2) if net.infer_seconds > 0 else None,
        "import_seconds": round(import_s, 2), "setup_seconds": round(setup_s, 2),
        "rss_after_setup_mb": rss_setup, "peak_rss_mb": peak, "output_bytes": nbytes, "output_arrays": layout,
        "auto_get_mask": tissue, "num_workers": num_workers, "device": device,
    }


# ----------------------------------------------------------------------------- both (parent)


def run_tia(slide: Path, model: str, tia_python: Path, device: str, batch_size: int, tissue: bool, num_workers: int,
            threads: int | None, compile_mode: str | None, timeout: float | None = None) -> dict:
    """:func:`tia_child` in TIAToolbox's venv, in a fresh process."""
    cmd = [str(tia_python), str(Path(__file__).resolve()), "--child-tia", str(slide), "--model", str(model),
           "--device", device, "--batch-size", str(batch_size), "--tia-workers", str(num_workers)]
    if not tissue:
        cmd.append("--all-tiles")
    if threads:
        cmd += ["--threads", str(threads)]
    if compile_mode:
        cmd += ["--tia-compile-mode", compile_mode]
    from wsiseg.bench import run_tagged

    return run_tagged(cmd, _TAG, "TIAToolbox run", timeout)


def compare(slide: str | Path, model: str | None = None, device: str = "cpu", batch_size: int = 8,
            tissue: bool = True, tia_python: str | Path = DEFAULT_TIA_PYTHON, tia_workers: int = 0,
            threads: int | None = None, repeat: int = 1, compile_mode: str | None = None,
            model_only: bool = True, wsiseg_python: str | Path | None = None, backend: str = "torch") -> dict:
    """Both engines on ``slide``, ``repeat`` times each (alternating); medians of tiles/s, max RSS.

    ``wsiseg_python``: the interpreter for wsiseg's runs (default: this one); give TIAToolbox's to
    run both on the same torch build (wsiseg's dependencies are all present in that venv).
    """
    tia_python = Path(tia_python)
    if not tia_python.exists():
        raise SystemExit(f"peer_tiatoolbox: {tia_python} not found: build TIAToolbox's venv first (see --help)")

    def run_peer(path: str) -> dict:
        return run_tia(Path(slide), path, tia_python, device, batch_size, tissue, tia_workers, threads, compile_mode)

    res = side_by_side("tiatoolbox", run_peer, slide, model, device, batch_size, tissue, threads, repeat, model_only,
                       wsiseg_python, {"tia_python": str(tia_python)}, backend=backend)
    res["tiatoolbox"]["infer_batch_fraction"] = statistics.median(r["infer_batch_fraction"]
                                                                  for r in res["tiatoolbox_runs"])
    return res


def side_by_side(peer: str, run_peer, slide: str | Path, model: str | None, device: str, batch_size: int,
                 tissue: bool, threads: int | None, repeat: int, model_only: bool,
                 wsiseg_python: str | Path | None, extra: dict, backend: str = "torch") -> dict:
    """wsiseg's whole pipeline (``wsiseg.bench`` stage ``end_to_end``, a fresh process per run) and
    ``run_peer(model_path) -> dict`` (tiles, tiles_per_second, seconds, peak_rss_mb,
    rss_after_setup_mb, torch, output_bytes), ``repeat`` times each, alternating; medians of
    tiles/s and seconds, the largest peak RSS, and the ratios wsiseg / ``peer``. ``model_only``: also
    wsiseg's model-only ceiling on the same slide, and both engines' ratios to it. ``backend``:
    wsiseg's network runtime (``torch``, ``openvino`` or ``openvino-int8``; the peer always runs torch)."""
    from wsiseg.bench import machine, resolve_model_arg, run_stage_subprocess
    from wsiseg.models.registry import load_model, resolve_model_path

    slide = Path(slide)
    res: dict = {"benchmark": f"peer_{peer}", "slide": str(slide), "slide_bytes": slide.stat().st_size,
                 "tile": 256, "stride": 128, "batch_size": batch_size, "device": device, "tissue_mask": tissue,
                 "machine": machine(), "wsiseg_python": str(wsiseg_python or sys.executable),
                 "wsiseg_backend": backend, **extra,
                 "wsiseg_runs": [], f"{peer}_runs": []}
    with tempfile.TemporaryDirectory(prefix="peer-model-") as mtmp:
        model = resolve_model_arg(model, mtmp)
        path = resolve_model_path(model)  # the peer loads the same files
        m = load_model(path)
        res["model"] = {"id": m.id, "path": str(path), "mpp": m.mpp, "classes": m.classes,
                        "parameters": sum(p.numel() for p in m.network.parameters())}
        if model_only:
            res["wsiseg_model_only"] = run_stage_subprocess("model_only", slide, str(path), device=device,
                                                            batch_size=batch_size, threads=threads, tissue=tissue,
                                                            python=wsiseg_python, backend=backend)
        for i in range(repeat):
            for side in (peer, "wsiseg") if i % 2 == 0 else ("wsiseg", peer):
                print(f"peer_{peer}: run {i + 1}/{repeat}: {side} ...", file=sys.stderr, flush=True)
                if side == "wsiseg":
                    r = run_stage_subprocess("end_to_end", slide, str(path), device=device, batch_size=batch_size,
                                             threads=threads, tissue=tissue, python=wsiseg_python, backend=backend)
                else:
                    r = run_peer(str(path))
                res[f"{side}_runs"].append(r)
                print(f"peer_{peer}: {side}: {r['tiles']} tiles, {r['tiles_per_second']} tiles/s, "
                      f"peak RSS {r['peak_rss_mb']} MB", file=sys.stderr, flush=True)

    def summary(runs: list[dict]) -> dict:
        return {"tiles": runs[0]["tiles"], "tiles_per_second": statistics.median(r["tiles_per_second"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "rss_after_setup_mb": max(r["rss_after_setup_mb"] for r in runs)}

    w, t = summary(res["wsiseg_runs"]), summary(res[f"{peer}_runs"])
    w["output_bytes"] = res["wsiseg_runs"][0].get("zarr_bytes")
    w["torch"] = res["wsiseg_runs"][0].get("torch")
    t["torch"] = res[f"{peer}_runs"][0].get("torch")
    t["output_bytes"] = res[f"{peer}_runs"][0].get("output_bytes")
    res["wsiseg"], res[peer] = w, t
    res["wsiseg_tiles_per_second"], res[f"{peer}_tiles_per_second"] = w["tiles_per_second"], t["tiles_per_second"]
    res["wsiseg_peak_rss_mb"], res[f"{peer}_peak_rss_mb"] = w["peak_rss_mb"], t["peak_rss_mb"]
    res["ratios"] = {
        f"tiles_per_second_wsiseg_over_{peer}": round(w["tiles_per_second"] / t["tiles_per_second"], 3),
        f"peak_rss_wsiseg_over_{peer}": round(w["peak_rss_mb"] / t["peak_rss_mb"], 3),
        f"seconds_wsiseg_over_{peer}": round(w["seconds"] / t["seconds"], 3),
    }
    if model_only:
        mo = res["wsiseg_model_only"]["tiles_per_second"]
        res["ratios"]["wsiseg_over_model_only"] = round(w["tiles_per_second"] / mo, 3)
        res["ratios"][f"{peer}_over_model_only"] = round(t["tiles_per_second"] / mo, 3)
    res["machine"]["load_average_end"] = machine()["load_average"]
    return res


def peer_arguments(description: str) -> argparse.ArgumentParser:
    """The options both peer scripts take (slide, model, device, batch, threads, tissue, repeats)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("slide", nargs="?", default=str(SAMPLE), help="default: the bundled CMU-1-Small-Region.svs")
    ap.add_argument("--model", default=None, help="shipped name, NAME.safetensors path or 'untrained' (timing only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: all cores)")
    ap.add_argument("--all-tiles", action="store_true", help="no tissue mask for either engine")
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine, alternating (medians reported)")
    ap.add_argument("--no-model-only", action="store_true", help="skip wsiseg's model-only ceiling")
    ap.add_argument("--wsiseg-backend", default="torch", choices=["torch", "openvino", "openvino-int8"],
                    help="wsiseg's network runtime on the CPU (the peer runs torch either way)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = peer_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--tia-python", default=str(DEFAULT_TIA_PYTHON), help="python of TIAToolbox's venv")
    ap.add_argument("--tia-workers", type=int, default=0, help="TIAToolbox DataLoader workers (its default: 0)")
    ap.add_argument("--tia-compile-mode", default=None,
                    help="TIAToolbox rcParam torch_compile_mode (default: its own; it compiles only on some GPUs)")
    ap.add_argument("--same-env", action="store_true",
                    help="run wsiseg in TIAToolbox's venv too (the same torch build for both)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--print-tia-requirements", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-tia", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.print_tia_requirements:
        print(" ".join(TIA_REQUIREMENTS))  # no spaces inside: safe to word-split in $(...)
        return 0
    if a.child_tia:
        r = tia_child(a.slide, a.model, a.device, a.batch_size, tissue=not a.all_tiles, num_workers=a.tia_workers,
                      threads=a.threads, compile_mode=a.tia_compile_mode)
        print(_TAG + json.dumps(r), flush=True)
        return 0
    sys.path.insert(0, str(REPO))
    from wsiseg.models.registry import ModelError
    from wsiseg.slide import SlideError

    try:
        res = compare(a.slide, a.model, a.device, a.batch_size, not a.all_tiles, a.tia_python, a.tia_workers,
                      a.threads, a.repeat, a.tia_compile_mode, not a.no_model_only,
                      a.tia_python if a.same_env else None, a.wsiseg_backend)
    except (ModelError, SlideError, RuntimeError) as e:
        print(f"peer_tiatoolbox: error: {e}", file=sys.stderr)
        return 1
    out = json.dumps(res, indent=2)
    print(out)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
