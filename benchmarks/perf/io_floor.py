"""What the I/O-only pipeline costs per tile at the floor of its array work, one operation at a time.

    python benchmarks/perf/io_floor.py --slide .gpu/slides/mosaic-10000px-mpp0.25-seed0.tif \\
        --json benchmarks/results/io_floor_cpu.json

The issue's target is an I/O-only pipeline (``wsiseg bench --stages blend_write_only``: the
identity model, the default model's 5 channels) of 1,000 tiles/s on 2 cores, i.e. at most 2 ms
of CPU per tile, all threads together, and at most 1 ms on any one thread. This script times, on
one thread, each operation a tile needs, with the pipeline's own code where there is one and
the shapes it uses (tile 256, stride 128, batch 8, 5 channels, 512 px chunks), on warm buffers
(no page faults, no other thread): the cost a perfect pipeline could not avoid with this design.

Per tile (each output pixel is covered by 4 tiles at 50% overlap, so the model-side work is 4x
the output's):

* ``lut_normalise``: the RGB batch through :meth:`wsiseg.predict.Predictor.normalise`;
* ``sigmoid_1map`` / ``sigmoid_5maps``: torch's sigmoid on 1 (the identity model repeats one
  map) or 5 maps of 256 x 256;
* ``window_multiply_1to5`` / ``window_multiply_5nhwc``: probabilities x Hann window into the
  NCHW output buffer, from one repeated map or from the network's 5-channel NHWC output;
* ``blend_add``: :meth:`wsiseg.blend.ChunkBlender.add` of a windowed (5, 256, 256) tile, in the
  pipeline's tile order over a 3,000 px square, and ``numpy_add_floor``: the bare NumPy adds of
  the same sizes into one fixed place (no bookkeeping, cache-warm);
* ``release_normalise_uint8``: :meth:`ChunkBlender.release` (sum / weight) and
  :meth:`wsiseg.store.ProbabilityStore.to_uint8` per 128 x 128 x 5 output values (a tile's
  share of the output);
* ``encode_chunks``: the store's codec (Blosc-zstd level 1) on a tile's share of uint8 output,
  encoded as whole real chunks of a probability map (the sample slide's default-model map when
  ``--map`` is given, else a smooth synthetic one);
* ``read_decode``: the slide's pixels per tile as the pipeline reads them: the pieces of
  :func:`wsiseg.tiling.read_pieces` (strips of a band; each pixel read about 1.25 times) that the
  first half of the slide's tissue tiles need, through :meth:`wsiseg.slide.ScaledView.read`
  (OpenSlide's decoding and the ARGB -> RGB pass), on one thread.

``main_thread_floor_ms`` sums what the loop's main thread does (normalise, activation, window,
blend, release and quantisation); ``all_threads_floor_ms`` adds reading and encoding (their
threads). The ceilings are 1,000 / main-thread ms and 2,000 / all-threads ms (2 cores, perfect
overlap, no Python overhead).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def per_call_ms(fn, reps: int, per: int = 1) -> float:
    """Median of 5 timings of ``reps`` calls, in ms per call / ``per``."""
    fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        runs.append((time.perf_counter() - t) / reps / per * 1e3)
    return float(np.median(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", default=None, help="a slide to time reading on (default: the bundled sample)")
    ap.add_argument("--map", default=None, help="a wsiseg output folder whose level-0 chunks to encode")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import cv2
    import numcodecs
    import torch

    from wsiseg.bench import machine
    from wsiseg.blend import ChunkBlender, window
    from wsiseg.cli import SAMPLE
    from wsiseg.models import load_model
    from wsiseg.predict import Predictor
    from wsiseg.slide import ScaledView, open_slide
    from wsiseg.store import COMPRESSOR, ProbabilityStore
    from wsiseg.tiling import TileGrid, window_blocks

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    N, C, T, S, CH = 8, 5, 256, 128, 512
    rng = np.random.default_rng(0)
    win = window(T)
    res: dict[str, float] = {}

    model = load_model(None)
    pred = Predictor(model, "cpu", threads=1)
    tiles = rng.integers(0, 256, (N, T, T, 3), dtype=np.uint8)
    res["lut_normalise"] = per_call_ms(lambda: pred.normalise(tiles), 20, N)
    z1, z5 = torch.randn(N, 1, T, T), torch.randn(N, C, T, T)
    res["sigmoid_1map"] = per_call_ms(lambda: torch.sigmoid(z1), 20, N)
    res["sigmoid_5maps"] = per_call_ms(lambda: torch.sigmoid(z5), 10, N)
    out = np.empty((N, C, T, T), np.float32)
    p1 = rng.random((N, 1, T, T), dtype=np.float32)
    p5 = rng.random((N, T, T, C), dtype=np.float32).transpose(0, 3, 1, 2)  # NHWC memory, NCHW view
    res["window_multiply_1to5"] = per_call_ms(lambda: np.multiply(p1, win, out=out), 20, N)
    res["window_multiply_5nhwc"] = per_call_ms(lambda: np.multiply(p5, win, out=out), 10, N)

    # ChunkBlender.add and release in the pipeline's order over a 3,000 px square, all tiles
    H = W = 3000
    grid = TileGrid((H, W), T, 0.5)
    keep = np.ones((len(grid.ys), len(grid.xs)), bool)
    order = [(blk.y, int(grid.xs[c])) for blk in window_blocks(grid, keep, CH, 0, None, 8) for c in blk.cols]
    probs = rng.random((N, C, T, T), dtype=np.float32) * win

    def blend_pass() -> tuple[float, float, float]:
        """ms per tile: add, release without quantisation, quantisation."""
        b = ChunkBlender((H, W), C, T, CH, cols=2 * CH)
        for y, x in order:
            b.expect(y, x)
        ta = tr = tq = 0.0
        for i, (y, x) in enumerate(order):
            t = time.perf_counter()
            b.add(probs[i % N], y, x, weighted=True)
            t1 = time.perf_counter()
            ta += t1 - t
            for _, _, blk in b.release():
                t2 = time.perf_counter()
                ProbabilityStore.to_uint8(blk)
                tq += time.perf_counter() - t2
            tr += time.perf_counter() - t1
        n = len(order) / 1e3
        return ta / n, (tr - tq) / n, tq / n

    blend_pass()  # warm: the buffer pool's pages
    adds, rels, quants = zip(*(blend_pass() for _ in range(3)))
    # release runs per block: per tile = per output area of one tile (S x S) as the grid's tiles share H x W
    share = (len(order) * S * S) / (H * W)  # tiles per S x S of output (about 1 here)
    res["blend_add"] = float(np.median(adds))
    res["release_normalise"] = float(np.median(rels)) * share
    res["quantise_uint8"] = float(np.median(quants)) * share
    acc, wsum = np.zeros((C, CH, 2 * CH), np.float32), np.zeros((CH, 2 * CH), np.float32)

    def bare_add() -> None:
        for i in range(N):
            a_ = acc[:, 100:356, 300:556]
            np.add(a_, probs[i], out=a_)
            w_ = wsum[100:356, 300:556]
            np.add(w_, win, out=w_)

    res["numpy_add_floor"] = per_call_ms(bare_add, 10, N)

    # encoding: whole 512 x 512 chunks of a real map (or a smooth synthetic one), per tile's share
    codec = numcodecs.get_codec(COMPRESSOR)
    if a.map:
        import zarr

        z = zarr.open_group(str(Path(a.map) / "probabilities.zarr"), mode="r")["0"]
        r0, c0 = z.shape[1] // 2 // CH * CH, z.shape[2] // 2 // CH * CH  # a chunk in the middle of the map
        chunk = np.ascontiguousarray(z[:, r0:r0 + CH, c0:c0 + CH])
    else:
        yy, xx = np.mgrid[:CH, :CH]
        chunk = np.stack([(np.sin(yy / (7 + c)) * np.cos(xx / 9) * 127 + 128) for c in range(C)]).astype(np.uint8)
    res["encode_chunks"] = per_call_ms(lambda: [codec.encode(np.ascontiguousarray(chunk[c]))
                                                for c in range(chunk.shape[0])], 10) / (CH * CH / (S * S))
    res["encode_source"] = a.map or "synthetic"

    # reading: the pieces the pipeline reads (read_pieces: strips of a band, each pixel read about
    # 1.25 times) for the tissue tiles of the slide's first bands, one thread
    slide = Path(a.slide) if a.slide else SAMPLE
    reader = open_slide(slide)
    try:
        from wsiseg.tiling import read_pieces
        from wsiseg.tissue import tissue_mask

        view = ScaledView.create(reader, model.mpp)
        g = TileGrid(view.shape, T, 0.5)
        keep_s = g.tissue_tiles(tissue_mask(reader.thumbnail(2048)))
        blocks = window_blocks(g, keep_s, CH, 0, None, 8)
        pieces, _, tile_piece = read_pieces(blocks, g, 8 * S)
        used = sorted({i for per_tile in tile_piece[: len(blocks) // 2] for ids in per_tile for i in ids})
        n_tiles = sum(len(blk.cols) for blk in blocks[: len(blocks) // 2])

        def read_all() -> None:
            for i in used:
                q = pieces[i]
                view.read(q.y, q.x, q.h, q.w)

        res["read_decode"] = per_call_ms(read_all, 1, n_tiles)
        res["read_tiles_timed"] = n_tiles
    finally:
        reader.close()

    main_ops = ["lut_normalise", "sigmoid_1map", "window_multiply_1to5", "blend_add", "release_normalise",
                "quantise_uint8"]
    main_ms = sum(res[k] for k in main_ops)
    all_ms = main_ms + res["read_decode"] + res["encode_chunks"]
    real5 = main_ms - res["sigmoid_1map"] - res["window_multiply_1to5"] + res["sigmoid_5maps"] \
        + res["window_multiply_5nhwc"]
    out_json = {
        "benchmark": "io_floor", "machine": machine(), "slide": str(slide), "tile": T, "stride": S,
        "channels": C, "batch": N, "threads": 1,
        "ms_per_tile": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
        "main_thread_ops": main_ops,
        "main_thread_floor_ms": round(main_ms, 3),
        "all_threads_floor_ms": round(all_ms, 3),
        "ceiling_tiles_per_second_main_thread": round(1000 / main_ms, 1),
        "ceiling_tiles_per_second_2_cores": round(2000 / all_ms, 1),
        "main_thread_floor_ms_real_5_channel_network": round(real5, 3),
    }
    print(json.dumps(out_json, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out_json, indent=2) + "\n")


if __name__ == "__main__":
    main()
