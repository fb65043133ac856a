"""The paper's table (and plots) from finished runs: every results.json under the given folders.

    python report.py                               # markdown table of results/ on stdout
    python report.py results other --paper         # + the paper's values and the differences
    python report.py --format csv --out table.csv  # csv (or latex), written atomically
    python report.py --per-class pascal            # per-class test AP of one dataset, with class names
    python report.py --check                       # recompute mAP from each run's predictions.npz
    python report.py --plots plots                 # + PNGs: per run, per dataset
    python report.py --plots plots --compare RUN_A RUN_B   # only: per-class test AP of two runs

One row per loss (plus the settings that set a row apart), one column per dataset; each cell is the test mAP
(%) at the best-val epoch, mean ± sample std (ddof=1) over seeds, with the number of seeds n. Only finished
runs count. Two runs are the same experiment iff their configs are equal without `pytorch_seed` and
`config.RESULT_NEUTRAL_SETTINGS`, and they trained on the same data (the fingerprint that results.json "data"
records). Different experiments are never pooled: a setting that differs from the dataset's defaults
(config.build_config), or between the experiments of one cell, becomes part of the row label, e.g.
`EM_APL (lr=0.0001)`, and so does different data, `data=<its first 8 hex digits>` (with a note on stderr). Of
two runs with the same config, data and seed, the later (folder-name time) is kept. Every file that is not used
is named on stderr with the reason, one line each.

Exit codes: 0 a table was written, 1 no finished run found (or nothing could be written), 2 bad usage,
3 `--check` found a run whose predictions.npz disagrees with its results.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

import config
from config import RESULT_NEUTRAL_SETTINGS, comparable_settings
from fileio import OutputError, write_atomic
from metrics import per_class_ap
from preproc.common import one_line

if TYPE_CHECKING:  # matplotlib is imported only when plots are drawn
    from matplotlib.figure import Figure

# ----------------------------------------------------------------------------------------------------------------
# the paper's table

# Column headers of the paper's datasets, in the paper's order; other datasets follow under their own name.
DATASET_HEADERS: dict[str, str] = {"pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB"}


def _paper_row(voc: str, coco: str, nus: str, cub: str) -> dict[str, tuple[float, float | None]]:
    """{dataset: (mean, std)} from the table's cells as printed ("89.42±0.27"; "89.2": no std given)."""
    out = {}
    for dataset, cell in zip(DATASET_HEADERS, (voc, coco, nus, cub)):
        mean, _, std = cell.partition("±")
        out[dataset] = (float(mean), float(std) if std else None)
    return out


# (loss, method as the paper's table names it, values): Zhou et al. 2022, test mAP, mean ± std over runs; the
# LL rows are Kim et al. 2022's own numbers, without std (README "The paper's table"; docs/baselines.md).
# Rows print in this order; losses not listed here follow, by name.
PAPER_TABLE: tuple[tuple[str, str, dict[str, tuple[float, float | None]]], ...] = (
    ("bce", "BCE (all P. & all N.)", _paper_row("89.42±0.27", "76.78±0.13", "52.08±0.20", "30.90±0.64")),
    ("iun", "BCE (1 P. & all N.)", _paper_row("87.60±0.31", "71.39±0.19", "46.45±0.27", "20.65±1.11")),
    ("an", "AN loss", _paper_row("85.89±0.38", "64.92±0.19", "42.27±0.56", "18.31±0.47")),
    ("dw", "DW", _paper_row("86.98±0.36", "67.59±0.11", "45.71±0.23", "19.15±0.56")),
    ("l1r", "L1R", _paper_row("85.97±0.31", "64.44±0.20", "42.15±0.46", "17.59±1.82")),
    ("l2r", "L2R", _paper_row("85.96±0.36", "64.41±0.24", "42.72±0.12", "17.71±1.79")),
    ("ls", "LS", _paper_row("87.90±0.21", "67.15±0.13", "43.77±0.29", "16.26±0.45")),
    ("nls", "N-LS", _paper_row("88.12±0.32", "67.15±0.10", "43.86±0.54", "16.82±0.42")),
    ("entmin", "EntMin", _paper_row("53.16±2.81", "32.52±5.55", "19.38±3.64", "13.08±0.15")),
    ("focal", "Focal loss", _paper_row("87.59±0.58", "68.79±0.14", "47.00±0.14", "19.80±0.30")),
    ("asl", "ASL", _paper_row("87.76±0.51", "68.78±0.32", "46.93±0.30", "18.81±0.48")),
    ("role", "ROLE", _paper_row("87.77±0.22", "67.04±0.19", "41.63±0.35", "13.66±0.24")),
    ("role_li", "ROLE+LI", _paper_row("88.26±0.21", "69.12±0.13", "45.98±0.26", "14.86±0.72")),
    ("ll_r", "LL-R (Kim et al. 2022)", _paper_row("89.2", "71.0", "47.4", "19.5")),
    ("ll_ct", "LL-Ct (Kim et al. 2022)", _paper_row("89.0", "70.5", "48.0", "20.4")),
    ("ll_cp", "LL-Cp (Kim et al. 2022)", _paper_row("88.4", "70.7", "48.3", "20.1")),
    ("EM", "EM loss", _paper_row("89.09±0.17", "70.70±0.31", "47.15±0.11", "20.85±0.42")),
    ("EM_APL", "EM loss + APL", _paper_row("89.19±0.31", "70.87±0.23", "47.59±0.22", "21.84±0.34")),
    # ---- methods since 2022 (issue 25; docs/methods_since_2022.md): their authors' own numbers, no std. BoostLU
    # (Kim et al. 2023, Table 1) is a model head on the LL losses: key "<loss>+boostlu" (`paper_key`).
    ("ll_r+boostlu", "BoostLU + LL-R (Kim et al. 2023)", _paper_row("89.29", "72.89", "49.59", "19.80")),
    ("ll_ct+boostlu", "BoostLU + LL-Ct (Kim et al. 2023)", _paper_row("88.61", "71.78", "48.37", "19.25")),
    ("ll_cp+boostlu", "BoostLU + LL-Cp (Kim et al. 2023)", _paper_row("87.81", "71.41", "48.61", "19.34")),
    ("gr", "GR-Loss (Chen et al. 2024)", _paper_row("89.83", "73.17", "49.08", "21.64")),
    # VLPL's own numbers (mvrl/VLPL README: ResNet-50 at 448 px, CLIP ViT-L/14-336 pseudo-labels), without std
    ("EM_PL", "EM + CLIP pseudo-labels (VLPL, Xing et al. 2024)", _paper_row("89.10", "71.45", "49.55", "24.02")),
)
PAPER_ORDER: tuple[str, ...] = tuple(loss for loss, _, _ in PAPER_TABLE)
PAPER_METHODS: dict[str, str] = {loss: method for loss, method, _ in PAPER_TABLE}
PAPER_VALUES: dict[str, dict[str, tuple[float, float | None]]] = {loss: v for loss, _, v in PAPER_TABLE}

