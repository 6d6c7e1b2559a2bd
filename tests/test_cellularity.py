"""Cellularity core: Rakhlin features (fast == reference, bit for bit), metrics, LightGBM, proxy labels.

Real data: CoNSeP class maps from ../shared/data/consep/train (skipped when absent). The
cellularity target here is a PROXY (tumour nuclear area / all nuclear area), not a pathologist's
score.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from wsiseg.cellularity import features as F
from wsiseg.cellularity.metrics import (bootstrap_ci, cellularity_bins, cohen_kappa, evaluate, icc, icc_matrix, mse,
                                 mse_ci, prediction_probability)
from wsiseg.cellularity.proxy import (CHANNELS, class_maps, consep_image_id, load_consep, proxy_cellularity,
                               split_by_image)
from tests.conftest import SHARED, need

CONSEP = SHARED / "consep" / "train"

# tiles with all three classes, only some, or no tumour at all
EQ_TILES = ["train_1_000", "train_8_005", "train_14_009", "train_20_010", "train_22_003", "train_5_003"]


# ----------------------------------------------------------------------------------- features
#
# Tolerances: none. The fast path (cellularity.features.features) is held to the naive reference
# (one skimage.feature.blob_log per threshold) bit for bit, on every feature: area counts and
# activation sums are exact in float64; the LoG cube is computed by DCT, which differs from
# skimage's float32 cube by float32 rounding only (asserted below: max |diff| < DELTA / 10), and
# every peak / threshold / ordering decision closer than DELTA is re-decided on skimage's own
# float32 values (reproduced bit for bit, asserted below). So blob counts and blob activations
# must be equal, not merely close; a failure here is a real discrepancy.


def test_feature_names_and_shapes():
    names = F.FEATURE_NAMES
    assert len(names) == 81 == F.N_FEATURES
    assert len(set(names)) == 81
    for n in ("malignant_area_t0.16", "malignant_act_t0.16", "malignant_blobs_t0.08", "malignant_blobact_t0.08",
              "malignant_total", "normal_area_t0.02", "lymphocyte_blobs_t0.5", "lymphocyte_act_t0.32"):
        assert n in names
    assert not any("_blobs_t0.32" in n for n in names)  # 6 blob thresholds, no 0.32
    assert names[:27] == ([f"normal_area_t{t:g}" for t in F.AREA_THRESHOLDS]
                          + [f"normal_act_t{t:g}" for t in F.AREA_THRESHOLDS]
                          + [f"normal_blobs_t{t:g}" for t in F.BLOB_THRESHOLDS]
                          + [f"normal_blobact_t{t:g}" for t in F.BLOB_THRESHOLDS] + ["normal_total"])
    assert [n.split("_")[0] for n in names[::27]] == ["normal", "lymphocyte", "malignant"]
    zeros = np.zeros((4, 48, 40), np.float32)
    v = F.features(zeros, CHANNELS)
    assert v.shape == (81,) and v.dtype == np.float64 and not v.any()
    assert np.array_equal(F.features_reference(zeros, CHANNELS), v)
    assert F.features_batch(np.zeros((3, 4, 32, 32), np.float32), CHANNELS).shape == (3, 81)
    assert F.features_batch([], CHANNELS).shape == (0, 81)
    with pytest.raises(ValueError, match="missing"):
        F.features(zeros[:2], ["normal", "background"])


def test_empty_and_faint_maps_have_no_blobs():
    """No blob where nothing can respond: zeros, a constant map, and a faint noisy map (p < 0.02)."""
    rng = np.random.default_rng(0)
    blob_idx = [i for i, n in enumerate(F.FEATURE_NAMES) if "_blob" in n]
    faint = rng.uniform(0, 0.015, (4, 96, 80)).astype(np.float32)
    for probs in (np.zeros((4, 64, 64), np.float32), np.full((4, 64, 64), 0.7, np.float32), faint):
        v = F.features(probs, CHANNELS)
        assert not v[blob_idx].any()
        assert np.array_equal(v, F.features_reference(probs, CHANNELS))
    assert F._crop_box(faint[0], min(F.BLOB_THRESHOLDS), F._setup(F.LOG_PARAMS)) is None  # skipped outright
    assert all(len(b) == 0 for b in F.blobs_at_thresholds(np.zeros((30, 30), np.float32)))


def _softmax_like(probs: np.ndarray, seed: int) -> np.ndarray:
    """A network-like output from class maps: smoothed logits plus smooth noise, softmax over channels."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    logits = np.stack([6.0 * ndi.gaussian_filter(c, 1.5) + ndi.gaussian_filter(rng.normal(0, 0.5, c.shape), 1.0)
                       for c in probs.astype(np.float64)])
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


