"""The step trainers' shared skeleton: checkpoint and resume, budget and schedule, sidecar.

Checkpoint: ``OUT/last.pt`` and ``OUT/history.json``, resumed from.

Both trainers (:mod:`wsiseg.train.loop`, :mod:`wsiseg.train.multitask`) save after each
validation: the network's and optimiser's state, the step, the best validation score and the
seconds spent (a tensor-only dict, read back with ``torch.load(weights_only=True)``), each file
written whole to a temporary name and then renamed, so an interrupted save leaves the last good
checkpoint. A rerun with the same ``out`` continues from it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wsiseg.store import atomic_write


@dataclass
class TrainState:
    step: int = 0
    best: float = -1.0  # best validation score so far (the trainer's selection metric)
    elapsed: float = 0.0  # seconds spent training before this process
    history: list = field(default_factory=list)  # one dict per validation


class Checkpoint:
    """``out/last.pt`` + ``out/history.json``."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / "last.pt"

    def resume(self, net: torch.nn.Module, opt: torch.optim.Optimizer, map_location=None) -> TrainState | None:
        """Load the last checkpoint into ``net`` and ``opt``; None when there is none."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=True, map_location=map_location)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        h = self.out / "history.json"
        history = json.loads(h.read_text()) if h.exists() else []
        return TrainState(int(state["step"]), float(state["best"]), float(state["elapsed"]), history)

    def save(self, net: torch.nn.Module, opt: torch.optim.Optimizer, state: TrainState) -> None:
        record = {"model": net.state_dict(), "opt": opt.state_dict(), "step": state.step, "best": state.best,
                  "elapsed": state.elapsed}
        atomic_write(self.path, lambda f: torch.save(record, f))
        atomic_write(self.out / "history.json", lambda f: f.write(json.dumps(state.history, indent=1).encode()))


class StepBudget:
    """A trainer's budget: ``steps``, or ``max_seconds`` of training if that runs out first
    (counting the ``elapsed`` seconds of earlier processes), and the cosine learning rate over it."""

    def __init__(self, steps: int, max_seconds: float | None = None, elapsed: float = 0.0):
        self.steps, self.max_seconds = int(steps), max_seconds
        self._t0 = time.perf_counter() - elapsed

    def seconds(self) -> float:
        """Seconds of training so far, earlier processes included."""
        return time.perf_counter() - self._t0

    def lr(self, base: float, step: int, warmup_steps: int = 0) -> float:
        """``base`` decayed by a half cosine over the budget (to 0 at its end), linear warm-up first."""
        frac = step / self.steps
        if self.max_seconds:
            frac = max(frac, self.seconds() / self.max_seconds)
        lr = base * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        if step < warmup_steps:
            lr *= (step + 1) / warmup_steps
        return lr

    def done(self, step: int) -> bool:
        return step >= self.steps or bool(self.max_seconds and self.seconds() >= self.max_seconds)


def weights_sidecar(cfg, net: torch.nn.Module, classes, input_multiple: int, mean_std, training: dict,
                    stain_meta: dict, arch_kwargs: dict | None = None) -> dict:
    """The JSON sidecar of trained weights (``wsiseg.models.registry.save_model``), less its
    metrics and budget, which :func:`record_best` adds at each best validation. ``cfg``: a
    trainer's config (its ``id``, ``architecture``, ``arch_kwargs`` and ``mpp``); ``arch_kwargs``:
    what the network was built with, where not ``cfg.arch_kwargs`` (a network's own
    ``export_kwargs()`` comes first)."""
    mean, std = mean_std
    kwargs = cfg.arch_kwargs if arch_kwargs is None else arch_kwargs
    return {
        "id": cfg.id,
        "architecture": cfg.architecture,
        "arch_kwargs": net.export_kwargs() if hasattr(net, "export_kwargs") else dict(kwargs),
        "classes": list(classes),
        "activation": "sigmoid",
        "mpp": cfg.mpp,
        "input_multiple": int(input_multiple),
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                          "input_range": "RGB / 255"},
        "training": training,
        **stain_meta,
    }


def record_best(meta: dict, metrics: dict, budget: dict) -> dict:
    """``meta`` with the best validation's metrics and the budget spent to reach it."""
    meta["metrics"] = metrics
    meta["training"]["budget"] = budget
    return meta
