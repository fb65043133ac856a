"""Format MS-COCO 2014 into ``formatted_{train,val}_{images,labels}.npy``.

Reads ``<load>/annotations/instances_{train,val}2014.json``. As in the reference:

* class order = the JSON ``categories`` list order (ascending category id 1..90 with gaps,
  80 classes); train and val must have the same category list;
* images = those that appear in ``annotations`` (crowd annotations included; an image with
  no annotation at all is not used);
* rows = image ids turned into decimal strings, unique, sorted as *strings*
  ("100000" sorts before "9");
* labels float64 (N, 80): every annotation sets its image's class to 1;
* image paths ``<split>2014/COCO_<split>2014_<12-digit zero-padded id>.jpg``, relative
  to ``data/coco``;
* ``dataset.json``: the category names in column order (``preproc.common.read_dataset_json``).

Usage (from the repo root)::

    python preproc/format_coco.py [--load-path ./data/coco] [--save-path ./data/coco]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import PreprocError, format_main, require_file, save_formatted  # noqa: E402

NUM_CLASSES = 80
# (split name used in file names, output phase)
SPLITS = (("train", "train"), ("val", "val"))
IMAGE_FOLDER = ""  # the image paths are relative to the dataset folder itself


def annotation_file(load_path: os.PathLike | str, split: str) -> Path:
    return Path(load_path) / "annotations" / f"instances_{split}2014.json"


def load_json(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreprocError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PreprocError(f"{path}: expected a JSON object, found {type(data).__name__}")
    for key in ("categories", "annotations"):
        if not isinstance(data.get(key), list):
            raise PreprocError(f"{path}: expected a list under '{key}', found none")
    return data


def category_list(data: dict, path: Path) -> List[Tuple[int, str]]:
    cats: List[Tuple[int, str]] = []
    for pos, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise PreprocError(f"{path}: category #{pos} has no 'id'")
        if isinstance(cat["id"], bool) or not isinstance(cat["id"], (int, str)) or not str(cat["id"]).isdigit():
            raise PreprocError(f"{path}: category #{pos} has id {cat['id']!r}; expected a non-negative integer "
                               f"(fix the file, or use the official instances_*2014.json)")
        cats.append((int(cat["id"]), str(cat.get("name", ""))))
    ids = [c[0] for c in cats]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PreprocError(f"{path}: category id {dup} appears more than once in 'categories'")
    if len(cats) != NUM_CLASSES:
        # The original formats whatever category list it finds; training then rejects a class count
        # other than 80, so this is only a warning here.
        print(f"warning: {path}: expected {NUM_CLASSES} categories (the COCO 2014 'instances' file), "
              f"found {len(cats)}; the label matrix gets {len(cats)} columns", file=sys.stderr)
    return cats


def format_split(data: dict, path: Path, split: str, cat_index: Dict[int, int]):
    """Images (path strings) and float64 labels for one split, rows sorted as id strings."""
    pairs = []
    num_crowd = 0
    for pos, ann in enumerate(data["annotations"]):
        try:
            image_id = ann["image_id"]
            category_id = int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PreprocError(
                f"{path}: annotation #{pos} lacks a usable 'image_id'/'category_id' ({exc!r})"
            ) from exc
        if category_id not in cat_index:
            raise PreprocError(
                f"{path}: annotation #{pos} (id {ann.get('id')}) has category_id {category_id}, "
                f"which is not in the file's 'categories' list"
            )
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
            raise PreprocError(
                f"{path}: annotation #{pos} has image_id {image_id!r}; expected a non-negative integer"
            )
        if ann.get("iscrowd", 0):
            num_crowd += 1
        pairs.append((str(image_id), cat_index[category_id]))

    # Ids as decimal strings, unique, sorted lexicographically (as the reference does).
    ids = sorted({image_id for image_id, _ in pairs})
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(cat_index)), dtype=np.float64)
    for image_id, k in pairs:
        labels[row_of[image_id], k] = 1.0
    images = np.array(
        [f"{split}2014/COCO_{split}2014_{int(image_id):012d}.jpg" for image_id in ids]
    )
    print(
        f"COCO {split}2014: {len(ids)} images with annotations "
        f"({len(pairs)} annotations, {num_crowd} crowd)"
    )
    return images, labels


def format_coco(
    load_path: os.PathLike | str = "./data/coco",
    save_path: Optional[os.PathLike | str] = "./data/coco",
) -> Dict[str, np.ndarray]:
    """Format COCO 2014 train/val. Returns ``{'train_images', 'train_labels', 'val_images',
    'val_labels'}``; also writes them to ``save_path`` unless it is None."""
    paths = {split: annotation_file(load_path, split) for split, _ in SPLITS}
    for path in paths.values():
        require_file(path, "coco", "COCO annotation file")
    data = {split: load_json(path) for split, path in paths.items()}
    cats = {split: category_list(data[split], paths[split]) for split in data}

    if cats["train"] != cats["val"]:
        first = next(
            (i for i, (a, b) in enumerate(zip(cats["train"], cats["val"])) if a != b),
            min(len(cats["train"]), len(cats["val"])),
        )
        a = cats["train"][first] if first < len(cats["train"]) else None
        b = cats["val"][first] if first < len(cats["val"]) else None
        raise PreprocError(
            f"expected {paths['train'].name} and {paths['val'].name} to have the same "
            f"category list (same ids, names and order); they differ at position {first}: "
            f"train has (id, name) {a}, val has {b}"
        )
    cat_index = {cat_id: k for k, (cat_id, _) in enumerate(cats["train"])}

    arrays: Dict[str, np.ndarray] = {}
    for split, phase in SPLITS:
        images, labels = format_split(data[split], paths[split], split, cat_index)
        arrays[f"{phase}_images"] = images
        arrays[f"{phase}_labels"] = labels
    if save_path is not None:
        names = [name for _, name in cats["train"]]
        save_formatted(save_path, arrays, dict(class_names=names, image_folder=IMAGE_FOLDER,
                                               single_positive=False, source="preproc/format_coco.py"))
    return arrays


def main(argv: Optional[List[str]] = None) -> int:
    return format_main("coco", format_coco, "Format MS-COCO 2014 for SPML training.",
                       "folder holding annotations/instances_*2014.json", argv)


if __name__ == "__main__":
    sys.exit(main())
