"""Shared helpers of the preprocessing scripts (``preproc/format_*.py``, ``generate_observed_labels.py``,
``download.py``).

Everything here is small on purpose: an error type for expected failures (missing raw files, inconsistent
counts, an output folder that cannot be written), the download hints those errors print, one parser for the
whitespace-separated text files, the all-or-nothing writer of the output arrays, the up-front check of an
output folder, and the ``main`` of the four format scripts, which turns expected errors into one
``error: ...`` message plus exit code 1 instead of a traceback. The one-line descriptions of write errors
come from the top-level ``fileio.py`` (shared with the training code); this module stays standard library +
numpy only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

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
]


class PreprocError(Exception):
    """An expected, user-fixable problem (raw data, paths), shown as ``error: ...`` without a traceback."""


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


def save_arrays(folder: os.PathLike | str, arrays: Mapping[str, np.ndarray]) -> List[Path]:
    """Save ``{file name: array}`` as .npy files in ``folder``, all or nothing.

    Each file goes through ``fileio.write_atomic``, nested: the next file is written while the previous
    one is still a temporary, so all of them are renamed into place only once every one is complete. Any
    OSError (a file in the way, no permission, a full disk) removes the temporaries, leaves the existing
    files as they were and becomes a one-line PreprocError."""
    items = [(Path(folder) / name, array) for name, array in arrays.items()]

    def write_from(i: int) -> None:
        if i < len(items):
            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a name
                    np.save(fh, items[i][1], allow_pickle=False)
                write_from(i + 1)

            write_atomic(items[i][0], write)

    try:
        write_from(0)
    except OutputError as exc:
        raise PreprocError(exc.strerror) from exc
    return [path for path, _ in items]


def save_formatted(save_path: os.PathLike | str, arrays: Mapping[str, np.ndarray]) -> None:
    """Save ``{'train_images': ..., 'train_labels': ..., 'val_images': ..., 'val_labels': ...}``
    as ``<save_path>/formatted_<key>.npy`` (all or nothing) and print what was written."""
    keys = ("train_images", "train_labels", "val_images", "val_labels")
    written = save_arrays(save_path, {f"formatted_{key}.npy": arrays[key] for key in keys})
    for key, out in zip(keys, written):
        print(f"wrote {out}  shape={arrays[key].shape} dtype={arrays[key].dtype}")


def one_line(message: object) -> str:
    """`message` on one line (a user error is reported in one line, whatever produced it)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_main(func: Callable[[], object]) -> int:
    """Run ``func``; expected errors (PreprocError, and an OSError such as an unreadable file) print
    ``error: ...`` to stderr and give exit code 1. Anything else is a bug and propagates with its
    traceback."""
    try:
        func()
    except PreprocError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # fileio.OutputError included: its strerror is the one-line message
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
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
