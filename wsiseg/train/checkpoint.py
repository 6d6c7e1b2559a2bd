"""The trainers' shared checkpoint: ``OUT/last.pt`` and ``OUT/history.json``, resumed from.

Both trainers (:mod:`wsiseg.train.loop`, :mod:`wsiseg.train.multitask`) save after each
validation: the network's and optimiser's state, the step, the best validation score and the
seconds spent (a tensor-only dict, read back with ``torch.load(weights_only=True)``), each file
written whole to a temporary name and then renamed, so an interrupted save leaves the last good
checkpoint. A rerun with the same ``out`` continues from it.
"""
from __future__ import annotations

import json
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

