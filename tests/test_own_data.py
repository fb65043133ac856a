"""`-d NAME` for a user's own dataset (data/NAME/dataset.json, made by preproc/format_folder.py): the demo
re-formatted as an own dataset trains exactly as `-d demo`; single positives refuse bce/iun and omit the train
"clean" metrics; a features dataset trains a linear classifier; class names reach results.json; bad input is one
line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from preproc import format_folder as ff
from preproc import make_demo
from preproc.generate_observed_labels import main as observed_main

SMALL = ["-g", "cpu", "--arch", "resnet18", "--weights", "random", "--image-size", "16", "--batch-size", "16",
         "--lr", "1e-3", "--epochs", "3", "--warmup-epoch", "1", "--num-workers", "0", "--alpha", "0.1", "--beta", "0.4"]


def run(root: Path, results: Path, *args: str) -> dict:
    assert main.main(["--data-root", str(root), "--results-dir", str(results), *args]) == 0
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return json.loads((run_dir / "results.json").read_text())


def numbers(res: dict) -> list:
    return [(e["train"]["loss"], e["val"]["map_clean"], e.get("test", {}).get("map_clean"),
             e.get("apl_new_pseudo_labels")) for e in res["epochs"].values()]


@pytest.fixture(scope="module")
def demo_root(small_demo_root):
    """conftest's small demo and the same data as an own dataset "mine", made as the README says."""
    root = small_demo_root
    demo = root / "demo"
    names = (demo / "classes.txt").read_text().split()
    lines = ["image,labels,split"]
    for phase, split in (("train", "train"), ("val", "test")):
        for image, row in zip(np.load(demo / f"formatted_{phase}_images.npy"),
                              np.load(demo / f"formatted_{phase}_labels.npy")):
            lines.append(f"{image},{';'.join(n for n, y in zip(names, row) if y)},{split}")
    (root.parent / "mine.csv").write_text("\n".join(lines) + "\n")
    assert ff.main(["--csv", str(root.parent / "mine.csv"), "--images", str(demo / "images"), "--classes",
                    str(demo / "classes.txt"), "--save-path", str(root / "mine")]) == 0
    assert observed_main(["--dataset", "mine", "--data-root", str(root)]) == 0
    return root


def test_own_dataset_trains_exactly_as_the_demo(demo_root, small_demo, tmp_path):
    ours = run(demo_root, tmp_path / "mine", "-d", "mine", *SMALL)
    demo = run(demo_root, tmp_path / "demo", "-d", "demo", *SMALL)
    assert numbers(ours) == numbers(demo) and ours["test_map"] == demo["test_map"]
    assert ours["class_names"] == demo["class_names"] == list(make_demo.CLASS_NAMES)
    assert len(ours["test_per_class_ap"]) == len(ours["class_names"]) == 12


