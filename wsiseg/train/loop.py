"""The training loop: config from YAML, checkpoints with resumption, best-on-validation weights.

``wsiseg train --config configs/unet_bn_monuseg_20x.yaml`` reproduces the shipped default model.

The seeds' model zoo trains through the same loop, chosen by the config's ``target``:

* ``mask`` (default): the binary nucleus mask (seed 000), any 1-channel model.
* ``mask_weights``: mask + U-Net border weight map (seed 001, ``loss: weighted_ce_dice``).
* ``mask_marker``: mask + USE-Net shape marker, 2 output channels (seed 002, ``lambda_bce_dice``).
* ``mask_marker_weights``: the same 2 outputs, each channel's BCE weighted by a U-Net border
  weight map (seed 001's term: of the nuclei for the mask, of the markers for the marker), so the
  gaps between touching nuclei and between their markers weigh more (``lambda_bce_dice``).
* ``instances``: Mask R-CNN boxes/labels/masks from the MoNuSeg instance map of each crop
  (seeds 001, 004; ``architecture: maskrcnn``, ``loss: maskrcnn``).
* ``class_points``: seed 003's weak labels, 15 px discs at nucleus centroids in the channels
  normal / lymphocyte / malignant / background, from CoNSeP (``data:`` its ``train`` folder;
  ``loss: rakhlin``).

``target_kwargs`` go to the target builder (:mod:`wsiseg.train.targets`), ``loss_kwargs`` to the
loss; a pre-trained encoder is ``arch_kwargs: {pretrained: /path/to/encoder.safetensors}`` (it
is not written to the sidecar: the trained weights replace it).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsiseg.models.registry import build_model, save_model
from wsiseg.predict import pad_to_multiple, resolve_device
from wsiseg.classes import CLASS_CHANNELS
from wsiseg.stain import normalise_image, training_stain
from wsiseg.train.augment import augment, random_crop
from wsiseg.train.checkpoint import Checkpoint, StepBudget, TrainState, record_best, weights_sidecar
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
    # the model zoo (see the module docstring); the defaults keep the behaviour above
    target: str = "mask"
    target_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)
    optimizer: str = "adamw"  # adamw | adam | sgd (momentum below)
    momentum: float = 0.9
    val_limit: int = 0  # validate on the first n validation images only (0: all)
    group_val_every: int = 5  # class_points: every n-th CoNSeP source image is validation
    init_from: str | None = None  # a registry model to start from (same architecture; the head's
    # matching rows are copied, so a 1-channel nucleus model can seed a mask + marker model)
    clip_grad: float = 0.0  # clip the gradients' global L2 norm to this (0: off); e.g. for Mask
    # R-CNN from random weights, whose early RPN/box losses spike
    warmup_steps: int = 0  # linear learning-rate warm-up before the cosine schedule
    # where and how fast (none of these change what is learned from a batch)
    device: str = "cpu"  # cpu | cuda | auto (cuda when there is one)
    workers: int = 0  # data-loader processes cutting and augmenting the crops (0: in the loop)
    amp: bool = False  # bfloat16 autocast of the forward pass on CUDA (losses in float32)
    max_seconds: float = 0.0  # a time budget: the cosine schedule runs to whichever of steps and
    # max_seconds is reached first, then the loop validates, saves and stops (0: steps only)
    select: str = "dice"  # keep the weights with the best validation "dice" (pooled pixel Dice) or
    # "aji" (mean AJI per image of the instances that `wsiseg run --instances` would make at the
    # model's resolution, default post-processing; with a marker channel, marker watershed)
    data_mpp: float = 0.25  # um/px of the MoNuSeg files in ``data`` (0.25 as distributed; 0.5 for
    # a copy already resampled to the model's resolution, which loads the same pixels faster)
    # stain normalisation of every training and validation image (wsiseg.stain), recorded in the
    # sidecar so that the engine applies the same: none | reinhard | macenko | vahadane; the
    # target: None (the training images pooled), a training image's name (seed 002) or a file
    stain: str = "none"
    stain_target: str | None = None
    clahe: bool = False  # contrast-limited equalisation of L (seed 004), one table per image

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**raw)


def _to_tensor(images, mean: np.ndarray, std: np.ndarray, device=None) -> torch.Tensor:
    """(N, H, W, 3) uint8 (array or tensor) -> normalised float (N, 3, H, W) in channels_last
    memory, on ``device`` (the uint8 pixels are moved, then converted there)."""
    x = torch.as_tensor(images)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.float().div_(255)
    x = (x - torch.as_tensor(mean, device=x.device)) / torch.as_tensor(std, device=x.device)
    return x.permute(0, 3, 1, 2)  # a view of NHWC memory: channels_last for free


def _net_device(net) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def predict_maps(net, image: np.ndarray, mean, std, multiple: int = 16) -> np.ndarray:
    """Whole-image sigmoid probabilities (C, H, W) float32 (reflect-padded to ``multiple``)."""
    h, w = image.shape[:2]
    x = _to_tensor(pad_to_multiple(image, multiple)[None], mean, std, _net_device(net))
    return torch.sigmoid(net(x).float())[0, :, :h, :w].cpu().numpy()


def predict_image(net, image: np.ndarray, mean, std, multiple: int = 16) -> np.ndarray:
    """Whole-image probabilities (H, W) float32 of a sigmoid model's first channel."""
    return predict_maps(net, image, mean, std, multiple)[0]


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    inter = float(np.logical_and(pred, target).sum())
    denom = float(pred.sum() + target.sum())
    return 1.0 if denom == 0 else 2 * inter / denom


