#!/usr/bin/env python
"""Download, verify and extract the raw datasets used in the experiments.

Usage::

    python preproc/download.py --dataset {pascal,coco,nuswide,cub}
                               [--data-root ./data] [--keep-archives]
                               [--no-extract] [--timeout 60] [--quiet]

After checking that ``<data-root>/<dataset>`` can be written, for every official archive of the
chosen dataset the script

1. downloads it to ``<data-root>/<dataset>/<archive>``.  The bytes first go to
   ``<archive>.part``; an interrupted download is resumed with an HTTP Range
   request when the command is run again (a server that ignores Range is
   handled by restarting from byte zero);
2. checks the size and the md5 (torchvision's ``calculate_md5``; and sha256,
   where known) against the values in :data:`SOURCES`.  Only a download that
   passed is renamed to its final name; one that failed is deleted.  An archive
   already under the final name (an earlier run, or saved there by hand) is
   verified the same way and, if it fails, reported and left untouched;
3. extracts it into ``<data-root>/<dataset>/`` with torchvision's
   ``extract_archive``, after refusing archives with members that would land
   outside that folder (torchvision extracts tar files without tarfile's safety
   filter), and writes a marker ``.extracted_<archive>`` so that a later run skips it;
4. deletes the archive unless ``--keep-archives`` is given.

At the end it prints the next commands to run (``preproc/format_<d>.py``,
then ``preproc/generate_observed_labels.py``).

NUS-WIDE cannot be fetched automatically (the images are handed out by its
authors on request); for it the script only prints what to obtain and where to
put it, and exits with status 0.

Expected failures (no network, HTTP errors, checksum mismatch, unsafe or
corrupt archive, a data root that cannot be written) are reported on stderr as
a short explanation of what failed and what to do, with exit status 1 and no
traceback.  Besides the standard library it needs ``tqdm`` and torchvision
(imported only when verifying or extracting: it loads torch).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shlex
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fileio import describe_os_error  # noqa: E402
from preproc.common import PreprocError, check_output_folder, run_main  # noqa: E402

from tqdm import tqdm  # noqa: E402


DEFAULT_TIMEOUT = 60.0  # seconds, for connecting and for each read
USER_AGENT = "spml-reproduction-downloader/1.0 (python urllib)"
DATASETS = ("pascal", "coco", "nuswide", "cub")


@dataclass(frozen=True)
class Archive:
    """One file to fetch.  ``md5``/``size``/``sha256`` are None when unknown."""

    url: str
    filename: str
    md5: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None


# Where the checksums and sizes come from (each value was looked up, none was
# computed here; anything not found in a reliable source is left as None):
#
# * PASCAL VOC 2012 trainval: md5 as listed in torchvision's
#   torchvision/datasets/voc.py (DATASET_YEAR_DICT["2012"]); size 1999639040
#   bytes as recorded in tensorflow/datasets url_checksums/voc.txt for the
#   same file name (that entry is for the pjreddie.com mirror of this tar).
# * COCO 2014: sizes and sha256 from tensorflow/datasets
#   url_checksums/coco2014.txt, recorded for exactly these
#   images.cocodataset.org URLs; md5 of train2014.zip / val2014.zip as noted
#   in Salesforce LAVIS (lavis/datasets/download_scripts, the same URLs).  No
#   published md5 was found for annotations_trainval2014.zip, so it is checked
#   by size and sha256 only.
# * CUB-200-2011: md5 97eceeb1... as used by many public loaders (e.g. the
#   widely used cub2011 torchvision-style dataset class) for CUB_200_2011.tgz,
#   for both the old vision.caltech.edu URL and the CaltechDATA record;
#   size 1150585339 bytes from tensorflow/datasets
#   url_checksums/caltech_birds2011.txt (a Google Drive copy of the same
#   archive, which other loaders check against the same md5).
#   The CaltechDATA record id used below (65de6-vp158) is the one cited by
#   the dataset's users; if the record moves, download CUB_200_2011.tgz by
#   hand into data/cub/ and rerun (it will be verified and extracted).
# * NUS-WIDE: no automatic download (see NUSWIDE_INSTRUCTIONS).
SOURCES: Dict[str, List[Archive]] = {
    "pascal": [
        Archive(
            url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            filename="VOCtrainval_11-May-2012.tar",
            md5="6cd6e144f989b92b3379bac3b3de84fd",
            size=1999639040,
        ),
    ],
    "coco": [
        Archive(
            url="http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            filename="annotations_trainval2014.zip",
            md5=None,  # no md5 found in a reliable source; sha256 + size are checked
            size=252872794,
            sha256="031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
        ),
        Archive(
            url="http://images.cocodataset.org/zips/train2014.zip",
            filename="train2014.zip",
            md5="0da8c0bd3d6becc4dcb32757491aca88",
            size=13510573713,
            sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
        ),
        Archive(
            url="http://images.cocodataset.org/zips/val2014.zip",
            filename="val2014.zip",
            md5="a3d79f5ed8d289b7a7554ce06a5782b3",
            size=6645013297,
            sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
        ),
    ],
    "cub": [
        Archive(
            url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
            filename="CUB_200_2011.tgz",
            md5="97eceeb196236b17998738112f37df78",
            size=1150585339,
        ),
    ],
    "nuswide": [],  # manual request to the authors, see NUSWIDE_INSTRUCTIONS
}

NUSWIDE_PAGE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"

NUSWIDE_INSTRUCTIONS = """\
NUS-WIDE cannot be downloaded automatically: its images are distributed by
the NUS-WIDE authors on request.  Nothing was downloaded.

