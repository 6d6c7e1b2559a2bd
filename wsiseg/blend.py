"""Seamless blending of overlapping tile predictions with bounded memory.

Each tile's probabilities are weighted by a window and accumulated as a weighted sum and a
weight per pixel; a pixel's value is sum / weight. :class:`tests.reference.BandBlender` (the oracle) keeps accumulators per
band of ``band`` rows (the store's chunk height) across the whole width and releases a band as
soon as no later tile can touch it: memory follows the slide's width. :class:`ChunkBlender`
(what the pipeline uses) keeps them per block of one band by a few chunk widths and releases
each block once its last tile is in; with tiles in :func:`wsiseg.tiling.window_blocks` order its
memory is a few blocks plus the strip the current band's tiles reach into the next, and its
output is bit-identical to that oracle's.
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from typing import Iterator

import numpy as np

# Blocks waiting for the next band stay in memory up to this many MB, then go to a spill folder
# (``wsiseg-blend-*``; the pipeline puts it in the run folder, so a killed run leaves nothing
# elsewhere and the next run removes it).
SPILL_MB = 16.0


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


def normalise(s: np.ndarray, wsum: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` = weighted sums (C, h, w) / weights (h, w), 0 where the weight is at most 1e-6
    (``out`` may be ``s``). The same float32 quotients as ``np.divide(..., where=wsum > 1e-6)``
    into zeros, without the masked (and much slower) ufunc loop."""
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(s, wsum, out=out)
    low = ~(wsum > 1e-6)
    if low.any():
        out[:, low] = 0
    return out


def trim_heap(every: float = 0.0) -> None:
    """Hand malloc's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing),
    unless the last call was less than ``every`` seconds ago.

    Buffers of the model, the reader threads and Zarr's codecs come and go in every batch; the
    holes they leave in malloc's heaps otherwise keep the RSS creeping up over a long run, more
    so the wider the slide. One call takes a few milliseconds."""
    global _malloc_trim, _last_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    now = time.monotonic()
    if _malloc_trim and now - _last_trim >= every:
        _malloc_trim(0)
        _last_trim = now


_malloc_trim = None
_last_trim = -1e9


class BufferPool:
    """float32 arrays of 1 MB or more on pages of their own (anonymous mmap), recycled.

    The blender's blocks come and go all the run; taken from malloc's heap, they would leave it
    fragmented and the process's RSS creeping up with the slide's size, and fresh mappings
    would cost a page fault per 4 kB. Buffers handed back with :meth:`give` (up to
    ``max_bytes`` of them) serve the next request of the same size.
    """

    def __init__(self, max_bytes: int = 24 * 2**20):
        self.max_bytes = max_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._get(shape, True)

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """Like :meth:`zeros`, but a recycled buffer keeps whatever it held."""
        return self._get(shape, False)

    def _get(self, shape: tuple[int, ...], zero: bool) -> np.ndarray:
        n = int(np.prod(shape)) * 4
        if n < 2**20:
            return np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
        free = self._free.get(n)
        if free:
            self._bytes -= n
            a = np.frombuffer(free.pop(), np.float32).reshape(shape)
            if zero:
                a.fill(0)
            return a
        return np.frombuffer(mmap.mmap(-1, n), np.float32).reshape(shape)

    def give(self, *arrays: np.ndarray) -> None:
        """Take back arrays made by :meth:`zeros` that nothing uses any more."""
        for a in arrays:
            m = a.base
            while m is not None and not isinstance(m, mmap.mmap):
                m = m.obj if isinstance(m, memoryview) else getattr(m, "base", None)
            if m is None or a.nbytes != len(m) or self._bytes + len(m) > self.max_bytes:
                continue  # from the heap, a part of a buffer, or the pool is full: let it go
            self._free.setdefault(len(m), []).append(m)
            self._bytes += len(m)


