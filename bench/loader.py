"""Host-side loading speed: the faithful PIL loader against the image cache, over the same training images.

    python bench/loader.py --data-root R --dataset D --image-size S [--num-workers N] [--json F]
    python bench/loader.py --from-images DIR [--upscale PX] --image-size S ...   # builds a temp data root

Both figures are the host's work per batch as a training run sees it:
  faithful: a torch DataLoader over datasets.MultilabelDataset with the train transform (decode, resize, flip,
            ToTensor, Normalize in PIL/torch on the CPU), shuffled, batches of normalised float32 NCHW;
  cache:    image_cache.CachedLoader over the uint8 array of image_cache.build_cache(ds, S, "ram", ...),
            shuffled, flips decided: uint8 NHWC batches ready to copy to the device. The device-side flip and
            normalisation (image_cache.to_model_input) are part of bench/step.py; for CPU training they run on
            the host, so `cache_cpu_input_img_s` also gives the cache path with to_model_input(batch, cpu).
The cache build time is reported separately, next to the time of one faithful pass. `max_abs_diff` compares
the faithful tensors under the eval transform (no flips) with to_model_input(cached batch, cpu) over every
benchmarked image (expected exactly 0.0); `max_abs_diff_train` does the same with the train transform,
shuffle and flips, both loaders started from the same seed (also 0.0: same order, same flips).
Before timing, the image files are read once so that every pass finds them in the OS file cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import image_cache  # noqa: E402
from datasets import MultilabelDataset, build_datasets, get_transforms  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="faithful PIL loader vs image cache (img/s, build time, exactness)")
    p.add_argument("--data-root", help="a data root main.py accepts (holding <dataset>/formatted_*.npy)")
    p.add_argument("--dataset", default="pascal", help="pascal, coco, nuswide, cub or demo")
    p.add_argument("--from-images", help="instead of --data-root: a CUB_200_2011 folder or a folder of JPEGs, "
                                         "made into a temporary 'pascal' root (bench/make_bench_root.py)")
    p.add_argument("--upscale", type=int, help="with --from-images: re-encode the images at this long side (px)")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (and CachedLoader's num_workers)")
    p.add_argument("--build-workers", type=int, help="workers that build the cache (default: --num-workers; "
                                                     "main.py uses min(8, CPUs) when --num-workers is 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-images", type=int, help="use the first N training images (default: all)")
    p.add_argument("--passes", type=int, default=2, help="timed faithful passes (the cache path repeats its "
                                                        "passes until it has run at least 1 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def _subset(ds: MultilabelDataset, n: int | None, transform=None) -> MultilabelDataset:
    n = len(ds) if n is None else min(n, len(ds))
    return MultilabelDataset(ds.image_paths[:n], ds.labels_obs[:n], ds.labels_true[:n], ds.image_root,
                             transform if transform is not None else ds.transform)


def _warm_file_cache(ds: MultilabelDataset) -> int:
    total = 0
    for name in ds.image_paths:
        total += len((ds.image_root / str(name)).read_bytes())
    return total


def _time_passes(make_iter, min_passes: int, min_seconds: float, seed: int) -> list[float]:
    """Seconds per pass; each pass starts from torch.manual_seed(seed + pass) and touches every batch."""
    times: list[float] = []
    while len(times) < min_passes or sum(times) < min_seconds:
        torch.manual_seed(seed + len(times))
        start = time.perf_counter()
        for batch in make_iter():
            batch["image"].reshape(-1)[-1].item()  # the batch exists (already materialised by the loader)
        times.append(time.perf_counter() - start)
        if len(times) >= 50:
            break
    return times


def _cache_cpu_input(loader):
    cpu = torch.device("cpu")
    for batch in loader:
        yield {"image": image_cache.to_model_input(batch, cpu)}


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.from_images:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_bench_root import make_bench_root
        tmp = tempfile.TemporaryDirectory(prefix="bench_root_")
        args.data_root = str(make_bench_root(args.from_images, tmp.name, args.upscale, "all-train"))
        args.dataset = "pascal"
    if not args.data_root:
        print("error: give --data-root (with --dataset) or --from-images", file=sys.stderr)
        return 2
    size, bs, nw = args.image_size, args.batch_size, args.num_workers
    build_workers = nw if args.build_workers is None else args.build_workers

    datasets = build_datasets(args.data_root, args.dataset, size)
    train = _subset(datasets["train"], args.max_images)
    n = len(train)
    eval_view = _subset(train, None, get_transforms(size)["val"])
    file_bytes = _warm_file_cache(train)
    print(f"{args.dataset} train set at {args.data_root}: {n} images ({file_bytes / n / 1e3:.0f} kB/file), "
          f"{size} px, batch {bs}, {nw} worker(s), torch {torch.__version__}, {os.cpu_count()} CPU(s)", flush=True)

    # faithful: the original's DataLoader (train transform, shuffled)
    faithful = _time_passes(lambda: DataLoader(train, batch_size=bs, shuffle=True, num_workers=nw, drop_last=False),
                            args.passes, 0.0, args.seed)

    # the cache: built once, then read by CachedLoader
    start = time.perf_counter()
    images = image_cache.build_cache(train, size, "ram", "train", Path(tempfile.gettempdir()), build_workers)
    cache_build_s = time.perf_counter() - start
    make_cached = lambda: image_cache.CachedLoader(train, images, bs, shuffle=True, flip=True,  # noqa: E731
                                                   num_workers=nw)
    cached = _time_passes(make_cached, args.passes, 1.0, args.seed)
    cached_cpu = _time_passes(lambda: _cache_cpu_input(make_cached()), args.passes, 1.0, args.seed)

    # exactness 1: eval transform (no flips), sequential, every image
    max_abs_diff = 0.0
    faithful_eval = DataLoader(eval_view, batch_size=bs, shuffle=False, num_workers=nw)
    cached_eval = image_cache.CachedLoader(eval_view, images, bs, shuffle=False, flip=False, num_workers=nw)
    for a, b in zip(faithful_eval, cached_eval, strict=True):
        assert torch.equal(a["idx"], b["idx"])
        max_abs_diff = max(max_abs_diff, (a["image"] - image_cache.to_model_input(b, torch.device("cpu"))).abs().max().item())
    # exactness 2: train transform, shuffled, flipped, both loaders from the same seed
    torch.manual_seed(args.seed + 12345)
    faithful_batches = list(DataLoader(train, batch_size=bs, shuffle=True, num_workers=nw))
    torch.manual_seed(args.seed + 12345)
    max_abs_diff_train = 0.0
    for a, b in zip(faithful_batches, image_cache.CachedLoader(train, images, bs, shuffle=True, flip=True,
                                                               num_workers=nw), strict=True):
        if not torch.equal(a["idx"], b["idx"]):
            max_abs_diff_train = float("inf")  # another order: not the same batches
            break
        max_abs_diff_train = max(max_abs_diff_train,
                                 (a["image"] - image_cache.to_model_input(b, torch.device("cpu"))).abs().max().item())
    del faithful_batches

    faithful_pass_s = float(np.mean(faithful))
    cache_pass_s = float(np.mean(cached))
    result = {
        "dataset": args.dataset, "data_root": args.data_root if tmp is None else f"(temp root from {args.from_images})",
        "image_size": size, "batch_size": bs, "num_workers": nw, "build_workers": build_workers,
        "num_images": n, "mean_file_kb": file_bytes / n / 1e3,
        "faithful_img_s": n / faithful_pass_s, "faithful_pass_s": faithful_pass_s, "faithful_passes": faithful,
        "cache_img_s": n / cache_pass_s, "cache_pass_s": cache_pass_s, "cache_passes": len(cached),
        "speedup": faithful_pass_s / cache_pass_s,
        "cache_cpu_input_img_s": n / float(np.mean(cached_cpu)),
        "cache_build_s": cache_build_s, "cache_build_vs_faithful_pass": cache_build_s / faithful_pass_s,
        "cache_mb": images.nbytes / 1e6,
        "max_abs_diff": max_abs_diff, "max_abs_diff_train": max_abs_diff_train,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                        "processor": platform.processor() or platform.machine()},
    }
    rows = [
        ("faithful loader (PIL, float32 NCHW)", f"{result['faithful_img_s']:.1f}", f"{faithful_pass_s:.3f}", "1.0x"),
        ("cache (CachedLoader, uint8 NHWC)", f"{result['cache_img_s']:.1f}", f"{cache_pass_s:.4f}",
         f"{result['speedup']:.1f}x"),
        ("cache + to_model_input(cpu)", f"{result['cache_cpu_input_img_s']:.1f}", f"{n / result['cache_cpu_input_img_s']:.4f}",
         f"{result['cache_cpu_input_img_s'] / result['faithful_img_s']:.1f}x"),
    ]
    print(f"\n| path ({n} images, {size} px, batch {bs}, workers {nw}) | img/s | s/pass | speedup |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ncache build ({build_workers} worker(s)): {cache_build_s:.3f} s = "
          f"{result['cache_build_vs_faithful_pass']:.2f} x one faithful pass ({faithful_pass_s:.3f} s); "
          f"{result['cache_mb']:.1f} MB")
    print(f"max |faithful - cache| (eval transform, all {n} images): {max_abs_diff}; "
          f"(train transform, same seed, shuffled + flips): {max_abs_diff_train}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
