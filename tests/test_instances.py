"""Whole-slide nucleus instances (wsiseg.instances): seams, GeoJSON, NGFF labels, empty maps."""
from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.draw import disk

from tests.conftest import write_png
from wsiseg.cli import main
from wsiseg.instances import InstancesError, guard_px, write_instances
from wsiseg.postprocess import PostprocessConfig, instances_from_probability, tie_broken_relief
from wsiseg.store import ProbabilityStore


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the two label maps have the same background and the same instances up to relabelling."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]).astype(np.int64), axis=1)
    return pairs.shape[1] == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def shoelace(ring) -> float:
    r = np.asarray(ring, np.float64)
    return 0.5 * float(np.dot(r[:-1, 0], r[1:, 1]) - np.dot(r[1:, 0], r[:-1, 1]))


def level0(out_dir, path="probabilities.zarr"):
    return zarr.open_group(str(out_dir / path), mode="r")["0"]


@pytest.fixture(scope="module")
def monuseg_run(tmp_path_factory, monuseg_image):
    """The shipped 20x model on a real 40x MoNuSeg crop: stored map at 0.5 um/px, 2 slide px per stored px."""
    d = tmp_path_factory.mktemp("inst")
    src = write_png(d / "breast.png", monuseg_image[:640, :640])
    assert main(["run", "-q", str(src), "--mpp", "0.25", "-o", str(d / "out"), "--instances"]) == 0
    return d / "out" / "breast"


@pytest.mark.slow
def test_run_with_instances_writes_labels_geojson_and_summary(monuseg_run):
    summary = json.loads((monuseg_run / "summary.json").read_text())
    assert summary["complete"] and summary["instances"]["instances"] > 50
    lab = level0(monuseg_run, "probabilities.zarr/labels/nuclei")[0]
    assert int(lab.max()) == summary["instances"]["label_ids"]
    gj = json.loads((monuseg_run / "nuclei.geojson").read_text())
    assert len(gj["features"]) == summary["instances"]["instances"]


