"""sweep.py: the skip / resume / new decision per combination (through --print, on fake results folders), the
flags it refuses up front, and real sweeps on a tiny pascal-shaped root: a failing run does not stop the sweep,
a finished run is recognised as done, Ctrl-C stops the current run and the sweep."""
from __future__ import annotations

import json
import re
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
import sweep
from helpers import write_pascal_root

REPO = Path(sweep.__file__).resolve().parent
FAST = ["-g", "cpu", "--arch", "resnet18", "--weights", "random", "--image-size", "32", "--num-workers", "0",
        "--batch-size", "4"]


def recorded_config(dataset: str, loss: str, seed: int, **overrides) -> dict:
    """The "config" main.py writes to results.json for these settings."""
    return config.build_config(dataset, loss=loss, pytorch_seed=seed, **overrides).to_dict()


def fake_run(results: Path, name: str, cfg: dict, status: str, last_pt: bool = False, epochs: int = 0,
             pid: int | None = None) -> Path:
    folder = results / name
    folder.mkdir(parents=True)
    record = {"config": cfg, "status": status, "epochs": {str(i + 1): {"seconds": 1.0} for i in range(epochs)}}
    if pid is not None:
        record["process"] = {"pid": pid, "host": socket.gethostname()}
    (folder / "results.json").write_text(json.dumps(record))
    if last_pt:
        (folder / "last.pt").write_bytes(b"a checkpoint")
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def printed(capture, argv: list[str]) -> tuple[list[list[str]], str]:
    """The commands of `sweep.py --print` (each line split as a shell would) and its stderr (capsys or capfd)."""
    assert sweep.main(["--print", *argv]) == 0
    out, err = capture.readouterr()
    return [shlex.split(line) for line in out.splitlines()], err


# ----------------------------------------------------------------------------------------------------------------
# decisions

def test_print_skips_finished_resumes_unfinished_and_starts_the_rest(tmp_path, capsys):
    res = tmp_path / "res"
    extras = ["-g", "cpu", "--epochs", "4"]
    same = dict(gpu="cpu", num_epochs=4, results_dir=str(res))
    fake_run(res, "pascal_an_s0_old", recorded_config("pascal", "an", 0, **same), "failed", last_pt=True, epochs=3)
    done = fake_run(res, "pascal_an_s0_new", recorded_config("pascal", "an", 0, **same), "finished", epochs=4)
    fake_run(res, "pascal_an_s1_a", recorded_config("pascal", "an", 1, **same, lr=1e-4), "finished", epochs=4)
    fake_run(res, "pascal_EM_s0_a", recorded_config("pascal", "EM", 0, **same), "failed", epochs=1)  # no last.pt
    failed = fake_run(res, "pascal_EM_s0_b", recorded_config("pascal", "EM", 0, **same), "failed", last_pt=True,
                      epochs=2)
    dead = fake_run(res, "pascal_EM_s1_a", recorded_config("pascal", "EM", 1, **same), "running", last_pt=True,
                    epochs=1, pid=dead_pid())
    # only settings that cannot change a number differ: the same experiment
    neutral = fake_run(res, "coco_an_s0_a", recorded_config("coco", "an", 0, gpu="1", num_epochs=4, image_cache="ram",
                                                            data_root="elsewhere", results_dir="old"), "finished")
    fake_run(res, "coco_an_s1_a", recorded_config("coco", "an", 1, **same), "killed", epochs=2)  # no last.pt
    alive = fake_run(res, "coco_EM_s0_a", recorded_config("coco", "EM", 0, **same), "running", last_pt=True,
                     pid=os.getpid())

    commands, err = printed(capsys, ["-d", "pascal", "coco", "-l", "an", "EM", "-s", "0", "1",
                                     "--results-dir", str(res), "--", *extras])

    def new(dataset, loss, seed):
        return ["python", "main.py", "-d", dataset, "-l", loss, "-s", str(seed), *extras, "--results-dir", str(res)]

    assert commands == [
        new("pascal", "an", 1),                                      # the finished one has another lr
        ["python", "main.py", "--resume", str(failed), "-g", "cpu"],  # the one with last.pt, not the older one
        ["python", "main.py", "--resume", str(dead), "-g", "cpu"],    # its process is gone: killed, resumable
        new("coco", "an", 1),                                        # killed, but nothing to resume from
        new("coco", "EM", 1),                                        # never run
    ]
    assert json.loads((dead / "results.json").read_text())["status"] == "killed"
    assert json.loads((alive / "results.json").read_text())["status"] == "running"
    assert f"-d pascal -l an -s 0: done: {done}" in err
    assert f"-d coco -l an -s 0: done: {neutral}" in err
    assert f"-d coco -l EM -s 0: running elsewhere, skipped: {alive}" in err
    assert f"{res / 'coco_an_s1_a'} is killed but has no last.pt to resume from" in err


