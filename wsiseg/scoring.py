"""The cellularity stage of ``wsiseg run``: per-window tumour cellularity from the class maps.

Seed 003 (Rakhlin et al.) scores cellularity from a segmentation network's Normal, Lymphocyte,
Malignant and Background probability maps in two ways, both run here on every window of a grid
over the tissue of the finished probability map:

* ``lgbm``: the 81 hand-made features (:mod:`wsiseg.cellularity.features`) -> LightGBM;
* ``cnn``: a ResNet-34 on the 4-channel maps (seed 003's "SR" regressor, :mod:`wsiseg.cellularity.cnn`).

Windows: ``window`` x ``window`` model pixels (default 512 at the model's 0.5 um/px), stride
``stride`` (default = window). Windows that reach past the right or bottom edge are moved back
inside the map so every scored window is full-size (they overlap their neighbour; the CSV gives
the window actually scored); a map smaller than a window is scored once, on its own extent: its
features are those of the map itself (normalised by its own pixel count, as the regressors were
trained on patches of their own size), and the map CNN pads it to its input with background.
A window is scored when at least ``min_tissue`` of it is tissue (from the run's tissue mask).

Feature scale: the features of seed 003 are totals over a fixed-size patch. Models trained on
patches of another size (CoNSeP tiles are 128 px at 0.5 um/px; BreastPathQ patches 256 px) are
made comparable by dividing the area, activation and blob-count features by the patch's pixel
count (``feature_normalisation: per_pixel`` in the regressor's sidecar); the stage applies what
the sidecar says.

Outputs in the run folder: ``wsiseg.cellularity.csv`` (and ``wsiseg.cellularity.parquet`` when pyarrow is
installed) with slide level-0 ``x, y, width, height``, ``tissue_fraction`` and one column per
regressor; ``heatmap.png`` (cellularity over the slide thumbnail, with a colour bar); the slide
summary is returned for ``summary.json``.
"""
from __future__ import annotations

import csv
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.classes import CLASS_CHANNELS, NUCLEUS_TYPES

log = logging.getLogger("wsiseg")

CLASS_INPUTS = CLASS_CHANNELS
DEFAULT_REGRESSORS = {"lgbm": "cellularity-lgbm-proxy", "cnn": "cellularity-cnn-proxy"}


@dataclass(frozen=True)
class Window:
    y: int
    x: int
    h: int
    w: int
    tissue: float


