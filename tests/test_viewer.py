"""`wsiseg view`: its errors and pure helpers; then, on real run folders, the server over HTTP and
the page in a real headless Chromium.

The run folders are made once per module by ``wsiseg run --instances`` (the default model) on
two real-pixel inputs cut from the bundled sample slide: a 1024 px pyramidal TIFF at its own
0.499 um/px (map px = slide px) and a 600 px PNG given as 0.25 um/px (each map px covers 2 x 2
slide px), so every overlay is checked against the Zarr in both frames. The HTTP checks use an
in-process server; the browser's pages come from ``wsiseg view`` in a process of its own.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import SAMPLE_SVS, write_png, write_pyramid
from wsiseg.cli import main
from wsiseg.viewer.nuclei import NucleusIndex
from wsiseg.viewer.runs import MAP_TILE
from wsiseg.viewer.server import Forbidden, ViewerServer, safe_file

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


# ---- the run folders and a server on a free loopback port -------------------------------------

@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    import openslide

    d = tmp_path_factory.mktemp("viewer")
    with openslide.OpenSlide(str(SAMPLE_SVS)) as s:
        crop = np.asarray(s.read_region(CROP[:2], 0, CROP[2:]).convert("RGB"))
        patch = np.asarray(s.read_region(PATCH[:2], 0, PATCH[2:]).convert("RGB"))
    slides = d / "slides"
    slides.mkdir()
    write_pyramid(slides / "crop.tif", crop, mpp=0.499, levels=3)
    write_png(slides / "patch.png", cv2.resize(patch, (600, 600), interpolation=cv2.INTER_CUBIC))
    o = d / "out"
    assert main(["run", "-q", "--instances", str(slides / "crop.tif"), str(slides / "patch.png"), "--mpp", "0.25",
                 "-o", str(o)]) == 0
    return o


@pytest.fixture(scope="module")
def server(out):
    srv = ViewerServer(out, "127.0.0.1", 0)
    srv.start_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv: ViewerServer, path: str) -> tuple[int, bytes, str]:
    """GET the raw ``path`` (not normalised: ``..`` reaches the server as typed)."""
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read(), r.getheader("Content-Type", "")
    finally:
        c.close()


def get_json(srv, path):
    status, body, _ = get(srv, path)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)


def zarr_levels(out: Path, run: str, labels: bool = False) -> list:
    g = zarr.open_group(str(out / run / "probabilities.zarr" / ("labels/nuclei" if labels else "")), mode="r")
    return [g[d["path"]] for d in g.attrs["multiscales"][0]["datasets"]]


def known_nucleus(out: Path, run: str) -> tuple[int, int, int]:
    """(label id, stored x, stored y): the pixel deepest inside the largest-margin nucleus."""
    lab = np.asarray(zarr_levels(out, run, labels=True)[0][0])
    best = (0, 0, 0, 0.0)
    for i in np.unique(lab[lab > 0])[:400]:
        m = (lab == i).astype(np.uint8)
        dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(dist), dist.shape)
        if dist[y, x] > best[3]:
            best = (int(i), int(x), int(y), float(dist[y, x]))
    assert best[3] >= 3, "no nucleus with a 3 px margin"
    return best[:3]


@pytest.mark.slow
def test_runs_info_and_summary(server, out):
    runs = get_json(server, "/api/runs")
    assert [r["name"] for r in runs] == ["crop", "patch"]
    assert {r["input"] for r in runs} == {"crop.tif", "patch.png"}
    for name, scale, kind in (("crop", 1.0, "slide"), ("patch", 2.0, "image")):
        info = get_json(server, f"/api/runs/{name}/info")
        summary = json.loads((out / name / "summary.json").read_text())
        assert info["slide"]["available"] and info["slide"]["kind"] == kind
        assert info["map"]["scale_from_level0"] == scale
        assert info["summary"]["model"] == summary["model"]
        assert info["summary"]["seconds"] == summary["seconds"]["total"]
        assert info["cellularity"]["tissue_weighted_mean"]["lgbm"] == summary["cellularity"]["cellularity_lgbm"]["tissue_weighted_mean"]
        assert info["nuclei"]["count"] == summary["instances"]["instances"]
        # every type the engine wrote (Malignant / Lymphocyte / Normal), one toggle each
        assert sorted(t["name"] for t in info["nuclei"]["types"]) == sorted(summary["instances"]["types"])
        assert [c["label"] for c in info["map"]["channels"]] == summary["channels"]
        status, body, _ = get(server, info["files"]["summary.json"])
        assert status == 200 and body == (out / name / "summary.json").read_bytes()
    assert get(server, "/api/runs/nope/info")[0] == 404
    assert get(server, "/api/runs/crop/at?x=abc&y=1")[0] == 400
    assert get(server, "/api/runs/crop/at?x=1")[0] == 400


@pytest.mark.slow
def test_slide_tiles_at_several_levels(server, out):
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    for name, path in (("crop", out.parent / "slides" / "crop.tif"), ("patch", out.parent / "slides" / "patch.png")):
        status, dzi, ctype = get(server, f"/api/runs/{name}/slide.dzi")
        assert status == 200 and b'TileSize="254"' in dzi and "xml" in ctype
        size = Image.open(path).size
        assert f'Width="{size[0]}" Height="{size[1]}"'.encode() in dzi
        top = int(np.ceil(np.log2(max(size))))
        for level in (top, top - 1, top - 3, 0):
            status, body, ctype = get(server, f"/api/runs/{name}/slide_files/{level}/0_0.jpeg")
            assert status == 200 and ctype == "image/jpeg"
            im = Image.open(io.BytesIO(body))
            side = max(size) / 2 ** (top - level)
            assert max(im.size) == min(255, int(np.ceil(side))), (level, im.size)
        assert get(server, f"/api/runs/{name}/slide_files/{top + 1}/0_0.jpeg")[0] == 404
        assert get(server, f"/api/runs/{name}/slide_files/{top}/99_0.jpeg")[0] == 404
    # the pixels are the slide's: a level-0 tile of the TIFF equals OpenSlide's own deep-zoom tile
    with OpenSlide(str(out.parent / "slides" / "crop.tif")) as s:
        dz = DeepZoomGenerator(s, 254, 1, limit_bounds=False)
        ref = np.asarray(dz.get_tile(dz.level_count - 1, (1, 2)), np.float32)
    got = np.asarray(Image.open(io.BytesIO(get(server, f"/api/runs/crop/slide_files/{dz.level_count - 1}/1_2.jpeg")[1])),
                     np.float32)
    assert got.shape == ref.shape  # the same pixels, but for JPEG re-encoding (quality 85)
    assert np.abs(got - ref).mean() < 8 and np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98


@pytest.mark.slow
def test_overlay_tiles_equal_the_zarr(server, out):
    from matplotlib import colormaps

    for name in ("crop", "patch"):
        levels = zarr_levels(out, name)
        info = get_json(server, f"/api/runs/{name}/info")
        for k, arr in enumerate(levels):
            h, w = arr.shape[1:]
            for ch in (0, arr.shape[0] - 1):
                col, row = (w - 1) // MAP_TILE, (h - 1) // MAP_TILE  # the last (edge) tile of the level
                for c, r in {(0, 0), (col, row)}:
                    status, body, ctype = get(server, f"/api/runs/{name}/map/{ch}/{k}/{c}_{r}.png")
                    assert status == 200 and ctype == "image/png"
                    rgba = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
                    ref = np.asarray(arr[ch, r * MAP_TILE:(r + 1) * MAP_TILE, c * MAP_TILE:(c + 1) * MAP_TILE])
                    assert rgba.shape[:2] == ref.shape
                    np.testing.assert_array_equal(rgba[..., 3], ref)  # alpha = the stored value
                    assert (rgba[..., :3] == info["map"]["channels"][ch]["color"]).all()
            status, body, _ = get(server, f"/api/runs/{name}/map/0/{k}/0_0.png?cmap=magma")
            lut = np.round(colormaps["magma"](np.arange(256) / 255.0) * 255).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGBA")),
                                          lut[np.asarray(arr[0, :MAP_TILE, :MAP_TILE])])
        n = len(levels)
        assert get(server, f"/api/runs/{name}/map/0/{n}/0_0.png")[0] == 404
        assert get(server, f"/api/runs/{name}/map/9/0/0_0.png")[0] == 404
        assert get(server, f"/api/runs/{name}/map/0/0/99_0.png")[0] == 404
        assert get(server, f"/api/runs/{name}/map/0/0/0_0.png?cmap=nope")[0] == 404


def _type_of(out, name: str, gid: int) -> str:
    """The nucleus type the engine wrote for label ``gid`` of run ``name``."""
    for f in json.loads((out / name / "nuclei.geojson").read_text())["features"]:
        if f["properties"]["label"] == gid:
            return f["properties"]["classification"]["name"]
    raise KeyError(gid)


@pytest.mark.slow
def test_readout_and_outlines_over_http(server, out):
    geo = json.loads((out / "patch" / "nuclei.geojson").read_text())["features"]
    props = {f["properties"]["label"]: f["properties"] for f in geo}
    for name, s in (("crop", 1), ("patch", 2)):
        gid, sx, sy = known_nucleus(out, name)
        probs = zarr_levels(out, name)[0]
        x, y = sx * s + s - 1, sy * s  # a slide pixel inside the stored pixel
        r = get_json(server, f"/api/runs/{name}/at?x={x}&y={y}")
        assert r["stored_px"] == [sx, sy]
        assert r["nucleus"]["id"] == gid and r["nucleus"]["type"] == _type_of(out, name, gid)
        assert list(r["stored_values"].values()) == np.asarray(probs[:, sy, sx]).tolist()
        assert r["cellularity"] is None or r["cellularity"]["window"][0] <= x < sum(r["cellularity"]["window"][::2])
        if name == "patch":
            assert r["nucleus"]["area_um2"] == props[gid]["area_um2"]
        # the outlines in a box around it hold it, with its label id and type, in slide px
        res = get_json(server, f"/api/runs/{name}/nuclei?box={x - 40},{y - 40},{x + 40},{y + 40}")
        feats = {f[0]: f for f in res["features"]}
        types = [t["name"] for t in get_json(server, f"/api/runs/{name}/info")["nuclei"]["types"]]
        assert not res["truncated"] and gid in feats and types[feats[gid][1]] == _type_of(out, name, gid)
        ring = np.asarray(feats[gid][2]).reshape(-1, 2)
        assert ring[:, 0].min() <= x <= ring[:, 0].max() and ring[:, 1].min() <= y <= ring[:, 1].max()
    assert get_json(server, "/api/runs/crop/at?x=-5&y=-5")["stored_px"] is None


@pytest.mark.slow
def test_paths_that_leave_out_are_refused(server, out):
    secret = out.parent / "slides" / "patch.png"  # outside OUT
    for path in ("/files/../slides/patch.png", "/files/%2e%2e/slides/patch.png", "/files/crop/../../slides/patch.png",
                 "/files/crop/..%2F..%2Fslides%2Fpatch.png", f"/files/{quote(str(secret))}", f"/files/{secret}",
                 "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/static/../server.py", "/static/%2e%2e/runs.py",
                 "/static/..%5C..%5Cserver.py", "/files/crop/%00"):
        status, body, _ = get(server, path)
        assert status in (403, 404), (path, status)
        assert body.startswith((b"forbidden", b"not found")), path
    assert get(server, "/files/crop/cellularity.csv")[1] == (out / "crop" / "cellularity.csv").read_bytes()
    assert get(server, "/files/nope.txt")[0] == 404
    assert get(server, "/static/openseadragon/LICENSE.txt")[0] == 200


@pytest.mark.slow
def test_a_moved_slide_shows_the_results_alone_or_is_found_with_slides(out, tmp_path):
    moved = tmp_path / "out" / "patch"
    shutil.copytree(out / "patch", moved)
    summary = json.loads((moved / "summary.json").read_text())
    summary["input"] = str(tmp_path / "gone" / "patch.png")
    (moved / "summary.json").write_text(json.dumps(summary))
    (moved / "nuclei.geojson").write_text('{"type": "FeatureCollection", "features": [')  # cut short
    srv = ViewerServer(tmp_path / "out", "127.0.0.1", 0)
    srv.start_thread()
    try:
        assert any("not found" in w for w in srv.warnings)
        info = get_json(srv, "/api/runs/patch/info")
        assert not info["slide"]["available"] and "not found" in info["slide"]["note"]
        assert "nuclei.geojson: cannot be read" in info["slide"]["note"] and info["nuclei"] is None
        assert info["dimensions"] == [600, 600]
        assert get(srv, "/api/runs/patch/slide.dzi")[0] == 404
        assert get(srv, "/api/runs/patch/map/0/0/0_0.png")[0] == 200
        r = get_json(srv, "/api/runs/patch/at?x=300&y=300")
        assert r["nucleus"] is None or r["nucleus"]["type"] is None  # an id from the label image, no GeoJSON
    finally:
        srv.shutdown()
        srv.server_close()
    srv = ViewerServer(tmp_path / "out", "127.0.0.1", 0, slide_dirs=(out.parent / "slides",))
    try:
        assert srv.runs["patch"].slide is not None and not srv.warnings
    finally:
        srv.server_close()


@pytest.mark.slow
def test_cli_serves_until_ctrl_c_and_refuses_a_busy_port(out, capsys):
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, and kill
        p = subprocess.Popen([sys.executable, "-m", "wsiseg.cli", "view", str(out), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            assert "2 runs" in line and "http://127.0.0.1:" in line, line
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", "/api/runs")
            assert c.getresponse().status == 200  # the connection stays open: shutdown must not wait for it
            p.send_signal(sig)
            stdout, stderr = p.communicate(timeout=30)
            c.close()
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0 and "Traceback" not in stderr, stderr
        assert "stopped" in stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["view", str(out), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on 127.0.0.1:" in err and "Traceback" not in err


def get_json_ring(out: Path, run: str, gid: int) -> list:
    for f in json.loads((out / run / "nuclei.geojson").read_text())["features"]:
        if f["properties"]["label"] == gid:
            return f["geometry"]["coordinates"][0]
    raise AssertionError(gid)


# ---- in a real browser --------------------------------------------------------------------

class _Served:
    """``wsiseg view OUT`` in a process of its own; ``url`` is the page's address."""

    def __init__(self, out: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "wsiseg.cli", "view", str(out), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "http://127.0.0.1:" not in line:
            self.proc.kill()
            raise AssertionError(f"wsiseg view did not start: {line!r} {self.proc.stderr.read()}")
        self.url = "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def served(out):
    """The pages for the browser: ``wsiseg view`` in a process of its own."""
    srv = _Served(out)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set WSISEG_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


# What lies over the tiles but is not the picture: the read-out, the hint, OpenSeadragon's buttons and navigator.
HIDE_PANELS = "#readout, #hint, .openseadragon-container > div:not(.openseadragon-canvas) { visibility: hidden !important; }"


class Page:
    """A page of the viewer with every console error, page error and failed request recorded."""

    def __init__(self, browser, url: str):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"HTTP {r.status}: {r.url}"))
        self.page.goto(url)
        self.settle()

    def settle(self) -> None:
        self.page.wait_for_function("window.wsisegView && window.wsisegView.idle()", timeout=60000, polling=100)

    def show(self, x0, y0, x1, y1) -> None:
        self.page.evaluate(f"wsisegView.show({x0}, {y0}, {x1}, {y1})")
        self.settle()

    def click(self, selector: str) -> None:
        self.page.click(selector)
        self.settle()

    def to_page(self, x: float, y: float) -> tuple[float, float]:
        p = self.page.evaluate(f"wsisegView.toPage({x}, {y})")
        return p["x"], p["y"]

    def viewer_shot(self) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The viewer's pixels (h, w, 3) and the map (page x, y of level-0 (0, 0), screen px per level-0 px)."""
        box = self.page.locator("#viewer").bounding_box()
        png = self.page.screenshot(clip=box, style=HIDE_PANELS)
        (x0, y0), (x1, _) = self.to_page(0, 0), self.to_page(1000, 0)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), (x0 - box["x"], y0 - box["y"], (x1 - x0) / 1000)

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def page(browser, served):
    pg = Page(browser, served.url + "#run=crop")
    yield pg
    pg.close()


