"""The training loop on real data: a few steps, checkpoint, resume, weights that load."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import MONUSEG, need
from wsiseg.models import load_model
from wsiseg.train.datasets import MONUSEG_VAL, split_monuseg
from wsiseg.train.loop import TrainConfig, train


def test_split_is_by_image_one_per_organ():
    train_s, val_s = split_monuseg(need(MONUSEG), 0.5)
    assert len(val_s) == 7 and len(train_s) == 23
    assert not {s.name for s in train_s} & {s.name for s in val_s}
    assert all(any(s.name.startswith(v) for v in MONUSEG_VAL) for s in val_s)
    s = val_s[0]
    assert s.image.shape == (500, 500, 3) and s.mask.shape == (500, 500)
    assert 0.05 < s.mask.mean() < 0.6  # resampled mask keeps the nuclei


def test_train_few_steps_checkpoint_and_resume(tmp_path):
    cfg = TrainConfig.from_yaml("configs/unet_bn_monuseg_20x.yaml")
    cfg = dataclasses.replace(cfg, data=str(need(MONUSEG)), arch_kwargs={"base": 4, "depth": 2}, steps=4,
                              val_every=2, batch_size=2, crop=64, out=str(tmp_path / "run"), id="t")
    path = train(cfg, log=lambda *_: None)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4]
    m = load_model(path)
    meta = m.meta
    assert meta["mpp"] == 0.5 and meta["classes"] == ["nucleus"]
    assert meta["training"]["validation_images"] and meta["training"]["data_hash"]
    assert 0 <= meta["metrics"]["validation"]["dice_pooled"] <= 1
    # resume: more steps continue from the checkpoint rather than starting again
    cfg2 = dataclasses.replace(cfg, steps=6)
    logs = []
    train(cfg2, log=logs.append)
    assert any("resumed" in line and "step 4" in line for line in logs)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4, 6]


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_yaml(p)
