"""Oracles for the engine's fast paths: the simple versions the tests compare them against.

* :class:`BandBlender`: weighted accumulation of tiles band by band, whole bands held in memory
  (the engine's :class:`wsiseg.blend.ChunkBlender` must give the same bytes);
* :func:`blocks`: the kept tiles of each row grouped into runs (row-major block order).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from wsiseg.blend import normalise, window
from wsiseg.tiling import Block, TileGrid


class BandBlender:
    """Weighted accumulation of (C, T, T) tiles into an (C, H, W) image, band by band.

    ``first_band``: bands before it are already written (a resumed run) and ``stop_band``: the
    first band not ours; contributions outside are dropped. Tile coordinates are model px and
    may reach outside the image.
    """

    def __init__(self, shape: tuple[int, int], channels: int, tile: int, band: int,
                 kind: str = "hann", first_band: int = 0, stop_band: int | None = None):
        self.H, self.W = shape
        self.C = channels
        self.band = band
        self.win = window(tile, kind)
        self.tile = tile
        # Bands [first_band, stop_band) are ours; contributions elsewhere are dropped (resumed
        # runs, or another process writing the other bands).
        self.n_bands = -(-self.H // band) if stop_band is None else min(stop_band, -(-self.H // band))
        self.next_band = first_band  # the first band not yet emitted
        self._acc: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _get(self, b: int):
        acc = self._acc.get(b)
        if acc is None:
            rows = min(self.band, self.H - b * self.band)
            acc = (np.zeros((self.C, rows, self.W), np.float32), np.zeros((rows, self.W), np.float32))
            self._acc[b] = acc
        return acc

    def add(self, probs: np.ndarray, y: int, x: int) -> None:
        """Accumulate one tile's probabilities (C, T, T) float32 at model px (y, x)."""
        T = self.tile
        x0, x1 = max(x, 0), min(x + T, self.W)
        if x1 <= x0:
            return
        y_start = max(y, 0, self.next_band * self.band)
        y_end = min(y + T, self.H, self.n_bands * self.band)
        yy = y_start
        while yy < y_end:
            b = yy // self.band
            b_end = min((b + 1) * self.band, y_end)
            s, wsum = self._get(b)
            ty0, ty1 = yy - y, b_end - y
            r0, r1 = yy - b * self.band, b_end - b * self.band
            w = self.win[ty0:ty1, x0 - x : x1 - x]
            s[:, r0:r1, x0:x1] += probs[:, ty0:ty1, x0 - x : x1 - x] * w
            wsum[r0:r1, x0:x1] += w
            yy = b_end

    def release(self, final_row: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (band index, (C, rows, W) float32 probabilities) for every band whose rows are
        all below ``final_row`` (no later tile touches them), in order. Pass the image height
        (or more) at the end to release the rest."""
        while self.next_band < self.n_bands:
            b = self.next_band
            end = min((b + 1) * self.band, self.H)
            if end > final_row:
                return
            s, wsum = self._acc.pop(b, (None, None))
            if s is None:
                rows = end - b * self.band
                out = np.zeros((self.C, rows, self.W), np.float32)
            else:
                out = normalise(s, wsum, s)
            self.next_band += 1
            yield b, out

    @property
    def open_bands(self) -> int:
        return len(self._acc)


def blocks(grid: TileGrid, keep: np.ndarray, max_tiles: int = 8, start_row: int = 0) -> list[Block]:
    """Group the kept tiles of each row (from ``start_row``) into runs of up to ``max_tiles``."""
    out = []
    ys, xs = grid.ys, grid.xs
    for r in range(start_row, len(ys)):
        run: list[int] = []
        for c in range(len(xs) + 1):
            if c < len(xs) and keep[r, c] and len(run) < max_tiles:
                run.append(c)
                continue
            if run:
                x0 = int(xs[run[0]])
                out.append(Block(r, tuple(run), int(ys[r]), x0, grid.tile, int(xs[run[-1]]) + grid.tile - x0))
            run = [c] if c < len(xs) and keep[r, c] else []
    return out
