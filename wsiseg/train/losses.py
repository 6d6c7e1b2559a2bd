"""Losses from the seeds. Logits in, (N, C, H, W); targets float in [0, 1], same shape."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2|Y.P| + 1) / (|Y| + |P| + 1) over the batch (seed 000, eq. 3)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + target.sum() + smooth)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice loss (seed 000, eq. 1)."""
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)


LOSSES = {"bce_dice": bce_dice_loss, "dice": soft_dice_loss}


def soft_jaccard(p: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 eps: float = 1e-7) -> torch.Tensor:
    """Seed 003, eq. 2: the mean over pixels of y*p / (y + p - y*p), per channel -> (C,)."""
    j = (target * p) / (target + p - target * p + eps)
    dims = (0, 2, 3)
    if weight is None:
        return j.mean(dim=dims)
    return (j * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1.0)


def rakhlin_loss(logits: torch.Tensor, target: torch.Tensor, class_weights=(1.0, 1.0, 4.0, 1.0),
                 alpha: float = 0.15, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 003, eq. 1 and 3: sum_c w_c [(1 - alpha) BCE_c - alpha J_c] / sum_c w_c.

    ``logits``/``target`` (N, C, H, W) with C = len(class_weights) (Normal, Lymphocyte, Malignant,
    Background, weights 1/1/4/1 and alpha = 0.15 as in the paper). ``weight`` (N, 1, H, W) masks
    pixels out of the loss (padding), 1 = counted.
    """
    w = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        bce_c = bce.mean(dim=(0, 2, 3))
    else:
        bce_c = (bce * weight).sum(dim=(0, 2, 3)) / weight.sum(dim=(0, 2, 3)).clamp_min(1.0)
    jac_c = soft_jaccard(torch.sigmoid(logits), target, weight)
    per_class = (1 - alpha) * bce_c - alpha * jac_c
    return (w * per_class).sum() / w.sum()


def masked_bce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    smooth: float = 1.0) -> torch.Tensor:
    """BCE + Dice (seed 000) counting only pixels where ``weight`` is 1 (padding excluded)."""
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()
    bce = bce / weight.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dice = 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return bce + dice


def soft_dice_squared(p: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice coefficient with squared terms, 2 sum(p g) / (sum p^2 + sum g^2), per channel -> (C,)
    (seed 001 eq. 3, seed 002 eq. 1); ``smooth`` keeps empty channels at 1."""
    dims = (0, 2, 3)
    inter = (p * target).sum(dims)
    return (2 * inter + smooth) / ((p * p).sum(dims) + (target * target).sum(dims) + smooth)


def weighted_ce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                     smooth: float = 1.0) -> torch.Tensor:
    """Seed 001, eq. 1-3: pixel-weighted cross-entropy with the U-Net weight map plus (1 - soft Dice).

    ``logits``/``target`` (N, 1, H, W) (a sigmoid output is the two-class softmax of the paper);
    ``weight`` (N, 1, H, W) from :func:`wsiseg.train.targets.border_weight_map`; None: a 2-channel
    ``target`` carries it as its second channel. The cross-entropy is the weighted sum over pixels
    divided by the number of pixels (so a weight map of ones gives plain BCE).
    """
    if weight is None:
        if target.shape[1] != 2:
            raise ValueError("weighted_ce_dice needs a weight map: pass weight= or a 2-channel target (mask, weight)")
        target, weight = target[:, :1], target[:, 1:]
    wce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).mean()
    dice = soft_dice_squared(torch.sigmoid(logits), target, smooth).mean()
    return wce + (1 - dice)


def lambda_bce_dice(logits: torch.Tensor, target: torch.Tensor, lam: float = 0.5, smooth: float = 1.0,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 002, eq. 3: ``lambda * BCE + (1 - lambda) * (1 - Dice)``, averaged over the channels
    (USE-Net: channel 0 the nucleus mask, channel 1 the shape marker); lambda = 0.5 in the paper.
    ``weight``: per-pixel BCE weights of the same shape as ``target`` (U-Net border weight maps,
    seed 001's term, one per channel: target ``mask_marker_weights``); the weighted BCE is the
    weighted sum over the pixels divided by their number, so weights of ones give the plain loss."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        if weight.shape != target.shape:
            raise ValueError(f"weight {tuple(weight.shape)} must have the target's shape {tuple(target.shape)}")
        bce = bce * weight
    bce = bce.mean(dim=(0, 2, 3))
    dice = soft_dice_squared(torch.sigmoid(logits), target, smooth)
    return (lam * bce + (1 - lam) * (1 - dice)).mean()


def maskrcnn_loss(losses: dict) -> torch.Tensor:
    """Mask R-CNN: the sum of torchvision's loss dict (RPN, box, class and mask losses)."""
    return sum(losses.values())


LOSSES.update({
    "weighted_ce_dice": weighted_ce_dice,
    "lambda_bce_dice": lambda_bce_dice,
    "rakhlin": rakhlin_loss,
    "maskrcnn": maskrcnn_loss,
})
