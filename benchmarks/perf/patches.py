"""Folders of patches: `wsiseg run FOLDER --patches` against one slide run per image, on real tiles.

``python benchmarks/perf/patches.py --n 128 --json benchmarks/results/patches_consep.json`` runs
the first N CoNSeP tiles (256 px at 40x) with cellularity on and off, and the first ``--per-image``
of them as one ``wsiseg run`` each (the way a folder was run before), and records the network's
own time per patch (the predictor's calls, measured inside the run), the total time per patch and
their ratio, in one process, back to back.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "consep" / "train" / "images"))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--per-image", type=int, default=16)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from wsiseg.bench import machine
    from wsiseg.inputs import out_names
    from wsiseg.models.registry import load_model
    from wsiseg.patches import run_patches
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.predict import Predictor
    from wsiseg.scoring import DEFAULT_REGRESSORS

    files = sorted(Path(a.data).iterdir())[: a.n]
    predictor = Predictor(load_model(a.model), "cpu", backend=a.backend)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in (True, False):
            regs = dict(DEFAULT_REGRESSORS) if cell else {}
            s = run_patches(files, out_names(files), Path(tmp) / f"p{cell}", predictor, RunConfig.of(mpp=a.mpp),
                            regressors=regs)
            runs.append({"mode": "patches", "cellularity": cell, "patches": s["patches"], "backend": s["backend"],
                         "network_seconds_per_patch": s["network_seconds_per_patch"],
                         "seconds_per_patch": s["seconds_per_patch"],
                         "ratio_total_to_network": round(s["seconds_per_patch"] / s["network_seconds_per_patch"], 3),
                         "seconds": s["seconds"]})
            print(runs[-1])
        few = files[: a.per_image]
        for cell in (True, False):
            t0 = time.perf_counter()
            net = 0.0
            for f, name in zip(few, out_names(few)):
                res = run_slide(f, Path(tmp) / f"one{cell}" / name, predictor,
                                RunConfig.of(mpp=a.mpp, cellularity=cell))
                net += res.summary["seconds"].get("infer", 0.0)
            dt = time.perf_counter() - t0
            runs.append({"mode": "one run per image", "cellularity": cell, "patches": len(few),
                         "backend": predictor.backend, "network_seconds_per_patch": round(net / len(few), 4),
                         "seconds_per_patch": round(dt / len(few), 4),
                         "ratio_total_to_network": round(dt / net, 3) if net else None})
            print(runs[-1])
    out = {"benchmark": "patches", "folder": str(Path(a.data).relative_to(REPO.parent)) if Path(a.data).is_relative_to(REPO.parent) else a.data,
           "model": predictor.model.id, "mpp": a.mpp, "machine": machine(), "runs": runs,
           "command": "python benchmarks/perf/patches.py " + " ".join(argv or sys.argv[1:])}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
