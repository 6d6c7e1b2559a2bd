"""Slide readers: OpenSlide for whole-slide images, PIL/tifffile for plain images.

All of OpenSlide's quirks (RGBA with a background colour, locations in level-0 pixels and sizes
in level pixels) stay in this module. The rest of the engine sees a :class:`ScaledView`: the
slide at the model's resolution, addressed in *model pixels*, returning RGB uint8 arrays.
"""
from __future__ import annotations

import errno
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm", ".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SAMPLE = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"  # the bundled sample slide (CC0)
INPUT_SUFFIXES = SLIDE_SUFFIXES | IMAGE_SUFFIXES
# Refuse a slide whose resolution differs from the model's by more than this factor either way
# (``--max-rescale``): a file that claims 300 um/px, or 0.0001, is wrong, not a job to start.
MAX_RESCALE = 16.0
# Plain images (PNG, JPEG, BMP, a TIFF that OpenSlide does not read) above this many pixels are
# not decoded whole (``--max-image-pixels``): 2**27 px is 384 MiB as RGB. A large TIFF is read
# piece by piece instead (:class:`TiffReader`).
MAX_IMAGE_PIXELS = 2**27


class SlideError(Exception):
    """An input that cannot be read; the message names the file and what is wrong."""


class SlideReader(Protocol):
    """The small interface the engine needs from any slide or image."""

    path: Path
    mpp: float | None  # um/px of level 0 used (the file's, or --mpp / --mpp-override), None when unknown
    file_mpp: float | None  # um/px that the file itself says (set by open_slide), None when it says none
    mpp_source: str  # where ``mpp`` comes from: "file", "--mpp" or "--mpp-override" (set by open_slide)
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


def _thumbnail_in_pieces(read, lw: int, lh: int, max_size: int, strip_rows: int = 512,
                         strip_cols: int = 8192) -> np.ndarray:
    """(th, tw, 3) uint8 thumbnail, longer side at most ``max_size``, of a ``lw`` x ``lh`` px
    level read by ``read(x, y, w, h)`` (level px, inside bounds) in pieces of ``strip_rows`` rows
    by ``strip_cols`` columns (whole-width strips for a level at most ``strip_cols`` wide), each
    area-shrunk on arrival: memory holds one piece and the thumbnail."""
    f = max(1.0, max(lw, lh) / max_size)
    tw, th = max(1, round(lw / f)), max(1, round(lh / f))

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
            region = read(x0, y0, x1 - x0, y1 - y0)
            out[oy0:oy1, ox0:ox1] = (cv2.resize(region, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
                                     if f > 1 else region)
    return out


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
        d = self.level_downsamples[level]

        def read(x0: int, y0: int, cw: int, ch: int) -> np.ndarray:
            return self.read_region((round(x0 * d), round(y0 * d)), level, (cw, ch))

        return _thumbnail_in_pieces(read, lw, lh, max_size, strip_rows, strip_cols)

    def close(self):
        self._slide.close()


# PIL modes decoded, by what they hold (anything else is refused before decoding)
_PIL_MODES = {
    "1": "1-bit", "L": "8-bit grayscale", "LA": "8-bit grayscale with alpha", "P": "palette",
    "PA": "palette with alpha", "RGB": "RGB", "RGBA": "RGB with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr",
    "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale", "I;16N": "16-bit grayscale",
}
_OTHER_MODES = {"I": "32-bit integer grayscale", "F": "32-bit float grayscale", "LAB": "CIELAB", "HSV": "HSV"}
_PIL_OPEN = threading.Lock()  # PIL's decompression-bomb limit is a global: one open at a time sets it


@contextmanager
def _pil_open(path: Path):
    """``PIL.Image.open`` (it reads the header only; no pixel is decoded), with PIL's own
    decompression-bomb check off for the call: :func:`_check_pixels` applies wsiseg's limit,
    which the user can set, before anything is decoded. The PIL global is restored at once."""
    from PIL import Image

    with _PIL_OPEN:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    try:
        yield im
    finally:
        im.close()


def _check_pixels(path: Path, w: int, h: int, kind: str, max_pixels: int) -> None:
    """Refuse an image that would be decoded whole above ``max_pixels`` (no pixel read)."""
    if w * h > max_pixels:
        raise SlideError(
            f"{path}: a {w} x {h} px {kind} image ({w * h * 3 / 2**30:.1f} GiB as RGB) "
            f"is decoded whole, which is over the limit of {max_pixels:,} px for such images: convert "
            "it to a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg) "
            "or raise --max-image-pixels"
        )


def _gray16_to_rgb8(a: np.ndarray) -> np.ndarray:
    """(h, w) 16-bit grayscale -> (h, w, 3) uint8 by the high byte (as PIL reduces 16-bit RGB)."""
    g = (a.astype(np.uint16) >> 8).astype(np.uint8)
    return cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)


