"""Slide readers: OpenSlide for whole-slide images, PIL/tifffile for plain images.

All of OpenSlide's quirks (RGBA with a background colour, locations in level-0 pixels and sizes
in level pixels) stay in this module. The rest of the engine sees a :class:`ScaledView`: the
slide at the model's resolution, addressed in *model pixels*, returning RGB uint8 arrays.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm", ".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SAMPLE = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"  # the bundled sample slide (CC0)
INPUT_SUFFIXES = SLIDE_SUFFIXES | IMAGE_SUFFIXES


class SlideError(Exception):
    """An input that cannot be read; the message names the file and what is wrong."""


class SlideReader(Protocol):
    """The small interface the engine needs from any slide or image."""

    path: Path
    mpp: float | None  # um/px of level 0, None when the file does not say
    level_dimensions: list[tuple[int, int]]  # (width, height) per level
    level_downsamples: list[float]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); location in level-0 px, size (w, h) in level px; inside bounds."""

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB uint8 thumbnail whose longer side is at most ``max_size``."""

    def close(self) -> None: ...


def _composite_on_white(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; transparent pixels become the background colour."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    bg = np.asarray(background, dtype=np.uint16)
    out = rgb.astype(np.uint16) + (bg * (255 - alpha.astype(np.uint16))) // 255
    return np.clip(out, 0, 255).astype(np.uint8)


def _raw_reader():
    """openslide-python's own ``openslide_read_region`` binding (with its error check) and its
    ARGB -> RGBA converter, for reading into NumPy buffers; None where this openslide-python does
    not have them (then the PIL path is used)."""
    try:
        from ctypes import POINTER, c_uint32

        from openslide import _convert, lowlevel

        return lowlevel._read_region, _convert.argb2rgba, POINTER(c_uint32)
    except (ImportError, AttributeError):
        return None


class OpenSlideReader:
    """A whole-slide image through OpenSlide (SVS, NDPI, MRXS, generic tiled TIFF, ...)."""

    def __init__(self, path: Path):
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise
        except openslide.OpenSlideError as e:
            raise SlideError(f"{path}: OpenSlide cannot open it, the file looks damaged ({e})") from None
        props = self._slide.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp not in (None, "", "0") else None
        bg = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR) or "FFFFFF"
        self._bg = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4))
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = list(self._slide.level_downsamples)
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self._raw = _raw_reader()
        if self._raw is not None:  # the private binding must give the PIL path's pixels, or is not used
            try:
                top = len(self.level_dimensions) - 1
                w, h = (min(16, d) for d in self.level_dimensions[top])
                for probe in (((0, 0), top, (w, h)), ((-3, -3), top, (w + 6, h + 6))):  # inside; reaching out
                    ref = _composite_on_white(np.asarray(self._slide.read_region(*probe)), self._bg)
                    if not np.array_equal(self._read_raw(*probe), ref):
                        self._raw = None
                        break
            except Exception:  # a changed private API: the public path
                self._raw = None

    def read_region(self, location, level, size):
        import openslide

        try:
            if self._raw is None:
                return _composite_on_white(np.asarray(self._slide.read_region(location, level, size)), self._bg)
            return self._read_raw(location, level, size)
        except openslide.OpenSlideError as e:
            raise SlideError(
                f"{self.path}: reading {size[0]}x{size[1]} px at {location} (level {level}) failed; "
                f"the slide is damaged or truncated ({e})"
            ) from None

    def _read_raw(self, location, level, size) -> np.ndarray:
        """OpenSlide's premultiplied ARGB straight into a NumPy buffer (no ctypes zero-fill, PIL
        image or copies). Opaque regions (the usual case) become RGB in one OpenCV pass; any other
        goes through openslide-python's own ARGB -> RGBA conversion and :func:`_composite_on_white`,
        so the pixels are exactly those of the PIL path."""
        read, to_rgba, ptr_type = self._raw
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            if w < 0 or h < 0:
                raise SlideError(f"{self.path}: negative read size {size}")
            return np.zeros((h, w, 3), np.uint8)
        buf = np.empty((h, w), np.uint32)
        read(self._slide._osr, buf.ctypes.data_as(ptr_type), int(location[0]), int(location[1]), int(level), w, h)
        if buf.min() >= 0xFF000000:  # alpha 255 everywhere: bytes B, G, R, A in memory
            return cv2.cvtColor(buf.view(np.uint8).reshape(h, w, 4), cv2.COLOR_BGRA2RGB)
        to_rgba(buf)
        return _composite_on_white(buf.view(np.uint8).reshape(h, w, 4), self._bg)

    def thumbnail(self, max_size, strip_rows: int = 512, strip_cols: int = 8192):
        """Read the best level for the thumbnail's scale in pieces of ``strip_rows`` rows by
        ``strip_cols`` columns, each shrunk on arrival, so memory holds one piece (and the
        thumbnail), never a whole level or a row of it (a 4x level of a 100k px slide would be
        2.5 GB as RGBA). A level at most ``strip_cols`` wide is read in whole-width strips."""
        w, h = self.level_dimensions[0]
        s = max(w, h) / max_size
        level = self._slide.get_best_level_for_downsample(max(s, 1.0))
        lw, lh = self.level_dimensions[level]
        f = max(1.0, max(lw, lh) / max_size)
        tw, th = max(1, round(lw / f)), max(1, round(lh / f))
        d = self.level_downsamples[level]

        def cuts(n: int, step: int, t: int) -> list[tuple[int, int, int, int]]:
            """[a, b) of the level and the [oa, ob) of the thumbnail it is shrunk to, per step."""
            return [(a, min(n, a + step), round(a / f), round(min(n, a + step) / f) if a + step < n else t)
                    for a in range(0, n, step)]

        cols = cuts(lw, lw if lw <= strip_cols else strip_cols, tw)
        out = np.zeros((th, tw, 3), np.uint8)
        for y0, y1, oy0, oy1 in cuts(lh, strip_rows, th):
            if oy1 <= oy0:
                continue
            for x0, x1, ox0, ox1 in cols:
                if ox1 <= ox0:
                    continue
                region = self.read_region((round(x0 * d), round(y0 * d)), level, (x1 - x0, y1 - y0))
                out[oy0:oy1, ox0:ox1] = (cv2.resize(region, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                                         if f > 1 else region)
        return out

    def close(self):
        self._slide.close()


class ImageReader:
    """A plain image (PNG, JPEG, TIFF) held in memory as a single-level slide."""

    def __init__(self, path: Path, image: np.ndarray, mpp: float | None):
        self.path = path
        self._img = image
        self.mpp = mpp
        h, w = image.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.vendor = "image"

    @classmethod
    def open(cls, path: Path) -> "ImageReader":
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = None  # large plain images are legitimate input
        try:
            with warnings.catch_warnings(), Image.open(path) as im:
                warnings.simplefilter("ignore")
                mpp = _pil_mpp(im)
                im.load()
                if im.mode in ("RGBA", "LA", "P"):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                arr = np.asarray(im.convert("RGB"))
        except UnidentifiedImageError as e:
            raise SlideError(f"{path}: not a slide or image that can be read ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"{path}: the image could not be decoded; the file is damaged or truncated ({e})") from None
        if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise SlideError(f"{path}: image has no pixels")
        return cls(path, np.ascontiguousarray(arr), mpp)

    def read_region(self, location, level, size):
        x, y = location
        w, h = size
        return self._img[y : y + h, x : x + w]

    def thumbnail(self, max_size):
        h, w = self._img.shape[:2]
        f = max(w, h) / max_size
        if f <= 1:
            return self._img
        return cv2.resize(self._img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)

    def close(self):
        self._img = None


def _pil_mpp(im) -> float | None:
    """um/px from TIFF resolution tags (centimetre unit only; inches on plain images are DPI)."""
    try:
        tags = getattr(im, "tag_v2", None)
        if tags is None:
            return None
        unit = tags.get(296)  # ResolutionUnit: 3 = centimetre
        xres = tags.get(282)
        if unit == 3 and xres:
            xres = float(xres)
            return 1e4 / xres if xres > 0 else None
    except Exception:  # malformed tags: treat as absent
        return None
    return None


def open_slide(path: str | Path, mpp: float | None = None) -> SlideReader:
    """Open ``path`` as a slide (OpenSlide) or plain image; ``mpp`` overrides a missing resolution.

    Raises :class:`SlideError` with a message that names the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty")
    reader: SlideReader | None = None
    if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp"}:
        import openslide

        try:
            reader = OpenSlideReader(path)
        except openslide.OpenSlideUnsupportedFormatError:
            if path.suffix.lower() not in {".tif", ".tiff"}:
                raise SlideError(
                    f"{path}: not a slide or image that can be read: OpenSlide does not recognise it "
                    "(the file is damaged, truncated or of another format)"
                ) from None
            reader = None
    if reader is None:
        reader = ImageReader.open(path)
    if mpp is not None:
        if mpp <= 0 or not math.isfinite(mpp):
            raise SlideError(f"{path}: --mpp must be a positive number of micrometres per pixel, got {mpp}")
        if reader.mpp is None:
            reader.mpp = float(mpp)
    if reader.mpp is None:
        reader.close()
        raise SlideError(
            f"{path}: the file does not say its resolution; give it with --mpp (micrometres per "
            "pixel, e.g. --mpp 0.25 for 40x, 0.5 for 20x)"
        )
    return reader


