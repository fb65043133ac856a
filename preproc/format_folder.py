"""Format your own data (a CSV of images and class names) into a dataset folder that ``main.py -d NAME`` trains on.

    python preproc/format_folder.py --csv labels.csv --images DIR --save-path data/NAME
        [--test-frac 0.2] [--seed 0] [--classes FILE] [--full-labels] [--force]
    python preproc/format_folder.py --csv labels.csv --features FEATURES.npy --save-path data/NAME [...]

The CSV starts with a header naming its columns: ``image`` (the image's path relative to --images; with
--features a unique row id), ``labels`` (one or more class names separated by ``;``) and optionally ``split``
(``train`` or ``test``). Without a split column, round(--test-frac x N) rows are drawn as the test split with
``np.random.RandomState(--seed)``, from the rows sorted by image (so the draw does not depend on the CSV's row
order). Classes are the names of --classes (one per line, in that order) or else the sorted names seen in the
train rows; a class seen only in test rows is an error.

Train labels with several classes in some row are full labels: then run
``python preproc/generate_observed_labels.py --dataset NAME`` to draw the single positives, as for the
benchmarks. A training set where every row has exactly one label is taken as single positives already
(``"single_positive": true`` in dataset.json; --full-labels says they are complete labels instead): its
``formatted_train_labels_obs.npy`` holds those labels and ``formatted_val_labels_obs.npy`` one positive per
test row drawn as generate_observed_labels draws it (seed 1200).

Writes into --save-path, all or nothing, ``dataset.json`` last: ``formatted_{train,val}_images.npy`` (the image
paths relative to --images, or the row ids with --features, sorted as strings; "val" is the test split, as for
the benchmarks), ``formatted_{train,val}_labels.npy`` (float64 0/1, one column per class),
``formatted_{train,val}_features.npy`` (float32, with --features), the observed labels above for single
positives, and ``dataset.json`` (``preproc.common.read_dataset_json``). Images are never copied:
``image_folder`` is --images relative to --save-path when inside it, else absolute. A folder that holds another
dataset's formatted files is refused unless --force; an earlier output of this script is replaced (its
``defaults`` kept, its files that the new format does not write removed).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the ``preproc`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import (  # noqa: E402
    DATASET_JSON,
    FORMAT_COMMANDS,
    PHASES,
    PreprocError,
    check_output_folder,
    check_unique,
    read_dataset_json,
    read_text_lines,
    run_main,
    write_dataset_json,
)
from preproc.generate_observed_labels import DEFAULT_SEED, generate_observed  # noqa: E402

SOURCE = "preproc/format_folder.py"  # dataset.json's "source": marks a folder as this script's output
COLUMNS = ("image", "labels", "split")
SPLITS = ("train", "test")
DEFAULT_TEST_FRAC = 0.2
# Every file this script may write: an earlier output's files that a new format does not write are removed.
OUTPUTS = (DATASET_JSON, *(f"formatted_{phase}_{kind}.npy" for phase in PHASES
                           for kind in ("images", "labels", "labels_obs", "features")))


@dataclass(frozen=True)
class Row:
    """One data row of the CSV."""
    line: int  # its line number in the CSV (the last line of a record that spans lines)
    image: str  # the image path as written (a row id with --features)
    labels: Tuple[str, ...]
    split: Optional[str]  # "train" or "test"; None without a split column


# --- reading the CSV -----------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PreprocError(f"--csv {path}: no such file") from None
    except OSError as exc:
        raise PreprocError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # decodes every byte, as read_text_lines does


def _parse_header(fields: List[str], path: Path, line: int) -> Dict[str, int]:
    """``{column: position}``; the header must name image and labels (and may name split), nothing else."""
    names = [field.strip().lower() for field in fields]
    for name in names:
        if name not in COLUMNS:
            raise PreprocError(f"{path}, line {line}: unknown column {name!r}; the first line must be the header "
                               f"'image,labels' or 'image,labels,split' (rename or remove that column)")
    check_unique(names, f"{path}, line {line}", "column")
    for name in ("image", "labels"):
        if name not in names:
            raise PreprocError(f"{path}, line {line}: missing column {name!r}; the header must name the columns "
                               f"image, labels and optionally split")
    return {name: pos for pos, name in enumerate(names)}


def _parse_row(fields: List[str], header: Dict[str, int], path: Path, line: int) -> Row:
    where = f"{path}, line {line}"
    if len(fields) != len(header):
        raise PreprocError(f"{where}: {len(fields)} fields but the header has {len(header)} "
                           f"({','.join(sorted(header, key=header.get))}); quote a field that holds a comma")
    image = fields[header["image"]].strip()
    if not image:
        raise PreprocError(f"{where}: empty 'image' field; give the image's path (or the row id with --features)")
    text = fields[header["labels"]].strip()
    if not text:
        raise PreprocError(f"{where}: no label for {image!r}; give one or more class names in 'labels', "
                           f"separated by ';' (or drop the row)")
    labels = tuple(label.strip() for label in text.split(";"))
    if "" in labels:
        raise PreprocError(f"{where}: empty label in {text!r}; remove the extra ';'")
    check_unique(labels, where, "label")
    split = None
    if "split" in header:
        split = fields[header["split"]].strip().lower()
        if split not in SPLITS:
            raise PreprocError(f"{where}: split {fields[header['split']].strip()!r} is neither 'train' nor 'test'; "
                               f"fix the row")
    return Row(line, image, labels, split)


def read_csv(path: os.PathLike | str) -> Tuple[List[Row], bool]:
    """The data rows of the CSV in file order, and whether it has a split column. Blank lines are skipped;
    anything malformed is a PreprocError naming the file and the line."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header: Optional[Dict[str, int]] = None
    rows: List[Row] = []
    try:
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if header is None:
                header = _parse_header(fields, path, reader.line_num)
            else:
                rows.append(_parse_row(fields, header, path, reader.line_num))
    except csv.Error as exc:
        raise PreprocError(f"{path}, line {reader.line_num}: not valid CSV ({exc}); fix the line") from exc
    if header is None:
        raise PreprocError(f"{path}: the file is empty; expected the header 'image,labels[,split]' and one row per "
                           f"image")
    if not rows:
        raise PreprocError(f"{path}: only a header, no data rows; add one row per image")
    return rows, "split" in header


