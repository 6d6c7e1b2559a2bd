"""`wsiseg run FOLDER --patches`: many small images in one batched job, on real pixels."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import SHARED, need, write_png
from wsiseg.cli import main

CONSEP = SHARED / "consep" / "train"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, monuseg_image):
    """6 CoNSeP tiles (256 px at 40x: 128 px at the model's 0.5 um/px, smaller than a tile) and one
    MoNuSeg crop (600 x 800 px at 40x: 300 x 400 px, several tiles)."""
    d = tmp_path_factory.mktemp("patches") / "in"
    d.mkdir()
    for f in sorted((need(CONSEP) / "images").glob("*.jpg"))[:6]:
        shutil.copy(f, d / f.name)
    write_png(d / "zz_monuseg.png", monuseg_image[100:700, 50:850])
    return d


def _rows(out):
    return list(csv.DictReader(open(out / "patches.csv")))


@pytest.mark.slow
def test_patches_equal_the_slide_runs_and_are_scored_on_their_own_extent(tmp_path, folder):
    out = tmp_path / "p"
    assert main(["run", "-q", str(folder), "--patches", "--mpp", "0.25", "-o", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 7 and [r["name"] for r in rows][-1] == "zz_monuseg"
    g = zarr.open_group(str(out / "patches.zarr"), mode="r")
    meta = g.attrs["wsiseg"]
    summary = json.loads((out / "patches_summary.json").read_text())
    assert summary["patches"] == 7 and summary["complete"] and summary["network_seconds_per_patch"] > 0
    from wsiseg.scoring import CLASS_INPUTS, DEFAULT_REGRESSORS, load_regressor, malignant_share

    idx = [meta["classes"].index(c) for c in CLASS_INPUTS]
    for name in ("train_10_000", "zz_monuseg"):  # one smaller than a tile, one of several tiles
        src = next(folder.glob(name + ".*"))
        one = tmp_path / ("one_" + name)
        assert main(["run", "-q", str(src), "--mpp", "0.25", "--no-tissue-mask", "--no-cellularity", "-o", str(one)]) == 0
        ref = zarr.open_group(str(one / name / "probabilities.zarr"), mode="r")["0"][:]
        got = g[name][:]
        c = len(meta["classes"])
        assert got.shape == ref.shape == ((c, 128, 128) if name.startswith("train") else (c, 300, 400))
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1 and (got != ref).mean() < 0.001
        row = next(r for r in rows if r["name"] == name)
        maps = got[idx].astype(np.float32) / 255
        assert float(row["cellularity_share"]) == pytest.approx(malignant_share(maps), abs=6e-5)
        for kind in ("lgbm", "cnn"):
            want = load_regressor(kind, DEFAULT_REGRESSORS[kind]).predict([maps])[0]
            assert float(row[f"cellularity_{kind}"]) == pytest.approx(want, abs=6e-5)
    assert len({r["cellularity_lgbm"] for r in rows}) > 1  # real, varied maps


@pytest.mark.slow
def test_an_interrupted_patch_job_resumes_and_a_bad_image_is_reported(tmp_path, folder, monkeypatch):
    import wsiseg.patches as patches

    src = tmp_path / "in"
    shutil.copytree(folder, src)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "p"
    calls = {"n": 0}
    real = patches._Scorer.__call__

    def dies_on_second_flush(self, maps):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, maps)

    monkeypatch.setattr(patches._Scorer, "__call__", dies_on_second_flush)
    args = ["run", "-q", str(src), "--patches", "--mpp", "0.25", "-o", str(out), "--batch-size", "2"]
    monkeypatch.setattr(patches, "_FLUSH_EVERY", 3)
    assert main(args) == 130  # interrupted
    first = _rows(out)
    assert 0 < len(first) < 7 and not (out / "patches_summary.json").exists()
    monkeypatch.setattr(patches._Scorer, "__call__", real)
    assert main(args) == 1  # the broken image fails, the others are done
    rows = _rows(out)
    assert sorted(r["name"] for r in rows) == sorted(p.stem for p in folder.iterdir())
    s = json.loads((out / "patches_summary.json").read_text())
    assert s["skipped"] == len(first) and s["patches"] == 7 - len(first)
    assert [f["image"] for f in s["failed"]] == [str(src / "broken.png")] and not s["complete"]
    clean = tmp_path / "clean"
    assert main(["run", "-q", str(folder), "--patches", "--mpp", "0.25", "-o", str(clean)]) == 0
    a, b = zarr.open_group(str(out / "patches.zarr"), mode="r"), zarr.open_group(str(clean / "patches.zarr"), mode="r")
    for name in b.array_keys():
        assert np.array_equal(a[name][:], b[name][:])
    # other parameters into the same folder are refused; --overwrite removes only the patch outputs
    (out / "mine.txt").write_text("keep")
    assert main(["run", "-q", str(folder), "--patches", "--mpp", "0.25", "-o", str(out), "--tile", "128"]) == 1
    assert main(["run", "-q", str(folder), "--patches", "--mpp", "0.25", "-o", str(out), "--tile", "128",
                 "--overwrite"]) == 0
    assert (out / "mine.txt").read_text() == "keep" and len(_rows(out)) == 7


def test_an_image_too_large_for_a_patch_is_refused(tmp_path, monuseg_image):
    from wsiseg.models.registry import load_model
    from wsiseg.patches import run_patches
    from wsiseg.predict import Predictor

    big = write_png(tmp_path / "big.png", np.tile(monuseg_image[:500, :500], (2, 2, 1)))
    from wsiseg.pipeline import RunConfig

    s = run_patches([big], ["big"], tmp_path / "o", Predictor(load_model(), "cpu", threads=1), RunConfig.of(mpp=0.25),
                    max_px=256)
    assert s["patches"] == 0 and "not a patch" in s["failed"][0]["error"] and "without --patches" in s["failed"][0]["error"]
    assert Image.open(big).size == (1000, 1000)
