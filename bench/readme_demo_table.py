"""Recompute the documented demo sweep (docs/experiments.md, "A real example": its linear-probe table on the demo's
features) and fail when the documented figures drift from what the current code gives.

    python bench/readme_demo_table.py            # exit 0: the documented table is what the commands print now
    python bench/readme_demo_table.py --update   # write the fresh table, plots and commit / machine line into it

Runs the example's own three commands (extract_features.py, sweep.py, report.py) as printed there, with the run
and plot folders moved into a temporary folder, on the repository's data/demo (generated on first use), and
compares report.py's output with the documented block; --update also copies the two plots the example shows into
docs/. (The script keeps its name from when the example was in README.md.) About
2 minutes on a quiet 2-core machine (12 linear-probe runs); much longer under load. Exit codes: 0 same table,
1 the table drifted (both tables printed; --update rewrites it), 2 the example is not where expected.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "experiments.md"  # the example lived in README.md until issue 24
ANCHOR = "A real example"  # the paragraph that introduces the example's commands and table
# the plots that the example shows: docs file -> the name report.py gives it (a run's: its folder's)
DOCS_PLOTS = {"report_run_demo_EM_APL.png": re.compile(r"^run_demo_EM_APL_s0_.*\.png$"),
              "report_dataset_demo.png": re.compile(r"^dataset_demo\.png$")}


def example(text: str) -> tuple[list[str], tuple[int, int], tuple[int, int] | None]:
    """The example's commands, the span of its printed output (report.py's table) in `text`, and the span of its
    "Made at" line."""
    start = text.index(ANCHOR)
    blocks = re.finditer(r"```(\w*)\n(.*?)```", text[start:], re.S)
    commands = [line for line in next(blocks).group(2).splitlines() if line.strip()]
    output = next(blocks)
    made = re.search(r"^Made at commit .*$", text[start:start + output.start()], re.M)
    return (commands, (start + output.start(2), start + output.end(2)),
            (start + made.start(), start + made.end()) if made else None)


def run(commands: list[str], tmp: Path) -> str:
    """The example's commands with its folders under `tmp`; returns report.py's stdout."""
    out = ""
    for command in commands:
        argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
        argv = [str(tmp / a) if a in ("demo_runs", "demo_plots") else a for a in argv]
        print("$", shlex.join(argv), flush=True)
        proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: {command!r} failed (exit {proc.returncode})")
        out = proc.stdout
    return out


def copy_docs_plots(plots: Path) -> None:
    """The example's two plots, from the fresh run's plot folder into docs/."""
    for name, pattern in DOCS_PLOTS.items():
        [made] = [p for p in plots.iterdir() if pattern.match(p.name)]
        shutil.copyfile(made, REPO / "docs" / name)
        print(f"updated docs/{name} from {made.name}")


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core CPU VM ({model})"


def head_commit() -> str:
    """The checkout's commit, short, for a "Made at commit" stamp."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--update", action="store_true", help="write the fresh table into docs/experiments.md")
    args = args.parse_args(argv)
    text = DOC.read_text()
    try:
        commands, span, made = example(text)
    except (ValueError, StopIteration, IndexError):
        print(f"error: {DOC}: no example after {ANCHOR!r} with a bash block and an output block", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fresh = run(commands, Path(tmp))
        documented = text[span[0]:span[1]]
        if not args.update:
            if fresh == documented:
                print(f"{DOC.relative_to(REPO)}: the demo table matches a fresh run")
                return 0
            print(f"{DOC.relative_to(REPO)}: the demo table drifted:\n--- documented\n{documented}--- fresh run\n"
                  f"{fresh}", file=sys.stderr)
            return 1
        # --update rewrites table, plots and stamp even when the table is unchanged: the stamp then names the
        # commit whose code was last checked to give it
        copy_docs_plots(Path(tmp) / "demo_plots")
    stamp = f"Made at commit {head_commit()} on a {machine()} by `python bench/readme_demo_table.py --update`."
    updated = text[:span[0]] + fresh + text[span[1]:]
    if made:  # (before the table: its position does not move with the table's length)
        updated = updated[:made[0]] + stamp + updated[made[1]:]
    DOC.write_text(updated)
    print(f"updated {DOC.relative_to(REPO)}: {stamp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
