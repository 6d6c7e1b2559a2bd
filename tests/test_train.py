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


@pytest.mark.slow
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


def test_resampled_copy_loads_the_same_pixels(tmp_path):
    from wsiseg.train.datasets import load_monuseg, write_monuseg

    names = ["TCGA-A7-A13E", "TCGA-B0-5698"]
    a = load_monuseg(need(MONUSEG), 0.5, names)
    write_monuseg(a, tmp_path / "half")
    b = load_monuseg(tmp_path / "half", 0.5, names, source_mpp=0.5)
    assert [s.name for s in b] == [s.name for s in a] and len(a) == 2
    for x, y in zip(a, b):
        assert x.image.shape == (500, 500, 3)
        assert (x.image == y.image).all() and (x.mask == y.mask).all() and (x.instances == y.instances).all()


@pytest.mark.slow
def test_train_with_loader_workers_and_a_time_budget(tmp_path):
    """Crops cut by 2 data-loader processes; the time budget (not the step count) ends the run,
    which still validates and saves at its last step."""
    from wsiseg.train.datasets import load_monuseg, write_monuseg

    write_monuseg(load_monuseg(need(MONUSEG), 0.5), tmp_path / "half")
    cfg = TrainConfig.from_yaml("configs/unet_bn_marker_monuseg_20x.yaml")
    cfg = dataclasses.replace(cfg, data=str(tmp_path / "half"), data_mpp=0.5, init_from=None,
                              arch_kwargs={"base": 4, "depth": 2, "out_channels": 2}, steps=10_000,
                              val_every=10_000, batch_size=2, crop=64, workers=2, max_seconds=3.0,
                              select="aji", out=str(tmp_path / "run"), id="t")
    path = train(cfg, log=lambda *_: None)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 1 and 0 < hist[0]["step"] < 10_000 and hist[0]["seconds"] >= 3.0
    meta = load_model(path).meta
    # selected on the validation AJI of the marker-watershed instances
    assert meta["metrics"]["selected_on"] == "aji"
    assert meta["metrics"]["validation"]["aji_mean_per_image"] == pytest.approx(hist[0]["val_aji_mean"])
    assert set(meta["metrics"]["validation"]["aji_per_image"]) == set(meta["training"]["validation_images"])
    assert 0 <= hist[0]["val_aji_mean"] <= 1
    assert meta["classes"] == ["nucleus", "marker"]
    assert meta["training"]["budget"]["steps"] == hist[0]["step"]
    assert meta["training"]["config"]["workers"] == 2


@pytest.mark.slow
def test_train_cli_set_overrides(tmp_path, capsys):
    from wsiseg.cli import main

    rc = main(["train", "--config", "configs/unet_bn_monuseg_20x.yaml", "--set", "stepz=3"])
    assert rc != 0 and "stepz" in capsys.readouterr().err
    rc = main(["train", "--config", "configs/unet_bn_monuseg_20x.yaml", "--data", str(need(MONUSEG)),
               "--out", str(tmp_path / "run"), "--set", "steps=2", "--set", "val_every=2",
               "--set", "batch_size=2", "--set", "crop=64", "--set", "arch_kwargs={base: 4, depth: 2}"])
    assert rc == 0
    meta = json.loads((tmp_path / "run" / "unet-bn-monuseg-20x.json").read_text())
    assert meta["training"]["config"]["steps"] == 2 and meta["arch_kwargs"]["base"] == 4


@pytest.mark.gpu
def test_train_on_cuda_with_bf16_autocast(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = TrainConfig.from_yaml("configs/unet_bn_marker_monuseg_20x.yaml")
    cfg = dataclasses.replace(cfg, data=str(need(MONUSEG)), init_from=None, steps=4, val_every=2,
                              batch_size=4, crop=128, device="cuda", amp=True, workers=2,
                              out=str(tmp_path / "run"), id="t")
    path = train(cfg, log=lambda *_: None)
    meta = load_model(path).meta
    assert meta["training"]["budget"]["machine"].startswith(torch.cuda.get_device_name(0))
    assert meta["training"]["budget"]["precision"] == "bfloat16 autocast"


def test_checkpoint_round_trip_and_an_interrupted_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    import torch

    from wsiseg.train import checkpoint as ck

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    c = ck.Checkpoint(tmp_path)
    assert c.resume(net, opt) is None
    c.save(net, opt, ck.TrainState(4, 0.5, 12.0, [{"step": 4}]))
    good = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        c.save(net, opt, ck.TrainState(6, 0.6, 20.0, [{"step": 4}, {"step": 6}]))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "last.pt"]  # no temporary file left
    fresh = torch.nn.Linear(3, 2)
    st = c.resume(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert (st.step, st.best, st.elapsed, st.history) == (4, 0.5, 12.0, [{"step": 4}])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())


def test_step_budget_cosine_schedule_warmup_and_time_limit(monkeypatch):
    from wsiseg.train import checkpoint as ck

    b = ck.StepBudget(100)
    assert b.lr(1.0, 0) == pytest.approx(1.0)
    assert b.lr(1.0, 50) == pytest.approx(0.5)
    assert b.lr(1.0, 100) == pytest.approx(0.0, abs=1e-12)
    assert b.lr(1.0, 0, warmup_steps=10) == pytest.approx(0.1)  # warm-up scales the first steps
    assert not b.done(99) and b.done(100)
    now = [1000.0]
    monkeypatch.setattr(ck.time, "perf_counter", lambda: now[0])
    t = ck.StepBudget(10_000, max_seconds=60, elapsed=30)  # half the time spent by an earlier process
    assert t.seconds() == pytest.approx(30)
    assert t.lr(1.0, 1) == pytest.approx(0.5)  # the time fraction, not the step fraction, sets the rate
    assert not t.done(1)
    now[0] += 30
    assert t.done(1) and t.lr(1.0, 1) == pytest.approx(0.0, abs=1e-12)


def test_splits_hold_out_whole_sources_in_natural_order():
    from wsiseg.splits import every_nth, natural_key, split_by
    from wsiseg.train.datasets import ClassSample, split_groups

    groups = ["img10", "img2", "img1", "img2", "img3"]
    assert sorted(set(groups), key=natural_key) == ["img1", "img2", "img3", "img10"]
    assert every_nth(groups, 2) == {"img1", "img3"}
    assert every_nth(groups, 1) == set(groups)
    with pytest.raises(ValueError):
        every_nth(groups, 0)
    items = list(enumerate(groups))
    tr, va = split_by(items, lambda it: it[1], {"img2"})
    assert tr == [(0, "img10"), (2, "img1"), (4, "img3")] and va == [(1, "img2"), (3, "img2")]
    z = __import__("numpy").zeros((2, 2), "uint8")
    samples = [ClassSample(f"{g}_{i}", g, z, z) for i, g in enumerate(groups)]
    tr, va = split_groups(samples, 2)
    assert {s.group for s in va} == {"img1", "img3"} and {s.group for s in tr} == {"img2", "img10"}
