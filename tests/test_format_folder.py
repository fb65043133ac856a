"""preproc/format_folder.py (the user's own data from a CSV), dataset.json (preproc/common.py) and the observed
labels of such a dataset.

Inputs are built in tmp_path: 4 x 4 PNGs of one grey level each (their pixels are never read), CSVs written as
text, feature matrices from a seeded RandomState. The README example runs on a small demo (make_demo with
fewer images) made in tmp_path.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from preproc import format_folder as ff
from preproc import generate_observed_labels as gol
from preproc import make_demo
from preproc.common import (DATASET_JSON, PreprocError, check_dataset_files, image_root, read_dataset_json,
                            write_dataset_json)
from preproc.generate_observed_labels import generate_observed


def make_images(folder: Path, names) -> Path:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 10 * i, dtype=np.uint8)).save(folder / name)
    return folder


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = ff.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# Full labels with a split column; rows deliberately unsorted, a sub-folder, spaces around labels.
FULL_CSV = """image,labels,split
sub/e.png,dog,train
b.png, cat ; dog ,train
a.png,cat,train
c.png,bird;cat,train
d.png,bird,test
f.png,dog;bird;cat,test
"""


@pytest.fixture
def full(tmp_path):
    """The FULL_CSV dataset formatted into tmp/data/full, its images inside the dataset folder."""
    save = tmp_path / "data" / "full"
    images = make_images(save / "photos", ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "f.png"])
    arrays = ff.format_folder(write(tmp_path / "labels.csv", FULL_CSV), save, images=images)
    return {"root": tmp_path / "data", "save": save, "arrays": arrays}


def test_full_labels(full):
    save, arrays = full["save"], full["arrays"]
    assert sorted(arrays) == ["formatted_train_images.npy", "formatted_train_labels.npy",
                              "formatted_val_images.npy", "formatted_val_labels.npy"]
    assert sorted(p.name for p in save.iterdir()) == sorted([*arrays, DATASET_JSON, "photos"])
    info = json.loads((save / DATASET_JSON).read_text())
    assert info == {"format": 1, "num_classes": 3, "class_names": ["bird", "cat", "dog"], "image_folder": "photos",
                    "single_positive": False, "features": False, "defaults": {}, "source": "preproc/format_folder.py"}
    assert read_dataset_json(save) == info
    images = {phase: np.load(save / f"formatted_{phase}_images.npy") for phase in ("train", "val")}
    labels = {phase: np.load(save / f"formatted_{phase}_labels.npy") for phase in ("train", "val")}
    # rows sorted by path; columns bird, cat, dog (hand-written from FULL_CSV)
    assert images["train"].dtype.kind == "U" and images["train"].tolist() == ["a.png", "b.png", "c.png", "sub/e.png"]
    assert images["val"].tolist() == ["d.png", "f.png"]
    assert labels["train"].dtype == np.float64
    np.testing.assert_array_equal(labels["train"], [[0, 1, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(labels["val"], [[1, 0, 0], [1, 1, 1]])
    assert all((image_root(save, info) / name).is_file() for name in images["train"])
    check_dataset_files(save)


def test_full_labels_then_observed_labels_as_for_the_benchmarks(full, capsys):
    save = full["save"]
    assert gol.main(["--dataset", "full", "--data-root", str(full["root"])]) == 0
    for phase in ("train", "val"):
        labels = np.load(save / f"formatted_{phase}_labels.npy")
        obs = np.load(save / f"formatted_{phase}_labels_obs.npy")
        assert (obs.sum(axis=1) == 1).all() and (labels[obs == 1] == 1).all()  # one true positive per row
        np.testing.assert_array_equal(obs, generate_observed(labels, 1, 0, 1200))
    # the rows with one label have it observed; b.png (cat;dog) has one of its two
    obs = np.load(save / "formatted_train_labels_obs.npy")
    assert obs[0].tolist() == [0, 1, 0] and obs[3].tolist() == [0, 0, 1] and obs[1, 0] == 0


SINGLE_CSV = "image,labels\n" + "".join(f"img{i}.png,{'cat dog bird fish'.split()[i % 4]}\n" for i in range(10))


@pytest.fixture
def single(tmp_path):
    images = make_images(tmp_path / "images", [f"img{i}.png" for i in range(10)])
    save = tmp_path / "data" / "single"
    arrays = ff.format_folder(write(tmp_path / "single.csv", SINGLE_CSV), save, images=images, test_frac=0.3,
                              seed=3)
    return {"root": tmp_path / "data", "save": save, "arrays": arrays, "images": images}


def test_single_positives_with_a_drawn_split(single):
    save, arrays = single["save"], single["arrays"]
    info = read_dataset_json(save)
    assert info["single_positive"] is True and info["class_names"] == ["bird", "cat", "dog", "fish"]
    assert info["image_folder"] == str(single["images"])  # outside the dataset folder: absolute
    names = sorted(f"img{i}.png" for i in range(10))  # img0, img1, img2, ..., img9 (one digit: string order)
    test = np.random.RandomState(3).permutation(10)[:3]  # round(0.3 x 10) rows of the sorted list
    assert arrays["formatted_val_images.npy"].tolist() == [names[i] for i in sorted(test)]
    assert arrays["formatted_train_images.npy"].tolist() == [n for i, n in enumerate(names) if i not in test]
    train = arrays["formatted_train_labels.npy"]
    assert (train.sum(axis=1) == 1).all()
    for name, row in zip(arrays["formatted_train_images.npy"], train):  # imgK has class K % 4 of cat dog bird fish
        k = int(name[3:-4])
        assert info["class_names"][int(np.argmax(row))] == "cat dog bird fish".split()[k % 4]
    np.testing.assert_array_equal(np.load(save / "formatted_train_labels_obs.npy"), train)
    val = arrays["formatted_val_labels.npy"]
    np.testing.assert_array_equal(np.load(save / "formatted_val_labels_obs.npy"), generate_observed(val, 1, 0, 1200))
    check_dataset_files(save)


def test_drawn_split_does_not_depend_on_row_order_but_on_the_seed(tmp_path, single):
    lines = SINGLE_CSV.splitlines()
    shuffled = write(tmp_path / "shuffled.csv", "\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    same = ff.format_folder(shuffled, tmp_path / "b" / "same", images=single["images"], test_frac=0.3, seed=3)
    other = ff.format_folder(shuffled, tmp_path / "b" / "other", images=single["images"], test_frac=0.3, seed=4)
    for name, array in single["arrays"].items():
        np.testing.assert_array_equal(same[name], array)
    assert other["formatted_val_images.npy"].tolist() != same["formatted_val_images.npy"].tolist()
    assert len(other["formatted_val_images.npy"]) == 3


def test_observed_labels_refuse_a_single_positive_dataset(single, capsys):
    before = {p.name: p.read_bytes() for p in single["save"].iterdir()}
    assert gol.main(["--dataset", "single", "--data-root", str(single["root"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "single positives already" in err and "single_positive true" in err
    assert "python main.py -d single" in err
    assert {p.name: p.read_bytes() for p in single["save"].iterdir()} == before


def test_full_labels_flag_takes_one_label_rows_as_complete(tmp_path, single):
    save = tmp_path / "data" / "complete"
    arrays = ff.format_folder(tmp_path / "single.csv", save, images=single["images"], full_labels=True)
    assert read_dataset_json(save)["single_positive"] is False
    assert "formatted_train_labels_obs.npy" not in arrays and not (save / "formatted_train_labels_obs.npy").exists()
    assert gol.main(["--dataset", "complete", "--data-root", str(tmp_path / "data")]) == 0
    np.testing.assert_array_equal(np.load(save / "formatted_train_labels_obs.npy"),
                                  np.load(save / "formatted_train_labels.npy"))


FEATURES_CSV = "image,labels,split\nr3,a;b,train\nr1,b,train\nr2,c,train\nr0,a,test\nr4,c;b,test\n"


@pytest.fixture
def features(tmp_path):
    feats = np.random.RandomState(0).randn(5, 3)  # float64 rows in CSV order: r3, r1, r2, r0, r4
    np.save(tmp_path / "feats.npy", feats)
    save = tmp_path / "data" / "feat"
    arrays = ff.format_folder(write(tmp_path / "f.csv", FEATURES_CSV), save, features=tmp_path / "feats.npy")
    return {"save": save, "arrays": arrays, "feats": feats}


def test_features_dataset(features):
    save, arrays, feats = features["save"], features["arrays"], features["feats"]
    info = read_dataset_json(save)
    assert info["features"] is True and info["image_folder"] is None and image_root(save, info) is None
    assert info["single_positive"] is False and info["class_names"] == ["a", "b", "c"]
    assert arrays["formatted_train_images.npy"].tolist() == ["r1", "r2", "r3"]  # the row ids, sorted
    assert arrays["formatted_val_images.npy"].tolist() == ["r0", "r4"]
    train = np.load(save / "formatted_train_features.npy")
    assert train.dtype == np.float32 and train.shape == (3, 3)
    np.testing.assert_array_equal(train, feats[[1, 2, 0]].astype(np.float32))  # r1, r2, r3 in CSV order 1, 2, 0
    np.testing.assert_array_equal(np.load(save / "formatted_val_features.npy"), feats[[3, 4]].astype(np.float32))
    np.testing.assert_array_equal(arrays["formatted_val_labels.npy"], [[1, 0, 0], [0, 1, 1]])
    check_dataset_files(save)


# --- bad input: one line naming the file, the line and the fix; nothing written -----------------------------------

IMAGES = ["a.png", "b.png", "c.png", "d.png"]
BAD_CSVS = [
    ("image,labels\na.png,cat\nzz.png,dog\n", [], r"line 3: image 'zz.png' not found .*1 of 2 images missing.*fix the path"),
    ("image,labels\na.png,cat;;dog\nb.png,dog\n", [], r"line 2: empty label in 'cat;;dog'; remove the extra ';'"),
    ("image,labels\na.png,cat\nb.png, \n", [], r"line 3: no label for 'b.png'; give one or more class names"),
    ("image,labels\na.png,cat\nb.png,cow\nc.png,dog\nd.png,cat\n", ["--classes", "CLASSES"],
     r"line 3: unknown label 'cow' \(not in .*classes.txt\); fix the row or add the class"),
    ("image,labels\na.png,cat\nb.png,dog\n\n./a.png,dog\n", [],
     r"line 5: image './a.png' is listed again \(first on line 2\); give each image one row"),
    ("image,split\na.png,train\n", [], r"line 1: missing column 'labels'"),
    ("image,labels,splt\na.png,cat,train\n", [], r"line 1: unknown column 'splt'; the first line must be the header"),
    ("image,labels,split\na.png,cat,train\nb.png,dog,train\nc.png,cat;cow,test\n", [],
     r"line 4: class 'cow' appears only in test rows; add a train row with it or drop it$"),
    ("image,labels,split\na.png,cat,train\nb.png,dog,val\n", [], r"line 3: split 'val' is neither 'train' nor 'test'"),
    ("image,labels,split\na.png,cat,train,x\n", [], r"line 2: 4 fields but the header has 3"),
    ("image,labels\n/elsewhere/a.png,cat\n", [], r"line 2: image '/elsewhere/a.png' is outside --images"),
    ("image,labels,split\na.png,cat,train\nb.png,dog,train\n", [], r"no test row among its 2 rows; mark some rows"),
    ("image,labels\na.png,cat\nb.png,cat\nc.png,cat\nd.png,cat\n", [], r"only one class \('cat'\)"),
    ("image,labels\n", [], r"only a header, no data rows"),
]


@pytest.mark.parametrize("text,extra,message", BAD_CSVS)
def test_bad_csv_is_one_line_naming_file_and_line(tmp_path, capsys, text, extra, message):
    images = make_images(tmp_path / "images", IMAGES)
    csv_path = write(tmp_path / "labels.csv", text)
    classes = write(tmp_path / "classes.txt", "cat\ndog\n")
    extra = [str(classes) if a == "CLASSES" else a for a in extra]
    rc, _, err = run(["--csv", csv_path, "--images", images, "--save-path", tmp_path / "data" / "x", *extra], capsys)
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"error: {csv_path}") and str(csv_path) in line
    assert re.search(message, line), line
    assert not (tmp_path / "data").exists()


def test_a_drawn_split_names_the_seed_for_a_test_only_class(tmp_path):
    # 8 rows with cat, one with cow: a draw that puts the cow row in test is an error that suggests --seed
    make_images(tmp_path / "images", [f"{i}.png" for i in range(9)])
    csv_path = write(tmp_path / "l.csv", "image,labels\n" + "".join(f"{i}.png,cat;dog\n" for i in range(8))
                     + "8.png,cow;cat\n")
    cow_test = [s for s in range(50) if ff.draw_test_rows(9, 0.2, s)[8]]
    assert cow_test
    with pytest.raises(PreprocError, match=r"line 10: class 'cow' appears only in test rows; .*--seed"):
        ff.format_folder(csv_path, tmp_path / "out", images=tmp_path / "images", seed=cow_test[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("features,message", [
    (np.zeros((3, 2)), r"feats.npy: 3 rows but .*f.csv has 5 data rows; give one feature row per CSV row"),
    (np.zeros(5), r"feats.npy: expected a 2-D array \(one row of features per CSV row\), found shape \(5,\)"),
    (np.array([[0.0, 1], [np.nan, 1], [0, 1], [0, 1], [0, 1]]), r"feats.npy, row 1 \(.*f.csv line 3\): a non-finite"),
    (np.array([[0.0, 1], [1e39, 1], [0, 1], [0, 1], [0, 1]]), r"row 1 .*beyond float32's range"),
    (np.array([["x", "y"]] * 5), r"expected numbers \(float or int\), found dtype <U1"),
])
def test_bad_features_are_one_line(tmp_path, capsys, features, message):
    np.save(tmp_path / "feats.npy", features)
    csv_path = write(tmp_path / "f.csv", FEATURES_CSV)
    rc, _, err = run(["--csv", csv_path, "--features", tmp_path / "feats.npy", "--save-path", tmp_path / "d" / "x"],
                     capsys)
    assert rc == 2 and re.search(message, one_error_line(err))
    assert not (tmp_path / "d").exists()


def test_duplicate_row_id_and_flag_misuse(tmp_path, capsys):
    np.save(tmp_path / "feats.npy", np.zeros((2, 2)))
    csv_path = write(tmp_path / "f.csv", "image,labels\nr1,a\nr1,b\n")
    rc, _, err = run(["--csv", csv_path, "--features", tmp_path / "feats.npy", "--save-path", tmp_path / "x"], capsys)
    assert rc == 2 and "line 3: row id 'r1' is listed again (first on line 2)" in one_error_line(err)
    rc, _, err = run(["--csv", csv_path, "--features", tmp_path / "feats.npy", "--images", tmp_path,
                      "--save-path", tmp_path / "x"], capsys)
    assert rc == 2 and "give only one of --images DIR" in one_error_line(err)
    rc, _, err = run(["--csv", csv_path, "--save-path", tmp_path / "x"], capsys)
    assert rc == 2 and "give either --images DIR" in one_error_line(err)
    rc, _, err = run(["--csv", tmp_path / "nope.csv", "--images", tmp_path, "--save-path", tmp_path / "x"], capsys)
    assert rc == 2 and one_error_line(err) == f"error: --csv {tmp_path / 'nope.csv'}: no such file"
    split_csv = write(tmp_path / "s.csv", "image,labels,split\nr1,a,train\nr2,b,test\n")
    rc, _, err = run(["--csv", split_csv, "--features", tmp_path / "feats.npy", "--save-path", tmp_path / "x",
                      "--test-frac", "0.3"], capsys)
    assert rc == 2 and "has a split column, which decides the test rows; drop --test-frac" in one_error_line(err)
    assert not (tmp_path / "x").exists()


# --- the output folder ---------------------------------------------------------------------------------------------

def test_rerun_replaces_its_own_output_keeps_defaults_and_drops_stale_files(single, tmp_path, capsys):
    save = single["save"]
    info = json.loads((save / DATASET_JSON).read_text())
    info["defaults"] = {"arch": "resnet18", "image_size": 64}  # edited by hand
    (save / DATASET_JSON).write_text(json.dumps(info))
    full_csv = write(tmp_path / "full.csv", SINGLE_CSV.replace("img0.png,cat", "img0.png,cat;dog"))
    rc, out, _ = run(["--csv", full_csv, "--images", single["images"], "--save-path", save, "--test-frac", "0.3",
                      "--seed", "3"], capsys)
    assert rc == 0
    info = read_dataset_json(save)
    assert info["single_positive"] is False and info["defaults"] == {"arch": "resnet18", "image_size": 64}
    assert "removed" in out and not (save / "formatted_train_labels_obs.npy").exists()  # stale: from single labels
    assert not (save / "formatted_val_labels_obs.npy").exists()
    assert f"python preproc/generate_observed_labels.py --dataset single --data-root {save.parent}" in out


@pytest.mark.parametrize("existing", [
    {"formatted_train_labels.npy": b"a benchmark's labels"},
    {DATASET_JSON: json.dumps({"format": 1, "num_classes": 2, "class_names": ["x", "y"], "image_folder": "i",
                               "single_positive": False, "source": "preproc/format_pascal.py"}).encode()},
])
def test_another_datasets_folder_is_refused_unless_force(tmp_path, capsys, existing):
    images = make_images(tmp_path / "images", IMAGES)
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,cat\nb.png,dog\nc.png,dog\nd.png,cat;dog\n")
    save = tmp_path / "data" / "theirs"
    save.mkdir(parents=True)
    for name, data in existing.items():
        (save / name).write_bytes(data)
    rc, _, err = run(["--csv", csv_path, "--images", images, "--save-path", save], capsys)
    line = one_error_line(err)
    assert rc == 2 and f"refusing to write into {save}" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in save.iterdir()} == existing
    rc, _, _ = run(["--csv", csv_path, "--images", images, "--save-path", save, "--force"], capsys)
    assert rc == 0 and read_dataset_json(save)["source"] == "preproc/format_folder.py"
    check_dataset_files(save)


def test_a_benchmark_name_is_refused(tmp_path, capsys):
    images = make_images(tmp_path / "images", IMAGES)
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,cat\nb.png,dog\n")
    rc, _, err = run(["--csv", csv_path, "--images", images, "--save-path", tmp_path / "coco"], capsys)
    assert rc == 2 and "'coco' is a benchmark's name" in one_error_line(err)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    images = make_images(tmp_path / "images", IMAGES)
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,cat\nb.png,dog\nc.png,dog\nd.png,cat;dog\n")
    real_save, calls = np.save, []

    def failing_save(fh, array, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(fh, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    save = tmp_path / "out"
    rc, _, err = run(["--csv", csv_path, "--images", images, "--save-path", save], capsys)
    assert rc == 2 and "no space left" in one_error_line(err) and len(calls) == 3
    assert list(save.iterdir()) == []  # no array, no dataset.json, no temporary


# --- dataset.json and the check of the files against it ----------------------------------------------------------

def edit_json(folder: Path, **changes) -> None:
    info = json.loads((folder / DATASET_JSON).read_text())
    info.update(changes)
    (folder / DATASET_JSON).write_text(json.dumps(info))


@pytest.mark.parametrize("text,message", [
    ('{"format": 1,\n "num_classes": }', r"dataset.json, line 2: not valid JSON"),
    ("[1, 2]", r"expected a JSON object"),
    ('{"format": 1, "num_classes": 2, "clases": ["a", "b"]}', r"key 'clases' is not a dataset.json key"),
    ('{"format": 1, "num_classes": 2, "image_folder": "i", "single_positive": false}', r"key 'class_names' is missing"),
    ('{"format": 2, "num_classes": 1, "class_names": ["a"], "image_folder": "i", "single_positive": false}',
     r"key 'format' must be 1"),
    ('{"format": 1, "num_classes": 3, "class_names": ["a", "b"], "image_folder": "i", "single_positive": false}',
     r"key 'num_classes' is 3 but 'class_names' lists 2 names"),
    ('{"format": 1, "num_classes": 2, "class_names": ["a", "a"], "image_folder": "i", "single_positive": false}',
     r"key 'class_names' lists 'a' twice \(positions 0 and 1\)"),
    ('{"format": 1, "num_classes": 2, "class_names": ["a", " "], "image_folder": "i", "single_positive": false}',
     r"key 'class_names' must hold non-empty strings, found ' ' at position 1"),
    ('{"format": 1, "num_classes": 1, "class_names": ["a"], "image_folder": "i", "single_positive": "no"}',
     r"key 'single_positive' must be true or false"),
    ('{"format": 1, "num_classes": 1, "class_names": ["a"], "image_folder": "i", "single_positive": false, '
     '"features": true}', r"key 'image_folder' must be null for a features dataset"),
    ('{"format": 1, "num_classes": 1, "class_names": ["a"], "image_folder": null, "single_positive": false}',
     r"key 'image_folder' must be the image folder"),
    ('{"format": 1, "num_classes": 1, "class_names": ["a"], "image_folder": "i", "single_positive": false, '
     '"defaults": {"lr": [1]}}', r"key 'defaults' gives 'lr' the value \[1\]"),
])
def test_read_dataset_json_names_file_and_key(tmp_path, text, message):
    write(tmp_path / "mine" / DATASET_JSON, text)
    with pytest.raises(PreprocError, match=message) as exc:
        read_dataset_json(tmp_path / "mine")
    assert str(tmp_path / "mine" / DATASET_JSON) in str(exc.value) and "\n" not in str(exc.value)
    assert "python preproc/format_folder.py" in str(exc.value)  # the fix


def test_read_dataset_json_fills_optional_keys_and_checks_defaults(tmp_path):
    write(tmp_path / "mine" / DATASET_JSON, '{"format": 1, "num_classes": 2, "class_names": ["a", "b"], '
                                            '"image_folder": "", "single_positive": true, "defaults": {"lr": 0.1}}')
    info = read_dataset_json(tmp_path / "mine")
    assert info["features"] is False and info["source"] == "" and info["defaults"] == {"lr": 0.1}
    assert image_root(tmp_path / "mine", info) == tmp_path / "mine"
    with pytest.raises(PreprocError, match=r"key 'defaults' names 'lr', which is not a setting \(choose from "
                                           r"alpha, batch_size\)"):
        read_dataset_json(tmp_path / "mine", allowed_defaults={"batch_size", "alpha"})


def test_missing_dataset_json_names_the_command(tmp_path):
    with pytest.raises(PreprocError, match=r"missing .*mine.dataset.json; create it with: python "
                                           r"preproc/format_folder.py --csv <your CSV>"):
        read_dataset_json(tmp_path / "mine")
    with pytest.raises(PreprocError, match=r"create it with: python preproc/format_cub.py --load-path"):
        read_dataset_json(tmp_path / "cub")


def test_write_dataset_json_refuses_bad_names_and_writes_nothing(tmp_path):
    with pytest.raises(PreprocError, match=r"key 'class_names' lists 'a' twice"):
        write_dataset_json(tmp_path / "d", class_names=["a", "a"], image_folder="i", single_positive=False,
                           source="test", arrays={"x.npy": np.zeros(2)})
    assert not (tmp_path / "d").exists()


def test_check_dataset_files_catches_disagreements(full, features):
    save = full["save"]
    edit_json(save, class_names=["bird", "cat"], num_classes=2)
    with pytest.raises(PreprocError, match=r"formatted_train_labels.npy: 3 label columns but .*dataset.json says "
                                           r"num_classes 2; re-create the files with"):
        check_dataset_files(save)
    edit_json(save, class_names=["bird", "cat", "dog"], num_classes=3, single_positive=True)
    with pytest.raises(PreprocError, match=r"says single_positive true, but row 1 of formatted_train_labels.npy "
                                           r"has 2 positive labels; set \"single_positive\": false"):
        check_dataset_files(save)
    edit_json(save, single_positive=False, image_folder="pictures")
    with pytest.raises(PreprocError, match=r"image_folder 'pictures' is not a folder"):
        check_dataset_files(save)
    edit_json(save, image_folder="photos")
    np.save(save / "formatted_val_images.npy", np.array(["d.png"]))
    with pytest.raises(PreprocError, match=r"formatted_val_images.npy: 1 rows but formatted_val_labels.npy has 2"):
        check_dataset_files(save)

    fsave = features["save"]
    np.save(fsave / "formatted_val_features.npy", np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(PreprocError, match=r"formatted_val_features.npy: 4 feature dimensions but "
                                           r"formatted_train_features.npy has 3"):
        check_dataset_files(fsave)
    np.save(fsave / "formatted_val_features.npy", np.array([[0, 1, 2], [0, np.inf, 0]], dtype=np.float32))
    with pytest.raises(PreprocError, match=r"formatted_val_features.npy: row 1 holds a non-finite value"):
        check_dataset_files(fsave)
    np.save(fsave / "formatted_val_features.npy", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(PreprocError, match=r"formatted_val_features.npy: 3 rows but formatted_val_labels.npy has 2"):
        check_dataset_files(fsave)
    (fsave / "formatted_val_features.npy").unlink()
    with pytest.raises(PreprocError, match=r"missing .*formatted_val_features.npy; create it with: python "
                                           r"preproc/format_folder.py --csv <your CSV> --features"):
        check_dataset_files(fsave)


def test_a_hand_made_features_dataset_needs_no_row_ids(tmp_path):
    folder = tmp_path / "feat"
    write_dataset_json(folder, class_names=["a", "b"], image_folder=None, single_positive=False, features=True,
                       source="by hand", arrays={
                           "formatted_train_labels.npy": np.array([[1.0, 0], [0, 1]]),
                           "formatted_val_labels.npy": np.array([[1.0, 1]]),
                           "formatted_train_features.npy": np.zeros((2, 5), dtype=np.float32),
                           "formatted_val_features.npy": np.ones((1, 5), dtype=np.float32)})
    check_dataset_files(folder)
    assert not (folder / "formatted_train_images.npy").exists()


# --- the README example ("Your own data"), on a small demo ---------------------------------------------------------

README_CSV = """\
import csv, numpy as np
names = open('data/demo/classes.txt').read().split()
with open('../mydata.csv', 'w', newline='') as f:  # outside the repository
    out = csv.writer(f)
    out.writerow(['image', 'labels', 'split'])
    for phase, split in (('train', 'train'), ('val', 'test')):
        images = np.load(f'data/demo/formatted_{phase}_images.npy')
        labels = np.load(f'data/demo/formatted_{phase}_labels.npy')
        for image, row in zip(images, labels):
            out.writerow([image, ';'.join(n for n, y in zip(names, row) if y), split])
