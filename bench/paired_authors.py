"""A paired short CPU run: a method's authors' own training loop, minimally patched, against main.py, on the same
tiny data with the same seed and 0 workers; prints both runs' val mAP per epoch (full precision) and whether the
best checkpoints hold the same weights, tensor by tensor (torch.equal).

    python bench/paired_authors.py gr AUTHORS_GIT_DIR         # yan4xi1/GRLoss (a bare clone or a work tree)
    python bench/paired_authors.py boostlu AUTHORS_GIT_DIR    # youngwk/BridgeGapExplanationPAMC (LL-R)
    python bench/paired_authors.py gr AUTHORS_GIT_DIR --authors-args='--linear_init 1' \
        --ours --frozen-backbone-epochs 1                     # GRLoss's linear init

The authors' code is read from their repository at run time (git archive into a temporary folder), never kept
here; the patches below only point it at the data, shrink the model (ResNet-18, random weights, small images,
0 workers), seed torch as main.py does, print full precision, and set their classifier's lr multiplier to
`--head-lr-mult` (main.py trains every parameter at one lr unless given --head-lr-mult). docs/methods_since_2022.md
reports the result.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

MUNCH_SHIM = "class Munch(dict):\n    __getattr__ = dict.__getitem__\n    __setattr__ = dict.__setitem__\n"


def patch(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace `old` by `new` in `path`, which must hold it exactly `count` times (so a changed source fails)."""
    text = path.read_text()
    if text.count(old) != count:
        raise SystemExit(f"{path.name}: expected {count} x {old!r}, found {text.count(old)}: another version?")
    path.write_text(text.replace(old, new))


def extract(git_dir: Path, tree: Path, *paths: str) -> None:
    """The files of `git_dir`'s HEAD (all, or `paths`) written under `tree` (git archive | tar)."""
    archive = subprocess.run(["git", "-C", str(git_dir), "archive", "HEAD", *paths], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)


def authors_tree(method: str, git_dir: Path, workdir: Path, data_root: Path, image_size: int,
                 head_lr_mult: float, test_each_best: bool) -> Path:
    tree = workdir / "authors"
    tree.mkdir()
    extract(git_dir, tree)
    (tree / "munch.py").write_text(MUNCH_SHIM)
    shutil.rmtree(tree / "data", ignore_errors=True)  # (BoostLU's holds the datasets' READMEs)
    (tree / "data").symlink_to(data_root)
    patch(tree / "datasets.py", "transforms.Resize((448, 448))", f"transforms.Resize(({image_size}, {image_size}))", 3)
    patch(tree / "train.py", "def run_train(P):\n", "def run_train(P):\n    torch.manual_seed(0)  # as main.py\n")
    patch(tree / "train.py", 'print(f"Epoch {epoch} : val mAP {map_val:.3f}")',
          'print(f"Epoch {epoch} : val mAP {map_val!r}")')
    patch(tree / "train.py", "torch.load(path)", "torch.load(path, weights_only=False)")
    patch(tree / "config.py", "'feat_dim': {", "'feat_dim': {'resnet18': 512, ")
    if test_each_best:  # main.py's loop tests at every improving epoch; each DataLoader iterator draws a seed
        patch(tree / "train.py", "            torch.save((model.state_dict(), P), path)\n",
              "            torch.save((model.state_dict(), P), path)\n            iter(dataloader['test'])\n")
    if method == "gr":
        patch(tree / "datasets.py", "'../autodl-tmp/", "'data/", 6)
        # their config.py reads args.delta_rel, which no option defines (a leftover of Kim et al.'s): as published
        # it stops with an AttributeError before training
        patch(tree / "config.py", "    if args.delta_rel != 0:\n        args.delta_rel /= 100\n", "")
        patch(tree / "models.py", "torchvision.models.resnet50(pretrained=P['use_pretrained'])",
              "torchvision.models.resnet18()")
    else:
        patch(tree / "models.py", "torchvision.models.resnet50(pretrained=P['use_pretrained'])",
              "torchvision.models.resnet18()")
        patch(tree / "config.py", "args.arch = 'resnet50'", "args.arch = 'resnet18'")
        patch(tree / "config.py", "args.num_workers = 4", "args.num_workers = 0")
        patch(tree / "config.py", "args.lr_mult = 10", f"args.lr_mult = {head_lr_mult!r}")
    return tree


