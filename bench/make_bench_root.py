"""Build a small data root that main.py and bench/loader.py accept, from a folder of JPEGs.

    python bench/make_bench_root.py SRC OUT [--upscale PX] [--split real|all-train]

SRC is either a CUB-200-2011 folder (holding images.txt, train_test_split.txt, image_class_labels.txt and
attributes/class_attribute_labels_continuous.txt, e.g. tests/data/cub/CUB_200_2011 or the full-size
/work/shared/realdata/cub/CUB_200_2011) or any folder of JPEGs (searched recursively).

OUT/pascal/ is written as a 20-class ("pascal"-shaped) formatted data root, so `-d pascal --data-root OUT`
works. From a CUB folder the labels are those of tests/test_end_to_end.py (3 species + 17 class-level
attributes, the official train/test split); from a plain folder they are random (1-3 of 20 per image, the
images split 50/50 by a fixed seed). Observed labels: one positive per image (generate_observed, seed 1200).

--upscale PX re-encodes every image as a JPEG (quality 90) whose long side is PX, to give the 160 px test images
of tests/data the decode cost of full-size photos; without it the images are linked, not copied.
--split all-train puts every image in the official train split (the loader benchmark reads the train set, 80 %
of it), keeping the real test images as the official val split.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from preproc.generate_observed_labels import generate_observed  # noqa: E402

NUM_CLASSES = 20
DATASET = "pascal"
IMAGE_SUBDIR = Path("VOCdevkit") / "VOC2012" / "JPEGImages"


def _read_table(path: Path) -> dict[int, str]:
    return {int(line.split()[0]): line.split()[1] for line in path.read_text().splitlines() if line.strip()}


def _cub_rows(cub: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image names (relative to cub/images), 20 labels each, and whether each is an official train image."""
    names = _read_table(cub / "images.txt")
    is_train = {k: int(v) for k, v in _read_table(cub / "train_test_split.txt").items()}
    class_of = {k: int(v) for k, v in _read_table(cub / "image_class_labels.txt").items()}
    present = [i for i in sorted(names) if (cub / "images" / names[i]).is_file()]
    if not present:
        raise SystemExit(f"no image of {cub / 'images.txt'} is present under {cub / 'images'}")
    species = sorted({class_of[i] for i in present})
    attr = np.loadtxt(cub / "attributes" / "class_attribute_labels_continuous.txt")[[s - 1 for s in species]] >= 50
    varying = np.where(attr.any(axis=0) & ~attr.all(axis=0))[0]
    n_species = min(len(species), 3)
    # labels: up to 3 species one-hot (the first three species present), then varying attributes up to 20
    table = np.zeros((len(species), NUM_CLASSES), dtype=bool)
    table[np.arange(n_species), np.arange(n_species)] = True
    n_attr = min(NUM_CLASSES - n_species, len(varying))
    table[:, n_species:n_species + n_attr] = attr[:, varying[:n_attr]]
    labels = table[[species.index(class_of[i]) for i in present]].astype(np.float64)
    labels[~labels.any(axis=1), 0] = 1.0  # every image needs one positive for its single-positive label
    return [names[i] for i in present], labels, np.array([is_train[i] == 1 for i in present])


def _folder_rows(src: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not files:
        raise SystemExit(f"no JPEG under {src}")
    rng = np.random.RandomState(1200)
    labels = np.zeros((len(files), NUM_CLASSES))
    for row in labels:
        row[rng.choice(NUM_CLASSES, rng.randint(1, 4), replace=False)] = 1.0
    return [str(p.relative_to(src)) for p in files], labels, rng.rand(len(files)) < 0.5


def make_bench_root(src: str | Path, out: str | Path, upscale: int | None = None, split: str = "real") -> Path:
    """Writes OUT/pascal (see the module docstring); returns OUT (the --data-root)."""
    from PIL import Image
    src, out = Path(src), Path(out)
    if (src / "images.txt").is_file():
        names, labels, train = _cub_rows(src)
        image_dir = src / "images"
    else:
        names, labels, train = _folder_rows(src)
        image_dir = src
    root = out / DATASET
    if root.exists():
        shutil.rmtree(root)
    (root / IMAGE_SUBDIR).parent.mkdir(parents=True)
    if upscale is None:
        (root / IMAGE_SUBDIR).symlink_to(image_dir.resolve())
    else:
        for name in names:
            dst = root / IMAGE_SUBDIR / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(image_dir / name) as img:
                img = img.convert("RGB")
                scale = upscale / max(img.size)
                img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR).save(dst, quality=90)
    phases = {"train": train | (split == "all-train"), "val": ~train}
    if not phases["val"].any():  # a folder without a test split: the last quarter is the official val split
        phases["val"] = np.arange(len(names)) >= 3 * len(names) // 4
    for phase, keep in phases.items():
        ids = np.where(keep)[0]
        np.save(root / f"formatted_{phase}_images.npy", np.array([names[i] for i in ids]))
        np.save(root / f"formatted_{phase}_labels.npy", labels[ids])
        np.save(root / f"formatted_{phase}_labels_obs.npy", generate_observed(labels[ids], 1, 0, 1200))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a CUB_200_2011 folder or any folder of JPEGs")
    p.add_argument("out", help="the data root to write (OUT/pascal is replaced)")
    p.add_argument("--upscale", type=int, help="re-encode the images with this long side (px)")
    p.add_argument("--split", choices=("real", "all-train"), default="real")
    args = p.parse_args(argv)
    out = make_bench_root(args.src, args.out, args.upscale, args.split)
    print(f"data root {out} (use: -d {DATASET} --data-root {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