1. Follow the instructions on the official page
     {page}
   to request / download:
     - the Flickr images             -> {root}/Flickr/
       (keep the authors' sub-folder layout, e.g. Flickr/<folder>/<image>.jpg)
     - the ground-truth label files  -> {root}/Groundtruth/
       (e.g. AllLabels/ and TrainTestLabels/)
     - the image lists               -> {root}/ImageList/
       (e.g. Imagelist.txt, TrainImagelist.txt, TestImagelist.txt)
     - the list of the 81 concepts   -> {root}/Concepts81.txt

2. Then run:
     {format_cmd}
     {observed_cmd}

If you already have the pre-formatted files released with the paper
(formatted_*.npy, e.g. formatted_train_images.npy, formatted_train_labels.npy,
formatted_val_images.npy, formatted_val_labels.npy), copy them into
{root}/ instead and skip format_nuswide.py; keep the images in
{root}/Flickr/ when training from images.
"""


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
class DownloadError(PreprocError):
    """An expected failure of the download itself (network, server, checksum); its message says what happened
    and what to do. Exit code 1: not the user's data or usage."""

    exit_code = 1


class ChecksumError(DownloadError):
    """The bytes do not match the expected size or digest."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the destination folder."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def verify(path: Path, md5: Optional[str], size: Optional[int], sha256: Optional[str]) -> Optional[str]:
    """None when ``path`` matches every known value (size, md5, sha256), else what differs."""
    from torchvision.datasets.utils import calculate_md5  # here: importing it loads torch (seconds)

    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size is {actual_size} bytes, expected {size} bytes"
    if md5 and (got := calculate_md5(path)) != md5.lower():
        return f"md5 is {got}, expected {md5.lower()}"
    if sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            return f"sha256 is {digest.hexdigest()}, expected {sha256.lower()}"
    return None


def _describe_network_error(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            return f"the host name could not be resolved ({reason}); are you offline?"
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return "the connection timed out"
        if isinstance(reason, ConnectionRefusedError):
            return "the connection was refused"
        return f"{reason}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "the connection timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection was closed before the transfer finished"
    return f"{type(exc).__name__}: {exc}"


def _network_error(url: str, dest: Path, exc: BaseException, partial: Optional[Path] = None) -> DownloadError:
    lines = [
        f"could not download {url}",
        f"  reason: {_describe_network_error(exc)}",
    ]
    if partial is not None and partial.exists() and partial.stat().st_size > 0:
        lines.append(f"  {partial.stat().st_size} bytes were kept in {partial}; "
                     "running the same command again resumes from there.")
    lines += [
        "  what to do: check your internet connection and proxy settings "
        "(http_proxy / https_proxy are honoured) and run the same command again;",
        f"  or download the file by hand (e.g. `wget -c {url} -O {dest}`), so that it is",
        f"    {dest}",
        "  and run the same command again: it will verify and extract it.",
    ]
    return DownloadError("\n".join(lines))


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   socket.timeout, TimeoutError)


def _parse_content_range(value: Optional[str]):
    """Parse 'bytes a-b/N' or 'bytes */N' into (a, b, N); parts may be None."""
    value = (value or "").strip()
    if not value.lower().startswith("bytes"):
        return None, None, None
    span, _, total = value[5:].strip().partition("/")
    total_n = int(total) if total.strip().isdigit() else None
    start, _, end = span.partition("-")
    try:
        return int(start), int(end), total_n
    except ValueError:  # also 'bytes */N'
        return None, None, total_n


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------
def download(url: str, dest, md5: Optional[str] = None, size: Optional[int] = None,
             chunk: int = 1 << 20, timeout: float = DEFAULT_TIMEOUT,
             sha256: Optional[str] = None, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` with resume, and verify size / checksums.

    The data is written to ``<dest>.part`` and renamed to ``dest`` only after
    every known check passed; a ``.part`` that fails them is deleted.  A ``.part``
    left by an earlier attempt is resumed with a Range request.  If ``dest``
    already exists it is verified without any request; when it does not match, a
    :class:`ChecksumError` says so and the file is left exactly as it is (it may
    be the user's own download).  Expected failures raise :class:`DownloadError`
    with a message meant for the user.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    checked = [name for name, value in (("size", size), ("md5", md5), ("sha256", sha256)) if value is not None]

    # 1. an existing final file: verified, never renamed or deleted
    if dest.exists():
        if not quiet:
            print(f"{dest} already exists; verifying it ..." if checked else
                  f"{dest} already exists (no checksum known, assuming it is complete).", flush=True)
        problem = verify(dest, md5, size, sha256)
        if problem is None:
            if not quiet:
                print(f"{dest.name}: already downloaded, OK.")
            return dest
        raise ChecksumError(
            f"{dest} is not the expected archive: its {problem}.\n"
            "  The file was left as it is.  what to do: if it is an incomplete download, complete it\n"
            f"  (e.g. `wget -c {url} -O {dest}`); otherwise delete it (or move it away) and run the\n"
            f"  same command again to download it afresh from {url}")

    # 2. download into .part, resuming what an earlier attempt left (unless that is already complete)
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if not (size is not None and offset == size and offset > 0):
        _fetch(url, dest, part, offset, size, chunk, timeout, quiet)

    # 3. verify, then publish under the final name
    problem = verify(part, md5, size, sha256)
    if problem is not None:
        part.unlink()
        raise ChecksumError(
            f"the download of {url} is corrupt: its {problem}.\n"
            f"  nothing was saved as {dest} and the bad download was deleted.\n"
            "  what to do: run the same command again to download it afresh.  If the mismatch persists,\n"
            "  the file on the server may have changed or a proxy may alter it: try another network,\n"
            "  or download it by hand and compare its checksum.")
    os.replace(part, dest)
    if not quiet:
        status = f"verified ({', '.join(checked)})" if checked else "no checksum known to verify"
        print(f"{dest.name}: downloaded, {status}.")
    return dest


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch(url: str, dest: Path, part: Path, offset: int, size: Optional[int],
           chunk: int, timeout: float, quiet: bool) -> None:
    """Bring ``part`` to the complete content of ``url`` (resuming at ``offset``)."""
    for _attempt in range(2):  # a second attempt only after a failed resume
        try:
            response = _open(url, offset, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset > 0:
                _, _, total = _parse_content_range(exc.headers.get("Content-Range") if exc.headers else None)
                exc.close()
                if offset == (size if size is not None else total):
                    if not quiet:
                        print(f"{dest.name}: the partial download is already complete.")
                    return
                if not quiet:
                    print(f"{dest.name}: the server cannot resume at byte {offset}; restarting from zero.")
                part.unlink()
                offset = 0
                continue
            raise _network_error(url, dest, exc, part) from None
        except _NETWORK_ERRORS as exc:
            raise _network_error(url, dest, exc, part) from None

        with response:
            status = getattr(response, "status", None) or response.getcode()
            length_header = response.headers.get("Content-Length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            mode, total = "wb", length
            if offset > 0 and status == 206:
                start, _end, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    if not quiet:
                        print(f"{dest.name}: the server resumed at the wrong byte; restarting from zero.")
                    part.unlink()
                    offset = 0
                    continue
                if total is None and length is not None:
                    total = offset + length
                mode = "ab"
            elif offset > 0:
                if not quiet:
                    print(f"{dest.name}: the server ignored the resume request; restarting from zero.")
                offset = 0

            if size is not None and total is not None and total != size:
                raise ChecksumError(
                    f"the server reports {total} bytes for {url}, expected {size} bytes.\n"
                    f"  nothing was saved as {dest}.\n"
                    "  what to do: the file on the server may have changed, or a proxy/captive portal\n"
                    "  answered instead of the server; check the URL in a browser, or download the\n"
                    f"  file by hand to {dest} and run the same command again to verify it.")
            if total is not None and not quiet:
                free = shutil.disk_usage(part.parent).free
                if free < total - offset:
                    print(f"warning: {total - offset} bytes are needed but only {free} are free "
                          f"on the disk holding {part.parent}.", file=sys.stderr)
            if not quiet:
                print(f"{'resuming' if mode == 'ab' else 'downloading'} {url}\n  -> {dest}", flush=True)

            progress = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=dest.name, disable=quiet)
            received = 0
            try:
                with open(part, mode) as out:
                    while True:
                        try:
                            block = response.read(chunk)
                        except (*_NETWORK_ERRORS, OSError) as exc:  # OSError: e.g. connection reset mid-stream
                            out.flush()
                            raise _network_error(url, dest, exc, part) from None
                        if not block:
                            break
                        try:
                            out.write(block)
                        except OSError as exc:
                            raise DownloadError(
                                f"{describe_os_error(part, exc)}.\n"
                                "  The download resumes from there when you run the same command again.") from None
                        received += len(block)
                        progress.update(len(block))
            finally:
                progress.close()

            if length is not None and received < length:
                raise _network_error(url, dest, http.client.IncompleteRead(b"", length - received), part)
            return
    raise DownloadError(  # pragma: no cover - only after two failed resumes
        f"could not resume the download of {url}.\n"
        f"  what to do: delete {part} and run the same command again.")


# --------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------
def _inside(root: Path, name: str) -> bool:
    """Whether the archive member path ``name`` stays inside the (resolved) folder ``root``."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or norm[1:2] == ":" or ".." in PurePosixPath(norm).parts:
        return False
    target = (root / norm).resolve()
    return target == root or root in target.parents


def _check_members(archive: Path, dest: Path, kind: str) -> None:
    """Refuse, before anything is written, members whose name or link target would land outside
    ``dest`` (absolute, ``..``, drive letters) and device files.  torchvision extracts tar files
    without tarfile's ``filter="data"``, so this check is ours."""
    paths = []
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            paths = zf.namelist()
    else:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf.getmembers():
                if m.isdev():
                    raise UnsafeArchiveError(f"refusing to extract {archive}: member {m.name!r} is a device file.")
                paths.append(m.name)
                if m.issym():
                    paths.append(m.linkname if m.linkname.startswith("/")
                                 else str(PurePosixPath(m.name).parent / m.linkname))
                elif m.islnk():
                    paths.append(m.linkname)
    root = dest.resolve()
    for name in paths:
        if not _inside(root, name):
            raise UnsafeArchiveError(
                f"refusing to extract {archive}: member {name!r} would be written outside {dest}.\n"
                "  The archive is not the expected official file (or it was tampered with); nothing was\n"
                "  extracted.  what to do: delete it and download it again from the official source.")


def extract(archive, dest) -> None:
    """Extract a tar / tar.gz / tgz / zip ``archive`` into the folder ``dest`` (torchvision's
    ``extract_archive``), after checking every member (see ``_check_members``)."""
    from torchvision.datasets.utils import extract_archive  # here: importing it loads torch (seconds)

    archive, dest = Path(archive), Path(dest)
    kind = "zip" if zipfile.is_zipfile(archive) else ("tar" if tarfile.is_tarfile(archive) else None)
    if kind is None:
        raise DownloadError(
            f"{archive} is neither a tar nor a zip archive.\n"
            "  what to do: delete it and run the same command again; if it happens again, open the\n"
            "  URL in a browser: the server may be returning an error page.")
    try:
        _check_members(archive, dest, kind)
        dest.mkdir(parents=True, exist_ok=True)
        extract_archive(archive, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # disk full, no permission, ...
            raise PreprocError(describe_os_error(exc.filename or dest, exc)) from None  # local: exit 2
        raise DownloadError(
            f"could not extract {archive}: {exc}.\n"
            "  what to do: the archive is probably truncated or corrupt; delete it and run the\n"
            "  same command again.") from None


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def next_commands(dataset: str, data_root: Optional[str] = None) -> List[str]:
    """The commands to run after this script (paths added for a non-default root)."""
    fmt = f"python preproc/format_{dataset}.py"
    gen = f"python preproc/generate_observed_labels.py --dataset {dataset}"
    if data_root is not None and Path(data_root) != Path("./data"):
        folder = (Path(data_root) / dataset).as_posix()
        fmt += f" --load-path {shlex.quote(folder)} --save-path {shlex.quote(folder)}"
        gen += f" --data-root {shlex.quote(Path(data_root).as_posix())}"
    return [fmt, gen]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download, verify and extract the official dataset archives.")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", default="./data",
                        help="folder holding one sub-folder per dataset (default: ./data)")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the downloaded archives after a successful extraction")
    parser.add_argument("--no-extract", action="store_true",
                        help="only download and verify the archives")
    parser.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT,
                        help=f"network timeout in seconds (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> None:
    dataset = args.dataset
    root = Path(args.data_root) / dataset

    if dataset == "nuswide":
        fmt, gen = next_commands(dataset, args.data_root)
        print(NUSWIDE_INSTRUCTIONS.format(page=NUSWIDE_PAGE, root=root.as_posix(),
                                          format_cmd=fmt, observed_cmd=gen))
        return

    check_output_folder(root, "--data-root")
    for item in SOURCES[dataset]:
        archive_path = root / item.filename
        marker = root / f".extracted_{item.filename}"
        if marker.exists():
            print(f"{item.filename}: already extracted into {root} "
                  f"(delete {marker} to extract it again); skipping.")
            continue
        try:
            download(item.url, archive_path, md5=item.md5, size=item.size, sha256=item.sha256,
                     timeout=args.timeout, quiet=args.quiet)
            if args.no_extract:
                continue
            print(f"extracting {archive_path} -> {root} ...", flush=True)
            extract(archive_path, root)
            marker.write_text(f"{item.url}\n")
            if not args.keep_archives:
                archive_path.unlink()
                print(f"{item.filename}: extracted; archive deleted (use --keep-archives to keep it).")
            else:
                print(f"{item.filename}: extracted; archive kept at {archive_path}.")
        except OSError as exc:  # a file in the way, no permission, a full disk, ...
            raise PreprocError(describe_os_error(exc.filename or root, exc)) from None  # local: exit 2

    if args.no_extract:
        print(f"\nArchives downloaded to {root} (not extracted). To extract them, run again without --no-extract.")
    else:
        print(f"\n{dataset}: raw data ready in {root}.")
    print("Next steps:")
    for command in next_commands(dataset, args.data_root):
        print(f"  {command}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        return run_main(lambda: _run(args))
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume the download.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
