"""The cellularity stage of `wsiseg run` and `wsiseg cellularity train/eval` on real data."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.conftest import SHARED, need, write_png
from wsiseg.cli import main
from wsiseg.scoring import CLASS_INPUTS, pad_to, patch_features, tissue_fractions, window_grid

CONSEP = SHARED / "consep" / "train"


def _window_maps(out_dir, row) -> np.ndarray:
    """The (4, h, w) class maps in CLASS_INPUTS order under one cellularity.csv row, read back
    from the run's Zarr: the row's level-0 box mapped to the model's pixels."""
    import zarr

    g = zarr.open_group(str(out_dir / "probabilities.zarr"), mode="r")
    attrs = dict(g.attrs["wsiseg"])
    s = float(attrs.get("scale_from_level0", 1.0))
    x, y, w, h = (round(int(row[k]) / s) for k in ("x", "y", "width", "height"))
    classes = [c.lower() for c in attrs["classes"]]
    return g["0"][:, y:y + h, x:x + w][[classes.index(c) for c in CLASS_INPUTS]].astype(np.float32) / 255


def test_window_grid_covers_map_with_full_size_windows():
    wins = window_grid((1100, 700), 512)
    assert all(h == 512 and w == 512 for _, _, h, w in wins)
    cover = np.zeros((1100, 700), bool)
    for y, x, h, w in wins:
        assert 0 <= y and y + h <= 1100 and 0 <= x and x + w <= 700
        cover[y:y + h, x:x + w] = True
    assert cover.all()
    assert sorted({y for y, *_ in wins}) == [0, 512, 588]  # the last row of windows moved inward
    assert window_grid((300, 200), 512) == [(0, 0, 300, 200)]


def test_tissue_fractions_follow_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half tissue
    f = tissue_fractions(mask, (1000, 1000), [(0, 0, 500, 500), (0, 500, 500, 500), (0, 250, 500, 500)])
    np.testing.assert_allclose(f, [1.0, 0.0, 0.5], atol=0.02)


def test_padding_is_background_and_features_per_pixel():
    m = np.zeros((4, 100, 60), np.float32)
    m[2, 10:20, 10:20] = 0.9
    m[3] = 1 - m[2]
    p = pad_to(m, 128)
    assert p.shape == (4, 128, 128) and p[3, 120, 120] == 1 and p[:3, 120, 120].sum() == 0
    f_small, f_pad = patch_features(m, "none"), patch_features(p, "none")
    np.testing.assert_allclose(f_small, f_pad)  # padding with background adds nothing
    np.testing.assert_allclose(patch_features(p), f_pad / (128 * 128))


def _class_model(tmp_path):
    from wsiseg.models.registry import build_model, save_model

    torch.manual_seed(0)
    net = build_model("unet_bn", base=4, depth=2, out_channels=5)
    meta = {"id": "tiny-classes-test", "architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2, "out_channels": 5},
            "classes": ["nucleus", *CLASS_INPUTS], "mpp": 0.5, "activation": "sigmoid", "input_multiple": 4,
            "normalization": {"mean": [0.7, 0.55, 0.7], "std": [0.15, 0.2, 0.15]}}
    return save_model(net.eval(), meta, tmp_path / "tiny-classes")


@pytest.fixture(scope="module")
def lgbm_path(tmp_path_factory):
    """A LightGBM regressor fitted on real CoNSeP label maps (PROXY labels), per-pixel features."""
    from wsiseg.cellularity.features import FEATURE_NAMES
    from wsiseg.cellularity.proxy import load_consep
    from wsiseg.cellularity.regressors import LightGBMRegressor

    need(CONSEP)
    names = sorted(p.stem for p in (CONSEP / "classes").glob("*.png"))[::6][:60]
    tiles = load_consep(CONSEP, names)
    X = np.stack([patch_features(t.probs) for t in tiles])
    y = np.array([t.proxy for t in tiles])
    reg = LightGBMRegressor(n_estimators=200, min_child_samples=5).fit(X, y, feature_names=FEATURE_NAMES)
    stem = tmp_path_factory.mktemp("lgbm") / "lgbm-test"
    reg.save(stem)
    side = stem.with_name(stem.name + ".json")
    meta = json.loads(side.read_text())
    meta["feature_normalisation"] = "per_pixel"
    side.write_text(json.dumps(meta))
    # the regressor learned something real: predictions follow the proxy on its own data
    assert np.corrcoef(reg.predict(X), y)[0, 1] > 0.8
    return stem


