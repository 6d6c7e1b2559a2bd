"""Model registry: architecture name -> builder; weights as safetensors + JSON sidecar.

A model on disk is two files, ``NAME.safetensors`` and ``NAME.json``. The sidecar carries what
the engine needs to use the weights correctly::

    {"id": "...", "architecture": "unet_bn", "arch_kwargs": {...},
     "classes": ["nucleus"], "mpp": 0.5, "activation": "sigmoid",
     "normalization": {"mean": [...], "std": [...]},   # on RGB scaled to [0, 1]
     "input_multiple": 16, "training": {...}, "metrics": {...}}

Weights are never unpickled: safetensors only.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from wsiseg.models.unet import UNetBN


def _zoo(name: str) -> Callable[..., nn.Module]:
    """A builder that imports the model zoo (timm, torchvision) only when it is used."""

    def build(**kwargs: Any) -> nn.Module:
        if name == "MaskRCNNSemantic":
            from wsiseg.models import maskrcnn as mod
        else:
            from wsiseg.models import zoo as mod
        return getattr(mod, name)(**kwargs)

    build.__name__ = build.__qualname__ = name
    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet_bn": UNetBN,
    # the seeds' model zoo (wsiseg.models.zoo, wsiseg.models.maskrcnn)
    "unet_timm": _zoo("TimmUNet"),  # seeds 000, 001: U-Net on a timm encoder
    "fpn_rakhlin": _zoo("FPNNet"),  # seed 003: ResNet-34 + FPN decoder, 4 classes
    "use_net": _zoo("USENet"),  # seed 002: SE-ResNet-50 U-Net, mask + shape marker
    "maskrcnn": _zoo("MaskRCNNSemantic"),  # seeds 001, 004: Mask R-CNN, ResNet-101 FPN
    "unet_ensemble": _zoo("UNetEnsemble"),  # seed 001: mean of U-Net probabilities
    "gb_unet": _zoo("GBUNet"),  # seed 001: two-stage GB U-Net
}

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "unet-bn-nuclei-classes-20x"


class ModelError(ValueError):
    """A model name or file that cannot be used; the message says why and what to do."""


def list_models() -> list[str]:
    """Names of the shipped models (those with a sidecar in the package's weights folder)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def build_model(architecture: str, **kwargs: Any) -> nn.Module:
    """Build an untrained network by registry name."""
    try:
        builder = _BUILDERS[architecture]
    except KeyError:
        raise ModelError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(_BUILDERS))}"
        ) from None
    return builder(**kwargs)


