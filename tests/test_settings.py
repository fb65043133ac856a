"""The published settings, pinned through the path a run takes: `main.py`'s parser, `config.build_config` and the
run's start (`main._start`, replaced here by a recorder, so nothing trains), for every benchmark dataset and
method; ROLE+LI's phase 1 through `train.linear_init`, the split through `main.build_run`; and the settings
tables and stated defaults of README.md and docs/original.md against the code (issue 28: a changed default
silently changes every reproduced number). `python tests/mutate_settings.py` checks that these tests notice each
realistic change of a default. The observed-label seed (1200, Z's preproc/generate_observed_labels.py) is pinned
by tests/test_observed_labels.py's CLI test, which samples with an independent re-statement at that seed.

The expected values are written here from their sources, not read from config.py or losses.py:
  Z = Zhou et al., github.com/Correr-Zhou/SPML-AckTheUnknown @ ae1ccafe, main.py (`P[...]` assignments) and
      datasets.py (`Resize((448, 448))`);
  C = Cole et al., github.com/elijahcole/single-positive-multi-label @ 89152d52, train.py (`lookup`, `P[...]`);
  K = Kim et al., "Large Loss Matters" (CVPR 2022), per-dataset delta_rel of their Adam runs (their code,
      github.com/snucml/LargeLossMatters, takes --delta_rel as a required flag without per-dataset defaults);
  baselines = docs/baselines.md's definitions (Lin et al. 2017, Ridnik et al. 2021, and our reconstructions).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from config import Config

BENCHMARKS = ("pascal", "coco", "nuswide", "cub")

# Z main.py, `if P['dataset'] == ...`: bsize, lr, alpha, neg_proportion (theta), warmup_epoch (T_w), beta.
ZHOU_TABLE = {
    "pascal": dict(batch_size=8, lr=1e-5, alpha=0.2, neg_proportion=0.9, warmup_epoch=5, beta=0.02),
    "coco": dict(batch_size=16, lr=1e-5, alpha=0.1, neg_proportion=0.9, warmup_epoch=5, beta=0.9),
    "nuswide": dict(batch_size=16, lr=1e-5, alpha=0.1, neg_proportion=0.9, warmup_epoch=4, beta=0.2),
    "cub": dict(batch_size=8, lr=1e-4, alpha=0.01, neg_proportion=0.9, warmup_epoch=3, beta=0.4),
}
# Z main.py: P['arch'] = 'resnet50', P['use_pretrained'] = True (torchvision's ImageNet weights), P['num_epochs'] = 10,
# P['num_workers'] = 8; Z datasets.py: every transform resizes to 448 x 448.
ZHOU_MODEL = dict(arch="resnet50", weights="imagenet", image_size=448, num_epochs=10, num_workers=8)
# Z main.py: P['seed'] = 1200 (np.random.seed), P['split_seed'] = 1200, P['val_frac'] = 0.2, the -s default 0,
# P['val_set_variant'] = 'clean', P['stop_metric'] = 'map', P['ss_frac_train'] = P['ss_frac_val'] = 1.0,
# P['freeze_feature_extractor'] = False. (Its ss_seed 999 draws nothing at a share of 1.0.)
ZHOU_FIXED = dict(seed=1200, split_seed=1200, val_frac=0.2, pytorch_seed=0, val_labels="clean", stop_metric="map",
                  train_subsample=1.0, val_subsample=1.0, freeze_backbone=False)
# K: delta_rel per dataset for LL-R / LL-Ct / LL-Cp (docs/baselines.md).
KIM_DELTA_REL = {"pascal": (0.2, 0.2, 0.1), "coco": (0.4, 0.2, 0.2), "nuswide": (0.4, 0.2, 0.2), "cub": (0.4, 0.4, 0.2)}
# C train.py, lookup['expected_num_pos'].
COLE_EXPECTED_POSITIVES = {"pascal": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4}
# C train.py, lookup['linear_init_params']['role'] and P['num_epochs'] = 25 in the linear_init mode.
COLE_LINEAR_INIT = {d: dict(num_epochs=25, lr=1e-3, batch_size=8 if d == "cub" else 16) for d in BENCHMARKS}
# The baselines' own hyperparameters (docs/baselines.md): C's ls_coef 0.1; N-LS eps -0.1, L1R/L2R and EntMin
# lambda 0.1 (our documented reconstructions); Lin et al.'s gamma 2; Ridnik et al.'s gamma_neg 4, gamma_pos 0,
# clip 0.05.
BASELINE_DEFAULTS = {"ls": {"ls_eps": 0.1}, "nls": {"nls_eps": -0.1}, "l1r": {"reg_lambda": 0.1},
                     "l2r": {"reg_lambda": 0.1}, "entmin": {"entmin_lambda": 0.1}, "focal": {"focal_gamma": 2.0},
                     "asl": {"asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05}}


@pytest.fixture
def run_config(monkeypatch):
    """`run_config(*argv)`: the Config that `python main.py *argv -g cpu` starts its run with."""
    started = []
    monkeypatch.setattr(main, "_start", lambda cfg, *args, **kwargs: started.append(cfg) or 0)

    def run(*argv: str) -> Config:
        started.clear()
        assert main.main([*argv, "-g", "cpu"]) == 0
        (cfg,) = started
        return cfg
    return run


def settings_of(cfg: Config, expected: dict) -> dict:
    return {k: getattr(cfg, k) for k in expected}


@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_every_loss_runs_with_zhou_et_al_settings(run_config, dataset):
    """Z's table, model and fixed settings, for EM_APL (main.py's default loss) and a baseline: the batch size
    and lr of the table serve every loss."""
    expected = {**ZHOU_TABLE[dataset], **ZHOU_MODEL, **ZHOU_FIXED}
    for argv in (["-d", dataset], ["-d", dataset, "-l", "an"]):
        assert settings_of(run_config(*argv), expected) == expected, argv


def test_the_default_run_is_pascal_em_apl(run_config):
    """Z main.py: -d defaults to pascal, -l to EM_APL."""
    cfg = run_config()
    assert (cfg.dataset, cfg.loss) == ("pascal", "EM_APL")
    assert settings_of(cfg, ZHOU_TABLE["pascal"]) == ZHOU_TABLE["pascal"]


@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_large_loss_delta_rel_is_kims_per_dataset(run_config, dataset):
    for loss, delta_rel in zip(("ll_r", "ll_ct", "ll_cp"), KIM_DELTA_REL[dataset]):
        assert run_config("-d", dataset, "-l", loss).loss_hyperparameters() == {"delta_rel": delta_rel}, loss


@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_role_k_is_coles_per_dataset(run_config, dataset):
    for loss in ("role", "role_li"):
        assert run_config("-d", dataset, "-l", loss).loss_hyperparameters() == {
            "expected_num_pos": COLE_EXPECTED_POSITIVES[dataset]}, loss


@pytest.mark.parametrize("loss", sorted(BASELINE_DEFAULTS))
def test_baseline_hyperparameters(run_config, loss):
    """What a run passes the loss, and the loss function's own default (what `compute_loss` takes when it is
    left out): l1r and l2r share --reg-lambda, whose run default is the first registered loss's."""
    from losses import LOSSES
    assert LOSSES[loss].defaults == BASELINE_DEFAULTS[loss]
    for dataset in BENCHMARKS:
        assert run_config("-d", dataset, "-l", loss).loss_hyperparameters() == BASELINE_DEFAULTS[loss], dataset