@pytest.fixture(scope="module")
def eq_tiles():
    tiles = load_consep(need(CONSEP), EQ_TILES, target_mpp=0.5, smooth_sigma=1.0)
    # two at full resolution (0.25 um/px, 256 px): larger nuclei, more blobs, more overlap pruning
    tiles += load_consep(CONSEP, EQ_TILES[:2], target_mpp=0.25, smooth_sigma=1.5)
    return tiles


@pytest.fixture(scope="module")
def eq_maps(eq_tiles):
    """(name, probs) pairs: the label maps, the same with low-level noise, and softmax-like versions."""
    rng = np.random.default_rng(7)
    maps = [(t.name, t.probs) for t in eq_tiles]
    for t in eq_tiles[::2]:  # low-level noise: below the lowest threshold (0.01) and above it (0.05)
        for amp in (0.01, 0.05):
            noisy = np.clip(t.probs + rng.uniform(0, amp, t.probs.shape), 0, 1).astype(np.float32)
            maps.append((f"{t.name}+noise{amp}", noisy))
    for k, t in enumerate(eq_tiles[1::2]):
        maps.append((f"{t.name}:softmax", _softmax_like(t.probs, k)))
    return maps


@pytest.mark.slow
def test_fast_features_equal_reference_on_consep(eq_maps):
    """Fast path == one blob_log per threshold, for all 81 features, bit for bit (see the note above),
    on real CoNSeP label maps at 0.5 and 0.25 um/px, with low-level noise, and softmax-like maps."""
    pruned = 0
    for name, probs in eq_maps:
        fast = F.features(probs, CHANNELS)
        ref = F.features_reference(probs, CHANNELS)
        bad = [(F.FEATURE_NAMES[i], fast[i], ref[i]) for i in np.nonzero(fast != ref)[0]]
        assert not bad, f"{name} {probs.shape}: {bad}"
        m = np.ascontiguousarray(probs[CHANNELS.index("malignant")])
        raw, _ = F._sorted_maxima(m, min(F.BLOB_THRESHOLDS))
        pruned += len(raw) - int(fast[F.FEATURE_NAMES.index("malignant_blobs_t0.02")])
    assert pruned > 0  # the overlap pruning was exercised, not only the maxima
    assert sum(F.features(p, CHANNELS)[F.FEATURE_NAMES.index("malignant_blobs_t0.5")] for _, p in eq_maps) > 0
    batch = F.features_batch(np.stack([p for _, p in eq_maps[:6]]), CHANNELS, n_threads=2)
    assert np.array_equal(batch, np.stack([F.features(p, CHANNELS) for _, p in eq_maps[:6]]))


@pytest.mark.slow
def test_blobs_equal_blob_log_rows(eq_tiles):
    """Beyond counts: the same blobs (y, x, sigma), in the same order, as blob_log returns."""
    from skimage.feature import blob_log

    p = F.LOG_PARAMS
    for m in (np.ascontiguousarray(eq_tiles[-2].probs[CHANNELS.index("malignant")]),  # full resolution
              np.ascontiguousarray(_softmax_like(eq_tiles[0].probs, 3)[CHANNELS.index("malignant")])):
        sets = F.blobs_at_thresholds(m)
        for t, got in zip(F.BLOB_THRESHOLDS, sets):
            want = blob_log(m, min_sigma=p.min_sigma, max_sigma=p.max_sigma, num_sigma=p.num_sigma, threshold=t,
                            overlap=p.overlap)
            assert np.array_equal(got, want), t
        assert len(sets[0]) > 20


