"""The bundled demo: generated deterministically, in the real datasets' layout, and learnable."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import main
from datasets import DATASET_INFO, load_formatted
from preproc import make_demo

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_README = ROOT / "data" / "demo" / "README.md"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_demo.ensure_demo(root / "demo")
    return root


def test_demo_layout_and_labels(demo_root):
    num_classes = DATASET_INFO["demo"].num_classes
    assert num_classes == len(make_demo.CLASS_NAMES) == 12
    for phase, count in (("train", make_demo.NUM_TRAIN), ("val", make_demo.NUM_TEST)):
        arrays = load_formatted(demo_root, "demo", phase)
        labels, obs = arrays["labels"], arrays["labels_obs"]
        assert labels.shape == obs.shape == (count, num_classes)
        assert np.load(demo_root / "demo" / f"formatted_{phase}_labels.npy").dtype == np.float64
        assert 1 <= labels.sum(1).min() and labels.sum(1).max() <= 3  # 1-3 shapes, classes may repeat
        assert (obs.sum(1) == 1).all() and (labels[obs == 1] == 1).all()  # one true positive observed
        assert all((demo_root / "demo" / "images" / name).is_file() for name in arrays["images"])
    assert len(os.listdir(demo_root / "demo" / "images")) == make_demo.NUM_TRAIN + make_demo.NUM_TEST == 5000
    assert json.loads((demo_root / "demo" / make_demo.MARKER).read_text())["num_train"] == 4000
    assert sorted(os.listdir(demo_root)) == [".demo.lock", "demo"]  # no temporary folder left
    # every class occurs, at roughly equal rates (12 classes drawn uniformly)
    prevalence = load_formatted(demo_root, "demo", "train")["labels"].mean(0)
    assert prevalence.min() > 0.1 and prevalence.max() < 0.2


def test_demo_is_deterministic_and_not_regenerated(demo_root, tmp_path):
    first = demo_root / "demo" / "formatted_train_labels.npy"
    mtime = first.stat().st_mtime_ns
    make_demo.ensure_demo(demo_root / "demo")
    assert first.stat().st_mtime_ns == mtime
    rng = np.random.RandomState(make_demo.SEED)
    image, labels = make_demo.make_image(rng)  # the first image of the set, regenerated
    np.testing.assert_array_equal(labels, np.load(first)[0])
    from PIL import Image
    with Image.open(demo_root / "demo" / "images" / "00000.png") as saved:
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))


def test_demo_trains_far_above_chance(demo_root, tmp_path):
    """Two epochs of EM_APL (pseudo-labelling after epoch 1) through main.py, as the quick start does."""
    assert main.main(["-d", "demo", "-g", "cpu", "--data-root", str(demo_root), "--results-dir", str(tmp_path),
                      "--epochs", "2", "--warmup-epoch", "1"]) == 0
    (run_dir,) = list(tmp_path.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["config"]["arch"] == "resnet18"
    assert res["epochs"]["1"]["apl_new_pseudo_labels"] > 0
    print("demo test mAP", res["test_map"], "chance", res["chance_test_map"])
    assert res["test_map"] > res["chance_test_map"] + 10


# --- safety of the generator: small demos (monkeypatched sizes) keep these fast ---------------------------------

SMALL_TRAIN, SMALL_TEST = 20, 6


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(make_demo, "NUM_TRAIN", SMALL_TRAIN)
    monkeypatch.setattr(make_demo, "NUM_TEST", SMALL_TEST)


def snapshot(folder: Path) -> dict:
    """Relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_complete_small(dest: Path) -> None:
    assert make_demo.is_complete(dest)
    for phase, count in (("train", SMALL_TRAIN), ("val", SMALL_TEST)):
        images = np.load(dest / f"formatted_{phase}_images.npy")
        labels = np.load(dest / f"formatted_{phase}_labels.npy")
        assert images.shape == (count,) and labels.shape == (count, 12)
        assert all((dest / "images" / name).is_file() for name in images)
    assert len(os.listdir(dest / "images")) == SMALL_TRAIN + SMALL_TEST


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n not in ("demo", ".demo.lock"))


@pytest.fixture
def reference(small, tmp_path_factory) -> dict:
    """Snapshot of a small demo generated once into a fresh folder (what every other small demo must equal)."""
    dest = tmp_path_factory.mktemp("ref") / "demo"
    make_demo.ensure_demo(dest)
    assert_complete_small(dest)
    return snapshot(dest)


