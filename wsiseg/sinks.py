"""Where the tile loop's probabilities go: blend sinks behind one protocol, threading as a wrapper.

:func:`wsiseg.pipeline.infer_bands` is one loop: tiles -> ``sink.infer`` -> ``runner.add`` ->
blocks released to the store. A blending mode is a small class with the :class:`Sink` protocol:

* :class:`HostTileSink` (the CPU): the network's own output, each tile multiplied by the window
  into one cache-resident buffer just before the blender adds it;
* :class:`HostBatchSink` (a GPU, blending on the host): the predictor multiplies the batch by the
  window on the device and copies it back into one of ``buffers`` reused host buffers;
* :class:`DeviceSink` (``--blend-on-device``): probabilities x window stay on the device, where a
  :class:`~wsiseg.blend.DeviceChunkBlender` accumulates them.

Each writes the blocks its blender releases through a :class:`BlockWriter` (the store, the band
progress records). A runner calls ``sink.add``: :class:`SerialRunner` in the loop's thread, or
:class:`ThreadedRunner`, which adds batch n in one thread while batch n + 1 is inferred (the
same bytes either way). Every piece keeps its seconds in the shared ``times`` dict.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from wsiseg.blend import trim_heap

__all__ = ["BlockWriter", "DeviceSink", "HostBatchSink", "HostTileSink", "SerialRunner", "Sink", "ThreadedRunner",
           "make_sink"]


class Sink(Protocol):
    """A blending mode: how a batch is inferred for it, and how its probabilities are added."""

    def infer(self, tiles: np.ndarray, n: int):
        """The predictor's output for ``tiles`` ((n, T, T, 3) uint8), in the form ``add`` takes."""

    def add(self, probs, where: list[tuple[int, int]]) -> int:
        """Blend the tiles at ``where`` (model px (y, x)), write what is final; returns how many."""

    def release(self) -> None:
        """Write every block that no later tile touches."""


class BlockWriter:
    """The blender's released blocks -> the store; after a band's last block, its progress record."""

    def __init__(self, blender, store, width: int, progress_file: Path | None, times: dict):
        self.blender, self.store, self.width = blender, store, width
        self.progress_file, self.times = progress_file, times

    def release(self) -> None:
        tw = time.perf_counter()
        for b, x, probs in self.blender.release():
            self.store.write_block(b, x, probs)
            if x + probs.shape[2] >= self.width:  # the band's last block
                self.store.mark_bands_done(b + 1, self.progress_file)
            trim_heap(every=0.5)
        self.times["write"] += time.perf_counter() - tw


class HostTileSink:
    """CPU: the network's own output, weighted tile by tile into a buffer that stays in the cache
    while the blender adds it (the same float32 products as weighting the whole batch)."""

    def __init__(self, predictor, writer: BlockWriter, channels: int, tile: int):
        self.predictor, self.writer = predictor, writer
        self.weighted = np.empty((channels, tile, tile), np.float32)

    def infer(self, tiles: np.ndarray, n: int):
        return self.predictor.probabilities(tiles)

    def add(self, probs, where) -> int:
        blender, tb = self.writer.blender, time.perf_counter()
        for p, (y, x) in zip(probs, where):
            blender.add(np.multiply(p, blender.win, out=self.weighted), y, x, weighted=True)
        self.writer.times["blend"] += time.perf_counter() - tb
        self.writer.release()
        return len(where)

    def release(self) -> None:
        self.writer.release()


class HostBatchSink:
    """A GPU, blending on the host: probabilities x window computed on the device for the whole
    batch, copied back into one of ``buffers`` reused host buffers (two when a thread blends one
    while the predictor fills the other)."""

    def __init__(self, predictor, writer: BlockWriter, channels: int, tile: int, batch_size: int, buffers: int):
        self.predictor, self.writer = predictor, writer
        self.outs = [np.empty((batch_size, channels, tile, tile), np.float32) for _ in range(buffers)]
        self.i = 0

    def infer(self, tiles: np.ndarray, n: int):
        out = self.outs[self.i % len(self.outs)][:n]
        self.i += 1
        return self.predictor(tiles, weight=self.writer.blender.win, out=out)

    def add(self, probs, where) -> int:
        blender, tb = self.writer.blender, time.perf_counter()
        for p, (y, x) in zip(probs, where):
            blender.add(p, y, x, weighted=True)
        self.writer.times["blend"] += time.perf_counter() - tb
        self.writer.release()
        return len(where)

    def release(self) -> None:
        self.writer.release()


class DeviceSink(HostBatchSink):
    """``--blend-on-device``: probabilities x window, a new tensor on the device for each batch,
    added by a :class:`~wsiseg.blend.DeviceChunkBlender` there."""

    def __init__(self, predictor, writer: BlockWriter):
        self.predictor, self.writer = predictor, writer

    def infer(self, tiles: np.ndarray, n: int):
        return self.predictor.on_device(tiles, weight=self.writer.blender.win)


def make_sink(predictor, writer: BlockWriter, channels: int, tile: int, batch_size: int, on_device: bool,
              threaded: bool) -> Sink:
    """The sink for this predictor's device and the blending options."""
    if on_device:
        return DeviceSink(predictor, writer)
    if predictor.device.type == "cpu":
        return HostTileSink(predictor, writer, channels, tile)
    return HostBatchSink(predictor, writer, channels, tile, batch_size, 2 if threaded else 1)


class SerialRunner:
    """Adds each batch in the loop's thread, as soon as it is inferred."""

    def __init__(self, sink: Sink, progress: Callable[[int], None] | None = None):
        self.sink, self.progress = sink, progress

    def add(self, probs, where) -> None:
        n = self.sink.add(probs, where)
        if self.progress:
            self.progress(n)

    def drain(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class ThreadedRunner:
    """Adds batch n in one thread while the loop infers batch n + 1. The blender and the store are
    used by one thread at a time: the thread runs one batch's job at most, and :meth:`add` waits
    for it before handing over the next (whose buffer is then free to be filled again)."""

    def __init__(self, sink: Sink, times: dict, progress: Callable[[int], None] | None = None):
        self.sink, self.times, self.progress = sink, times, progress
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-blend")
        self.pending: Future | None = None

    def _finish(self) -> None:
        if self.pending is not None:
            tw = time.perf_counter()
            job, self.pending = self.pending, None
            n = job.result()  # raises what the blend thread raised
            self.times["blend_wait"] += time.perf_counter() - tw
            if self.progress:
                self.progress(n)

    def add(self, probs, where) -> None:
        self._finish()
        self.pending = self.pool.submit(self.sink.add, probs, where)

    def drain(self) -> None:
        self._finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.pending is not None:  # an error or interrupt in the loop: let the job end first
            try:
                self.pending.result()
            except BaseException:  # the loop's error is the one raised
                pass
        self.pool.shutdown(wait=True)
