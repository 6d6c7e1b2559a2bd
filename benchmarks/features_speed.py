"""Patches/s of the 81 Rakhlin features: fast path (one LoG scale space per map) vs the reference
(one ``skimage.feature.blob_log`` per threshold), on a real 512 x 512 map.

    python benchmarks/features_speed.py [--image train_1] [--repeats 5] [--json benchmarks/results/features_speed.json]

The map: the 16 CoNSeP tiles of one source image (classes, ../shared/data/consep/train), each
turned into Normal/Lymphocyte/Malignant/Background class maps at 0.5 um/px (128 x 128,
smoothed with sigma 1 px, as ``cellularity.proxy.load_consep`` does) and laid out 4 x 4 into a
512 x 512 map. The tiles overlap in the source image, so the mosaic repeats some nuclei; it is
real label geometry, not a synthetic one. Both paths run single-threaded in this process; the
script also checks that the two feature vectors are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONSEP = REPO.parent / "shared" / "data" / "consep" / "train"


def mosaic(image: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(4, 512, 512) float32 class maps from the 16 tiles of ``image`` (4 x 4, tile order)."""
    from cellularity.proxy import load_consep

    tiles = load_consep(CONSEP, [f"{image}_{k:03d}" for k in range(16)], target_mpp=0.5, smooth_sigma=1.0)
    rows = [np.concatenate([t.probs for t in tiles[r * 4:(r + 1) * 4]], axis=2) for r in range(4)]
    return np.ascontiguousarray(np.concatenate(rows, axis=1)), tiles[0].channels


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="train_1", help="CoNSeP source image whose 16 tiles form the map")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fast path (the reference runs 2)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    from cellularity import features as F

    if not CONSEP.is_dir():
        print(f"{CONSEP}: CoNSeP data not found", file=sys.stderr)
        return 1
    probs, channels = mosaic(args.image)
    a = F.features(probs, channels)  # warm-up (imports, caches)
    b = F.features_reference(probs, channels)
    fast = timed(lambda: F.features(probs, channels), args.repeats)
    ref = timed(lambda: F.features_reference(probs, channels), max(1, min(2, args.repeats)))
    i_blobs = [i for i, n in enumerate(F.FEATURE_NAMES) if "_blobs_" in n]
    res = {
        "map": f"CoNSeP {args.image}: 16 tiles, 4 x 4 mosaic at 0.5 um/px",
        "shape": list(probs.shape),
        "channels_used": list(F.CLASS_CHANNELS),
        "log_params": F.LOG_PARAMS.__dict__,
        "blob_thresholds": list(F.BLOB_THRESHOLDS),
        "area_thresholds": list(F.AREA_THRESHOLDS),
        "blobs_per_threshold_malignant": [int(a[F.FEATURE_NAMES.index(f"malignant_blobs_t{t:g}")])
                                           for t in F.BLOB_THRESHOLDS],
        "fast_s": fast,
        "reference_s": ref,
        "fast_patches_per_s": 1.0 / float(np.median(fast)),
        "reference_patches_per_s": 1.0 / float(np.median(ref)),
        "speedup": float(np.median(ref) / np.median(fast)),
        "identical": bool(np.array_equal(a, b)),
        "max_abs_diff": float(np.abs(a - b).max()),
        "blob_count_diffs": int(np.count_nonzero(a[i_blobs] != b[i_blobs])),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1min_at_end": os.getloadavg()[0]},
        "note": "single process, CPU possibly shared with other jobs (see loadavg)",
    }
    print(json.dumps({k: res[k] for k in ("shape", "fast_patches_per_s", "reference_patches_per_s", "speedup",
                                           "identical", "blobs_per_threshold_malignant")}, indent=None))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
