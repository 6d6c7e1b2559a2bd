"""Stain normalisation (wsiseg.stain): fits on real pixels, oracles, one transform per slide."""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tests.conftest import MONUSEG, SAMPLE_SVS, conv_net, need, test_model, write_png
from wsiseg import stain
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.predict import Predictor

METHODS = ("reinhard", "macenko", "vahadane")
OTHER_ID = "TCGA-21-5784-01Z-00-DX1"  # another MoNuSeg image (lung): a target with other stains


def _image(name: str, size: int = 500) -> np.ndarray:
    return np.asarray(Image.open(need(MONUSEG / "images" / f"{name}.png")).convert("RGB"))[:size, :size]


@pytest.fixture(scope="module")
def sample_crop() -> np.ndarray:
    """A 512 x 512 all-tissue crop of the bundled sample slide at 0.5 um/px."""
    from wsiseg.slide import ScaledView, open_slide

    r = open_slide(SAMPLE_SVS)
    try:
        return ScaledView.create(r, 0.5).read(1792, 1024, 512, 512)
    finally:
        r.close()


def _od_apply(A: np.ndarray, img: np.ndarray) -> np.ndarray:
    """uint8 image through the OD-linear map A (rows: OD' = OD @ A), the convention of wsiseg.stain."""
    od = stain.optical_density(img).reshape(-1, 3)
    return np.clip(np.round(stain.IO * np.exp(-(od @ A)) - 1), 0, 255).astype(np.uint8).reshape(img.shape)


def _angle(u, v) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))


# ----------------------------------------------------------------------------- colour maths


def test_lab_matches_torchstain_and_round_trips(monuseg_image):
    from torchstain.torch.utils.rgb2lab import rgb2lab
    from torchstain.torch.utils.split import lab_split

    x = torch.from_numpy(monuseg_image[:256, :256].copy()).float()
    ours = stain.rgb_to_lab(x)
    theirs = torch.stack(lab_split(rgb2lab(x.permute(2, 0, 1) / 255)), 0).permute(1, 2, 0)
    assert (ours - theirs).abs().max() < 1e-3
    assert (stain.lab_to_rgb(ours) - x).abs().max() < 1e-2


def test_clahe_table_gives_opencv_clahe_bytes(monuseg_image):
    """One table for the whole image = OpenCV's CLAHE with a 1 x 1 grid, byte for byte."""
    L = cv2.cvtColor(monuseg_image, cv2.COLOR_RGB2LAB)[..., 0]
    lut = stain.clahe_lut(np.bincount(L.ravel(), minlength=256), stain.CLAHE_CLIP)
    ref = cv2.createCLAHE(clipLimit=stain.CLAHE_CLIP, tileGridSize=(1, 1)).apply(L)
    np.testing.assert_array_equal(np.clip(np.round(lut[L]), 0, 255).astype(np.uint8), ref)
    assert not np.array_equal(ref, L)  # it did equalise


# ----------------------------------------------------------------------------- fitting


def test_macenko_and_vahadane_recover_a_known_stain_matrix():
    """Real H and E amounts (skimage's colour deconvolution of a MoNuSeg breast image, each
    lowered by its 30th percentile so that single-stain pixels exist, which both methods
    assume) mixed with a known stain matrix: the fitted H and E vectors are that matrix's."""
    from skimage.color import rgb2hed

    hed = rgb2hed(_image("TCGA-A7-A13E-01Z-00-DX1"))[..., :2]
    c = np.clip(hed - np.percentile(hed, 30, axis=(0, 1)), 0, None)
    c = c / np.percentile(c, 99, axis=(0, 1)) * np.array([1.5, 1.2])
    H, E = np.array([0.65, 0.70, 0.29]), np.array([0.16, 0.91, 0.38])
    H, E = H / np.linalg.norm(H), E / np.linalg.norm(E)
    mixed = np.clip(np.round(stain.IO * np.exp(-(c[..., :1] * H + c[..., 1:] * E)) - 1), 0, 255).astype(np.uint8)
    tol = {"macenko": 1.0, "vahadane": 5.0}  # degrees; measured 0.26/0.14 and 1.6/3.5
    for method, t in tol.items():
        S = np.array(stain.fit_reference(stain.tissue_pixels(mixed), method).stain_matrix)
        assert _angle(S[0], H) < t and _angle(S[1], E) < t, (method, S)
        # the residual row completes the basis
        assert abs(np.dot(S[2], S[0])) < 1e-9 and abs(np.dot(S[2], S[1])) < 1e-9


