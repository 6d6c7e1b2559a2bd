"""Large pyramidal tiled-JPEG TIFF slides built from real H&E pixels, streamed tile by tile.

No public multi-gigapixel slide is available offline, so benchmarks build their own from the real
images in ``../shared/data``: the 30 MoNuSeg 2018 training images (1000 x 1000 px, 0.25 um/px,
7 organs) and 250 um crops of ``CMU-1-Small-Region.svs`` (0.499 um/px). The slide is a mosaic of
square cells of 250 um (1000 px at 0.25 um/px); each cell shows one source image, resampled to the
slide's resolution and turned by one of the 8 flips/rotations, chosen by a seeded hash of the
cell's position. A few smooth blobs of tissue sit on white glass (``--tissue`` sets roughly what
fraction of the area is tissue), so the tissue mask decides which tiles are inferred.

Nothing of slide size is ever held in memory: each pyramid level is rendered band by band (one
row of TIFF tiles at a time) from the small source images and handed to ``tifffile`` as a tile
iterator, so a 100k x 100k px slide needs a few hundred MB of RAM. Every level is rendered from
the sources (not from the level above), so levels agree up to resampling.

File layout (what OpenSlide opens as ``generic-tiff``): one page per level, level 0 first
(subfiletype 0, then 1 = reduced resolution), tiled (``--tile``, default 256), JPEG (YCbCr 4:2:0,
quality 90, like Aperio SVS), resolution tags in centimetres so OpenSlide reports
``openslide.mpp-x``/``mpp-y``, levels downsampled by 2 or 4 (``--downsample``) until the longer
side is at most 2048 px; BigTIFF when the raw pixels exceed 2 GiB (or ``--bigtiff yes``).

Usage::

    python benchmarks/tools/make_slide.py --size 30000 -o benchmarks/out/slides/mosaic-30k.tif
    python benchmarks/tools/make_slide.py --size 100000 --downsample 4 -o /tmp/big.tif   # ~2-4 GB file
    python benchmarks/tools/make_slide.py --size 8000x6000 --mpp 0.5 -o /tmp/small.tif --workers 1

The file is checked after writing (``--no-verify`` skips it): OpenSlide must report vendor
``generic-tiff`` and an mpp, and ``wsiseg.slide.open_slide`` + ``ScaledView`` must read tissue
from it. Pixels: MoNuSeg is CC BY-NC-SA 4.0 (research, non-commercial); the CMU slide is CC0.
Keep generated slides out of git (``benchmarks/out/`` is ignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
CELL_UM = 250.0  # a MoNuSeg image: 1000 px at 0.25 um/px
BACKGROUND = (243, 242, 244)  # clean glass after white balance
MAX_TOP_LEVEL = 2048  # the smallest level's longer side is at most this


# ----------------------------------------------------------------------------- sources


def load_sources(data_dir: Path, which: str = "both") -> list[tuple[str, np.ndarray, float]]:
    """Real H&E images as (name, RGB uint8 (h, w, 3), um/px), each covering about 250 x 250 um.

    ``which``: ``monuseg`` (30 images, 0.25 um/px), ``cmu`` (the 501 px crops of
    CMU-1-Small-Region.svs, 0.499 um/px, that are at least a quarter tissue) or ``both``.
    """
    from PIL import Image

    out: list[tuple[str, np.ndarray, float]] = []
    if which in ("monuseg", "both"):
        img_dir = data_dir / "monuseg" / "train" / "images"
        for p in sorted(img_dir.glob("*.png")):
            out.append((p.stem, np.asarray(Image.open(p).convert("RGB")), 0.25))
    if which in ("cmu", "both"):
        svs = data_dir / "slides" / "CMU-1-Small-Region.svs"
        if not svs.exists():
            svs = REPO / "wsiseg" / "data" / "CMU-1-Small-Region.svs"
        if svs.exists():
            import openslide

            with openslide.OpenSlide(str(svs)) as s:
                mpp = float(s.properties.get(openslide.PROPERTY_NAME_MPP_X, 0.499))
                w, h = s.dimensions
                rgb = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
            c = int(round(CELL_UM / mpp))
            for y in range(0, h - c + 1, c):
                for x in range(0, w - c + 1, c):
                    crop = np.ascontiguousarray(rgb[y : y + c, x : x + c])
                    sat = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)[..., 1]
                    if (sat > 20).mean() >= 0.25:  # mostly-blank crops would only add glass
                        out.append((f"CMU-1-Small-Region[{y}:{x}]", crop, mpp))
    if not out:
        raise SystemExit(
            f"make_slide: no source images under {data_dir} (expected monuseg/train/images/*.png "
            "and/or slides/CMU-1-Small-Region.svs); give the folder with --data"
        )
    return out


# ----------------------------------------------------------------------------- layout


def _hash(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(np.asarray(parts, np.int64).tobytes(), digest_size=8).digest(), "little")


def _dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square image (a view)."""
    img = np.rot90(img, t % 4)
    return img[:, ::-1] if t >= 4 else img


