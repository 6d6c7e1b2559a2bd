"""OME-Zarr (NGFF 0.4, Zarr format 2) writer for probability maps, block by block, resumable.

Layout of ``probabilities.zarr``::

    .zattrs   multiscales (axes c, y, x; scale in micrometres), omero.channels[].label, wsiseg{...}
    0/        level 0 at the model's resolution, uint8 = round(p * 255), chunks (1, 512, 512)
    1/, 2/..  each downsampled by 2 (mean of 2 x 2), for viewing

Level 0 is written in blocks of one chunk row by a few chunks, the pyramid in blocks too, so no
buffer spans the slide's width. Progress lives beside the store in ``progress.json`` (atomic
writes): the run's parameters and the number of level-0 bands (chunk rows) completely written.
``wsiseg.complete`` is set only after every level is written, so an interrupted run never looks
complete.
"""
from __future__ import annotations

import json
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numcodecs
import numpy as np
import zarr

from wsiseg.run_folder import check_owner

COLORS = ["FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF"]

# Blosc-zstd at level 1, no shuffle: on this project's probability maps (the default model on the
# sample slide and on two generated slides, levels 0 and 1) 2.5-3x faster to encode and about
# 1.8x faster to decode than level 3 with bit-shuffle, and 10% smaller. (Stores written with
# other settings keep theirs: every write uses the array's own codec.)
COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 1, "shuffle": 0, "blocksize": 0}