def read_class_list(path: os.PathLike | str) -> List[str]:
    """The class names of a --classes file, one per line (blank lines skipped), in file order."""
    path = Path(path)
    if not path.is_file():
        raise PreprocError(f"--classes {path}: no such file")
    names = [line.strip() for line in read_text_lines(path)]
    if not names:
        raise PreprocError(f"{path}: no class names; give one class name per line")
    check_unique(names, path, "class")
    for name in names:
        if ";" in name:
            raise PreprocError(f"{path}: class {name!r} holds ';', which separates labels in the CSV; rename it")
    return names


# --- checking rows ---------------------------------------------------------------------------------------------

def image_key(row: Row, images: Path, csv_path: Path) -> str:
    """The row's image path relative to ``images``, normalised ('a/./b.png' -> 'a/b.png'); an absolute path
    inside ``images`` is made relative, one outside it is an error."""
    text = row.image
    if os.path.isabs(text):
        text = os.path.relpath(text, os.path.abspath(images))
    rel = os.path.normpath(text)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise PreprocError(f"{csv_path}, line {row.line}: image {row.image!r} is outside --images {images}; give "
                           f"paths relative to --images (or pass the folder that holds all images)")
    return Path(rel).as_posix()


def check_images_exist(rows: Sequence[Row], keys: Sequence[str], images: Path, csv_path: Path) -> None:
    """Every row's image must be a file under ``images``; the first missing one is reported with the count."""
    missing = [i for i, key in enumerate(keys) if not (images / key).is_file()]
    if missing:
        first = rows[missing[0]]
        raise PreprocError(f"{csv_path}, line {first.line}: image {first.image!r} not found (no file "
                           f"{images / keys[missing[0]]}; {len(missing)} of {len(rows)} images missing); fix "
                           f"the path in the CSV (relative to --images) or pass the right --images folder")


def check_unique_keys(rows: Sequence[Row], keys: Sequence[str], csv_path: Path, what: str) -> None:
    first_line: Dict[str, int] = {}
    for row, key in zip(rows, keys):
        if key in first_line:
            raise PreprocError(f"{csv_path}, line {row.line}: {what} {row.image!r} is listed again (first on line "
                               f"{first_line[key]}); give each {what} one row, with all its labels joined by ';'")
        first_line[key] = row.line


def draw_test_rows(num_rows: int, test_frac: float, seed: int) -> np.ndarray:
    """Which rows (of the rows sorted by image) are test rows: round(test_frac x num_rows) of them, the first
    entries of ``np.random.RandomState(seed).permutation(num_rows)``."""
    num_test = int(np.round(test_frac * num_rows))
    is_test = np.zeros(num_rows, dtype=bool)
    is_test[np.random.RandomState(seed).permutation(num_rows)[:num_test]] = True
    return is_test


