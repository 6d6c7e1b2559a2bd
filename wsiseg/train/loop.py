"""The training loop: config from YAML, checkpoints with resumption, best-on-validation weights.

``wsiseg train --config configs/unet_bn_monuseg_20x.yaml`` reproduces the shipped default model.
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
from wsiseg.train.augment import augment, random_crop
from wsiseg.train.datasets import Sample, data_hash, split_monuseg
from wsiseg.train.losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    id: str = "unet-bn-monuseg-20x"
    architecture: str = "unet_bn"
    arch_kwargs: dict = field(default_factory=lambda: {"base": 16, "depth": 4})
    data: str = "../shared/data/monuseg/train"
    mpp: float = 0.5
    crop: int = 256
    batch_size: int = 8
    steps: int = 1200
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss: str = "bce_dice"
    seed: int = 0
    threads: int = 0  # 0: all cores
    val_every: int = 100
    out: str = "runs/unet-bn-monuseg-20x"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**raw)


def _to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised float (N, 3, H, W) in channels_last memory."""
    x = torch.from_numpy(images).float().div_(255)
    x = (x - torch.from_numpy(mean)) / torch.from_numpy(std)
    return x.permute(0, 3, 1, 2)  # a view of NHWC memory: channels_last for free


@torch.no_grad()
def predict_image(net, image: np.ndarray, mean, std, multiple: int = 16) -> np.ndarray:
    """Whole-image probabilities (H, W) float32 for a 1-channel sigmoid model (reflect-padded)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    x = _to_tensor(img[None], mean, std)
    p = torch.sigmoid(net(x))[0, 0, :h, :w]
    return p.numpy()


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float(np.logical_and(pred, target).sum())
    denom = float(pred.sum() + target.sum())
    return 1.0 if denom == 0 else 2 * inter / denom


def evaluate(net, samples: list[Sample], mean, std, threshold: float = 0.5) -> dict:
    """Pixel Dice over the validation images: pooled over all pixels and mean per image."""
    net.eval()
    inter = denom = 0.0
    per = {}
    for s in samples:
        pred = predict_image(net, s.image, mean, std) >= threshold
        per[s.name] = dice_score(pred, s.mask > 0)
        inter += float(np.logical_and(pred, s.mask > 0).sum())
        denom += float(pred.sum() + (s.mask > 0).sum())
    return {
        "dice_pooled": 2 * inter / max(denom, 1.0),
        "dice_mean_per_image": float(np.mean(list(per.values()))),
        "dice_per_image": per,
    }


def train(cfg: TrainConfig, log=print) -> Path:
    """Train; resumes from ``cfg.out/last.pt`` when present. Returns the best weights' path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    train_s, val_s = split_monuseg(cfg.data, cfg.mpp)
    pix = np.concatenate([s.image.reshape(-1, 3) for s in train_s]).astype(np.float64) / 255
    mean, std = pix.mean(0).astype(np.float32), pix.std(0).astype(np.float32)
    weights = np.array([s.mask.size for s in train_s], dtype=np.float64)
    weights /= weights.sum()
    log(f"train {len(train_s)} images, val {len(val_s)} images at {cfg.mpp} um/px")

    net = build_model(cfg.architecture, **cfg.arch_kwargs).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = LOSSES[cfg.loss]
    step, best, history, elapsed = 0, -1.0, [], 0.0
    ckpt = out / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, best, elapsed = int(state["step"]), float(state["best"]), float(state["elapsed"])
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
        rng = np.random.default_rng([cfg.seed, step])
        log(f"resumed from {ckpt} at step {step} (best val Dice {best:.4f})")

    meta = {
        "id": cfg.id,
        "architecture": cfg.architecture,
        "arch_kwargs": dict(cfg.arch_kwargs),
        "classes": ["nucleus"],
        "activation": "sigmoid",
        "mpp": cfg.mpp,
        "input_multiple": 2 ** int(cfg.arch_kwargs.get("depth", 4)),
        "normalization": {"mean": mean.tolist(), "std": std.tolist(), "input_range": "RGB / 255"},
        "training": {
            "data": "MoNuSeg 2018 training set (Kumar et al.), CC BY-NC-SA 4.0",
            "data_hash": data_hash(train_s),
            "train_images": [s.name for s in train_s],
            "validation_images": [s.name for s in val_s],
            "validation_split": "by image: the first image of each of the 7 organs",
            "resampled_from_mpp": 0.25,
            "config": dataclasses.asdict(cfg),
        },
    }
    t0 = time.perf_counter() - elapsed
    while step < cfg.steps:
        net.train()
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, masks = [], []
        for i in rng.choice(len(train_s), size=cfg.batch_size, p=weights):
            im, mk = random_crop(train_s[i].image, train_s[i].mask, cfg.crop, rng)
            im, mk = augment(im, mk, rng)
            imgs.append(im)
            masks.append(mk)
        x = _to_tensor(np.stack(imgs), mean, std)
        y = torch.from_numpy(np.stack(masks)).float()[:, None]
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            log(f"step {step}/{cfg.steps} loss {loss.item():.4f} lr {lr:.2e} {time.perf_counter() - t0:.0f}s")
        if step % cfg.val_every == 0 or step == cfg.steps:
            m = evaluate(net, val_s, mean, std)
            history.append({"step": step, "loss": float(loss.item()), "seconds": time.perf_counter() - t0,
                            "val_dice_pooled": m["dice_pooled"], "val_dice_mean": m["dice_mean_per_image"]})
            log(f"  val Dice pooled {m['dice_pooled']:.4f} mean/image {m['dice_mean_per_image']:.4f}")
            if m["dice_pooled"] > best:
                best = m["dice_pooled"]
                meta["metrics"] = {"validation": m, "step": step}
                meta["training"]["budget"] = {
                    "steps": step, "batch_size": cfg.batch_size, "crop": cfg.crop,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "machine": f"CPU, {torch.get_num_threads()} threads",
                }
                save_model(net, meta, out / cfg.id)
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step,
                        "best": best, "elapsed": time.perf_counter() - t0}, out / "last.tmp")
            (out / "last.tmp").replace(ckpt)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    log(f"done: best val Dice {best:.4f}; weights {out / cfg.id}.safetensors")
    return out / f"{cfg.id}.safetensors"
