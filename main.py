"""Train and evaluate one single-positive multi-label run.

    python main.py -d pascal -l EM_APL -g 0 -s 0     # the paper's setting for PASCAL VOC
    python main.py -d demo                           # the bundled demo (generated, no download)

Writes results/<dataset>_<loss>_s<seed>_<time>/{results.json, best.pt, console.log}.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Before torch loads its OpenMP runtime: between parallel regions its threads sleep instead of spinning. On a
# machine whose cores other processes use too, a spinning thread holds a core that the working one needs: a
# COCO-sized linear-probe epoch (`bench/linear.py --loss an`, 2 cores at load 12) took 108 s spinning and 5 s
# sleeping, with the same bits (the work is split the same way). The user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from config import (AMP_MODES, CUDA_GRAPH_MODES, DATASET_SETTINGS, EARLY_STOPS, HEADS, IMAGE_CACHE_MODES,
                    IMAGE_DECODE_MODES, IMAGE_SETTINGS, LINEAR_SETTINGS, LL_CP_CORRECTIONS, LL_DELTA_REL, LOSS_NAMES,
                    PROTOCOLS, RESULT_NEUTRAL_SETTINGS, ROLE_EXPECTED_POSITIVES, ROLE_LI_INITS, ROLE_LOSSES,
                    STOP_METRICS, TEST_PASSES, VAL_LABELS, Config, build_config_with_sources, flag, validate)

# what --resume accepts besides the run folder: settings that cannot change its numbers
RESUME_NEUTRAL = tuple(k for k in RESULT_NEUTRAL_SETTINGS if k != "results_dir")
from preproc.common import one_line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options whose default (None) means "the dataset's table entry"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def given_flags(argv: list[str] | None) -> dict:
    """Only the options the command line sets (no defaults), by Config field name."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Single-positive multi-label learning (Zhou et al., ECCV 2022: EM loss + APL). "
                    "Unset options take the per-dataset defaults of the original (config.py).",
        formatter_class=_HelpFormatter)
    p.add_argument("-d", "--dataset", default="pascal",
                   help=f"dataset: {', '.join(sorted(DATASET_SETTINGS))}, or any <data-root>/NAME with a "
                        f"dataset.json (README 'Your own data')")
    p.add_argument("-l", "--loss", default="EM_APL", choices=LOSS_NAMES, help="training loss")
    p.add_argument("-g", "--gpu", default="auto", help="'auto' (the first CUDA device if there is one, else the "
                   "CPU), a CUDA device index, or 'cpu'")
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
    b = p.add_argument_group("hyperparameters of the baselines (default: losses.py; README 'The paper's table')")
    b.add_argument("--ls-eps", type=float, help="ls: label-smoothing eps in [-1, 1] (default 0.1, Cole et al.)")
    b.add_argument("--nls-eps", type=float, help="nls: negative label-smoothing eps in [-1, 1] (default -0.1)")
    b.add_argument("--reg-lambda", type=float, help="l1r, l2r: weight of the penalty on unknowns (default 0.1)")
    b.add_argument("--entmin-lambda", type=float, help="entmin: weight of the entropy on unknowns (default 0.1)")
    b.add_argument("--focal-gamma", type=float, help="focal; hill, splc (their positives' focal weight): focusing "
                   "parameter >= 0 (default 2)")
    b.add_argument("--asl-gamma-neg", type=float, help="asl: negative focusing >= 0 (default 4)")
    b.add_argument("--asl-gamma-pos", type=float, help="asl: positive focusing >= 0 (default 0)")
    b.add_argument("--asl-clip", type=float, help="asl: probability margin in [0, 1) (default 0.05)")
    b.add_argument("--delta-rel", type=float, help="ll_r, ll_ct, ll_cp: large-loss rate in percent > 0 (Kim et "
                   "al.'s)")
    b.add_argument("--expected-num-pos", type=float, help="role, role_li, epr: k of the expected-positive "
                   "regulariser > 0, at most the number of classes (Cole et al.'s)")
    r = p.add_argument_group("hyperparameters of the methods since 2021 (default: the authors'; "
                             "docs/recent_methods.md)")
    r.add_argument("--hill-lambda", type=float, help="hill: lambda of the unknowns' (lambda - p) p^2 (default 1.5)")
    r.add_argument("--focal-margin", type=float, help="hill, splc: margin taken off the positives' logits (default 1)")
    r.add_argument("--splc-tau", type=float, help="splc: unknowns with p > tau count as positives (default 0.6)")
    r.add_argument("--splc-start-epoch", type=int, help="splc: first epoch (1-based) of that correction (default 2)")
    r.add_argument("--pseudo-scores", metavar="FILE.npy", help="EM_PL: scores in [0, 1], one row per row of "
                   "formatted_train_*.npy and a column per class (python preproc/clip_scores.py writes CLIP's)")
    r.add_argument("--pl-pos-threshold", type=float,
                   help="EM_PL: unknowns scoring above it are positive pseudo-labels (default 0.3)")
    r.add_argument("--pl-neg-threshold", type=float,
                   help="EM_PL: unknowns scoring below it are negative pseudo-labels (default 0: none)")
    r.add_argument("--pl-beta-pos", type=float, help="EM_PL: weight of the positive pseudo-labels (default 0.7)")
    r.add_argument("--pl-beta-neg", type=float, help="EM_PL: weight of the negative pseudo-labels (default 0)")
    r.add_argument("--pl-warmup-epoch", type=int, help="EM_PL: epochs of plain EM before the pseudo-labels (default 0)")
    # ---- issue 25: GR-Loss (Chen et al. 2024); the authors' --beta w0 wT b0 bT, --alpha mu0 sigma0 muT sigmaT, --q2q3 ----
    r = p.add_argument_group("GR-Loss (-l gr; default: Chen et al.'s, losses.generalized_robust)")
    for symbol, default, meaning in (("w", "0 -> 2", "slope of K(p) = sigmoid(w p + b)"),
                                     ("b", "-2 -> -2", "offset of K(p)"),
                                     ("mu", "0.5 -> 0.8", "centre of V(p) = exp(-((p - mu) / sigma)^2 / 2)"),
                                     ("sigma", "2 -> 0.5", "width of V(p), > 0")):
        for end in ("start", "end"):
            r.add_argument(f"--gr-{symbol}-{end}", type=float,
                           help=f"gr: {meaning}, at the {end} of its linear schedule (default {default})")
    r.add_argument("--gr-q2", type=float, help="gr: q2 > 0 of the pseudo-positive term (1 - p^q2) / q2 (default 0.01)")
    r.add_argument("--gr-q3", type=float, help="gr: q3 > 0 of the negative term (1 - (1-p)^q3) / q3 (default 1)")
    m = p.add_argument_group("model and data")
    m.add_argument("--arch", help="torchvision backbone (original: resnet50)")
    m.add_argument("--weights", help="'imagenet' (torchvision IMAGENET1K_V1), 'random', or a state-dict path")
    m.add_argument("--image-size", type=int, help="square input size (original: 448)")
    m.add_argument("--num-workers", type=int, help="DataLoader workers (original: 8)")
    m.add_argument("--persistent-workers", action="store_true", default=None,
                   help="keep DataLoader workers alive across epochs (pseudo-labels still reach them)")
    m.add_argument("--data-root", help="folder holding <dataset>/formatted_*.npy (default: data)")
    m.add_argument("--features", help="linear probe: train a linear classifier on the cached feature set "
                   "<arch>_<weights>_<size> (made by preproc/extract_features.py) instead of the images")
    r = p.add_argument_group("the training loop of a source (docs/original.md 'Protocols')")
    r.add_argument("--protocol", choices=list(PROTOCOLS), help="the loop of the source whose numbers a row "
                   "reports: zhou (the original, default), cole (Cole et al.), kim (Kim et al.); sets the options "
                   "below (and, for kim, batch 16, lr 1e-5, 10 epochs), each of which a flag overrides")
    r.add_argument("--head-lr-mult", type=float, help="the classifier head learns at this x lr (zhou, cole: 1; kim: 10)")
    r.add_argument("--early-stop", choices=EARLY_STOPS, help="first-drop: stop at the first epoch whose val mAP does "
                   "not strictly improve (zhou); drop-3: when it falls more than 3 below the best (kim; drop-2: 2); none: run "
                   "every epoch (cole); the best val epoch is kept in all")
    r.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the last partial batch of the train, val and test loaders (cole; zhou, kim: no)")
    r.add_argument("--test-pass", choices=TEST_PASSES, help="score the test set after each improving epoch (best: "
                   "zhou), every epoch (cole) or once at the end with the best weights (kim); the same test mAP, "
                   "but each pass draws from the random generator, so it follows the source's loop")
    r.add_argument("--role-li-init", choices=ROLE_LI_INITS, help="role_li: compute logit(phase-1 estimates) in "
                   "float64 (zhou, kim) or float32 (cole, as Cole et al.'s code)")
    o = p.add_argument_group("options of Cole et al.'s code base (README 'Options'; all off by default)")
    o.add_argument("--val-labels", choices=VAL_LABELS, help="select the best epoch on the val part's full labels "
                   "(clean, the original) or on its single positives (observed: no fully labelled val set needed)")
    o.add_argument("--stop-metric", choices=STOP_METRICS, help="val metric that selects the best epoch (default map)")
    o.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="train only the classifier head, on images (backbone frozen, in eval mode)")
    o.add_argument("--frozen-backbone-epochs", type=int, metavar="N",
                   help="train the head alone for the first N epochs (the backbone's parameters get no gradient, in "
                        "train mode), then everything; GR-Loss's --linear_init, whose schedules start after them "
                        "(default 0)")
    o.add_argument("--train-subsample", type=float, help="keep this share (0, 1] of the train part (default 1)")
    o.add_argument("--val-subsample", type=float, help="keep this share (0, 1] of the val part (default 1)")
    o.add_argument("--subsample-seed", type=int, help="seed of the subsampling (default 0)")
    f = p.add_argument_group("speed (README 'Speed'; all off by default)")
    f.add_argument("--image-cache", choices=IMAGE_CACHE_MODES,
                   help="decode and resize every image once (bit-identical results): 'ram', or 'disk' "
                        "(<data-root>/<dataset>/cache/); default off")
    f.add_argument("--amp", choices=AMP_MODES, help="mixed precision (autocast; loss in float32); "
                   "changes results statistically only; default off")
    f.add_argument("--channels-last", action="store_true", default=None, help="channels-last memory format")
    f.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    f.add_argument("--cudnn-benchmark", action="store_true", default=None,
                   help="let cuDNN pick its fastest convolution algorithms (a nondeterministic choice)")
    f.add_argument("--cuda-graphs", nargs="?", const="model", choices=CUDA_GRAPH_MODES,
                   help="replay the training step and the eval forward as CUDA graphs (docs/gpu-speed.md; one "
                        "CUDA GPU): 'model' (the same as giving no value) graphs the forward, loss and backward, "
                        "Adam runs as usual: the faithful numbers; 'step' graphs Adam too (capturable: float "
                        "rounding differs); default off")
    f.add_argument("--image-decode", choices=IMAGE_DECODE_MODES,
                   help="'device': the loader reads the JPEG files and the GPU decodes and resizes them (antialiased "
                        "bilinear; pixels differ from PIL's by a few levels: statistical), instead of PIL in the "
                        "workers ('pil', the original); for data too large for --image-cache; default pil")
    f.add_argument("--eval-batch-size", type=int,
                   help="batch size of the val and test passes (default: --batch-size, the original's); eval "
                        "mode scores each image alone, but other batch sizes may change the last float bits")
    m.add_argument("--results-dir", help="where run folders are created (default: results)")
    m.add_argument("--keep-last", action="store_true", default=None,
                   help="keep last.pt (the resume state) when the run finishes; by default a finished run deletes it "
                        "(it cannot be resumed, and it is most of the run folder)")
    # ---- issue 25: the classifier head (models.CAMHead) ----
    m.add_argument("--head", choices=HEADS, help="classifier: linear (pooling then Linear, the original's), cam (a "
                   "1x1 convolution over the last feature map, averaged) or boostlu (cam with positive CAM values x "
                   "--boost-alpha, Kim et al. 2023); default linear")
    m.add_argument("--boost-alpha", type=float, help="boostlu: factor > 0 on positive CAM values, in training and "
                   "evaluation (default 5, Kim et al. 2023)")
    m.add_argument("--ll-cp-corrections", choices=LL_CP_CORRECTIONS,
                   help="ll_cp: correct for good the unknown entries whose loss is above the batch's k-th largest "
                        "(Kim et al.) or at or above it (ties included: BoostLU's code; the default with --head "
                        "boostlu)")
    t = p.add_argument_group("several GPUs: torchrun --nproc_per_node N main.py ... (README 'Several GPUs')")
    t.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm: BatchNorm statistics over the global batch instead of each GPU's share "
                        "(matters when the per-GPU batch is 2-4 images); GPUs only")
    t.add_argument("--dist-timeout", type=float,
                   help="seconds a collective waits for a silent rank before the run fails (default 600)")
    p.add_argument("--print-config", action="store_true", default=None,
                   help="print the settings this command line resolves to (the dataset's table entry and "
                        "dataset.json applied), each with where it comes from, and exit")
    _per_dataset_help(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a failed, interrupted or killed run from its last finished epoch, in its folder, "
                        "with its config (only -g, --image-cache and --data-root may be given: they cannot change "
                        "the result)")
    return p


