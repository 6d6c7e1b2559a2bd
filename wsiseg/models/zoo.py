"""The seeds' segmentation model zoo: U-Nets on timm encoders, Rakhlin's FPN, USE-Net, the U-Net
ensemble and the two-stage GB U-Net.

Every network takes a normalised float tensor (N, C_in, H, W) and returns logits (N, C, H, W) at
the input resolution (sigmoid at inference), so the engine runs any of them tile by tile.

* :class:`TimmUNet` (seeds 000 and 001): a ``timm`` ``features_only`` encoder (ResNet-50/101/152,
  ResNeXt-50 32x4d / 101 32x8d, DenseNet-121/201, VGG-16/19 with BatchNorm, Inception-v3,
  ResNet-34, SE-ResNet-50 ...) and a U-Net decoder of (upsample, concatenate skip, 2 x
  [3x3 conv, BatchNorm, ReLU]) blocks, as in segmentation_models(_pytorch)'s ``Unet`` which the
  seeds used; a 1x1 convolution head.
* :class:`FPNNet` (seed 003, Rakhlin et al.): ResNet-34 encoder with ELU, a feature pyramid
  decoder whose four levels each give 64 maps, upsampled to a quarter of the input and
  concatenated to 256 maps, spatial dropout 0.5, 4 output channels (normal, lymphocyte,
  malignant, background).
* :class:`USENet` (seed 002): SE-ResNet-50 encoder, U-Net decoder with squeeze-and-excitation
  after each block, two output channels: nucleus mask and shape marker.
* :class:`UNetEnsemble` (seed 001): pixel-wise mean of its members' sigmoid probabilities.
* :class:`GBUNet` (seed 001): a second-stage U-Net fed with the first-stage networks' last
  feature maps (before their heads) concatenated with the image.

Pre-trained encoders: nothing is downloaded. ``pretrained`` is None/False (random weights, with a
:class:`RandomInitWarning`), the path of a local ``.safetensors`` file holding the timm model's
``state_dict`` (read with safetensors, never unpickled), or True (the timm weights from the local
Hugging Face cache only; an error says how to give a file when they are not there).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.classes import CLASS_CHANNELS

__all__ = [
    "FPNNet",
    "GBUNet",
    "PretrainedWeightsError",
    "RandomInitWarning",
    "SEED_ENCODERS",
    "TimmUNet",
    "UNetEnsemble",
    "USENet",
    "load_encoder_weights",
]

# The encoders of the seeds, as timm model names (all support ``features_only``).
SEED_ENCODERS = (
    "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",  # seeds 000, 001
    "densenet121", "densenet201", "vgg16_bn", "vgg19_bn", "inception_v3",  # seeds 000, 001
    "resnet34",  # seed 003
    "seresnet50",  # seed 002
)

FPN_CLASSES = CLASS_CHANNELS


class RandomInitWarning(UserWarning):
    """An encoder was built without pre-trained weights."""


class PretrainedWeightsError(ValueError):
    """Pre-trained weights were asked for but cannot be had; the message says how to give them."""


# ---------------------------------------------------------------------------- encoder weights


def _hf_cached_file(name: str) -> Path:
    """The timm weights of ``name`` from the local Hugging Face cache (never the network)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    how = (f"give a local file instead: pretrained='/path/to/{name}.safetensors', the timm "
           f"state_dict of {name!r} saved with safetensors.torch.save_file")
    if not hub_id:
        raise PretrainedWeightsError(f"timm has no Hugging Face weights for {name!r}; {how}")
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(hub_id, filename=getattr(cfg, "hf_hub_filename", None) or "model.safetensors",
                               local_files_only=True)
    except Exception as e:  # offline only: anything else means "not in the cache"
        raise PretrainedWeightsError(
            f"pre-trained weights for {name!r} ({hub_id}) are not in the local Hugging Face cache and "
            f"this engine never downloads weights (HF_HUB_OFFLINE); {how} ({type(e).__name__})") from None
    return Path(path)


