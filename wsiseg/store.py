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
from pathlib import Path

import numcodecs
import numpy as np
import zarr

COLORS = ["FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF"]


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def n_levels(shape: tuple[int, int], chunk: int) -> int:
    """Levels down to the first whose longer side fits in one chunk."""
    h, w = shape
    n = 1
    while max(h, w) > chunk:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


class ProbabilityStore:
    """Writes an (C, H, W) probability map as a multiscale OME-Zarr image."""

    def __init__(self, path: Path, group: zarr.Group, progress_path: Path):
        self.path = path
        self.group = group
        self.progress_path = progress_path

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int], channels: list[str], mpp: float,
               attrs: dict, chunk: int = 512) -> "ProbabilityStore":
        """A new, empty store (overwrites ``path``); ``attrs`` goes into the ``wsiseg`` attribute."""
        grp = zarr.open_group(str(path), mode="w", zarr_format=2)
        compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
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
        atomic_write_json(progress, {"params": attrs.get("params", {}), "bands_done": 0, "chunk": chunk})
        return cls(path, grp, progress)

    @classmethod
    def open_existing(cls, path: Path) -> "ProbabilityStore":
        return cls(path, zarr.open_group(str(path), mode="r+"), path.parent / "progress.json")

    @property
    def chunk(self) -> int:
        return int(self.group["0"].chunks[1])

    @property
    def level0(self) -> zarr.Array:
        return self.group["0"]

    @staticmethod
    def to_uint8(probs: np.ndarray) -> np.ndarray:
        """round(clip(p, 0, 1) * 255) as uint8; works in place on ``probs`` (float32)."""
        np.clip(probs, 0, 1, out=probs)
        probs *= 255
        np.rint(probs, out=probs)
        return probs.astype(np.uint8)

    def write_band(self, band: int, probs: np.ndarray, progress_path: Path | None = None) -> None:
        """Write level-0 band ``band`` ((C, rows, W) float32 in [0, 1]), then record in
        ``progress_path`` (default ``progress.json``) that bands up to it are done."""
        self.write_block(band, 0, probs.copy())
        self.mark_bands_done(band + 1, progress_path)

    def write_block(self, band: int, x: int, probs: np.ndarray) -> None:
        """Write (C, rows, w) float32 probabilities in [0, 1] at level-0 band ``band``, columns
        from ``x`` (a multiple of the chunk width; ``w`` too, or reaching the right edge).
        ``probs`` is overwritten (converted in place)."""
        ch = self.chunk
        data = self.to_uint8(probs)
        self.level0[:, band * ch : band * ch + data.shape[1], x : x + data.shape[2]] = data

    def mark_bands_done(self, n: int, progress_path: Path | None = None) -> None:
        """Record in ``progress_path`` (default ``progress.json``) that level-0 bands [.., n) are written."""
        progress_path = progress_path or self.progress_path
        prog = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        prog["bands_done"] = n
        atomic_write_json(progress_path, prog)

    def build_pyramid(self, cols: int | None = None) -> None:
        """Levels 1.. from level 0, in blocks of one chunk row by ``cols`` columns of the level
        written (default 2 chunks): memory is a few chunks, whatever the slide's size."""
        ch = self.chunk
        cols = cols or 2 * ch
        n = len([k for k in self.group.array_keys()])
        for i in range(1, n):
            src, dst = self.group[str(i - 1)], self.group[str(i)]
            H, W = dst.shape[1:]
            for r0 in range(0, H, ch):
                r1 = min(H, r0 + ch)
                for c0 in range(0, W, cols):
                    c1 = min(W, c0 + cols)
                    block = src[:, 2 * r0 : 2 * r1, 2 * c0 : 2 * c1]
                    c, h, w = block.shape
                    if h % 2 or w % 2:  # the level's last row or column: repeat the edge
                        block = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
                    # (a + b + c + d + 2) // 4 of each 2 x 2, in uint16
                    pooled = block[:, 0::2, 0::2].astype(np.uint16)
                    pooled += block[:, 1::2, 0::2]
                    pooled += block[:, 0::2, 1::2]
                    pooled += block[:, 1::2, 1::2]
                    pooled += 2
                    pooled //= 4
                    dst[:, r0:r1, c0:c1] = pooled.astype(np.uint8)

    def mark_complete(self, extra: dict) -> None:
        attrs = dict(self.group.attrs["wsiseg"])
        attrs.update(extra)
        attrs["complete"] = True
        self.group.attrs["wsiseg"] = attrs