def atomic_write(path: Path, write, mode: str = "wb") -> None:
    """``write(f)`` into ``path`` whole or not at all: a temporary file beside it, synced, then
    renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # (an interrupt, a full disk): no half-written temporary file stays
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def n_levels(shape: tuple[int, int], chunk: int) -> int:
    """Levels down to the first whose longer side fits in one chunk."""
    h, w = shape
    n = 1
    while max(h, w) > chunk:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


def pool2(block: np.ndarray) -> np.ndarray:
    """(C, h, w) uint8 -> (C, ceil(h / 2), ceil(w / 2)): (a + b + c + d + 2) // 4 of each 2 x 2,
    the last row and column repeated where h or w is odd. OpenCV's INTER_AREA at exactly half
    size computes this sum with that rounding (checked against the uint16 arithmetic in the
    tests), about 6x faster than NumPy's strided views."""
    c, h, w = block.shape
    if h % 2 or w % 2:  # the level's last row or column: repeat the edge
        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    size = (block.shape[2] // 2, block.shape[1] // 2)
    out = np.empty((c, size[1], size[0]), np.uint8)
    for i in range(c):
        out[i] = cv2.resize(block[i], size, interpolation=cv2.INTER_AREA)
    return out


class ChunkWriter:
    """Writes whole chunks of one local Zarr v2 uint8 array as files, encoded in a background
    thread, the way Zarr writes them (the same codec and bytes; edge chunks padded with the fill
    value; a chunk that is all fill value is not stored, and removed if it was), without Zarr's
    per-chunk overhead (about as much as zstd's own time per 512 x 512 chunk). Jobs run in order
    in one thread, at most ``max_pending`` queued; :meth:`flush` waits for them and raises what
    failed. ``ok(meta)`` says whether an array's ``.zarray`` is one it writes exactly."""

    def __init__(self, array_dir: Path, meta: dict, max_pending: int = 4):
        self.dir = Path(array_dir)
        self.codec = numcodecs.get_codec(meta["compressor"])
        self.chunks = tuple(meta["chunks"])
        self.shape = tuple(meta["shape"])
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._dirs: set[Path] = set()
        self._failed = False  # a job failed: later ones (a progress record after it) must not run

    @staticmethod
    def ok(meta: dict) -> bool:
        return (meta.get("zarr_format") == 2 and meta.get("dtype") == "|u1" and meta.get("order") == "C"
                and not meta.get("filters") and meta.get("fill_value") == 0 and meta.get("compressor") is not None
                and meta.get("dimension_separator") == "/" and len(meta.get("chunks", ())) == 3
                and meta["chunks"][0] == 1)

    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the writer thread, after every job submitted before it."""
        while self._pending and (len(self._pending) >= self.max_pending or self._pending[0].done()):
            job = self._pending.popleft()
            if job.exception() is not None:  # (waits for it)
                self._pending.appendleft(job)
                self._drain()  # raises its error
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-writer")
        self._pending.append(self._pool.submit(self._run, fn, args))

    def _run(self, fn, args) -> None:
        if self._failed:
            raise RuntimeError("not run: an earlier write failed")
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def aligned(self, row: int, col: int, h: int, w: int) -> bool:
        """Whether rows [row, row + h) and columns [col, col + w) are whole chunks (at the
        array's edge: up to the edge)."""
        _, ch, cw = self.chunks
        _, H, W = self.shape
        return (row % ch == 0 and col % cw == 0 and row + h <= H and col + w <= W
                and (h % ch == 0 or row + h == H) and (w % cw == 0 or col + w == W))

    def put(self, row: int, col: int, data: np.ndarray) -> None:
        """Queue (C, h, w) uint8 at element (row, col), both chunk multiples; ``h`` and ``w``
        chunk multiples too or reaching the array's edge. ``data`` must not change afterwards."""
        self.submit(self._put, row, col, data)

    def _put(self, row: int, col: int, data: np.ndarray) -> None:
        _, ch, cw = self.chunks
        C, h, w = data.shape
        for c in range(C):
            for i in range(0, h, ch):
                for j in range(0, w, cw):
                    part = data[c, i : i + ch, j : j + cw]
                    if part.shape == (ch, cw):
                        chunk = np.ascontiguousarray(part)
                    else:  # an edge chunk, stored whole
                        chunk = np.zeros((ch, cw), np.uint8)
                        chunk[: part.shape[0], : part.shape[1]] = part
                    folder = self.dir / str(c) / str((row + i) // ch)
                    path = folder / str((col + j) // cw)
                    if not chunk.any():
                        try:
                            path.unlink()
                        except FileNotFoundError:
                            pass
                        continue
                    blob = self.codec.encode(chunk)
                    if folder not in self._dirs:
                        folder.mkdir(parents=True, exist_ok=True)
                        self._dirs.add(folder)
                    with open(path, "wb") as f:
                        f.write(blob)

    def _drain(self) -> None:
        """Wait for every queued job; raise the first failure (the jobs refused after it are not
        errors of their own)."""
        first = None
        while self._pending:
            exc = self._pending.popleft().exception()
            if exc is not None and first is None:
                first = exc
        self._failed = False
        if first is not None:
            raise first

    def flush(self) -> None:
        """Wait for every queued job (raising the first failure) and stop the thread."""
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class ProbabilityStore:
    """Writes an (C, H, W) probability map as a multiscale OME-Zarr image.

    Level-0 blocks and pyramid blocks are encoded and written by a :class:`ChunkWriter` in a
    background thread, progress records after them in the same thread; :meth:`flush` (called by
    :meth:`build_pyramid` and :meth:`mark_complete`) waits for all of it."""

    def __init__(self, path: Path, group: zarr.Group, progress_path: Path, run_id: str | None = None):
        self.path = path
        self.group = group
        self.progress_path = progress_path
        # the id of the run that created the store (None: a store from before run ids); progress
        # records, the completion flag and the summary are written only while progress.json has it
        self.run_id = run_id
        self._writers: dict[str, ChunkWriter | None] = {}
        self._queue: ChunkWriter | None = None  # the thread that runs every write, in order

    def _writer(self, level: str) -> ChunkWriter | None:
        """The chunk writer of array ``level``, or None where Zarr itself must write."""
        if level not in self._writers:
            w = None
            try:
                meta = json.loads((Path(self.path) / level / ".zarray").read_text())
                if ChunkWriter.ok(meta):
                    w = ChunkWriter(Path(self.path) / level, meta)
            except (OSError, ValueError, KeyError):
                w = None
            self._writers[level] = w
        return self._writers[level]

    def _write(self, level: str, row: int, col: int, data: np.ndarray) -> None:
        w = self._writer(level)
        if (w is None or data.dtype != np.uint8 or data.shape[0] != w.shape[0]
                or not w.aligned(row, col, data.shape[1], data.shape[2])):
            self.flush()
            self.group[level][:, row : row + data.shape[1], col : col + data.shape[2]] = data
            return
        if self._queue is None:
            self._queue = w
        self._queue.submit(w._put, row, col, data)

    def flush(self) -> None:
        """Wait until every queued write (and progress record) is on disk; raise what failed."""
        if self._queue is not None:
            q, self._queue = self._queue, None
            q.flush()

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int], channels: list[str], mpp: float,
               attrs: dict, chunk: int = 512) -> "ProbabilityStore":
        """A new, empty store (overwrites ``path``); ``attrs`` goes into the ``wsiseg`` attribute."""
        grp = zarr.open_group(str(path), mode="w", zarr_format=2)
        compressor = numcodecs.get_codec(dict(COMPRESSOR))
        h, w = shape
        datasets = []
        for i in range(n_levels(shape, chunk)):
            grp.create_array(
                str(i), shape=(len(channels), h, w), chunks=(1, min(chunk, h), min(chunk, w)),
                dtype="uint8", compressors=compressor, fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )
            s = mpp * 2**i
            datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, s, s]}]})
            h, w = -(-h // 2), -(-w // 2)
        grp.attrs.update({
            "multiscales": [{
                "version": "0.4",
                "name": "probabilities",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "2x2 mean of the level above", "dtype_scale": "p * 255"},
            }],
            "omero": {
                "name": "probabilities",
                "version": "0.4",
                "channels": [
                    {"label": c, "color": COLORS[i % len(COLORS)], "active": True,
                     "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                    for i, c in enumerate(channels)
                ],
                "rdefs": {"model": "color"},
            },
            "wsiseg": {**attrs, "complete": False},
        })
        progress = path.parent / "progress.json"
        run_id = uuid.uuid4().hex
        atomic_write_json(progress, {"params": attrs.get("params", {}), "bands_done": 0, "chunk": chunk,
                                     "run_id": run_id})
        return cls(path, grp, progress, run_id)

    @classmethod
    def open_existing(cls, path: Path) -> "ProbabilityStore":
        progress = path.parent / "progress.json"
        try:
            run_id = json.loads(progress.read_text()).get("run_id")
        except (OSError, ValueError):
            run_id = None
        return cls(path, zarr.open_group(str(path), mode="r+"), progress, run_id)

    def check_owner(self) -> None:
        """Raise :class:`wsiseg.run_folder.RunFolderError` if another run has re-created the
        store since this one opened it (its progress.json no longer has this run's id)."""
        check_owner(self.progress_path, self.run_id)

    @property
    def chunk(self) -> int:
        return int(self.group["0"].chunks[1])

    @property
    def level0(self) -> zarr.Array:
        return self.group["0"]

    @staticmethod
    def to_uint8(probs: np.ndarray) -> np.ndarray:
        """round(clip(p, 0, 1) * 255) as uint8 (halves to even); ``probs`` (float32) may be
        overwritten. Values in [0, 1.02], i.e. every blend of probabilities, go through one
        OpenCV pass (``convertScaleAbs``: float32 product, rounding half to even, saturation),
        which equals the NumPy steps on every float32 in that range (checked exhaustively);
        anything else (negative, larger, NaN) takes the NumPy steps."""
        if probs.dtype == np.float32 and probs.flags.c_contiguous and 0 < probs.size < 2**31 and probs.ndim >= 2:
            flat = probs.reshape(-1, probs.shape[-1])
            lo, hi = cv2.minMaxLoc(flat)[:2]
            if 0 <= lo and hi <= 1.02:
                return cv2.convertScaleAbs(flat, alpha=255.0).reshape(probs.shape)
        np.clip(probs, 0, 1, out=probs)
        probs *= 255
        np.rint(probs, out=probs)
        return probs.astype(np.uint8)

    def write_block(self, band: int, x: int, probs: np.ndarray) -> None:
        """Write (C, rows, w) float32 probabilities in [0, 1] at level-0 band ``band``, columns
        from ``x`` (a multiple of the chunk width; ``w`` too, or reaching the right edge).
        ``probs`` is overwritten (converted in place); uint8 ``probs`` (already quantised as
        :meth:`to_uint8` does, e.g. on a GPU) are written as they are."""
        self._write("0", band * self.chunk, x, probs if probs.dtype == np.uint8 else self.to_uint8(probs))

    def mark_bands_done(self, n: int, progress_path: Path | None = None) -> None:
        """Record in ``progress_path`` (default ``progress.json``) that level-0 bands [.., n) are
        written: after the writes queued before it (in the writer thread, if one runs)."""
        progress_path = progress_path or self.progress_path
        if self._queue is not None:
            self._queue.submit(self._mark, n, progress_path)
        else:
            self._mark(n, progress_path)

    def _mark(self, n: int, progress_path: Path) -> None:
        check_owner(progress_path, self.run_id, must_exist=progress_path == self.progress_path)
        prog = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        prog["bands_done"] = n
        if self.run_id is not None:
            prog["run_id"] = self.run_id
        atomic_write_json(progress_path, prog)

    def build_pyramid(self, cols: int | None = None) -> None:
        """Levels 1.. from level 0, in blocks of one chunk row by ``cols`` columns of the level
        written (default 2 chunks): memory is a few chunks, whatever the slide's size. Each
        value is (a + b + c + d + 2) // 4 of its 2 x 2 (the level's last row or column repeated
        where it is odd): OpenCV's area resize at exactly 1/2, which computes just that."""
        ch = self.chunk
        cols = cols or 2 * ch
        n = len([k for k in self.group.array_keys()])
        for i in range(1, n):
            self.flush()  # level i - 1 on disk before it is read
            H, W = self.group[str(i)].shape[1:]
            for r0 in range(0, H, ch):
                r1 = min(H, r0 + ch)
                for c0 in range(0, W, cols):
                    c1 = min(W, c0 + cols)
                    self._write(str(i), r0, c0, pool2(self._read(str(i - 1), 2 * r0, 2 * r1, 2 * c0, 2 * c1)))
        self.flush()

    def _read(self, level: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(C, rows, cols) uint8 of array ``level`` (clipped to its shape): the chunk files read
        and decoded directly where :class:`ChunkWriter` writes them (a missing chunk: the fill
        value 0), else through Zarr."""
        w = self._writer(level)
        if w is None:
            return self.group[level][:, r0:r1, c0:c1]
        C, H, W = w.shape
        _, ch, cw = w.chunks
        r1, c1 = min(r1, H), min(c1, W)
        out = np.zeros((C, r1 - r0, c1 - c0), np.uint8)
        for c in range(C):
            for i in range(r0 // ch, -(-r1 // ch)):
                for j in range(c0 // cw, -(-c1 // cw)):
                    try:
                        blob = (w.dir / str(c) / str(i) / str(j)).read_bytes()
                    except FileNotFoundError:
                        continue
                    chunk = np.frombuffer(w.codec.decode(blob), np.uint8).reshape(ch, cw)
                    y0, y1 = max(r0, i * ch), min(r1, (i + 1) * ch)
                    x0, x1 = max(c0, j * cw), min(c1, (j + 1) * cw)
                    out[c, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = chunk[y0 - i * ch : y1 - i * ch, x0 - j * cw : x1 - j * cw]
        return out

    def mark_complete(self, extra: dict) -> None:
        self.flush()
        self.check_owner()
        attrs = dict(self.group.attrs["wsiseg"])
        attrs.update(extra)
        attrs["complete"] = True
        self.group.attrs["wsiseg"] = attrs
