"""Datasets: per-dataset metadata, the original's 80/20 split, transforms and the torch Dataset.

Sets, as in the original:
  train = 80 % of the official train split, with the single-positive observed labels (full labels for `bce`);
  val   = the other 20 %, with full labels (model selection);
  test  = the official val/test split, with full labels.
"""
from __future__ import annotations

import functools
import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
# torchvision is imported inside the functions that use it: importing it takes ~2 s, which a linear probe on
# cached features (main.py --features) never needs.

from preproc.common import format_hint, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_subdir: str  # image root, relative to <data_root>/<dataset> (or absolute)
    single_positive: bool = False  # the train labels are single positives already (no full labels)
    features: bool = False  # formatted_{train,val}_features.npy instead of images
    defaults: tuple = ()  # (setting, value) pairs of dataset.json's "defaults"


DATASET_INFO: dict[str, DatasetInfo] = {
    "pascal": DatasetInfo(20, "VOCdevkit/VOC2012/JPEGImages"),
    "coco": DatasetInfo(80, ""),
    "nuswide": DatasetInfo(81, "Flickr"),
    "cub": DatasetInfo(312, "CUB_200_2011/images"),
    "demo": DatasetInfo(12, "images"),
}


class DataError(RuntimeError):
    """Missing or malformed dataset files; the message says what to run or fix."""


def dataset_info(data_root: str | Path, dataset: str) -> DatasetInfo:
    """A benchmark's entry of DATASET_INFO, or the dataset.json of any other <data_root>/<dataset> (checked
    against its label files); DataError naming the file and the fix otherwise."""
    if dataset in DATASET_INFO:
        return DATASET_INFO[dataset]
    folder = Path(data_root) / dataset
    try:  # the check reads every file (features included): once per version of the folder's files
        files = sorted([*folder.glob("*.json"), *folder.glob("formatted_*.npy")])
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    except OSError:
        stamp = None
    return _checked_info(str(folder.resolve()), stamp)


@functools.lru_cache(maxsize=16)
def _checked_info(folder: str, stamp: tuple | None) -> DatasetInfo:
    from preproc.common import PreprocError, check_dataset_files, read_dataset_json
    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        raise DataError(f"unknown dataset {folder.name!r}: {folder / 'dataset.json'} does not exist; choose one of "
                        f"{sorted(DATASET_INFO)} or make {folder} with python preproc/format_folder.py --csv <CSV> "
                        f"--images <image folder> --save-path {shlex.quote(str(folder))}")
    try:
        info = read_dataset_json(folder)
        check_dataset_files(folder)
    except PreprocError as exc:
        raise DataError(str(exc)) from exc
    return DatasetInfo(info["num_classes"], info["image_folder"] or "", info["single_positive"], info["features"],
                       tuple(sorted(info["defaults"].items())))


def class_names(data_root: str | Path, dataset: str) -> list[str]:
    """The class names of the dataset's dataset.json (the format scripts write it), or "class 0", "class 1", ...
    for data formatted before class names were kept."""
    from preproc.common import PreprocError, read_dataset_json
    try:
        return list(read_dataset_json(Path(data_root) / dataset)["class_names"])
    except PreprocError:
        return [f"class {c}" for c in range(dataset_info(data_root, dataset).num_classes)]