class ChunkBlender:
    """The same weighted accumulation as the band-by-band oracle (``tests/reference.py``), held in blocks of ``band`` rows by
    ``cols`` columns (a multiple of the store's chunk width) instead of whole-width bands.

    ``expect(y, x)`` announces each tile before the first ``add``; a block is released, normalised,
    once every tile announced for it has been added. With tiles in the order of
    :func:`wsiseg.tiling.window_blocks`, what is open at a time is a few blocks of the current
    band plus the strip that its tiles reach into the next band (``tile - stride`` rows, or so,
    allocated only as deep as tiles reach). That strip spans the width: once the current band's
    blocks in its columns are released, its blocks wait for the next band's pass, in memory up
    to ``spill_mb`` (default :data:`SPILL_MB`) and beyond that in a temporary folder
    (``wsiseg-blend-*`` in ``spill_dir``, default the system's temporary folder),
    read back when the next band reaches them; memory is then flat in the slide's size. Values
    are bit-identical to that oracle when every pixel receives its tiles in the same
    order (window_blocks guarantees that). Blocks live in recycled buffers of their own pages
    (:class:`BufferPool`). Call :meth:`close` (or use ``with``) to remove the temporary folder
    early.
    """

    def __init__(self, shape: tuple[int, int], channels: int, tile: int, band: int, kind: str = "hann",
                 first_band: int = 0, stop_band: int | None = None, cols: int | None = None,
                 spill_mb: float | None = None, spill_dir: str | None = None):
        self.H, self.W = shape
        self.C = channels
        self.band = band
        self.cols = cols or band
        self.win = window(tile, kind)
        self.tile = tile
        n = -(-self.H // band)
        self.n_bands = n if stop_band is None else min(stop_band, n)
        self.first_band = first_band
        self.n_cols = -(-self.W // self.cols)
        # tiles still to come, per block (band - first_band, column block)
        self._pending = np.zeros((max(0, self.n_bands - first_band), self.n_cols), np.int32)
        self._acc: dict[tuple[int, int], list[np.ndarray]] = {}  # (band, col block) -> [sum, weight]
        self._next = (first_band, 0)  # the first block not yet released
        self._waiting: dict[tuple[int, int], int] = {}  # blocks waiting for a later band: bytes in memory
        self._waiting_bytes = 0
        self._spill_bytes = int((SPILL_MB if spill_mb is None else spill_mb) * 2**20)
        self._spill_root = spill_dir
        self._spill_dir: str | None = None
        self._spilled: dict[tuple[int, int], tuple[str, int]] = {}  # block -> (file, rows)
        self.spilled_blocks = 0  # how many blocks went through the disk (statistics)
        self._pool = BufferPool()
        self._lent: list[np.ndarray] = []  # released blocks, back to the pool at the next step

    def __enter__(self) -> "ChunkBlender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill folder, if any."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
            self._spilled.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _span(self, y: int, x: int) -> tuple[int, int, int, int] | None:
        """Bands [b0, b1) and column blocks [k0, k1) that a tile at (y, x) contributes to."""
        T = self.tile
        x0, x1 = max(x, 0), min(x + T, self.W)
        y0, y1 = max(y, 0, self.first_band * self.band), min(y + T, self.H, self.n_bands * self.band)
        if x1 <= x0 or y1 <= y0:
            return None
        return y0 // self.band, -(-y1 // self.band), x0 // self.cols, -(-x1 // self.cols)

    def expect(self, y: int, x: int) -> None:
        """Announce a tile at model px (y, x) that will be added later."""
        sp = self._span(y, x)
        if sp is not None:
            b0, b1, k0, k1 = sp
            self._pending[b0 - self.first_band : b1 - self.first_band, k0:k1] += 1

    def _take(self, key: tuple[int, int]) -> list[np.ndarray] | None:
        """The accumulators of a block, back in memory if they were spilled; no longer waiting."""
        nbytes = self._waiting.pop(key, None)
        if nbytes is not None:
            self._waiting_bytes -= nbytes
        spilled = self._spilled.pop(key, None)
        if spilled is None:
            return self._acc.get(key)
        path, rows = spilled
        w = min(self.cols, self.W - key[1] * self.cols)
        acc = [self._pool.zeros((self.C, rows, w)), self._pool.zeros((rows, w))]
        with open(path, "rb") as f:
            if f.readinto(acc[0]) != acc[0].nbytes or f.readinto(acc[1]) != acc[1].nbytes:
                raise OSError(f"{path}: spilled blending block cut short")
        os.remove(path)
        self._acc[key] = acc
        return acc

    def _wait_or_spill(self, key: tuple[int, int]) -> None:
        """A block that the current band's tiles are done with waits for a later band's: in
        memory while the waiting blocks fit in ``spill_mb``, else on disk."""
        acc = self._acc[key]
        nbytes = acc[0].nbytes + acc[1].nbytes
        if self._waiting_bytes + nbytes <= self._spill_bytes:
            self._waiting[key] = nbytes
            self._waiting_bytes += nbytes
            return
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="wsiseg-blend-", dir=self._spill_root)
        path = os.path.join(self._spill_dir, f"{key[0]}-{key[1]}.f32")
        with open(path, "wb") as f:
            acc[0].tofile(f)
            acc[1].tofile(f)
        self._spilled[key] = (path, acc[1].shape[0])
        del self._acc[key]
        self._pool.give(*acc)
        self.spilled_blocks += 1

    def _get(self, b: int, k: int, rows: int, full: bool) -> list[np.ndarray]:
        """The accumulators of block (b, k), at least ``rows`` deep (the band's full height when
        ``full``: a tile that starts in this band; else only as deep as asked, e.g. the strip
        that the band above's tiles reach into)."""
        acc = self._take((b, k)) if self._waiting or self._spilled else self._acc.get((b, k))
        if acc is None or acc[1].shape[0] < rows:
            band_rows = min(self.band, self.H - b * self.band)
            n = band_rows if full else rows
            w = min(self.cols, self.W - k * self.cols)
            s, wsum = self._pool.zeros((self.C, n, w)), self._pool.zeros((n, w))
            if acc is not None:
                m = acc[1].shape[0]
                s[:, :m] = acc[0]
                wsum[:m] = acc[1]
                self._pool.give(*acc)
            acc = [s, wsum]
            self._acc[(b, k)] = acc
        return acc

    def add(self, probs: np.ndarray, y: int, x: int, weighted: bool = False) -> None:
        """Accumulate one announced tile's probabilities (C, T, T) float32 at model px (y, x);
        ``weighted``: ``probs`` is already multiplied by the window (e.g. a whole batch at once)."""
        sp = self._span(y, x)
        if sp is None:
            return
        b0, b1, k0, k1 = sp
        pend = self._pending[b0 - self.first_band : b1 - self.first_band, k0:k1]
        if (pend <= 0).any():
            raise RuntimeError(f"tile at ({y}, {x}) was not announced, or its blocks were already released")
        pend -= 1
        T, bh, cw = self.tile, self.band, self.cols
        win = self._acc_win
        pw = probs if weighted else probs * win
        ya, yb = max(y, 0, self.first_band * bh), min(y + T, self.H, self.n_bands * bh)
        xa, xb = max(x, 0), min(x + T, self.W)
        for b in range(b0, b1):
            ty0, ty1 = max(ya, b * bh) - y, min(yb, (b + 1) * bh) - y
            r0, r1 = ty0 + y - b * bh, ty1 + y - b * bh
            full = max(y, 0) >= b * bh  # the tile starts in this band
            for k in range(k0, k1):
                tx0, tx1 = max(xa, k * cw) - x, min(xb, (k + 1) * cw) - x
                c0, c1 = tx0 + x - k * cw, tx1 + x - k * cw
                s, wsum = self._get(b, k, r1, full)
                s[:, r0:r1, c0:c1] += pw[:, ty0:ty1, tx0:tx1]
                wsum[r0:r1, c0:c1] += win[ty0:ty1, tx0:tx1]

    _normalise = staticmethod(normalise)

    @property
    def _acc_win(self):
        """The window as the accumulators hold numbers (here the NumPy array itself)."""
        return self.win

    def _finish(self, out):
        """A released block as it is yielded (here the float32 probabilities themselves)."""
        return out

    def release(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (band, first column, (C, rows, width) float32 probabilities) for each block, in
        band then column order, as soon as it and every block before it have all their tiles
        (a block no tile touches: zeros). After the last block of a band, the band is final.
        Each array is valid until the loop asks for the next (its buffer is then reused): write
        or copy it, do not keep it."""
        self._pool.give(*self._lent)
        self._lent.clear()
        while self._next[0] < self.n_bands:
            b, k = self._next
            if self._pending[b - self.first_band, k]:
                return
            rows = min(self.band, self.H - b * self.band)
            w = min(self.cols, self.W - k * self.cols)
            acc = self._take((b, k))
            self._acc.pop((b, k), None)
            if acc is None:
                out = self._pool.zeros((self.C, rows, w))
            else:
                s, wsum = acc
                n = wsum.shape[0]
                out = s if n == rows else self._pool.empty((self.C, rows, w))  # normalised in place
                self._normalise(s, wsum, out[:, :n])
                out[:, n:] = 0
                self._pool.give(wsum)
                if out is not s:
                    self._pool.give(s)
            # the blocks below in these columns have every tile of this band: they wait
            for key in [key for key in self._acc if key[1] == k and key[0] > b and key not in self._waiting]:
                self._wait_or_spill(key)
            self._next = (b, k + 1) if k + 1 < self.n_cols else (b + 1, 0)
            self._lent.append(out)
            yield b, k * self.cols, self._finish(out)
            self._pool.give(*self._lent)
            self._lent.clear()

    @property
    def open_blocks(self) -> int:
        """Blocks with accumulators, in memory or spilled."""
        return len(self._acc) + len(self._spilled)


class _TensorPool:
    """:class:`BufferPool`'s interface for torch tensors on a device (the caching allocator of
    the device recycles memory, so nothing is kept here)."""

    def __init__(self, device):
        self.device = device

    def zeros(self, shape: tuple[int, ...]):
        import torch

        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def empty(self, shape: tuple[int, ...]):
        import torch

        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def give(self, *arrays) -> None:
        pass


def tensor_to_uint8(probs):
    """round(clip(p, 0, 1) * 255) as uint8 (halves to even) of a float32 tensor, on its device:
    the same bytes as :meth:`wsiseg.store.ProbabilityStore.to_uint8` (float32 product, rounding
    half to even, saturation) for every finite value."""
    import torch

    return torch.round(probs.clamp(0, 1) * 255).to(torch.uint8)


class DeviceChunkBlender(ChunkBlender):
    """:class:`ChunkBlender` with its accumulators as torch tensors on ``device`` (a GPU): tiles'
    windowed probabilities are added where the network left them, finished blocks are
    normalised and quantised there, and only their uint8 bytes come back to the host.
    ``add`` takes (C, T, T) float32 tensors on the device; ``release`` yields (band, first
    column, (C, rows, width) uint8 NumPy array) in the same order as :class:`ChunkBlender`, with
    the same bytes that :class:`ChunkBlender` followed by the store's quantisation writes (the
    same float32 additions in the same order, IEEE division, rounding half to even). The strip
    a band's tiles reach into the next stays in device memory (no spilling to disk):
    (tile - stride) rows x the slide's width x (channels + 1) x 4 bytes, e.g. 460 MB for
    5 channels across 150,000 px at 50% overlap of 256 px tiles."""

    def __init__(self, shape: tuple[int, int], channels: int, tile: int, band: int, kind: str = "hann",
                 first_band: int = 0, stop_band: int | None = None, cols: int | None = None, device="cuda"):
        import torch

        super().__init__(shape, channels, tile, band, kind, first_band, stop_band, cols)
        self.device = torch.device(device)
        self._pool = _TensorPool(self.device)
        self._spill_bytes = float("inf")  # blocks waiting for the next band stay on the device
        self._win_dev = torch.from_numpy(self.win).to(self.device)

    @property
    def _acc_win(self):
        return self._win_dev

    @staticmethod
    def _normalise(s, wsum, out):
        """``out`` = s / wsum, 0 where the weight is at most 1e-6 (as :func:`normalise`)."""
        import torch

        torch.div(s, wsum, out=out)
        out.masked_fill_(~(wsum > 1e-6), 0)
        return out

    def _finish(self, out):
        return tensor_to_uint8(out).cpu().numpy()
