"""Tests for preproc/format_coco.py on real COCO train2014 annotations.

Derived inputs (built in tmp_path, never in tests/data):
* ``instances_train2014.json``: the five real few-shot files (one category each) merged by
  image id and annotation id; the categories list (all 80, real ids) is the same in all five.
* ``instances_val2014.json``: built from the same real records with ids changed so that ids
  of 1, 2 and 6 digits occur: the first cat image becomes id 9, the first bus image id 25
  with all its annotations turned into crowd annotations, the first dog image *and* the first
  person image are merged into id 100000 (a multi-label row), and an extra image record with
  id 7 and no annotation is added (it must not appear). All other cat/dog/person/bus images
  keep their real ids.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import format_coco as fc  # noqa: E402
from preproc.common import PreprocError  # noqa: E402



FEW_SHOT = REALDATA / "coco" / "few_shot_coco_split"

# COCO class index (position in the 80-entry categories list) of the classes we use.
INDEX = {"person": 0, "car": 2, "bus": 5, "cat": 15, "dog": 16}


def load(name):
    with open(FEW_SHOT / f"{name}.json") as fh:
        return json.load(fh)


def merged_train():
    parts = [load(n) for n in ("person", "car", "dog", "cat", "bus")]
    cats = parts[0]["categories"]
    images, anns = {}, {}
    for p in parts:
        assert p["categories"] == cats
        for im in p["images"]:
            images[im["id"]] = im
        for a in p["annotations"]:
            assert a["id"] not in anns
            anns[a["id"]] = a
    return {"images": list(images.values()), "annotations": list(anns.values()), "categories": cats}


def derived_val():
    parts = {n: load(n) for n in ("cat", "dog", "person", "bus")}
    relabel = {
        parts["cat"]["images"][0]["id"]: 9,
        parts["bus"]["images"][0]["id"]: 25,
        parts["dog"]["images"][0]["id"]: 100000,
        parts["person"]["images"][0]["id"]: 100000,
    }
    images, anns = {}, []
    for name, p in parts.items():
        for im in p["images"]:
            im = dict(im, id=relabel.get(im["id"], im["id"]))
            images[im["id"]] = im
        for a in p["annotations"]:
            a = copy.deepcopy(a)
            if a["image_id"] in relabel:
                a["image_id"] = relabel[a["image_id"]]
            if a["image_id"] == 25:
                a["iscrowd"] = 1
            anns.append(a)
    images[7] = dict(parts["cat"]["images"][1], id=7)  # an image without annotations
    return {"images": list(images.values()), "annotations": anns,
            "categories": parts["cat"]["categories"]}


def write_tree(root: Path, train: dict, val: dict) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(train))
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(val))
    return root


def expected(data: dict):
    """{id string: set of class indices} computed from the annotations and category names."""
    names = [c["name"] for c in data["categories"]]
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    out = {}
    for a in data["annotations"]:
        out.setdefault(str(a["image_id"]), set()).add(names.index(name_of[a["category_id"]]))
    return out


def check_split(images, labels, data, split):
    exp = expected(data)
    ids = sorted(exp)  # string sort
    assert images.dtype.kind == "U"
    assert labels.dtype == np.float64
    assert labels.shape == (len(ids), 80)
    assert images.tolist() == [f"{split}2014/COCO_{split}2014_{int(i):012d}.jpg" for i in ids]
    for row, i in enumerate(ids):
        assert set(np.flatnonzero(labels[row]).tolist()) == exp[i], i


def test_format_real_train_and_derived_val(tmp_path, capsys):
    train, val = merged_train(), derived_val()
    out = fc.format_coco(write_tree(tmp_path / "raw", train, val), tmp_path / "out")
    check_split(out["train_images"], out["train_labels"], train, "train")
    check_split(out["val_images"], out["val_labels"], val, "val")

    # train: the 35 real images, one class each; string order differs from numeric order
    assert out["train_labels"].shape == (35, 80)
    ids = [int(p[-16:-4]) for p in out["train_images"]]
    assert ids != sorted(ids)
    assert ids.index(135748) < ids.index(20070)  # "135748" < "20070" as strings
    assert out["train_images"][0] == "train2014/COCO_train2014_000000109278.jpg"
    col_sums = out["train_labels"].sum(axis=0)
    assert {k: col_sums[v] for k, v in INDEX.items()} == {"person": 9, "car": 3, "bus": 6, "cat": 9, "dog": 8}
    assert col_sums.sum() == 35

    # val: "100000" < "25" < "9" as strings; id 7 (no annotation) absent
    vimg = out["val_images"].tolist()
    vids = [p.split("_")[-1][:-4] for p in vimg]
    assert vids.index("000000100000") < vids.index("000000000025") < vids.index("000000000009")
    assert vimg[-1] == "val2014/COCO_val2014_000000000009.jpg"
    assert "val2014/COCO_val2014_000000000007.jpg" not in vimg
    row = dict(zip(vimg, out["val_labels"]))
    assert np.flatnonzero(row["val2014/COCO_val2014_000000100000.jpg"]).tolist() == [0, 16]
    assert np.flatnonzero(row["val2014/COCO_val2014_000000000025.jpg"]).tolist() == [5]  # crowd only
    bus = load("bus")
    n_crowd = sum(1 for a in bus["annotations"] if a["image_id"] == bus["images"][0]["id"])
    printed = capsys.readouterr().out
    assert f"COCO val2014: {len(vimg)} images with annotations (40 annotations, {n_crowd} crowd)" in printed
    assert n_crowd >= 1
    for key, arr in out.items():
        saved = np.load(tmp_path / "out" / f"formatted_{key}.npy")
        assert saved.dtype == arr.dtype
        np.testing.assert_array_equal(saved, arr)


def test_cli_as_script_from_repo_root(tmp_path):
    raw = write_tree(tmp_path / "raw", merged_train(), derived_val())
    res = subprocess.run([sys.executable, "preproc/format_coco.py", "--load-path", str(raw),
                          "--save-path", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "out" / "formatted_train_labels.npy").shape == (35, 80)


def test_category_mismatch_is_an_error(tmp_path):
    val = derived_val()
    cats = val["categories"]
    cats[2], cats[3] = cats[3], cats[2]  # car and motorcycle swapped
    with pytest.raises(PreprocError) as exc:
        fc.format_coco(write_tree(tmp_path / "raw", merged_train(), val), None)
    msg = str(exc.value)
    assert "same category list" in msg and "position 2" in msg
    assert "(3, 'car')" in msg and "(4, 'motorcycle')" in msg


def test_other_category_count_warns_and_keeps_the_files_columns(tmp_path, capsys):
    # The original formats whatever category list it finds (training later rejects C != 80), so a
    # 79-category pair of files gives 79 columns and a warning, not an error.
    train, val = merged_train(), derived_val()
    used = {a["category_id"] for d in (train, val) for a in d["annotations"]}
    unused = next(c["id"] for c in train["categories"] if c["id"] not in used)
    for d in (train, val):
        d["categories"] = [c for c in d["categories"] if c["id"] != unused]
    out = fc.format_coco(write_tree(tmp_path / "raw", train, val), None)
    assert out["train_labels"].shape[1] == out["val_labels"].shape[1] == 79
    assert "expected 80 categories" in capsys.readouterr().err


def test_unknown_category_id_is_an_error(tmp_path):
    train = merged_train()
    train["annotations"][0]["category_id"] = 12  # a gap in the COCO ids
    with pytest.raises(PreprocError, match="category_id 12, which is not in the file's 'categories'"):
        fc.format_coco(write_tree(tmp_path / "raw", train, derived_val()), None)


@pytest.mark.parametrize("bad", ["4a", 4.5, None, True, -3])
def test_a_category_id_that_is_not_an_integer_is_one_line_exit_2(tmp_path, capsys, bad):
    """Issue 23: `"id": "4a"` stopped with a traceback; now the file, the category and the fix, exit 2."""
    train = merged_train()
    train["categories"][3]["id"] = bad
    raw = write_tree(tmp_path / "raw", train, derived_val())
    assert fc.main(["--load-path", str(raw), "--save-path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {raw / 'annotations' / 'instances_train2014.json'}: category #3 has id {bad!r}; expected "
                   f"a non-negative integer (fix the file, or use the official instances_*2014.json)\n")
    assert not (tmp_path / "out").exists()


def test_missing_raw_file_names_path_and_source(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "annotations").mkdir(parents=True)
    (raw / "annotations" / "instances_train2014.json").write_text(json.dumps(merged_train()))
    rc = fc.main(["--load-path", str(raw), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert str(raw / "annotations" / "instances_val2014.json") in err
    assert "annotations_trainval2014.zip" in err
    assert "python preproc/download.py --dataset coco" in err
    assert not (tmp_path / "out").exists()


def test_invalid_json_is_an_error(tmp_path):
    raw = write_tree(tmp_path / "raw", merged_train(), derived_val())
    (raw / "annotations" / "instances_val2014.json").write_text('{"categories": [')
    with pytest.raises(PreprocError, match=r"instances_val2014.json: not valid JSON"):
        fc.format_coco(raw, None)


def test_dataset_json_has_the_category_names_in_label_order(tmp_path):
    from datasets import DATASET_INFO
    from preproc.common import read_dataset_json
    train, val = merged_train(), derived_val()
    out = fc.format_coco(write_tree(tmp_path / "raw", train, val), tmp_path / "out")
    info = read_dataset_json(tmp_path / "out")
    names = info["class_names"]
    assert names == [c["name"] for c in load("person")["categories"]] and len(names) == 80
    assert {k: names[v] for k, v in INDEX.items()} == {k: k for k in INDEX}  # person 0, car 2, bus 5, cat 15, dog 16
    assert names[1] == "bicycle" and names[9] == "traffic light" and names[79] == "toothbrush"
    assert info["image_folder"] == DATASET_INFO["coco"].image_subdir == ""
    assert info["single_positive"] is False and info["source"] == "preproc/format_coco.py"
    # val image 100000 merges a dog and a person image: its columns are named dog and person
    row = dict(zip(out["val_images"].tolist(), out["val_labels"]))["val2014/COCO_val2014_000000100000.jpg"]
    assert [names[k] for k in np.flatnonzero(row)] == ["person", "dog"]
