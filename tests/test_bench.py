"""`wsiseg bench` runs every stage on a small real-pixel slide and reports them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import write_pyramid
from wsiseg.cli import main


@pytest.mark.slow
def test_bench_reports_every_stage(tmp_path, monuseg_image, tiny_unet_path, capsys):
    slide = write_pyramid(tmp_path / "s.tif", np.ascontiguousarray(np.tile(monuseg_image, (2, 2, 1))), 0.25, 2)
    out = tmp_path / "bench.json"
    code = main(["bench", str(slide), "--model", str(tiny_unet_path), "--device", "cpu", "--in-process",
                 "--model-seconds", "1", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    for st in ("read_only", "model_only", "blend_write_only", "end_to_end"):
        assert r[f"{st}_tiles_per_second"] > 0, st
        assert r["stages"][st]["tiles"] > 0
    # the tiny model has no class channels: the features stage says so and reports no number
    assert r["features_patches_per_second"] is None
    assert "no normal" in r["stages"]["features"]["status"]
    assert r["stages"]["end_to_end"]["tiles"] == r["stages"]["read_only"]["tiles"]
    # read_only reads as the pipeline does: pieces of the bands' rows, fewer pixels than the
    # tiles' own area (tiles overlap), and every stage says how much CPU it used
    ro = r["stages"]["read_only"]
    assert ro["read_mode"] == "pieces" and 0 < ro["pixels_read_per_tile"] < 256 * 256
    for st in ("read_only", "model_only", "blend_write_only", "end_to_end"):
        assert r["stages"][st]["cpu_seconds"] > 0 and r["stages"][st]["cpu_ms_per_tile"] > 0
    assert "passthrough" in r["stages"]["blend_write_only"]["model"]
    assert "end_to_end" in capsys.readouterr().out
