"""Frozen-backbone features: a backbone run once over the official train and val/test images (shared by the
linear probe and ROLE+LI, which train on the features instead of the images).

`extract_features` writes `<data_root>/<dataset>/features/<arch>_<weights>_<size>/`:

  train_features.npy  (N_train, D) float32, rows in the order of formatted_train_images.npy
  val_features.npy    (N_val, D) float32, rows in the order of formatted_val_images.npy
  info.json           how they were made (written last: a set without it is incomplete)

Each image goes through the evaluation transform (Resize((S, S)) bilinear, ToTensor, Normalize(ImageNet), no
flip), the backbone without its classifier, in eval mode, under `torch.inference_mode()`. Decoding and resizing
run in DataLoader workers, which hand uint8 images to the main process; ToTensor and Normalize are done on the
device by `image_cache.to_model_input`, whose arithmetic equals the transform's bit for bit. Where valid disk
caches of the speed work (`<data_root>/<dataset>/cache/*_<S>px.cache`) cover a split, its images are read from
them instead of decoding the JPEGs (the same uint8 values); a cache is never built just for extraction.

`decode="device"` (`--decode device`) is for GPUs that outrun the CPU's decoding: the workers only read the
files' bytes, and the main process decodes each batch on the extraction device (`torchvision.io.decode_jpeg`:
nvJPEG on CUDA, libjpeg-turbo on the CPU; other formats by `decode_image` on the CPU) and resizes there
(`transforms.v2.functional.resize`, bilinear, antialiased), then ToTensor and Normalize as above. Another decoder
and resize give features that differ from the PIL path's in the last bits (about 1e-2 relative), so the decode
mode is part of the set's key (as channels-last: same name, and a set made one way is made again the other way),
and image caches, which hold PIL-resized images, are not read.

An interrupted extraction resumes: the rows are written into `.<split>_features.npy.partial` (a memory-mapped
.npy) and `.progress.json` records how many rows are done and what they were made from (the key: arch, weights
and their file's sha256, size, channels-last, decode mode, image lists). The next run with the same key
continues at the first row not done, with the same batch boundaries (hence bit-identical to an uninterrupted
run); another key starts over. A complete set with the same key is reused, one with another key is made again,
and two runs that want the same set take turns (`.lock`, naming the host and process holding it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
# torchvision is imported inside the functions that use it: importing it takes ~2 s, which a linear probe on
# cached features (main.py --features) never needs.
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import image_cache
from config import Config
from datasets import DataError, dataset_info, generate_split
from fileio import _HOST, OutputError, describe_os_error, file_sha256, pid_alive, remove_stale_temporaries, write_atomic
from models import WeightsError, build_model
from preproc.common import format_hint

PHASES = ("train", "val")
NAMED_WEIGHTS = ("imagenet", "random")
TRANSFORM = "Resize((S,S)) bilinear, ToTensor, Normalize(ImageNet)"
DECODE_MODES = ("pil", "device")  # who decodes and resizes: PIL in the workers (the faithful path), or the device
TRANSFORMS = {"pil": TRANSFORM,
              "device": "decode_jpeg (RGB) on the device, v2 resize((S,S)) bilinear antialias, ToTensor, "
                        "Normalize(ImageNet)"}
JPEG_MAGIC = b"\xff\xd8\xff"
RANDOM_INIT_SEED = 0  # --weights random: the same random backbone in every (resumed) run
SAVE_EVERY_S = 30.0  # how often the partial file is flushed and the progress recorded (also on any stop)
PROGRESS = ".progress.json"
INFO = "info.json"
LOCK = ".lock"
WAIT_S = 2.0  # how often a second extraction of the same set looks whether the first has finished


# ----------------------------------------------------------------------------------------------------------------
# names and paths

def feature_set_name(arch: str, weights: str, image_size: int) -> str:
    """"<arch>_<weights>_<size>": `weights` as is for "imagenet"/"random", else the weights file's stem."""
    return f"{arch}_{weights if weights in NAMED_WEIGHTS else Path(weights).stem}_{image_size}"


def feature_dir(data_root: str | Path, dataset: str, name: str) -> Path:
    return Path(data_root) / dataset / "features" / name


