"""Cole et al.'s options (README 'Options'): --train-subsample / --val-subsample with their own seed,
--val-labels observed, --stop-metric, --freeze-backbone; each off by default (the defaults give the original's sets,
see tests/test_split.py and tests/test_datasets.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import main
from config import build_config
from datasets import build_datasets, generate_split

SMALL = ["-d", "pascal", "-g", "cpu", "-l", "an", "--arch", "resnet18", "--image-size", "32", "--epochs", "3",
         "--batch-size", "16", "--num-workers", "0"]


def test_subsampling_keeps_a_share_of_each_part_with_its_own_seed(bird_root):
    full = build_datasets(bird_root, "pascal", 8)
    train_rows, val_rows = generate_split(90, 0.2, np.random.RandomState(1200))
    assert np.array_equal(full["train"].rows, train_rows) and np.array_equal(full["val"].rows, val_rows)
    half = build_datasets(bird_root, "pascal", 8, train_subsample=0.5, val_subsample=1 / 3, subsample_seed=4)
    assert len(half["train"]) == 36 and len(half["val"]) == 6 and len(half["test"]) == 55
    assert set(half["train"].rows) < set(train_rows) and set(half["val"].rows) < set(val_rows)
    assert np.all(np.diff(half["train"].rows) > 0)  # in file order
    labels = np.load(bird_root / "pascal" / "formatted_train_labels.npy")
    assert np.array_equal(half["train"].labels_true, labels[half["train"].rows])
    again = build_datasets(bird_root, "pascal", 8, train_subsample=0.5, val_subsample=1 / 3, subsample_seed=4)
    other = build_datasets(bird_root, "pascal", 8, train_subsample=0.5, val_subsample=1 / 3, subsample_seed=5)
    assert np.array_equal(again["train"].rows, half["train"].rows)
    assert not np.array_equal(other["train"].rows, half["train"].rows)
    # the split itself does not move with the subsampling seed
    assert set(other["train"].rows) <= set(train_rows)


def test_observed_val_labels_are_the_single_positives(bird_root):
    sets = build_datasets(bird_root, "pascal", 8, val_labels="observed")
    obs = np.load(bird_root / "pascal" / "formatted_train_labels_obs.npy")
    assert np.array_equal(sets["val"].labels_obs, obs[sets["val"].rows])
    assert np.all(sets["val"].labels_obs.sum(1) == 1)
    clean = build_datasets(bird_root, "pascal", 8)
    assert np.array_equal(clean["val"].labels_obs, clean["val"].labels_true)  # the original: full labels


def test_bad_values_name_the_flag():
    for flags, message in (({"train_subsample": 0.0}, "--train-subsample"), ({"val_subsample": 1.5}, "--val-subsample"),
                           ({"stop_metric": "f1"}, "--stop-metric"), ({"val_labels": "noisy"}, "--val-labels")):
        with pytest.raises(ValueError, match=message):
            build_config("pascal", **flags)
    assert build_config("pascal", val_labels="observed", stop_metric="top_1").selection_key == "top_1_observed"
    assert build_config("pascal").selection_key == "map_clean"


def test_stop_metric_and_val_labels_select_the_epoch(bird_root, tmp_path):
    assert main.main([*SMALL, "--weights", "random", "--data-root", str(bird_root), "--results-dir", str(tmp_path),
                      "--stop-metric", "prec_at_1", "--val-labels", "observed", "--epochs", "4"]) == 0
    (run_dir,) = list(tmp_path.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    scores = [res["epochs"][str(e)]["val"]["prec_at_1_observed"] for e in range(1, len(res["epochs"]) + 1)]
    # the original's rule on that metric: go on while it strictly improves, the best is the last improvement
    stop = next((i for i in range(1, len(scores)) if scores[i] <= max(scores[:i])), None)
    assert len(scores) == (stop + 1 if stop is not None else 4)
    assert res["best_epoch"] == int(np.argmax(scores)) + 1


def test_freeze_backbone_trains_the_head_only(bird_root, tmp_path):
    from models import build_model
    torch.manual_seed(3)
    start = build_model("resnet18", 20, "random")
    weights = tmp_path / "start.pt"
    torch.save(start.backbone.state_dict(), weights)
    assert main.main([*SMALL, "--weights", str(weights), "--data-root", str(bird_root), "--results-dir",
                      str(tmp_path / "runs"), "--freeze-backbone"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    best = torch.load(run_dir / "best.pt", weights_only=False)["model"]
    backbone = {k[len("backbone."):]: v for k, v in best.items() if k.startswith("backbone.")}
    # every backbone tensor, BatchNorm's running statistics included, is the starting one
    assert backbone.keys() == start.backbone.state_dict().keys()
    assert all(torch.equal(v, start.backbone.state_dict()[k]) for k, v in backbone.items())
    torch.manual_seed(0)  # main.py's seed: the head starts as this one's, and it has learnt
    initial = build_model("resnet18", 20, str(weights)).head
    assert not torch.equal(best["head.weight"], initial.weight) and not torch.equal(best["head.bias"], initial.bias)


def test_the_val_rows_kept_do_not_depend_on_the_train_share(bird_root):
    rows = {share: build_datasets(bird_root, "pascal", 8, train_subsample=share, val_subsample=0.5,
                                  subsample_seed=2)["val"].rows for share in (0.1, 0.5, 1.0)}
    assert np.array_equal(rows[0.1], rows[1.0]) and np.array_equal(rows[0.5], rows[1.0]) and len(rows[1.0]) == 9
