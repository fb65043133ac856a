"""Steady-state feature extraction rates on one device, source by source (bench/features_gpu.sh runs it).

    python bench/features_steady.py ROOT [--image-size 448] [-g 0] [--rows 8000] [--batch-size 64]

ROOT is a data root made by bench/make_bench_root.py (its pascal train images, repeated to --rows). Each line is
extraction's own loop (`features._computed`: ResNet-50 with random weights, batch 64, each batch's features read
after the next batch is sent) over --rows rows from one source, timed after the first 8 batches (worker start-up,
cuDNN and nvJPEG warm-up left out):
  - pil: DataLoader workers decode and resize with PIL (the default --decode pil), 8 and 16 workers;
  - device: workers read the files, this process decodes (nvJPEG) and resizes on the device (--decode device),
    4, 8 and 16 workers, and with --channels-last;
  - device, one batch ahead: the same decoded in a background thread on its own CUDA stream while the backbone
    runs (not what extraction does: measured to see whether it would pay);
  - cache: the uint8 images already decoded and resized, in pinned memory (what --image-cache disk files give,
    without the disk), with and without --channels-last;
  - the backbone alone on random input, and the device decode + resize alone.
Extraction is bound by the backbone when a source's rate is that of the backbone alone.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import features  # noqa: E402

WARMUP_BATCHES = 8


def steady_rate(batches_done, sync) -> tuple[float, float]:
    """(img/s after the warm-up batches, seconds of the warm-up) of an iterator of rows-done counts."""
    start = time.monotonic()
    t0 = n0 = None
    for i, done in enumerate(batches_done):
        if i == WARMUP_BATCHES - 1:
            sync()
            t0, n0 = time.monotonic(), done
    sync()
    return (done - n0) / (time.monotonic() - t0), t0 - start


def one_ahead(batches, device: torch.device):
    """`batches` produced in a thread on a side stream, one batch ahead of the consumer."""
    side, out = torch.cuda.Stream(device), queue.Queue(maxsize=1)

    def produce() -> None:
        with torch.cuda.stream(side):
            for first, images, errors in batches:
                ready = torch.cuda.Event()
                ready.record(side)
                out.put((first, images, errors, ready))
        out.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (item := out.get()) is not None:
        first, images, errors, ready = item
        torch.cuda.current_stream(device).wait_event(ready)
        images.record_stream(torch.cuda.current_stream(device))
        yield first, images, errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("-g", default="0")
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    device = torch.device("cpu" if args.g == "cpu" else f"cuda:{args.g}")
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    names = np.load(args.root / "pascal/formatted_train_images.npy")
    names = names[np.arange(args.rows) % len(names)]
    jpegs = args.root / "pascal/VOCdevkit/VOC2012/JPEGImages"
    size, bs = args.image_size, args.batch_size
    model = features._build_backbone("resnet50", "random", 20).eval().to(device)
    out = np.empty((args.rows, 2048), dtype=np.float32)
    print(f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, {args.rows} rows "
          f"of {size} px, batch {bs}, rates after {WARMUP_BATCHES} warm-up batches", flush=True)

    def memory_format(channels_last: bool) -> torch.memory_format:
        return torch.channels_last if channels_last else torch.contiguous_format

    def report(label: str, rows_done) -> None:
        """Print the steady rate of an iterator of rows-done counts; a failing source is reported, the rest run."""
        try:
            rate, warm = steady_rate(rows_done, sync)
            print(f"{label}: {rate:.0f} img/s (warm-up {warm:.1f} s)", flush=True)
        except Exception as exc:
            print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)

    def run(label: str, batches, channels_last: bool = False) -> None:
        m = model.to(memory_format=memory_format(channels_last))
        report(label + (", channels_last" if channels_last else ""),
               features._computed(m, batches, out, device, channels_last))

    for cl in (False, True):
        m = model.to(memory_format=memory_format(cl))
        x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=memory_format(cl))
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            sync()
            t, n = time.monotonic(), 10 if cuda else 1
            for _ in range(n):
                m(x)
            sync()
        print(f"backbone alone{', channels_last' if cl else ''}: {n * bs / (time.monotonic() - t):.0f} img/s",
              flush=True)
    for w in (8, 16):
        run(f"pil, {w} workers", features._jpeg_batches(jpegs, names, size, 0, bs, w, cuda))
    if cuda:
        for w in (4, 8, 16):
            decoded = features._device_batches(jpegs, names, size, 0, bs, w, device)
            report(f"device decode + resize alone, {w} workers reading",
                   (first + len(images) for first, images, _ in decoded))
        for w in (4, 8, 16):
            run(f"device, {w} workers", features._device_batches(jpegs, names, size, 0, bs, w, device))
        run("device, 16 workers", features._device_batches(jpegs, names, size, 0, bs, 16, device), True)
        run("device one batch ahead (thread + side stream), 16 workers",
            one_ahead(features._device_batches(jpegs, names, size, 0, bs, 16, device), device))
    n_cached = min(args.rows, 4000)
    cached = np.empty((n_cached, size, size, 3), dtype=np.uint8)
    for first, images, _ in features._jpeg_batches(jpegs, names[:n_cached], size, 0, bs, 16, False):
        cached[first:first + len(images)] = images.numpy()
    parts = [(np.arange(n_cached), cached)]
    for cl in (False, True):
        run("cache (decoded uint8 in memory)", features._cache_batches(parts, n_cached, 0, bs, cuda), cl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
