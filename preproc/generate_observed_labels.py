"""Sample the single-positive ("observed") training labels, bit-identical to the reference.

For each phase (train, then val) this loads ``<root>/<dataset>/formatted_<phase>_labels.npy``
(values exactly 0/1), and with a FRESH ``np.random.RandomState(seed)`` per phase walks the
rows in order. For each row it

1. takes the positive column indices (ascending, as ``np.nonzero`` returns them), shuffles
   them in place with ``rng.shuffle`` and marks the first ``num_pos`` as +1
   (``num_pos == -1`` keeps all);
2. takes the negative column indices (ascending), shuffles them in place with
   ``rng.shuffle`` -- always, even when ``num_neg == 0``, because the call is part of the
   reference's random stream -- and marks the first ``num_neg`` as -1
   (``num_neg == -1`` keeps all).

The result (same shape and dtype as the labels; +1 observed positive, -1 observed negative,
0 unobserved) is saved as ``formatted_<phase>_labels_obs.npy``. Rows without any positive
stay all-zero (a warning gives their count).

Usage (from the repo root)::

    python preproc/generate_observed_labels.py --dataset pascal [--num-pos 1] [--num-neg 0]
        [--seed 1200] [--data-root ./data]

``--dataset`` is a benchmark (pascal, coco, nuswide, cub, demo) or any folder under ``--data-root`` with a
``dataset.json`` (``preproc/format_folder.py`` writes one): the label matrices must then have its
``num_classes`` columns, and a dataset whose train labels are single positives already
(``"single_positive": true``) is refused, as there are no full labels to draw from.

This module is imported by the demo generator as ``preproc.generate_observed_labels``; it
depends on the standard library, numpy and ``preproc.common`` only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import (  # noqa: E402
    DATASET_JSON,
    FORMAT_COMMANDS,
    PreprocError,
    check_output_folder,
    format_hint,
    read_dataset_json,
    run_main,
    save_arrays,
)

DATASETS = tuple(FORMAT_COMMANDS)
PHASES = ("train", "val")
DEFAULT_SEED = 1200


class ObservedLabelsError(PreprocError):
    """An expected, user-fixable problem (missing or invalid formatted label file)."""


def _check_args(num_pos: int, num_neg: int, seed: int) -> None:
    for name, value in (("num_pos", num_pos), ("num_neg", num_neg), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    for name, value in (("num_pos", num_pos), ("num_neg", num_neg)):
        if value < -1:
            raise ValueError(f"{name} must be an integer >= 0, or -1 for 'all'; got {value!r}")
    if num_pos == 0:  # the methods learn from the observed positives: none leaves nothing to learn
        raise ValueError("num_pos 0 observes no positive label at all, and every method learns from the observed "
                         "positives; use --num-pos 1 (single positive, the default) or more")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be between 0 and 2**32 - 1 (numpy's RandomState); got {seed}")


def validate_labels(labels: np.ndarray, name: str = "labels") -> None:
    """Raise ValueError unless ``labels`` is a 2-D float / signed-int matrix holding exactly
    the values 0 and 1, both present (the reference asserts min == 0 and max == 1)."""
    if labels.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (images x classes) matrix, found shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.floating) or np.issubdtype(labels.dtype, np.signedinteger)):
        raise ValueError(
            f"{name}: expected a float or signed integer dtype (0/1 values, -1 is written for "
            f"negatives), found {labels.dtype}"
        )
    is01 = (labels == 0) | (labels == 1)
    if not is01.all():
        bad = labels[~is01]
        examples = ", ".join(repr(v.item()) for v in np.unique(bad)[:5])
        raise ValueError(
            f"{name}: expected values exactly 0 or 1, found {bad.size} other entries ({examples})"
        )
    if labels.size == 0 or not (labels == 0).any() or not (labels == 1).any():
        raise ValueError(
            f"{name}: expected both 0 and 1 to occur (min 0, max 1), found "
            f"{'an empty matrix' if labels.size == 0 else 'only ' + repr(labels.flat[0].item())}"
        )


def generate_observed(
    labels: np.ndarray, num_pos: int = 1, num_neg: int = 0, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """Observed labels for ONE phase, using its own ``np.random.RandomState(seed)``.

    ``labels`` is an (N, C) 0/1 matrix. Returns an array of the same shape and dtype with
    +1 at the kept positives, -1 at the kept negatives and 0 elsewhere. Rows without any
    positive stay all-zero (a UserWarning reports how many). The input is not modified.
    """
    labels = np.asarray(labels)
    _check_args(num_pos, num_neg, seed)
    validate_labels(labels)
    num_empty = _count_empty_rows(labels)
    if num_empty:
        warnings.warn(
            f"{num_empty} of {labels.shape[0]} rows have no positive label; "
            f"their observed rows stay all-zero",
            UserWarning,
            stacklevel=2,
        )
    return _sample(labels, num_pos, num_neg, seed)


def _count_empty_rows(labels: np.ndarray) -> int:
    return int((~(labels == 1).any(axis=1)).sum())


def _sample(labels: np.ndarray, num_pos: int, num_neg: int, seed: int) -> np.ndarray:
    """The sampling itself, on labels and counts that were already validated."""
    signed = labels.copy()
    signed[signed == 0] = -1  # recode to -1/+1 as the reference does

    rng = np.random.RandomState(seed)
    obs = np.zeros_like(signed)
    for i in range(signed.shape[0]):
        row = signed[i]
        pos_idx = np.nonzero(row == 1)[0]
        rng.shuffle(pos_idx)
        keep_pos = pos_idx if num_pos == -1 else pos_idx[:num_pos]
        obs[i, keep_pos] = 1

        neg_idx = np.nonzero(row == -1)[0]
        rng.shuffle(neg_idx)  # always called: it consumes draws even when num_neg == 0
        keep_neg = neg_idx if num_neg == -1 else neg_idx[:num_neg]
        obs[i, keep_neg] = -1
    return obs


def _save_path_hint(folder: Path, dataset: str) -> str:
    """`` --save-path <folder>`` when ``folder`` is not the format script's default."""
    if dataset == "demo":
        return ""
    try:
        if folder.resolve() == (Path("./data") / dataset).resolve():
            return ""
    except OSError:
        pass
    return f" --save-path {shlex.quote(str(folder))}"


