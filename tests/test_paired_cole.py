"""Paired run against Cole et al.'s own training loop (issue 22): `-l role --protocol cole` and a minimally patched
copy of their code (tests/paired_cole/, MIT licence; NOTICE.md there lists the patches) train the same tiny data
with the same seeds and settings, and give the same per-epoch train loss, metrics (val and test mAP included) and
best weights, bit for bit.

Both run as subprocesses (their module names clash with ours), on the CPU, 0 workers, random resnet18 at 32 px (the demo's 48 px images resized).
The tiny data (52 + 20 rows of the small demo) and batch 8 leave a partial last batch in the train (42 rows), val
(10) and test (20) loaders, so that drop_last counts. The batch is a power of two on purpose: Cole et al.'s logger
multiplies the batch loss, a float32 0-d array, by the batch size, which NumPy 2 keeps in float32 (NumPy 1.x, which
their code ran on, promoted it to float64 as the project does); with other sizes the recorded train loss of their
copy run on NumPy 2 would differ from theirs of the time in its last bits (docs/original.md "Paired runs against
the sources").
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COLE = Path(__file__).resolve().parent / "paired_cole"
SEED, EPOCHS, BATCH, LR, IMAGE_SIZE, K = 1, 2, 8, 1e-4, 32, 1.9
ROWS = {"train": 52, "val": 20}  # official splits -> 42 train, 10 val (20 %, seed 1200), 20 test


def _tiny_dataset(demo: Path, out: Path) -> None:
    """The first ROWS rows of the demo's official splits, its images and dataset.json: a dataset `tiny` that both
    code bases read (ours through dataset.json, theirs through the patched metadata)."""
    out.mkdir(parents=True)
    for phase, n in ROWS.items():
        for kind in ("images", "labels", "labels_obs"):
            np.save(out / f"formatted_{phase}_{kind}.npy", np.load(demo / f"formatted_{phase}_{kind}.npy")[:n])
    shutil.copy(demo / "dataset.json", out / "dataset.json")
    (out / "images").symlink_to(demo / "images")


def _run(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each side imports its own modules
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_role_protocol_cole_equals_coles_loop(small_demo_root, tmp_path):
    data = tmp_path / "data"
    _tiny_dataset(small_demo_root / "demo", data / "tiny")
    ours = _run([sys.executable, "main.py", "-d", "tiny", "--data-root", str(data), "-l", "role", "--protocol", "cole",
                 "-g", "cpu", "-s", str(SEED), "--arch", "resnet18", "--weights", "random", "--image-size",
                 str(IMAGE_SIZE), "--num-workers", "0", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr",
                 str(LR), "--expected-num-pos", str(K), "--results-dir", str(tmp_path / "results")], ROOT)
    theirs = _run([sys.executable, "train.py", str(tmp_path / "cole"), str(data / "tiny"), str(IMAGE_SIZE), str(SEED),
                   str(EPOCHS), str(K), str(BATCH), str(LR)], COLE)
    for name, process in (("main.py", ours), ("Cole et al.'s train.py", theirs)):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, f"{name} failed:\n{output[-3000:]}"

    run = next((tmp_path / "results").iterdir())
    results = json.loads((run / "results.json").read_text())
    logs = json.loads((tmp_path / "cole" / "logs.json").read_text())["metrics"]
    assert len(results["epochs"]) == EPOCHS
    for epoch in range(1, EPOCHS + 1):
        for phase in ("train", "val", "test"):
            mine, cole = results["epochs"][str(epoch)][phase], logs[phase][str(epoch - 1)]
            # every metric both record (their val/test "loss" is a -999 placeholder; ours has none there)
            shared = sorted(set(mine) & set(cole) - ({"loss"} if phase != "train" else set()))
            assert {"map_clean", "map_observed", "prec_at_1_clean", "preds_k_hat"} <= set(shared)
            if phase == "train":
                assert "loss" in shared
            assert {k: mine[k] for k in shared} == {k: cole[k] for k in shared}, (epoch, phase)

    # the same best epoch (strictly better val mAP), and its weights and label estimates
    val = [logs["val"][str(e)]["map_clean"] for e in range(EPOCHS)]
    assert results["best_epoch"] == 1 + max(range(EPOCHS), key=lambda e: (val[e], -e))
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    f = torch.load(tmp_path / "cole" / "best_model_state_f.pt", map_location="cpu", weights_only=True)
    g = torch.load(tmp_path / "cole" / "best_model_state_g.pt", map_location="cpu", weights_only=True)
    # theirs: Sequential(resnet18 children but fc) + Linear; ours: resnet18 with fc = Identity + Linear: same order
    assert len(best["model"]) == len(f)
    for (key, mine), (their_key, cole) in zip(best["model"].items(), f.items()):
        assert mine.shape == cole.shape and torch.equal(mine, cole), (key, their_key)
    assert torch.equal(best["label_estimates"], g["logits"])
