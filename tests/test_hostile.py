"""Hostile input, as a new user's mistakes bring it: one row per case (issue 19).

Each row builds its inputs in a fresh folder (small TIFFs with tifffile, PNGs with PIL, real
pixels from ../shared/data, small models), runs ``wsiseg`` as a user does, and checks the exit
code, the message and what is left on disk. A new case is one more row in ``CASES``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tests.conftest import REPO, write_png, write_pyramid
from wsiseg.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


class Ctx:
    """A case's folder, inputs and helpers."""

    def __init__(self, tmp: Path, image: np.ndarray, model: Path, capsys, monkeypatch):
        self.tmp, self.image, self.model, self.capsys, self.monkeypatch = tmp, image, model, capsys, monkeypatch
        self.out = tmp / "o"
        self.notes: dict = {}

    def cli(self, *argv) -> Result:
        """``wsiseg ARGV`` in this process (``run`` gets ``-q`` and the tiny model unless given)."""
        argv = [str(a) for a in argv]
        if argv[0] == "run":
            argv.insert(1, "-q")
            if "--model" not in argv:
                argv += ["--model", str(self.model)]
        self.capsys.readouterr()
        code = main(argv)
        cap = self.capsys.readouterr()
        return Result(code, cap.out, cap.err)

    def png(self, name: str, arr: np.ndarray) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_png(p, arr)

    def tree(self, root: Path) -> dict[str, str]:
        """Every file under ``root`` (symlinks as links) -> sha256 of its bytes (or its target)."""
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p.relative_to(root))] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


@dataclass
class Case:
    id: str
    make: Callable[[Ctx], list]  # builds the inputs, returns the argv (or runs a flow: see ``run``)
    code: int
    says: list[str] = field(default_factory=list)  # in stderr (the first line that names the input)
    left: Callable[[Ctx, Result], None] | None = None  # what must (not) be on disk afterwards
    run: Callable[[Ctx], Result] | None = None  # a flow of its own (subprocesses, two runs)


def _map(d: Path) -> np.ndarray:
    return zarr.open_group(str(d / "probabilities.zarr"), mode="r")["0"][:]


def _no_traceback(r: Result) -> None:
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err


def _subprocess_env(ctx: Ctx) -> dict:
    tmpdir = ctx.tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)}


def _wsiseg(ctx: Ctx, *argv, spill_mb: float | None = None) -> subprocess.Popen:
    """``python -m wsiseg.cli ARGV`` as a process of its own (``spill_mb``: the blender spills
    to disk beyond that many MB, 0: every waiting block goes through the spill folder)."""
    code = "import sys, wsiseg.blend as b, wsiseg.cli as c; "
    code += f"b.SPILL_MB = {spill_mb}; " if spill_mb is not None else ""
    code += "sys.exit(c.main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], cwd=ctx.tmp, env=_subprocess_env(ctx),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- 1. --overwrite and foreign files

def _input_inside_output(ctx: Ctx) -> list:
    """A slide at o/case1/case1.tif with a user's file beside it, run with -o o --overwrite."""
    d = ctx.out / "case1"
    d.mkdir(parents=True)
    write_pyramid(d / "case1.tif", ctx.image[:512, :512], 0.5, levels=1)
    (d / "notes.txt").write_text("the pathologist's notes\n")
    (ctx.out / "elsewhere.txt").write_text("beside the run folder\n")
    ctx.notes["before"] = ctx.tree(ctx.out)
    return ["run", d / "case1.tif", "-o", ctx.out, "--overwrite"]


def _foreign_files_untouched(ctx: Ctx, r: Result) -> None:
    assert ctx.tree(ctx.out) == ctx.notes["before"]  # every file, with its bytes; nothing added


