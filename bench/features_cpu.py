"""Feature extraction on the CPU: end to end, against the backbone alone and the loader alone.

    python bench/features_cpu.py [--image-size 448] [--train 48] [--val 16] [--num-workers 2] [--batch-size 16]

Makes a 20-class "pascal" data root from the CUB JPEGs of tests/data re-encoded at 500 px (bench/make_bench_root.py:
a full-size photo's decode cost), cut to --train + --val rows, and prints as JSON:
  - end to end: the img/s that `preproc/extract_features.py` reports for each split (ResNet-50, random weights,
    so no download; the default PIL decoding) and its wall time, process start included;
  - the backbone alone on random batches of --batch-size (inference mode, after one warm-up batch);
  - the loader alone: extraction's own worker dataset (decode + resize) in a DataLoader, with 1 and --num-workers
    workers, over the train images three times.
Extraction is bound by the backbone when its end-to-end rate is that of the backbone alone and the loader is much
faster. bench/features_gpu.sh is the GPU counterpart (and --decode device).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--train", type=int, default=48, help="official train rows (the 90 train images of tests/data, repeated when more)")
    p.add_argument("--val", type=int, default=16, help="official val rows")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    import torch
    from torch.utils.data import DataLoader

    import features
    import image_cache

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "bench/make_bench_root.py"), str(ROOT / "tests/data/cub/CUB_200_2011"),
                        str(data), "--upscale", "500"], check=True, capture_output=True)
        folder = data / "pascal"
        for phase, n in (("train", args.train), ("val", args.val)):
            for kind in ("images", "labels", "labels_obs"):
                rows = np.load(folder / f"formatted_{phase}_{kind}.npy")
                np.save(folder / f"formatted_{phase}_{kind}.npy", rows[np.arange(n) % len(rows)])
        start = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "preproc/extract_features.py"), "--dataset", "pascal",
                               "--arch", "resnet50", "--weights", "random", "--image-size", str(args.image_size),
                               "--data-root", str(data), "-g", "cpu", "--num-workers", str(args.num_workers),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return 1
        rates = {m[0]: float(m[1]) for m in re.findall(r"^(\w+): \d+ rows from .*\(([\d.]+) img/s\)$",
                                                       proc.stdout + proc.stderr, re.M)}

        model = features._build_backbone("resnet50", "random", 20).eval()
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        with torch.inference_mode():
            model(x)
            t = time.time()
            model(x)
            model(x)
        backbone = 2 * args.batch_size / (time.time() - t)

        names = np.load(folder / "formatted_train_images.npy")
        jpegs = folder / "VOCdevkit" / "VOC2012" / "JPEGImages"
        loader = {}
        for workers in sorted({1, args.num_workers}):
            t, n = time.time(), 0
            for _, images, _ in DataLoader(image_cache._Decoded(jpegs, np.concatenate([names] * 3), args.image_size),
                                           batch_size=args.batch_size, num_workers=workers):
                n += len(images)
            loader[f"{workers}_workers"] = round(n / (time.time() - t), 1)
    print(json.dumps({"image_size": args.image_size, "threads": torch.get_num_threads(),
                      "end_to_end_img_s": rates, "extraction_wall_s": round(wall, 1),
                      "backbone_alone_img_s": round(backbone, 2), "loader_alone_img_s": loader}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
