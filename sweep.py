"""Run a table of experiments: every (dataset, loss, seed) combination, one main.py run after another.

    python sweep.py -d pascal coco -l an EM EM_APL -s 0 1 8 [-- extra main.py flags]
    python sweep.py -d pascal -l EM EM_APL -s 0 1 8 --print -- -g 0 | parallel -j 2

A combination that already has a finished run with the same config on the same data (by content: the fingerprint
in results.json "data") in --results-dir is skipped; an unfinished one (failed, interrupted, killed) on that data
that kept its last.pt is resumed (`main.py --resume <folder>`); anything else starts a new run. "Same config" is what main.py would build for the combination and the extra flags, compared
with each run's results.json["config"] without the settings that cannot change a number
(config.RESULT_NEUTRAL_SETTINGS: --gpu, --num-workers, ...). Each run is a subprocess, so one that fails
(listed at the end, exit code 1) or crashes does not stop the sweep; Ctrl-C (or SIGTERM) stops the current run
the same way (its finished epochs are kept, resumable) and then the sweep (exit 130 / 143).

`--print` writes the commands instead (one per line, shell-quoted; nothing for finished runs), for a cluster's
job array or GNU parallel. Relative paths (--results-dir, --data-root, the printed commands) are taken from the
repository root, where main.py runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import main as main_py
from config import DATASET_SETTINGS, LOSS_NAMES, RESULT_NEUTRAL_SETTINGS, Config, build_config, comparable_settings
from preproc.common import one_line

REPO = Path(__file__).resolve().parent
UNFINISHED = ("failed", "interrupted", "killed")  # the statuses main.py --resume continues
# The flags a combination sets itself, which must not come among the extra main.py flags: (dest, option, two
# values). A flag is present in the extras when the extras override both values (argparse: the last one wins).
_SWEEP_OWN = (("dataset", "-d/--dataset", "pascal", "coco"), ("loss", "-l/--loss", "an", "EM"),
              ("pytorch_seed", "-s/--pytorch-seed", "0", "1"), ("results_dir", "--results-dir", "a", "b"))
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse reads these as values, not options


@dataclass(frozen=True)
class Combination:
    """One cell of the table: a dataset, a loss and a torch seed."""

    dataset: str
    loss: str
    seed: int

    def argv(self) -> list[str]:
        return ["-d", self.dataset, "-l", self.loss, "-s", str(self.seed)]

    def __str__(self) -> str:
        return " ".join(self.argv())


@dataclass(frozen=True)
class Decision:
    """What to do for a combination: "done" (skip), "elsewhere" (another live process is running it: skip),
    "resume" (`folder`) or "new"; `reason` says why, for the console."""

    action: str
    folder: Path | None = None
    reason: str = ""


@dataclass(frozen=True)
class Outcome:
    """How a combination ended in this sweep: "finished" (ran now), "done" (skipped, finished before),
    "elsewhere" (skipped, running in another process), "failed", "interrupted" or "not started"."""

    combination: Combination
    state: str
    detail: str = ""


# ----------------------------------------------------------------------------------------------------------------
# command line

def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own arguments and the extra main.py flags after the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_sweep_args(argv: list[str]) -> argparse.Namespace:
    """The sweep's own flags (those before `--`)."""
    p = argparse.ArgumentParser(
        description="Run main.py for every combination of datasets, losses and seeds, one after another; skip "
                    "finished runs with the same config, resume unfinished ones. Extra main.py flags go after --.",
        epilog="example: python sweep.py -d pascal coco -l an EM EM_APL -s 0 1 8 -- -g 0 --num-workers 8")
    p.add_argument("-d", "--dataset", nargs="+", required=True, metavar="D",
                   help=f"datasets: {', '.join(sorted(DATASET_SETTINGS))}, or own ones (<data-root>/NAME/dataset.json; "
                        f"each combination is checked before the first run)")
    p.add_argument("-l", "--loss", nargs="+", required=True, choices=LOSS_NAMES, metavar="L",
                   help=f"losses: {', '.join(LOSS_NAMES)}")
    p.add_argument("-s", "--seed", nargs="+", type=int, default=[0], metavar="S",
                   help="torch seeds (default: 0; the paper used 0 1 8)")
    p.add_argument("--results-dir", help=f"where runs are looked for and made (default: main.py's, "
                                         f"{Config.results_dir}); also passed to main.py")
    p.add_argument("--print", action="store_true",
                   help="print one main.py command per line (new runs and resumes) instead of running them")
    return p.parse_args(argv)