def evaluate(net, samples: list[Sample], mean, std, threshold: float = 0.5, multiple: int = 16,
             instances_mpp: float | None = None) -> dict:
    """Pixel Dice over the validation images: pooled over all pixels and mean per image. With
    ``instances_mpp`` (the images' um/px), also the mean AJI per image of the instances made by
    the engine's default post-processing (a second output channel is the shape marker)."""
    net.eval()
    inter = denom = 0.0
    per, ajis = {}, {}
    for s in samples:
        maps = predict_maps(net, s.image, mean, std, multiple)
        pred = maps[0] >= threshold
        per[s.name] = dice_score(pred, s.mask > 0)
        inter += float(np.logical_and(pred, s.mask > 0).sum())
        denom += float(pred.sum() + (s.mask > 0).sum())
        if instances_mpp is not None and s.instances is not None:
            from wsiseg.metrics import aji, overlap_table
            from wsiseg.postprocess import instances_from_probability

            lab = instances_from_probability(maps[0], instances_mpp,
                                             marker_prob=maps[1] if len(maps) > 1 else None)
            ajis[s.name] = aji(overlap_table(s.instances.astype(np.int64), lab.astype(np.int64)))
    out = {
        "dice_pooled": 2 * inter / max(denom, 1.0),
        "dice_mean_per_image": float(np.mean(list(per.values()))),
        "dice_per_image": per,
    }
    if ajis:
        out["aji_mean_per_image"] = float(np.mean(list(ajis.values())))
        out["aji_per_image"] = ajis
    return out


