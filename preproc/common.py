"""Shared helpers for the ``preproc/format_*.py`` scripts.

Everything here is small on purpose: an error type for expected failures (missing raw
files, inconsistent counts), the download hints those errors print, the formatted-file
writer and a ``main`` wrapper that turns expected errors into a message plus a non-zero
exit code instead of a traceback. The atomic writers live in the top-level ``fileio.py``,
shared with the training code; this module stays standard library + numpy only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, Mapping, Sequence

import numpy as np

from fileio import save_npy_atomic, write_atomic  # noqa: F401  (the repo root is on sys.path; re-exported)

__all__ = [
    "PreprocError",
    "FORMAT_COMMANDS",
    "DOWNLOAD_HINTS",
    "missing_file_message",
    "require_file",
    "read_text_lines",
    "write_atomic",
    "save_npy_atomic",
    "save_formatted",
    "run_main",
    "check_unique",
]


class PreprocError(Exception):
    """An expected, user-fixable problem with the raw data (shown without a traceback)."""


# The command that creates each dataset's formatted_*.npy files (named in "missing file" errors).
FORMAT_COMMANDS: Dict[str, str] = {
    "pascal": "python preproc/format_pascal.py",
    "coco": "python preproc/format_coco.py",
    "nuswide": "python preproc/format_nuswide.py",
    "cub": "python preproc/format_cub.py",
    "demo": "python preproc/make_demo.py",
}

# Where each dataset's raw files come from (printed whenever a raw file is missing).
DOWNLOAD_HINTS: Dict[str, str] = {
    "pascal": (
        "Download VOCtrainval_11-May-2012.tar from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar "
        "and extract it into the load path (it creates VOCdevkit/VOC2012/...)"
    ),
    "coco": (
        "Download http://images.cocodataset.org/annotations/annotations_trainval2014.zip "
        "(plus http://images.cocodataset.org/zips/train2014.zip and "
        "http://images.cocodataset.org/zips/val2014.zip for the images) and unzip them "
        "into the load path (it creates annotations/, train2014/, val2014/)"
    ),
    "cub": (
        "Download https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz "
        "and extract it into the load path (it creates CUB_200_2011/ and attributes.txt)"
    ),
    "nuswide": (
        "Get the official NUS-WIDE release from "
        "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html "
        "(Concepts81.txt, ImageList/, Groundtruth/; the Flickr/ images are given on request) "
        "and place it in the load path"
    ),
}


def missing_file_message(path: os.PathLike | str, dataset: str, what: str = "raw file") -> str:
    """The message for a missing raw file: the expected path, the source and the command."""
    hint = DOWNLOAD_HINTS.get(dataset, "")
    lines = [f"missing {what}: expected {path}"]
    if hint:
        lines.append(hint + ",")
    lines.append(f"or run: python preproc/download.py --dataset {dataset}")
    lines.append(f"(see data/{dataset}/README.md for the expected layout)")
    return "\n  ".join(lines)


def require_file(path: os.PathLike | str, dataset: str, what: str = "raw file") -> Path:
    """Return ``path`` as a Path, or raise PreprocError naming it and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise PreprocError(missing_file_message(path, dataset, what))
    return path


def read_text_lines(path: os.PathLike | str, keep_blank: bool = False) -> list:
    """Lines of a text file without line endings (CRLF tolerated); blank lines dropped
    unless ``keep_blank``. Undecodable bytes are a clear error, not a traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        try:
            text = path.read_text(encoding="latin-1")
        except Exception as exc:  # pragma: no cover - latin-1 decodes everything
            raise PreprocError(f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    if keep_blank:
        return lines
    return [ln for ln in lines if ln.strip()]


def save_formatted(save_path: os.PathLike | str, arrays: Mapping[str, np.ndarray]) -> None:
    """Save ``{'train_images': ..., 'train_labels': ..., 'val_images': ..., 'val_labels': ...}``
    as ``<save_path>/formatted_<key>.npy`` and print what was written."""
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    for key in ("train_images", "train_labels", "val_images", "val_labels"):
        arr = arrays[key]
        out = save_npy_atomic(save_path / f"formatted_{key}.npy", arr)
        print(f"wrote {out}  shape={arr.shape} dtype={arr.dtype}")


def run_main(func: Callable[[], object]) -> int:
    """Run ``func``; expected errors (PreprocError) print ``error: ...`` to stderr and give
    exit code 1. Anything else is a bug and propagates with its traceback."""
    try:
        func()
    except PreprocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def check_unique(items: Sequence[str], path: os.PathLike | str, what: str) -> None:
    """Raise PreprocError if ``items`` has duplicates (names the first one)."""
    seen = set()
    for item in items:
        if item in seen:
            raise PreprocError(f"{path}: {what} {item!r} is listed more than once")
        seen.add(item)