def test_scale_space_and_exact_values(eq_tiles):
    """The DCT cube is skimage's cube to float32 rounding; the exact-value path reproduces it bit for bit,
    also on maps smaller than the kernel (the 'reflect' extension then repeats)."""
    rng = np.random.default_rng(1)
    maps = [eq_tiles[0].probs[2], eq_tiles[3].probs[0], rng.random((37, 53), dtype=np.float32),
            eq_tiles[1].probs[2][:7, :13]]
    for m in maps:
        m = np.ascontiguousarray(m)
        ref = F.log_scale_space_reference(m)
        assert np.abs(F.log_scale_space(m) - ref).max() < F.DELTA / 10
        n = 400
        s, y, x = rng.integers(0, 5, n), rng.integers(0, m.shape[0], n), rng.integers(0, m.shape[1], n)
        assert np.array_equal(F._exact_values(m, s, y, x, F.LOG_PARAMS), ref[s, y, x])
        blk = F._exact_block(m, s, y, x, 1, F.LOG_PARAMS)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                ok = (yy >= 0) & (yy < m.shape[0]) & (xx >= 0) & (xx < m.shape[1])
                assert np.array_equal(blk[ok, dy + 1, dx + 1], ref[s[ok], yy[ok], xx[ok]])


def test_small_and_sparse_maps_equal_reference(eq_tiles):
    """Maps smaller than the kernel, a map whose nuclei sit in one corner (the scale space is then
    computed on a crop only), and one with negative values (no skipping then): fast == reference."""
    small = np.ascontiguousarray(eq_tiles[0].probs[:, :20, :24])
    tiny = np.ascontiguousarray(eq_tiles[2].probs[:, 40:47, 60:73])
    corner = np.zeros((4, 256, 256), np.float32)
    corner[3] = 1
    corner[:, :64, 192:] = eq_tiles[0].probs[:, 32:96, 32:96]  # malignant, lymphocytes, normal nuclei
    st = F._setup(F.LOG_PARAMS)
    box = F._crop_box(np.ascontiguousarray(corner[2]), min(F.BLOB_THRESHOLDS), st)
    assert box is not None and (box[1] - box[0]) * (box[3] - box[2]) < 256 * 256 / 2
    shifted = np.ascontiguousarray(eq_tiles[0].probs[:, :64, :64] - np.float32(0.05))  # not p >= 0: no skipping
    for probs in (small, tiny, corner, shifted):
        assert np.array_equal(F.features(probs, CHANNELS), F.features_reference(probs, CHANNELS))
    assert F.features(corner, CHANNELS)[F.FEATURE_NAMES.index("malignant_blobs_t0.02")] > 0


def test_area_activation_exact():
    rng = np.random.default_rng(2)
    for m in (rng.random((128, 96), dtype=np.float32), np.zeros((8, 8), np.float32),
              np.full((16, 16), np.float32(0.04)), np.float32(0.5) * np.ones((5, 5), np.float32)):
        fast, ref = F._area_act_fast(m), F._area_act_reference(m)
        assert np.array_equal(fast[0], ref[0]) and np.array_equal(fast[1], ref[1])


def test_prune_matches_skimage_including_order_dependent_chains(monkeypatch):
    """skimage's greedy overlap pruning is order dependent when a blob both removes one and is removed by
    another; the fast pruning must then follow skimage's pair order exactly. Random crowded blob lists
    (many such chains) against ``skimage.feature.blob._prune_blobs``, for several prefixes at once."""
    from scipy.spatial import cKDTree
    from skimage.feature.blob import _prune_blobs

    queries = []

    class CountingTree(cKDTree):
        def query_pairs(self, *a, **k):
            queries.append(k.get("output_type", "set"))
            return super().query_pairs(*a, **k)

    monkeypatch.setattr(F, "cKDTree", CountingTree)
    rng = np.random.default_rng(3)
    sig = F._sigma_list(F.LOG_PARAMS)[:, 0]
    for trial in range(25):
        n = int(rng.integers(2, 60))
        blobs = np.empty((n, 3), np.float32)
        blobs[:, :2] = rng.integers(0, 60, (n, 2))
        blobs[:, 2] = sig[rng.integers(0, len(sig), n)]
        prefixes = sorted({n, int(rng.integers(1, n + 1)), int(rng.integers(1, n + 1))})
        for k, alive in zip(prefixes, F._prune_prefixes(blobs, prefixes, 0.5)):
            assert np.array_equal(blobs[:k][alive], _prune_blobs(blobs[:k].copy(), 0.5)), (trial, k)
    assert "set" in queries  # the order-dependent path ran


