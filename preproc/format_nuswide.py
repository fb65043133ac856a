"""Format the official NUS-WIDE release (81 concepts) into ``formatted_{train,val}_*.npy``.

This script is OUR OWN (a documented deviation): the reference implementation shipped no
NUS-WIDE formatting script, only pre-formatted files on the authors' Google Drive. Users
who have those files can drop them into ``data/nuswide`` instead of running this.

Reads from ``<load>`` (the official release layout):

* ``Concepts81.txt``: the 81 concept names, one per line; this is the class order;
* ``ImageList/TrainImagelist.txt`` and ``ImageList/TestImagelist.txt``: one image per line,
  Windows style ``concept\\name.jpg``; written out as ``concept/name.jpg`` (relative to
  ``data/nuswide/Flickr``); a leading ``...\\Flickr\\`` prefix, if present, is removed;
* ``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt``: one 0/1 per line,
  aligned with the matching image list.

Train -> ``formatted_train_*``, Test -> ``formatted_val_*`` (used as the test set). Rows
keep image-list order; images with none of the 81 labels are dropped (the count is
printed per split). Labels are float64 (N, 81). ``dataset.json`` records the 81 concept names
in column order (``preproc.common.read_dataset_json``).

Usage (from the repo root)::

    python preproc/format_nuswide.py [--load-path ./data/nuswide] [--save-path ./data/nuswide]
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import (  # noqa: E402
    PreprocError,
    check_unique,
    format_main,
    read_text_lines,
    require_file,
    save_formatted,
)

NUM_CLASSES = 81
# (official split name used in file names, output phase)
SPLITS = (("Train", "train"), ("Test", "val"))
IMAGE_FOLDER = "Flickr"  # relative to the dataset folder


def concepts_file(load_path: os.PathLike | str) -> Path:
    return Path(load_path) / "Concepts81.txt"


def image_list_file(load_path: os.PathLike | str, split: str) -> Path:
    return Path(load_path) / "ImageList" / f"{split}Imagelist.txt"


def label_file(load_path: os.PathLike | str, concept: str, split: str) -> Path:
    return Path(load_path) / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{split}.txt"


def read_concepts(path: Path) -> List[str]:
    require_file(path, "nuswide", "NUS-WIDE concept list")
    concepts = [ln.strip() for ln in read_text_lines(path)]
    if len(concepts) != NUM_CLASSES:
        raise PreprocError(f"{path}: expected {NUM_CLASSES} concept names, found {len(concepts)}")
    check_unique(concepts, path, "concept")
    return concepts


def to_relative_path(entry: str) -> str:
    """``actor\\0001_2124494179.jpg`` -> ``actor/0001_2124494179.jpg`` (and drop a
    ``C:\\ImageData\\Flickr\\``-style prefix up to the ``Flickr`` folder, if any)."""
    parts = [p for p in entry.strip().replace("\\", "/").split("/") if p]
    lowered = [p.lower() for p in parts]
    if "flickr" in lowered:
        parts = parts[len(lowered) - 1 - lowered[::-1].index("flickr") + 1:]
    return "/".join(parts)


def read_image_list(path: Path) -> List[str]:
    require_file(path, "nuswide", "NUS-WIDE image list")
    images = [to_relative_path(ln) for ln in read_text_lines(path)]
    if not images:
        raise PreprocError(f"{path}: expected one image per line, found none")
    return images


def read_label_column(path: Path, expected_len: int) -> np.ndarray:
    require_file(path, "nuswide", "NUS-WIDE ground-truth file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file is reported below instead
            values = np.loadtxt(path, dtype=np.float64, ndmin=1, comments=None)
    except ValueError as exc:
        raise PreprocError(f"{path}: expected one 0/1 value per line; could not parse: {exc}") from exc
    if values.ndim != 1:
        raise PreprocError(
            f"{path}: expected one 0/1 value per line, found {values.shape[1]} values per line"
        )
    if values.shape[0] != expected_len:
        raise PreprocError(
            f"{path}: expected {expected_len} lines (one per image of the image list), "
            f"found {values.shape[0]}"
        )
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        raise PreprocError(
            f"{path}, line {bad[0] + 1}: expected 0 or 1, found {values[bad[0]]:g}"
        )
    return values


def format_nuswide(
    load_path: os.PathLike | str = "./data/nuswide",
    save_path: Optional[os.PathLike | str] = "./data/nuswide",
) -> Dict[str, np.ndarray]:
    """Format official NUS-WIDE Train/Test. Returns ``{'train_images', 'train_labels',
    'val_images', 'val_labels'}``; also writes them to ``save_path`` unless it is None."""
    concepts = read_concepts(concepts_file(load_path))
    arrays: Dict[str, np.ndarray] = {}
    for split, phase in SPLITS:
        list_path = image_list_file(load_path, split)
        images = read_image_list(list_path)
        num_unique = len(set(images))
        if num_unique != len(images):
            print(
                f"warning: {list_path} lists {len(images) - num_unique} image paths more than "
                f"once; rows are kept as listed",
                file=sys.stderr,
            )
        labels = np.zeros((len(images), NUM_CLASSES), dtype=np.float64)
        for k, concept in enumerate(concepts):
            labels[:, k] = read_label_column(label_file(load_path, concept, split), len(images))
        keep = labels.sum(axis=1) > 0
        dropped = int((~keep).sum())
        print(
            f"NUS-WIDE {split}: {len(images)} images listed, {int(keep.sum())} kept, "
            f"{dropped} dropped (none of the {NUM_CLASSES} labels)"
        )
        arrays[f"{phase}_images"] = np.array(images)[keep]
        arrays[f"{phase}_labels"] = labels[keep]
    if save_path is not None:
        save_formatted(save_path, arrays, dict(class_names=concepts, image_folder=IMAGE_FOLDER,
                                               single_positive=False, source="preproc/format_nuswide.py"))
    return arrays


def main(argv: Optional[List[str]] = None) -> int:
    return format_main("nuswide", format_nuswide,
                       "Format the official NUS-WIDE release (81 concepts) for SPML training.",
                       "folder holding Concepts81.txt, ImageList/, Groundtruth/", argv)


if __name__ == "__main__":
    sys.exit(main())