@pytest.mark.slow
def test_windows_give_the_whole_map_partition_and_a_matching_geojson(monuseg_run):
    out = monuseg_run
    m = level0(out)[0]
    assert m.shape == (320, 320)
    ref = instances_from_probability(m, 0.5, PostprocessConfig())
    n = int(ref.max())
    assert n > 50
    win = 96
    # the test means something: many whole-map nuclei straddle a seam between window cores
    sl = ndi.find_objects(ref)
    crossing = sum(1 for s in sl if any(s[a].start // win != (s[a].stop - 1) // win for a in (0, 1)))
    assert crossing >= 10

    res = write_instances(out, window=win, margin=16)
    lab = level0(out, "probabilities.zarr/labels/nuclei")
    assert lab.dtype == np.uint32 and lab.shape == (1, 320, 320)
    lab = lab[0]
    # (a) seams neither cut nor duplicate: identical partition to the whole map at once
    assert res["instances"] == n == len(np.unique(lab[lab > 0]))
    assert same_partition(ref, lab)
    assert res["windows"] == 16 and res["clipped"] == 0 and res["label_ids"] == n
    assert res["retried_windows"] >= 1  # some cluster reached past the 16 px margin and was redone
    assert int(lab.max()) == n  # ids 1..n

    # (b) GeoJSON: valid, one polygon per label, slide level-0 coordinates (2 slide px per stored px)
    gj = json.loads((out / "nuclei.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == n
    areas = np.bincount(lab.ravel())
    bboxes = ndi.find_objects(lab)
    root = zarr.open_group(str(out / "probabilities.zarr"), mode="r")
    classes = root.attrs["wsiseg"]["classes"]
    cls = np.stack([m_ for m_ in level0(out)[[classes.index(c) for c in ("normal", "lymphocyte", "malignant")]]])
    rows = {int(r["id"]): r for r in csv.DictReader(open(out / "nuclei.csv"))}
    assert len(rows) == n
    seen = set()
    for f in gj["features"]:
        p = f["properties"]
        k = p["label"]
        # typed by the mean class probability inside the nucleus, from the map itself
        means = cls[:, lab == k].mean(axis=1) / 255
        name = ("Normal", "Lymphocyte", "Malignant")[int(np.argmax(means))]
        assert p["objectType"] == "detection" and p["classification"]["name"] == name
        assert p["measurements"]["Type probability"] == pytest.approx(means.max() / means.sum(), abs=1e-3)
        r = rows[k]
        assert r["type"] == name and float(r["p_malignant"]) == pytest.approx(means[2], abs=1e-3)
        assert f["geometry"]["type"] == "Polygon"
        seen.add(k)
        ext = np.asarray(f["geometry"]["coordinates"][0])
        assert np.array_equal(ext[0], ext[-1])
        assert ext.min() >= 0 and ext[:, 0].max() <= 640 and ext[:, 1].max() <= 640
        # smooth outline: corners cut by at most half a stored px (1 slide px), area close to the pixel count
        area = shoelace(ext) + sum(shoelace(h) for h in f["geometry"]["coordinates"][1:])
        assert area == pytest.approx(areas[k] * 4.0, rel=0.25, abs=8)
        assert p["area_um2"] == pytest.approx(areas[k] * 0.25)
        s = bboxes[k - 1]
        assert 2 * s[1].start <= ext[:, 0].min() <= 2 * s[1].start + 1.5
        assert 2 * s[1].stop - 1.5 <= ext[:, 0].max() <= 2 * s[1].stop
        assert 2 * s[0].start <= ext[:, 1].min() <= 2 * s[0].start + 1.5
        ys, xs = np.nonzero(lab == k)
        assert float(r["centroid_x"]) == pytest.approx(2 * (xs.mean() + 0.5), abs=1e-2)
        assert float(r["area_um2"]) == pytest.approx(areas[k] * 0.25)
    assert seen == set(range(1, n + 1))
    assert len({f["id"] for f in gj["features"]}) == n
    assert sum(res["types"].values()) == n


def test_smooth_outline_cuts_staircases_within_half_a_pixel():
    from wsiseg.instances import _geometry

    m = np.zeros((40, 40), np.uint8)
    rr, cc = disk((20, 20), 12)
    m[rr, cc] = 1
    exact = np.asarray(_geometry(m, 0, 0, 1.0, smooth=False)["coordinates"][0])
    smooth = np.asarray(_geometry(m, 0, 0, 1.0)["coordinates"][0])
    assert shoelace(exact) == m.sum()  # the exact pixel-edge outline keeps the pixel count
    assert len(smooth) < len(exact) / 2  # no staircase
    assert abs(shoelace(smooth) - np.pi * 12.5 ** 2) < abs(shoelace(exact) - np.pi * 12.5 ** 2)
    # every smooth vertex lies within half a pixel of the exact pixel-edge outline
    a, b = exact[:-1][None], exact[1:][None]
    t = np.clip((((smooth[:, None] - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1)), 0, 1)
    d = np.sqrt(((smooth[:, None] - (a + t[..., None] * (b - a))) ** 2).sum(-1)).min(1)
    assert d.max() <= 0.5 + 1e-6


@pytest.mark.slow
def test_label_image_is_ngff_labels(monuseg_run):
    out = monuseg_run
    write_instances(out, window=128, margin=32)
    root = zarr.open_group(str(out / "probabilities.zarr"), mode="r")
    assert root.attrs["wsiseg"]["complete"] and "multiscales" in root.attrs  # the image is untouched
    labels = zarr.open_group(str(out / "probabilities.zarr" / "labels"), mode="r")
    assert labels.attrs["labels"] == ["nuclei"]
    g = labels["nuclei"]
    il = g.attrs["image-label"]
    assert il["version"] == "0.4" and il["source"]["image"] == "../../"
    ms = g.attrs["multiscales"][0]
    parent = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["coordinateTransformations"] for d in ms["datasets"]] == \
        [d["coordinateTransformations"] for d in parent["datasets"]]
    for d in ms["datasets"]:
        a, p = g[d["path"]], root[d["path"]]
        assert a.shape == (1, *p.shape[1:]) and a.dtype == np.uint32 and a.chunks[1] <= 512
    for i in range(1, len(ms["datasets"])):
        assert np.array_equal(g[str(i)][:], g[str(i - 1)][:][:, ::2, ::2])
    w = g.attrs["wsiseg"]
    assert w["complete"] and w["mpp"] == 0.5 and w["scale_from_level0"] == 2.0 and w["instances"] > 50
    # a second run replaces the label image, the labels list stays single
    write_instances(out, window=128, margin=32)
    assert zarr.open_group(str(out / "probabilities.zarr" / "labels"), mode="r").attrs["labels"] == ["nuclei"]


def test_no_nuclei_writes_empty_outputs_and_incomplete_runs_are_refused(tmp_path, tiny_unet_path):
    glass = write_png(tmp_path / "glass.png", np.full((300, 420, 3), 242, np.uint8))
    args = ["run", "-q", str(glass), "--mpp", "0.25", "--model", str(tiny_unet_path), "-o", str(tmp_path / "out")]
    assert main(args) == 0
    out = tmp_path / "out" / "glass"
    res = write_instances(out, window=128, margin=16)
    assert res["instances"] == 0 and res["windows"] == 4 and res["windows_with_nuclei"] == 0
    gj = json.loads((out / "nuclei.geojson").read_text())
    assert gj == {"type": "FeatureCollection", "features": []}
    lab = level0(out, "probabilities.zarr/labels/nuclei")
    assert lab.shape == (1, 150, 210) and int(lab[:].max()) == 0
    assert zarr.open_group(str(out / "probabilities.zarr/labels/nuclei"), mode="r").attrs["wsiseg"]["complete"]

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    g = zarr.open_group(str(broken / "probabilities.zarr"), mode="r+")
    g.attrs["wsiseg"] = {**g.attrs["wsiseg"], "complete": False}
    with pytest.raises(InstancesError, match="not complete"):
        write_instances(broken)
    with pytest.raises(InstancesError, match="no probabilities.zarr"):
        write_instances(tmp_path / "nowhere")
    with pytest.raises(InstancesError, match="no channel"):
        write_instances(out, channel="lymphocyte")


def synthetic_run(tmp_path, prob: np.ndarray, mpp: float = 0.5, scale: float = 1.5, chunk: int = 128,
                  marker: np.ndarray | None = None, name: str = "synth"):
    out = tmp_path / name
    out.mkdir()
    H, W = prob.shape
    classes = ["nucleus"] if marker is None else ["nucleus", "marker"]
    maps = prob[None] if marker is None else np.stack([prob, marker])
    attrs = {"mpp": mpp, "scale_from_level0": scale, "classes": classes, "source": "synth"}
    st = ProbabilityStore.create(out / "probabilities.zarr", (H, W), classes, mpp, attrs, chunk)
    for b in range(-(-H // chunk)):
        st.write_block(b, 0, maps[:, b * chunk : (b + 1) * chunk].astype(np.float32))  # (a copy: converted in place)
        st.mark_bands_done(b + 1)
    st.build_pyramid()
    st.mark_complete({})
    return out


def blobs(shape=(300, 340), cell=36, seed=0, centres: list | None = None) -> np.ndarray:
    """A touching pair of nucleus-like discs per grid cell (each pair < 32 px across), noise, and
    one long band (a cluster far wider than a window)."""
    rng = np.random.default_rng(seed)
    p = np.zeros(shape, np.float32)
    for cy in range(cell // 2, shape[0] - 4, cell):
        for cx in range(cell // 2, shape[1] - 4, cell):
            r1, r2 = rng.uniform(3, 7, 2)
            a = rng.uniform(0, np.pi)
            d = 0.8 * (r1 + r2) / 2
            for r, sgn in ((r1, 1), (r2, -1)):
                rr, cc = disk((cy + sgn * d * np.sin(a), cx + sgn * d * np.cos(a)), r, shape=shape)
                p[rr, cc] = rng.uniform(0.6, 1.0)
                if centres is not None:
                    centres.append((cy + sgn * d * np.sin(a), cx + sgn * d * np.cos(a)))
    p[150:158, 20:320] = 0.9  # a 300 px band
    return np.clip(p + rng.normal(0, 0.05, shape).astype(np.float32), 0, 1)


@pytest.mark.slow
def test_synthetic_map_exact_with_retries_and_clipped_beyond_max_margin(tmp_path, caplog):
    prob = blobs()
    out = synthetic_run(tmp_path, prob)
    m = level0(out)[0]
    # symmetric discs make equally deep watershed markers: split_watershed breaks those ties by
    # raster order, so the whole map and every window split a cluster alike
    ref = instances_from_probability(m, 0.5, PostprocessConfig())
    n = int(ref.max())
    assert guard_px(0.5, PostprocessConfig()) == 60
    # the band is wider than the margin: its windows are redone until it fits, exactly
    res = write_instances(out, window=64, margin=8, max_margin=512)
    lab = level0(out, "probabilities.zarr/labels/nuclei")[0]
    assert res["instances"] == n and res["clipped"] == 0 and res["retried_windows"] > 0
    assert same_partition(ref, lab)
    g = zarr.open_group(str(out / "probabilities.zarr/labels/nuclei"), mode="r")
    assert [d["path"] for d in g.attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]  # 128 px chunks
    for i in (1, 2):
        assert np.array_equal(g[str(i)][:], g[str(i - 1)][:][:, ::2, ::2])
    gj = json.loads((out / "nuclei.geojson").read_text())
    assert len(gj["features"]) == n
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in gj["features"]])
    assert xy.min() >= 0 and xy[:, 0].max() <= 340 * 1.5 and xy[:, 1].max() <= 300 * 1.5

    # capped margin: the band cannot fit; it is cut at the core borders (counted, warned),
    # every foreground pixel still labelled exactly once, ids and features consistent
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        res = write_instances(out, window=64, margin=8, max_margin=32)
    assert res["clipped"] > 0 and "clipped" in caplog.text
    lab = level0(out, "probabilities.zarr/labels/nuclei")[0]
    assert np.array_equal(lab > 0, ref > 0)
    assert len(np.unique(lab[lab > 0])) == res["label_ids"] >= res["instances"]
    gj = json.loads((out / "nuclei.geojson").read_text())
    assert len(gj["features"]) == res["instances"]
    assert sum(bool(f["properties"].get("clipped")) for f in gj["features"]) == res["clipped"]
    assert {f["properties"]["label"] for f in gj["features"]} <= set(np.unique(lab[lab > 0]).tolist())
    # nuclei away from the band are still exact
    far = [k for k, s in enumerate(ndi.find_objects(ref), 1) if s[0].stop <= 120 or s[0].start >= 190]
    assert len(far) > 60
    for k in far:
        ids = np.unique(lab[ref == k])
        assert len(ids) == 1 and np.array_equal(lab == ids[0], ref == k)


def test_tie_break_keeps_the_order_of_values_and_orders_equal_markers_by_raster():
    rng = np.random.default_rng(1)
    relief = -rng.integers(0, 4, (9, 11)).astype(np.float32)
    markers = (rng.random((9, 11)) > 0.7).astype(np.int32)
    mask = rng.random((9, 11)) > 0.2
    key = tie_broken_relief(relief, markers, mask)
    i = np.flatnonzero(mask)
    v, mk, k = relief.ravel()[i], markers.ravel()[i] != 0, key.ravel()[i]
    less, same = v[:, None] < v[None, :], v[:, None] == v[None, :]
    assert (k[:, None] < k[None, :])[less].all()
    first = np.triu(np.ones((len(i), len(i)), bool), 1)  # raster order: i before j
    assert (k[:, None] < k[None, :])[same & mk[:, None] & mk[None, :] & first].all()
    assert (k[:, None] < k[None, :])[same & mk[:, None] & ~mk[None, :]].all()
    assert (k[:, None] == k[None, :])[same & ~mk[:, None] & ~mk[None, :]].all()


@pytest.mark.slow
def test_predicted_markers_split_nuclei_and_windows_match_the_whole_map(tmp_path):
    """A mask + marker map (USE-Net style): the marker channel is used automatically, each touching
    pair is split by its two markers, and windows with seams give the whole-map partition."""
    centres = []
    prob = blobs(seed=3, centres=centres)
    prob[150:158] = 0  # no band: every pair is a two-marker cluster
    # markers: a small disc at each nucleus centre (a shrunken nucleus, as seed 002's shape markers)
    mk = np.full(prob.shape, 0.05, np.float32)
    for cy, cx in centres:
        rr, cc = disk((cy, cx), 1.6, shape=prob.shape)
        mk[rr, cc] = 0.9
    out = synthetic_run(tmp_path, prob, marker=mk, name="marker")
    m, k = level0(out)[0], level0(out)[1]
    ref = instances_from_probability(m, 0.5, PostprocessConfig(), marker_prob=k)
    dist = instances_from_probability(m, 0.5, PostprocessConfig())
    assert not same_partition(ref, dist)  # the predicted markers, not the distance peaks, decide
    assert int(ref.max()) > int(ndi.label(m > 127)[1])  # touching pairs were split
    res = write_instances(out, window=64, margin=8)
    lab = level0(out, "probabilities.zarr/labels/nuclei")[0]
    assert res["instances"] == int(ref.max()) and res["clipped"] == 0
    assert same_partition(ref, lab)
    g = zarr.open_group(str(out / "probabilities.zarr/labels/nuclei"), mode="r")
    assert g.attrs["wsiseg"]["marker_channel"] == "marker"
    # flooding minus the marker probability (relief "marker") is as exact across seams
    cfg = PostprocessConfig(relief="marker")
    ref_m = instances_from_probability(m, 0.5, cfg, marker_prob=k)
    assert not same_partition(ref_m, ref)  # another split
    res = write_instances(out, cfg, window=64, margin=8)
    assert res["instances"] == int(ref_m.max()) and res["clipped"] == 0
    assert same_partition(ref_m, level0(out, "probabilities.zarr/labels/nuclei")[0])
    # the distance watershed is still there when asked for
    write_instances(out, window=64, margin=8, marker_channel=None)
    assert same_partition(dist, level0(out, "probabilities.zarr/labels/nuclei")[0])


@pytest.mark.slow
def test_shipped_marker_model_runs_instances_with_its_tuned_postprocessing(tmp_path, monuseg_image):
    """`--model unet-bn-marker-monuseg-20x --instances`: the map has nucleus and marker channels,
    the label image is split by the predicted markers with the sidecar's thresholds."""
    src = write_png(tmp_path / "breast.png", monuseg_image[:512, :512])
    assert main(["run", "-q", str(src), "--mpp", "0.25", "-o", str(tmp_path / "out"), "--instances",
                 "--model", "unet-bn-marker-monuseg-20x", "--no-cellularity"]) == 0
    out = tmp_path / "out" / "breast"
    g = zarr.open_group(str(out / "probabilities.zarr"), mode="r")
    assert g.attrs["wsiseg"]["classes"] == ["nucleus", "marker"]
    la = zarr.open_group(str(out / "probabilities.zarr/labels/nuclei"), mode="r").attrs["wsiseg"]
    assert la["marker_channel"] == "marker"
    from wsiseg.models.registry import load_model

    tuned = load_model("unet-bn-marker-monuseg-20x").meta["postprocess"]
    thr, mthr = tuned["threshold"], tuned["marker_threshold"]
    assert (thr, mthr) != (0.5, 0.5)  # the sidecar's tuned values, not the defaults
    assert la["postprocess"]["threshold"] == thr and la["postprocess"]["marker_threshold"] == mthr
    assert la["postprocess"]["relief"] == tuned["relief"] == "marker"
    m = g["0"][:]
    known = PostprocessConfig.__dataclass_fields__
    ref = instances_from_probability(m[0], 0.5, PostprocessConfig(**{k: v for k, v in tuned.items() if k in known}),
                                     marker_prob=m[1])
    lab = level0(out, "probabilities.zarr/labels/nuclei")[0]
    assert int(ref.max()) > 50 and same_partition(ref, lab)
