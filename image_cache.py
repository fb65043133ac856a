"""An exact image cache (`--image-cache ram|disk`): each image decoded and resized once, as uint8.

The faithful path decodes and resizes every JPEG with PIL in every pass (as the original does). The cache holds
the output of exactly those steps (`Image.open(...).convert("RGB")`, then the same `Resize((S, S))`), so per
pass only the flip and ToTensor/Normalize remain, done batched on the training device by `to_model_input`.
The result is bit-identical: `CachedLoader` yields the batches in the DataLoader's order with the DataLoader's
flips (same sampler, same seeds, each flip drawn from the random stream of the worker that would have built
the batch), and `to_model_input` does ToTensor and Normalize's arithmetic with tensor divisors (exact IEEE
division on every device; a Python-number divisor is a reciprocal multiply on CUDA).

`ram` keeps the cache in the training process's memory (the cached loader needs no worker processes); `disk`
memory-maps `<data_root>/<dataset>/cache/<phase>_<S>px.cache`, whose header records what it was built from (the
image list, the size, the PIL and torchvision versions), so a stale, truncated or foreign file is rebuilt,
never reused. A cache file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
import torch
# torchvision is imported inside the functions that use it: importing it takes ~2 s, which a linear probe on
# cached features (main.py --features) never needs.
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm import tqdm

from config import IMAGE_CACHE_MODES
from datasets import IMAGENET_MEAN, IMAGENET_STD, DataError, MultilabelDataset, read_rgb
from fileio import remove_stale_temporaries, write_atomic

HEADER_BYTES = 4096
FORMAT = "spml-image-cache-1"


# ----------------------------------------------------------------------------------------------------------------
# building

class _Decoded(Dataset):
    """Image i decoded and resized exactly as the faithful transform's first step, as a uint8 HWC array."""

    def __init__(self, image_root: Path, image_paths: np.ndarray, image_size: int) -> None:
        self.image_root, self.image_paths = image_root, image_paths
        from torchvision import transforms
        self.resize = transforms.Resize((image_size, image_size))  # the faithful path's own Resize

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        """(i, image, error): an unreadable image gives a blank one and the message, which `_fill` raises in the
        main process (raised in a worker, it would come back buried in traceback text)."""
        image, error = read_rgb(self.image_root / str(self.image_paths[i]))
        return i, torch.from_numpy(np.asarray(self.resize(image), dtype=np.uint8).copy()), error


def _fill(out: np.ndarray, dataset: MultilabelDataset, image_size: int, num_workers: int, desc: str) -> None:
    """Decode every image of `dataset` into `out` (N, S, S, 3), in parallel, with a progress bar. The loader has
    its own random generator, so building draws nothing from the run's random streams."""
    loader = DataLoader(_Decoded(dataset.image_root, dataset.image_paths, image_size), batch_size=32,
                        num_workers=num_workers, generator=torch.Generator())
    for idx, images, errors in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        for error in errors:
            if error:
                raise DataError(error)
        out[idx.numpy()] = images.numpy()


def _key(dataset: MultilabelDataset, image_size: int) -> dict:
    """What a cache was built from; any difference means it is stale: the image list, and the files' total size
    and latest modification time (images replaced under the same names), the size and the decoding libraries."""
    import torchvision
    names = "\n".join(str(p) for p in dataset.image_paths).encode()
    total_bytes, latest = 0, 0
    for name in dataset.image_paths:
        try:
            stat = (dataset.image_root / str(name)).stat()
            total_bytes, latest = total_bytes + stat.st_size, max(latest, stat.st_mtime_ns)
        except OSError:
            pass  # reported when the image is read
    return {"format": FORMAT, "image_size": image_size, "num_images": len(dataset),
            "images_sha256": hashlib.sha256(names).hexdigest(), "images_bytes": total_bytes,
            "images_mtime_ns": latest, "pil": PIL.__version__, "torchvision": torchvision.__version__}


def cache_bytes(num_images: int, image_size: int) -> int:
    return num_images * image_size * image_size * 3


def _require_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"the image cache needs {needed / 1e9:.1f} GB in {folder} ({what}) but only "
                        f"{free / 1e9:.1f} GB are free; free some space or use --image-cache off")


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_header(path: Path) -> dict | None:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    try:
        return json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, ValueError):
        return None


def _stale_reason(path: Path, key: dict) -> str | None:
    """Why the cache file at `path` cannot be used for `key`, or None if it can."""
    if not path.is_file():
        return "none yet"
    expected = HEADER_BYTES + cache_bytes(key["num_images"], key["image_size"])
    header = _read_header(path)
    if header is None or header.get("format") != FORMAT:
        return "not a cache file of this project"
    differing = [k for k in key if header.get(k) != key[k]]
    if differing:
        return f"built from other {', '.join(differing)}"
    if path.stat().st_size != expected:
        return f"truncated or of another size ({path.stat().st_size} bytes, expected {expected})"
    return None


def _disk_cache(dataset: MultilabelDataset, image_size: int, path: Path, num_workers: int) -> np.ndarray:
    key = _key(dataset, image_size)
    reason = _stale_reason(path, key)
    if reason is not None:
        for leftover in remove_stale_temporaries(path.parent):  # of a build that was killed (kill -9)
            print(f"removed {leftover}, left by an interrupted cache build")
        size = cache_bytes(len(dataset), image_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        if reason != "none yet":
            print(f"image cache {path}: {reason}; rebuilding it")
        _require_space(path.parent, HEADER_BYTES + size, path.name)
        print(f"building the image cache {path} ({len(dataset)} images, {size / 1e9:.2f} GB, once) ...", flush=True)
        start = time.time()

        def write(tmp: str) -> None:
            header = json.dumps(key).encode()
            with open(tmp, "wb") as f:
                f.write(header.ljust(HEADER_BYTES, b"\0"))
                f.truncate(HEADER_BYTES + size)
            out = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES,
                            shape=(len(dataset), image_size, image_size, 3))
            _fill(out, dataset, image_size, num_workers, f"cache {path.name}")
            out.flush()
            del out
            with open(tmp, "rb+") as f:  # on the disk before it gets its final name (power loss)
                os.fsync(f.fileno())
        write_atomic(path, write)
        print(f"  built in {time.time() - start:.0f} s")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES,
                     shape=(len(dataset), image_size, image_size, 3))


def _ram_cache(dataset: MultilabelDataset, image_size: int, num_workers: int, phase: str) -> np.ndarray:
    size = cache_bytes(len(dataset), image_size)
    available = _available_ram()
    if available is not None and available < size:
        raise DataError(f"the image cache of the {phase} set needs {size / 1e9:.1f} GB of memory but only "
                        f"{available / 1e9:.1f} GB are available; use --image-cache disk or off")
    print(f"caching the {phase} images in memory ({len(dataset)} images, {size / 1e9:.2f} GB) ...", flush=True)
    out = np.empty((len(dataset), image_size, image_size, 3), dtype=np.uint8)
    _fill(out, dataset, image_size, num_workers, f"cache {phase}")
    return out


def build_cache(dataset: MultilabelDataset, image_size: int, mode: str, phase: str, cache_dir: Path,
                num_workers: int) -> np.ndarray:
    """The (N, S, S, 3) uint8 images of `dataset`, in its row order: built once, or read from a valid file."""
    if mode == "ram":
        return _ram_cache(dataset, image_size, num_workers, phase)
    if mode == "disk":
        return _disk_cache(dataset, image_size, cache_dir / f"{phase}_{image_size}px.cache", num_workers)
    raise ValueError(f"--image-cache must be one of {IMAGE_CACHE_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# reading

class CachedLoader:
    """Batches of a cached dataset in the order and with the flips of `DataLoader(dataset, batch_size, shuffle,
    num_workers, persistent_workers)` over the faithful transform, without any worker process.

    What the DataLoader draws from the global torch generator is drawn here in the same order (the base seed,
    then the sampler's seed). Each flip is `torch.rand(1) < 0.5`, as RandomHorizontalFlip, drawn per sample in
    batch order from the generator that would draw it: the global one without workers, else the generator of
    worker k % num_workers (seeded base_seed + worker id, as DataLoader seeds its workers), for batch k.
    Batches hold uint8 NHWC images and their flips; `to_model_input` finishes them on the device.
    `prefetch` (default: with `pin_memory`, i.e. for a GPU): a thread gathers (and pins) the next batch's images while
    this one is used, so the host's copies overlap the step (issue 27); the same batches, the same random draws.
    """

    def __init__(self, dataset: MultilabelDataset, images: np.ndarray, batch_size: int, shuffle: bool, flip: bool,
                 num_workers: int = 0, persistent_workers: bool = False, pin_memory: bool = False,
                 drop_last: bool = False, prefetch: bool | None = None) -> None:
        self.dataset, self.images, self.flip, self.pin_memory = dataset, images, flip, pin_memory
        self.prefetch = pin_memory if prefetch is None else prefetch
        self.num_workers, self.persistent = num_workers, persistent_workers and num_workers > 0
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last=drop_last)
        self._worker_generators: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        # (lazy: the sampler draws its seed at the first batch, after the base seed, however far ahead rows are read)
        batches = (np.asarray(indices) for indices in self.batch_sampler)
        if not (self.persistent and self._worker_generators is not None):  # persistent workers keep theirs
            base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self._worker_generators = [torch.Generator().manual_seed(base_seed + w) for w in range(self.num_workers)]
        gatherer = ThreadPoolExecutor(1, thread_name_prefix="cache-gather") if self.prefetch else None
        try:
            upcoming = self._gather_ahead(gatherer, next(batches, None))
            k = 0
            while upcoming is not None:
                rows, images = upcoming
                upcoming = self._gather_ahead(gatherer, next(batches, None))  # the next batch's images, meanwhile
                generator = self._worker_generators[k % self.num_workers] if self.num_workers else None
                flips = torch.tensor([bool(torch.rand(1, generator=generator) < 0.5) if self.flip else False
                                      for _ in rows])
                batch = {"image": images.result() if gatherer else self._pinned_images(rows), "flip": flips,
                         "label_vec_obs": torch.from_numpy(self.dataset.labels_obs[rows]).float(),
                         "label_vec_true": torch.from_numpy(self.dataset.labels_true[rows]).float(),
                         "idx": torch.from_numpy(rows)}
                yield {key: v.pin_memory() if key != "image" else v for key, v in batch.items()} \
                    if self.pin_memory else batch
                k += 1
        finally:
            if gatherer is not None:
                gatherer.shutdown(wait=True, cancel_futures=True)

    def _gather_ahead(self, gatherer: ThreadPoolExecutor | None, rows: np.ndarray | None) -> tuple | None:
        """(rows, their images being gathered by `gatherer`), (rows, None) without one, None after the last batch."""
        if rows is None:
            return None
        return rows, gatherer.submit(self._pinned_images, rows) if gatherer else None

    def _pinned_images(self, rows: np.ndarray) -> torch.Tensor:
        images = self._images(rows)
        return images.pin_memory() if self.pin_memory and images.device.type == "cpu" else images

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        """The batch's uint8 NHWC images (device_decode.DecodedLoader decodes them instead)."""
        return torch.from_numpy(self.images[rows])


_NORMALISE: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def to_model_input(batch: dict, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """The model's input for a batch of either loader: the faithful one's float images are copied to `device`;
    a cached batch (uint8 NHWC + flips) is flipped, laid out and converted there, then normalised with ToTensor's
    and Normalize's arithmetic (x / 255, then (x - mean) / std), so the values equal the faithful path's."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if "flip" not in batch:
        return batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    if device not in _NORMALISE:
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        _NORMALISE[device] = (as_tensor(255.0), as_tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                              as_tensor(IMAGENET_STD).view(1, 3, 1, 1))
    scale, mean, std = _NORMALISE[device]
    x = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC -> NCHW (a channels-last view)
    x = x.contiguous(memory_format=memory_format)  # lay out while still 1 byte per value
    flipped = batch["flip"].nonzero().flatten()  # decided on the host: no device sync
    if len(flipped):
        flipped = flipped.to(device, non_blocking=True)
        x = x.index_put((flipped,), x[flipped].flip(3))  # out of place: the batch itself stays as it was
    return x.float().div_(scale).sub_(mean).div_(std)  # .float() keeps the memory format


def make_loaders(datasets: dict[str, MultilabelDataset], batch_size: int, num_workers: int, persistent_workers: bool,
                 device: torch.device, image_cache: str = "off", image_size: int | None = None,
                 cache_dir: Path | None = None, shards: Callable | None = None, drop_last: bool = False,
                 eval_batch_size: int | None = None, image_decode: str = "pil") -> dict:
    """The train / val / test loaders: the original's DataLoaders, or cached loaders that give the same batches;
    `drop_last` for all three (Cole et al.'s loaders). `eval_batch_size`: the val and test loaders' (None: the
    training batch size, the original's). `image_decode` "device": device_decode.DecodedLoader (the same batches,
    the JPEGs decoded on `device`: pixels within a few levels of PIL's).
    `shards(dataset, train)`: in a torchrun launch, the DataLoader arguments of this rank's share of the rows
    (distributed.shard_arguments), instead of batches of `batch_size` over all of them."""
    sizes = {phase: batch_size if phase == "train" or eval_batch_size is None else eval_batch_size
             for phase in datasets}
    if image_decode == "device":
        from device_decode import DecodedLoader
        return {phase: DecodedLoader(ds, image_size, device, sizes[phase], shuffle=(phase == "train"),
                                     flip=(phase == "train"), num_workers=num_workers,
                                     persistent_workers=persistent_workers, drop_last=drop_last)
                for phase, ds in datasets.items()}
    if image_cache == "off":
        return {phase: DataLoader(ds, **(shards(ds, phase == "train") if shards is not None else
                                         dict(batch_size=sizes[phase], shuffle=(phase == "train"))),
                                  num_workers=num_workers, pin_memory=device.type == "cuda",
                                  persistent_workers=persistent_workers and num_workers > 0, drop_last=drop_last)
                for phase, ds in datasets.items()}
    build_workers = num_workers if num_workers > 0 else min(8, os.cpu_count() or 1)
    return {phase: CachedLoader(ds, build_cache(ds, image_size, image_cache, phase, cache_dir, build_workers),
                                sizes[phase], shuffle=(phase == "train"), flip=(phase == "train"),
                                num_workers=num_workers, persistent_workers=persistent_workers,
                                pin_memory=device.type == "cuda", drop_last=drop_last)
            for phase, ds in datasets.items()}
