"""Interrupted runs: never look complete, and resume without redoing finished bands."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import zarr

from tests.conftest import write_png
from wsiseg.models import load_model
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.predict import Predictor

CFG = RunConfig.of(mpp=0.5, chunk=128, tissue=False)


def _map(d):
    return zarr.open_group(str(d / "probabilities.zarr"), mode="r")["0"][:]


def _looks_complete(d) -> bool:
    if (d / "summary.json").exists():
        return True
    g = zarr.open_group(str(d / "probabilities.zarr"), mode="r")
    return bool(g.attrs["wsiseg"].get("complete"))


@pytest.fixture()
def image_path(tmp_path, monuseg_image):
    return write_png(tmp_path / "img.png", monuseg_image[:900, :500])


def _kill_after(image_path, out, model_path, n_tiles):
    """Child process: run, and SIGKILL itself after ``n_tiles`` tiles (a real kill -9)."""
    pred = Predictor(load_model(model_path), "cpu", threads=1)
    done = [0]

    def progress(n):
        done[0] += n
        if done[0] >= n_tiles:
            os.kill(os.getpid(), signal.SIGKILL)

    run_slide(image_path, out, pred, CFG, progress=progress)


def test_kill_9_never_looks_complete_and_resume_matches_a_clean_run(tmp_path, image_path, tiny_unet_path):
    ref = run_slide(image_path, tmp_path / "ref", Predictor(load_model(tiny_unet_path), "cpu"), CFG)
    assert ref.status == "ok"
    total = ref.summary["tiles_inferred_this_run"]

    out = tmp_path / "killed"
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_kill_after, args=(image_path, out, tiny_unet_path, 3 * total // 4))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert not _looks_complete(out)
    done = json.loads((out / "progress.json").read_text())["bands_done"]
    assert 0 < done < -(-900 // 128)

    res = run_slide(image_path, out, Predictor(load_model(tiny_unet_path), "cpu"), CFG)
    assert res.status == "resumed"
    assert 0 < res.summary["tiles_inferred_this_run"] < total
    assert _looks_complete(out)
    a, b = _map(ref.out_dir).astype(int), _map(out).astype(int)
    assert np.abs(a - b).max() <= 1  # same map (uint8 rounding of float sums aside)


def test_interrupt_in_process_then_resume(tmp_path, image_path, tiny_unet_path):
    pred = Predictor(load_model(tiny_unet_path), "cpu")
    out = tmp_path / "out"
    seen = [0]

    def progress(n):
        seen[0] += n
        if seen[0] >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_slide(image_path, out, pred, CFG, progress=progress)
    assert not _looks_complete(out)
    # the same model with test-time augmentation gives other maps: not mixed into this output
    from wsiseg.slide import SlideError

    with pytest.raises(SlideError, match="different run"):
        run_slide(image_path, out, Predictor(load_model(tiny_unet_path), "cpu", tta="flips"), CFG)
    res = run_slide(image_path, out, pred, CFG)
    assert res.status == "resumed" and _looks_complete(out)
    again = run_slide(image_path, out, pred, CFG)
    assert again.status == "skipped"
    ov = run_slide(image_path, out, pred, CFG.replace(overwrite=True))
    assert ov.status == "ok"


def test_resume_mid_band_redoes_the_band_bit_for_bit(tmp_path, monuseg_image, tiny_unet_path):
    """Blocks are written as they finish, but progress counts whole bands: a run stopped with a
    band half written resumes from that band and ends with the same bytes as an unbroken run."""
    from wsiseg.pipeline import infer_bands, prepare_slide
    from wsiseg.store import ProbabilityStore

    img = write_png(tmp_path / "img.png", monuseg_image[:900, :700])
    cfg = RunConfig.of(mpp=0.5, chunk=128, tissue=False, batch_size=1)  # one tile a batch: no batch effects
    pred = Predictor(load_model(tiny_unet_path), "cpu", threads=1)
    prep = prepare_slide(img, pred.model.mpp, cfg)

    def new_store(name):
        return ProbabilityStore.create(tmp_path / name / "probabilities.zarr", prep.view.shape, pred.channels,
                                       0.5, {}, cfg.tiling.chunk)

    ref = new_store("ref")
    total = infer_bands(prep.view, prep.grid, prep.keep, pred, ref, cfg)["tiles"]
    st = new_store("cut")
    seen = [0]

    def progress(n):
        seen[0] += n
        if seen[0] >= total // 2 - 1:  # (progress comes once the tile is blended and its blocks released)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_bands(prep.view, prep.grid, prep.keep, pred, st, cfg, progress=progress)
    done = json.loads(st.progress_path.read_text())["bands_done"]
    assert 0 < done < -(-900 // 128)
    # the next band was begun: some of its blocks are on disk, others not yet
    band = st.level0[:, done * 128 : (done + 1) * 128, :]
    assert band[..., :128].any() and not band[..., -128:].any()
    again = infer_bands(prep.view, prep.grid, prep.keep, pred, st, cfg, first_band=done)["tiles"]
    assert 0 < again < total
    np.testing.assert_array_equal(st.level0[:], ref.level0[:])
    assert json.loads(st.progress_path.read_text())["bands_done"] == -(-900 // 128)
