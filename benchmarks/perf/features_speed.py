"""Per-patch time of the 81 Rakhlin features: the naive reference (one ``skimage.feature.blob_log``
per threshold), the previous fast path (``cellularity/features.py`` at commit 781f3e1, read from git) and the
current one (:func:`wsiseg.cellularity.features.features`), in ONE run on the same 512 x 512 patches.

    python benchmarks/perf/features_speed.py [--repeats 5] [--ref-repeats 1] [--json benchmarks/results/features_speed.json]

Patches (4 channels: Normal, Lymphocyte, Malignant, Background; 512 x 512 at 0.5 um/px), all built
from real CoNSeP class labels (../shared/data/consep/train):

- ``labels``: the 16 tiles of one source image turned into class maps at 0.5 um/px (128 x 128
  each, one-hot area-averaged, Gaussian sigma 1 px, as ``wsiseg.cellularity.proxy.load_consep`` does)
  and laid out 4 x 4. The tiles overlap in the source image, so a mosaic repeats some nuclei;
  the geometry is real. train_5 is a patch with almost no nuclei (background-heavy windows are
  common on a slide).
- ``predicted``: the same label geometry made to look like a network's softmax output: logits
  ``6 * onehot`` smoothed with sigma 1.5 px plus N(0, 0.5) noise smoothed with sigma 1 px, then a
  softmax over the 4 channels -- soft edges, no exact zeros, low-level noise everywhere.

Everything runs in this process on one core: OMP_NUM_THREADS=1 is expected in the environment,
``cv2.setNumThreads(1)``, SciPy's FFT with ``workers=1``. Both wall-clock (``perf_counter``) and
CPU time of the process (``process_time``) are recorded, because on a shared machine the wall
clock mostly measures the other jobs; the ratios use CPU time. The script also checks that the
current fast path equals the reference on every patch (all 81 features, bit for bit) and counts
how many features of the previous fast path differ from it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PREV_COMMIT = "781f3e1"  # the previous fast path: its scale space ndi.gaussian_laplace per sigma, maxima
# ndi.maximum_filter over the whole cube, one cKDTree query per threshold (self-contained there)
CONSEP = REPO.parent / "shared" / "data" / "consep" / "train"
LABEL_IMAGES = ("train_1", "train_8", "train_14", "train_22", "train_5")
PREDICTED_IMAGES = ("train_1", "train_8", "train_14", "train_22", "train_3")


def _tiles(image: str) -> list[np.ndarray]:
    """The 16 CoNSeP class-label tiles of ``image`` (uint8, 256 x 256 at 0.25 um/px)."""
    from PIL import Image

    return [np.asarray(Image.open(CONSEP / "classes" / f"{image}_{k:03d}.png")) for k in range(16)]


def _mosaic(tiles: list[np.ndarray]) -> np.ndarray:
    rows = [np.concatenate(tiles[r * 4:(r + 1) * 4], axis=-1) for r in range(4)]
    return np.ascontiguousarray(np.concatenate(rows, axis=-2))


def label_patch(image: str) -> np.ndarray:
    """(4, 512, 512) float32 class maps at 0.5 um/px, sigma 1 px (``load_consep``'s maps)."""
    from wsiseg.cellularity.proxy import CONSEP_CLASS_TO_CHANNEL, class_maps

    return _mosaic([class_maps(t, CONSEP_CLASS_TO_CHANNEL, scale=0.5, smooth_sigma=1.0) for t in _tiles(image)])


def predicted_patch(image: str, seed: int = 0) -> np.ndarray:
    """(4, 512, 512) float32 softmax-like maps from the same labels (see the module doc)."""
    from scipy import ndimage as ndi

    from wsiseg.cellularity.proxy import CONSEP_CLASS_TO_CHANNEL, class_maps

    onehot = _mosaic([class_maps(t, CONSEP_CLASS_TO_CHANNEL, scale=0.5) for t in _tiles(image)])
    rng = np.random.default_rng(seed)
    logits = np.stack([6.0 * ndi.gaussian_filter(c, 1.5) + ndi.gaussian_filter(rng.normal(0, 0.5, c.shape), 1.0)
                       for c in onehot.astype(np.float64)])
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """(wall seconds, CPU seconds, last result) of ``repeats`` calls."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return wall, cpu, out


def previous_features():
    """``cellularity/features.py`` as it was at :data:`PREV_COMMIT`, loaded from git (no copy of it
    is kept in the tree)."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{PREV_COMMIT}:cellularity/features.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="features-prev-")) / "features_prev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("features_prev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["features_prev"] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the current fast path per patch")
    ap.add_argument("--prev-repeats", type=int, default=2, help="timed runs of the previous fast path per patch")
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the reference per patch")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import cv2

    cv2.setNumThreads(1)
    P = previous_features()

    from wsiseg.cellularity import features as F
    from wsiseg.cellularity.proxy import CHANNELS

    if not CONSEP.is_dir():
        print(f"{CONSEP}: CoNSeP data not found", file=sys.stderr)
        return 1
    patches = [(f"labels:{im}", label_patch(im)) for im in LABEL_IMAGES]
    patches += [(f"predicted:{im}", predicted_patch(im, seed=k)) for k, im in enumerate(PREDICTED_IMAGES)]
    F.features(patches[0][1], CHANNELS)  # warm-up: imports, kernel and DCT caches
    P.features(patches[0][1], CHANNELS)

    i_blobs = [i for i, n in enumerate(F.FEATURE_NAMES) if "_blobs_" in n]
    rows = []
    for name, probs in patches:
        w_new, c_new, new = timed(lambda: F.features(probs, CHANNELS), args.repeats)
        w_prev, c_prev, prev = timed(lambda: P.features(probs, CHANNELS), args.prev_repeats)
        w_ref, c_ref, ref = timed(lambda: F.features_reference(probs, CHANNELS), args.ref_repeats)
        row = {
            "patch": name,
            "blobs_t0.02": {ch: int(new[F.FEATURE_NAMES.index(f"{ch}_blobs_t0.02")]) for ch in F.CLASS_CHANNELS},
            "new_ms": {"cpu_median": 1e3 * float(np.median(c_new)), "cpu_min": 1e3 * min(c_new),
                       "wall_median": 1e3 * float(np.median(w_new))},
            "prev_ms": {"cpu_median": 1e3 * float(np.median(c_prev)), "wall_median": 1e3 * float(np.median(w_prev))},
            "reference_ms": {"cpu_median": 1e3 * float(np.median(c_ref)), "wall_median": 1e3 * float(np.median(w_ref))},
            "new_equals_reference": bool(np.array_equal(new, ref)),
            "new_max_abs_diff": float(np.abs(new - ref).max()),
            "prev_blob_count_diffs": int(np.count_nonzero(prev[i_blobs] != ref[i_blobs])),
            "prev_max_abs_diff": float(np.abs(prev - ref).max()),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("patch", "blobs_t0.02", "new_ms", "prev_ms", "reference_ms",
                                              "new_equals_reference")}), flush=True)

    stack = np.stack([p for _, p in patches])
    w_batch, c_batch, xb = timed(lambda: F.features_batch(stack, CHANNELS), 2)

    def med(key: str, stat: str) -> float:
        return float(np.median([r[key][stat] for r in rows]))

    summary = {
        "per_patch_ms_median_over_patches": {
            "reference": {"cpu": med("reference_ms", "cpu_median"), "wall": med("reference_ms", "wall_median")},
            "previous_fast": {"cpu": med("prev_ms", "cpu_median"), "wall": med("prev_ms", "wall_median")},
            "new_fast": {"cpu": med("new_ms", "cpu_median"), "wall": med("new_ms", "wall_median"),
                         "cpu_min_over_runs": med("new_ms", "cpu_min")},
            "new_features_batch": {"cpu": 1e3 * min(c_batch) / len(patches), "wall": 1e3 * min(w_batch) / len(patches)},
        },
        "new_by_kind_cpu_ms": {kind: float(np.median([r["new_ms"]["cpu_median"] for r in rows
                                                      if r["patch"].startswith(kind)]))
                               for kind in ("labels", "predicted")},
    }
    s = summary["per_patch_ms_median_over_patches"]
    summary["ratios_cpu"] = {"reference_over_new": s["reference"]["cpu"] / s["new_fast"]["cpu"],
                             "previous_over_new": s["previous_fast"]["cpu"] / s["new_fast"]["cpu"],
                             "reference_over_previous": s["reference"]["cpu"] / s["previous_fast"]["cpu"]}
    summary["ratios_wall"] = {"reference_over_new": s["reference"]["wall"] / s["new_fast"]["wall"],
                              "previous_over_new": s["previous_fast"]["wall"] / s["new_fast"]["wall"]}
    summary["all_new_equal_reference"] = all(r["new_equals_reference"] for r in rows)
    summary["batch_equals_single"] = bool(np.array_equal(
        xb, np.stack([F.features(p, CHANNELS) for _, p in patches])))
    try:
        from wsiseg.bench import machine

        mach = machine()
    except Exception as e:  # pragma: no cover - reported, not required
        mach = {"error": repr(e)}
    res = {
        "what": "per-patch time of the 81 features (3 maps), single core",
        "patch_shape": list(patches[0][1].shape),
        "channels": list(CHANNELS),
        "log_params": F.LOG_PARAMS.__dict__,
        "repeats": {"new": args.repeats, "previous": args.prev_repeats, "reference": args.ref_repeats},
        "summary": summary,
        "patches": rows,
        "machine": mach,
        "note": ("Measured on a 2-core machine SHARED with a training run and other workers (see "
                 "machine.load_average): wall-clock times are inflated several-fold and noisy; CPU times "
                 "(process_time, single thread) are the better guide but are also inflated by the shared "
                 "caches and cores. To be re-run on an idle machine."),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
