"""Scale-out on Dask distributed: slides spread over worker processes.

``wsiseg run slides/*.svs --cluster local:4`` starts a LocalCluster of 4 processes on loopback;
``--scheduler tcp://HOST:PORT`` joins an existing scheduler (e.g. one started by dask-jobqueue on
SLURM). Each worker opens its own slide handles and loads the model once (cached per process).
``--split N`` instead cuts each slide into N ranges of level-0 bands (Zarr chunk rows) that the
workers infer and write in parallel: disjoint chunks, one store; tiles that straddle two ranges
are inferred by both (one tile row per boundary), so the result equals a single-process run.
A worker that dies mid-slide loses nothing: the scheduler re-runs its task elsewhere and
``run_slide`` resumes from the bands already written, so outputs end complete and identical to a
single-process run.
"""
from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from wsiseg.pipeline import RunConfig
from wsiseg.predict import PredictorSpec


@lru_cache(maxsize=2)
def _predictor(spec: PredictorSpec):
    """One predictor per worker process and spec (model, device, threads, TTA, backend)."""
    return spec.build()


def _worker_spec(client, spec: PredictorSpec) -> PredictorSpec:
    """The spec for the workers: an absolute model path, and (unless given) the cores shared out."""
    n_workers = max(1, len(client.scheduler_info().get("workers", {})) or 1)
    return replace(spec.portable(), threads=spec.threads or max(1, (os.cpu_count() or 1) // n_workers))


def slide_task(path: str, out_dir: str, spec: PredictorSpec, cfg: dict) -> dict:
    """Run one slide on a worker. Bad input is a result ({'status': 'error'}), not an exception."""
    from wsiseg.pipeline import run_slide
    from wsiseg.slide import SlideError

    try:
        res = run_slide(path, out_dir, _predictor(spec), RunConfig.of(**cfg))
    except SlideError as e:
        return {"path": path, "out_dir": out_dir, "status": "error", "message": str(e), "summary": {}}
    return {"path": path, "out_dir": out_dir, "status": res.status, "message": res.message, "summary": res.summary}


def make_client(cluster: str | None = None, scheduler: str | None = None):
    """A distributed Client: ``cluster='local:N'`` (N processes on 127.0.0.1) or a scheduler address."""
    from distributed import Client

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
    # The client makes the cluster itself, so closing the client (or leaving its ``with``) ends
    # the worker processes too; Client(LocalCluster(...)) would leave them running.
    return Client(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                  dashboard_address=None, silence_logs=40)


def run_distributed(client, jobs: list[tuple[Path, Path]], spec: PredictorSpec, cfg: RunConfig) -> Iterator[dict]:
    """Submit one task per (input, out_dir); yield each result dict as it completes."""
    from distributed import as_completed

    spec = _worker_spec(client, spec)
    futures = [
        client.submit(slide_task, str(p), str(o), spec, cfg.flat(),
                      key=f"wsiseg-slide-{i}-{p.name}", pure=False)
        for i, (p, o) in enumerate(jobs)
    ]
    for fut in as_completed(futures):
        yield fut.result()


def region_task(path: str, out_dir: str, spec: PredictorSpec, cfg: dict, b0: int, b1: int) -> dict:
    """Infer and write level-0 bands [b0, b1) of a slide whose store the coordinator created.

    Progress of the range is kept in ``progress-bands-B0-B1.json``, so a re-run task (its
    worker died) resumes where the range stopped."""
    import json

    from wsiseg.pipeline import infer_bands, prepare_slide
    from wsiseg.stain import from_record
    from wsiseg.store import ProbabilityStore

    cfg_ = RunConfig.of(**cfg)
    pred = _predictor(spec)
    out = Path(out_dir)
    part = out / f"progress-bands-{b0}-{b1}.json"
    store = ProbabilityStore.open_existing(out / "probabilities.zarr")
    first = b0
    if part.exists():
        prog = json.loads(part.read_text())
        if prog.get("run_id") == store.run_id:  # (a range record of an earlier store does not count)
            first = max(b0, int(prog.get("bands_done", b0)))
    if first >= b1:
        return {"tiles": 0}
    prep = prepare_slide(Path(path), pred.model.mpp, cfg_)
    try:
        # the slide's stain transform, fitted once by the coordinator and recorded in the store
        pred = pred.with_stain(from_record(store.group.attrs["wsiseg"].get("stain")))
        return infer_bands(prep.view, prep.grid, prep.keep, pred, store, cfg_, first, b1, progress_file=part)
    finally:
        prep.reader.close()


def split_band_runner(client, path: Path, out_dir: Path, spec: PredictorSpec, cfg: RunConfig,
                      parts: int) -> Callable[[int, int], dict]:
    """A ``band_runner`` for :func:`wsiseg.pipeline.run_slide` that spreads band ranges over workers."""
    spec = _worker_spec(client, spec)

    def runner(first_band: int, n_bands: int) -> dict:
        edges = [first_band + round(i * (n_bands - first_band) / parts) for i in range(parts + 1)]
        ranges = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        futs = [client.submit(region_task, str(path), str(out_dir), spec, cfg.flat(), a, b,
                              key=f"wsiseg-region-{path.name}-{a}-{b}", pure=False) for a, b in ranges]
        stats: dict = {}
        for st in client.gather(futs):
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v
        stats.setdefault("tiles", 0)
        return stats

    return runner
