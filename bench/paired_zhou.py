"""A paired short CPU run of the original (Zhou et al.'s main.py, minimally patched) against this project's
main.py, on the same real images with the same seed and 0 workers: per-epoch train loss, val and test mAP of both
(full precision), and whether the best weights are equal tensor by tensor (torch.equal).

    python bench/paired_zhou.py ZHOU_GIT_DIR                     # EM_APL, seed 0, 4 epochs, 32 px
    python bench/paired_zhou.py ZHOU_GIT_DIR --loss EM --seed 1 --epochs 3 --image-size 48

ZHOU_GIT_DIR: a clone (bare or not) of github.com/Correr-Zhou/SPML-AckTheUnknown. Its code is read at run time
(`git archive HEAD` into a temporary folder), never kept here. The data: the 145 real CUB JPEGs of tests/data as
the tests' 20-label "pascal" root (tests/helpers.make_bird_root: 93 train, 23 val, 29 test images). The patches
(each must match exactly once, so another version of their code fails loudly) only shrink the run: a random
ResNet-18 (`feat_dim` 512) in place of the ImageNet ResNet-50, `Resize((S, S))` in place of 448, 0 workers, the
run's epochs, lr and warm-up epoch in the pascal settings, `-np.Inf` -> `-np.inf` (NumPy 2), and at the end a
dump of their logger's per-epoch metrics (JSON keeps a float's repr) and of the best weights. Exit 0 when every
compared number and every tensor is equal, 1 otherwise. About a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from paired_authors import extract, patch  # noqa: E402

ZHOU_FILES = ("main.py", "datasets.py", "models.py", "losses.py", "metrics.py", "instrumentation.py")
DUMP = """
    import json as _json
    _json.dump({'metrics': logs['metrics']}, open('zhou_logs.json', 'w'), default=float)
    torch.save({'feature_extractor': feature_extractor.state_dict(),
                'linear_classifier': linear_classifier.state_dict()}, 'zhou_best.pt')
"""


def zhou_tree(git_dir: Path, workdir: Path, data_root: Path, args: argparse.Namespace) -> Path:
    tree = workdir / "zhou"
    tree.mkdir()
    # their training code only (a mirror may lack the repository's large media files)
    extract(git_dir, tree, *ZHOU_FILES)
    (tree / "data").mkdir()
    (tree / "data" / "pascal").symlink_to(data_root / "pascal", target_is_directory=True)
    size = args.image_size
    patch(tree / "datasets.py", "transforms.Resize((448, 448))", f"transforms.Resize(({size}, {size}))", 3)
    patch(tree / "models.py", "feature_extractor = resnet50(pretrained=False)",
          "from torchvision.models import resnet18; feature_extractor = resnet18()")
    patch(tree / "instrumentation.py", "-np.Inf", "-np.inf")
    main = tree / "main.py"
    patch(main, "P['use_pretrained'] = True", "P['use_pretrained'] = False")
    patch(main, "P['num_workers'] = 8", "P['num_workers'] = 0")
    patch(main, "P['num_epochs'] = 10", f"P['num_epochs'] = {args.epochs}")
    patch(main, "P['feat_dim'] = 2048", "P['feat_dim'] = 512")
    patch(main, "        P['bsize'] = 8\n        P['lr'] = 1e-5\n",
          f"        P['bsize'] = {args.batch_size}\n        P['lr'] = {args.lr!r}\n")
    patch(main, "        P['warmup_epoch'] = 5\n        P['beta'] = 0.02\n",
          f"        P['warmup_epoch'] = {args.warmup_epoch}\n        P['beta'] = 0.02\n")
    patch(main, "    (feature_extractor, linear_classifier, logs) = execute_training_run(P, feature_extractor=None, "
                "linear_classifier=None)\n",
          "    (feature_extractor, linear_classifier, logs) = execute_training_run(P, feature_extractor=None, "
          "linear_classifier=None)\n" + DUMP.lstrip("\n"))
    return tree


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zhou", type=Path, help="a clone of Correr-Zhou/SPML-AckTheUnknown (a git dir)")
    p.add_argument("--loss", default="EM_APL", choices=["bce", "iun", "an", "EM", "EM_APL"])
    p.add_argument("--seed", type=int, default=0, help="their -s / our -s (torch's seed)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--warmup-epoch", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args()
    from helpers import make_bird_root
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_root = make_bird_root(workdir / "data_root").resolve()
        tree = zhou_tree(args.zhou.resolve(), workdir, data_root, args)
        out = subprocess.run([sys.executable, "main.py", "-d", "pascal", "-l", args.loss, "-s", str(args.seed)],
                             cwd=tree, capture_output=True, text=True)
        if out.returncode or not (tree / "zhou_logs.json").is_file():
            print(f"error: the original's run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}", file=sys.stderr)
            return 2
        theirs = json.loads((tree / "zhou_logs.json").read_text())["metrics"]
        results = workdir / "ours"
        subprocess.run([sys.executable, str(ROOT / "main.py"), "-d", "pascal", "-l", args.loss, "-s", str(args.seed),
                        "-g", "cpu", "--data-root", str(data_root), "--results-dir", str(results), "--num-workers", "0",
                        "--arch", "resnet18", "--weights", "random", "--image-size", str(args.image_size),
                        "--batch-size", str(args.batch_size), "--lr", repr(args.lr), "--epochs", str(args.epochs),
                        "--warmup-epoch", str(args.warmup_epoch)], check=True, capture_output=True)
        (run_dir,) = results.iterdir()
        ours = json.loads((run_dir / "results.json").read_text())["epochs"]
        same = True
        print(f"{args.loss}, seed {args.seed}: epoch, phase, metric: the original / this project")
        for epoch in sorted(theirs["val"], key=int):
            for phase, key in (("train", "loss"), ("val", "map_clean"), ("test", "map_clean")):
                a = theirs[phase].get(epoch, {}).get(key)
                b = ours.get(epoch, {}).get(phase, {}).get(key)
                if a is None and b is None:
                    continue
                same &= a == b
                print(f"  {epoch} {phase:5s} {key:9s} {a!r} / {b!r}" + ("" if a == b else "   DIFFERENT"))
        if set(ours) != set(theirs["val"]):
            print(f"  epochs run: the original {sorted(theirs['val'], key=int)}, this project {sorted(ours, key=int)}")
            same = False
        their_state = torch.load(tree / "zhou_best.pt", weights_only=True)
        their_tensors = [*their_state["feature_extractor"].values(), *their_state["linear_classifier"].values()]
        our_tensors = list(torch.load(run_dir / "best.pt", weights_only=False)["model"].values())
        equal = sum(a.shape == b.shape and torch.equal(a, b) for a, b in zip(their_tensors, our_tensors))
        print(f"best weights: {equal} of {len(their_tensors)} tensors equal (this project: {len(our_tensors)})")
        same &= equal == len(their_tensors) == len(our_tensors)
        print("bit-identical" if same else "DIFFERENT")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
