"""Shared helpers of the preprocessing scripts (``preproc/format_*.py``, ``generate_observed_labels.py``,
``download.py``).

Everything here is small on purpose: an error type for expected failures (missing raw files, inconsistent
counts, an output folder that cannot be written), the download hints those errors print, one parser for the
whitespace-separated text files, the all-or-nothing writer of the output arrays, the up-front check of an
output folder, the ``main`` of the four format scripts, which turns expected errors into one
``error: ...`` message plus exit code 2 instead of a traceback, and ``dataset.json``: the description of a
formatted dataset folder (class names, image folder, whether the train labels are single positives already),
its writer, its validating reader and the check of the formatted files against it. The one-line descriptions
of write errors come from the top-level ``fileio.py`` (shared with the training code); this module stays
standard library + numpy only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fileio import OutputError, write_atomic  # the repo root is on sys.path

__all__ = [
    "PreprocError",
    "FORMAT_COMMANDS",
    "DOWNLOAD_HINTS",
    "missing_file_message",
    "require_file",
    "read_text_lines",
    "read_fields",
    "parse_int",
    "check_output_folder",
    "save_arrays",
    "save_formatted",
    "one_line",
    "run_main",
    "format_main",
    "check_unique",
    "DATASET_JSON",
    "FOLDER_FORMAT_COMMAND",
    "format_hint",
    "write_dataset_json",
    "read_dataset_json",
    "image_root",
    "check_dataset_files",
]


class PreprocError(Exception):
    """An expected, user-fixable problem (raw data, paths), shown as ``error: ...`` without a traceback; the
    script exits with ``exit_code`` (2: bad data or usage, as main.py, report.py and sweep.py)."""

    exit_code = 2


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
    return " ".join(lines)


def require_file(path: os.PathLike | str, dataset: str, what: str = "raw file") -> Path:
    """Return ``path`` as a Path, or raise PreprocError naming it and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise PreprocError(missing_file_message(path, dataset, what))
    return path


