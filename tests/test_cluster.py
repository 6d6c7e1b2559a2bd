"""Scale-out on a LocalCluster of 2 processes on loopback."""
from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import zarr

from tests.conftest import write_png
from wsiseg.cli import main

distributed = pytest.importorskip("distributed")


def _map(d):
    return zarr.open_group(str(d / "probabilities.zarr"), mode="r")["0"][:]


@pytest.mark.slow
def test_cluster_results_equal_single_process(tmp_path, monuseg_image, tiny_unet_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        write_png(d / f"img{i}.png", np.ascontiguousarray(np.rot90(monuseg_image[:400, :500], i)))
    args = [str(d), "--mpp", "0.5", "--model", str(tiny_unet_path)]
    assert main(["run", "-q", *args, "-o", str(tmp_path / "single")]) == 0
    assert main(["run", "-q", *args, "-o", str(tmp_path / "multi"), "--cluster", "local:2"]) == 0
    out = capsys.readouterr().out
    assert out.count("tiles/s") == 6
    for i in range(3):
        np.testing.assert_array_equal(_map(tmp_path / "single" / f"img{i}"), _map(tmp_path / "multi" / f"img{i}"))


def _dies_once(path, out_dir, model, cfg, marker):
    """A slide task whose first attempt SIGKILLs its worker process half-way through."""
    from wsiseg.cluster import _predictor
    from wsiseg.predict import PredictorSpec
    from wsiseg.pipeline import RunConfig, run_slide

    first = not os.path.exists(marker)
    if first:
        open(marker, "w").close()
    seen = [0]

    def progress(n):
        seen[0] += n
        if first and seen[0] >= 16:
            os.kill(os.getpid(), signal.SIGKILL)

    res = run_slide(path, out_dir, _predictor(PredictorSpec(model, "cpu", 1)), RunConfig.of(**cfg), progress=progress)
    return res.status


@pytest.mark.slow
def test_worker_killed_mid_slide_loses_nothing(tmp_path, monuseg_image, tiny_unet_path):
    import cloudpickle

    from wsiseg.cluster import make_client
    from wsiseg.models import load_model
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.predict import Predictor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    img = write_png(tmp_path / "big.png", monuseg_image[:900, :600])
    cfg = RunConfig.of(mpp=0.5, chunk=128, tissue=False)
    ref = run_slide(img, tmp_path / "ref", Predictor(load_model(tiny_unet_path), "cpu"), cfg)
    marker = str(tmp_path / "attempted")
    with make_client("local:2") as client:
        fut = client.submit(_dies_once, str(img), str(tmp_path / "dist"), str(tiny_unet_path), cfg.flat(), marker,
                            pure=False)
        status = fut.result(timeout=300)
    assert os.path.exists(marker)
    assert status == "resumed"  # the retry found the killed attempt's bands and continued
    assert np.abs(_map(ref.out_dir).astype(int) - _map(tmp_path / "dist").astype(int)).max() <= 1


@pytest.mark.slow
def test_one_slide_split_over_workers_equals_single_process(tmp_path, monuseg_image, tiny_unet_path, capsys):
    img = write_png(tmp_path / "big.png", np.ascontiguousarray(np.tile(monuseg_image, (2, 1, 1))[:1800, :700]))
    args = ["run", "-q", str(img), "--mpp", "0.5", "--model", str(tiny_unet_path)]
    assert main([*args, "-o", str(tmp_path / "single")]) == 0
    assert main([*args, "-o", str(tmp_path / "split"), "--cluster", "local:2", "--split", "3"]) == 0
    parts = sorted(p.name for p in (tmp_path / "split" / "big").glob("progress-bands-*.json"))
    assert len(parts) == 3  # 4 bands of 512 rows in 3 ranges, each written by a worker
    a, b = _map(tmp_path / "single" / "big"), _map(tmp_path / "split" / "big")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    g = zarr.open_group(str(tmp_path / "split" / "big" / "probabilities.zarr"), mode="r")
    assert g.attrs["wsiseg"]["complete"]


@pytest.mark.slow
def test_a_local_cluster_ends_with_its_client():
    """Leaving make_client's ``with`` ends its worker processes (they used to outlive it)."""
    import psutil

    from wsiseg.cluster import make_client

    with make_client("local:2") as client:
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
    alive = []
    for pid in pids:
        try:
            alive.append(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            alive.append(False)
    assert not any(alive), pids