def test_batched_scoring_equals_patch_by_patch(lgbm_path):
    """The run's LightGBM scorer computes features in a thread pool over a batch of windows of
    mixed sizes; it must give what one patch at a time gives."""
    from wsiseg.cellularity.proxy import load_consep
    from wsiseg.cellularity.regressors import LightGBMRegressor
    from wsiseg.scoring import _LGBM

    names = sorted(p.stem for p in (CONSEP / "classes").glob("*.png"))[1::9][:6]
    maps = [t.probs for t in load_consep(CONSEP, names)]
    maps[0] = maps[0][:, :90, :70]  # a partial window
    path = lgbm_path.with_name(lgbm_path.name + ".txt")
    scorer = _LGBM(path)
    ref = LightGBMRegressor.load(path).predict(np.stack([patch_features(m) for m in maps]))
    np.testing.assert_allclose(scorer.predict(maps), ref, rtol=0, atol=1e-12)
    assert len(np.unique(np.round(ref, 6))) > 1  # the patches differ, so order matters
    assert scorer.predict([]).shape == (0,)


@pytest.mark.slow
def test_run_map_cnn_uses_the_fastest_exact_cpu_runtime():
    """The run's map CNN (the shipped one): on the CPU, for a slide with enough windows, OpenVINO
    when installed and exact on a probe batch, else torch; its scores on real CoNSeP class maps
    (windows of mixed sizes, tiled at the CNN's input size) equal those of the torch network."""
    from wsiseg.cellularity.proxy import load_consep
    from wsiseg.predict import openvino_available
    from wsiseg.scoring import _CNN, _find

    names = sorted(p.stem for p in (CONSEP / "classes").glob("*.png"))[::7][:8]
    maps = [t.probs for t in load_consep(CONSEP, names)]
    maps[0] = maps[0][:, :90, :70]  # a partial window
    maps.append(np.concatenate([np.concatenate(maps[1:3], 2), np.concatenate(maps[3:5], 2)], 1))  # 256 px: 4 tiles
    fast = _CNN(_find("cellularity-cnn-proxy", (".safetensors",)))
    fast.prepare(fast.OPENVINO_FROM_WINDOWS - 1)  # a small slide: the compilation would not pay
    assert fast.backend == "torch"
    fast.prepare(fast.OPENVINO_FROM_WINDOWS)
    assert fast.backend == ("openvino" if openvino_available() else "torch")
    got = fast.predict(maps)
    plain = _CNN.__new__(_CNN)
    plain.size = fast.size
    from wsiseg.cellularity.cnn import MapCNNRegressor

    plain.model = MapCNNRegressor.load(_find("cellularity-cnn-proxy", (".safetensors",)))  # torch
    ref = plain.predict(maps)
    assert len(np.unique(np.round(ref, 4))) > 3  # the windows differ
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_run_writes_cellularity_table_heatmap_and_summary(tmp_path, monuseg_image, lgbm_path):
    # the shipped class model: real maps, so the windows' scores differ
    img = write_png(tmp_path / "patch.png", monuseg_image[:700, :900])
    out = tmp_path / "out"
    assert main(["run", "-q", str(img), "--mpp", "0.25", "--model", "unet-bn-nuclei-classes-20x", "-o", str(out),
                 "--lgbm", str(lgbm_path), "--cnn", "none", "--cell-window", "128"]) == 0
    d = out / "patch"
    rows = list(csv.DictReader(open(d / "cellularity.csv")))
    assert rows and list(rows[0]) == ["x", "y", "width", "height", "tissue_fraction", "cellularity_lgbm"]
    for r in rows:
        # level-0 coordinates: the model runs at 0.5 um/px, the image is 0.25 um/px
        assert int(r["width"]) == 256 and int(r["height"]) == 256
        assert 0 <= int(r["x"]) <= 900 - 256 and 0 <= int(r["y"]) <= 700 - 256
        assert 0.0 <= float(r["cellularity_lgbm"]) <= 1.0
    s = json.loads((d / "summary.json").read_text())
    c = s["cellularity"]
    assert c["status"] == "ok" and c["windows"] == len(rows)
    vals = np.array([float(r["cellularity_lgbm"]) for r in rows])
    assert c["cellularity_lgbm"]["median"] == pytest.approx(np.median(vals), abs=1e-3)
    # each row's score is the regressor's on the 81 features of the maps under its box
    from wsiseg.cellularity.regressors import LightGBMRegressor

    reg = LightGBMRegressor.load(lgbm_path.with_name(lgbm_path.name + ".txt"))
    X = np.stack([patch_features(pad_to(_window_maps(d, r), 128)) for r in rows])
    assert len(np.unique(vals)) > 1  # so a wrong window or channel order would show
    np.testing.assert_allclose(vals, reg.predict(X), rtol=0, atol=6e-5)  # the CSV keeps 4 decimals
    from PIL import Image

    assert Image.open(d / "heatmap.png").size[0] > 100