def parse_main_args(argv: list[str]) -> argparse.Namespace:
    """main.py's own parsing of `argv`; a bad flag becomes a ValueError with argparse's one-line message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return main_py.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # -h among the extra flags: main.py's help was shown
            raise
        message = stderr.getvalue().strip().splitlines()[-1:] or [f"exit code {exc.code}"]
        raise ValueError(f"the main.py flags after --: {message[0].split('error: ', 1)[-1]}") from None


def check_extra_flags(extras: list[str]) -> None:
    """The extra flags parse, and leave what the sweep sets itself (-d, -l, -s, --results-dir, --resume) alone."""
    parsed = parse_main_args(extras)
    if getattr(parsed, "resume", None) is not None:
        raise ValueError("--resume among the main.py flags after --: the sweep resumes unfinished runs by itself")
    if getattr(parsed, "print_config", False):
        raise ValueError("--print-config among the main.py flags after --: it runs nothing; give it to main.py "
                         "itself (python main.py -d D -l L ... --print-config)")
    for dest, option, a, b in _SWEEP_OWN:
        first = option.split("/")[0]
        if getattr(parse_main_args([first, a, *extras]), dest) == getattr(parse_main_args([first, b, *extras]), dest):
            raise ValueError(f"{option} among the main.py flags after --: give it to sweep.py itself, before --")


def run_argv(combination: Combination, extras: list[str], results_flag: list[str]) -> list[str]:
    """The main.py arguments of a new run of `combination` (the config is computed from exactly these)."""
    return [*combination.argv(), *extras, *results_flag]


def comparable(config: dict) -> dict:
    """A run's config without the settings that cannot change its numbers (config.comparable_settings)."""
    return comparable_settings(config)


def built_config(argv: list[str]) -> Config:
    """The config main.py would build from `argv` (as main.main does); ValueError if it is invalid."""
    args = parse_main_args(argv)
    return build_config(args.dataset, **{k: v for k, v in vars(args).items() if k != "dataset"})


def wanted_config(argv: list[str]) -> dict:
    """The comparable config main.py would build from `argv`."""
    return comparable(built_config(argv).to_dict())


def _option_groups(extras: list[str]) -> list[list[str]]:
    """The extra flags split into one list per option with its values (`--lr 1e-4`, `-g1`, `--amp=bf16`)."""
    groups: list[list[str]] = []
    for token in extras:
        if not groups or (token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token)):
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def resume_flags(extras: list[str]) -> list[str]:
    """The extra flags that a resume takes: those that set only result-neutral settings (-g, --num-workers,
    --data-root, ...). The others are part of the run's config already (it matched) and main.py --resume
    refuses them; --results-dir is implied by the run's folder."""
    defaults = vars(parse_main_args([]))
    keep = []
    for group in _option_groups(extras):
        values = vars(parse_main_args(group))
        changed = {k for k, v in values.items() if v != defaults.get(k)}
        if changed <= set(RESULT_NEUTRAL_SETTINGS) - {"results_dir"}:
            keep += group
    return keep


# ----------------------------------------------------------------------------------------------------------------
# the decision