def test_a_slide_normalised_to_its_own_reference_is_unchanged(monuseg_image):
    img = monuseg_image[:400, :400]
    for m in METHODS:
        spec = stain.StainSpec(m, False, stain.fit_reference(stain.tissue_pixels(img), m))
        np.testing.assert_array_equal(stain.fit_transform(spec, img).apply_numpy(img), img, err_msg=m)


def test_macenko_transform_matches_torchstain_normalize():
    """The per-slide transform built from torchstain's own fits of source and target gives
    torchstain's ``normalize`` output on an image made of H and E only (nothing for the residual
    stain to carry), up to its truncation and its ``Io exp(-OD)`` without the -1."""
    import torchstain

    src = _image("TCGA-A7-A13E-01Z-00-DX1", 300)
    n_src = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    n_src.fit(torch.from_numpy(src.copy()).permute(2, 0, 1))
    he = n_src.HERef.double().numpy().T
    # the source re-mixed from its own two stains: exactly an H&E image for torchstain's fit too
    c = np.linalg.lstsq(he.T, stain.optical_density(src).reshape(-1, 3).T, rcond=None)[0].T
    src = np.clip(np.round(stain.IO * np.exp(-(c @ he)) - 1), 0, 255).astype(np.uint8).reshape(src.shape)
    n_src.fit(torch.from_numpy(src.copy()).permute(2, 0, 1))
    n_tgt = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    n_tgt.fit(torch.from_numpy(_image(OTHER_ID, 300).copy()).permute(2, 0, 1))

    def ref(n):
        return stain.StainReference("macenko", tuple(map(tuple, stain._with_residual(n.HERef.double().numpy().T))),
                                    tuple(float(v) for v in n.maxCRef))

    ours = stain.StainTransform("macenko", ref(n_src), ref(n_tgt)).on("cpu")(torch.from_numpy(src).float()).numpy()
    theirs = n_tgt.normalize(torch.from_numpy(src.copy()).permute(2, 0, 1), stains=False)[0].numpy()
    d = np.abs(np.floor(np.minimum(ours + 1, 255)) - theirs)
    assert d.max() <= 1 and d.mean() < 0.25, (d.max(), d.mean())  # measured 1 and 0.12 (uint8 rounding)
    assert np.abs(ours - src).mean() > 5  # and it did change the colours