def test_features_use_channels_by_name(eq_tiles):
    t = eq_tiles[0]
    perm = [3, 2, 0, 1]
    a = F.features(t.probs, t.channels)
    b = F.features(t.probs[perm], [t.channels[i].upper() for i in perm])
    assert np.array_equal(a, b)
    i = F.FEATURE_NAMES.index("malignant_total")
    assert a[i] == pytest.approx(float(t.probs[2].sum(dtype=np.float64)))
    j = F.FEATURE_NAMES.index("malignant_area_t0.5")
    assert a[j] == np.count_nonzero(t.probs[2] > np.float32(0.5))


# ------------------------------------------------------------------------------------ metrics


def test_perfect_agreement():
    y = np.linspace(0, 1, 41)
    assert mse(y, y) == 0
    assert mse_ci(y, y) == (0.0, 0.0, 0.0)
    assert cohen_kappa(y, y) == 1.0
    assert icc(y, y).value == pytest.approx(1.0)
    assert icc(y, y, "3,1").value == pytest.approx(1.0)
    assert prediction_probability(y, y) == 1.0
    r = evaluate(y, y, n_boot=50)
    assert r["kappa"] == 1.0 and r["pk"] == 1.0 and r["icc"] == pytest.approx(1.0)


def test_one_patch_has_an_error_but_no_agreement():
    """One scored patch: its squared error, and no kappa / ICC / PK (they compare patches)."""
    r = evaluate([0.97], [0.67], n_boot=50)
    assert r["n"] == 1 and r["mse"] == pytest.approx(0.09)
    assert r["kappa"] is None and r["icc"] is None and r["pk"] is None and r["mse_ci"] == [None, None]


def test_kappa_bins_and_small_example():
    assert cellularity_bins([0.0, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 1.0]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # bins true [0, 0, 1, 1], pred [0, 1, 1, 1]: po = 3/4, pe = (2*1 + 2*3)/16 = 1/2 -> kappa 1/2
    assert cohen_kappa([0.1, 0.2, 0.4, 0.45], [0.15, 0.3, 0.35, 0.5]) == pytest.approx(0.5)
    # complete disagreement with balanced marginals: po = 0, pe = 1/2 -> -1
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0], binned=True) == pytest.approx(-1.0)
    assert np.isnan(cohen_kappa([0.1, 0.2], [0.1, 0.2]))  # one class for both: undefined


def test_kappa_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 1, 200)
    p = np.clip(t + rng.normal(0, 0.2, 200), 0, 1)
    for w in (None, "linear", "quadratic"):
        assert cohen_kappa(t, p, w) == pytest.approx(
            sk.cohen_kappa_score(cellularity_bins(t), cellularity_bins(p), weights=w), abs=1e-12)


def test_icc_shrout_fleiss_example():
    """Shrout & Fleiss 1979, Table 2 (6 targets x 4 judges); values as R psych::ICC reports them."""
    y = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    r2 = icc_matrix(y, "2,1")
    r3 = icc_matrix(y, "3,1")
    assert r2.value == pytest.approx(0.29, abs=0.005) and r3.value == pytest.approx(0.71, abs=0.006)
    assert r2.F == pytest.approx(11.03, abs=0.01) and (r2.df1, r2.df2) == (5, 15)
    assert r2.lower == pytest.approx(0.019, abs=0.001) and r2.upper == pytest.approx(0.76, abs=0.005)
    assert r3.lower == pytest.approx(0.342, abs=0.001) and r3.upper == pytest.approx(0.94, abs=0.006)


def test_icc_penalises_bias_only_in_absolute_agreement():
    y = np.linspace(0, 0.8, 30)
    assert icc(y, y + 0.2, "3,1").value == pytest.approx(1.0)
    assert icc(y, y + 0.2, "2,1").value < 0.85


def _pk_brute(t, p):
    c = d = tx = 0
    for i in range(len(t)):
        for j in range(i + 1, len(t)):
            if t[i] == t[j]:
                continue
            s = np.sign(t[i] - t[j]) * np.sign(p[i] - p[j])
            c, d, tx = c + (s > 0), d + (s < 0), tx + (s == 0)
    return (c + tx / 2) / (c + d + tx)


