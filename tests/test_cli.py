"""`wsiseg run` end to end: the sample slide, folders, and every kind of bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tests.conftest import SAMPLE_SVS, write_png
from wsiseg.cli import main


def run_cli(*args, capsys=None):
    code = main(["run", "-q", *map(str, args)])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_bad_inputs_get_clear_messages_and_good_ones_still_run(tmp_path, monuseg_image, tiny_unet_path, capsys):
    good = write_png(tmp_path / "good.png", monuseg_image[:300, :300])
    missing = tmp_path / "missing.svs"
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n" * 50)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(SAMPLE_SVS.read_bytes()[: SAMPLE_SVS.stat().st_size // 3])
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    code, res = run_cli(missing, text, truncated, empty, good, "--mpp", "0.5", "--model", tiny_unet_path, "-o", out,
                        capsys=capsys)
    assert code == 1
    err = res.err
    assert "Traceback" not in err and "Traceback" not in res.out
    assert f"{missing}: no such file" in err
    assert f"{text}: not a slide or image" in err
    assert f"{truncated}:" in err and ("damaged" in err or "truncated" in err or "not a slide" in err)
    assert f"{empty}: the file is empty" in err
    assert "4 input(s) failed" in err
    # the good input was processed completely, and no failed input left a complete-looking output
    assert json.loads((out / "good" / "summary.json").read_text())["complete"] is True
    for name in ("missing", "notes", "truncated", "empty"):
        assert not (out / name / "summary.json").exists()


def test_no_tissue_writes_an_empty_result(tmp_path, tiny_unet_path, capsys):
    blank = write_png(tmp_path / "glass.png", np.full((400, 500, 3), 242, np.uint8))
    code, res = run_cli(blank, "--mpp", "0.5", "--model", tiny_unet_path, "-o", tmp_path / "out", capsys=capsys)
    assert code == 0
    assert "no tissue" in res.err and "glass.png" in res.err
    s = json.loads((tmp_path / "out" / "glass" / "summary.json").read_text())
    assert s["status"] == "no_tissue" and s["tiles_with_tissue"] == 0 and s["complete"]
    m = zarr.open_group(str(tmp_path / "out" / "glass" / "probabilities.zarr"), mode="r")["0"]
    assert m.shape == (1, 400, 500) and int(m[:].max()) == 0


def test_image_smaller_than_a_tile_is_padded_and_processed(tmp_path, monuseg_image, tiny_unet_path, capsys):
    small = write_png(tmp_path / "tiny.png", monuseg_image[:90, :70])
    code, _ = run_cli(small, "--mpp", "0.5", "--model", tiny_unet_path, "-o", tmp_path / "out", capsys=capsys)
    assert code == 0
    m = zarr.open_group(str(tmp_path / "out" / "tiny" / "probabilities.zarr"), mode="r")["0"][:]
    assert m.shape == (1, 90, 70) and m.max() > 0


def test_plain_image_without_mpp_is_an_error_that_says_so(tmp_path, monuseg_image, tiny_unet_path, capsys):
    p = write_png(tmp_path / "patch.png", monuseg_image[:200, :200])
    code, res = run_cli(p, "--model", tiny_unet_path, "-o", tmp_path / "out", capsys=capsys)
    assert code == 1 and "patch.png" in res.err and "--mpp" in res.err


def test_folder_input_and_rerun_skips_finished_work(tmp_path, monuseg_image, tiny_unet_path, capsys):
    d = tmp_path / "slides"
    d.mkdir()
    write_png(d / "a.png", monuseg_image[:300, :260])
    write_png(d / "b.png", monuseg_image[300:600, :260])
    (d / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    code, res = run_cli(d, "--mpp", "0.5", "--model", tiny_unet_path, "-o", out, capsys=capsys)
    assert code == 0 and (out / "a" / "summary.json").exists() and (out / "b" / "summary.json").exists()
    code, res = run_cli(d, "--mpp", "0.5", "--model", tiny_unet_path, "-o", out, capsys=capsys)
    assert code == 0 and res.out.count("already complete") == 2
    # other parameters into the same folder: refused unless --overwrite
    code, res = run_cli(d / "a.png", "--mpp", "0.5", "--tile", "128", "--model", tiny_unet_path, "-o", out, capsys=capsys)
    assert code == 1 and "--overwrite" in res.err
    code, res = run_cli(d / "a.png", "--mpp", "0.5", "--tile", "128", "--model", tiny_unet_path, "-o", out,
                        "--overwrite", capsys=capsys)
    assert code == 0
    assert json.loads((out / "a" / "summary.json").read_text())["config"]["tile"] == 128


def test_unknown_model_is_a_usage_error(tmp_path, capsys):
    code, res = run_cli(SAMPLE_SVS, "--model", "no-such-model", "-o", tmp_path, capsys=capsys)
    assert code == 2 and "no-such-model" in res.err and "not found" in res.err


@pytest.mark.slow
def test_sample_slide_end_to_end_with_the_shipped_model(tmp_path):
    """The README's command, as a user runs it, in a subprocess."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "wsiseg.cli", "run", "--sample", "-o", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    assert "CMU-1-Small-Region.svs:" in p.stdout and "tiles/s" in p.stdout
    d = out / "CMU-1-Small-Region"
    s = json.loads((d / "summary.json").read_text())
    assert s["complete"] and s["tiles_with_tissue"] > 100 and s["tiles_per_second"] > 0
    assert 0.2 < s["tissue_fraction"] < 0.7
    g = zarr.open_group(str(d / "probabilities.zarr"), mode="r")
    ms = g.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert g.attrs["omero"]["channels"][0]["label"] == "nucleus"
    w = g.attrs["wsiseg"]
    assert w["complete"] and w["mpp"] == pytest.approx(0.499) and w["tile"] == 256 and w["overlap"] == 0.5
    assert w["scale_from_level0"] == pytest.approx(1.0) and w["model"]
    lv0 = g["0"]
    assert lv0.shape == (5, 2967, 2220) and lv0.dtype == np.uint8  # nucleus + N, L, M, B
    assert len(ms["datasets"]) >= 3 and g["1"].shape == (5, 1484, 1110)
    m = lv0[0]
    nuclei = m > 127
    # real nuclei: a plausible share of the tissue, in many separate blobs
    import cv2

    tissue = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(d / "tissue.png").resize((2220, 2967))) > 0
    frac = nuclei[tissue].mean()
    assert 0.03 < frac < 0.6, frac
    n_blobs = cv2.connectedComponents(nuclei.astype(np.uint8))[0] - 1
    assert n_blobs > 500, n_blobs