def _per_dataset_help(parser: argparse.ArgumentParser) -> None:
    """Append each per-dataset default to its option's help: the value per dataset and the table it comes from."""
    tables = [("config.DATASET_SETTINGS", {d: v for d, v in DATASET_SETTINGS.items()}),
              ("config.LL_DELTA_REL, per loss", {d: v for d, v in LL_DELTA_REL.items()}),
              ("config.ROLE_EXPECTED_POSITIVES", {d: {"expected_num_pos": v} for d, v in ROLE_EXPECTED_POSITIVES.items()})]
    for action in parser._actions:
        for table, entries in tables:
            if table.startswith("config.LL_DELTA_REL") and action.dest == "delta_rel":
                values = "; ".join(f"{d} " + ", ".join(f"{loss} {v:g}" for loss, v in losses.items())
                                   for d, losses in entries.items())
            elif all(action.dest in entry for entry in entries.values()):
                values = ", ".join(f"{d} {entry[action.dest]}" for d, entry in entries.items())
            else:
                continue
            linear = f"; --features: {LINEAR_SETTINGS[action.dest]}" if action.dest in LINEAR_SETTINGS else ""
            action.help = f"{action.help} [per dataset ({table}): {values}{linear}; another dataset: coco's, " \
                          f"then its dataset.json \"defaults\"]"


