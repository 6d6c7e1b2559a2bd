"""Finished run folders, opened read-only for the viewer.

Two frames meet here. **Slide level-0 px** is the frame of the slide, ``wsiseg.cellularity.csv`` and
``nuclei.geojson``, and of every coordinate the page sends or receives. **Stored px** is the
frame of ``probabilities.zarr`` and its label image at level 0 (the model's resolution):
stored pixel (y, x) covers slide pixels ``[y * s, (y + 1) * s) x [x * s, (x + 1) * s)`` with
``s = wsiseg.scale_from_level0``; level k of a pyramid is level 0 downsampled by ``2 ** k``.
Probability tiles are read chunk by chunk, never a whole level.
"""
from __future__ import annotations

import csv
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zarr

from wsiseg.instances import GEOJSON_NAME, LABEL_NAME
from wsiseg.viewer.nuclei import NucleusIndex

SUMMARY = "summary.json"
MAP = "probabilities.zarr"
CELLULARITY = "cellularity.csv"
MAP_TILE = 512  # overlay tile side in stored px of its level (the Zarr chunk, so one chunk per tile)
SLIDE_TILE, SLIDE_OVERLAP = 254, 1  # deep-zoom tiles of the slide (OpenSlide's defaults)
COLORMAPS = ("channel", "magma", "viridis", "turbo")  # "channel": the channel's colour, alpha = p


class ViewerError(Exception):
    """A problem the user can act on (a missing folder, no run in it); one line, names the path."""


def find_runs(out: Path) -> list[Path]:
    """``out`` itself if it is a finished run folder (it has ``summary.json``), else the finished run
    folders directly inside it, by name. Raises :class:`ViewerError` when there are none."""
    if not out.exists():
        raise ViewerError(f"{out}: no such folder; give the output folder of `wsiseg run` (-o OUT) or one of its run folders")
    if not out.is_dir():
        raise ViewerError(f"{out}: is a file; give the output folder of `wsiseg run` (-o OUT) or one of its run folders")
    if (out / SUMMARY).is_file():
        return [out]
    children = sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: p.name)
    runs = [p for p in children if (p / SUMMARY).is_file()]
    if not runs:
        partial = [p.name for p in children if (p / MAP).is_dir()]
        hint = (f" ({len(partial)} unfinished: {', '.join(partial[:3])}{'...' if len(partial) > 3 else ''}; "
                "run the same `wsiseg run` command again to finish them)") if partial else ""
        raise ViewerError(f"{out}: no finished wsiseg run folder in it (a folder with {SUMMARY}){hint}")
    return runs


def _hex_rgb(s: str) -> tuple[int, int, int]:
    s = (s or "FF0000").lstrip("#")
    try:
        return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)
    except (ValueError, IndexError):
        return 255, 0, 0


def colormap_lut(name: str, rgb: tuple[int, int, int]) -> np.ndarray:
    """(256, 4) uint8 RGBA per stored value v (p = v / 255). ``channel``: the channel's colour
    with alpha v, so a tile's alpha is the stored map itself; a Matplotlib map: opaque."""
    if name == "channel":
        lut = np.zeros((256, 4), np.uint8)
        lut[:, :3] = rgb
        lut[:, 3] = np.arange(256)
        return lut
    from matplotlib import colormaps

    return np.round(colormaps[name](np.arange(256) / 255.0) * 255).astype(np.uint8)


def encode_png(rgba: np.ndarray) -> bytes:
    """(h, w, 4) RGBA uint8 -> PNG bytes (fast zlib level)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class Channel:
    index: int
    label: str
    rgb: tuple[int, int, int]


class SlideTiles:
    """The original slide as deep-zoom tiles (OpenSlide's ``DeepZoomGenerator``; plain images
    through openslide's ``ImageSlide``, i.e. PIL). Level-0 px of the slide = the deep-zoom's
    finest level (``limit_bounds=False``)."""

    def __init__(self, path: Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        self.path = path
        self._slide = openslide.open_slide(str(path))
        self._lock = threading.Lock() if isinstance(self._slide, openslide.ImageSlide) else None  # PIL: one at a time
        self._dz = DeepZoomGenerator(self._slide, tile_size=SLIDE_TILE, overlap=SLIDE_OVERLAP, limit_bounds=False)
        self.dimensions = tuple(self._slide.dimensions)  # (width, height) level-0 px
        self.kind = "image" if self._lock is not None else "slide"

    def dzi(self) -> str:
        return self._dz.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of a deep-zoom tile; ValueError for a tile that does not exist."""
        import io

        if not (0 <= level < self._dz.level_count):
            raise ValueError(f"no deep-zoom level {level}")
        cols, rows = self._dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"no tile {col}_{row} at level {level}")
        if self._lock is not None:
            with self._lock:
                im = self._dz.get_tile(level, (col, row))
        else:
            im = self._dz.get_tile(level, (col, row))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=85)
        return buf.getvalue()

    def close(self) -> None:
        self._slide.close()