def tiny_feature_sets(rows: int = 20, dim: int = 6, classes: int = 3) -> dict:
    """Random features with single positives; every class positive in the val part (a finite val mAP)."""
    from datasets import FeatureDataset
    rng = np.random.RandomState(0)
    sets = {}
    for split in ("train", "val"):
        true = np.eye(classes)[np.arange(rows) % classes]
        sets[split] = FeatureDataset(rng.randn(rows, dim).astype(np.float32), true.copy(), true)
    return sets


@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_role_li_phase_one_is_coles_linear_init(run_config, dataset):
    from train import linear_init
    cfg = run_config("-d", dataset, "-l", "role_li")
    torch.manual_seed(0)
    _, record = linear_init(tiny_feature_sets(), cfg, torch.device("cpu"))
    expected = COLE_LINEAR_INIT[dataset]
    assert {k: record[k] for k in expected} == expected
    assert sorted(map(int, record["epochs"])) == list(range(1, expected["num_epochs"] + 1))  # every epoch ran


def test_the_run_splits_off_the_last_fifth_of_a_permutation_seeded_1200(run_config, bird_root):
    """Z datasets.py's split as main.py's run builds it (bird_root: 90 official train rows): val = the last
    round(0.2 * 90) = 18 entries of RandomState(1200).permutation(90), train the rest, each sorted."""
    cfg = run_config("-l", "an", "--data-root", str(bird_root), "--arch", "resnet18", "--weights", "random",
                     "--image-size", "32", "--num-workers", "0")
    sets, *_ = main.build_run(cfg, torch.device("cpu"))
    permutation = np.random.RandomState(1200).permutation(90)
    assert np.array_equal(sets["val"].rows, np.sort(permutation[-18:]))
    assert np.array_equal(sets["train"].rows, np.sort(permutation[:-18]))


# ----------------------------------------------------------------------------------------------------------------
# The docs (README.md, docs/command-line.md, docs/original.md): their settings tables and the defaults they state,
# against the code

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_LINE = ROOT / "docs" / "command-line.md"  # every flag; README.md's "Command line" table is its brief
ORIGINAL = ROOT / "docs" / "original.md"
SETTINGS_HEADER = ("| dataset | batch | lr | α (EM) | θ (APL share) | T_w (warm-up) | β (APL weight) "
                   "| LL δ (R / Ct / Cp) | ROLE k |")
