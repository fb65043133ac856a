"""Shared test setup: the repository root on sys.path and the real test data shipped in tests/data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small real public data inside the checkout (tests/data/SOURCES.md says where each file comes from and what
# was trimmed or downscaled). Nothing outside the repository is read.
REALDATA = Path(__file__).resolve().parent / "data"
if not (REALDATA / "SOURCES.md").is_file():
    raise RuntimeError(f"test data missing: {REALDATA} should be part of the checkout (tests/data/SOURCES.md)")
CUB = REALDATA / "cub" / "CUB_200_2011"


def read_table(path: Path) -> dict[int, str]:
    return {int(line.split()[0]): line.split()[1] for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="session")
def bird_root(tmp_path_factory) -> Path:
    """A "pascal"-shaped data root over the 145 real CUB JPEGs (species 001, 005, 006) of tests/data.

    Derived here (not in tests/data): a 20-label task, written directly as the formatted_*.npy arrays: labels
    0-2 = the bird's species, labels 3-19 = the first 17 attributes whose class-level percentage
    (attributes/class_attribute_labels_continuous.txt) is >= 50 % for some but not all three species, taken at
    the image's species. Official train/test follow the real train_test_split.txt; observed labels come from
    generate_observed_labels (seed 1200)."""
    from preproc.generate_observed_labels import generate_observed
    root = tmp_path_factory.mktemp("data")
    names = read_table(CUB / "images.txt")
    is_train = {k: int(v) for k, v in read_table(CUB / "train_test_split.txt").items()}
    class_of = {k: int(v) for k, v in read_table(CUB / "image_class_labels.txt").items()}
    present = [i for i in sorted(names) if (CUB / "images" / names[i]).is_file()]
    assert len(present) == 145
    species = sorted({class_of[i] for i in present})
    assert species == [1, 5, 6]
    attr = np.loadtxt(CUB / "attributes" / "class_attribute_labels_continuous.txt")[[s - 1 for s in species]] >= 50
    varying = np.where(attr.any(axis=0) & ~attr.all(axis=0))[0][:17]
    assert len(varying) == 17
    table = np.concatenate([np.eye(3, dtype=bool), attr[:, varying]], axis=1)  # (species, 20 labels)
    out = root / "pascal"
    (out / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    (out / "VOCdevkit" / "VOC2012" / "JPEGImages").symlink_to(CUB / "images")
    for phase, flag in (("train", 1), ("val", 0)):
        ids = [i for i in present if is_train[i] == flag]
        labels = table[[species.index(class_of[i]) for i in ids]].astype(np.float64)
        np.save(out / f"formatted_{phase}_images.npy", np.array([names[i] for i in ids]))
        np.save(out / f"formatted_{phase}_labels.npy", labels)
        np.save(out / f"formatted_{phase}_labels_obs.npy", generate_observed(labels, 1, 0, 1200))
    return root


SMALL_DEMO = {"NUM_TRAIN": 60, "NUM_TEST": 20}  # the demo generator at 60 + 20 images (the full one: 4,000 + 1,000)


@pytest.fixture(scope="session")
def small_demo_root(tmp_path_factory) -> Path:
    """A data root holding a small demo (the full demo takes minutes per run on 2 cores)."""
    from preproc import make_demo
    root = tmp_path_factory.mktemp("small_demo") / "data"
    with pytest.MonkeyPatch.context() as m:
        for name, value in SMALL_DEMO.items():
            m.setattr(make_demo, name, value)
        make_demo.ensure_demo(root / "demo")
    return root


@pytest.fixture
def small_demo(small_demo_root, monkeypatch) -> Path:
    """small_demo_root, which `-d demo` runs of this test take as complete (the demo's check counts its images)."""
    from preproc import make_demo
    for name, value in SMALL_DEMO.items():
        monkeypatch.setattr(make_demo, name, value)
    return small_demo_root
