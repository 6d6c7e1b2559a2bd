"""CNN cellularity regressors (Rakhlin et al. 2019, sections 3.2 and 3.4), pickle-free.

- :class:`MapCNNRegressor`: the paper's "SR" model. A ResNet-34 (timm, randomly He-initialised
  unless local encoder weights are given) on the 4-channel segmentation output (Normal,
  Lymphocyte, Malignant, Background probabilities, (N, 4, H, W) float in [0, 1]) regressing the
  cellularity score: one output, sigmoid, MSE loss.
- :class:`ImageCNNRegressor`: the direct model. A ResNet-34 on RGB patches ((N, H, W, 3) uint8),
  either ``mode="regression"`` (sigmoid, MSE) or ``mode="classification"`` (101 bins for
  0, 1, ..., 100 %, cross entropy; a score y is trained as bin ``round(100 y)``; the prediction is
  the *expected value* of the softmax over the bin centres by default, or the arg-max bin with
  ``class_prediction="argmax"``).

Both follow the contract of :mod:`wsiseg.cellularity.regressors`: ``__init__`` only stores
hyper-parameters; ``fit(X, y, X_val=None, y_val=None, ...)`` returns ``self`` with the fitted
state in attributes ending in ``_``; ``predict(X)`` returns (N,) float64 in [0, 1];
``save(path)`` writes ``<path>.safetensors`` (weights) and ``<path>.json`` (sidecar: architecture,
input channels and their names, input mpp, patch size, network input size, normalisation,
training data, metrics, budget); ``load(path)`` reads them back, never unpickling anything.

Inputs of any size are resized to ``input_size`` x ``input_size`` pixels (area averaging when
shrinking, bilinear when enlarging) and normalised ``(x - mean) / std`` per channel, with x the
maps as they are or RGB scaled to [0, 1]; the default mean = std = 0.5 maps [0, 1] to [-1, 1], as
the paper rescales its inputs. Training augments with the 8 dihedral transforms (flips and 90
degree rotations), which change neither a map's nor an image's cellularity. With a validation set
the model is scored every ``val_every`` epochs, the best state (lowest validation MSE) is kept and
training stops after ``patience`` checks without improvement. On the CPU, training is
deterministic for a given ``seed`` (and thread count).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from wsiseg.classes import CLASS_CHANNELS

FORMAT = "cellularity.cnn/1"
N_BINS = 101  # 0.00, 0.01, ..., 1.00
MAP_CHANNELS: tuple[str, ...] = CLASS_CHANNELS
RGB_CHANNELS: tuple[str, ...] = ("red", "green", "blue")
MODES = ("regression", "classification")
_CHUNK = 64  # items per preprocessing / prediction chunk


class CNNModelError(ValueError):
    """A saved CNN model that cannot be loaded as asked; the message says why."""


# ------------------------------------------------------------------------------ bins (101 cls)


def cellularity_to_bins(y) -> np.ndarray:
    """Class index 0..100 of each score in [0, 1]: ``round(100 y)`` (int64, input's shape)."""
    y = np.asarray(y, dtype=np.float64)
    if y.size and (not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1):
        raise ValueError("cellularity scores must be finite and in [0, 1]")
    return np.rint(y * (N_BINS - 1)).astype(np.int64)


def bins_to_cellularity(logits, how: str = "expected") -> np.ndarray:
    """Scores in [0, 1] from (N, 101) class logits.

    ``how="expected"``: sum over bins of softmax(logits) * bin value (0.00 .. 1.00);
    ``how="argmax"``: the value of the most probable bin. Returns (N,) float64.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != N_BINS:
        raise ValueError(f"logits must be (N, {N_BINS}), got {z.shape}")
    values = np.arange(N_BINS, dtype=np.float64) / (N_BINS - 1)
    if how == "argmax":
        return values[np.argmax(z, axis=1)]
    if how != "expected":
        raise ValueError(f"how must be 'expected' or 'argmax', got {how!r}")
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return np.clip(p @ values, 0.0, 1.0)


# ---------------------------------------------------------------------------------- the model


def resolve_device(device: str | None) -> str:
    """``"auto"`` / None -> ``"cuda"`` when available, else ``"cpu"``: the engine's
    :func:`wsiseg.predict.resolve_device` (same errors), as a string."""
    from wsiseg.predict import resolve_device as engine_device

    return str(engine_device(device or "auto"))


class _CNNRegressor:
    """Shared machinery; use :class:`MapCNNRegressor` or :class:`ImageCNNRegressor`."""

    input_kind: str = ""  # "maps" or "images"
    default_channels: tuple[str, ...] = ()

    def __init__(self, arch: str = "resnet34", mode: str = "regression", input_size: int = 128,
                 input_mpp: float | None = None, channels: Sequence[str] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_prediction: str = "expected", encoder_weights: str | Path | None = None,
                 device: str = "auto", arch_kwargs: dict | None = None):
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.mode = mode
        self.input_size = input_size
        self.input_mpp = input_mpp
        self.channels = list(channels) if channels is not None else list(self.default_channels)
        self.mean = list(mean) if mean is not None else [0.5] * len(self.channels)
        self.std = list(std) if std is not None else [0.5] * len(self.channels)
        self.class_prediction = class_prediction
        self.encoder_weights = str(encoder_weights) if encoder_weights is not None else None
        self.device = device
        self._check_params()

    # ------------------------------------------------------------------------------- params

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready)."""
        return {k: getattr(self, k) for k in ("arch", "mode", "input_size", "input_mpp", "channels", "mean", "std",
                                                "class_prediction", "encoder_weights", "device", "arch_kwargs")}

    def _check_params(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.class_prediction not in ("expected", "argmax"):
            raise ValueError(f"class_prediction must be 'expected' or 'argmax', got {self.class_prediction!r}")
        if not (isinstance(self.input_size, (int, np.integer)) and self.input_size >= 16):
            raise ValueError(f"input_size must be an int >= 16, got {self.input_size!r}")
        c = len(self.channels)
        if c < 1 or len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ValueError(f"need one mean and one positive std per channel ({c} channels: {self.channels}), "
                             f"got mean {self.mean}, std {self.std}")

    @property
    def n_outputs(self) -> int:
        return 1 if self.mode == "regression" else N_BINS

    @property
    def in_chans(self) -> int:
        return len(self.channels)

    def _build(self):
        import timm

        return timm.create_model(self.arch, in_chans=self.in_chans, num_classes=self.n_outputs, pretrained=False,
                                 **self.arch_kwargs)

    # ------------------------------------------------------------------------- preprocessing

    def _as_items(self, X, what: str):
        """Validate ``X``; yield (C, H, W) float32 torch tensors in chunks of stacked equal sizes."""
        raise NotImplementedError

    def _to_tensor(self, X, what: str):
        """``X`` resized to (N, C, s, s) float32 torch tensor (raw scale: maps [0, 1], RGB [0, 1])."""
        import torch
        import torch.nn.functional as F

        s = int(self.input_size)
        out = []
        for chunk in self._as_items(X, what):  # (n, C, H, W) float32
            h, w = chunk.shape[-2:]
            if (h, w) != (s, s):
                if h >= s and w >= s:
                    chunk = F.adaptive_avg_pool2d(chunk, (s, s))  # area averaging
                else:
                    chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False)
            out.append(chunk.contiguous())
        if not out:
            raise ValueError(f"{what} is empty")
        return torch.cat(out)

    def _normalize(self, x):
        import torch

        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        sd = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - m) / sd

    # ----------------------------------------------------------------------------------- fit

    def fit(self, X, y, X_val=None, y_val=None, epochs: int = 30, batch_size: int = 16, lr: float = 1e-3,
            weight_decay: float = 1e-4, seed: int = 0, augment: bool = True, val_every: int = 1,
            patience: int = 10, max_seconds: float | None = None, log: Callable[[str], Any] | None = None,
            data_description: str | dict | None = None) -> _CNNRegressor:
        """Train on ``X`` (see the class for its layout) and ``y`` (N,) in [0, 1]; returns ``self``.

        Adam(W) with ``lr`` decayed by a cosine to ``lr / 100`` over ``epochs``, ``weight_decay``,
        minibatches of ``batch_size`` shuffled each epoch (a last batch of 1 is dropped:
        BatchNorm needs 2), dihedral augmentation if ``augment``. Regression starts with the
        output bias at logit(mean y), i.e. predicting the training mean. With ``X_val``/``y_val``
        the validation MSE is computed every ``val_every`` epochs (and after the last), the best
        state is kept and training stops after ``patience`` checks without improvement.
        ``max_seconds``: wall-clock budget; no epoch is started that would, at the mean epoch
        time so far, end past it (the first always runs). ``log``: called with one line per
        epoch (e.g. ``print``). ``data_description``: what the model was trained on, for the
        sidecar. Sets ``model_``, ``history_`` (per-epoch dicts), ``best_epoch_``,
        ``train_metrics_``, ``training_``, ``patch_px_``.
        """
        import torch

        self._check_params()
        y = _as_targets(y, "y")
        t0 = time.perf_counter()
        xt = self._to_tensor(X, "X")
        if len(xt) != len(y):
            raise ValueError(f"X has {len(xt)} items, y {len(y)} values")
        if len(xt) < 2:
            raise ValueError("need at least 2 training items")
        has_val = X_val is not None and y_val is not None
        if has_val:
            yv = _as_targets(y_val, "y_val")
            xv = self._to_tensor(X_val, "X_val")
            if len(xv) != len(yv):
                raise ValueError(f"X_val has {len(xv)} items, y_val {len(yv)} values")
        patch_px = _patch_px(X, self.input_kind)
        device = resolve_device(self.device)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = self._build()
        init = "random (timm default, He/Kaiming)"
        if self.encoder_weights:
            init = _load_encoder_weights(net, self.encoder_weights, self.in_chans)
        head = net.get_classifier()
        if self.mode == "regression":
            with torch.no_grad():
                m = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
                head.bias.fill_(math.log(m / (1 - m)))
        net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr / 100)
        target = (torch.from_numpy(y.astype(np.float32)) if self.mode == "regression"
                  else torch.from_numpy(cellularity_to_bins(y)))

        history: list[dict] = []
        best_mse, best_epoch, best_state, bad = math.inf, 0, None, 0
        stopped = "epochs"
        prep_s = time.perf_counter() - t0
        t_train = time.perf_counter()
        n = len(xt)
        for epoch in range(1, epochs + 1):
            te = time.perf_counter()
            net.train()
            order = rng.permutation(n)
            if n % batch_size == 1:
                order = order[:-1]
            total, count = 0.0, 0
            lr_now = opt.param_groups[0]["lr"]
            for s in range(0, len(order), batch_size):
                idx = torch.from_numpy(order[s:s + batch_size])
                xb = xt[idx]
                if augment:
                    xb = _dihedral(xb, rng.integers(0, 8, len(idx)))
                xb = self._normalize(xb.to(device))
                tb = target[idx].to(device)
                out = net(xb)
                loss = self._loss(out, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            sched.step()
            rec = {"epoch": epoch, "train_loss": total / count, "lr": lr_now}
            last = epoch == epochs
            elapsed = time.perf_counter() - t_train
            over_budget = (max_seconds is not None
                           and elapsed + (elapsed / epoch) > max_seconds - prep_s)
            if has_val and (epoch % val_every == 0 or last or over_budget):
                pv = self._predict_tensor(net, xv, device, batch_size=max(batch_size, 32))
                vm = float(np.mean((pv - yv) ** 2))
                rec["val_mse"] = vm
                if vm < best_mse:
                    best_mse, best_epoch, bad = vm, epoch, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
                else:
                    bad += 1
            rec["seconds"] = time.perf_counter() - te
            history.append(rec)
            if log is not None:
                log(f"epoch {epoch}/{epochs} " + " ".join(
                    f"{k} {v:.4g}" for k, v in rec.items() if k not in ("epoch",)))
            if has_val and bad >= patience:
                stopped = f"early stopping: no val improvement in {patience} checks"
                break
            if over_budget and not last:
                stopped = f"budget: {max_seconds:.0f} s"
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        else:
            best_epoch = history[-1]["epoch"]
        net.eval()
        seconds = time.perf_counter() - t0
        self.model_ = net
        self.device_ = device
        self.history_ = history
        self.best_epoch_ = int(best_epoch)
        self.patch_px_ = patch_px
        best_rec = next(r for r in history if r["epoch"] == best_epoch)
        self.train_metrics_ = {"n_train": int(n), "n_val": int(len(yv)) if has_val else 0,
                               "best_epoch": int(best_epoch), "epochs_run": len(history),
                               "train_loss_at_best": best_rec["train_loss"],
                               "train_loss_last": history[-1]["train_loss"]}
        if has_val:
            self.train_metrics_["val_mse"] = best_mse
        self.training_ = {
            "data": data_description,
            "epochs": int(epochs), "epochs_run": len(history), "stopped": stopped,
            "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
            "optimizer": "AdamW, cosine decay to lr/100", "seed": int(seed), "augment": "dihedral (8)" if augment
            else "none", "val_every": int(val_every), "patience": int(patience),
            "selection": "best validation MSE" if has_val else "last epoch",
            "loss": "MSE on sigmoid output" if self.mode == "regression" else "cross entropy over 101 bins",
            "init": init, "device": device, "torch_threads": torch.get_num_threads(),
            "budget_seconds": max_seconds, "seconds": round(seconds, 2), "prep_seconds": round(prep_s, 2),
        }
        return self

    def _loss(self, out, target):
        import torch
        import torch.nn.functional as F

        if self.mode == "regression":
            return F.mse_loss(torch.sigmoid(out[:, 0]), target)
        return F.cross_entropy(out, target)

    # ------------------------------------------------------------------------------- predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit() or load() first")

    def _raw_outputs(self, net, xt, device, batch_size):
        import torch

        outs = []
        net.eval()
        with torch.no_grad():
            for s in range(0, len(xt), batch_size):
                outs.append(net(self._normalize(xt[s:s + batch_size].to(device))).float().cpu())
        return torch.cat(outs).numpy().astype(np.float64)

    def _predict_tensor(self, net, xt, device, batch_size=32) -> np.ndarray:
        z = self._raw_outputs(net, xt, device, batch_size)
        if self.mode == "regression":
            return 1.0 / (1.0 + np.exp(-z[:, 0]))
        return bins_to_cellularity(z, self.class_prediction)

    def predict(self, X, batch_size: int = 32) -> np.ndarray:
        """Cellularity of each item of ``X``: (N,) float64 in [0, 1] (eval mode, no gradients)."""
        self._check_fitted()
        preds = [self._predict_tensor(self.model_, xt, self.device_, batch_size) for xt in self._chunks(X)]
        return np.concatenate(preds)

    def predict_proba(self, X, batch_size: int = 32) -> np.ndarray:
        """Classification mode only: (N, 101) probabilities of the bins 0.00 .. 1.00."""
        self._check_fitted()
        if self.mode != "classification":
            raise RuntimeError("predict_proba needs mode='classification'")
        out = []
        for xt in self._chunks(X):
            z = self._raw_outputs(self.model_, xt, self.device_, batch_size)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(out)

    def _chunks(self, X):
        """Preprocess in chunks so that large sets never sit in memory as float tensors at once."""
        n = len(X)
        if n == 0:
            raise ValueError("X is empty")
        for s in range(0, n, 4 * _CHUNK):
            yield self._to_tensor(X[s:s + 4 * _CHUNK], "X")

    # ----------------------------------------------------------------------------- save/load

    def sidecar(self) -> dict:
        """The JSON sidecar :meth:`save` writes."""
        import timm
        import torch

        self._check_fitted()
        return {
            "format": FORMAT,
            "class": type(self).__name__,
            "architecture": self.arch,
            "timm_kwargs": {"in_chans": self.in_chans, "num_classes": self.n_outputs, **self.arch_kwargs},
            "mode": self.mode,
            "output": ("sigmoid -> cellularity" if self.mode == "regression"
                       else f"softmax over {N_BINS} bins 0.00..1.00, prediction = {self.class_prediction}"),
            "input": {
                "kind": self.input_kind,
                "channels": self.channels,
                "layout": "(N, C, H, W) float in [0, 1]" if self.input_kind == "maps" else "(N, H, W, 3) uint8 RGB",
                "mpp": self.input_mpp,
                "patch_px": self.patch_px_,
                "input_size": int(self.input_size),
                "resize": "area averaging when shrinking, bilinear when enlarging, to input_size x input_size",
            },
            "normalization": {"mean": self.mean, "std": self.std,
                              "on": "maps as given" if self.input_kind == "maps" else "RGB / 255"},
            "params": self.get_params(),
            "training": getattr(self, "training_", {}),
            "metrics": getattr(self, "train_metrics_", {}),
            "history": getattr(self, "history_", []),
            "n_parameters": int(sum(p.numel() for p in self.model_.parameters())),
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (weights, CPU, float32) and ``<path>.json``; returns the former."""
        from safetensors.torch import save_file

        meta = self.sidecar()
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        wpath = stem.with_name(stem.name + ".safetensors")
        meta["weights_file"] = wpath.name
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model_.state_dict().items()}
        save_file(state, str(wpath), metadata={"format": FORMAT, "class": type(self).__name__,
                                                "architecture": self.arch, "in_chans": str(self.in_chans),
                                                "num_classes": str(self.n_outputs)})
        stem.with_name(stem.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
        return wpath

    @classmethod
    def load(cls, path: str | Path, device: str = "auto"):
        """Load what :meth:`save` wrote (``path`` = the stem, the .safetensors or the .json).

        Safetensors only (never pickle). Raises FileNotFoundError for a missing file and
        :class:`CNNModelError` for a sidecar of another format or class, or weights that do not
        fit the architecture the sidecar names.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        stem = _stem(path)
        side = stem.with_name(stem.name + ".json")
        try:
            meta = json.loads(side.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{side}: sidecar not found (save() writes <stem>.safetensors and "
                                    "<stem>.json)") from None
        except json.JSONDecodeError as e:
            raise CNNModelError(f"{side}: sidecar is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CNNModelError(f"{side}: format {got!r} is not {FORMAT!r}")
        if meta.get("class") != cls.__name__:
            raise CNNModelError(f"{side}: the sidecar is for a {meta.get('class')!r}, not a {cls.__name__} "
                                f"(load it with {meta.get('class')}.load)")
        for key in ("architecture", "params", "timm_kwargs", "input"):
            if key not in meta:
                raise CNNModelError(f"{side}: sidecar lacks the field {key!r}")
        wpath = side.with_name(meta.get("weights_file", stem.name + ".safetensors"))
        if wpath.suffix != ".safetensors":
            raise CNNModelError(f"{side}: weights_file {wpath.name!r} is not a .safetensors file")
        if not wpath.is_file():
            raise FileNotFoundError(f"{wpath}: weights file named by {side} not found")
        try:
            with safe_open(str(wpath), framework="pt") as f:
                header = f.metadata() or {}
            state = load_file(str(wpath))
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise CNNModelError(f"{wpath}: not a readable safetensors file ({e})") from None
        params = dict(meta["params"])
        params["device"] = device
        self = cls(**params)
        if meta["architecture"] != self.arch or meta["timm_kwargs"] != {"in_chans": self.in_chans,
                                                                         "num_classes": self.n_outputs,
                                                                         **self.arch_kwargs}:
            raise CNNModelError(f"{side}: architecture fields disagree with its params")
        if header.get("architecture", self.arch) != self.arch or header.get("class", cls.__name__) != cls.__name__:
            raise CNNModelError(f"{wpath}: weights are for {header.get('class')}/{header.get('architecture')}, "
                                f"the sidecar {side.name} says {cls.__name__}/{self.arch}")
        try:
            net = self._build()
        except Exception as e:
            raise CNNModelError(f"{side}: cannot build architecture {self.arch!r} ({e})") from None
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or shapes:
            raise CNNModelError(
                f"{wpath}: weights do not fit {self.arch}(in_chans={self.in_chans}, num_classes={self.n_outputs}) "
                f"named by {side.name}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}), {len(shapes)} of another shape (e.g. {shapes[:3]})")
        net.load_state_dict(state, strict=True)
        self.device_ = resolve_device(device)
        self.model_ = net.to(self.device_).eval()
        self.patch_px_ = meta["input"].get("patch_px")
        self.train_metrics_ = meta.get("metrics", {})
        self.training_ = meta.get("training", {})
        self.history_ = meta.get("history", [])
        self.best_epoch_ = int(self.train_metrics_.get("best_epoch", 0))
        return self


class MapCNNRegressor(_CNNRegressor):
    """The paper's "SR" regressor: ResNet-34 on 4-channel segmentation probability maps.

    ``X``: (N, 4, H, W) float array (or a sequence of (4, H, W) arrays, sizes may differ) with
    values in [0, 1], channels in the order ``channels`` (default Normal, Lymphocyte, Malignant,
    Background, as :data:`wsiseg.cellularity.proxy.CHANNELS`). ``input_size`` (default 128 px): the
    network input side; ``input_mpp``: the resolution of the maps given (recorded in the sidecar;
    the caller supplies maps at that mpp). Default ``mode="regression"``: sigmoid output, MSE.
    """

    input_kind = "maps"
    default_channels = MAP_CHANNELS

    def __init__(self, arch: str = "resnet34", mode: str = "regression", input_size: int = 128,
                 input_mpp: float | None = 0.5, channels: Sequence[str] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_prediction: str = "expected", encoder_weights: str | Path | None = None,
                 device: str = "auto", arch_kwargs: dict | None = None):
        super().__init__(arch=arch, mode=mode, input_size=input_size, input_mpp=input_mpp, channels=channels,
                         mean=mean, std=std, class_prediction=class_prediction, encoder_weights=encoder_weights,
                         device=device, arch_kwargs=arch_kwargs)

    def _as_items(self, X, what):
        import torch

        c = self.in_chans
        if isinstance(X, np.ndarray) and X.ndim == 4:
            groups = [X[s:s + _CHUNK] for s in range(0, len(X), _CHUNK)]
        elif isinstance(X, np.ndarray) and X.ndim == 3 and X.shape[0] == c:
            raise ValueError(f"{what}: one map of shape {X.shape}; pass a batch (N, {c}, H, W)")
        else:
            groups = [np.asarray(x)[None] for x in X]
        for g in groups:
            g = np.asarray(g)
            if g.ndim != 4 or g.shape[1] != c:
                raise ValueError(f"{what}: maps must be (N, {c}, H, W) with channels {self.channels}, "
                                 f"got items of shape {g.shape[1:]}")
            if not np.issubdtype(g.dtype, np.floating):
                raise ValueError(f"{what}: maps must be float probabilities in [0, 1], got dtype {g.dtype}")
            g = g.astype(np.float32, copy=False)
            if not np.all(np.isfinite(g)) or g.min() < -1e-3 or g.max() > 1 + 1e-3:
                raise ValueError(f"{what}: map values must be finite probabilities in [0, 1] "
                                 f"(got min {np.nanmin(g):.3g}, max {np.nanmax(g):.3g})")
            yield torch.from_numpy(np.ascontiguousarray(g))


class ImageCNNRegressor(_CNNRegressor):
    """Direct regressor: ResNet-34 on RGB patches, regression or 101-bin classification.

    ``X``: (N, H, W, 3) uint8 RGB array (or a sequence of (H, W, 3) uint8 arrays). ``mode``:
    ``"regression"`` (sigmoid, MSE) or ``"classification"`` (101 bins, cross entropy; prediction
    = expected bin value, or the arg-max bin with ``class_prediction="argmax"``).
    ``input_size`` default 256 (the paper halves its 512 px patches). ``input_mpp``: the
    resolution of the patches given, recorded in the sidecar. ``mean``/``std`` apply to RGB / 255
    (default 0.5 / 0.5; use ImageNet's with ImageNet ``encoder_weights``).
    """

    input_kind = "images"
    default_channels = RGB_CHANNELS

    def __init__(self, arch: str = "resnet34", mode: str = "regression", input_size: int = 256,
                 input_mpp: float | None = None, channels: Sequence[str] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_prediction: str = "expected", encoder_weights: str | Path | None = None,
                 device: str = "auto", arch_kwargs: dict | None = None):
        super().__init__(arch=arch, mode=mode, input_size=input_size, input_mpp=input_mpp, channels=channels,
                         mean=mean, std=std, class_prediction=class_prediction, encoder_weights=encoder_weights,
                         device=device, arch_kwargs=arch_kwargs)

    def _as_items(self, X, what):
        import torch

        if isinstance(X, np.ndarray) and X.ndim == 4:
            groups = [X[s:s + _CHUNK] for s in range(0, len(X), _CHUNK)]
        elif isinstance(X, np.ndarray) and X.ndim == 3 and X.shape[-1] == 3:
            raise ValueError(f"{what}: one image of shape {X.shape}; pass a batch (N, H, W, 3)")
        else:
            groups = [np.asarray(x)[None] for x in X]
        for g in groups:
            g = np.asarray(g)
            if g.ndim != 4 or g.shape[-1] != self.in_chans:
                raise ValueError(f"{what}: images must be (N, H, W, {self.in_chans}) RGB, "
                                 f"got items of shape {g.shape[1:]}")
            if g.dtype != np.uint8:
                raise ValueError(f"{what}: images must be uint8 RGB, got dtype {g.dtype}")
            t = torch.from_numpy(np.ascontiguousarray(g)).permute(0, 3, 1, 2).float().div_(255.0)
            yield t.contiguous()


# ------------------------------------------------------------------------------------ helpers


def _dihedral(x, ks: np.ndarray):
    """Apply dihedral transform ``k`` (0..7: k % 4 quarter turns, then a flip if k >= 4) per item."""
    import torch

    out = torch.empty_like(x)
    for i, k in enumerate(ks.tolist()):
        xi = torch.rot90(x[i], k % 4, dims=(1, 2))
        if k >= 4:
            xi = torch.flip(xi, dims=(2,))
        out[i] = xi
    return out


def _as_targets(y, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(y)) or y.min() < 0 or y.max() > 1:
        raise ValueError(f"{what}: cellularity targets must be finite and in [0, 1]")
    return y


def _patch_px(X, kind: str) -> list[int] | None:
    """(H, W) of the inputs as given (None when they differ): maps are (C, H, W), images (H, W, C)."""
    shapes = {tuple(X.shape[1:])} if isinstance(X, np.ndarray) and X.ndim == 4 else {tuple(np.shape(x)) for x in X}
    if len(shapes) != 1:
        return None
    s = next(iter(shapes))
    return [int(s[1]), int(s[2])] if kind == "maps" else [int(s[0]), int(s[1])]


def _load_encoder_weights(net, path: str | Path, in_chans: int) -> str:
    """Load a local safetensors encoder state dict into ``net`` (classifier head left random).

    The first conv is adapted with timm's ``adapt_input_conv`` when its channel count differs
    (e.g. ImageNet RGB weights for 4-channel maps). Returns a description for the sidecar.
    """
    import torch
    from safetensors.torch import load_file
    from timm.models import adapt_input_conv

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: encoder weights must be a .safetensors file (pickle files are not loaded)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file not found")
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    first = f"{cfg.get('first_conv', 'conv1')}.weight"
    head = cfg.get("classifier", "fc")
    own = net.state_dict()
    load = {}
    for k, v in sd.items():
        if k == head or k.startswith(head + "."):
            continue
        if k == first and v.ndim == 4 and v.shape[1] != in_chans:
            v = adapt_input_conv(in_chans, v.float())
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the network needs {tuple(own[k].shape)}")
        load[k] = v
    missing = [k for k in own if k not in load and not (k == head or k.startswith(head + "."))]
    unexpected = [k for k in load if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not fit the network: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    with torch.no_grad():
        net.load_state_dict(load, strict=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"encoder weights from {path.name} (sha256 {digest}...), head random"


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