def tissue_field(width: int, height: int, fraction: float, seed: int, size: int = 1024) -> np.ndarray:
    """Smooth float32 field (h, w) on a coarse grid (longer side ``size``): tissue where > 0.

    A few rotated ellipses with wavy borders; the threshold is chosen so about ``fraction`` of
    the area is tissue. Upsampled linearly per band, its zero contour gives smooth tissue borders.
    """
    rng = np.random.default_rng(seed)
    s = size / max(width, height)
    gw, gh = max(8, round(width * s)), max(8, round(height * s))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    yy, xx = yy / max(gw, gh), xx / max(gw, gh)  # isotropic units
    f = np.full((gh, gw), -np.inf, np.float32)
    n = int(rng.integers(3, 6))
    for _ in range(n):
        cy, cx = rng.uniform(0.15, 0.85) * gh / max(gw, gh), rng.uniform(0.15, 0.85) * gw / max(gw, gh)
        a, b = rng.uniform(0.12, 0.35), rng.uniform(0.08, 0.25)
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(th) + dy * np.sin(th)) / a
        v = (-dx * np.sin(th) + dy * np.cos(th)) / b
        ang = np.arctan2(v, u)
        wobble = 1 + 0.12 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.07 * np.sin(7 * ang + rng.uniform(0, 6.3))
        f = np.maximum(f, 1 - np.sqrt(u * u + v * v) / wobble)
    f = cv2.GaussianBlur(f, (0, 0), 2)
    thr = float(np.quantile(f, 1 - min(max(fraction, 0.0), 1.0))) if 0 < fraction < 1 else (-np.inf if fraction >= 1 else np.inf)
    return (f - thr).astype(np.float32)


