"""`wsiseg view`: its errors and pure helpers here; on real run folders, over HTTP and in a
real headless Chromium, in ``tests/viewer_checks.py``, which the last test runs in a child pytest."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from wsiseg.cli import main
from wsiseg.viewer.nuclei import NucleusIndex
from wsiseg.viewer.server import Forbidden, safe_file

CROP = (600, 1000, 1024, 1024)  # x, y, w, h in the sample slide's level-0 px: dense nuclei
PATCH = (900, 1300, 300, 300)


def _chromium() -> str | None:
    for c in (os.environ.get("WSISEG_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).is_file():
            return c
    return None


# ---- fast: no run folder needed ---------------------------------------------------------------

def test_missing_out_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["view", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{missing}: no such folder" in err


def test_folder_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "half" / "probabilities.zarr").mkdir(parents=True)  # a run killed before its summary
    (tmp_path / "other").mkdir()
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no finished wsiseg run folder" in err and "1 unfinished: half" in err
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["view", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_safe_file_refuses_paths_that_leave_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "run" / "a.txt").write_text("a")
    (tmp_path / "secret.txt").write_text("s")
    (root / "run" / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert safe_file(root, "run/a.txt") == (root / "run" / "a.txt").resolve()
    assert safe_file(root, "run/missing.txt") is None
    assert safe_file(root, "run") is None  # a folder is not served
    for bad in ("../secret.txt", "run/../../secret.txt", "/etc/passwd", str(tmp_path / "secret.txt"),
                "run\\..\\..\\secret.txt", "run/link.txt", "C:/x", "run/\x00"):
        with pytest.raises(Forbidden):
            safe_file(root, bad)


def test_nucleus_index_reads_any_types_and_finds_nuclei(tmp_path):
    def square(x, y, w):
        return [[x, y], [x + w, y], [x + w, y + w], [x, y + w], [x, y]]

    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 10), square(3, 3, 4)]},
         "properties": {"classification": {"name": "Malignant", "color": [200, 0, 0]},
                        "measurements": {"Label": 7, "Area µm^2": 21.0, "p_malignant": 0.9}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square(20, 0, 5)], [square(40, 0, 5)]]},
         "properties": {"classification": {"name": "Lymphocyte"}, "measurements": {"Label": 3}, "area_um2": 12.5}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(60, 60, 8)]},
         "properties": {"classification": {"name": "Malignant", "color": [200, 0, 0]}, "label": 9}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},  # not an outline
    ]
    path = tmp_path / "n.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}, indent=2))  # not wsiseg's layout
    nuc = NucleusIndex.read(path)
    assert len(nuc) == 3 and nuc.type_names == ["Malignant", "Lymphocyte"] and nuc.type_counts() == [2, 1]
    assert nuc.type_colors[0] == [200, 0, 0] and len(nuc.type_colors[1]) == 3
    assert nuc.row_of_label(3) == 1 and nuc.row_of_label(9) == 2 and nuc.row_of_label(4) is None
    assert nuc.row_at(1, 1) == 0 and nuc.row_at(5, 5) is None  # inside the hole
    assert nuc.row_at(42, 2) == 1 and nuc.row_at(30, 2) is None  # the second part of a MultiPolygon
    d = nuc.describe(0)
    assert d == {"id": 7, "type": "Malignant", "area_um2": 21.0,
                 "measurements": {"Label": 7.0, "Area µm^2": 21.0, "p_malignant": 0.9}}
    assert nuc.describe(1)["area_um2"] == 12.5
    assert nuc.in_box(15, 0, 50, 3).tolist() == [1]
    assert nuc.outlines(np.array([1])) == [[3, 1, [float(v) for p in square(20, 0, 5) for v in p],
                                            [float(v) for p in square(40, 0, 5) for v in p]]]


# ---- on real run folders: tests/viewer_checks.py in a child pytest -------------------------

@pytest.mark.slow
def test_the_viewer_in_a_process_of_its_own():
    """The viewer's checks on real run folders (tests/viewer_checks.py) in a child interpreter.

    In the suite's own process, after the other test files, CI's pytest process died of SIGSEGV
    among these checks, twice, taking the whole suite with it; the module alone always passed. A
    child keeps such a crash to this test and lets it say which check it was in.
    """
    checks = Path(__file__).with_name("viewer_checks.py")
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-v", "-p", "no:cacheprovider", str(checks)]
    r = subprocess.run(cmd, cwd=checks.parents[1], capture_output=True, text=True, timeout=1200)
    report = r.stdout[-6000:] + r.stderr[-4000:]
    if r.returncode < 0 or "Fatal Python error" in r.stderr:
        # killed by a signal (the interpreter crashed, not a check that failed): said, then tried
        # once more; a second crash fails the test with both reports
        warnings.warn(f"the viewer checks' process crashed (exit {r.returncode}); retried once:\n{report}")
        r = subprocess.run(cmd, cwd=checks.parents[1], capture_output=True, text=True, timeout=1200)
        report = f"first try crashed:\n{report}\n\nsecond try:\n{r.stdout[-6000:]}{r.stderr[-4000:]}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{report}"
    assert " passed" in r.stdout and " failed" not in r.stdout, report
    if _chromium() is not None:  # with a browser, every check ran
        assert " skipped" not in r.stdout and "SKIPPED" not in r.stdout, report


