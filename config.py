"""Settings: the per-dataset hyperparameter table and the typed run configuration.

The table reproduces the original's per-dataset settings (Zhou et al., `main.py`); batch size and lr
are used for every loss, baselines included. `Config` is built once from the CLI and the table and is
never mutated afterwards: functions take the fields they use.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from losses import LOSSES, check_hyperparameters
from losses import flag as loss_flag
from models import HEADS  # issue 25

LOSS_NAMES = tuple(LOSSES)  # every registered loss
IMAGE_CACHE_MODES = ("off", "ram", "disk")  # --image-cache (image_cache.py)
AMP_MODES = ("off", "bf16", "fp16")  # --amp (train.AMP_DTYPES)
# Settings that only some losses read: each loss's own hyperparameters (losses.py), and APL's schedule.
APL_SETTINGS = ("neg_proportion", "warmup_epoch")
VAL_LABELS = ("clean", "observed")  # --val-labels
STOP_METRICS = ("map", *(f"{m}_{k}" for m in ("prec_at", "rec_at") for k in (1, 3, 5)), "top_1", "top_3", "top_5")
# Settings of the image pipeline and the backbone, which a linear probe on cached features (--features) does not read.
IMAGE_SETTINGS = ("arch", "weights", "image_size", "num_workers", "persistent_workers", "image_cache", "amp",
                  "channels_last", "compile", "cudnn_benchmark", "freeze_backbone", "sync_bn")
# Settings that cannot change a run's numbers (where it runs and where its files are; the image cache is
# bit-identical): two runs whose configs differ only in these are the same experiment (sweep.py, report.py).
# Not --num-workers / --persistent-workers: each worker draws the flips of its batches from its own stream.
RESULT_NEUTRAL_SETTINGS = ("gpu", "image_cache", "data_root", "results_dir", "dist_timeout")


# delta_rel of the Large-Loss methods per dataset, as Kim et al. give them (Adam, batch 16; percent per epoch).
# The demo takes COCO's.
LL_DELTA_REL: dict[str, dict[str, float]] = {
    "pascal": {"ll_r": 0.2, "ll_ct": 0.2, "ll_cp": 0.1},
    "coco": {"ll_r": 0.4, "ll_ct": 0.2, "ll_cp": 0.2},
    "nuswide": {"ll_r": 0.4, "ll_ct": 0.2, "ll_cp": 0.2},
    "cub": {"ll_r": 0.4, "ll_ct": 0.4, "ll_cp": 0.2},
    "demo": {"ll_r": 0.4, "ll_ct": 0.2, "ll_cp": 0.2},
}


# ROLE's k, the expected number of positives per image (Cole et al.'s `expected_num_pos`: the mean number of true
# positives per training image). The demo's is its own mean (1.90 per image).
ROLE_EXPECTED_POSITIVES: dict[str, float] = {"pascal": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4, "demo": 1.9}
ROLE_LOSSES = ("role", "role_li")


# ---- Methods since 2022 (issue 25): BoostLU's settings ----------------------------------------------------------
# BoostLU (Kim et al. 2023) runs the Large-Loss methods with one delta_rel per scheme on every dataset (their
# config.py `_LOOKUP['delta_rel']`, percent per epoch), not LL_DELTA_REL's per-dataset values, and alpha = 5
# (their `--alpha` default and README command). Taken by build_config when --head boostlu.
BOOSTLU_DELTA_REL: dict[str, float] = {"ll_r": 0.5, "ll_ct": 0.2, "ll_cp": 0.1}
BOOSTLU_ALPHA = 5.0
# ---- end of issue 25's block -------------------------------------------------------------------------------------


def _loss_default(field: str) -> float:
    """The default of a baseline loss's hyperparameter, as its function in losses.py declares it."""
    return next(fn.defaults[field] for fn in LOSSES.values() if field in getattr(fn, "defaults", {}))

# Shared by every real dataset (the original's fixed settings).
_REAL = dict(arch="resnet50", weights="imagenet", image_size=448, num_epochs=10, num_workers=8)

DATASET_SETTINGS: dict[str, dict] = {
    #            batch         lr          alpha (EM)    theta                 T_w                beta (APL)
    "pascal":  dict(batch_size=8, lr=1e-5, alpha=0.2, neg_proportion=0.9, warmup_epoch=5, beta=0.02, **_REAL),
    "coco":    dict(batch_size=16, lr=1e-5, alpha=0.1, neg_proportion=0.9, warmup_epoch=5, beta=0.9, **_REAL),
    "nuswide": dict(batch_size=16, lr=1e-5, alpha=0.1, neg_proportion=0.9, warmup_epoch=4, beta=0.2, **_REAL),
    "cub":     dict(batch_size=8, lr=1e-4, alpha=0.01, neg_proportion=0.9, warmup_epoch=3, beta=0.4, **_REAL),
    # The bundled demo (generated, no download): a small network trained from scratch on small images,
    # sized so that a whole EM_APL run fits in a few minutes on 2 CPU cores.
    "demo":    dict(batch_size=32, lr=1e-3, alpha=0.1, neg_proportion=0.9, warmup_epoch=3, beta=0.4,
                    arch="resnet18", weights="random", image_size=48, num_epochs=6, num_workers=0),
}


