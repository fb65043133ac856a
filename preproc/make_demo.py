"""Generate the bundled demo dataset: small images of coloured shapes, several per image (no download).

    python preproc/make_demo.py [--save-path ./data/demo]

12 classes = 4 shapes x 3 colours. Each image holds 1-3 shapes at random places on a noisy background, so
labels are genuinely multi-label and need a CNN to find them. Generation is deterministic (fixed seed) and
writes the same layout as the real datasets: images/<n>.png, formatted_{train,val}_{images,labels}.npy,
the single-positive formatted_{train,val}_labels_obs.npy (generate_observed_labels with seed 1200) and
dataset.json with the 12 class names (also in classes.txt).
`main.py -d demo` calls `ensure_demo` and so generates it on first use.

Safe to interrupt and to run twice at once: the demo is generated into a fresh hidden sibling folder
(`.<name>-tmp-<pid>-<hex>`), the completion marker `.demo-complete` is written last, and the folder is then
renamed into place, all under a lock (`.<name>.lock` beside it). A folder without a valid marker is never used.
Only a new folder, an empty one or one holding just the shipped README.md (kept) is written into, or one
holding nothing but the demo's own files; anything else is refused with a one-line `DemoError`, and no file
that is not the demo's is ever deleted or overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock; the atomic rename still never publishes a half demo
    fcntl = None

import numpy as np
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.common import DATASET_JSON, PreprocError, run_main, write_dataset_json  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402
from fileio import describe_os_error, write_atomic  # noqa: E402

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 50), "blue": (40, 70, 220)}
CLASS_NAMES = tuple(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)
NUM_TRAIN, NUM_TEST, SIZE, SEED = 4000, 1000, 48, 0
FILES = [f"formatted_{phase}_{kind}.npy" for phase in ("train", "val")
         for kind in ("images", "labels", "labels_obs")]
MARKER = ".demo-complete"  # written last: a folder without it (or with another version's) is never used
FORMAT_VERSION = 3  # 1: the generator before the completion marker; 2: before dataset.json
README = "README.md"  # the repository ships data/demo/README.md: always kept
# Folders derived from the images, dropped when the demo is regenerated: "cache" (--image-cache disk) and
# "features" (preproc/extract_features.py).
DERIVED = frozenset(["cache", "features"])
KNOWN_NAMES = frozenset([*FILES, DATASET_JSON, "images", "classes.txt", MARKER, README, *DERIVED])
_IMAGE_NAME = re.compile(r"^\d+\.png$")


class DemoError(PreprocError, ValueError):
    """A one-line, user-fixable problem with the demo folder (main.py prints ValueErrors as `error: ...`,
    the script's run_main prints PreprocErrors)."""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)


def make_image(rng: np.random.RandomState) -> tuple[Image.Image, np.ndarray]:
    """One image with 1-3 random shapes (classes may repeat) and its 0/1 label vector."""
    background = rng.randint(150, 235, size=(SIZE, SIZE, 3)).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    labels = np.zeros(len(CLASS_NAMES))
    for _ in range(rng.randint(1, 4)):
        c = rng.randint(len(CLASS_NAMES))
        colour_name, shape = CLASS_NAMES[c].split("_")
        r = rng.uniform(6, 10)
        cx, cy = rng.uniform(r, SIZE - r, size=2)
        _draw_shape(draw, shape, COLOURS[colour_name], cx, cy, r)
        labels[c] = 1.0
    return img, labels


def _marker(version: int = FORMAT_VERSION) -> dict:
    """What the completion marker holds: a folder of another version or other sizes is not this demo."""
    return {"format": "spml-demo", "version": version, "num_train": NUM_TRAIN, "num_test": NUM_TEST,
            "size": SIZE, "seed": SEED}


def is_complete(folder: os.PathLike | str, version: int = FORMAT_VERSION) -> bool:
    """Whether `folder` holds a finished demo of this version (or of `version`): our marker (written last),
    every array (and from version 3 dataset.json) and exactly the expected number of images."""
    folder = Path(folder)
    files = [*FILES, "classes.txt"] + ([DATASET_JSON] if version >= 3 else [])
    try:
        if json.loads((folder / MARKER).read_text()) != _marker(version):
            return False
        if not all((folder / name).is_file() for name in files):
            return False
        return len(os.listdir(folder / "images")) == NUM_TRAIN + NUM_TEST
    except (OSError, ValueError):
        return False


def _write_dataset_json(folder: Path) -> None:
    try:
        write_dataset_json(folder, class_names=CLASS_NAMES, image_folder="images", single_positive=False,
                           source="preproc/make_demo.py")
    except PreprocError as exc:  # a write error: one line, as every DemoError
        raise DemoError(str(exc)) from exc


def _upgrade(folder: Path) -> None:
    """Make a finished version-2 demo (identical arrays and images) a version-3 one in place: add dataset.json,
    then the new marker (atomically, last), leaving every other file, derived folders included, as it is."""
    _write_dataset_json(folder)
    write_atomic(folder / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(_marker(), sort_keys=True) + "\n"))
    print(f"added {DATASET_JSON} to the demo in {folder}", flush=True)