def extract_command(dataset: str, arch: str, weights: str, image_size: int, data_root: str | Path) -> str:
    """The command line that extracts this feature set (named in error messages)."""
    args = ["--dataset", dataset, "--arch", arch, "--weights", str(weights), "--image-size", str(image_size),
            "--data-root", str(data_root)]
    return "python preproc/extract_features.py " + " ".join(shlex.quote(a) for a in args)


def _num_classes(data_root: str | Path, dataset: str) -> int:
    """The dataset's number of classes (the head that build_model adds; the features do not depend on it)."""
    return dataset_info(data_root, dataset).num_classes


def _image_root(data_root: str | Path, dataset: str) -> Path:
    """The folder that the names in formatted_*_images.npy are relative to."""
    return Path(data_root) / dataset / dataset_info(data_root, dataset).image_subdir


def _format_command(data_root: str | Path, dataset: str) -> str:
    """The command that (re)creates formatted_*.npy, with the user's data root (as datasets.load_formatted)."""
    return format_hint(Path(data_root) / dataset)


def _image_list(data_root: str | Path, dataset: str, phase: str) -> np.ndarray:
    """The names in formatted_<phase>_images.npy (only that file: the observed labels need not exist yet)."""
    path = Path(data_root) / dataset / f"formatted_{phase}_images.npy"
    command = _format_command(data_root, dataset)
    if not path.is_file():
        raise DataError(f"missing {path}; create it with: {command}")
    try:
        names = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot load {path} ({exc or 'the file is empty'}); re-create it with: {command}") from exc
    if names.ndim != 1 or names.dtype.kind != "U" or not len(names):
        raise DataError(f"{path}: expected a non-empty 1-D unicode string array, found {names.dtype} "
                        f"{names.shape}; re-create it with: {command}")
    return names


def _names_sha256(names: np.ndarray) -> str:
    """The image list's hash, as the image cache's key computes it (`images_sha256`)."""
    return hashlib.sha256("\n".join(str(p) for p in names).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# what a set is made from

def _split_key(image_root: Path, names: np.ndarray, image_size: int) -> dict:
    """What the rows of one split are made from: the image cache's own key (image list, the files' total size and
    latest modification time, PIL and torchvision versions) without its format tag."""
    key = image_cache._key(image_cache._Decoded(image_root, names, image_size), image_size)
    return {k: v for k, v in key.items() if k != "format"}


def _set_key(arch: str, weights: str, image_size: int, channels_last: bool, decode: str,
             splits: dict[str, dict]) -> dict:
    """The key of a feature set: a complete set or a partial extraction with another key is not reused. A weights
    file counts by its content (moving it keeps the key); channels-last and the decode mode count because they
    change the last bits."""
    named = weights in NAMED_WEIGHTS
    return {"arch": arch, "weights": weights if named else "file",
            "weights_sha256": None if named else file_sha256(weights),
            "random_init_seed": RANDOM_INIT_SEED if weights == "random" else None,
            "image_size": image_size, "channels_last": channels_last, "decode": decode, "splits": splits}


def _recorded_key(record: dict) -> dict:
    """The key in an info.json or progress record; one written before the decode mode was keyed was made with PIL
    (so such sets stay valid for the default)."""
    return {"decode": "pil", **record.get("key", {})}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The (dotted) fields in which two keys differ."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def _npy_shape(path: Path) -> tuple | None:
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError, EOFError):
        return None


def _complete_reason(folder: Path, key: dict) -> tuple[dict | None, str]:
    """(info, "") if `folder` holds a complete set made from `key`, else (None, why not)."""
    info = _read_json(folder / INFO)
    if info is None:
        return None, "none yet" if not (folder / INFO).exists() else f"{folder / INFO} cannot be read"
    differing = _differences(_recorded_key(info), key)
    if differing:
        return None, f"made from other {', '.join(differing)}"
    for phase in PHASES:
        expected = (info.get("rows", {}).get(phase), info.get("dim"))
        if _npy_shape(folder / f"{phase}_features.npy") != expected:
            return None, f"{phase}_features.npy is missing or not of shape {expected}"
    return info, ""


# ----------------------------------------------------------------------------------------------------------------
# the backbone

