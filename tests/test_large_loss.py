"""The Large-Loss methods (Kim et al. 2022) equal Kim et al.'s code (snucml/LargeLossMatters), bit for bit.

`kim_compute_batch_loss` and `KimSchedule` below re-state, independently of losses.py, what their `losses.py`
(`loss_an`, `compute_batch_loss`), `config.py` (delta_rel /= 100, clean_rate = 1) and `train.py` (clean_rate -=
delta_rel after each epoch; LL-Cp writes `correction_idx` into the observed matrix) do, with LL-Cp on the path
their paper describes (as if their `P['mod_scheme'] is 'LL-Cp'` were True). Values, gradients, the rejected or
corrected entries and LL-Cp's corrections are compared with torch.equal over seeds, with continuous, saturated and
quantised (exactly tied) logits, and in a paired multi-epoch run of the project's training loop against theirs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

import config  # noqa: E402
import main  # noqa: E402
import train  # noqa: E402
from datasets import FeatureDataset, FeatureLoader, LabelledRows  # noqa: E402
from helpers import TinyNet, tiny_dataset  # noqa: E402
from label_state import PermanentCorrections  # noqa: E402
from losses import LOSSES, clean_rate, compute_loss, large_loss_count, large_losses  # noqa: E402

CPU = torch.device("cpu")
SCHEMES = {"ll_r": "LL-R", "ll_ct": "LL-Ct", "ll_cp": "LL-Cp"}


# --- Kim et al.'s code, re-stated --------------------------------------------------------------------------------

class KimSchedule:
    """Their P: delta_rel given in percent is divided by 100 once; clean_rate starts at the int 1 and loses
    delta_rel after every epoch (train.py, after the val phase)."""

    def __init__(self, delta_rel: float, scheme: str) -> None:
        self.P = {"delta_rel": delta_rel / 100 if delta_rel != 0 else delta_rel, "clean_rate": 1, "mod_scheme": scheme}

    def end_epoch(self) -> None:
        self.P["clean_rate"] -= self.P["delta_rel"]


def kim_compute_batch_loss(preds: torch.Tensor, label_vec: torch.Tensor, P: dict):
    """Their `compute_batch_loss` (preds are logits), returning (main_loss, correction_idx, replaced mask)."""
    batch_size, num_classes = int(preds.size(0)), int(preds.size(1))
    unobserved_mask = label_vec == 0
    observed = label_vec.clip(0)
    loss_matrix = F.binary_cross_entropy_with_logits(preds, observed, reduction="none")
    corrected_loss_matrix = F.binary_cross_entropy_with_logits(preds, torch.logical_not(observed).to(preds.dtype),
                                                                reduction="none")
    correction_idx, replaced = None, torch.zeros_like(unobserved_mask)
    if P["clean_rate"] == 1:
        final_loss_matrix = loss_matrix
    else:
        if P["mod_scheme"] == "LL-Cp":
            k = math.ceil(batch_size * num_classes * P["delta_rel"])
        else:
            k = math.ceil(batch_size * num_classes * (1 - P["clean_rate"]))
        unobserved_loss = unobserved_mask.bool() * loss_matrix
        topk = torch.topk(unobserved_loss.flatten(), k)
        topk_lossvalue = topk.values[-1]
        correction_idx = torch.where(unobserved_loss > topk_lossvalue)
        replaced = ~(unobserved_loss < topk_lossvalue)
        if P["mod_scheme"] in ["LL-Ct", "LL-Cp"]:
            final_loss_matrix = torch.where(unobserved_loss < topk_lossvalue, loss_matrix, corrected_loss_matrix)
        else:
            final_loss_matrix = torch.where(unobserved_loss < topk_lossvalue, loss_matrix,
                                            torch.zeros_like(loss_matrix))
    return final_loss_matrix.mean(), correction_idx, replaced


# --- unit level: one batch ---------------------------------------------------------------------------------------

def _batch(seed: int, regime: str, b: int = 8, c: int = 20):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=gen)
    logits = {"continuous": 2 * z,
              "saturated": 40 * z,  # BCE keeps growing where -log(1 - p + 1e-5) stops at ~11.5
              "tied": torch.round(2 * z) / 2,  # a few distinct values: exact ties at the k-th largest loss
              # unknown losses that underflow to exactly 0: the k-th largest is 0 and ties with the positives'
              "underflow": torch.where(z > 1.5, 2 * z, torch.full_like(z, -200.0))}[regime]
    obs = torch.zeros(b, c)
    obs[torch.arange(b), torch.randint(0, c, (b,), generator=gen)] = 1
    return logits, obs


REGIMES = ("continuous", "saturated", "tied", "underflow")


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("regime", REGIMES)
def test_value_gradient_selection_and_corrections_equal_kims(name, regime):
    compared_epochs = 0
    for seed in range(6):
        logits, obs = _batch(seed, regime)
        schedule = KimSchedule(2.0, SCHEMES[name])  # 2 % per epoch: k of 4, 7, 10 on 160 entries
        for epoch in range(1, 5):
            x_kim = logits.clone().requires_grad_(True)
            kim_loss, kim_idx, kim_replaced = kim_compute_batch_loss(x_kim, obs, schedule.P)
            kim_loss.backward()
            for where in (False, True):
                x = logits.clone().requires_grad_(True)
                loss = compute_loss(name, x, obs, obs, epoch=epoch, delta_rel=2.0, where=where)
                loss.backward()
                assert torch.equal(loss, kim_loss.detach()) and torch.equal(x.grad, x_kim.grad), (seed, epoch)
            k = large_loss_count(obs.numel(), epoch, 2.0, fixed=name == "ll_cp")
            assert torch.equal(large_losses(logits, obs, k), kim_replaced)
            if name == "ll_cp":
                kim_corrected = torch.zeros_like(obs, dtype=torch.bool)
                if kim_idx is not None:
                    kim_corrected[kim_idx] = True
                assert torch.equal(LOSSES["ll_cp"].corrections(logits, obs, delta_rel=2.0, epoch=epoch),
                                   kim_corrected)
            compared_epochs += 1
            schedule.end_epoch()
    assert compared_epochs == 24


def test_ties_take_every_tied_entry_and_ll_cp_keeps_the_strictly_larger():
    """Hand-made: unknown losses BCE(z, 0) = softplus(z) for z = 3, 3, 3, 1, ...; k = 2 -> the k-th largest is
    softplus(3), tied three times: the loss replaces all three; LL-Cp's correction (> it) takes none."""
    logits = torch.tensor([[3.0, 3.0, 1.0, 0.0], [3.0, -1.0, -2.0, 5.0]])
    obs = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    replaced = large_losses(logits, obs, 2)
    assert replaced.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert not large_losses(logits, obs, 2, strict=True).any()
    # LL-R: the three tied entries contribute 0; the mean still divides by all 8 entries
    kept = [(1.0, 0.0), (0.0, 1.0), (5.0, 1.0), (-1.0, 0.0), (-2.0, 0.0)]
    by_hand = sum(F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(t)).item() for z, t in kept) / 8
    value = compute_loss("ll_r", logits, obs, obs, epoch=2, delta_rel=25.0)  # k = ceil(8 * 0.25) = 2
    assert value.item() == pytest.approx(by_hand, rel=1e-6)


