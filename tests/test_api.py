"""The Python API on a real image: run, open_result, the maps as dask arrays, the tables as DataFrames."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import wsiseg
from tests.conftest import write_png


@pytest.mark.slow
def test_run_and_open_result_give_the_maps_and_tables(tmp_path, monuseg_image):
    img = write_png(tmp_path / "breast.png", monuseg_image[:512, :512])
    res = wsiseg.run(img, tmp_path / "out", mpp=0.25, instances=True)
    assert res.out_dir == tmp_path / "out" / "breast"
    assert res.summary["complete"] and res.mpp == 0.5 and res.scale_from_level0 == 2.0
    ref = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")["0"][:]
    p = res.probability("nucleus")
    assert p.shape == ref.shape[1:] and p.dtype == np.float32
    np.testing.assert_array_equal(p.compute(), ref[res.channels.index("nucleus")].astype(np.float32) / 255)
    top = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")[str(res.levels - 1)]
    assert res.probabilities(res.levels - 1).shape == top.shape
    nuc = res.nuclei
    gj = json.loads(res.geojson.read_text())
    assert len(nuc) == len(gj["features"]) == res.summary["instances"]["instances"] > 20
    assert set(nuc["type"]) <= {"Normal", "Lymphocyte", "Malignant"}
    lab = res.labels().compute()
    assert int(lab.max()) == res.summary["instances"]["label_ids"]
    cell = res.cellularity
    assert list(cell.columns[:5]) == ["x", "y", "width", "height", "tissue_fraction"] and len(cell) >= 1
    again = wsiseg.open_result(res.out_dir)  # reading needs no model and no run
    assert again.summary == res.summary
    # a finished output is returned as it is, not recomputed
    assert wsiseg.run(img, tmp_path / "out", mpp=0.25, instances=True).summary == res.summary


def test_open_result_and_run_refuse_what_they_cannot_use(tmp_path):
    from wsiseg.api import ResultError

    with pytest.raises(ResultError, match="not a finished wsiseg run folder"):
        wsiseg.open_result(tmp_path)
    with pytest.raises(TypeError, match="unknown option"):
        wsiseg.run(tmp_path / "x.png", tmp_path, tile_size=256)
    assert wsiseg.load_model().classes[0] == "nucleus"


def test_predictor_spec_is_one_frozen_picklable_value(tmp_path, tiny_unet_path, monkeypatch):
    """What Dask workers and bench get: one hashable value (workers cache a predictor per spec),
    equal after pickling, with a model path made absolute for another working directory, bad
    options refused before any model is loaded, and the predictor it builds using every field."""
    import argparse
    import dataclasses
    import pickle

    from wsiseg.predict import PredictorSpec

    spec = PredictorSpec(str(tiny_unet_path), "cpu", 1, "flips", "torch")
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(PredictorSpec(**dataclasses.asdict(spec)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.threads = 2
    with pytest.raises(ValueError, match="backend"):
        PredictorSpec(backend="tensorrt")
    with pytest.raises(ValueError, match="test-time augmentation"):
        PredictorSpec(tta="d8")
    monkeypatch.chdir(tiny_unet_path.parent)
    rel = PredictorSpec(tiny_unet_path.stem, "cpu")  # a relative path without its suffix
    assert rel.portable().model == str((tiny_unet_path.parent / tiny_unet_path.stem).resolve())
    assert PredictorSpec("unet-bn-monuseg-20x").portable().model == "unet-bn-monuseg-20x"  # a registry name stays
    args = argparse.Namespace(model=str(tiny_unet_path), device="cpu", threads=1, tta="flips", backend="torch",
                              tile=256)
    assert PredictorSpec.from_args(args) == spec
    p = spec.build()
    assert (p.device.type, p.tta, p.backend) == ("cpu", "flips", "torch")
    assert p.model.id == "tiny-unet-test"