def _foreign_beside_output(overwrite: bool):
    def make(ctx: Ctx) -> list:
        img = ctx.png("in/img.png", ctx.image[:300, :300])
        d = ctx.out / "img"
        d.mkdir(parents=True)
        (d / "notes.txt").write_text("mine\n")
        (d / "thumbnail.png").symlink_to(img)  # a wsiseg name, but a link to the user's file
        ctx.notes["before"] = ctx.tree(ctx.out)
        return ["run", img, "--mpp", "0.5", "-o", ctx.out] + (["--overwrite"] if overwrite else [])
    return make


def _overwrite_removes_own_files_only(ctx: Ctx) -> Result:
    """A finished run, then --overwrite with other parameters: wsiseg's files are replaced, the
    files beside the run folder stay."""
    img = ctx.png("in/img.png", ctx.image[:300, :300])
    (ctx.out).mkdir()
    (ctx.out / "mine.txt").write_text("beside\n")
    assert ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out).code == 0
    r = ctx.cli("run", img, "--mpp", "0.5", "--tile", "128", "-o", ctx.out, "--overwrite")
    assert (ctx.out / "mine.txt").read_text() == "beside\n"
    assert json.loads((ctx.out / "img" / "summary.json").read_text())["config"]["tile"] == 128
    return r


# ---------------------------------------------------------------- 2. two runs, one folder

