"""The seeds' model zoo on real pixels: every network builds, runs forward and backward on CPU,
saves and loads through the registry; Mask R-CNN trains on real MoNuSeg instances."""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")

from tests.conftest import BREAST_ID, MONUSEG, need  # noqa: E402
from wsiseg.models.registry import _BUILDERS, ModelError, build_model, load_model, save_model  # noqa: E402
from wsiseg.models.zoo import (  # noqa: E402
    SEED_ENCODERS, FPNNet, GBUNet, PretrainedWeightsError, RandomInitWarning, TimmUNet, UNetEnsemble, USENet,
)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        yield


@pytest.fixture(scope="module")
def crops(monuseg_image):
    """``crops(n, size)``: n real H&E crops (N, 3, size, size), ImageNet-normalised, and their
    nucleus masks (N, 1, size, size) from the MoNuSeg annotation."""
    mask = np.asarray(Image.open(need(MONUSEG / "masks" / f"{BREAST_ID}.png"))) > 0

    def make(n: int = 2, size: int = 64):
        ys = [100 + 230 * i for i in range(n)]
        img = np.stack([monuseg_image[y : y + size, 300 : 300 + size] for y in ys]).astype(np.float32) / 255
        x = torch.from_numpy((img - MEAN) / STD).permute(0, 3, 1, 2).contiguous()
        m = torch.from_numpy(np.stack([mask[y : y + size, 300 : 300 + size] for y in ys])).float()[:, None]
        assert 0.02 < m.mean() < 0.9  # real nuclei in the crops
        return x, m

    return make


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(p for p in module.parameters() if p.requires_grad)


def _forward_backward(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    net.train()
    y = net(x)
    loss = nn.functional.binary_cross_entropy_with_logits(y, target.expand_as(y))
    loss.backward()
    assert torch.isfinite(loss)
    return y


# seed encoders that are fast enough for the default run; the rest are marked slow
FAST_ENCODERS = {"resnet34", "densenet121"}


@pytest.mark.parametrize("encoder", [
    e if e in FAST_ENCODERS else pytest.param(e, marks=pytest.mark.slow) for e in SEED_ENCODERS])
def test_timm_unet_every_seed_encoder_forward_backward(encoder, crops):
    size = 128 if encoder == "inception_v3" else 64  # Inception-v3's valid convolutions need >= 75 px
    x, m = crops(2, size)
    net = TimmUNet(encoder=encoder)
    assert net.input_multiple == 32 and len(net.decoder) == 5
    y = _forward_backward(net, x, m)
    assert y.shape == (2, 1, size, size) and torch.isfinite(y).all()
    g_enc = _first_param(net.encoder).grad  # the encoder's first convolution
    assert g_enc is not None and g_enc.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0
    f = net.features(x)
    assert f.shape == (2, net.feature_channels, size, size)


def test_random_init_warns_and_local_safetensors_loads(tmp_path):
    from safetensors.torch import save_file

    with pytest.warns(RandomInitWarning, match=r"starts from random weights \(no pre-trained file given"):
        TimmUNet(encoder="resnet34")
    ref = timm.create_model("resnet34")
    path = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # a file given: no warning
        net = TimmUNet(encoder="resnet34", pretrained=str(path))
    enc = net.encoder.state_dict()
    assert torch.equal(enc["conv1.weight"], ref.conv1.weight)
    assert torch.equal(enc["layer4.2.bn2.running_var"], ref.layer4[2].bn2.running_var)
    assert "pretrained" not in net.export_kwargs()
    # weights of another network do not fit; pickles are refused
    other = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(other))
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        TimmUNet(encoder="resnet34", pretrained=other)
    with pytest.raises(PretrainedWeightsError, match="safetensors"):
        TimmUNet(encoder="resnet34", pretrained=tmp_path / "resnet34.pth")