@dataclass(frozen=True)
class LoadedModel:
    """A network in eval mode plus the metadata from its sidecar."""

    network: nn.Module
    meta: dict = field(repr=False)

    @property
    def id(self) -> str:
        return self.meta.get("id", "unknown")

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def mpp(self) -> float:
        return float(self.meta["mpp"])

    @property
    def mean(self) -> list[float]:
        return list(self.meta["normalization"]["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.meta["normalization"]["std"])

    @property
    def activation(self) -> str:
        return self.meta.get("activation", "sigmoid")

    @property
    def input_multiple(self) -> int:
        return int(self.meta.get("input_multiple", 16))


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """Map a registry name or a path (with or without suffix) to the ``.safetensors`` file."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path)
    candidates = []
    if p.suffix in (".safetensors", ".json"):
        candidates.append(p.with_suffix(".safetensors"))
    else:
        candidates += [p.with_name(p.name + ".safetensors"), WEIGHTS_DIR / f"{p.name}.safetensors"]
    for c in candidates:
        if c.is_file() and c.with_suffix(".json").is_file():
            return c
    known = ", ".join(list_models()) or "none shipped"
    raise ModelError(
        f"model {str(name_or_path)!r} not found: give a shipped name ({known}) or the path of a "
        "NAME.safetensors file with its NAME.json sidecar beside it"
    )


def save_model(network: nn.Module, meta: dict, path: str | Path) -> Path:
    """Write ``path.safetensors`` and ``path.json``; returns the safetensors path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path), metadata={"id": str(meta.get("id", path.stem))})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def export_model(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Copy a trained model for shipping: float tensors stored as float16 (half the size;
    :func:`load_model` casts them back to the network's float32). The sidecar is kept, with a
    note of the storage dtype."""
    import json as _json

    from safetensors.torch import load_file, save_file

    src = resolve_model_path(src)
    meta = _json.loads(src.with_suffix(".json").read_text())
    state = load_file(str(src))
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
        meta["storage_dtype"] = "float16"
    dst = Path(dst).with_suffix(".safetensors")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata={"id": str(meta.get("id", dst.stem))})
    dst.with_suffix(".json").write_text(_json.dumps(meta, indent=2) + "\n")
    return dst


def load_model(name_or_path: str | Path | None = None) -> LoadedModel:
    """Load a model by shipped name or path; returns it in eval mode on the CPU."""
    from safetensors.torch import load_file

    path = resolve_model_path(name_or_path)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path.with_suffix('.json')}: sidecar is not valid JSON ({e})") from None
    for key in ("architecture", "classes", "mpp", "normalization"):
        if key not in meta:
            raise ModelError(f"{path.with_suffix('.json')}: sidecar lacks the field {key!r}")
    kwargs = dict(meta.get("arch_kwargs", {}))
    kwargs.pop("pretrained", None)  # the saved weights replace any pre-trained encoder
    kwargs.pop("pretrained_backbone", None)
    with warnings.catch_warnings():  # "random weights" warnings do not apply: weights follow
        warnings.filterwarnings("ignore", message=".*starts from random weights.*")
        net = build_model(meta["architecture"], **kwargs)
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not fit architecture {meta['architecture']!r} "
            f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)"
        )
    net.eval()
    return LoadedModel(net, meta)


def ensemble_model(members: list[str | Path], dst: str | Path, model_id: str | None = None) -> Path:
    """Combine trained models into seed 001's U-Net ensemble (pixel-wise mean of the members'
    sigmoid probabilities, :class:`wsiseg.models.zoo.UNetEnsemble`) saved as one model: every
    member's weights in ``dst.safetensors``, its architecture in the sidecar. The members must
    give the same classes at the same um/px with sigmoid outputs; each keeps its own input
    normalisation (mapped onto the first member's, which the ensemble's sidecar states). The
    first member's instance post-processing (``postprocess``) is kept."""
    from wsiseg.models.zoo import UNetEnsemble

    if len(members) < 2:
        raise ModelError("an ensemble needs at least two trained models")
    loaded = []
    for m in members:
        path = resolve_model_path(m)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("activation", "sigmoid") != "sigmoid":
            raise ModelError(f"{path}: the ensemble averages sigmoid probabilities; this model uses {meta['activation']}")
        loaded.append((path, meta))
    classes = loaded[0][1]["classes"]
    for path, meta in loaded[1:]:
        if meta["classes"] != classes:
            raise ModelError(f"{path}: classes {meta['classes']} differ from the first member's {classes}")
    try:
        net = UNetEnsemble([str(p) for p, _ in loaded])
    except ValueError as e:  # e.g. members at different um/px
        raise ModelError(str(e)) from None
    ref = net.reference
    dst = Path(dst).with_suffix(".safetensors")
    first = loaded[0][1]
    meta = {
        "id": model_id or dst.stem,
        "architecture": "unet_ensemble",
        "arch_kwargs": net.export_kwargs(),
        "classes": list(classes),
        "activation": "sigmoid",
        "mpp": ref["mpp"],
        "input_multiple": ref["input_multiple"],
        "normalization": ref["normalization"],
        "training": {
            "ensemble_of": [
                {"id": meta.get("id", path.stem), "file": path.name,
                 "data": meta.get("training", {}).get("data"),
                 "data_hash": meta.get("training", {}).get("data_hash"),
                 "metrics": meta.get("metrics")}
                for path, meta in loaded
            ],
            "note": "no training of its own: the members' weights, averaged at inference (seed 001's U-Net ensemble)",
        },
    }
    if "postprocess" in first:
        meta["postprocess"] = first["postprocess"]
        meta["postprocess_from"] = first.get("id", loaded[0][0].stem)
    return save_model(net, meta, dst)
