"""Mutation run over the published defaults (issue 28): does some test fail when one default changes?

    python tests/mutate_settings.py [--tests tests/test_settings.py ...] [--only WORD] [--json OUT]

Each mutant is a realistic one-line change of one default: every value of each dataset's row of
`config.DATASET_SETTINGS` and of the real datasets' shared entry, the numpy / split / observed-label seeds, the
split fraction, the -d / -l / -s defaults of main.py, the original's fixed options, every Large-Loss delta_rel and
ROLE k, ROLE+LI's phase 1, and the baselines' loss defaults in losses.py. For each, the repository (without .git
and data/) is copied once to a temporary folder, the one line is changed there, and pytest runs `--tests` (first
failure stops it); a mutant is killed when pytest fails. The unchanged copy must pass first. Prints one line per
mutant and the kill rate; `--json` also writes them. Not collected by pytest (no test_ prefix); sequential, so
that it runs on a small machine.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_COPIED = (".git", "data", "results", ".venv", ".pytest_cache", ".benchmarks")  # at the top level


def not_copied(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or Path(folder) == ROOT and n in NOT_COPIED}


@dataclass(frozen=True)
class Mutant:
    """In `path`, the one line that contains `line` (it must be the only one) gets `old` replaced by `new`."""

    path: str
    line: str
    old: str
    new: str

    @property
    def name(self) -> str:
        return f"{self.path}: {self.old} -> {self.new}  [{self.line.strip()[:40]}]"


def table_mutants() -> list[Mutant]:
    """A nearby value for each setting of each dataset's row (a typo or a neighbouring grid value)."""
    nearby = {"batch_size=8": "batch_size=16", "batch_size=16": "batch_size=8", "lr=1e-5": "lr=1e-4",
              "lr=1e-4": "lr=1e-5", "alpha=0.2": "alpha=0.1", "alpha=0.1": "alpha=0.2", "alpha=0.01": "alpha=0.1",
              "neg_proportion=0.9": "neg_proportion=0.8", "warmup_epoch=5": "warmup_epoch=4",
              "warmup_epoch=4": "warmup_epoch=5", "warmup_epoch=3": "warmup_epoch=4", "beta=0.02": "beta=0.2",
              "beta=0.9": "beta=0.09", "beta=0.2": "beta=0.02", "beta=0.4": "beta=0.04"}
    mutants = []
    lines = (ROOT / "config.py").read_text().splitlines()
    for dataset in ("pascal", "coco", "nuswide", "cub"):
        (row,) = [line.strip() for line in lines if re.match(rf'\s*"{dataset}":\s+dict\(batch_size=', line)]
        mutants += [Mutant("config.py", row, old, new) for old, new in nearby.items()
                    if re.search(rf"\b{re.escape(old)}\b", row)]
    shared = "_REAL = dict("
    mutants += [Mutant("config.py", shared, old, new) for old, new in (
        ('"resnet50"', '"resnet101"'), ('"imagenet"', '"random"'), ("image_size=448", "image_size=224"),
        ("num_epochs=10", "num_epochs=20"), ("num_workers=8", "num_workers=4"))]
    return mutants


