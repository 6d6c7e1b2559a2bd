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
