"""Format CUB-200-2011 (312 binary attributes) into ``formatted_{train,val}_{images,labels}.npy``.

Reads (layout of the extracted ``CUB_200_2011.tgz``):

* ``<load>/CUB_200_2011/images.txt``: ``<image id> <relative file name>`` (11,788 lines);
* ``<load>/CUB_200_2011/train_test_split.txt``: ``<image id> <is_train>``;
* ``<load>/attributes.txt``: ``<attribute id> <name>``, the 312 attribute names (top level,
  next to CUB_200_2011/; the reference only checked its line count, the names go into
  ``dataset.json`` in column order);
* ``<load>/CUB_200_2011/attributes/image_attribute_labels.txt``:
  ``<image id> <attribute id> <is_present> <certainty id> <time>``.

As in the reference, labels are the raw ``is_present`` values (no certainty filtering),
int64 of shape (N, 312), attribute id 1..312 -> column 0..311; rows follow images.txt
order; ``is_train == 1`` goes to the train files and everything else to the "val" files
(the official test split). Image paths are the file names from images.txt, relative to
``data/cub/CUB_200_2011/images``.

Robustness beyond the reference (same output on well-formed data): lines are split on
whitespace and fields are taken by position, so lines with extra fields still parse; each
``(image, attribute)`` row is placed by its ids and every pair must occur exactly once
(the reference assumed 312 consecutive rows per image in images.txt order).

Usage (from the repo root)::

    python preproc/format_cub.py [--load-path ./data/cub] [--save-path ./data/cub]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import (  # noqa: E402
    PreprocError,
    format_main,
    parse_int,
    read_fields,
    read_text_lines,
    require_file,
    save_formatted,
)

NUM_IMAGES = 11788
NUM_ATTRIBUTES = 312
IMAGE_FOLDER = "CUB_200_2011/images"  # relative to the dataset folder


def raw_files(load_path: os.PathLike | str) -> Dict[str, Path]:
    root = Path(load_path)
    return {
        "images": root / "CUB_200_2011" / "images.txt",
        "split": root / "CUB_200_2011" / "train_test_split.txt",
        "attributes": root / "attributes.txt",
        "labels": root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt",
    }


def read_images(path: Path) -> tuple:
    ids: List[int] = []
    names: List[str] = []
    for lineno, (image_id, name) in read_fields(path, "<image id> <file name>", 2, maxsplit=1):
        ids.append(parse_int(image_id, path, lineno, "image id"))
        names.append(name)
    if len(ids) != NUM_IMAGES:
        raise PreprocError(
            f"{path}: expected {NUM_IMAGES} images (CUB-200-2011), found {len(ids)} lines"
        )
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise PreprocError(f"{path}: image id {dup} is listed more than once")
    return ids, names


def read_split(path: Path, image_ids: List[int]) -> np.ndarray:
    """Boolean ``is_train`` per image, aligned with images.txt order."""
    split: Dict[int, int] = {}
    for lineno, fields in read_fields(path, "<image id> <is_train>", 2, extra_ok=True):
        image_id = parse_int(fields[0], path, lineno, "image id")
        flag = parse_int(fields[1], path, lineno, "is_train flag")
        if flag not in (0, 1):
            raise PreprocError(f"{path}, line {lineno}: expected is_train 0 or 1, found {flag}")
        if image_id in split:
            raise PreprocError(f"{path}, line {lineno}: image id {image_id} is listed twice")
        split[image_id] = flag
    if len(split) != len(image_ids):
        raise PreprocError(
            f"{path}: expected one line per image of images.txt ({len(image_ids)}), found {len(split)}"
        )
    missing = [i for i in image_ids if i not in split]
    if missing:
        raise PreprocError(
            f"{path}: expected the same image ids as images.txt; {len(missing)} are missing "
            f"(e.g. {missing[0]})"
        )
    return np.array([split[i] == 1 for i in image_ids], dtype=bool)


def read_attribute_names(path: Path) -> List[str]:
    """The 312 attribute names, name k - 1 for attribute id k (every id 1..312 exactly once)."""
    n = len(read_text_lines(path))
    if n != NUM_ATTRIBUTES:
        raise PreprocError(
            f"{path}: expected {NUM_ATTRIBUTES} attribute lines, found {n}"
        )
    names: Dict[int, str] = {}
    for lineno, (attr_id, name) in read_fields(path, "<attribute id> <name>", 2, maxsplit=1):
        k = parse_int(attr_id, path, lineno, "attribute id")
        if not 1 <= k <= NUM_ATTRIBUTES or k in names:
            raise PreprocError(f"{path}, line {lineno}: expected each attribute id 1..{NUM_ATTRIBUTES} once, "
                               f"found {k}" + (" again" if k in names else ""))
        names[k] = name.strip()
    return [names[k] for k in range(1, NUM_ATTRIBUTES + 1)]


def read_attribute_labels(path: Path, image_ids: List[int]) -> np.ndarray:
    """int64 (len(image_ids), 312) is_present matrix, rows in ``image_ids`` order."""
    try:
        # Whitespace-separated; only the first three fields are used, so lines with
        # extra fields (known in some copies) still parse.
        table = np.loadtxt(path, usecols=(0, 1, 2), dtype=np.int64, ndmin=2, comments=None)
    except ValueError as exc:
        raise PreprocError(
            f"{path}: expected lines '<image id> <attribute id> <is_present> ...' with integer "
            f"first three fields; could not parse: {exc}"
        ) from exc
    expected_rows = len(image_ids) * NUM_ATTRIBUTES
    if table.shape[0] != expected_rows:
        raise PreprocError(
            f"{path}: expected {expected_rows} rows ({len(image_ids)} images x {NUM_ATTRIBUTES} "
            f"attributes), found {table.shape[0]}"
        )
    img, att, present = table[:, 0], table[:, 1], table[:, 2]

    bad = np.flatnonzero((present != 0) & (present != 1))
    if bad.size:
        r = bad[0]
        raise PreprocError(
            f"{path}: expected is_present 0 or 1, found {present[r]} "
            f"(image {img[r]}, attribute {att[r]}; {bad.size} such rows)"
        )
    bad = np.flatnonzero((att < 1) | (att > NUM_ATTRIBUTES))
    if bad.size:
        r = bad[0]
        raise PreprocError(
            f"{path}: expected attribute ids 1..{NUM_ATTRIBUTES}, found {att[r]} (image {img[r]})"
        )

    ids = np.asarray(image_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], img)
    pos = np.minimum(pos, len(ids) - 1)
    known = ids[order][pos] == img
    if not known.all():
        r = np.flatnonzero(~known)[0]
        raise PreprocError(
            f"{path}: image id {img[r]} (attribute {att[r]}) is not in images.txt"
        )
    rows = order[pos]
    flat = rows * NUM_ATTRIBUTES + (att - 1)
    counts = np.bincount(flat, minlength=expected_rows)
    if not (counts == 1).all():
        dup = np.flatnonzero(counts > 1)
        miss = np.flatnonzero(counts == 0)
        parts = []
        if dup.size:
            parts.append(
                f"{dup.size} (image, attribute) pairs occur more than once, e.g. image "
                f"{ids[dup[0] // NUM_ATTRIBUTES]} attribute {dup[0] % NUM_ATTRIBUTES + 1}"
            )
        if miss.size:
            parts.append(
                f"{miss.size} pairs are missing, e.g. image {ids[miss[0] // NUM_ATTRIBUTES]} "
                f"attribute {miss[0] % NUM_ATTRIBUTES + 1}"
            )
        raise PreprocError(
            f"{path}: expected every (image, attribute) pair exactly once; " + "; ".join(parts)
        )
    labels = np.zeros(expected_rows, dtype=np.int64)
    labels[flat] = present
    return labels.reshape(len(image_ids), NUM_ATTRIBUTES)


def format_cub(
    load_path: os.PathLike | str = "./data/cub",
    save_path: Optional[os.PathLike | str] = "./data/cub",
) -> Dict[str, np.ndarray]:
    """Format CUB-200-2011 train/test. Returns ``{'train_images', 'train_labels',
    'val_images', 'val_labels'}`` ("val" = the official test split); also writes them to
    ``save_path`` unless it is None."""
    files = raw_files(load_path)
    for path in files.values():
        require_file(path, "cub", f"CUB-200-2011 {path.name}")
    image_ids, names = read_images(files["images"])
    is_train = read_split(files["split"], image_ids)
    attribute_names = read_attribute_names(files["attributes"])
    labels = read_attribute_labels(files["labels"], image_ids)

    # One array per split, built from that split's names: its string width (dtype) is the split's own,
    # as in the original.
    arrays = {
        "train_images": np.array([n for n, t in zip(names, is_train) if t]),
        "train_labels": labels[is_train],
        "val_images": np.array([n for n, t in zip(names, is_train) if not t]),
        "val_labels": labels[~is_train],
    }
    print(
        f"CUB-200-2011: {len(names)} images, {int(is_train.sum())} train, "
        f"{int((~is_train).sum())} test (saved as val)"
    )
    if save_path is not None:
        save_formatted(save_path, arrays, dict(class_names=attribute_names, image_folder=IMAGE_FOLDER,
                                               single_positive=False, source="preproc/format_cub.py"))
    return arrays


def main(argv: Optional[List[str]] = None) -> int:
    return format_main("cub", format_cub, "Format CUB-200-2011 attributes for SPML training.",
                       "folder holding CUB_200_2011/ and attributes.txt", argv)


if __name__ == "__main__":
    sys.exit(main())
