"""The tile grid at model resolution, its tissue filter, and grouping into block reads.

Coordinates are model pixels (y, x) of the tile's top-left corner. The grid starts half a
stride before the image (at -stride/2) and ends half a stride past it, so every image pixel lies
at least stride/2 inside some tile and the blending window never leaves a pixel without weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    shape: tuple[int, int]  # image (H, W) in model px
    tile: int = 256
    overlap: float = 0.5

    def __post_init__(self):
        if self.tile < 16:
            raise ValueError(f"tile must be at least 16 px, got {self.tile}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.stride < 1:
            raise ValueError("overlap leaves a stride under 1 px")

    @property
    def stride(self) -> int:
        return int(round(self.tile * (1 - self.overlap)))

    @property
    def margin(self) -> int:
        """How far the grid starts before the image (and ends after it)."""
        return (self.tile - self.stride) // 2

    def _axis(self, n: int) -> np.ndarray:
        t, s, m = self.tile, self.stride, self.margin
        count = max(1, math.ceil((n + 2 * m - t) / s) + 1)
        return -m + s * np.arange(count)

    @property
    def ys(self) -> np.ndarray:
        return self._axis(self.shape[0])

    @property
    def xs(self) -> np.ndarray:
        return self._axis(self.shape[1])

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def tissue_tiles(self, mask: np.ndarray | None) -> np.ndarray:
        """Boolean (rows, cols): tiles that hold any tissue of ``mask`` (any size; rescaled)."""
        ys, xs = self.ys, self.xs
        keep = np.ones((len(ys), len(xs)), bool)
        if mask is None:
            return keep
        H, W = self.shape
        mh, mw = mask.shape
        # Integral image of the mask for O(1) box sums per tile.
        ii = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for r, y in enumerate(ys):
            y0 = min(max(0, math.floor(max(y, 0) * mh / H)), mh - 1)
            y1 = max(y0 + 1, min(mh, math.ceil(min(y + self.tile, H) * mh / H)))
            for c, x in enumerate(xs):
                x0 = min(max(0, math.floor(max(x, 0) * mw / W)), mw - 1)
                x1 = max(x0 + 1, min(mw, math.ceil(min(x + self.tile, W) * mw / W)))
                keep[r, c] = (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) > 0
        return keep


@dataclass(frozen=True)
class Block:
    """A run of tiles in one tile row, read from the slide as one rectangle."""

    row: int
    cols: tuple[int, ...]  # tile column indices, consecutive
    y: int  # model px of the rectangle's top-left
    x: int
    h: int
    w: int


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
