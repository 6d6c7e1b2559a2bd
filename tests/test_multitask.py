"""The nucleus + class model's training (seed 003's channels) on real CoNSeP / MoNuSeg data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import MONUSEG, SHARED, need
from wsiseg.models.registry import build_model, load_model
from wsiseg.train.datasets import CLASS_CHANNELS, load_consep
from wsiseg.train.multitask import OUTPUT_CHANNELS, MultitaskConfig, calibrate_class_bias, train_multitask

CONSEP = SHARED / "consep" / "train"


def _mean_probs(net, samples, mean, std):
    with torch.no_grad():
        x = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32) / 255)
        x = ((x - torch.from_numpy(mean)) / torch.from_numpy(std)).permute(0, 3, 1, 2)
        return torch.sigmoid(net(x))[:, 1:].mean((0, 2, 3)).numpy()


def test_class_biases_start_at_the_training_priors():
    samples = load_consep(need(CONSEP), 0.5)[:32]  # 128 px tiles at 0.5 um/px
    counts = sum(np.bincount(s.classes.ravel(), minlength=4)[:4] for s in samples)
    prior = counts / counts.sum()
    torch.manual_seed(0)
    net = build_model("unet_bn", base=8, depth=2, out_channels=len(OUTPUT_CHANNELS))
    mean = np.array([0.7, 0.5, 0.65], np.float32)
    std = np.array([0.2, 0.2, 0.18], np.float32)
    before = _mean_probs(net.eval(), samples, mean, std)
    bias0 = net.head.bias.detach().clone()
    shift = calibrate_class_bias(net, samples, mean, std, 128, np.random.default_rng(0), n=32)
    after = _mean_probs(net.eval(), samples, mean, std)
    assert np.abs(before - prior).max() > 0.2  # a random head is far from the priors (~0.5 each)
    assert np.allclose(after, prior, atol=0.03), (after, prior)
    assert torch.equal(net.head.bias[0], bias0[0])  # the nucleus channel is untouched
    assert np.allclose((net.head.bias[1:] - bias0[1:]).detach().numpy(), shift, atol=1e-5)
    assert list(CLASS_CHANNELS) == ["normal", "lymphocyte", "malignant", "background"]


@pytest.mark.slow
def test_two_multitask_steps_write_a_five_channel_model_with_its_budget(tmp_path):
    cfg = MultitaskConfig(monuseg=str(need(MONUSEG)), consep=str(need(CONSEP)), monusac=None, init_from=None,
                          arch_kwargs={"base": 4, "depth": 2}, crop=64, class_crop=64, batch_size=2,
                          class_batch_size=2, steps=2, val_every=2, prior_bias=True, head_lr_mult=10.0,
                          threads=1, out=str(tmp_path / "mt"), id="mt")
    path = train_multitask(cfg, log=lambda *_: None)
    m = load_model(path)
    assert m.classes == list(OUTPUT_CHANNELS) and m.network.head.out_channels == 5
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["training"]["prior_bias_shift"]) == 4
    assert meta["training"]["budget"]["steps"] == 2
    val = meta["metrics"]["validation"]
    assert {"dice_normal", "dice_lymphocyte", "dice_malignant", "nucleus_dice_monuseg"} <= set(val)
    assert meta["training"]["config"]["head_lr_mult"] == 10.0
