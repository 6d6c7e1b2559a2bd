"""Blending exactness and seamlessness."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from tests.conftest import ConstantNet, conv_net, test_model, write_png
from tests.reference import BandBlender, blocks
from wsiseg.blend import window
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
    res = run_slide(img, tmp_path / "out", pred, RunConfig.of(mpp=0.5, tissue=False))
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
                    RunConfig.of(mpp=0.5, tissue=False, window=window_kind))
    tiled = _read_map(res.out_dir)[0].astype(np.float32) / 255
    whole = pred(image[None])[0, 0]  # the whole image as one "tile"
    b = 8  # image-border pixels see padding that differs between the two
    diff = np.abs(tiled[b:-b, b:-b] - whole[b:-b, b:-b])
    assert diff.max() <= 1.5 / 255, diff.max()


def _shift_difference(tmp_path, pred, img, cfg, shift, tag, stain=None):
    a = run_slide(write_png(tmp_path / f"a{tag}.png", img), tmp_path / f"a{tag}", pred, cfg, stain=stain)
    b = run_slide(write_png(tmp_path / f"b{tag}.png", np.ascontiguousarray(img[shift:, shift:])), tmp_path / f"b{tag}",
                  pred, cfg, stain=stain)
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
    d, mb = _shift_difference(tmp_path, pred, img, RunConfig.of(mpp=pred.model.mpp, tissue=False), 96, "hann")
    assert d.mean() < 0.003, d.mean()
    assert np.quantile(d, 0.99) < 0.05, np.quantile(d, 0.99)
    assert (mb > 0.5).mean() > 0.05  # the maps are not trivially empty
    # the same check fails without overlap: it detects seams
    d0, _ = _shift_difference(tmp_path, pred, img, RunConfig.of(mpp=pred.model.mpp, tissue=False, overlap=0.0), 96, "none")
    assert d0.mean() > 3 * d.mean() and np.quantile(d0, 0.99) > 0.05


@pytest.mark.slow
def test_tiled_map_is_the_whole_image_forward_pass(tmp_path, monuseg_image):
    """What the shipped model's map owes to tiling: the blended map of a breast image brought to
    the model's 0.5 um/px against one forward pass over the whole image (no tile borders at all).
    Measured on this data: mean |dp| 0.0017, p99 0.028 (Hann, 50% overlap); 0.0055 / 0.094 with
    no overlap. The ImageNet Lite0 U-Net trained this release measured 0.0084 / 0.149 here
    (benchmarks/results/default_model/seams_vs_whole_cpu.json), which is why it is not shipped."""
    import cv2

    from wsiseg.models import load_model

    pred = Predictor(load_model(), "cpu", backend="torch")
    img = cv2.resize(monuseg_image, (500, 500), interpolation=cv2.INTER_AREA)
    m = pred.model.input_multiple
    pad = np.pad(img, ((m, 2 * m - 500 % m), (m, 2 * m - 500 % m), (0, 0)), mode="reflect")
    whole = np.round(pred.probabilities(pad[None])[0, 0, m:m + 500, m:m + 500] * 255) / 255
    diffs = {}
    for overlap in (0.5, 0.0):
        r = run_slide(write_png(tmp_path / "p.png", img), tmp_path / f"o{overlap}", pred,
                      RunConfig.of(mpp=0.5, tissue=False, cellularity=False, overlap=overlap))
        tiled = _read_map(r.out_dir)[0].astype(np.float32) / 255
        diffs[overlap] = np.abs(tiled - whole)[24:-24, 24:-24]  # away from the image's own borders
    d, d0 = diffs[0.5], diffs[0.0]
    assert d.mean() < 0.003 and np.quantile(d, 0.99) < 0.05, (d.mean(), np.quantile(d, 0.99))
    assert (whole > 0.5).mean() > 0.05  # not trivially empty
    assert d0.mean() > 2 * d.mean() and np.quantile(d0, 0.99) > 0.05  # the check sees seams


@pytest.mark.slow
@pytest.mark.parametrize("method,clahe", [("reinhard", False), ("macenko", False), ("vahadane", False), ("none", True)])
def test_shifted_image_gives_the_same_map_with_stain_normalisation(tmp_path, monuseg_image, method, clahe):
    """The seam test with each ``--stain`` (and ``--clahe``), to the model's training reference:
    one transform for the slide (fitted once, on the first image, and given to both runs, as a
    resumed or a split run reuses the recorded one), so every tile at every offset goes through
    the same colour map: the bounds without normalisation hold, and the differences are those of
    the same image normalised beforehand and run without ``--stain`` (the network's own tiling on
    those colours: with Reinhard its p99 is 0.051 either way, measured; 0.0275 unnormalised)."""
    from wsiseg import stain as stain_norm
    from wsiseg.models import load_model

    pred = Predictor(load_model(), "cpu")
    img = monuseg_image[:600, :600]
    t = stain_norm.fit_transform(stain_norm.resolve_spec(method, None, clahe, pred.model.meta), img)
    assert not t.identity
    cfg = RunConfig.of(mpp=pred.model.mpp, tissue=False, cellularity=False)
    d, mb = _shift_difference(tmp_path, pred, img, cfg, 96, method, stain=t)
    pre, _ = _shift_difference(tmp_path, pred, t.apply_numpy(img), cfg, 96, method + "-pre")
    assert d.mean() < 0.003, d.mean()
    assert np.quantile(d, 0.99) < max(0.05, np.quantile(pre, 0.99) + 0.002), (np.quantile(d, 0.99), np.quantile(pre, 0.99))
    assert abs(d.mean() - pre.mean()) < 3e-4, (d.mean(), pre.mean())
    # not trivially empty (CLAHE, which this model was not trained with, leaves 3.4% of the pixels
    # above 0.5: fewer nuclei than the 5% without it)
    assert (mb > 0.5).mean() > 0.02


def test_chunk_blender_releases_blocks_in_order_and_bounds_memory():
    """Tiles in window_blocks order: blocks come out band by band, left to right, and what is open
    is a few blocks of the band plus the strip its tiles reach into the next band."""
    from wsiseg.blend import ChunkBlender
    from wsiseg.tiling import window_blocks

    H, W, T, ch = 1100, 2000, 64, 128
    g = TileGrid((H, W), T, 0.5)
    b = ChunkBlender((H, W), 1, T, ch, cols=2 * ch)
    todo = window_blocks(g, np.ones((len(g.ys), len(g.xs)), bool), ch, max_tiles=4)
    for blk in todo:
        for c in blk.cols:
            b.expect(blk.y, int(g.xs[c]))
    released, deepest = [], 0
    for blk in todo:
        for c in blk.cols:
            b.add(np.ones((1, T, T), np.float32), blk.y, int(g.xs[c]))
        for band, x, arr in b.release():
            released.append((band, x))
            np.testing.assert_allclose(arr, 1.0, atol=1e-5)
        # open: the current band's blocks near the window, and shallow blocks of the next band
        full = sum(a[1].shape[0] == ch for a in b._acc.values())
        deepest = max(deepest, max((a[1].shape[0] for k, a in b._acc.items() if k[0] > blk.band), default=0))
        assert full <= 4, full
    assert released == [(band, x) for band in range(-(-H // ch)) for x in range(0, W, 2 * ch)]
    assert deepest <= T - g.stride + g.margin  # the strip the band's last tile rows reach below it
    assert b.open_blocks == 0


def _tile_predictions(view, grid, keep, pred, tile):
    """Every kept tile's probabilities, each inferred alone (no batch effects)."""
    out = {}
    for r, c in zip(*np.nonzero(keep)):
        y, x = int(grid.ys[r]), int(grid.xs[c])
        out[(y, x)] = pred(view.read(y, x, tile, tile)[None])[0]
    return out


