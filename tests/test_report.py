"""report.py: the paper's table, per-class table, formats, plots and the predictions check, on fake run folders
whose numbers are chosen so that every expected cell can be computed by hand."""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.metrics import average_precision_score

import report
from config import build_config
from metrics import compute_map

README = Path(__file__).resolve().parents[1] / "README.md"


def write_run(root: Path, dataset: str = "pascal", loss: str = "EM_APL", seed: int = 0, test_map: float = 80.0, *,
              stamp: str = "20240101-000000", status: str = "finished", per_class: list[float] | None = None,
              class_names: list[str] | None = None, extra: dict | None = None, config: dict | None = None,
              **settings) -> Path:
    """A run folder as main.py names it, with a results.json as train.fit writes it (the keys report.py reads)."""
    cfg = config if config is not None else build_config(dataset, loss=loss, pytorch_seed=seed, **settings).to_dict()
    base = root / f"{cfg['dataset']}_{cfg['loss']}_s{cfg['pytorch_seed']}_{stamp}"
    folder = next(f for f in (Path(f"{base}_{n}") if n else base for n in range(100)) if not f.exists())
    folder.mkdir(parents=True)  # a suffix _1, _2, ... as main.py adds rather than reuse a folder
    results = {"config": cfg, "status": status, "epochs": {
        "1": {"train": {"loss": 0.7}, "val": {"map_clean": test_map - 2}, "test": {"map_clean": test_map - 1}},
        "2": {"train": {"loss": 0.5}, "val": {"map_clean": test_map + 1}, "test": {"map_clean": test_map},
              "apl_new_pseudo_labels": 12, "apl_total_pseudo_labels": 12},
        "3": {"train": {"loss": 0.4}, "val": {"map_clean": test_map}, "apl_new_pseudo_labels": 6,
              "apl_total_pseudo_labels": 18}}}
    if status == "finished":
        results.update(best_epoch=2, val_map=test_map + 1, test_map=test_map,
                       test_per_class_ap=per_class if per_class is not None else [test_map] * 3)
    else:
        results["error"] = "FloatingPointError: NaN loss at epoch 2, batch 7"
    if class_names is not None:
        results["class_names"] = class_names
    results.update(extra or {})
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def run_report(capsys, *argv: object) -> tuple[int, str, str]:
    """report.main's exit code (returned, or raised by argparse), stdout and stderr."""
    try:
        code = report.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def update_results(folder: Path, **values) -> None:
    results = json.loads((folder / "results.json").read_text())
    results.update(values)
    (folder / "results.json").write_text(json.dumps(results))


