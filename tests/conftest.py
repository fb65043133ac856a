"""Shared test setup: the repository root on sys.path and the real test data shipped in tests/data."""
from __future__ import annotations

import sys
from pathlib import Path

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
    """A "pascal"-shaped data root over the 145 real CUB JPEGs of tests/data (helpers.make_bird_root)."""
    from helpers import make_bird_root
    return make_bird_root(tmp_path_factory.mktemp("data"))


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
