"""Extract frozen-backbone features of a dataset's official train and val/test images (features.py).

    python preproc/extract_features.py --dataset pascal [--arch resnet50] [--weights imagenet] [--image-size 448]
        [--batch-size 64] [--num-workers 4] [--data-root data] [-g 0] [--channels-last] [--decode {pil,device}]

writes <data-root>/<dataset>/features/<arch>_<weights>_<size>/{train,val}_features.npy and info.json. Run it
again after an interruption (Ctrl-C, kill, a cluster's time limit): it continues where it stopped. A complete set
made from the same images and weights is not extracted again.

--decode device: the workers only read the files; each batch is decoded on the extraction device (nvJPEG on a
GPU) and resized there, for GPUs that outrun the CPU's decoding. The features then differ from the default PIL
path's in the last bits (at most 1.4e-3 relative per row on an H200), so the set (same name) is keyed by the decode
mode: a set made one way is extracted again the other way. A valid --image-cache disk file of the same size is not
read then (its images were resized by PIL). On an H200, PIL decoding in 16 workers keeps up with ResNet-50 at
448 px; with fewer cores, --decode device and 4 workers come within 15 % of it (README, "Linear probe").
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from main import Terminated, handle_interrupts, resolve_device, restore_interrupts  # noqa: E402
from preproc.common import one_line  # noqa: E402


def default_workers() -> int:
    """4 workers, or as many as this process may use cores where that is fewer (more only compete for them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run a frozen backbone once over a dataset's official train and "
                                            "val/test images (evaluation transform, no flip) and save the features.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset folder under --data-root (pascal, coco, ...)")
    p.add_argument("--arch", default="resnet50", help="torchvision backbone")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (torchvision IMAGENET1K_V1), 'random', or a state-dict / best.pt path "
                        "(the feature set is then named after the file's stem)")
    p.add_argument("--image-size", type=int, default=448, help="square input size")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=default_workers(),
                   help="DataLoader workers decoding the JPEGs (with --decode device: reading the files); default: "
                        "4, or the machine's cores where it has fewer")
    p.add_argument("--data-root", default="data", help="folder holding <dataset>/formatted_*_images.npy")
    p.add_argument("-g", "--gpu", default="auto", help="'auto' (the first CUDA device if there is one, else the "
                   "CPU), a CUDA device index, or 'cpu'")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format (faster on CUDA; changes the features' last bits)")
    p.add_argument("--decode", choices=("pil", "device"), default="pil",
                   help="pil: DataLoader workers decode and resize with PIL (the evaluation transform's exact bits; "
                        "valid --image-cache disk files are read instead). device: decode JPEGs on the extraction "
                        "device (nvJPEG on a GPU) and resize there; for GPUs that outrun the CPU's decoding; "
                        "features differ from the PIL path in the last bits (about 1e-2 relative), so the set is "
                        "keyed by it (image caches are not read)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from datasets import DataError
    from features import extract_features
    from models import WeightsError

    previous = handle_interrupts()  # kill = Ctrl-C: the progress is kept
    start = time.time()
    try:
        device = resolve_device(args.gpu)
        folder = extract_features(args.data_root, args.dataset, args.arch, args.weights, args.image_size,
                                  args.batch_size, device, args.num_workers, channels_last=args.channels_last,
                                  decode=args.decode)
    except (DataError, WeightsError, ValueError, OSError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # fileio's one-line messages
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted ({str(exc) or 'Ctrl-C'}): run the same command again to continue", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        restore_interrupts(previous)
    print(f"features: {folder} ({time.time() - start:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
