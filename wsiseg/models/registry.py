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
from typing import Any, Callable, Sequence

import torch
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


def _composite(name: str) -> Callable[..., nn.Module]:
    """A builder of a network made of other models (``members``: specs or trained models'
    names/paths, resolved here by :func:`build_members`), so the zoo never looks models up."""

    def build(members: Sequence, **kwargs: Any) -> nn.Module:
        from wsiseg.models import zoo

        built, specs, ref = build_members(members)
        return getattr(zoo, name)(built, specs, ref, **kwargs)

    build.__name__ = build.__qualname__ = name
    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet_bn": UNetBN,
    # the seeds' model zoo (wsiseg.models.zoo, wsiseg.models.maskrcnn)
    "unet_timm": _zoo("TimmUNet"),  # seeds 000, 001: U-Net on a timm encoder
    "fpn_rakhlin": _zoo("FPNNet"),  # seed 003: ResNet-34 + FPN decoder, 4 classes
    "use_net": _zoo("USENet"),  # seed 002: SE-ResNet-50 U-Net, mask + shape marker
    "maskrcnn": _zoo("MaskRCNNSemantic"),  # seeds 001, 004: Mask R-CNN, ResNet-101 FPN
    "unet_ensemble": _composite("UNetEnsemble"),  # seed 001: mean of U-Net probabilities
    "gb_unet": _composite("GBUNet"),  # seed 001: two-stage GB U-Net
}

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "unet-bn-nuclei-classes-20x"


class ModelError(ValueError):
    """A model name or file that cannot be used; the message says why and what to do."""


def _kind(meta: dict) -> str:
    """``cellularity`` for a cellularity regressor's sidecar (``"format": "cellularity...``), else
    ``segmentation``."""
    return "cellularity" if str(meta.get("format", "")).startswith("cellularity") else "segmentation"


def list_models(kind: str = "segmentation") -> list[str]:
    """Names of the shipped models of ``kind``: ``segmentation`` (for ``--model``) or
    ``cellularity`` (the regressors, for ``--lgbm`` / ``--cnn``), by their sidecars in the
    package's weights folder."""
    names = []
    for p in sorted(WEIGHTS_DIR.glob("*.json")):
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and _kind(meta) == kind:
            names.append(p.stem)
    return names


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


def _check_sidecar(meta, side: Path) -> None:
    """Refuse a sidecar whose fields the engine cannot use (one line naming the field)."""
    if not isinstance(meta, dict):
        raise ModelError(f"{side}: the sidecar is not a JSON object")
    if _kind(meta) == "cellularity":
        raise ModelError(f"{side.with_suffix('')}: is a cellularity regressor ({meta.get('format')}), not a "
                         "segmentation model: give it to --lgbm or --cnn; segmentation models: "
                         f"{', '.join(list_models()) or 'none shipped'}")
    for key in ("architecture", "classes", "mpp", "normalization"):
        if key not in meta:
            raise ModelError(f"{side}: sidecar lacks the field {key!r}")
    classes, mpp, norm = meta["classes"], meta["mpp"], meta["normalization"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ModelError(f"{side}: 'classes' must be a non-empty list of names, got {classes!r}")
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0 < mpp < float("inf"):
        raise ModelError(f"{side}: 'mpp' must be a positive number of micrometres per pixel, got {mpp!r}")
    for k in ("mean", "std"):
        v = norm.get(k) if isinstance(norm, dict) else None
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                and (k == "mean" or all(x > 0 for x in v))):
            raise ModelError(f"{side}: 'normalization.{k}' must be 3 numbers (RGB){' above 0' if k == 'std' else ''}, "
                             f"got {v!r}")
    if meta.get("activation", "sigmoid") not in ("sigmoid", "softmax"):
        raise ModelError(f"{side}: 'activation' must be sigmoid or softmax, got {meta['activation']!r}")
    m = meta.get("input_multiple", 16)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ModelError(f"{side}: 'input_multiple' must be a positive integer, got {m!r}")
    if not isinstance(meta.get("arch_kwargs", {}), dict):
        raise ModelError(f"{side}: 'arch_kwargs' must be a JSON object, got {meta['arch_kwargs']!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _check_fit(net: nn.Module, state: dict, path: Path, meta: dict) -> None:
    """Refuse weights that do not fit the network the sidecar describes (one line, naming the
    first tensor that differs)."""
    own = net.state_dict()
    arch = f"architecture {meta['architecture']!r} with arch_kwargs {meta.get('arch_kwargs', {})}"
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k, a, b = shapes[0]
        raise ModelError(f"{path}: the weights do not fit the sidecar's {arch}: {len(shapes)} tensor(s) differ "
                         f"in shape, e.g. {k} is {list(a)} in the file and {list(b)} in the network")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{path}: the weights do not fit the sidecar's {arch} "
            f"(missing {len(missing)}, unexpected {len(unexpected)} tensors, e.g. {(missing or unexpected)[0]})"
        )