def scan_runs(results_dir: Path) -> list[tuple[Path, dict]]:
    """Every run folder in `results_dir` with a readable results.json, by name (oldest first within a
    combination). Folders without one (or with a damaged one) are not runs the sweep can match."""
    runs = []
    if not results_dir.is_dir():
        return runs
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        try:
            results = json.loads((folder / "results.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and isinstance(results.get("config"), dict):
            runs.append((folder, results))
    return runs


def current_data(argv: list[str]) -> str | None:
    """The fingerprint (datasets.data_fingerprint's sha256) of the data main.py would read for `argv`, with a
    relative --data-root taken from the repository root; None where a file is missing (that run would say so)."""
    from datasets import data_fingerprint
    cfg = built_config(argv)
    fingerprint = data_fingerprint(REPO / cfg.data_root, cfg.dataset, cfg.features)
    return fingerprint["sha256"] if fingerprint else None


def _recorded_data(results: dict) -> str | None:
    data = results.get("data")
    return data.get("sha256") if isinstance(data, dict) else None


def decide(wanted: dict, runs: list[tuple[Path, dict]], data: str | None = None) -> Decision:
    """Skip, resume or start anew, given the comparable config `wanted`, the fingerprint of the data the run
    would read now (`data`, None: unknown) and the runs of `scan_runs` (after main.prepare_results_dir marked the
    dead ones killed). Only a run on the same data counts (a run of an older version recorded none: it does not).
    A finished run wins over one running in another process, which wins over a resumable one (the one with the
    most finished epochs, then the newest)."""
    same_config = [(folder, r) for folder, r in runs if comparable(r["config"]) == wanted]
    same = [(f, r) for f, r in same_config if data is None or _recorded_data(r) == data]
    other_data = [f for f, r in same_config if (f, r) not in same and r.get("status") == "finished"]
    by_status = {status: [(f, r) for f, r in same if r.get("status") == status]
                 for status in ("finished", "running", *UNFINISHED)}
    if by_status["finished"]:
        return Decision("done", by_status["finished"][-1][0])
    if by_status["running"]:
        return Decision("elsewhere", by_status["running"][-1][0])
    unfinished = [(f, r) for status in UNFINISHED for f, r in by_status[status]]
    resumable = [(f, r) for f, r in unfinished if (f / "last.pt").is_file()]
    if resumable:
        folder, r = max(resumable, key=lambda fr: (len(fr[1].get("epochs") or {}), fr[0].name))
        return Decision("resume", folder, f"{r['status']} after {len(r.get('epochs') or {})} finished epoch(s)")
    if unfinished:
        folder, r = unfinished[-1]
        return Decision("new", reason=f"{folder} is {r['status']} but has no last.pt to resume from")
    if other_data:
        return Decision("new", reason=f"{other_data[-1]} finished on other data (its results.json \"data\" "
                                      f"fingerprint differs, or it recorded none)")
    return Decision("new")


def _display(folder: Path, results_arg: str) -> Path:
    """`folder` under the results folder as the user named it (relative paths stay relative to the repo)."""
    return Path(results_arg) / folder.name


def command(combination: Combination, decision: Decision, extras: list[str], results_flag: list[str],
            results_arg: str, python: str) -> list[str]:
    """The main.py command for a "new" or "resume" decision (to run in the repository root)."""
    if decision.action == "resume":
        return [python, "main.py", "--resume", str(_display(decision.folder, results_arg)), *resume_flags(extras)]
    return [python, "main.py", *run_argv(combination, extras, results_flag)]


def _note(decision: Decision, results_arg: str) -> str:
    if decision.action == "done":
        return f"done: {_display(decision.folder, results_arg)}"
    if decision.action == "elsewhere":
        return f"running elsewhere, skipped: {_display(decision.folder, results_arg)}"
    if decision.action == "resume":
        return f"resume {_display(decision.folder, results_arg)} ({decision.reason})"
    return "new run" + (f" ({decision.reason})" if decision.reason else "")


# ----------------------------------------------------------------------------------------------------------------
# running

def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def run_one(cmd: list[str]) -> tuple[int, KeyboardInterrupt | None]:
    """Run `cmd` in the repository root, its output streamed to ours. Ctrl-C or SIGTERM of the sweep is passed
    on once (the child runs in its own session, so a terminal's Ctrl-C reaches it only through us) and the
    run is waited for, so it records itself as interrupted; a second Ctrl-C kills it. Returns its exit code and
    the interruption, if any."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(), None
    except KeyboardInterrupt as exc:
        proc.send_signal(signal.SIGTERM if isinstance(exc, main_py.Terminated) else signal.SIGINT)
        print("sweep: stopping the current run (it keeps its finished epochs); interrupt again to kill it",
              file=sys.stderr, flush=True)
        try:
            return proc.wait(), exc
        except KeyboardInterrupt:
            proc.kill()
            return proc.wait(), exc


def _new_folder(results_dir: Path, before: set[Path], combination: Combination) -> Path | None:
    """The folder main.py made for a new run of `combination` (None if it stopped before making one)."""
    prefix = f"{combination.dataset}_{combination.loss}_s{combination.seed}_"
    made = sorted(p for p in results_dir.glob(prefix + "*") if p.is_dir() and p not in before)
    return made[-1] if made else None


def _elapsed(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _raise_terminated(signum, frame) -> None:
    raise main_py.Terminated("terminated by SIGTERM")


def run_combination(combination: Combination, head: str, extras: list[str], results_flag: list[str],
                    results_dir: Path, results_arg: str, wanted: dict) -> tuple[Outcome, KeyboardInterrupt | None]:
    """Decide (just before the run, so a run finished meanwhile by another sweep on the same folder is skipped)
    and run one combination; `head` starts its progress lines. Returns how it ended and the interruption."""
    main_py.prepare_results_dir(str(results_dir))  # marks runs of dead processes "killed"
    decision = decide(wanted, scan_runs(results_dir), current_data(run_argv(combination, extras, results_flag)))
    print(f"{head}: {_note(decision, results_arg)}", flush=True)
    if decision.action in ("done", "elsewhere"):
        return Outcome(combination, decision.action, str(_display(decision.folder, results_arg))), None
    before = set(results_dir.iterdir())
    start = time.monotonic()
    code, interrupted = run_one(command(combination, decision, extras, results_flag, results_arg, sys.executable))
    folder = decision.folder or _new_folder(results_dir, before, combination)
    where = str(_display(folder, results_arg)) if folder else "no run folder"
    state = "finished" if code == 0 else "interrupted" if interrupted else "failed"
    detail = f"{where} in {_elapsed(time.monotonic() - start)}"
    return Outcome(combination, state, detail if code == 0 else f"{_exit_text(code)}, {detail}"), interrupted


def run_sweep(combinations: list[Combination], wanted: dict[Combination, dict], extras: list[str],
              results_flag: list[str], results_dir: Path, results_arg: str) -> int:
    """Run the combinations one after another, with progress (which of how many, the time so far); print a
    summary; return the sweep's exit code: 0 only if every combination is finished."""
    start = time.monotonic()
    outcomes: list[Outcome] = []
    interrupted: KeyboardInterrupt | None = None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM,
                                                                                        _raise_terminated)
    try:
        for k, combination in enumerate(combinations, 1):
            head = f"[{k}/{len(combinations)}, sweep {_elapsed(time.monotonic() - start)}] {combination}"
            outcome, interrupted = run_combination(combination, head, extras, results_flag, results_dir,
                                                   results_arg, wanted[combination])
            outcomes.append(outcome)
            if outcome.state not in ("done", "elsewhere"):
                print(f"{head}: {outcome.state}, {outcome.detail}", flush=True)
            if interrupted:
                break
    except KeyboardInterrupt as exc:  # between runs
        interrupted = exc
    except ValueError as exc:  # the results folder became unusable during the sweep
        print(f"error: {one_line(exc)}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    started = {o.combination for o in outcomes}
    outcomes += [Outcome(c, "not started") for c in combinations if c not in started]
    print_summary(outcomes, time.monotonic() - start)
    if interrupted:
        return 143 if isinstance(interrupted, main_py.Terminated) else 130
    return 0 if all(o.state in ("finished", "done") for o in outcomes) else 1


_LABELS = {"finished": "finished", "done": "skipped (done)", "elsewhere": "skipped (running elsewhere)",
           "failed": "failed", "interrupted": "interrupted", "not started": "not started"}


def print_summary(outcomes: list[Outcome], seconds: float) -> None:
    """One line per combination, grouped by how it ended, and the counts."""
    counts = {state: sum(o.state == state for o in outcomes) for state in _LABELS}
    print(f"\nsweep summary: {len(outcomes)} combination(s) in {_elapsed(seconds)}: "
          + ", ".join(f"{n} {_LABELS[s]}" for s, n in counts.items() if n))
    for state, label in _LABELS.items():
        for o in outcomes:
            if o.state == state:
                print(f"  {label:<28} {o.combination}" + (f": {o.detail}" if o.detail else ""))
    sys.stdout.flush()


def print_commands(combinations: list[Combination], wanted: dict[Combination, dict], extras: list[str],
                   results_flag: list[str], results_dir: Path, results_arg: str) -> int:
    """--print: the commands on stdout (one per line, for a job array or GNU parallel), notes on stderr."""
    runs = scan_runs(results_dir)
    for combination in combinations:
        decision = decide(wanted[combination], runs, current_data(run_argv(combination, extras, results_flag)))
        if decision.action in ("new", "resume"):
            print(shlex.join(command(combination, decision, extras, results_flag, results_arg, "python")))
        if decision.action != "new" or decision.reason:
            print(f"# {combination}: {_note(decision, results_arg)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    own, extras = split_argv(sys.argv[1:] if argv is None else argv)
    args = parse_sweep_args(own)
    combinations = list(dict.fromkeys(Combination(d, l, s)
                                      for d, l, s in itertools.product(args.dataset, args.loss, args.seed)))
    results_flag = [] if args.results_dir is None else ["--results-dir", args.results_dir]
    results_arg = args.results_dir or Config.results_dir
    results_dir = REPO / results_arg  # main.py runs in the repository root
    try:  # everything checked before the first run starts
        check_extra_flags(extras)
        wanted = {}
        for combination in combinations:
            try:
                wanted[combination] = wanted_config(run_argv(combination, extras, results_flag))
            except ValueError as exc:
                raise ValueError(f"{shlex.join([*combination.argv(), *extras])}: {exc}") from None
        if not args.print:
            gpu = parse_main_args(run_argv(combinations[0], extras, results_flag)).gpu
            with contextlib.redirect_stdout(io.StringIO()):  # its no-CUDA warning comes with each run
                main_py.resolve_device(gpu)
        if results_dir.exists() or not args.print:
            main_py.prepare_results_dir(str(results_dir))  # writable; runs of dead processes marked "killed"
    except ValueError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.print:
        return print_commands(combinations, wanted, extras, results_flag, results_dir, results_arg)
    return run_sweep(combinations, wanted, extras, results_flag, results_dir, results_arg)


if __name__ == "__main__":
    sys.exit(main())
