"""The bundled demo: generated deterministically, in the real datasets' layout, and learnable."""
from __future__ import annotations

import json

import numpy as np
import pytest

import main
from datasets import DATASET_INFO, load_formatted
from preproc import make_demo


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_demo.ensure_demo(root / "demo")
    return root


def test_demo_layout_and_labels(demo_root):
    num_classes = DATASET_INFO["demo"].num_classes
    assert num_classes == len(make_demo.CLASS_NAMES) == 12
    for phase, count in (("train", make_demo.NUM_TRAIN), ("val", make_demo.NUM_TEST)):
        arrays = load_formatted(demo_root, "demo", phase)
        labels, obs = arrays["labels"], arrays["labels_obs"]
        assert labels.shape == obs.shape == (count, num_classes)
        assert np.load(demo_root / "demo" / f"formatted_{phase}_labels.npy").dtype == np.float64
        assert 1 <= labels.sum(1).min() and labels.sum(1).max() <= 3  # 1-3 shapes, classes may repeat
        assert (obs.sum(1) == 1).all() and (labels[obs == 1] == 1).all()  # one true positive observed
        assert all((demo_root / "demo" / "images" / name).is_file() for name in arrays["images"][:50])
    # every class occurs, at roughly equal rates (12 classes drawn uniformly)
    prevalence = load_formatted(demo_root, "demo", "train")["labels"].mean(0)
    assert prevalence.min() > 0.1 and prevalence.max() < 0.2


def test_demo_is_deterministic_and_not_regenerated(demo_root, tmp_path):
    first = demo_root / "demo" / "formatted_train_labels.npy"
    mtime = first.stat().st_mtime_ns
    make_demo.ensure_demo(demo_root / "demo")
    assert first.stat().st_mtime_ns == mtime
    rng = np.random.RandomState(make_demo.SEED)
    image, labels = make_demo.make_image(rng)  # the first image of the set, regenerated
    np.testing.assert_array_equal(labels, np.load(first)[0])
    from PIL import Image
    with Image.open(demo_root / "demo" / "images" / "00000.png") as saved:
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))


def test_demo_trains_far_above_chance(demo_root, tmp_path):
    """Two epochs of EM_APL (pseudo-labelling after epoch 1) through main.py, as the quick start does."""
    assert main.main(["-d", "demo", "-g", "cpu", "--data-root", str(demo_root), "--results-dir", str(tmp_path),
                      "--epochs", "2", "--warmup-epoch", "1"]) == 0
    (run_dir,) = list(tmp_path.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["config"]["arch"] == "resnet18"
    assert res["epochs"]["1"]["apl_new_pseudo_labels"] > 0
    print("demo test mAP", res["test_map"], "chance", res["chance_test_map"])
    assert res["test_map"] > res["chance_test_map"] + 10