@pytest.mark.slow
def test_an_image_smaller_than_a_window_is_scored_on_its_own_extent(tmp_path, monuseg_image, lgbm_path):
    """A 128 x 160 px patch at the model's resolution (smaller than the 512 px window) is scored on
    its own map, as the regressors were trained on patches of their own size, not on the map
    padded with background to 512 px (which divides its per-pixel features by 16x its area)."""
    from wsiseg.cellularity.regressors import LightGBMRegressor

    img = write_png(tmp_path / "small.png", monuseg_image[300:556, 200:520])
    out = tmp_path / "out"
    assert main(["run", "-q", str(img), "--mpp", "0.25", "--model", "unet-bn-nuclei-classes-20x", "-o", str(out),
                 "--lgbm", str(lgbm_path), "--cnn", "none"]) == 0
    d = out / "small"
    rows = list(csv.DictReader(open(d / "cellularity.csv")))
    assert len(rows) == 1 and (int(rows[0]["width"]), int(rows[0]["height"])) == (320, 256)
    m = _window_maps(d, rows[0])
    assert m.shape == (4, 128, 160)
    reg = LightGBMRegressor.load(lgbm_path.with_name(lgbm_path.name + ".txt"))
    own, padded = reg.predict(np.stack([patch_features(m), patch_features(pad_to(m, 512))]))
    assert float(rows[0]["cellularity_lgbm"]) == pytest.approx(own, abs=6e-5)
    assert abs(own - padded) > 1e-3  # the padded window would have given another score


def test_malignant_share_is_the_proxy_read_off_the_maps():
    from wsiseg.scoring import malignant_share

    m = np.zeros((4, 10, 10), np.float32)
    m[3] = 1
    assert malignant_share(m) == 0.0  # no nuclei
    m[2, :2] = 1.0  # 20 px malignant
    m[1, 2:8] = 0.5  # 60 px at 0.5: 30 lymphocyte
    assert malignant_share(m) == pytest.approx(20 / 50)


@pytest.mark.slow
def test_no_cellularity_and_model_without_classes(tmp_path, monuseg_image, tiny_unet_path, lgbm_path):
    img = write_png(tmp_path / "p.png", monuseg_image[:300, :300])
    assert main(["run", "-q", str(img), "--mpp", "0.5", "--model", str(tiny_unet_path), "-o", str(tmp_path / "a"),
                 "--lgbm", str(lgbm_path), "--cnn", "none"]) == 0
    s = json.loads((tmp_path / "a" / "p" / "summary.json").read_text())
    assert s["cellularity"]["status"] == "skipped" and "normal" in s["cellularity"]["reason"]
    model = _class_model(tmp_path)
    assert main(["run", "-q", str(img), "--mpp", "0.5", "--model", str(model), "-o", str(tmp_path / "b"),
                 "--no-cellularity"]) == 0
    assert not (tmp_path / "b" / "p" / "cellularity.csv").exists()
    assert "cellularity" not in json.loads((tmp_path / "b" / "p" / "summary.json").read_text())


@pytest.mark.slow
def test_blank_slide_writes_empty_cellularity_table(tmp_path, lgbm_path):
    model = _class_model(tmp_path)
    img = write_png(tmp_path / "blank.png", np.full((400, 400, 3), 245, np.uint8))
    assert main(["run", "-q", str(img), "--mpp", "0.5", "--model", str(model), "-o", str(tmp_path / "o"),
                 "--lgbm", str(lgbm_path), "--cnn", "none"]) == 0
    d = tmp_path / "o" / "blank"
    assert list(csv.reader(open(d / "cellularity.csv"))) == [
        ["x", "y", "width", "height", "tissue_fraction", "cellularity_lgbm"]]
    assert json.loads((d / "summary.json").read_text())["cellularity"]["windows"] == 0


