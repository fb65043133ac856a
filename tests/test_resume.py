"""Resume (`main.py --resume RUN_DIR`): a run stopped during an epoch and resumed ends with the same numbers as the
same run left alone (CPU, --num-workers 0), wherever it was stopped (a training step, the APL pass, the val pass);
last.pt, predictions.npz; and the refusals (finished run, no / damaged / foreign last.pt, a flag that would change
the result), with nothing in the run folder touched by a refused or failed resume."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import main
import train
from metrics import compute_map

ARGS = ["-d", "pascal", "-g", "cpu", "-l", "EM_APL", "--arch", "resnet18", "--weights", "random", "--image-size",
        "32", "--epochs", "4", "--warmup-epoch", "1", "--batch-size", "16", "--num-workers", "0"]


def start(root: Path, results: Path, *extra: str) -> int:
    return main.main([*ARGS, "--data-root", str(root), "--results-dir", str(results), *extra])


def run_folder(results: Path) -> Path:
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return run_dir


def numbers(res: dict) -> dict:
    """Everything a run computes (not timings, pids or paths)."""
    out = {k: res[k] for k in ("best_epoch", "val_map", "test_map", "test_per_class_ap")}
    for epoch, record in res["epochs"].items():
        out[epoch] = {"train_loss": record["train"]["loss"], "train_map": record["train"]["map_clean"],
                      "val": record["val"]["map_clean"], "test": record.get("test", {}).get("map_clean"),
                      "apl": (record.get("apl_new_pseudo_labels"), record.get("apl_total_pseudo_labels"))}
    return out


@pytest.fixture(scope="module")
def reference(bird_root, tmp_path_factory):
    """The run left alone."""
    results = tmp_path_factory.mktemp("reference")
    assert start(bird_root, results) == 0
    run_dir = run_folder(results)
    return run_dir, json.loads((run_dir / "results.json").read_text())


class Stop:
    """Raises KeyboardInterrupt (as Ctrl-C or kill would stop the run) at one point of one epoch."""

    def __init__(self, monkeypatch, epoch: int, where: str) -> None:
        self.epoch, self.where, self.calls = epoch, where, 0
        if where == "step":
            real = train.compute_loss

            def loss(*args, **kwargs):
                if kwargs.get("epoch") == epoch:
                    self.calls += 1
                    if self.calls == 3:
                        raise KeyboardInterrupt("stopped in a training step")
                return real(*args, **kwargs)
            monkeypatch.setattr(train, "compute_loss", loss)
        else:  # "APL" or "val": the pass of that name
            real = train.evaluate

            def evaluate(engine, loader, desc):
                if desc == f"epoch {epoch} {where}":
                    raise KeyboardInterrupt(f"stopped in the {where} pass")
                return real(engine, loader, desc)
            monkeypatch.setattr(train, "evaluate", evaluate)


@pytest.mark.parametrize("where", ["step", "APL", "val"])
def test_stopped_and_resumed_equals_left_alone(bird_root, tmp_path, monkeypatch, reference, where):
    ref_dir, ref = reference
    stop_epoch = min(2, len(ref["epochs"]))
    with monkeypatch.context() as m:
        Stop(m, stop_epoch, where)
        assert start(bird_root, tmp_path) == 130
    run_dir = run_folder(tmp_path)
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted" and len(stopped["epochs"]) == stop_epoch - 1
    assert torch.load(run_dir / "last.pt", weights_only=False)["progress"]["epoch"] == stop_epoch - 1

    assert main.main(["--resume", str(run_dir)]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished"
    assert numbers(res) == numbers(ref)
    (resume,) = res["resumes"]
    assert resume["after_epoch"] == stop_epoch - 1 and resume["previous_status"] == "interrupted"
    # the best epoch's predictions, as the reference's, and they give results.json's numbers
    ours, theirs = np.load(run_dir / "predictions.npz"), np.load(ref_dir / "predictions.npz")
    assert sorted(ours.files) == sorted(theirs.files)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours.files)
    assert compute_map(ours["test_scores"], ours["test_labels"]) == pytest.approx(res["test_map"], abs=1e-9)
    assert compute_map(ours["val_scores"], ours["val_labels"]) == pytest.approx(res["val_map"], abs=1e-9)
    assert int(ours["epoch"]) == res["best_epoch"]


def test_predictions_rows_are_the_formatted_files_rows(reference, bird_root):
    run_dir, res = reference
    pred = np.load(run_dir / "predictions.npz")
    train_labels = np.load(bird_root / "pascal" / "formatted_train_labels.npy")
    test_labels = np.load(bird_root / "pascal" / "formatted_val_labels.npy")
    assert np.array_equal(pred["test_rows"], np.arange(len(test_labels)))
    assert np.array_equal(pred["test_labels"], test_labels)
    assert len(pred["val_rows"]) == 18 and np.array_equal(pred["val_labels"], train_labels[pred["val_rows"]])
    assert pred["val_scores"].dtype == np.float32 and pred["val_scores"].shape == (18, 20)


def test_a_finished_run_cannot_be_resumed(reference, capsys):
    run_dir, _ = reference
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert main.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "finished" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.fixture()
def stopped_run(bird_root, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        Stop(m, 2, "val")
        assert start(bird_root, tmp_path) == 130
    return run_folder(tmp_path)


def test_refusals_leave_the_folder_alone(stopped_run, capsys):
    run_dir = stopped_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def refused(*args: str) -> str:
        assert main.main(["--resume", str(run_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
        return err

    assert "--lr" in refused("--lr", "0.1") and "start a new run" in refused("--lr", "0.1")
    assert "--num-workers" in refused("--num-workers", "2")  # the workers' streams draw the flips
    assert "-l" in refused("-l", "an") or "--loss" in refused("-l", "an")
    assert "stays in its folder" in refused("--results-dir", "elsewhere")
    last = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(last[:1000])
    before["last.pt"] = last[:1000]
    assert "damaged" in refused()
    torch.save({"format": 99}, run_dir / "last.pt")
    before["last.pt"] = (run_dir / "last.pt").read_bytes()
    err = refused()
    assert "format 99" in err and f"format {checkpoints.CHECKPOINT_FORMAT}" in err
    assert main.main(["--resume", str(run_dir.parent / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_neutral_flag_is_accepted_and_recorded(stopped_run):
    assert main.main(["--resume", str(stopped_run), "--num-workers", "0", "-g", "cpu", "--lr", "1e-5"]) == 0
    res = json.loads((stopped_run / "results.json").read_text())
    # --num-workers 0 and --lr 1e-5 are the run's own values: accepted, and only -g is a neutral setting
    assert res["status"] == "finished" and res["resumes"][0]["neutral_settings"] == {"gpu": "cpu"}
    assert res["resumes"][0]["previous_environment"]["torch"] == torch.__version__


def test_a_failed_resume_overwrites_no_checkpoint(stopped_run, monkeypatch, capsys):
    files = ("last.pt", "best.pt", "predictions.npz")
    before = {name: (stopped_run / name).read_bytes() for name in files}
    with monkeypatch.context() as m:
        Stop(m, 2, "step")
        assert main.main(["--resume", str(stopped_run)]) == 130
    assert {name: (stopped_run / name).read_bytes() for name in files} == before
    res = json.loads((stopped_run / "results.json").read_text())
    assert res["status"] == "interrupted" and len(res["epochs"]) == 1 and len(res["resumes"]) == 1
    # and it can be resumed again
    assert main.main(["--resume", str(stopped_run)]) == 0


def test_a_best_pt_ahead_of_last_pt_is_put_back(stopped_run, monkeypatch):
    """Stopped after writing best.pt / predictions.npz of an epoch but before its last.pt: the resume puts back
    the last.pt's best (the epoch it trains again may not improve this time)."""
    best = torch.load(stopped_run / "best.pt", weights_only=False)
    assert best["epoch"] == 1
    torch.save({**best, "epoch": 2}, stopped_run / "best.pt")  # as the stopped epoch 2 would have left them
    pred = dict(np.load(stopped_run / "predictions.npz"))
    np.savez(stopped_run / "predictions.npz", **{**pred, "epoch": np.array(2)})
    with monkeypatch.context() as m:
        Stop(m, 2, "step")  # the resumed epoch 2 stops at once
        assert main.main(["--resume", str(stopped_run)]) == 130
    assert torch.load(stopped_run / "best.pt", weights_only=False)["epoch"] == 1
    assert int(np.load(stopped_run / "predictions.npz")["epoch"]) == 1
    assert json.loads((stopped_run / "results.json").read_text())["best_epoch"] == 1