def load_encoder_weights(encoder: nn.Module, path: str | Path, in_channels: int = 3) -> None:
    """Load a timm ``state_dict`` stored as ``.safetensors`` into a ``features_only`` encoder.

    Keys may be the full model's (``features.0.weight``, ``layer1.0.conv1.weight``, a classifier
    that is ignored) or the feature extractor's own (``features_0.weight``); a ``encoder.``
    prefix is stripped. Every encoder tensor must be found with its shape, except a first
    convolution for ``in_channels != 3``, which is adapted as timm does. Raises
    :class:`PretrainedWeightsError` otherwise.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PretrainedWeightsError(
            f"{path}: pre-trained encoder weights must be a .safetensors file (pickled .pth/.bin "
            "files are not loaded); convert with safetensors.torch.save_file(model.state_dict(), ...)")
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: pre-trained encoder weights file not found")
    src = load_file(str(path))
    if src and all(k.startswith("encoder.") for k in src):
        src = {k[len("encoder."):]: v for k, v in src.items()}
    flat = {k.replace(".", "_", 1): k for k in src}  # features_only flattens the first level
    own = encoder.state_dict()
    state, missing, bad = {}, [], []
    for k, v in own.items():
        key = k if k in src else flat.get(k)
        if key is None:
            missing.append(k)
            continue
        w = src[key]
        if w.shape != v.shape:
            if w.ndim == 4 and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:] and w.shape[1] == 3:
                from timm.models import adapt_input_conv

                w = adapt_input_conv(v.shape[1], w)
            else:
                bad.append(f"{k} {tuple(w.shape)} != {tuple(v.shape)}")
                continue
        state[k] = w.to(v.dtype)
    if missing or bad:
        raise PretrainedWeightsError(
            f"{path}: does not fit the encoder ({len(missing)} tensors missing, e.g. {missing[:3]}; "
            f"{len(bad)} of another shape, e.g. {bad[:3]}); is it the state_dict of the same timm model?")
    encoder.load_state_dict(state, strict=True)


def _make_encoder(name: str, in_channels: int, pretrained: Any, owner: str, **kwargs) -> nn.Module:
    import timm

    enc = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_channels, **kwargs)
    if pretrained is None or pretrained is False:
        warnings.warn(f"{owner}: the {name} encoder starts from random weights (no pre-trained file "
                      "given; pass pretrained='/path/to/encoder.safetensors')", RandomInitWarning, stacklevel=3)
    elif pretrained is True:
        load_encoder_weights(enc, _hf_cached_file(name), in_channels)
    elif isinstance(pretrained, (str, Path)):
        load_encoder_weights(enc, pretrained, in_channels)
    else:
        raise PretrainedWeightsError(
            f"pretrained must be None, False, True or a .safetensors path, got {pretrained!r}")
    return enc


# ---------------------------------------------------------------------------------- blocks


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SqueezeExcite(nn.Module):
    """Channel squeeze-and-excitation (Hu et al.), as USE-Net puts after its blocks."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        mid = max(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, channels, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class DecoderBlock(nn.Module):
    """Resize to the skip's size (nearest), concatenate it, 2 x (3x3 conv, BatchNorm, ReLU)."""

    def __init__(self, cin: int, cskip: int, cout: int, se: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(cin + cskip, cout), _conv_bn_relu(cout, cout))
        self.se = SqueezeExcite(cout) if se else nn.Identity()

    def forward(self, x, skip, size):
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.se(self.conv(x))


# ----------------------------------------------------------------------------------- U-Nets


