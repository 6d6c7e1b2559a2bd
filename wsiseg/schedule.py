"""Block reads scheduled with Dask's threaded scheduler, feeding a bounded prefetch queue.

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
from wsiseg.tiling import Block

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