def run_authors(method: str, tree: Path, args: argparse.Namespace) -> tuple[list[float], Path]:
    common = ["--dataset", "pascal", "--num_epochs", str(args.epochs), "--bsize", str(args.batch_size),
              "--lr", repr(args.lr)]
    extra = (["--arch", "resnet18", "--num_workers", "0", "--lr_mult", repr(args.head_lr_mult)] if method == "gr"
             else ["--largelossmod_scheme", "LL-R", "--alpha", "5"])
    out = subprocess.run([sys.executable, "main.py", *common, *extra, *args.authors_args], cwd=tree,
                         capture_output=True, text=True)
    if "Traceback" in out.stdout or out.returncode:
        raise SystemExit(f"the authors' run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    val = [float(v) for v in re.findall(r"Epoch \d+ : val mAP ([0-9.e+-]+)", out.stdout)]
    (best,) = tree.glob("results/**/bestmodel.pt")
    return val, best


def run_ours(method: str, workdir: Path, data_root: Path, args: argparse.Namespace) -> tuple[list[float], Path]:
    results = workdir / "ours"
    loss = ["-l", "gr"] if method == "gr" else ["-l", "ll_r", "--head", "boostlu"]
    lr_mult = [] if args.head_lr_mult == 1 else ["--head-lr-mult", repr(args.head_lr_mult)]
    subprocess.run([sys.executable, str(ROOT / "main.py"), "-d", "pascal", *loss, "-g", "cpu", "--data-root",
                    str(data_root), "--results-dir", str(results), "--num-workers", "0", "--arch", "resnet18",
                    "--weights", "random", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                    "--lr", repr(args.lr), "--epochs", str(args.epochs), *lr_mult, *args.ours],
                   check=True, capture_output=True)
    (run_dir,) = results.iterdir()
    record = json.loads((run_dir / "results.json").read_text())
    return [record["epochs"][str(e)]["val"]["map_clean"] for e in range(1, len(record["epochs"]) + 1)], \
        run_dir / "best.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=["gr", "boostlu"])
    p.add_argument("authors", type=Path, help="the authors' repository (a git dir, e.g. a bare clone)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--head-lr-mult", type=float, default=1.0)
    p.add_argument("--authors-test-each-best", action="store_true",
                   help="make the authors' loop draw a test loader's seed at each improving epoch, as main.py's "
                        "loop does (it tests there; theirs tests once, at the end)")
    p.add_argument("--authors-args", type=shlex.split, default=[], metavar="'ARGS'",
                   help="further arguments of the authors' main.py, one string after '=', e.g. "
                        "--authors-args='--linear_init 1' (GRLoss) with --ours --frozen-backbone-epochs 1")
    p.add_argument("--ours", nargs=argparse.REMAINDER, default=[], help="further flags for main.py")
    args = p.parse_args()
    from helpers import write_pascal_root
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_root = write_pascal_root(workdir, n_train=40, n_val=16).resolve()
        tree = authors_tree(args.method, args.authors.resolve(), workdir, data_root, args.image_size,
                            args.head_lr_mult, args.authors_test_each_best)
        theirs, their_best = run_authors(args.method, tree, args)
        ours, our_best = run_ours(args.method, workdir, data_root, args)
        print(f"{args.method}: val mAP per epoch\n  authors: {theirs}\n  ours:    {ours}")
        their_state, _ = torch.load(their_best, weights_only=False)
        our_state = torch.load(our_best, weights_only=False)["model"]
        pairs = list(zip(their_state.values(), our_state.values()))
        equal = sum(a.shape == b.reshape(a.shape).shape and torch.equal(a, b.reshape(a.shape)) for a, b in pairs)
        print(f"best checkpoints: {equal} of {len(pairs)} tensors equal (authors {len(their_state)}, ours "
              f"{len(our_state)}); largest difference "
              f"{max(float((a.double() - b.reshape(a.shape).double()).abs().max()) for a, b in pairs):.3g}")


if __name__ == "__main__":
    main()
