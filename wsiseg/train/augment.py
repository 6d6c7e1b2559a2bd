"""Augmentation for H&E crops: dihedral flips/rotations, HED stain jitter, brightness/contrast.

Operates on numpy crops: image (H, W, 3) uint8 and mask (H, W) uint8.
"""
from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed


def random_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator):
    """A random ``size`` x ``size`` crop; images smaller than that are reflect-padded first."""
    h, w = mask.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
        h, w = mask.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


def dihedral(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """One of the 8 flips/90-degree rotations, the same for image and mask."""
    k = int(rng.integers(0, 4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05):
    """Stain augmentation in HED space (Tellez et al. 2018): scale and shift each stain channel."""
    hed = rgb2hed(image)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-bias, bias, size=3) * np.abs(hed).reshape(-1, 3).max(axis=0)
    rgb = hed2rgb(hed * alpha + beta)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, b: float = 0.1, c: float = 0.1):
    img = image.astype(np.float32)
    img = (img - img.mean()) * rng.uniform(1 - c, 1 + c) + img.mean() + rng.uniform(-b, b) * 255
    return np.clip(img, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    image, mask = dihedral(image, mask, rng)
    if rng.random() < 0.8:
        image = hed_jitter(image, rng)
    if rng.random() < 0.8:
        image = brightness_contrast(image, rng)
    return image, mask