def _has_our_classes(folder: Path) -> bool:
    try:
        return (folder / "classes.txt").read_text().split() == list(CLASS_NAMES)
    except (OSError, UnicodeDecodeError):
        return False


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that the generator did not write (looking into images/ too). A symlink counts as what
    it points to (a regeneration removes the link, never its target). Formatted arrays (and a dataset.json)
    without our classes.txt and marker may be another dataset's: foreign too."""
    foreign = []
    names = sorted(os.listdir(folder))
    for name in names:
        path = folder / name
        if name not in KNOWN_NAMES:
            foreign.append(name)
        elif name == "images":
            if not path.is_dir():
                foreign.append(name)
            else:
                foreign += [f"images/{n}" for n in sorted(os.listdir(path))
                            if not _IMAGE_NAME.match(n) or not (path / n).is_file()]
        elif name in DERIVED:
            if not path.is_dir():
                foreign.append(name)
        elif not path.is_file():
            foreign.append(name)
    if MARKER not in names and not _has_our_classes(folder):
        foreign += [name for name in [*FILES, DATASET_JSON] if name in names]
    return foreign


def _looks_like_demo(folder: Path) -> bool:
    """Whether `folder` is itself a demo folder: finished (marker), an older version's, or the shipped
    data/demo with only its README."""
    if (folder / MARKER).is_file() or (_has_our_classes(folder) and (folder / FILES[0]).is_file()):
        return True
    try:
        return (folder / README).read_text(errors="replace").startswith("# Demo dataset")
    except OSError:
        return False