# predictions.npz and results.json are computed by the same function (metrics.compute_map): any difference
# beyond float noise means the two files do not belong together.
PREDICTION_TOLERANCE = 1e-6

STD_NOTE = ("mean ± std (n): test mAP (%) at the best-val epoch over n seeds; std is the sample standard "
            "deviation (ddof=1); n = 1 has no std.")
SETTINGS_NOTE = ("A setting in parentheses differs from the dataset's defaults (config.py) or between the runs "
                 "of one cell (data=...: the data they trained on); runs of different settings or data are never "
                 "pooled.")
PAPER_NOTE = ("paper: Zhou et al. 2022 (LL rows: Kim et al. 2022; BoostLU rows: Kim et al. 2023; GR-Loss: Chen et "
              "al. 2024; VLPL: Xing et al. 2024; these give no std); diff = ours - paper; marked (bold) where the "
              "difference is larger than 2 × the paper's std.")


class UsageError(Exception):
    """Bad command-line usage (exit code 2), reported in one line."""


class NothingFound(Exception):
    """No finished run to report (exit code 1), reported in one line."""


class Skip(Exception):
    """A results.json that is not used, with the reason (one line on stderr)."""


# ----------------------------------------------------------------------------------------------------------------
# runs

@dataclass(frozen=True)
class Run:
    """One finished run: its results.json (parsed) and where it lies."""

    path: Path  # .../<run folder>/results.json
    results: dict = field(repr=False)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> dict:
        return self.results["config"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def seed(self) -> int:
        return self.config["pytorch_seed"]

    @property
    def test_map(self) -> float:
        return float(self.results["test_map"])

    @property
    def data_sha256(self) -> str | None:
        """The fingerprint of the data it trained and was evaluated on (None: a run of an older version)."""
        data = self.results.get("data")
        return data.get("sha256") if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None

    @property
    def data_label(self) -> str:
        """The fingerprint as a row label shows it: its first 8 hex digits, or "unrecorded"."""
        return self.data_sha256[:8] if self.data_sha256 else "unrecorded"

    def class_names(self, num_classes: int) -> list[str]:
        """results.json's class names, or "class 0", "class 1", ... (older runs, or a list of another length)."""
        names = self.results.get("class_names")
        if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
            return names
        return [f"class {c}" for c in range(num_classes)]

    def per_class_ap(self) -> list[float] | None:
        """test_per_class_ap (percent) when it is a list of numbers, else None."""
        values = self.results.get("test_per_class_ap")
        if isinstance(values, list) and values and all(_is_number(v) for v in values):
            return [float(v) for v in values]
        return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: Path) -> Run:
    """The finished run whose results.json is `path`; raises Skip with the reason for anything else
    (unreadable, half-written or foreign JSON, a run that is not finished, a finished one without a test mAP)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise Skip(f"cannot read it ({one_line(exc)})") from exc
    try:
        results = json.loads(text)
    except ValueError as exc:
        raise Skip(f"not valid JSON, half-written or damaged ({one_line(exc)})") from exc
    cfg = results.get("config") if isinstance(results, dict) else None
    if not isinstance(cfg, dict):
        raise Skip("not a results.json of main.py (no 'config' object)")
    for key, kind in (("dataset", str), ("loss", str), ("pytorch_seed", int)):
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            raise Skip(f"not a results.json of main.py (config has no {kind.__name__} '{key}')")
    status = results.get("status")
    if status != "finished":
        error = results.get("error")
        because = f": {one_line(error)[:300]}" if isinstance(error, str) and error else ""
        raise Skip(f"run not finished (status {status!r}{because})")
    if not _is_number(results.get("test_map")):
        raise Skip(f"finished, but test_map is not a finite number ({results.get('test_map')!r})")
    return Run(path, results)


def find_results(roots: Sequence[Path]) -> list[Path]:
    """Every results.json in or under `roots` (a folder, or a results.json itself), each once, sorted."""
    found = set()
    for root in roots:
        if not root.exists():
            raise UsageError(f"results folder {root} does not exist; name the folders that hold the run folders "
                             "(default: results)")
        paths = [root] if root.is_file() else root.rglob("results.json")
        found.update(p.resolve() for p in paths if p.is_file())
    return sorted(found)


def run_time(run: Run) -> tuple[str, int]:
    """When the run started, for ordering: the folder name's `_YYYYmmdd-HHMMSS[_n]`, else the file's mtime."""
    match = re.search(r"_(\d{8}-\d{6})(?:_(\d+))?$", run.folder.name)
    if match:
        return match[1], int(match[2] or 0)
    try:
        return time.strftime("%Y%m%d-%H%M%S", time.localtime(run.path.stat().st_mtime)), 0
    except OSError:  # gone since it was read: oldest
        return "", 0


def _canonical(value: object) -> str:
    """A value as comparable text: numbers as floats (2 == 2.0, as in Python; a bool stays a bool)."""
    def canon(v: object) -> object:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, dict):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return v
    return json.dumps(canon(value), sort_keys=True)


def experiment_key(cfg: dict) -> str:
    """Equal for two configs iff they are the same experiment: equal without the seed and the settings that
    cannot change a number (config.RESULT_NEUTRAL_SETTINGS)."""
    return _canonical(comparable_settings(cfg, seed=False))


def run_key(run: Run) -> tuple[str, str | None]:
    """Equal for two runs iff they are the same experiment on the same data (by content: results.json "data")."""
    return experiment_key(run.config), run.data_sha256


def collect_runs(roots: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """The finished runs under `roots`, one per (experiment, seed): the latest where a seed was run twice.
    Returns them and one message per results.json left out, saying why."""
    runs, skipped = [], []
    for path in find_results(roots):
        try:
            runs.append(load_run(path))
        except Skip as exc:
            skipped.append(f"skipped {path}: {exc}")
    latest: dict[tuple[str, int], Run] = {}
    for run in sorted(runs, key=run_time):
        key = (*run_key(run), run.seed)
        if key in latest:
            older = latest[key]
            skipped.append(f"skipped {older.path}: same config, data and seed ({run.seed}) as {run.path}, "
                           "which is later and is kept")
        latest[key] = run
    return sorted(latest.values(), key=lambda r: str(r.path)), skipped


# ----------------------------------------------------------------------------------------------------------------
# experiments: runs of one config, pooled over seeds

@dataclass(frozen=True)
class Stat:
    """Values over seeds: mean, sample std (ddof=1; None for n = 1) and n."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else None