def test_truncated_pyramidal_tiff_is_reported(tmp_path, monuseg_image, tiny_unet_path, capsys):
    from tests.conftest import write_pyramid

    full = write_pyramid(tmp_path / "full.tif", np.ascontiguousarray(np.tile(monuseg_image, (2, 2, 1))), 0.25, 3)
    data = full.read_bytes()
    bad = []
    for frac in (0.3, 0.95):
        p = tmp_path / f"cut{int(frac * 100)}.tif"
        p.write_bytes(data[: int(len(data) * frac)])
        bad.append(p)
    code, res = run_cli(*bad, "--model", tiny_unet_path, "-o", tmp_path / "out", capsys=capsys)
    assert code == 1 and "Traceback" not in res.err
    for p in bad:
        line = next(ln for ln in res.err.splitlines() if str(p) in ln)
        assert "damaged" in line or "truncated" in line, line
        assert not (tmp_path / "out" / p.stem / "summary.json").exists()


def test_run_flags_are_read_into_the_run_config_by_its_table():
    """``wsiseg run``'s flags come from wsiseg.config's table, and every one lands in its field
    (inverted flags, 'none' words and auto/on/off included); no flag means the field's default."""
    from wsiseg.cli import build_parser
    from wsiseg.config import MAP_FIELDS, RunConfig

    parse = build_parser().parse_args
    assert RunConfig.from_args(parse(["run", "x.svs"])) == RunConfig()
    args = parse(["run", "x.svs", "--tile", "128", "--overlap", "0.25", "--window", "flat", "--mpp", "0.25",
                  "--mpp-override", "0.5", "--no-tissue-mask", "--max-rescale", "4", "--max-image-pixels", "100",
                  "--batch-size", "3", "--workers", "1", "--blend-thread", "on", "--blend-on-device",
                  "--stain", "macenko", "--stain-target", "t.png", "--no-clahe", "--no-cellularity",
                  "--cell-window", "256", "--cell-stride", "128", "--cell-min-tissue", "0.1", "--lgbm", "none",
                  "--cnn", "my.safetensors", "--instances", "--overwrite"])
    assert RunConfig.from_args(args) == RunConfig.of(
        tile=128, overlap=0.25, window="flat", mpp=0.25, mpp_override=0.5, tissue=False, max_rescale=4.0,
        max_image_pixels=100, batch_size=3, workers=1, blend_thread=True, blend_on_device=True, stain="macenko",
        stain_target="t.png", clahe=False, cellularity=False, cell_window=256, cell_stride=128,
        cell_min_tissue=0.1, lgbm=None, cnn="my.safetensors", instances=True, overwrite=True)
    off = RunConfig.from_args(parse(["run", "x.svs", "--blend-thread", "off", "--clahe"]))
    assert off.engine.blend_thread is False and off.stain.clahe is True
    # one part per concern; flat option names in and out, in table order
    cfg = RunConfig.from_args(args)
    assert (cfg.tiling.tile, cfg.limits.max_rescale, cfg.engine.batch_size, cfg.stain.method, cfg.stain.target,
            cfg.cellularity.enabled, cfg.cellularity.window, cfg.instances.enabled, cfg.output.overwrite) == (
        128, 4.0, 3, "macenko", "t.png", False, 256, True, True)
    assert RunConfig.of(**cfg.flat()) == cfg and list(cfg.flat()) == list(RunConfig.options())
    assert cfg.cellularity.regressors() == {} and RunConfig().cellularity.regressors() == {
        "lgbm": "cellularity-lgbm-proxy", "cnn": "cellularity-cnn-proxy"}
    assert cfg.replace(tile=64).tiling.tile == 64 and cfg.replace(tile=64).engine == cfg.engine
    with pytest.raises(TypeError, match="unknown option"):
        RunConfig.of(cell_windw=256)
    with pytest.raises(TypeError, match="no truth value"):
        bool(cfg.cellularity)  # `if cfg.cellularity:` would always be true
    # the resume check compares the whole tiling concern
    cfg = RunConfig.of(tile=128)
    assert tuple(cfg.part("tiling")) == MAP_FIELDS == (
        "tile", "overlap", "window", "chunk", "mpp", "mpp_override", "thumbnail_size", "tissue")
    assert cfg.part("tiling")["tile"] == 128 and "batch_size" in cfg.part("engine")
    with pytest.raises(ValueError, match="unknown concern"):
        cfg.part("speed")