def assign_splits(rows: Sequence[Row], has_split: bool, test_frac: Optional[float], seed: int,
                  csv_path: Path) -> np.ndarray:
    """Boolean is-test per row (rows sorted by image): the split column's, or drawn with --test-frac/--seed."""
    if has_split:
        if test_frac is not None:
            raise PreprocError(f"--test-frac {test_frac}: {csv_path} has a split column, which decides the test "
                               f"rows; drop --test-frac (or the column)")
        is_test = np.array([row.split == "test" for row in rows])
    else:
        test_frac = DEFAULT_TEST_FRAC if test_frac is None else test_frac
        if not 0 < test_frac < 1:
            raise PreprocError(f"--test-frac must lie between 0 and 1 (exclusive), got {test_frac}")
        is_test = draw_test_rows(len(rows), test_frac, seed)
    for name, count in (("train", int((~is_test).sum())), ("test", int(is_test.sum()))):
        if count == 0:
            fix = (f"mark some rows '{name}' in the split column" if has_split else
                   "choose a --test-frac that leaves rows in both splits, or add rows")
            raise PreprocError(f"{csv_path}: no {name} row among its {len(rows)} rows; {fix}")
    return is_test


def choose_classes(rows: Sequence[Row], is_test: np.ndarray, classes: Optional[Path], csv_path: Path,
                   drawn: bool) -> List[str]:
    """The class names in column order: --classes's, or the sorted names of the train rows' labels. A label
    not among them (--classes) or seen only in test rows is an error naming its first line."""
    by_line = sorted(zip(rows, is_test), key=lambda pair: pair[0].line)
    train_names = {label for row, test in by_line if not test for label in row.labels}
    if classes is not None:
        names = read_class_list(classes)
        known = set(names)
        for row, _ in by_line:
            for label in row.labels:
                if label not in known:
                    raise PreprocError(f"{csv_path}, line {row.line}: unknown label {label!r} (not in {classes}); "
                                       f"fix the row or add the class to {classes}")
    else:
        names = sorted(train_names)
    for row, test in by_line:
        for label in row.labels:
            if test and label not in train_names:
                also = " (or draw another test split with --seed)" if drawn else ""
                raise PreprocError(f"{csv_path}, line {row.line}: class {label!r} appears only in test rows; add a "
                                   f"train row with it or drop it{also}")
    if len(names) < 2:
        raise PreprocError(f"{csv_path}: only one class ({names[0]!r}) in the train rows; multi-label training "
                           f"needs at least two classes")
    return names


def label_matrix(rows: Sequence[Row], names: Sequence[str]) -> np.ndarray:
    """float64 (len(rows), len(names)) 0/1 matrix, as the benchmarks' format scripts write."""
    column = {name: k for k, name in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), dtype=np.float64)
    for i, row in enumerate(rows):
        labels[i, [column[label] for label in row.labels]] = 1.0
    return labels


def read_features(path: Path, rows: Sequence[Row], csv_path: Path) -> np.ndarray:
    """float32 (N, D) features of a --features .npy whose rows are the CSV's data rows in file order."""
    if not path.is_file():
        raise PreprocError(f"--features {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise PreprocError(f"{path}: cannot be read as a .npy array ({exc}); save the features with "
                           f"numpy.save(path, array)") from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive
        loaded.close()
        raise PreprocError(f"{path}: an .npz archive, not a .npy array; save one (rows x dimensions) array with "
                           f"numpy.save")
    if loaded.ndim != 2 or loaded.shape[1] == 0:
        raise PreprocError(f"{path}: expected a 2-D array (one row of features per CSV row), found shape "
                           f"{loaded.shape}")
    if not (np.issubdtype(loaded.dtype, np.floating) or np.issubdtype(loaded.dtype, np.integer)):
        raise PreprocError(f"{path}: expected numbers (float or int), found dtype {loaded.dtype}")
    if len(loaded) != len(rows):
        raise PreprocError(f"{path}: {len(loaded)} rows but {csv_path} has {len(rows)} data rows; give one feature "
                           f"row per CSV row, in the CSV's order")
    with np.errstate(over="ignore"):
        features = loaded.astype(np.float32)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        r = int(np.argmax(bad))
        raise PreprocError(f"{path}, row {r} ({csv_path} line {rows[r].line}): a non-finite value (nan, inf, or "
                           f"beyond float32's range); fix or drop that row")
    return features


# --- the output folder -------------------------------------------------------------------------------------------

