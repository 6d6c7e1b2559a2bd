"""The predictor's speed-ups keep the network's outputs."""
from __future__ import annotations

import numpy as np
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
