"""The speed options of issue 8 that must not change results: the exact image cache and the sync-free step.

The cache must give the faithful path's tensors bit for bit (real CUB JPEGs of tests/data, non-square, resized
to squares), its loader the faithful DataLoader's order and flips (with and without workers), and a whole run
with --image-cache ram or disk the same results.json numbers as without. A cache file that is stale, truncated
or foreign is rebuilt; one that cannot fit is refused before anything is written.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import image_cache
import main
from datasets import DataError, build_datasets
from image_cache import CachedLoader, build_cache, make_loaders, to_model_input

CPU = torch.device("cpu")


def _datasets(bird_root, size: int = 40):
    return build_datasets(bird_root, "pascal", size)


# ----------------------------------------------------------------------------------------------------------------
# tensors, order and flips

@pytest.mark.parametrize("size", [40, 67])
def test_cached_images_equal_the_pil_path(bird_root, tmp_path, size):
    ds = _datasets(bird_root, size)["test"]  # eval transform: Resize, ToTensor, Normalize
    cached = build_cache(ds, size, "ram", "test", tmp_path, num_workers=0)
    assert cached.dtype == np.uint8 and cached.shape == (len(ds), size, size, 3)
    batch = next(iter(CachedLoader(ds, cached, batch_size=len(ds), shuffle=False, flip=False)))
    ours = to_model_input(batch, CPU)
    faithful = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert ours.dtype == torch.float32 and torch.equal(ours, faithful)
    assert not torch.equal(ours.flip(3), faithful)  # the images are not symmetric: a flip would be noticed


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
def test_cached_loader_gives_the_dataloaders_batches_and_flips(bird_root, tmp_path, workers, persistent):
    # two epochs, so that persistent workers (whose random streams carry over) are covered
    ds = _datasets(bird_root)["train"]
    cached = build_cache(ds, 40, "ram", "train", tmp_path, num_workers=0)
    faithful = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=persistent)
    ours = CachedLoader(ds, cached, batch_size=8, shuffle=True, flip=True, num_workers=workers,
                        persistent_workers=persistent)
    flipped = 0
    for seed_epoch in range(2):
        torch.manual_seed(seed_epoch)
        expected = [(b["idx"], b["image"], b["label_vec_obs"]) for b in faithful]
        after_faithful = torch.get_rng_state()
        torch.manual_seed(seed_epoch)
        got = [(b["idx"], to_model_input(b, CPU), b["label_vec_obs"], b["flip"]) for b in ours]
        assert torch.equal(torch.get_rng_state(), after_faithful)  # the same draws from the global stream
        assert len(got) == len(expected) == len(ours)
        for (idx, image, obs), (idx2, image2, obs2, flips) in zip(expected, got):
            assert torch.equal(idx, idx2) and torch.equal(obs, obs2) and torch.equal(image, image2)
            flipped += int(flips.sum())
    assert 0 < flipped < 2 * len(ds)  # both cases occur, so the flips were really compared


# ----------------------------------------------------------------------------------------------------------------
# a whole run

def _run(root, results, *extra) -> dict:
    assert main.main(["-d", "pascal", "-g", "cpu", "--data-root", str(root), "--results-dir", str(results),
                      "--num-workers", "0", "--arch", "resnet18", "--weights", "random", "--image-size", "40",
                      "--batch-size", "8", "--epochs", "3", "--warmup-epoch", "1", "-l", "EM_APL", *extra]) == 0
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return json.loads((run_dir / "results.json").read_text())


def _numbers(results: dict):
    """Everything but timings, the config and the environment."""
    if isinstance(results, dict):
        return {k: _numbers(v) for k, v in results.items()
                if k not in ("seconds", "config", "environment", "process")}
    return results


def test_a_run_with_the_cache_writes_the_same_numbers(bird_root, tmp_path):
    plain = _run(bird_root, tmp_path / "off")
    assert plain["epochs"]["2"]["apl_new_pseudo_labels"] > 0  # pseudo-labelling ran, and is compared too
    for mode in ("ram", "disk"):
        cached = _run(bird_root, tmp_path / mode, "--image-cache", mode)
        assert cached["config"]["image_cache"] == mode
        assert _numbers(cached) == _numbers(plain)
    assert sorted(p.name for p in (bird_root / "pascal" / "cache").iterdir()) == [
        "test_40px.cache", "train_40px.cache", "val_40px.cache"]


# ----------------------------------------------------------------------------------------------------------------
# the disk cache: reuse, staleness, space, interruption

def _disk(ds, tmp_path, capsys):
    array = build_cache(ds, 40, "disk", "train", tmp_path, num_workers=0)
    return array, capsys.readouterr().out


def test_a_valid_disk_cache_is_reused_and_a_stale_one_rebuilt(bird_root, tmp_path, capsys):
    sets = _datasets(bird_root)
    ds = sets["train"]
    first, out = _disk(ds, tmp_path, capsys)
    path = tmp_path / "train_40px.cache"
    assert "building" in out and path.is_file()
    reference = np.array(first)
    stamp = path.stat().st_mtime_ns
    second, out = _disk(ds, tmp_path, capsys)
    assert "building" not in out and path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(second, reference)

    cases = {
        "truncated": lambda: os.truncate(path, path.stat().st_size - 10),
        "not a cache file": lambda: path.write_bytes(b"\x00" * path.stat().st_size),
    }
    for reason, damage in cases.items():
        damage()
        rebuilt, out = _disk(ds, tmp_path, capsys)
        assert reason in out and "rebuilding" in out
        np.testing.assert_array_equal(rebuilt, reference)

    # the same file name, other images (another subset): rebuilt from those
    other, out = _disk(sets["val"], tmp_path, capsys)
    assert "built from other" in out and "images_sha256" in out and other.shape[0] == len(sets["val"])
    # an older PIL (the header records the version): rebuilt
    monkey_header = json.loads(path.read_bytes()[:image_cache.HEADER_BYTES].rstrip(b"\0"))
    monkey_header["pil"] = "0.0"
    with open(path, "r+b") as f:
        f.write(json.dumps(monkey_header).encode().ljust(image_cache.HEADER_BYTES, b"\0"))
    _, out = _disk(sets["val"], tmp_path, capsys)
    assert "built from other pil" in out


def test_an_unreadable_image_stops_the_build_with_its_name(bird_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    # a copy (the symlinked image folder is copied, tests/data stays untouched)
    shutil.copytree(bird_root / "pascal", root / "pascal", ignore=shutil.ignore_patterns("cache"), symlinks=False)
    ds = build_datasets(root, "pascal", 40)["train"]
    victim = root / "pascal" / "VOCdevkit" / "VOC2012" / "JPEGImages" / str(ds.image_paths[5])
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"^cannot read image .*{victim.name}") as info:
        build_cache(ds, 40, "ram", "x", tmp_path, num_workers=2)
    assert "Traceback" not in str(info.value)


def test_replaced_images_make_the_cache_stale(bird_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(bird_root / "pascal", root / "pascal", ignore=shutil.ignore_patterns("cache"), symlinks=False)
    ds = build_datasets(root, "pascal", 40)["train"]
    build_cache(ds, 40, "disk", "train", tmp_path, num_workers=0)
    image = root / "pascal" / "VOCdevkit" / "VOC2012" / "JPEGImages" / str(ds.image_paths[0])
    image.write_bytes(image.read_bytes())  # same name and bytes, newer file
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    build_cache(ds, 40, "disk", "train", tmp_path, num_workers=0)
    assert "images_mtime_ns" in capsys.readouterr().out


def test_leftover_of_a_killed_build_is_removed(bird_root, tmp_path, capsys):
    import subprocess
    import sys
    import fileio
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".train_40px.cache.{fileio._HOST}.{dead.pid}.0123abcd.tmp"
    leftover.write_bytes(b"\0" * 1000)
    build_cache(_datasets(bird_root)["train"], 40, "disk", "train", tmp_path, num_workers=0)
    assert not leftover.exists() and "interrupted cache build" in capsys.readouterr().out


def test_no_room_for_the_cache_stops_before_writing(bird_root, tmp_path, monkeypatch):
    ds = _datasets(bird_root)["train"]
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"needs 0\.\d GB.*only 0\.0 GB are free.*--image-cache off"):
        build_cache(ds, 40, "disk", "train", tmp_path, num_workers=0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(image_cache, "_available_ram", lambda: 1000)
    with pytest.raises(DataError, match="memory.*--image-cache disk"):
        build_cache(ds, 40, "ram", "train", tmp_path, num_workers=0)


def test_an_interrupted_build_leaves_nothing_that_could_be_read(bird_root, tmp_path, monkeypatch):
    ds = _datasets(bird_root)["train"]

    def crash(out, *args):
        out[:3] = 7
        raise KeyboardInterrupt
    monkeypatch.setattr(image_cache, "_fill", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cache(ds, 40, "disk", "train", tmp_path, num_workers=0)
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a temporary


# ----------------------------------------------------------------------------------------------------------------
# options the device does not support

def test_unsupported_speed_options_name_the_alternative(bird_root, tmp_path, capsys, monkeypatch):
    args = ["-d", "pascal", "-g", "cpu", "--data-root", str(bird_root), "--results-dir", str(tmp_path / "r"),
            "--arch", "resnet18", "--weights", "random", "--image-size", "40", "--num-workers", "0"]
    assert main.main([*args, "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --amp fp16 needs a CUDA GPU") and "--amp bf16" in err
    monkeypatch.setattr("engine.shutil.which", lambda name: None)
    assert main.main([*args, "--compile"]) == 2
    err = capsys.readouterr().err
    assert "--compile" in err and "C++ compiler" in err and "leave --compile off" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_bf16_and_channels_last_train_and_evaluate(bird_root, tmp_path):
    # statistically, not bitwise, the same: only that the run works end to end and learns something finite
    res = _run(bird_root, tmp_path, "--amp", "bf16", "--channels-last", "--image-cache", "ram")
    assert res["status"] == "finished" and res["config"]["amp"] == "bf16" and res["config"]["channels_last"]
    assert np.isfinite(res["test_map"]) and res["test_map"] > 0


def test_make_loaders_off_is_the_original_dataloader(bird_root):
    loaders = make_loaders(_datasets(bird_root), 8, 0, False, CPU)
    assert all(isinstance(loader, DataLoader) for loader in loaders.values())
    assert loaders["train"].batch_size == 8 and not loaders["train"].drop_last