def _build_backbone(arch: str, weights: str, num_classes: int) -> nn.Module:
    """models.build_model's backbone (its classifier removed); random weights from a fixed seed, so a resumed
    extraction continues with the same network. The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_model(arch, num_classes, weights).backbone


def _feature_dim(model: nn.Module, arch: str, image_size: int, device: torch.device, channels_last: bool) -> int:
    """D of the model's (B, D) output, from one blank image; a model that cannot take the size says so now."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    probe = torch.zeros(1, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    try:
        with torch.inference_mode():
            out = model(probe)
    except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--arch {arch} cannot take --image-size {image_size} images ({first}); "
                         f"choose a larger --image-size or another --arch") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(f"the backbone of {arch} gives {getattr(out, 'shape', type(out).__name__)} per batch, "
                         f"not (B, D) features")
    return out.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# where the uint8 images come from

Batches = Iterator[tuple[int, torch.Tensor, tuple[str, ...]]]  # (first row, uint8 (B, S, S, 3), errors)


def _cached_parts(data_root: str | Path, dataset: str, phase: str, names: np.ndarray, image_root: Path,
                  image_size: int) -> tuple[list[tuple[np.ndarray, np.ndarray]] | None, str]:
    """([(official rows, their cached uint8 images)], description) when valid disk caches of the speed work hold
    every row of the official `phase`, else (None, why not). The caches hold main.py's sets: its train and val
    subsets of the official train split (the original's 80/20 split) and the official val split ("test")."""
    cache_dir = Path(data_root) / dataset / "cache"
    if phase == "train":
        train_idx, val_idx = generate_split(len(names), Config.val_frac, np.random.RandomState(Config.split_seed))
        wanted = [("train", train_idx), ("val", val_idx)]
    else:
        wanted = [("test", np.arange(len(names)))]
    parts = []
    for cache_phase, rows in wanted:
        path = cache_dir / f"{cache_phase}_{image_size}px.cache"
        key = image_cache._key(image_cache._Decoded(image_root, names[rows], image_size), image_size)
        reason = image_cache._stale_reason(path, key)
        if reason is not None:
            return None, f"no valid image cache {path} ({reason})"
        parts.append((rows, np.memmap(path, dtype=np.uint8, mode="r", offset=image_cache.HEADER_BYTES,
                                      shape=(len(rows), image_size, image_size, 3))))
    return parts, "the image cache " + " + ".join(f"{cache_dir}/{p}_{image_size}px.cache" for p, _ in wanted)


def _cache_batches(parts: list[tuple[np.ndarray, np.ndarray]], num_rows: int, start: int, batch_size: int,
                   pin: bool) -> Batches:
    """Batches of rows start, start + batch_size, ... gathered from the cache files (no decoding)."""
    part_of, position = np.empty(num_rows, dtype=np.int64), np.empty(num_rows, dtype=np.int64)
    for p, (rows, _) in enumerate(parts):
        part_of[rows], position[rows] = p, np.arange(len(rows))
    for first in range(start, num_rows, batch_size):
        rows = np.arange(first, min(first + batch_size, num_rows))
        images = torch.empty((len(rows), *parts[0][1].shape[1:]), dtype=torch.uint8, pin_memory=pin)
        out = images.numpy()
        for p, (_, cached) in enumerate(parts):
            sel = np.flatnonzero(part_of[rows] == p)
            if len(sel):
                out[sel] = cached[position[rows[sel]]]
        yield first, images, ()


def _jpeg_batches(image_root: Path, names: np.ndarray, image_size: int, start: int, batch_size: int,
                  num_workers: int, pin: bool) -> Batches:
    """Batches decoded and resized by DataLoader workers exactly as the image cache builds them (uint8, the
    transform's own Resize); an unreadable image comes back as a message, not a worker's traceback."""
    loader = DataLoader(image_cache._Decoded(image_root, names[start:], image_size), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=pin, generator=torch.Generator())
    for idx, images, errors in loader:
        yield start + int(idx[0]), images, errors


class FileBytes(Dataset):
    """Image i's file as it is on the disk (a 1-D uint8 tensor), for decoding on the extraction device."""

    def __init__(self, image_root: Path, image_paths: np.ndarray) -> None:
        self.image_root, self.image_paths = image_root, image_paths

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        """(i, bytes, error): a file that cannot be read gives no bytes and the message (as datasets.read_rgb)."""
        path = self.image_root / str(self.image_paths[i])
        try:
            data = path.read_bytes()
        except OSError as exc:
            return i, torch.empty(0, dtype=torch.uint8), f"cannot read image {path}: {exc}"
        return i, torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), ""