def level0_grid(shape: tuple[int, int], where: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x, y of the centre of every screenshot pixel."""
    ox, oy, s = where
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return (xs + 0.5 - ox) / s, (ys + 0.5 - oy) / s


@pytest.mark.slow
def test_page_loads_without_errors_and_shows_the_slide(page, out):
    pg = page.page
    assert pg.locator("#run-picker option").all_inner_texts() == ["crop", "patch"]
    assert "unet-bn" in pg.locator("#summary-model").inner_text()
    summary = json.loads((out / "crop" / "summary.json").read_text())
    mean = summary["cellularity"]["cellularity_lgbm"]["tissue_weighted_mean"]
    assert f"lgbm {mean:.3f}" in pg.locator("#summary-cellularity").inner_text()
    shown_types = {pg.locator(f"#layer-type-{i}").get_attribute("data-type") for i in range(len(summary["instances"]["types"]))}
    assert shown_types == set(summary["instances"]["types"])
    # the screenshot is the slide: the image where the page says it is, at the page's scale
    crop = np.asarray(Image.open(out.parent / "slides" / "crop.tif").convert("RGB"))
    page.click("#layer-nuclei")  # the outlines off: the slide alone
    page.show(0, 0, 1024, 1024)
    shot, where = page.viewer_shot()
    x, y = level0_grid(shot.shape[:2], where)
    inside = (x >= 4) & (y >= 4) & (x < 1020) & (y < 1020)
    assert inside.mean() > 0.3
    ref = crop[y[inside].astype(int), x[inside].astype(int)].astype(np.float32)
    got = shot[inside].astype(np.float32)
    assert np.abs(got - ref).mean() < 12
    assert np.corrcoef(got.mean(1), ref.mean(1))[0, 1] > 0.9
    assert np.std(got.mean(1)) > 20  # tissue, not a blank canvas
    # the plain-image run through the picker
    pg.select_option("#run-picker", "patch")
    page.settle()
    assert "patch.png" in pg.locator("#summary-slide").inner_text()
    page.show(0, 0, 600, 600)
    shot, where = page.viewer_shot()
    x, y = level0_grid(shot.shape[:2], where)
    inside = (x >= 4) & (y >= 4) & (x < 596) & (y < 596)
    img = np.asarray(Image.open(out.parent / "slides" / "patch.png").convert("RGB"))
    got, ref = shot[inside].astype(np.float32), img[y[inside].astype(int), x[inside].astype(int)].astype(np.float32)
    assert np.corrcoef(got.mean(1), ref.mean(1))[0, 1] > 0.9
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.parametrize("run", ["crop", "patch"])
def test_nucleus_overlay_changes_the_pixels_where_the_map_is_high(browser, served, out, run):
    page = Page(browser, served.url + f"#run={run}")
    try:
        s = 1 if run == "crop" else 2
        page.show(0, 0, 300 * s, 300 * s)
        page.click("#layer-nuclei")  # outlines off: only the map differs between the shots
        off, where = page.viewer_shot()
        page.click("#layer-map-0")
        on, where_on = page.viewer_shot()
        assert where == where_on
        x, y = level0_grid(off.shape[:2], where)
        prob = np.asarray(zarr_levels(out, run)[0][0])
        sx, sy = (x / s).astype(int), (y / s).astype(int)
        inside = (sx >= 0) & (sy >= 0) & (sx < prob.shape[1]) & (sy < prob.shape[0])
        v = np.zeros(off.shape[:2], np.uint8)
        v[inside] = prob[sy[inside], sx[inside]]
        k = np.ones((5, 5), np.uint8)
        high = cv2.erode((v >= 200).astype(np.uint8), k).astype(bool) & inside
        low = cv2.erode((v <= 3).astype(np.uint8), k).astype(bool) & inside
        assert high.sum() > 500 and low.sum() > 500
        diff = np.abs(on.astype(int) - off.astype(int)).sum(-1)
        assert diff[high].mean() > 60, diff[high].mean()
        assert diff[low].mean() < 6, diff[low].mean()
        on_red = on[high].astype(int)
        assert (on_red[:, 0] - on_red[:, 1]).mean() > (off[high][:, 0].astype(int) - off[high][:, 1]).mean() + 40
        assert page.errors == []
    finally:
        page.close()


@pytest.mark.slow
def test_pointer_readout_at_a_known_nucleus(page, out):
    gid, sx, sy = known_nucleus(out, "crop")
    page.show(sx - 40, sy - 30, sx + 40, sy + 30)
    px, py = page.to_page(sx + 0.5, sy + 0.5)
    page.page.mouse.move(px, py)
    page.page.wait_for_function(f"document.getElementById('ro-nucleus-id').textContent === '{gid}'", timeout=30000)
    x, y = (int(v) for v in page.page.locator("#ro-xy").inner_text().split(","))
    assert (x, y) == (sx, sy)
    probs = np.asarray(zarr_levels(out, "crop")[0][:, y, x])
    shown = {r.get_attribute("data-channel"): r.locator(".value").inner_text()
             for r in page.page.locator("#ro-prob tr").all()}
    channels = json.loads((out / "crop" / "summary.json").read_text())["channels"]
    assert shown == {c: f"{v / 255:.3f}" for c, v in zip(channels, probs.tolist())}
    assert page.page.locator("#ro-nucleus-type").inner_text() == _type_of(out, "crop", gid)
    assert "um²" in page.page.locator("#ro-nucleus-area").inner_text()
    assert page.page.locator("#ro-cell").inner_text().startswith("lgbm ")
    assert page.errors == []


@pytest.mark.slow
def test_outlines_per_type_and_cellularity_heatmap(page, out):
    gid, sx, sy = known_nucleus(out, "crop")
    page.show(sx - 60, sy - 40, sx + 60, sy + 40)
    assert page.page.locator("#hint").is_hidden()  # close enough: outlines drawn
    with_outlines, where = page.viewer_shot()
    kind = _type_of(out, "crop", gid)  # the known nucleus's type: its toggle turns its outline off
    i = next(i for i in range(8) if page.page.locator(f"#layer-type-{i}").get_attribute("data-type") == kind)
    page.click(f"#layer-type-{i}")
    without, _ = page.viewer_shot()
    changed = np.abs(with_outlines.astype(int) - without.astype(int)).sum(-1) > 60
    assert changed.mean() > 0.002  # the outlines of that type
    ring = np.asarray(get_json_ring(out, "crop", gid))
    ox, oy, s = where
    cx, cy = int(ring[:, 0].mean() * s + ox), int(ring[:, 1].mean() * s + oy)
    assert not changed[cy, cx]  # the inside of a nucleus is not painted, its outline is
    edge = ring[0]
    ex, ey = int(edge[0] * s + ox), int(edge[1] * s + oy)
    assert changed[max(0, ey - 3):ey + 4, max(0, ex - 3):ex + 4].any()
    # the cellularity windows (outlines off): on, every pixel of a scored window changes colour
    page.click("#layer-nuclei")
    page.show(0, 0, 1024, 1024)
    off, where = page.viewer_shot()
    page.click("#layer-cell")
    on, _ = page.viewer_shot()
    x, y = level0_grid(off.shape[:2], where)
    import csv

    rows = list(csv.DictReader(open(out / "crop" / "cellularity.csv")))
    scored = np.zeros(off.shape[:2], bool)
    for r in rows:
        if r["cellularity_lgbm"]:
            wx, wy, ww, wh = (int(r[k]) for k in ("x", "y", "width", "height"))
            scored |= (x >= wx + 4) & (x < wx + ww - 4) & (y >= wy + 4) & (y < wy + wh - 4)
    assert scored.sum() > 1000
    diff = np.abs(on.astype(int) - off.astype(int)).sum(-1)
    assert (diff[scored] > 10).mean() > 0.99
    assert page.page.locator("#cell-bar").is_visible()
    assert page.errors == []
