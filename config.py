"""Settings: the per-dataset hyperparameter table and the typed run configuration.

The table reproduces the original's per-dataset settings (Zhou et al., `main.py`); batch size and lr
are used for every loss, baselines included. `Config` is built once from the CLI and the table and is
never mutated afterwards: functions take the fields they use.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from losses import LOSSES, check_hyperparameters
from losses import flag as loss_flag
from models import HEADS  # issue 25

LOSS_NAMES = tuple(LOSSES)  # every registered loss
IMAGE_CACHE_MODES = ("off", "ram", "disk")  # --image-cache (image_cache.py)
AMP_MODES = ("off", "bf16", "fp16")  # --amp (engine.AMP_DTYPES)
CUDA_GRAPH_MODES = ("off", "model", "step")  # --cuda-graphs (cuda_graphs.py)
IMAGE_DECODE_MODES = ("pil", "device")  # --image-decode (device_decode.py)
# Settings that only some losses read: each loss's own hyperparameters (losses.py), and APL's schedule.
APL_SETTINGS = ("neg_proportion", "warmup_epoch")
VAL_LABELS = ("clean", "observed")  # --val-labels
STOP_METRICS = ("map", *(f"{m}_{k}" for m in ("prec_at", "rec_at") for k in (1, 3, 5)), "top_1", "top_3", "top_5")
# Settings of the image pipeline and the backbone, which a linear probe on cached features (--features) does not read.
IMAGE_SETTINGS = ("arch", "weights", "image_size", "num_workers", "persistent_workers", "image_cache", "amp",
                  "channels_last", "compile", "cudnn_benchmark", "freeze_backbone", "frozen_backbone_epochs",
                  "sync_bn", "cuda_graphs", "image_decode", "eval_batch_size")
# Settings that cannot change a run's numbers (where it runs and where its files are; the image cache is
# bit-identical): two runs whose configs differ only in these are the same experiment (sweep.py, report.py).
# Not --num-workers / --persistent-workers: each worker draws the flips of its batches from its own stream.
RESULT_NEUTRAL_SETTINGS = ("gpu", "image_cache", "data_root", "results_dir", "dist_timeout", "keep_last")

# The training loop of each source whose numbers the README's table prints (--protocol): the settings that differ
# between them, each also a flag of its own. The dataset table's batch, lr and epochs stay unless a protocol sets
# them (not for a linear probe on --features, which has its own: LINEAR_SETTINGS).
# --early-stop: drop-N stops when val falls more than N below the best (Kim et al.: 3; GR-Loss's loop: 2)
EARLY_STOPS = ("first-drop", "drop-2", "drop-3", "none")
TEST_PASSES = ("best", "every", "end")  # --test-pass
ROLE_LI_INITS = ("float64", "float32")  # --role-li-init
PROTOCOLS: dict[str, dict] = {
    # Zhou et al.'s main.py (the original): stop at the first epoch whose val mAP does not strictly improve; the
    # test pass after each improving epoch; one lr for the whole model; the last partial batches kept
    "zhou": dict(head_lr_mult=1.0, early_stop="first-drop", drop_last=False, test_pass="best", role_li_init="float64"),
    # Cole et al.'s train.py: every epoch runs (train, val, test), the best val epoch kept; drop_last=True for the
    # train, val and test loaders; ROLE+LI's estimates start from logit(phase-1 estimates) computed in float32
    "cole": dict(head_lr_mult=1.0, early_stop="none", drop_last=True, test_pass="every", role_li_init="float32"),
    # Kim et al.'s train.py and config.py: batch 16, lr 1e-5 with the classifier at 10x (lr_mult), up to 10 epochs,
    # the best val epoch kept, a stop only when val mAP falls more than 3 below the best; the test pass once at the
    # end, on the best weights
    "kim": dict(head_lr_mult=10.0, early_stop="drop-3", drop_last=False, test_pass="end", role_li_init="float64",
                batch_size=16, lr=1e-5, num_epochs=10),
}
PROTOCOL_SCHEDULE = ("batch_size", "lr", "num_epochs")  # what a protocol does not set for a linear probe


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
EXPECTED_POSITIVES_LOSSES = (*ROLE_LOSSES, "epr")  # the losses that read expected_num_pos (Cole et al.'s k)


# ---- Methods since 2022 (issue 25): BoostLU's settings ----------------------------------------------------------
# BoostLU (Kim et al. 2023) runs the Large-Loss methods with one delta_rel per scheme on every dataset (their
# config.py `_LOOKUP['delta_rel']`, percent per epoch), not LL_DELTA_REL's per-dataset values, and alpha = 5
# (their `--alpha` default and README command). Taken by build_config when --head boostlu.
BOOSTLU_DELTA_REL: dict[str, float] = {"ll_r": 0.5, "ll_ct": 0.2, "ll_cp": 0.1}
BOOSTLU_ALPHA = 5.0
# which entries LL-Cp corrects for good (--ll-cp-corrections): those whose loss is above the batch's k-th largest
# (Kim et al.'s `correction_idx = torch.where(unobserved_loss > topk_lossvalue)`) or at or above it (BoostLU's `>=`:
# ties included, and with a k-th largest of 0 every entry). --head boostlu takes BoostLU's.
LL_CP_CORRECTIONS = ("above", "at-or-above")
BOOSTLU_LL_CP_CORRECTIONS = "at-or-above"
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
    gpu: str = "auto"  # "auto" (the first CUDA device, else the CPU), a CUDA index, or "cpu"
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
    expected_num_pos: float | None = None  # ROLE's and EPR's k; build_config takes ROLE_EXPECTED_POSITIVES
    # methods since 2021 (losses.py; docs/recent_methods.md): Hill, SPLC, EM_PL (VLPL) and its score file
    hill_lambda: float = _loss_default("hill_lambda")
    focal_margin: float = _loss_default("focal_margin")
    splc_tau: float = _loss_default("splc_tau")
    splc_start_epoch: int = _loss_default("splc_start_epoch")
    pl_beta_pos: float = _loss_default("pl_beta_pos")
    pl_beta_neg: float = _loss_default("pl_beta_neg")
    pl_pos_threshold: float = _loss_default("pl_pos_threshold")
    pl_neg_threshold: float = _loss_default("pl_neg_threshold")
    pl_warmup_epoch: int = _loss_default("pl_warmup_epoch")
    pseudo_scores: str | None = None  # EM_PL: an (N, C) .npy of scores in [0, 1], a row per formatted_train_* row
    # the training loop of a source (PROTOCOLS): its own settings below, each also a flag
    protocol: str = "zhou"
    head_lr_mult: float = 1.0  # the classifier head's lr is head_lr_mult x lr (Kim et al.'s lr_mult)
    early_stop: str = "first-drop"  # first-drop (Zhou), drop-N (Kim: val mAP > 3 below the best), none (Cole)
    drop_last: bool = False  # drop the last partial batch of the train, val and test loaders (Cole)
    test_pass: str = "best"  # the test set is scored after each improving epoch, every epoch, or at the end
    role_li_init: str = "float64"  # the dtype of ROLE+LI's logit(phase-1 estimates) (Cole: float32)
    # linear-probe mode: the name of a feature set (features.feature_set_name), None = train on images
    features: str | None = None
    # options of Cole et al.'s code base (which Zhou et al.'s inherits), off by default
    val_labels: str = "clean"  # model selection on the val part's full labels, or its "observed" single positives
    stop_metric: str = "map"  # the val metric that selects the best epoch (and stops early)
    freeze_backbone: bool = False  # train the classifier head only, on images (the backbone in eval mode)
    # GR-Loss's --linear_init (Chen et al.'s train.py): the first N epochs train the head alone, the backbone's
    # parameters without gradients but in train mode (its BatchNorm statistics still move); -l gr's schedules
    # start after them. 0: off, as in their code's default and every other source
    frozen_backbone_epochs: int = 0
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
    # issue 27 (docs/gpu-speed.md): CUDA graphs ("model": bit-identical; "step": Adam captured too, float rounding),
    # JPEGs decoded on the GPU (statistical), the val / test batch size (None: --batch-size, the original; float
    # rounding only)
    cuda_graphs: str = "off"
    image_decode: str = "pil"
    eval_batch_size: int | None = None
    # torchrun launches (distributed.py): SyncBatchNorm, and how long a collective waits for a silent rank
    sync_bn: bool = False
    dist_timeout: float = 600.0
    data_root: str = "data"
    results_dir: str = "results"
    keep_last: bool = False  # keep a finished run's last.pt (the resume state; it cannot be resumed any more)
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
    ll_cp_corrections: str = "above"  # LL_CP_CORRECTIONS: Kim et al.'s "above"; BoostLU's "at-or-above"

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
        # settings that a single loss reads
        one_loss = {"role_li_init": "role_li", "pseudo_scores": "EM_PL", "ll_cp_corrections": "ll_cp"}
        per_loss = {k for fn in LOSSES.values() for k in fn.hyperparameters} | set(APL_SETTINGS) | set(one_loss)
        used = set(LOSSES[self.loss].hyperparameters) | (set(APL_SETTINGS) if self.loss == "EM_APL" else set()) \
            | {k for k, loss in one_loss.items() if loss == self.loss}
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
    return build_config_with_sources(dataset, **overrides)[0]


def build_config_with_sources(dataset: str, **overrides) -> tuple[Config, dict[str, str]]:
    """`build_config`, and where each setting comes from (main.py --print-config): "command line", the
    dataset.json that set it, the table of config.py that did, or "Config default"."""
    root = Path(overrides.get("data_root") or Config.data_root)
    if root.name == dataset and root.is_dir() and not (root / dataset).exists():
        raise ValueError(f"--data-root {root} is the {dataset} folder itself: --data-root names the folder that holds "
                         f"{dataset}/; give --data-root {root.parent}")
    table, info = _dataset_settings(dataset, str(root))
    entry = dataset if dataset in DATASET_SETTINGS else "coco"
    if info.features and not overrides.get("features"):
        overrides = {**overrides, "features": "formatted"}  # features.FORMATTED: the dataset's own
    loss = overrides.get("loss") or Config.loss
    if info.single_positive and loss in ("bce", "iun"):
        raise ValueError(f"-l {loss} needs full training labels, but {root / dataset} holds single positives "
                         f"(dataset.json \"single_positive\": true); choose another loss")
    protocol = overrides.get("protocol") or Config.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    delta_rel = LL_DELTA_REL.get(dataset, LL_DELTA_REL["coco"])
    layers = [  # lowest first
        (f"config.DATASET_SETTINGS[{entry!r}]", table),
        ("config.LINEAR_SETTINGS (--features)", LINEAR_SETTINGS if overrides.get("features") else {}),
        (f"config.LL_DELTA_REL[{entry!r}]", {"delta_rel": delta_rel[loss]} if loss in delta_rel else {}),
        ("config.ROLE_EXPECTED_POSITIVES", {"expected_num_pos": ROLE_EXPECTED_POSITIVES[dataset]}
         if loss in EXPECTED_POSITIVES_LOSSES and dataset in ROLE_EXPECTED_POSITIVES else {}),
        ("config.BOOSTLU_DELTA_REL (--head boostlu)", {"delta_rel": BOOSTLU_DELTA_REL[loss]}
         if overrides.get("head") == "boostlu" and loss in BOOSTLU_DELTA_REL else {}),
        ("config.BOOSTLU_LL_CP_CORRECTIONS (--head boostlu)", {"ll_cp_corrections": BOOSTLU_LL_CP_CORRECTIONS}
         if overrides.get("head") == "boostlu" and loss == "ll_cp" else {}),
        (str(root / dataset / "dataset.json"), dict(info.defaults)),  # an own dataset's, under the protocol
        (f"config.PROTOCOLS[{protocol!r}]", {k: v for k, v in PROTOCOLS[protocol].items()
                                             if not (overrides.get("features") and k in PROTOCOL_SCHEDULE)}),
        ("command line", {k: v for k, v in overrides.items() if v is not None}),
    ]
    values, sources = {}, {}
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    cfg = Config(dataset=dataset, **values)
    try:
        validate(cfg)
    except ValueError as exc:  # a value that the dataset's dataset.json set: the file is named, not a flag
        from_file = [(k, v) for k, v in info.defaults if overrides.get(k) is None
                     and re.search(rf"(^|\s){re.escape(flag(k))}\s|^{k} ", str(exc))]
        if not from_file:
            raise
        (key, value), path = from_file[0], root / dataset
        raise ValueError(f"{path / 'dataset.json'}: \"defaults\" {key} {value!r} is not valid ({exc}); correct it "
                         f"there, or give {flag(key)} on the command line") from exc
    if cfg.loss in EXPECTED_POSITIVES_LOSSES and cfg.expected_num_pos > info.num_classes:
        raise ValueError(f"--expected-num-pos {cfg.expected_num_pos:g}: -l {cfg.loss}'s k, the mean number of "
                         f"positives per image, cannot exceed the {info.num_classes} classes of {dataset}")
    return cfg, {f.name: sources.get(f.name, "Config default") for f in dataclasses.fields(Config)
                 if f.name != "dataset"}


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
    if cfg.loss in EXPECTED_POSITIVES_LOSSES and cfg.expected_num_pos is None:
        raise ValueError(f"-l {cfg.loss} needs --expected-num-pos (the regulariser's k, the mean number of true "
                         f"positives per image): {cfg.dataset} has no default")
    if cfg.loss == "EM_PL" and not cfg.pseudo_scores:
        raise ValueError("-l EM_PL needs --pseudo-scores FILE.npy, a score in [0, 1] per training image and class "
                         "(python preproc/clip_scores.py writes CLIP's)")
    if cfg.loss == "EM_PL" and cfg.pl_neg_threshold > cfg.pl_pos_threshold:
        raise ValueError(f"--pl-neg-threshold {cfg.pl_neg_threshold} must not exceed --pl-pos-threshold "
                         f"{cfg.pl_pos_threshold}: an entry would be a positive and a negative pseudo-label")
    if not 0.0 <= cfg.neg_proportion <= 1.0:  # also rejects NaN
        raise ValueError(f"--neg-proportion must be in [0, 1], got {cfg.neg_proportion}")
    if cfg.loss == "EM_APL" and not 1 <= cfg.warmup_epoch < cfg.num_epochs:
        # k_c = floor(theta * U_c / (T - T_w)) needs T > T_w
        raise ValueError(f"EM_APL needs 1 <= --warmup-epoch < --epochs, got --warmup-epoch {cfg.warmup_epoch} "
                         f"and --epochs {cfg.num_epochs}")
    if cfg.warmup_epoch < 1:
        raise ValueError(f"--warmup-epoch must be >= 1, got {cfg.warmup_epoch}")
    for field, choices in (("image_cache", IMAGE_CACHE_MODES), ("amp", AMP_MODES), ("cuda_graphs", CUDA_GRAPH_MODES),
                           ("image_decode", IMAGE_DECODE_MODES)):
        if getattr(cfg, field) not in choices:
            raise ValueError(f"{flag(field)} must be one of {list(choices)}, got {getattr(cfg, field)!r}")
    if cfg.features is not None and cfg.loss == "role_li":
        raise ValueError("-l role_li fine-tunes the backbone after a linear phase; with --features (a linear "
                         "classifier only) use -l role")
    if not (math.isfinite(cfg.head_lr_mult) and cfg.head_lr_mult > 0):
        raise ValueError(f"--head-lr-mult must be a finite number > 0, got {cfg.head_lr_mult}")
    for field, choices in (("val_labels", VAL_LABELS), ("stop_metric", STOP_METRICS), ("protocol", PROTOCOLS),
                           ("early_stop", EARLY_STOPS), ("test_pass", TEST_PASSES), ("role_li_init", ROLE_LI_INITS)):
        if getattr(cfg, field) not in choices:
            raise ValueError(f"{flag(field)} must be one of {list(choices)}, got {getattr(cfg, field)!r}")
    for field in ("train_subsample", "val_subsample"):
        if not 0.0 < getattr(cfg, field) <= 1.0:
            raise ValueError(f"{flag(field)} must be in (0, 1], got {getattr(cfg, field)}")
    if cfg.freeze_backbone and cfg.features:
        raise ValueError("--freeze-backbone trains the head on images; --features is already a head on frozen "
                         "features: give one of them")
    if not 0 <= cfg.frozen_backbone_epochs < cfg.num_epochs:
        raise ValueError(f"--frozen-backbone-epochs must be in [0, --epochs - 1] = [0, {cfg.num_epochs - 1}], got "
                         f"{cfg.frozen_backbone_epochs}")
    if cfg.frozen_backbone_epochs and (cfg.features or cfg.freeze_backbone):
        raise ValueError(f"--frozen-backbone-epochs trains the backbone after its first epochs; "
                         f"{'--features' if cfg.features else '--freeze-backbone'} never trains it: give one of them")
    if not (math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a number of seconds > 0, got {cfg.dist_timeout}")
    # torch.manual_seed takes up to 64 bits (and each torchrun rank adds its rank); numpy's RandomState 32 bits
    for field, bits in (("pytorch_seed", 63), ("subsample_seed", 32), ("seed", 32), ("split_seed", 32)):
        if not 0 <= getattr(cfg, field) < 2 ** bits:
            raise ValueError(f"{flag(field)} must be an integer in [0, 2**{bits} - 1], got {getattr(cfg, field)}")
    if "delta_rel" in LOSSES[cfg.loss].hyperparameters:
        # LL-R / LL-Ct reject or correct delta_rel * (epoch - 1) % of a batch's entries, LL-Cp a fixed delta_rel %
        growing = cfg.loss != "ll_cp"
        reached = cfg.delta_rel * (cfg.num_epochs - 1 if growing else 1)
        if reached > 100:
            limit = 100 / (cfg.num_epochs - 1) if growing else 100
            raise ValueError(f"--delta-rel {cfg.delta_rel}" + (f" with --epochs {cfg.num_epochs}" if growing else "")
                             + f": -l {cfg.loss} would take {reached:g} % of a batch's entries by the last epoch, more "
                             f"than all of them; choose --delta-rel <= {limit:g}")
    if not 0.0 <= cfg.val_frac < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {cfg.val_frac}")
    _validate_head(cfg)
    _validate_gpu_speed(cfg)


def _validate_gpu_speed(cfg: Config) -> None:
    """Issue 27: --eval-batch-size and --image-decode (--cuda-graphs needs the device: cuda_graphs.check)."""
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.eval_batch_size is not None and cfg.drop_last and not cfg.features:
        raise ValueError("--eval-batch-size with --drop-last would score other val / test rows (each loader drops "
                         "its own last partial batch): leave --eval-batch-size unset with --drop-last")
    if cfg.image_decode == "device" and cfg.image_cache != "off" and not cfg.features:
        raise ValueError(f"--image-decode device decodes the JPEGs at every pass, --image-cache {cfg.image_cache} "
                         f"reads them decoded once: give one of them")


def _validate_head(cfg: Config) -> None:
    """Issue 25: --head and --boost-alpha."""
    if cfg.head not in HEADS:
        raise ValueError(f"--head must be one of {list(HEADS)}, got {cfg.head!r}")
    if cfg.ll_cp_corrections not in LL_CP_CORRECTIONS:
        raise ValueError(f"--ll-cp-corrections must be one of {list(LL_CP_CORRECTIONS)}, got "
                         f"{cfg.ll_cp_corrections!r}")
    if not (math.isfinite(cfg.boost_alpha) and cfg.boost_alpha > 0):
        raise ValueError(f"--boost-alpha must be a finite number > 0, got {cfg.boost_alpha}")
    if cfg.head != "linear" and cfg.features is not None:
        raise ValueError(f"--head {cfg.head} needs the backbone's feature map, which --features (a linear probe on "
                         f"pooled features) does not have: train on images, or use --head linear")
    if cfg.head != "linear" and cfg.loss == "role_li":
        raise ValueError(f"-l role_li starts from a linear classifier trained on pooled features; --head {cfg.head} "
                         f"has none: use --head linear, or -l role")