@dataclass
class Mosaic:
    """The slide's content, renderable at any pyramid level and band."""

    width: int  # level-0 px
    height: int
    mpp: float  # level-0 um/px
    sources: list[tuple[str, np.ndarray, float]]
    field: np.ndarray  # tissue_field()
    seed: int = 0

    @property
    def cell(self) -> float:
        """Cell side in level-0 px."""
        return CELL_UM / self.mpp

    def sources_at(self, d: float) -> list[np.ndarray]:
        """Each source resampled to one cell at downsample ``d`` (square, ceil(cell / d) px)."""
        side = max(1, math.ceil(self.cell / d))
        out = []
        for _, img, _ in self.sources:
            h, w = img.shape[:2]
            interp = cv2.INTER_AREA if side < min(h, w) else cv2.INTER_CUBIC
            out.append(cv2.resize(img, (side, side), interpolation=interp) if (h, w) != (side, side) else img)
        return out

    def render_band(self, srcs: list[np.ndarray], d: float, y0: int, y1: int, width: int) -> np.ndarray:
        """Rows [y0, y1) of the level at downsample ``d`` (level px), all ``width`` columns."""
        band = np.empty((y1 - y0, width, 3), np.uint8)
        cell = self.cell / d
        r0, r1 = int(y0 // cell), int((y1 - 1) // cell)
        ncols = int(math.ceil(width / cell))
        for r in range(r0, r1 + 1):
            cy0, cy1 = int(math.floor(r * cell)), int(math.floor((r + 1) * cell))
            a, b = max(cy0, y0), min(cy1, y1)
            if b <= a:
                continue
            for c in range(ncols):
                cx0, cx1 = int(math.floor(c * cell)), min(width, int(math.floor((c + 1) * cell)))
                if cx1 <= cx0:
                    continue
                h = _hash(self.seed, r, c)
                img = _dihedral(srcs[h % len(srcs)], (h >> 20) % 8)
                band[a - y0 : b - y0, cx0:cx1] = img[a - cy0 : b - cy0, : cx1 - cx0]
        # Tissue where the smooth field is positive; glass elsewhere.
        gh, gw = self.field.shape
        lh, lw = math.ceil(self.height / d), math.ceil(self.width / d)
        fy0 = y0 * gh / lh
        fy1 = y1 * gh / lh
        i0, i1 = max(0, int(math.floor(fy0)) - 1), min(gh, int(math.ceil(fy1)) + 2)
        crop = self.field[i0:i1]
        # Bilinear interpolation of the field at the band's pixel centres, separable: rows first
        # (a few coarse rows), then columns in chunks (cv2.remap is limited to 32k px).
        ys = (np.arange(y0, y1) + 0.5) * gh / lh - 0.5 - i0
        iy = np.clip(np.floor(ys).astype(np.int64), 0, len(crop) - 1)
        iy1 = np.minimum(iy + 1, len(crop) - 1)
        wy = np.clip(ys - iy, 0, 1).astype(np.float32)[:, None]
        rows = crop[iy] * (1 - wy) + crop[iy1] * wy  # (band rows, gw)
        tissue = np.empty((y1 - y0, width), bool)
        for x0 in range(0, width, 8192):
            xs = (np.arange(x0, min(width, x0 + 8192)) + 0.5) * gw / lw - 0.5
            ix = np.clip(np.floor(xs).astype(np.int64), 0, gw - 1)
            ix1 = np.minimum(ix + 1, gw - 1)
            wx = np.clip(xs - ix, 0, 1).astype(np.float32)[None, :]
            tissue[:, x0 : x0 + len(xs)] = (rows[:, ix] * (1 - wx) + rows[:, ix1] * wx) > 0
        band[~tissue] = BACKGROUND
        return band


# ----------------------------------------------------------------------------- writing


def level_shapes(width: int, height: int, downsample: int) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level, down to a longer side <= MAX_TOP_LEVEL px."""
    out = [(width, height, 1)]
    d = 1
    while max(out[-1][:2]) > MAX_TOP_LEVEL:
        d *= downsample
        out.append((math.ceil(width / d), math.ceil(height / d), d))
    return out


def _tiles(mosaic: Mosaic, d: int, lw: int, lh: int, tile: int, progress: bool) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order (edge tiles smaller; tifffile pads them)."""
    srcs = mosaic.sources_at(d)
    rows = math.ceil(lh / tile)
    t0 = time.perf_counter()
    for i in range(rows):
        y0, y1 = i * tile, min(lh, (i + 1) * tile)
        band = mosaic.render_band(srcs, d, y0, y1, lw)
        for x0 in range(0, lw, tile):
            yield band[:, x0 : x0 + tile]
        if progress and (i % 64 == 63 or i == rows - 1):
            el = time.perf_counter() - t0
            print(f"  level downsample {d}: row {i + 1}/{rows} ({el:.0f} s)", file=sys.stderr, flush=True)


def write_slide(path: str | Path, width: int, height: int, mpp: float = 0.25, downsample: int = 2, tile: int = 256,
                tissue: float = 0.55, seed: int = 0, data_dir: Path = DEFAULT_DATA, sources: str = "both",
                quality: int = 90, bigtiff: bool | None = None, workers: int | None = None,
                progress: bool = True) -> dict:
    """Write the slide; returns a description (levels, sizes, seconds, sources used)."""
    import tifffile

    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    if downsample not in (2, 4):
        raise ValueError("downsample must be 2 or 4")
    if tile % 16:
        raise ValueError("tile must be a multiple of 16 (TIFF)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    srcs = load_sources(Path(data_dir), sources)
    # Resample every source to the slide's level-0 resolution once (a 250 um cell each).
    side = max(1, round(CELL_UM / mpp))
    lvl0 = []
    for name, img, smpp in srcs:
        interp = cv2.INTER_AREA if side < img.shape[0] else cv2.INTER_CUBIC
        lvl0.append((name, cv2.resize(img, (side, side), interpolation=interp) if img.shape[0] != side else img, mpp))
    mosaic = Mosaic(width, height, mpp, lvl0, tissue_field(width, height, tissue, seed), seed)
    levels = level_shapes(width, height, downsample)
    raw = sum(w * h * 3 for w, h, _ in levels)
    if bigtiff is None:
        bigtiff = raw > 2**31
    workers = workers if workers is not None else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, (lw, lh, d) in enumerate(levels):
            res = 1e4 / (mpp * d)  # pixels per centimetre
            tw.write(
                _tiles(mosaic, d, lw, lh, tile, progress),
                shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                photometric="rgb", subsampling=(2, 2), compression="jpeg", compressionargs={"level": quality},
                resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
                metadata=None, maxworkers=workers,
                software="wsiseg benchmarks/tools/make_slide.py",
                description=f"wsiseg benchmark mosaic of real H&E (MoNuSeg 2018, CMU-1-Small-Region); mpp={mpp}; seed={seed}",
            )
    os.replace(tmp, path)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "width": width,
        "height": height,
        "mpp": mpp,
        "levels": [[w, h] for w, h, _ in levels],
        "downsamples": [d for *_, d in levels],
        "tile": tile,
        "bigtiff": bool(bigtiff),
        "tissue_fraction_target": tissue,
        "seed": seed,
        "sources": len(srcs),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def verify(path: str | Path, target_mpp: float = 0.5) -> dict:
    """Open the slide with OpenSlide and with wsiseg; raise AssertionError if anything is off."""
    import openslide

    from wsiseg.slide import ScaledView, open_slide
    from wsiseg.tissue import tissue_mask

    with openslide.OpenSlide(str(path)) as s:
        vendor = s.properties.get(openslide.PROPERTY_NAME_VENDOR)
        mpp_x = s.properties.get(openslide.PROPERTY_NAME_MPP_X)
        assert vendor == "generic-tiff", f"{path}: OpenSlide vendor {vendor!r}, expected 'generic-tiff'"
        assert mpp_x not in (None, ""), f"{path}: OpenSlide reports no {openslide.PROPERTY_NAME_MPP_X}"
        info = {"vendor": vendor, "mpp_x": float(mpp_x), "level_count": s.level_count,
                "level_dimensions": [list(d) for d in s.level_dimensions],
                "level_downsamples": [round(d, 3) for d in s.level_downsamples]}
    reader = open_slide(path)
    try:
        view = ScaledView.create(reader, target_mpp)
        thumb = reader.thumbnail(1024)
        mask = tissue_mask(thumb)
        ys, xs = np.nonzero(mask)
        assert len(ys), f"{path}: no tissue found in the thumbnail"
        k = len(ys) // 2
        cy, cx = int(ys[k] * view.shape[0] / mask.shape[0]), int(xs[k] * view.shape[1] / mask.shape[1])
        t = view.read(cy - 128, cx - 128, 256, 256)
        assert t.shape == (256, 256, 3) and t.dtype == np.uint8
        sat = cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1].mean() / 255
        assert sat > 0.05, f"{path}: a tile inside the tissue mask looks blank (saturation {sat:.3f})"
        info.update({"view_level": view.level, "view_factor": view.factor, "view_shape": list(view.shape),
                     "view_mpp": round(view.mpp, 4), "tissue_fraction_thumbnail": round(float(mask.mean()), 3),
                     "tile_saturation": round(float(sat), 3)})
    finally:
        reader.close()
    return info


def parse_size(s: str) -> tuple[int, int]:
    """``30000`` -> (30000, 30000); ``40000x30000`` -> (40000, 30000) (width x height)."""
    s = s.lower().replace("k", "000")
    if "x" in s:
        w, h = s.split("x", 1)
        return int(w), int(h)
    return int(s), int(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, help="level-0 px: N (square), WxH, or e.g. 30k")
    ap.add_argument("-o", "--output", required=True, help="the .tif to write")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 um/px (default 0.25, a 40x scan)")
    ap.add_argument("--downsample", type=int, default=2, choices=[2, 4], help="between pyramid levels")
    ap.add_argument("--tile", type=int, default=256, help="TIFF tile side (px)")
    ap.add_argument("--tissue", type=float, default=0.55, help="about this fraction of the area is tissue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", default="both", choices=["both", "monuseg", "cmu"])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--bigtiff", default="auto", choices=["auto", "yes", "no"])
    ap.add_argument("--workers", type=int, default=None, help="JPEG encoder threads (default: all cores)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    w, h = parse_size(a.size)
    bt = None if a.bigtiff == "auto" else a.bigtiff == "yes"
    info = write_slide(a.output, w, h, a.mpp, a.downsample, a.tile, a.tissue, a.seed, Path(a.data), a.sources,
                       a.quality, bt, a.workers, progress=not a.quiet)
    if not a.no_verify:
        info["verify"] = verify(a.output)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
