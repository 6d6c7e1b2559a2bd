"""The predictor's speed-ups keep the network's outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.models.registry import build_model
from wsiseg.predict import Predictor, fold_batchnorm


def test_batchnorm_folding_keeps_outputs(monuseg_image):
    torch.manual_seed(0)
    net = build_model("unet_bn", base=8, depth=3)
    net.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            net(torch.randn(2, 3, 64, 64) * 2 + 0.5)
    net.eval()
    x = torch.from_numpy(monuseg_image[:128, :128].copy()).permute(2, 0, 1)[None].float() / 255
    folded = fold_batchnorm(net)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0  # original untouched
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), net(x).numpy(), atol=1e-4, rtol=1e-4)


def _tensor_path(pred, tiles):
    """The predictor's earlier CPU path, tensor ops throughout: the reference for its outputs."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float()
        x = (x - pred._mean) / pred._std
        logits = pred.net(x).float()
        probs = torch.softmax(logits, 1) if pred.model.activation == "softmax" else torch.sigmoid(logits)
        return x, probs.contiguous().numpy()


def test_normalisation_and_outputs_are_bit_identical_to_the_tensor_path(monuseg_image, tiny_unet_path):
    """The table look-up normalisation gives the tensor ops' float32 bits for every byte value and
    channel, in the same channels_last layout; probabilities, and probabilities x window into a
    given buffer, equal the tensor path's (and its product with the window) bit for bit."""
    from wsiseg.blend import window
    from wsiseg.models.registry import load_model
    from wsiseg.predict import Predictor

    pred = Predictor(load_model(tiny_unet_path), "cpu", threads=1)
    every = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None, None].repeat(2, axis=1)  # (1, 2, 256, 3)
    ref = (torch.from_numpy(every).permute(0, 3, 1, 2).float() - pred._mean) / pred._std
    got = torch.from_numpy(pred.normalise(every)).permute(0, 3, 1, 2)
    assert torch.equal(got, ref) and got.stride() == ref.stride()
    tiles = np.stack([monuseg_image[y : y + 64, x : x + 64] for y, x in [(0, 0), (300, 500), (936, 936)]])
    x_ref, p_ref = _tensor_path(pred, tiles)
    x = torch.from_numpy(pred.normalise(tiles)).permute(0, 3, 1, 2)
    assert torch.equal(x, x_ref) and x.stride() == x_ref.stride()
    p = pred(tiles)
    assert p.shape == (3, 1, 64, 64) and p.dtype == np.float32 and p.flags.c_contiguous
    np.testing.assert_array_equal(p.view(np.uint32), p_ref.view(np.uint32))
    w = window(64)
    out = np.full((3, 1, 64, 64), np.nan, np.float32)
    assert pred(tiles, weight=w, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint32), (p_ref * w).view(np.uint32))
    with pytest.raises(ValueError, match="out must be"):
        pred(tiles, out=np.empty((3, 2, 64, 64), np.float32))


def test_a_map_repeated_over_classes_gets_its_activation_once(monuseg_image):
    """A network whose output is one map expanded over the classes (stride 0, as the I/O
    benchmark's stand-in): every class gets sigmoid(map), as computing it per class would give."""
    from wsiseg.bench import identity_model
    from wsiseg.blend import window
    from wsiseg.models.registry import LoadedModel
    from wsiseg.predict import Predictor

    meta = {"id": "three", "architecture": "test", "classes": ["a", "b", "c"], "mpp": 0.5, "activation": "sigmoid",
            "normalization": {"mean": [0.6, 0.5, 0.7], "std": [0.2, 0.2, 0.15]}, "input_multiple": 1}
    pred = Predictor(identity_model(LoadedModel(torch.nn.Identity(), meta)), "cpu", threads=1)
    tiles = np.stack([monuseg_image[:64, :64], monuseg_image[500:564, 200:264]])
    x, _ = _tensor_path(pred, tiles)
    green = torch.sigmoid(x[:, 1:2].contiguous()).numpy()
    p = pred(tiles)
    assert p.shape == (2, 3, 64, 64)
    for c in range(3):
        np.testing.assert_array_equal(p[:, c : c + 1], green)
    np.testing.assert_array_equal(pred(tiles, weight=window(64)), np.broadcast_to(green * window(64), p.shape))


