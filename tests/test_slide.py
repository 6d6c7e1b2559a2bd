"""Readers, resolution handling and the tissue mask, on real slides and real pixels."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.conftest import SAMPLE_SVS, write_png, write_pyramid
from wsiseg.slide import ScaledView, SlideError, open_slide
from wsiseg.tissue import tissue_mask


def test_aperio_sample_opens_with_its_resolution():
    r = open_slide(SAMPLE_SVS)
    assert r.level_dimensions[0] == (2220, 2967)
    assert r.mpp == pytest.approx(0.499)
    region = r.read_region((1000, 1000), 0, (64, 32))
    assert region.shape == (32, 64, 3) and region.dtype == np.uint8
    v = ScaledView.create(r, 0.5)  # 0.499 vs 0.5: within tolerance, read as is
    assert v.factor == 1.0 and v.shape == (2967, 2220) and v.mpp == pytest.approx(0.499)
    np.testing.assert_array_equal(v.read(1000, 1000, 32, 64), region)


def test_pyramid_level_is_chosen_and_resampled(tmp_path, monuseg_image):
    """A 40x pyramid read at 20x uses level 1; at 0.75 um/px resamples level 1 by 1.5."""
    img = np.ascontiguousarray(np.tile(monuseg_image, (2, 2, 1)))  # 2000 x 2000 real pixels
    path = write_pyramid(tmp_path / "slide.tif", img, mpp=0.25, levels=3)
    r = open_slide(path)
    assert r.mpp == pytest.approx(0.25) and len(r.level_dimensions) == 3
    v = ScaledView.create(r, 0.5)
    assert v.level == 1 and v.factor == 1.0 and v.shape == (1000, 1000)
    v2 = ScaledView.create(r, 0.75)
    assert v2.level == 1 and v2.factor == pytest.approx(1.5) and v2.shape == (666, 666)
    # Resampled reads agree with a direct area resize of level 1, and overlapping reads agree
    lvl1 = r.read_region((0, 0), 1, (1000, 1000))
    ref = cv2.resize(lvl1, (666, 666), interpolation=cv2.INTER_AREA).astype(np.float32)
    a = v2.read(100, 100, 200, 200).astype(np.float32)
    assert np.abs(a - ref[100:300, 100:300]).mean() < 6
    b = v2.read(150, 180, 100, 100).astype(np.float32)
    np.testing.assert_array_equal(a[50:150, 80:180], b)
    # a 40x slide without a 20x level: integer factor 2 from level 0, exact 2x2 means
    v3 = ScaledView.create(open_slide(write_pyramid(tmp_path / "one.tif", img, 0.25, levels=1)), 0.5)
    assert v3.level == 0 and v3.factor == 2.0
    lvl0 = v3.reader.read_region((0, 0), 0, (200, 200)).astype(np.float32)
    np.testing.assert_allclose(v3.read(0, 0, 100, 100), lvl0.reshape(100, 2, 100, 2, 3).mean((1, 3)), atol=0.51)


def test_reads_outside_the_image_are_mirrored(tmp_path, monuseg_image):
    img = monuseg_image[:100, :80]
    v = ScaledView.create(open_slide(write_png(tmp_path / "small.png", img), mpp=0.5), 0.5)
    t = v.read(-64, -64, 256, 256)
    assert t.shape == (256, 256, 3)
    np.testing.assert_array_equal(t[64:164, 64:144], img)
    np.testing.assert_array_equal(t[63, 64:144], img[0])  # symmetric padding
    np.testing.assert_array_equal(t[64:164, 63], img[:, 0])


def test_plain_image_needs_mpp(tmp_path, monuseg_image):
    p = write_png(tmp_path / "patch.png", monuseg_image[:300, :300])
    with pytest.raises(SlideError, match=r"patch\.png.*--mpp"):
        open_slide(p)
    assert open_slide(p, mpp=0.25).mpp == 0.25


def test_tissue_mask_finds_tissue_and_not_glass(monuseg_image):
    r = open_slide(SAMPLE_SVS)
    m = tissue_mask(r.thumbnail(512))
    assert 0.2 < m.mean() < 0.7  # the sample is a tissue strip on glass
    assert tissue_mask(monuseg_image).mean() > 0.95  # a patch that is all tissue stays all tissue
    white = np.full((300, 300, 3), 245, np.uint8)
    assert not tissue_mask(white).any()


def test_tissue_tiles_are_the_tiles_over_tissue_pixels():
    """The tile filter (integral image, vectorised) equals its definition: a tile is kept iff the
    mask pixels under it, the tile's image rectangle rescaled to the mask, hold any tissue."""
    import math

    from wsiseg.tiling import TileGrid

    m = tissue_mask(open_slide(SAMPLE_SVS).thumbnail(512))
    for shape, tile, overlap in [((2967, 2220), 256, 0.5), ((5000, 3000), 96, 0.75), ((300, 7000), 128, 0.0)]:
        g = TileGrid(shape, tile, overlap)
        keep = g.tissue_tiles(m)
        (H, W), (mh, mw) = shape, m.shape
        ref = np.zeros_like(keep)
        for r, y in enumerate(g.ys):
            y0 = min(max(0, math.floor(max(y, 0) * mh / H)), mh - 1)
            y1 = max(y0 + 1, min(mh, math.ceil(min(y + tile, H) * mh / H)))
            for c, x in enumerate(g.xs):
                x0 = min(max(0, math.floor(max(x, 0) * mw / W)), mw - 1)
                x1 = max(x0 + 1, min(mw, math.ceil(min(x + tile, W) * mw / W)))
                ref[r, c] = m[y0:y1, x0:x1].any()
        np.testing.assert_array_equal(keep, ref)
        assert 0 < keep.mean() < 1


