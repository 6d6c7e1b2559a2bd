"""Nucleus + class training: one U-Net, a nucleus channel and seed 003's four class channels.

The network's output channels are ``nucleus, normal, lymphocyte, malignant, background``, all
sigmoid. Steps alternate between

* a MoNuSeg batch (nucleus masks only): BCE + Dice on the nucleus channel (seed 000), and
* a class batch (CoNSeP + MoNuSAC, mapped to Normal / Lymphocyte / Malignant / Background):
  seed 003's loss ``sum_c w_c [(1 - alpha) BCE_c - alpha J_c]`` with weights 1/1/4/1 and
  alpha = 0.15 on the class channels, plus BCE + Dice on the nucleus channel.

Training starts from a nucleus model's weights (``init_from``) when given: every tensor is copied
and the nucleus row of the 1x1 head too, so the class head is the only new part.
``wsiseg train --config configs/unet_bn_nuclei_classes_20x.yaml`` reproduces the shipped model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsiseg.models.registry import build_model, save_model
from wsiseg.train.augment import augment
from wsiseg.train.datasets import (
    CLASS_CHANNELS, ClassSample, data_hash, load_consep, load_monusac, split_groups, split_monuseg,
)
from wsiseg.train.loop import init_from_model
from wsiseg.train.losses import masked_bce_dice, rakhlin_loss

OUTPUT_CHANNELS = ("nucleus",) + CLASS_CHANNELS


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

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MultitaskConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        if "class_weights" in raw:
            raw["class_weights"] = tuple(raw["class_weights"])
        return cls(**raw)


def _crop_pad(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, pad_label: int):
    """A random crop; smaller images are zero-padded and the padding gets weight 0."""
    h, w = labels.shape
    wgt = np.ones((h, w), np.uint8)
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=pad_label)
        wgt = np.pad(wgt, ((0, ph), (0, pw)))
        h, w = labels.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    sl = (slice(y, y + size), slice(x, x + size))
    return image[sl], labels[sl], wgt[sl]


def _to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255)
    x = (x - torch.as_tensor(mean)) / torch.as_tensor(std)
    return x.permute(0, 3, 1, 2)


@torch.no_grad()
def predict_channels(net, image: np.ndarray, mean, std, multiple: int = 16) -> np.ndarray:
    """(C, H, W) sigmoid probabilities of a whole image (reflect-padded to the multiple)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    return torch.sigmoid(net(_to_tensor(img[None], mean, std)))[0, :, :h, :w].numpy()


def evaluate_classes(net, nuc_val, cls_val: list[ClassSample], mean, std) -> dict:
    """Pooled pixel Dice: nucleus on MoNuSeg val; each class channel (p >= 0.5) on the class val."""
    net.eval()
    inter = denom = 0.0
    for s in nuc_val:
        p = predict_channels(net, s.image, mean, std)[0] >= 0.5
        inter += float(np.logical_and(p, s.mask > 0).sum())
        denom += float(p.sum() + (s.mask > 0).sum())
    out = {"nucleus_dice_monuseg": 2 * inter / max(denom, 1.0)}
    ci = np.zeros(len(CLASS_CHANNELS))
    cd = np.zeros(len(CLASS_CHANNELS))
    ni = nd = 0.0
    for s in cls_val:
        probs = predict_channels(net, s.image, mean, std)
        for c in range(len(CLASS_CHANNELS)):
            p, t = probs[1 + c] >= 0.5, s.classes == c
            ci[c] += np.logical_and(p, t).sum()
            cd[c] += p.sum() + t.sum()
        p, t = probs[0] >= 0.5, s.mask > 0
        ni += np.logical_and(p, t).sum()
        nd += p.sum() + t.sum()
    for c, name in enumerate(CLASS_CHANNELS):
        out[f"dice_{name}"] = float(2 * ci[c] / cd[c]) if cd[c] else float("nan")
    out["nucleus_dice_class_data"] = float(2 * ni / max(nd, 1.0))
    out["mean_dice_nlm"] = float(np.nanmean([out[f"dice_{n}"] for n in CLASS_CHANNELS[:3]]))
    out["score"] = 0.5 * out["nucleus_dice_monuseg"] + 0.5 * out["mean_dice_nlm"]
    return out