def test_an_error_in_the_tile_loop_stops_the_readers_before_the_slide_closes(tmp_path):
    """A failing batch surfaces as the caller's exception; the reader threads are stopped and
    joined first (OpenSlide aborts the process when a handle is closed under a running read)."""
    import threading

    from tests.conftest import SAMPLE_SVS
    from wsiseg.bench import identity_model
    from wsiseg.models.registry import load_model
    from wsiseg.pipeline import RunConfig, run_slide
    from wsiseg.predict import Predictor

    pred = Predictor(identity_model(load_model()), "cpu", threads=1)
    calls = {"n": 0}
    inner = pred.probabilities  # what the tile loop calls on the CPU

    class Failing(Predictor):
        def probabilities(self, tiles):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("batch 3 failed")
            return inner(tiles)

    pred.__class__ = Failing
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        run_slide(SAMPLE_SVS, tmp_path / "out", pred,
                  RunConfig.of(batch_size=4, workers=2, cellularity=False))
    assert calls["n"] == 3
    assert not [t for t in threading.enumerate() if t.name == "wsiseg-reader" and t.is_alive()]


def test_blending_in_a_thread_gives_the_same_bytes_and_surfaces_its_errors(tmp_path, monuseg_image, tiny_unet_path):
    """Blending batch n in the blend thread while batch n + 1 is inferred writes the same bytes as
    blending in the loop; an error raised in the blend thread reaches the caller, and neither
    blend nor reader threads are left running."""
    import threading

    import zarr

    from tests.conftest import write_png
    from wsiseg.blend import ChunkBlender
    from wsiseg.models.registry import load_model
    from wsiseg.pipeline import RunConfig, run_slide

    img = write_png(tmp_path / "img.png", monuseg_image[:700, :900])
    pred = Predictor(load_model(tiny_unet_path), "cpu", threads=1)
    maps = {}
    for threaded, on_device in ((True, False), (False, False), (True, True), (False, True)):
        cfg = RunConfig.of(mpp=0.5, chunk=128, tissue=False, batch_size=3, cellularity=False, blend_thread=threaded,
                        blend_on_device=on_device)
        res = run_slide(img, tmp_path / f"out-{threaded}-{on_device}", pred, cfg)
        assert res.status == "ok"
        g = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")
        maps[threaded, on_device] = [g[k][:] for k in sorted(g.array_keys())]
    ref = maps[False, False]
    assert len(ref) > 1 and ref[0].any()
    for key, levels in maps.items():  # blend thread, and blending with torch tensors (the GPU path)
        for a, b in zip(levels, ref):
            np.testing.assert_array_equal(a, b, err_msg=str(key))

    calls = {"n": 0}
    add = ChunkBlender.add

    def failing_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("tile 7 failed to blend")
        return add(self, *a, **k)

    ChunkBlender.add = failing_add
    try:
        with pytest.raises(RuntimeError, match="tile 7 failed"):
            run_slide(img, tmp_path / "fail", pred, RunConfig.of(mpp=0.5, chunk=128, tissue=False, batch_size=3,
                                                              cellularity=False, blend_thread=True))
    finally:
        ChunkBlender.add = add
    alive = [t.name for t in threading.enumerate() if t.is_alive()]
    assert not [n for n in alive if n.startswith(("wsiseg-blend", "wsiseg-reader"))], alive