# Linear-probe mode (`--features`: a linear classifier on a frozen backbone's cached features). A linear head
# wants a larger lr than fine-tuning; these defaults come from the sweep in README "Linear probe" (batch 64 was
# as good as 16 there at a quarter of the steps).
LINEAR_SETTINGS: dict = dict(batch_size=64, lr=1e-3, num_epochs=25)
# ROLE+LI's phase 1 (Cole et al.'s linear initialisation, docs/baselines.md): ROLE on frozen features.
ROLE_LI_PHASE1: dict[str, dict] = {d: dict(num_epochs=25, lr=1e-3, batch_size=8 if d == "cub" else 16)
                                   for d in DATASET_SETTINGS}


@dataclass(frozen=True)
class Config:
    """Everything one run needs. Defaults are the original's; dataset-specific ones come from the table."""

    dataset: str
    loss: str = "EM_APL"
    gpu: str = "0"  # a CUDA index, or "cpu"
    pytorch_seed: int = 0
    # per-dataset (DATASET_SETTINGS)
    batch_size: int = 8
    lr: float = 1e-5
    alpha: float = 0.2
    beta: float = 0.02
    neg_proportion: float = 0.9
    warmup_epoch: int = 5
    arch: str = "resnet50"
    weights: str = "imagenet"  # "imagenet", "random" or a path to a state dict
    image_size: int = 448
    num_epochs: int = 10
    num_workers: int = 8
    # hyperparameters of the baselines of the paper's table (losses.py; not in Zhou et al.'s code)
    ls_eps: float = _loss_default("ls_eps")
    nls_eps: float = _loss_default("nls_eps")
    reg_lambda: float = _loss_default("reg_lambda")
    entmin_lambda: float = _loss_default("entmin_lambda")
    focal_gamma: float = _loss_default("focal_gamma")
    asl_gamma_neg: float = _loss_default("asl_gamma_neg")
    asl_gamma_pos: float = _loss_default("asl_gamma_pos")
    asl_clip: float = _loss_default("asl_clip")
    delta_rel: float = _loss_default("delta_rel")  # Large-Loss methods; build_config takes LL_DELTA_REL's
    expected_num_pos: float | None = None  # ROLE's k; build_config takes ROLE_EXPECTED_POSITIVES
    # linear-probe mode: the name of a feature set (features.feature_set_name), None = train on images
    features: str | None = None
    # options of Cole et al.'s code base (which Zhou et al.'s inherits), off by default
    val_labels: str = "clean"  # model selection on the val part's full labels, or its "observed" single positives
    stop_metric: str = "map"  # the val metric that selects the best epoch (and stops early)
    freeze_backbone: bool = False  # train the classifier head only, on images (the backbone in eval mode)
    train_subsample: float = 1.0  # share of the train part kept (drawn with subsample_seed)
    val_subsample: float = 1.0  # share of the val part kept
    subsample_seed: int = 0
    # fixed in the original
    seed: int = 1200  # numpy global seed
    split_seed: int = 1200
    val_frac: float = 0.2
    # project options (not in the original; defaults keep its behaviour)
    persistent_workers: bool = False
    # speed options (README "Speed"): the cache is bit-identical; amp, channels_last and compile are not
    image_cache: str = "off"  # "off", "ram" or "disk"
    amp: str = "off"  # "off", "bf16" or "fp16"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    # torchrun launches (distributed.py): SyncBatchNorm, and how long a collective waits for a silent rank
    sync_bn: bool = False
    dist_timeout: float = 600.0
    data_root: str = "data"
    results_dir: str = "results"
    # ---- issue 25: GR-Loss's hyperparameters (losses.generalized_robust; the authors' defaults) ----
    gr_w_start: float = _loss_default("gr_w_start")
    gr_w_end: float = _loss_default("gr_w_end")
    gr_b_start: float = _loss_default("gr_b_start")
    gr_b_end: float = _loss_default("gr_b_end")
    gr_mu_start: float = _loss_default("gr_mu_start")
    gr_mu_end: float = _loss_default("gr_mu_end")
    gr_sigma_start: float = _loss_default("gr_sigma_start")
    gr_sigma_end: float = _loss_default("gr_sigma_end")
    gr_q2: float = _loss_default("gr_q2")
    gr_q3: float = _loss_default("gr_q3")
    # ---- issue 25: the classifier head (models.HEADS; models.CAMHead) ----
    head: str = "linear"  # "linear" (the original's), "cam", or "boostlu" (Kim et al. 2023)
    boost_alpha: float = BOOSTLU_ALPHA  # BoostLU's factor on positive CAM values (--head boostlu only)

    @property
    def selection_key(self) -> str:
        """The key of the val record that selects the best epoch, e.g. "map_clean" or "prec_at_1_observed"."""
        return f"{self.stop_metric}_{self.val_labels}"

    @property
    def train_set_variant(self) -> str:
        """`bce` trains on the full labels ("All P. & All N."), every other loss on the single positives."""
        return "clean" if self.loss == "bce" else "observed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_hyperparameters(self) -> dict:
        """The hyperparameters the chosen loss takes, with their values (passed to it, and kept in results.json)."""
        return {k: getattr(self, k) for k in LOSSES[self.loss].hyperparameters}

    def unused_settings(self, given: set[str]) -> list[str]:
        """Those of the `given` fields (set on the command line) that the chosen loss does not read."""
        per_loss = {k for fn in LOSSES.values() for k in fn.hyperparameters} | set(APL_SETTINGS)
        used = set(LOSSES[self.loss].hyperparameters) | (set(APL_SETTINGS) if self.loss == "EM_APL" else set())
        unused = {k for k in given if k in per_loss and k not in used}
        if self.features:  # a linear classifier on cached features: no images, no backbone
            unused |= set(given) & set(IMAGE_SETTINGS)
        if self.head != "boostlu":
            unused |= set(given) & {"boost_alpha"}
        return sorted(unused)