def md_rows(out: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the markdown table's body rows."""
    rows = [line.strip("|").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def md_header(out: str) -> list[str]:
    return [c.strip() for c in next(l for l in out.splitlines() if l.startswith("| ")).strip("|").split(" | ")]


# ----------------------------------------------------------------------------------------------------------------
# the table

def test_mean_and_sample_std_over_seeds_by_hand(tmp_path, capsys):
    for seed, value in ((0, 80.0), (1, 82.0), (8, 84.0)):
        write_run(tmp_path, "pascal", "EM_APL", seed, value)
    write_run(tmp_path, "coco", "EM_APL", 0, 70.0)
    for seed, value in ((0, 80.0), (1, 81.0)):  # mean 80.5, sample std sqrt(0.5) = 0.7071
        write_run(tmp_path, "pascal", "an", seed, value)
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0 and err == ""
    assert md_header(out) == ["loss", "method", "VOC", "COCO"]
    rows = md_rows(out)
    assert rows["EM_APL"] == ["EM loss + APL", "82.00 ± 2.00 (3)", "70.00 (1)"]  # n = 1: no std
    assert rows["an"] == ["AN loss", "80.50 ± 0.71 (2)", "–"]
    assert list(rows) == ["an", "EM_APL"]  # the paper's order
    assert "sample standard deviation (ddof=1)" in out and "n = 1 has no std" in out


def test_stat_is_the_sample_std():
    stat = report.Stat((80.0, 82.0, 84.0))
    assert (stat.n, stat.mean, stat.std) == (3, 82.0, 2.0)  # sqrt(((-2)² + 0 + 2²) / (3 - 1))
    assert report.Stat((5.0,)).std is None


def test_rows_and_columns_in_the_papers_order_then_the_others(tmp_path, capsys):
    write_run(tmp_path, "demo", "EM", 0, 50.0)
    write_run(tmp_path, "cub", "bce", 0, 30.0)
    write_run(tmp_path, "pascal", "ll_cp", 0, 88.0)
    mine = dict(build_config("pascal", loss="an").to_dict(), dataset="mine", loss="my_loss")
    write_run(tmp_path, config=mine, test_map=40.0)
    code, out, _ = run_report(capsys, tmp_path)
    assert code == 0
    assert md_header(out) == ["loss", "method", "VOC", "CUB", "demo", "mine"]
    assert list(md_rows(out)) == ["bce", "ll_cp", "EM", "my_loss"]
    assert md_rows(out)["my_loss"] == ["–", "–", "–", "–", "40.00 (1)"]


def test_mixed_configs_are_never_pooled_and_are_labelled(tmp_path, capsys):
    write_run(tmp_path, "pascal", "EM_APL", 0, 80.0, stamp="20240101-000001")
    write_run(tmp_path, "pascal", "EM_APL", 1, 82.0, stamp="20240101-000002")
    write_run(tmp_path, "pascal", "EM_APL", 0, 60.0, stamp="20240101-000003", lr=1e-4)
    write_run(tmp_path, "pascal", "EM_APL", 1, 64.0, stamp="20240101-000004", lr=1e-4)
    write_run(tmp_path, "coco", "EM_APL", 0, 70.0)  # the dataset's defaults: the plain row
    # a dataset config.py does not know, with a setting it does not know either: only the difference labels
    base = dict(build_config("pascal", loss="EM").to_dict(), dataset="mine")
    write_run(tmp_path, config=dict(base, features="a"), test_map=50.0, stamp="20240101-000005")
    write_run(tmp_path, config=dict(base, features="b"), test_map=52.0, stamp="20240101-000006")
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0 and err == ""
    rows = md_rows(out)
    assert rows["EM_APL"] == ["EM loss + APL", "81.00 ± 1.41 (2)", "70.00 (1)", "–"]  # sqrt(2) = 1.414
    assert rows["EM_APL (lr=0.0001)"] == ["EM loss + APL", "62.00 ± 2.83 (2)", "–", "–"]  # sqrt(8) = 2.828
    assert rows["EM (features=a)"][-1] == "50.00 (1)" and rows["EM (features=b)"][-1] == "52.00 (1)"


def test_an_older_run_without_a_newer_setting_counts_at_its_default(tmp_path, capsys):
    """A config key missing in an older run (a setting added later) counts at its default, which is what the
    older version did: pooled with a run at the default, never with one at another value."""
    new = build_config("pascal", loss="EM").to_dict()
    old = {k: v for k, v in new.items() if k != "cudnn_benchmark"}
    write_run(tmp_path, config=dict(old, pytorch_seed=0), test_map=80.0)
    write_run(tmp_path, config=dict(new, pytorch_seed=1), test_map=90.0)
    write_run(tmp_path, config=dict(new, pytorch_seed=2, cudnn_benchmark=True), test_map=70.0)
    code, out, _ = run_report(capsys, tmp_path)
    assert code == 0
    assert md_rows(out) == {"EM": ["EM loss", "85.00 ± 7.07 (2)"],
                            "EM (cudnn_benchmark=True)": ["EM loss", "70.00 (1)"]}


def test_settings_that_cannot_change_a_number_are_pooled(tmp_path, capsys):
    write_run(tmp_path, "pascal", "EM", 0, 80.0, gpu="cpu", image_cache="ram")
    write_run(tmp_path, "pascal", "EM", 1, 84.0, results_dir="elsewhere", data_root="/data")
    write_run(tmp_path, "pascal", "EM", 8, 88.0, focal_gamma=2, stamp="20240101-000001")  # int 2 == the default
    code, out, _ = run_report(capsys, tmp_path)
    assert code == 0
    assert md_rows(out) == {"EM": ["EM loss", "84.00 ± 4.00 (3)"]}


def test_same_config_and_seed_keeps_the_later_run_and_says_so(tmp_path, capsys):
    old = write_run(tmp_path, "pascal", "EM", 0, 80.0, stamp="20240101-000000")
    new = write_run(tmp_path, "pascal", "EM", 0, 90.0, stamp="20240102-000000", gpu="cpu")  # gpu: neutral
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0
    assert md_rows(out)["EM"] == ["EM loss", "90.00 (1)"]
    assert err.splitlines() == [f"skipped {(old / 'results.json').resolve()}: same config, data and seed (0) as "
                                f"{(new / 'results.json').resolve()}, which is later and is kept"]


def test_bad_files_are_skipped_with_one_line_each(tmp_path, capsys):
    write_run(tmp_path, "pascal", "EM", 0, 80.0)
    failed = write_run(tmp_path, "pascal", "EM", 1, 0.0, status="failed")
    running = write_run(tmp_path, "pascal", "EM", 2, 0.0, status="running")
    half = write_run(tmp_path, "pascal", "EM", 3, 99.0)
    text = (half / "results.json").read_text()
    (half / "results.json").write_text(text[: len(text) // 2])
    foreign = tmp_path / "other_tool" / "results.json"
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"accuracy": 0.9, "status": "finished"}))
    listing = tmp_path / "list" / "results.json"
    listing.parent.mkdir()
    listing.write_text("[1, 2, 3]")
    nan = write_run(tmp_path, "pascal", "EM", 4, 0.0, extra={"test_map": math.nan})
    code, out, err = run_report(capsys, tmp_path)
    assert code == 0
    assert md_rows(out) == {"EM": ["EM loss", "80.00 (1)"]}
    lines = sorted(err.splitlines())
    assert len(lines) == 6 and all(line.startswith("skipped ") for line in lines)
    reasons = {Path(line.split(": ", 1)[0][len("skipped "):]).parent.name: line.split(": ", 1)[1] for line in lines}
    assert reasons[failed.name] == ("run not finished (status 'failed': FloatingPointError: NaN loss at epoch 2, "
                                    "batch 7)")
    assert reasons[running.name].startswith("run not finished (status 'running'")
    assert reasons[half.name].startswith("not valid JSON, half-written or damaged (")
    assert reasons["other_tool"] == "not a results.json of main.py (no 'config' object)"
    assert reasons["list"] == "not a results.json of main.py (no 'config' object)"
    assert reasons[nan.name] == "finished, but test_map is not a finite number (nan)"


def test_no_finished_run_exits_1_with_a_message(tmp_path, capsys):
    write_run(tmp_path, "pascal", "EM", 0, 0.0, status="failed")
    code, out, err = run_report(capsys, tmp_path)
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith(f"error: no finished run found under {tmp_path} (1 results.json skipped")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_report(capsys, empty)[0] == 1


@pytest.mark.parametrize("argv, message", [
    (["--format", "html"], "argument --format: invalid choice: 'html'"),
    (["--compare", "a", "b"], "--compare draws a plot: add --plots DIR"),
    (["--paper", "--per-class", "pascal"], "--paper has no per-class values"),
    (["missing_folder"], "results folder missing_folder does not exist"),
])
def test_bad_usage_exits_2_with_one_error_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_report(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


# ----------------------------------------------------------------------------------------------------------------
# --paper

def test_paper_values_differences_and_marks(tmp_path, capsys):
    for seed, value in ((0, 87.0), (1, 89.0)):  # mean 88.00; paper 89.19 ± 0.31: -1.19, beyond 0.62: marked
        write_run(tmp_path, "pascal", "EM_APL", seed, value)
    write_run(tmp_path, "pascal", "EM", 0, 89.0)  # paper 89.09 ± 0.17: -0.09, within 0.34
    write_run(tmp_path, "pascal", "ll_r", 0, 80.0)  # paper 89.2 without std: -9.20, never marked
    write_run(tmp_path, "pascal", "an", 0, 86.66)  # paper 85.89 ± 0.38: +0.77 > 0.76: marked
    write_run(tmp_path, "demo", "EM", 0, 50.0)  # no paper value for the demo: no paper columns
    code, out, _ = run_report(capsys, tmp_path, "--paper")
    assert code == 0
    assert md_header(out) == ["loss", "method", "VOC", "VOC paper", "VOC diff", "demo"]
    rows = md_rows(out)
    assert rows["EM_APL"] == ["EM loss + APL", "88.00 ± 1.41 (2)", "89.19 ± 0.31", "**-1.19**", "–"]
    assert rows["EM"] == ["EM loss", "89.00 (1)", "89.09 ± 0.17", "-0.09", "50.00 (1)"]
    assert rows["ll_r"] == ["LL-R (Kim et al. 2022)", "80.00 (1)", "89.2", "-9.20", "–"]
    assert rows["an"] == ["AN loss", "86.66 (1)", "85.89 ± 0.38", "**+0.77**", "–"]
    assert "larger than 2 × the paper's std" in out


def test_rows_since_2021_report_like_the_others(tmp_path, capsys):
    for seed, value in ((0, 88.0), (1, 90.0)):  # mean 89.00, std 1.41; VLPL's own 89.10 (no std): -0.10, never marked
        write_run(tmp_path, "pascal", "EM_PL", seed, value, pseudo_scores="scores.npy")
    for loss in ("hill", "splc", "epr"):  # no paper value: after the paper's rows, by name
        write_run(tmp_path, "pascal", loss, 0, 85.0)
    code, out, _ = run_report(capsys, tmp_path, "--paper")
    assert code == 0
    rows = md_rows(out)
    assert rows["EM_PL"] == ["EM + CLIP pseudo-labels (VLPL, Xing et al. 2024)", "89.00 ± 1.41 (2)", "89.1", "-0.10"]
    assert list(rows) == ["EM_PL", "epr", "hill", "splc"] and rows["hill"][1:] == ["85.00 (1)", "–", "–"]


def test_paper_constant_matches_the_readme_table():
    """Every value of report.PAPER_TABLE, row by row, against README's "The paper's table"."""
    text = README.read_text()
    section = text[text.index("### The paper's table"):]
    lines = [l for l in section.splitlines()[1:] if l.startswith("| ")][1:]
    lines = lines[: next(i for i, l in enumerate(lines) if not l.startswith("| 1 P.") and not l.startswith("| All"))]
    assert len(lines) == len(report.PAPER_TABLE) == 23
    for line, (key, _, values) in zip(lines, report.PAPER_TABLE):
        cells = [c.strip().replace("*", "") for c in line.strip("|").split("|")]
        command = cells[7]
        loss, _, head = key.partition("+")  # "ll_r+boostlu": -l ll_r --head boostlu
        assert f"-l {loss} " in command or command.startswith("–")
        assert (f"--head {head} " in command) == bool(head)
        for dataset, cell in zip(("pascal", "coco", "nuswide", "cub"), cells[2:6]):
            mean, _, std = cell.partition("±")
            assert values[dataset] == (float(mean), float(std) if std else None), (loss, dataset)


# ----------------------------------------------------------------------------------------------------------------
# --per-class, formats, --out

def test_per_class_table_with_class_names(tmp_path, capsys):
    names = ["aeroplane", "bicycle", "bird"]
    write_run(tmp_path, "pascal", "EM", 0, 70.0, per_class=[50.0, 70.0, 90.0], class_names=names)
    write_run(tmp_path, "pascal", "EM", 1, 77.0, per_class=[60.0, 70.0, 100.0], class_names=names)
    write_run(tmp_path, "pascal", "an", 0, 40.0, per_class=[30.0, 40.0, 50.0])  # an older run: no names
    write_run(tmp_path, "pascal", "an", 1, 40.0, per_class=[1.0, 2.0], stamp="20240101-000001")  # 2 classes
    write_run(tmp_path, "coco", "EM", 0, 10.0, per_class=[10.0] * 5)  # another dataset: not in the table
    code, out, err = run_report(capsys, tmp_path, "--per-class", "VOC")
    assert code == 0
    assert md_header(out) == ["class", "an", "EM"]
    assert md_rows(out) == {
        "aeroplane": ["30.00 (1)", "55.00 ± 7.07 (2)"],  # 50, 60: sqrt(50) = 7.071
        "bicycle": ["40.00 (1)", "70.00 ± 0.00 (2)"],
        "bird": ["50.00 (1)", "95.00 ± 7.07 (2)"],
        "mAP": ["40.00 (1)", "73.50 ± 4.95 (2)"]}  # 70, 77: sqrt(24.5) = 4.950
    assert len(err.splitlines()) == 1 and "2 classes, other pascal runs 3 (per-class table)" in err
    code, _, err = run_report(capsys, tmp_path, "--per-class", "cub")
    assert code == 1
    assert "error: --per-class cub: no finished run of that dataset (datasets with runs: pascal, coco)" in err


def test_class_names_default_to_class_numbers(tmp_path, capsys):
    write_run(tmp_path, "pascal", "EM", 0, 20.0, per_class=[10.0, 30.0])
    code, out, _ = run_report(capsys, tmp_path, "--per-class", "pascal", "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [["class", "EM mean", "EM std (ddof=1)", "EM n"],
                    ["class 0", "10.0", "", "1"], ["class 1", "30.0", "", "1"], ["mAP", "20.0", "", "1"]]


def test_csv_parses_with_numbers(tmp_path, capsys):
    for seed, value in ((0, 80.0), (1, 82.0), (8, 84.0)):
        write_run(tmp_path, "pascal", "EM_APL", seed, value, stamp=f"20240101-00000{seed}")
    write_run(tmp_path, "pascal", "EM_APL", 0, 60.0, lr=1e-4)
    code, out, _ = run_report(capsys, tmp_path, "--format", "csv", "--paper")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["loss"] for r in rows] == ["EM_APL", "EM_APL (lr=0.0001)"]
    first = rows[0]
    assert (float(first["VOC mean"]), float(first["VOC std (ddof=1)"]), int(first["VOC n"])) == (82.0, 2.0, 3)
    assert (float(first["VOC paper mean"]), float(first["VOC paper std"])) == (89.19, 0.31)
    assert float(first["VOC diff"]) == pytest.approx(82.0 - 89.19) and first["VOC diff beyond 2 paper std"] == "yes"
    assert rows[1]["VOC std (ddof=1)"] == "" and rows[1]["VOC n"] == "1"


def test_latex_parses(tmp_path, capsys):
    for seed, value in ((0, 80.0), (1, 82.0), (8, 84.0)):
        write_run(tmp_path, "pascal", "EM_APL", seed, value, stamp=f"20240101-00000{seed}")
    write_run(tmp_path, "cub", "an", 0, 18.0)
    code, out, _ = run_report(capsys, tmp_path, "--format", "latex", "--paper")
    assert code == 0
    assert r"\begin{tabular}{llrrrrrr}" in out and r"\end{tabular}" in out
    body = out[out.index(r"\begin{tabular}"):out.index(r"\end{tabular}")]
    rows = [line[: -len(r" \\")].split(" & ") for line in body.splitlines() if line.endswith(r" \\")]
    assert all(len(r) == 8 for r in rows)
    assert rows[0] == ["loss", "method", "VOC", "VOC paper", "VOC diff", "CUB", "CUB paper", "CUB diff"]
    assert rows[1] == ["an", "AN loss", "--", r"85.89 $\pm$ 0.38", "--", "18.00 (1)", r"18.31 $\pm$ 0.47", "-0.31"]
    assert rows[2] == [r"EM\_APL", "EM loss + APL", r"82.00 $\pm$ 2.00 (3)", r"89.19 $\pm$ 0.31", r"\textbf{-7.19}",
                       "--", r"21.84 $\pm$ 0.34", "--"]
    assert "sample standard deviation (ddof=1)" in out


def test_out_is_written_and_never_silently_replaced(tmp_path, capsys):
    write_run(tmp_path / "results", "pascal", "EM", 0, 80.0)
    target = tmp_path / "table.md"
    code, out, err = run_report(capsys, tmp_path / "results", "--out", target)
    assert code == 0 and out == "" and md_rows(target.read_text()) == {"EM": ["EM loss", "80.00 (1)"]}
    target.write_text("my notes")
    code, _, err = run_report(capsys, tmp_path / "results", "--out", target, "--format", "csv")
    assert code == 2 and target.read_text() == "my notes"
    assert err == f"error: --out {target} exists; add --force to replace it or choose another file\n"
    code, _, _ = run_report(capsys, tmp_path / "results", "--out", target, "--format", "csv", "--force")
    assert code == 0 and target.read_text().startswith("loss,method,VOC mean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "table.md"]  # no temporary left


# ----------------------------------------------------------------------------------------------------------------
# plots

def assert_png(path: Path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, path
    assert image[..., :3].std() > 0.05, path  # not a blank canvas


def test_plots_per_run_and_per_dataset(tmp_path, capsys):
    results = tmp_path / "results"
    run = write_run(results, "pascal", "EM_APL", 0, 80.0)
    write_run(results, "pascal", "EM", 0, 0.0, status="failed")  # not plotted
    plots = tmp_path / "plots"
    code, out, err = run_report(capsys, results, "--plots", plots)
    assert code == 0 and md_rows(out)  # the table is printed too
    assert sorted(p.name for p in plots.iterdir()) == ["dataset_pascal.png", f"run_{run.name}.png"]
    for path in plots.iterdir():
        assert_png(path)
    assert err.splitlines()[-1] == f"wrote 2 plots to {plots}"
    # a second time: refused before anything is drawn or replaced, unless --force
    (plots / "dataset_pascal.png").write_bytes(b"a user's file")
    code, out, err = run_report(capsys, results, "--plots", plots)
    assert code == 2 and out == "" and (plots / "dataset_pascal.png").read_bytes() == b"a user's file"
    assert err.splitlines()[-1] == (f"error: --plots {plots}: run_{run.name}.png (and 1 more) exist; add --force to "
                                    "replace them or choose another folder")


def test_compare_plot_of_two_runs(tmp_path, capsys):
    a = write_run(tmp_path, "pascal", "EM_APL", 0, 80.0, per_class=[20.0, 90.0, 50.0],
                  class_names=["cat", "dog", "bird"])
    b = write_run(tmp_path, "pascal", "an", 0, 70.0, per_class=[30.0, 60.0, 40.0])
    plots = tmp_path / "plots"
    code, out, err = run_report(capsys, "--plots", plots, "--compare", a, b)
    assert code == 0 and out == ""
    target = plots / f"compare_{a.name}__{b.name}.png"
    assert [p.name for p in plots.iterdir()] == [target.name] and err == f"wrote {target}\n"
    assert_png(target)
    assert run_report(capsys, "--plots", plots, "--compare", a, b)[0] == 2  # exists: refused
    assert run_report(capsys, "--plots", plots, "--compare", a, b, "--force")[0] == 0


def test_compare_needs_finished_runs_of_one_dataset(tmp_path, capsys):
    a = write_run(tmp_path, "pascal", "EM", 0, 80.0, per_class=[1.0, 2.0, 3.0])
    b = write_run(tmp_path, "coco", "EM", 0, 80.0, per_class=[1.0, 2.0])
    c = write_run(tmp_path, "pascal", "an", 0, 0.0, status="failed")
    code, _, err = run_report(capsys, "--plots", tmp_path / "p", "--compare", a, b)
    assert code == 2 and "the runs have 3 and 2 classes" in err
    code, _, err = run_report(capsys, "--plots", tmp_path / "p", "--compare", a, c)
    assert code == 2 and err.startswith(f"error: --compare {c}: run not finished (status 'failed'")
    code, _, err = run_report(capsys, "--plots", tmp_path / "p", "--compare", a, a, "--paper")
    assert code == 2 and "--compare draws only the comparison plot: drop --paper" in err
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------------------------
# predictions.npz

def write_predictions(folder: Path, **override) -> tuple[float, float]:
    """val: random scores; test: a hand-computed case. Returns (val mAP, test mAP) in percent."""
    rng = np.random.RandomState(0)
    val_scores = rng.rand(40, 3).astype(np.float32)
    val_labels = (rng.rand(40, 3) < 0.4).astype(np.float32)
    val_labels[0] = 1  # every class has a positive
    # class 0: positives at ranks 1 and 3 -> AP (1/1 + 2/3) / 2 = 5/6; class 1: ranks 2 and 4 -> (1/2 + 2/4) / 2
    # = 1/2; class 2: rank 1 only -> 1. mAP = (5/6 + 1/2 + 1) / 3 = 7/9
    test_scores = np.array([[0.9, 0.9, 0.8], [0.8, 0.8, 0.1], [0.7, 0.7, 0.2], [0.6, 0.6, 0.3]], np.float32)
    test_labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    arrays = dict(val_scores=val_scores, val_labels=val_labels, val_rows=np.arange(40, dtype=np.int64),
                  test_scores=test_scores, test_labels=test_labels, test_rows=np.array([3, 0, 2, 1], np.int64),
                  epoch=np.array(2))
    arrays.update(override)
    np.savez(folder / "predictions.npz", **arrays)
    sklearn_val = 100 * np.mean([average_precision_score(val_labels[:, c], val_scores[:, c]) for c in range(3)])
    assert compute_map(val_scores, val_labels) == pytest.approx(sklearn_val, abs=1e-12)
    assert compute_map(test_scores, test_labels) == pytest.approx(100 * 7 / 9, abs=1e-12)
    return compute_map(val_scores, val_labels), compute_map(test_scores, test_labels)


def test_check_agrees_with_results_json(tmp_path, capsys):
    folder = write_run(tmp_path, "pascal", "EM", 0, 0.0)
    val_map, test_map = write_predictions(folder)
    update_results(folder, val_map=val_map, test_map=test_map, test_per_class_ap=[100 * 5 / 6, 50.0, 100.0],
                   predictions="predictions.npz")
    old = write_run(tmp_path, "pascal", "EM", 1, 80.0)  # an older run without predictions.npz
    code, out, err = run_report(capsys, tmp_path, "--check")
    assert code == 0
    mean, std = (test_map + 80) / 2, abs(test_map - 80) / math.sqrt(2)  # two values: sample std = |a - b| / sqrt(2)
    assert md_rows(out)["EM"] == ["EM loss", f"{mean:.2f} ± {std:.2f} (2)"]
    lines = err.splitlines()
    assert f"check ok: {folder / 'predictions.npz'}: agrees with results.json (val mAP {val_map:.6f}, " \
           f"test mAP 77.777778, epoch 2)" in lines
    assert f"check not done: {old}: no predictions.npz (an older run), not checked" in lines


def test_check_reports_a_disagreement(tmp_path, capsys):
    folder = write_run(tmp_path, "pascal", "EM", 0, 77.7878)  # 7/9 = 77.7778: 0.01 off
    val_map, _ = write_predictions(folder)
    update_results(folder, val_map=val_map, test_per_class_ap=[100 * 5 / 6, 50.0, 100.0])
    bad_epoch = write_run(tmp_path, "pascal", "EM", 1, 100 * 7 / 9)
    write_predictions(bad_epoch, epoch=np.array(3))
    update_results(bad_epoch, val_map=val_map, test_per_class_ap=[100 * 5 / 6, 50.0, 100.0])
    damaged = write_run(tmp_path, "pascal", "EM", 2, 50.0)
    (damaged / "predictions.npz").write_bytes(b"PK\x03\x04 not a zip")
    lost = write_run(tmp_path, "pascal", "EM", 3, 50.0, extra={"predictions": "predictions.npz"})
    code, out, err = run_report(capsys, tmp_path, "--check")
    assert code == 3
    assert md_rows(out)["EM"][1].endswith("(4)")  # the table is still printed, nothing silently dropped
    failed = [line for line in err.splitlines() if line.startswith("check FAILED: ")]
    assert len(failed) == 4
    assert (f"check FAILED: {folder / 'predictions.npz'}: DISAGREES with results.json: test mAP from "
            f"predictions.npz 77.777778 != results.json test_map 77.7878 (difference -0.010022)") in failed
    assert (f"check FAILED: {bad_epoch / 'predictions.npz'}: DISAGREES with results.json: epoch 3 != best_epoch 2"
            in failed)
    assert any(line.startswith(f"check FAILED: {damaged / 'predictions.npz'}: cannot read it") for line in failed)
    assert f"check FAILED: {lost}: results.json names predictions.npz but the file is missing" in failed
    assert err.splitlines()[-1] == "error: 4 run(s) disagree with their predictions.npz (check FAILED above)"


def test_format_value_in_labels():
    assert [report.format_value(v) for v in (1e-4, 1e-05, 0.1, 2, True, "resnet18", 1e20)] == \
           ["0.0001", "1e-5", "0.1", "2", "True", "resnet18", "1e20"]
    assert re.fullmatch(r"\S+", report.format_value([1, 2]))
