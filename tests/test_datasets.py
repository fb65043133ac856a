"""datasets.py: the three sets of the original, its transforms, and each load-time error once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DataError, build_datasets, generate_split, get_transforms, load_formatted, raise_sample_errors
from helpers import VOC_JPEGS, write_pascal_root


def test_sets_follow_the_original(tmp_path):
    root = write_pascal_root(tmp_path)
    official = load_formatted(root, "pascal", "train")
    test_files = load_formatted(root, "pascal", "val")
    sets = build_datasets(root, "pascal", image_size=32)
    train_idx, val_idx = generate_split(10, 0.2, np.random.RandomState(1200))
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (8, 2, 4)
    np.testing.assert_array_equal(sets["train"].image_paths, official["images"][train_idx])
    np.testing.assert_array_equal(sets["train"].labels_obs, official["labels_obs"][train_idx])  # single positives
    np.testing.assert_array_equal(sets["val"].labels_obs, official["labels"][val_idx])  # clean val
    np.testing.assert_array_equal(sets["test"].labels_obs, test_files["labels"])  # clean test
    clean = build_datasets(root, "pascal", image_size=32, train_set_variant="clean")  # bce trains on full labels
    np.testing.assert_array_equal(clean["train"].labels_obs, official["labels"][train_idx])

    item = sets["val"][1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label_vec_obs"].dtype == torch.float32 and item["idx"] == 1
    np.testing.assert_array_equal(item["label_vec_true"].numpy(), official["labels"][val_idx[1]])
    # val/test transform: exact resize, ToTensor, ImageNet normalisation, computed independently here
    with Image.open(VOC_JPEGS / str(sets["val"].image_paths[1])) as img:
        ref = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(item["image"].numpy(), ref.transpose(2, 0, 1), atol=1e-5)


def test_train_transform_flips_and_eval_does_not():
    tfm = get_transforms(8)
    img = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    torch.manual_seed(0)
    outs = [tfm["train"](img) for _ in range(20)]
    plain = tfm["val"](img)
    flipped = [o for o in outs if not torch.equal(o, plain)]
    assert 0 < len(flipped) < 20 and all(torch.equal(o, plain.flip(-1)) for o in flipped)


def test_set_observed_rejects_a_wrong_shape(tmp_path):
    ds = build_datasets(write_pascal_root(tmp_path), "pascal", image_size=8)["train"]
    with pytest.raises(ValueError, match="shape"):
        ds.set_observed(np.zeros((3, 20)))


def _break(root, name, array):
    np.save(root / "pascal" / name, array)


@pytest.mark.parametrize("name, array, message", [
    ("formatted_train_labels.npy", np.full((10, 20), 2.0), r"labels must take values in \(0.0, 1.0\)"),
    ("formatted_train_labels.npy", np.zeros((10, 19)), r"expected a label matrix of shape \(N, 20\), found \(10, 19\)"),
    ("formatted_train_images.npy", np.array(["a.jpg"] * 9), "10 label rows"),
    ("formatted_train_images.npy", np.array([b"a.jpg"] * 10), "expected a 1-D unicode string array"),
    ("formatted_train_labels_obs.npy", np.eye(10, 20), "stale"),
])
def test_malformed_formatted_files_say_what_is_wrong(tmp_path, name, array, message):
    root = write_pascal_root(tmp_path)
    _break(root, name, array)
    with pytest.raises(DataError, match=message):
        build_datasets(root, "pascal", image_size=8)


def test_missing_files_name_the_command(tmp_path):
    root = write_pascal_root(tmp_path)
    (root / "pascal" / "formatted_val_labels_obs.npy").unlink()
    with pytest.raises(DataError, match="python preproc/generate_observed_labels.py --dataset pascal"):
        build_datasets(root, "pascal", image_size=8)
    (root / "pascal" / "formatted_val_images.npy").unlink()
    with pytest.raises(DataError, match="formatted_val_images.npy; create it with: python preproc/format_pascal.py"):
        build_datasets(root, "pascal", image_size=8)


def test_corrupt_npy_names_the_file(tmp_path):
    root = write_pascal_root(tmp_path)
    (root / "pascal" / "formatted_train_labels.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match="cannot load .*formatted_train_labels.npy"):
        build_datasets(root, "pascal", image_size=8)


def test_unreadable_image_names_the_file(tmp_path):
    root = write_pascal_root(tmp_path)
    images = np.load(root / "pascal" / "formatted_train_images.npy")
    images[3] = "missing.jpg"
    np.save(root / "pascal" / "formatted_train_images.npy", images)
    sets = build_datasets(root, "pascal", image_size=8)
    ds = next(d for d in (sets["train"], sets["val"]) if "missing.jpg" in d.image_paths)
    # the sample carries the message (a worker would bury a raised one in traceback text) ...
    sample = ds[list(ds.image_paths).index("missing.jpg")]
    assert "cannot read image" in sample["error"] and "missing.jpg" in sample["error"]
    assert ds[0 if ds.image_paths[0] != "missing.jpg" else 1]["error"] == ""
    # ... and the loop stops on it with exactly that message
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with pytest.raises(DataError, match=r"^cannot read image .*missing\.jpg"):
        raise_sample_errors(batch)


def test_unreadable_image_in_a_worker_stops_the_run_cleanly(tmp_path, capsys):
    import json

    import main
    root = write_pascal_root(tmp_path)
    np.save(root / "pascal" / "formatted_train_images.npy", np.array(["missing.jpg"] * 10))
    assert main.main(["-d", "pascal", "-g", "cpu", "--data-root", str(root), "--results-dir", str(tmp_path / "res"),
                      "--arch", "resnet18", "--weights", "random", "--image-size", "16", "--num-workers", "1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot read image" in err and "missing.jpg" in err
    assert "Traceback" not in err
    (run_dir,) = list((tmp_path / "res").iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "missing.jpg" in res["error"]
    assert "missing.jpg" in (run_dir / "console.log").read_text()