def previous_output(save_path: Path, force: bool) -> Tuple[bool, Dict]:
    """Whether the formatted files in ``save_path`` may be replaced, and the earlier dataset.json if this script
    wrote them. A folder holding another dataset's formatted files (or a dataset.json from elsewhere) is
    refused unless ``force``."""
    if save_path.name in FORMAT_COMMANDS:
        raise PreprocError(f"--save-path {save_path}: {save_path.name!r} is a benchmark's name (main.py -d "
                           f"{save_path.name} means that benchmark); choose another folder name")
    present = [name for name in OUTPUTS if (save_path / name).exists()]
    if not present:
        return False, {}
    try:
        info = read_dataset_json(save_path)
    except PreprocError:
        info = None
    if info is not None and info["source"] == SOURCE:
        return True, info
    if force:
        return True, {}
    origin = f" (written by {info['source']})" if info and info["source"] else ""
    shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
    raise PreprocError(f"refusing to write into {save_path}: it holds another dataset's files ({shown}){origin}; "
                       f"choose another --save-path, or pass --force to replace them")


def image_folder_entry(images: Path, save_path: Path) -> str:
    """dataset.json's image_folder: ``images`` relative to ``save_path`` when inside it, else absolute."""
    images_abs, save_abs = Path(os.path.abspath(images)), Path(os.path.abspath(save_path))
    if images_abs == save_abs or save_abs in images_abs.parents:
        return images_abs.relative_to(save_abs).as_posix()
    return str(images_abs)


def next_commands(save_path: Path, single_positive: bool) -> List[str]:
    """What to run next, with --data-root when the folder is not under ./data."""
    try:
        default_root = save_path.parent.resolve() == Path("data").resolve()
    except OSError:
        default_root = False
    root = "" if default_root else f" --data-root {shlex.quote(str(save_path.parent))}"
    name = shlex.quote(save_path.name)
    commands = [] if single_positive else [f"python preproc/generate_observed_labels.py --dataset {name}{root}"]
    return commands + [f"python main.py -d {name}{root}"]


# --- the whole format ---------------------------------------------------------------------------------------------

def format_folder(csv_path: os.PathLike | str, save_path: os.PathLike | str, *,
                  images: Optional[os.PathLike | str] = None, features: Optional[os.PathLike | str] = None,
                  test_frac: Optional[float] = None, seed: int = 0, classes: Optional[os.PathLike | str] = None,
                  full_labels: bool = False, force: bool = False) -> Dict[str, np.ndarray]:
    """Format the CSV (see the module docstring) into ``save_path``; returns ``{file name: array}`` of the .npy
    files written (dataset.json is written with them). Every problem is a PreprocError before anything is
    written."""
    csv_path, save_path = Path(csv_path), Path(save_path)
    if (images is None) == (features is None):
        raise PreprocError(f"give {'either' if images is None else 'only one of'} --images DIR (the folder the "
                           f"CSV's image paths are relative to) or --features FILE.npy (one feature row per CSV row)")
    if images is not None and not Path(images).is_dir():
        raise PreprocError(f"--images {images}: not a folder; pass the folder that holds the images")
    if not 0 <= seed < 2 ** 32:
        raise PreprocError(f"--seed must be between 0 and 2**32 - 1, got {seed}")
    replace, previous = previous_output(save_path, force)

    rows, has_split = read_csv(csv_path)
    if features is not None:
        feature_rows = read_features(Path(features), rows, csv_path)
        keys = [row.image for row in rows]
        check_unique_keys(rows, keys, csv_path, "row id")
    else:
        keys = [image_key(row, Path(images), csv_path) for row in rows]
        check_unique_keys(rows, keys, csv_path, "image")
        check_images_exist(rows, keys, Path(images), csv_path)
    order = sorted(range(len(rows)), key=keys.__getitem__)  # rows sorted by image (or id) as strings
    rows, keys = [rows[i] for i in order], [keys[i] for i in order]
    is_test = assign_splits(rows, has_split, test_frac, seed, csv_path)
    names = choose_classes(rows, is_test, None if classes is None else Path(classes), csv_path, not has_split)
    labels = label_matrix(rows, names)
    single_positive = not full_labels and bool((labels[~is_test].sum(axis=1) == 1).all())

    arrays: Dict[str, np.ndarray] = {}
    for phase, mask in (("train", ~is_test), ("val", is_test)):
        arrays[f"formatted_{phase}_images.npy"] = np.array([key for key, m in zip(keys, mask) if m])
        arrays[f"formatted_{phase}_labels.npy"] = labels[mask]
        if features is not None:
            arrays[f"formatted_{phase}_features.npy"] = feature_rows[np.array(order)[mask]]
    if single_positive:
        arrays["formatted_train_labels_obs.npy"] = labels[~is_test].copy()
        try:  # the test split's observed labels as generate_observed_labels draws them
            arrays["formatted_val_labels_obs.npy"] = generate_observed(labels[is_test], 1, 0, DEFAULT_SEED)
        except ValueError as exc:
            raise PreprocError(f"{csv_path}: the test rows' labels cannot be sampled ({exc})") from exc
    warn_about_classes(names, labels, is_test)

    written = write_dataset_json(
        save_path, class_names=names, single_positive=single_positive, features=features is not None,
        image_folder=None if features is not None else image_folder_entry(Path(images), save_path),
        defaults=previous.get("defaults"), source=SOURCE, arrays=arrays)
    report(csv_path, save_path, written, arrays, is_test, has_split, test_frac, seed, names, single_positive,
           previous)
    if replace:
        for name in OUTPUTS:
            stale = save_path / name
            if name not in arrays and name != DATASET_JSON and stale.exists():
                stale.unlink()
                print(f"removed {stale} (from the earlier format of {save_path}, not part of this one)")
    return arrays