@dataclass(frozen=True)
class Experiment:
    """The runs (one per seed) of one config; `settings` is what sets it apart in its row label."""

    loss: str
    dataset: str
    settings: str
    runs: tuple[Run, ...]

    @property
    def label(self) -> str:
        return f"{self.loss} ({self.settings})" if self.settings else self.loss

    @property
    def paper_key(self) -> str:
        """The PAPER_TABLE row this experiment reproduces: its loss, or "<loss>+<head>" for a CAM head (BoostLU)."""
        head = self.runs[0].config.get("head", "linear")
        return self.loss if head == "linear" else f"{self.loss}+{head}"

    def test_map(self) -> Stat:
        return Stat(tuple(r.test_map for r in self.runs))


def format_value(value: object) -> str:
    """A setting's value in a row label: floats as Python writes them with a short exponent (1e-05 -> 1e-5)."""
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def dataset_defaults(dataset: str, loss: str, like: dict | None = None) -> dict | None:
    """The config main.py builds for `-d dataset -l loss` without further flags (with `--features` and
    `--data-root` as in the config `like`: a linear probe has its own defaults, but its feature set always shows
    in the label); None for a dataset (or loss) that config.py does not know (then only differences between
    experiments label them)."""
    like = like or {}
    try:
        defaults = config.build_config(dataset, loss=loss, features=like.get("features"),
                                       data_root=like.get("data_root"), protocol=like.get("protocol")).to_dict()
    except (ValueError, TypeError, KeyError):
        return None
    # the feature set and the protocol always show in the label (the settings a protocol sets do not)
    defaults["features"], defaults["protocol"] = None, config.Config.protocol
    return defaults


def label_settings(configs: Sequence[dict], defaults: Sequence[dict | None]) -> list[str]:
    """The settings part of each config's row label within one (loss, dataset) cell: the settings that differ
    from its `defaults` (one per config: a protocol has its own), plus those that differ between the configs and
    have no default. Falls back to every
    setting that differs between the configs if that leaves two labels equal (e.g. a key missing in one)."""
    ignored = {"dataset", "loss", "pytorch_seed", *RESULT_NEUTRAL_SETTINGS}
    keys = [k for cfg in configs for k in cfg if k not in ignored]
    keys = list(dict.fromkeys(keys))  # the configs' own (Config field) order, each once
    unset = object()
    varying = [k for k in keys if len({"<unset>" if c.get(k, unset) is unset else _canonical(c[k])
                                       for c in configs}) > 1]

    def label(cfg: dict, shown: list[str]) -> str:
        return ", ".join(f"{k}={format_value(cfg[k]) if k in cfg else 'unset'}" for k in shown)

    labels = []
    for cfg, own in zip(configs, defaults):
        off_default = [k for k in keys if own is not None and k in own and k in cfg
                       and _canonical(cfg[k]) != _canonical(own[k])]
        no_default = [k for k in varying if own is None or k not in own]
        labels.append(label(cfg, [k for k in keys if k in off_default or k in no_default]))
    if len(set(labels)) < len(labels):
        labels = [label(cfg, varying) for cfg in configs]
    return labels