class TimmUNet(nn.Module):
    """U-Net with a timm encoder (seeds 000, 001).

    Args:
        encoder: timm model name supporting ``features_only`` (see :data:`SEED_ENCODERS`).
        in_channels, out_channels: input channels; output logits channels.
        decoder_channels: channels of the decoder blocks, deepest first. There is one block per
            encoder skip level plus, when the shallowest encoder level is below full resolution
            (stride 2 for ResNets, DenseNets, Inception), a last block without skip that brings
            the maps to the input size: 5 blocks for every encoder of the seeds.
        pretrained: None/False (random), a ``.safetensors`` path, or True (local HF cache only).
        decoder_se: squeeze-and-excitation after each decoder block (USE-Net).
        encoder_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"act_layer": "elu"}``).

    Decoder maps are resized to each skip's size, so encoders with odd strides (Inception-v3's
    unpadded convolutions) or a stride-1 level (VGG) work; inputs should be multiples of
    :attr:`input_multiple` (32) for the encoders' levels to align exactly.
    """

    def __init__(self, encoder: str = "resnet34", in_channels: int = 3, out_channels: int = 1,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), pretrained: Any = None,
                 decoder_se: bool = False, encoder_kwargs: dict | None = None):
        super().__init__()
        self._kwargs = {"encoder": encoder, "in_channels": in_channels, "out_channels": out_channels,
                        "decoder_channels": list(decoder_channels), "decoder_se": decoder_se,
                        "encoder_kwargs": dict(encoder_kwargs or {})}
        self.encoder = _make_encoder(encoder, in_channels, pretrained, type(self).__name__, **(encoder_kwargs or {}))
        chans = list(self.encoder.feature_info.channels())
        reds = list(self.encoder.feature_info.reduction())
        skips = chans[:-1][::-1]
        if min(reds) > 1:
            skips.append(0)  # a last block without skip up to the input size
        if len(decoder_channels) != len(skips):
            raise ValueError(f"encoder {encoder!r} needs {len(skips)} decoder_channels (one per level), "
                             f"got {len(decoder_channels)}")
        cins = [chans[-1]] + list(decoder_channels[:-1])
        self.decoder = nn.ModuleList(DecoderBlock(ci, cs, co, se=decoder_se)
                                     for ci, cs, co in zip(cins, skips, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 1)
        self.input_multiple = int(max(reds))
        self.feature_channels = int(decoder_channels[-1])

    def export_kwargs(self) -> dict:
        """Constructor arguments for the JSON sidecar (no pre-trained path: the weights are saved)."""
        return copy.deepcopy(self._kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder maps (N, decoder_channels[-1], H, W), before the head."""
        size = x.shape[-2:]
        feats = self.encoder(x)
        y = feats[-1]
        skips = feats[:-1][::-1]
        for i, block in enumerate(self.decoder):
            skip = skips[i] if i < len(skips) else None
            y = block(y, skip, skip.shape[-2:] if skip is not None else size)
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class USENet(TimmUNet):
    """USE-Net (seed 002): SE-ResNet-50 encoder, U-Net decoder with squeeze-and-excitation after
    each block, two sigmoid outputs: channel 0 the nucleus mask, channel 1 the shape marker."""

    classes = ("nucleus", "marker")

    def __init__(self, encoder: str = "seresnet50", in_channels: int = 3,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), pretrained: Any = None,
                 decoder_se: bool = True, encoder_kwargs: dict | None = None):
        super().__init__(encoder, in_channels, 2, decoder_channels, pretrained, decoder_se, encoder_kwargs)
        self._kwargs.pop("out_channels")


class FPNNet(nn.Module):
    """Rakhlin et al.'s segmentation network (seed 003, Fig. 2).

    ResNet-34 encoder with ELU activations; FPN top-down pathway (1x1 lateral convolutions,
    ``pyramid_channels`` maps, nearest upsampling and addition) over the stride 4..32 levels; a
    "feature pyramid block" per level: a 3x3 convolution with 64 maps (BatchNorm, ELU) upsampled
    to stride 4 (rates 8, 4, 2, 1); the four are concatenated to 64 x 4 = 256 maps, followed by
    spatial dropout (``Dropout2d``, rate 0.5); a 3x3 convolution (BatchNorm, ELU), upsampling to
    the input size and a 1x1 convolution to ``out_channels`` logits (default 4: normal,
    lymphocyte, malignant, background; sigmoid at inference).

    Not reproduced: the paper also swapped the order of BatchNorm and activation inside the
    encoder; timm's ResNet keeps its order (conv, BN, act).
    """

    classes = FPN_CLASSES

    def __init__(self, encoder: str = "resnet34", in_channels: int = 3, out_channels: int = 4,
                 pyramid_channels: int = 256, segmentation_channels: int = 64, dropout: float = 0.5,
                 encoder_act: str = "elu", pretrained: Any = None):
        super().__init__()
        self._kwargs = {"encoder": encoder, "in_channels": in_channels, "out_channels": out_channels,
                        "pyramid_channels": pyramid_channels, "segmentation_channels": segmentation_channels,
                        "dropout": dropout, "encoder_act": encoder_act}
        self.encoder = _make_encoder(encoder, in_channels, pretrained, type(self).__name__,
                                     out_indices=(1, 2, 3, 4), act_layer=encoder_act)
        chans = list(self.encoder.feature_info.channels())
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid_channels, 1) for c in chans)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(pyramid_channels, segmentation_channels, 3, padding=1, bias=False),
                          nn.BatchNorm2d(segmentation_channels), nn.ELU(inplace=True))
            for _ in chans)
        self.dropout = nn.Dropout2d(dropout)
        merged = segmentation_channels * len(chans)
        self.fuse = nn.Sequential(nn.Conv2d(merged, segmentation_channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(segmentation_channels), nn.ELU(inplace=True))
        self.head = nn.Conv2d(segmentation_channels, out_channels, 1)
        self.input_multiple = int(max(self.encoder.feature_info.reduction()))
        self.concat_channels = merged

    def export_kwargs(self) -> dict:
        return dict(self._kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = self.encoder(x)
        p = self.lateral[-1](feats[-1])
        pyramid = [p]
        for lat, f in zip(list(self.lateral)[-2::-1], feats[-2::-1]):
            p = F.interpolate(p, size=f.shape[-2:], mode="nearest") + lat(f)
            pyramid.append(p)
        pyramid = pyramid[::-1]  # stride 4 first
        base = pyramid[0].shape[-2:]
        maps = [F.interpolate(b(q), size=base, mode="bilinear", align_corners=False) if q.shape[-2:] != base else b(q)
                for b, q in zip(self.blocks, pyramid)]
        y = self.fuse(self.dropout(torch.cat(maps, dim=1)))
        y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
        return self.head(y)


# ------------------------------------------------------------------ ensembles and two stages


class _Member(nn.Module):
    """A first-stage network behind a fixed affine input map (its own normalisation)."""

    def __init__(self, net: nn.Module, scale=None, shift=None):
        super().__init__()
        self.net = net
        scale = torch.ones(3) if scale is None else torch.as_tensor(scale)
        shift = torch.zeros(3) if shift is None else torch.as_tensor(shift)
        self.register_buffer("in_scale", scale.float().view(1, -1, 1, 1))
        self.register_buffer("in_shift", shift.float().view(1, -1, 1, 1))

    def adapt(self, x):
        return x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)

    def forward(self, x):
        return self.net(self.adapt(x))


class UNetEnsemble(nn.Module):
    """Seed 001's U-Net ensemble: the pixel-wise mean of the members' sigmoid probabilities.

    ``members``: the built members (:class:`_Member`), ``specs`` their sidecar entries and
    ``reference`` the mpp/normalisation of the first trained one (or None); build it by name with
    ``build_model("unet_ensemble", members=[specs or paths])`` (:func:`wsiseg.models.registry.build_members`).
    ``forward`` returns ``logit(mean p)`` (p clamped to [eps, 1 - eps], computed in float32), so
    the engine's sigmoid gives the mean probability.
    """

    def __init__(self, members: Sequence[nn.Module], specs: list[dict], reference: dict | None = None,
                 eps: float = 1e-6):
        super().__init__()
        self._specs, self.reference = list(specs), reference
        self.members = nn.ModuleList(members)
        self.eps = float(eps)
        self.input_multiple = max(int(getattr(m.net, "input_multiple", 1)) for m in self.members)

    def export_kwargs(self) -> dict:
        return {"members": copy.deepcopy(self._specs), "eps": self.eps}

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(self.probabilities(x), eps=self.eps)


class _StageTwoUNet(nn.Module):
    """GB U-Net's second stage: encoder blocks of 2 x (3x3 conv, BatchNorm, ReLU, Dropout), the
    decoder as the other U-Nets (2 x (3x3 conv, BatchNorm, ReLU) after upsampling + skip)."""

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 32, depth: int = 4, dropout: float = 0.1):
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]

        def enc(ci, co):
            return nn.Sequential(_conv_bn_relu(ci, co), nn.Dropout2d(dropout),
                                 _conv_bn_relu(co, co), nn.Dropout2d(dropout))

        self.down = nn.ModuleList([enc(in_channels, chans[0])] + [enc(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList(DecoderBlock(chans[i + 1], chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(x, skip, skip.shape[-2:])
        return self.head(x)


def _head_input(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The maps a network's ``head`` receives (its ``features`` method when it has one)."""
    if hasattr(net, "features") and callable(net.features):
        return net.features(x)
    got = []
    handle = net.head.register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return got[0]


class GBUNet(nn.Module):
    """Seed 001's gradient-boosting network (GB U-Net), two stages.

    Stage one: U-Nets (VGG-19, ResNet-101, DenseNet-121 encoders in the paper; any registry
    model with a 1x1 ``head``), each giving its last feature maps before the head
    (``stage1="features"``; ``"logits"`` takes the head's output instead). Stage two: a U-Net
    (:class:`_StageTwoUNet`, dropout in its encoder) whose input is those maps concatenated with
    the (normalised) image. Seed 001 colour-normalised the image first; the engine feeds the
    mean/std-normalised RGB, and stain normalisation, if any, happens before.

    ``freeze_first_stage`` (default): stage one keeps its weights and BatchNorm statistics (eval
    mode, no gradients); only stage two trains, as in the paper's two-stage training.
    ``members``, ``specs``, ``reference`` as :class:`UNetEnsemble`'s; build it by name with
    ``build_model("gb_unet", members=[...], ...)``.
    """

    def __init__(self, members: Sequence[nn.Module], specs: list[dict], reference: dict | None = None,
                 out_channels: int = 1, base: int = 32, depth: int = 4,
                 dropout: float = 0.1, stage1: str = "features", freeze_first_stage: bool = True):
        super().__init__()
        if stage1 not in ("features", "logits"):
            raise ValueError(f"stage1 must be 'features' or 'logits', got {stage1!r}")
        self._specs, self.reference = list(specs), reference
        self.members = nn.ModuleList(members)
        self.stage1 = stage1
        self.freeze_first_stage = bool(freeze_first_stage)
        ch = 0
        for m in self.members:
            head = getattr(m.net, "head", None)
            if not isinstance(head, nn.Conv2d):
                raise ValueError(f"GB U-Net members need a Conv2d 'head'; {type(m.net).__name__} has none")
            ch += head.in_channels if stage1 == "features" else head.out_channels
        self.stage1_channels = ch
        self.stage2 = _StageTwoUNet(ch + 3, out_channels, base, depth, dropout)
        self.input_multiple = max([2**depth] + [int(getattr(m.net, "input_multiple", 1)) for m in self.members])
        self._kwargs = {"out_channels": out_channels, "base": base, "depth": depth, "dropout": dropout,
                        "stage1": stage1, "freeze_first_stage": self.freeze_first_stage}
        if self.freeze_first_stage:
            for p in self.members.parameters():
                p.requires_grad_(False)

    def export_kwargs(self) -> dict:
        return {"members": copy.deepcopy(self._specs), **self._kwargs}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_first_stage:
            self.members.eval()
        return self

    def first_stage(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for m in self.members:
            xi = m.adapt(x)
            maps.append(_head_input(m.net, xi) if self.stage1 == "features" else m.net(xi))
        return torch.cat(maps, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_first_stage):
            s1 = self.first_stage(x)
        return self.stage2(torch.cat([s1.to(x.dtype), x], dim=1))
