"""Training targets and losses of the model zoo (seeds 001, 002, 003) and USE-Net's watershed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import BREAST_ID, MONUSEG, need
from wsiseg.postprocess import PostprocessConfig, instances_from_probability, marker_watershed
from wsiseg.train.losses import LOSSES, bce_dice_loss, lambda_bce_dice, soft_dice_squared, weighted_ce_dice
from wsiseg.train.targets import border_weight_map, centroids, point_labels, shape_markers


@pytest.fixture(scope="module")
def monuseg_instances() -> np.ndarray:
    """The real instance map (uint16 ids) of the breast image, 1000 x 1000 at 0.25 um/px."""
    return np.asarray(Image.open(need(MONUSEG / "instances" / f"{BREAST_ID}.png"))).astype(np.int32)


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _two_touching_and_one_far(shape=(80, 120)):
    inst = np.zeros(shape, np.int32)
    inst[_disc(shape, 30, 20, 9)] = 1
    inst[_disc(shape, 30, 40, 9)] = 2  # one background pixel (col 30) between nuclei 1 and 2
    inst[_disc(shape, 60, 100, 8)] = 3
    return inst


def _brute_force_weights(inst, w0=10.0, sigma=5.0):
    """The formula with exact distances to every nucleus (no windowing), background only."""
    from scipy import ndimage as ndi

    ids = [i for i in np.unique(inst) if i > 0]
    d = np.sort(np.stack([ndi.distance_transform_edt(inst != i) for i in ids]), axis=0)
    term = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    term[inst > 0] = 0
    return term


def test_border_weights_peak_between_touching_nuclei():
    inst = _two_touching_and_one_far()
    w = border_weight_map(inst, w0=10, sigma=5, class_weights=None)
    gap = w[30, 29:32]
    assert inst[30, 30] == 0 and inst[30, 29] == 1 and inst[30, 31] == 2
    assert w[30, 30] > 1 + 8  # d1 = d2 = 1 px: 1 + 10 exp(-4 / 50) = 10.2
    assert w[30, 30] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-4)
    assert w[5, 110] == pytest.approx(1.0, abs=1e-3)  # background far from any pair of nuclei
    assert np.all(w[inst > 0] == 1.0)  # inside nuclei: w_c only
    assert gap.max() == w.max()
    # beside the lone nucleus 3 the border term stays small (its second-nearest nucleus is far)
    assert w[60, 109] < 1.5


def test_border_weights_match_the_formula_on_real_nuclei(monuseg_instances):
    inst = monuseg_instances[120:240, 240:380]
    assert len(np.unique(inst)) > 12
    w = border_weight_map(inst, w0=10, sigma=5, class_weights=None)
    exact = 1 + _brute_force_weights(inst)
    assert exact.max() > 6  # some real nuclei nearly touch here
    assert np.abs(w - exact).max() < 10 * 1e-3 + 1e-5  # the windowed computation is exact to eps * w0
    # balanced class weights: both classes carry half the total w_c
    wb = border_weight_map(inst, class_weights="balanced", w0=0)
    fg = inst > 0
    assert wb[fg].sum() == pytest.approx(wb[~fg].sum(), rel=1e-4)
    assert wb[fg][0] > wb[~fg][0]  # nuclei are the rarer class here


def test_shape_markers_are_inside_and_smaller(monuseg_instances):
    inst = monuseg_instances[:300, :300]
    lab = shape_markers(inst, ratio=0.5, labels=True)
    binary = shape_markers(inst, ratio=0.5)
    assert binary.dtype == np.uint8 and set(np.unique(binary)) <= {0, 1}
    assert np.array_equal(binary > 0, lab > 0)
    on = lab > 0
    assert np.all(inst[on] == lab[on])  # every marker pixel lies inside its own nucleus
    ids = np.unique(inst[inst > 0])
    assert set(np.unique(lab[on])) == set(ids.tolist())  # every nucleus keeps a marker
    area = np.bincount(inst.ravel(), minlength=inst.max() + 1)[ids]
    marea = np.bincount(lab.ravel(), minlength=inst.max() + 1)[ids]
    big = area >= 30
    assert np.all(marea[big] < area[big]) and np.all(marea <= area)
    assert marea[big].sum() < 0.6 * area[big].sum()


def test_shape_marker_erosion_grows_with_nucleus_size():
    shape = (80, 120)
    inst = np.zeros(shape, np.int32)
    inst[_disc(shape, 40, 25, 4)] = 1
    inst[_disc(shape, 40, 80, 16)] = 2
    lab = shape_markers(inst, ratio=0.5, labels=True)
    r_eq = [np.sqrt((lab == i).sum() / np.pi) for i in (1, 2)]
    eroded = [r - m for r, m in zip((4, 16), r_eq)]
    assert eroded[1] > 2 * eroded[0]  # the large nucleus loses more
    assert r_eq[1] == pytest.approx(8, abs=1.5)  # about half its radius remains
    with pytest.raises(ValueError):
        shape_markers(inst, ratio=1.5)


def test_point_labels_are_15px_discs_in_their_class_channel():
    pts = np.array([[20.0, 20.0], [20.0, 60.0], [50.0, 40.0]])
    t = point_labels(pts, np.array([0, 1, 2]), (70, 80), n_channels=4, diameter=15)
    assert t.shape == (70, 80, 4) and t.dtype == np.uint8
    assert np.all(t.sum(-1) == 1)  # one-hot, background channel where no disc lies
    assert t[20, :, 0].sum() == 15 and t[:, 20, 0].sum() == 15  # 15 px across
    assert 140 < t[..., 0].sum() < 180  # ~ pi * 7.5^2
    assert t[20, 60, 1] == 1 and t[50, 40, 2] == 1 and t[0, 0, 3] == 1
    # overlapping discs: each pixel takes the class of the nearest point
    t2 = point_labels(np.array([[20.0, 20.0], [20.0, 28.0]]), np.array([0, 2]), (40, 50))
    assert t2[20, 23, 0] == 1 and t2[20, 25, 2] == 1
    with pytest.raises(ValueError):
        point_labels(pts, np.array([0, 1, 7]), (70, 80))


def test_centroids_and_majority_class(monuseg_instances):
    inst = monuseg_instances[:200, :200]
    cls = np.where(inst % 2 == 1, 2, 1) * (inst > 0)
    pts, c = centroids(inst, cls)
    ids = np.unique(inst[inst > 0])
    assert pts.shape == (len(ids), 2) and np.array_equal(c, np.where(ids % 2 == 1, 2, 1))
    # weak labels from the real nuclei: discs at the centroids
    t = point_labels(pts, c - 1, inst.shape, n_channels=4)
    rc = np.round(pts).astype(int)
    assert np.all(t[rc[:, 0], rc[:, 1], 3] == 0)


def test_marker_watershed_separates_two_touching_discs():
    shape = (64, 80)
    a, b = _disc(shape, 32, 28, 12), _disc(shape, 32, 48, 12)  # overlapping: one blob
    mask_prob = np.where(a | b, 0.9, 0.05).astype(np.float32)
    inst = np.zeros(shape, np.int32)
    inst[a] = 1
    inst[b & ~a] = 2
    marker_prob = shape_markers(inst, ratio=0.5).astype(np.float32)
    cfg = PostprocessConfig(min_area_um2=1.0, min_marker_um2=0.5)
    lone = instances_from_probability(mask_prob, 0.5, PostprocessConfig(split="none"))
    assert lone.max() == 1  # connected components cannot split them
    for relief in ("distance", "probability", "marker"):
        lab = marker_watershed(mask_prob, marker_prob, mpp=0.5, cfg=cfg, relief=relief)
        assert lab.max() == 2, relief
        assert lab[32, 20] != lab[32, 56] and lab[32, 20] > 0 and lab[32, 56] > 0
        for disc in (a & ~b, b & ~a):
            vals = np.bincount(lab[disc])
            assert vals.argmax() > 0 and vals.max() / disc.sum() > 0.95
    # the uint8 form of the maps gives the same nuclei
    lab8 = marker_watershed((mask_prob * 255).astype(np.uint8), (marker_prob * 255).astype(np.uint8), 0.5, cfg)
    assert lab8.max() == 2


def test_weighted_ce_dice_weights_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, generator=g, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16, generator=g) > 0.6).float()
    ones = torch.ones_like(target)
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1) / ((p * p).sum() + (target * target).sum() + 1)
    expect = F.binary_cross_entropy_with_logits(logits, target) + 1 - dice
    assert weighted_ce_dice(logits, target, ones).item() == pytest.approx(expect.item(), rel=1e-5)
    w = ones.clone()
    w[..., :4, :] = 10
    heavy = weighted_ce_dice(logits, target, w)
    assert heavy.item() > expect.item()
    # (mask, weight) stacked as a 2-channel target is the same
    assert weighted_ce_dice(logits, torch.cat([target, w], 1)).item() == pytest.approx(heavy.item())
    heavy.backward()
    gw = logits.grad.abs()
    assert gw[..., :4, :].mean() > 3 * gw[..., 4:, :].mean()  # the weighted rows pull harder


def test_lambda_bce_dice_mixes_bce_and_dice():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 16, 16, generator=g, requires_grad=True)
    target = (torch.rand(2, 2, 16, 16, generator=g) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert lambda_bce_dice(logits, target, lam=1.0).item() == pytest.approx(bce.item(), rel=1e-5)
    d = soft_dice_squared(torch.sigmoid(logits), target)
    assert d.shape == (2,)
    assert lambda_bce_dice(logits, target, lam=0.0).item() == pytest.approx((1 - d).mean().item(), rel=1e-5)
    loss = lambda_bce_dice(logits, target)
    loss.backward()
    assert logits.grad.abs().sum(dim=(0, 2, 3)).min() > 0  # both channels (mask, marker) are trained
    # registered under new names, the old ones unchanged
    assert LOSSES["weighted_ce_dice"] is weighted_ce_dice and LOSSES["lambda_bce_dice"] is lambda_bce_dice
    assert LOSSES["bce_dice"] is bce_dice_loss and "rakhlin" in LOSSES and "maskrcnn" in LOSSES


def test_lambda_bce_dice_with_border_weights():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 16, 16, generator=g, requires_grad=True)
    target = (torch.rand(2, 2, 16, 16, generator=g) > 0.5).float()
    plain = lambda_bce_dice(logits, target)
    assert lambda_bce_dice(logits, target, weight=torch.ones_like(target)).item() == pytest.approx(plain.item(), rel=1e-6)
    w = torch.ones_like(target)
    w[:, 1, :4] = 10  # heavy rows in the marker channel only
    heavy = lambda_bce_dice(logits, target, weight=w)
    assert heavy.item() > plain.item()
    heavy.backward()
    gm = logits.grad[:, 1].abs()
    assert gm[:, :4].mean() > 3 * gm[:, 4:].mean()
    assert logits.grad[:, 0, :4].abs().mean() < 2 * logits.grad[:, 0, 4:].abs().mean()  # mask unweighted
    with pytest.raises(ValueError, match="shape"):
        lambda_bce_dice(logits, target, weight=w[:, :1])


def test_mask_marker_weights_target_on_real_nuclei(monuseg_instances):
    from types import SimpleNamespace

    from wsiseg.train.loop import TARGETS, TrainConfig, _target_of

    inst = monuseg_instances[:400, :400]
    s = SimpleNamespace(name="breast", mask=(inst > 0).astype(np.uint8), instances=inst)
    cfg = TrainConfig(id="t", target="mask_marker_weights",
                      target_kwargs={"ratio": 0.5, "min_erosion": 1.0, "w0": 5.0, "sigma": 2.5})
    t = _target_of(s, cfg)
    assert t.shape == (400, 400, 4) and t.dtype == np.float32
    assert TARGETS["mask_marker_weights"] == ("nucleus", "marker")
    np.testing.assert_array_equal(t[..., 0], inst > 0)
    np.testing.assert_array_equal(t[..., 1], shape_markers(inst, 0.5, 1.0))
    # the mask's weights: U-Net's map of the nuclei without class balancing (1 + the border term)
    np.testing.assert_allclose(t[..., 2], border_weight_map(inst, 5.0, 2.5, class_weights=None))
    assert t[..., 2][inst > 0].max() == 1.0 and t[..., 2].max() > 3.0
    # the marker's weights come from the markers: heavy on nucleus pixels between touching markers
    markers = t[..., 1] > 0
    between = (inst > 0) & ~markers & (t[..., 3] > 3.0)
    assert between.sum() > 10 and t[..., 3][markers].max() == 1.0
    assert cfg.target_kwargs["w0"] == 5.0  # the config is not consumed