def window_grid(shape: tuple[int, int], window: int, stride: int | None = None) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) windows covering an (H, W) map; edge windows are moved inside the map."""
    H, W = shape
    stride = stride or window

    def starts(n: int) -> list[int]:
        if n <= window:
            return [0]
        s = list(range(0, n - window + 1, stride))
        if s[-1] + window < n:
            s.append(n - window)
        return s

    return [(y, x, min(window, H), min(window, W)) for y in starts(H) for x in starts(W)]


def tissue_fractions(mask: np.ndarray, shape: tuple[int, int], wins) -> np.ndarray:
    """Share of tissue in each window, from a (h, w) mask covering the whole (H, W) map."""
    import cv2

    H, W = shape
    mh, mw = mask.shape
    integ = cv2.integral(mask.astype(np.uint8))  # (mh+1, mw+1)
    out = np.zeros(len(wins))
    for i, (y, x, h, w) in enumerate(wins):
        y0, y1 = int(y * mh / H), max(int(y * mh / H) + 1, int(round((y + h) * mh / H)))
        x0, x1 = int(x * mw / W), max(int(x * mw / W) + 1, int(round((x + w) * mw / W)))
        y1, x1 = min(y1, mh), min(x1, mw)
        area = (y1 - y0) * (x1 - x0)
        out[i] = (integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]) / max(area, 1)
    return out


def pad_to(maps: np.ndarray, size: int, channels=CLASS_INPUTS) -> np.ndarray:
    """Pad (C, h, w) class maps to (C, size, size) with background (1 in 'background', 0 else)."""
    c, h, w = maps.shape
    if h >= size and w >= size:
        return maps
    out = np.zeros((c, max(h, size), max(w, size)), maps.dtype)
    if "background" in channels:
        out[list(channels).index("background")] = 1
    out[:, :h, :w] = maps
    return out


def malignant_share(maps: np.ndarray) -> float:
    """The no-learning baseline of a (4, h, w) :data:`CLASS_INPUTS` map: the malignant probability
    mass over the nuclear (normal + lymphocyte + malignant) mass, i.e. the proxy label's
    "tumour nuclear area / all nuclear area" read off the maps (0 where there are no nuclei)."""
    normal, lymph, malignant = (maps[CLASS_INPUTS.index(c)].astype(np.float64).sum()
                                for c in NUCLEUS_TYPES)
    total = normal + lymph + malignant
    return float(malignant / total) if total > 1e-6 else 0.0


def patch_features(maps: np.ndarray, normalisation: str = "per_pixel") -> np.ndarray:
    """The 81 seed 003 features of one (4, h, w) class map in :data:`CLASS_INPUTS` order.

    ``per_pixel``: the area, activation and blob features divided by h*w (see the module doc);
    ``none``: the paper's raw totals.
    """
    from wsiseg.cellularity.features import features

    f = features(maps, CLASS_INPUTS)
    if normalisation == "per_pixel":
        f = f / float(maps.shape[1] * maps.shape[2])
    elif normalisation != "none":
        raise ValueError(f"unknown feature normalisation {normalisation!r}")
    return f


class _LGBM:
    def __init__(self, path: Path):
        import json as _json

        from wsiseg.cellularity.regressors import LightGBMRegressor

        self.model = LightGBMRegressor.load(path)
        meta = _json.loads(path.with_suffix(".json").read_text())
        self.normalisation = meta.get("feature_normalisation", "none")

    def predict(self, maps: list[np.ndarray]) -> np.ndarray:
        import os

        from wsiseg.cellularity.features import features_batch

        if not maps:
            return np.empty(0)
        # patches concurrently: the DCT scale space and the maxima search release the GIL
        X = features_batch(maps, CLASS_INPUTS, n_threads=min(len(maps), os.cpu_count() or 1))
        if self.normalisation == "per_pixel":
            X = X / np.array([float(m.shape[1] * m.shape[2]) for m in maps])[:, None]
        elif self.normalisation != "none":
            raise ValueError(f"unknown feature normalisation {self.normalisation!r}")
        return self.model.predict(X)


class _CNN:
    """The map CNN at the scale it was trained at: a window larger than the network's input is
    cut into input-size tiles (no resizing, so nuclei keep their size in pixels), each tile is
    scored, and the window's cellularity is the tiles' scores weighted by their nuclear area
    (1 - background), which is how the proxy combines over areas."""

    def __init__(self, path: Path):
        from wsiseg.cellularity.cnn import MapCNNRegressor

        self.model = MapCNNRegressor.load(path)
        self.size = int(self.model.input_size)
        self.backend = "torch"

    # OpenVINO runs this CNN 1.46-1.88x faster than torch on the CPUs measured (scores within
    # 2e-7) but costs 1.3-1.5 s to compile: it paid from about 115 windows of 512 px on the first
    # machine (benchmarks/results/cellularity_stage_cpu.json) and from about 66 on the second
    # (an 8k x 8k slide, 225 windows: torch 9.91 s, OpenVINO 5.27 s + 1.37 s to compile;
    # benchmarks/results/cellularity_stage_8k_cpu_2026-12-02.json), so :meth:`prepare` switches from 100.
    OPENVINO_FROM_WINDOWS = 100

    def prepare(self, n_windows: int) -> None:
        """Before scoring ``n_windows`` windows: on the CPU, for enough of them, OpenVINO float32 when
        it is installed and gives the torch network's outputs on a probe batch; else torch."""
        if self.backend != "torch" or n_windows < self.OPENVINO_FROM_WINDOWS or \
                not str(self.model.device_).startswith("cpu"):
            return
        import torch

        from wsiseg.predict import OpenVINONet, _same_outputs, openvino_available

        if not openvino_available():
            return
        net = self.model.model_.eval()
        try:
            ov = OpenVINONet(net, torch.get_num_threads(), in_channels=self.model.in_chans)
            _same_outputs(net, ov, self.size // 2, in_channels=self.model.in_chans)
        except ValueError as e:
            log.info("map CNN stays on torch: %s", e)
            return
        self.model.model_, self.backend = ov, "openvino"

    def predict(self, maps: list[np.ndarray]) -> np.ndarray:
        s = self.size
        tiles, owner, weight = [], [], []
        bg = CLASS_INPUTS.index("background")
        for i, m in enumerate(maps):
            m = pad_to(m, s)
            H, W = m.shape[1:]
            for y in range(0, H - s + 1, s) if H >= s else [0]:
                for x in range(0, W - s + 1, s) if W >= s else [0]:
                    t = m[:, y:y + s, x:x + s]
                    tiles.append(t)
                    owner.append(i)
                    weight.append(float((1.0 - t[bg]).sum()))
        p = np.asarray(self.model.predict(np.stack(tiles)), dtype=np.float64)
        owner, weight = np.asarray(owner), np.asarray(weight)
        out = np.zeros(len(maps))
        for i in range(len(maps)):
            sel = owner == i
            w = weight[sel]
            out[i] = float(np.average(p[sel], weights=w)) if w.sum() > 1e-6 else float(p[sel].mean())
        return out


def _find(name: str, suffixes: tuple[str, ...]) -> Path | None:
    from wsiseg.models.registry import WEIGHTS_DIR

    p = Path(name)
    for base in (p, WEIGHTS_DIR / p.name):
        for suf in suffixes:
            c = base if base.suffix == suf else base.with_name(base.name + suf)
            if c.is_file() and c.with_suffix(".json").is_file():
                return c
    return None


@functools.lru_cache(maxsize=8)
def load_regressor(kind: str, name: str):
    """A regressor by kind (``lgbm`` | ``cnn``) and shipped name or path; None when absent."""
    if kind == "lgbm":
        path = _find(name, (".txt",))
        return _LGBM(path) if path else None
    if kind == "cnn":
        path = _find(name, (".safetensors",))
        return _CNN(path) if path else None
    raise ValueError(f"unknown regressor kind {kind!r} (lgbm or cnn)")


def score_map(out_dir: Path, regressors: dict[str, str] | None = None, window: int = 512,
              stride: int | None = None, min_tissue: float = 0.05, batch: int = 16) -> dict:
    """Score the finished map in ``out_dir/probabilities.zarr``; writes the CSV/Parquet and heatmap.

    Returns the slide-level summary (for ``summary.json``). Models without the class channels
    are skipped with ``status: skipped`` and the reason.
    """
    import zarr

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    regressors = DEFAULT_REGRESSORS if regressors is None else regressors
    group = zarr.open_group(str(out_dir / "probabilities.zarr"), mode="r")
    attrs = dict(group.attrs["wsiseg"])
    channels = [c.lower() for c in attrs["classes"]]
    missing = [c for c in CLASS_INPUTS if c not in channels]
    if missing:
        return {"status": "skipped", "reason": f"model {attrs.get('model')} has no {', '.join(missing)} channels"}
    models = {}
    for kind, name in regressors.items():
        m = load_regressor(kind, name)
        if m is None:
            log.warning("cellularity regressor %s (%s) not found: column cellularity_%s left out", name, kind, kind)
        else:
            models[kind] = m
    if not models:
        return {"status": "skipped", "reason": "no cellularity regressor found"}
    level0 = group["0"]
    H, W = level0.shape[1:]
    idx = [channels.index(c) for c in CLASS_INPUTS]
    wins = window_grid((H, W), window, stride)
    tissue_png = out_dir / "tissue.png"
    if tissue_png.is_file():
        from PIL import Image

        mask = np.asarray(Image.open(tissue_png)) > 0
        frac = tissue_fractions(mask, (H, W), wins)
    else:
        frac = np.ones(len(wins))
    chosen = [Window(y, x, h, w, float(f)) for (y, x, h, w), f in zip(wins, frac) if f >= min_tissue]
    preds = {k: np.zeros(len(chosen)) for k in models}
    for model in models.values():
        if hasattr(model, "prepare"):
            model.prepare(len(chosen))
    for s in range(0, len(chosen), batch):
        part = chosen[s:s + batch]
        maps = []
        for wd in part:
            maps.append(level0[:, wd.y:wd.y + wd.h, wd.x:wd.x + wd.w][idx].astype(np.float32) / 255.0)
        for k, model in models.items():
            preds[k][s:s + len(part)] = model.predict(maps)
    scale = float(attrs.get("scale_from_level0", 1.0))
    rows = []
    for i, wd in enumerate(chosen):
        r = {"x": int(round(wd.x * scale)), "y": int(round(wd.y * scale)),
             "width": int(round(wd.w * scale)), "height": int(round(wd.h * scale)),
             "tissue_fraction": round(wd.tissue, 4)}
        for k in models:
            r[f"cellularity_{k}"] = round(float(preds[k][i]), 4)
        rows.append(r)
    _write_table(out_dir, rows, [f"cellularity_{k}" for k in models])
    heat = _heatmap(out_dir, chosen, preds, (H, W), attrs)
    summary = {"status": "ok" if chosen else "no_tissue", "windows": len(chosen), "window_px": window,
               "stride_px": stride or window, "window_um": round(window * float(attrs["mpp"]), 1),
               "min_tissue": min_tissue, "regressors": {k: regressors[k] for k in models},
               "seconds": round(time.perf_counter() - t0, 3), "heatmap": heat}
    if "cnn" in models:
        summary["cnn_backend"] = models["cnn"].backend
    for k in models:
        p = preds[k]
        if len(p):
            w = np.array([wd.tissue for wd in chosen])
            summary[f"cellularity_{k}"] = {"tissue_weighted_mean": round(float(np.average(p, weights=w)), 4),
                                          "median": round(float(np.median(p)), 4),
                                          "p90": round(float(np.percentile(p, 90)), 4)}
    return summary


def _write_table(out_dir: Path, rows: list[dict], cols: list[str]) -> None:
    fields = ["x", "y", "width", "height", "tissue_fraction", *cols]
    tmp = out_dir / "cellularity.csv.tmp"
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    tmp.replace(out_dir / "cellularity.csv")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    table = pa.table({k: [r[k] for r in rows] for k in fields})
    pq.write_table(table, out_dir / "cellularity.parquet")


HEATMAP_PX = 1024  # the heatmap's longer side at most (the thumbnail is reduced to it)


def _heatmap(out_dir: Path, wins: list[Window], preds: dict, shape, attrs) -> str | None:
    """Cellularity over the thumbnail (magma, 55% opaque, unscored areas left as they are), a
    colour bar and a title -> heatmap.png (None without a thumbnail). Drawn with OpenCV: the
    matplotlib figure this replaced took a fifth of the stage's time on the sample slide."""
    import cv2
    from PIL import Image

    thumb_path = out_dir / "thumbnail.png"
    if not thumb_path.is_file():
        return None
    thumb = np.asarray(Image.open(thumb_path).convert("RGB"))
    th, tw = thumb.shape[:2]
    f = min(1.0, HEATMAP_PX / max(th, tw))
    if f < 1:
        th, tw = max(1, round(th * f)), max(1, round(tw * f))
        thumb = cv2.resize(thumb, (tw, th), interpolation=cv2.INTER_AREA)
    H, W = shape
    kind = "lgbm" if "lgbm" in preds else next(iter(preds))
    val = np.full((th, tw), np.nan, np.float32)
    # later windows overwrite earlier ones only where they were not yet scored: the grid's
    # regular windows come first, edge windows moved inward fill what is left.
    for wd, p in zip(wins, preds[kind]):
        y0, y1 = int(wd.y * th / H), int(np.ceil((wd.y + wd.h) * th / H))
        x0, x1 = int(wd.x * tw / W), int(np.ceil((wd.x + wd.w) * tw / W))
        region = val[y0:y1, x0:x1]
        region[np.isnan(region)] = p

    def magma(v: np.ndarray) -> np.ndarray:  # [0, 1] -> RGB uint8
        u8 = np.round(np.clip(np.nan_to_num(v), 0, 1) * 255).astype(np.uint8)
        return cv2.applyColorMap(u8, cv2.COLORMAP_MAGMA)[..., ::-1]

    scored = ~np.isnan(val)
    img = thumb.copy()
    img[scored] = np.round(0.45 * thumb[scored] + 0.55 * magma(val)[scored]).astype(np.uint8)
    top, bar_w, right = 28, 16, 64
    canvas = np.full((th + top + 8, tw + right, 3), 255, np.uint8)
    canvas[top:top + th, :tw] = img
    grad = np.linspace(1, 0, th, dtype=np.float32)[:, None].repeat(bar_w, 1)
    x_bar = tw + 10
    canvas[top:top + th, x_bar:x_bar + bar_w] = magma(grad)
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    for v in (0.0, 0.5, 1.0):
        y = top + int(round((1 - v) * (th - 1)))
        cv2.line(canvas, (x_bar + bar_w, y), (x_bar + bar_w + 4, y), black, 1)
        cv2.putText(canvas, f"{v:g}", (x_bar + bar_w + 6, min(max(y + 4, top + 8), top + th)), font, 0.35, black, 1,
                    cv2.LINE_AA)
    title = (f"tumour cellularity ({kind}, {wins[0].h if wins else 0} px windows at "
             f"{float(attrs['mpp']):.2f} um/px)")
    cv2.putText(canvas, title, (4, 18), font, 0.45, black, 1, cv2.LINE_AA)
    Image.fromarray(canvas).save(out_dir / "heatmap.png")
    return "heatmap.png"