def test_prediction_probability():
    # pairs: (0, .5) tied in prediction, (0, 1) and (.5, 1) concordant -> (2 + 1/2) / 3
    assert prediction_probability([0, 0.5, 1], [0.1, 0.1, 0.9]) == pytest.approx(5 / 6)
    assert prediction_probability([0, 0.5, 1], [1, 0.5, 0]) == 0.0
    assert prediction_probability([0, 0.5, 1], [0.3, 0.3, 0.3]) == 0.5
    assert np.isnan(prediction_probability([0.4, 0.4], [0.1, 0.9]))
    rng = np.random.default_rng(2)
    t = rng.integers(0, 11, 120) / 10  # many ties in both
    p = np.round(np.clip(t + rng.normal(0, 0.2, 120), 0, 1), 1)
    assert prediction_probability(t, p) == pytest.approx(_pk_brute(t, p), abs=1e-12)


def test_mse_bootstrap_ci():
    assert mse([0, 1], [0.5, 0.5]) == 0.25
    assert mse_ci([0, 1], [0.5, 0.5], n_boot=100) == (0.25, 0.25, 0.25)  # every resample: 0.25
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 1, 300)
    p = t + rng.normal(0, 0.1, 300)
    m, lo, hi = mse_ci(t, p, n_boot=1000, seed=0)
    assert lo < m < hi and 0.007 < lo and hi < 0.014
    lo2, hi2 = bootstrap_ci(mse, t, p, n_boot=300, seed=0)
    assert lo2 < m < hi2


# -------------------------------------------------------------------------------------- proxy


def test_proxy_label_and_class_maps():
    c = np.zeros((8, 8), np.uint8)
    assert proxy_cellularity(c) == 0.0
    c[:2, :2] = 3  # 4 px epithelial (tumour)
    c[4:, 4:] = 2  # 16 px inflammatory
    c[0, 7] = 4  # 1 px spindle
    c[7, 0] = 1  # 1 px other
    assert proxy_cellularity(c) == pytest.approx(4 / 22)
    m = class_maps(c, scale=0.5, smooth_sigma=1.0)
    assert m.shape == (4, 4, 4) and m.dtype == np.float32
    assert np.allclose(m.sum(axis=0), 1, atol=1e-6)
    m0 = class_maps(c)
    assert m0[2].sum() == 4 and m0[1].sum() == 16 and m0[0].sum() == 2 and m0[3].sum() == 64 - 22
    assert consep_image_id("train_12_003") == "train_12" == consep_image_id("x/train_12_003.png")
    from wsiseg.classes import source_image  # the one split key of CoNSeP and MoNuSAC tiles

    assert source_image("TCGA-2Z-A9JG-01Z-00-DX1_3") == "TCGA-2Z-A9JG-01Z-00-DX1"
    for bad in ("train", "train_", "_3", "train_12_a"):
        with pytest.raises(ValueError, match="not a tile name"):
            source_image(bad)
    with pytest.raises(ValueError, match="no channel"):
        class_maps(np.full((2, 2), 7, np.uint8))


# ------------------------------------------------------------------------------ LightGBM, e2e


@pytest.fixture(scope="module")
def consep_features():
    """Every 4th CoNSeP tile (4 per source image, 108 tiles) at 0.5 um/px: features + proxy."""
    root = need(CONSEP)
    names = sorted(p.stem for p in (root / "classes").glob("*.png") if int(p.stem.rsplit("_", 1)[1]) % 4 == 0)
    tiles = load_consep(root, names)
    X = F.features_batch([t.probs for t in tiles], CHANNELS)
    return tiles, X, np.array([t.proxy for t in tiles])