def print_config(cfg: Config, sources: dict[str, str], given: set[str]) -> None:
    """--print-config: every setting of the run, with where it comes from."""
    width = max(map(len, sources))
    for name, source in {"dataset": "command line", **sources}.items():
        if source == "command line" and name not in given:  # (argparse's own default)
            source = "main.py default"
        print(f"{name:<{width}} = {getattr(cfg, name)!r}  ({source})")


def resolve_device(gpu: str):
    """The device of -g: "auto" (the first CUDA device, else the CPU), "cpu", or a CUDA index (index 0 falls back
    to the CPU with a warning, as the original; another index must exist)."""
    import torch
    if gpu == "cpu":
        return torch.device("cpu")
    if gpu == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not gpu.isdigit():
        raise ValueError(f"-g/--gpu must be 'auto', a CUDA index or 'cpu', got {gpu!r}")
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


def prepare_results_dir(results_dir: str) -> None:
    """Create the results folder (or fail with one line now, before any work), remove temporaries that killed
    runs left there, and mark runs whose process died without a word (kill -9, out of memory) as killed."""
    from fileio import describe_os_error, remove_stale_temporaries
    from checkpoints import mark_if_dead
    root = Path(results_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ValueError(f"--results-dir {results_dir}: {describe_os_error(root, exc).split(': ', 1)[1]}") from exc
    for run in root.iterdir():
        if run.is_dir():
            remove_stale_temporaries(run)
            mark_if_dead(run / "results.json")


def make_run_dir(cfg: Config) -> Path:
    """results/<dataset>_<loss>_s<seed>_<time>[_<n>]: a new folder for every run, never an existing one."""
    base = Path(cfg.results_dir) / f"{cfg.dataset}_{cfg.loss}_s{cfg.pytorch_seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        path = base if n == 0 else Path(f"{base}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder next to {base}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a cluster's time limit): handled like Ctrl-C, so the run is recorded as interrupted."""


def raise_interrupt(signum, frame) -> None:
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt, once: later ones are ignored, so that a second signal
    (a cluster signals every process of a job; a sweep forwards one too) cannot cut the saving of the run's state."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        raise Terminated("terminated by SIGTERM")
    raise KeyboardInterrupt


def handle_interrupts() -> tuple:
    """Install `raise_interrupt` for SIGTERM and SIGINT; returns the previous handlers for `restore_interrupts`."""
    return signal.signal(signal.SIGTERM, raise_interrupt), signal.signal(signal.SIGINT, raise_interrupt)


def restore_interrupts(previous: tuple) -> None:
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


class _Tee:
    """Copies what is printed to the console into the run's console.log."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text: str) -> int:
        try:
            self.file.write(text)
        except OSError:  # e.g. a full disk: the console still gets everything
            pass
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        try:
            self.file.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def environment(device) -> dict:
    from importlib.metadata import version  # (importing scikit-learn and torchvision only to ask takes seconds)
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "numpy": np.__version__, "sklearn": version("scikit-learn"), "device": str(device),
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


def check_observed_labels(cfg: Config, datasets: dict) -> None:
    """The training labels, checked once at load time, with one rule for every loss: at least one observed
    positive, and no observed negatives (-1) in the file (no loss reads them as negatives: EM_APL's negative
    entries are its own pseudo-labels -q, made during training)."""
    path = f"{cfg.data_root}/{cfg.dataset}/formatted_train_labels_obs.npy"
    regenerate = shlex.join(["python", "preproc/generate_observed_labels.py", "--dataset", cfg.dataset,
                             "--data-root", cfg.data_root])
    if not (datasets["train"].labels_obs == 1).any():
        raise ValueError(f"-l {cfg.loss}: {path} observes no positive label in the training part: nothing to learn "
                         f"from; regenerate it with {regenerate} --num-pos 1")
    if (datasets["train"].labels_obs < 0).any():
        why = (" (EM_APL would read a -1 as a pseudo-label with target 1, pushing it towards positive)"
               if cfg.loss == "EM_APL" else "")
        raise ValueError(f"-l {cfg.loss} takes observed labels in {{0, 1}}, but {path} holds observed negatives "
                         f"(-1){why}; regenerate it with {regenerate} --num-neg 0")


def attach_pseudo_scores(cfg: Config, datasets: dict) -> dict:
    """EM_PL: the rows of --pseudo-scores that the train part holds, put on its dataset (`pseudo_scores`), and what
    results.json records of them; {} for the other losses."""
    if cfg.loss != "EM_PL":
        return {}
    import torch
    from datasets import load_pseudo_scores
    train = datasets["train"]
    train.pseudo_scores = load_pseudo_scores(cfg.pseudo_scores, cfg.data_root, cfg.dataset)[train.rows]
    scores, unknown = torch.from_numpy(train.pseudo_scores), torch.from_numpy(train.labels_obs == 0)
    negative = unknown & (scores < cfg.pl_neg_threshold)  # float32 comparisons, as the loss makes them
    positive = unknown & (scores > cfg.pl_pos_threshold) & ~negative
    record = {"file": cfg.pseudo_scores, "unknowns": int(unknown.sum()), "positive_pseudo_labels": int(positive.sum()),
              "negative_pseudo_labels": int(negative.sum())}
    print(f"EM_PL pseudo-labels from {cfg.pseudo_scores} (after epoch {cfg.pl_warmup_epoch}): "
          f"{record['positive_pseudo_labels']} positive, {record['negative_pseudo_labels']} negative, of "
          f"{record['unknowns']} unknowns")
    return {"pseudo_scores": record}


def class_names(cfg: Config) -> list[str]:
    """The dataset's class names (its dataset.json), or "class 0", "class 1", ... where it has none."""
    from datasets import class_names as names
    return names(cfg.data_root, cfg.dataset)


def build_run(cfg: Config, device, resuming: bool = False, ctx=None) -> tuple[dict, object, dict, dict]:
    """The datasets, the engine (model, and ROLE's estimates) and the loaders of a run, and what results.json
    should record of how they were made: on images (the original), or a linear classifier on cached features
    (`--features`); for ROLE+LI, after its linear phase on the backbone's features (extracted once if needed).
    In a torchrun launch (`ctx`), each rank's loaders read its share (distributed.shard_arguments)."""
    import torch
    from datasets import FEATURE_EVAL_BATCH, FeatureLoader, build_datasets
    from distributed import SINGLE, shard_arguments
    from features import extract_features, feature_set_name, load_features
    from image_cache import make_loaders
    from models import build_model, check_model_runs
    import cuda_graphs
    from engine import build_engine
    from label_state import LabelEstimates
    from train import linear_init

    def with_features(name: str) -> tuple[dict, dict]:
        features = load_features(cfg.data_root, cfg.dataset, name)
        return build_datasets(cfg.data_root, cfg.dataset, cfg.image_size, cfg.train_set_variant, cfg.val_frac,
                              cfg.split_seed, features=features, **subsets), features["info"]

    subsets = dict(val_labels=cfg.val_labels, train_subsample=cfg.train_subsample, val_subsample=cfg.val_subsample,
                   subsample_seed=cfg.subsample_seed)
    setup: dict = {}
    if cfg.features:  # linear probe: no backbone, no images
        datasets, info = with_features(cfg.features)
        setup["features"] = {"name": cfg.features, **{k: info.get(k) for k in ("arch", "weights", "image_size", "dim")}}
        check_observed_labels(cfg, datasets)
        setup.update(attach_pseudo_scores(cfg, datasets))
        model = torch.nn.Linear(info["dim"] if "dim" in info else datasets["train"].features.shape[1],
                                datasets["train"].labels_true.shape[1]).to(device)
        estimates = LabelEstimates(datasets["train"].labels_obs) if cfg.loss in ROLE_LOSSES else None
        engine = build_engine(model, device, estimates=estimates)  # float32: the head is cheap
        loaders = {phase: FeatureLoader(ds, cfg.batch_size if phase == "train" else FEATURE_EVAL_BATCH, phase == "train",
                                        device, drop_last_of=cfg.batch_size if cfg.drop_last else 0)
                   for phase, ds in datasets.items()}
        # APL's pass over the training features: in order, in large batches (the image path, as the original,
        # iterates the shuffled training loader; its order does not change the pseudo-labels)
        loaders["apl"] = FeatureLoader(datasets["train"], FEATURE_EVAL_BATCH, False, device)
        setup.update(world_size=1, per_rank_batch_size=cfg.batch_size)
        return datasets, engine, loaders, setup

    ctx = ctx or SINGLE
    cuda_graphs.check(cfg, device)  # before any data is read (issue 27)
    batch_size = cfg.batch_size // ctx.world_size  # per rank (distributed.setup checked that it divides)
    datasets = build_datasets(cfg.data_root, cfg.dataset, cfg.image_size, cfg.train_set_variant, cfg.val_frac,
                              cfg.split_seed, **subsets)
    check_observed_labels(cfg, datasets)
    setup.update(attach_pseudo_scores(cfg, datasets))
    model = build_model(cfg.arch, datasets["train"].labels_true.shape[1], cfg.weights, cfg.head,
                        cfg.boost_alpha if cfg.head == "boostlu" else 1.0).to(device)
    if cfg.freeze_backbone:  # head-only training: Adam gets the head's parameters only
        model.backbone.requires_grad_(False)
    # the size of the last training batch (every batch, with --batch-size 1); a rank's shard is ceil(N / world)
    shard = -(-len(datasets["train"]) // ctx.world_size)
    check_model_runs(model, cfg.arch, cfg.image_size, device, shard % batch_size or batch_size)
    if cfg.loss == "role_li" and not resuming:  # a resumed run has its phase-2 state in last.pt
        with tempfile.TemporaryDirectory() as tmp:
            weights = cfg.weights
            if weights == "random":  # phase 1 must see this run's own random backbone (drawn with -s)
                weights = str(Path(tmp) / f"random-s{cfg.pytorch_seed}.pt")
                torch.save(model.backbone.state_dict(), weights)
            name = feature_set_name(cfg.arch, weights, cfg.image_size)
            with torch.random.fork_rng(devices=[]):  # extracted now or earlier, the run draws the same numbers
                extract_features(cfg.data_root, cfg.dataset, cfg.arch, weights, cfg.image_size, device=device,
                                 num_workers=cfg.num_workers)
        feature_sets, _ = with_features(name)
        state, setup["linear_init"] = linear_init(feature_sets, cfg, device)
        setup["linear_init"]["features"] = name
        model.head.load_state_dict(state["model"])  # phase 2 starts from the linear phase's classifier ...
        estimates = LabelEstimates(datasets["train"].labels_obs,  # ... and its estimates, as logit(estimates)
                                   torch.sigmoid(state["label_estimates"]).cpu().numpy(),
                                   np.float32 if cfg.role_li_init == "float32" else np.float64)
    else:  # ROLE's estimate matrix, drawn after the model as in Cole et al.'s code
        estimates = LabelEstimates(datasets["train"].labels_obs) if cfg.loss in ROLE_LOSSES else None
    engine = build_engine(model, device, cfg.amp, cfg.channels_last, cfg.compile, cfg.cudnn_benchmark, estimates,
                          cfg.freeze_backbone, ctx, cfg.sync_bn)
    engine.graphs = cuda_graphs.CudaGraphs(cfg.cuda_graphs) if cfg.cuda_graphs != "off" else None
    shards = (lambda ds, train: shard_arguments(ds, ctx, train, cfg.batch_size, cfg.pytorch_seed)) if ctx.enabled \
        else None
    loaders = make_loaders(datasets, cfg.batch_size, cfg.num_workers, cfg.persistent_workers, device,
                           cfg.image_cache, cfg.image_size, Path(cfg.data_root) / cfg.dataset / "cache", shards,
                           cfg.drop_last, cfg.eval_batch_size, cfg.image_decode)
    setup.update(world_size=ctx.world_size, per_rank_batch_size=batch_size)
    if ctx.enabled:
        setup.update(distributed={"backend": ctx.backend, "sync_bn": cfg.sync_bn, "timeout_s": ctx.timeout_s,
                                  "hosts": len({host for host, _ in ctx.peers})})
    return datasets, engine, loaders, setup


def resume_config(run_dir: Path, given: dict) -> tuple[Config, dict]:
    """The config of the run in `run_dir` (with the given result-neutral settings) and its results.json;
    ValueError (one line) when it cannot be resumed or a flag would change its result."""
    from checkpoints import mark_if_dead
    path = run_dir / "results.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: no results.json there: not a run folder of this project")
    mark_if_dead(path)
    try:
        results = json.loads(path.read_text())
        recorded = dict(results["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume {run_dir}: cannot read {path} ({exc}); start a new run instead") from exc
    status = results.get("status")
    if status == "finished":
        raise ValueError(f"--resume {run_dir}: the run is finished (best epoch {results.get('best_epoch')}), "
                         f"there is nothing to resume; start a new run to train again")
    if status == "running":
        raise ValueError(f"--resume {run_dir}: the run is still running (pid {results.get('process', {}).get('pid')} "
                         f"on {results.get('process', {}).get('host')}); stop it first")
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(recorded) - fields)
    if unknown:
        raise ValueError(f"--resume {run_dir}: its config has settings this version does not know ({unknown}): "
                         f"it was made by another version of this project; resume it with that version")
    changed = {k: v for k, v in given.items() if k not in RESUME_NEUTRAL and recorded.get(k) != v}
    if changed:
        k, v = next(iter(changed.items()))
        hint = "a resumed run stays in its folder" if k == "results_dir" else \
            f"the run has {recorded.get(k)!r}; start a new run to change it"
        raise ValueError(f"{flag(k)} {v} cannot be given with --resume: {hint}")
    neutral = {k: v for k, v in given.items() if k in RESUME_NEUTRAL}
    started_in = (results.get("data") or {}).get("root")  # the data root as an absolute path
    if "data_root" not in neutral and started_in and Path(recorded.get("data_root", "data")).resolve() != \
            Path(started_in):  # resumed from another working directory: the run's own data, not a namesake here
        neutral["data_root"] = started_in
    cfg = Config(**{**recorded, **neutral})
    validate(cfg)
    return cfg, results


def check_same_data(run_dir: Path, recorded: dict | None, current: dict | None, cfg: Config) -> None:
    """A resumed run goes on with the data it started on: ValueError naming the files whose content changed."""
    if recorded is None or current is None or recorded.get("sha256") == current["sha256"]:
        return  # (a run of an older version recorded none)
    changed = sorted(name for name in {*recorded.get("files", {}), *current["files"]}
                     if recorded.get("files", {}).get(name) != current["files"].get(name))
    raise ValueError(f"--resume {run_dir}: the data changed since the run started ({', '.join(changed)} in "
                     f"{Path(cfg.data_root) / cfg.dataset} differ from what it trained on): resume it with that "
                     f"data (--data-root), or start a new run")


def print_error(message) -> None:
    """The one-line error of a user mistake; in a torchrun launch the first rank of each node says it for the
    node's ranks (another node's own problem, e.g. missing data there, is then still told), with its rank."""
    rank = os.environ.get("RANK", "0")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {one_line(message)}" if rank == "0" else f"[rank {rank}] error: {one_line(message)}",
              file=sys.stderr)