def _linear_hed_jitter(img: np.ndarray, rng) -> np.ndarray:
    """hed_jitter's per-stain scaling (skimage's HED basis, factors 0.75..1.25) as the linear map
    of optical density it is before rgb2hed clips negative stain amounts to zero."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return _od_apply(hed_from_rgb @ np.diag(rng.uniform(0.75, 1.25, 3)) @ rgb_from_hed, img)


@pytest.mark.slow
def test_normalising_a_hed_jittered_copy_brings_colours_and_nuclei_back(sample_crop):
    """A stain-jittered copy of the sample slide, normalised to the original's reference: its
    colours (mean |dRGB|) and its nucleus map (mean |dp|, shipped MoNuSeg model) come closer to the
    original's than without normalisation (mean over 3 jitters), for every method. With the
    training augmentation itself (wsiseg.train.augment.hed_jitter: clipping negative stain
    amounts and a shift by a share of the crop's largest amount), Reinhard brings both closer;
    Macenko and Vahadane do not always (benchmarks/results/stain_jitter.json, docs/stain.md)."""
    from wsiseg.models import load_model
    from wsiseg.train.augment import hed_jitter

    pred = Predictor(load_model("unet-bn-monuseg-20x"), "cpu")
    p0 = pred(sample_crop[None])[0, 0]
    refs = {m: stain.fit_reference(stain.tissue_pixels(sample_crop), m) for m in METHODS}

    def distances(jittered: list[np.ndarray], method: str | None) -> tuple[float, float]:
        """(mean |dRGB| of the image the network sees, mean |dp| of its nucleus map) to the original's."""
        col, nuc = [], []
        for jit in jittered:
            p, seen = pred, jit
            if method is not None:
                t = stain.fit_transform(stain.StainSpec(method, False, refs[method]), jit)
                p, seen = pred.with_stain(t), t.apply_numpy(jit)
            col.append(np.abs(seen.astype(np.float32) - sample_crop).mean())
            nuc.append(np.abs(p(jit[None])[0, 0] - p0).mean())
        return float(np.mean(col)), float(np.mean(nuc))

    linear = [_linear_hed_jitter(sample_crop, np.random.default_rng(s)) for s in range(3)]
    base = distances(linear, None)
    assert base[0] > 2 and base[1] > 0.005  # the jitter is visible
    for m in METHODS:
        col, nuc = distances(linear, m)
        assert col < base[0] and nuc < base[1], (m, col, nuc, base)
    augmented = [hed_jitter(sample_crop, np.random.default_rng(s)) for s in range(3)]
    base = distances(augmented, None)
    col, nuc = distances(augmented, "reinhard")
    assert col < base[0] and nuc < base[1], (col, nuc, base)


# ----------------------------------------------------------------------------- the transform


def test_transform_is_json_and_pickle_safe_and_batched(monuseg_image):
    img = monuseg_image[:300, :300]
    spec = stain.StainSpec("macenko", True, stain.fit_reference(stain.tissue_pixels(_image(OTHER_ID)), "macenko"))
    t = stain.fit_transform(spec, img)
    assert t.clahe_lut is not None and len(t.clahe_lut) == 256
    back = stain.StainTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and pickle.loads(pickle.dumps(t)) == t
    batch = np.stack([img[:128, :128], img[100:228, 50:178]])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    a = t.apply_torch(x)
    b = back.apply_torch(x.float().contiguous())  # float, NCHW-contiguous input
    assert a.shape == (2, 3, 128, 128) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # batched = one tile at a time
    one = t.apply_torch(x[1:2])
    torch.testing.assert_close(a[1:2], one, rtol=0, atol=1e-4)
    assert 0 <= float(a.min()) and float(a.max()) <= 255


def test_cpu_kernels_agree_with_the_tensor_ops(monuseg_image):
    """The predictor's CPU path (OpenCV kernels on the batch) and its device path (torch tensor
    ops, as on a GPU) give the same network input: to float rounding through optical density,
    within 0.2 level through LAB."""
    from wsiseg.models import load_model

    model = load_model("unet-bn-monuseg-20x")
    tiles = np.stack([monuseg_image[y:y + 256, x:x + 256] for y, x in [(0, 0), (300, 500), (744, 600)]])
    std255 = torch.tensor(model.std).view(1, 3, 1, 1) * 255
    for method, clahe in [("macenko", False), ("vahadane", False), ("reinhard", False), ("none", True),
                          ("macenko", True)]:
        t = stain.fit_transform(stain.resolve_spec(method, None, clahe, model.meta), monuseg_image)
        p = Predictor(model, "cpu").with_stain(t)
        with torch.inference_mode():
            d = (p.inputs(tiles) - p.inputs(tiles, torch_input=True)).abs() * std255
        assert float(d.max()) < (0.01 if t.clahe_lut is None and method != "reinhard" else 0.2), (method, clahe)
        assert p.inputs(tiles).is_contiguous(memory_format=torch.channels_last)


def test_resolve_spec_errors_say_what_to_do(tmp_path):
    meta = {"id": "m"}
    assert stain.resolve_spec(None, None, None, meta) is None
    assert stain.resolve_spec("none", None, None, meta) is None
    with pytest.raises(stain.StainError, match="unknown stain method 'hed'"):
        stain.resolve_spec("hed", None, None, meta)
    with pytest.raises(stain.StainError, match="records no macenko stain reference.*--stain-target"):
        stain.resolve_spec("macenko", None, None, meta)
    with pytest.raises(stain.StainError, match="no such file"):
        stain.resolve_spec("macenko", tmp_path / "nope.png", None, meta)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(stain.StainError, match="cannot read it as an image"):
        stain.resolve_spec("macenko", bad, None, meta)
    glass = write_png(tmp_path / "glass.png", np.full((200, 200, 3), 240, np.uint8))
    with pytest.raises(stain.StainError, match="tissue pixels"):
        stain.resolve_spec("reinhard", glass, None, meta)


def test_sidecar_says_what_the_model_was_trained_with():
    px = stain.tissue_pixels(_image(OTHER_ID))
    ref = stain.fit_reference(px, "reinhard", "training images").to_dict()
    meta = {"id": "m", "stain": {"method": "reinhard", "clahe": True, "reference": ref},
            "stain_reference": {"macenko": stain.fit_reference(px, "macenko", "training images").to_dict()}}
    spec = stain.resolve_spec(None, None, None, meta)  # nothing asked: as trained
    assert spec.method == "reinhard" and spec.clahe and spec.target.lab_mean == tuple(ref["lab_mean"])
    assert stain.resolve_spec("none", None, False, meta) is None  # told otherwise
    other = stain.resolve_spec("macenko", None, False, meta)  # another method: its reference
    assert other.method == "macenko" and other.target.stain_matrix is not None
    assert "model m" in other.target.origin


# ----------------------------------------------------------------------------- in the engine


def _target(tmp_path):
    return str(write_png(tmp_path / "target.png", _image(OTHER_ID)))


def _map(out_dir) -> np.ndarray:
    return zarr.open_group(str(out_dir / "probabilities.zarr"), mode="r")["0"][:]


def test_run_fits_once_records_it_and_default_is_unchanged(tmp_path, monuseg_image):
    img = write_png(tmp_path / "img.png", monuseg_image[:400, :520])
    pred = Predictor(test_model(conv_net()), "cpu")
    base = run_slide(img, tmp_path / "base", pred, RunConfig.of(mpp=0.5, tissue=False, cellularity=False))
    none = run_slide(img, tmp_path / "none", pred, RunConfig.of(mpp=0.5, tissue=False, cellularity=False, stain="none"))
    np.testing.assert_array_equal(_map(none.out_dir), _map(base.out_dir))
    attrs = zarr.open_group(str(base.out_dir / "probabilities.zarr"), mode="r").attrs["wsiseg"]
    assert "stain" not in base.summary and "stain" not in attrs and "stain" not in attrs["params"]
    target = _target(tmp_path)
    for m in METHODS:
        cfg = RunConfig.of(mpp=0.5, tissue=False, cellularity=False, stain=m, stain_target=target)
        res = run_slide(img, tmp_path / m, pred, cfg)
        rec = res.summary["stain"]
        assert rec["status"] == "fitted" and rec["method"] == m and rec["target_origin"] == "image target.png"
        g = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")
        assert g.attrs["wsiseg"]["stain"] == rec  # the same record in the Zarr attributes
        if m != "reinhard":
            assert np.array(rec["source"]["stain_matrix"]).shape == (3, 3) and len(rec["source"]["max_concentrations"]) == 2
        assert stain.StainTransform.from_dict(rec).method == m
        assert np.abs(_map(res.out_dir).astype(int) - _map(base.out_dir)).mean() > 0.5  # it changed the map


def test_resumed_run_reuses_the_recorded_transform(tmp_path, monuseg_image, monkeypatch):
    img = write_png(tmp_path / "img.png", monuseg_image[:900, :500])
    cfg = RunConfig.of(mpp=0.5, chunk=128, tissue=False, cellularity=False, stain="macenko", stain_target=_target(tmp_path))
    pred = Predictor(test_model(conv_net()), "cpu")
    ref = run_slide(img, tmp_path / "ref", pred, cfg)
    seen = [0]

    def progress(n):
        seen[0] += n
        if seen[0] >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_slide(img, tmp_path / "out", pred, cfg, progress=progress)

    def no_refit(*a, **k):
        raise AssertionError("a resumed run must not refit the stain transform")

    monkeypatch.setattr(stain, "fit_transform", no_refit)
    res = run_slide(img, tmp_path / "out", pred, cfg)
    assert res.status == "resumed" and res.summary["stain"] == ref.summary["stain"]
    assert np.abs(_map(res.out_dir).astype(int) - _map(ref.out_dir)).max() <= 1
    # another method is another run: not mixed into this output
    from wsiseg.slide import SlideError

    with pytest.raises(SlideError, match="different run"):
        run_slide(img, tmp_path / "out", pred, cfg.replace(stain="reinhard"))


def test_no_tissue_falls_back_with_a_warning(tmp_path):
    glass = write_png(tmp_path / "glass.png", np.full((300, 300, 3), 242, np.uint8))
    pred = Predictor(test_model(conv_net()), "cpu")
    res = run_slide(glass, tmp_path / "out", pred, RunConfig.of(mpp=0.5, cellularity=False, stain="vahadane",
                                                             stain_target=_target(tmp_path)))
    assert res.summary["complete"] and res.summary["stain"]["status"] == "skipped"
    assert "not normalised" in res.summary["stain"]["warning"] and "not normalised" in res.message


def test_cli_refuses_bad_stain_options_before_any_slide(tmp_path, monuseg_image, tiny_unet_path, capsys):
    from wsiseg.cli import main

    img = write_png(tmp_path / "img.png", monuseg_image[:200, :200])
    args = ["run", str(img), "--mpp", "0.5", "--model", str(tiny_unet_path), "-o", str(tmp_path / "o"), "-q"]
    assert main(args + ["--stain", "macenko"]) == 2
    assert "records no macenko stain reference" in capsys.readouterr().err
    assert main(args + ["--stain", "macenko", "--stain-target", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--stain", "hed"])
    assert "invalid choice: 'hed'" in capsys.readouterr().err
    assert main(args + ["--stain", "reinhard", "--stain-target", _target(tmp_path), "--no-cellularity"]) == 0
    s = json.loads((tmp_path / "o" / "img" / "summary.json").read_text())
    assert s["stain"]["method"] == "reinhard" and s["config"]["stain"] == "reinhard"


@pytest.mark.slow
def test_openvino_gets_the_transform_in_torch_first(monuseg_image, tmp_path):
    pytest.importorskip("openvino")
    model = test_model(conv_net())
    spec = stain.StainSpec("macenko", True, stain.fit_reference(stain.tissue_pixels(_image(OTHER_ID)), "macenko"))
    tiles = np.stack([monuseg_image[y:y + 128, x:x + 128] for y, x in [(0, 0), (300, 500)]])
    t = stain.fit_transform(spec, monuseg_image)
    ref = Predictor(model, "cpu", threads=1).with_stain(t)(tiles)
    ov = Predictor(model, "cpu", threads=1, backend="openvino").with_stain(t)(tiles)
    np.testing.assert_allclose(ov, ref, atol=2e-5, rtol=0)
    assert np.abs(ref - Predictor(model, "cpu", threads=1)(tiles)).mean() > 1e-3  # the transform was applied


@pytest.mark.slow
def test_a_model_trained_with_a_normaliser_is_run_with_it(tmp_path, monuseg_image):
    """``stain: macenko`` in the training config (the target one training image, as seed 002):
    the images are normalised, the sidecar records it, and the engine applies it unless told
    otherwise."""
    import dataclasses

    from wsiseg.models import load_model
    from wsiseg.train.loop import TrainConfig, train

    cfg = TrainConfig.from_yaml("configs/unet_bn_monuseg_20x.yaml")
    cfg = dataclasses.replace(cfg, data=str(need(MONUSEG)), arch_kwargs={"base": 4, "depth": 2}, steps=2,
                              val_every=2, batch_size=2, crop=64, val_limit=1, out=str(tmp_path / "run"), id="t",
                              stain="macenko", stain_target="TCGA-A7-A13F-01Z-00-DX1")
    model = load_model(train(cfg, log=lambda *_: None))
    meta = model.meta
    assert meta["stain"]["method"] == "macenko" and not meta["stain"]["clahe"]
    assert meta["stain"]["target_origin"] == "training image TCGA-A7-A13F-01Z-00-DX1"
    assert set(meta["stain_reference"]) >= set(METHODS)
    img = write_png(tmp_path / "img.png", monuseg_image[:300, :300])
    pred = Predictor(model, "cpu")
    res = run_slide(img, tmp_path / "out", pred, RunConfig.of(mpp=0.5, tissue=False, cellularity=False))
    assert res.summary["stain"]["method"] == "macenko"
    assert res.summary["stain"]["target"]["origin"].endswith("training image TCGA-A7-A13F-01Z-00-DX1")
    off = run_slide(img, tmp_path / "off", pred, RunConfig.of(mpp=0.5, tissue=False, cellularity=False, stain="none"))
    assert "stain" not in off.summary


def test_cellularity_predict_normalises_each_patch(tmp_path, monuseg_image):
    """``wsiseg cellularity predict --stain``: the class model's input normalised (to its training
    reference, recorded in the shipped sidecar), so the scores move; unknown targets are refused."""
    import csv as csvlib

    from wsiseg.cli import main

    d = tmp_path / "patches"
    d.mkdir()
    write_png(d / "p_1.png", monuseg_image[200:456, 300:556])
    scores = {}
    for m in ("none", "macenko"):
        out = tmp_path / f"{m}.csv"
        assert main(["cellularity", "predict", str(d), "--mpp", "0.5", "-q", "-o", str(out), "--stain", m]) == 0
        (row,) = list(csvlib.DictReader(out.open()))
        scores[m] = float(row["lgbm"])
    assert scores["none"] != scores["macenko"]
    with pytest.raises(SystemExit, match="no such file"):
        main(["cellularity", "predict", str(d), "--mpp", "0.5", "-o", str(tmp_path / "x.csv"), "--stain", "macenko",
              "--stain-target", str(tmp_path / "nope.png")])


@pytest.mark.slow
def test_split_over_workers_applies_the_coordinators_transform(tmp_path, monuseg_image):
    """``--split`` on Dask workers: the coordinator fits and records the slide's transform, the
    workers read it from the store, and the map equals a single-process run's."""
    pytest.importorskip("distributed")
    from wsiseg.cli import main

    img = write_png(tmp_path / "big.png", np.ascontiguousarray(np.tile(monuseg_image, (2, 1, 1))[:1800, :400]))
    model = "unet-bn-monuseg-20x"  # (a network whose output depends on the colours)
    args = ["run", "-q", str(img), "--mpp", "0.5", "--model", model, "--no-cellularity", "--stain", "macenko"]
    assert main([*args, "-o", str(tmp_path / "single")]) == 0
    assert main([*args, "-o", str(tmp_path / "split"), "--cluster", "local:2", "--split", "3"]) == 0
    a, b = _map(tmp_path / "single" / "big"), _map(tmp_path / "split" / "big")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    s1, s2 = (json.loads((tmp_path / d / "big" / "summary.json").read_text())["stain"] for d in ("single", "split"))
    assert s1["status"] == "fitted" and s1["od_matrix"] == s2["od_matrix"]
    plain = tmp_path / "plain"
    assert main(["run", "-q", str(img), "--mpp", "0.5", "--model", model, "--no-cellularity", "-o", str(plain)]) == 0
    assert np.abs(_map(plain / "big").astype(int) - b.astype(int)).mean() > 0.5  # the workers did normalise
