"""Generate the bundled demo dataset: small images of coloured shapes, several per image (no download).

    python preproc/make_demo.py [--save-path ./data/demo]

12 classes = 4 shapes x 3 colours. Each image holds 1-3 shapes at random places on a noisy background, so
labels are genuinely multi-label and need a CNN to find them. Generation is deterministic (fixed seed) and
writes the same layout as the real datasets: images/<n>.png, formatted_{train,val}_{images,labels}.npy and
the single-positive formatted_{train,val}_labels_obs.npy (generate_observed_labels with seed 1200).
`main.py -d demo` calls `ensure_demo` and so generates it on first use.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from preproc.generate_observed_labels import generate_observed  # noqa: E402

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 50), "blue": (40, 70, 220)}
CLASS_NAMES = tuple(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)
NUM_TRAIN, NUM_TEST, SIZE, SEED = 4000, 1000, 48, 0
FILES = [f"formatted_{phase}_{kind}.npy" for phase in ("train", "val")
         for kind in ("images", "labels", "labels_obs")]


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


def make_demo(save_path: Path) -> None:
    """(Re)generate the whole demo into `save_path`; the formatted arrays are written last, atomically."""
    save_path = Path(save_path)
    tmp = save_path.with_name(save_path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
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
        arrays[f"formatted_{phase}_labels.npy"] = np.array(labels, dtype=np.float64)
        arrays[f"formatted_{phase}_labels_obs.npy"] = generate_observed(arrays[f"formatted_{phase}_labels.npy"],
                                                                        num_pos=1, num_neg=0, seed=1200)
    for name, arr in arrays.items():
        np.save(tmp / name, arr)
    (tmp / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    # swap in the finished folder (keeping a README or other files the user put there)
    save_path.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(save_path / "images", ignore_errors=True)
    os.replace(tmp / "images", save_path / "images")
    for name in [*arrays, "classes.txt"]:
        os.replace(tmp / name, save_path / name)
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo(save_path: Path) -> None:
    """Generate the demo unless it is already complete."""
    if all((Path(save_path) / f).is_file() for f in FILES):
        return
    print(f"generating the demo dataset into {save_path} ({NUM_TRAIN} + {NUM_TEST} images, once) ...", flush=True)
    make_demo(save_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save-path", default="./data/demo", help="output folder")
    args = p.parse_args(argv)
    make_demo(Path(args.save_path))
    print(f"wrote the demo dataset to {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