def test_a_zero_threshold_replaces_the_observed_positives_too_as_kims_code_does():
    # every unknown loss underflows to 0, so the k-th largest is 0 and no entry's unknown-loss lies below it
    logits = torch.full((2, 5), -200.0)
    logits[:, 0] = 4.0
    obs = torch.zeros(2, 5)
    obs[:, 0] = 1
    assert large_losses(logits, obs, 1).all()
    # LL-Ct then trains the positives towards 0 (target `not obs`), as their torch.where does, and the 8 unknowns
    # towards 1: BCE(-200, 1) = 200 each
    expected = (2 * F.binary_cross_entropy_with_logits(torch.tensor(4.0), torch.tensor(0.0)).item() + 8 * 200) / 10
    assert compute_loss("ll_ct", logits, obs, obs, epoch=2, delta_rel=10.0).item() == pytest.approx(expected)


def boostlu_correction_mask(preds: torch.Tensor, label_vec: torch.Tensor, P: dict) -> torch.Tensor:
    """youngwk/BridgeGapExplanationPAMC losses.py `compute_batch_loss`'s `correction_idx` for LL-Cp (the same
    ranking as Kim et al.'s, `>=` where theirs has `>`), as the mask that train.py writes into the labels."""
    unobserved_loss = (label_vec == 0).bool() * F.binary_cross_entropy_with_logits(preds, label_vec.clip(0),
                                                                                  reduction="none")
    mask = torch.zeros_like(label_vec, dtype=torch.bool)
    if P["clean_rate"] == 1:
        return mask  # their correction_idx: two empty tensors
    k = math.ceil(preds.size(0) * preds.size(1) * P["delta_rel"])
    topk_lossvalue = torch.topk(unobserved_loss.flatten(), k).values[-1]
    mask[torch.where(unobserved_loss >= topk_lossvalue)] = True
    return mask


