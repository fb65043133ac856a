"""The Large-Loss methods (Kim et al. 2022): LL-R rejects, LL-Ct corrects for one step, LL-Cp corrects for good.

Schedule (baselines.md): epoch 1 unchanged; from epoch t >= 2 the k = ceil(B*C (t-1) d / 100) largest
assume-negative losses among a batch's unknown entries are rejected (LL-R) or taken as positives (LL-Ct);
LL-Cp uses the fixed k = ceil(B*C d / 100) and writes those entries into the training set as observed positives.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

import config  # noqa: E402
import main  # noqa: E402
import train  # noqa: E402
from helpers import EPS, TinyNet, tiny_dataset  # noqa: E402
from losses import compute_loss, large_loss_count, large_losses  # noqa: E402

CPU = torch.device("cpu")


def test_the_schedule_of_k():
    # B*C = 16 * 80 = 1280 entries, d = 0.4 %: 5.12 -> 6 per epoch step (ceil)
    assert [large_loss_count(1280, t, 0.4, fixed=False) for t in (1, 2, 3, 4)] == [0, 6, 11, 16]
    assert [large_loss_count(1280, t, 0.4, fixed=True) for t in (1, 2, 3, 4)] == [0, 6, 6, 6]
    assert large_loss_count(8 * 20, 3, 0.2, fixed=False) == math.ceil(160 * 2 * 0.2 / 100) == 1


def _batch(seed=0, b=6, c=5):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, c, generator=gen, dtype=torch.float64)
    obs = torch.zeros(b, c, dtype=torch.float64)
    obs[torch.arange(b), torch.randint(0, c, (b,), generator=gen)] = 1
    return logits, obs


def _by_hand(logits, obs, k, correct):
    """numpy: the k largest -log(1 - p + eps) among unknowns are dropped (or count as positives)."""
    p = 1 / (1 + np.exp(-logits.numpy()))
    o = obs.numpy()
    an = -np.log(1 - p + EPS)
    unknown = np.argwhere(o == 0)
    order = np.argsort(-an[o == 0], kind="stable")[:k]
    chosen = {tuple(unknown[i]) for i in order}
    total = 0.0
    for (i, j), value in np.ndenumerate(o):
        if value == 1:
            total += -np.log(p[i, j] + EPS)
        elif (i, j) in chosen:
            total += -np.log(p[i, j] + EPS) if correct else 0.0
        else:
            total += an[i, j]
    return total / o.size, chosen


@pytest.mark.parametrize("name, correct, fixed", [("ll_r", False, False), ("ll_ct", True, False),
                                                  ("ll_cp", True, True)])
@pytest.mark.parametrize("epoch", [1, 2, 4])
def test_losses_reject_or_correct_the_k_largest(name, correct, fixed, epoch):
    logits, obs = _batch()
    k = large_loss_count(obs.numel(), epoch, 10.0, fixed)  # 30 entries, 10 %: 3 per step
    expected, chosen = _by_hand(logits, obs, k, correct)
    assert len(chosen) == k == (0 if epoch == 1 else 3 if fixed else 3 * (epoch - 1))
    mask = large_losses(logits, obs, k)
    assert {tuple(x) for x in mask.nonzero().tolist()} == chosen
    for where in (False, True):
        x = logits.clone().requires_grad_(True)
        value = compute_loss(name, x, obs, obs, epoch=epoch, delta_rel=10.0, where=where)
        assert value.item() == pytest.approx(expected, rel=1e-12)
        value.backward()
        if not correct:  # a rejected entry gets no gradient at all
            assert all(x.grad[i, j] == 0 for i, j in chosen)


@pytest.mark.parametrize("where", [False, True])
def test_ll_cp_given_its_corrections_is_the_same_to_the_bit(where):
    """The training loop computes LL-Cp's mask once and hands it to the loss (`corrected=`): value and gradient
    equal those of the loss computing it itself; another mask gives another loss (the argument is used)."""
    logits, obs = _batch(seed=3, b=8, c=6)
    mask = train.LOSSES["ll_cp"].corrections(logits, obs, delta_rel=10.0, epoch=3)
    assert int(mask.sum()) == 5  # ceil(48 * 10 / 100)
    results = []
    for corrected in (None, mask, torch.zeros_like(mask)):
        x = logits.clone().requires_grad_(True)
        value = compute_loss("ll_cp", x, obs, obs, epoch=3, delta_rel=10.0, where=where, corrected=corrected)
        value.backward()
        results.append((value.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])  # no corrections: the assume-negative loss
    with pytest.raises(ValueError, match="corrected must be a"):
        compute_loss("ll_cp", logits, obs, obs, epoch=3, delta_rel=10.0, corrected=mask.float())


def test_the_training_step_selects_the_large_losses_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, 24, 6)
    cfg = config.build_config("demo", loss="ll_cp", delta_rel=5.0, batch_size=8, num_workers=0)
    engine = train.build_engine(TinyNet(6), CPU)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=0)
    optimizer = torch.optim.Adam(engine.model.parameters(), lr=1e-2)
    calls = []
    real = train.LOSSES["ll_cp"].corrections
    monkeypatch.setattr(train.LOSSES["ll_cp"], "corrections", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr("losses._permanent_corrections", lambda *a, **kw: pytest.fail("selected twice"))
    out = train.train_epoch(engine, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg, 2, ds)
    assert len(calls) == 3 and out["corrected_labels"] == 3 * 3


def test_mark_positive_counts_every_mask_of_a_repeated_row():
    """An epoch's corrections are written together; a row twice (a torchrun shard's padding) keeps both masks."""
    from datasets import LabelledRows
    obs = np.zeros((4, 3))
    obs[:, 0] = 1
    rows = LabelledRows(obs, np.ones((4, 3)))
    mask = torch.tensor([[False, True, False], [False, False, True], [False, False, False], [False, False, True]])
    rows.mark_positive(torch.tensor([2, 2, 0, 3]), mask)
    expected = obs.copy()
    expected[2, 1] = expected[2, 2] = expected[3, 2] = 1
    np.testing.assert_array_equal(rows.labels_obs, expected)


def test_more_large_losses_than_unknowns_takes_all_unknowns():
    logits, obs = _batch()
    assert int(large_losses(logits, obs, 10_000).sum()) == int((obs == 0).sum())


@pytest.mark.parametrize("name", ["ll_cp", "ll_ct"])
def test_permanent_corrections_persist_and_reach_the_workers(tmp_path, name):
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, 24, 6)
    initial = ds.labels_obs.copy()
    cfg = config.build_config("demo", loss=name, delta_rel=5.0, batch_size=8, num_workers=2)
    engine = train.build_engine(TinyNet(6), CPU)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True)
    optimizer = torch.optim.Adam(engine.model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_epoch(engine, loader, optimizer, scaler, cfg, 1, ds)
    np.testing.assert_array_equal(ds.labels_obs, initial)  # epoch 1: unchanged
    before = ds.labels_obs.copy()
    spy = []
    real_corrections = train.LOSSES[name].corrections
    if real_corrections is not None:  # record each batch's corrected positions, in dataset rows
        def recording(logits, obs, **kw):
            mask = real_corrections(logits, obs, **kw)
            spy.append(mask.clone())
            return mask
        train.LOSSES[name].corrections = recording
    try:
        out = train.train_epoch(engine, loader, optimizer, scaler, cfg, 2, ds)
    finally:
        train.LOSSES[name].corrections = real_corrections
    added = (ds.labels_obs == 1) & (before == 0)
    if name == "ll_ct":
        assert not added.any()  # corrected for the step only
        return
    # 3 batches of 8 x 6 entries, k = ceil(48 * 5 / 100) = 3 each, at the positions the loss selected
    assert int(added.sum()) == 3 * 3 == out["corrected_labels"] and (ds.labels_obs[initial == 1] == 1).all()
    assert len(spy) == 3 and all(int(m.sum()) == 3 for m in spy)
    seen = np.zeros_like(initial)
    for batch in loader:  # the persistent workers now serve the corrected rows
        seen[batch["idx"].numpy()] = batch["label_vec_obs"].numpy()
    np.testing.assert_array_equal(seen, ds.labels_obs)
    train.train_epoch(engine, loader, optimizer, scaler, cfg, 3, ds)
    assert int(((ds.labels_obs == 1) & (initial == 0)).sum()) > int(added.sum())  # kept, and more added


@pytest.mark.parametrize("name", ["ll_r", "ll_ct"])
def test_the_training_step_gives_the_loss_its_epoch(tmp_path, monkeypatch, name):
    # without the epoch, LL-R/LL-Ct would silently be plain AN: the step's losses must be those of epoch 3
    ds = tiny_dataset(tmp_path, 16, 6)
    cfg = config.build_config("demo", loss=name, delta_rel=10.0, batch_size=8, num_workers=0)
    seen = []
    real = train.compute_loss

    def spy(name_, logits, obs, true, **kw):
        seen.append(kw["epoch"])
        value = real(name_, logits, obs, true, **kw)
        as_epoch_1 = real(name_, logits.detach(), obs, true, **{**kw, "epoch": 1})
        assert value.item() != as_epoch_1.item()  # k = ceil(48 * 2 * 10 / 100) = 10 entries changed
        return value
    monkeypatch.setattr(train, "compute_loss", spy)
    engine = train.build_engine(TinyNet(6), CPU)
    train.train_epoch(engine, DataLoader(ds, batch_size=8), torch.optim.Adam(engine.model.parameters()),
                      torch.amp.GradScaler("cpu", enabled=False), cfg, 3, ds)
    assert seen == [3, 3]


def test_delta_rel_defaults_per_dataset_and_range(capsys):
    assert config.build_config("pascal", loss="ll_cp").delta_rel == 0.1
    assert config.build_config("coco", loss="ll_r").delta_rel == 0.4
    assert config.build_config("cub", loss="ll_ct").delta_rel == 0.4
    assert config.build_config("cub", loss="ll_ct", delta_rel=1.5).delta_rel == 1.5
    assert main.main(["-d", "demo", "-l", "ll_r", "--delta-rel", "0"]) == 2
    assert "--delta-rel must be in (0, inf)" in capsys.readouterr().err