ORIGINAL_HEADER = "| dataset | batch | lr | alpha (EM) | theta | T_w | beta |"


def doc_table(path: Path, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the table in `path` that starts with `header`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert header in lines, f"{path.name} has no table with the header {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:  # past the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_zhou_columns(run_config, rows: list[list[str]]) -> None:
    """A table's first seven columns: dataset, batch, lr, alpha, theta, T_w, beta, one row per benchmark."""
    assert [row[0] for row in rows] == list(BENCHMARKS)
    for dataset, batch, lr, alpha, theta, warmup, beta, *_ in rows:
        cfg = run_config("-d", dataset)
        assert (int(batch), float(lr), float(alpha), float(theta), int(warmup), float(beta)) == (
            cfg.batch_size, cfg.lr, cfg.alpha, cfg.neg_proportion, cfg.warmup_epoch, cfg.beta), dataset


def flag_defaults(path: Path) -> dict[str, str]:
    """The default of each flag in `path`'s "| flag | default | meaning |" table: a row that names several flags and
    as many comma-separated defaults gives each its own; otherwise every flag of the row has the row's default."""
    defaults = {}
    for names, default, _ in doc_table(path, "| flag | default | meaning |"):
        flags = re.findall(r"`([^`]+)`", names)
        values = [value.strip().strip("`") for value in default.split(",")]
        defaults.update(zip(flags, values) if len(values) == len(flags) else ((f, default.strip("`")) for f in flags))
    return defaults


def readme_flag_defaults() -> dict[str, str]:
    """docs/command-line.md's default of every flag, after checking that README.md's brief table states the same
    default for each flag it names."""
    every, brief = flag_defaults(COMMAND_LINE), flag_defaults(README)
    for flag, default in brief.items():
        assert flag in every, f"README.md's command-line table names {flag}, docs/command-line.md does not"
        assert default == every[flag], f"{flag}: README.md says {default!r}, docs/command-line.md {every[flag]!r}"
    return every


def test_readme_settings_table_is_the_code(run_config):
    rows = doc_table(README, SETTINGS_HEADER)
    check_zhou_columns(run_config, rows)
    for dataset, *_, delta_rel, k in rows:
        assert tuple(float(d) for d in delta_rel.split("/")) == tuple(
            run_config("-d", dataset, "-l", loss).delta_rel for loss in ("ll_r", "ll_ct", "ll_cp")), dataset
        assert float(k) == run_config("-d", dataset, "-l", "role").expected_num_pos, dataset


def test_readme_model_and_flag_defaults_are_the_code(run_config):
    cfg = run_config("-d", "coco")
    sentence = re.search(r"All use ResNet-50 \(torchvision `IMAGENET1K_V1`\), (\d+)x(\d+), .*?at most (\d+) epochs",
                         README.read_text(encoding="utf-8"), re.S)
    assert sentence, "README.md no longer states the real datasets' model, image size and epochs after its table"
    assert (cfg.arch, cfg.weights) == ("resnet50", "imagenet")
    assert tuple(map(int, sentence.groups())) == (cfg.image_size, cfg.image_size, cfg.num_epochs)
    stated = readme_flag_defaults()
    assert {f: stated[f] for f in ("--epochs", "--arch", "--weights", "--image-size", "--num-workers",
                                   "-s/--pytorch-seed")} == {
        "--epochs": str(cfg.num_epochs), "--arch": cfg.arch, "--weights": cfg.weights,
        "--image-size": str(cfg.image_size), "--num-workers": str(cfg.num_workers),
        "-s/--pytorch-seed": str(cfg.pytorch_seed)}
    for loss in BASELINE_DEFAULTS:
        for name, value in run_config("-d", "coco", "-l", loss).loss_hyperparameters().items():
            assert float(stated["--" + name.replace("_", "-")]) == value, name
    assert stated["--delta-rel"] == stated["--expected-num-pos"] == "per dataset"


def test_original_md_settings_are_the_code(run_config):
    check_zhou_columns(run_config, doc_table(ORIGINAL, ORIGINAL_HEADER))
    fixed = re.search(r"Fixed: `np.random.seed\((\d+)\)` at the\s+start, split seed (\d+), val fraction ([\d.]+), "
                      r"(\d+) epochs, (\d+) workers", ORIGINAL.read_text(encoding="utf-8"))
    assert fixed, "docs/original.md no longer states the original's fixed settings under its table"
    cfg = run_config("-d", "pascal")
    assert (int(fixed[1]), int(fixed[2]), float(fixed[3]), int(fixed[4]), int(fixed[5])) == (
        cfg.seed, cfg.split_seed, cfg.val_frac, cfg.num_epochs, cfg.num_workers)