def group_runs(runs: Sequence[Run]) -> list[Experiment]:
    """Pool runs of the same experiment (seeds) and label each experiment; sorted as the table's rows."""
    cells: dict[tuple[str, str], dict[str, list[Run]]] = {}
    for run in runs:
        cells.setdefault((run.loss, run.dataset), {}).setdefault(run_key(run), []).append(run)
    experiments = []
    for (loss, dataset), by_key in cells.items():
        groups = list(by_key.values())
        # the data fingerprint has no default: it shows in the label where it differs within the cell
        settings = label_settings([{**g[0].config, "data": g[0].data_label} for g in groups],
                                  [dataset_defaults(dataset, loss, g[0].config) for g in groups])
        for group, label in zip(groups, settings):
            experiments.append(Experiment(loss, dataset, label, tuple(sorted(group, key=lambda r: r.seed))))
    return sorted(experiments, key=lambda e: (row_order(e.loss, e.settings), dataset_order(e.dataset)))


def data_notes(runs: Sequence[Run]) -> list[str]:
    """One stderr line per experiment whose runs trained on different data (kept apart in the table)."""
    by_experiment: dict[tuple[str, str, str], set[str]] = {}
    for run in runs:
        by_experiment.setdefault((run.loss, run.dataset, experiment_key(run.config)), set()).add(run.data_label)
    return [f"note: {loss} on {dataset}: runs of the same settings trained on different data (data fingerprints "
            f"{', '.join(sorted(labels))}, results.json \"data\"): not pooled, each has its own row (data=...)"
            for (loss, dataset, _), labels in by_experiment.items() if len(labels) > 1]


def row_order(loss: str, settings: str) -> tuple:
    """The paper's rows first, in its order, then other losses by name; the plain row before its variants."""
    known = loss in PAPER_ORDER
    return (not known, PAPER_ORDER.index(loss) if known else 0, loss, settings != "", settings)


def dataset_order(dataset: str) -> tuple:
    """VOC, COCO, NUS, CUB, then other datasets by name."""
    known = dataset in DATASET_HEADERS
    return (not known, list(DATASET_HEADERS).index(dataset) if known else 0, dataset)


def dataset_header(dataset: str) -> str:
    return DATASET_HEADERS.get(dataset, dataset)


def find_dataset(name: str, experiments: Sequence[Experiment]) -> str:
    """The dataset named by `name`: its config name or its column header (VOC, ...), any case."""
    for dataset in {e.dataset for e in experiments} | set(DATASET_HEADERS):
        if name.lower() in (dataset.lower(), dataset_header(dataset).lower()):
            return dataset
    return name


# ----------------------------------------------------------------------------------------------------------------
# tables: columns of text, Stat (mean ± std (n)), paper values and differences; rendered as md, csv or latex

@dataclass(frozen=True)
class Paper:
    mean: float
    std: float | None


@dataclass(frozen=True)
class Diff:
    value: float
    marked: bool


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "text", "stat", "paper" or "diff"


@dataclass(frozen=True)
class Table:
    caption: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[object, ...], ...]  # str / Stat / Paper / Diff / None (no value) per column
    notes: tuple[str, ...]


def results_table(experiments: Sequence[Experiment], with_paper: bool) -> Table:
    """The paper's table: one row per loss (and settings), one column per dataset (+ paper and diff)."""
    datasets = sorted({e.dataset for e in experiments}, key=dataset_order)
    columns = [Column("loss", "text"), Column("method", "text")]
    for d in datasets:
        columns.append(Column(dataset_header(d), "stat"))
        if with_paper and d in DATASET_HEADERS:
            columns += [Column(f"{dataset_header(d)} paper", "paper"), Column(f"{dataset_header(d)} diff", "diff")]
    cells = {(e.label, e.dataset): e.test_map() for e in experiments}
    rows = []
    for exp in experiments:
        if rows and rows[-1][0] == exp.label:
            continue
        row: list[object] = [exp.label, PAPER_METHODS.get(exp.paper_key, "–")]
        for d in datasets:
            stat = cells.get((exp.label, d))
            row.append(stat)
            if with_paper and d in DATASET_HEADERS:
                paper = PAPER_VALUES.get(exp.paper_key, {}).get(d)
                row.append(Paper(*paper) if paper else None)
                row.append(None if stat is None or paper is None else difference(stat, *paper))
        rows.append(tuple(row))
    notes = (STD_NOTE, SETTINGS_NOTE) + ((PAPER_NOTE,) if with_paper else ())
    return Table("Test mAP (%) at the best-val epoch, mean ± std (n) over seeds", tuple(columns), tuple(rows), notes)


def difference(stat: Stat, paper_mean: float, paper_std: float | None) -> Diff:
    """Ours - paper, marked when larger (in size) than 2 x the paper's std (never without a std)."""
    value = stat.mean - paper_mean
    return Diff(value, paper_std is not None and abs(value) > 2 * paper_std)


