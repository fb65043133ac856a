"""Tests for preproc/generate_observed_labels.py.

The bit-identity test compares against an independent re-implementation written here from
the reference description: per phase a fresh legacy ``RandomState(seed)``; per row the
positive indices (ascending) are shuffled, then the negative indices (ascending) are
shuffled, each with the legacy Fisher-Yates shuffle. The shuffle is re-written at the level
of raw MT19937 32-bit draws (``randint(0, 2**32, dtype=uint32)`` returns one raw draw):
for i = n-1 .. 1, j = a draw masked to the smallest all-ones mask >= i, redrawn while
j > i, then swap x[i], x[j]. It therefore does not call ``RandomState.shuffle``.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import generate_observed_labels as gol  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402


# ----------------------------------------------------------------------------------------
# independent re-implementation
# ----------------------------------------------------------------------------------------
def _bounded(rs: np.random.RandomState, bound: int) -> int:
    """Uniform integer in [0, bound] from raw 32-bit draws by masked rejection."""
    if bound == 0:
        return 0
    mask = (1 << bound.bit_length()) - 1
    while True:
        v = int(rs.randint(0, 2 ** 32, dtype=np.uint32)) & mask
        if v <= bound:
            return v


def _fisher_yates(rs, items: list) -> None:
    for i in range(len(items) - 1, 0, -1):
        j = _bounded(rs, i)
        items[i], items[j] = items[j], items[i]


def reference_observed(labels, num_pos=1, num_neg=0, seed=1200, shuffle_unused_negatives=True):
    rs = np.random.RandomState(seed)
    out = np.zeros(labels.shape, dtype=labels.dtype)
    for r in range(labels.shape[0]):
        pos = [c for c in range(labels.shape[1]) if labels[r, c] == 1]
        neg = [c for c in range(labels.shape[1]) if labels[r, c] == 0]
        _fisher_yates(rs, pos)
        for c in (pos if num_pos == -1 else pos[:num_pos]):
            out[r, c] = 1
        if num_neg != 0 or shuffle_unused_negatives:  # False only for a negative control
            _fisher_yates(rs, neg)
        for c in (neg if num_neg == -1 else neg[:num_neg]):
            out[r, c] = -1
    return out


def random_labels(rows, cols, p, seed, dtype=np.float64):
    rs = np.random.RandomState(seed)
    lab = (rs.rand(rows, cols) < p).astype(dtype)
    lab[0] = 0  # a row without positives
    lab[1] = 1  # a row without negatives
    lab[2] = 0
    lab[2, cols - 1] = 1  # exactly one positive (shuffle of a length-1 array)
    return lab


# ----------------------------------------------------------------------------------------
# the pure function
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_pos,num_neg", [(1, 0), (2, 0), (-1, 0), (1, 3), (1, -1)])
@pytest.mark.parametrize("seed", [1200, 7])
def test_bit_identical_to_independent_reimplementation(num_pos, num_neg, seed):
    labels = random_labels(300, 20, 0.15, seed=5)
    with pytest.warns(UserWarning):
        got = generate_observed(labels, num_pos=num_pos, num_neg=num_neg, seed=seed)
    exp = reference_observed(labels, num_pos, num_neg, seed)
    assert got.dtype == labels.dtype
    np.testing.assert_array_equal(got, exp)


def test_reimplementation_is_not_vacuous():
    # The helper must agree with numpy's own legacy shuffle on plain lists (a check of the
    # test's premise), and different seeds must give different samples.
    for seed in (0, 1200):
        a, b = np.random.RandomState(seed), np.random.RandomState(seed)
        for n in (0, 1, 2, 5, 20, 80, 312):
            x, y = list(range(n)), list(range(n))
            a.shuffle(x)
            _fisher_yates(b, y)
            assert x == y
        assert a.randint(1 << 30) == b.randint(1 << 30)


def test_one_true_positive_per_row_and_nothing_else():
    labels = random_labels(500, 80, 0.05, seed=3)
    with pytest.warns(UserWarning, match=r"rows have no positive label"):
        obs = generate_observed(labels)
    has_pos = labels.sum(axis=1) > 0
    assert (obs.sum(axis=1)[has_pos] == 1).all()
    assert ((obs == 1) <= (labels == 1)).all()  # observed positives are true positives
    assert not (obs == -1).any()  # num_neg = 0
    assert (obs[~has_pos] == 0).all()
    assert set(np.unique(obs)) <= {0.0, 1.0}


def test_rows_without_positive_stay_zero_and_warn():
    labels = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=np.int64)
    with pytest.warns(UserWarning, match=r"^2 of 4 rows have no positive label"):
        obs = generate_observed(labels)
    assert obs.dtype == np.int64
    assert obs[0].tolist() == [0, 0, 0] and obs[2].tolist() == [0, 0, 0]
    assert obs[1].tolist() == [0, 1, 0]  # the only positive
    assert obs[3].sum() == 1 and obs[3, 2] == 0


def test_input_not_modified_and_seed_behaviour():
    labels = random_labels(200, 20, 0.3, seed=11)
    before = labels.copy()
    with pytest.warns(UserWarning):
        a = generate_observed(labels, seed=1200)
    with pytest.warns(UserWarning):
        b = generate_observed(labels, seed=1200)
    with pytest.warns(UserWarning):
        c = generate_observed(labels, seed=1201)
    np.testing.assert_array_equal(labels, before)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_uniform_over_a_rows_positives():
    # 8000 rows whose positives are columns 1, 4, 6 and 9 of 12: the chosen column should be
    # uniform. Pearson chi-square with 3 degrees of freedom; the 0.001 critical value is 16.27.
    n = 8000
    labels = np.zeros((n, 12))
    labels[:, [1, 4, 6, 9]] = 1
    obs = generate_observed(labels, seed=1200)
    counts = obs.sum(axis=0)[[1, 4, 6, 9]]
    assert counts.sum() == n
    expected = n / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, chi2)
    # and a non-uniform sampler (e.g. always the first positive) would fail this test
    assert not (counts == n).any()


def test_num_neg_marks_true_negatives():
    labels = random_labels(300, 20, 0.2, seed=2)
    with pytest.warns(UserWarning):
        obs = generate_observed(labels, num_pos=1, num_neg=3)
    assert ((obs == -1) <= (labels == 0)).all()
    n_neg = (labels == 0).sum(axis=1)
    np.testing.assert_array_equal((obs == -1).sum(axis=1), np.minimum(n_neg, 3))
    with pytest.warns(UserWarning):
        full = generate_observed(labels, num_pos=-1, num_neg=-1)
    np.testing.assert_array_equal(full, np.where(labels == 1, 1.0, -1.0))


def test_num_neg_zero_still_consumes_draws():
    # The negatives are shuffled even with num_neg = 0, which moves the random stream on.
    # A sampler that skipped that shuffle would pick other positives in later rows.
    labels = random_labels(200, 20, 0.3, seed=4)
    with pytest.warns(UserWarning):
        got = generate_observed(labels, seed=1200)
    np.testing.assert_array_equal(got, reference_observed(labels, seed=1200))
    skipping = reference_observed(labels, seed=1200, shuffle_unused_negatives=False)
    assert not np.array_equal(got, skipping)


@pytest.mark.parametrize("bad", [
    np.array([[0.0, 1.0], [2.0, 0.0]]),
    np.array([[0.0, 0.5], [1.0, 0.0]]),
    np.array([[-1.0, 1.0], [1.0, 0.0]]),
    np.array([[np.nan, 1.0], [1.0, 0.0]]),
    np.ones((2, 3)),
])
def test_non_binary_labels_rejected(bad):
    with pytest.raises(ValueError, match="expected"):
        generate_observed(bad)


def test_module_is_standalone():
    # imported by the demo generator: only the standard library, numpy and preproc.common
    tree = ast.parse((ROOT / "preproc" / "generate_observed_labels.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.add(node.module)
    assert names <= {"__future__", "argparse", "os", "shlex", "sys", "warnings", "pathlib", "typing", "numpy",
                     "preproc.common"}


# ----------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------
def make_root(tmp_path, dataset, train, val):
    d = tmp_path / dataset
    d.mkdir(parents=True)
    np.save(d / "formatted_train_labels.npy", train)
    np.save(d / "formatted_val_labels.npy", val)
    return tmp_path


def test_cli_end_to_end_float_and_int(tmp_path, capsys):
    pas_train = random_labels(120, 20, 0.1, seed=21)
    pas_val = random_labels(50, 20, 0.1, seed=22)
    cub_train = random_labels(80, 312, 0.1, seed=23, dtype=np.int64)
    root = make_root(tmp_path, "pascal", pas_train, pas_val)
    make_root(tmp_path, "cub", cub_train, cub_train.copy())

    assert gol.main(["--dataset", "pascal", "--data-root", str(root)]) == 0
    assert gol.main(["--dataset", "cub", "--data-root", str(root), "--seed", "5"]) == 0
    err = capsys.readouterr().err
    n_empty = int((pas_train.sum(axis=1) == 0).sum())
    assert n_empty >= 1
    assert f"warning: {n_empty} of 120 rows of formatted_train_labels.npy have no positive label" in err

    for ds, lab, seed in (("pascal", {"train": pas_train, "val": pas_val}, 1200),
                          ("cub", {"train": cub_train, "val": cub_train}, 5)):
        for phase in ("train", "val"):
            obs = np.load(root / ds / f"formatted_{phase}_labels_obs.npy")
            assert obs.dtype == lab[phase].dtype
            np.testing.assert_array_equal(obs, reference_observed(lab[phase], seed=seed))
    # a fresh RandomState per phase: identical train/val label matrices give identical samples
    np.testing.assert_array_equal(np.load(root / "cub" / "formatted_train_labels_obs.npy"),
                                  np.load(root / "cub" / "formatted_val_labels_obs.npy"))
    assert not list((root / "cub").glob(".*tmp"))  # no temporary files left behind


def test_cli_as_script_with_counts(tmp_path):
    lab = random_labels(60, 20, 0.3, seed=8)
    root = make_root(tmp_path, "coco", lab, lab)
    res = subprocess.run([sys.executable, "preproc/generate_observed_labels.py", "--dataset", "coco",
                          "--data-root", str(root), "--num-pos", "2", "--num-neg", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    obs = np.load(root / "coco" / "formatted_val_labels_obs.npy")
    np.testing.assert_array_equal(obs, reference_observed(lab, num_pos=2, num_neg=1))


def test_cli_missing_file_names_format_command(tmp_path, capsys):
    assert gol.main(["--dataset", "cub", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "cub" / "formatted_train_labels.npy") in err
    assert "python preproc/format_cub.py" in err and "Traceback" not in err
    assert gol.main(["--dataset", "demo", "--data-root", str(tmp_path)]) == 2
    assert "python preproc/make_demo.py" in capsys.readouterr().err


def test_cli_non_binary_values_name_the_file(tmp_path, capsys):
    good = random_labels(10, 5, 0.5, seed=1)
    bad = good.copy()
    bad[3, 2] = 2.0
    root = make_root(tmp_path, "nuswide", good, bad)
    assert gol.main(["--dataset", "nuswide", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(root / "nuswide" / "formatted_val_labels.npy") in err
    assert "expected values exactly 0 or 1, found 1 other entries (2.0)" in err
    # nothing written: both files are checked before writing
    assert not (root / "nuswide" / "formatted_train_labels_obs.npy").exists()


def test_cli_rejects_bad_counts(tmp_path, capsys):
    lab = random_labels(10, 5, 0.5, seed=1)
    root = make_root(tmp_path, "pascal", lab, lab)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root), "--num-pos", "-2"]) == 2
    assert "num_pos must be an integer >= 0, or -1" in capsys.readouterr().err
    # no positive observed: nothing any method could learn from (issue 23)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root), "--num-pos", "0", "--num-neg", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: num_pos 0 observes no positive label at all") and err.count("\n") == 1
    assert not (root / "pascal" / "formatted_train_labels_obs.npy").exists()


def test_cli_rejects_a_seed_numpy_cannot_use(tmp_path, capsys):
    lab = random_labels(10, 5, 0.5, seed=1)
    root = make_root(tmp_path, "pascal", lab, lab)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root), "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: seed must be between 0 and 2**32 - 1") and "Traceback" not in err


def test_cli_data_root_not_writable(tmp_path, monkeypatch, capsys):
    # simulated: the tests may run as root, for whom chmod does not make a folder read-only
    lab = random_labels(10, 5, 0.5, seed=1)
    root = make_root(tmp_path, "pascal", lab, lab)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to {root / 'pascal'}") and err.count("\n") == 1
    assert "not writable" in err and "--data-root" in err
    assert not list((root / "pascal").glob("*obs*"))


def test_cli_disk_full_writes_neither_file(tmp_path, monkeypatch, capsys):
    lab = random_labels(10, 5, 0.5, seed=1)
    root = make_root(tmp_path, "pascal", lab, lab)
    real_save, calls = np.save, []

    def failing_save(fh, array, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the val file, after the train file is complete
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(fh, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the warnings about rows without a positive
    assert last.startswith("error: cannot write") and "no space left" in last and "Traceback" not in err
    assert sorted(p.name for p in (root / "pascal").iterdir()) == ["formatted_train_labels.npy",
                                                                   "formatted_val_labels.npy"]


# ----------------------------------------------------------------------------------------
# datasets described by a dataset.json (the user's own data, preproc/format_folder.py)
# ----------------------------------------------------------------------------------------
def describe(folder, num_classes, single_positive=False):
    from preproc.common import write_dataset_json
    write_dataset_json(folder, class_names=[f"c{k}" for k in range(num_classes)], image_folder="images",
                       single_positive=single_positive, source="test")


def test_cli_any_folder_with_a_dataset_json(tmp_path):
    train, val = random_labels(40, 7, 0.3, seed=31), random_labels(15, 7, 0.3, seed=32)
    root = make_root(tmp_path, "my_photos", train, val)
    describe(root / "my_photos", 7)
    assert gol.main(["--dataset", "my_photos", "--data-root", str(root), "--seed", "9"]) == 0
    for phase, lab in (("train", train), ("val", val)):
        obs = np.load(root / "my_photos" / f"formatted_{phase}_labels_obs.npy")
        np.testing.assert_array_equal(obs, reference_observed(lab, seed=9))


def test_cli_benchmark_with_a_dataset_json_is_unchanged(tmp_path):
    lab = random_labels(60, 20, 0.2, seed=33)
    root = make_root(tmp_path, "pascal", lab, lab)
    describe(root / "pascal", 20)
    assert gol.main(["--dataset", "pascal", "--data-root", str(root)]) == 0
    np.testing.assert_array_equal(np.load(root / "pascal" / "formatted_train_labels_obs.npy"), reference_observed(lab))


def test_cli_refuses_single_positive_labels_and_writes_nothing(tmp_path, capsys):
    lab = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    root = make_root(tmp_path, "mine", lab, lab)
    describe(root / "mine", 5, single_positive=True)
    assert gol.main(["--dataset", "mine", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {root / 'mine'}: its train labels are single positives")
    assert f"python main.py -d mine --data-root {root}" in err
    assert sorted(p.name for p in (root / "mine").iterdir()) == ["dataset.json", "formatted_train_labels.npy",
                                                                 "formatted_val_labels.npy"]


def test_cli_column_count_must_match_the_dataset_json(tmp_path, capsys):
    lab = random_labels(10, 6, 0.5, seed=1)
    root = make_root(tmp_path, "mine", lab, lab)
    describe(root / "mine", 5)
    assert gol.main(["--dataset", "mine", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "formatted_train_labels.npy: 6 label columns but" in err and "says num_classes 5" in err
    assert not list((root / "mine").glob("*obs*"))


def test_cli_unknown_dataset_names_format_folder(tmp_path, capsys):
    assert gol.main(["--dataset", "holiday", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'holiday'") and err.count("\n") == 1
    assert f"python preproc/format_folder.py --csv <your CSV> --images <your image folder> --save-path " \
           f"{tmp_path / 'holiday'}" in err
    # a dataset.json without label files: the missing file and the command that makes it
    describe(tmp_path / "holiday", 3)
    assert gol.main(["--dataset", "holiday", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"expected {tmp_path / 'holiday' / 'formatted_train_labels.npy'}" in err
    assert "python preproc/format_folder.py" in err