def other_mutants() -> list[Mutant]:
    config = [  # the original's fixed settings (Config) and the per-method tables
        ("seed: int = 1200  # numpy", "1200", "1201"), ("split_seed: int = 1200", "1200", "1201"),
        ("val_frac: float = 0.2", "0.2", "0.25"), ('val_labels: str = "clean"', '"clean"', '"observed"'),
        ('stop_metric: str = "map"', '"map"', '"top_1"'), ("train_subsample: float = 1.0", "1.0", "0.9"),
        ("val_subsample: float = 1.0", "1.0", "0.9"), ("freeze_backbone: bool = False", "False", "True"),
    ]
    for dataset, values in (("pascal", ("0.2", "0.2", "0.1")), ("coco", ("0.4", "0.2", "0.2")),
                            ("nuswide", ("0.4", "0.2", "0.2")), ("cub", ("0.4", "0.4", "0.2"))):
        line = f'"{dataset}": {{"ll_r"'
        for loss, value in zip(("ll_r", "ll_ct", "ll_cp"), values):
            config.append((line, f'"{loss}": {value}', f'"{loss}": {float(value) + 0.1:.1f}'))
    config += [("ROLE_EXPECTED_POSITIVES: dict", old, new) for old, new in (
        ('"pascal": 1.5', '"pascal": 2.5'), ('"coco": 2.9', '"coco": 2.5'), ('"nuswide": 1.9', '"nuswide": 2.9'),
        ('"cub": 31.4', '"cub": 3.14'))]
    config += [("ROLE_LI_PHASE1: dict", "num_epochs=25", "num_epochs=10"),
               ("ROLE_LI_PHASE1: dict", "lr=1e-3", "lr=1e-4"),
               ("batch_size=8 if d", "batch_size=8 if", "batch_size=16 if"),
               ("batch_size=8 if d", "else 16)", "else 8)")]
    losses = [("*, ls_eps: float", "0.1", "0.2"), ("nls_eps: float = -0.1", "-0.1", "-0.2"),
              ("def l1_regularised", "0.1", "0.01"), ("def l2_regularised", "0.1", "0.01"),
              ("def entropy_minimisation", "0.1", "0.01"), ("focal_gamma: float = 2.0", "2.0", "1.0"),
              ("asl_gamma_neg: float = 4.0", "4.0", "2.0"), ("asl_gamma_pos: float = 0.0", "= 0.0,", "= 1.0,"),
              ("asl_clip: float = 0.05)", "0.05", "0.1")]
    main = [('"--dataset", default="pascal"', '"pascal"', '"coco"'),
            ('"--loss", default="EM_APL"', '"EM_APL"', '"EM"'),
            ('dest="pytorch_seed", type=int, default=0', "default=0", "default=1")]
    return ([Mutant("config.py", *m) for m in config] + [Mutant("losses.py", *m) for m in losses]
            + [Mutant("main.py", *m) for m in main]
            + [Mutant("preproc/generate_observed_labels.py", "DEFAULT_SEED = 1200", "1200", "1201")])


def new_method_mutants() -> list[Mutant]:
    """The defaults added since issue 28's first run (`--set new`): the protocols' presets and the stop rule of
    Kim et al.'s loop, and the defaults of the methods since 2021 (losses.py)."""
    zhou, cole, kim = '"zhou": dict(', '"cole": dict(', '"kim": dict('
    config = [(zhou, "head_lr_mult=1.0", "head_lr_mult=10.0"), (zhou, '"first-drop"', '"drop-3"'),
              (zhou, "drop_last=False", "drop_last=True"), (zhou, '"best"', '"end"'),
              (zhou, '"float64"', '"float32"'), (cole, '"none"', '"first-drop"'),
              (cole, "drop_last=True", "drop_last=False"), (cole, '"every"', '"best"'),
              (cole, '"float32"', '"float64"'), (kim, "head_lr_mult=10.0", "head_lr_mult=1.0"),
              (kim, '"drop-3"', '"first-drop"'), (kim, '"end"', '"best"'),
              ("batch_size=16, lr=1e-5, num_epochs=10)", "batch_size=16", "batch_size=8"),
              ("batch_size=16, lr=1e-5, num_epochs=10)", "lr=1e-5", "lr=1e-4"),
              ("batch_size=16, lr=1e-5, num_epochs=10)", "num_epochs=10", "num_epochs=20")]
    train = [("best_val_metric - val_metric > int(", "> int(", ">= int(")]
    losses = [("hill_lambda: float = 1.5", "1.5", "1.0"),
              ("def hill(", "focal_margin: float = 1.0", "focal_margin: float = 0.5"),
              ("splc_tau: float = 0.6", "0.6", "0.5"), ("splc_start_epoch: int = 2", "= 2", "= 1"),
              ("pl_beta_pos: float = 0.7", "0.7", "0.5"), ("pl_beta_neg: float = 0.0", "0.0", "0.1"),
              ("pl_pos_threshold: float = 0.3", "0.3", "0.5"), ("pl_warmup_epoch: int = 0", "= 0", "= 1")]
    # BoostLU (Kim et al. 2023) and GR-Loss (Chen et al. 2024), issue 25
    config += [("BOOSTLU_DELTA_REL: dict", '"ll_r": 0.5', '"ll_r": 0.4'),
               ("BOOSTLU_DELTA_REL: dict", '"ll_ct": 0.2', '"ll_ct": 0.3'),
               ("BOOSTLU_DELTA_REL: dict", '"ll_cp": 0.1', '"ll_cp": 0.2'), ("BOOSTLU_ALPHA = 5.0", "5.0", "4.0")]
    losses += [("gr_w_start: float = 0.0", "= 0.0", "= 0.5"), ("gr_w_end: float = 2.0", "= 2.0", "= 1.0"),
               ("gr_b_start: float = -2.0", "gr_b_start: float = -2.0", "gr_b_start: float = -1.0"),
               ("gr_b_end: float = -2.0", "gr_b_end: float = -2.0", "gr_b_end: float = -1.0"),
               ("gr_mu_start: float = 0.5", "= 0.5", "= 0.6"), ("gr_mu_end: float = 0.8", "= 0.8", "= 0.7"),
               ("gr_sigma_start: float = 2.0", "= 2.0", "= 1.0"), ("gr_sigma_end: float = 0.5", "= 0.5", "= 1.0"),
               ("gr_q2: float = 0.01", "0.01", "0.1"), ("gr_q3: float = 1.0", "= 1.0", "= 0.5")]
    return ([Mutant("config.py", *m) for m in config] + [Mutant("train.py", *m) for m in train]
            + [Mutant("losses.py", *m) for m in losses])


