"""Format PASCAL VOC 2012 into ``formatted_{train,val}_{images,labels}.npy``.

Reads ``<load>/VOCdevkit/VOC2012/ImageSets/Main/<class>_{train,val}.txt`` for the 20 VOC
classes. Each line is ``<image id> <label>`` with label 1 (present), 0 (difficult only) or
-1 (absent). As in the reference, only label 1 is positive: "difficult" counts as
negative, and images with no positive class are dropped. Rows are the file names
``<id>.jpg`` sorted as strings; labels are float64 of shape (N, 20). Image paths are
relative to ``data/pascal/VOCdevkit/VOC2012/JPEGImages``. ``dataset.json`` records the 20 class
names in column order (``preproc.common.read_dataset_json``).

Usage (from the repo root)::

    python preproc/format_pascal.py [--load-path ./data/pascal] [--save-path ./data/pascal]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import PreprocError, format_main, read_fields, require_file, save_formatted  # noqa: E402

CATEGORIES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
PHASES = ("train", "val")
IMAGE_FOLDER = "VOCdevkit/VOC2012/JPEGImages"  # relative to the dataset folder


def class_file(load_path: os.PathLike | str, cls: str, phase: str) -> Path:
    return Path(load_path) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / f"{cls}_{phase}.txt"


def read_class_file(path: Path) -> Dict[str, int]:
    """``{image_id: label}`` from one ``<class>_<phase>.txt`` (whitespace separated)."""
    out: Dict[str, int] = {}
    for lineno, (image_id, label_text) in read_fields(path, "<image id> <label>", 2):
        try:
            label = int(label_text)
        except ValueError:
            label = None
        if label not in (-1, 0, 1):
            raise PreprocError(
                f"{path}, line {lineno}: expected a label in {{-1, 0, 1}}, found {label_text!r}"
            )
        if image_id in out:
            raise PreprocError(f"{path}, line {lineno}: image id {image_id!r} is listed twice")
        out[image_id] = label
    if not out:
        raise PreprocError(f"{path}: expected one '<image id> <label>' line per image, found none")
    return out


def format_phase(load_path: os.PathLike | str, phase: str):
    """Images (sorted ``<id>.jpg`` strings) and float64 labels (N, 20) for one phase."""
    per_class: List[Dict[str, int]] = []
    paths = [class_file(load_path, cls, phase) for cls in CATEGORIES]
    for path in paths:
        require_file(path, "pascal", f"VOC2012 {phase} class list")
    for path in paths:
        per_class.append(read_class_file(path))

    # Every class file of a phase lists the same images in the official release. The original simply
    # takes the union of the positives, so a mismatch is reported but not fatal.
    reference_ids = set(per_class[0])
    for path, table in zip(paths, per_class):
        ids = set(table)
        if ids != reference_ids:
            print(f"warning: VOC2012 {phase}: {paths[0].name} lists {len(reference_ids)} images and "
                  f"{path.name} lists {len(ids)} ({len(ids - reference_ids)} extra, "
                  f"{len(reference_ids - ids)} missing)", file=sys.stderr)
            reference_ids |= ids

    positives: Dict[str, List[int]] = {}
    for k, table in enumerate(per_class):
        for image_id, label in table.items():
            if label == 1:  # only label 1 is positive; 0 (difficult) is a negative
                positives.setdefault(image_id, []).append(k)

    # File names sorted as strings; images without any positive are dropped.
    names = sorted(image_id + ".jpg" for image_id in positives)
    labels = np.zeros((len(names), len(CATEGORIES)), dtype=np.float64)
    for row, name in enumerate(names):
        labels[row, positives[name[: -len(".jpg")]]] = 1.0
    dropped = len(reference_ids) - len(names)
    print(
        f"VOC2012 {phase}: {len(reference_ids)} images listed, {len(names)} kept, "
        f"{dropped} dropped (no class with label 1)"
    )
    return np.array(names), labels


def format_pascal(
    load_path: os.PathLike | str = "./data/pascal",
    save_path: Optional[os.PathLike | str] = "./data/pascal",
) -> Dict[str, np.ndarray]:
    """Format VOC2012 train/val. Returns ``{'train_images', 'train_labels', 'val_images',
    'val_labels'}``; also writes them to ``save_path`` unless it is None."""
    arrays: Dict[str, np.ndarray] = {}
    for phase in PHASES:
        images, labels = format_phase(load_path, phase)
        arrays[f"{phase}_images"] = images
        arrays[f"{phase}_labels"] = labels
    if save_path is not None:
        save_formatted(save_path, arrays, dict(class_names=CATEGORIES, image_folder=IMAGE_FOLDER,
                                               single_positive=False, source="preproc/format_pascal.py"))
    return arrays


def main(argv: Optional[List[str]] = None) -> int:
    return format_main("pascal", format_pascal, "Format PASCAL VOC 2012 for SPML training.",
                       "folder holding VOCdevkit/VOC2012", argv)


if __name__ == "__main__":
    sys.exit(main())
