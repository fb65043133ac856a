"""The data a run trained on, by content (results.json "data"): report.py never pools runs on different data,
sweep.py never skips a combination because of a finished run on other data, --resume refuses changed data and
finds the run's own data from another working directory. Two tiny pascal-shaped roots that differ only in the
observed labels (the case of issue 23: a copy regenerated with other observed labels)."""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

import main
import report
import sweep
from datasets import FINGERPRINTED, data_fingerprint
from helpers import write_pascal_root

FAST = ["-g", "cpu", "--arch", "resnet18", "--weights", "random", "--image-size", "32", "--num-workers", "0",
        "--batch-size", "4", "--epochs", "1"]


def other_observed_labels(root: Path) -> None:
    """Observe each training row's last true positive instead of its first (the same labels otherwise)."""
    labels = np.load(root / "pascal" / "formatted_train_labels.npy")
    obs = np.zeros_like(labels)
    obs[np.arange(len(labels)), labels.shape[1] - 1 - labels[:, ::-1].argmax(1)] = 1.0
    assert not np.array_equal(obs, np.load(root / "pascal" / "formatted_train_labels_obs.npy"))
    np.save(root / "pascal" / "formatted_train_labels_obs.npy", obs)


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory) -> tuple[Path, Path]:
    a = write_pascal_root(tmp_path_factory.mktemp("a"))
    b = write_pascal_root(tmp_path_factory.mktemp("b"))
    other_observed_labels(b)
    return a, b


@pytest.fixture(scope="module")
def two_runs(two_roots, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A finished EM run (seed 0) on each root, in one results folder."""
    res = tmp_path_factory.mktemp("res")
    for root in two_roots:
        assert main.main(["-d", "pascal", "-l", "EM", *FAST, "--data-root", str(root), "--results-dir", str(res)]) == 0
    folder_a, folder_b = sorted(res.iterdir(), key=lambda f: json.loads((f / "results.json").read_text())
                                ["config"]["data_root"] != str(two_roots[0]))
    return res, folder_a, folder_b


def test_the_fingerprint_is_the_sha256_of_each_file_the_run_reads(two_roots):
    a, b = two_roots
    fa, fb = data_fingerprint(a, "pascal"), data_fingerprint(b, "pascal")
    assert fa["files"] == {name: hashlib.sha256((a / "pascal" / name).read_bytes()).hexdigest()
                           for name in FINGERPRINTED}
    assert fa["root"] == str(a.resolve())
    # only the observed labels differ, and so does the whole
    assert [n for n in FINGERPRINTED if fa["files"][n] != fb["files"][n]] == ["formatted_train_labels_obs.npy"]
    assert fa["sha256"] != fb["sha256"]
    # by content, not by path: a copy has the same fingerprint
    assert data_fingerprint(a.resolve(), "pascal")["sha256"] == fa["sha256"]
    assert data_fingerprint(a.parent / "nowhere", "pascal") is None


def test_a_run_records_the_fingerprint_of_its_data(two_roots, two_runs):
    _, folder_a, folder_b = two_runs
    for folder, root in zip((folder_a, folder_b), two_roots):
        assert json.loads((folder / "results.json").read_text())["data"] == data_fingerprint(root, "pascal")


def test_report_keeps_runs_on_different_data_apart(two_runs, capsys):
    res, folder_a, folder_b = two_runs
    code = report.main([str(res)])
    out, err = capsys.readouterr()
    assert code == 0
    maps = {f: json.loads((f / "results.json").read_text())["test_map"] for f in (folder_a, folder_b)}
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.splitlines()
            if line.startswith("| EM")}
    short = {f: json.loads((f / "results.json").read_text())["data"]["sha256"][:8] for f in (folder_a, folder_b)}
    fast = "batch_size=4, arch=resnet18, weights=random, image_size=32, num_epochs=1, num_workers=0"
    assert rows == {f"EM ({fast}, data={short[f]})": f"{maps[f]:.2f} (1)" for f in (folder_a, folder_b)}, out
    assert f"note: EM on pascal: runs of the same settings trained on different data (data fingerprints " \
           f"{', '.join(sorted(short.values()))}" in err
    assert "skipped" not in err  # same config and seed, but not the same experiment: both are kept


def test_a_sweep_does_not_skip_a_combination_finished_on_other_data(two_roots, two_runs, capsys):
    a, b = two_roots
    res, folder_a, folder_b = two_runs
    extras = [*FAST]
    # seed 1 was run on neither root: new everywhere; seed 0 is done on each root by its own run only
    for root, folder in ((a, folder_a), (b, folder_b)):
        assert sweep.main(["--print", "-d", "pascal", "-l", "EM", "-s", "0", "--results-dir", str(res), "--",
                           *extras, "--data-root", str(root)]) == 0
        out, err = capsys.readouterr()
        assert out == "" and f"-d pascal -l EM -s 0: done: {folder}" in err
    c = write_pascal_root(a.parent / "c")  # a third copy: every true positive observed
    np.save(c / "pascal" / "formatted_train_labels_obs.npy", np.load(c / "pascal" / "formatted_train_labels.npy"))
    assert sweep.main(["--print", "-d", "pascal", "-l", "EM", "-s", "0", "--results-dir", str(res), "--", *extras,
                       "--data-root", str(c)]) == 0
    out, err = capsys.readouterr()
    assert [shlex.split(line) for line in out.splitlines()] == [
        ["python", "main.py", "-d", "pascal", "-l", "EM", "-s", "0", *extras, "--data-root", str(c),
         "--results-dir", str(res)]]
    assert "finished on other data" in err


def test_resume_refuses_changed_data_and_finds_its_own_from_elsewhere(two_roots, tmp_path, monkeypatch, capsys):
    a, _ = two_roots
    root = write_pascal_root(tmp_path / "work")  # a relative --data-root, resumed from another folder
    monkeypatch.chdir(tmp_path / "work")
    res = tmp_path / "res"
    assert main.main(["-d", "pascal", "-l", "EM", *FAST, "--epochs", "2", "--data-root", "data",
                      "--results-dir", str(res)]) == 0
    [folder] = list(res.iterdir())
    record = json.loads((folder / "results.json").read_text())
    assert record["config"]["data_root"] == "data" and record["data"]["root"] == str(root.resolve())
    # make it resumable: a run cut after its first epoch (the state last.pt of epoch 1 is what a cut leaves)
    record.update(status="interrupted")
    (folder / "results.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)  # here "data" does not exist: the run's own root is found by its record
    cfg, _ = main.resume_config(folder, {})
    assert cfg.data_root == str(root.resolve())
    other_observed_labels(root)
    assert main.main(["--resume", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert "resuming" not in out
    assert err.startswith(f"error: --resume {folder}: the data changed since the run started "
                          f"(formatted_train_labels_obs.npy in ") and err.count("\n") == 1, err