@pytest.mark.parametrize("protocol, loss", [("kim", "ll_ct"), ("cole", "an")])
def test_other_protocols_stopped_and_resumed_equal_left_alone(bird_root, tmp_path, monkeypatch, protocol, loss):
    """Kim et al.'s loop (the head at 10x lr, the test pass at the end; here with every epoch run) and Cole et
    al.'s (every epoch, drop_last, a test pass every epoch), stopped in epoch 3's val pass: the resumed run goes on
    after a non-improving epoch and ends with the numbers of the run left alone."""
    extra = ("-l", loss, "--protocol", protocol, "--batch-size", "16", "--epochs", "4", "--delta-rel", "5",
             "--early-stop", "none")
    assert start(bird_root, tmp_path / "alone", *extra) == 0
    ref = json.loads((run_folder(tmp_path / "alone") / "results.json").read_text())
    assert len(ref["epochs"]) == 4  # neither loop stops this run early
    tested = [e for e, record in ref["epochs"].items() if "test" in record]
    assert tested == ([str(ref["best_epoch"])] if protocol == "kim" else ["1", "2", "3", "4"])
    with monkeypatch.context() as m:
        Stop(m, 3, "val")
        assert start(bird_root, tmp_path / "stopped", *extra) == 130
    run_dir = run_folder(tmp_path / "stopped")
    assert main.main(["--resume", str(run_dir)]) == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and numbers(res) == numbers(ref)


