"""Faults of a training run and bad input to main.py: each ends with one line naming the flag or file and the
fix, a non-zero exit code, no traceback, and nothing of the user's (or of an earlier run) lost.

Every case runs main.main in-process on a tiny pascal-shaped root over real VOC JPEGs (helpers.write_pascal_root),
resnet18 from random weights at 16-32 px, so each takes a second or two on a CPU.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import time
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import main
import train
from fileio import write_atomic
from helpers import write_pascal_root
from models import WeightsError, build_model

FAST = ["-g", "cpu", "--arch", "resnet18", "--weights", "random", "--image-size", "32", "--num-workers", "0",
        "--batch-size", "4"]


def run(tmp_path, *extra: str, root=None) -> int:
    root = root or write_pascal_root(tmp_path)
    return main.main(["-d", "pascal", "--data-root", str(root), "--results-dir", str(tmp_path / "res"),
                      *FAST, *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def run_folders(tmp_path) -> list:
    res = tmp_path / "res"
    return sorted(p for p in res.iterdir() if p.is_dir()) if res.is_dir() else []


# ----------------------------------------------------------------------------------------------------------------
# hyperparameters are checked before anything is loaded or created

@pytest.mark.parametrize("flag, value", [("--alpha", "-1"), ("--beta", "-0.5"), ("--lr", "-0.001"), ("--lr", "0"),
                                         ("--lr", "nan"), ("--lr", "inf"), ("--alpha", "nan"),
                                         ("--neg-proportion", "1.5"), ("--batch-size", "0"), ("--epochs", "0"),
                                         ("--warmup-epoch", "0"), ("--image-size", "0"), ("--num-workers", "-1")])
def test_out_of_range_hyperparameters_stop_before_any_work(tmp_path, capsys, flag, value):
    assert main.main(["-d", "pascal", "--data-root", str(tmp_path / "nothing"), "--results-dir",
                      str(tmp_path / "res"), flag, value]) == 2
    err = one_line_error(capsys)
    assert flag in err and value.lstrip("-") in err
    assert not (tmp_path / "res").exists()  # checked before the data (which does not even exist here)


@pytest.mark.parametrize("flags, message", [
    (["-s", "99999999999999999999"], "-s/--pytorch-seed must be an integer in [0, 2**63 - 1], got 99999999999999999999"),
    (["-s", "-1"], "-s/--pytorch-seed must be an integer in [0, 2**63 - 1], got -1"),
    (["--subsample-seed", "-1"], "--subsample-seed must be an integer in [0, 2**32 - 1], got -1"),
    (["--subsample-seed", str(2 ** 32)], f"--subsample-seed must be an integer in [0, 2**32 - 1], got {2 ** 32}"),
    # LL-R at pascal's 10 epochs: 9 x delta_rel % of the entries by the last epoch
    (["-l", "ll_r", "--delta-rel", "1000"], "--delta-rel 1000.0 with --epochs 10: -l ll_r would take 9000 % of a "
                                            "batch's entries by the last epoch, more than all of them; choose "
                                            "--delta-rel <= 11.1111"),
    (["-l", "ll_ct", "--delta-rel", "12", "--epochs", "10"], "-l ll_ct would take 108 %"),
    (["-l", "ll_cp", "--delta-rel", "101"], "--delta-rel 101.0: -l ll_cp would take 101 % of a batch's entries by "
                                            "the last epoch, more than all of them; choose --delta-rel <= 100"),
    (["-l", "role", "--expected-num-pos", "1e9"], "--expected-num-pos 1e+09: -l role's k, the mean number of "
                                                  "positives per image, cannot exceed the 20 classes of pascal"),
    (["-l", "role", "--expected-num-pos", "20.5"], "cannot exceed the 20 classes of pascal"),
])
def test_seeds_and_loss_rates_out_of_range_stop_in_one_line(tmp_path, capsys, flags, message):
    """Issue 23: torch's and numpy's own overflow texts, and rates that a run could never reach, stop up front."""
    assert main.main(["-d", "pascal", "--data-root", str(tmp_path / "nothing"), "--results-dir",
                      str(tmp_path / "res"), *flags]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "res").exists()


def test_loss_rates_at_their_limits_are_accepted():
    from config import build_config
    assert build_config("pascal", loss="ll_r", delta_rel=100 / 9).delta_rel == 100 / 9
    assert build_config("pascal", loss="ll_cp", delta_rel=100.0).delta_rel == 100.0
    assert build_config("pascal", loss="role", expected_num_pos=20.0).expected_num_pos == 20.0
    assert build_config("pascal", pytorch_seed=2 ** 63 - 1, subsample_seed=2 ** 32 - 1).pytorch_seed == 2 ** 63 - 1


# ----------------------------------------------------------------------------------------------------------------
# --weights and the torchvision cache

def _bad_weight_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    np.save(tmp_path / "array.npy", np.zeros(3))
    torch.save(torchvision.models.resnet18(), tmp_path / "whole_model.pt")  # a pickled module, not a state dict
    torch.save({"weights": [1, 2]}, tmp_path / "not_tensors.pt")
    return {"notes.txt": "not a file written by torch.save", "empty.pt": "empty", "array.npy": "NumPy",
            "whole_model.pt": "state_dict()", "not_tensors.pt": "found dict"}


def test_unusable_weight_files_are_named_with_the_reason(tmp_path, capsys):
    root = write_pascal_root(tmp_path)
    for name, reason in _bad_weight_files(tmp_path).items():
        assert run(tmp_path, "--weights", str(tmp_path / name), root=root) == 2
        err = one_line_error(capsys)
        assert f"--weights {tmp_path / name}" in err and reason in err, err
    assert run_folders(tmp_path) == []


def test_weights_of_another_architecture_say_so(tmp_path):
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mnv2.pt")
    with pytest.raises(WeightsError, match="do not fit torchvision's resnet18.*--arch"):
        build_model("resnet18", 3, str(tmp_path / "mnv2.pt"))


def test_a_damaged_cached_download_names_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 3, "imagenet")
    assert str(cached) in str(info.value) and "delete" in str(info.value)
    assert cached.read_bytes() == b"PK\x03\x04 truncated download"  # the user decides; we never delete it


def test_a_non_classification_arch_is_refused_without_downloading(tmp_path, capsys, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    assert run(tmp_path, "--arch", "fcn_resnet50") == 2
    err = one_line_error(capsys)
    assert "--arch 'fcn_resnet50'" in err and "classification" in err


# ----------------------------------------------------------------------------------------------------------------
# input sizes and a last batch of one image

@pytest.mark.parametrize("arch, size", [("vit_b_16", 32), ("inception_v3", 40)])
def test_an_input_size_the_architecture_cannot_take(tmp_path, capsys, arch, size):
    assert run(tmp_path, "--arch", arch, "--image-size", str(size)) == 2
    err = one_line_error(capsys)
    assert f"--arch {arch}" in err and f"--image-size {size}" in err and "larger --image-size" in err
    assert run_folders(tmp_path) == []


@pytest.mark.parametrize("batch_size", ["7", "1"])
def test_a_last_batch_of_one_image_that_batchnorm_cannot_train(tmp_path, capsys, batch_size):
    # 10 official train rows -> 8 train images; batch 7 leaves 1 (batch 1: every batch), and resnet18 at 32 px
    # ends in 1 x 1 maps
    assert run(tmp_path, "--batch-size", batch_size) == 2
    err = one_line_error(capsys)
    assert "single image" in err and "--batch-size" in err and "BatchNorm" in err
    assert run_folders(tmp_path) == []


def test_the_model_checks_leave_the_random_state_and_the_model_untouched():
    from models import check_model_runs
    model = build_model("resnet18", 3, "random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    check_model_runs(model, "resnet18", 64, torch.device("cpu"), last_batch_size=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too


# ----------------------------------------------------------------------------------------------------------------
# data

def test_a_zero_byte_formatted_file(tmp_path, capsys):
    root = write_pascal_root(tmp_path)
    (root / "pascal" / "formatted_train_labels.npy").write_bytes(b"")
    assert run(tmp_path, root=root) == 2
    err = one_line_error(capsys)
    assert "formatted_train_labels.npy" in err and "empty" in err
    assert f"--load-path {root / 'pascal'} --save-path {root / 'pascal'}" in err  # the hint keeps --data-root


def test_missing_observed_labels_hint_keeps_the_data_root(tmp_path, capsys):
    root = write_pascal_root(tmp_path)
    os.remove(root / "pascal" / "formatted_val_labels_obs.npy")
    assert run(tmp_path, root=root) == 2
    assert f"generate_observed_labels.py --dataset pascal --data-root {root}" in one_line_error(capsys)


@pytest.mark.parametrize("loss", ["EM", "an", "iun", "EM_APL"])
def test_observed_negatives_are_refused_for_every_loss(tmp_path, capsys, loss):
    """One rule for all (issue 23): EM_APL too, which would read a -1 as a pseudo-label with target 1."""
    root = write_pascal_root(tmp_path)
    path = root / "pascal" / "formatted_train_labels_obs.npy"
    labels, obs = np.load(root / "pascal" / "formatted_train_labels.npy"), np.load(path)
    obs[labels == 0] = -1  # as generate_observed_labels.py --num-neg -1 writes them
    np.save(path, obs)
    assert run(tmp_path, "-l", loss, root=root) == 2
    err = one_line_error(capsys)
    assert f"-l {loss} takes observed labels in {{0, 1}}, but {root}/pascal/formatted_train_labels_obs.npy holds " \
           f"observed negatives (-1)" in err
    assert err.endswith(f"regenerate it with python preproc/generate_observed_labels.py --dataset pascal "
                        f"--data-root {root} --num-neg 0")
    assert ("pseudo-label with target 1" in err) == (loss == "EM_APL")
    assert run_folders(tmp_path) == []


def test_observed_labels_without_a_positive_are_refused(tmp_path, capsys):
    root = write_pascal_root(tmp_path)
    path = root / "pascal" / "formatted_train_labels_obs.npy"
    np.save(path, np.zeros_like(np.load(path)))  # as --num-pos 0 would have written them
    assert run(tmp_path, "-l", "EM", root=root) == 2
    assert one_line_error(capsys) == (f"error: -l EM: {root}/pascal/formatted_train_labels_obs.npy observes no "
                                      f"positive label in the training part: nothing to learn from; regenerate it "
                                      f"with python preproc/generate_observed_labels.py --dataset pascal --data-root "
                                      f"{root} --num-pos 1")
    assert run_folders(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# the results folder

def test_results_dir_that_is_a_file(tmp_path, capsys):
    root = write_pascal_root(tmp_path)
    (tmp_path / "res").write_text("my notes")
    assert run(tmp_path, root=root) == 2
    err = one_line_error(capsys)
    assert f"--results-dir {tmp_path / 'res'}" in err
    assert (tmp_path / "res").read_text() == "my notes"


def test_results_dir_that_is_not_writable(tmp_path, capsys, monkeypatch):
    # simulated (the tests may run as root, which ignores permission bits)
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(main.tempfile, "TemporaryFile", read_only)
    assert run(tmp_path) == 2
    err = one_line_error(capsys)
    assert "--results-dir" in err and "read-only" in err


# ----------------------------------------------------------------------------------------------------------------
# a run that is stopped

def _stop_in_epoch(monkeypatch, epoch: int, stop) -> None:
    real = train.train_epoch

    def train_epoch(engine, loader, optimizer, scaler, cfg, e, dataset=None):
        if e == epoch:
            stop()
        return real(engine, loader, optimizer, scaler, cfg, e, dataset)
    monkeypatch.setattr(train, "train_epoch", train_epoch)


@pytest.mark.parametrize("how, code, word", [("sigint", 130, "Ctrl-C"), ("sigterm", 143, "SIGTERM")])
def test_an_interrupted_run_says_so_and_keeps_its_finished_epochs(tmp_path, capsys, monkeypatch, how, code, word):
    def stop():
        if how == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # main's handler turns it into an interruption
    _stop_in_epoch(monkeypatch, 2, stop)
    assert run(tmp_path, "--epochs", "3", "-l", "an") == code
    err = capsys.readouterr().err
    assert "interrupted" in err and word in err and "during epoch 2" in err and "Traceback" not in err
    (folder,) = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "interrupted" and word in results["error"]
    assert list(results["epochs"]) == ["1"] and results["best_epoch"] == 1  # no empty record for epoch 2
    assert "interrupted" in (folder / "console.log").read_text()
    # the handlers are restored
    assert signal.getsignal(signal.SIGTERM) is not main.raise_interrupt
    assert signal.getsignal(signal.SIGINT) is not main.raise_interrupt


def test_a_signal_right_after_the_first_record_is_saved_marks_the_run(tmp_path, capsys, monkeypatch):
    """A signal that lands between fit's first "running" record and its training loop (torchrun stops the other
    ranks within a fraction of a second when one dies, so it can land here) is recorded like one in the loop: the
    run's results.json says "interrupted", as the console does, instead of staying "running"."""
    def signal_now(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # main's handler turns it into an interruption
        time.sleep(1)  # the handler runs here at the latest
    monkeypatch.setattr(train, "start_watchdog", signal_now)
    assert run(tmp_path, "--epochs", "3", "-l", "an") == 143
    err = capsys.readouterr().err
    assert 'interrupted (terminated by SIGTERM) during epoch 1' in err and "Traceback" not in err
    (folder,) = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == "terminated by SIGTERM during epoch 1"
    assert results["epochs"] == {}


def test_ctrl_c_before_the_first_record_says_nothing_was_recorded(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the run prints its summary (before fit's first record): one line that says no results were
    recorded, not a traceback, and not a claim that results.json was marked."""
    def interrupt(datasets):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, "print_stats", interrupt)
    assert run(tmp_path, "--epochs", "3", "-l", "an") == 130
    err = capsys.readouterr().err
    (folder,) = run_folders(tmp_path)
    assert f"interrupted (Ctrl-C) before training started: no results were recorded in {folder}" in err
    assert "Traceback" not in err and "marked" not in err
    assert not (folder / "results.json").exists()


def test_only_the_first_signal_interrupts():
    """A cluster signals every process of a job and a sweep forwards one too: the second signal must not cut the
    saving that the first one started."""
    previous = main.handle_interrupts()
    try:
        with pytest.raises(main.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here at the latest
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored now
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    finally:
        main.restore_interrupts(previous)
    assert signal.getsignal(signal.SIGINT) is previous[1] and signal.getsignal(signal.SIGTERM) is previous[0]


def test_a_full_disk_keeps_the_finished_epoch_and_says_no_space(tmp_path, capsys, monkeypatch):
    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.torch, "save", full_disk)
    assert run(tmp_path, "--epochs", "2", "-l", "an") == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "best.pt" in err and "Traceback" not in err
    (folder,) = run_folders(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "failed" and list(results["epochs"]) == ["1"]  # written before the checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["console.log", "results.json"]  # no temporaries left


def test_a_full_disk_that_also_refuses_console_log(tmp_path, capsys, monkeypatch):
    class FullFile:  # console.log on a full disk: every write, flush and close fails
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
        flush = close = lambda self: FullFile.write(self, "")

    real_init = main._Tee.__init__

    def tee_init(self, stream, path):
        real_init(self, stream, path)
        self.file.close()
        self.file = FullFile()
    monkeypatch.setattr(main._Tee, "__init__", tee_init)
    monkeypatch.setattr(train.torch, "save", lambda obj, path: FullFile().write(""))
    stdout = sys.stdout
    assert run(tmp_path, "--epochs", "2", "-l", "an") == 3
    assert sys.stdout is stdout  # restored
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left" in err and "Traceback" not in err


def test_leftovers_of_a_killed_run_are_cleaned_and_the_run_marked_killed(tmp_path, capsys):
    # a dead process: its pid is free now
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / "res" / "pascal_an_s0_old"
    write_atomic(old / "results.json", lambda tmp: open(tmp, "w").write(json.dumps(
        {"status": "running", "epochs": {"1": {}}, "process": {"pid": dead.pid, "host": train.socket.gethostname()}})))

    def temporary_of(pid: int):  # what write_atomic leaves when its process is killed mid-write
        name = []
        try:
            write_atomic(old / "best.pt", lambda tmp: (name.append(tmp), (_ for _ in ()).throw(SystemExit)))
        except SystemExit:
            pass
        path = old / os.path.basename(name[0]).replace(f".{os.getpid()}.", f".{pid}.")
        path.write_bytes(b"x" * 1000)
        return path
    stale, live = temporary_of(dead.pid), temporary_of(os.getppid())  # the parent process is alive
    (old / "best.pt").write_bytes(b"the earlier run's checkpoint")

    assert run(tmp_path, "--epochs", "1", "-l", "an") == 0
    assert not stale.exists() and live.exists()
    assert (old / "best.pt").read_bytes() == b"the earlier run's checkpoint"
    results = json.loads((old / "results.json").read_text())
    assert results["status"] == "killed" and str(dead.pid) in results["error"] and "epoch 2" in results["error"]


# ----------------------------------------------------------------------------------------------------------------
# hints: what to run, pasteable as printed (issue 23)

def test_missing_data_names_the_whole_chain_shell_quoted(tmp_path, capsys):
    root = tmp_path / "my data"  # a space: each printed path must be quoted
    assert main.main(["-d", "pascal", "--data-root", str(root), "--results-dir", str(tmp_path / "res"), *FAST]) == 2
    quoted = shlex.quote(str(root))
    assert quoted.startswith("'")
    assert one_line_error(capsys) == (
        f"error: missing {root}/pascal/formatted_train_images.npy; create it with: python preproc/download.py "
        f"--dataset pascal --data-root {quoted}, then python preproc/format_pascal.py --load-path "
        f"{shlex.quote(str(root / 'pascal'))} --save-path {shlex.quote(str(root / 'pascal'))}, then python "
        f"preproc/generate_observed_labels.py --dataset pascal --data-root {quoted}")
    # the raw data are there (the folder holds more than its README): the chain starts at the format step
    (root / "pascal" / "VOCdevkit").mkdir(parents=True)
    assert main.main(["-d", "pascal", "--data-root", str(root), "--results-dir", str(tmp_path / "res"), *FAST]) == 2
    assert one_line_error(capsys).split("create it with: ")[1].startswith("python preproc/format_pascal.py")
    # and each command runs as printed: the shell splits it into the same arguments
    assert shlex.split(f"python preproc/generate_observed_labels.py --dataset pascal --data-root {quoted}")[-1] == \
        str(root)


def test_a_data_root_that_is_the_dataset_folder_itself_says_so(tmp_path, capsys):
    (tmp_path / "data" / "demo").mkdir(parents=True)
    for extra in ([], ["--features", "resnet18_random_48"]):
        assert main.main(["-d", "demo", "--data-root", str(tmp_path / "data" / "demo"), "--results-dir",
                          str(tmp_path / "res"), *extra]) == 2
        assert one_line_error(capsys) == (f"error: --data-root {tmp_path / 'data' / 'demo'} is the demo folder itself: "
                                          f"--data-root names the folder that holds demo/; give --data-root "
                                          f"{tmp_path / 'data'}")
    assert not (tmp_path / "data" / "demo" / "demo").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_main_called_in_process_gives_back_the_callers_signal_handlers(tmp_path, monkeypatch, signum, code):
    """A notebook or test calling main.main() and interrupting it keeps its own handlers (issue 23)."""
    seen = []

    def callers(sig, frame):  # the caller's own handler (a notebook's, a test runner's)
        seen.append(sig)
    real_loss = train.compute_loss

    def loss(*args, **kwargs):  # the signal arrives in the middle of training, as from the keyboard or kill
        os.kill(os.getpid(), signum)
        return real_loss(*args, **kwargs)
    before = signal.signal(signal.SIGINT, callers), signal.signal(signal.SIGTERM, callers)
    try:
        monkeypatch.setattr(train, "compute_loss", loss)
        assert run(tmp_path) == code
        assert signal.getsignal(signal.SIGINT) is callers and signal.getsignal(signal.SIGTERM) is callers
        assert seen == []  # main's own handler took the signal while it ran
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    [folder] = run_folders(tmp_path)
    assert json.loads((folder / "results.json").read_text())["status"] == "interrupted"
