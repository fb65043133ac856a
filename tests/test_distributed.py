"""torchrun launches (distributed.py) on the CPU with gloo, 2 processes: the run, its evaluation, APL's sync, a
killed rank, resume, and the one-line errors of a launch that cannot work."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from preproc.common import write_dataset_json

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
# one thread per process everywhere: torchrun sets it for its workers, and a CPU kernel's bits can depend on it
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_FLAGS = ["-d", "mini", "-l", "EM_APL", "-g", "cpu", "--epochs", "4", "--warmup-epoch", "1", "--lr", "1e-3",
             "--batch-size", "8", "--arch", "resnet18", "--weights", "random", "--image-size", "32",
             "--num-workers", "0"]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


@pytest.fixture(scope="module")
def mini_root(small_demo_root, tmp_path_factory) -> Path:
    """The small demo as an own dataset, which every process of a launch reads as is: 48 train + 12 val rows and
    19 test rows (of its 20: an odd count, which 2 processes cannot share evenly)."""
    src = small_demo_root / "demo"
    root = tmp_path_factory.mktemp("dist") / "data"
    shutil.copytree(src / "images", root / "mini" / "images")
    arrays = {p.name: np.load(p)[:19] if p.name.startswith("formatted_val") else np.load(p)
              for p in src.glob("formatted_*.npy")}
    write_dataset_json(root / "mini", class_names=[f"c{i}" for i in range(12)], image_folder="images",
                       single_positive=False, source="tests", arrays=arrays)
    return root


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def results_of(results_dir: Path) -> tuple[Path, dict]:
    (run_dir,) = [p for p in results_dir.iterdir() if p.is_dir()]  # exactly one run folder
    return run_dir, json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(mini_root, tmp_path_factory) -> dict:
    """The same training with one process and with two (torchrun)."""
    out = {}
    for name, command in (("single", [sys.executable, "main.py"]), ("two", torchrun("main.py"))):
        results_dir = tmp_path_factory.mktemp(name)
        proc = run(command + RUN_FLAGS + ["--data-root", str(mini_root), "--results-dir", str(results_dir)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (*results_of(results_dir), proc)
    return out


def test_two_process_run_has_one_folder_and_the_single_process_apl_counts(runs):
    _, single, _ = runs["single"]
    run_dir, two, proc = runs["two"]
    assert two["status"] == "finished" and two["world_size"] == 2 and two["per_rank_batch_size"] == 4
    assert single["world_size"] == 1 and single["per_rank_batch_size"] == 8
    assert two["distributed"]["backend"] == "gloo" and len(two["process"]["ranks"]) == 2
    counts = {name: {e: r["apl_new_pseudo_labels"] for e, r in res["epochs"].items()}
              for name, res in (("single", single), ("two", two))}
    common = sorted(set(counts["single"]) & set(counts["two"]))
    assert common and all(counts["two"][e] == counts["single"][e] > 0 for e in common)
    # rank 0 alone prints and writes
    assert proc.stdout.count("run folder:") == 1
    assert (run_dir / "console.log").read_text().count("run folder:") == 1
    names = {p.name for p in run_dir.iterdir()}
    assert names >= {"best.pt", "predictions.npz", "results.json"} and "last.pt" not in names  # (finished: dropped)
    # the test predictions kept cover each test row once, in order
    saved = np.load(run_dir / "predictions.npz")
    assert np.array_equal(saved["test_rows"], np.arange(19))


def test_evaluation_with_one_and_two_processes_gives_the_same_bits(runs, mini_root, tmp_path):
    run_dir = runs["single"][0]
    outs = {}
    for name, command in (("one", [sys.executable, str(WORKER)]), ("two", torchrun(str(WORKER)))):
        outs[name] = tmp_path / name
        outs[name].mkdir()
        proc = run(command + ["evaluate", str(run_dir), str(mini_root), str(outs[name])])
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (np.load(outs[n] / "eval.npz") for n in ("one", "two"))
    assert len(two["test_preds"]) == 19 and len(two["val_preds"]) == 12  # 19: not a multiple of the world size
    for phase in ("val", "test"):
        assert np.array_equal(two[f"{phase}_idx"], np.arange(len(one[f"{phase}_idx"])))
        assert np.array_equal(one[f"{phase}_preds"], two[f"{phase}_preds"])
        assert float(one[f"{phase}_map"]) == float(two[f"{phase}_map"])


def test_after_an_apl_round_both_ranks_hold_the_same_observed_matrix(mini_root, tmp_path):
    proc = run(torchrun(str(WORKER), "apl", str(mini_root), str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    obs = [np.load(tmp_path / f"obs_rank{r}.npy") for r in (0, 1)]
    new = [int(np.load(tmp_path / f"new_rank{r}.npy")) for r in (0, 1)]
    assert np.array_equal(obs[0], obs[1])
    assert new[0] == new[1] == int((obs[0] < 0).sum()) > 0


@pytest.mark.parametrize("loss", ["role", "ll_cp"])
def test_per_sample_state_stays_the_same_on_every_rank(mini_root, tmp_path, loss):
    """ROLE's estimate matrix (its gradients averaged over the ranks) and LL-Cp's corrections (every rank's
    reach every rank) after two epochs: the same on both ranks, as the model's parameters."""
    proc = run(torchrun(str(WORKER), "state", loss, str(mini_root), str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key in ("obs", "model") + (("label_estimates",) if loss == "role" else ()):  # model: its parameters
        a, b = states[0][key], states[1][key]
        assert all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else torch.equal(a, b), key
    obs = states[0]["obs"].numpy()
    if loss == "ll_cp":  # epoch 2 corrects: positives added to the one per row, counted alike on both ranks
        assert states[0]["corrected"] == states[1]["corrected"] and states[0]["corrected"][1] > 0
        assert int((obs == 1).sum()) == len(obs) + sum(states[0]["corrected"])
    else:  # no corrections; the observed matrix is the one positive per row it started with
        assert states[0]["corrected"] == [None, None] and int((obs == 1).sum()) == len(obs)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_a_killed_rank_fails_the_run_naming_it(mini_root, tmp_path):
    command = torchrun("main.py", *RUN_FLAGS, "--epochs", "40", "--image-size", "64", "--dist-timeout", "30",
                       "--data-root", str(mini_root), "--results-dir", str(tmp_path))
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = _wait_for(lambda: next((r for p in tmp_path.glob("*/results.json") if (r := _read(p))
                                          and r.get("process", {}).get("ranks")), None), 120, "the run to start")
        start = time.time()
        os.kill(results["process"]["ranks"][1]["pid"], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
        elapsed = time.time() - start
    finally:
        proc.kill()
    _, final = results_of(tmp_path)
    assert final["status"] == "failed", final.get("error")
    assert f"rank 1 (pid {results['process']['ranks'][1]['pid']}) died" in final["error"]
    assert "error: rank 1" in stderr and proc.returncode != 0
    assert elapsed < 60


def test_a_hung_rank_fails_the_run_within_the_timeout_naming_it(mini_root, tmp_path):
    command = torchrun("main.py", *RUN_FLAGS, "--epochs", "40", "--image-size", "64", "--dist-timeout", "10",
                       "--data-root", str(mini_root), "--results-dir", str(tmp_path))
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hung = None
    try:
        results = _wait_for(lambda: next((r for p in tmp_path.glob("*/results.json") if (r := _read(p))
                                          and r.get("process", {}).get("ranks")), None), 120, "the run to start")
        time.sleep(2.0)  # into the first epoch's steps, whose marks have reached the store
        hung = results["process"]["ranks"][1]["pid"]
        os.kill(hung, signal.SIGSTOP)  # alive, but never answers again
        start = time.time()
        _wait_for(lambda: (_read(next(tmp_path.glob("*/results.json"))) or {}).get("status") == "failed", 60,
                  "the run to be marked failed")
        elapsed = time.time() - start
        proc.communicate(timeout=60)
    finally:
        if hung:
            with contextlib.suppress(ProcessLookupError):  # (torchrun may have killed it already)
                os.kill(hung, signal.SIGKILL)
        proc.kill()
    _, final = results_of(tmp_path)
    assert f"rank 1 (pid {hung}, at epoch" in final["error"] and "stopped answering" in final["error"]
    # the timeout runs from the rank's last progress seen, up to one heartbeat (1 s) before it was stopped
    assert 10 - 1 <= elapsed < 40


def test_a_nan_loss_on_one_rank_stops_every_rank_with_its_message(mini_root, tmp_path):
    proc = run(torchrun(str(WORKER), "nan", *RUN_FLAGS, "--data-root", str(mini_root),
                        "--results-dir", str(tmp_path)))
    _, final = results_of(tmp_path)
    assert proc.returncode != 0 and final["status"] == "failed"
    # rank 1's NaN (its second loss) stops rank 0 too, at the same check, and the run says why
    assert re.match(r"NonFiniteLossError: loss is nan at epoch 1, batch \d+; stopping", final["error"])
    assert "error: loss is nan at epoch 1" in proc.stderr and "died" not in final["error"]


def test_a_distributed_run_resumes_with_its_world_size_only(mini_root, tmp_path):
    flags = [*RUN_FLAGS, "--epochs", "40", "--data-root", str(mini_root), "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(torchrun("main.py", *flags), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list(tmp_path.glob("*/last.pt")), 120, "the first epoch's resume state")
        proc.send_signal(signal.SIGTERM)  # the job is stopped: torchrun passes it to every rank
        proc.communicate(timeout=90)
    finally:
        proc.kill()
    run_dir, stopped = results_of(tmp_path)
    assert stopped["status"] in ("interrupted", "failed") and stopped["epochs"]
    refused = run([sys.executable, "main.py", "--resume", str(run_dir)])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "trained on 2 process(es)" in refused.stderr and "torchrun with 2 processes" in refused.stderr
    resumed = run(torchrun("main.py", "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, final = results_of(tmp_path)
    assert final["status"] == "finished" and final["world_size"] == 2
    assert final["resumes"][-1]["after_epoch"] == len(stopped["epochs"])
    assert len(final["epochs"]) > len(stopped["epochs"])


# ---------------------------------------------------------------------------------------------------------------
# a launch that cannot work: one line from rank 0, before any process group exists

@pytest.fixture
def torchrun_env(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "7", "-g", "cpu"], "--batch-size 7 does not divide by the world size 2"),
    (["-g", "0"], "-g 0 cannot be given under torchrun: each process takes the GPU of its local rank"),
    (["--batch-size", "8"], "no CUDA GPU: add -g cpu to train on the CPU with gloo"),
    (["-g", "cpu", "--sync-bn"], "--sync-bn needs GPUs"),
    (["-g", "cpu", "--image-cache", "ram"], "--image-cache is not supported under torchrun"),
])
def test_launch_errors_are_one_line(torchrun_env, mini_root, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPUs, wherever this runs
    code = main.main(["-d", "mini", "--data-root", str(mini_root), "--results-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not list(tmp_path.iterdir())


def test_more_processes_than_gpus_is_one_line(torchrun_env, mini_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = main.main(["-d", "mini", "--data-root", str(mini_root), "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "torchrun started 2 processes on this node but it has 1 GPU(s): use --nproc_per_node 1" in err


def test_other_ranks_stay_silent_on_launch_errors(torchrun_env, mini_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code = main.main(["-d", "mini", "--data-root", str(mini_root), "--batch-size", "7", "-g", "cpu"])
    assert code == 2 and capsys.readouterr().err == ""