def train_multitask(cfg: MultitaskConfig, log=print) -> Path:
    """Train; resumes from ``cfg.out/last.pt``. Returns the best weights' path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    nuc_train, nuc_val = split_monuseg(cfg.monuseg, cfg.mpp)
    consep_tr, consep_va = split_groups(load_consep(cfg.consep, cfg.mpp), cfg.consep_val_every)
    cls_train, cls_val = list(consep_tr), list(consep_va)
    if cfg.monusac:
        mt, mv = split_groups(load_monusac(cfg.monusac, cfg.mpp), cfg.monusac_val_every)
        cls_train += mt
        cls_val += mv
    log(f"nucleus data: MoNuSeg {len(nuc_train)} train / {len(nuc_val)} val images; class data: "
        f"{len(cls_train)} train / {len(cls_val)} val images (CoNSeP + MoNuSAC) at {cfg.mpp} um/px")

    net = build_model(cfg.architecture, **{**cfg.arch_kwargs, "out_channels": len(OUTPUT_CHANNELS)})
    if cfg.init_from:
        mean, std = init_from_model(net, cfg.init_from, log)
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
    nuc_p = np.array([s.mask.size for s in nuc_train], np.float64)
    nuc_p /= nuc_p.sum()
    cls_p = np.array([s.classes.size for s in cls_train], np.float64)
    cls_p /= cls_p.sum()

    step, best, history, elapsed = 0, -1.0, [], 0.0
    ckpt = out / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, best, elapsed = int(state["step"]), float(state["best"]), float(state["elapsed"])
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
        rng = np.random.default_rng([cfg.seed, step])
        log(f"resumed from {ckpt} at step {step} (best score {best:.4f})")

    meta = {
        "id": cfg.id,
        "architecture": cfg.architecture,
        "arch_kwargs": {**cfg.arch_kwargs, "out_channels": len(OUTPUT_CHANNELS)},
        "classes": list(OUTPUT_CHANNELS),
        "activation": "sigmoid",
        "mpp": cfg.mpp,
        "input_multiple": 2 ** int(cfg.arch_kwargs.get("depth", 4)),
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std)), "input_range": "RGB / 255"},
        "training": {
            "data": ("MoNuSeg 2018 training set (nucleus channel; CC BY-NC-SA 4.0); CoNSeP (Graham et al. "
                     "2019) and a MoNuSAC 2020 subset (CC BY-NC-SA 4.0) for the class channels"),
            "class_mapping": {
                "consep": "other, spindle -> normal; inflammatory -> lymphocyte; epithelial -> malignant",
                "monusac": "epithelial -> malignant; lymphocyte, macrophage, neutrophil -> lymphocyte",
            },
            "data_hash": data_hash(nuc_train) + "-" + _class_hash(cls_train),
            "validation_split": (
                "by image: MoNuSeg the first image of each organ; CoNSeP every "
                f"{cfg.consep_val_every}th source image; MoNuSAC every {cfg.monusac_val_every}th slide"),
            "validation_images": sorted({s.name for s in nuc_val} | {s.group for s in cls_val}),
            "init_from": cfg.init_from,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        },
    }
    if cfg.prior_bias and step == 0:
        shift = calibrate_class_bias(net, cls_train, mean32, std32, cfg.class_crop, rng)
        log("class biases shifted to the training priors: " + ", ".join(
            f"{c} {v:+.2f}" for c, v in zip(CLASS_CHANNELS, shift)))
        meta["training"]["prior_bias_shift"] = [round(float(v), 4) for v in shift]
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        net.train()
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        class_step = step % 2 == 1
        imgs, labs, wgts = [], [], []
        if class_step:
            for i in rng.choice(len(cls_train), size=cfg.class_batch_size, p=cls_p):
                s = cls_train[i]
                im, lb, wg = _crop_pad(s.image, s.classes, cfg.class_crop, rng, pad_label=3)
                im, lbw = augment(im, np.stack([lb, wg], -1), rng)
                imgs.append(im)
                labs.append(lbw[..., 0])
                wgts.append(lbw[..., 1])
        else:
            for i in rng.choice(len(nuc_train), size=cfg.batch_size, p=nuc_p):
                s = nuc_train[i]
                im, lb, wg = _crop_pad(s.image, s.mask, cfg.crop, rng, pad_label=0)
                im, lbw = augment(im, np.stack([lb, wg], -1), rng)
                imgs.append(im)
                labs.append(lbw[..., 0])
                wgts.append(lbw[..., 1])
        x = _to_tensor(np.stack(imgs), mean32, std32)
        lab = torch.from_numpy(np.stack(labs).astype(np.int64))
        w = torch.from_numpy(np.stack(wgts)).float()[:, None]
        logits = net(x)
        if class_step:
            onehot = torch.nn.functional.one_hot(lab, len(CLASS_CHANNELS)).permute(0, 3, 1, 2).float()
            nucleus = (lab != CLASS_CHANNELS.index("background")).float()[:, None]
            loss = masked_bce_dice(logits[:, :1], nucleus, w) + rakhlin_loss(
                logits[:, 1:], onehot, cfg.class_weights, cfg.alpha, w)
        else:
            loss = masked_bce_dice(logits[:, :1], lab.float()[:, None], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            log(f"step {step}/{cfg.steps} {'class' if class_step else 'nucleus'} loss {loss.item():.4f} "
                f"lr {lr:.2e} {time.perf_counter() - t0:.0f}s")
        if step % cfg.val_every == 0 or step == cfg.steps:
            m = evaluate_classes(net, nuc_val, cls_val, mean32, std32)
            history.append({"step": step, "seconds": time.perf_counter() - t0, **m})
            log("  val " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
            if m["score"] > best:
                best = m["score"]
                meta["metrics"] = {"validation": m, "step": step}
                meta["training"]["budget"] = {
                    "steps": step, "batch_size": [cfg.batch_size, cfg.class_batch_size],
                    "crop": [cfg.crop, cfg.class_crop], "seconds": round(time.perf_counter() - t0, 1),
                    "machine": f"CPU, {torch.get_num_threads()} threads",
                }
                save_model(net, meta, out / cfg.id)
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step,
                        "best": best, "elapsed": time.perf_counter() - t0}, out / "last.tmp")
            (out / "last.tmp").replace(ckpt)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    log(f"done: best validation score {best:.4f}; weights {out / cfg.id}.safetensors")
    return out / f"{cfg.id}.safetensors"


@torch.no_grad()
def calibrate_class_bias(net, samples: list[ClassSample], mean, std, crop: int, rng: np.random.Generator,
                         n: int = 64) -> np.ndarray:
    """Shift the class channels' output biases (``net.head``, channels 1..4) by
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
    cur = torch.sigmoid(net(_to_tensor(np.stack(crops), mean, std)))[:, 1:].mean((0, 2, 3)).numpy()
    net.train(was)
    cur = np.clip(cur.astype(np.float64), 1e-4, 1 - 1e-4)
    shift = np.log(prior / (1 - prior)) - np.log(cur / (1 - cur))
    net.head.bias[1:] += torch.as_tensor(shift, dtype=net.head.bias.dtype)
    return shift


def _class_hash(samples: list[ClassSample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(s.image.tobytes())
        h.update(s.classes.tobytes())
    return h.hexdigest()[:16]