@pytest.mark.slow
def test_local_safetensors_for_a_flattened_encoder(tmp_path):
    """DenseNet's features_only encoder renames ``features.x`` to ``features_x``: still loads."""
    from safetensors.torch import save_file

    ref = timm.create_model("densenet121")
    path = tmp_path / "densenet121.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = TimmUNet(encoder="densenet121", pretrained=path)
    enc = net.encoder.state_dict()
    assert torch.equal(enc["features_conv0.weight"], ref.features.conv0.weight)
    assert torch.equal(enc["features_norm5.running_mean"], ref.features.norm5.running_mean)


def test_pretrained_true_without_local_cache_says_how_to_give_a_file(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PretrainedWeightsError, match=r"local file.*\.safetensors"):
        TimmUNet(encoder="resnet34", pretrained=True)


def test_timm_unet_save_load_round_trip_and_engine(tmp_path, crops):
    from wsiseg.predict import Predictor

    x, m = crops(2, 64)
    net = build_model("unet_timm", encoder="resnet34", decoder_channels=[64, 32, 32, 16, 16])
    _forward_backward(net, x, m)  # BatchNorm statistics move away from their initial values
    net.eval()
    meta = {"id": "t", "architecture": "unet_timm", "arch_kwargs": net.export_kwargs(), "classes": ["nucleus"],
            "mpp": 0.5, "normalization": {"mean": MEAN.tolist(), "std": STD.tolist()},
            "input_multiple": net.input_multiple}
    path = save_model(net, meta, tmp_path / "t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # loading saved weights: no warning
        loaded = load_model(path)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.network(x))
    assert json.loads(path.with_suffix(".json").read_text())["arch_kwargs"]["encoder"] == "resnet34"
    # the engine's predictor (BatchNorm folded, NHWC uint8 tiles) gives the same probabilities
    tiles = np.ascontiguousarray((x.permute(0, 2, 3, 1).numpy() * STD + MEAN) * 255)
    tiles = np.clip(np.round(tiles), 0, 255).astype(np.uint8)
    probs = Predictor(loaded, "cpu", threads=1)(tiles)
    xt = (torch.from_numpy(tiles).float() / 255 - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    with torch.no_grad():
        want = torch.sigmoid(net(xt.permute(0, 3, 1, 2))).numpy()
    assert probs.shape == (2, 1, 64, 64) and np.abs(probs - want).max() < 1e-4


def test_use_net_outputs_mask_and_marker(crops):
    x, m = crops(2, 64)
    net = build_model("use_net")
    assert isinstance(net, USENet) and net.classes == ("nucleus", "marker")
    assert any("se" in n.split(".")[-1] for n, _ in net.encoder.named_modules())  # SE-ResNet blocks
    assert all(not isinstance(b.se, nn.Identity) for b in net.decoder)  # SE after decoder blocks
    y = _forward_backward(net, x, torch.cat([m, m], 1))
    assert y.shape == (2, 2, 64, 64)
    assert _first_param(net.encoder).grad.abs().sum() > 0
    assert "out_channels" not in net.export_kwargs()


def test_fpn_rakhlin_architecture(crops):
    x, m = crops(2, 64)
    net = build_model("fpn_rakhlin")
    assert isinstance(net, FPNNet) and net.classes == ("normal", "lymphocyte", "malignant", "background")
    assert net.concat_channels == 256 and all(b[0].out_channels == 64 for b in net.blocks)
    assert isinstance(net.dropout, nn.Dropout2d) and net.dropout.p == 0.5
    assert any(isinstance(mod, nn.ELU) for mod in net.encoder.modules())
    assert not any(isinstance(mod, nn.ReLU) for mod in net.encoder.modules())
    y = _forward_backward(net, x, m)
    assert y.shape == (2, 4, 64, 64)
    assert _first_param(net.encoder).grad.abs().sum() > 0
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))  # spatial dropout is active in training
        net.eval()
        assert torch.equal(net(x), net(x))