"""
README_COMMANDS = [
    "python preproc/format_folder.py --csv ../mydata.csv --images data/demo/images --classes data/demo/classes.txt "
    "--save-path data/mydata",
    "python preproc/generate_observed_labels.py --dataset mydata",
]


def test_readme_example(tmp_path, monkeypatch):
    """The README's commands, run from a folder holding a small demo in data/demo: the formatted dataset is the
    demo itself (same rows, labels and observed labels), so `main.py -d mydata` trains what `-d demo` does."""
    monkeypatch.setattr(make_demo, "NUM_TRAIN", 60)
    monkeypatch.setattr(make_demo, "NUM_TEST", 15)
    repo = tmp_path / "repo"  # the CSV goes beside it, outside the repository
    make_demo.ensure_demo(repo / "data" / "demo")
    subprocess.run([sys.executable, "-c", README_CSV], cwd=repo, check=True)
    assert (tmp_path / "mydata.csv").is_file() and not list(repo.glob("*.csv"))
    for command in README_COMMANDS:
        argv = shlex.split(command)
        argv[:2] = [sys.executable, str(ROOT / argv[1])]
        proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    demo, mine = repo / "data" / "demo", repo / "data" / "mydata"
    info = read_dataset_json(mine)
    assert info["class_names"] == list(make_demo.CLASS_NAMES) and info["single_positive"] is False
    assert image_root(mine, info) == Path(os.path.abspath(demo / "images"))
    for phase in ("train", "val"):
        for kind in ("images", "labels", "labels_obs"):
            np.testing.assert_array_equal(np.load(mine / f"formatted_{phase}_{kind}.npy"),
                                          np.load(demo / f"formatted_{phase}_{kind}.npy"))
    check_dataset_files(mine)
