"""Frozen-backbone feature extraction (features.py, preproc/extract_features.py).

The features must be the backbone's output on the evaluation transform of each image, recomputed here
independently (torchvision's own transform on the PIL image, the model rebuilt from the weights file) with the
same batch composition, compared with torch.equal; the image-cache path must give the same bits without decoding a
JPEG; an interrupted extraction must resume into byte-identical files. `decode="device"` (decoded and resized by
torchvision.io / transforms.v2 on the device, here the CPU) is held to the same standards against a recomputation
with those torchvision calls. Images: the real VOC JPEGs of tests/data
(write_pascal_root: 10 official train rows, 4 val rows), a resnet18 with seeded random weights saved as a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode
from torchvision.transforms import v2

import features
import fileio
import image_cache
from conftest import ROOT
from datasets import DataError, build_datasets, get_transforms
from features import extract_command, extract_features, feature_dir, feature_set_name, load_features
from helpers import write_pascal_root
from models import WeightsError, build_model
from preproc import extract_features as cli

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")  # tv 0.29

SIZE = 32
BATCH = 3  # 10 train rows: batches of 3, 3, 3, 1; 4 val rows: 3, 1
CPU = torch.device("cpu")
JPEGS = ("VOCdevkit", "VOC2012", "JPEGImages")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads make these tiny convolutions several times
    slower. Only the speed changes (the recomputations run with the same setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A resnet18 state dict with seeded random weights (non-trivial BatchNorm statistics, so eval mode matters)."""
    torch.manual_seed(3)
    net = build_model("resnet18", 20, "random").backbone
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "tiny_r18.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights_file):
    """(root, folder) of an uninterrupted extraction over JPEGs with 2 workers (read only: copy to change)."""
    root = write_pascal_root(tmp_path_factory.mktemp("reference"))
    return root, _extract(root, weights_file, num_workers=2)


@pytest.fixture(scope="module")
def device_reference(tmp_path_factory, weights_file):
    """(root, folder) of an uninterrupted extraction with decode="device" and 2 workers reading (read only)."""
    root = write_pascal_root(tmp_path_factory.mktemp("device_reference"))
    return root, _extract(root, weights_file, num_workers=2, decode="device")


def _bytes(folder) -> dict:
    return {p: (folder / f"{p}_features.npy").read_bytes() for p in ("train", "val")}


