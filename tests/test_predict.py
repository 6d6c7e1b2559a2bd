"""The predictor's speed-ups keep the network's outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiseg.models.registry import build_model
from wsiseg.predict import fold_batchnorm


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
    inner = pred.__call__

    class Failing(Predictor):
        def __call__(self, tiles, weight=None, out=None):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("batch 3 failed")
            return inner(tiles, weight=weight, out=out)

    pred.__class__ = Failing
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        run_slide(SAMPLE_SVS, tmp_path / "out", pred,
                  RunConfig(batch_size=4, workers=2, cellularity=False))
    assert calls["n"] == 3
    assert not [t for t in threading.enumerate() if t.name == "wsiseg-reader" and t.is_alive()]
