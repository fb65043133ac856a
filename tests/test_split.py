"""Tests for datasets.generate_split, the original's 80/20 train/val split of the official train set.

Reference: docs/original.md §4.1 and §11.15: n_val = round(0.2 N), perm =
RandomState(1200).permutation(N), idx_1 = sorted(first N - n_val), idx_2 = sorted(last n_val); frac = 0 gives
idx_2 = everything (the `-0:` slice).
"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from datasets import generate_split  # noqa: E402


def spec_split(n: int, frac: float, seed: int):
    """Independent computation written from the spec."""
    perm = np.random.RandomState(seed).permutation(n)
    n_val = int(round(frac * n))
    n_train = n - n_val
    return sorted(perm[:n_train].tolist()), sorted(perm[n_train:].tolist())


@pytest.mark.parametrize("n,n_train,n_val", [(5717, 4574, 1143),     # VOC 2012 train
                                             (82081, 65665, 16416),  # COCO 2014 train
                                             (5994, 4795, 1199)])    # CUB train
def test_sizes_partition_and_spec(n, n_train, n_val):
    idx_1, idx_2 = generate_split(n, 0.2, np.random.RandomState(1200))
    assert len(idx_1) == n_train and len(idx_2) == n_val
    # sorted, disjoint, covering range(n)
    assert np.all(np.diff(idx_1) > 0) and np.all(np.diff(idx_2) > 0)
    assert len(np.intersect1d(idx_1, idx_2)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([idx_1, idx_2])), np.arange(n))
    # identical to the spec's computation
    exp_1, exp_2 = spec_split(n, 0.2, 1200)
    assert idx_1.tolist() == exp_1
    assert idx_2.tolist() == exp_2


def test_seed_matters_and_is_deterministic():
    a1, a2 = generate_split(5717, 0.2, np.random.RandomState(1200))
    b1, b2 = generate_split(5717, 0.2, np.random.RandomState(1200))
    c1, _ = generate_split(5717, 0.2, np.random.RandomState(1201))
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, c1)


def test_small_hand_checked_split():
    # RandomState(1200).permutation(10), computed here: last round(0.3 * 10) = 3 entries -> idx_2
    perm = np.random.RandomState(1200).permutation(10)
    idx_1, idx_2 = generate_split(10, 0.3, np.random.RandomState(1200))
    assert set(idx_2.tolist()) == set(perm[-3:].tolist())
    assert set(idx_1.tolist()) == set(perm[:7].tolist())


def test_frac_zero_quirk_gives_everything_to_idx_2():
    # round(0 * N) = 0 and perm[-0:] is the whole permutation (faithful to the original)
    idx_1, idx_2 = generate_split(50, 0.0, np.random.RandomState(1200))
    np.testing.assert_array_equal(idx_2, np.arange(50))
    np.testing.assert_array_equal(idx_1, np.arange(50))
