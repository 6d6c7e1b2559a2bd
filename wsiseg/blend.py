"""Seamless blending of overlapping tile predictions with bounded memory.

Each tile's probabilities are weighted by a window and accumulated as a weighted sum and a
weight per pixel; a pixel's value is sum / weight. Accumulators live per band of ``band`` rows
(the store's chunk height) and a band is released, normalised, as soon as no later tile can touch
it, so memory is bounded by about (tile + band) rows of the image, never the whole slide.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def window(tile: int, kind: str = "hann") -> np.ndarray:
    """(tile, tile) float32 weights.

    ``hann``: the periodic Hann window sin^2(pi (i + 0.5) / tile); at 50% overlap its shifted
    copies sum to exactly 1, so interior pixels are a convex mix with no seam. ``gaussian``:
    sigma = tile / 8 (MONAI's default), floored at 1e-3. ``flat``: the plain mean.
    """
    i = np.arange(tile, dtype=np.float64) + 0.5
    if kind == "hann":
        w1 = np.sin(np.pi * i / tile) ** 2
    elif kind == "gaussian":
        w1 = np.exp(-0.5 * ((i - tile / 2) / (tile / 8)) ** 2)
        w1 = np.maximum(w1, 1e-3)
    elif kind == "flat":
        w1 = np.ones(tile)
    else:
        raise ValueError(f"unknown window {kind!r}; use hann, gaussian or flat")
    return np.outer(w1, w1).astype(np.float32)


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
                out = np.divide(s, wsum, out=np.zeros_like(s), where=wsum > 1e-6)
            self.next_band += 1
            yield b, out

    @property
    def open_bands(self) -> int:
        return len(self._acc)