def setup_device(cfg: Config, gpu_given: str | None):
    """The device and the distributed context: a torchrun launch's (distributed.setup), or -g's for one process.
    ValueError (one line) for what a torchrun launch cannot do."""
    import distributed
    if not distributed.launched_by_torchrun():
        return resolve_device(cfg.gpu), distributed.SINGLE
    refused = [(option, why) for option, why, given in (
        ("--features", "a linear probe takes seconds on one device: run it with python main.py", cfg.features),
        ("--image-cache", "each process would cache the images itself: drop --image-cache", cfg.image_cache != "off"),
        ("-l role_li", "its linear phase runs on one device: train -l role_li with python main.py",
         cfg.loss == "role_li"),
        ("--drop-last", "each process's share ends in its own partial batch: run it with python main.py",
         cfg.drop_last),
        ("--frozen-backbone-epochs", "DistributedDataParallel needs the same trainable parameters in every epoch: "
         "run it with python main.py", cfg.frozen_backbone_epochs),
        ("--cuda-graphs", "the step is not captured with DDP here: run it with python main.py, or leave it off",
         cfg.cuda_graphs != "off"),
        ("--image-decode device", "its loader has no per-process shards: leave --image-decode pil",
         cfg.image_decode != "pil"),
        ("--eval-batch-size", "each process's share is batched by --batch-size: leave --eval-batch-size unset",
         cfg.eval_batch_size is not None)) if given]
    if refused:
        raise ValueError(f"{refused[0][0]} is not supported under torchrun: {refused[0][1]}")
    ctx, device = distributed.setup(gpu_given, cfg.batch_size, cfg.dist_timeout, cfg.sync_bn)
    return device, ctx