def test_raw_reads_equal_openslide_pythons_pil_reads(tmp_path, monuseg_image):
    """Reading OpenSlide's ARGB straight into NumPy gives exactly the pixels of openslide-python's
    PIL path (composited on the background), also where a region leaves the level (transparent
    pixels: the non-opaque branch) and on a lower pyramid level."""
    from wsiseg.slide import _composite_on_white

    img = np.ascontiguousarray(np.tile(monuseg_image, (2, 2, 1)))
    for path in (SAMPLE_SVS, write_pyramid(tmp_path / "s.tif", img, 0.25, levels=2)):
        r = open_slide(path)
        assert r._raw is not None  # this openslide-python has the binding
        for level, (x, y), (w, h) in [(0, (100, 200), (300, 257)), (0, (-50, -70), (200, 150)),
                                      (len(r.level_dimensions) - 1, (500, 300), (700, 90)), (0, (0, 0), (1, 1))]:
            d = r.level_downsamples[level]
            loc = (round(x * d), round(y * d))
            ref = _composite_on_white(np.asarray(r._slide.read_region(loc, level, (w, h))), r._bg)
            got = r.read_region(loc, level, (w, h))
            assert got.dtype == np.uint8 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, ref)
        assert r.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)


def test_thumbnail_reads_bounded_pieces(tmp_path, monuseg_image):
    """A level wider than ``strip_cols`` is read in pieces at most that wide (memory bounded by
    the piece, not the level's width); narrower levels are read in whole-width strips as before.
    Pieces give the same thumbnail up to the resampling of each piece (as the row strips always
    did): the same tissue mask."""
    img = np.ascontiguousarray(np.tile(monuseg_image, (1, 3, 1)))  # 1000 x 3000
    r = open_slide(write_pyramid(tmp_path / "wide.tif", img, 0.25, levels=1))
    sizes = []
    read = r.read_region
    r.read_region = lambda loc, level, size: sizes.append(size) or read(loc, level, size)
    whole = r.thumbnail(600)
    assert max(s[0] for s in sizes) == 3000
    sizes.clear()
    pieces = r.thumbnail(600, strip_rows=256, strip_cols=1024)
    assert max(s[0] for s in sizes) <= 1024 and max(s[1] for s in sizes) <= 256
    assert pieces.shape == whole.shape == (200, 600, 3)
    assert np.abs(cv2.blur(pieces, (5, 5)).astype(int) - cv2.blur(whole, (5, 5))).mean() < 2
    assert (tissue_mask(pieces) == tissue_mask(whole)).mean() > 0.99
    sizes.clear()
    np.testing.assert_array_equal(r.thumbnail(600, strip_rows=256, strip_cols=3000),
                                  r.thumbnail(600, strip_rows=256))