@pytest.mark.parametrize("user_files", [
    {"notes.txt": b"my notes", "formatted_train_images.npy": b"not the demo's"},  # foreign files
    {"formatted_train_labels.npy": b"another dataset's", "images/00001.png": b"png?"},  # demo names, no marker/classes
    {"images/holiday.jpg": b"a photo"},  # a foreign file inside images/
])
def test_refuses_a_folder_with_user_files_and_leaves_them_untouched(small, tmp_path, capsys, user_files):
    dest = tmp_path / "demo"
    for name, data in user_files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    before = snapshot(dest)
    with pytest.raises(make_demo.DemoError) as err:
        make_demo.ensure_demo(dest)
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # main.py prints ValueErrors as one line
    assert "\n" not in message and str(dest) in message and "--data-root" in message and "not the demo's" in message
    # the script refuses too: one line on stderr, exit code 2
    assert make_demo.main(["--save-path", str(dest)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: refusing to write the demo into {dest}")
    assert "--save-path" in err_lines[0]
    assert snapshot(dest) == before  # nothing deleted, nothing overwritten, nothing added
    assert leftovers(tmp_path) == []


def test_script_refuses_a_file_and_a_foreign_folder_in_one_line(tmp_path):
    """The real command line (full sizes: it refuses before generating anything)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "afile").write_text("a file")
    for target, expected in ((tmp_path / "mine", "refusing to write the demo into"),
                             (tmp_path / "afile", "is a file, not a folder")):
        proc = subprocess.run([sys.executable, str(ROOT / "preproc" / "make_demo.py"), "--save-path", str(target)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and str(target) in lines[0]
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert (tmp_path / "afile").read_text() == "a file"
    assert sorted(os.listdir(tmp_path / "mine")) == ["thesis.tex"]
    assert not (tmp_path / ".afile.lock").exists()  # a refused file leaves no lock file beside it (issue 23)


def test_readme_is_kept_and_the_demo_is_the_reference(small, reference, tmp_path):
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "README.md").write_bytes(SHIPPED_README.read_bytes())
    make_demo.ensure_demo(dest)
    assert_complete_small(dest)
    assert (dest / "README.md").read_bytes() == SHIPPED_README.read_bytes()
    got = snapshot(dest)
    assert got.pop("README.md") == hashlib.sha256(SHIPPED_README.read_bytes()).hexdigest()
    assert got == reference
    assert leftovers(tmp_path) == []


CHILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from preproc import make_demo
make_demo.NUM_TRAIN, make_demo.NUM_TEST = int(sys.argv[3]), int(sys.argv[4])
make_demo.ensure_demo(Path(sys.argv[2]))
"""


def test_two_concurrent_runs_give_one_complete_demo(small, reference, tmp_path):
    """Two processes start while the lock is taken (as by a third generating run), so both contend for it:
    one generates, the other waits and then uses that demo."""
    import fcntl
    dest = tmp_path / "data" / "demo"
    dest.mkdir(parents=True)
    (dest / "README.md").write_text("# Demo dataset\nkept\n")
    logs = [tmp_path / f"out{i}.txt" for i in range(2)]
    with open(dest.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = []
        for log in logs:
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(dest), str(SMALL_TRAIN),
                                               str(SMALL_TEST)], stdout=out, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.01)
        assert sorted(os.listdir(dest)) == ["README.md"]  # nothing written while the lock is held
    for p in procs:
        p.wait(timeout=120)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    stdout = "".join(outputs)
    assert stdout.count("waiting for another process") == 2
    assert stdout.count("generating the demo dataset") == 1  # the second run used the first one's demo
    assert_complete_small(dest)
    got = snapshot(dest)
    assert got.pop("README.md") and (dest / "README.md").read_text() == "# Demo dataset\nkept\n"
    assert got == reference
    assert leftovers(dest.parent) == []


def test_a_crash_mid_generation_leaves_no_half_demo(small, reference, tmp_path, monkeypatch):
    dest = tmp_path / "demo"
    dest.mkdir()
    (dest / "README.md").write_text("readme")
    real, calls = make_demo.make_image, []

    def crashing(rng):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("simulated crash")
        return real(rng)

    monkeypatch.setattr(make_demo, "make_image", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_demo.ensure_demo(dest)
    assert len(calls) == 11
    assert sorted(os.listdir(dest)) == ["README.md"] and not make_demo.is_complete(dest)
    assert leftovers(tmp_path) == []  # the temporary folder is gone
    monkeypatch.setattr(make_demo, "make_image", real)
    make_demo.ensure_demo(dest)
    assert_complete_small(dest)
    got = snapshot(dest)
    assert got.pop("README.md") and got == reference
    assert leftovers(tmp_path) == []


def test_leftovers_of_a_killed_run_and_an_old_version_demo_are_replaced(small, reference, tmp_path):
    """kill -9 leaves a temporary folder; the generator before the marker left images but maybe not all."""
    dest = tmp_path / "demo"
    (dest / "images").mkdir(parents=True)
    (dest / "README.md").write_text("readme")
    (dest / "images" / "00000.png").write_bytes(b"truncated")
    for name in make_demo.FILES:
        np.save(dest / name, np.zeros(3))
    (dest / "classes.txt").write_text("\n".join(make_demo.CLASS_NAMES) + "\n")
    stale = tmp_path / ".demo-tmp-999999999-0123abcd"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "00003.png").write_bytes(b"half")
    not_ours = tmp_path / ".demo-tmp-999999998-0123abcd"
    not_ours.mkdir()
    (not_ours / "mine.txt").write_text("kept")
    assert not make_demo.is_complete(dest)
    make_demo.ensure_demo(dest)
    assert_complete_small(dest)
    got = snapshot(dest)
    assert got.pop("README.md") and got == reference
    assert leftovers(tmp_path) == [not_ours.name]  # only the generator's own leftovers are deleted
    assert (not_ours / "mine.txt").read_text() == "kept"


def test_other_sizes_are_not_taken_for_a_finished_demo(small, tmp_path, monkeypatch):
    dest = tmp_path / "demo"
    make_demo.ensure_demo(dest)
    assert make_demo.is_complete(dest)
    monkeypatch.setattr(make_demo, "NUM_TEST", SMALL_TEST + 2)
    assert not make_demo.is_complete(dest)
    make_demo.ensure_demo(dest)
    assert make_demo.is_complete(dest) and np.load(dest / "formatted_val_images.npy").shape == (SMALL_TEST + 2,)
    assert leftovers(tmp_path) == []


def test_data_root_pointing_at_the_demo_folder_is_a_one_line_error(demo_root, tmp_path, capsys):
    demo = demo_root / "demo"
    before = sorted(os.listdir(demo))
    assert main.main(["-d", "demo", "-g", "cpu", "--data-root", str(demo), "--results-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --data-root {demo} is the demo folder itself: --data-root names the folder that "
                     f"holds demo/; give --data-root {demo_root}"]  # (config.build_config: for any dataset)
    assert sorted(os.listdir(demo)) == before and not (demo / "demo").exists()
    assert list(tmp_path.iterdir()) == []  # no run folder either


def test_data_root_pointing_at_a_fresh_checkouts_demo_folder(tmp_path):
    """`--data-root data/demo` before the demo exists: data/demo holds only the shipped README."""
    shipped = tmp_path / "data" / "demo"
    shipped.mkdir(parents=True)
    (shipped / "README.md").write_bytes(SHIPPED_README.read_bytes())
    with pytest.raises(make_demo.DemoError, match=r"pass --data-root .*data instead$"):
        make_demo.ensure_demo(shipped / "demo")
    assert os.listdir(shipped) == ["README.md"]
    with pytest.raises(make_demo.DemoError, match=r"pass --save-path .*data.demo instead$"):
        make_demo.make_demo(shipped / "demo")
    assert os.listdir(shipped) == ["README.md"]


def test_script_regenerates_a_demo_complete_and_identical(small, reference, tmp_path, capsys):
    dest = tmp_path / "demo"
    make_demo.ensure_demo(dest)
    (dest / "README.md").write_text("readme")
    first = snapshot(dest)
    mtime = (dest / "formatted_train_labels.npy").stat().st_mtime_ns
    time.sleep(0.01)
    assert make_demo.main(["--save-path", str(dest)]) == 0
    assert f"wrote the demo dataset to {dest}" in capsys.readouterr().out
    assert (dest / "formatted_train_labels.npy").stat().st_mtime_ns != mtime  # really regenerated
    assert_complete_small(dest)
    assert snapshot(dest) == first and (dest / "README.md").read_text() == "readme"
    got = snapshot(dest)
    got.pop("README.md")
    assert got == reference
    assert leftovers(tmp_path) == []
    # a finished demo with a user's file in it is used as is, but not regenerated over
    (dest / "notes.txt").write_text("mine")
    make_demo.ensure_demo(dest)
    assert make_demo.main(["--save-path", str(dest)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (dest / "notes.txt").read_text() == "mine" and make_demo.is_complete(dest)


def test_a_symlinked_demo_folder_is_regenerated_through_the_link(small, reference, tmp_path):
    real = tmp_path / "disk" / "demo"
    real.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(real, target_is_directory=True)
    make_demo.ensure_demo(tmp_path / "data" / "demo")
    assert (tmp_path / "data" / "demo").is_symlink() and snapshot(real) == reference
    assert leftovers(tmp_path / "disk") == []


def test_a_demo_of_symlinked_files_is_the_demo_and_regenerating_it_keeps_the_link_targets(small, reference, tmp_path,
                                                                                         capsys):
    """A demo folder whose files are links to another demo's (cp -rs): its files are the demo's, not foreign;
    regenerating it replaces the links by files and leaves what they point to alone (issue 23)."""
    real = tmp_path / "shared" / "demo"
    make_demo.ensure_demo(real)
    dest = tmp_path / "data" / "demo"
    (dest / "images").mkdir(parents=True)
    for path in real.rglob("*"):
        if path.is_file():
            (dest / path.relative_to(real)).symlink_to(path)
    assert make_demo._foreign_entries(dest) == [] and make_demo.is_complete(dest)
    assert make_demo.main(["--save-path", str(dest)]) == 0
    assert not any(p.is_symlink() for p in dest.rglob("*")) and snapshot(dest) == reference
    assert snapshot(real) == reference and make_demo.is_complete(real)
    # a link to a file that is not the demo's is still foreign
    (dest / "images" / "mine.png").symlink_to(tmp_path / "shared" / "demo" / "classes.txt")
    assert make_demo.main(["--save-path", str(dest)]) == 2
    assert "images/mine.png" in capsys.readouterr().err


def test_dataset_json_names_the_demo_classes(small, tmp_path):
    from preproc.common import check_dataset_files, image_root, read_dataset_json
    dest = tmp_path / "demo"
    make_demo.ensure_demo(dest)
    info = read_dataset_json(dest)
    assert info["class_names"] == list(make_demo.CLASS_NAMES) == (dest / "classes.txt").read_text().split()
    assert info["class_names"][0] == "red_circle" and info["class_names"][11] == "blue_cross"
    assert info["image_folder"] == DATASET_INFO["demo"].image_subdir == "images"
    assert image_root(dest, info) == dest / "images" and info["source"] == "preproc/make_demo.py"
    check_dataset_files(dest)
    # a folder holding only another dataset's dataset.json is not the demo's
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.json").write_text("{}")
    with pytest.raises(make_demo.DemoError, match="not the demo's .dataset.json"):
        make_demo.ensure_demo(other)


def test_a_finished_version_2_demo_gets_its_dataset_json_in_place(small, reference, tmp_path, capsys):
    """A demo of the generator before dataset.json (marker version 2, same arrays and images) is not regenerated:
    dataset.json and the new marker are added, every other file and the derived folders stay as they are."""
    dest = tmp_path / "demo"
    make_demo.ensure_demo(dest)
    (dest / "dataset.json").unlink()
    marker = json.loads((dest / make_demo.MARKER).read_text())
    (dest / make_demo.MARKER).write_text(json.dumps(dict(marker, version=2), sort_keys=True) + "\n")
    (dest / "features" / "resnet18_random_32").mkdir(parents=True)
    (dest / "features" / "resnet18_random_32" / "info.json").write_text("{}")
    assert not make_demo.is_complete(dest) and make_demo.is_complete(dest, version=2)
    mtime = (dest / "images" / "00000.png").stat().st_mtime_ns
    capsys.readouterr()
    make_demo.ensure_demo(dest)
    out = capsys.readouterr().out
    assert "added dataset.json" in out and "generating" not in out
    assert make_demo.is_complete(dest) and (dest / "images" / "00000.png").stat().st_mtime_ns == mtime
    assert (dest / "features" / "resnet18_random_32" / "info.json").read_text() == "{}"
    got = snapshot(dest)
    assert got.pop("features/resnet18_random_32/info.json") and got == reference
    assert leftovers(tmp_path) == []


def test_derived_folders_do_not_block_regeneration_but_a_file_of_that_name_does(small, reference, tmp_path):
    dest = tmp_path / "demo"
    make_demo.ensure_demo(dest)
    for name in ("cache", "features"):
        (dest / name).mkdir()
        (dest / name / "x").write_text("derived")
    make_demo.make_demo(dest)  # regenerated; the derived folders are dropped with the old demo
    assert snapshot(dest) == reference
    (dest / "features").write_text("a file")
    with pytest.raises(make_demo.DemoError, match=r"not the demo's \(features\)"):
        make_demo.make_demo(dest)
    assert (dest / "features").read_text() == "a file"