def train(cfg: TrainConfig, log=print) -> Path:
    """Train; resumes from ``cfg.out/last.pt`` when present. Returns the best weights' path."""
    if cfg.target not in TARGETS:
        raise ValueError(f"unknown target {cfg.target!r}; known: {', '.join(TARGETS)}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; known: {', '.join(sorted(LOSSES))}")
    if cfg.select not in ("dice", "aji") or (cfg.select == "aji" and cfg.target in ("class_points", "instances")):
        raise ValueError(f"select: {cfg.select!r}: use dice, or aji for the mask targets (not {cfg.target!r})")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    if cfg.target == "class_points":
        train_s, val_s = _load_point_samples(cfg)
    else:
        train_s, val_s = split_monuseg(cfg.data, cfg.mpp, source_mpp=cfg.data_mpp)
    if cfg.val_limit:
        val_s = val_s[: cfg.val_limit]
    stain_spec, stain_meta = training_stain(cfg.stain, cfg.stain_target, cfg.clahe, {s.name: s.image for s in train_s},
                                            f"the {len(train_s)} training images")
    if stain_spec is not None:
        train_s = [dataclasses.replace(s, image=normalise_image(s.image, stain_spec)) for s in train_s]
        val_s = [dataclasses.replace(s, image=normalise_image(s.image, stain_spec)) for s in val_s]
        log(f"stain: {cfg.stain}{' + clahe' if cfg.clahe else ''} to {stain_meta['stain']['target_origin']}")
    pix = np.concatenate([s.image.reshape(-1, 3) for s in train_s]).astype(np.float64) / 255
    mean, std = pix.mean(0).astype(np.float32), pix.std(0).astype(np.float32)
    del pix
    weights = np.array([s.mask.size for s in train_s], dtype=np.float64)
    weights /= weights.sum()
    log(f"train {len(train_s)} images, val {len(val_s)} images at {cfg.mpp} um/px")

    net = build_model(cfg.architecture, **cfg.arch_kwargs)
    if cfg.init_from:
        mean, std = init_from_model(net, cfg.init_from, log)
    net = net.to(device, memory_format=torch.channels_last)
    opt = _optimizer(cfg, net)
    loss_fn = LOSSES[cfg.loss]
    targets = None if cfg.target == "mask" else [_target_of(s, cfg) for s in train_s]
    multiple = int(getattr(net, "input_multiple", 2 ** int(cfg.arch_kwargs.get("depth", 4))))
    step, best, history, elapsed = 0, -1.0, [], 0.0
    checkpoint = Checkpoint(out)
    resumed = checkpoint.resume(net, opt, map_location=device)
    if resumed is not None:
        step, best, elapsed, history = resumed.step, resumed.best, resumed.elapsed, resumed.history
        rng = np.random.default_rng([cfg.seed, step])
        log(f"resumed from {checkpoint.path} at step {step} (best val Dice {best:.4f})")

    training = {
        "data": "MoNuSeg 2018 training set (Kumar et al.), CC BY-NC-SA 4.0",
        "data_hash": data_hash(train_s),
        "train_images": [s.name for s in train_s],
        "validation_images": [s.name for s in val_s],
        "validation_split": "by image: the first image of each of the 7 organs",
        "resampled_from_mpp": 0.25,
        "config": dataclasses.asdict(cfg),
    }
    meta = weights_sidecar(cfg, net, TARGETS[cfg.target], multiple, (mean, std), training, stain_meta)
    if cfg.target != "mask":
        meta["training"]["target"] = cfg.target
        pre = cfg.arch_kwargs.get("pretrained", cfg.arch_kwargs.get("pretrained_backbone"))
        meta["training"]["pretrained_encoder"] = str(pre) if pre not in (None, False) else None
    if cfg.target == "class_points":
        meta["training"].update({
            "data": "CoNSeP (Graham et al. 2019), weak point labels (seed 003): "
                    f"{cfg.target_kwargs.get('diameter', 15)} px discs at the nucleus centroids",
            "class_mapping": "other, spindle -> normal; inflammatory -> lymphocyte; epithelial -> malignant",
            "validation_split": f"by source image: every {cfg.group_val_every}th CoNSeP image",
            "resampled_from_mpp": 0.25,
        })
    budget = StepBudget(cfg.steps, cfg.max_seconds, elapsed)
    batches = _batches(cfg, train_s, targets, weights, rng, step, pin=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else None
    machine = (f"{torch.cuda.get_device_name(device)}, {cfg.workers} data workers" if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    done = False
    while not done:
        net.train()
        lr = budget.lr(cfg.lr, step, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, tgts = next(batches)
        with amp if amp is not None else contextlib.nullcontext():
            loss = _batch_loss(cfg, net, loss_fn, imgs, tgts, mean, std, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        opt.step()
        step += 1
        done = budget.done(step)
        if step % 10 == 0:
            log(f"step {step}/{cfg.steps} loss {loss.item():.4f} lr {lr:.2e} {budget.seconds():.0f}s")
        if step % cfg.val_every == 0 or done:
            if cfg.target == "class_points":
                m = evaluate_classes(net, val_s, mean, std, multiple)
            else:
                m = evaluate(net, val_s, mean, std, multiple=multiple,
                             instances_mpp=cfg.mpp if cfg.select == "aji" else None)
            history.append({"step": step, "loss": float(loss.item()), "seconds": budget.seconds(),
                            "val_dice_pooled": m["dice_pooled"], "val_dice_mean": m["dice_mean_per_image"]})
            msg = f"  val Dice pooled {m['dice_pooled']:.4f} mean/image {m['dice_mean_per_image']:.4f}"
            if "aji_mean_per_image" in m:
                history[-1]["val_aji_mean"] = m["aji_mean_per_image"]
                msg += f" AJI {m['aji_mean_per_image']:.4f}"
            log(msg)
            score = m["aji_mean_per_image"] if cfg.select == "aji" else m["dice_pooled"]
            if score > best:
                best = score
                spent = {"steps": step, "batch_size": cfg.batch_size, "crop": cfg.crop,
                         "seconds": round(budget.seconds(), 1), "machine": machine}
                if amp is not None:
                    spent["precision"] = "bfloat16 autocast"
                save_model(net, record_best(meta, {"validation": m, "step": step, "selected_on": cfg.select},
                                            spent), out / cfg.id)
            checkpoint.save(net, opt, TrainState(step, best, budget.seconds(), history))
    log(f"done: best val {'AJI' if cfg.select == 'aji' else 'Dice'} {best:.4f}; weights {out / cfg.id}.safetensors")
    return out / f"{cfg.id}.safetensors"


def init_from_model(net, name: str, log=print) -> tuple[np.ndarray, np.ndarray]:
    """Copy a registry model's weights into ``net`` (every tensor of the same name and shape; of
    an output head with a different number of channels, the matching leading rows). Returns the
    source model's normalisation, which the fine-tuned model keeps."""
    from wsiseg.models.registry import load_model

    src = load_model(name)
    own = net.state_dict()
    state = {}
    for k, v in src.network.state_dict().items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            state[k] = v
        elif own[k].ndim == v.ndim and own[k].shape[1:] == v.shape[1:] and own[k].shape[0] > v.shape[0]:
            merged = own[k].clone()
            merged[: v.shape[0]] = v
            state[k] = merged
    if not state:
        raise ValueError(f"init_from {name}: no tensor matches the {type(net).__name__} being trained")
    net.load_state_dict(state, strict=False)
    log(f"initialised {len(state)}/{len(own)} tensors from {name}")
    return np.asarray(src.mean, np.float32), np.asarray(src.std, np.float32)


# ------------------------------------------------------------------ the model zoo's targets

# target kind -> the output channels (the sidecar's "classes")
TARGETS = {
    "mask": ("nucleus",),
    "mask_weights": ("nucleus",),
    "mask_marker": ("nucleus", "marker"),
    "mask_marker_weights": ("nucleus", "marker"),
    "instances": ("nucleus",),
    "class_points": CLASS_CHANNELS,
}


def _optimizer(cfg: TrainConfig, net) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        if all(p.requires_grad for p in net.parameters()):
            return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw, adam or sgd")


def _target_of(s, cfg: TrainConfig) -> np.ndarray:
    """The per-image training target of ``cfg.target`` (computed once per image)."""
    from wsiseg.train.targets import border_weight_map, shape_markers

    kw = dict(cfg.target_kwargs)
    if cfg.target == "class_points":
        return s.target
    if s.instances is None:
        raise ValueError(f"{s.name}: target {cfg.target!r} needs instance maps")
    if cfg.target == "mask_weights":
        return np.stack([s.mask.astype(np.float32), border_weight_map(s.instances, **kw)], -1)
    if cfg.target == "mask_marker":
        return np.stack([s.mask, shape_markers(s.instances, **kw)], -1).astype(np.uint8)
    if cfg.target == "mask_marker_weights":
        # ratio / min_erosion to the markers, w0 / sigma (px at the training mpp) to both weight maps
        wkw = {k: kw.pop(k) for k in ("w0", "sigma") if k in kw}
        markers = shape_markers(s.instances, labels=True, **kw)
        return np.stack([s.mask.astype(np.float32), (markers > 0).astype(np.float32),
                         border_weight_map(s.instances, class_weights=None, **wkw),
                         border_weight_map(markers, class_weights=None, **wkw)], -1)
    if cfg.target == "instances":
        return s.instances.astype(np.int32)
    raise ValueError(f"unknown target {cfg.target!r}")


def _crop_stack(image: np.ndarray, target: np.ndarray, size: int, rng: np.random.Generator, pad: str = "reflect"):
    """A random crop of an image and its (H, W) or (H, W, C) target; smaller images padded
    (``pad``: "reflect", or "constant" zeros for instance ids)."""
    h, w = target.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        target = np.pad(target, ((0, ph), (0, pw)) + ((0, 0),) * (target.ndim - 2), mode=pad)
        h, w = target.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], target[y : y + size, x : x + size]


def _sample_batch(cfg: TrainConfig, samples, targets, weights, rng: np.random.Generator):
    """One batch of augmented random crops: images (B, H, W, 3) uint8 and the targets, (B, H, W)
    masks (``targets`` None: the default mask target), (B, H, W, C) target stacks, or for
    Mask R-CNN a list of per-crop instance dicts."""
    imgs, tgts = [], []
    pad = "constant" if cfg.target == "instances" else "reflect"
    for i in rng.choice(len(samples), size=cfg.batch_size, p=weights):
        if targets is None:
            im, t = random_crop(samples[i].image, samples[i].mask, cfg.crop, rng)
        else:
            im, t = _crop_stack(samples[i].image, targets[i], cfg.crop, rng, pad)
        im, t = augment(im, t, rng)
        imgs.append(im)
        tgts.append(t)
    if cfg.target == "instances":
        from wsiseg.models.maskrcnn import instance_targets

        return np.stack(imgs), [instance_targets(t) for t in tgts]
    return np.stack(imgs), np.stack(tgts)


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless :func:`_sample_batch` batches from a data-loader worker (its own random stream)."""

    def __init__(self, cfg, samples, targets, weights, step: int):
        super().__init__()
        self.args = (cfg, samples, targets, weights)
        self.step = step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.args[0].seed, self.step, 1 + (info.id if info else 0)])
        while True:
            yield _sample_batch(*self.args, rng)


def _batches(cfg: TrainConfig, samples, targets, weights, rng, step: int, pin: bool = False):
    """The training batches: cut in the loop (``workers: 0``, the loop's own random stream), or by
    ``cfg.workers`` data-loader processes while the network trains."""
    if not cfg.workers:
        while True:
            yield _sample_batch(cfg, samples, targets, weights, rng)
    loader = torch.utils.data.DataLoader(
        _BatchStream(cfg, samples, targets, weights, step), batch_size=None, num_workers=cfg.workers,
        pin_memory=pin, prefetch_factor=4, persistent_workers=True)
    yield from loader


def _batch_loss(cfg: TrainConfig, net, loss_fn, imgs, tgts, mean, std, device) -> torch.Tensor:
    """A batch through the network and its loss (the losses in float32)."""
    x = _to_tensor(imgs, mean, std, device)
    kw = dict(cfg.loss_kwargs)
    if cfg.target == "instances":
        tg = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in tgts]
        return loss_fn({k: v.float() for k, v in net(x, tg).items()}, **kw)
    y = torch.as_tensor(tgts).to(device, non_blocking=True).float()
    y = y[:, None] if y.ndim == 3 else y.permute(0, 3, 1, 2).contiguous()
    logits = net(x).float()
    if cfg.target == "mask":
        return loss_fn(logits, y)
    if cfg.target == "mask_weights":
        return loss_fn(logits, y[:, :1], y[:, 1:2], **kw)
    if cfg.target == "mask_marker_weights":
        return loss_fn(logits, y[:, :2], weight=y[:, 2:4], **kw)
    return loss_fn(logits, y, **kw)


@dataclass
class PointSample:
    """A CoNSeP tile with seed 003's weak class target."""

    name: str
    group: str
    image: np.ndarray  # (H, W, 3) uint8 at the target mpp
    mask: np.ndarray  # (H, W) uint8: inside a disc
    target: np.ndarray  # (H, W, 4) uint8 one-hot normal / lymphocyte / malignant / background
    instances: np.ndarray | None = None


def load_point_samples(root: str | Path, mpp: float = 0.5, diameter: float = 15.0) -> list[PointSample]:
    """CoNSeP tiles (``images/*.jpg``, ``instances/*.png``, ``classes/*.png`` at 0.25 um/px) as
    seed 003's weak labels at ``mpp``: each nucleus' centroid with its majority class (other and
    spindle -> normal, inflammatory -> lymphocyte, epithelial -> malignant), a ``diameter`` px disc
    at the model's resolution."""
    from PIL import Image

    from wsiseg.classes import CONSEP_MPP, CONSEP_TO_CHANNEL
    from wsiseg.train.datasets import resample
    from wsiseg.train.targets import centroids, point_labels

    root = Path(root)
    files = sorted((root / "images").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{root}: no images/*.jpg (expected the CoNSeP layout with instances/ and classes/)")
    scale = CONSEP_MPP / mpp
    lut = np.array([CONSEP_TO_CHANNEL[k] for k in range(max(CONSEP_TO_CHANNEL) + 1)], np.int64)
    out = []
    for f in files:
        img = resample(np.asarray(Image.open(f).convert("RGB")), scale)
        inst = np.asarray(Image.open(root / "instances" / f"{f.stem}.png")).astype(np.int64)
        cls = np.asarray(Image.open(root / "classes" / f"{f.stem}.png")).astype(np.int64)
        pts, c = centroids(inst, cls)
        ch = lut[c]
        keep = ch != 3  # a nucleus whose pixels are mostly unlabelled gives no point
        pts = (pts[keep] + 0.5) * scale - 0.5
        tgt = point_labels(pts, ch[keep], img.shape[:2], n_channels=4, diameter=diameter)
        out.append(PointSample(f.stem, f.stem.rsplit("_", 1)[0], np.ascontiguousarray(img),
                               (tgt[..., 3] == 0).astype(np.uint8), tgt))
    return out


def _load_point_samples(cfg: TrainConfig):
    from wsiseg.train.datasets import split_groups

    samples = load_point_samples(cfg.data, cfg.mpp, float(cfg.target_kwargs.get("diameter", 15.0)))
    return split_groups(samples, cfg.group_val_every)


@torch.no_grad()
def evaluate_classes(net, samples: list[PointSample], mean, std, multiple: int = 32, threshold: float = 0.5) -> dict:
    """Pooled pixel Dice of each class channel (p >= threshold) against the weak targets; the
    mean over normal / lymphocyte / malignant is reported as ``dice_pooled`` (model selection)."""
    net.eval()
    c = samples[0].target.shape[-1] if samples else 4
    inter, denom = np.zeros(c), np.zeros(c)
    per = []
    for s in samples:
        p = predict_maps(net, s.image, mean, std, multiple) >= threshold
        t = s.target.transpose(2, 0, 1) > 0
        i = np.logical_and(p, t).sum(axis=(1, 2))
        d = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
        inter += i
        denom += d
        per.append(np.mean(np.where(d[:3] > 0, 2 * i[:3] / np.maximum(d[:3], 1), 1.0)))
    names = TARGETS["class_points"]
    dice = {f"dice_{n}": float(2 * inter[k] / denom[k]) if denom[k] else float("nan") for k, n in enumerate(names)}
    nuc = [dice[f"dice_{n}"] for n in names[:3]]
    return {"dice_pooled": float(np.nanmean(nuc)), "dice_mean_per_image": float(np.mean(per)) if per else 0.0, **dice}
