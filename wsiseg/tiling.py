"""The tile grid at model resolution, its tissue filter, and grouping into block reads (row by
row, or in the pipeline's order of column windows band by band: :func:`window_blocks`).

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
        if mask is None:
            return np.ones((len(ys), len(xs)), bool)
        H, W = self.shape
        mh, mw = mask.shape
        # Integral image of the mask for O(1) box sums per tile: one int32 array (a 2048 px
        # thumbnail: 16 MB), cumulated in place.
        ii = np.zeros((mh + 1, mw + 1), np.int32)
        np.cumsum(mask, axis=0, dtype=np.int32, out=ii[1:, 1:])
        np.cumsum(ii[1:, 1:], axis=1, out=ii[1:, 1:])

        def edges(pos: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
            # the mask rows (or columns) [lo, hi) under tiles at ``pos`` on an axis of n px
            lo = np.clip(np.floor(np.maximum(pos, 0) * m / n), 0, m - 1).astype(np.intp)
            hi = np.maximum(lo + 1, np.minimum(m, np.ceil(np.minimum(pos + self.tile, n) * m / n))).astype(np.intp)
            return lo, hi

        y0, y1 = edges(ys, H, mh)
        x0, x1 = edges(xs, W, mw)
        box = ii[y1[:, None], x1] - ii[y0[:, None], x1] - ii[y1[:, None], x0] + ii[y0[:, None], x0]
        return box > 0


@dataclass(frozen=True)
class Block:
    """A run of tiles in one tile row, read from the slide as one rectangle."""

    row: int
    cols: tuple[int, ...]  # tile column indices, consecutive
    y: int  # model px of the rectangle's top-left
    x: int
    h: int
    w: int
    band: int = -1  # window_blocks: the band whose pass reads it, and the column window in that pass
    win: int = -1


def window_blocks(grid: TileGrid, keep: np.ndarray, chunk: int, first_band: int = 0, stop_band: int | None = None,
                  max_tiles: int = 8, window: int | None = None) -> list[Block]:
    """The kept tiles that touch level-0 bands [first_band, stop_band) (``chunk`` rows each), as
    blocks in an order that bounds the blender's memory by a fixed width, not the slide's.

    A tile row belongs to the band holding its top edge (rows above ``first_band`` to it). Band
    by band, the band's tile rows are walked in column windows of ``window`` px (default
    ``max_tiles`` strides), each window row by row, left to right, so what is open at a time is
    about one window of the band plus the strip that its tiles reach into the next band.
    Each row's windows are shifted left by one overlap reach per row below the band's first:
    then any two tiles that overlap come in the same relative order as in a plain row-major walk,
    so every pixel's weighted sum is accumulated in the same order, to the same float32 bits.
    Blocks carry ``band`` and ``win`` (their window's index in the band).
    """
    ys, xs = grid.ys, grid.xs
    T, s = grid.tile, grid.stride
    n_bands = -(-grid.shape[0] // chunk)
    stop_band = n_bands if stop_band is None else min(stop_band, n_bands)
    window = window or max_tiles * s
    # The largest column offset between two grid tiles that still overlap: a row's windows
    # start that much further left than the row above's.
    reach = s * ((T - 1) // s)
    row_lo = int(np.searchsorted(ys + T, first_band * chunk, side="right"))
    row_hi = int(np.searchsorted(ys, stop_band * chunk, side="left"))
    out: list[Block] = []
    rows_by_band: dict[int, list[int]] = {}
    for r in range(row_lo, row_hi):
        band = min(max(max(int(ys[r]), 0) // chunk, first_band), stop_band - 1)
        rows_by_band.setdefault(band, []).append(r)
    for band in sorted(rows_by_band):
        runs: list[tuple[int, int, list[int]]] = []  # (window, row, cols)
        for i, r in enumerate(rows_by_band[band]):
            cols = np.flatnonzero(keep[r])
            if not len(cols):
                continue
            wins = (xs[cols] - xs[0] + reach * i) // window
            run = [int(cols[0])]
            for c, w, pc, pw in zip(cols[1:].tolist(), wins[1:].tolist(), cols[:-1].tolist(), wins[:-1].tolist()):
                if c == pc + 1 and w == pw and len(run) < max_tiles:
                    run.append(c)
                else:
                    runs.append((pw, r, run))
                    run = [c]
            runs.append((int(wins[-1]), r, run))
        runs.sort(key=lambda t: (t[0], t[1]))  # stable: a row's runs stay left to right
        for w, r, run in runs:
            x0 = int(xs[run[0]])
            out.append(Block(r, tuple(run), int(ys[r]), x0, T, int(xs[run[-1]]) + T - x0, band, w))
    return out


def read_pieces(blocks: list[Block], grid: TileGrid, cols: int) -> tuple[list[Block], list[int], list[list[list[int]]]]:
    """Plan the slide reads of ``blocks`` (from :func:`window_blocks`) as *pieces*: per band, the
    image's columns cut into strips of ``cols`` px (from the grid's origin); a piece is the part
    of one strip that the band's kept tiles cover, as deep as those tiles reach (inside the
    image only). The pieces of a band do not overlap, so a pixel is read about
    (chunk + tile - stride) / chunk times (the band's tile rows reach into the next band)
    instead of tile / stride times per block row: 1.25 instead of 2 at 256 px tiles, 50%
    overlap and 512 px bands.

    Returns the pieces (as :class:`Block` with ``band`` and ``win`` = strip; ordered by when a
    block first needs them), for each block and each of its tiles the indices of the pieces
    holding the tile's pixels inside the image (one, or two where it crosses a strip's edge),
    and, per piece, the index of the last block that needs it."""
    xs = grid.xs
    H, W = grid.shape
    T = grid.tile
    x_origin = int(xs[0])
    index: dict[tuple[int, int], int] = {}
    boxes: list[list[int]] = []  # per piece: [y0, x0, y1, x1], inside the image and its strip
    keys: list[tuple[int, int]] = []
    tile_piece: list[list[list[int]]] = []
    for blk in blocks:
        y0, y1 = max(blk.y, 0), min(blk.y + T, H)
        per_tile = []
        for c in blk.cols:
            x = int(xs[c])
            a, b = max(x, 0), min(x + T, W)
            ids = []
            if y0 < y1 and a < b:
                for j in range((a - x_origin) // cols, (b - 1 - x_origin) // cols + 1):
                    lo, hi = max(a, x_origin + j * cols), min(b, x_origin + (j + 1) * cols)
                    key = (blk.band, j)
                    i = index.get(key)
                    if i is None:
                        i = index[key] = len(boxes)
                        boxes.append([y0, lo, y1, hi])
                        keys.append(key)
                    else:
                        bx = boxes[i]
                        bx[0], bx[1], bx[2], bx[3] = min(bx[0], y0), min(bx[1], lo), max(bx[2], y1), max(bx[3], hi)
                    ids.append(i)
            per_tile.append(ids)
        tile_piece.append(per_tile)
    last = [0] * len(boxes)
    for n, per_tile in enumerate(tile_piece):
        for ids in per_tile:
            for i in ids:
                last[i] = n
    pieces = [Block(-1, (), y0, x0, y1 - y0, x1 - x0, band, strip)
              for (band, strip), (y0, x0, y1, x1) in zip(keys, boxes)]
    return pieces, last, tile_piece