@pytest.mark.slow
def test_cellularity_train_and_eval_cli(tmp_path):
    need(CONSEP)
    model = _class_model(tmp_path)
    stem = tmp_path / "reg"
    assert main(["cellularity", "train", "--data", f"consep:{CONSEP}", "--model", str(model), "--max-patches", "48",
                 "--val-every", "2", "-o", str(stem), "--importance", str(tmp_path / "imp.png")]) == 0
    meta = json.loads((tmp_path / "reg.json").read_text())
    assert meta["feature_normalisation"] == "per_pixel" and meta["label"] == "proxy"
    assert meta["validation_groups"] == ["consep/train_10", "consep/train_12"] and meta["validation_metrics"]["n"] == 32
    assert (tmp_path / "imp.png").stat().st_size > 1000
    out = tmp_path / "eval.json"
    assert main(["cellularity", "eval", "--data", f"consep:{CONSEP}", "--model", str(model), "--max-patches", "48",
                 "--val-every", "2", "--lgbm", str(stem), "--cnn", "none", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"]["lgbm"]["mse"] == pytest.approx(meta["validation_metrics"]["mse"], rel=1e-6)
    share = res["rows"]["share (no learning)"]  # the no-learning baseline, on the same patches
    assert share["n"] == res["rows"]["lgbm"]["n"] and 0 <= share["mse"] < 1


@pytest.mark.slow
def test_cellularity_train_cnn_cli_and_run_with_it(tmp_path, monuseg_image):
    need(CONSEP)
    model = _class_model(tmp_path)
    stem = tmp_path / "cnn"
    assert main(["cellularity", "train", "--regressor", "cnn", "--data", f"consep:{CONSEP}", "--model", str(model),
                 "--max-patches", "32", "--val-every", "2", "--epochs", "1", "-o", str(stem)]) == 0
    meta = json.loads((tmp_path / "cnn.json").read_text())
    assert meta["label"] == "proxy" and meta["validation_metrics"]["n"] == 16
    img = write_png(tmp_path / "p.png", monuseg_image[:600, :600])
    assert main(["run", "-q", str(img), "--mpp", "0.5", "--model", "unet-bn-nuclei-classes-20x", "-o", str(tmp_path / "o"),
                 "--lgbm", "none", "--cnn", str(stem)]) == 0
    d = tmp_path / "o" / "p"
    rows = list(csv.DictReader(open(d / "cellularity.csv")))
    assert rows
    # the scores are the trained CNN's on the maps under each row's box, not the shipped CNN's
    from wsiseg.scoring import DEFAULT_REGRESSORS, _CNN, load_regressor

    maps = [pad_to(_window_maps(d, r), 512) for r in rows]
    vals = np.array([float(r["cellularity_cnn"]) for r in rows])
    np.testing.assert_allclose(vals, _CNN(stem.with_name(stem.name + ".safetensors")).predict(maps), rtol=0, atol=6e-5)
    assert np.abs(vals - load_regressor("cnn", DEFAULT_REGRESSORS["cnn"]).predict(maps)).max() > 1e-3


@pytest.mark.slow
def test_cellularity_train_and_eval_direct_image_regressor_cli(tmp_path):
    """Seed 003's direct baseline (ResNet-34 on RGB, 101 bins) trains, saves and re-evaluates alike."""
    need(CONSEP)
    model = _class_model(tmp_path)
    stem = tmp_path / "img"
    assert main(["cellularity", "train", "--regressor", "image", "--mode", "classification", "--width", "quarter",
                 "--data", f"consep:{CONSEP}", "--model", str(model), "--max-patches", "32", "--val-every", "2",
                 "--epochs", "1", "-o", str(stem)]) == 0
    meta = json.loads((tmp_path / "img.json").read_text())
    assert meta["class"] == "ImageCNNRegressor" and meta["mode"] == "classification"
    assert meta["input"]["kind"] == "images" and meta["input"]["input_size"] == 128
    assert meta["label"] == "proxy" and meta["validation_metrics"]["n"] == 16
    out = tmp_path / "eval.json"
    assert main(["cellularity", "eval", "--data", f"consep:{CONSEP}", "--model", str(model), "--max-patches", "32",
                 "--val-every", "2", "--lgbm", "none", "--cnn", "none", "--image-cnn", str(stem),
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"]["image-classification (img)"]
    assert row["n"] == 16 and row["mse"] == pytest.approx(meta["validation_metrics"]["mse"], rel=1e-5)