def _blend_in_order(blender, todo, grid, preds, dtype, convert):
    """Announce, add (each prediction through ``convert``) and release every tile of ``todo``
    in window_blocks order; the released blocks pasted into one (1, H, W) ``dtype`` map."""
    for blk in todo:
        for c in blk.cols:
            blender.expect(blk.y, int(grid.xs[c]))
    out = np.zeros((1, blender.H, blender.W), dtype)
    ch = blender.band
    for blk in todo:
        for c in blk.cols:
            blender.add(convert(preds[(blk.y, int(grid.xs[c]))]), blk.y, int(grid.xs[c]))
        for band, x, p in blender.release():
            assert p.dtype == dtype
            out[:, band * ch : band * ch + p.shape[1], x : x + p.shape[2]] = p
    assert blender.open_blocks == 0
    return out


@pytest.mark.parametrize("tile,overlap,chunk", [(64, 0.5, 128), (64, 0.75, 64), (96, 0.25, 128)])
def test_blockwise_blending_equals_whole_band_accumulation_bit_for_bit(tmp_path, monuseg_image, tile, overlap, chunk):
    """On a real image with a CNN whose output depends on the tile (zero padding), the blockwise
    blender in window_blocks order gives the same float32 bits as whole-width bands in row-major
    order, also for a band range (as --split and resumed runs infer) and with tissue gaps; the
    device blender (torch tensors) writes the bytes the store makes of those bits."""
    import torch

    from wsiseg.blend import ChunkBlender, DeviceChunkBlender
    from wsiseg.store import ProbabilityStore
    from wsiseg.slide import ScaledView, open_slide
    from wsiseg.tiling import window_blocks

    img = monuseg_image[:700, :900]
    view = ScaledView.create(open_slide(write_png(tmp_path / "p.png", img), mpp=0.5), 0.5)
    grid = TileGrid(view.shape, tile, overlap)
    keep = np.random.default_rng(0).random((len(grid.ys), len(grid.xs))) < 0.7
    preds = _tile_predictions(view, grid, keep, Predictor(test_model(conv_net()), "cpu"), tile)
    H, W = view.shape
    n_bands = -(-H // chunk)
    for first, stop in [(0, n_bands), (2, n_bands - 1)]:
        ref = BandBlender((H, W), 1, tile, chunk, first_band=first, stop_band=stop)
        row_lo = int(np.searchsorted(grid.ys + tile, first * chunk, side="right"))
        row_hi = int(np.searchsorted(grid.ys, stop * chunk, side="left"))
        sel = np.zeros_like(keep)
        sel[row_lo:row_hi] = keep[row_lo:row_hi]
        for blk in blocks(grid, sel, 8, row_lo):
            for c in blk.cols:
                ref.add(preds[(blk.y, int(grid.xs[c]))], blk.y, int(grid.xs[c]))
        a = np.zeros((1, H, W), np.float32)
        for band, p in ref.release(H):
            a[:, band * chunk : band * chunk + p.shape[1]] = p
        todo = window_blocks(grid, keep, chunk, first, stop, 8)
        assert sorted((b.row, c) for b in todo for c in b.cols) == sorted(zip(*np.nonzero(sel)))
        new = ChunkBlender((H, W), 1, tile, chunk, first_band=first, stop_band=stop, cols=2 * chunk)
        b = _blend_in_order(new, todo, grid, preds, np.float32, lambda p: p)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        # the device blender (torch tensors; here on the CPU): the bytes the store writes from those bits
        dev = DeviceChunkBlender((H, W), 1, tile, chunk, first_band=first, stop_band=stop, cols=2 * chunk, device="cpu")
        u = _blend_in_order(dev, todo, grid, preds, np.uint8, torch.from_numpy)
        np.testing.assert_array_equal(u, ProbabilityStore.to_uint8(b.copy()))
        assert u[:, first * chunk : stop * chunk].any()


def test_blockwise_store_equals_reference_full_accumulation(tmp_path, monuseg_image):
    """The pipeline's level 0 (blocks written as they finish) and pyramid (built in column blocks)
    equal the full-image reference: whole-width bands, rounded, and 2 x 2 means of whole levels."""
    from wsiseg.pipeline import infer_bands, prepare_slide
    from wsiseg.store import ProbabilityStore

    image = monuseg_image[:1000, :870].copy()
    image[300:650, 100:520] = 242  # blank glass: the tissue mask leaves gaps between tiles
    image[:, 760:] = 242
    img = write_png(tmp_path / "p.png", image)
    cfg = RunConfig.of(mpp=0.5, chunk=128, tile=64, batch_size=1, block_tiles=4)
    pred = Predictor(test_model(conv_net()), "cpu")
    prep = prepare_slide(img, 0.5, cfg)
    H, W = prep.view.shape
    store = ProbabilityStore.create(tmp_path / "out" / "probabilities.zarr", (H, W), pred.channels, 0.5, {}, cfg.tiling.chunk)
    stats = infer_bands(prep.view, prep.grid, prep.keep, pred, store, cfg)
    store.build_pyramid()
    assert stats["tiles"] == int(prep.keep.sum()) > 0 and not prep.keep.all()

    preds = _tile_predictions(prep.view, prep.grid, prep.keep, pred, cfg.tiling.tile)
    ref = BandBlender((H, W), 1, cfg.tiling.tile, cfg.tiling.chunk)
    for (y, x), p in sorted(preds.items()):  # row-major
        ref.add(p, y, x)
    full = np.concatenate([p for _, p in ref.release(H)], axis=1)
    level = np.rint(np.clip(full, 0, 1) * 255).astype(np.uint8)
    g = zarr.open_group(str(tmp_path / "out" / "probabilities.zarr"), mode="r")
    np.testing.assert_array_equal(g["0"][:], level)
    for i in range(1, len(list(g.array_keys()))):
        b = level.astype(np.uint16)
        _, h, w = b.shape
        b = np.pad(b, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
        level = ((b[:, 0::2, 0::2] + b[:, 1::2, 0::2] + b[:, 0::2, 1::2] + b[:, 1::2, 1::2] + 2) // 4).astype(np.uint8)
        np.testing.assert_array_equal(g[str(i)][:], level)
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["bands_done"] == -(-H // cfg.tiling.chunk)


def test_normalise_equals_the_masked_division():
    """Weighted sums / weights without the masked ufunc: the same float32 bits as
    ``np.divide(s, w, out=zeros, where=w > 1e-6)``, zeros where the weight is tiny or 0."""
    from wsiseg.blend import normalise

    rng = np.random.default_rng(0)
    w = rng.random((64, 96), dtype=np.float32)
    w[:5] = 0
    w[5:9] = np.float32(1e-6)
    w[9:12] = rng.random((3, 96), dtype=np.float32) * np.float32(2e-6)
    s = rng.random((3, 64, 96), dtype=np.float32) * w
    ref = np.divide(s, w, out=np.zeros_like(s), where=w > 1e-6)
    out = np.full_like(s, np.nan)
    normalise(s, w, out)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    normalise(s, w, s)  # in place
    np.testing.assert_array_equal(s.view(np.uint32), ref.view(np.uint32))


def test_store_quantisation_and_pyramid_pooling_equal_their_numpy_definitions():
    """to_uint8's one-pass OpenCV conversion equals round(clip(p, 0, 1) * 255) with halves to
    even (exhaustively checked over [0, 1.02] when it was written; here the values next to every
    rounding boundary, and inputs outside the range, which take the NumPy steps); pool2 equals
    (a + b + c + d + 2) // 4 with the last row/column repeated, for odd and even sizes."""
    from wsiseg.store import ProbabilityStore, pool2

    def ref_q(p):
        return np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)

    half = (np.arange(256, dtype=np.float64) + 0.5) / 255
    near = np.concatenate([np.nextafter(half.astype(np.float32), np.float32(d), dtype=np.float32) for d in (-1, 2)]
                          + [half.astype(np.float32), np.float32([0, -0.0, 1, 1.0000001, 1.02])])
    rng = np.random.default_rng(0)
    for p in (near.reshape(1, -1), rng.random((3, 50, 70), dtype=np.float32),
              np.float32([[-0.5, 0.2], [1.5, 0.7]]), np.float32([[np.inf, 0.3]])):
        np.testing.assert_array_equal(ProbabilityStore.to_uint8(p.copy()), ref_q(p))
    for shape in [(2, 64, 64), (3, 63, 65), (1, 1, 1), (1, 2, 7), (2, 9, 1)]:
        b = rng.integers(0, 256, shape, dtype=np.uint8)
        b[0, 0, :] = 255
        u = np.pad(b, ((0, 0), (0, shape[1] % 2), (0, shape[2] % 2)), mode="edge").astype(np.uint16)
        ref = ((u[:, 0::2, 0::2] + u[:, 1::2, 0::2] + u[:, 0::2, 1::2] + u[:, 1::2, 1::2] + 2) // 4).astype(np.uint8)
        np.testing.assert_array_equal(pool2(b), ref)


def test_chunk_writer_writes_the_files_zarr_writes(tmp_path):
    """Level-0 blocks written by the store's chunk writer (background thread) are the files Zarr
    writes for the same assignment: same bytes, edge chunks padded, all-zero chunks absent (and
    removed when a band is written again with zeros); reads back through Zarr and _read."""
    import os

    from wsiseg.store import ProbabilityStore

    rng = np.random.default_rng(0)
    H, W, ch = 300, 500, 128
    maps = rng.random((2, H, W), dtype=np.float32)
    maps[1, :, 256:] = 0  # whole chunks of zeros: not stored
    ours = ProbabilityStore.create(tmp_path / "a" / "p.zarr", (H, W), ["x", "y"], 0.5, {}, ch)
    zref = ProbabilityStore.create(tmp_path / "b" / "p.zarr", (H, W), ["x", "y"], 0.5, {}, ch)
    for b in range(-(-H // ch)):
        for x in range(0, W, 2 * ch):
            block = maps[:, b * ch : (b + 1) * ch, x : x + 2 * ch]
            ours.write_block(b, x, block.copy())
            zref.level0[:, b * ch : b * ch + block.shape[1], x : x + block.shape[2]] = ProbabilityStore.to_uint8(block.copy())
        ours.mark_bands_done(b + 1)
    ours.flush()

    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(root) for f in fs if not f.startswith(".")}

    fa, fb = files(tmp_path / "a" / "p.zarr" / "0"), files(tmp_path / "b" / "p.zarr" / "0")
    assert fa == fb and "1/0/3" not in fa and "0/2/3" in fa
    np.testing.assert_array_equal(ours.level0[:], zref.level0[:])
    np.testing.assert_array_equal(ours._read("0", 100, 300, 50, 500), zref.level0[:, 100:300, 50:500])
    assert json.loads(ours.progress_path.read_text())["bands_done"] == 3
    ours.write_block(0, 0, np.zeros((2, ch, 2 * ch), np.float32))  # a band redone with zeros
    ours.flush()
    assert not (tmp_path / "a" / "p.zarr" / "0" / "0" / "0" / "0").exists()
    assert not ours.level0[:, :ch, : 2 * ch].any()


def test_a_failed_background_write_stops_later_progress_records(tmp_path, monkeypatch):
    """Blocks are written in the store's writer thread and progress records queued after them:
    when a block's write fails, no later record runs (a resumed run redoes that band) and the
    error comes out of the next write or flush()."""
    from wsiseg.store import ChunkWriter, ProbabilityStore

    st = ProbabilityStore.create(tmp_path / "p.zarr", (256, 128), ["x"], 0.5, {}, 64)
    put = ChunkWriter._put

    def failing_put(self, row, col, data):
        if row == 64:
            raise OSError("disk full")
        put(self, row, col, data)

    monkeypatch.setattr(ChunkWriter, "_put", failing_put)
    with pytest.raises(OSError, match="disk full"):
        for b in range(4):
            st.write_block(b, 0, np.full((1, 64, 128), 0.5, np.float32))
            st.mark_bands_done(b + 1)
        st.flush()
    st.flush()  # what was queued has run (or was refused)
    assert json.loads(st.progress_path.read_text())["bands_done"] == 1
    assert st.level0[0, :64].min() == 128 and not st.level0[0, 128:].any()