def generate_split(num_ex: int, frac: float, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """The original's split: a permutation, the last round(frac * num_ex) go to idx_2, the rest to idx_1.

    Both index arrays are sorted. As in the original, frac = 0 gives idx_2 = everything (a `-0:` slice).
    """
    num_2 = int(np.round(frac * num_ex))
    num_1 = num_ex - num_2
    perm = rng.permutation(num_ex)
    return np.sort(perm[:num_1]), np.sort(perm[-num_2:])


def get_transforms(image_size: int) -> dict[str, transforms.Compose]:
    """Exact square bilinear resize (aspect not kept), flip for train only, ImageNet normalisation."""
    from torchvision import transforms

    def build(train: bool) -> transforms.Compose:
        steps = [transforms.Resize((image_size, image_size))]
        if train:
            steps.append(transforms.RandomHorizontalFlip(0.5))
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return transforms.Compose(steps)

    return {"train": build(True), "val": build(False), "test": build(False)}


class LabelledRows(Dataset):
    """Observed and true label matrices of a set's rows.

    The observed matrix lives in a shared-memory float64 tensor, so `set_observed` (pseudo-labelling between
    epochs) reaches DataLoader workers, persistent ones included, without rebuilding anything.
    """

    def __init__(self, labels_obs: np.ndarray, labels_true: np.ndarray) -> None:
        if len(labels_obs) != len(labels_true):
            raise DataError(f"{len(labels_obs)} observed but {len(labels_true)} true label rows")
        self._obs = torch.from_numpy(np.array(labels_obs, dtype=np.float64)).share_memory_()
        self.labels_true = np.asarray(labels_true, dtype=np.float64)
        # each sample's row in its formatted file (build_datasets sets them; predictions.npz records them)
        self.rows = np.arange(len(self.labels_true))
        self.full_labels = True  # labels_true are full labels (False: a single-positive dataset's train rows)
        self.pseudo_scores: np.ndarray | None = None  # EM_PL's (N, C) float32 score rows (main.attach_pseudo_scores)

    def __len__(self) -> int:
        return len(self.labels_true)

    @property
    def labels_obs(self) -> np.ndarray:
        """The current observed matrix (a view: do not edit in place, use `set_observed`)."""
        return self._obs.numpy()

    def set_observed(self, labels_obs: np.ndarray) -> None:
        if labels_obs.shape != tuple(self._obs.shape):
            raise ValueError(f"observed matrix shape {labels_obs.shape} != dataset's {tuple(self._obs.shape)}")
        self._obs.copy_(torch.from_numpy(np.asarray(labels_obs, dtype=np.float64)))

    def mark_positive(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Observed labels set to 1 where `mask` (len(rows), C) is true, in place (LL-Cp's permanent corrections;
        the shared matrix reaches DataLoader workers for the batches they have not prepared yet). A row may come
        more than once (an epoch's batches together; a torchrun shard's padding): each of its masks counts."""
        hit_rows, hit_classes = mask.cpu().nonzero(as_tuple=True)
        self._obs[rows.cpu()[hit_rows], hit_classes] = 1.0



class MultilabelDataset(LabelledRows):
    """Images plus observed and true label matrices."""

    def __init__(self, image_paths: np.ndarray, labels_obs: np.ndarray, labels_true: np.ndarray,
                 image_root: Path, transform) -> None:
        if not (len(image_paths) == len(labels_obs) == len(labels_true)):
            raise DataError(f"{len(image_paths)} images but {len(labels_obs)} observed and "
                            f"{len(labels_true)} true label rows")
        super().__init__(labels_obs, labels_true)
        self.image_paths = image_paths
        self.image_root = Path(image_root)
        self.transform = transform

    def __getitem__(self, idx: int) -> dict:
        """One sample. An unreadable image does not raise here (a DataLoader worker would wrap the message in
        its traceback text): the sample carries the message in "error" ("" when fine) and a blank image, and
        the training loop stops with `raise_sample_errors`."""
        image, error = read_rgb(self.image_root / str(self.image_paths[idx]))
        return {
            "image": self.transform(image),
            "label_vec_obs": self._obs[idx].float(),  # float32, as the original's FloatTensor copy
            "label_vec_true": torch.from_numpy(self.labels_true[idx]).float(),
            "idx": idx,
            "error": error,
        }


class FeatureDataset(LabelledRows):
    """Pre-extracted feature vectors (float32 (N, D), e.g. a frozen backbone's) plus the label matrices."""

    def __init__(self, features: np.ndarray, labels_obs: np.ndarray, labels_true: np.ndarray) -> None:
        if len(features) != len(labels_true):
            raise DataError(f"{len(features)} feature rows but {len(labels_true)} label rows")
        super().__init__(labels_obs, labels_true)
        # writable, contiguous float32: a read-only memory map is copied, rows already gathered into memory are not
        self.features = torch.from_numpy(np.require(features, np.float32, ["C", "W"]))
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def features_on(self, device: torch.device) -> torch.Tensor:
        """The feature matrix on `device`, copied there once (the training and the APL loaders share it)."""
        if device not in self._on_device:
            self._on_device[device] = self.features.to(device)
        return self._on_device[device]


FEATURE_EVAL_BATCH = 4096  # rows per batch of the val / test passes on features (no gradient: big batches are cheap)


class FeatureLoader:
    """Batches of a FeatureDataset as index slices of tensors in memory, no per-sample work: the features sit on
    the device once; a shuffled epoch's order is one `torch.randperm` from the global generator. Batches hold
    "features", the label rows and "idx", as the image loaders' batches (which hold "image" instead).
    `drop_last_of` = B > 0: the rows past the last full batch of B are left out, as a DataLoader with batch size B
    and drop_last=True leaves them (--drop-last; the eval passes' own batches are larger)."""

    def __init__(self, dataset: FeatureDataset, batch_size: int, shuffle: bool, device: torch.device,
                 drop_last_of: int = 0) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.rows = len(dataset) - (len(dataset) % drop_last_of if drop_last_of else 0)
        self.features = dataset.features_on(torch.device(device))
        self.labels_true = torch.from_numpy(dataset.labels_true).float()  # fixed: converted once, not per batch

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, self.rows, self.batch_size):
            rows = order[start:min(start + self.batch_size, self.rows)]
            if self.shuffle:  # index_select: the rows that indexing gives, at half its cost
                features = self.features.index_select(0, rows.to(self.features.device))
                obs, true = self.dataset._obs.index_select(0, rows), self.labels_true.index_select(0, rows)
            else:  # in order, a batch is a slice of rows: views, not copies
                features, obs, true = (t[start:start + len(rows)] for t in (self.features, self.dataset._obs,
                                                                            self.labels_true))
            yield {"features": features, "label_vec_obs": obs.float(), "label_vec_true": true, "idx": rows}


# The files whose content a run's numbers depend on, relative to <data_root>/<dataset> (the val split's observed
# labels are not read for anything a run reports). results.json records their sha256 (`data_fingerprint`).
FINGERPRINTED = ("formatted_train_images.npy", "formatted_train_labels.npy", "formatted_train_labels_obs.npy",
                 "formatted_val_images.npy", "formatted_val_labels.npy")


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, mtime_ns: int, size: int) -> str:
    """A file's sha256, read once per version of it (a sweep asks for every combination: a COCO-sized feature set
    is 0.7 GB)."""
    from fileio import file_sha256
    return file_sha256(path)


def data_fingerprint(data_root: str | Path, dataset: str, features: str | None = None) -> dict | None:
    """What a run trains and is evaluated on, by content: {"sha256": one hash over the files', "files": {name:
    sha256}, "root": the data root as an absolute path}. The files are FINGERPRINTED (those present: a features
    dataset has no image lists) and, with `features`, the feature set's two matrices. None when a label file or
    the feature set is missing (the run itself then says what to make)."""
    from features import FORMATTED, feature_dir
    folder = Path(data_root) / dataset
    names = [name for name in FINGERPRINTED if "labels" in name or (folder / name).is_file()]
    if features == FORMATTED:
        names += [f"formatted_{phase}_features.npy" for phase in ("train", "val")]
    elif features:
        names += [str((feature_dir(data_root, dataset, features) / f"{phase}_features.npy").relative_to(folder))
                  for phase in ("train", "val")]
    try:
        files = {name: _sha256_of_version(str((folder / name).resolve()), (folder / name).stat().st_mtime_ns,
                                          (folder / name).stat().st_size) for name in names}
    except OSError:
        return None
    combined = hashlib.sha256("".join(f"{name} {sha}\n" for name, sha in sorted(files.items())).encode())
    return {"sha256": combined.hexdigest(), "files": files, "root": str(Path(data_root).resolve())}


def read_rgb(path: Path) -> tuple[Image.Image, str]:
    """The image at `path` as RGB and "", or a blank 8 x 8 image and the message saying why it cannot be read
    (the caller raises it where it is not buried in a DataLoader worker's traceback text)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB"), ""
    except (OSError, ValueError) as exc:
        return Image.new("RGB", (8, 8)), f"cannot read image {path}: {exc}"


def raise_sample_errors(batch: dict) -> None:
    """Stop with the first unreadable image of a collated batch (see `MultilabelDataset.__getitem__`)."""
    for error in batch.get("error", ()):  # cached batches have none: their images were read when caching
        if error:
            raise DataError(error)


def _load_array(path: Path, command: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing {path}; create it with: {command}")
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty (zero-byte) file
        reason = "the file is empty" if path.stat().st_size == 0 else str(exc)
        raise DataError(f"cannot load {path} ({reason}); re-create it with: {command}") from exc


def _check_labels(labels: np.ndarray, path: Path, num_classes: int, allowed: tuple[float, ...]) -> None:
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(f"{path}: expected a label matrix of shape (N, {num_classes}), found {labels.shape}")
    bad = ~np.isin(labels, allowed)
    if bad.any():
        raise DataError(f"{path}: labels must take values in {allowed}, found {np.unique(labels[bad])[:5]}")


def make_commands(data_root: str | Path, dataset: str, info: DatasetInfo) -> tuple[str, str]:
    """The commands that make a dataset's formatted files, with the user's --data-root, each from its step on:
    (the chain from the label files: download when the dataset folder holds no raw data yet, format, draw the
    observed labels; the command that draws the observed labels)."""
    from preproc.common import DOWNLOAD_HINTS  # the benchmarks that preproc/download.py fetches
    root = Path(data_root) / dataset
    obs_command = shlex.join(["python", "preproc/generate_observed_labels.py", "--dataset", dataset, "--data-root",
                              str(data_root)])
    chain = [format_hint(root, info.features)]
    if dataset in DOWNLOAD_HINTS and not any(p.name != "README.md" for p in (root.iterdir() if root.is_dir() else ())):
        chain.insert(0, shlex.join(["python", "preproc/download.py", "--dataset", dataset, "--data-root",
                                    str(data_root)]))
    if dataset != "demo" and not info.single_positive:  # (the demo and single-positive data come with theirs)
        chain.append(obs_command)
    return ", then ".join(chain), obs_command


def load_formatted(data_root: str | Path, dataset: str, phase: str, images: bool = True) -> dict[str, np.ndarray]:
    """Images, true labels (float64) and observed labels (float64) of an official split ('train' or 'val');
    `images=False`: the labels only (a run on pre-extracted features)."""
    info = dataset_info(data_root, dataset)
    root = Path(data_root) / dataset
    format_command, obs_command = make_commands(data_root, dataset, info)
    paths = {k: root / f"formatted_{phase}_{k}.npy" for k in ("images", "labels", "labels_obs")}
    if images:
        images = _load_array(paths["images"], format_command)
        if images.ndim != 1 or images.dtype.kind != "U":
            raise DataError(f"{paths['images']}: expected a 1-D unicode string array, found {images.dtype} "
                            f"{images.shape}")
    labels = _load_array(paths["labels"], format_command).astype(np.float64)
    labels_obs = _load_array(paths["labels_obs"], obs_command).astype(np.float64)
    if images is False:
        images = np.array([f"row {i}" for i in range(len(labels))])  # stand-ins: only the count is read
    _check_labels(labels, paths["labels"], info.num_classes, (0.0, 1.0))
    _check_labels(labels_obs, paths["labels_obs"], info.num_classes, (-1.0, 0.0, 1.0))
    if not len(images) == len(labels) == len(labels_obs):
        raise DataError(f"{root}: {phase} split has {len(images)} images, {len(labels)} label rows and "
                        f"{len(labels_obs)} observed-label rows; re-run {format_command} and {obs_command}")
    stale = ((labels_obs == 1) & (labels != 1)).any(axis=1) | ((labels_obs == -1) & (labels != 0)).any(axis=1)
    if stale.any():
        raise DataError(f"{paths['labels_obs']}: {int(stale.sum())} rows observe labels that "
                        f"{paths['labels'].name} does not have (first: row {int(np.argmax(stale))}); the file is "
                        f"stale, re-create it with: {obs_command}")
    return {"images": images, "labels": labels, "labels_obs": labels_obs}


def load_pseudo_scores(path: str | Path, data_root: str | Path, dataset: str) -> np.ndarray:
    """EM_PL's score matrix (--pseudo-scores): a numeric .npy of shape (rows of formatted_train_labels.npy, classes),
    finite and in [0, 1], as float32 (the dtype of VLPL's CLIP scores, in which the thresholds compare). DataError,
    one line naming the file, otherwise."""
    path = Path(path)
    hint = f"python preproc/clip_scores.py --dataset {dataset} --data-root {data_root} writes one"
    if not path.is_file():
        raise DataError(f"--pseudo-scores {path}: no such file; {hint}")
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"--pseudo-scores {path}: cannot load it as a .npy array ({one_line(exc)}); {hint}") from exc
    if not isinstance(scores, np.ndarray):  # an .npz archive
        raise DataError(f"--pseudo-scores {path}: an .npz archive, not one .npy array; {hint}")
    labels = Path(data_root) / dataset / "formatted_train_labels.npy"
    expected = (len(np.load(labels, mmap_mode="r")), dataset_info(data_root, dataset).num_classes)
    if scores.shape != expected or scores.dtype.kind not in "fiu":
        raise DataError(f"--pseudo-scores {path}: expected numbers of shape {expected} (a row per row of {labels}, "
                        f"a column per class), found {scores.dtype} {scores.shape}")
    scores = scores.astype(np.float32)
    bad = ~np.isfinite(scores)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise DataError(f"--pseudo-scores {path}: {int(bad.sum())} entries are NaN or infinite (first: row {row}, "
                        f"class {column}); EM_PL needs a score for every entry")
    outside = (scores < 0) | (scores > 1)
    if outside.any():
        raise DataError(f"--pseudo-scores {path}: {int(outside.sum())} scores lie outside [0, 1] (min "
                        f"{scores.min():g}, max {scores.max():g}); EM_PL's thresholds compare probabilities: "
                        f"rescale them to [0, 1] (preproc/clip_scores.py writes CLIP's softmax scores)")
    return scores


def build_datasets(data_root: str | Path, dataset: str, image_size: int, train_set_variant: str = "observed",
                   val_frac: float = 0.2, split_seed: int = 1200,
                   features: dict[str, np.ndarray] | None = None, val_labels: str = "clean",
                   train_subsample: float = 1.0, val_subsample: float = 1.0,
                   subsample_seed: int = 0) -> dict[str, LabelledRows]:
    """The train / val / test datasets of the original (see the module docstring): of images, or, given
    `features` ({"train": official train rows, "val": official val rows}, as features.load_features returns
    them), of those feature vectors, with the same split.

    Cole et al.'s options: `val_labels="observed"` gives the val part its single positives as observed labels
    (selection on them: no fully labelled val set needed); `train_subsample`, `val_subsample` keep that share of
    the train / val part's rows, drawn with `subsample_seed` (independent of the split)."""
    info = dataset_info(data_root, dataset)
    if dataset == "demo":
        from preproc.make_demo import ensure_demo
        ensure_demo(Path(data_root) / "demo")
    official = {phase: load_formatted(data_root, dataset, phase, images=features is None) for phase in ("train", "val")}
    image_root = Path(data_root) / dataset / info.image_subdir
    tfm = get_transforms(image_size) if features is None else None

    train_idx, val_idx = generate_split(len(official["train"]["labels"]), val_frac, np.random.RandomState(split_seed))
    # one permutation of each part from one generator, drawn whatever the shares: the val rows kept do not
    # depend on whether the train part is subsampled
    subsampler = np.random.RandomState(subsample_seed)
    train_idx, val_idx = (np.sort(rows[perm[:max(1, int(round(share * len(rows))))]])
                          for rows, share, perm in ((train_idx, train_subsample, subsampler.permutation(len(train_idx))),
                                                    (val_idx, val_subsample, subsampler.permutation(len(val_idx)))))
    train_obs = official["train"]["labels_obs"] if train_set_variant == "observed" else official["train"]["labels"]

    def subset(split: str, rows: np.ndarray, obs: np.ndarray, phase: str) -> LabelledRows:
        true = official[split]["labels"][rows]
        if features is not None:  # (memory-mapped features: gathering the rows reads them, once)
            out = FeatureDataset(features[split][rows], obs[rows], true)
        else:
            out = MultilabelDataset(official[split]["images"][rows], obs[rows], true, image_root, tfm[phase])
        out.rows = rows
        return out

    sets = {
        "train": subset("train", train_idx, train_obs, "train"),
        # clean val, as the original's 'clean' variant (observed: the single positives)
        "val": subset("train", val_idx, official["train"]["labels" if val_labels == "clean" else "labels_obs"], "val"),
        "test": subset("val", np.arange(len(official["val"]["labels"])), official["val"]["labels"], "test"),
    }
    # single positives already: the train rows have no full labels to score the "clean" metrics against
    sets["train"].full_labels = not info.single_positive
    return sets