def test_unknown_dataset_names_the_missing_file(demo_root, capsys):
    assert main.main(["-d", "nothing", "--data-root", str(demo_root), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing/dataset.json does not exist" in err and "format_folder.py" in err


def test_dataset_json_that_disagrees_with_the_labels(demo_root, tmp_path, capsys):
    import shutil
    bad = tmp_path / "data"
    shutil.copytree(demo_root / "mine", bad / "mine")
    info = json.loads((bad / "mine" / "dataset.json").read_text())
    info.update(num_classes=11, class_names=info["class_names"][:11])
    (bad / "mine" / "dataset.json").write_text(json.dumps(info))
    assert main.main(["-d", "mine", "--data-root", str(bad), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset.json" in err and "11" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def single_root(tmp_path_factory):
    """A single-positive dataset: 40 train images with one label each, 12 test images with one or two."""
    base = tmp_path_factory.mktemp("single")
    rng = np.random.RandomState(0)
    colours = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}
    lines = ["image,labels,split"]
    for i in range(52):
        split = "train" if i < 40 else "test"
        names = [list(colours)[i % 3]] if split == "train" else list(colours)[:1 + i % 2]
        pixels = np.zeros((16, 16, 3), dtype=np.uint8) + rng.randint(0, 30, (16, 16, 3), dtype=np.uint8)
        for k, name in enumerate(names):
            pixels[:, 8 * k:8 * k + 8] += np.array(colours[name], dtype=np.uint8)
        (base / "images").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(base / "images" / f"{i}.png")
        lines.append(f"{i}.png,{';'.join(names)},{split}")
    (base / "single.csv").write_text("\n".join(lines) + "\n")
    assert ff.main(["--csv", str(base / "single.csv"), "--images", str(base / "images"),
                    "--save-path", str(base / "data" / "single")]) == 0
    return base / "data"


def test_single_positive_dataset(single_root, tmp_path, capsys):
    for loss in ("bce", "iun"):
        assert main.main(["-d", "single", "-l", loss, "--data-root", str(single_root), *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "single positives" in err and f"-l {loss}" in err
    res = run(single_root, tmp_path, "-d", "single", "-l", "an", *SMALL)
    assert res["class_names"] == ["blue", "green", "red"]
    train = res["epochs"]["1"]["train"]
    assert "map_observed" in train and not any(k.endswith("_clean") for k in train)
    assert res["status"] == "finished"


def test_features_dataset_trains_a_linear_classifier(tmp_path):
    rng = np.random.RandomState(0)
    n, dim = 120, 6
    labels = rng.rand(n, 3) < 0.15
    labels[np.arange(n), rng.randint(0, 3, n)] = True
    features = rng.randn(n, dim) * 0.3
    features[:, :3] += 3.0 * labels  # three informative dimensions
    np.save(tmp_path / "x.npy", features)
    names = ["a", "b", "c"]
    lines = ["image,labels,split"] + [f"r{i},{';'.join(c for c, y in zip(names, row) if y)},"
                                     f"{'train' if i < 90 else 'test'}" for i, row in enumerate(labels)]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    root = tmp_path / "data"
    assert ff.main(["--csv", str(tmp_path / "x.csv"), "--features", str(tmp_path / "x.npy"),
                    "--save-path", str(root / "tab")]) == 0
    assert observed_main(["--dataset", "tab", "--data-root", str(root)]) == 0
    res = run(root, tmp_path / "runs", "-d", "tab", "-l", "an", "-g", "cpu", "--epochs", "10", "--lr", "1e-2")
    assert res["config"]["features"] == "formatted" and res["features"]["dim"] == dim
    assert 35 < res["chance_test_map"] < 60
    assert res["test_map"] > res["chance_test_map"] + 25  # the features carry the labels


@pytest.mark.parametrize("defaults, message", [({"batch_size": "32"}, "batch_size must be a int"),
                                               ({"loss": "an"}, "cannot set 'loss'"),
                                               ({"no_such": 1}, "cannot set 'no_such'"),
                                               ({"lr": True}, "lr must be a float"),
                                               # a bad value of the file names the file, not a flag never given
                                               ({"neg_proportion": 1.5}, '"defaults" neg_proportion 1.5 is not '
                                                                         'valid (--neg-proportion must be in [0, 1], '
                                                                         'got 1.5); correct it there, or give '
                                                                         '--neg-proportion on the command line'),
                                               ({"val_frac": 1.5}, '"defaults" val_frac 1.5 is not valid (val_frac '
                                                                   'must be in [0, 1), got 1.5)')])
def test_bad_dataset_json_defaults_are_one_line(demo_root, tmp_path, capsys, defaults, message):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(demo_root / "mine", root / "mine")
    info = json.loads((root / "mine" / "dataset.json").read_text())
    (root / "mine" / "dataset.json").write_text(json.dumps({**info, "defaults": defaults}))
    assert main.main(["-d", "mine", "--data-root", str(root), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "dataset.json" in err


def test_dataset_json_defaults_apply_under_the_flags(demo_root, tmp_path):
    import shutil
    from config import build_config
    root = tmp_path / "data"
    shutil.copytree(demo_root / "mine", root / "mine")
    info = json.loads((root / "mine" / "dataset.json").read_text())
    (root / "mine" / "dataset.json").write_text(json.dumps({**info, "defaults": {"delta_rel": 0.5, "lr": 1e-3,
                                                                                 "expected_num_pos": 1.9}}))
    cfg = build_config("mine", loss="ll_r", data_root=str(root))
    assert cfg.delta_rel == 0.5 and cfg.lr == 1e-3  # over COCO's table and LL_DELTA_REL
    assert build_config("mine", loss="ll_r", lr=1e-2, data_root=str(root)).lr == 1e-2  # the flag wins
    assert build_config("mine", loss="role", data_root=str(root)).expected_num_pos == 1.9
