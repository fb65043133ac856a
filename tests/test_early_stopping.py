"""Tests for train.fit: early stopping on scripted val mAP, best-weight restoration, results.json / best.pt,
APL wiring, and the non-finite-loss failure path.

Reference: docs/original.md §8 (stop at the first epoch whose clean-val mAP does not
strictly improve, skip that epoch's test pass, keep the best-val weights, report test mAP at the best epoch)
and §11.1 (ties count as not improved).

`train.evaluate` is replaced by a fake whose val/test outputs have a chosen mAP: with C classes, predictions
eye(C) and k of the C classes labelled on the diagonal (the others without positives, AP 0), mAP = 100 k / C.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

import config  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from image_cache import make_loaders  # noqa: E402
from helpers import TinyNet, tiny_dataset  # noqa: E402

C = 10
CPU = torch.device("cpu")


def make_datasets(tmp_path: Path, n_train: int = 8) -> dict:
    # the val/test datasets exist for fit's loaders; the fake evaluate ignores them
    return {"train": tiny_dataset(tmp_path / "train", n_train, C, seed=0),
            "val": tiny_dataset(tmp_path / "val", C, C, seed=1),  # C rows, as the scripted passes
            "test": tiny_dataset(tmp_path / "test", C, C, seed=2)}


def scripted_output(k: int) -> dict:
    preds = np.full((C, C), 0.05)
    np.fill_diagonal(preds, 0.95)
    true = np.zeros((C, C))
    true[np.arange(k), np.arange(k)] = 1
    return {"preds": preds, "true": true, "obs": true.copy(), "idx": np.arange(C), "loss": 0.0,
            "seconds": 0.0, "num_batches": 1}


class FakeEvaluate:
    """Replaces train.evaluate for the val and test passes; anything else (APL) goes to the real one."""

    def __init__(self, val_k: list[int], test_k: list[int]) -> None:
        self.val_k, self.test_k = val_k, test_k
        self.calls: list[tuple[int, str]] = []
        self.snapshots: dict[tuple[int, str], dict] = {}
        self.real = train.evaluate

    def __call__(self, engine, loader, desc):
        words = desc.split()
        epoch, phase = int(words[1]), words[-1]
        if phase not in ("val", "test"):
            return self.real(engine, loader, desc)
        self.calls.append((epoch, phase))
        self.snapshots[(epoch, phase)] = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        script = self.val_k if phase == "val" else self.test_k
        return scripted_output(script[epoch - 1])


def strict_json(path: Path) -> dict:
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=reject)


def run_fit(tmp_path, monkeypatch, val_k, test_k, num_epochs, loss="EM", **cfg_kw):
    torch.manual_seed(0)
    fake = FakeEvaluate(val_k, test_k)
    monkeypatch.setattr(train, "evaluate", fake)
    cfg = config.build_config("demo", loss=loss, num_epochs=num_epochs, num_workers=0, batch_size=4, lr=1e-2,
                              **cfg_kw)
    model = TinyNet(C)
    datasets = make_datasets(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results: dict = {}
    loaders = make_loaders(datasets, cfg.batch_size, cfg.num_workers, False, CPU)
    out = train.fit(train.build_engine(model, CPU), loaders, datasets, cfg, run_dir, results)
    return fake, model, datasets, cfg, run_dir, out


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------


def test_tie_stops_and_restores_best(tmp_path, monkeypatch):
    # val mAP 50, 60, 60 (tie = not improved) -> stop at epoch 3, best epoch 2
    fake, model, _, cfg, run_dir, results = run_fit(
        tmp_path, monkeypatch, val_k=[5, 6, 6, 9, 10], test_k=[7, 4, 9, 9, 9], num_epochs=5)
    assert fake.calls == [(1, "val"), (1, "test"), (2, "val"), (2, "test"), (3, "val")]
    assert results["status"] == "finished"
    assert results["best_epoch"] == 2
    assert sorted(results["epochs"], key=int) == ["1", "2", "3"]
    assert "test" not in results["epochs"]["3"]
    assert "test" in results["epochs"]["1"] and "test" in results["epochs"]["2"]
    assert results["epochs"]["3"]["val"]["map_clean"] == pytest.approx(60.0)
    assert results["val_map"] == pytest.approx(60.0)
    assert results["test_map"] == pytest.approx(40.0)  # test at epoch 2, not the last one evaluated (epoch 1: 70)
    np.testing.assert_allclose(results["test_per_class_ap"], [100.0] * 4 + [0.0] * 6, atol=1e-9)

    # the weights are epoch 2's (what evaluate saw at epoch 2), not epoch 3's
    best = fake.snapshots[(2, "val")]
    assert not same_state(best, fake.snapshots[(3, "val")]), "training did not change the weights"
    assert same_state(model.state_dict(), best)

    # results.json on disk
    on_disk = strict_json(run_dir / "results.json")
    assert on_disk["status"] == "finished"
    assert on_disk["best_epoch"] == 2
    assert on_disk["val_map"] == pytest.approx(60.0)
    assert on_disk["test_map"] == pytest.approx(40.0)
    assert len(on_disk["test_per_class_ap"]) == C
    assert "test" not in on_disk["epochs"]["3"]

    # best.pt
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    assert {"model", "config", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    assert ckpt["config"] == cfg.to_dict()
    assert same_state(ckpt["model"], best)


def test_drop_stops_at_epoch_2(tmp_path, monkeypatch):
    fake, model, _, _, run_dir, results = run_fit(
        tmp_path, monkeypatch, val_k=[5, 4, 8], test_k=[3, 8, 8], num_epochs=3)
    assert fake.calls == [(1, "val"), (1, "test"), (2, "val")]
    assert results["best_epoch"] == 1
    assert sorted(results["epochs"], key=int) == ["1", "2"]
    assert "test" not in results["epochs"]["2"]
    assert results["val_map"] == pytest.approx(50.0)
    assert results["test_map"] == pytest.approx(30.0)
    assert same_state(model.state_dict(), fake.snapshots[(1, "val")])
    assert not same_state(model.state_dict(), fake.snapshots[(2, "val")])
    assert torch.load(run_dir / "best.pt", weights_only=False)["epoch"] == 1


def test_strictly_increasing_runs_all_epochs(tmp_path, monkeypatch):
    fake, model, _, _, run_dir, results = run_fit(
        tmp_path, monkeypatch, val_k=[1, 2, 3, 4], test_k=[2, 5, 1, 6], num_epochs=4)
    assert fake.calls == [(e, p) for e in range(1, 5) for p in ("val", "test")]
    assert results["best_epoch"] == 4
    assert sorted(results["epochs"], key=int) == ["1", "2", "3", "4"]
    assert all("test" in results["epochs"][str(e)] for e in range(1, 5))
    assert results["val_map"] == pytest.approx(40.0)
    assert results["test_map"] == pytest.approx(60.0)
    assert same_state(model.state_dict(), fake.snapshots[(4, "val")])
    on_disk = strict_json(run_dir / "results.json")
    assert on_disk["status"] == "finished" and on_disk["best_epoch"] == 4
    assert torch.load(run_dir / "best.pt", weights_only=False)["epoch"] == 4


def test_fit_runs_apl_after_warmup_and_training_sees_pseudo_labels(tmp_path, monkeypatch):
    # EM_APL, T = 4, T_w = 2: APL after epochs 2, 3 and 4; the pseudo-labels are used from epoch 3 on.
    seen_negative = {}
    calls = {"n": 0}
    real_loss = losses.compute_loss
    batches_per_epoch = 2  # 8 training images, batch 4

    def spy(name, logits, obs, true, **hp):
        epoch = calls["n"] // batches_per_epoch + 1
        calls["n"] += 1
        seen_negative[epoch] = seen_negative.get(epoch, False) or bool((obs < 0).any())
        return real_loss(name, logits, obs, true, **hp)

    monkeypatch.setattr(train, "compute_loss", spy)
    fake, _, datasets, _, _, results = run_fit(
        tmp_path, monkeypatch, val_k=[1, 2, 3, 4], test_k=[1, 2, 3, 4], num_epochs=4, loss="EM_APL",
        warmup_epoch=2, neg_proportion=0.9)
    train_ds = datasets["train"]
    u = np.full(C, 8) - (train_ds.labels_obs == 1).sum(axis=0)  # initial unknowns per class
    k = np.floor(0.9 * u / 2).astype(int)
    assert k.sum() > 0
    assert "apl_new_pseudo_labels" not in results["epochs"]["1"]
    for e in (2, 3):
        assert results["epochs"][str(e)]["apl_new_pseudo_labels"] == k.sum()
    # T - T_w = 2 rounds use up floor(theta U / 2) * 2 of the unknowns; the wasted third round (after the
    # last epoch) takes what it can of the rest
    rest = u - 2 * k
    assert results["epochs"]["4"]["apl_new_pseudo_labels"] == np.minimum(k, rest).sum()
    assert results["epochs"]["4"]["apl_total_pseudo_labels"] == int((train_ds.labels_obs < 0).sum())
    np.testing.assert_array_equal((train_ds.labels_obs < 0).sum(axis=0), 2 * k + np.minimum(k, rest))
    assert seen_negative == {1: False, 2: False, 3: True, 4: True}


def test_nan_loss_raises_and_keeps_epoch_1(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = losses.compute_loss

    def nan_at_epoch2_batch1(name, logits, obs, true, **hp):
        calls["n"] += 1
        value = real_loss(name, logits, obs, true, **hp)
        return value * float("nan") if calls["n"] == 3 else value  # 2 batches per epoch

    monkeypatch.setattr(train, "compute_loss", nan_at_epoch2_batch1)
    with pytest.raises(train.NonFiniteLossError, match=r"epoch 2, batch 1") as info:
        run_fit(tmp_path, monkeypatch, val_k=[2, 3, 4], test_k=[2, 3, 4], num_epochs=3)
    assert (info.value.epoch, info.value.batch) == (2, 1)
    run_dir = tmp_path / "run"
    on_disk = strict_json(run_dir / "results.json")
    assert on_disk["status"] == "failed"
    assert "epoch 2" in on_disk["error"] and "batch 1" in on_disk["error"]
    assert on_disk["best_epoch"] == 1
    assert {"train", "val", "test"} <= set(on_disk["epochs"]["1"])
    assert on_disk["epochs"]["1"]["val"]["map_clean"] == pytest.approx(20.0)
    assert "val" not in on_disk["epochs"].get("2", {})
    assert torch.load(run_dir / "best.pt", weights_only=False)["epoch"] == 1