_LEFTOVER = re.compile(r"^\.(?P<dest>.+)-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_leftovers(dest: Path, locked: bool) -> None:
    """Remove what an interrupted run (kill -9, power loss) left beside `dest`: our temporary and backup folders
    (and the `.partial` folder of the generator's first version), only where they hold nothing but demo files.
    A backup whose demo folder is missing (killed between the two renames of a regeneration) is put back."""
    for path in sorted(dest.parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if path.name == dest.name + ".partial":
            pid, kind = None, "tmp"
        elif match and match["dest"] == dest.name:
            pid, kind = int(match["pid"]), match["kind"]
        else:
            continue
        if path.is_symlink() or not path.is_dir() or (not locked and (pid is None or _pid_alive(pid))):
            continue
        if kind == "old" and not os.path.lexists(dest):
            os.rename(path, dest)
        elif not _foreign_entries(path):
            shutil.rmtree(path)


@contextmanager
def _lock(dest: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `.<name>.lock` beside `dest` (released when the process ends, even by kill -9);
    yields whether it is held (False where the platform or file system has no flock)."""
    if fcntl is None:  # pragma: no cover
        yield False
        return
    lock_path = dest.parent / f".{dest.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            print(f"waiting for another process that is generating the demo into {dest} (lock {lock_path}) ...",
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # pragma: no cover - e.g. ENOLCK on some network file systems
            locked = False
        yield locked
    finally:
        os.close(fd)


def _generate(dest: Path) -> Path:
    """Generate the whole demo into a fresh hidden sibling of `dest` and return it; the marker comes last.
    A README.md in `dest` is copied in. On any failure the sibling is removed."""
    tmp = dest.parent / f".{dest.name}-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        (tmp / "images").mkdir()
        rng = np.random.RandomState(SEED)
        arrays = {}
        for phase, count, offset in (("train", NUM_TRAIN, 0), ("val", NUM_TEST, NUM_TRAIN)):
            names, labels = [], []
            for n in range(offset, offset + count):
                img, lab = make_image(rng)
                name = f"{n:05d}.png"
                img.save(tmp / "images" / name)
                names.append(name)
                labels.append(lab)
            arrays[f"formatted_{phase}_images.npy"] = np.array(names)
            arrays[f"formatted_{phase}_labels.npy"] = np.array(labels, dtype=np.float64).reshape(-1, len(CLASS_NAMES))
            arrays[f"formatted_{phase}_labels_obs.npy"] = generate_observed(
                arrays[f"formatted_{phase}_labels.npy"], num_pos=1, num_neg=0, seed=1200)
        for name, arr in arrays.items():
            np.save(tmp / name, arr)
        (tmp / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
        _write_dataset_json(tmp)
        if (dest / README).is_file():
            shutil.copy2(dest / README, tmp / README)
        if dest.is_dir():
            shutil.copymode(dest, tmp)
        (tmp / MARKER).write_text(json.dumps(_marker(), sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, dest: Path) -> None:
    """Put the finished `tmp` in place of `dest`: one rename if `dest` does not exist, else rename `dest` to a
    backup, `tmp` to `dest`, and delete the backup (checked beforehand to hold only demo files or README.md)."""
    backup = None
    try:
        if os.path.lexists(dest):
            backup = dest.parent / f".{dest.name}-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, backup)
        os.rename(tmp, dest)
    except BaseException:
        if backup is not None and backup.is_dir() and not os.path.lexists(dest):
            os.rename(backup, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup)


def _build(save_path: os.PathLike | str, *, force: bool, flag: str) -> bool:
    """Generate the demo into `save_path` unless it is complete (always if `force`); returns whether it did.
    Every expected problem is a one-line DemoError naming the folder and `flag`."""
    dest = Path(save_path)
    if dest.is_symlink():  # a link to the real folder: replace the folder it points to, keep the link
        dest = dest.resolve()
    if not force and is_complete(dest):
        return False
    if not is_complete(dest) and _looks_like_demo(dest.parent):
        fix = f"--data-root {dest.parent.parent}" if flag == "--data-root" else f"--save-path {dest.parent}"
        raise DemoError(f"{dest.parent} is itself the demo folder, so the demo would go into {dest}: "
                        f"pass {fix} instead")
    if os.path.lexists(dest) and not dest.is_dir():  # before the lock: nothing is left beside a refused path
        raise DemoError(f"{dest} is a file, not a folder: remove it or pass another {flag}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _lock(dest) as locked:
            _clean_leftovers(dest, locked)
            if not force and is_complete(dest):  # another process finished it while we waited
                return False
            if not force and is_complete(dest, version=2):  # the same demo without dataset.json
                _upgrade(dest)
                return True
            if os.path.lexists(dest) and not dest.is_dir():
                raise DemoError(f"{dest} is a file, not a folder: remove it or pass another {flag}")
            if dest.is_dir():
                foreign = _foreign_entries(dest)
                if foreign:
                    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                    where = "a new or empty folder" if flag == "--save-path" else "whose demo/ is new or empty"
                    raise DemoError(f"refusing to write the demo into {dest}: it holds files that are not the "
                                    f"demo's ({shown}); pass another {flag} ({where}) or move them out of it "
                                    f"yourself")
                if set(os.listdir(dest)) - {README} and not is_complete(dest):
                    print(f"{dest} holds an incomplete or older demo: regenerating it", flush=True)
            print(f"generating the demo dataset into {dest} ({NUM_TRAIN} + {NUM_TEST} images) ...", flush=True)
            _publish(_generate(dest), dest)
    except OSError as exc:
        raise DemoError(describe_os_error(exc.filename or dest, exc)) from exc
    return True


def make_demo(save_path: os.PathLike | str) -> None:
    """(Re)generate the whole demo into `save_path` (see the module docstring for what is refused)."""
    _build(save_path, force=True, flag="--save-path")


def ensure_demo(save_path: os.PathLike | str) -> None:
    """Generate the demo into `save_path` (`<data root>/demo`) unless it is complete; concurrent calls end up
    with one complete demo. Raises DemoError (a ValueError) for a folder it must not write into."""
    _build(save_path, force=False, flag="--data-root")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save-path", default="./data/demo",
                   help="output folder: new, empty (a README.md is kept) or an earlier demo, which is regenerated")
    args = p.parse_args(argv)

    def run() -> None:
        make_demo(Path(args.save_path))
        print(f"wrote the demo dataset to {args.save_path}")

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