class CellularityTable:
    """``wsiseg.cellularity.csv``: windows in slide level-0 px (``x, y, width, height``), their tissue
    fraction and one ``cellularity_*`` column per regressor (NaN where empty)."""

    def __init__(self, path: Path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = list(rows[0].keys()) if rows else []
        self.regressors = [c[len("cellularity_"):] for c in cols if c.startswith("cellularity_")]

        def num(s: str) -> float:
            try:
                return float(s)
            except (TypeError, ValueError):
                return math.nan

        self.boxes = np.array([[num(r["x"]), num(r["y"]), num(r["width"]), num(r["height"])] for r in rows],
                              np.float64).reshape(-1, 4)
        self.tissue = np.array([num(r.get("tissue_fraction")) for r in rows], np.float64)
        self.values = {k: np.array([num(r[f"cellularity_{k}"]) for r in rows], np.float64) for k in self.regressors}

    def as_json(self) -> dict:
        def clean(a: np.ndarray) -> list:
            return [None if not math.isfinite(v) else round(float(v), 4) for v in a]

        return {"regressors": self.regressors, "boxes": self.boxes.astype(int).tolist(),
                "tissue_fraction": clean(self.tissue), "values": {k: clean(v) for k, v in self.values.items()}}

    def at(self, x: float, y: float) -> dict | None:
        """The window holding level-0 point (x, y) (the one whose centre is nearest, where windows
        overlap), or None."""
        b = self.boxes
        inside = np.flatnonzero((b[:, 0] <= x) & (x < b[:, 0] + b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 1] + b[:, 3]))
        if not len(inside):
            return None
        cx, cy = b[inside, 0] + b[inside, 2] / 2, b[inside, 1] + b[inside, 3] / 2
        i = int(inside[np.argmin((cx - x) ** 2 + (cy - y) ** 2)])
        vals = {k: (None if not math.isfinite(v[i]) else round(float(v[i]), 4)) for k, v in self.values.items()}
        return {"window": b[i].astype(int).tolist(), "tissue_fraction": round(float(self.tissue[i]), 4),
                "cellularity": vals}


class Run:
    """One finished run folder: the slide's tiles, the probability pyramid, the label image, the
    nuclei and the cellularity windows, each optional but the summary and the map. Opened once at
    start-up; the nuclei are read on first use (a large GeoJSON takes a while)."""

    def __init__(self, folder: Path, name: str, slide_dirs: tuple[Path, ...] = ()):
        self.folder = folder
        self.name = name
        try:
            self.summary = json.loads((folder / SUMMARY).read_text())
        except (OSError, ValueError) as e:
            raise ViewerError(f"{folder / SUMMARY}: cannot be read ({e})") from None
        try:
            g = zarr.open_group(str(folder / MAP), mode="r")
            attrs = dict(g.attrs)
            self.levels = [g[d["path"]] for d in attrs["multiscales"][0]["datasets"]]
        except Exception as e:  # any damage to the store: this run cannot be shown
            raise ViewerError(f"{folder / MAP}: not a readable wsiseg probability map ({type(e).__name__}: {e})") from None
        meta = attrs.get("wsiseg", {})
        self.scale = float(meta.get("scale_from_level0", 1.0))
        self.mpp = float(meta.get("mpp") or self.summary.get("mpp") or 0) or None
        self.slide_mpp = float(meta.get("slide_mpp") or self.summary.get("slide_mpp") or 0) or None
        omero = (attrs.get("omero") or {}).get("channels") or []
        n_ch = self.levels[0].shape[0]
        self.channels = [Channel(i, str(omero[i].get("label", f"channel {i}")) if i < len(omero) else f"channel {i}",
                                 _hex_rgb(omero[i].get("color", "FF0000") if i < len(omero) else "FF0000"))
                         for i in range(n_ch)]
        self.labels = None
        if (folder / MAP / "labels" / LABEL_NAME).is_dir():
            try:
                self.labels = zarr.open_group(str(folder / MAP / "labels" / LABEL_NAME), mode="r")["0"]
            except Exception:  # an unfinished or damaged label image: read-out without ids from it
                self.labels = None
        self.cellularity = CellularityTable(folder / CELLULARITY) if (folder / CELLULARITY).is_file() else None
        self._geojson = folder / GEOJSON_NAME
        self._nuclei: NucleusIndex | None = None
        self.nuclei_note = ""
        self._nuclei_lock = threading.Lock()
        self.slide, self.slide_note = None, ""
        path = self._slide_path(slide_dirs)
        if path is None:
            self.slide_note = f"slide {self.summary.get('input')!r} not found; showing the results alone"
        else:
            try:
                self.slide = SlideTiles(path)
            except Exception as e:  # unreadable now: the results can still be shown
                self.slide_note = f"slide {path} cannot be opened ({type(e).__name__}: {e})"
        h0, w0 = self.levels[0].shape[1:]
        self.dimensions = self.slide.dimensions if self.slide else tuple(
            meta.get("slide_dimensions") or (round(w0 * self.scale), round(h0 * self.scale)))

    def _slide_path(self, slide_dirs: tuple[Path, ...]) -> Path | None:
        """The input slide: the path in ``summary.json`` (as given to ``wsiseg run``: absolute, or
        relative to where it ran, tried from here and beside the run folder's parent), else a file
        of that name in one of ``slide_dirs``."""
        given = self.summary.get("input")
        if not given:
            return None
        p = Path(given)
        candidates = [p] if p.is_absolute() else [p, self.folder.parent.parent / p, self.folder.parent / p]
        candidates += [Path(d) / p.name for d in slide_dirs]
        return next((c for c in candidates if c.is_file()), None)

    @property
    def input_name(self) -> str:
        """The input slide's file name, as ``summary.json`` records it."""
        return Path(str(self.summary.get("input", ""))).name

    @property
    def nuclei(self) -> NucleusIndex | None:
        """The nuclei of ``nuclei.geojson``, read on first use; None without one, or when it
        cannot be read (then ``nuclei_note`` says why)."""
        with self._nuclei_lock:
            if self._nuclei is None and not self.nuclei_note and self._geojson.is_file():
                try:
                    self._nuclei = NucleusIndex.read(self._geojson)
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # not wsiseg's GeoJSON
                    self.nuclei_note = f"{self._geojson}: cannot be read as GeoJSON features ({type(e).__name__}: {e})"
            return self._nuclei

    def close(self) -> None:
        """Close the slide; the run then serves its results without it. Idempotent."""
        slide, self.slide = self.slide, None
        if slide is not None:
            slide.close()

    # -- what the page asks for ---------------------------------------------------------------

    def info(self) -> dict:
        """Everything the page needs to lay out this run (sizes in slide level-0 px)."""
        s = self.summary
        h0, w0 = self.levels[0].shape[1:]
        nuc = self.nuclei
        cell = s.get("cellularity") or {}
        means = {k[len("cellularity_"):]: v.get("tissue_weighted_mean") for k, v in cell.items()
                 if k.startswith("cellularity_") and isinstance(v, dict)}
        return {
            "name": self.name,
            "input": self.input_name,
            "slide": {"available": self.slide is not None, "kind": self.slide.kind if self.slide else None,
                      "note": "; ".join(n for n in (self.slide_note, self.nuclei_note) if n)},
            "dimensions": list(self.dimensions),
            "slide_mpp": self.slide_mpp,
            "map": {"mpp": self.mpp, "scale_from_level0": self.scale, "width": w0, "height": h0,
                    "levels": len(self.levels), "tile": MAP_TILE,
                    "channels": [{"index": c.index, "label": c.label, "color": list(c.rgb)} for c in self.channels]},
            "labels": self.labels is not None,
            "nuclei": None if nuc is None else {"count": len(nuc), "types": [
                {"name": n, "color": c, "count": k} for n, c, k in zip(nuc.type_names, nuc.type_colors, nuc.type_counts())]},
            "cellularity": None if self.cellularity is None else {
                "regressors": self.cellularity.regressors, "windows": len(self.cellularity.boxes),
                "tissue_weighted_mean": means},
            "summary": {
                "model": s.get("model"), "backend": s.get("backend"), "device": s.get("device"), "mpp": s.get("mpp"),
                "slide_mpp": s.get("slide_mpp"), "tiles_total": s.get("tiles_total"),
                "tiles_with_tissue": s.get("tiles_with_tissue"), "seconds": (s.get("seconds") or {}).get("total"),
                "tiles_per_second": s.get("tiles_per_second"), "status": s.get("status"),
                "tissue_fraction": s.get("tissue_fraction"), "version": s.get("wsiseg_version"),
            },
        }

    def map_tile(self, channel: int, level: int, col: int, row: int) -> np.ndarray:
        """Stored values (h, w) uint8 of one overlay tile: level ``level`` of the pyramid,
        ``[row * MAP_TILE, ...) x [col * MAP_TILE, ...)`` in that level's px (edge tiles are
        smaller). Reads the chunk(s) under the tile only. ValueError outside the pyramid."""
        if not (0 <= channel < len(self.channels)) or not (0 <= level < len(self.levels)):
            raise ValueError("no such channel or level")
        arr = self.levels[level]
        h, w = arr.shape[1:]
        y0, x0 = row * MAP_TILE, col * MAP_TILE
        if row < 0 or col < 0 or y0 >= h or x0 >= w:
            raise ValueError("tile outside the map")
        return np.asarray(arr[channel, y0:min(h, y0 + MAP_TILE), x0:min(w, x0 + MAP_TILE)])

    def map_tile_png(self, channel: int, level: int, col: int, row: int, cmap: str) -> bytes:
        if cmap not in COLORMAPS:
            raise ValueError(f"unknown colour map {cmap!r}")
        lut = colormap_lut(cmap, self.channels[channel].rgb if 0 <= channel < len(self.channels) else (0, 0, 0))
        return encode_png(lut[self.map_tile(channel, level, col, row)])

    def at(self, x: float, y: float) -> dict:
        """The read-out at slide level-0 point (x, y): each channel's probability (stored value /
        255 at the stored pixel holding it), the cellularity window and the nucleus there."""
        out: dict = {"x": int(math.floor(x)), "y": int(math.floor(y))}
        h0, w0 = self.levels[0].shape[1:]
        sx, sy = int(math.floor(x / self.scale)), int(math.floor(y / self.scale))
        inside = 0 <= sx < w0 and 0 <= sy < h0
        out["stored_px"] = [sx, sy] if inside else None
        if inside:
            vals = np.asarray(self.levels[0][:, sy, sx]).astype(int).tolist()
            out["probabilities"] = {c.label: round(v / 255, 4) for c, v in zip(self.channels, vals)}
            out["stored_values"] = {c.label: v for c, v in zip(self.channels, vals)}
        out["cellularity"] = self.cellularity.at(x, y) if self.cellularity else None
        nucleus = None
        nuc = self.nuclei
        if inside and self.labels is not None:
            lab = int(self.labels[0, sy, sx])
            if lab:
                row = nuc.row_of_label(lab) if nuc is not None else None
                nucleus = nuc.describe(row) if row is not None else {"id": lab, "type": None, "area_um2": None}
        elif nuc is not None:
            row = nuc.row_at(x, y)
            nucleus = nuc.describe(row) if row is not None else None
        out["nucleus"] = nucleus
        return out

    def outlines(self, x0: float, y0: float, x1: float, y1: float, limit: int) -> dict:
        """Nuclei whose bounding box meets the level-0 box, at most ``limit`` of them."""
        nuc = self.nuclei
        if nuc is None:
            return {"count": 0, "truncated": False, "features": []}
        rows = nuc.in_box(x0, y0, x1, y1)
        truncated = len(rows) > limit
        return {"count": int(len(rows)), "truncated": truncated,
                "features": [] if truncated else nuc.outlines(rows)}


def open_runs(out: Path, slide_dirs: tuple[Path, ...] = ()) -> tuple[dict[str, Run], list[str]]:
    """The runs under ``out`` by name, and one warning line per run folder that could not be
    opened. Raises :class:`ViewerError` when none can be shown."""
    runs, warnings = {}, []
    for folder in find_runs(out):
        try:
            run = Run(folder, folder.name, slide_dirs)
        except ViewerError as e:
            warnings.append(str(e))
            continue
        runs[run.name] = run
        if run.slide_note:
            warnings.append(f"{folder}: {run.slide_note}")
    if not runs:
        raise ViewerError(f"{out}: no run folder could be opened: " + "; ".join(warnings))
    return runs, warnings