def per_class_table(experiments: Sequence[Experiment], dataset: str) -> tuple[Table, list[str]]:
    """Per-class test AP of one dataset: one row per class (by name), one column per experiment, mean ± std (n)
    over seeds, and a last row with the mAP. The first run with per-class AP sets the number of classes, the
    first with class names the names; returns the table and one message per run left out (no per-class AP,
    another number of classes, other class names). Raises NothingFound if no run has per-class AP."""
    runs = [(exp, run, run.per_class_ap()) for exp in experiments if exp.dataset == dataset for run in exp.runs]
    skipped = [f"skipped {run.path}: no test_per_class_ap (per-class table)" for _, run, ap in runs if ap is None]
    runs = [(exp, run, ap) for exp, run, ap in runs if ap is not None]
    if not runs:
        raise NothingFound(f"--per-class {dataset}: no finished run of this dataset has test_per_class_ap")
    num_classes = len(runs[0][2])
    named = [run for _, run, ap in runs if len(ap) == num_classes and run.class_names(num_classes)[0] != "class 0"]
    names = named[0].class_names(num_classes) if named else [f"class {c}" for c in range(num_classes)]
    columns: dict[str, list[tuple[Run, list[float]]]] = {}
    for exp, run, ap in runs:
        if len(ap) != num_classes:
            skipped.append(f"skipped {run.path}: {len(ap)} classes, other {dataset} runs {num_classes} "
                           "(per-class table)")
        elif "class_names" in run.results and run.class_names(num_classes) != names:
            skipped.append(f"skipped {run.path}: other class names than {named[0].path} (per-class table)")
        else:
            columns.setdefault(exp.label, []).append((run, ap))
    rows = [tuple([name] + [Stat(tuple(ap[c] for _, ap in kept)) for kept in columns.values()])
            for c, name in enumerate(names)]
    rows.append(tuple(["mAP"] + [Stat(tuple(run.test_map for run, _ in kept)) for kept in columns.values()]))
    note = STD_NOTE.replace("test mAP (%)", "test AP (%) of each class (last row: mAP)")
    table = Table(f"{dataset_header(dataset)}: per-class test AP (%) at the best-val epoch, mean ± std (n) over seeds",
                  (Column("class", "text"), *(Column(label, "stat") for label in columns)), tuple(rows),
                  (note, SETTINGS_NOTE))
    return table, skipped


def _cell_text(cell: object, latex: bool) -> str:
    pm = r" $\pm$ " if latex else " ± "
    if cell is None:
        return "--" if latex else "–"
    if isinstance(cell, Stat):
        std = "" if cell.std is None else f"{pm}{cell.std:.2f}"
        return f"{cell.mean:.2f}{std} ({cell.n})"
    if isinstance(cell, Paper):  # as printed in the paper: 2 decimals with a std; without, Kim et al. 2022's 1
        if cell.std is not None:  # (or the 2 of the methods since 2022: 89.29)
            return f"{cell.mean:.2f}{pm}{cell.std:.2f}"
        return f"{cell.mean:.1f}" if round(cell.mean, 1) == cell.mean else f"{cell.mean:.2f}"
    if isinstance(cell, Diff):
        text = f"{cell.value:+.2f}"
        if cell.marked:
            return rf"\textbf{{{text}}}" if latex else f"**{text}**"
        return text
    return _latex_escape(str(cell)) if latex else str(cell)


def render_markdown(table: Table) -> str:
    align = ["---" if c.kind == "text" else "---:" for c in table.columns]
    lines = [table.caption, "", "| " + " | ".join(c.name for c in table.columns) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell_text(cell, False).replace("|", "\\|") for cell in row) + " |"
              for row in table.rows]
    return "\n".join(lines + [""] + list(table.notes)) + "\n"


def render_csv(table: Table) -> str:
    """Numbers in full precision, a mean/std/n column per Stat column (std empty for n = 1)."""
    expand = {"text": lambda n: [n], "stat": lambda n: [f"{n} mean", f"{n} std (ddof=1)", f"{n} n"],
              "paper": lambda n: [f"{n} mean", f"{n} std"], "diff": lambda n: [n, f"{n} beyond 2 paper std"]}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([name for c in table.columns for name in expand[c.kind](c.name)])
    for row in table.rows:
        fields: list[object] = []
        for col, cell in zip(table.columns, row):
            width = len(expand[col.kind](col.name))
            if cell is None:
                fields += [""] * width
            elif isinstance(cell, Stat):
                fields += [repr(cell.mean), "" if cell.std is None else repr(cell.std), cell.n]
            elif isinstance(cell, Paper):
                fields += [repr(cell.mean), "" if cell.std is None else repr(cell.std)]
            elif isinstance(cell, Diff):
                fields += [repr(cell.value), "yes" if cell.marked else "no"]
            else:
                fields.append(cell)
        writer.writerow(fields)
    return out.getvalue()


