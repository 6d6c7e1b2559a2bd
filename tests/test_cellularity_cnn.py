"""CNN cellularity regressors (ResNet-34 "SR" on maps, direct on images) and the BreastPathQ loader.

Real data: CoNSeP class maps from ../shared/data/consep/train and the one public BreastPathQ
patch ../shared/data/breastpathq/99788_1.tif (skipped when absent). Targets from CoNSeP are the
PROXY cellularity (tumour nuclear area / all nuclear area), not a pathologist's score. Networks
are trained at 32 px for a few epochs: mechanics, not accuracy.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wsiseg.cellularity.cnn import (N_BINS, CNNModelError, ImageCNNRegressor, MapCNNRegressor, bins_to_cellularity,
                             cellularity_to_bins)
from wsiseg.cellularity.data import consep_proxy_set, every_nth_image, load_breastpathq, read_breastpathq_csv
from tests.conftest import SHARED, need

CONSEP = SHARED / "consep" / "train"
BPQ_PATCH = SHARED / "breastpathq" / "99788_1.tif"

# 4 tiles from each of 4 images, proxy labels spread from 0 to 1
TILES = [f"train_{i}_{j:03d}" for i in (1, 5, 14, 20) for j in (0, 5, 10, 15)]


@pytest.fixture(scope="module")
def proxy():
    return consep_proxy_set(need(CONSEP), TILES, with_images=True)


@pytest.fixture(scope="module")
def fitted(proxy):
    """A MapCNNRegressor fitted at 32 px for 5 epochs on 16 real CoNSeP maps (no augmentation)."""
    m = MapCNNRegressor(input_size=32, device="cpu")
    m.fit(proxy.maps, proxy.y, proxy.maps[:4], proxy.y[:4], epochs=5, batch_size=8, lr=3e-3, augment=False,
          patience=100, data_description="test: 16 CoNSeP tiles, PROXY labels")
    return m


# ------------------------------------------------------------------------------------- bins


def test_classification_bins_and_expected_value():
    assert cellularity_to_bins([0.0, 0.004, 0.005, 0.37, 0.999, 1.0]).tolist() == [0, 0, 0, 37, 100, 100]
    assert cellularity_to_bins(0.126).tolist() == 13
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cellularity_to_bins([1.2])
    z = np.full((4, N_BINS), -1e4)
    z[0, 30] = 0  # all mass on bin 30
    z[1, [20, 60]] = 0  # half on 0.20, half on 0.60 -> expected 0.40, argmax picks the first (0.20)
    z[2] = 0  # uniform over 0..100 -> expected 0.5
    z[3, 100] = np.log(3.0)  # 3:1 between 1.00 and 0.00
    z[3, 0] = 0
    assert bins_to_cellularity(z) == pytest.approx([0.30, 0.40, 0.50, 0.75])
    assert bins_to_cellularity(z, "argmax") == pytest.approx([0.30, 0.20, 0.0, 1.00])
    assert bins_to_cellularity(z + 123.0) == pytest.approx([0.30, 0.40, 0.50, 0.75])  # shift invariant
    with pytest.raises(ValueError):
        bins_to_cellularity(z[:, :100])


def test_classification_head_and_predict_on_constructed_logits():
    """The head has 101 outputs and predict() applies the expected value (or argmax) to them."""
    import torch

    m = ImageCNNRegressor(mode="classification", input_size=32, device="cpu")
    m.model_ = m._build().eval()
    m.device_ = "cpu"
    assert m.model_.get_classifier().out_features == N_BINS
    fc = m.model_.get_classifier()
    with torch.no_grad():  # logits independent of the input: bins 20 and 60 equally likely
        fc.weight.zero_()
        fc.bias.fill_(-1e4)
        fc.bias[[20, 60]] = 0.0
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    assert m.predict(x) == pytest.approx([0.4] * 3)
    p = m.predict_proba(x)
    assert p.shape == (3, N_BINS) and p[:, [20, 60]] == pytest.approx(np.full((3, 2), 0.5))
    m.class_prediction = "argmax"
    assert m.predict(x) == pytest.approx([0.2] * 3)
    with pytest.raises(ValueError, match="mode"):
        ImageCNNRegressor(mode="ordinal")


# ------------------------------------------------------------------------------ fit/predict


def test_split_every_fifth_image():
    ids = [f"train_{i}" for i in range(1, 28)]
    assert every_nth_image(ids[::-1] * 2) == ["train_1", "train_6", "train_11", "train_16", "train_21", "train_26"]


@pytest.mark.slow
def test_map_cnn_fit_predict(fitted, proxy):
    h = fitted.history_
    assert len(h) == 5 and all("val_mse" in r for r in h)
    assert h[-1]["train_loss"] < h[0]["train_loss"], [r["train_loss"] for r in h]
    assert fitted.model_.get_classifier().out_features == 1 and fitted.model_.conv1.in_channels == 4
    assert 1 <= fitted.best_epoch_ <= 5 and fitted.train_metrics_["n_train"] == 16
    p = fitted.predict(proxy.maps)
    assert p.shape == (16,) and p.dtype == np.float64 and p.min() >= 0 and p.max() <= 1
    # on the (small) training set the fit beats predicting the mean
    assert np.mean((p - proxy.y) ** 2) < np.var(proxy.y)
    # a list of maps of other sizes: resized to the same 32 px input
    q = fitted.predict([proxy.maps[0], proxy.maps[1][:, :96, :96]])
    assert q.shape == (2,) and q[0] == pytest.approx(p[0], abs=1e-6)
    with pytest.raises(ValueError, match="channels"):
        fitted.predict(proxy.maps[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.predict(proxy.maps[:2] * 3)


@pytest.mark.slow
def test_save_load_round_trip(fitted, proxy, tmp_path):
    w = fitted.save(tmp_path / "sr")
    assert w.name == "sr.safetensors" and (tmp_path / "sr.json").is_file()
    meta = json.loads((tmp_path / "sr.json").read_text())
    assert meta["architecture"] == "resnet34" and meta["class"] == "MapCNNRegressor"
    assert meta["input"]["channels"] == ["normal", "lymphocyte", "malignant", "background"]
    assert meta["input"]["mpp"] == 0.5 and meta["input"]["patch_px"] == [128, 128]
    assert meta["input"]["input_size"] == 32 and meta["normalization"]["mean"] == [0.5] * 4
    assert meta["training"]["data"].startswith("test") and meta["training"]["epochs_run"] == 5
    assert "val_mse" in meta["metrics"] and meta["training"]["seconds"] > 0
    loaded = MapCNNRegressor.load(tmp_path / "sr.json", device="cpu")
    assert np.array_equal(loaded.predict(proxy.maps), fitted.predict(proxy.maps))

    # wrong class for the file
    with pytest.raises(CNNModelError, match="MapCNNRegressor"):
        ImageCNNRegressor.load(tmp_path / "sr")
    # sidecar naming another architecture than the weights
    bad = dict(meta, architecture="resnet18")
    bad["params"] = dict(meta["params"], arch="resnet18")
    bad["weights_file"] = "sr18.safetensors"
    shutil.copy(w, tmp_path / "sr18.safetensors")
    (tmp_path / "sr18.json").write_text(json.dumps(bad))
    with pytest.raises(CNNModelError, match="weights are for"):
        MapCNNRegressor.load(tmp_path / "sr18")
    # weights of another architecture under a consistent-looking header
    from safetensors.torch import load_file, save_file

    state = load_file(str(w))
    state.pop("layer4.2.conv1.weight")
    save_file(state, str(tmp_path / "sr18.safetensors"), metadata={"architecture": "resnet18"})
    with pytest.raises(CNNModelError, match="do not fit"):
        MapCNNRegressor.load(tmp_path / "sr18")
    # missing files, other formats
    (tmp_path / "sr.safetensors").rename(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file"):
        MapCNNRegressor.load(tmp_path / "sr")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        MapCNNRegressor.load(tmp_path / "nothing")
    (tmp_path / "lgb.json").write_text(json.dumps({"format": "cellularity.lightgbm/1"}))
    with pytest.raises(CNNModelError, match="format"):
        MapCNNRegressor.load(tmp_path / "lgb")
    (tmp_path / "pk.json").write_text(json.dumps(dict(meta, weights_file="pk.pt")))
    with pytest.raises(CNNModelError, match="safetensors"):
        MapCNNRegressor.load(tmp_path / "pk")


def test_not_fitted_and_bad_inputs():
    with pytest.raises(RuntimeError, match="not fitted"):
        MapCNNRegressor().predict(np.zeros((1, 4, 32, 32), np.float32))
    m = ImageCNNRegressor(input_size=32, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        m.fit(np.zeros((2, 32, 32, 3), np.float32), [0.1, 0.2], epochs=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.fit(np.zeros((2, 32, 32, 3), np.uint8), [0.1, 20.0], epochs=1)
    with pytest.raises(ValueError, match="input_size"):
        MapCNNRegressor(input_size=8)


@pytest.mark.slow
def test_seeded_fit_is_deterministic_and_image_classifier_trains(proxy):
    def run():
        m = ImageCNNRegressor(mode="classification", input_size=32, device="cpu")
        return m.fit(proxy.images[:8], proxy.y[:8], epochs=1, batch_size=4, seed=3)

    a, b = run(), run()
    assert [r["train_loss"] for r in a.history_] == [r["train_loss"] for r in b.history_]
    pa = a.predict(proxy.images[:8])
    assert np.array_equal(pa, b.predict(proxy.images[:8]))
    assert pa.shape == (8,) and 0 <= pa.min() and pa.max() <= 1
    assert a.training_["loss"].startswith("cross entropy")


def test_encoder_weights_from_local_safetensors(tmp_path):
    """ImageNet-style 3-channel encoder weights load into the 4-channel map model (conv1 adapted)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = timm.create_model("resnet34", pretrained=False)  # 3 channels, 1000 classes
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    from wsiseg.cellularity.cnn import _load_encoder_weights

    net = MapCNNRegressor()._build()
    desc = _load_encoder_weights(net, tmp_path / "enc.safetensors", 4)
    assert "enc.safetensors" in desc
    assert torch.equal(net.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert net.conv1.weight.shape[1] == 4
    with pytest.raises(ValueError, match="safetensors"):
        _load_encoder_weights(net, tmp_path / "enc.pth", 4)


# ---------------------------------------------------------------------------- BreastPathQ


def _bpq_layout(tmp_path, rows="slide,rid,y\n99788,1,0.97\n"):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    dst = img_dir / "99788_1.tif"
    if not dst.exists():
        dst.symlink_to(need(BPQ_PATCH))
    csv = tmp_path / "labels.csv"
    csv.write_text(rows)
    return csv, img_dir


def test_load_breastpathq_real_patch(tmp_path):
    csv, img_dir = _bpq_layout(tmp_path)
    images, y, ids = load_breastpathq(csv, img_dir)
    assert images.shape == (1, 512, 512, 3) and images.dtype == np.uint8 and images.std() > 10
    assert y.tolist() == [0.97] and ids == ["99788_1"]
    imgs, _, _ = load_breastpathq(csv, img_dir, stack=False)
    assert isinstance(imgs, list) and np.array_equal(imgs[0], images[0])


def test_load_breastpathq_errors(tmp_path):
    csv, img_dir = _bpq_layout(tmp_path, "slide,rid,cellularity\n99788,1,0.97\n")
    with pytest.raises(ValueError, match="header"):
        load_breastpathq(csv, img_dir)
    csv.write_text("slide,rid,y\n99788,1,0.97\n99788,2,0.5\n12345,7,0.1\n")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 .*99788_2\.tif, 12345_7\.tif"):
        load_breastpathq(csv, img_dir)
    csv.write_text("slide,rid,y\n99788,1,97\n")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        read_breastpathq_csv(csv)
    csv.write_text("slide,rid,y\n99788,1,0.9\n99788,1,0.8\n")
    with pytest.raises(ValueError, match="already listed"):
        read_breastpathq_csv(csv)


def test_breastpathq_patches_are_read_at_20x_and_scored_by_eval_and_predict(tmp_path, capsys):
    """BreastPathQ's patches are 20x (0.5 um/px): read so by default, the shipped regressors put the
    one public patch (pathologist score 0.97) above 0.5; read as 40x (halved) they put it near 0.
    ``cellularity predict`` on the image file gives the same scores as ``eval`` on the labels."""
    import csv as csvlib

    from wsiseg.cellularity.labelled import load_patches
    from wsiseg.cli import main

    csv, img_dir = _bpq_layout(tmp_path)
    assert load_patches(f"breastpathq:{csv}", 0.5, images=img_dir)[0].image.shape == (512, 512, 3)  # as it is
    assert load_patches(f"breastpathq:{csv}", 0.5, 0.25, img_dir)[0].image.shape == (256, 256, 3)  # --mpp 0.25
    rows = {}
    for name, extra in (("default", []), ("40x", ["--mpp", "0.25"])):
        out = tmp_path / f"eval_{name}.csv"
        assert main(["cellularity", "eval", "--data", f"breastpathq:{csv}", "--split", "all",
                     "--images", str(img_dir), "--predictions", str(out), *extra]) == 0
        (rows[name],) = list(csvlib.DictReader(out.open()))
    assert "| lgbm | cellularity | 1 |" in capsys.readouterr().out  # one patch: MSE only, the rest n/a
    assert rows["default"]["patch"] == "breastpathq/99788_1" and float(rows["default"]["y"]) == 0.97
    for reg in ("lgbm", "cnn"):
        assert float(rows["default"][reg]) > 0.5 > 0.2 > float(rows["40x"][reg])

    pred = tmp_path / "pred.csv"
    assert main(["cellularity", "predict", str(img_dir), "--mpp", "0.5", "-q", "-o", str(pred)]) == 0
    (row,) = list(csvlib.DictReader(pred.open()))
    assert (row["image"], row["slide"], row["rid"], float(row["mpp"])) == ("99788_1.tif", "99788", "1", 0.5)
    for reg in ("lgbm", "cnn"):
        assert float(row[reg]) == pytest.approx(float(rows["default"][reg]), abs=1e-6)
    capsys.readouterr()
    # the file does not say its resolution: reported, as wsiseg run reports it, and exit 1
    assert main(["cellularity", "predict", str(img_dir), "-o", str(pred)]) == 1
    assert "99788_1.tif" in (err := capsys.readouterr().err) and "--mpp" in err