def test_boostlus_corrections_take_the_ties_as_their_code_does():
    differs = 0
    for regime in REGIMES:
        for seed in range(6):
            logits, obs = _batch(seed, regime)
            schedule = KimSchedule(2.0, "LL-Cp")
            for epoch in range(1, 5):
                theirs = boostlu_correction_mask(logits, obs, schedule.P)
                ours = LOSSES["ll_cp"].corrections(logits, obs, delta_rel=2.0, epoch=epoch, ties=True)
                assert torch.equal(ours, theirs), (regime, seed, epoch)
                differs += not torch.equal(ours, LOSSES["ll_cp"].corrections(logits, obs, delta_rel=2.0, epoch=epoch))
                schedule.end_epoch()
    assert differs == 4 * 6 * 3  # the k-th largest itself is in one set only: the rules part in every epoch >= 2


def test_head_boostlu_takes_boostlus_correction_rule_and_the_step_passes_it(tmp_path):
    assert config.build_config("demo", loss="ll_cp").ll_cp_corrections == "above"
    assert config.build_config("coco", loss="ll_cp", head="boostlu").ll_cp_corrections == "at-or-above"
    assert config.build_config("coco", loss="ll_cp", head="boostlu",
                               ll_cp_corrections="above").ll_cp_corrections == "above"
    ds = tiny_dataset(tmp_path, 16, 6)
    seen = []
    real = LOSSES["ll_cp"].corrections
    LOSSES["ll_cp"].corrections = lambda logits, obs, **kw: seen.append(kw["ties"]) or real(logits, obs, **kw)
    try:
        for rule in ("above", "at-or-above"):
            cfg = config.build_config("demo", loss="ll_cp", delta_rel=10.0, batch_size=8, num_workers=0,
                                      ll_cp_corrections=rule)
            engine = train.build_engine(TinyNet(6), CPU)
            train.train_epoch(engine, DataLoader(ds, batch_size=8), torch.optim.Adam(engine.model.parameters()),
                              torch.amp.GradScaler("cpu", enabled=False), cfg, 2, ds)
    finally:
        LOSSES["ll_cp"].corrections = real
    assert seen == [False, False, True, True]


# --- the schedule: Kim's float clean_rate ------------------------------------------------------------------------