def _extract(root, weights_file, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("num_workers", 0)
    return extract_features(root, "pascal", "resnet18", str(weights_file), SIZE, **kwargs)


def _independent(root, weights_file, phase: str) -> torch.Tensor:
    """The backbone's output on torchvision's eval transform of each PIL image, batch by batch as extracted."""
    backbone = build_model("resnet18", 20, str(weights_file)).backbone.eval()
    transform = get_transforms(SIZE)["val"]
    names = np.load(root / "pascal" / f"formatted_{phase}_images.npy")
    images = [transform(Image.open(root.joinpath("pascal", *JPEGS, str(n))).convert("RGB")) for n in names]
    with torch.no_grad():
        return torch.cat([backbone(torch.stack(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])


def _independent_device(root, weights_file, phase: str) -> torch.Tensor:
    """The backbone's output, batch by batch as extracted, on each JPEG decoded by torchvision.io.decode_jpeg,
    resized by transforms.v2 (bilinear, antialiased, uint8) and finished by the eval transform's ToTensor and
    Normalize."""
    backbone = build_model("resnet18", 20, str(weights_file)).backbone.eval()
    _, to_tensor, normalize = get_transforms(SIZE)["val"].transforms  # Resize((S, S)), ToTensor, Normalize
    names = np.load(root / "pascal" / f"formatted_{phase}_images.npy")
    images = []
    for n in names:
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(root.joinpath("pascal", *JPEGS, str(n)))),
                                           mode=ImageReadMode.RGB)
        image = v2.functional.resize(image, [SIZE, SIZE], interpolation=v2.InterpolationMode.BILINEAR,
                                     antialias=True)
        images.append(normalize(to_tensor(image.permute(1, 2, 0).numpy())))  # HWC uint8, as ToTensor takes it
    with torch.no_grad():
        return torch.cat([backbone(torch.stack(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])


def _row_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ||a_i - b_i|| / ||b_i|| over the rows."""
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


# ----------------------------------------------------------------------------------------------------------------
# names

def test_names_folders_and_the_command():
    assert feature_set_name("resnet50", "imagenet", 448) == "resnet50_imagenet_448"
    assert feature_set_name("mobilenet_v2", "random", 64) == "mobilenet_v2_random_64"
    assert feature_set_name("resnet18", "/runs/x/my.best.pt", 64) == "resnet18_my.best_64"
    assert feature_dir("data", "coco", "a_b_1") == ROOT.joinpath("data", "coco", "features", "a_b_1").relative_to(ROOT)
    assert (extract_command("pascal", "resnet18", "/my w/x.pt", 64, "data") ==
            "python preproc/extract_features.py --dataset pascal --arch resnet18 --weights '/my w/x.pt' "
            "--image-size 64 --data-root data")


# ----------------------------------------------------------------------------------------------------------------
# values

def test_features_are_the_backbones_output_on_the_eval_transform(reference, weights_file):
    root, folder = reference
    assert folder == root / "pascal" / "features" / "resnet18_tiny_r18_32"  # named after the file's stem
    loaded = load_features(root, "pascal", "resnet18_tiny_r18_32")
    for phase, rows in (("train", 10), ("val", 4)):
        ours = np.load(folder / f"{phase}_features.npy")
        assert ours.dtype == np.float32 and ours.shape == (rows, 512)
        assert torch.equal(torch.from_numpy(ours), _independent(root, weights_file, phase))
        np.testing.assert_array_equal(loaded[phase], ours)
        assert not np.array_equal(ours[0], ours[1])  # different images, different features
    info = json.loads((folder / "info.json").read_text())
    assert info == loaded["info"]
    assert info["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert (info["arch"], info["image_size"], info["rows"], info["dim"]) == ("resnet18", 32, {"train": 10, "val": 4},
                                                                            512)
    assert info["transform"] == "Resize((32,32)) bilinear, ToTensor, Normalize(ImageNet)"
    assert info["sources"] == {"train": "the JPEGs (2 workers)", "val": "the JPEGs (2 workers)"}
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["seconds"] > 0
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "train_features.npy", "val_features.npy"]


def test_the_image_cache_gives_the_same_features_without_decoding(tmp_path, weights_file, reference, capsys,
                                                                  monkeypatch):
    root = write_pascal_root(tmp_path)
    from_jpegs = _bytes(reference[1])
    cache_dir = root / "pascal" / "cache"
    for phase, ds in build_datasets(root, "pascal", SIZE).items():  # what main.py --image-cache disk builds
        image_cache.build_cache(ds, SIZE, "disk", phase, cache_dir, num_workers=0)
    capsys.readouterr()

    def no_decoding(self, i):
        raise AssertionError("a JPEG was decoded")
    monkeypatch.setattr(image_cache._Decoded, "__getitem__", no_decoding)
    folder = _extract(root, weights_file)
    out = capsys.readouterr().out
    assert "train: reading the images from the image cache" in out and "train_32px.cache + " in out
    assert "val: reading the images from the image cache" in out and "test_32px.cache" in out
    assert _bytes(folder) == from_jpegs
    assert "cache" in json.loads((folder / "info.json").read_text())["sources"]["train"]

    # a split without a valid cache decodes its JPEGs; no cache is built for the extraction
    monkeypatch.undo()
    shutil.rmtree(folder)
    (cache_dir / "test_32px.cache").unlink()
    _extract(root, weights_file)
    out = capsys.readouterr().out
    assert "train: reading the images from the image cache" in out
    assert "val: decoding the JPEGs" in out and "test_32px.cache (none yet)" in out
    assert sorted(p.name for p in cache_dir.iterdir()) == ["train_32px.cache", "val_32px.cache"]
    assert _bytes(folder) == from_jpegs


# ----------------------------------------------------------------------------------------------------------------
# resuming and reuse

class Counting(nn.Module):
    """The backbone, counting its calls (the first is extract_features' probe of the output size); raises
    KeyboardInterrupt (Ctrl-C) at call `stop_at`."""

    def __init__(self, backbone: nn.Module, stop_at: int = 0) -> None:
        super().__init__()
        self.backbone, self.calls, self.stop_at = backbone, 0, stop_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.backbone(x)


@pytest.mark.parametrize("stop_at, rows_done", [(4, {"train": 3, "val": 0}),   # in train: batch 1 done
                                                (7, {"train": 10, "val": 0})])  # in val: train complete
def test_an_interrupted_extraction_resumes_into_the_same_files(tmp_path, weights_file, reference, capsys, stop_at,
                                                              rows_done):
    root = write_pascal_root(tmp_path)
    backbone = build_model("resnet18", 20, str(weights_file)).backbone
    with pytest.raises(KeyboardInterrupt):
        _extract(root, weights_file, model=Counting(backbone, stop_at))
    folder = feature_dir(root, "pascal", "resnet18_tiny_r18_32")
    progress = json.loads((folder / ".progress.json").read_text())
    assert progress["rows_done"] == rows_done
    assert not (folder / "info.json").exists() and not (folder / "val_features.npy").exists()
    assert (folder / "train_features.npy").exists() == (rows_done["train"] == 10)  # only complete splits
    with pytest.raises(DataError, match="its extraction did not finish.*extract it with: python preproc/"
                                        "extract_features.py --dataset pascal --arch resnet18 --weights .*tiny_r18.pt"):
        load_features(root, "pascal", "resnet18_tiny_r18_32")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(f"{fileio._HOST} {dead.pid}")  # as a run killed with kill -9 leaves it
    capsys.readouterr()
    model = Counting(backbone)
    _extract(root, weights_file, model=model, batch_size=5)  # the interrupted run's batch size is kept
    out = capsys.readouterr().out
    assert "resuming with --batch-size 3" in out
    train_batches_left = -(-(10 - rows_done["train"]) // BATCH)
    assert model.calls == 1 + train_batches_left + 2  # probe, the train batches not done, the 2 val batches
    assert ("train: resuming at row 3 of 10" in out) == (rows_done["train"] == 3)
    assert _bytes(folder) == _bytes(reference[1])
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "train_features.npy", "val_features.npy"]


def test_a_complete_set_is_reused_and_a_stale_one_made_again(tmp_path, weights_file, capsys):
    root = write_pascal_root(tmp_path)
    folder = _extract(root, weights_file)
    before = (folder / "train_features.npy").read_bytes()
    capsys.readouterr()
    model = Counting(nn.Identity(), stop_at=1)  # would raise if it ran
    assert _extract(root, weights_file, model=model) == folder
    assert "already complete" in capsys.readouterr().out and model.calls == 0

    # other weights under the same file name: the set is stale, extracted again with the new weights
    other = tmp_path / "w" / weights_file.name
    other.parent.mkdir()
    torch.manual_seed(4)
    torch.save(build_model("resnet18", 20, "random").backbone.state_dict(), other)
    _extract(root, other)
    assert "made from other weights_sha256; extracting it again" in capsys.readouterr().out
    assert (folder / "train_features.npy").read_bytes() != before
    assert load_features(root, "pascal", "resnet18_tiny_r18_32")["info"]["weights_sha256"] == \
        hashlib.sha256(other.read_bytes()).hexdigest()


def test_an_interrupted_extraction_with_other_weights_is_discarded(tmp_path, weights_file, capsys):
    root = write_pascal_root(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _extract(root, weights_file, model=Counting(build_model("resnet18", 20, str(weights_file)).backbone, 4))
    other = tmp_path / "w" / weights_file.name
    other.parent.mkdir()
    torch.manual_seed(4)
    torch.save(build_model("resnet18", 20, "random").backbone.state_dict(), other)
    capsys.readouterr()
    folder = _extract(root, other)
    assert "discarding an interrupted extraction" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.load(folder / "train_features.npy")), _independent(root, other, "train"))


def test_a_second_extraction_of_the_same_set_waits_for_the_first(tmp_path, weights_file, reference, capsys,
                                                                  monkeypatch):
    root = write_pascal_root(tmp_path)
    folder = feature_dir(root, "pascal", reference[1].name)
    folder.mkdir(parents=True)
    (folder / ".lock").write_text(f"{fileio._HOST} {os.getppid()}")  # held by a live process of this machine
    waits = []

    def first_one_finishes(seconds):
        waits.append(seconds)
        shutil.copytree(reference[1], folder, dirs_exist_ok=True)
        (folder / ".lock").unlink()
    monkeypatch.setattr(features.time, "sleep", first_one_finishes)
    model = Counting(build_model("resnet18", 20, str(weights_file)).backbone, stop_at=2)  # call 1: the size probe
    assert _extract(root, weights_file, model=model) == folder
    out = capsys.readouterr().out
    assert f"waiting for the extraction of process {os.getppid()}" in out and "made by another process" in out
    assert waits == [features.WAIT_S] and model.calls == 1 and not (folder / ".lock").exists()


def test_random_weights_are_the_same_in_every_run(tmp_path):
    """--weights random must give the same network after a restart, or a resumed file would mix two networks:
    the features are those of the network drawn from RANDOM_INIT_SEED, whatever the caller's random state."""
    root = write_pascal_root(tmp_path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    folder = extract_features(root, "pascal", "resnet18", "random", SIZE, batch_size=4, num_workers=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(features.RANDOM_INIT_SEED)
    backbone = build_model("resnet18", 20, "random").backbone.eval()
    names = np.load(root / "pascal" / "formatted_val_images.npy")
    transform = get_transforms(SIZE)["val"]
    with torch.no_grad():
        expected = backbone(torch.stack([transform(Image.open(root.joinpath("pascal", *JPEGS, str(n))).convert("RGB"))
                                         for n in names]))
    assert torch.equal(torch.from_numpy(np.load(folder / "val_features.npy")), expected)


# ----------------------------------------------------------------------------------------------------------------
# decoding on the device (--decode device; the device here is the CPU)

def test_device_decoding_gives_the_backbones_output_on_torchvisions_decoder_and_resize(device_reference,
                                                                                        weights_file):
    root, folder = device_reference
    assert folder.name == "resnet18_tiny_r18_32"  # the same name as the PIL set
    for phase in ("train", "val"):
        ours = np.load(folder / f"{phase}_features.npy")
        assert torch.equal(torch.from_numpy(ours), _independent_device(root, weights_file, phase))
    info = json.loads((folder / "info.json").read_text())
    assert info["decode"] == info["key"]["decode"] == "device"
    assert info["transform"].startswith("decode_jpeg (RGB) on the device, v2 resize((32,32)) bilinear antialias")
    assert info["sources"]["train"] == "the JPEGs decoded on cpu (2 workers reading)"


def test_a_pil_set_is_not_reused_for_device_decoding_nor_the_image_cache_read(tmp_path, weights_file, reference,
                                                                             device_reference, capsys):
    root = write_pascal_root(tmp_path)
    for phase, ds in build_datasets(root, "pascal", SIZE).items():  # valid caches: PIL-resized images
        image_cache.build_cache(ds, SIZE, "disk", phase, root / "pascal" / "cache", num_workers=0)
    folder = feature_dir(root, "pascal", reference[1].name)
    shutil.copytree(reference[1], folder)
    info = json.loads((folder / "info.json").read_text())
    del info["key"]["decode"]  # as written before the decode mode was keyed: made with PIL, still valid
    (folder / "info.json").write_text(json.dumps(info))
    capsys.readouterr()
    unused = Counting(nn.Identity(), stop_at=1)  # would raise if it ran
    assert _extract(root, weights_file, model=unused) == folder and unused.calls == 0
    assert "already complete" in capsys.readouterr().out

    _extract(root, weights_file, decode="device")
    out = capsys.readouterr().out
    assert "made from other decode; extracting it again" in out
    assert "train: reading the files with 0 workers, decoding and resizing them on cpu" in out
    assert _bytes(folder) == _bytes(device_reference[1])  # not the cache's PIL-resized images
    assert json.loads((folder / "info.json").read_text())["decode"] == "device"
    for phase in ("train", "val"):  # another decoder and resize: close, not the same set
        assert _row_relative_difference(np.load(folder / f"{phase}_features.npy"),
                                        np.load(reference[1] / f"{phase}_features.npy")) < 1e-2

    _extract(root, weights_file)  # and back: the PIL set is made again (here from the image cache)
    assert "made from other decode; extracting it again" in capsys.readouterr().out
    assert _bytes(folder) == _bytes(reference[1])
    assert json.loads((folder / "info.json").read_text())["decode"] == "pil"


def test_an_interrupted_device_decoding_resumes_into_the_same_files(tmp_path, weights_file, device_reference,
                                                                    capsys):
    root = write_pascal_root(tmp_path)
    backbone = build_model("resnet18", 20, str(weights_file)).backbone
    with pytest.raises(KeyboardInterrupt):  # call 4: the third train batch; the first is stored
        _extract(root, weights_file, model=Counting(backbone, stop_at=4), decode="device")
    folder = feature_dir(root, "pascal", "resnet18_tiny_r18_32")
    progress = json.loads((folder / ".progress.json").read_text())
    assert progress["rows_done"] == {"train": 3, "val": 0} and progress["key"]["decode"] == "device"
    capsys.readouterr()
    model = Counting(backbone)
    _extract(root, weights_file, model=model, batch_size=5, decode="device")
    out = capsys.readouterr().out
    assert "resuming with --batch-size 3" in out and "train: resuming at row 3 of 10" in out
    assert model.calls == 1 + 3 + 2  # the probe, the 3 train batches not done, the 2 val batches
    assert _bytes(folder) == _bytes(device_reference[1])
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "train_features.npy", "val_features.npy"]


@pytest.mark.parametrize("content, reason", [("truncated", "Image is incomplete or truncated"),
                                             ("text", "Unsupported image file")])
def test_device_decoding_stops_at_a_corrupt_image_with_its_name(tmp_path, weights_file, device_reference, capsys,
                                                                content, reason):
    root = write_pascal_root(tmp_path)
    jpegs = root.joinpath("pascal", *JPEGS)
    jpegs.unlink()  # a copy instead of the link to tests/data, with one broken image and one PNG
    shutil.copytree(write_pascal_root(tmp_path / "src").joinpath("pascal", *JPEGS), jpegs)
    names = np.load(root / "pascal" / "formatted_train_images.npy")
    good = (jpegs / names[7]).read_bytes()
    (jpegs / "broken.jpg").write_bytes(good[:len(good) // 2] if content == "truncated" else b"not a jpeg")
    decoded = torchvision.io.decode_jpeg(torchvision.io.read_file(str(jpegs / names[2])), mode=ImageReadMode.RGB)
    Image.fromarray(decoded.permute(1, 2, 0).numpy()).save(jpegs / "lossless.png")  # decoded on the CPU instead
    names[2], names[7] = "lossless.png", "broken.jpg"
    np.save(root / "pascal" / "formatted_train_images.npy", names)

    with pytest.raises(DataError, match=rf"^cannot read image {jpegs}/broken\.jpg: {reason}") as info:
        _extract(root, weights_file, num_workers=2, decode="device")
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value) and ".cpp" not in str(info.value)
    folder = feature_dir(root, "pascal", "resnet18_tiny_r18_32")
    assert json.loads((folder / ".progress.json").read_text())["rows_done"]["train"] == 6  # batches 0 and 1
    kept = np.load(folder / ".train_features.npy.partial")[:6]  # the PNG's pixels are those of the JPEG it replaces
    np.testing.assert_array_equal(kept, np.load(device_reference[1] / "train_features.npy")[:6])

    capsys.readouterr()  # the command line: one line naming the file, exit code 2
    assert cli.main(["--dataset", "pascal", "--arch", "resnet18", "--weights", str(weights_file), "--image-size",
                     str(SIZE), "--batch-size", str(BATCH), "--num-workers", "0", "--data-root", str(root), "-g",
                     "cpu", "--decode", "device"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image {jpegs}/broken.jpg: {reason}") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# bad input

def test_bad_input_stops_with_what_to_do(tmp_path, weights_file):
    root = write_pascal_root(tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset 'nope': .*dataset.json does not exist; choose one of \[.*'pascal'"):
        extract_features(root, "nope", "resnet18", "random", SIZE)
    with pytest.raises(WeightsError, match=r"--weights .*missing\.pt: no such file"):
        extract_features(root, "pascal", "resnet18", str(tmp_path / "missing.pt"), SIZE)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        extract_features(root, "pascal", "resnet18", "random", SIZE, batch_size=0)
    (root / "pascal" / "formatted_val_images.npy").unlink()
    (root / "pascal" / "formatted_train_labels_obs.npy").unlink()  # not needed
    with pytest.raises(DataError, match=rf"missing {root}/pascal/formatted_val_images\.npy; create it with: "
                                        rf"python preproc/format_pascal\.py --load-path {root}/pascal"):
        extract_features(root, "pascal", "resnet18", "random", SIZE)
    assert not (root / "pascal" / "features").exists()


def test_an_unreadable_image_stops_with_its_name_and_keeps_the_rows_done(tmp_path, weights_file):
    root = write_pascal_root(tmp_path)
    jpegs = root.joinpath("pascal", *JPEGS)
    jpegs.unlink()  # a copy instead of the link to tests/data, with one broken image
    shutil.copytree(write_pascal_root(tmp_path / "src").joinpath("pascal", *JPEGS), jpegs)
    names = np.load(root / "pascal" / "formatted_train_images.npy")
    names[7] = "broken.jpg"
    np.save(root / "pascal" / "formatted_train_images.npy", names)
    (jpegs / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"^cannot read image .*broken\.jpg") as info:
        _extract(root, weights_file, num_workers=2)
    assert "Traceback" not in str(info.value)
    folder = feature_dir(root, "pascal", "resnet18_tiny_r18_32")
    assert json.loads((folder / ".progress.json").read_text())["rows_done"]["train"] == 6  # batches 0 and 1


def test_load_features_names_the_missing_or_stale_file_and_the_command(tmp_path, weights_file, reference):
    root = write_pascal_root(tmp_path)
    with pytest.raises(DataError, match=rf"missing {root}/pascal/features/resnet50_imagenet_448/info\.json: the "
                                        r"feature set resnet50_imagenet_448 is not extracted; extract it with: python "
                                        r"preproc/extract_features\.py --dataset pascal --arch resnet50 --weights "
                                        rf"imagenet --image-size 448 --data-root {root}$"):
        load_features(root, "pascal", "resnet50_imagenet_448")
    with pytest.raises(DataError, match=r"--arch mobilenet_v2 --weights WEIGHTS --image-size 64 .*WEIGHTS: the path "
                                        r"of your my_w state-dict file"):
        load_features(root, "pascal", "mobilenet_v2_my_w_64")

    name = reference[1].name
    folder = feature_dir(root, "pascal", name)
    shutil.copytree(reference[1], folder)  # the same image names and labels: the reference's features fit
    load_features(root, "pascal", name)
    # the recorded backbone, for this root (the set was copied from another one, whose command it recorded)
    assert json.loads((folder / "info.json").read_text())["command"] == extract_command(
        "pascal", "resnet18", str(weights_file), SIZE, reference[0])
    command = extract_command("pascal", "resnet18", str(weights_file), SIZE, root)
    labels = root / "pascal" / "formatted_train_labels.npy"
    np.save(labels, np.load(labels)[:9])
    with pytest.raises(DataError, match=r"train_features\.npy has 10 rows but .*formatted_train_labels\.npy has 9: "
                                        r"the features are stale") as info:
        load_features(root, "pascal", name)
    assert str(info.value).endswith(command)
    labels.unlink()
    with pytest.raises(DataError, match=r"missing .*formatted_train_labels\.npy; create it with: python preproc/"
                                        r"format_pascal\.py"):
        load_features(root, "pascal", name)

    root = write_pascal_root(tmp_path / "b")
    folder = feature_dir(root, "pascal", name)
    shutil.copytree(reference[1], folder)
    images = root / "pascal" / "formatted_val_images.npy"
    np.save(images, np.load(images)[::-1])  # formatted again, in another order
    with pytest.raises(DataError, match="val_features.npy was made from another image list"):
        load_features(root, "pascal", name)
    np.save(images, np.load(images)[::-1])
    np.save(folder / "val_features.npy", np.zeros((4, 7), dtype=np.float32))
    with pytest.raises(DataError, match="train features have 512 dims but val features 7"):
        load_features(root, "pascal", name)


# ----------------------------------------------------------------------------------------------------------------
# command line

def test_the_command_line_extracts_and_reports_errors_in_one_line(tmp_path, weights_file, reference, capsys):
    root = write_pascal_root(tmp_path)
    args = ["--dataset", "pascal", "--arch", "resnet18", "--weights", str(weights_file), "--image-size", str(SIZE),
            "--batch-size", str(BATCH), "--num-workers", "0", "--data-root", str(root), "-g", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    folder = root / "pascal" / "features" / "resnet18_tiny_r18_32"
    assert f"features: {folder} (" in out and "s in all)" in out and "train: 10 rows from the JPEGs" in out
    assert _bytes(folder) == _bytes(reference[1])

    assert cli.main([*args[:4], "--weights", str(tmp_path / "none.pt"), *args[6:]]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --weights {tmp_path / 'none.pt'}: no such file (expected 'imagenet', 'random' or a " \
                  f"state dict path)\n"
    assert cli.main([*args, "-g", "x"]) == 2
    assert capsys.readouterr().err == "error: -g/--gpu must be 'auto', a CUDA index or 'cpu', got 'x'\n"

    # as a script, from another folder: an unknown dataset is one line, exit code 2
    run = subprocess.run([sys.executable, str(ROOT / "preproc" / "extract_features.py"), "--dataset", "nope",
                          "--data-root", str(root), "-g", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: unknown dataset 'nope': ") and run.stderr.count("\n") == 1