def read_text_lines(path: os.PathLike | str, keep_blank: bool = False) -> list:
    """Lines of a text file without line endings (CRLF tolerated); blank lines dropped
    unless ``keep_blank``. Undecodable bytes are read as latin-1; an unreadable file is a
    clear error, not a traceback."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PreprocError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # decodes every byte
    lines = text.splitlines()
    if keep_blank:
        return lines
    return [ln for ln in lines if ln.strip()]


def read_fields(path: os.PathLike | str, usage: str, num_fields: int, extra_ok: bool = False,
                maxsplit: int = -1) -> Iterator[Tuple[int, List[str]]]:
    """``(line number, fields)`` for every non-blank line of a whitespace-separated text file.

    A line needs exactly ``num_fields`` fields (at least, with ``extra_ok``); ``maxsplit`` keeps the rest
    of the line, spaces included, in the last field. Otherwise a PreprocError names the file, the line
    and the expected ``usage`` (e.g. ``'<image id> <label>'``)."""
    for lineno, line in enumerate(read_text_lines(path, keep_blank=True), start=1):
        fields = line.strip().split(None, maxsplit)
        if not fields:
            continue
        if len(fields) < num_fields or (len(fields) > num_fields and not extra_ok):
            raise PreprocError(f"{path}, line {lineno}: expected {usage!r} ({num_fields} fields), "
                               f"found {len(fields)} fields: {line!r}")
        yield lineno, fields


def parse_int(text: str, path: os.PathLike | str, lineno: int, what: str) -> int:
    """``int(text)``, or a PreprocError naming the file, the line and ``what`` was expected."""
    try:
        return int(text)
    except ValueError:
        raise PreprocError(f"{path}, line {lineno}: expected an integer {what}, found {text!r}") from None


def check_output_folder(folder: os.PathLike | str, flag: str) -> None:
    """Before any work: raise PreprocError (one line, naming the path and the fix) when ``folder`` cannot
    be created or written, i.e. when it or one of its parents is a file, or the nearest existing folder on
    the way is not writable. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreprocError(f"cannot write to {folder}: {existing} is a file, not a folder; "
                           f"choose another {flag} (or move that file away)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreprocError(f"cannot write to {folder}: {existing} is not writable (read-only or no "
                           f"permission); choose a writable {flag}")


def save_arrays(folder: os.PathLike | str, arrays: Mapping[str, np.ndarray],
                texts: Optional[Mapping[str, str]] = None) -> List[Path]:
    """Save ``{file name: array}`` as .npy files in ``folder`` (and ``texts``, ``{file name: text}``, as
    UTF-8 text files), all or nothing. Returns the paths written, texts first.

    Each file goes through ``fileio.write_atomic``, nested: the next file is written while the previous
    one is still a temporary, so all of them are renamed into place only once every one is complete (the
    first one last: a text such as ``dataset.json`` is the last to appear). Any OSError (a file in the way,
    no permission, a full disk) removes the temporaries, leaves the existing files as they were and becomes
    a one-line PreprocError."""
    def text_writer(text: str) -> Callable[[Any], None]:
        return lambda fh: fh.write(text.encode("utf-8"))

    def array_writer(array: np.ndarray) -> Callable[[Any], None]:
        return lambda fh: np.save(fh, array, allow_pickle=False)  # a file object: np.save would append ".npy"

    items = [(Path(folder) / name, text_writer(text)) for name, text in (texts or {}).items()]
    items += [(Path(folder) / name, array_writer(array)) for name, array in arrays.items()]

    def write_from(i: int) -> None:
        if i < len(items):
            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    items[i][1](fh)
                write_from(i + 1)

            write_atomic(items[i][0], write)

    try:
        write_from(0)
    except OutputError as exc:
        raise PreprocError(exc.strerror) from exc
    return [path for path, _ in items]


def save_formatted(save_path: os.PathLike | str, arrays: Mapping[str, np.ndarray],
                   description: Optional[Mapping[str, Any]] = None) -> None:
    """Save ``{'train_images': ..., 'train_labels': ..., 'val_images': ..., 'val_labels': ...}``
    as ``<save_path>/formatted_<key>.npy`` (all or nothing) and print what was written. With
    ``description`` (the keyword arguments of ``write_dataset_json``), ``dataset.json`` is written in the
    same all-or-nothing group."""
    keys = ("train_images", "train_labels", "val_images", "val_labels")
    files = {f"formatted_{key}.npy": arrays[key] for key in keys}
    if description is None:
        written = save_arrays(save_path, files)
    else:
        written = write_dataset_json(save_path, **description, arrays=files)[1:]
        print(f"wrote {Path(save_path) / DATASET_JSON}  ({len(description['class_names'])} class names)")
    for key, out in zip(keys, written):
        print(f"wrote {out}  shape={arrays[key].shape} dtype={arrays[key].dtype}")


def one_line(message: object) -> str:
    """`message` on one line (a user error is reported in one line, whatever produced it)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_main(func: Callable[[], object]) -> int:
    """Run ``func``; expected errors (PreprocError, and an OSError such as an unreadable file or a path that
    cannot be written) print ``error: ...`` to stderr and give exit code 2 (a failed download: 1). Anything
    else is a bug and propagates with its traceback."""
    try:
        func()
    except PreprocError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # fileio.OutputError included: its strerror is the one-line message
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def format_main(dataset: str, format_fn: Callable[[str, str], object], description: str,
                load_help: str, argv: Optional[Sequence[str]] = None) -> int:
    """The command line of ``preproc/format_<dataset>.py``: ``--load-path`` and ``--save-path``, both
    ``./data/<dataset>`` by default. The save path is checked before the (possibly long) parsing."""
    default = f"./data/{dataset}"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--load-path", default=default, help=f"{load_help} (default: {default})")
    parser.add_argument("--save-path", default=default, help=f"where formatted_*.npy go (default: {default})")
    args = parser.parse_args(argv)

    def run() -> None:
        check_output_folder(args.save_path, "--save-path")
        format_fn(args.load_path, args.save_path)

    return run_main(run)


def check_unique(items: Sequence[str], path: os.PathLike | str, what: str) -> None:
    """Raise PreprocError if ``items`` has duplicates (names the first one)."""
    seen = set()
    for item in items:
        if item in seen:
            raise PreprocError(f"{path}: {what} {item!r} is listed more than once")
        seen.add(item)


# --- dataset.json: what a formatted dataset folder holds ------------------------------------------------------

DATASET_JSON = "dataset.json"
DATASET_JSON_FORMAT = 1  # the schema version written into every dataset.json
FOLDER_FORMAT_COMMAND = "python preproc/format_folder.py"
PHASES = ("train", "val")  # the formatted splits: official train (-> train + val) and official test ("val")
# Keys in the order they are written; the optional ones with the value a missing key means.
_KEYS = ("format", "num_classes", "class_names", "image_folder", "single_positive", "features", "defaults",
         "source")
_OPTIONAL = {"features": False, "defaults": {}, "source": ""}


def format_hint(folder: os.PathLike | str, features: bool = False) -> str:
    """The command that (re)creates the formatted files of the dataset folder ``folder``: a benchmark's
    format script for a benchmark's folder name, else ``format_folder.py`` with placeholders."""
    folder = Path(folder)
    quoted = shlex.quote(str(folder))  # a printed command is pasted into a shell: a path may hold spaces
    if folder.name == "demo":
        return f"{FORMAT_COMMANDS['demo']} --save-path {quoted}"
    if folder.name in FORMAT_COMMANDS:
        return f"{FORMAT_COMMANDS[folder.name]} --load-path {quoted} --save-path {quoted}"
    source = "--features <your features .npy>" if features else "--images <your image folder>"
    return f"{FOLDER_FORMAT_COMMAND} --csv <your CSV> {source} --save-path {quoted}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_description(data: Mapping[str, Any], where: str, fix: str,
                       allowed_defaults: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """``data`` checked against the dataset.json schema and completed with the optional keys' values; else a
    one-line PreprocError naming ``where`` (the file), the bad key and ``fix``."""
    def bad(key: str, problem: str) -> PreprocError:
        return PreprocError(f"{where}: key {key!r} {problem}; {fix}")

    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise bad(unknown[0], f"is not a dataset.json key (the keys are {', '.join(_KEYS)})")
    missing = [key for key in _KEYS if key not in data and key not in _OPTIONAL]
    if missing:
        raise bad(missing[0], "is missing")
    info = {key: data.get(key, _OPTIONAL.get(key)) for key in _KEYS}
    if info["format"] != DATASET_JSON_FORMAT or not _is_int(info["format"]):
        raise bad("format", f"must be {DATASET_JSON_FORMAT} (the version this code reads), found {info['format']!r}")
    names = info["class_names"]
    if not isinstance(names, list) or not names:
        raise bad("class_names", f"must be a non-empty list of class names, found {names!r:.60}")
    for pos, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise bad("class_names", f"must hold non-empty strings, found {name!r} at position {pos}")
    seen: Dict[str, int] = {}
    for pos, name in enumerate(names):
        if name in seen:
            raise bad("class_names", f"lists {name!r} twice (positions {seen[name]} and {pos}); "
                                     f"class names must be unique")
        seen[name] = pos
    if not _is_int(info["num_classes"]) or info["num_classes"] != len(names):
        raise bad("num_classes", f"is {info['num_classes']!r} but 'class_names' lists {len(names)} names")
    for key in ("single_positive", "features"):
        if not isinstance(info[key], bool):
            raise bad(key, f"must be true or false, found {info[key]!r}")
    folder_value = info["image_folder"]
    if info["features"] and folder_value is not None:
        raise bad("image_folder", f"must be null for a features dataset (\"features\": true), found {folder_value!r}")
    if not info["features"] and not isinstance(folder_value, str):
        raise bad("image_folder", f"must be the image folder (relative to the dataset folder, or absolute), "
                                  f"found {folder_value!r}")
    defaults = info["defaults"]
    if not isinstance(defaults, dict):
        raise bad("defaults", f"must be an object of setting names and values, found {defaults!r:.60}")
    for name, value in defaults.items():
        if allowed_defaults is not None and name not in allowed_defaults:
            raise bad("defaults", f"names {name!r}, which is not a setting (choose from "
                                  f"{', '.join(sorted(allowed_defaults))})")
        if not isinstance(value, (str, int, float, bool)):
            raise bad("defaults", f"gives {name!r} the value {value!r:.60}; values must be numbers, strings or "
                                  f"true/false")
    if not isinstance(info["source"], str):
        raise bad("source", f"must be a string (the script that wrote the folder), found {info['source']!r}")
    return info


def write_dataset_json(folder: os.PathLike | str, *, class_names: Sequence[str], image_folder: Optional[str],
                       single_positive: bool, features: bool = False,
                       defaults: Optional[Mapping[str, Any]] = None, source: str,
                       arrays: Optional[Mapping[str, np.ndarray]] = None) -> List[Path]:
    """Write ``<folder>/dataset.json`` atomically (checked against the schema first, see ``read_dataset_json``);
    with ``arrays`` (``{file name: array}``) those are saved in the same all-or-nothing group, dataset.json
    appearing last. Returns the paths written, dataset.json first."""
    data = {"format": DATASET_JSON_FORMAT, "num_classes": len(class_names), "class_names": list(class_names),
            "image_folder": image_folder, "single_positive": single_positive, "features": features,
            "defaults": dict(defaults or {}), "source": source}
    info = _check_description(data, str(Path(folder) / DATASET_JSON), "nothing was written")
    text = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    return save_arrays(folder, arrays or {}, texts={DATASET_JSON: text})


def read_dataset_json(folder: os.PathLike | str,
                      allowed_defaults: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """The checked contents of ``<folder>/dataset.json``, every key present (a missing optional key takes its
    default: features false, defaults {}, source ""):

    ``{"format": 1, "num_classes": C, "class_names": [C unique non-empty strings], "image_folder": str
    (relative to the folder, or absolute; "" is the folder itself) or null for a features dataset,
    "single_positive": bool (the train labels are single positives already, no full labels), "features": bool
    (formatted_{train,val}_features.npy hold float (N, D) features instead of images), "defaults": {setting:
    value}, "source": str}``.

    Anything else is a one-line PreprocError naming the file, the key and the fix; with ``allowed_defaults``,
    a setting in "defaults" that is not among them is one too."""
    folder = Path(folder)
    path = folder / DATASET_JSON
    if not path.is_file():
        raise PreprocError(f"missing {path}; create it with: {format_hint(folder)}")
    fix = f"correct it in {path} or re-create the file with: {format_hint(folder)}"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise PreprocError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PreprocError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}") from exc
    except json.JSONDecodeError as exc:
        raise PreprocError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); {fix}") from exc
    if not isinstance(data, dict):
        raise PreprocError(f"{path}: expected a JSON object {{\"format\": 1, \"num_classes\": ...}}, found "
                           f"{type(data).__name__}; {fix}")
    return _check_description(data, str(path), fix, allowed_defaults)