def _stream_tiles(view, grid, todo, **kw):
    from wsiseg.schedule import TileStream

    s = TileStream(view, grid, todo, 5, workers=2, **kw)
    tiles, where = [], []
    for t, w in s:
        tiles.append(t.copy())
        where += w
    return s, (np.concatenate(tiles) if tiles else np.zeros((0,) + (grid.tile,) * 2 + (3,), np.uint8)), where


@pytest.mark.parametrize("case", ["png-gaps", "tiny-png", "pyramid-factor2", "pyramid-factor1.5"])
def test_tile_stream_gives_the_tiles_of_block_reads(tmp_path, monuseg_image, case):
    """TileStream (pieces of a band's rows) yields the pipeline's tiles in window_blocks order,
    each exactly what reading its block gives (mirrored borders included), reading fewer pixels;
    a view that resamples by a non-integer factor is read block by block."""
    from wsiseg.tiling import TileGrid, window_blocks

    if case == "png-gaps":
        img = monuseg_image[:900, :700].copy()
        view = ScaledView.create(open_slide(write_png(tmp_path / "p.png", img), mpp=0.5), 0.5)
        tile, chunk, bt = 64, 128, 4
    elif case == "tiny-png":
        view = ScaledView.create(open_slide(write_png(tmp_path / "t.png", monuseg_image[:50, :90]), mpp=0.5), 0.5)
        tile, chunk, bt = 64, 128, 4
    else:
        img = np.ascontiguousarray(np.tile(monuseg_image, (1, 2, 1))[:, :1900])
        view = ScaledView.create(open_slide(write_pyramid(tmp_path / "s.tif", img, 0.25, levels=1)),
                                 0.5 if case == "pyramid-factor2" else 0.375)
        assert view.factor == (2.0 if case == "pyramid-factor2" else 1.5)
        tile, chunk, bt = 256, 512, 8
    grid = TileGrid(view.shape, tile, 0.5)
    keep = np.random.default_rng(1).random((len(grid.ys), len(grid.xs))) < 0.75
    keep[0, 0] = keep[-1, -1] = True
    todo = window_blocks(grid, keep, chunk, max_tiles=bt)
    s, tiles, where = _stream_tiles(view, grid, todo, cols=bt * grid.stride)
    ref, ref_where = [], []
    for blk in todo:
        px = view.read(blk.y, blk.x, blk.h, blk.w)
        for c in blk.cols:
            x = int(grid.xs[c])
            ref.append(px[:, x - blk.x : x - blk.x + tile])
            ref_where.append((blk.y, x))
    assert where == ref_where and len(where) == int(keep.sum())
    np.testing.assert_array_equal(tiles, np.stack(ref))
    block_px = sum(b.h * b.w for b in todo)
    if case == "pyramid-factor1.5":
        assert not s.pieces and s.pixels_read == block_px
    else:
        assert s.pieces and s.pixels_read < block_px
    # the same tiles again, when the first band is skipped (a resumed run)
    todo2 = window_blocks(grid, keep, chunk, 1, max_tiles=bt)
    _, tiles2, where2 = _stream_tiles(view, grid, todo2, cols=bt * grid.stride)
    pos = {w: i for i, w in enumerate(where)}
    np.testing.assert_array_equal(tiles2, tiles[[pos[w] for w in where2]])


def test_a_raw_binding_that_disagrees_is_not_used(monkeypatch):
    """The private openslide-python binding is checked against the public PIL path when a slide
    opens; one that gives other pixels (a changed API) is dropped for the public path."""
    import wsiseg.slide as slide_mod

    good = slide_mod._raw_reader()
    assert good is not None and open_slide(SAMPLE_SVS)._raw is not None

    def wrong_read(osr, ptr, x, y, level, w, h):
        good[0](osr, ptr, x + 1, y, level, w, h)  # one pixel off

    monkeypatch.setattr(slide_mod, "_raw_reader", lambda: (wrong_read,) + good[1:])
    r = open_slide(SAMPLE_SVS)
    assert r._raw is None
    ref = slide_mod._composite_on_white(np.asarray(r._slide.read_region((10, 20), 0, (30, 40))), r._bg)
    np.testing.assert_array_equal(r.read_region((10, 20), 0, (30, 40)), ref)
