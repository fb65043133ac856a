"""What a newcomer asked for (issue 23 §4): -g auto, --print-config and the per-dataset defaults in --help, a
finished run without its resume state (unless --keep-last), extract_features.py's default worker count, and a
demo quick start that prints no warning on a CPU-only machine."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import main
from preproc import extract_features


def test_gpu_auto_is_the_first_cuda_device_else_the_cpu_without_a_word(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main.resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().out == ""
    # -g 0 and -g cpu keep their meaning: 0 falls back to the CPU with a warning, cpu is the CPU
    assert main.resolve_device("0") == torch.device("cpu")
    assert capsys.readouterr().out.startswith("warning: no CUDA device found, running on the CPU")
    assert main.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main.resolve_device("auto") == torch.device("cuda:0")
    assert main.parse_args([]).gpu == "auto"


def test_the_demo_quick_start_prints_no_warning_and_drops_last_pt_when_finished(small_demo, tmp_path, capfd):
    """`python main.py -d demo` as the README's quick start gives it (on the small demo)."""
    assert main.main(["-d", "demo", "--data-root", str(small_demo), "--results-dir", str(tmp_path / "res")]) == 0
    out, err = capfd.readouterr()
    assert "warning" not in (out + err).lower(), out + err
    [folder] = list((tmp_path / "res").iterdir())
    res = json.loads((folder / "results.json").read_text())
    assert res["status"] == "finished" and res["config"]["gpu"] == "auto"
    assert res["environment"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    # a finished run cannot be resumed: its resume state is deleted, its best weights kept
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "console.log", "predictions.npz", "results.json"]
    assert main.main(["-d", "demo", "--data-root", str(small_demo), "--results-dir", str(tmp_path / "kept"),
                      "--epochs", "4", "--keep-last"]) == 0
    [kept] = list((tmp_path / "kept").iterdir())
    last = torch.load(kept / "last.pt", weights_only=False)
    assert last["progress"]["epoch"] == len(json.loads((kept / "results.json").read_text())["epochs"])


def test_print_config_shows_every_resolved_setting_with_its_source_and_runs_nothing(tmp_path, capsys):
    assert main.main(["-d", "pascal", "--print-config", "--lr", "3e-5", "--results-dir", str(tmp_path / "res")]) == 0
    lines = dict(re.match(r"^(\w+) += (.*)$", line).groups() for line in capsys.readouterr().out.splitlines())
    assert lines["dataset"] == "'pascal'  (command line)"
    assert lines["lr"] == "3e-05  (command line)"
    assert lines["batch_size"] == "8  (config.DATASET_SETTINGS['pascal'])"
    assert lines["alpha"] == "0.2  (config.DATASET_SETTINGS['pascal'])"
    assert lines["loss"] == "'EM_APL'  (main.py default)" and lines["gpu"] == "'auto'  (main.py default)"
    assert lines["seed"] == "1200  (Config default)"
    assert len(lines) == len(main.Config.__dataclass_fields__)
    assert not (tmp_path / "res").exists()
    assert main.main(["-d", "coco", "-l", "ll_cp", "--features", "resnet50_imagenet_448", "--print-config"]) == 0
    lines = dict(re.match(r"^(\w+) += (.*)$", line).groups() for line in capsys.readouterr().out.splitlines())
    assert lines["delta_rel"] == "0.2  (config.LL_DELTA_REL['coco'])"
    assert lines["lr"] == "0.001  (config.LINEAR_SETTINGS (--features))"
    # an own dataset: COCO's entry, then its dataset.json "defaults"
    root = tmp_path / "data"
    (root / "mine" / "images").mkdir(parents=True)
    (root / "mine" / "dataset.json").write_text(json.dumps({
        "format": 1, "num_classes": 2, "class_names": ["a", "b"], "image_folder": "images",
        "single_positive": False, "defaults": {"num_epochs": 8}}))
    for phase, n in (("train", 4), ("val", 2)):
        labels = np.eye(2)[np.arange(n) % 2]
        np.save(root / "mine" / f"formatted_{phase}_images.npy", np.array([f"{i}.png" for i in range(n)]))
        np.save(root / "mine" / f"formatted_{phase}_labels.npy", labels)
    assert main.main(["-d", "mine", "--data-root", str(root), "--print-config"]) == 0
    lines = dict(re.match(r"^(\w+) += (.*)$", line).groups() for line in capsys.readouterr().out.splitlines())
    assert lines["num_epochs"] == f"8  ({root / 'mine' / 'dataset.json'})"
    assert lines["batch_size"] == "16  (config.DATASET_SETTINGS['coco'])"


def test_help_says_where_each_per_dataset_default_comes_from(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--lr LR Adam learning rate (constant) [per dataset (config.DATASET_SETTINGS): pascal 1e-05, coco 1e-05, "
            "nuswide 1e-05, cub 0.0001, demo 0.001; --features: 0.001; another dataset: coco's, then its "
            "dataset.json \"defaults\"]") in text
    assert "[per dataset (config.LL_DELTA_REL, per loss): pascal ll_r 0.2, ll_ct 0.2, ll_cp 0.1;" in text
    assert "[per dataset (config.ROLE_EXPECTED_POSITIVES): pascal 1.5, coco 2.9," in text


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_extract_features_takes_at_most_as_many_workers_as_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(extract_features.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert extract_features.default_workers() == workers
    assert extract_features.parse_args(["--dataset", "pascal"]).num_workers == workers