def _as_lists(samples: list[tuple[int, torch.Tensor, str]]) -> tuple[int, list[torch.Tensor], tuple[str, ...]]:
    """Collate (i, bytes, error) samples into (first i, [bytes], errors): the files differ in length."""
    idx, data, errors = zip(*samples)
    return idx[0], list(data), errors


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """torchvision 0.29 warns at every call of its decoders that they are deprecated (for TorchCodec); once per
    batch is noise. The version is pinned in requirements.txt."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def _decoder_message(exc: Exception) -> str:
    """The decoder's reason without the C++ source location that torchvision puts first."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", first)


def _decode_one(data: torch.Tensor, path: Path, is_jpeg: bool,
                device: torch.device) -> tuple[torch.Tensor | None, str]:
    """(RGB uint8 (3, H, W) on `device`, "") or (None, the message naming the file): a JPEG on the device, else
    (another format, or a JPEG the device's decoder rejects) by decode_image on the CPU, then moved."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    if is_jpeg:
        with contextlib.suppress(RuntimeError):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), ""
    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device), ""
    except (RuntimeError, ValueError) as exc:
        return None, f"cannot read image {path}: {_decoder_message(exc)}"


def decoded_on_device(data: list[torch.Tensor], paths: list[Path], image_size: int,
                      device: torch.device) -> tuple[torch.Tensor | None, str]:
    """(uint8 (B, S, S, 3) on `device`, "") or (None, the message of the first image that cannot be decoded).
    The batch's JPEGs are decoded in one call (nvJPEG's batched decoder on CUDA); when it fails (it returns
    nothing then), image by image, to find the culprit."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    is_jpeg = [bytes(d[:3].tolist()) == JPEG_MAGIC for d in data]
    rows = [i for i, j in enumerate(is_jpeg) if j]
    decoded: dict[int, torch.Tensor] = {}
    with _quiet_decoders():
        if rows:
            with contextlib.suppress(RuntimeError):
                decoded = dict(zip(rows, decode_jpeg([data[i] for i in rows], mode=ImageReadMode.RGB,
                                                     device=device)))
        resized = []
        for i, path in enumerate(paths):
            image = decoded.get(i)
            if image is None:
                image, error = _decode_one(data[i], path, is_jpeg[i], device)
                if image is None:
                    return None, error
            resized.append(F.resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR,
                                    antialias=True))
    return torch.stack(resized).permute(0, 2, 3, 1), ""  # NHWC, as the other sources (a view)


def _device_batches(image_root: Path, names: np.ndarray, image_size: int, start: int, batch_size: int,
                    num_workers: int, device: torch.device) -> Batches:
    """Batches whose files DataLoader workers read and this process decodes and resizes on `device`."""
    loader = DataLoader(FileBytes(image_root, names[start:]), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_lists, generator=torch.Generator())
    for first, data, errors in loader:
        first += start
        if any(errors):
            yield first, torch.empty(0, dtype=torch.uint8), errors
            continue
        paths = [image_root / str(n) for n in names[first:first + len(data)]]
        images, error = decoded_on_device(data, paths, image_size, device)
        yield first, images if images is not None else torch.empty(0, dtype=torch.uint8), (error,)


# ----------------------------------------------------------------------------------------------------------------
# extraction

def _computed(model: nn.Module, batches: Batches, out: np.ndarray, device: torch.device,
              channels_last: bool) -> Iterator[int]:
    """Write the features of every batch into `out`, in row order, yielding the rows done after each. A batch's
    features are read after the next batch is sent to the device, so the device does not wait for the host."""
    pending = None  # (first row, the features on their way to the host, the event marking their arrival)
    for first, images, errors in batches:
        error = next((e for e in errors if e), "")
        if error:  # the rows before this batch are kept
            if pending is not None:
                yield _store(out, *pending)
            raise DataError(error)
        x = image_cache.to_model_input({"image": images, "flip": torch.zeros(len(images), dtype=torch.bool)},
                                       device, channels_last)
        with torch.inference_mode():
            features = model(x)
        sent = _to_host(features)
        if pending is not None:
            yield _store(out, *pending)
        pending = (first, *sent)
    if pending is not None:
        yield _store(out, *pending)


