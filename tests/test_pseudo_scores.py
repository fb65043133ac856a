"""EM_PL's score file (--pseudo-scores) and preproc/clip_scores.py, which writes one with open_clip.

The score file is checked in one line naming it (shape, NaN, outside [0, 1], missing, not an array); the training
step hands the loss the score rows of its batch; EM_PL runs end to end on a hand-made score file; clip_scores.py
writes a valid file with a randomly initialised open_clip model (no weights can be downloaded here), equal to
CLIP's formula recomputed here, and fails in one line without the package or the weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import config
import main
import train
from conftest import ROOT
from helpers import TinyNet, hand_made_scores, tiny_dataset
from preproc import clip_scores

FAST = ["-g", "cpu", "--arch", "resnet18", "--weights", "random", "--image-size", "16", "--epochs", "2",
        "--batch-size", "16", "--num-workers", "0"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def run_em_pl(root, results, scores_path, *extra) -> int:
    return main.main(["-d", "pascal", "-l", "EM_PL", "--data-root", str(root), "--results-dir", str(results),
                      "--pseudo-scores", str(scores_path), *FAST, *extra])


# ------------------------------------------------------------------------------------------------------------
# the score file


@pytest.mark.parametrize("problem,expected", [
    ("shape", "expected numbers of shape (90, 20)"), ("nan", "NaN or infinite (first: row 3, class 4)"),
    ("above", "outside [0, 1] (min 0, max 1.5)"), ("below", "outside [0, 1] (min -0.25"),
    ("missing", "no such file"), ("npz", "an .npz archive"), ("text", "cannot load it as a .npy array"),
    ("strings", "expected numbers")])
def test_bad_score_files_are_refused_in_one_line_naming_the_file(bird_root, tmp_path, capsys, problem, expected):
    scores = np.full((90, 20), 0.1)
    path = tmp_path / "scores.npy"
    if problem == "shape":
        np.save(path, scores[:, :19])
    elif problem == "nan":
        scores[3, 4] = np.nan
        np.save(path, scores)
    elif problem == "above":
        scores[0, 0] = 1.5
        scores[1, 1] = 0.0
        np.save(path, scores)
    elif problem == "below":
        scores[5, 0] = -0.25
        np.save(path, scores)
    elif problem == "npz":
        path = tmp_path / "scores.npz"
        np.savez(path, scores=scores)
    elif problem == "text":
        path.write_text("0.1 0.2\n")
    elif problem == "strings":
        np.save(path, np.full((90, 20), "a"))
    assert run_em_pl(bird_root, tmp_path / "res", path) == 2
    err = one_line_error(capsys)
    assert f"--pseudo-scores {path}" in err and expected in err, err
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())  # no run folder


def test_em_pl_without_a_score_file_or_with_crossed_thresholds(bird_root, tmp_path, capsys):
    assert main.main(["-d", "pascal", "-l", "EM_PL", "--data-root", str(bird_root), *FAST]) == 2
    assert "-l EM_PL needs --pseudo-scores" in one_line_error(capsys)
    np.save(tmp_path / "s.npy", np.full((90, 20), 0.1))
    assert run_em_pl(bird_root, tmp_path / "res", tmp_path / "s.npy", "--pl-neg-threshold", "0.5") == 2
    assert "--pl-neg-threshold 0.5 must not exceed --pl-pos-threshold 0.3" in one_line_error(capsys)


def test_the_flag_is_reported_unused_with_another_loss(bird_root, tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.full((90, 20), 0.1))
    assert main.main(["-d", "pascal", "-l", "an", "--data-root", str(bird_root), "--results-dir", str(tmp_path / "r"),
                      "--pseudo-scores", str(tmp_path / "s.npy"), *FAST, "--epochs", "1"]) == 0
    assert "warning: --pseudo-scores is ignored: -l an does not use it" in capsys.readouterr().out


def test_the_training_step_gets_the_score_rows_of_its_batch(tmp_path, monkeypatch):
    ds = tiny_dataset(tmp_path, 20, 5)
    ds.pseudo_scores = np.random.RandomState(0).rand(20, 5).astype(np.float32)
    cfg = config.build_config("demo", loss="EM_PL", pseudo_scores="unused.npy", batch_size=8, num_workers=0)
    seen = []
    real = train.compute_loss

    def spy(name, logits, obs, true, **kw):
        seen.append(kw["pseudo_scores"])
        return real(name, logits, obs, true, **kw)
    monkeypatch.setattr(train, "compute_loss", spy)
    engine = train.build_engine(TinyNet(5), torch.device("cpu"))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()  # shuffled: gathered, not sliced
    train.train_epoch(engine, DataLoader(ds, batch_size=8, sampler=order), torch.optim.Adam(engine.model.parameters()),
                      torch.amp.GradScaler("cpu", enabled=False), cfg, 1, ds)
    assert [len(s) for s in seen] == [8, 8, 4]
    assert torch.equal(torch.cat(seen), torch.from_numpy(ds.pseudo_scores[order]))


# ------------------------------------------------------------------------------------------------------------
# end to end on a hand-made score file


def test_em_pl_runs_on_real_images_with_a_hand_made_score_file(bird_root, tmp_path):
    scores = hand_made_scores(bird_root)
    np.save(tmp_path / "scores.npy", scores)
    assert run_em_pl(bird_root, tmp_path / "res", tmp_path / "scores.npy", "--pl-neg-threshold", "0.01",
                     "--epochs", "1") == 0  # (tests/test_end_to_end.py trains longer)
    (run_dir,) = (tmp_path / "res").iterdir()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["loss_hyperparameters"]["pl_pos_threshold"] == 0.3
    # the counts, by hand: the train part's rows (the 80 % split of the 90 official train rows), unknowns only
    from datasets import build_datasets
    train_set = build_datasets(str(bird_root), "pascal", 16)["train"]
    unknown = train_set.labels_obs == 0
    rows = scores[train_set.rows].astype(np.float32)
    assert res["pseudo_scores"] == {
        "file": str(tmp_path / "scores.npy"), "unknowns": int(unknown.sum()),
        "positive_pseudo_labels": int((unknown & (rows > np.float32(0.3))).sum()),
        "negative_pseudo_labels": int((unknown & (rows < np.float32(0.01))).sum())}
    assert res["pseudo_scores"]["positive_pseudo_labels"] > 10 and res["pseudo_scores"]["negative_pseudo_labels"] > 0
    assert res["recommended_threshold"] == 0.75


# ------------------------------------------------------------------------------------------------------------
# preproc/clip_scores.py


def clip_args(root, out, *extra):
    return ["--dataset", "pascal", "--data-root", str(root), "--model", "ViT-S-32", "--pretrained", "random",
            "--clip-image-size", "64", "--image-size", "32", "-g", "cpu", "--num-workers", "0", "--batch-size", "16",
            "--out", str(out), *extra]


def test_clip_scores_with_random_weights_writes_a_valid_score_file(bird_root, tmp_path, capsys):
    import open_clip
    from PIL import Image
    from torchvision import transforms

    from datasets import get_transforms
    out = tmp_path / "clip.npy"
    assert clip_scores.main(clip_args(bird_root, out)) == 0
    scores = np.load(out)
    assert scores.shape == (90, 20) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)  # a softmax over the classes
    assert scores.std(0).max() > 1e-4  # the images get different scores
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["rows"] == 90 and record["class_names"][0] == "class 0" and record["clip_image_size"] == [64, 64]
    # CLIP's formula recomputed here on the first three images, with the same random model (seed 0)
    torch.manual_seed(0)
    model = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None, force_image_size=64)[0].eval()
    names = np.load(bird_root / "pascal" / "formatted_train_images.npy")[:3]
    tfm = transforms.Compose([get_transforms(32)["val"], transforms.Resize((64, 64))])
    images = torch.stack([tfm(Image.open(bird_root / "pascal" / "VOCdevkit" / "VOC2012" / "JPEGImages" / n)
                              .convert("RGB")) for n in names])
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer("ViT-S-32")([f"class {c}" for c in range(20)]))
        image = model.encode_image(images)
        text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
        expected = torch.softmax(image @ text.T / 0.01, dim=-1).numpy()
    np.testing.assert_allclose(scores[:3], expected, rtol=1e-4, atol=1e-6)
    # and EM_PL trains with it
    assert run_em_pl(bird_root, tmp_path / "res", out, "--epochs", "1") == 0
    # the file is never overwritten
    capsys.readouterr()
    assert clip_scores.main(clip_args(bird_root, out)) == 2
    assert f"{out} exists and is not overwritten" in one_line_error(capsys)


def test_clip_scores_without_the_package_says_so_in_one_line(bird_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    assert clip_scores.main(clip_args(bird_root, tmp_path / "s.npy")) == 2
    assert "needs the open-clip-torch package" in one_line_error(capsys) and not (tmp_path / "s.npy").exists()


def test_clip_scores_without_the_weights_says_so_in_one_line(bird_root, tmp_path):
    # a fresh process with an empty Hugging Face cache: the 'openai' weights are not there, and the script looks
    # in the cache only (a download attempt would log its retries: more than one line)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "preproc" / "clip_scores.py"), "--dataset", "pascal",
                           "--data-root", str(bird_root), "--model", "RN50", "-g", "cpu", "--out",
                           str(tmp_path / "s.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: --pretrained openai: cannot load open_clip weights for RN50") and "\n" not in err
    assert "--download" in err and not (tmp_path / "s.npy").exists()


def test_clip_scores_refuses_bad_options(bird_root, tmp_path, capsys):
    assert clip_scores.main(clip_args(bird_root, tmp_path / "s.npy", "--temperature", "0")) == 2
    assert "--temperature must be > 0" in one_line_error(capsys)
    assert clip_scores.main(clip_args(bird_root, tmp_path / "s.npy", "--template", "a photo")) == 2
    assert "--template must hold '{}'" in one_line_error(capsys)
    assert clip_scores.main([*clip_args(bird_root, tmp_path / "s.npy"), "--model", "no-such-model"]) == 2
    assert "--model no-such-model: not an open_clip model" in one_line_error(capsys)