def _holder(ctx: Ctx, folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock (as a running wsiseg run does)."""
    code = ("import sys, time; from wsiseg.run_folder import RunFolder\n"
            "with RunFolder(sys.argv[1], 'x').locked():\n    print('locked', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=_subprocess_env(ctx), stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _locked_folder_is_refused_until_its_holder_dies(ctx: Ctx) -> Result:
    img = ctx.png("in/img.png", ctx.image[:300, :300])
    (ctx.out).mkdir()
    (ctx.out / "mine.txt").write_text("beside\n")
    holder = _holder(ctx, ctx.out / "img")
    try:
        r = ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out, "--overwrite")
        assert f"PID {holder.pid}" in r.err
        assert not (ctx.out / "img" / "summary.json").exists()
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait()
    again = ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out)
    assert again.code == 0, again.err
    assert ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out / "clean").code == 0
    assert np.array_equal(_map(ctx.out / "img"), _map(ctx.out / "clean" / "img"))
    assert (ctx.out / "mine.txt").read_text() == "beside\n"
    return r


def _two_runs_at_once(ctx: Ctx) -> Result:
    """Runs A and B (B with --overwrite) started together on one slide and folder: each ends
    complete or is refused naming the other's PID; the folder ends complete and equal to a
    clean run, and a re-run says so."""
    img = ctx.png("in/img.png", ctx.image[:600, :600])
    ctx.out.mkdir()
    (ctx.out / "mine.txt").write_text("beside\n")
    args = ["run", "-q", img, "--mpp", "0.5", "--model", ctx.model, "-o", ctx.out]
    a, b = _wsiseg(ctx, *args), _wsiseg(ctx, *args, "--overwrite")
    results = [(p, *p.communicate(timeout=600)) for p in (a, b)]
    for p, out, err in results:
        assert p.returncode in (0, 1), err
        assert "Traceback" not in err and "Directory not empty" not in err, err
        if p.returncode == 1:
            other = b if p is a else a
            assert f"in use by another wsiseg run (PID {other.pid}" in err, err
    assert ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.tmp / "clean").code == 0
    assert np.array_equal(_map(ctx.out / "img"), _map(ctx.tmp / "clean" / "img"))
    assert (ctx.out / "mine.txt").read_text() == "beside\n"
    return ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out)


def _summary_of_a_replaced_store_is_not_trusted(ctx: Ctx) -> Result:
    """A complete-looking folder whose store another run re-created after the summary's run
    began (a summary.json with complete: true, a progress.json of another run id): not
    'already complete'; the re-run starts again and equals a clean run."""
    img = ctx.png("in/img.png", ctx.image[:600, :600])
    assert ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.tmp / "clean").code == 0
    assert ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out).code == 0
    d = ctx.out / "img"
    prog = json.loads((d / "progress.json").read_text())
    prog["run_id"], prog["bands_done"] = "another-run", 1
    (d / "progress.json").write_text(json.dumps(prog))
    next(p for p in sorted((d / "probabilities.zarr" / "0" / "0").rglob("*")) if p.is_file()).unlink()  # not whole
    assert json.loads((d / "summary.json").read_text())["complete"] is True
    r = ctx.cli("run", img, "--mpp", "0.5", "-o", ctx.out)
    assert "already complete" not in r.out and "written by two runs" in r.err
    assert np.array_equal(_map(d), _map(ctx.tmp / "clean" / "img"))
    return r


def _run_replaced_mid_way_does_not_mark_complete(ctx: Ctx) -> Result:
    """While run A writes, another run re-creates the store (a new run id in progress.json):
    A stops with a message instead of writing the completion flag or summary.json."""
    from wsiseg.models import load_model
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.predict import Predictor
    from wsiseg.slide import SlideError

    img = ctx.png("in/img.png", ctx.image[:900, :500])
    d = ctx.out / "img"

    def replace_store(n, seen=[0]):
        seen[0] += n
        if seen[0] >= 10:
            # (run B's record must land after the progress records run A's writer thread has
            # queued so far, or A's next record overwrites it: a second process is refused by the
            # folder's lock in real use, so this race exists only in this simulation)
            time.sleep(0.5)
            prog = json.loads((d / "progress.json").read_text())
            if prog.get("run_id") != "run-b":  # (written as run B would: a file of its own, renamed)
                (d / "b.tmp").write_text(json.dumps({**prog, "run_id": "run-b"}))
                os.replace(d / "b.tmp", d / "progress.json")

    pred = Predictor(load_model(ctx.model), "cpu")
    with pytest.raises(SlideError, match="another run re-created this output") as e:
        run_slide(img, d, pred, RunConfig.of(mpp=0.5, chunk=128, tissue=False), progress=replace_store)
    assert not (d / "summary.json").exists()
    assert not zarr.open_group(str(d / "probabilities.zarr"), mode="r").attrs["wsiseg"]["complete"]
    return Result(1, "", str(e.value))


# ---------------------------------------------------------------- 3. resolution

def _tiff_claiming(mpp: float, size: int = 256):
    def make(ctx: Ctx) -> list:
        p = write_pyramid(ctx.tmp / "claims.tif", ctx.image[:size, :size], mpp, levels=1)
        return ["run", p, "-o", ctx.out]
    return make


def _png_with_mpp(mpp: float):
    def make(ctx: Ctx) -> list:
        return ["run", ctx.png("patch.png", ctx.image[:256, :256]), "--mpp", mpp, "-o", ctx.out]
    return make


def _nothing_written(ctx: Ctx, r: Result) -> None:
    assert not ctx.out.exists()


def _override_is_used_and_recorded(ctx: Ctx, r: Result) -> None:
    s = json.loads((ctx.out / "claims" / "summary.json").read_text())
    assert (s["slide_mpp"], s["file_mpp"], s["slide_mpp_source"]) == (0.5, pytest.approx(300), "--mpp-override")
    assert s["shape"] == [256, 256]


# ---------------------------------------------------------------- 4. decompression bombs

def _png_bomb(ctx: Ctx) -> list:
    """A 12,000 x 12,000 single-colour grayscale PNG (140 KB; 432 MB as RGB), written chunk
    by chunk with zlib (never held as pixels)."""
    w = h = 12000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(6)
    row = b"\0" + b"\xf0" * w  # filter byte, then the row
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    p = ctx.tmp / "bomb.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                  + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    assert p.stat().st_size < 200_000
    ctx.notes["pil_limit"] = Image.MAX_IMAGE_PIXELS
    return ["run", p, "--mpp", "0.5", "-o", ctx.out]


def _bomb_left(ctx: Ctx, r: Result) -> None:
    assert not ctx.out.exists()
    assert Image.MAX_IMAGE_PIXELS == ctx.notes["pil_limit"]  # PIL's own limit is left as it was


def _no_decode_before_mpp_check(ctx: Ctx) -> list:
    from wsiseg.slide import ImageReader

    def no_decoding(self):
        raise AssertionError("decoded before the checks that need no pixels")

    ctx.monkeypatch.setattr(ImageReader, "_decode", no_decoding)
    return ["run", ctx.png("patch.png", ctx.image[:400, :400]), "-o", ctx.out]


def _striped_tiff(rows: int):
    def make(ctx: Ctx) -> list:
        img = ctx.image[:700, :600]
        p = ctx.tmp / "striped.tif"
        tifffile.imwrite(p, img, photometric="rgb", rowsperstrip=rows, compression="zlib",
                         resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        return ["run", p, "-o", ctx.out, "--max-image-pixels", 100_000, "--no-tissue-mask"]
    return make


def _striped_tiff_equals_whole_read(ctx: Ctx, r: Result) -> None:
    """Read strip by strip (over the limit) it gives the same map as decoded whole (under it)."""
    from wsiseg.slide import TiffReader, open_slide

    assert isinstance(open_slide(ctx.tmp / "striped.tif", max_image_pixels=100_000), TiffReader)
    assert ctx.cli("run", ctx.tmp / "striped.tif", "-o", ctx.tmp / "whole", "--no-tissue-mask").code == 0
    assert np.array_equal(_map(ctx.out / "striped"), _map(ctx.tmp / "whole" / "striped"))


# ---------------------------------------------------------------- 5. image modes

def _gray_pngs(ctx: Ctx) -> list:
    gray = cv2.cvtColor(np.ascontiguousarray(ctx.image[:400, :400]), cv2.COLOR_RGB2GRAY)
    ctx.png("gray8/g.png", gray)
    ctx.png("gray16/g.png", gray.astype(np.uint16) * 257)  # the same picture at 16 bits (mode I;16)
    assert Image.open(ctx.tmp / "gray16" / "g.png").mode == "I;16"
    return ["run", ctx.tmp / "gray16" / "g.png", "--mpp", "0.5", "--no-tissue-mask", "-o", ctx.out]


def _gray16_equals_gray8(ctx: Ctx, r: Result) -> None:
    from wsiseg.slide import open_slide

    pixels = [open_slide(ctx.tmp / d / "g.png", 0.5).read_region((0, 0), 0, (400, 400)) for d in ("gray8", "gray16")]
    assert np.array_equal(*pixels) and pixels[0].std() > 10  # the picture, not a blank
    assert ctx.cli("run", ctx.tmp / "gray8" / "g.png", "--mpp", "0.5", "--no-tissue-mask",
                   "-o", ctx.tmp / "o8").code == 0
    assert np.array_equal(_map(ctx.out / "g"), _map(ctx.tmp / "o8" / "g"))


def _float_tiff(ctx: Ctx) -> list:
    p = ctx.tmp / "float.tif"
    Image.fromarray(ctx.image[:200, :200, 0].astype(np.float32) / 255).save(p)
    return ["run", p, "--mpp", "0.5", "-o", ctx.out]


# ---------------------------------------------------------------- 6. bad model files

def _bad_model(kind: str):
    def make(ctx: Ctx) -> list:
        import torch

        from wsiseg.models.registry import build_model, save_model

        meta = json.loads(ctx.model.with_suffix(".json").read_text())
        m = ctx.tmp / "models" / f"{kind}.safetensors"
        m.parent.mkdir()
        if kind == "truncated":
            m.write_bytes(ctx.model.read_bytes()[: ctx.model.stat().st_size // 2])
        elif kind == "pickle":
            torch.save(build_model("unet_bn", base=4, depth=2).state_dict(), m)  # a pickle, renamed

            def never(*a, **k):
                raise AssertionError("a pickle was loaded")

            ctx.monkeypatch.setattr(torch, "load", never)
            ctx.monkeypatch.setattr("pickle.load", never)
            ctx.monkeypatch.setattr("pickle.loads", never)
        elif kind == "architecture":
            m.write_bytes(ctx.model.read_bytes())
            meta["arch_kwargs"] = {"base": 8, "depth": 2}  # the weights are of base 4
        elif kind == "classes":  # the architecture of the weights, but 1 class for their 5 channels
            meta["arch_kwargs"] = {"base": 4, "depth": 2, "out_channels": 5}
            save_model(build_model("unet_bn", **meta["arch_kwargs"]).eval(), meta, m)
        if kind != "classes":
            m.with_suffix(".json").write_text(json.dumps(meta))
        return ["run", ctx.png("patch.png", ctx.image[:300, :300]), "--mpp", "0.5", "--model", m, "-o", ctx.out]
    return make


def _one_line_and_nothing_written(ctx: Ctx, r: Result) -> None:
    assert len([line for line in r.err.splitlines() if "error" in line]) == 1, r.err
    assert not ctx.out.exists()


# ---------------------------------------------------------------- 7. SIGTERM

def _sigterm_then_resume(ctx: Ctx) -> Result:
    """SIGTERM mid-run: the message, exit 143, no spill folder in the run folder or the temp
    folder, no summary; the same command then resumes and equals a clean run."""
    img = ctx.png("in/wide.png", np.ascontiguousarray(np.tile(ctx.image, (2, 1, 1))[:1300, :300]))  # 3 bands
    args = ["run", "-q", img, "--mpp", "0.5", "--model", ctx.model, "--batch-size", "1", "--no-tissue-mask",
            "--no-cellularity", "-o", ctx.out]
    d = ctx.out / "wide"
    p = _wsiseg(ctx, *args, spill_mb=0)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        prog = d / "progress.json"
        try:
            done = json.loads(prog.read_text())["bands_done"] if prog.exists() else 0
        except (ValueError, KeyError):
            done = 0
        if done >= 1 and list(d.glob("wsiseg-blend-*")):
            break
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    r = Result(p.returncode, out, err)
    assert not list(d.glob("wsiseg-blend-*")) and not list((ctx.tmp / "tmpdir").glob("wsiseg-blend-*"))
    assert not (d / "summary.json").exists()
    done = json.loads((d / "progress.json").read_text())["bands_done"]
    assert 1 <= done < 3
    resumed = _wsiseg(ctx, *args)
    out2, err2 = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "(resumed)" in out2, err2
    clean = ctx.cli("run", img, "--mpp", "0.5", "--batch-size", "1", "--no-tissue-mask", "--no-cellularity",
                    "-o", ctx.tmp / "clean")
    assert clean.code == 0
    assert np.array_equal(_map(d), _map(ctx.tmp / "clean" / "wide"))
    return r


# ---------------------------------------------------------------- 8. wsiseg models

def _models_listing(ctx: Ctx) -> Result:
    r = ctx.cli("models")
    seg, _, reg = r.out.partition("cellularity regressors")
    assert "segmentation models" in seg and "unet-bn-nuclei-classes-20x" in seg and "cellularity-" not in seg
    assert "cellularity-lgbm-proxy: --lgbm" in reg and "cellularity-cnn-proxy: --cnn" in reg
    missing = ctx.cli("run", ctx.png("p.png", ctx.image[:100, :100]), "--mpp", "0.5", "--model", "no-such", "-o",
                      ctx.out)
    assert missing.code == 2 and "no-such" in missing.err and "cellularity-" not in missing.err
    return r


def _regressor_as_model(ctx: Ctx) -> list:
    return ["run", ctx.png("p.png", ctx.image[:100, :100]), "--mpp", "0.5", "--model", "cellularity-cnn-proxy",
            "-o", ctx.out]


# ---------------------------------------------------------------- 9. cellularity predict

def _predict_batch_with_bad_files(ctx: Ctx) -> list:
    d = ctx.tmp / "patches"
    ctx.png("patches/99788_1.png", ctx.image[:256, :256])
    ctx.png("patches/99788_2.png", ctx.image[300:556, 300:556])
    (d / "notes.png").write_text("not an image\n")
    full = (d / "99788_1.png").read_bytes()
    (d / "cut.png").write_bytes(full[: len(full) // 3])
    ctx.notes["bad"] = [d / "notes.png", d / "cut.png", ctx.tmp / "missing.png"]
    return ["cellularity", "predict", d, ctx.tmp / "missing.png", "--mpp", "0.5", "-q", "-o", ctx.tmp / "pred.csv"]


def _good_rows_written_every_bad_named(ctx: Ctx, r: Result) -> None:
    import csv

    rows = list(csv.DictReader((ctx.tmp / "pred.csv").open()))
    assert sorted(row["image"] for row in rows) == ["99788_1.png", "99788_2.png"]
    assert all(0 <= float(row["lgbm"]) <= 1 and 0 <= float(row["cnn"]) <= 1 for row in rows)
    for p in ctx.notes["bad"]:
        assert str(p) in r.err
    assert "3 input(s) failed" in r.err


# ---------------------------------------------------------------- 10. symlink loop

def _folder_with_a_link_loop(ctx: Ctx) -> list:
    d = ctx.tmp / "slides"
    ctx.png("slides/good.png", ctx.image[:300, :300])
    (d / "loop.png").symlink_to("loop.png")
    (d / "a.tif").symlink_to("b.tif")
    (d / "b.tif").symlink_to("a.tif")
    return ["run", d, "--mpp", "0.5", "-o", ctx.out]


def _good_one_processed(ctx: Ctx, r: Result) -> None:
    assert json.loads((ctx.out / "good" / "summary.json").read_text())["complete"] is True
    assert r.err.count("symbolic link loop") == 3 and "3 input(s) failed" in r.err


CASES = [
    # 1. --overwrite deletes only what wsiseg wrote; a folder with anything else is refused
    Case("overwrite-input-inside-output", _input_inside_output, 1, ["holds the input itself", "-o"],
         _foreign_files_untouched),
    Case("foreign-files-without-overwrite", _foreign_beside_output(False), 1,
         ["wsiseg did not write (notes.txt, thumbnail.png)", "move them away"], _foreign_files_untouched),
    Case("foreign-files-with-overwrite", _foreign_beside_output(True), 1,
         ["wsiseg did not write (notes.txt, thumbnail.png)", "not even with --overwrite"], _foreign_files_untouched),
    Case("overwrite-removes-own-files-only", None, 0, run=_overwrite_removes_own_files_only),
    # 2. one run at a time per folder; a summary of a replaced store is not trusted
    Case("locked-folder", None, 1, ["is in use by another wsiseg run (PID"],
         run=_locked_folder_is_refused_until_its_holder_dies),
    Case("two-runs-at-once", None, 0, run=_two_runs_at_once),
    Case("stale-summary", None, 0, run=_summary_of_a_replaced_store_is_not_trusted),
    Case("replaced-mid-way", None, 1, ["another run re-created this output", "without marking it complete"],
         run=_run_replaced_mid_way_does_not_mark_complete),
    # 3. absurd resampling refused; --mpp-override replaces a file's resolution
    Case("tiff-claims-300-um", _tiff_claiming(300), 1,
         ["the file says 300 um/px", "model works at 0.5 um/px", "153600 x 153600 px map", "--mpp-override"],
         _nothing_written),
    Case("tiff-claims-0.0001-um", _tiff_claiming(0.0001), 1, ["the file says 0.0001 um/px", "1 x 1 px map",
                                                              "--mpp-override"], _nothing_written),
    Case("png-mpp-50", _png_with_mpp(50), 1, ["--mpp gives 50 um/px", "enlarged 100x", "check --mpp"],
         _nothing_written),
    Case("png-mpp-0.001", _png_with_mpp(0.001), 1, ["--mpp gives 0.001 um/px", "shrunk 500x"], _nothing_written),
    Case("mpp-override", lambda ctx: _tiff_claiming(300)(ctx) + ["--mpp-override", "0.5"], 0, [],
         _override_is_used_and_recorded),
    # 4. decompression bombs and big plain images
    Case("png-bomb", _png_bomb, 1, ["12000 x 12000 px PNG", "decoded whole", "--max-image-pixels"], _bomb_left),
    Case("mpp-check-before-decoding", _no_decode_before_mpp_check, 1, ["does not say its resolution", "--mpp"],
         _nothing_written),
    Case("big-striped-tiff-read-in-pieces", _striped_tiff(16), 0, [], _striped_tiff_equals_whole_read),
    Case("big-single-strip-tiff", _striped_tiff(700), 1, ["stored in pieces of 600 x 700 px", "--max-image-pixels"],
         _nothing_written),
    # 5. every image mode converted or refused
    Case("gray16-png", _gray_pngs, 0, [], _gray16_equals_gray8),
    Case("float-tiff", _float_tiff, 1, ["image mode F (32-bit float grayscale) is not supported"], _nothing_written),
    # 6. bad model files: one line, before any output
    Case("model-truncated", _bad_model("truncated"), 2, ["truncated.safetensors: not a readable safetensors file"],
         _one_line_and_nothing_written),
    Case("model-pickle-renamed", _bad_model("pickle"), 2, ["pickle.safetensors: not a readable safetensors file",
                                                           "never unpickles"], _one_line_and_nothing_written),
    Case("model-architecture-mismatch", _bad_model("architecture"), 2,
         ["architecture.safetensors: the weights do not fit", "is [4, 3, 3, 3] in the file and [8, 3, 3, 3]"],
         _one_line_and_nothing_written),
    Case("model-1-class-5-channels", _bad_model("classes"), 2,
         ["classes.safetensors: the network gives 5 channel(s) but the sidecar lists 1 class"],
         _one_line_and_nothing_written),
    Case("model-is-a-regressor", _regressor_as_model, 2, ["is a cellularity regressor", "--lgbm or --cnn"],
         _one_line_and_nothing_written),
    # 7. SIGTERM
    Case("sigterm", None, 143, ["interrupted: re-run the same command to resume"], run=_sigterm_then_resume),
    # 8. wsiseg models
    Case("models-listing", None, 0, run=_models_listing),
    # 9. cellularity predict scores the good files of a batch
    Case("cellularity-predict-bad-files", _predict_batch_with_bad_files, 1,
         ["notes.png: not a slide or image", "cut.png:", "missing.png: no such file"],
         _good_rows_written_every_bad_named),
    # 10. symlink loops reported
    Case("symlink-loop-in-folder", _folder_with_a_link_loop, 1, ["loop.png: symbolic link loop"], _good_one_processed),
]
SLOW = {"two-runs-at-once", "sigterm", "cellularity-predict-bad-files"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW else [])
                                  for c in CASES])
def test_hostile(case: Case, tmp_path, monuseg_image, tiny_unet_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, monuseg_image, tiny_unet_path, capsys, monkeypatch)
    r = case.run(ctx) if case.run else ctx.cli(*case.make(ctx))
    assert r.code == case.code, r.err
    _no_traceback(r)
    for s in case.says:
        assert s in r.err, f"{s!r} not in {r.err!r}"
    if case.left:
        case.left(ctx, r)


def test_only_the_blenders_own_spill_folders_count_as_wsiseg_s(tmp_path):
    """A spill folder is wsiseg's (removed by --overwrite and on resume) only when the blender
    made it: mkdtemp's name under the prefix, holding nothing but spilled blocks."""
    import tempfile

    from wsiseg.run_folder import SPILL_PREFIX, is_own

    spill = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=tmp_path))
    (spill / "3-0.f32").write_bytes(b"\0" * 16)
    assert is_own(spill)
    (spill / "notes.txt").write_text("a user's file")
    assert not is_own(spill)
    user = tmp_path / (SPILL_PREFIX + "photos")
    user.mkdir()
    assert not is_own(user)