def main(argv: list[str] | None = None) -> int:
    """main.py; in a torchrun launch, ranks other than 0 print nothing (their errors still reach stderr). Called
    in-process (tests, notebooks), it leaves the caller's SIGINT and SIGTERM handlers as it found them, whatever
    interrupted it."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) if in_main_thread else None
    try:
        if os.environ.get("RANK", "0") == "0":
            return _main(argv)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return _main(argv)
    finally:
        if previous is not None and None not in previous:  # (None: a handler not set from Python, kept as is)
            restore_interrupts(previous)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.resume:
        return _resume(Path(args.resume), argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("dataset", "resume", "print_config")}
    try:
        cfg, sources = build_config_with_sources(args.dataset, **overrides)
        if args.print_config:
            print_config(cfg, sources, set(given_flags(argv)))
            return 0
        device, ctx = setup_device(cfg, given_flags(argv).get("gpu"))
    except ValueError as exc:
        print_error(exc)
        return 2
    ignored = cfg.unused_settings({k for k, v in overrides.items() if v is not None})
    if cfg.sync_bn and not ctx.enabled and "sync_bn" not in ignored:
        ignored.append("sync_bn")
    for field in ignored:  # reported, not silently dropped
        reason = "a linear probe on --features reads no images" if field in IMAGE_SETTINGS and cfg.features else \
            "it only acts in a torchrun launch" if field == "sync_bn" else f"-l {cfg.loss} does not use it"
        print(f"warning: {flag(field)} is ignored: {reason}")
    return _start(cfg, device, ignored, ctx)


def _resume(run_dir: Path, argv: list[str] | None) -> int:
    from datasets import data_fingerprint
    from checkpoints import NoResumeState, ResumeError, load_last
    given = {k: v for k, v in given_flags(argv).items() if k != "resume"}
    try:
        cfg, results = resume_config(run_dir, given)
        check_writable(run_dir)
        check_same_data(run_dir, results.get("data"), data_fingerprint(cfg.data_root, cfg.dataset, cfg.features), cfg)
        try:
            state = load_last(run_dir)
        except NoResumeState as exc:  # no finished epoch's state: the run starts again from its beginning
            state, restart = None, exc
        world_size = state.get("world_size", 1) if state else results.get("world_size", 1)
        if world_size != int(os.environ.get("WORLD_SIZE", 1)):
            launch = "python main.py" if world_size == 1 else f"torchrun with {world_size} processes in all"
            raise ValueError(f"--resume {run_dir}: the run trained on {world_size} process(es) and "
                             f"this launch has {os.environ.get('WORLD_SIZE', 1)}: resume it with {launch} (the data "
                             f"shards and the per-process batch depend on it)")
        # a run on the CPU resumes there (gloo); one on GPUs takes its local rank's under torchrun
        device, ctx = setup_device(cfg, given.get("gpu", "cpu" if cfg.gpu == "cpu" else None))
    except (ValueError, ResumeError) as exc:
        print_error(exc)
        return 2
    after = state["progress"]["epoch"] if state else 0
    results.setdefault("resumes", []).append({
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "after_epoch": after,
        "previous_status": results.get("status"), "previous_error": results.get("error"),
        "neutral_settings": {k: v for k, v in given.items() if k in RESUME_NEUTRAL}})
    if state:
        print(f"resuming {run_dir} after epoch {after} (it was {results.get('status')})")
    else:
        print(f"resuming {run_dir} from its start (it was {results.get('status')}): {restart}")
    if cfg.persistent_workers and cfg.num_workers > 0 and cfg.image_cache == "off":
        print("warning: --persistent-workers: the DataLoader workers' random streams (the flips) cannot be saved, "
              "so the resumed epochs differ from an uninterrupted run's (statistically only)")
    return _start(cfg, device, [], ctx, run_dir=run_dir, results=results, resume=state)


def check_writable(run_dir: Path) -> None:
    """ValueError (one line) unless a file can be made in `run_dir` (a resumed run writes there)."""
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise ValueError(f"--resume {run_dir}: the run folder cannot be written ({exc.strerror or exc}); make it "
                         f"writable, or copy it somewhere writable and resume the copy") from exc


def _start(cfg: Config, device, ignored: list[str], ctx, run_dir: Path | None = None, results: dict | None = None,
           resume: dict | None = None) -> int:
    """Seeds, the run's setup, then the run (in a new folder, or resumed in `run_dir`). In a torchrun launch
    (`ctx`) every rank builds the same run; rank 0 alone prints and writes."""

    import random

    import torch
    from datasets import DataError, data_fingerprint
    from models import WeightsError
    from train import NonFiniteLossError

    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.pytorch_seed)
    torch.cuda.manual_seed_all(cfg.pytorch_seed)
    previous = handle_interrupts()  # from here on, kill = Ctrl-C
    try:
        try:  # everything a user can get wrong is checked here, before a run folder exists
            if run_dir is None and ctx.main:
                prepare_results_dir(cfg.results_dir)
            datasets, engine, loaders, setup = build_run(cfg, device, resuming=resume is not None, ctx=ctx)
            setup["data"] = data_fingerprint(cfg.data_root, cfg.dataset, cfg.features)
            run_dir = run_dir or ctx.from_main(lambda: make_run_dir(cfg))
        except (DataError, WeightsError, ValueError, OSError, NonFiniteLossError) as exc:  # the last: ROLE+LI's phase 1
            print_error(exc)
            return 2
        except KeyboardInterrupt as exc:
            if ctx.main:
                print(f"interrupted ({str(exc) or 'Ctrl-C'}) before training started: "
                      + ("no run folder was made" if run_dir is None else f"{run_dir} is unchanged"), file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        if ctx.rank > 0:  # the model and the estimates are rank 0's (DDP); each rank draws its own flips
            torch.manual_seed(cfg.pytorch_seed + ctx.rank)
            np.random.seed(cfg.seed + ctx.rank)
            random.seed(cfg.seed + ctx.rank)
        return _train_in(run_dir, cfg, device, datasets, engine, loaders, ignored, setup, results, resume)
    finally:
        restore_interrupts(previous)
        ctx.close()


def _train_in(run_dir: Path, cfg: Config, device, datasets: dict, engine, loaders: dict, ignored: list[str],
              setup: dict, results: dict | None = None, resume: dict | None = None) -> int:
    """The run itself, its console copied into console.log; returns the exit code."""
    from datasets import DataError
    from fileio import OutputError
    from train import NonFiniteLossError, RankFailure, fit

    rank = engine.dist.rank
    sys.stdout = tee = _Tee(sys.stdout, run_dir / "console.log" if rank == 0 else Path(os.devnull))

    def report(message: str) -> None:  # the last word, on the console and in console.log
        try:
            tee.file.write(message + "\n")
        except OSError:  # a full disk: the console still gets it
            pass
        print(message if rank == 0 else f"[rank {rank}] {message}", file=sys.stderr)

    try:
        print(f"run folder: {run_dir}")
        print(f"config: {cfg.to_dict()}")
        if cfg.weights == "random":
            print(f"note: {cfg.arch} starts from random weights (--weights random)")
        chance = print_stats(datasets)
        if results is None:
            results = {"config": cfg.to_dict(), "loss_hyperparameters": cfg.loss_hyperparameters(),
                       "ignored_flags": [flag(k) for k in ignored], "class_names": class_names(cfg),
                       "environment": environment(device), "chance_test_map": chance, **setup}
        else:  # resumed: the run's own record, with this process's environment (the earlier one in `resumes`)
            results["resumes"][-1]["previous_environment"] = results.get("environment")
            results["environment"] = environment(device)
            if results["resumes"][-1]["previous_environment"] and \
                    results["resumes"][-1]["previous_environment"].get("git_commit") != results["environment"]["git_commit"]:
                print("warning: the code changed since this run started (another git commit): the resumed epochs "
                      "run the new code")
        results = fit(engine, loaders, datasets, cfg, run_dir, results, resume)
    except KeyboardInterrupt as exc:
        reason = str(exc) or "Ctrl-C"
        # fit records this process's pid and, when interrupted, the status: else the signal came before that
        recorded = results is not None and results.get("status") == "interrupted" and \
            results.get("process", {}).get("pid") == os.getpid()
        if recorded:
            finished = len(results.get("epochs", {}))
            report(f"interrupted ({reason}) during epoch {finished + 1}: {finished} finished epoch(s) kept in "
                   f"{run_dir / 'results.json'}, marked \"interrupted\"")
        elif resume is not None:
            report(f"interrupted ({reason}) before training resumed: {run_dir / 'results.json'} is unchanged")
        else:
            report(f"interrupted ({reason}) before training started: no results were recorded in {run_dir}")
        return 143 if isinstance(exc, Terminated) else 130
    except (NonFiniteLossError, DataError, ValueError, OutputError, RankFailure) as exc:
        report(f"error: {one_line(exc)}")
        return 3
    else:
        print(f"best epoch {results['best_epoch']}: val mAP {results['val_map']:.2f}, "
              f"test mAP {results['test_map']:.2f} (chance {chance:.2f})")
        print(f"results: {run_dir / 'results.json'}")
        return 0
    finally:
        sys.stdout = tee.stream
        try:
            tee.file.close()  # flushes; may fail on a full disk
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