def test_print_with_an_empty_results_folder_starts_every_combination_in_order(tmp_path, capsys):
    commands, err = printed(capsys, ["-d", "cub", "-l", "EM", "an", "-s", "8", "0", "8"])
    assert [c[2:8] for c in commands] == [["-d", "cub", "-l", "EM", "-s", "8"], ["-d", "cub", "-l", "EM", "-s", "0"],
                                          ["-d", "cub", "-l", "an", "-s", "8"], ["-d", "cub", "-l", "an", "-s", "0"]]
    assert all(len(c) == 8 for c in commands)  # no --results-dir unless given
    assert err == ""


def test_resume_keeps_only_the_result_neutral_extra_flags():
    extras = ["-g", "1", "--lr", "1e-4", "--num-workers", "2", "--persistent-workers", "--nls-eps", "-0.2",
              "--data-root", "/d", "--amp=bf16", "--image-cache", "disk", "--epochs", "3", "--results-dir", "r"]
    assert sweep.resume_flags(extras) == ["-g", "1", "--data-root", "/d", "--image-cache", "disk"]


@pytest.mark.parametrize("extras, message", [
    (["--no-such-flag"], "error: the main.py flags after --: unrecognized arguments: --no-such-flag"),
    (["--lr", "-1"], "error: -d pascal -l EM_APL -s 0 --lr -1: --lr must be a finite number > 0, got -1.0"),
    (["--epochs", "3"], "error: -d pascal -l EM_APL -s 0 --epochs 3: EM_APL needs 1 <= --warmup-epoch < --epochs"),
    (["-s", "3"], "error: -s/--pytorch-seed among the main.py flags after --: give it to sweep.py itself"),
    (["--pytorch_seed=3"], "error: -s/--pytorch-seed among the main.py flags after --"),
    (["--loss", "an"], "error: -l/--loss among the main.py flags after --"),
    (["--results-dir", "x"], "error: --results-dir among the main.py flags after --"),
    (["--print-config"], "error: --print-config among the main.py flags after --: it runs nothing"),
    (["-g", "x"], "error: -g/--gpu must be 'auto', a CUDA index or 'cpu', got 'x'"),
])
def test_a_bad_extra_flag_stops_the_sweep_before_any_run(tmp_path, capfd, extras, message):
    code = sweep.main(["-d", "pascal", "-l", "EM_APL", "-s", "0", "1", "--results-dir", str(tmp_path / "res"),
                       "--", *extras])
    out, err = capfd.readouterr()
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err
    assert out == "" and not (tmp_path / "res").exists()


