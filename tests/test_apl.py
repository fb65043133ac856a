"""Tests for asymmetric pseudo-labelling: train.apl_update, train.run_apl and the propagation of the observed
matrix to DataLoader workers (datasets.MultilabelDataset.set_observed).

Reference: docs/original.md §6c and §11.2-5: per class, the
k_c = floor(theta * U_c / (T - T_w)) lowest-probability entries among those still exactly 0 become -p;
positives and earlier pseudo-labels are never touched; no positive pseudo-labels; a one-batch loader never
pseudo-labels; the updates must reach the workers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

import config  # noqa: E402
import train  # noqa: E402
from helpers import TinyNet, tiny_dataset  # noqa: E402

CPU = torch.device("cpu")


def k_expected(theta: float, u: int, num_epochs: int, warmup: int) -> int:
    return math.floor(theta * u / (num_epochs - warmup))


# ------------------------------------------------------------------------------------------------------------
# apl_update


def test_k_c_hand_values():
    # the brief's worked numbers: 0.9 * 7 / 5 = 1.26 -> 1 and 0.9 * 100 / 5 = 18
    assert k_expected(0.9, 7, 10, 5) == 1
    assert k_expected(0.9, 100, 10, 5) == 18


def _two_class_problem(rng: np.random.RandomState):
    """Column 0: 7 unknowns (rows 96..102), the rest positives. Column 1: 3 positives (rows 0..2), 100 unknowns."""
    n = 103
    obs = np.zeros((n, 2))
    obs[:96, 0] = 1
    obs[:3, 1] = 1
    preds = rng.uniform(0.05, 0.95, size=(n, 2))
    return obs, preds


def test_apl_update_counts_values_and_choice():
    obs, preds = _two_class_problem(np.random.RandomState(0))
    # the positives have the lowest probabilities of all: they must not be chosen anyway
    preds[:96, 0] = np.linspace(0.001, 0.01, 96)
    preds[:3, 1] = [0.001, 0.002, 0.003]
    unlabel_num = (obs == 0).sum(axis=0)
    assert list(unlabel_num) == [7, 100]

    new = train.apl_update(obs, preds, unlabel_num, 0.9, 10, 5)

    neg = new < 0
    assert neg.sum(axis=0).tolist() == [1, 18]
    for c in range(2):
        unknown = np.where(obs[:, c] == 0)[0]
        k = [1, 18][c]
        lowest = unknown[np.argsort(preds[unknown, c])[:k]]
        assert set(np.where(neg[:, c])[0]) == set(lowest)
        np.testing.assert_array_equal(new[lowest, c], -preds[lowest, c])
    # positives stay positive, everything else unchanged stays 0
    np.testing.assert_array_equal(new[obs == 1], 1.0)
    assert set(np.unique(new[(obs == 0) & ~neg])) == {0.0}


def test_apl_update_leaves_existing_pseudo_labels_alone():
    obs, preds = _two_class_problem(np.random.RandomState(1))
    # five entries of class 1 were pseudo-labelled earlier; give them the lowest current predictions
    old_rows = np.arange(10, 15)
    obs[old_rows, 1] = -np.array([0.11, 0.12, 0.13, 0.14, 0.15])
    preds[old_rows, 1] = 0.0001
    unlabel_num = np.array([7, 100])  # counted on the initial matrix, not the current one

    new = train.apl_update(obs, preds, unlabel_num, 0.9, 10, 5)

    np.testing.assert_array_equal(new[old_rows, 1], obs[old_rows, 1])  # not re-labelled
    fresh = (new[:, 1] < 0) & (obs[:, 1] == 0)
    assert fresh.sum() == 18  # k_c still uses U_c = 100
    candidates = np.where(obs[:, 1] == 0)[0]
    assert set(np.where(fresh)[0]) == set(candidates[np.argsort(preds[candidates, 1])[:18]])


def test_apl_update_does_not_modify_input():
    obs, preds = _two_class_problem(np.random.RandomState(2))
    obs_copy, preds_copy = obs.copy(), preds.copy()
    new = train.apl_update(obs, preds, np.array([7, 100]), 0.9, 10, 5)
    np.testing.assert_array_equal(obs, obs_copy)
    np.testing.assert_array_equal(preds, preds_copy)
    assert (new < 0).any() and not (obs < 0).any()


def test_apl_update_int64_input_gives_float64_with_fractions():
    obs = np.zeros((6, 1), dtype=np.int64)
    obs[0, 0] = 1
    preds = np.array([[0.5], [0.31], [0.72], [0.05], [0.43], [0.9]])
    # U = 5, theta 1, T - T_w = 2 -> k = 2: rows 3 (0.05) and 1 (0.31)
    new = train.apl_update(obs, preds, np.array([5]), 1.0, 4, 2)
    assert new.dtype == np.float64
    np.testing.assert_array_equal(new[:, 0], [1.0, -0.31, 0.0, -0.05, 0.0, 0.0])


def test_apl_update_shape_mismatch_raises():
    with pytest.raises(ValueError):
        train.apl_update(np.zeros((4, 2)), np.zeros((4, 3)), np.array([4, 4]), 0.9, 10, 5)
    with pytest.raises(ValueError):
        train.apl_update(np.zeros((4, 2)), np.zeros((4, 2)), np.array([4, 4, 4]), 0.9, 10, 5)


@pytest.mark.parametrize("num_epochs,warmup,theta", [(10, 5, 0.9), (10, 4, 0.9), (10, 3, 0.9), (6, 3, 0.5)])
def test_repeated_rounds_never_exceed_theta_u(num_epochs, warmup, theta):
    rng = np.random.RandomState(num_epochs * 100 + warmup)
    n, c = 150, 5
    obs = np.zeros((n, c))
    pos_col = rng.randint(c, size=n)  # one positive per image
    obs[np.arange(n), pos_col] = 1
    unlabel_num = (obs == 0).sum(axis=0)
    initial = obs.copy()
    history = []
    rounds = num_epochs - warmup
    for _ in range(rounds):
        preds = rng.uniform(0.001, 0.999, size=(n, c))
        new = train.apl_update(obs, preds, unlabel_num, theta, num_epochs, warmup)
        # earlier pseudo-labels keep their value; fresh ones are exactly -preds
        np.testing.assert_array_equal(new[obs < 0], obs[obs < 0])
        fresh = (new < 0) & (obs == 0)
        np.testing.assert_array_equal(new[fresh], -preds[fresh])
        obs = new
        history.append((obs < 0).sum(axis=0))
    k = np.array([k_expected(theta, u, num_epochs, warmup) for u in unlabel_num])
    for r, counts in enumerate(history, start=1):
        np.testing.assert_array_equal(counts, r * k)
    assert np.all(history[-1] <= np.floor(theta * unlabel_num))
    # no positive pseudo-labels: the positives are exactly the initial ones, all pseudo-labels lie in [-1, 0)
    np.testing.assert_array_equal(obs == 1, initial == 1)
    assert np.all((obs[obs < 0] >= -1) & (obs[obs < 0] < 0))
    assert not np.any((obs > 0) & (obs < 1))


def test_apl_update_equals_the_original_sort_to_the_bit():
    """The chosen entries are the original's `argsort(...)[:k]`, to the bit of the returned matrix: with ties
    across the k-th place (rounded probabilities, exact zeros), where the choice among the tied depends on the
    sort, and without."""
    rng = np.random.RandomState(11)
    n, c, num_epochs, warmup = 3000, 6, 10, 5
    obs = np.zeros((n, c))
    obs[np.arange(n), rng.randint(c, size=n)] = 1
    unlabel_num = (obs == 0).sum(axis=0)
    expected = obs.copy()
    for round_ in range(3):
        preds = rng.rand(n, c).astype(np.float32)
        preds[:, 1] = np.round(preds[:, 1], 2)  # ties everywhere
        preds[: n // 2, 2] = 0.0  # more zeros than k
        for j in range(c):  # the original's loop
            k = k_expected(0.9, unlabel_num[j], num_epochs, warmup)
            candidates = np.where(expected[:, j] == 0)[0]
            chosen = candidates[np.argsort(preds[candidates, j])[:k]]
            expected[chosen, j] = -preds[chosen, j]
        obs = train.apl_update(obs, preds, unlabel_num, 0.9, num_epochs, warmup)
        assert obs.tobytes() == expected.tobytes()


def test_zero_probability_entry_stays_unknown():
    # -0.0 == 0, so an entry chosen with p exactly 0 remains "unknown" (faithful edge case, docs/original.md §6c.4)
    obs = np.zeros((4, 1))
    preds = np.array([[0.0], [0.2], [0.4], [0.6]])
    new = train.apl_update(obs, preds, np.array([4]), 1.0, 4, 2)  # k = 2
    # rows 0 (p = 0) and 1 (p = 0.2) are chosen; row 0 is written as -0.0 and so still reads as unknown
    np.testing.assert_array_equal(new[:, 0] == 0, [True, False, True, True])
    assert new[1, 0] == -0.2


# ------------------------------------------------------------------------------------------------------------
# the observed matrix reaches DataLoader workers (datasets of tiny PNGs from tests/helpers.py)


@pytest.mark.parametrize("persistent,context", [(True, None), (False, None), (True, "spawn")])
def test_set_observed_reaches_dataloader_workers(tmp_path, persistent, context):
    # context None = the platform default (fork on Linux); "spawn" pickles the dataset into the workers,
    # as the forkserver default of newer Pythons does, so the shared-memory matrix must survive pickling
    n, c = 10, 3
    ds = tiny_dataset(tmp_path, n, c)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context=context)

    def collect():
        got = {}
        for batch in loader:
            assert batch["label_vec_obs"].dtype == torch.float32
            for row, i in zip(batch["label_vec_obs"], batch["idx"].tolist()):
                got[i] = row.numpy().copy()
        assert sorted(got) == list(range(n))
        return got

    first = collect()
    initial = ds.labels_obs.copy()
    for i in range(n):
        np.testing.assert_array_equal(first[i], initial[i].astype(np.float32))

    new_obs = initial.copy()
    new_obs[initial == 0] = -np.linspace(0.01, 0.99, int((initial == 0).sum()))
    ds.set_observed(new_obs)
    np.testing.assert_array_equal(ds.labels_obs, new_obs)

    second = collect()
    for i in range(n):
        np.testing.assert_array_equal(second[i], new_obs[i].astype(np.float32))
    # a second update, to be sure persistent workers are not reading a one-off copy
    newer = new_obs.copy()
    newer[new_obs < 0] = -0.5
    ds.set_observed(newer)
    third = collect()
    for i in range(n):
        np.testing.assert_array_equal(third[i], newer[i].astype(np.float32))


def test_set_observed_rejects_wrong_shape(tmp_path):
    ds = tiny_dataset(tmp_path, 4, 3)
    with pytest.raises(ValueError):
        ds.set_observed(np.zeros((4, 2)))


# ------------------------------------------------------------------------------------------------------------
# run_apl end to end


def _cfg(**kw):
    return config.build_config("demo", loss="EM_APL", num_workers=0, **kw)


def test_run_apl_end_to_end(tmp_path):
    n, c = 21, 3
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, n, c, seed=3)
    model = TinyNet(c)
    cfg = _cfg(num_epochs=6, warmup_epoch=3, neg_proportion=0.9, batch_size=8)  # 3 rounds, 3 batches
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    initial = ds.labels_obs.copy()
    unlabel_num = (initial == 0).sum(axis=0)

    # independent predictions: the transform is deterministic (ToTensor), so eval-mode sigmoid outputs
    model.eval()
    with torch.no_grad():
        images = torch.stack([ds[i]["image"] for i in range(n)])
        preds = torch.sigmoid(model(images)).numpy().astype(np.float64)
    model.train()

    added = train.run_apl(train.build_engine(model, CPU), loader, ds, unlabel_num, cfg, epoch=3)

    after = ds.labels_obs
    k = np.array([k_expected(0.9, u, 6, 3) for u in unlabel_num])
    assert k.sum() > 0
    assert added == k.sum()
    np.testing.assert_array_equal((after < 0).sum(axis=0), k)
    np.testing.assert_array_equal(after == 1, initial == 1)
    for j in range(c):
        unknown = np.where(initial[:, j] == 0)[0]
        lowest = unknown[np.argsort(preds[unknown, j])[:k[j]]]
        assert set(np.where(after[:, j] < 0)[0]) == set(lowest)
        np.testing.assert_allclose(after[lowest, j], -preds[lowest, j], rtol=1e-5)

    # a second round adds k_c more per class and keeps the first round's values
    first = after.copy()
    added2 = train.run_apl(train.build_engine(model, CPU), loader, ds, unlabel_num, cfg, epoch=4)
    assert added2 == k.sum()
    np.testing.assert_array_equal((ds.labels_obs < 0).sum(axis=0), 2 * k)
    np.testing.assert_array_equal(ds.labels_obs[first < 0], first[first < 0])


def test_run_apl_skipped_with_one_batch_loader(tmp_path):
    n, c = 12, 3
    ds = tiny_dataset(tmp_path, n, c)
    cfg = _cfg(num_epochs=6, warmup_epoch=3, batch_size=16)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    assert len(loader) == 1
    before = ds.labels_obs.copy()
    unlabel_num = (before == 0).sum(axis=0)
    assert k_expected(0.9, unlabel_num.min(), 6, 3) > 0  # APL would label something if it ran
    added = train.run_apl(train.build_engine(TinyNet(c), CPU), loader, ds, unlabel_num, cfg, epoch=3)
    assert added == 0
    np.testing.assert_array_equal(ds.labels_obs, before)