@pytest.mark.slow
def test_lightgbm_on_consep_proxy(consep_features, tmp_path):
    """Split by source image: train_1..train_16 fit, train_17..20 early-stopping validation,
    train_21..27 held out. A check, not a promise: on held-out images the model should beat
    predicting the training mean of the proxy (it does by a wide margin on ground-truth maps)."""
    from wsiseg.cellularity.regressors import LightGBMRegressor

    tiles, X, y = consep_features
    assert len(tiles) == 27 * 4 and X.shape == (108, 81)
    num = np.array([int(t.image_id.split("_")[1]) for t in tiles])
    fit_i, val_i, test_i = num <= 16, (num > 16) & (num <= 20), num > 20
    train_t, held_t = split_by_image(tiles, [f"train_{i}" for i in range(21, 28)])
    assert {t.image_id for t in train_t}.isdisjoint({t.image_id for t in held_t}) and len(held_t) == test_i.sum()

    model = LightGBMRegressor(n_jobs=1)
    assert model.learning_rate == 0.01 and model.max_depth == 5 and model.num_leaves == 8
    assert model.n_estimators == 600 and not hasattr(model, "booster_")
    assert model.fit(X[fit_i], y[fit_i], X[val_i], y[val_i], feature_names=F.FEATURE_NAMES) is model
    assert 1 <= model.best_iteration_ <= 600 and model.train_metrics_["n_val"] == val_i.sum()

    pred = model.predict(X[test_i])
    assert pred.shape == (test_i.sum(),) and pred.min() >= 0 and pred.max() <= 1
    mse_model = mse(y[test_i], pred)
    mse_mean = mse(y[test_i], np.full(test_i.sum(), y[fit_i | val_i].mean()))
    assert mse_model < mse_mean, (mse_model, mse_mean)

    path = model.save(tmp_path / "gbt")
    assert path.name == "gbt.txt" and path.read_text().startswith("tree")
    meta = json.loads((tmp_path / "gbt.json").read_text())
    assert meta["feature_names"] == F.FEATURE_NAMES and meta["params"]["learning_rate"] == 0.01
    assert meta["best_iteration"] == model.best_iteration_
    loaded = LightGBMRegressor.load(tmp_path / "gbt")
    assert np.array_equal(loaded.predict(X), model.predict(X))
    assert np.array_equal(loaded.feature_importances_, model.feature_importances_)

    imp = model.feature_importances_
    assert imp.shape == (81,) and imp.sum() > 0
    assert model.importance_table()[0][0].startswith("malignant_")
    png = model.plot_importance(tmp_path / "imp.png", top=15)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = evaluate(y[test_i], pred, n_boot=200)
    assert set(r) >= {"mse", "mse_ci", "kappa", "icc", "icc_ci", "pk"}


def test_regressor_errors(tmp_path):
    from wsiseg.cellularity.regressors import LightGBMRegressor

    with pytest.raises(RuntimeError, match="not fitted"):
        LightGBMRegressor().predict(np.zeros((1, 81)))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        LightGBMRegressor.load(tmp_path / "nothing")


def test_consep_is_read_one_way_by_the_trainers_and_the_proxy_labels(tmp_path):
    """The class trainer's loader (images + classes) and the proxy loader (classes only) read a
    CoNSeP class map through one reader: the same labels, and the same refusals of a bad file."""
    import shutil

    from PIL import Image

    from wsiseg.classes import CONSEP_TO_CHANNEL
    from wsiseg.train.datasets import load_consep as load_class_samples

    src = need(CONSEP)
    names = sorted(p.stem for p in (src / "classes").glob("*.png"))[:2]
    for d, ext in (("images", "jpg"), ("classes", "png")):
        (tmp_path / d).mkdir()
        for n in names:
            shutil.copy(src / d / f"{n}.{ext}", tmp_path / d / f"{n}.{ext}")
    samples = load_class_samples(tmp_path, 0.25)  # source resolution: no resampling
    tiles = load_consep(tmp_path, names, target_mpp=0.25, smooth_sigma=0.0)
    lut = np.array([CONSEP_TO_CHANNEL[k] for k in sorted(CONSEP_TO_CHANNEL)], np.uint8)
    for s, t in zip(samples, tiles):
        labels = np.asarray(Image.open(src / "classes" / f"{s.name}.png"))
        assert s.name == t.name and np.array_equal(s.classes, lut[labels])
        assert np.array_equal(t.probs.argmax(0), s.classes)  # the proxy's one-hot maps: the same classes
        assert t.proxy == proxy_cellularity(labels)
    bad = np.asarray(Image.open(tmp_path / "classes" / f"{names[0]}.png")).copy()
    bad[0, 0] = 9
    Image.fromarray(bad).save(tmp_path / "classes" / f"{names[0]}.png")
    for load in (lambda: load_class_samples(tmp_path, 0.5), lambda: load_consep(tmp_path, names)):
        with pytest.raises(ValueError, match=r"class ids \[9\] are not in the mapping"):
            load()
    Image.fromarray(np.stack([bad] * 3, -1)).save(tmp_path / "classes" / f"{names[0]}.png")
    for load in (lambda: load_class_samples(tmp_path, 0.5), lambda: load_consep(tmp_path, names)):
        with pytest.raises(ValueError, match="single-channel class map"):
            load()
