"""Tests for preproc/format_cub.py on the real CUB-200-2011 metadata (all 11,788 images).

Real files used byte for byte: CUB_200_2011/images.txt and train_test_split.txt.

Derived (built in a temporary folder, never in tests/data), because the per-image
attribute file and the top-level attributes.txt are not available:
* ``attributes/image_attribute_labels.txt``: per-image ``is_present`` = 1 where the real
  class-level table ``class_attribute_labels_continuous.txt`` says >= 50 % of the images of
  the image's class (from the real ``image_class_labels.txt``) have the attribute, else 0.
  Lines are ``<image id> <attribute id> <is_present> 3 0.0`` in images.txt order, except
  that images 1 and 2 have their blocks swapped and the attribute order of image 3 is
  reversed (the formatter must place rows by id, not by position), and the line of
  image 5 / attribute 7 carries an extra field (a malformed line as in some real copies).
* ``attributes.txt``: 312 placeholder lines ``<k> attribute_<k>``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import format_cub as fcub  # noqa: E402
from preproc.common import PreprocError  # noqa: E402



CUB = REALDATA / "cub" / "CUB_200_2011"


def read_pairs(path):
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def derived_table():
    """(image ids in images.txt order, names, is_train, per-image 0/1 table (N, 312))."""
    images = [line.split(" ", 1) for line in (CUB / "images.txt").read_text().splitlines()]
    ids = [int(i) for i, _ in images]
    names = [n for _, n in images]
    split = {int(i): int(t) for i, t in read_pairs(CUB / "train_test_split.txt")}
    klass = {int(i): int(c) for i, c in read_pairs(CUB / "image_class_labels.txt")}
    cont = np.loadtxt(CUB / "attributes" / "class_attribute_labels_continuous.txt")
    assert cont.shape == (200, 312)
    table = np.array([(cont[klass[i] - 1] >= 50.0).astype(np.int64) for i in ids])
    return ids, names, np.array([split[i] == 1 for i in ids]), table


@pytest.fixture(scope="module")
def cub_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub_raw")
    (root / "CUB_200_2011" / "attributes").mkdir(parents=True)
    for name in ("images.txt", "train_test_split.txt"):
        (root / "CUB_200_2011" / name).write_bytes((CUB / name).read_bytes())
    (root / "attributes.txt").write_text("".join(f"{k} attribute_{k}\n" for k in range(1, 313)))
    ids, names, is_train, table = derived_table()

    blocks = []
    for row, image_id in enumerate(ids):
        block = [f"{image_id} {a} {table[row, a - 1]} 3 0.0\n" for a in range(1, 313)]
        if image_id == 3:
            block.reverse()
        if image_id == 5:
            block[6] = f"5 7 {table[row, 6]} 3 0 12.5\n"  # extra field
        blocks.append("".join(block))
    blocks[0], blocks[1] = blocks[1], blocks[0]
    text = "".join(blocks)
    (root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt").write_text(text)
    return {"root": root, "ids": ids, "names": names, "is_train": is_train, "table": table,
            "labels_text": text}


def variant(tmp_path: Path, tree: dict, **replace_text) -> Path:
    """A copy of the tree as symlinks, with the named files (by key) replaced by text."""
    rel = {"images": "CUB_200_2011/images.txt", "split": "CUB_200_2011/train_test_split.txt",
           "attributes": "attributes.txt",
           "labels": "CUB_200_2011/attributes/image_attribute_labels.txt"}
    root = tmp_path / "raw"
    for key, r in rel.items():
        dst = root / r
        dst.parent.mkdir(parents=True, exist_ok=True)
        if key in replace_text:
            dst.write_text(replace_text[key])
        else:
            dst.symlink_to(tree["root"] / r)
    return root


def test_format_full_metadata(cub_tree, tmp_path, capsys):
    out = fcub.format_cub(cub_tree["root"], tmp_path / "out")
    names = np.array(cub_tree["names"])
    is_train, table = cub_tree["is_train"], cub_tree["table"]

    assert out["train_labels"].shape == (5994, 312)
    assert out["val_labels"].shape == (5794, 312)
    assert out["train_labels"].dtype == np.int64 and out["val_labels"].dtype == np.int64
    assert out["train_images"].dtype.kind == "U"
    # each split's string width is its own longest name, as np.array over that split's list gives
    for key, mask in (("train_images", is_train), ("val_images", ~is_train)):
        assert out[key].dtype == np.dtype(f"<U{max(len(n) for n in names[mask])}")
    assert out["train_images"].tolist() == names[is_train].tolist()
    assert out["val_images"].tolist() == names[~is_train].tolist()
    np.testing.assert_array_equal(out["train_labels"], table[is_train])
    np.testing.assert_array_equal(out["val_labels"], table[~is_train])

    # hand-checked anchors from the real files: image 1 is a test image, image 2 a train image
    assert out["val_images"][0] == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert out["train_images"][0] == "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg"
    # class 1's continuous row has 59.85 % for attribute 5 and 2.92 % for attribute 2
    assert out["val_labels"][0, 4] == 1 and out["val_labels"][0, 1] == 0
    assert "CUB-200-2011: 11788 images, 5994 train, 5794 test (saved as val)" in capsys.readouterr().out
    for key, arr in out.items():
        saved = np.load(tmp_path / "out" / f"formatted_{key}.npy")
        assert saved.dtype == arr.dtype
        np.testing.assert_array_equal(saved, arr)


def test_cli_as_script_from_repo_root(cub_tree, tmp_path):
    res = subprocess.run([sys.executable, "preproc/format_cub.py", "--load-path", str(cub_tree["root"]),
                          "--save-path", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "out" / "formatted_val_labels.npy").shape == (5794, 312)


def test_wrong_attribute_count_is_an_error(cub_tree, tmp_path):
    text = "".join(f"{k} attribute_{k}\n" for k in range(1, 312))
    with pytest.raises(PreprocError, match=r"attributes.txt: expected 312 attribute lines, found 311"):
        fcub.format_cub(variant(tmp_path, cub_tree, attributes=text), None)


def test_wrong_image_count_is_an_error(cub_tree, tmp_path):
    lines = (CUB / "images.txt").read_text().splitlines()
    with pytest.raises(PreprocError, match=r"images.txt: expected 11788 images \(CUB-200-2011\), found 11787 lines"):
        fcub.format_cub(variant(tmp_path, cub_tree, images="\n".join(lines[:-1]) + "\n"), None)


def test_split_file_missing_an_image_is_an_error(cub_tree, tmp_path):
    lines = (CUB / "train_test_split.txt").read_text().splitlines()
    with pytest.raises(PreprocError, match=r"train_test_split.txt: expected one line per image of images.txt \(11788\), found 11787"):
        fcub.format_cub(variant(tmp_path, cub_tree, split="\n".join(lines[1:]) + "\n"), None)


def test_duplicate_attribute_row_is_an_error(cub_tree, tmp_path):
    # image 10's attribute 4 line rewritten as a second attribute 3 line
    text = cub_tree["labels_text"]
    row = cub_tree["ids"].index(10)
    old = f"\n10 4 {cub_tree['table'][row, 3]} 3 0.0\n"
    assert text.count(old) == 1
    text = text.replace(old, f"\n10 3 {cub_tree['table'][row, 2]} 3 0.0\n")
    with pytest.raises(PreprocError) as exc:
        fcub.format_cub(variant(tmp_path, cub_tree, labels=text), None)
    msg = str(exc.value)
    assert "expected every (image, attribute) pair exactly once" in msg
    assert "e.g. image 10 attribute 3" in msg and "e.g. image 10 attribute 4" in msg


def test_short_attribute_file_is_an_error(cub_tree, tmp_path):
    text = "\n".join(cub_tree["labels_text"].split("\n", 624)[:624]) + "\n"
    with pytest.raises(PreprocError, match=r"expected 3677856 rows \(11788 images x 312 attributes\), found 624"):
        fcub.format_cub(variant(tmp_path, cub_tree, labels=text), None)


def test_missing_raw_file_names_path_and_source(tmp_path, capsys):
    rc = fcub.main(["--load-path", str(tmp_path / "nothing"), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert str(tmp_path / "nothing" / "CUB_200_2011" / "images.txt") in err
    assert "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz" in err
    assert "python preproc/download.py --dataset cub" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad_line,message", [
    ("10 4 2 3 0.0", r"expected is_present 0 or 1, found 2 \(image 10, attribute 4; 1 such rows\)"),
    ("10 4 yes 3 0.0", r"integer first three fields; could not parse"),
    ("10 4", r"integer first three fields; could not parse"),
    ("99999 4 0 3 0.0", r"image id 99999 \(attribute 4\) is not in images.txt"),
    ("10 313 0 3 0.0", r"expected attribute ids 1..312, found 313 \(image 10\)"),
])
def test_bad_attribute_line_is_an_error(cub_tree, tmp_path, bad_line, message):
    text = cub_tree["labels_text"]
    row = cub_tree["ids"].index(10)
    old = f"\n10 4 {cub_tree['table'][row, 3]} 3 0.0\n"
    text = text.replace(old, f"\n{bad_line}\n")
    with pytest.raises(PreprocError, match=message):
        fcub.format_cub(variant(tmp_path, cub_tree, labels=text), None)


def test_dataset_json_has_the_attribute_names_by_id(cub_tree, tmp_path):
    """attributes.txt (derived: placeholder names, some with spaces, lines in reverse order) gives the names by
    attribute id, which is the column order."""
    from datasets import DATASET_INFO
    from preproc.common import read_dataset_json
    names = {k: f"has_part::value {k}" if k % 2 else f"attribute_{k}" for k in range(1, 313)}
    text = "".join(f"{k} {names[k]}\n" for k in reversed(range(1, 313)))
    fcub.format_cub(variant(tmp_path, cub_tree, attributes=text), tmp_path / "out")
    info = read_dataset_json(tmp_path / "out")
    assert info["class_names"] == [names[k] for k in range(1, 313)] and info["num_classes"] == 312
    assert info["class_names"][0] == "has_part::value 1" and info["class_names"][311] == "attribute_312"
    assert info["image_folder"] == DATASET_INFO["cub"].image_subdir == "CUB_200_2011/images"
    assert info["source"] == "preproc/format_cub.py" and info["single_positive"] is False


def test_attribute_ids_must_each_occur_once(cub_tree, tmp_path):
    text = "".join(f"{k} attribute_{k}\n" for k in range(1, 312)) + "7 attribute_again\n"
    with pytest.raises(PreprocError, match=r"attributes.txt, line 312: expected each attribute id 1..312 once, "
                                           r"found 7 again"):
        fcub.format_cub(variant(tmp_path, cub_tree, attributes=text), None)