def test_a_run_stopped_before_its_first_last_pt_restarts_from_its_start(bird_root, tmp_path, monkeypatch, reference,
                                                                      capsys):
    """Stopped (a kill, a full disk) after epoch 1's record but before its last.pt was written: the resume says
    so, and runs the whole run again in its folder, equal to the run left alone (issue 23)."""
    _, ref = reference
    real = checkpoints.save_last

    def cut(*args, **kwargs):
        if args[6].epoch == 1:  # progress
            raise KeyboardInterrupt("stopped while writing last.pt")
        return real(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_last", cut)
        assert start(bird_root, tmp_path) == 130
    run_dir = run_folder(tmp_path)
    assert len(json.loads((run_dir / "results.json").read_text())["epochs"]) == 1
    assert not (run_dir / "last.pt").exists()
    with pytest.raises(checkpoints.NoResumeState,
                       match=r"results.json records 1 epoch\(s\), but it stopped before last.pt"):
        checkpoints.load_last(run_dir)
    leftover = run_dir / ".last.pt.0123abcd.999999.89abcdef.tmp"  # what a kill -9 during the write leaves
    leftover.write_bytes(b"half a checkpoint")
    with pytest.raises(checkpoints.NoResumeState, match="it stopped while writing last.pt of epoch 1"):
        checkpoints.load_last(run_dir)
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} from its start (it was interrupted): no finished epoch's state was saved" in \
        capsys.readouterr().out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and numbers(res) == numbers(ref)
    assert res["resumes"][0]["after_epoch"] == 0


def test_a_read_only_run_folder_is_refused_in_one_line(stopped_run, monkeypatch, capsys):
    """(A read-only mount, simulated: root, who runs these tests here, may write into any folder.)"""
    before = {p.name: p.read_bytes() for p in stopped_run.iterdir()}
    real = main.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == stopped_run:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(main.tempfile, "TemporaryFile", read_only)
    assert main.main(["--resume", str(stopped_run)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: --resume {stopped_run}: the run folder cannot be written (Read-only file system); make "
                   f"it writable, or copy it somewhere writable and resume the copy\n")
    assert "resuming" not in out
    assert {p.name: p.read_bytes() for p in stopped_run.iterdir()} == before