def _to_host(features: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(the features on the host, None), or on CUDA (pinned memory they are being copied into, the event that
    marks the end of the copy). The copy is queued right behind the batch: a plain `.cpu()` of this batch after
    the next one is sent would wait for the next one too (one stream runs in order), leaving the GPU idle while
    the host prepares the batch after it (H200, decoded images in memory: 1,192 img/s that way, 1,836 this way,
    1,937 for the backbone alone)."""
    if features.device.type != "cuda":
        return features.float().cpu(), None
    host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(features.float(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _store(out: np.ndarray, first: int, values: torch.Tensor, copied: torch.cuda.Event | None) -> int:
    if copied is not None:
        copied.synchronize()
    out[first:first + len(values)] = values.numpy()
    return first + len(values)


def _require_space(folder: Path, needed: int) -> None:
    """A memory-mapped file that cannot grow crashes the process (SIGBUS): check the room before writing."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"the features need {needed / 1e9:.2f} GB in {folder} but only {free / 1e9:.2f} GB are "
                        f"free; free some space and run again")


def _extract_split(model: nn.Module, phase: str, names: np.ndarray, folder: Path, state: dict, dim: int,
                   source: Callable[[], tuple[Callable[[int], Batches], str]], batch_size: int,
                   device: torch.device, channels_last: bool, desc: str) -> str:
    """Extract (or finish) one split into <phase>_features.npy; `state` is the progress record, saved as rows
    get done; `source()` gives (batches from a row on, their description). Returns a line saying what was done."""
    n = len(names)
    final, partial = folder / f"{phase}_features.npy", folder / f".{phase}_features.npy.partial"
    done = state["rows_done"][phase]
    if done == n and _npy_shape(final) == (n, dim):
        return f"{phase}: {n} rows already done"
    if done and _npy_shape(partial) != (n, dim):
        print(f"{phase}: the partial file of the interrupted extraction is missing or damaged; starting the "
              f"split again")
        done = 0
    make_batches, description = source()
    state.setdefault("sources", {})[phase] = description  # the last one used, when a resumed split used two
    if done:
        out = np.lib.format.open_memmap(partial, mode="r+")
        print(f"{phase}: resuming at row {done} of {n}")
    else:
        _require_space(folder, n * dim * 4)
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, dim))
    seconds = state["seconds"]
    start_time = time.monotonic()

    def save(rows_done: int) -> None:
        out.flush()  # the rows are on the disk before the record says so
        state["rows_done"][phase] = rows_done
        state["seconds"] = seconds + time.monotonic() - start_time
        _write_json(folder / PROGRESS, state)

    start, last_save = done, time.monotonic()
    progress = tqdm(total=-(-n // batch_size), initial=done // batch_size, desc=f"{desc} {phase}", unit="batch",
                    leave=False, disable=None)
    try:
        for done in _computed(model, make_batches(done), out, device, channels_last):
            progress.update(1)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                save(done)
                last_save = time.monotonic()
    except BaseException:  # Ctrl-C, an unreadable image, ...: keep the rows done for the next run
        with contextlib.suppress(OSError):
            save(done)
        print(f"{phase}: stopped; {state['rows_done'][phase]} of {n} rows are kept in {partial}: the same "
              f"command resumes there")
        raise
    finally:
        progress.close()
    save(done)
    out = None  # unmapped before the rename (required on some systems)
    write_atomic(final, lambda tmp: os.replace(partial, tmp))  # complete: the final name appears at once
    rate = (n - start) / max(time.monotonic() - start_time, 1e-9)
    return f"{phase}: {n - start} rows from {description} ({rate:.1f} img/s)"


def _start_state(folder: Path, key: dict, batch_size: int, command: str) -> dict:
    """The progress record to continue from: the interrupted extraction's when its key matches, else a fresh
    one, after removing what a different or stale set left in `folder` (files of this module only)."""
    state = _read_json(folder / PROGRESS)
    if state is not None and _recorded_key(state) == key:
        state["key"] = key
        if state["batch_size"] != batch_size:
            print(f"resuming with --batch-size {state['batch_size']} of the interrupted extraction (not "
                  f"{batch_size}), so that its batches, and hence its numbers, are the same")
        return state
    if state is not None:
        print(f"discarding an interrupted extraction in {folder}, made from other "
              f"{', '.join(_differences(_recorded_key(state), key))}")
    for name in (INFO, PROGRESS, *(f"{p}_features.npy" for p in PHASES), *(f".{p}_features.npy.partial"
                                                                           for p in PHASES)):
        (folder / name).unlink(missing_ok=True)
    return {"key": key, "batch_size": batch_size, "rows_done": {p: 0 for p in PHASES}, "seconds": 0.0,
            "command": command}


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One extraction at a time writes a feature folder (parallel runs of a sweep may all ask for the same set):
    a second one waits until the first has finished or died. The lock file names the host and process holding
    it; one left by a dead process of this machine is taken over."""
    lock, announced = folder / LOCK, False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):  # just removed, or being written: look again
                time.sleep(0.1)
                continue
            if host == _HOST and not pid_alive(int(pid)):
                lock.unlink(missing_ok=True)
                continue
            if not announced:
                print(f"waiting for the extraction of process {pid} (host {host}) that is writing {folder} "
                      f"(if it no longer runs, delete {lock})", flush=True)
                announced = True
            time.sleep(WAIT_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HOST} {os.getpid()}")
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _check_arguments(image_size: int, batch_size: int, num_workers: int, decode: str) -> None:
    for flag, value, low in (("--image-size", image_size, 1), ("--batch-size", batch_size, 1),
                             ("--num-workers", num_workers, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")


def extract_features(data_root: str | Path, dataset: str, arch: str = "resnet50", weights: str = "imagenet",
                     image_size: int = 448, batch_size: int = 64, device: torch.device = torch.device("cpu"),
                     num_workers: int = 4, model: nn.Module | None = None, channels_last: bool = False,
                     decode: str = "pil") -> Path:
    """Run the frozen backbone of `arch` (`weights`: "imagenet", "random" or a state-dict / best.pt path) over the
    official train and val images of `dataset` and write the feature set (module docstring); returns its folder.

    A complete set made from the same key is returned at once; an interrupted one is resumed. `model` replaces
    the backbone that build_model would give (tests); it must output (B, D), and is put in eval mode on `device`;
    `arch` and `weights` then only name and key the set. `channels_last` (CUDA speed) changes the last bits.
    `decode`: "pil" (workers decode and resize with PIL: the evaluation transform's bits; valid image caches are
    read instead) or "device" (workers read the files, the device decodes and resizes: for GPUs that outrun the
    CPU's decoding; the last bits differ and the set is keyed by it; image caches are not read).
    Raises DataError (data files, images, disk room), WeightsError, ValueError (arguments) or OutputError."""
    _check_arguments(image_size, batch_size, num_workers, decode)
    if dataset == "demo":  # generated on first use, as main.py -d demo does
        from preproc.make_demo import ensure_demo
        ensure_demo(Path(data_root) / "demo")
    image_root = _image_root(data_root, dataset)  # an unknown dataset stops here
    if dataset_info(data_root, dataset).features:
        raise DataError(f"{Path(data_root) / dataset} holds features, not images: train on them with "
                        f"python main.py -d {shlex.quote(dataset)} (nothing to extract)")
    if weights not in NAMED_WEIGHTS and not Path(weights).is_file():
        raise WeightsError(f"--weights {weights}: no such file (expected 'imagenet', 'random' or a state dict path)")
    names = {phase: _image_list(data_root, dataset, phase) for phase in PHASES}
    name = feature_set_name(arch, weights, image_size)
    folder = feature_dir(data_root, dataset, name)
    key = _set_key(arch, weights, image_size, channels_last, decode,
                   {phase: _split_key(image_root, names[phase], image_size) for phase in PHASES})
    info, reason = _complete_reason(folder, key)
    if info is not None:
        print(f"feature set {name} is already complete in {folder} (made in {info['seconds']:.0f} s on "
              f"{info['device']}); nothing to do")
        return folder
    if reason != "none yet":
        print(f"feature set {folder}: {reason}; extracting it again")

    if model is None:
        model = _build_backbone(arch, weights, _num_classes(data_root, dataset))
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dim = _feature_dim(model, arch, image_size, device, channels_last)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(exc.errno, describe_os_error(folder, exc)) from exc
    with _exclusive(folder):
        if _complete_reason(folder, key)[0] is not None:  # made meanwhile by the extraction we waited for
            print(f"feature set {name} is complete in {folder} (made by another process); nothing to do")
            return folder
        for leftover in remove_stale_temporaries(folder):
            print(f"removed {leftover}, left by an interrupted extraction")
        command = extract_command(dataset, arch, weights, image_size, data_root)
        state = _start_state(folder, key, batch_size, command)
        _extract_splits(model, data_root, dataset, names, image_root, folder, state, dim, device, num_workers,
                        channels_last)
        _write_info(folder, state, arch, weights, image_size, names, dim, device, channels_last)
    return folder


def _extract_splits(model: nn.Module, data_root: str | Path, dataset: str, names: dict[str, np.ndarray],
                    image_root: Path, folder: Path, state: dict, dim: int, device: torch.device, num_workers: int,
                    channels_last: bool) -> None:
    """Both splits in turn, each from valid image caches or else its JPEGs (said on the console); with the decode
    mode "device" always from the JPEGs, decoded on the device."""
    batch_size, image_size, pin = state["batch_size"], state["key"]["image_size"], device.type == "cuda"
    for phase in PHASES:
        def source(phase=phase) -> tuple[Callable[[int], Batches], str]:
            if state["key"]["decode"] == "device":
                print(f"{phase}: reading the files with {num_workers} workers, decoding and resizing them on "
                      f"{device} (--decode device: image caches are not read)")
                return ((lambda start: _device_batches(image_root, names[phase], image_size, start, batch_size,
                                                       num_workers, device)),
                        f"the JPEGs decoded on {device} ({num_workers} workers reading)")
            parts, description = _cached_parts(data_root, dataset, phase, names[phase], image_root, image_size)
            if parts is not None:
                print(f"{phase}: reading the images from {description}")
                return (lambda start: _cache_batches(parts, len(names[phase]), start, batch_size, pin)), description
            print(f"{phase}: decoding the JPEGs with {num_workers} workers ({description})")
            return ((lambda start: _jpeg_batches(image_root, names[phase], image_size, start, batch_size, num_workers,
                                                 pin)), f"the JPEGs ({num_workers} workers)")
        print(_extract_split(model, phase, names[phase], folder, state, dim, source, batch_size, device,
                             channels_last, f"{dataset} {folder.name}"))


def _write_info(folder: Path, state: dict, arch: str, weights: str, image_size: int, names: dict[str, np.ndarray],
                dim: int, device: torch.device, channels_last: bool) -> None:
    """info.json, last: from then on the set is complete; the progress record goes."""
    import torchvision
    key = state["key"]
    info = {"arch": arch, "weights": weights, "weights_sha256": key["weights_sha256"], "image_size": image_size,
            "transform": TRANSFORMS[key["decode"]].replace("S,S", f"{image_size},{image_size}"),
            "rows": {phase: len(names[phase]) for phase in PHASES}, "dim": dim,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_size": state["batch_size"], "channels_last": channels_last, "decode": key["decode"],
            "sources": state["sources"],
            "seconds": round(state["seconds"], 3), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": state["command"], "key": key}
    _write_json(folder / INFO, info)
    (folder / PROGRESS).unlink(missing_ok=True)
    print(f"wrote {folder}/{{train,val}}_features.npy ({len(names['train'])} and {len(names['val'])} x {dim} "
          f"float32) and {INFO} in {state['seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------------------------
# reading

def _command_for(data_root: str | Path, dataset: str, name: str, folder: Path) -> str:
    """The command that makes the set `name` for this dataset and data root: with the backbone recorded by its
    (interrupted) extraction, or else read off the name. (A recorded command line may name another dataset or
    data root: a set copied from elsewhere, or the same root reached by another path.)"""
    for record in (folder / INFO, folder / PROGRESS):
        data = _read_json(record)
        recorded = _options(data["command"]) if data and isinstance(data.get("command"), str) else {}
        if {"--arch", "--weights", "--image-size"} <= set(recorded) and recorded["--image-size"].isdigit():
            return extract_command(dataset, recorded["--arch"], recorded["--weights"], int(recorded["--image-size"]),
                                   data_root)
    import torchvision
    archs = [a for a in torchvision.models.list_models(module=torchvision.models) if name.startswith(a + "_")]
    weights, _, size = name[len(max(archs, key=len, default="")) + 1:].rpartition("_")
    if not archs or not weights or not size.isdigit():
        return (f"python preproc/extract_features.py --dataset {shlex.quote(dataset)} --data-root "
                f"{shlex.quote(str(data_root))} (with the --arch, --weights and --image-size of the set {name})")
    if weights in NAMED_WEIGHTS:
        return extract_command(dataset, max(archs, key=len), weights, int(size), data_root)
    return (extract_command(dataset, max(archs, key=len), "WEIGHTS", int(size), data_root)
            + f" (WEIGHTS: the path of your {weights} state-dict file)")


def _options(command: str) -> dict[str, str]:
    """The `--option value` pairs of a command line (as extract_command writes it); {} if it does not split."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return {}
    return {option: value for option, value in zip(tokens, tokens[1:]) if option.startswith("--")}


FORMATTED = "formatted"  # the feature set of a dataset given as features (its formatted_{train,val}_features.npy)


def _formatted_features(data_root: str | Path, dataset: str) -> dict:
    """A features dataset's own formatted_{train,val}_features.npy (checked by datasets.dataset_info)."""
    folder = Path(data_root) / dataset
    out = {phase: np.load(folder / f"formatted_{phase}_features.npy", mmap_mode="r") for phase in PHASES}
    out["info"] = {"name": FORMATTED, "dim": int(out["train"].shape[1]), "source": str(folder)}
    return out


def load_features(data_root: str | Path, dataset: str, name: str) -> dict:
    """{"train": (N_train, D), "val": (N_val, D), "info": dict} of the set `name`: the files memory-mapped
    (read-only; datasets.FeatureDataset copies the rows it needs as float32).

    Raises DataError, naming the file and the command that extracts the set, when it was never extracted or is
    incomplete or unreadable, when its row counts differ from formatted_{train,val}_labels.npy or its image lists
    from formatted_{train,val}_images.npy (the data were formatted again), or when the two splits' dims differ."""
    if name == FORMATTED:
        if not dataset_info(data_root, dataset).features:
            raise DataError(f"--features {FORMATTED}: {Path(data_root) / dataset} is not a features dataset "
                            f"(its dataset.json says \"features\": false); name an extracted feature set instead")
        return _formatted_features(data_root, dataset)
    folder = feature_dir(data_root, dataset, name)
    command = _command_for(data_root, dataset, name, folder)
    for path in (folder / INFO, *(folder / f"{p}_features.npy" for p in PHASES)):
        if not path.is_file():
            state = " (its extraction did not finish)" if (folder / PROGRESS).is_file() else ""
            raise DataError(f"missing {path}: the feature set {name} is not extracted{state}; extract it with: "
                            f"{command}")
    info = _read_json(folder / INFO)
    if info is None:
        raise DataError(f"cannot read {folder / INFO}; extract the set again with: {command}")
    out = {"info": info}
    for phase in PHASES:
        path = folder / f"{phase}_features.npy"
        try:
            features = np.load(path, mmap_mode="r")  # read once, by the datasets' copies of their rows
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot load {path} ({exc}); extract the set again with: {command}") from exc
        if features.ndim != 2 or features.dtype != np.float32:
            raise DataError(f"{path}: expected (N, D) float32 features, found {features.dtype} {features.shape}; "
                            f"extract the set again with: {command}")
        _check_against_formatted(data_root, dataset, phase, features, info, path, command)
        out[phase] = features
    if out["train"].shape[1] != out["val"].shape[1]:
        raise DataError(f"{folder}: train features have {out['train'].shape[1]} dims but val features "
                        f"{out['val'].shape[1]}; extract the set again with: {command}")
    return out


def _check_against_formatted(data_root: str | Path, dataset: str, phase: str, features: np.ndarray, info: dict,
                             path: Path, command: str) -> None:
    """The rows must be those of the formatted split: as many as its labels, from the same image list."""
    labels_path = Path(data_root) / dataset / f"formatted_{phase}_labels.npy"
    if not labels_path.is_file():
        raise DataError(f"missing {labels_path}; create it with: {_format_command(data_root, dataset)}")
    rows = _npy_shape(labels_path)
    if rows is None:
        raise DataError(f"cannot load {labels_path}; re-create it with: {_format_command(data_root, dataset)}")
    if len(features) != rows[0]:
        raise DataError(f"{path} has {len(features)} rows but {labels_path} has {rows[0]}: the features are "
                        f"stale, extract them again with: {command}")
    images_path = Path(data_root) / dataset / f"formatted_{phase}_images.npy"
    recorded = info.get("key", {}).get("splits", {}).get(phase, {}).get("images_sha256")
    if images_path.is_file() and recorded != _names_sha256(_image_list(data_root, dataset, phase)):
        raise DataError(f"{path} was made from another image list than {images_path} (the data were formatted "
                        f"again): extract the features again with: {command}")