def test_the_schedule_of_k_is_kims_float_arithmetic():
    differing_from_closed_formula = 0
    for batch in range(1, 17):
        for classes in (20, 80, 81, 312):
            for delta in (0.1, 0.2, 0.3, 0.4, 0.5):
                for scheme, fixed in (("LL-R", False), ("LL-Cp", True)):
                    schedule = KimSchedule(delta, scheme)
                    for epoch in range(1, 11):
                        if schedule.P["clean_rate"] == 1:
                            kim_k = 0
                        elif fixed:
                            kim_k = math.ceil(batch * classes * schedule.P["delta_rel"])
                        else:
                            kim_k = math.ceil(batch * classes * (1 - schedule.P["clean_rate"]))
                        assert large_loss_count(batch * classes, epoch, delta, fixed) == kim_k
                        assert clean_rate(epoch, delta) == schedule.P["clean_rate"]
                        closed = 0 if epoch == 1 else math.ceil(batch * classes * (1 if fixed else epoch - 1)
                                                                * delta / 100)
                        differing_from_closed_formula += closed != kim_k
                        schedule.end_epoch()
    # the grid holds cases where the closed formula ceil(B*C*(t-1)*d/100) would give another k
    assert differing_from_closed_formula > 0


# --- paired run: the project's loop against Kim's, several epochs ----------------------------------------------