def warn_about_classes(names: Sequence[str], labels: np.ndarray, is_test: np.ndarray) -> None:
    """Warn about classes the model never sees in training, and classes without a test positive (whose test
    AP counts 0 in the mAP, as in the original's metric)."""
    for what, mask, effect in (("train", ~is_test, "the model never sees it"),
                               ("test", is_test, "its test AP counts 0 in the mAP")):
        empty = [name for name, n in zip(names, labels[mask].sum(axis=0)) if n == 0]
        if empty:
            shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            print(f"warning: no {what} row has the class(es) {shown}: {effect}", file=sys.stderr)


def report(csv_path: Path, save_path: Path, written: Sequence[Path], arrays: Dict[str, np.ndarray],
           is_test: np.ndarray, has_split: bool, test_frac: Optional[float], seed: int, names: Sequence[str],
           single_positive: bool, previous: Dict) -> None:
    """Print what was read and written, and what to run next."""
    how = "split column" if has_split else (f"drawn with --test-frac "
                                             f"{DEFAULT_TEST_FRAC if test_frac is None else test_frac} --seed {seed}")
    print(f"{csv_path}: {len(is_test)} rows -> {int((~is_test).sum())} train, {int(is_test.sum())} test ({how}); "
          f"{len(names)} classes")
    train = arrays["formatted_train_labels.npy"].sum(axis=1)
    if single_positive:
        print("train labels: one per row, taken as single positives (dataset.json: single_positive true; "
              "--full-labels if they are complete labels); bce and iun need full labels")
    else:
        print(f"train labels: full labels ({int(train.min())}-{int(train.max())} per row)")
    if previous.get("defaults"):
        print(f"kept the defaults of the earlier {save_path / DATASET_JSON}: {previous['defaults']}")
    for path in written:
        shape = f"  shape={arrays[path.name].shape} dtype={arrays[path.name].dtype}" if path.name in arrays else ""
        print(f"wrote {path}{shape}")
    print("next: " + "  then  ".join(next_commands(save_path, single_positive)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Format your own labelled images (or features) from a CSV "
                                                 "for SPML training (see the module docstring).")
    parser.add_argument("--csv", required=True, help="CSV with the columns image, labels (';'-separated class "
                                                     "names) and optionally split (train/test)")
    parser.add_argument("--images", help="folder that the CSV's image paths are relative to (never copied)")
    parser.add_argument("--features", help=".npy of float (N, D) features, one row per CSV row in file order, "
                                           "instead of images (then 'image' holds a unique row id)")
    parser.add_argument("--save-path", required=True, help="the dataset folder to write, e.g. data/NAME "
                                                           "(then: main.py -d NAME)")
    parser.add_argument("--test-frac", type=float, default=None,
                        help=f"without a split column: share of rows drawn as test (default {DEFAULT_TEST_FRAC})")
    parser.add_argument("--seed", type=int, default=0, help="seed of that draw (default 0)")
    parser.add_argument("--classes", help="file with the class names, one per line, in column order (default: "
                                          "the sorted names seen in the train rows)")
    parser.add_argument("--full-labels", action="store_true",
                        help="train rows with one label each are complete labels, not single positives")
    parser.add_argument("--force", action="store_true",
                        help="replace another dataset's formatted files in --save-path")
    args = parser.parse_args(argv)

    def run() -> None:
        check_output_folder(args.save_path, "--save-path")
        format_folder(args.csv, args.save_path, images=args.images, features=args.features,
                      test_frac=args.test_frac, seed=args.seed, classes=args.classes,
                      full_labels=args.full_labels, force=args.force)

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
