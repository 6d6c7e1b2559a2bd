"""Blending exactness and seamlessness."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from tests.conftest import ConstantNet, conv_net, test_model, write_png
from wsiseg.blend import BandBlender, window
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.predict import Predictor
from wsiseg.tiling import TileGrid


@pytest.mark.parametrize("tile", [64, 256])
def test_hann_window_is_a_partition_of_unity_at_half_overlap(tile):
    w, s = window(tile), tile // 2
    # the four tiles that overlap one stride x stride quadrant sum to exactly 1 there
    total = w[s:, s:] + w[s:, :s] + w[:s, s:] + w[:s, :s]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert w.min() > 0 and w.max() <= 1


def test_grid_covers_every_pixel_at_least_half_a_stride_inside():
    for n in (1, 100, 255, 256, 257, 1000):
        g = TileGrid((n, n), 256, 0.5)
        ys = g.ys
        assert ys[0] == -64 and ys[-1] + 256 >= n + 64 or len(ys) == 1
        # every pixel: some tile has it at >= 64 px from its edges (or the image is tiny)
        for p in {0, n // 2, n - 1}:
            inside = [(p - y) for y in ys if 64 <= p - y < 192]
            assert inside, (n, p)


def test_blender_releases_bands_in_order_and_bounds_memory():
    H, W, T = 1100, 300, 64
    b = BandBlender((H, W), 1, T, band=128)
    g = TileGrid((H, W), T, 0.5)
    released = []
    for r, y in enumerate(g.ys):
        for x in g.xs:
            b.add(np.ones((1, T, T), np.float32), int(y), int(x))
        nxt = int(g.ys[r + 1]) if r + 1 < len(g.ys) else H
        for band, arr in b.release(nxt):
            released.append(band)
            np.testing.assert_allclose(arr, 1.0, atol=1e-5)
        assert b.open_bands <= 2
    assert released == list(range(-(-H // 128)))


def _read_map(out_dir) -> np.ndarray:
    return zarr.open_group(str(out_dir / "probabilities.zarr"), mode="r")["0"][:]


def test_constant_model_reproduces_a_constant_map(tmp_path, monuseg_image):
    img = write_png(tmp_path / "patch.png", monuseg_image[:700, :600])
    pred = Predictor(test_model(ConstantNet(0.7)), "cpu")
    res = run_slide(img, tmp_path / "out", pred, RunConfig(mpp=0.5, tissue=False))
    m = _read_map(res.out_dir)
    assert m.shape == (1, 700, 600)
    assert np.abs(m.astype(np.float32) - 0.7 * 255).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("window_kind", ["hann", "gaussian"])
def test_tilewise_equals_whole_image_inference_in_the_interior(tmp_path, monuseg_image, window_kind):
    """A translation-equivariant CNN gives the same map tiled as on the whole image at once."""
    image = monuseg_image[:640, :520]
    net = conv_net()
    model = test_model(net)
    pred = Predictor(model, "cpu")
    res = run_slide(write_png(tmp_path / "p.png", image), tmp_path / "out", pred,
                    RunConfig(mpp=0.5, tissue=False, window=window_kind))
    tiled = _read_map(res.out_dir)[0].astype(np.float32) / 255
    whole = pred(image[None])[0, 0]  # the whole image as one "tile"
    b = 8  # image-border pixels see padding that differs between the two
    diff = np.abs(tiled[b:-b, b:-b] - whole[b:-b, b:-b])
    assert diff.max() <= 1.5 / 255, diff.max()


def _shift_difference(tmp_path, pred, img, cfg, shift, tag):
    a = run_slide(write_png(tmp_path / f"a{tag}.png", img), tmp_path / f"a{tag}", pred, cfg)
    b = run_slide(write_png(tmp_path / f"b{tag}.png", np.ascontiguousarray(img[shift:, shift:])), tmp_path / f"b{tag}",
                  pred, cfg)
    ma = _read_map(a.out_dir)[0, shift:, shift:].astype(np.float32) / 255
    mb = _read_map(b.out_dir)[0].astype(np.float32) / 255
    m = 48  # away from both images' borders
    return np.abs(ma[m:-m, m:-m] - mb[m:-m, m:-m]), mb


@pytest.mark.slow
def test_shifted_image_gives_the_same_map(tmp_path, monuseg_image):
    """The seam test with the shipped model: a shift of 96 px (not a multiple of the 128 stride).

    Measured on this data: Hann at 50% overlap, mean |dp| 0.0008 and p99 0.016; no overlap,
    0.010 and 0.196 (seams where tile borders fall on different pixels)."""
    from wsiseg.models import load_model

    pred = Predictor(load_model(), "cpu")
    img = monuseg_image[:600, :600]
    d, mb = _shift_difference(tmp_path, pred, img, RunConfig(mpp=pred.model.mpp, tissue=False), 96, "hann")
    assert d.mean() < 0.003, d.mean()
    assert np.quantile(d, 0.99) < 0.05, np.quantile(d, 0.99)
    assert (mb > 0.5).mean() > 0.05  # the maps are not trivially empty
    # the same check fails without overlap: it detects seams
    d0, _ = _shift_difference(tmp_path, pred, img, RunConfig(mpp=pred.model.mpp, tissue=False, overlap=0.0), 96, "none")
    assert d0.mean() > 3 * d.mean() and np.quantile(d0, 0.99) > 0.05
