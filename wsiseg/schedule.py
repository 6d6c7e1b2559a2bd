"""Reading the tiles: block reads scheduled with Dask's threaded scheduler, feeding a bounded
prefetch queue (:class:`BlockPrefetcher`), and the tiles cut from them in batches
(:class:`TileStream`).

Reading (OpenSlide decode, resampling) runs in reader threads while the main thread runs the
model, so I/O hides behind compute. At most ``max_in_flight`` blocks are held in memory.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import dask
import numpy as np

from wsiseg.slide import ScaledView
from wsiseg.tiling import Block, TileGrid, read_pieces

_DONE = object()


class BlockPrefetcher:
    """Iterate (block, pixels (h, w, 3) uint8) in order, reading ahead in the background."""

    def __init__(self, view: ScaledView, blocks: list[Block], workers: int = 2, max_in_flight: int = 8):
        self.view = view
        self.blocks = blocks
        self.workers = max(1, workers)
        self.q: queue.Queue = queue.Queue(maxsize=max(1, max_in_flight))
        self.stop = threading.Event()
        self.read_seconds = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="wsiseg-reader")

    def _read(self, b: Block) -> np.ndarray:
        return self.view.read(b.y, b.x, b.h, b.w)

    def _run(self) -> None:
        try:
            n = self.workers
            for i in range(0, len(self.blocks), n):
                if self.stop.is_set():
                    return
                group = self.blocks[i : i + n]
                t0 = time.perf_counter()
                tasks = [dask.delayed(self._read)(b, dask_key_name=f"read-{i + j}") for j, b in enumerate(group)]
                arrays = dask.compute(*tasks, scheduler="threads", num_workers=n)
                self.read_seconds += time.perf_counter() - t0
                for b, a in zip(group, arrays):
                    while not self.stop.is_set():
                        try:
                            self.q.put((b, a), timeout=0.2)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # surfaced in the consumer
            self.q.put(e)
            return
        self.q.put(_DONE)

    def __iter__(self) -> Iterator[tuple[Block, np.ndarray]]:
        self._thread.start()
        try:
            while True:
                item = self.q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # stop the reader and wait for its reads in flight: the slide handle may be closed
            # right after this (OpenSlide aborts on a handle closed under a running read)
            self.stop.set()
            while self._thread.is_alive():
                try:  # unblock a put of the reader's last item
                    self.q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()


def _warm_dask() -> None:
    """Dask's first compute in a process imports its distributed module (about half a second):
    pay it at setup rather than in the middle of the first reads."""
    import sys

    if "distributed" not in sys.modules:
        import dask

        dask.compute(dask.delayed(int)(0), scheduler="sync")


class TileStream:
    """The tiles of ``blocks`` in their order, in batches: iterate ``(tiles, where)``, tiles an
    (n, T, T, 3) uint8 array (n = ``batch_size``, the last batch fewer), where their (y, x). The
    array is reused: it is valid until the next batch is asked for.

    Reads run ahead in :class:`BlockPrefetcher`'s reader threads. With blocks
    from :func:`~wsiseg.tiling.window_blocks` and a view whose pixels do not depend on the rectangle they are
    read in (:attr:`~wsiseg.slide.ScaledView.exact_subreads`), the slide is read in pieces
    (:func:`~wsiseg.tiling.read_pieces`) and tiles are cut from them: a block that reaches outside the image is
    put together from its part inside and mirrored exactly as :meth:`ScaledView.read` would mirror
    it, so every tile is the one reading its block would give. Otherwise each block is read.
    Memory: the pieces that blocks still need (a few strips of a band) plus ``max_in_flight``
    reads ahead. ``read_seconds``: wall time of the reads in the threads; ``wait_seconds``: time
    the consumer waited for them; ``pixels_read``.
    """

    def __init__(self, view, grid: TileGrid, blocks: list[Block], batch_size: int, workers: int = 2,
                 cols: int | None = None, max_in_flight: int | None = None, pieces: bool = True):
        self.view, self.grid, self.blocks = view, grid, blocks
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.pieces = bool(pieces and blocks and view.exact_subreads and all(b.band >= 0 for b in blocks))
        if self.pieces:
            cols = cols or 8 * grid.stride
            self.reads, self._last, self._tile_piece = read_pieces(blocks, grid, cols)
            self.max_in_flight = max_in_flight or 2 * self.workers
        else:
            self.reads, self._last, self._tile_piece = list(blocks), list(range(len(blocks))), None
            self.max_in_flight = max_in_flight or 2 * self.workers + 2
        self.pixels_read = sum(b.h * b.w for b in self.reads)
        self.tiles = sum(len(b.cols) for b in blocks)
        self.wait_seconds = 0.0
        self._prefetch = None
        _warm_dask()

    @property
    def read_seconds(self) -> float:
        return self._prefetch.read_seconds if self._prefetch is not None else 0.0

    def _copy(self, dst: np.ndarray, y: int, x: int, ids: list[int], got: dict[int, np.ndarray]) -> None:
        """Fill ``dst`` (the image rectangle at (y, x), inside the image) from the pieces ``ids``."""
        h, w = dst.shape[:2]
        for i in ids:
            p = self.reads[i]
            lo, hi = max(x, p.x), min(x + w, p.x + p.w)
            if lo < hi:
                dst[:, lo - x : hi - x] = got[i][y - p.y : y - p.y + h, lo - p.x : hi - p.x]

    def _block_pixels(self, blk: Block, got: dict[int, np.ndarray], per_tile: list[list[int]]) -> np.ndarray:
        """A block that reaches outside the image, as ``view.read`` gives it, from its pieces."""
        view, T, xs = self.view, self.grid.tile, self.grid.xs
        H, W = view.shape
        if not (max(blk.y, 0) < min(blk.y + blk.h, H) and max(blk.x, 0) < min(blk.x + blk.w, W)):
            return view.read(blk.y, blk.x, blk.h, blk.w)  # entirely outside (not on a grid)
        y0, x0, y1, x1 = view.inner(blk.y, blk.x, blk.h, blk.w)
        inner = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for c, ids in zip(blk.cols, per_tile):
            a, b = max(int(xs[c]), x0), min(int(xs[c]) + T, x1)
            self._copy(inner[:, a - x0 : b - x0], y0, a, ids, got)
        return view.pad(inner, blk.y, blk.x, blk.h, blk.w)

    def __iter__(self):
        T, xs = self.grid.tile, self.grid.xs
        H, W = self.view.shape
        self._prefetch = BlockPrefetcher(self.view, self.reads, workers=self.workers, max_in_flight=self.max_in_flight)
        it = iter(self._prefetch)
        got: dict[int, np.ndarray] = {}
        n_got = 0
        buf = np.empty((self.batch_size, T, T, 3), np.uint8)
        where: list[tuple[int, int]] = []
        try:
            for n, blk in enumerate(self.blocks):
                per_tile = self._tile_piece[n] if self.pieces else [[n]] * len(blk.cols)
                need = max((i for ids in per_tile for i in ids), default=-1)
                if n_got <= need:
                    t0 = time.perf_counter()
                    while n_got <= need:
                        got[n_got] = next(it)[1]
                        n_got += 1
                    self.wait_seconds += time.perf_counter() - t0
                inside = blk.y >= 0 and blk.x >= 0 and blk.y + blk.h <= H and blk.x + blk.w <= W
                if not self.pieces:
                    src = got[n]
                elif not inside:
                    src = self._block_pixels(blk, got, per_tile)
                else:
                    src = None
                for c, ids in zip(blk.cols, per_tile):
                    x = int(xs[c])
                    if src is None:
                        self._copy(buf[len(where)], blk.y, x, ids, got)
                    else:
                        buf[len(where)] = src[:, x - blk.x : x - blk.x + T]
                    where.append((blk.y, x))
                    if len(where) == self.batch_size:
                        yield buf, where
                        where = []
                for i in {i for ids in per_tile for i in ids}:
                    if self._last[i] == n:
                        del got[i]
            if where:
                yield buf[: len(where)], where
        finally:
            it.close()
