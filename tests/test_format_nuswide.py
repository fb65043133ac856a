"""Tests for preproc/format_nuswide.py (our own formatter for the official NUS-WIDE layout).

No NUS-WIDE files are available here, so every test builds a small tree in the official
layout in tmp_path: Concepts81.txt with the 81 NUS-WIDE concept names, Windows-style image
lists with CRLF line endings, and one 0/1 ground-truth file per concept and split (all 81).
The image names and labels are made up for the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import format_nuswide as fn  # noqa: E402
from preproc.common import PreprocError  # noqa: E402

CONCEPTS = (
    "airport animal beach bear birds boats book bridge buildings cars castle cat cityscape "
    "clouds computer coral cow dancing dog earthquake elk fire fish flags flowers food fox "
    "frost garden glacier grass harbor horses house lake leaf map military moon mountain "
    "nighttime ocean person plane plants police protest railroad rainbow reflection road rocks "
    "running sand sign sky snow soccer sports statue street sun sunset surf swimmers tattoo "
    "temple tiger tower town toy train tree valley vehicle water waterfall wedding whales "
    "window zebra"
).split()

# image-list entries (in list order, deliberately unsorted) -> positive concepts
TRAIN = [
    ("sunset\\0712_2345781002.jpg", {"sunset", "sky", "clouds"}),
    ("actor\\0001_2124494179.jpg", set()),  # none of the 81 labels -> dropped
    ("airport\\0003_306524071.jpg", {"airport", "plane"}),
    ("zebra\\0188_123456789.jpg", {"zebra", "animal", "grass"}),
    ("dog\\0042_99887766.jpg", {"dog"}),
]
TEST = [
    ("C:\\ImageData\\Flickr\\window\\0005_55512.jpg", {"window", "buildings"}),
    ("beach\\0010_42.jpg", {"beach", "ocean", "sand", "water", "sky"}),
    ("actor\\0002_1111.jpg", set()),  # dropped
    ("actor\\0003_2222.jpg", set()),  # dropped
]


def build_tree(root: Path, train=TRAIN, test=TEST, concepts=CONCEPTS) -> Path:
    (root / "ImageList").mkdir(parents=True)
    gt = root / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    (root / "Concepts81.txt").write_bytes(("\r\n".join(concepts) + "\r\n").encode())
    for split, items in (("Train", train), ("Test", test)):
        (root / "ImageList" / f"{split}Imagelist.txt").write_bytes(
            ("\r\n".join(p for p, _ in items) + "\r\n").encode())
        for c in CONCEPTS:
            values = "".join(f"{int(c in pos)}\r\n" for _, pos in items)
            (gt / f"Labels_{c}_{split}.txt").write_bytes(values.encode())
    return root


def expected(items):
    kept = [(p, pos) for p, pos in items if pos]
    paths = []
    for p, _ in kept:
        parts = p.split("\\")
        paths.append("/".join(parts[-2:]))
    labels = np.array([[1.0 if c in pos else 0.0 for c in CONCEPTS] for _, pos in kept])
    return paths, labels


def test_format_official_layout(tmp_path, capsys):
    out = fn.format_nuswide(build_tree(tmp_path / "raw"), tmp_path / "out")
    for phase, items in (("train", TRAIN), ("val", TEST)):
        paths, labels = expected(items)
        assert out[f"{phase}_images"].dtype.kind == "U"
        assert out[f"{phase}_labels"].dtype == np.float64
        assert out[f"{phase}_images"].tolist() == paths
        np.testing.assert_array_equal(out[f"{phase}_labels"], labels)
        for kind in ("images", "labels"):
            saved = np.load(tmp_path / "out" / f"formatted_{phase}_{kind}.npy")
            assert saved.dtype == out[f"{phase}_{kind}"].dtype
            np.testing.assert_array_equal(saved, out[f"{phase}_{kind}"])
    # hand-written anchors: list order kept, Windows paths converted, prefix up to Flickr removed
    assert out["train_images"].tolist() == [
        "sunset/0712_2345781002.jpg", "airport/0003_306524071.jpg", "zebra/0188_123456789.jpg",
        "dog/0042_99887766.jpg",
    ]
    assert out["val_images"].tolist() == ["window/0005_55512.jpg", "beach/0010_42.jpg"]
    assert out["train_labels"].shape == (4, 81)
    assert np.flatnonzero(out["train_labels"][1]).tolist() == [0, 43]  # airport, plane
    printed = capsys.readouterr().out
    assert "NUS-WIDE Train: 5 images listed, 4 kept, 1 dropped" in printed
    assert "NUS-WIDE Test: 4 images listed, 2 kept, 2 dropped" in printed


def test_cli_as_script_from_repo_root(tmp_path):
    raw = build_tree(tmp_path / "raw")
    res = subprocess.run([sys.executable, "preproc/format_nuswide.py", "--load-path", str(raw),
                          "--save-path", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "1 dropped" in res.stdout
    assert np.load(tmp_path / "out" / "formatted_val_labels.npy").shape == (2, 81)


def test_label_file_length_mismatch_is_an_error(tmp_path):
    raw = build_tree(tmp_path / "raw")
    f = raw / "Groundtruth" / "TrainTestLabels" / "Labels_dog_Train.txt"
    f.write_text("0\n0\n0\n0\n")
    with pytest.raises(PreprocError, match=r"Labels_dog_Train.txt: expected 5 lines \(one per image of the image list\), found 4"):
        fn.format_nuswide(raw, None)


def test_non_binary_label_is_an_error(tmp_path):
    raw = build_tree(tmp_path / "raw")
    (raw / "Groundtruth" / "TrainTestLabels" / "Labels_cat_Test.txt").write_text("0\n2\n0\n0\n")
    with pytest.raises(PreprocError, match=r"Labels_cat_Test.txt, line 2: expected 0 or 1, found 2"):
        fn.format_nuswide(raw, None)


def test_wrong_concept_count_is_an_error(tmp_path):
    raw = build_tree(tmp_path / "raw")
    (raw / "Concepts81.txt").write_text("\n".join(CONCEPTS[:80]) + "\n")
    with pytest.raises(PreprocError, match=r"Concepts81.txt: expected 81 concept names, found 80"):
        fn.format_nuswide(raw, None)


def test_missing_files_name_path_and_source(tmp_path, capsys):
    rc = fn.main(["--load-path", str(tmp_path / "nothing"), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert str(tmp_path / "nothing" / "Concepts81.txt") in err
    assert "NUS-WIDE.html" in err and "python preproc/download.py --dataset nuswide" in err

    raw = build_tree(tmp_path / "raw")
    missing = raw / "Groundtruth" / "TrainTestLabels" / "Labels_zebra_Test.txt"
    missing.unlink()
    with pytest.raises(PreprocError) as exc:
        fn.format_nuswide(raw, None)
    assert str(missing) in str(exc.value)


def test_dataset_json_has_the_concepts_in_label_order(tmp_path):
    from datasets import DATASET_INFO
    from preproc.common import read_dataset_json
    out = fn.format_nuswide(build_tree(tmp_path / "raw"), tmp_path / "out")
    info = read_dataset_json(tmp_path / "out")
    assert info["class_names"] == CONCEPTS and info["num_classes"] == 81
    assert info["class_names"][0] == "airport" and info["class_names"][80] == "zebra"
    assert info["image_folder"] == DATASET_INFO["nuswide"].image_subdir == "Flickr"
    assert info["source"] == "preproc/format_nuswide.py" and info["single_positive"] is False
    # the first train row is sunset/0712_2345781002.jpg with sunset, sky, clouds
    assert out["train_images"][0] == "sunset/0712_2345781002.jpg"
    assert {info["class_names"][k] for k in np.flatnonzero(out["train_labels"][0])} == {"sunset", "sky", "clouds"}
