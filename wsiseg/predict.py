"""Predictor: batches of RGB tiles -> per-class probabilities, on CUDA (AMP) or all CPU cores."""
from __future__ import annotations

import os

import numpy as np
import torch

from wsiseg.models.registry import LoadedModel


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into the
    convolution (eval-mode statistics; ``torch.nn.utils.fusion.fuse_conv_bn_eval``). Returns a
    new module; the input is left untouched. Same outputs up to float rounding, one op fewer."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for mod in net.modules():
        if not isinstance(mod, torch.nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats:
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = torch.nn.Identity()
    return net


class Predictor:
    """Runs a :class:`LoadedModel` on tiles.

    Input: (N, T, T, 3) uint8 RGB. Output: (N, C, T, T) float32 probabilities (sigmoid or
    softmax as the sidecar says). The batch is normalised on the device and fed channels_last
    (a view of the NHWC array, no copy), which is about 1.5x faster on CPU than NCHW.
    """

    def __init__(self, model: LoadedModel, device: str = "auto", threads: int | None = None):
        self.model = model
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.net = fold_batchnorm(model.network).to(self.device).to(memory_format=torch.channels_last).eval()
        self.amp = self.device.type == "cuda"
        self._mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def channels(self) -> list[str]:
        return self.model.classes

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        t = tiles.shape[1]
        if t % self.model.input_multiple:
            raise ValueError(f"tile size {t} is not a multiple of {self.model.input_multiple}, which the model needs")
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last
        x = (x - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.net(x)
        logits = logits.float()
        if self.model.activation == "softmax":
            probs = torch.softmax(logits, dim=1)
        else:
            probs = torch.sigmoid(logits)
        return probs.contiguous().cpu().numpy()
