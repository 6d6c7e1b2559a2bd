"""Metrics on hand-built cases with known answers, AJI/PQ against slow references on real
MoNuSeg instance maps, and post-processing on the real MoNuSeg ground truth."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, find_boundaries

from tests.conftest import BREAST_ID, MONUSEG, need
from wsiseg.metrics import MAP_THRESHOLDS, instance_metrics, match, overlap_table, pixel_metrics
from wsiseg.postprocess import (PostprocessConfig, clean_mask, fiji_like, instances_from_probability, otsu_hed,
                                search_threshold, watershed_hed)
from wsiseg.train.datasets import resample

PROSTATE_ID = "TCGA-CH-5767-01Z-00-DX1"


def _monuseg(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, mask (H, W) bool, instances (H, W) uint16) of one MoNuSeg image."""
    img = np.asarray(Image.open(need(MONUSEG / "images" / f"{name}.png")).convert("RGB"))
    mask = np.asarray(Image.open(need(MONUSEG / "masks" / f"{name}.png"))) > 0
    inst = np.asarray(Image.open(need(MONUSEG / "instances" / f"{name}.png")))
    return img, mask, inst


@pytest.fixture(scope="module")
def breast():
    return _monuseg(BREAST_ID)


# ------------------------------------------------------------------------- hand-built cases