def _rot(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate (and first mirror) the spatial axes of (N, H, W, 3) tiles or (N, C, H, W) maps."""
    ax = (1, 2) if a.shape[-1] == 3 else (2, 3)
    a = np.flip(a, ax[1]) if flip else a
    return np.ascontiguousarray(np.rot90(a, k, ax))


def test_test_time_augmentation_makes_the_maps_follow_rotations_and_flips(monuseg_image):
    """A convolution with asymmetric kernels does not turn with its input; averaged over the 8
    symmetries of the square (``d4``) its probabilities do, for every rotation and flip; over the
    4 flips (``flips``) they follow the flips, not 90-degree turns. With an equivariant network
    (a 1x1 convolution) TTA changes nothing."""
    from tests.conftest import conv_net, test_model

    from wsiseg.predict import Predictor

    tiles = np.stack([monuseg_image[:64, :64], monuseg_image[300:364, 700:764]])
    plain = Predictor(test_model(conv_net(3)), "cpu", threads=1)
    d4 = Predictor(test_model(conv_net(3)), "cpu", threads=1, tta="d4")
    flips = Predictor(test_model(conv_net(3)), "cpu", threads=1, tta="flips")
    p_plain, p_d4, p_flips = plain(tiles), d4(tiles), flips(tiles)
    assert p_d4.shape == p_plain.shape == (2, 1, 64, 64)
    assert np.abs(_rot(p_plain, 1, False) - plain(_rot(tiles, 1, False))).max() > 0.05  # not equivariant alone
    for k in range(4):
        for flip in (False, True):
            np.testing.assert_allclose(d4(_rot(tiles, k, flip)), _rot(p_d4, k, flip), atol=2e-6)
    for k, flip in ((0, True), (2, False), (2, True)):
        np.testing.assert_allclose(flips(_rot(tiles, k, flip)), _rot(p_flips, k, flip), atol=2e-6)
    assert np.abs(flips(_rot(tiles, 1, False)) - _rot(p_flips, 1, False)).max() > 0.01
    # the mean of the passes stays a probability map close to the plain one, not a different map
    assert 0 < np.abs(p_d4 - p_plain).mean() < 0.1

    pointwise = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        pointwise.weight.copy_(torch.tensor([[[[0.8]], [[-1.2]], [[0.5]]]]))
        pointwise.bias.fill_(0.1)
    np.testing.assert_allclose(Predictor(test_model(pointwise), "cpu", threads=1, tta="d4")(tiles),
                               Predictor(test_model(pointwise), "cpu", threads=1)(tiles), atol=2e-6)
    with pytest.raises(ValueError, match="test-time augmentation"):
        Predictor(test_model(pointwise), "cpu", tta="rotate")


@pytest.mark.gpu
def test_blending_on_the_gpu_writes_the_bytes_of_blending_on_the_host(tmp_path, monuseg_image, tiny_unet_path):
    """On CUDA: the same predictor's probabilities blended on the GPU (DeviceChunkBlender) or
    copied back and blended with NumPy give the same stored bytes, with and without the blend
    thread."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import zarr

    from tests.conftest import write_png
    from wsiseg.models.registry import load_model
    from wsiseg.pipeline import RunConfig, run_slide

    img = write_png(tmp_path / "img.png", monuseg_image[:700, :900])
    pred = Predictor(load_model(tiny_unet_path), "cuda")
    maps = {}
    for threaded, on_device in ((False, False), (True, True), (False, True)):
        cfg = RunConfig.of(mpp=0.5, chunk=128, tissue=False, batch_size=4, cellularity=False, blend_thread=threaded,
                        blend_on_device=on_device)
        res = run_slide(img, tmp_path / f"out-{threaded}-{on_device}", pred, cfg)
        g = zarr.open_group(str(res.out_dir / "probabilities.zarr"), mode="r")
        maps[threaded, on_device] = [g[k][:] for k in sorted(g.array_keys())]
    for key, levels in maps.items():
        for a, b in zip(levels, maps[False, False]):
            np.testing.assert_array_equal(a, b, err_msg=str(key))


@pytest.mark.slow
def test_openvino_backend_gives_the_torch_probabilities(monuseg_image):
    """The shipped default model compiled by OpenVINO: the same probabilities (x window, into a
    buffer) as torch on real tiles, with and without test-time augmentation; bad backends refused."""
    pytest.importorskip("openvino")
    from wsiseg.blend import window
    from wsiseg.models.registry import load_model

    model = load_model()
    tiles = np.stack([monuseg_image[y : y + 256, x : x + 256] for y, x in [(0, 0), (300, 500), (744, 744)]])
    w = window(256)
    for tta in ("none", "flips"):
        ref = Predictor(model, "cpu", threads=1, tta=tta)(tiles, weight=w)
        ov = Predictor(model, "cpu", threads=1, tta=tta, backend="openvino")
        assert ov.backend == "openvino"
        out = np.full(ref.shape, np.nan, np.float32)
        assert ov(tiles, weight=w, out=out) is out
        assert ref.shape == (3, 5, 256, 256) and ref.std() > 0.05  # real, varied maps
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    # a tile size other than the traced one, and a batch of one
    small = monuseg_image[None, 100:228, 200:392]
    ov = Predictor(model, "cpu", threads=1, backend="openvino")
    np.testing.assert_allclose(ov(small), Predictor(model, "cpu", threads=1)(small), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor(model, "cpu", backend="onnx")


def test_auto_backend_falls_back_to_torch_when_the_network_does_not_convert(monkeypatch):
    """--backend auto never fails where torch works: OpenVINO missing, or a conversion error,
    gives the torch backend and says why."""
    import wsiseg.predict as pr
    from wsiseg.models.registry import load_model

    model = load_model()
    monkeypatch.setattr(pr, "openvino_available", lambda: False)
    p = Predictor(model, "cpu", threads=1, backend="auto")
    assert p.backend == "torch" and p.backend_reason == "auto: openvino is not installed"
    monkeypatch.setattr(pr, "openvino_available", lambda: True)

    def refuse(*a, **k):
        raise ValueError("OpenVINO cannot convert UNetBN (test)")

    monkeypatch.setattr(pr, "OpenVINONet", refuse)
    p = Predictor(model, "cpu", threads=1, backend="auto")
    assert p.backend == "torch" and "cannot convert" in p.backend_reason
    with pytest.raises(ValueError, match="cannot convert"):
        Predictor(model, "cpu", threads=1, backend="openvino")


def test_openvino_conversion_with_two_inputs_is_retried_then_refused(monkeypatch, monuseg_image):
    """A conversion that comes back with two inputs (seen once in a Dask worker, in CI) is
    converted again; if that too has two, --backend auto runs torch and says why, and
    --backend openvino refuses with a ValueError naming the inputs (not OpenVINO's RuntimeError)."""
    ov = pytest.importorskip("openvino")
    from tests.conftest import test_model

    class TwoInputs(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    two = ov.convert_model(TwoInputs(), example_input=(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)))
    real = ov.convert_model
    calls = []

    def flaky(net, **kw):  # the first conversion has two inputs, later ones are OpenVINO's own
        calls.append(type(net).__name__)
        return two if len(calls) == 1 else real(net, **kw)

    model = test_model(torch.nn.Conv2d(3, 1, 3, padding=1))
    monkeypatch.setattr(ov, "convert_model", flaky)
    p = Predictor(model, "cpu", threads=1, backend="auto")
    assert len(calls) == 2 and p.backend == "openvino"
    tiles = monuseg_image[None, :64, :64]
    np.testing.assert_allclose(p(tiles), Predictor(model, "cpu", threads=1)(tiles), atol=2e-5, rtol=0)

    monkeypatch.setattr(ov, "convert_model", lambda net, **kw: two)
    p = Predictor(model, "cpu", threads=1, backend="auto")
    assert p.backend == "torch" and "2 inputs" in p.backend_reason
    with pytest.raises(ValueError, match="2 inputs"):
        Predictor(model, "cpu", threads=1, backend="openvino")


def test_auto_backend_keeps_torch_for_a_network_openvino_gets_wrong(monuseg_image):
    """A network whose forward leaves torch (here through NumPy) traces into constants: OpenVINO
    converts it without an error but gives other outputs, so auto keeps torch, and says why."""
    pytest.importorskip("openvino")
    from tests.conftest import test_model

    class ThroughNumpy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.from_numpy(x.detach().numpy().copy()))

    model = test_model(ThroughNumpy())
    p = Predictor(model, "cpu", threads=1, backend="auto")
    assert p.backend == "torch" and "differs from torch" in p.backend_reason
    tiles = monuseg_image[None, :64, :64]
    np.testing.assert_array_equal(p(tiles), Predictor(model, "cpu", threads=1)(tiles))


@pytest.mark.slow
def test_openvino_int8_backend_quantises_and_keeps_the_nuclei(monuseg_image):
    """--backend openvino-int8: calibrated on tissue tiles of the bundled sample slide, every
    convolution runs in 8 bits (the float32 backend's run in f32), and on a real MoNuSeg image the
    nucleus mask at 0.5 (at the model's resolution) is the torch one's on all but a sliver of pixels."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from wsiseg.models.registry import load_model
    from wsiseg.predict import calibration_tiles
    from wsiseg.tissue import tissue_mask

    model = load_model()
    cal = calibration_tiles(model.mpp, n=16)
    assert cal.shape == (16, 256, 256, 3) and cal.dtype == np.uint8
    assert all(tissue_mask(t).mean() > 0.3 for t in cal[::5])  # tissue, not background
    assert len({t.tobytes() for t in cal}) == 16  # distinct tiles
    import cv2

    half = cv2.resize(monuseg_image, (500, 500), interpolation=cv2.INTER_AREA)  # the model's 0.5 um/px
    tiles = np.stack([half[y : y + 256, x : x + 256] for y, x in [(0, 0), (0, 244), (244, 0), (244, 244)]])
    ref = Predictor(model, "cpu", threads=1)(tiles)
    f32 = Predictor(model, "cpu", threads=1, backend="openvino")
    q = Predictor(model, "cpu", threads=1, backend="openvino-int8")
    assert set(f32.net.convolution_precisions()) == {"f32"}
    prec = q.net.convolution_precisions()
    assert set(prec) <= {"u8", "i8"} and sum(prec.values()) == sum(f32.net.convolution_precisions().values())
    out = q(tiles)
    nuc = ref[:, 0] > 0.5
    assert nuc.mean() > 0.05  # real nuclei in these tiles
    assert np.abs(out - ref).max() > 1e-3  # not the float32 network
    assert np.abs(out - ref).mean() < 0.01
    assert ((out[:, 0] > 0.5) != nuc).mean() < 0.01
    inter = ((out[:, 0] > 0.5) & nuc).sum()
    assert 2 * inter / ((out[:, 0] > 0.5).sum() + nuc.sum()) > 0.98  # Dice of the two masks


@pytest.mark.slow
def test_run_with_the_openvino_backend_writes_the_torch_map(tmp_path, monuseg_image):
    """`wsiseg run --backend openvino` end to end on a real image: the stored uint8 map is the
    torch backend's within one quantisation step, and the summary is complete."""
    pytest.importorskip("openvino")
    import zarr

    from tests.conftest import write_png
    from wsiseg.cli import main

    img = write_png(tmp_path / "patch.png", monuseg_image[:600, :520])
    maps = {}
    for backend in ("torch", "openvino", None):  # None: the default, auto
        out = tmp_path / str(backend)
        assert main(["run", "-q", str(img), "--mpp", "0.5", "--no-cellularity", "-o", str(out)]
                    + (["--backend", backend] if backend else [])) == 0
        summary = json.loads((out / "patch" / "summary.json").read_text())
        assert summary["complete"] is True and summary["tiles_inferred_this_run"] > 0
        assert summary["backend"] == (backend or "openvino")
        maps[backend] = zarr.open_group(str(out / "patch" / "probabilities.zarr"), mode="r")["0"][:]
    assert summary["backend_reason"] == "auto: openvino on the CPU"
    assert np.array_equal(maps[None], maps["openvino"])  # auto chose OpenVINO float32
    a, b = (maps[k].astype(np.int16) for k in ("torch", "openvino"))
    assert a.shape == b.shape and a.max() > 200
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


_TWO_NETWORKS_THEN_SIGNALS = r"""
import ctypes, gc, signal, subprocess, sys
import torch
from wsiseg.predict import OpenVINONet

class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def mapped(addr):
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False

nets = [OpenVINONet(torch.nn.Conv2d(3, 2, 3, padding=1).eval(), 1) for _ in range(2)]
while nets:
    nets.pop(0)  # released in the order they were made
    gc.collect()
st = Stack()
ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st))
print("signal stack mapped:", bool(not st.sp or mapped(st.sp)), flush=True)
signal.signal(signal.SIGCHLD, lambda *a: None)  # a Python handler, as torch's data loader sets
for _ in range(5):
    subprocess.run(["/bin/true"])
print("survived", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack and /proc are Linux's")
def test_openvino_networks_released_in_any_order_leave_signals_deliverable():
    """Two OpenVINO networks released in the order they were made, then signals that Python
    handles: with one Core per network, OpenVINO's CPU plugin (on CPUs with AMX) left the main
    thread's signal stack pointing at unmapped memory, and the first SIGCHLD killed the process
    with SIGSEGV and no traceback (the crash that ended CI's pytest runs). wsiseg keeps one Core
    per process, so the stack stays mapped and the child lives."""
    from wsiseg.predict import openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    p = subprocess.run([sys.executable, "-c", _TWO_NETWORKS_THEN_SIGNALS], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-2000:]}"
    assert "signal stack mapped: True" in p.stdout and "survived" in p.stdout


def test_pad_to_multiple_and_whole_image(monuseg_image):
    """Every "pad, forward, crop" prediction pads the same way: bottom and right, by reflection
    (edge for 1 px wide), to a multiple (a square one for Predictor.whole_image)."""
    from tests.conftest import conv_net, test_model
    from wsiseg.predict import pad_to_multiple

    img = monuseg_image[:100, :120]
    a = pad_to_multiple(img, 32)
    assert a.shape == (128, 128, 3) and (a[:100, :120] == img).all()
    assert (a[100:102, :120] == img[98:96:-1]).all()  # reflected about the last row
    assert pad_to_multiple(img[:100, :96], 32).shape == (128, 96, 3)
    assert pad_to_multiple(img[:100, :96], 32, square=True).shape == (128, 128, 3)
    line = pad_to_multiple(img[:1, :40], 16)
    assert line.shape == (16, 48, 3) and (line == line[:1]).all()  # 1 px high: the edge repeated
    pred = Predictor(test_model(conv_net(), mpp=0.5), device="cpu", backend="torch")
    whole = pred.whole_image(img)
    assert whole.shape == (1, 100, 120)
    np.testing.assert_array_equal(whole, pred(pad_to_multiple(img, 1, square=True)[None])[0][:, :100, :120])