def _line_of(path: str, fragment: str) -> str:
    lines = [line for line in (ROOT / path).read_text().splitlines() if fragment in line]
    if len(lines) != 1:
        raise SystemExit(f"error: {path}: {len(lines)} lines contain {fragment!r} (want exactly 1); update "
                         f"tests/mutate_settings.py's mutants to the code")
    return lines[0]


def mutated_text(mutant: Mutant) -> str:
    line = _line_of(mutant.path, mutant.line)
    if line.count(mutant.old) != 1:
        raise SystemExit(f"error: {mutant.path}: {mutant.old!r} occurs {line.count(mutant.old)} times in {line!r}")
    text = (ROOT / mutant.path).read_text()
    return text.replace(line, line.replace(mutant.old, mutant.new), 1)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, the last line pytest printed) for the test files in `copy`."""
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = done.stdout.strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else done.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", nargs="+", default=["tests/test_settings.py"], help="test files run on each mutant")
    p.add_argument("--set", choices=("published", "new", "all"), default="published",
                   help="the published settings of the first run, the defaults added since (new), or both")
    p.add_argument("--only", help="only the mutants whose description contains this")
    p.add_argument("--timeout", type=float, default=900, help="seconds one pytest run may take")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    chosen = {"published": table_mutants() + other_mutants(), "new": new_method_mutants()}
    pool = chosen["published"] + chosen["new"] if args.set == "all" else chosen[args.set]
    mutants = [m for m in pool if not args.only or args.only in m.name]
    texts = [mutated_text(m) for m in mutants]  # every mutant applies, before anything runs
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=not_copied)
        passed, last = run_tests(copy, args.tests, args.timeout)
        if not passed:
            print(f"error: the unchanged code fails {' '.join(args.tests)}: {last}", file=sys.stderr)
            return 1
        for mutant, text in zip(mutants, texts):
            original = (copy / mutant.path).read_text()
            (copy / mutant.path).write_text(text)
            start = time.monotonic()
            passed, last = run_tests(copy, args.tests, args.timeout)
            (copy / mutant.path).write_text(original)
            results.append({"mutant": mutant.name, "killed": not passed, "pytest": last,
                            "seconds": round(time.monotonic() - start, 1)})
            print(f"{'killed  ' if not passed else 'SURVIVED'}  {mutant.name}  ({last})", flush=True)
    killed = sum(r["killed"] for r in results)
    print(f"{killed} of {len(results)} mutants killed ({100 * killed / max(len(results), 1):.0f} %) by "
          f"{' '.join(args.tests)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tests": args.tests, "killed": killed, "mutants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