@dataclass
class ScaledView:
    """The slide at a target resolution, addressed in target (model) pixels.

    ``shape`` is (height, width) in model px. ``read(y, x, h, w)`` returns (h, w, 3) uint8 for
    any rectangle, also one reaching outside the image: the outside is filled by mirroring the
    image (reflect padding), so tiles at the border and images smaller than a tile are valid.
    ``scale`` is level-0 px per model px; ``mpp`` is the view's true resolution (the model's, or
    the slide's own level when that is within ``tolerance`` of it, in which case nothing is
    resampled).
    """

    reader: SlideReader
    level: int
    factor: float  # level px per model px (1.0: no resampling)
    scale: float  # level-0 px per model px
    mpp: float
    shape: tuple[int, int]

    @classmethod
    def create(cls, reader: SlideReader, target_mpp: float, tolerance: float = 0.05) -> "ScaledView":
        """Pick the pyramid level nearest ``target_mpp`` from above (finer), resample the rest."""
        want = target_mpp / reader.mpp  # level-0 px per model px
        best = 0
        for i, d in enumerate(reader.level_downsamples):
            if d <= want * (1 + tolerance):
                if d > reader.level_downsamples[best]:
                    best = i
        d = reader.level_downsamples[best]
        factor = want / d
        if abs(factor - 1) <= tolerance:
            factor = 1.0
        elif abs(factor - round(factor)) <= tolerance * factor:
            factor = float(round(factor))
        lw, lh = reader.level_dimensions[best]
        shape = (max(1, int(lh / factor)), max(1, int(lw / factor)))
        return cls(reader, best, factor, d * factor, reader.mpp * d * factor, shape)

    def _read_level(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-px rectangle clipped to the level's bounds (may come back smaller)."""
        lw, lh = self.reader.level_dimensions[self.level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0, 3), np.uint8)
        d = self.reader.level_downsamples[self.level]
        return self.reader.read_region((round(x0 * d), round(y0 * d)), self.level, (x1 - x0, y1 - y0))

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Model-px rectangle (h, w, 3) uint8; outside the image is mirrored."""
        y0, x0, y1, x1 = self.inner(y, x, h, w)
        return self.pad(self._read_model(y0, x0, y1 - y0, x1 - x0), y, x, h, w)

    def inner(self, y: int, x: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the part of a rectangle inside the view, which :meth:`read` reads and
        mirrors out to the rectangle (entirely outside: the nearest pixel)."""
        H, W = self.shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y1 <= y0 or x1 <= x0:
            # Entirely outside: mirror-read the nearest valid rectangle by padding below.
            y0, x0 = min(max(y, 0), H - 1), min(max(x, 0), W - 1)
            y1, x1 = y0 + 1, x0 + 1
        return y0, x0, y1, x1

    def pad(self, inner: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The rectangle (y, x, h, w) from the pixels of its :meth:`inner` part: mirrored outward
        (NumPy's ``symmetric`` padding of that part), as :meth:`read` returns it."""
        y0, x0, y1, x1 = self.inner(y, x, h, w)
        pads = ((y0 - y, y + h - y1), (x0 - x, x + w - x1), (0, 0))
        if any(p for pair in pads for p in pair):
            inner = np.pad(inner, pads, mode="symmetric")
        return inner

    @property
    def exact_subreads(self) -> bool:
        """Whether a pixel inside the view reads the same whatever rectangle it is read in: true
        with no resampling and with integer factors (block means); the general affine path
        blurs across the edges of the rectangle read."""
        return self.factor == int(self.factor)

    def _read_model(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Model-px rectangle fully inside the view."""
        f = self.factor
        if f == 1.0:
            out = self._read_level(x, y, w, h)
        elif f == int(f):
            k = int(f)
            lvl = self._read_level(x * k, y * k, w * k, h * k)
            lh, lw = lvl.shape[:2]
            if lh < h * k or lw < w * k:  # last partial row/col at the level edge
                lvl = np.pad(lvl, ((0, h * k - lh), (0, w * k - lw), (0, 0)), mode="edge")
            out = lvl.reshape(h, k, w, k, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        else:
            # Exact global affine mapping so overlapping reads agree: model px centre
            # (i + 0.5) maps to level px f * (i + 0.5).
            lx0, ly0 = math.floor(x * f) - 1, math.floor(y * f) - 1
            lx1, ly1 = math.ceil((x + w) * f) + 1, math.ceil((y + h) * f) + 1
            lvl = self._read_level(lx0, ly0, lx1 - lx0, ly1 - ly0)
            oy, ox = max(0, -ly0), max(0, -lx0)
            src = np.pad(
                lvl,
                ((oy, ly1 - ly0 - oy - lvl.shape[0]), (ox, lx1 - lx0 - ox - lvl.shape[1]), (0, 0)),
                mode="edge",
            )
            if f > 1:
                # warpAffine has no area interpolation: low-pass first, then sample at centres.
                src = cv2.GaussianBlur(src, (0, 0), (f - 1) / 2)
            m = np.float32([[f, 0, (x + 0.5) * f - 0.5 - lx0], [0, f, (y + 0.5) * f - 0.5 - ly0]])
            out = cv2.warpAffine(
                src, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
            )
        if out.shape[:2] != (h, w):
            # A pyramid level a pixel short of level 0 / factor: repeat the edge.
            out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="edge")[:h, :w]
        return np.ascontiguousarray(out)
