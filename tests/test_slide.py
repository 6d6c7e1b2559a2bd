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