def _small_members():
    return [{"architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2}},
            {"architecture": "unet_timm",
             "arch_kwargs": {"encoder": "resnet34", "decoder_channels": [32, 32, 16, 16, 8],
                             "pretrained": "/not/kept.safetensors"}}]


def test_ensemble_is_the_mean_of_member_probabilities(crops, tmp_path):
    x, m = crops(2, 64)
    specs = _small_members()
    specs[1] = {**specs[1], "arch_kwargs": {k: v for k, v in specs[1]["arch_kwargs"].items() if k != "pretrained"}}
    ens = build_model("unet_ensemble", members=specs)
    assert isinstance(ens, UNetEnsemble) and ens.input_multiple == 32
    _forward_backward(ens, x, m)
    assert all(_first_param(mb.net).grad.abs().sum() > 0 for mb in ens.members)
    ens.eval()
    with torch.no_grad():
        p = torch.sigmoid(ens(x))
        mean = torch.stack([torch.sigmoid(mb.net(x)) for mb in ens.members]).mean(0)
    assert torch.allclose(p, mean, atol=1e-5)
    # registry round trip of the combined model
    meta = {"id": "e", "architecture": "unet_ensemble", "arch_kwargs": ens.export_kwargs(), "classes": ["nucleus"],
            "mpp": 0.5, "normalization": {"mean": MEAN.tolist(), "std": STD.tolist()}}
    loaded = load_model(save_model(ens, meta, tmp_path / "e"))
    with torch.no_grad():
        assert torch.equal(loaded.network(x), ens(x))


def test_ensemble_of_trained_models_maps_each_normalisation(crops, tmp_path, monuseg_image):
    """Members saved with different normalisations: each sees the input it was trained on."""
    paths, nets = [], []
    norms = [(MEAN, STD), (np.array([0.7, 0.5, 0.7], np.float32), np.array([0.15, 0.2, 0.15], np.float32))]
    for i, (mu, sd) in enumerate(norms):
        torch.manual_seed(i)
        n = build_model("unet_bn", base=4, depth=2).eval()
        nets.append(n)
        paths.append(save_model(n, {"id": f"m{i}", "architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2},
                                    "classes": ["nucleus"], "mpp": 0.5, "input_multiple": 4,
                                    "normalization": {"mean": mu.tolist(), "std": sd.tolist()}}, tmp_path / f"m{i}"))
    ens = build_model("unet_ensemble", members=paths).eval()
    assert ens.reference["normalization"]["mean"] == pytest.approx(MEAN.tolist())
    img = monuseg_image[:64, :64].astype(np.float32) / 255
    with torch.no_grad():
        probs = []
        for n, (mu, sd) in zip(nets, norms):
            xi = torch.from_numpy((img - mu) / sd).permute(2, 0, 1)[None]
            probs.append(torch.sigmoid(n(xi)))
        x0 = torch.from_numpy((img - MEAN) / STD).permute(2, 0, 1)[None]
        assert torch.allclose(torch.sigmoid(ens(x0)), torch.stack(probs).mean(0), atol=1e-5)
    assert ens.export_kwargs()["members"][1] == {"architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2}}

    # `wsiseg ensemble` saves it as one model that loads back (safetensors + sidecar) to the same maps
    from wsiseg.cli import main
    from wsiseg.models.registry import load_model

    assert main(["ensemble", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "ens")]) == 0
    loaded = load_model(tmp_path / "ens.safetensors")
    assert loaded.meta["architecture"] == "unet_ensemble" and loaded.classes == ["nucleus"]
    assert [m["id"] for m in loaded.meta["training"]["ensemble_of"]] == ["m0", "m1"]
    assert loaded.mean == pytest.approx(MEAN.tolist())
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(loaded.network(x0)), torch.stack(probs).mean(0), atol=1e-5)
    # members that disagree on classes are refused with a clear error
    save_model(nets[0], {"id": "other", "architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2},
                         "classes": ["tumour"], "mpp": 0.5, "input_multiple": 4,
                         "normalization": {"mean": MEAN.tolist(), "std": STD.tolist()}}, tmp_path / "other")
    assert main(["ensemble", str(paths[0]), str(tmp_path / "other"), "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad.safetensors").exists()


def test_gb_unet_second_stage_sees_first_stage_features_and_image(crops):
    x, m = crops(2, 64)
    gb = build_model("gb_unet", members=_small_members(), base=8, depth=3)
    assert isinstance(gb, GBUNet)
    assert gb.stage1_channels == 4 + 8 and gb.stage2.down[0][0][0].in_channels == 4 + 8 + 3
    assert "pretrained" not in json.dumps(gb.export_kwargs())
    y = _forward_backward(gb, x, m)
    assert y.shape == (2, 1, 64, 64)
    assert _first_param(gb.stage2).grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in gb.members.parameters())  # stage one frozen
    assert not gb.members.training  # and its BatchNorm statistics too
    with torch.no_grad():  # the maps are the members' last features before their heads
        s1 = gb.first_stage(x)
        assert torch.allclose(s1[:, 4:], gb.members[1].net.features(x))
        got = []
        h = gb.members[0].net.head.register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
        gb.members[0].net(x)
        h.remove()
        assert torch.allclose(s1[:, :4], got[0])
    # trained end to end when asked
    gb2 = build_model("gb_unet", members=_small_members(), base=8, depth=3, freeze_first_stage=False)
    _forward_backward(gb2, x, m)
    assert _first_param(gb2.members[1].net.encoder).grad.abs().sum() > 0