def _latex_escape(text: str) -> str:
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$", "×": r"$\times$", "–": "--"}
    return "".join(specials.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    """A tabular (no packages needed) and the notes as small paragraphs below it."""
    spec = "".join("l" if c.kind == "text" else "r" for c in table.columns)
    lines = [f"% {_latex_escape(table.caption)}", rf"\begin{{tabular}}{{{spec}}}", r"\hline",
             " & ".join(_latex_escape(c.name) for c in table.columns) + r" \\", r"\hline"]
    lines += [" & ".join(_cell_text(cell, True) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\hline", r"\end{tabular}"]
    lines += [rf"\par{{\footnotesize {_latex_escape(note)}}}" for note in table.notes]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex}


# ----------------------------------------------------------------------------------------------------------------
# predictions.npz: recompute the mAPs

def check_predictions(run: Run) -> tuple[bool | None, str]:
    """Recompute val and test mAP (and the per-class test AP) from the run's predictions.npz and compare them
    with results.json. Returns (True: they agree / False: they disagree, or the file is unreadable / None: no file,
    an older run) and a message naming the file."""
    name = run.results.get("predictions", "predictions.npz")
    path = run.folder / (name if isinstance(name, str) else "predictions.npz")
    if not path.is_file():
        if "predictions" in run.results:
            return False, f"{run.folder}: results.json names {path.name} but the file is missing"
        return None, f"{run.folder}: no predictions.npz (an older run), not checked"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return False, f"{path}: cannot read it ({one_line(exc)})"
    problems, found = [], []
    missing = [k for p in ("val", "test") for k in (f"{p}_scores", f"{p}_labels", f"{p}_rows") if k not in arrays]
    if missing or "epoch" not in arrays:
        return False, f"{path}: arrays missing: {', '.join(missing + ([] if 'epoch' in arrays else ['epoch']))}"
    epoch = arrays["epoch"]
    if epoch.size != 1 or epoch.dtype.kind not in "iu" or int(epoch.reshape(())) != run.results.get("best_epoch"):
        problems.append(f"epoch {arrays['epoch'].tolist()} != best_epoch {run.results.get('best_epoch')}")
    for phase in ("val", "test"):
        scores, labels, rows = (arrays[f"{phase}_{k}"] for k in ("scores", "labels", "rows"))
        if scores.ndim != 2 or scores.shape != labels.shape or rows.shape != (len(scores),):
            problems.append(f"{phase} shapes scores {scores.shape}, labels {labels.shape}, rows {rows.shape} "
                            "do not fit together")
            continue
        try:
            ap = 100 * per_class_ap(scores, labels)
        except ValueError as exc:  # NaN scores, ...
            problems.append(f"{phase}: cannot compute the AP ({one_line(exc)})")
            continue
        recomputed, recorded = float(ap.mean()), run.results.get(f"{phase}_map")
        found.append(f"{phase} mAP {recomputed:.6f}")
        if not _is_number(recorded) or abs(recomputed - recorded) > PREDICTION_TOLERANCE:
            by = f" (difference {recomputed - recorded:+.6f})" if _is_number(recorded) else ""
            problems.append(f"{phase} mAP from predictions.npz {recomputed:.6f} != results.json {phase}_map "
                            f"{recorded!r}{by}")
        if phase == "test" and run.per_class_ap() is not None:
            recorded_ap = np.asarray(run.per_class_ap())
            if recorded_ap.shape != ap.shape or np.abs(recorded_ap - ap).max() > PREDICTION_TOLERANCE:
                problems.append("per-class test AP from predictions.npz differs from results.json's test_per_class_ap")
    if problems:
        return False, f"{path}: DISAGREES with results.json: " + "; ".join(problems)
    return True, f"{path}: agrees with results.json ({', '.join(found)}, epoch {run.results.get('best_epoch')})"


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas, PNG)

def _figure(width: float, height: float) -> Figure:
    """A figure on matplotlib's Agg canvas (no pyplot, no global backend switch); saved with a tight bounding box,
    which keeps rotated labels and legends below the axes inside the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _epoch_series(run: Run, *keys: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of results["epochs"][e][keys...] where it is a number."""
    epochs = run.results.get("epochs")
    xs, ys = [], []
    for name, record in sorted(epochs.items() if isinstance(epochs, dict) else [],
                               key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if str(name).isdigit() and _is_number(value):
            xs.append(int(name))
            ys.append(float(value))
    return xs, ys


def plot_run(run: Run) -> Figure:
    """val/test mAP and training loss by epoch, best epoch marked; pseudo-label / corrected-label counts."""
    counts = [(k, label) for k, label in (("apl_new_pseudo_labels", "APL: new pseudo-labels this epoch"),
                                          ("apl_total_pseudo_labels", "APL: pseudo-labels in all"),
                                          ("corrected_labels", "LL-Cp: labels corrected this epoch"))
              if _epoch_series(run, k)[0]]
    panels = 3 if counts else 2
    fig = _figure(8, 3.2 * panels)
    axes = fig.subplots(panels, 1, sharex=True)
    best = run.results.get("best_epoch")
    fig.suptitle(f"{run.folder.name}\n{dataset_header(run.dataset)} ({run.dataset}), loss {run.loss}, seed {run.seed}: "
                 f"test mAP {run.test_map:.2f} % at best epoch {best}", fontsize=10)
    ax = axes[0]
    for keys, label, style in ((("val", "map_clean"), "val mAP (early stopping)", "o-"),
                               (("test", "map_clean"), "test mAP (epochs that improved val)", "s--")):
        ax.plot(*_epoch_series(run, *keys), style, label=label)
    ax.set_ylabel("mAP (%)")
    ax.set_title("validation and test mAP by epoch")
    axes[1].plot(*_epoch_series(run, "train", "loss"), "o-", color="tab:red", label="training loss")
    axes[1].set_ylabel("training loss (unitless)")
    axes[1].set_title("training loss by epoch (mean over the epoch)")
    if counts:
        for key, label in counts:
            axes[2].plot(*_epoch_series(run, key), "o-", label=label)
        axes[2].set_ylabel("labels (count)")
        axes[2].set_title("labels corrected by LL-Cp by epoch" if counts[0][0] == "corrected_labels"
                          else "APL pseudo-labels by epoch")
    for ax in axes:
        if _is_number(best):
            ax.axvline(best, color="gray", linestyle=":", label=f"best epoch ({best})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("epoch")
    fig.subplots_adjust(hspace=0.45, top=1 - 0.95 / fig.get_figheight())  # room for the two-line title
    return fig


def plot_dataset(experiments: Sequence[Experiment], dataset: str) -> Figure:
    """Each experiment's test mAP (mean, sample-std error bars, n) beside the paper's value (± its std)."""
    exps = [e for e in experiments if e.dataset == dataset]
    fig = _figure(max(6.0, 1.1 * len(exps) + 2), 5)
    ax = fig.subplots()
    x = np.arange(len(exps))
    stats = [e.test_map() for e in exps]
    ours = ax.bar(x - 0.2, [s.mean for s in stats], 0.4, yerr=[np.nan if s.std is None else s.std for s in stats],
                  capsize=4,
                  label="ours: mean ± sample std (ddof=1) over seeds; n above the bar")
    for rect, stat in zip(ours, stats):
        ax.annotate(f"n={stat.n}", (rect.get_x() + rect.get_width() / 2, stat.mean + (stat.std or 0)),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    papers = [PAPER_VALUES.get(e.paper_key, {}).get(dataset) for e in exps]
    if any(papers):
        px = [xi + 0.2 for xi, p in zip(x, papers) if p]
        ax.bar(px, [p[0] for p in papers if p], 0.4, yerr=[np.nan if p[1] is None else p[1] for p in papers if p],
               capsize=4, color="tab:gray",
               label="paper: Zhou et al. 2022 ± std (LL, BoostLU, GR-Loss, VLPL rows: their own, no std)")
    ax.set_xticks(x)
    ax.set_xticklabels([e.label for e in exps], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("loss (settings)")
    ax.set_ylabel("test mAP (%) at the best-val epoch")
    ax.set_title(f"{dataset_header(dataset)} ({dataset}): test mAP by loss")
    tops = [s.mean + (s.std or 0) for s in stats] + [p[0] + (p[1] or 0) for p in papers if p]
    ax.set_ylim(0, 1.3 * max(tops))  # room above the bars for the legend, inside the axes
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_compare(run_a: Run, run_b: Run) -> Figure:
    """Per-class test AP of two runs side by side, classes sorted by run A's AP (descending)."""
    ap_a, ap_b = np.asarray(run_a.per_class_ap()), np.asarray(run_b.per_class_ap())
    order = np.argsort(-ap_a, kind="stable")
    names = run_a.class_names(len(ap_a))
    fig = _figure(min(30.0, max(8.0, 0.3 * len(order) + 2)), 5)
    ax = fig.subplots()
    x = np.arange(len(order))
    for ap, run, shift in ((ap_a, run_a, -0.2), (ap_b, run_b, 0.2)):
        ax.bar(x + shift, ap[order], 0.4, label=f"{run.folder.name} ({run.loss}, seed {run.seed}): "
                                                 f"mAP {run.test_map:.2f}")
    if len(order) <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels([names[i] for i in order], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("class, sorted by the first run's test AP" + ("" if len(order) <= 60 else f" ({len(order)} classes)"))
    ax.set_ylabel("test AP (%) at the best-val epoch")
    ax.set_title(f"{dataset_header(run_a.dataset)}: per-class test AP, {run_a.loss} vs {run_b.loss}")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def load_compared(path: str) -> Run:
    """A run named by --compare (its folder or its results.json), finished and with per-class AP."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise UsageError(f"--compare {path}: no results.json there; give a run folder")
    try:
        run = load_run(p)
    except Skip as exc:
        raise UsageError(f"--compare {path}: {exc}") from exc
    if run.per_class_ap() is None:
        raise UsageError(f"--compare {path}: results.json has no test_per_class_ap")
    return run


def planned_plots(runs: Sequence[Run], experiments: Sequence[Experiment]) -> list[tuple[str, Callable[[], Figure]]]:
    """(file name, thunk making its figure) of every plot of a results folder: per run and per dataset."""
    plots, used = [], set()
    for run in runs:
        name = f"run_{_file_name(run.folder.name)}"
        while name in used:
            name += "_"
        used.add(name)
        plots.append((f"{name}.png", lambda run=run: plot_run(run)))
    for dataset in sorted({e.dataset for e in experiments}, key=dataset_order):
        plots.append((f"dataset_{_file_name(dataset)}.png", lambda d=dataset: plot_dataset(experiments, d)))
    return plots


def check_plot_folder(folder: Path, names: Sequence[str], force: bool) -> None:
    """Refuse (UsageError) a --plots folder that is a file, or that holds any of `names` unless `force`."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--plots {folder}: a file is in the way; name a folder")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not force:
        raise UsageError(f"--plots {folder}: {existing[0]} (and {len(existing) - 1} more) exist; add --force to "
                         "replace them or choose another folder")


def write_plots(folder: Path, plots: Sequence[tuple[str, Callable[[], Figure]]]) -> list[Path]:
    """Write each plot as a PNG, atomically (fileio.write_atomic). A plot whose data matplotlib cannot draw (a
    results.json with odd values) is named on stderr and left out; the others are still written."""
    written = []
    for name, make in plots:
        try:
            fig = make()
            written.append(write_atomic(folder / name,
                                        lambda tmp, fig=fig: fig.savefig(tmp, format="png", bbox_inches="tight")))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            print(f"skipped plot {folder / name}: cannot draw it ({type(exc).__name__}: {one_line(exc)})",
                  file=sys.stderr)
    return written


# ----------------------------------------------------------------------------------------------------------------
# command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        print(f"error: {message} (python report.py -h for help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(description="The paper's table (mean ± sample std over seeds of the test mAP at the best-val "
                            "epoch) and plots from the results.json of finished runs.",
                epilog="Exit codes: 0 table written, 1 no finished run found, 2 bad usage, 3 --check found a "
                       "disagreement. Skipped files are named on stderr, one line each.")
    p.add_argument("results", nargs="*", default=["results"],
                   help="folders holding run folders, searched recursively (default: results)")
    p.add_argument("--format", choices=sorted(RENDERERS), help="table format (default: md, markdown)")
    p.add_argument("--out", metavar="FILE", help="write the table to FILE (atomically) instead of stdout")
    p.add_argument("--force", action="store_true", help="let --out and --plots replace existing files")
    p.add_argument("--paper", action="store_true", help="add the paper's values and the differences")
    p.add_argument("--per-class", metavar="DATASET", help="per-class test AP of one dataset (pascal or VOC, ...) "
                                                          "instead of the mAP table")
    p.add_argument("--check", action="store_true",
                   help="recompute val/test mAP from each run's predictions.npz and compare with results.json "
                        "(exit code 3 on a disagreement)")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots: per run (mAP, loss, pseudo-labels by epoch) "
                                                  "and per dataset (test mAP by loss beside the paper's)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="with --plots: only plot the per-class test AP of two run folders side by side (sorted)")
    args = p.parse_args(argv)
    if args.compare and not args.plots:
        p.error("--compare draws a plot: add --plots DIR")
    table_options = {"results folders": args.results != ["results"], "--format": args.format, "--out": args.out,
                     "--paper": args.paper, "--per-class": args.per_class, "--check": args.check}
    if args.compare and any(table_options.values()):
        p.error(f"--compare draws only the comparison plot: drop {', '.join(k for k, v in table_options.items() if v)}")
    args.format = args.format or "md"
    if args.paper and args.per_class:
        p.error("--paper has no per-class values: use it without --per-class")
    return args


def compare_runs(path_a: str, path_b: str, folder: Path, force: bool) -> int:
    """--compare: only the plot of the two runs' per-class test AP (no table, no other plots)."""
    a, b = load_compared(path_a), load_compared(path_b)
    if len(a.per_class_ap()) != len(b.per_class_ap()):
        raise UsageError(f"--compare: the runs have {len(a.per_class_ap())} and {len(b.per_class_ap())} classes; "
                         "compare runs of one dataset")
    name = f"compare_{_file_name(a.folder.name)}__{_file_name(b.folder.name)}.png"
    check_plot_folder(folder, [name], force)
    print(f"wrote {write_plots(folder, [(name, lambda: plot_compare(a, b))])[0]}", file=sys.stderr)
    return 0


def _emit(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(out, write)
    print(f"wrote {out}", file=sys.stderr)


def report(args: argparse.Namespace) -> int:
    """Everything main() does; UsageError, NothingFound and OutputError are left to main()."""
    if args.out and Path(args.out).exists() and not args.force:
        raise UsageError(f"--out {args.out} exists; add --force to replace it or choose another file")
    if args.compare:
        return compare_runs(*args.compare, Path(args.plots), args.force)
    roots = [Path(r) for r in args.results]
    runs, skipped = collect_runs(roots)
    for line in skipped:
        print(line, file=sys.stderr)
    if not runs:
        raise NothingFound(f"no finished run found under {', '.join(map(str, roots))} ({len(skipped)} "
                           "results.json skipped, see above); run main.py first or name the folders that hold "
                           "the run folders")
    experiments = group_runs(runs)
    for line in data_notes(runs):
        print(line, file=sys.stderr)
    plots = planned_plots(runs, experiments) if args.plots else []
    if args.plots:
        check_plot_folder(Path(args.plots), [name for name, _ in plots], args.force)
    failed = 0
    if args.check:
        for run in runs:
            ok, message = check_predictions(run)
            print({True: "check ok: ", None: "check not done: ", False: "check FAILED: "}[ok] + message,
                  file=sys.stderr)
            failed += ok is False
    if args.per_class:
        dataset = find_dataset(args.per_class, experiments)
        if dataset not in {e.dataset for e in experiments}:
            raise NothingFound(f"--per-class {args.per_class}: no finished run of that dataset (datasets with runs: "
                               f"{', '.join(sorted({e.dataset for e in experiments}, key=dataset_order))})")
        table, left_out = per_class_table(experiments, dataset)
        for line in left_out:
            print(line, file=sys.stderr)
    else:
        table = results_table(experiments, args.paper)
    _emit(RENDERERS[args.format](table), args.out)
    if args.plots:
        written = write_plots(Path(args.plots), plots)
        print(f"wrote {len(written)} plots to {args.plots}", file=sys.stderr)
    if failed:
        print(f"error: {failed} run(s) disagree with their predictions.npz (check FAILED above)", file=sys.stderr)
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return report(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NothingFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OutputError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