def _load_labels(path: Path, dataset: str) -> np.ndarray:
    if not path.is_file():
        if dataset not in FORMAT_COMMANDS:
            raise ObservedLabelsError(
                f"missing formatted label file: expected {path}; create it with: {format_hint(path.parent)}"
            )
        raise ObservedLabelsError(
            f"missing formatted label file: expected {path}\n"
            f"  create it first with: {FORMAT_COMMANDS[dataset]}{_save_path_hint(path.parent, dataset)}\n"
            f"  (see data/{dataset}/README.md)"
        )
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ObservedLabelsError(f"{path}: cannot be read as a .npy array ({exc})") from exc
    try:
        validate_labels(labels, name=str(path))
    except ValueError as exc:
        raise ObservedLabelsError(str(exc)) from exc
    return labels


def _dataset_json(folder: Path, dataset: str) -> Optional[dict]:
    """``folder``'s dataset.json (checked), None for a benchmark formatted without one; a dataset that is not a
    benchmark needs one, and one whose train labels are single positives already is refused."""
    if not (folder / DATASET_JSON).is_file():
        if dataset in DATASETS:
            return None
        raise ObservedLabelsError(
            f"unknown dataset {dataset!r}: {folder / DATASET_JSON} does not exist; a benchmark is one of "
            f"{', '.join(DATASETS)}, your own data is formatted with: {format_hint(folder)} (or pass the "
            f"--data-root that holds {dataset}/)"
        )
    info = read_dataset_json(folder)
    if info["single_positive"]:
        root = "" if folder.parent.resolve() == Path("data").resolve() else \
            f" --data-root {shlex.quote(str(folder.parent))}"
        raise ObservedLabelsError(
            f"{folder}: its train labels are single positives already ({folder / DATASET_JSON}: single_positive "
            f"true), so there are no full labels to draw from and its observed labels are already written; "
            f"train on it directly: python main.py -d {shlex.quote(dataset)}{root}"
        )
    return info


def generate_for_dataset(
    dataset: str,
    num_pos: int = 1,
    num_neg: int = 0,
    seed: int = DEFAULT_SEED,
    data_root: os.PathLike | str = "./data",
) -> dict:
    """Write ``formatted_{train,val}_labels_obs.npy`` for ``dataset`` under ``data_root``.
    Returns ``{phase: observed array}``. Both label files and the folder are checked (once) before
    anything is sampled, and the two files are written together or not at all."""
    try:
        _check_args(num_pos, num_neg, seed)
    except ValueError as exc:
        raise ObservedLabelsError(str(exc)) from exc
    folder = Path(data_root) / dataset
    info = _dataset_json(folder, dataset)
    labels = {
        phase: _load_labels(folder / f"formatted_{phase}_labels.npy", dataset) for phase in PHASES
    }
    for phase in PHASES:
        if info is not None and labels[phase].shape[1] != info["num_classes"]:
            raise ObservedLabelsError(
                f"{folder / f'formatted_{phase}_labels.npy'}: {labels[phase].shape[1]} label columns but "
                f"{folder / DATASET_JSON} says num_classes {info['num_classes']}; re-create the files with: "
                f"{format_hint(folder)} (or correct num_classes and class_names in {DATASET_JSON})"
            )
    check_output_folder(folder, "--data-root")
    result = {phase: _sample(labels[phase], num_pos, num_neg, seed) for phase in PHASES}
    for phase in PHASES:
        num_empty = _count_empty_rows(labels[phase])
        if num_empty:
            print(
                f"warning: {num_empty} of {labels[phase].shape[0]} rows of formatted_{phase}_labels.npy "
                f"have no positive label; their observed rows stay all-zero",
                file=sys.stderr,
            )
    written = save_arrays(folder, {f"formatted_{phase}_labels_obs.npy": result[phase] for phase in PHASES})
    for out, obs in zip(written, result.values()):
        print(
            f"wrote {out}  shape={obs.shape} dtype={obs.dtype} "
            f"(+1: {int((obs == 1).sum())}, -1: {int((obs == -1).sum())})"
        )
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sample observed (single-positive) labels from formatted_*_labels.npy."
    )
    parser.add_argument("--dataset", default="pascal",
                        help=f"dataset folder under --data-root: {', '.join(DATASETS)}, or any folder with a "
                             f"{DATASET_JSON} (default: pascal)")
    parser.add_argument("--num-pos", type=int, default=1,
                        help="positives kept per image; -1 keeps all (default: 1)")
    parser.add_argument("--num-neg", type=int, default=0,
                        help="negatives kept per image; -1 keeps all (default: 0)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="RandomState seed, reused for each phase (default: 1200)")
    parser.add_argument("--data-root", default="./data",
                        help="folder holding <dataset>/formatted_*_labels.npy (default: ./data)")
    args = parser.parse_args(argv)
    return run_main(lambda: generate_for_dataset(args.dataset, args.num_pos, args.num_neg, args.seed,
                                                 args.data_root))


if __name__ == "__main__":
    sys.exit(main())