def _check_output(net: nn.Module, meta: dict, path: Path) -> None:
    """Run the network once on a small blank input: it must give one channel per class of the
    sidecar, at the input's size (else the engine would fail later, in the middle of a run)."""
    m = int(meta.get("input_multiple", 16))
    side = m * max(1, -(-64 // m))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny; and one thread is safe in a forked child (OpenMP's pool is not)
    try:
        with torch.inference_mode():
            out = net(torch.zeros(1, 3, side, side))
    except Exception as e:
        raise ModelError(f"{path}: the network fails on a blank {side} x {side} input ({_first_line(e)})") from None
    finally:
        torch.set_num_threads(threads)
    classes = meta["classes"]
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) != 4 or shape[2:] != (side, side):
        raise ModelError(f"{path}: the network gives {list(shape) or type(out).__name__} for a {side} x {side} "
                         f"input; the engine needs (N, channels, {side}, {side})")
    if shape[1] != len(classes):
        raise ModelError(f"{path}: the network gives {shape[1]} channel(s) but the sidecar lists "
                         f"{len(classes)} class(es) {classes}: the sidecar does not belong to these weights")


def load_model(name_or_path: str | Path | None = None) -> LoadedModel:
    """Load a model by shipped name or path; returns it in eval mode on the CPU.

    Everything is checked before any output is made, each failure one :class:`ModelError` line
    naming the file: the sidecar's fields, the weights file (safetensors only: never unpickled),
    the weights against the architecture, and the network's output against the classes."""
    from safetensors.torch import load_file

    path = resolve_model_path(name_or_path)
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{side}: sidecar is not valid JSON ({e})") from None
    _check_sidecar(meta, side)
    kwargs = dict(meta.get("arch_kwargs", {}))
    kwargs.pop("pretrained", None)  # the saved weights replace any pre-trained encoder
    kwargs.pop("pretrained_backbone", None)
    try:
        with warnings.catch_warnings():  # "random weights" warnings do not apply: weights follow
            warnings.filterwarnings("ignore", message=".*starts from random weights.*")
            net = build_model(meta["architecture"], **kwargs)
    except ModelError as e:
        raise ModelError(f"{side}: {e}") from None
    except Exception as e:  # arch_kwargs the builder does not take
        raise ModelError(f"{side}: architecture {meta['architecture']!r} cannot be built from arch_kwargs "
                         f"{kwargs} ({_first_line(e)})") from None
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error for a damaged file, or an OSError
        raise ModelError(f"{path}: not a readable safetensors file ({_first_line(e)}): it is truncated, damaged "
                         "or of another format (wsiseg never unpickles weights); copy or export it again") from None
    _check_fit(net, state, path, meta)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise ModelError(f"{path}: the weights cannot be loaded into the network ({_first_line(e)})") from None
    net.eval()
    _check_output(net, meta, path)
    return LoadedModel(net, meta)


def ensemble_model(members: list[str | Path], dst: str | Path, model_id: str | None = None) -> Path:
    """Combine trained models into seed 001's U-Net ensemble (pixel-wise mean of the members'
    sigmoid probabilities, :class:`wsiseg.models.zoo.UNetEnsemble`) saved as one model: every
    member's weights in ``dst.safetensors``, its architecture in the sidecar. The members must
    give the same classes at the same um/px with sigmoid outputs; each keeps its own input
    normalisation (mapped onto the first member's, which the ensemble's sidecar states). The
    first member's instance post-processing (``postprocess``) is kept."""
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
        net = build_model("unet_ensemble", members=[str(p) for p, _ in loaded])
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


def build_members(members: Sequence) -> tuple[list[nn.Module], list[dict], dict | None]:
    """Members from specs: ``{"architecture": ..., "arch_kwargs": {...}}`` (built untrained; the
    weights come with the combined model's file, so a ``pretrained`` entry is ignored) or a
    trained model's name/path (loaded, and its normalisation mapped onto the first path
    member's). Returns (members, specs for the sidecar, reference metadata {mpp, normalization,
    input_multiple} of the first loaded member, or None)."""
    from wsiseg.models.zoo import RandomInitWarning, _Member

    if not members:
        raise ValueError("an ensemble needs at least one member")
    out, specs, ref = [], [], None
    for m in members:
        if isinstance(m, dict):
            kw = {k: v for k, v in dict(m.get("arch_kwargs", {})).items() if k != "pretrained"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomInitWarning)
                net = build_model(m["architecture"], **kw)
            out.append(_Member(net))
            specs.append({"architecture": m["architecture"], "arch_kwargs": kw})
            continue
        lm = load_model(m)
        mean = torch.tensor(lm.mean)
        std = torch.tensor(lm.std)
        if ref is None:
            ref = {"mpp": lm.mpp, "normalization": dict(lm.meta["normalization"]),
                   "input_multiple": lm.input_multiple}
        elif abs(lm.mpp - ref["mpp"]) > 1e-6:
            raise ValueError(f"member {m} works at {lm.mpp} um/px, the first at {ref['mpp']} um/px")
        rmean = torch.tensor(ref["normalization"]["mean"])
        rstd = torch.tensor(ref["normalization"]["std"])
        out.append(_Member(lm.network, scale=rstd / std, shift=(rmean - mean) / std))
        kw = dict(lm.meta.get("arch_kwargs", {}))
        kw.pop("pretrained", None)
        specs.append({"architecture": lm.meta["architecture"], "arch_kwargs": kw})
        ref["input_multiple"] = max(ref["input_multiple"], lm.input_multiple)
    return out, specs, ref