class ImageReader:
    """A plain image (PNG, JPEG, BMP, a TIFF that OpenSlide does not read) as a single-level
    slide, held in memory. :meth:`open` reads the header only (size, mode, resolution) and
    refuses an image over the pixel limit or of a mode it cannot convert; the pixels are decoded
    on the first read (the thumbnail), after every check that needs none."""

    def __init__(self, path: Path, image: np.ndarray | None, mpp: float | None,
                 size: tuple[int, int] | None = None):
        self.path = path
        self._img = image
        self.mpp = mpp
        w, h = size if image is None else (image.shape[1], image.shape[0])
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]
        self.vendor = "image"
        self._decoding = threading.Lock()

    @classmethod
    def open(cls, path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> "ImageReader":
        from PIL import UnidentifiedImageError

        try:
            with _pil_open(path) as im:
                mpp = _pil_mpp(im)
                (w, h), mode, kind = im.size, im.mode, im.format or path.suffix.lstrip(".").upper()
        except UnidentifiedImageError as e:
            raise SlideError(f"{path}: not a slide or image that can be read ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"{path}: the image could not be decoded; the file is damaged or truncated ({e})") from None
        if w <= 0 or h <= 0:
            raise SlideError(f"{path}: image has no pixels")
        _check_pixels(path, w, h, kind, max_pixels)
        if mode not in _PIL_MODES:
            raise SlideError(f"{path}: image mode {mode} ({_OTHER_MODES.get(mode, 'unknown')}) is not supported: "
                             "save it as 8- or 16-bit RGB or grayscale")
        return cls(path, None, mpp, (w, h))

    def _pixels(self) -> np.ndarray:
        """(h, w, 3) uint8, decoded on the first call."""
        with self._decoding:
            if self._img is None:
                self._img = self._decode()
            return self._img

    def _decode(self) -> np.ndarray:
        from PIL import Image

        try:
            with _pil_open(self.path) as im, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
                if im.mode.startswith("I;16"):
                    arr = _gray16_to_rgb8(np.asarray(im))
                else:
                    if im.mode in ("RGBA", "LA", "P", "PA"):
                        im = im.convert("RGBA")
                        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                        im = Image.alpha_composite(bg, im)
                    arr = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise SlideError(f"{self.path}: the image could not be decoded; the file is damaged or truncated ({e})") from None
        w, h = self.level_dimensions[0]
        if arr.ndim != 3 or arr.shape[:2] != (h, w):
            raise SlideError(f"{self.path}: the image decoded to {arr.shape} pixels, not the {w} x {h} its header says")
        return np.ascontiguousarray(arr)

    def read_region(self, location, level, size):
        x, y = location
        w, h = size
        return self._pixels()[y : y + h, x : x + w]

    def thumbnail(self, max_size):
        img = self._pixels()
        h, w = img.shape[:2]
        f = max(w, h) / max_size
        if f <= 1:
            return img
        return cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)

    def close(self):
        self._img = None


class TiffReader:
    """A TIFF too large to decode whole that OpenSlide does not read (e.g. stored in strips),
    read rectangle by rectangle through tifffile's Zarr store, which decodes only the strips or
    tiles that a rectangle touches: memory holds what is asked for, never the image. RGB, RGBA
    or grayscale, 8 or 16 bits (16 bits become 8 by the high byte, as PIL reads 16-bit RGB)."""

    def __init__(self, path: Path, max_pixels: int = MAX_IMAGE_PIXELS):
        import tifffile
        import zarr

        self.path = path
        self.vendor = "tiff"
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:  # tifffile's errors for a damaged file are of several types
            raise SlideError(f"{path}: the TIFF could not be read; the file is damaged or truncated ({e})") from None
        try:
            page = self._tif.pages.first
            h, w = int(page.imagelength), int(page.imagewidth)
            self.level_dimensions = [(w, h)]
            self.level_downsamples = [1.0]
            self._layout(page, w, h, max_pixels)
            self.mpp = _tag_mpp(page.tags.get(296), page.tags.get(282))
            self._arr = zarr.open_array(page.aszarr(), mode="r")
        except SlideError:
            self._tif.close()
            raise
        except Exception as e:
            self._tif.close()
            raise SlideError(f"{path}: the TIFF could not be read; the file is damaged or truncated ({e})") from None

    def _layout(self, page, w: int, h: int, max_pixels: int) -> None:
        """Check that the page is one this reader converts, and that one strip or tile is small."""
        samples, photo = int(page.samplesperpixel), int(page.photometric)
        gray, rgb = photo == 1 and samples == 1, photo in (2, 6) and samples in (3, 4)  # MINISBLACK; RGB, YCbCr
        if page.dtype not in (np.uint8, np.uint16) or not (gray or rgb) or (photo == 6 and page.compression != 7):
            name = getattr(page.photometric, "name", page.photometric)
            raise SlideError(
                f"{self.path}: a {w} x {h} px TIFF of {samples} sample(s) of {page.dtype} (photometric {name}) is "
                "too large to decode whole, and wsiseg reads only RGB, RGBA or grayscale TIFFs of 8 or 16 bits "
                "piece by piece: convert it to a tiled pyramidal RGB TIFF (e.g. vips tiffsave IN OUT.tif --tile "
                "--pyramid --compression jpeg)"
            )
        ch, cw = (page.tilelength, page.tilewidth) if page.is_tiled else (min(h, page.rowsperstrip or h), w)
        if ch * cw > max_pixels:
            raise SlideError(
                f"{self.path}: a {w} x {h} px TIFF stored in pieces of {cw} x {ch} px: decoding one is over the "
                f"limit of {max_pixels:,} px: convert it to a tiled pyramidal TIFF (e.g. vips tiffsave "
                "IN OUT.tif --tile --pyramid --compression jpeg) or raise --max-image-pixels"
            )
        self._planar = samples > 1 and int(page.planarconfig) == 2  # (samples, h, w)
        self._associated = tuple(page.extrasamples or ()) == (1,)  # premultiplied alpha

    def read_region(self, location, level, size):
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        try:
            a = self._arr[:, y : y + h, x : x + w] if self._planar else self._arr[y : y + h, x : x + w]
        except Exception as e:
            raise SlideError(f"{self.path}: reading {w}x{h} px at {location} failed; the file is damaged or "
                             f"truncated ({e})") from None
        a = np.asarray(a)
        if self._planar:
            a = np.moveaxis(a, 0, -1)
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        if a.ndim == 2:
            return cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
        if a.shape[2] == 4:
            if self._associated:
                return _composite_on_white(a, (255, 255, 255))
            rgb, alpha = a[..., :3].astype(np.uint16), a[..., 3:4].astype(np.uint16)
            return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(a)

    def thumbnail(self, max_size):
        w, h = self.level_dimensions[0]
        return _thumbnail_in_pieces(lambda x, y, cw, ch: self.read_region((x, y), 0, (cw, ch)), w, h, max_size)

    def close(self):
        self._tif.close()


def _tag_mpp(unit, xres) -> float | None:
    """um/px from TIFF ResolutionUnit / XResolution tags (values or tifffile tags), centimetre
    unit only: inches on plain images are a DPI, not a scan resolution."""
    try:
        unit = getattr(unit, "value", unit)
        xres = getattr(xres, "value", xres)
        if isinstance(xres, tuple):  # a rational (numerator, denominator)
            xres = xres[0] / xres[1] if xres[1] else 0
        if int(unit or 0) == 3 and xres:
            xres = float(xres)
            return 1e4 / xres if xres > 0 else None
    except Exception:  # malformed tags: treat as absent
        return None
    return None


def _pil_mpp(im) -> float | None:
    """um/px from TIFF resolution tags (centimetre unit only; inches on plain images are DPI)."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        return _tag_mpp(tags.get(296), tags.get(282))  # ResolutionUnit (3 = centimetre), XResolution
    except Exception:  # malformed tags: treat as absent
        return None


def _tiff_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a TIFF's first page from its header (tifffile), None if unreadable."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # not a TIFF tifffile reads: PIL says what is wrong
        return None


def _open_plain(path: Path, max_pixels: int) -> SlideReader:
    """A plain image's reader: a TIFF too large to decode whole is read piece by piece
    (:class:`TiffReader`), anything else decoded whole (:class:`ImageReader`)."""
    if path.suffix.lower() in {".tif", ".tiff"}:
        size = _tiff_size(path)
        if size is not None and size[0] * size[1] > max_pixels:
            return TiffReader(path, max_pixels)
    return ImageReader.open(path, max_pixels)


def link_problem(path: Path) -> tuple[str, str] | None:
    """(``"loop"`` or ``"broken"``, a message) for a symbolic link that cannot be followed; None
    for anything else."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        target = os.readlink(path)
        if e.errno == errno.ELOOP:
            return "loop", f"{path}: symbolic link loop ({path.name} -> {target} leads back to itself): fix or remove the link"
        return "broken", f"{path}: broken symbolic link (points to {target}, which does not exist)"


def open_slide(path: str | Path, mpp: float | None = None, mpp_override: float | None = None,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> SlideReader:
    """Open ``path`` as a slide (OpenSlide) or plain image, reading no pixels.

    ``mpp`` gives the resolution of a file that does not say it; ``mpp_override`` replaces the
    file's own (``reader.file_mpp`` keeps what the file says, ``reader.mpp_source`` where the
    resolution used comes from). Plain images over ``max_image_pixels`` are refused, except
    TIFFs that can be read piece by piece. Raises :class:`SlideError` with a message that names
    the file and the problem.
    """
    path = Path(path)
    problem = link_problem(path)
    if problem:
        raise SlideError(problem[1])
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty")
    for flag, value in (("--mpp", mpp), ("--mpp-override", mpp_override)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise SlideError(f"{path}: {flag} must be a positive number of micrometres per pixel, got {value}")
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
        reader = _open_plain(path, max_image_pixels)
    reader.file_mpp, reader.mpp_source = reader.mpp, "file"
    if mpp_override is not None:
        reader.mpp, reader.mpp_source = float(mpp_override), "--mpp-override"
    elif reader.mpp is None and mpp is not None:
        reader.mpp, reader.mpp_source = float(mpp), "--mpp"
    if reader.mpp is None:
        reader.close()
        raise SlideError(
            f"{path}: the file does not say its resolution; give it with --mpp (micrometres per "
            "pixel, e.g. --mpp 0.25 for 40x, 0.5 for 20x)"
        )
    return reader


def check_resolution(reader: SlideReader, target_mpp: float, max_rescale: float = MAX_RESCALE) -> None:
    """Refuse (:class:`SlideError`) a slide that would be resampled by more than ``max_rescale``
    either way to reach ``target_mpp``: its claimed resolution is almost surely wrong, and the
    job would be absurd (a 512 px image said to be 300 um/px becomes a 307,200 px map; one said
    to be 0.0001 um/px, a 1 px map). Reads no pixels."""
    factor = target_mpp / reader.mpp  # level-0 px per model px
    if 1 / max_rescale <= factor <= max_rescale:
        return
    w, h = reader.level_dimensions[0]
    said, fix = {
        "file": (f"the file says {reader.mpp:g} um/px", "if that is wrong, give the right resolution with "
                 "--mpp-override UM_PER_PX"),
        "--mpp": (f"--mpp gives {reader.mpp:g} um/px", "check --mpp"),
        "--mpp-override": (f"--mpp-override gives {reader.mpp:g} um/px", "check --mpp-override"),
    }[getattr(reader, "mpp_source", "file")]
    raise SlideError(
        f"{reader.path}: {said} and the model works at {target_mpp:g} um/px: its {w} x {h} px would become a "
        f"{max(1, int(w / factor))} x {max(1, int(h / factor))} px map ({'enlarged' if factor < 1 else 'shrunk'} "
        f"{max(factor, 1 / factor):.3g}x, beyond the {max_rescale:g}x allowed); {fix}, or allow it with "
        f"--max-rescale {math.ceil(max(factor, 1 / factor))}"
    )


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
