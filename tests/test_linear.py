"""Linear-probe mode (`--features`): a linear classifier on cached frozen-backbone features, trained by the same
loop with every loss; EM_APL's pseudo-labels follow the schedule; on the real CUB images of the tests, ImageNet
features give a clearly higher test mAP than random-backbone features."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from config import LOSS_NAMES
from conftest import ROOT
from features import extract_features
from helpers import mobilenet_v2_imagenet_state, pseudo_scores_flags


def run(root: Path, results: Path, *args: str) -> dict:
    code = main.main(["-d", "pascal", "-g", "cpu", "--data-root", str(root), "--results-dir", str(results), *args])
    assert code == 0
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def feature_root(bird_root):
    """The bird root's features from a random ResNet-18 at 32 px (extracted once; the set is then cached)."""
    extract_features(bird_root, "pascal", "resnet18", "random", 32, batch_size=64, num_workers=0)
    return bird_root


@pytest.mark.parametrize("loss", [name for name in LOSS_NAMES if name != "role_li"])
def test_every_loss_runs_on_features(feature_root, tmp_path, loss):
    res = run(feature_root, tmp_path, "-l", loss, "--features", "resnet18_random_32", "--epochs", "4",
              "--warmup-epoch", "1",
              *pseudo_scores_flags(feature_root, "pascal", loss, tmp_path.parent / f"{tmp_path.name}-scores"))
    assert res["status"] == "finished" and res["config"]["features"] == "resnet18_random_32"
    assert res["features"] == {"name": "resnet18_random_32", "arch": "resnet18", "weights": "random",
                               "image_size": 32, "dim": 512}
    assert 1 <= res["best_epoch"] <= 4 and len(res["test_per_class_ap"]) == 20
    assert all(np.isfinite(e["train"]["loss"]) for e in res["epochs"].values())


def test_role_li_is_refused_with_features(feature_root, capsys):
    assert main.main(["-d", "pascal", "--data-root", str(feature_root), "-l", "role_li", "--features",
                      "resnet18_random_32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use -l role" in err


def test_missing_feature_set_says_how_to_extract(feature_root, capsys):
    assert main.main(["-d", "pascal", "--data-root", str(feature_root), "-g", "cpu", "--features",
                      "resnet50_imagenet_448"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python preproc/extract_features.py --dataset pascal --arch resnet50" in err


def test_apl_counts_follow_the_schedule(feature_root, tmp_path, monkeypatch):
    import train
    real, calls = train._eval_metrics, []

    def rising(out: dict) -> dict:  # a val mAP that always improves, so that every APL round runs
        calls.append(1)
        return {**real(out), "map_clean": float(len(calls))}
    monkeypatch.setattr(train, "_eval_metrics", rising)
    epochs, warmup, theta = 6, 2, 0.9
    res = run(feature_root, tmp_path, "-l", "EM_APL", "--features", "resnet18_random_32", "--epochs", str(epochs),
              "--warmup-epoch", str(warmup), "--lr", "1e-4", "--stop-metric", "map")
    obs = np.load(feature_root / "pascal" / "formatted_train_labels_obs.npy")[
        np.sort(np.random.RandomState(1200).permutation(90)[:72])]
    unknown = (obs == 0).sum(axis=0)  # U_c
    k = np.floor(theta * unknown / (epochs - warmup)).astype(int)  # k_c, per class and round
    left, total = unknown.copy(), 0
    assert len(res["epochs"]) == epochs
    for epoch in range(1, epochs + 1):
        record = res["epochs"][str(epoch)]
        if epoch < warmup:
            assert "apl_new_pseudo_labels" not in record
            continue
        # rounds after epochs T_w .. T (one more than T - T_w, as the original): k_c new negatives per class,
        # or what is left of the unknowns in the last round
        new = np.minimum(k, left)
        assert record["apl_new_pseudo_labels"] == int(new.sum())
        left, total = left - new, total + int(new.sum())
        assert record["apl_total_pseudo_labels"] == total
    assert res["epochs"]["2"]["apl_new_pseudo_labels"] == 299 and total == int(unknown.sum())  # all used up


def test_pretrained_features_beat_random_ones_on_real_images(bird_root, tmp_path):
    weights = mobilenet_v2_imagenet_state(tmp_path / "mnv2_imagenet.pt")
    torch.manual_seed(0)
    extract_features(bird_root, "pascal", "mobilenet_v2", str(weights), 96, batch_size=64, num_workers=0)
    extract_features(bird_root, "pascal", "mobilenet_v2", "random", 96, batch_size=64, num_workers=0)
    flags = ["-l", "an", "--epochs", "25", "--lr", "1e-3"]
    pretrained = run(bird_root, tmp_path / "a", "--features", "mobilenet_v2_mnv2_imagenet_96", *flags)
    random_net = run(bird_root, tmp_path / "b", "--features", "mobilenet_v2_random_96", *flags)
    # measured: 61.6 against 32.9 (chance 32.9: a random MobileNetV2's features barely vary between images)
    assert pretrained["test_map"] >= random_net["test_map"] + 15
    assert pretrained["test_map"] >= pretrained["chance_test_map"] + 20


def test_openmp_threads_sleep_unless_the_user_says_otherwise(feature_root, tmp_path):
    """main.py sets OMP_WAIT_POLICY=PASSIVE before torch loads its OpenMP runtime (a user's own value wins), and
    a run's numbers and weights do not depend on it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # (this process imported main)
    show = [sys.executable, "-c", "import os, main; print(os.environ['OMP_WAIT_POLICY'])"]
    assert subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True).stdout == "PASSIVE\n"
    assert subprocess.run(show, cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                          text=True).stdout == "ACTIVE\n"
    runs = {}
    for policy in ("ACTIVE", "PASSIVE"):
        results = tmp_path / policy
        subprocess.run([sys.executable, "main.py", "-d", "pascal", "-g", "cpu", "--data-root", str(feature_root),
                        "--results-dir", str(results), "-l", "EM_APL", "--features", "resnet18_random_32",
                        "--epochs", "3", "--warmup-epoch", "1", "--early-stop", "none"], cwd=ROOT,
                       env={**env, "OMP_WAIT_POLICY": policy}, capture_output=True, check=True)
        (run_dir,) = results.iterdir()
        record = json.loads((run_dir / "results.json").read_text())
        runs[policy] = ({e: {phase: {k: v for k, v in values.items() if k != "seconds"} if isinstance(values, dict)
                             else values for phase, values in epoch.items() if phase != "seconds"}
                         for e, epoch in record["epochs"].items()}, record["test_per_class_ap"],
                        torch.load(run_dir / "best.pt", weights_only=False)["model"])
    (epochs_a, ap_a, model_a), (epochs_b, ap_b, model_b) = runs["ACTIVE"], runs["PASSIVE"]
    assert len(epochs_a) == 3 and epochs_a == epochs_b and ap_a == ap_b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