def _features_task(n=40, d=12, c=7, seed=0):
    rng = np.random.RandomState(seed)
    features = rng.randn(n, d).astype(np.float32)
    true = (rng.rand(n, c) < 0.3).astype(np.float64)
    pos = rng.randint(c, size=n)
    true[np.arange(n), pos] = 1
    obs = np.zeros((n, c))
    obs[np.arange(n), pos] = 1
    return features, obs, true


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_paired_multi_epoch_run_equals_kims_loop(name):
    """train.train_epoch (the project's step: where-filling, no sync, corrections written at the epoch's end)
    against Kim's per-batch loop (LL-Cp writes each batch's correction_idx at once) on one data order: equal
    per-epoch mean losses, weights after every epoch, and observed matrices (LL-Cp's corrections)."""
    features, obs0, true = _features_task()
    delta, epochs, batch = 8.0, 4, 8  # a large delta so that every epoch selects several entries per batch

    def model():
        torch.manual_seed(1)
        return torch.nn.Linear(features.shape[1], obs0.shape[1])

    # the project's loop
    ours = model()
    dataset = FeatureDataset(features, obs0, true)
    loader = FeatureLoader(dataset, batch, shuffle=True, device=CPU)
    cfg = config.build_config("demo", loss=name, delta_rel=delta, batch_size=batch, num_workers=0, lr=1e-2)
    engine = train.build_engine(ours, CPU)
    optimizer = engine.optimizer(cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # Kim's loop
    kims = model()
    kim_optimizer = torch.optim.Adam(kims.parameters(), lr=1e-2)
    kim_obs = torch.from_numpy(obs0.copy()).float()
    schedule = KimSchedule(delta, SCHEMES[name])

    torch.manual_seed(7)
    ours_losses, ours_obs, ours_weights = [], [], []
    for epoch in range(1, epochs + 1):
        out = train.train_epoch(engine, loader, optimizer, scaler, cfg, epoch, dataset)
        ours_losses.append(out["loss"])
        ours_obs.append(dataset.labels_obs.copy())
        ours_weights.append(ours.weight.detach().clone())
    torch.manual_seed(7)
    corrections = 0
    for epoch in range(1, epochs + 1):
        order, loss_sum = torch.randperm(len(features)), 0.0
        for start in range(0, len(features), batch):
            idx = order[start:start + batch]
            kim_optimizer.zero_grad()
            logits = kims(torch.from_numpy(features)[idx])
            loss, correction_idx, _ = kim_compute_batch_loss(logits, kim_obs[idx], schedule.P)
            loss.backward()
            kim_optimizer.step()
            loss_sum += loss.item() * len(idx)
            if schedule.P["mod_scheme"] == "LL-Cp" and correction_idx is not None:
                kim_obs[idx[correction_idx[0]], correction_idx[1]] = 1.0
                corrections += len(correction_idx[0])
        schedule.end_epoch()
        assert loss_sum / len(features) == ours_losses[epoch - 1], epoch
        assert torch.equal(kims.weight.detach(), ours_weights[epoch - 1]), epoch
        np.testing.assert_array_equal(kim_obs.numpy(), ours_obs[epoch - 1])
    assert (corrections > 0) == (name == "ll_cp")


# --- the loop's plumbing ------------------------------------------------------------------------------------------

def test_mark_positive_counts_every_mask_of_a_repeated_row():
    """An epoch's corrections are written together; a row twice (a torchrun shard's padding) keeps both masks."""
    obs = np.zeros((4, 3))
    obs[:, 0] = 1
    rows = LabelledRows(obs, np.ones((4, 3)))
    mask = torch.tensor([[False, True, False], [False, False, True], [False, False, False], [False, False, True]])
    rows.mark_positive(torch.tensor([2, 2, 0, 3]), mask)
    expected = obs.copy()
    expected[2, 1] = expected[2, 2] = expected[3, 2] = 1
    np.testing.assert_array_equal(rows.labels_obs, expected)


def test_permanent_corrections_collect_an_epoch_and_write_it_once():
    """label_state.PermanentCorrections: LL-Cp's masks (strictly above the k-th largest unknown loss) gathered step
    by step, written together; losses without corrections get none."""
    assert PermanentCorrections.of("ll_ct", 2, {"delta_rel": 5.0}) is None
    rows = LabelledRows(np.eye(6, 4), np.ones((6, 4)))
    corrections = PermanentCorrections.of("ll_cp", 2, {"delta_rel": 5.0})
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 0.5, 4.0, 0.2], [5.0, 0.1, 0.3, 0.4]])  # rows 3, 4, 5
    corrections.add(torch.tensor([3, 4]), logits[:2], torch.from_numpy(rows.labels_obs[[3, 4]]).float())
    corrections.add(torch.tensor([5]), logits[2:], torch.from_numpy(rows.labels_obs[[5]]).float())
    np.testing.assert_array_equal(rows.labels_obs, np.eye(6, 4))  # nothing written before the end of the epoch
    # k = ceil(8 * 0.05) = 1 and ceil(4 * 0.05) = 1: the largest loss is the threshold, none is strictly above it
    assert corrections.write(rows) == 0
    corrections = PermanentCorrections.of("ll_cp", 2, {"delta_rel": 40.0})  # k = ceil(8 * 0.4) = 4, then 2
    corrections.add(torch.tensor([3, 4]), logits[:2], torch.from_numpy(rows.labels_obs[[3, 4]]).float())
    corrections.add(torch.tensor([5]), logits[2:], torch.from_numpy(rows.labels_obs[[5]]).float())
    assert corrections.write(rows) == 3 + 1
    expected = np.eye(6, 4)
    expected[3, [1, 2]] = expected[4, 2] = expected[5, 0] = 1  # the largest unknown losses, above the k-th
    np.testing.assert_array_equal(rows.labels_obs, expected)


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
    real_corrections = LOSSES[name].corrections
    if real_corrections is not None:  # record each batch's corrected positions
        def recording(logits, obs, **kw):
            mask = real_corrections(logits, obs, **kw)
            spy.append(mask.clone())
            return mask
        LOSSES[name].corrections = recording
    try:
        out = train.train_epoch(engine, loader, optimizer, scaler, cfg, 2, ds)
    finally:
        LOSSES[name].corrections = real_corrections
    added = (ds.labels_obs == 1) & (before == 0)
    if name == "ll_ct":
        assert not added.any()  # corrected for the step only
        return
    # 3 batches of 8 x 6 entries, k = ceil(48 * 0.05) = 3 each: the 2 strictly above the 3rd largest (no ties)
    assert int(added.sum()) == 3 * 2 == out["corrected_labels"] and (ds.labels_obs[initial == 1] == 1).all()
    assert len(spy) == 3 and all(int(m.sum()) == 2 for m in spy)
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
        assert value.item() != as_epoch_1.item()  # k = ceil(48 * (1 - 0.8)) = 10 entries changed
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
