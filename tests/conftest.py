"""Shared fixtures: real pixels from ../shared/data, tiny pyramidal slides, small test models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from wsiseg.models.registry import LoadedModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MONUSEG = SHARED / "monuseg" / "train"
SAMPLE_SVS = REPO / "wsiseg" / "data" / "CMU-1-Small-Region.svs"
BREAST_ID = "TCGA-A7-A13E-01Z-00-DX1"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} not present")
    return path


@pytest.fixture(scope="session")
def monuseg_image() -> np.ndarray:
    """A real 1000 x 1000 RGB H&E image (MoNuSeg, breast, 0.25 um/px)."""
    return np.asarray(Image.open(need(MONUSEG / "images" / f"{BREAST_ID}.png")).convert("RGB"))


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256) -> Path:
    """A tiled JPEG pyramidal TIFF (OpenSlide: generic-tiff) with resolution tags."""
    with tifffile.TiffWriter(path) as tw:
        lv = image
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)
            tw.write(lv, tile=(tile, tile), compression="jpeg", photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            lv = np.ascontiguousarray(lv[::2, ::2])
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


class ConstantNet(nn.Module):
    """Logit c everywhere: a constant probability map."""

    def __init__(self, p: float):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))

    def forward(self, x):
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), self.logit, dtype=x.dtype)


def conv_net(seed: int = 0) -> nn.Module:
    """A small translation-equivariant CNN (receptive field 7 px), fixed random weights."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(4, 1, 3, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def test_model(net: nn.Module, mpp: float = 0.5, model_id: str = "test") -> LoadedModel:
    meta = {"id": model_id, "architecture": "test", "classes": ["nucleus"], "mpp": mpp, "activation": "sigmoid",
            "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "input_multiple": 1}
    return LoadedModel(net.eval(), meta)


test_model.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def tiny_unet_path(tmp_path_factory) -> Path:
    """A small untrained U-Net saved as safetensors + sidecar (fast; for mechanics, not accuracy)."""
    from wsiseg.models.registry import build_model, save_model

    torch.manual_seed(0)
    net = build_model("unet_bn", base=4, depth=2)
    meta = {"id": "tiny-unet-test", "architecture": "unet_bn", "arch_kwargs": {"base": 4, "depth": 2},
            "classes": ["nucleus"], "mpp": 0.5, "activation": "sigmoid", "input_multiple": 4,
            "normalization": {"mean": [0.7, 0.55, 0.7], "std": [0.15, 0.2, 0.15]}}
    return save_model(net.eval(), meta, tmp_path_factory.mktemp("models") / "tiny")


# --------------------------------------------------------------------------- test tiers
# Tiers follow measured time: a test that is not marked `slow` and took longer than SLOW_SECONDS
# (its setup, fixtures included, plus its call) is listed at the end of the run, so that
# `pytest -m "not slow"` stays the quick tier. The README's `pytest` runs both tiers, as CI does.
SLOW_SECONDS = 5.0
_SPENT: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and item.get_closest_marker("slow") is None:
        _SPENT[item.nodeid] = _SPENT.get(item.nodeid, 0.0) + rep.duration


def pytest_terminal_summary(terminalreporter):
    over = sorted(((s, n) for n, s in _SPENT.items() if s > SLOW_SECONDS), reverse=True)
    if over:
        terminalreporter.section(f"tests not marked slow that took over {SLOW_SECONDS:g} s")
        for s, n in over:
            terminalreporter.write_line(f"{s:6.1f} s  {n}")
