"""Atomic file output, shared by the preprocessing scripts and the training code (standard library only).

Every file this project writes (formatted arrays, observed labels, results.json, checkpoints) goes through
`write_atomic`: readers never see a partial file, an interrupted write leaves no file under the final name, and
a leftover temporary of a killed process is recognisable (`.<name>.<host>.<pid>.<hex>.tmp`) and removed by
`remove_stale_temporaries` at the next start in that folder.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Callable


# `.<name>.<host>.<pid>.<random>.tmp`: the host (a hash of its name) and pid say whose it is, so a folder shared
# between machines (a cluster's file system) never loses another machine's file being written.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class OutputError(OSError):
    """A file could not be written (no space, no permission, a file where a folder should be); one line."""


def describe_os_error(path: os.PathLike | str, exc: OSError) -> str:
    """One line naming `path` and what to do about `exc`."""
    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: no space left on the device; free some space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (read-only or not writable); choose a writable folder"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return f"cannot write {path}: a file is in the way of a folder on that path; choose another path"
    return f"cannot write {path}: {exc.strerror or exc}"


def write_atomic(path: os.PathLike | str, write: Callable[[str], None]) -> Path:
    """Create ``path`` through ``write(tmp_path)`` on a temporary file in the same folder, then
    ``os.replace``: readers never see a partial file and an interrupted write leaves none behind.
    The temporary file is created with "x" mode, so the result gets the usual umask permissions.
    An OSError (full disk, no permission, ...) becomes an OutputError with a one-line message."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(tmp, "xb").close()
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, describe_os_error(path, exc)) from exc
        raise
    return path


def file_sha256(path: os.PathLike | str) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # exists but is someone else's / not a valid pid
        return True
    return True


def remove_stale_temporaries(folder: os.PathLike | str) -> list[Path]:
    """Delete temporaries that `write_atomic` left behind when its process was killed (kill -9, power loss).

    Only files of our own naming pattern, made on this machine by a process that no longer exists, are
    removed; returns them.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TMP_PATTERN.match(entry.name)
        if (match and match["host"] == _HOST and int(match["pid"]) != os.getpid()
                and not pid_alive(int(match["pid"])) and entry.is_file()):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed
