"""--image-decode device (issue 27; docs/gpu-speed.md): batches whose JPEGs the training device decodes and resizes.

Why: the exact uint8 image cache of COCO at 448 px is 73.6 GB, and the faithful PIL loader with 8 workers
(340 img/s on the H200 host of bench/measured/) cannot feed a fast step at batch 16. Here the host only reads the
files' bytes (threads, no decoding); the device decodes them (torchvision.io.decode_jpeg: nvJPEG on CUDA,
libjpeg-turbo on the CPU) and resizes them to S x S (bilinear, antialiased), as `--decode device` of feature
extraction does (features.decoded_on_device, shared). Another decoder and resize than PIL's: pixels differ from
the faithful path's by a few levels (tests/test_gpu_speed.py bounds it on real JPEGs; bench/epoch.py measures it
on the GPU), so results are statistically, not bitwise, the same.

The order, the flips and the random draws are the faithful DataLoader's: `DecodedLoader` is an
image_cache.CachedLoader whose images come from the files instead of a cache.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch

from datasets import DataError, MultilabelDataset
from image_cache import CachedLoader


class DecodedLoader(CachedLoader):
    """CachedLoader's batches (order, flips, labels) with uint8 (B, S, S, 3) images decoded on `device`.
    `num_workers` threads read the files (and name the DataLoader worker whose random stream draws a batch's flips,
    as CachedLoader's `num_workers`)."""

    def __init__(self, dataset: MultilabelDataset, image_size: int, device: torch.device, batch_size: int,
                 shuffle: bool, flip: bool, num_workers: int = 0, persistent_workers: bool = False,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, None, batch_size, shuffle, flip, num_workers, persistent_workers,
                         pin_memory=torch.device(device).type == "cuda", drop_last=drop_last,
                         prefetch=False)  # (decoding stays in this thread: it launches work on the device)
        self.image_size, self.device = image_size, torch.device(device)
        self._readers = ThreadPoolExecutor(num_workers, thread_name_prefix="read-jpeg") if num_workers else None
        from features import FileBytes  # (features imports image_cache: imported here)
        self._files = FileBytes(dataset.image_root, dataset.image_paths)

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        from features import decoded_on_device
        read = list(self._readers.map(self._files.__getitem__, rows) if self._readers
                    else map(self._files.__getitem__, rows))
        error = next((e for _, _, e in read if e), "")
        if not error:
            paths = [self.dataset.image_root / str(self.dataset.image_paths[r]) for r in rows]
            images, error = decoded_on_device([data for _, data, _ in read], paths, self.image_size, self.device)
        if error:
            raise DataError(error)
        return images
