#!/usr/bin/env python
"""Download and extract the raw datasets used in the experiments.

Usage::

    python preproc/download.py --dataset {pascal,coco,nuswide,cub}
                               [--data-root ./data] [--keep-archives]
                               [--no-extract] [--timeout 60]

For every official archive of the chosen dataset the script

1. downloads it to ``<data-root>/<dataset>/<archive>``.  The bytes first go to
   ``<archive>.part``; an interrupted download is resumed with an HTTP Range
   request when the command is run again (a server that ignores Range is
   handled by restarting from byte zero);
2. checks the size and the md5 (and sha256, where known) against the values
   in :data:`SOURCES`.  Only a file that passed these checks is renamed to its
   final name, so a half-written or corrupt download never looks complete;
3. extracts it into ``<data-root>/<dataset>/`` (tar, tar.gz/tgz and zip are
   supported; members that would land outside that folder are refused) and
   writes a marker ``.extracted_<archive>`` so that a later run skips it;
4. deletes the archive unless ``--keep-archives`` is given.

At the end it prints the next commands to run (``preproc/format_<d>.py``,
then ``preproc/generate_observed_labels.py``).

NUS-WIDE cannot be fetched automatically (the images are handed out by its
authors on request); for it the script only prints what to obtain and where to
put it, and exits with status 0.

Expected failures (no network, HTTP errors, checksum mismatch, unsafe or
corrupt archive) are reported on stderr as a short explanation of what failed
and what to do, with exit status 1 and no traceback.

Only the standard library is needed; ``tqdm`` is used for progress bars when
it is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence

try:  # optional progress bar
    from tqdm import tqdm as _tqdm  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _tqdm = None


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
class DownloadError(Exception):
    """An expected failure; its message says what happened and what to do."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected size or digest."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the destination folder."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024.0 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    return f"{value:.1f} TiB"  # pragma: no cover