def comparable_settings(config: dict, seed: bool = True) -> dict:
    """A run's recorded config as the experiment it is: the settings that cannot change its numbers
    (RESULT_NEUTRAL_SETTINGS) left out, and the seed too unless `seed`; a setting the run predates (recorded by
    an older version) counts at its default, which is what that version did."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    dropped = set(RESULT_NEUTRAL_SETTINGS) | (set() if seed else {"pytorch_seed"})
    return {k: v for k, v in {**defaults, **config}.items() if k not in dropped}


def _dataset_settings(dataset: str, data_root: str):
    """The table entry of a benchmark or the demo; for any other dataset (data/NAME/dataset.json) COCO's entry,
    which its dataset.json "defaults" then adjust. Returns it with datasets.DatasetInfo."""
    from datasets import DataError, dataset_info
    try:
        info = dataset_info(data_root, dataset)
    except DataError as exc:
        raise ValueError(str(exc)) from exc
    path = Path(data_root) / dataset / "dataset.json"
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in info.defaults:
        if key not in fields or key in NOT_DATASET_DEFAULTS:
            raise ValueError(f"{path}: \"defaults\" cannot set {key!r} (" + ("a setting of the command line only"
                             if key in fields else "no such setting; see config.Config") + ")")
        default = fields[key].default
        expected = type(default) if default is not None and default is not dataclasses.MISSING else None
        # a bool only for a bool setting; an int also for a float one
        ok = expected is None or (isinstance(value, bool) == (expected is bool)
                                  and (isinstance(value, expected) or expected is float and isinstance(value, int)))
        if not ok:
            raise ValueError(f"{path}: \"defaults\" {key} must be a {expected.__name__}, got {value!r}")
    return dict(DATASET_SETTINGS.get(dataset, DATASET_SETTINGS["coco"])), info


# What a dataset.json's "defaults" may not set: the run's identity and where it runs.
NOT_DATASET_DEFAULTS = ("dataset", "loss", "gpu", "pytorch_seed", "data_root", "results_dir")


def build_config(dataset: str, **overrides) -> Config:
    """The table entry of `dataset`, with every non-None override applied on top, validated."""
    values, info = _dataset_settings(dataset, overrides.get("data_root") or Config.data_root)
    if info.features and not overrides.get("features"):
        overrides = {**overrides, "features": "formatted"}  # features.FORMATTED: the dataset's own
    if overrides.get("features"):
        values.update(LINEAR_SETTINGS)
    loss = overrides.get("loss") or Config.loss
    if info.single_positive and loss in ("bce", "iun"):
        raise ValueError(f"-l {loss} needs full training labels, but {Path(overrides.get('data_root') or 'data') / dataset}"
                         f" holds single positives (dataset.json \"single_positive\": true); choose another loss")
    if loss in LL_DELTA_REL.get(dataset, LL_DELTA_REL["coco"]):
        values["delta_rel"] = LL_DELTA_REL.get(dataset, LL_DELTA_REL["coco"])[loss]
    if loss in ROLE_LOSSES and dataset in ROLE_EXPECTED_POSITIVES:
        values["expected_num_pos"] = ROLE_EXPECTED_POSITIVES[dataset]
    if overrides.get("head") == "boostlu" and loss in BOOSTLU_DELTA_REL:  # issue 25: BoostLU's own rates
        values["delta_rel"] = BOOSTLU_DELTA_REL[loss]
    values.update(dict(info.defaults))  # an own dataset's dataset.json "defaults", under the flags
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = Config(dataset=dataset, **values)
    validate(cfg)
    return cfg


def flag(field: str) -> str:
    """The CLI flag that sets a Config field (for messages)."""
    return {"num_epochs": "--epochs", "pytorch_seed": "-s/--pytorch-seed"}.get(field) or loss_flag(field)


def validate(cfg: Config) -> None:
    """Every setting's range, checked before anything is loaded; the message names the flag."""
    if cfg.loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {list(LOSS_NAMES)}")
    at_least_one = ("batch_size", "num_epochs", "image_size")
    for field in at_least_one:
        if getattr(cfg, field) < 1:
            raise ValueError(f"{flag(field)} must be >= 1, got {getattr(cfg, field)}")
    if cfg.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {cfg.lr}")
    check_hyperparameters(cfg.loss, cfg.to_dict())  # the chosen loss's own (alpha, beta, gammas, eps, ...)
    if cfg.loss in ROLE_LOSSES and cfg.expected_num_pos is None:
        raise ValueError(f"-l {cfg.loss} needs --expected-num-pos (ROLE's k, the mean number of true positives "
                         f"per image): {cfg.dataset} has no default")
    if not 0.0 <= cfg.neg_proportion <= 1.0:  # also rejects NaN
        raise ValueError(f"--neg-proportion must be in [0, 1], got {cfg.neg_proportion}")
    if cfg.loss == "EM_APL" and not 1 <= cfg.warmup_epoch < cfg.num_epochs:
        # k_c = floor(theta * U_c / (T - T_w)) needs T > T_w
        raise ValueError(f"EM_APL needs 1 <= --warmup-epoch < --epochs, got --warmup-epoch {cfg.warmup_epoch} "
                         f"and --epochs {cfg.num_epochs}")
    if cfg.warmup_epoch < 1:
        raise ValueError(f"--warmup-epoch must be >= 1, got {cfg.warmup_epoch}")
    for field, choices in (("image_cache", IMAGE_CACHE_MODES), ("amp", AMP_MODES)):
        if getattr(cfg, field) not in choices:
            raise ValueError(f"{flag(field)} must be one of {list(choices)}, got {getattr(cfg, field)!r}")
    if cfg.features is not None and cfg.loss == "role_li":
        raise ValueError("-l role_li fine-tunes the backbone after a linear phase; with --features (a linear "
                         "classifier only) use -l role")
    for field, choices in (("val_labels", VAL_LABELS), ("stop_metric", STOP_METRICS)):
        if getattr(cfg, field) not in choices:
            raise ValueError(f"{flag(field)} must be one of {list(choices)}, got {getattr(cfg, field)!r}")
    for field in ("train_subsample", "val_subsample"):
        if not 0.0 < getattr(cfg, field) <= 1.0:
            raise ValueError(f"{flag(field)} must be in (0, 1], got {getattr(cfg, field)}")
    if cfg.freeze_backbone and cfg.features:
        raise ValueError("--freeze-backbone trains the head on images; --features is already a head on frozen "
                         "features: give one of them")
    if not (math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a number of seconds > 0, got {cfg.dist_timeout}")
    if not 0.0 <= cfg.val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {cfg.val_frac}")
    _validate_head(cfg)


def _validate_head(cfg: Config) -> None:
    """Issue 25: --head and --boost-alpha."""
    if cfg.head not in HEADS:
        raise ValueError(f"--head must be one of {list(HEADS)}, got {cfg.head!r}")
    if not (math.isfinite(cfg.boost_alpha) and cfg.boost_alpha > 0):
        raise ValueError(f"--boost-alpha must be a finite number > 0, got {cfg.boost_alpha}")
    if cfg.head != "linear" and cfg.features is not None:
        raise ValueError(f"--head {cfg.head} needs the backbone's feature map, which --features (a linear probe on "
                         f"pooled features) does not have: train on images, or use --head linear")
    if cfg.head != "linear" and cfg.loss == "role_li":
        raise ValueError(f"-l role_li starts from a linear classifier trained on pooled features; --head {cfg.head} "
                         f"has none: use --head linear, or -l role")
