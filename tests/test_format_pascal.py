"""Tests for preproc/format_pascal.py on class lists derived from real VOC XML annotations.

The real data (see tests/data/SOURCES.md) has VOC XMLs but no per-class
``<cls>_<split>.txt`` files, so the test derives them the way the VOC devkit does:
1 = the class is present with at least one non-difficult instance, 0 = only difficult
instances, -1 = absent; lines are written as ``'%s %2d'`` (so positives and difficults have
two spaces before the label, as in the official files).

Derived variants, built in tmp_path (never in tests/data):
* ``2099_000005``: the VOC2007 000005.xml annotation keeping only its two *difficult*
  chairs, so its only class is difficult-only -> 0 everywhere -> the image is dropped;
* ``2099_000001``: the VOC2007 000001.xml annotation with its dog marked difficult,
  so it keeps ``person`` only.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from preproc import format_pascal as fp  # noqa: E402
from preproc.common import PreprocError  # noqa: E402



VOC = REALDATA / "voc"

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def objects_of(root: ET.Element):
    """[(class name, difficult)] for the top-level <object> elements of a VOC XML."""
    out = []
    for obj in root.findall("object"):
        name = obj.findtext("name").strip()
        difficult = int((obj.findtext("difficult") or "0").strip())
        out.append((name, difficult))
    return out


def devkit_labels(objs):
    """VOC devkit class-list value per class: 1 / 0 (difficult only) / -1."""
    out = {}
    for cls in VOC_CLASSES:
        flags = [d for n, d in objs if n == cls]
        out[cls] = -1 if not flags else (1 if any(d == 0 for d in flags) else 0)
    return out


def load_annotations():
    """{image id: [(class, difficult)]} from the real XMLs plus the two derived variants."""
    ann = {}
    for xml in sorted((VOC / "VOCdevkit" / "VOC2012" / "Annotations").glob("*.xml")):
        ann[xml.stem] = objects_of(ET.parse(xml).getroot())
    for xml in sorted((VOC / "VOCdevkit" / "VOC2007" / "Annotations").glob("*.xml")):
        ann[xml.stem] = objects_of(ET.parse(xml).getroot())
    for xml in sorted((VOC / "labelme_voc2012" / "Annotations").glob("*.xml")):
        ann[xml.stem] = objects_of(ET.parse(xml).getroot())
    # derived: 000005 with only its difficult chairs
    ann["2099_000005"] = [(n, d) for n, d in ann["000005"] if d == 1]
    # derived: 000001 with the dog marked difficult
    ann["2099_000001"] = [(n, 1 if n == "dog" else d) for n, d in ann["000001"]]
    return ann


ANN = load_annotations() if VOC.is_dir() else {}
# Real ids of three layouts (VOC2007 numeric, VOC2012 year_number, labelme 2011_*), written
# in a deliberately unsorted order.
TRAIN_IDS = ["2011_000025", "2007_000042", "000003", "2099_000005", "2007_000027", "000001",
             "2011_000003", "2007_000033"]
VAL_IDS = ["2099_000001", "2007_000039", "000005", "2011_000006", "000004", "2007_000032",
           "000002"]


def write_class_lists(load: Path, phase_ids: dict, fmt=lambda i, v: f"{i} {v:2d}") -> Path:
    main = load / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for phase, ids in phase_ids.items():
        for cls in VOC_CLASSES:
            lines = [fmt(i, devkit_labels(ANN[i])[cls]) for i in ids]
            (main / f"{cls}_{phase}.txt").write_text("\n".join(lines) + "\n")
    return main


def expected_phase(ids):
    """(sorted file names, {file name: set of positive classes}) straight from the XMLs."""
    pos = {}
    for i in ids:
        classes = {n for n, d in ANN[i] if n in VOC_CLASSES and d == 0}
        if classes:
            pos[i + ".jpg"] = classes
    return sorted(pos), pos


def test_derived_fixture_has_the_cases_we_need():
    # sanity of the derivation itself (so the tests below test something)
    assert devkit_labels(ANN["2099_000005"])["chair"] == 0
    assert devkit_labels(ANN["000005"])["chair"] == 1  # mixed difficult / not -> present
    assert devkit_labels(ANN["2099_000001"])["dog"] == 0
    assert devkit_labels(ANN["2007_000027"])["person"] == 1  # parts (head, hand) are not objects


def test_format_matches_xml_objects(tmp_path, capsys):
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    out = fp.format_pascal(load, tmp_path / "out")

    for phase, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        names, pos = expected_phase(ids)
        images = out[f"{phase}_images"]
        labels = out[f"{phase}_labels"]
        assert images.dtype.kind == "U"
        assert labels.dtype == np.float64
        assert labels.shape == (len(names), 20)
        assert images.tolist() == names
        for row, name in enumerate(names):
            got = {VOC_CLASSES[k] for k in np.flatnonzero(labels[row])}
            assert got == pos[name], name
        assert set(np.unique(labels)) <= {0.0, 1.0}
        # saved files hold the same arrays and dtypes
        for kind in ("images", "labels"):
            saved = np.load(tmp_path / "out" / f"formatted_{phase}_{kind}.npy")
            assert saved.dtype == out[f"{phase}_{kind}"].dtype
            np.testing.assert_array_equal(saved, out[f"{phase}_{kind}"])

    # hand-checked values (from reading the XMLs)
    tr = dict(zip(out["train_images"].tolist(), out["train_labels"]))
    va = dict(zip(out["val_images"].tolist(), out["val_labels"]))
    assert out["train_images"].tolist() == [
        "000001.jpg", "000003.jpg", "2007_000027.jpg", "2007_000033.jpg", "2007_000042.jpg",
        "2011_000003.jpg", "2011_000025.jpg",
    ]  # 2099_000005 (difficult-only chairs) dropped
    assert "2099_000005.jpg" not in tr
    assert np.flatnonzero(tr["000001.jpg"]).tolist() == [11, 14]  # dog, person
    assert np.flatnonzero(tr["2011_000025.jpg"]).tolist() == [5, 6]  # bus, car
    assert np.flatnonzero(va["2099_000001.jpg"]).tolist() == [14]  # difficult dog is NOT positive
    assert np.flatnonzero(va["000005.jpg"]).tolist() == [8]  # chair: some instances not difficult
    assert np.flatnonzero(va["2007_000032.jpg"]).tolist() == [0, 14]  # aeroplane, person
    printed = capsys.readouterr().out
    assert "8 images listed, 7 kept, 1 dropped" in printed
    assert "formatted_train_labels.npy  shape=(7, 20) dtype=float64" in printed


def test_whitespace_variants_parse_the_same(tmp_path):
    # tabs, runs of spaces, trailing blanks and CRLF endings give the same result
    write_class_lists(tmp_path / "a", {"train": TRAIN_IDS, "val": VAL_IDS})
    base = fp.format_pascal(tmp_path / "a", None)
    odd = tmp_path / "b"
    write_class_lists(odd, {"train": TRAIN_IDS, "val": VAL_IDS}, fmt=lambda i, v: f"  {i}\t   {v}  \r")
    got = fp.format_pascal(odd, None)
    for key in base:
        np.testing.assert_array_equal(got[key], base[key])


def test_cli_as_script_from_repo_root(tmp_path):
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    res = subprocess.run(
        [sys.executable, "preproc/format_pascal.py", "--load-path", str(load), "--save-path",
         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    labels = np.load(tmp_path / "out" / "formatted_val_labels.npy")
    assert labels.shape == (7, 20) and labels.dtype == np.float64  # every val id has a positive
    images = np.load(tmp_path / "out" / "formatted_val_images.npy")
    assert images.tolist() == expected_phase(VAL_IDS)[0]
    assert "wrote" in res.stdout


def test_missing_raw_file_names_path_and_source(tmp_path, capsys):
    rc = fp.main(["--load-path", str(tmp_path / "nothing"), "--save-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert str(tmp_path / "nothing" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "aeroplane_train.txt") in err
    assert "VOCtrainval_11-May-2012.tar" in err
    assert "python preproc/download.py --dataset pascal" in err
    assert not (tmp_path / "out").exists()


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("script", ["pascal", "coco", "cub", "nuswide"])
@pytest.mark.parametrize("where", ["file", "below a file"])
def test_save_path_blocked_by_a_file_is_checked_first(tmp_path, capsys, where, script):
    # every format script (one shared main): checked before the raw files are read, which do not even exist here
    import importlib
    blocker = tmp_path / "formatted.npy"
    blocker.write_text("a file")
    save = blocker if where == "file" else blocker / "out"
    module = importlib.import_module(f"preproc.format_{script}")
    rc = module.main(["--load-path", str(tmp_path / "nothing"), "--save-path", str(save)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert f"cannot write to {save}: {blocker} is a file, not a folder" in err and "--save-path" in err
    assert blocker.read_text() == "a file"


def test_save_path_not_writable(tmp_path, monkeypatch, capsys):
    # simulated: the tests may run as root, for whom chmod does not make a folder read-only
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    rc = fp.main(["--load-path", str(load), "--save-path", str(tmp_path / "out")])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "not writable" in err and "choose a writable --save-path" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied")])
def test_write_error_leaves_the_previous_files(tmp_path, monkeypatch, capsys, code, message):
    # a failure while writing the third file: one line, and the four earlier files stay as they were
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    out = tmp_path / "out"
    out.mkdir()
    old = {f"formatted_{k}.npy": f"old {k}".encode() for k in ("train_images", "train_labels", "val_images", "val_labels")}
    for name, data in old.items():
        (out / name).write_bytes(data)
    real_save, calls = np.save, []

    def failing_save(fh, array, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code))
        real_save(fh, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    rc = fp.main(["--load-path", str(load), "--save-path", str(out)])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and message in err and str(out / "formatted_val_images.npy") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # no new file, no temporary left


def test_unreadable_raw_file_is_one_line(tmp_path, monkeypatch, capsys):
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    rc = fp.main(["--load-path", str(load), "--save-path", str(tmp_path / "out")])
    err = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "cannot read" in err and "aeroplane_train.txt: Permission denied" in err
    assert not (tmp_path / "out").exists()


def test_save_path_a_file_as_a_script(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    res = subprocess.run([sys.executable, "preproc/format_pascal.py", "--save-path", str(blocker)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: cannot write to") and "Traceback" not in res.stderr


def test_class_files_listing_different_images_warn_and_use_the_union(tmp_path, capsys):
    # The original takes the union of the positives over the class files, so a class file that misses
    # an image is reported but the image keeps the labels the other files give it.
    load = tmp_path / "raw"
    main = write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    complete = fp.format_pascal(load, None)
    lines = (main / "dog_val.txt").read_text().splitlines()
    (main / "dog_val.txt").write_text("\n".join(lines[:-1]) + "\n")
    capsys.readouterr()
    out = fp.format_pascal(load, None)
    assert "aeroplane_val.txt lists 7 images and dog_val.txt lists 6" in capsys.readouterr().err
    dropped_id = lines[-1].split()[0]
    dog = fp.CATEGORIES.index("dog")
    np.testing.assert_array_equal(out["val_images"], complete["val_images"])
    expected = complete["val_labels"].copy()
    expected[list(complete["val_images"]).index(dropped_id + ".jpg"), dog] = 0.0
    np.testing.assert_array_equal(out["val_labels"], expected)


def test_bad_label_value_is_an_error(tmp_path):
    load = tmp_path / "raw"
    main = write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    (main / "cat_train.txt").write_text("2007_000027  2\n")
    with pytest.raises(PreprocError, match=r"cat_train.txt, line 1: expected a label in \{-1, 0, 1\}, found '2'"):
        fp.format_pascal(load, None)


def test_line_with_extra_fields_is_an_error(tmp_path):
    load = tmp_path / "raw"
    main = write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    (main / "bus_val.txt").write_text("2007_000032 -1 0\n")
    with pytest.raises(PreprocError, match=r"bus_val.txt, line 1: expected '<image id> <label>' \(2 fields\), found 3 fields"):
        fp.format_pascal(load, None)


def test_dataset_json_names_the_columns(tmp_path):
    """dataset.json holds VOC's 20 class names in column order: the column named "person" is the person label."""
    from datasets import DATASET_INFO
    from preproc.common import read_dataset_json
    load = tmp_path / "raw"
    write_class_lists(load, {"train": TRAIN_IDS, "val": VAL_IDS})
    out = fp.format_pascal(load, tmp_path / "out")
    info = read_dataset_json(tmp_path / "out")
    assert info["class_names"] == VOC_CLASSES and info["num_classes"] == 20
    assert info["class_names"][0] == "aeroplane" and info["class_names"][14] == "person"
    assert info["class_names"][19] == "tvmonitor"
    assert info["image_folder"] == DATASET_INFO["pascal"].image_subdir == "VOCdevkit/VOC2012/JPEGImages"
    assert info["single_positive"] is False and info["features"] is False
    assert info["source"] == "preproc/format_pascal.py"
    for phase, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        names, pos = expected_phase(ids)
        for name, row in zip(names, out[f"{phase}_labels"]):
            assert {info["class_names"][k] for k in np.flatnonzero(row)} == pos[name]