def _hash_file(path: Path, algorithms: Sequence[str], chunk: int = 1 << 20) -> Dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algorithms}
    if not hashers:
        return {}
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _check_file(path: Path, md5: Optional[str], size: Optional[int],
                sha256: Optional[str]) -> Optional[str]:
    """Return None when ``path`` matches everything known, else a description."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size is {actual_size} bytes, expected {size} bytes"
    wanted = {}
    if md5:
        wanted["md5"] = md5.lower()
    if sha256:
        wanted["sha256"] = sha256.lower()
    if not wanted:
        return None
    got = _hash_file(path, list(wanted))
    for name, expected in wanted.items():
        if got[name] != expected:
            return f"{name} is {got[name]}, expected {expected}"
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
        lines.append(f"  {_fmt_bytes(partial.stat().st_size)} were kept in {partial}; "
                     "running the same command again resumes from there.")
    lines += [
        "  what to do: check your internet connection and proxy settings "
        "(http_proxy / https_proxy are honoured) and run the same command again;",
        f"  or download the file by hand (e.g. `wget -c {url}`), save it as",
        f"    {dest}",
        "  and run the same command again: it will verify (and resume if incomplete) and extract it.",
    ]
    return DownloadError("\n".join(lines))


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   socket.timeout, TimeoutError)


class _Progress:
    """tqdm when available, otherwise a line every few seconds."""

    def __init__(self, label: str, total: Optional[int], initial: int, quiet: bool = False):
        self.label = label
        self.total = total
        self.done = initial
        self.quiet = quiet
        self.bar = None
        self.last_print = 0.0
        self.start = time.monotonic()
        self.start_done = initial
        if quiet:
            return
        if _tqdm is not None:
            self.bar = _tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=label, leave=True)
        else:
            self._print(force=True)

    def _print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < 5.0:
            return
        self.last_print = now
        elapsed = max(now - self.start, 1e-6)
        rate = (self.done - self.start_done) / elapsed
        pct = f" ({100.0 * self.done / self.total:5.1f}%)" if self.total else ""
        print(f"  {self.label}: {_fmt_bytes(self.done)} / {_fmt_bytes(self.total)}{pct}"
              f"  {_fmt_bytes(rate)}/s", flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._print()

    def close(self) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._print(force=True)


def _parse_content_range(value: Optional[str]):
    """Parse 'bytes a-b/N' or 'bytes */N' into (a, b, N); parts may be None."""
    if not value:
        return None, None, None
    value = value.strip()
    if not value.lower().startswith("bytes"):
        return None, None, None
    rest = value[5:].strip()
    span, _, total = rest.partition("/")
    total_n = int(total) if total.strip().isdigit() else None
    if span.strip() == "*":
        return None, None, total_n
    start, _, end = span.partition("-")
    try:
        return int(start), int(end), total_n
    except ValueError:
        return None, None, total_n


def _move_aside(path: Path) -> Path:
    """Rename a bad ``<file>.part`` to ``<file>.corrupt`` (replacing an older one)."""
    name = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    bad = path.with_name(name + ".corrupt")
    os.replace(path, bad)
    return bad


# --------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------
def download(url: str, dest, md5: Optional[str] = None, size: Optional[int] = None,
             chunk: int = 1 << 20, timeout: float = DEFAULT_TIMEOUT,
             sha256: Optional[str] = None, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` with resume, and verify size / checksums.

    The data is written to ``<dest>.part`` and renamed to ``dest`` only after
    every known check passed.  A ``.part`` file left by an earlier attempt is
    resumed with a Range request.  If ``dest`` already exists and matches, no
    request is made.  Raises :class:`DownloadError` (or its subclass
    :class:`ChecksumError`) with a message meant for the user.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    # 1. an existing final file
    if dest.exists():
        if size is not None and dest.stat().st_size < size and not part.exists():
            # most likely an incomplete manual download: continue it
            if not quiet:
                print(f"{dest} is smaller than expected; resuming it.")
            os.replace(dest, part)
        else:
            if not quiet:
                if md5 or sha256 or size is not None:
                    print(f"{dest} already exists; verifying it ...", flush=True)
                else:
                    print(f"{dest} already exists (no checksum known, assuming it is complete).")
            problem = _check_file(dest, md5, size, sha256)
            if problem is None:
                if not quiet:
                    print(f"{dest.name}: already downloaded, OK.")
                return dest
            raise ChecksumError(
                f"the existing file {dest} does not match the expected archive: {problem}.\n"
                f"  what to do: delete it (or move it away) and run the same command again to "
                f"download it from {url}.")

    # 2. a complete .part file needs no request at all
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0

    if not (size is not None and offset == size and offset > 0):
        _fetch(url, dest, part, offset, size, chunk, timeout, quiet)

    # 3. verify, then publish under the final name
    problem = _check_file(part, md5, size, sha256)
    if problem is not None:
        bad = _move_aside(part)
        raise ChecksumError(
            f"the download of {url} is corrupt: {problem}.\n"
            f"  nothing was saved as {dest}; the bad bytes were moved to {bad}.\n"
            "  what to do: delete that file and run the same command again to download it afresh.\n"
            "  If the mismatch persists, the file on the server may have changed or a proxy may\n"
            "  alter it: try another network, or download it by hand and compare its checksum.")
    os.replace(part, dest)
    if not quiet:
        checked = [name for name, value in (("size", size), ("md5", md5), ("sha256", sha256))
                   if value is not None]
        status = f"verified ({', '.join(checked)})" if checked else "no checksum known to verify"
        print(f"{dest.name}: downloaded, {status}.")
    return dest


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)


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
                if (size is not None and offset == size) or (size is None and total == offset):
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
            else:
                if offset > 0 and not quiet:
                    print(f"{dest.name}: the server ignored the resume request; restarting from zero.")
                offset = 0
                total = length
                mode = "wb"

            if size is not None and total is not None and total != size:
                raise ChecksumError(
                    f"the server reports {total} bytes for {url}, expected {size} bytes.\n"
                    f"  nothing was saved as {dest}.\n"
                    "  what to do: the file on the server may have changed, or a proxy/captive portal\n"
                    "  answered instead of the server; check the URL in a browser, or download the\n"
                    f"  file by hand to {dest} and run the same command again to verify it.")

            if total is not None:
                free = shutil.disk_usage(part.parent).free
                if free < total - offset and not quiet:
                    print(f"warning: {total - offset} bytes are needed but only {free} are free "
                          f"on the disk holding {part.parent}.", file=sys.stderr)

            if not quiet:
                what = "resuming" if mode == "ab" else "downloading"
                print(f"{what} {url}\n  -> {dest}", flush=True)
            progress = _Progress(dest.name, total, offset, quiet)
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
                                f"could not write to {part}: {exc}.\n"
                                "  what to do: free some disk space (or choose another --data-root) "
                                "and run the same command again; the download resumes.") from None
                        received += len(block)
                        progress.update(len(block))
            finally:
                progress.close()

            if length is not None and received < length:
                raise _network_error(
                    url, dest,
                    http.client.IncompleteRead(b"", length - received), part)
            return
    raise DownloadError(  # pragma: no cover - only after two failed resumes
        f"could not resume the download of {url}.\n"
        f"  what to do: delete {part} and run the same command again.")


# --------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------
def _check_member_name(name: str, dest: Path, archive: Path) -> None:
    norm = name.replace("\\", "/")
    pure = PurePosixPath(norm)
    unsafe = (
        norm.startswith("/")
        or (len(norm) > 1 and norm[1] == ":")  # windows drive, e.g. C:
        or any(p == ".." for p in pure.parts)
    )
    if not unsafe:
        target = (dest / norm).resolve()
        root = dest.resolve()
        unsafe = not (target == root or root in target.parents)
    if unsafe:
        raise UnsafeArchiveError(
            f"refusing to extract {archive}: member {name!r} would be written outside {dest}.\n"
            "  The archive is not the expected official file (or it was tampered with); nothing was\n"
            "  extracted.  what to do: delete it and download it again from the official source.")


def extract(archive, dest) -> None:
    """Extract a tar / tar.gz / tgz / zip ``archive`` into the folder ``dest``.

    Every member is checked before anything is written: absolute paths,
    ``..`` components, links pointing outside ``dest`` and device files raise
    :class:`UnsafeArchiveError`.
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lower = archive.name.lower()
    if lower.endswith(".zip"):
        kind = "zip" if zipfile.is_zipfile(archive) else None
    elif lower.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")):
        kind = "tar" if tarfile.is_tarfile(archive) else None
    else:  # unknown suffix: sniff the content
        kind = "zip" if zipfile.is_zipfile(archive) else ("tar" if tarfile.is_tarfile(archive) else None)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member_name(info.filename, dest, archive)
                zf.extractall(dest)
            return
        if kind == "tar":
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member_name(m.name, dest, archive)
                    if m.isdev():
                        raise UnsafeArchiveError(
                            f"refusing to extract {archive}: member {m.name!r} is a device file.")
                    if m.issym():
                        link_target = str(PurePosixPath(m.name).parent / m.linkname)
                        if m.linkname.startswith("/"):
                            link_target = m.linkname
                        _check_member_name(link_target, dest, archive)
                    elif m.islnk():
                        _check_member_name(m.linkname, dest, archive)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tf.extractall(dest, members=members)
            return
    except UnsafeArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DownloadError(
            f"could not extract {archive}: {exc}.\n"
            "  what to do: the archive is probably truncated or corrupt; delete it and run the\n"
            "  same command again (or free disk space if the disk is full).") from None
    raise DownloadError(
        f"{archive} is neither a tar nor a zip archive.\n"
        "  what to do: delete it and run the same command again; if it happens again, open the\n"
        "  URL in a browser: the server may be returning an error page.")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def next_commands(dataset: str, data_root: Optional[str] = None) -> List[str]:
    """The commands to run after this script (paths added for a non-default root)."""
    fmt = f"python preproc/format_{dataset}.py"
    gen = f"python preproc/generate_observed_labels.py --dataset {dataset}"
    if data_root is not None and Path(data_root) != Path("./data"):
        folder = (Path(data_root) / dataset).as_posix()
        fmt += f" --load-path {folder} --save-path {folder}"
        gen += f" --data-root {Path(data_root).as_posix()}"
    return [fmt, gen]


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
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"network timeout in seconds (default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    dataset = args.dataset
    root = Path(args.data_root) / dataset

    if dataset == "nuswide":
        fmt, gen = next_commands(dataset, args.data_root)
        print(NUSWIDE_INSTRUCTIONS.format(page=NUSWIDE_PAGE, root=root.as_posix(),
                                          format_cmd=fmt, observed_cmd=gen))
        return 0

    archives = SOURCES.get(dataset, [])
    if not archives:
        raise DownloadError(f"no download source is configured for {dataset!r}.")

    for item in archives:
        archive_path = root / item.filename
        marker = root / f".extracted_{item.filename}"
        if marker.exists():
            print(f"{item.filename}: already extracted into {root} "
                  f"(delete {marker} to extract it again); skipping.")
            continue
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

    if args.no_extract:
        print(f"\nArchives downloaded to {root} (not extracted). To extract them, run again without --no-extract.")
    else:
        print(f"\n{dataset}: raw data ready in {root}.")
    print("Next steps:")
    for command in next_commands(dataset, args.data_root):
        print(f"  {command}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        return _run(args)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume the download.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