def test_registry_names():
    for name in ("unet_timm", "fpn_rakhlin", "use_net", "maskrcnn", "unet_ensemble", "gb_unet", "unet_bn"):
        assert name in _BUILDERS
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("unet_nope")


@pytest.fixture(scope="module")
def instance_crops(monuseg_image):
    inst = np.asarray(Image.open(need(MONUSEG / "instances" / f"{BREAST_ID}.png"))).astype(np.int32)
    size, corners = 128, [(120, 240), (500, 500)]
    img = np.stack([monuseg_image[y : y + size, x : x + size] for y, x in corners]).astype(np.float32) / 255
    x = torch.from_numpy((img - MEAN) / STD).permute(0, 3, 1, 2).contiguous()
    return x, [inst[y : y + size, x0 : x0 + size] for y, x0 in corners]


@pytest.mark.slow
def test_maskrcnn_trains_on_real_instances_and_runs_as_a_semantic_model(instance_crops, tmp_path):
    from wsiseg.models.maskrcnn import MaskRCNNSemantic, instance_targets

    x, insts = instance_crops
    targets = [instance_targets(i) for i in insts]
    n_ids = len(np.unique(insts[0])) - 1
    assert 10 < len(targets[0]["boxes"]) <= n_ids
    t0 = targets[0]
    for b, mk in zip(t0["boxes"], t0["masks"]):  # each box is its mask's bounding box
        ys, xs = np.nonzero(mk.numpy())
        assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # few RoIs/detections at test time: the mask head costs ~0.5 GFLOP per detection on the CPU
    net = build_model("maskrcnn", nms_thresh=0.6, anchor_sizes=[4, 8, 16, 32, 64], detections_per_img=16,
                      rpn_post_nms_top_n_train=500, rpn_post_nms_top_n_test=100, box_batch_size_per_image=128,
                      scale=1.0)
    assert isinstance(net, MaskRCNNSemantic)
    mr = net.model
    assert mr.roi_heads.nms_thresh == 0.6 and mr.roi_heads.detections_per_img == 16
    assert mr.rpn.anchor_generator.sizes == ((4,), (8,), (16,), (32,), (64,))
    assert mr.transform.image_mean == [0.0, 0.0, 0.0] and mr.transform.image_std == [1.0, 1.0, 1.0]
    assert sum(p.numel() for p in mr.backbone.body.parameters()) > 40e6  # ResNet-101
    net.train()
    losses = net(x, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert mr.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert mr.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        y = net(x)
        labs = net.instances(x)
    assert y.shape == (2, 1, 128, 128) and torch.isfinite(y).all()
    assert len(labs) == 2 and labs[0].shape == (128, 128) and labs[0].dtype == np.int32
    # detections are painted into the semantic map: where an instance is, the probability is >= 0.5
    for lab, yi in zip(labs, y):
        if lab.max():
            assert (torch.sigmoid(yi[0]).numpy()[lab > 0] >= 0.5 - 1e-6).all()
    # the engine's predictor runs it on uint8 tiles (BatchNorm folded): probabilities (N, 1, T, T)
    from wsiseg.models.registry import LoadedModel
    from wsiseg.predict import Predictor

    meta = {"id": "mr", "architecture": "maskrcnn", "arch_kwargs": net.export_kwargs(), "classes": ["nucleus"],
            "mpp": 0.5, "normalization": {"mean": MEAN.tolist(), "std": STD.tolist()}, "input_multiple": 32}
    tiles = np.clip((x.permute(0, 2, 3, 1).numpy() * STD + MEAN) * 255, 0, 255).round().astype(np.uint8)
    pred = Predictor(LoadedModel(net, meta), "cpu", threads=1)
    probs = pred(tiles)
    assert probs.shape == (2, 1, 128, 128) and probs.min() >= 0 and probs.max() <= 1
    # `wsiseg eval` also scores its own instance head on whole images: same labels as the network's
    from wsiseg.evaluate import own_instances

    xt = torch.from_numpy(((tiles[:1].astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).copy()).float()
    assert np.array_equal(own_instances(pred, tiles[0], 1.0), net.instances(xt)[0])
    assert own_instances(pred, tiles[0][:100, :120], 1.0).shape == (100, 120)  # padded to 32, cropped back


@pytest.mark.slow
def test_two_step_train_of_timm_unet_configs(tmp_path):
    from wsiseg.train.loop import TrainConfig, train

    base = TrainConfig.from_yaml("configs/unet_resnet50_monuseg_20x.yaml")
    cfg = dataclasses.replace(base, data=str(need(MONUSEG)), steps=2, val_every=2, batch_size=2, crop=64,
                              val_limit=1, out=str(tmp_path / "w"), id="w",
                              arch_kwargs={"encoder": "resnet34", "decoder_channels": [32, 32, 16, 16, 8],
                                           "pretrained": None})
    assert base.target == "mask_weights" and base.loss == "weighted_ce_dice"
    path = train(cfg, log=lambda *_: None)
    m = load_model(path)
    assert m.meta["architecture"] == "unet_timm" and m.classes == ["nucleus"] and m.input_multiple == 32
    assert "pretrained" not in m.meta["arch_kwargs"] and m.meta["training"]["target"] == "mask_weights"
    assert [h["step"] for h in json.loads((tmp_path / "w" / "history.json").read_text())] == [2]
    assert 0 <= m.meta["metrics"]["validation"]["dice_pooled"] <= 1


@pytest.mark.slow
def test_two_step_train_of_use_net_config(tmp_path):
    from wsiseg.train.loop import TrainConfig, train

    base = TrainConfig.from_yaml("configs/use_net_seresnet50_monuseg_20x.yaml")
    cfg = dataclasses.replace(base, data=str(need(MONUSEG)), steps=2, val_every=2, batch_size=2, crop=64,
                              val_limit=1, out=str(tmp_path / "u"), id="u",
                              arch_kwargs={"encoder": "resnet34", "decoder_channels": [32, 32, 16, 16, 8]})
    path = train(cfg, log=lambda *_: None)
    m = load_model(path)
    assert m.classes == ["nucleus", "marker"] and m.meta["training"]["target"] == "mask_marker"
    with torch.no_grad():
        assert m.network(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
