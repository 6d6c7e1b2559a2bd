"""Scale-out on Dask distributed: slides spread over worker processes.

``wsiseg run slides/*.svs --cluster local:4`` starts a LocalCluster of 4 processes on loopback;
``--scheduler tcp://HOST:PORT`` joins an existing scheduler (e.g. one started by dask-jobqueue on
SLURM). Each worker opens its own slide handles and loads the model once (cached per process).
A worker that dies mid-slide loses nothing: the scheduler re-runs its task elsewhere and
``run_slide`` resumes from the bands already written, so outputs end complete and identical to a
single-process run.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from wsiseg.pipeline import RunConfig


@lru_cache(maxsize=2)
def _predictor(model: str | None, device: str, threads: int):
    """One predictor per worker process and (model, device)."""
    from wsiseg.models import load_model
    from wsiseg.predict import Predictor

    return Predictor(load_model(model), device, threads=threads)


def slide_task(path: str, out_dir: str, model: str | None, device: str, cfg: dict, threads: int) -> dict:
    """Run one slide on a worker. Bad input is a result ({'status': 'error'}), not an exception."""
    from wsiseg.pipeline import run_slide
    from wsiseg.slide import SlideError

    try:
        res = run_slide(path, out_dir, _predictor(model, device, threads), RunConfig(**cfg))
    except SlideError as e:
        return {"path": path, "out_dir": out_dir, "status": "error", "message": str(e), "summary": {}}
    return {"path": path, "out_dir": out_dir, "status": res.status, "message": res.message, "summary": res.summary}


def make_client(cluster: str | None = None, scheduler: str | None = None):
    """A distributed Client: ``cluster='local:N'`` (N processes on 127.0.0.1) or a scheduler address."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    if not cluster or not cluster.startswith("local:"):
        raise ValueError(f"--cluster takes local:N (N worker processes), got {cluster!r}")
    try:
        n = int(cluster.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"--cluster takes local:N with N a number, got {cluster!r}") from None
    if n < 1:
        raise ValueError("--cluster local:N needs N >= 1")
    lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40)
    return Client(lc)


def run_distributed(client, jobs: list[tuple[Path, Path]], model: str | None, device: str, cfg: RunConfig,
                    threads: int | None = None) -> Iterator[dict]:
    """Submit one task per (input, out_dir); yield each result dict as it completes."""
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info().get("workers", {})) or 1)
    threads = threads or max(1, (os.cpu_count() or 1) // n_workers)
    futures = [
        client.submit(slide_task, str(p), str(o), model, device, asdict(cfg), threads,
                      key=f"wsiseg-slide-{i}-{p.name}", pure=False)
        for i, (p, o) in enumerate(jobs)
    ]
    for fut in as_completed(futures):
        yield fut.result()