def test_a_sweep_of_finished_runs_runs_nothing_and_a_run_elsewhere_is_not_finished(tmp_path, capfd):
    res = tmp_path / "res"
    for seed in (0, 1):
        fake_run(res, f"pascal_an_s{seed}", recorded_config("pascal", "an", seed, gpu="cpu", results_dir=str(res)),
                 "finished")
    argv = ["-d", "pascal", "-l", "an", "-s", "0", "1", "--results-dir", str(res), "--", "-g", "cpu"]
    assert sweep.main(argv) == 0
    out = capfd.readouterr().out
    done = re.escape(str(res / "pascal_an_s1"))
    assert re.search(rf"^\[2/2, sweep \d+:\d\d:\d\d\] -d pascal -l an -s 1: done: {done}$", out, re.MULTILINE)
    assert "2 skipped (done)" in out

    fake_run(res, "pascal_an_s8", recorded_config("pascal", "an", 8, gpu="cpu", results_dir=str(res)), "running",
             pid=os.getpid())
    assert sweep.main([*argv[:6], "8", *argv[6:]]) == 1  # not every combination is finished
    out = capfd.readouterr().out
    assert "2 skipped (done), 1 skipped (running elsewhere)" in out
    assert sorted(p.name for p in res.iterdir()) == ["pascal_an_s0", "pascal_an_s1", "pascal_an_s8"]


# ----------------------------------------------------------------------------------------------------------------
# real runs (main.py subprocesses on a tiny root)

def _sweep(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_a_failing_run_does_not_stop_the_sweep_and_a_finished_one_is_then_skipped(tmp_path, capfd):
    root = write_pascal_root(tmp_path)  # no cub data there: that run stops at once (exit 2, no folder)
    res = tmp_path / "res"
    extras = [*FAST, "--data-root", str(root), "--epochs", "1"]
    assert sweep.main(["-d", "cub", "pascal", "-l", "EM", "--results-dir", str(res), "--", *extras]) == 1
    out, err = capfd.readouterr()  # the runs' output too: they write to the same file descriptors
    [folder] = list(res.iterdir())
    assert folder.name.startswith("pascal_EM_s0_")
    assert json.loads((folder / "results.json").read_text())["status"] == "finished"
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [re.sub(r", sweep \d+:\d\d:\d\d\]", "]", line).split(" in ")[0] for line in progress] == [
        "[1/2] -d cub -l EM -s 0: new run", "[1/2] -d cub -l EM -s 0: failed, exit 2, no run folder",
        "[2/2] -d pascal -l EM -s 0: new run", f"[2/2] -d pascal -l EM -s 0: finished, {folder}"]
    assert f"error: missing {root / 'cub' / 'formatted_train_images.npy'}" in err  # main.py's, streamed
    summary = out[out.index("sweep summary"):]
    assert "1 finished, 1 failed" in summary
    assert "failed                       -d cub -l EM -s 0: exit 2, no run folder" in summary
    assert f"finished                     -d pascal -l EM -s 0: {folder}" in summary

    # the same sweep again: the finished run (its config as main.py recorded it) is done, the failed one comes again
    commands, err = printed(capfd, ["-d", "cub", "pascal", "-l", "EM", "--results-dir", str(res), "--", *extras])
    assert commands == [["python", "main.py", "-d", "cub", "-l", "EM", "-s", "0", *extras, "--results-dir",
                         str(res)]]
    assert f"-d pascal -l EM -s 0: done: {folder}" in err


def test_ctrl_c_stops_the_current_run_and_the_sweep(tmp_path):
    root = write_pascal_root(tmp_path, n_train=200)  # epochs of a few seconds
    res = tmp_path / "res"
    proc = _sweep("-d", "pascal", "-l", "EM", "-s", "0", "1", "--results-dir", str(res), "--", *FAST,
                  "--data-root", str(root), "--epochs", "50", cwd=tmp_path)
    deadline = time.monotonic() + 300
    record = None
    while record is None and proc.poll() is None and time.monotonic() < deadline:
        record = next(res.glob("*/results.json"), None) if res.is_dir() else None
        time.sleep(0.05)
    assert record is not None and proc.poll() is None  # training has started
    proc.send_signal(signal.SIGINT)  # to the sweep only: the run is in its own session
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert json.loads(record.read_text())["status"] == "interrupted"
    assert len(list(res.iterdir())) == 1  # the second seed was not started
    summary = out[out.index("sweep summary"):]
    assert f"interrupted                  -d pascal -l EM -s 0: exit 130, {record.parent}" in summary
    assert "not started                  -d pascal -l EM -s 1" in summary