def image_root(folder: os.PathLike | str, info: Mapping[str, Any]) -> Optional[Path]:
    """The folder that the image paths of ``folder``'s formatted_*_images.npy are relative to (``info`` is
    its ``read_dataset_json``); None for a features dataset."""
    if info["image_folder"] is None:
        return None
    image_folder = Path(info["image_folder"])
    return image_folder if image_folder.is_absolute() else Path(folder) / image_folder


def _load_npy(path: Path, fix: str, mmap: bool = False) -> np.ndarray:
    """The array in ``path``, or a one-line PreprocError naming it and ``fix`` (the command re-creating it)."""
    if not path.is_file():
        raise PreprocError(f"missing {path}; create it with: {fix}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty (zero-byte) file
        reason = "the file is empty" if path.stat().st_size == 0 else one_line(exc)
        raise PreprocError(f"cannot load {path} ({reason}); re-create it with: {fix}") from exc


def _first_non_finite_row(features: np.ndarray) -> Optional[int]:
    """The first row of ``features`` holding nan or inf, or None; reads a memory-mapped file in chunks of ~8 M
    values (small temporaries, which the allocator reuses: fresh large ones cost page faults, 10x the check)."""
    chunk = max(1, 2 ** 23 // features.shape[1])  # (the caller checked: 2-D, at least one column)
    for start in range(0, len(features), chunk):
        bad = ~np.isfinite(np.asarray(features[start:start + chunk])).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def _check_features(path: Path, rows: int, labels_path: Path, fix: str) -> int:
    """Check a formatted_<phase>_features.npy against its labels' row count; returns its dimension."""
    features = _load_npy(path, fix, mmap=True)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating) or features.shape[1] == 0:
        raise PreprocError(f"{path}: expected a 2-D float32 array (rows x feature dimensions), found "
                           f"{features.dtype} of shape {features.shape}; re-create it with: {fix}")
    if len(features) != rows:
        raise PreprocError(f"{path}: {len(features)} rows but {labels_path.name} has {rows}; the files must "
                           f"hold the same rows in the same order, re-create them with: {fix}")
    bad = _first_non_finite_row(features)
    if bad is not None:
        raise PreprocError(f"{path}: row {bad} holds a non-finite value (nan or inf); fix or drop that row and "
                           f"re-create the files with: {fix}")
    return int(features.shape[1])


def check_dataset_files(folder: os.PathLike | str) -> None:
    """Check a dataset folder's formatted files against its dataset.json (``read_dataset_json``): label columns
    = num_classes, as many rows of images (and features) as of labels in each split, one positive per train row
    where single_positive, features 2-D, finite and of the same dimension in both splits, the image folder
    present. Raises a one-line PreprocError naming the file and the fix. The observed labels and the label
    values are checked where they are loaded (``datasets.load_formatted``)."""
    folder = Path(folder)
    info = read_dataset_json(folder)
    json_path = folder / DATASET_JSON
    fix = format_hint(folder, info["features"])
    labels = {}
    for phase in PHASES:
        path = folder / f"formatted_{phase}_labels.npy"
        array = _load_npy(path, fix)
        if array.ndim != 2 or array.shape[1] != info["num_classes"]:
            found = f"{array.shape[1]} label columns" if array.ndim == 2 else f"shape {array.shape}"
            raise PreprocError(f"{path}: {found} but {json_path} says num_classes {info['num_classes']}; "
                               f"re-create the files with: {fix} (or correct num_classes and class_names in "
                               f"{json_path})")
        labels[phase] = array
    if info["single_positive"]:
        counts = (labels["train"] == 1).sum(axis=1)
        if (counts != 1).any():
            row = int(np.argmax(counts != 1))
            raise PreprocError(f"{json_path} says single_positive true, but row {row} of formatted_train_labels.npy "
                               f"has {int(counts[row])} positive labels; set \"single_positive\": false (full "
                               f"labels; then run: python preproc/generate_observed_labels.py --dataset "
                               f"{shlex.quote(folder.name)}) or re-create the files with: {fix}")
    dims = {}
    for phase in PHASES:
        rows = len(labels[phase])
        labels_path = folder / f"formatted_{phase}_labels.npy"
        images_path = folder / f"formatted_{phase}_images.npy"
        if not info["features"] or images_path.is_file():  # a features dataset may come without row ids
            images = _load_npy(images_path, fix)
            if images.ndim != 1:
                raise PreprocError(f"{images_path}: expected a 1-D array of image paths, found shape "
                                   f"{images.shape}; re-create it with: {fix}")
            if len(images) != rows:
                raise PreprocError(f"{images_path}: {len(images)} rows but {labels_path.name} has {rows}; the "
                                   f"files must hold the same rows in the same order, re-create them with: {fix}")
        if info["features"]:
            dims[phase] = _check_features(folder / f"formatted_{phase}_features.npy", rows, labels_path, fix)
    if info["features"] and dims["train"] != dims["val"]:
        raise PreprocError(f"{folder / 'formatted_val_features.npy'}: {dims['val']} feature dimensions but "
                           f"formatted_train_features.npy has {dims['train']}; both splits need the same "
                           f"features, re-create them with: {fix}")
    root = image_root(folder, info)
    if root is not None and not root.is_dir():
        raise PreprocError(f"{json_path}: image_folder {info['image_folder']!r} is not a folder ({root} does not "
                           f"exist); correct image_folder (relative to {folder}, or absolute) or re-create the "
                           f"files with: {fix}")