def _canvas(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    """(40, 60) uint16 map with box k (y0, y1, x0, x1) labelled k+1."""
    a = np.zeros((40, 60), np.uint16)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        a[y0:y1, x0:x1] = k + 1
    return a


A, B, C = (2, 12, 2, 12), (2, 12, 20, 30), (20, 30, 2, 22)  # 100, 100 and 200 px


def test_identical_maps_score_one():
    gt = _canvas(A, B, C)
    m = instance_metrics(gt, gt)
    for k in ("aji", "pq", "dq", "sq", "map", "map_dsb", "f1@0.5", "f1@0.7"):
        assert m[k] == pytest.approx(1.0), k
    # labels are names, not values: a relabelled copy (huge uint32 ids: the np.unique path) scores 1
    relab = np.select([gt == 1, gt == 2, gt == 3], [4_000_000_000, 7, 3_999_999_999], 0).astype(np.uint32)
    assert instance_metrics(gt, relab)["aji"] == 1.0
    assert instance_metrics(gt, relab)["pq"] == pytest.approx(1.0)


def test_one_missed_nucleus():
    gt, pred = _canvas(A, B, C), _canvas(A, B)
    m = instance_metrics(gt, pred)
    assert m["aji"] == pytest.approx(200 / 400)  # C's 200 px only in the union
    assert (m["tp@0.5"], m["fp@0.5"], m["fn@0.5"]) == (2, 0, 1)
    assert m["dq"] == pytest.approx(2 / 2.5) and m["sq"] == pytest.approx(1.0) and m["pq"] == pytest.approx(0.8)
    assert m["map"] == pytest.approx(1.0)  # seed 001: precision only
    assert m["map_dsb"] == pytest.approx(2 / 3)  # DSB 2018: TP / (TP + FP + FN)
    assert m["recall@0.5"] == pytest.approx(2 / 3) and m["f1@0.5"] == pytest.approx(0.8)


def test_split_nucleus_even_and_uneven():
    gt = _canvas(A, C)  # C is 10 x 20
    # even split: both halves have IoU exactly 0.5 with C, which is not a match (IoU > 0.5)
    even = _canvas(A, (20, 30, 2, 12), (20, 30, 12, 22))
    m = instance_metrics(gt, even)
    assert m["aji"] == pytest.approx((100 + 100) / (100 + 200 + 100))  # the unused half joins U
    assert (m["tp@0.5"], m["fp@0.5"], m["fn@0.5"]) == (1, 2, 1)
    assert m["pq"] == pytest.approx(1 / (1 + 1.5))
    assert m["map"] == pytest.approx(1 / 3) and m["map_dsb"] == pytest.approx(1 / 4)
    # uneven split 14 + 6 columns: IoU 0.7 and 0.3; 0.7 matches at t < 0.7 only (strict >)
    uneven = _canvas(A, (20, 30, 2, 16), (20, 30, 16, 22))
    m = instance_metrics(gt, uneven)
    assert m["aji"] == pytest.approx((100 + 140) / (100 + 200 + 60))
    assert m["sq"] == pytest.approx((1 + 0.7) / 2) and m["pq"] == pytest.approx(0.8 * 0.85)
    assert m["tp@0.7"] == 1 and m["tp@0.5"] == 2
    prec = [2 / 3 if t < 0.7 else 1 / 3 for t in MAP_THRESHOLDS]
    assert m["map"] == pytest.approx(np.mean(prec))
    # below 0.5 the matching is one-to-one (Hungarian): C keeps one piece, the other is an FP
    gi, pi, iou = match(overlap_table(gt, uneven), 0.25)
    assert len(iou) == 2 and sorted(iou.round(6)) == [0.7, 1.0]


def test_merged_prediction_counts_in_union_once_per_partner():
    gt = _canvas((2, 12, 2, 12), (2, 12, 12, 22))  # two touching 10 x 10 squares
    pred = (gt > 0).astype(np.uint8)  # one 10 x 20 blob
    m = instance_metrics(gt, pred)
    # both squares pick the blob (IoU 0.5): C = 100 + 100, U = 200 + 200 (MoNuSeg code)
    assert m["aji"] == pytest.approx(0.5)
    assert m["pq"] == 0.0 and m["n_pred"] == 1


def test_empty_prediction_and_empty_maps():
    gt = _canvas(A, B)
    m = instance_metrics(gt, np.zeros_like(gt))
    assert m["aji"] == 0 and m["pq"] == 0 and m["map"] == 0 and m["map_dsb"] == 0
    assert m["precision@0.5"] == 0 and m["recall@0.5"] == 0 and m["fn@0.5"] == 2
    z = np.zeros_like(gt)
    assert instance_metrics(z, z)["aji"] == 1.0 and instance_metrics(z, z)["pq"] == 1.0
    assert instance_metrics(z, gt)["aji"] == 0.0
    assert pixel_metrics(z, z)["dice"] == 1.0 and pixel_metrics(gt, z)["dice"] == 0.0


def test_pixel_metrics_known_values():
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True  # 50 px
    pred = np.zeros((10, 10), bool)
    pred[:, 3:8] = True  # 50 px, 20 overlap
    m = pixel_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (20, 30, 30, 20)
    assert m["jaccard"] == pytest.approx(20 / 80) and m["dice"] == pytest.approx(40 / 100)
    assert m["precision"] == pytest.approx(0.4) and m["recall"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        pixel_metrics(gt, pred[:5])


# ------------------------------------------------------------- slow references on real maps


def reference_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """AJI as the MoNuSeg challenge code computes it, one nucleus at a time, and the matches at
    IoU > 0.5 / 0.7 by brute force. Masks are compared inside the bounding box of the pair, which
    holds every pixel of both, so the counts are exact."""
    g_boxes, p_boxes = ndi.find_objects(gt.astype(np.int64)), ndi.find_objects(pred.astype(np.int64))
    used: set[int] = set()
    inter_sum = union_sum = 0
    tp = {0.5: 0, 0.7: 0}
    for i in np.unique(gt)[1:]:
        gs = g_boxes[i - 1]
        cands = np.unique(pred[gs][gt[gs] == i])
        best = (-1.0, 0, 0, 0)  # iou, j, |G n S|, |G u S|
        for j in cands[cands > 0]:
            ps = p_boxes[j - 1]
            box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(gs, ps))
            G, S = gt[box] == i, pred[box] == j
            n_i, n_u = int((G & S).sum()), int((G | S).sum())
            for t in tp:
                tp[t] += n_i / n_u > t
            if n_i / n_u > best[0]:
                best = (n_i / n_u, int(j), n_i, n_u)
        if best[1] == 0:
            union_sum += int((gt[gs] == i).sum())
        else:
            inter_sum += best[2]
            union_sum += best[3]
            used.add(best[1])
    for j in np.unique(pred)[1:]:
        if int(j) not in used:
            union_sum += int((pred[p_boxes[j - 1]] == j).sum())
    return {"aji": inter_sum / union_sum, "tp@0.5": tp[0.5], "tp@0.7": tp[0.7]}


def _perturbations(gt: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = np.unique(gt)[1:]
    eroded = gt.copy()
    for _ in range(2):
        eroded[find_boundaries(eroded, mode="inner")] = 0
    keep = np.zeros(gt.max() + 1, bool)
    keep[rng.choice(ids, size=int(0.8 * ids.size), replace=False)] = True
    keep[0] = True
    dropped = np.where(keep[gt], gt, 0)
    shifted = np.roll(expand_labels(dropped, 2), (3, -2), axis=(0, 1))
    perm = np.zeros(gt.max() + 1, np.uint32)
    perm[ids] = rng.permutation(ids.size) + 1000
    merged = (gt // 2).astype(np.uint16)  # pairs of labels become one (often disconnected) nucleus
    return {"eroded": eroded, "dropped": dropped, "shifted_dilated": shifted, "permuted": perm[gt],
            "merged": merged, "components_of_mask": ndi.label(mask)[0]}


def test_aji_and_matching_equal_slow_reference_on_monuseg(breast):
    _, mask, gt = breast
    gt = gt.astype(np.int64)
    for name, pred in _perturbations(gt, mask, np.random.default_rng(0)).items():
        fast = instance_metrics(gt, pred)
        ref = reference_scores(gt, pred.astype(np.int64))
        assert fast["aji"] == pytest.approx(ref["aji"], abs=1e-12), name
        assert fast["tp@0.5"] == ref["tp@0.5"] and fast["tp@0.7"] == ref["tp@0.7"], name
        assert 0.0 < fast["aji"] <= 1.0, name


# ------------------------------------------------------------------------ post-processing


@pytest.mark.parametrize("name, margin", [(BREAST_ID, 0.08), (PROSTATE_ID, 0.25)])
def test_watershed_of_gt_mask_beats_components(name, margin):
    """The binary MoNuSeg mask merges touching nuclei (e.g. 307 components for 655 nuclei on
    TCGA-18-5592); splitting it by the distance watershed recovers them. Observed (0.25 um/px,
    default config): breast AJI 0.642 -> 0.773, prostate 0.094 -> 0.501."""
    _, mask, gt = _monuseg(name)
    prob = mask.astype(np.float32)
    cc = instance_metrics(gt, instances_from_probability(prob, 0.25, PostprocessConfig(split="none")))
    ws_map = instances_from_probability(prob, 0.25)
    ws = instance_metrics(gt, ws_map)
    print(f"\n{name}: AJI components {cc['aji']:.3f} -> watershed {ws['aji']:.3f}; "
          f"PQ {cc['pq']:.3f} -> {ws['pq']:.3f}; nuclei {cc['n_pred']:.0f} / {ws['n_pred']:.0f} / gt {ws['n_gt']:.0f}")
    assert ws["aji"] > cc["aji"] + margin
    assert ws["pq"] > cc["pq"]
    assert ws_map.dtype == np.uint32 and set(np.unique(ws_map)) == set(range(int(ws_map.max()) + 1))
    assert np.array_equal(ws_map > 0, clean_mask(mask, 0.25))  # splitting keeps every mask pixel


def test_predicted_shape_markers(breast):
    """USE-Net style (seed 002): markers = each GT nucleus eroded, as its training target."""
    _, mask, gt = breast
    markers = gt.copy()
    for _ in range(3):
        markers[find_boundaries(markers, mode="inner")] = 0
    inst = instances_from_probability(mask.astype(np.float32), 0.25, marker_prob=(markers > 0).astype(np.float32))
    m = instance_metrics(gt, inst)
    dist = instance_metrics(gt, instances_from_probability(mask.astype(np.float32), 0.25))
    print(f"\nshape markers AJI {m['aji']:.3f} vs distance watershed {dist['aji']:.3f}")
    assert m["aji"] > dist["aji"]


def test_sizes_are_in_micrometres(breast):
    """The same mask at 0.25 and 0.5 um/px gives about the same nuclei."""
    _, mask, gt = breast
    n = {}
    for mpp in (0.25, 0.5):
        m = resample(mask.astype(np.float32), 0.25 / mpp)
        n[mpp] = int(instances_from_probability(m, mpp).max())
    assert abs(n[0.25] - n[0.5]) <= 0.12 * n[0.25], n
    # a 2 x 2 um square (4 um^2) survives min_area 3 um^2 at both resolutions; a 1.5 um one does not
    for mpp in (0.25, 0.5):
        a = np.zeros((40, 40), bool)
        s, t = round(2 / mpp), round(1.5 / mpp)
        a[2:2 + s, 2:2 + s] = True
        a[20:20 + t, 20:20 + t] = True
        out = clean_mask(a, mpp, min_area_um2=3.0, max_hole_um2=0)
        assert out[2, 2] and not out[20, 20], mpp


def test_search_threshold_finds_the_half_level(breast):
    """A Gaussian-blurred mask has its original boundary at the 0.5 level."""
    _, mask, gt = breast
    prob = ndi.gaussian_filter(mask[:400, :400].astype(np.float32), 2.0)
    best, scores = search_threshold([prob], [mask[:400, :400].astype(np.uint8)], metric="dice", mpp=0.25,
                                    thresholds=(0.2, 0.5, 0.8), cfg=PostprocessConfig(split="none"))
    assert best == 0.5 and scores[0.5] > 0.97 and set(scores) == {0.2, 0.5, 0.8}
    best_aji, _ = search_threshold([prob], [gt[:400, :400]], metric="aji", mpp=0.25, thresholds=(0.5,))
    assert best_aji == 0.5


def test_empty_and_uint8_probability():
    z = np.zeros((64, 64), np.float32)
    assert instances_from_probability(z, 0.5).max() == 0
    p = np.zeros((64, 64), np.uint8)
    p[10:30, 10:30] = 230
    out = instances_from_probability(p, 0.5)
    assert out.dtype == np.uint32 and out.max() == 1
    with pytest.raises(ValueError):
        instances_from_probability(z, 0.5, PostprocessConfig(split="bogus"))


def test_classical_baselines_on_real_crop(breast):
    rgb, _, gt = breast
    rgb, gt = rgb[:500, :500], gt[:500, :500]
    res = {}
    for name, fn in (("otsu", otsu_hed), ("watershed", watershed_hed), ("fiji", fiji_like)):
        inst = fn(rgb, 0.25)
        assert inst.shape == gt.shape and inst.dtype == np.uint32
        res[name] = instance_metrics(gt, inst)
        assert res[name]["n_pred"] > 0.3 * res[name]["n_gt"], name
        assert pixel_metrics(gt, inst)["dice"] > 0.5, name
    print("\n" + ", ".join(f"{k} AJI {v['aji']:.3f}" for k, v in res.items()))
    assert res["watershed"]["n_pred"] > res["otsu"]["n_pred"]  # the watershed splits


@pytest.mark.slow
def test_eval_through_the_engine_gives_seed_tables_and_a_tuned_threshold(tmp_path):
    """`wsiseg eval` on one real MoNuSeg validation image with the shipped nucleus model: pixel and
    instance metrics in the seeds' table layouts, JSON, tiles/s, and a threshold search whose
    best AJI is at least the default threshold's (0.5 is on the grid)."""
    import json

    from tests.conftest import MONUSEG, need
    from wsiseg.cli import main
    from wsiseg.train.datasets import MONUSEG_VAL

    need(MONUSEG)
    js = tmp_path / "eval.json"
    code = main(["eval", "--model", "unet-bn-monuseg-20x", "--data", str(MONUSEG), "--tune", "--json", str(js),
                 "--image", MONUSEG_VAL[0]])
    assert code == 0
    res = json.loads(js.read_text())
    assert res["images"] and res["images"][0].startswith(MONUSEG_VAL[0])
    native = res["pooled"]["native"]
    assert 0.6 < native["dice"] < 1.0  # a trained model on a real image
    inst = res["instances_mean_per_image"]
    assert 0.2 < inst["aji"] < 1.0 and 0.0 < inst["map"] < 1.0 and 0.0 < inst["pq"] < 1.0
    assert res["tiles"] > 0 and res["tiles_per_second"] > 0
    tuned = res["tuned"]
    assert tuned["instances_mean_per_image"]["aji"] >= inst["aji"] - 1e-9
    assert tuned["aji_grid"]["threshold=0.5"] == pytest.approx(inst["aji"])
    assert not res["marker_channel"]


def test_marker_relief_splits_along_the_marker_valley():
    """Two nuclei side by side in a mask with no neck (a rectangle), with predicted markers of
    unequal size: flooding the distance transform splits near the middle, flooding minus the
    marker probability splits where that probability is lowest between the two markers."""
    from wsiseg.postprocess import PostprocessConfig, instances_from_probability

    h, w = 24, 80
    prob = np.zeros((h, w), np.float32)
    prob[2:22, 5:75] = 0.95
    x = np.arange(w, dtype=np.float32)
    bump = np.maximum(np.exp(-0.5 * ((x - 22) / 8) ** 2), np.exp(-0.5 * ((x - 62) / 3) ** 2))
    marker = np.broadcast_to(bump, (h, w)).copy() * (prob > 0)
    valley = 22 + int(np.argmin(bump[22:62]))  # where the two bumps meet
    assert abs(valley - 40) > 5  # away from the rectangle's middle
    cfg = PostprocessConfig(threshold=0.5, marker_threshold=0.6, min_area_um2=0.5, max_hole_um2=0.0,
                            min_marker_um2=0.5)
    splits = {}
    for relief in ("distance", "marker"):
        lab = instances_from_probability(prob, 0.5, dataclasses.replace(cfg, relief=relief), marker_prob=marker)
        assert lab.max() == 2
        row = lab[12]
        splits[relief] = int(np.flatnonzero(row[1:] != row[:-1])[1]) + 1  # first column of the right nucleus
    assert abs(splits["marker"] - valley) <= 1
    assert abs(splits["distance"] - valley) > 5
    with pytest.raises(ValueError, match="relief"):
        instances_from_probability(prob, 0.5, dataclasses.replace(cfg, relief="gradient"), marker_prob=marker)


@pytest.mark.slow
def test_eval_reports_tnbc_by_patient_and_class_dice(tmp_path):
    """`wsiseg eval --tnbc --classes` with the shipped class model: TNBC's validation patients only
    (05 and 11, never a training patient), and per-class Dice both ways on the class split."""
    import json

    from tests.conftest import MONUSEG, SHARED, need
    from wsiseg.cli import main
    from wsiseg.train.datasets import MONUSEG_VAL

    tnbc = need(SHARED / "tnbc" / "train")
    js = tmp_path / "eval.json"
    assert main(["eval", "--model", "unet-bn-nuclei-classes-20x", "--data", str(need(MONUSEG)), "--json", str(js),
                 "--image", MONUSEG_VAL[0], "--tnbc", str(tnbc), "--classes",
                 "--consep", str(need(SHARED / "consep" / "train")), "--monusac", str(SHARED / "monusac")]) == 0
    res = json.loads(js.read_text())
    t = res["tnbc"]
    assert {n.split("_")[1] for n in t["images"]} == {"05", "11"} and len(t["images"]) == 7
    assert 0.6 < t["pooled"]["native"]["dice"] < 1.0
    c = res["classes"]
    assert c["images"] == 116
    for way in ("dice_argmax", "dice_threshold"):
        assert set(c[way]) == {"normal", "lymphocyte", "malignant", "background", "mean_nlm"}
        assert 0.4 < c[way]["malignant"] < 1.0 and 0.8 < c[way]["background"] < 1.0
