"""Train and evaluate one single-positive multi-label run.

    python main.py -d pascal -l EM_APL -g 0 -s 0     # the paper's setting for PASCAL VOC
    python main.py -d demo                           # the bundled demo (generated, no download)

Writes results/<dataset>_<loss>_s<seed>_<time>/{results.json, best.pt, console.log}.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from config import DATASET_SETTINGS, LOSS_NAMES, Config, build_config


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options whose default (None) means "the dataset's table entry"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Single-positive multi-label learning (Zhou et al., ECCV 2022: EM loss + APL). "
                    "Unset options take the per-dataset defaults of the original (config.py).",
        formatter_class=_HelpFormatter)
    p.add_argument("-d", "--dataset", default="pascal", choices=sorted(DATASET_SETTINGS), help="dataset")
    p.add_argument("-l", "--loss", default="EM_APL", choices=LOSS_NAMES, help="training loss")
    p.add_argument("-g", "--gpu", default="0", help="CUDA device index, or 'cpu'")
    p.add_argument("-s", "--pytorch-seed", "--pytorch_seed", dest="pytorch_seed", type=int, default=0,
                   help="torch seed (the paper's runs used 0, 1, 8)")
    g = p.add_argument_group("hyperparameters (default: the dataset's entry in config.py)")
    g.add_argument("--epochs", dest="num_epochs", type=int, help="maximum number of epochs (original: 10)")
    g.add_argument("--batch-size", type=int, help="batch size")
    g.add_argument("--lr", type=float, help="Adam learning rate (constant)")
    g.add_argument("--alpha", type=float, help="EM weight on the entropy of unknown labels")
    g.add_argument("--beta", type=float, help="APL weight on the pseudo-labelled entries")
    g.add_argument("--neg-proportion", type=float, help="APL: share theta of the unknowns pseudo-labelled in all")
    g.add_argument("--warmup-epoch", type=int, help="APL: first epoch (1-based) after which pseudo-labels are added")
    m = p.add_argument_group("model and data")
    m.add_argument("--arch", help="torchvision backbone (original: resnet50)")
    m.add_argument("--weights", help="'imagenet' (torchvision IMAGENET1K_V1), 'random', or a state-dict path")
    m.add_argument("--image-size", type=int, help="square input size (original: 448)")
    m.add_argument("--num-workers", type=int, help="DataLoader workers (original: 8)")
    m.add_argument("--persistent-workers", action="store_true", default=None,
                   help="keep DataLoader workers alive across epochs (pseudo-labels still reach them)")
    m.add_argument("--data-root", help="folder holding <dataset>/formatted_*.npy (default: data)")
    m.add_argument("--results-dir", help="where run folders are created (default: results)")
    return p.parse_args(argv)


def resolve_device(gpu: str):
    import torch
    if gpu == "cpu":
        return torch.device("cpu")
    if not gpu.isdigit():
        raise ValueError(f"-g/--gpu must be a CUDA index or 'cpu', got {gpu!r}")
    index = int(gpu)
    if not torch.cuda.is_available():
        if index == 0:  # the original also runs on the CPU when CUDA is absent
            print("warning: no CUDA device found, running on the CPU (use -g cpu to silence this)")
            return torch.device("cpu")
        raise ValueError(f"-g {gpu}: no CUDA device is available on this machine (use -g cpu)")
    if index >= torch.cuda.device_count():
        raise ValueError(f"-g {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"indices 0..{torch.cuda.device_count() - 1}")
    return torch.device(f"cuda:{index}")


def make_run_dir(cfg: Config) -> Path:
    """results/<dataset>_<loss>_s<seed>_<time>[_<n>]: a new folder for every run, never an existing one."""
    base = Path(cfg.results_dir) / f"{cfg.dataset}_{cfg.loss}_s{cfg.pytorch_seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    Path(cfg.results_dir).mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = base if n == 0 else Path(f"{base}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder next to {base}")


class _Tee:
    """Copies what is printed to the console into the run's console.log."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def environment(device) -> dict:
    import sklearn
    import torch
    import torchvision
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "git_commit": commit, "git_dirty": dirty, "command": sys.argv}


def print_stats(datasets: dict) -> float:
    """Set sizes and label counts, as the original prints them; returns the test set's chance-level mAP."""
    train = datasets["train"]
    obs, true = train.labels_obs, train.labels_true
    print(f"train {len(train)}  val {len(datasets['val'])}  test {len(datasets['test'])}  classes {true.shape[1]}")
    print(f"train true positives {int(true.sum())} ({true.sum(1).mean():.2f}/image), "
          f"observed positives {int((obs == 1).sum())} ({(obs == 1).sum(1).mean():.2f}/image), "
          f"observed negatives {int((obs == -1).sum())}")
    # random scores give AP = prevalence in expectation, so chance mAP = mean class prevalence
    chance = 100 * datasets["test"].labels_true.mean(axis=0).mean()
    print(f"chance-level test mAP (random scores): {chance:.2f}")
    return float(chance)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "dataset"}
    try:
        cfg = build_config(args.dataset, **overrides)
        device = resolve_device(cfg.gpu)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch
    from datasets import DataError, build_datasets
    from models import WeightsError, build_model
    from train import NonFiniteLossError, fit

    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.pytorch_seed)
    torch.cuda.manual_seed_all(cfg.pytorch_seed)
    try:
        datasets = build_datasets(cfg.data_root, cfg.dataset, cfg.image_size, cfg.train_set_variant,
                                  cfg.val_frac, cfg.split_seed)
        model = build_model(cfg.arch, datasets["train"].labels_true.shape[1], cfg.weights).to(device)
    except (DataError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    run_dir = make_run_dir(cfg)
    sys.stdout = _Tee(sys.stdout, run_dir / "console.log")
    try:
        print(f"run folder: {run_dir}")
        print(f"config: {cfg.to_dict()}")
        if cfg.weights == "random":
            print(f"note: {cfg.arch} starts from random weights (--weights random)")
        chance = print_stats(datasets)
        if cfg.loss == "EM_APL" and (datasets["train"].labels_obs == -1).any():
            print("warning: the observed labels hold negatives (-1); EM_APL reads -q as a pseudo-label with target q, "
                  "so -1 pushes those entries towards 1 (as the original does): generate them with --num-neg 0")
        results = {"config": cfg.to_dict(), "environment": environment(device), "chance_test_map": chance}
        try:
            results = fit(model, datasets, cfg, device, run_dir, results)
        except (NonFiniteLossError, DataError, ValueError) as exc:
            # a DataLoader worker's error carries the worker's traceback: its last line is the message
            message = str(exc).strip().splitlines()[-1] if "Original Traceback" in str(exc) else str(exc)
            sys.stdout.file.write(f"error: {message}\n")  # into console.log too
            print(f"error: {message}", file=sys.stderr)
            return 3
        print(f"best epoch {results['best_epoch']}: val mAP {results['val_map']:.2f}, "
              f"test mAP {results['test_map']:.2f} (chance {chance:.2f})")
        print(f"results: {run_dir / 'results.json'}")
        return 0
    finally:
        sys.stdout.flush()
        sys.stdout.file.close()
        sys.stdout = sys.stdout.stream


if __name__ == "__main__":
    sys.exit(main())
