"""Losses for single-positive multi-label learning, as in the original.

Every loss is a pure function  (entries, obs, true, **hyperparameters) -> None  that fills the (B, C) matrix of
per-entry losses group by group, `entries.set(mask, value)`, as the original's `loss[mask] = value`, reading the
predictions of a group as `entries.p(mask)`, the original's `preds[mask]`; entries no group sets stay 0.
`compute_loss` divides the matrix by a tensor holding B * C and sums it (zero entries still count in the
denominator). Label coding of `obs`: 1 = observed positive, 0 = unknown, -q (0 < q <= 1) = negative pseudo-label
with soft target q (written by APL).

With p = sigmoid(logits) and eps = 1e-5 (added inside the log, never clamped; focal and asl follow Ridnik et
al.'s code instead, which clamps: log(max(x, 1e-8))):
    neg_log(x) = -log(x + eps)
    H(p)       = p * neg_log(p) + (1 - p) * neg_log(1 - p)           (entropy)
To add a loss: write one function with the docstring formula and decorate it with @register("name", ranges=...).
Its hyperparameters are keyword-only parameters named as the Config fields (flag "--" + name with "_" -> "-");
those with a default may be left out of `compute_loss`; `ranges` gives each one's valid interval, which
`check_hyperparameters` checks (the CLI calls it before a run starts).

Values and gradients equal the original's bit for bit, in both ways of filling (tests/test_losses.py checks
them with torch.equal against an independent copy of the original's code): see `Entries`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

EPS = 1e-5
LOSSES: dict[str, Callable[..., None]] = {}


@dataclass(frozen=True)
class Range:
    """A real interval for a hyperparameter; closed unless an end is marked open, and always open at +-inf
    (so inf and nan are never valid). str() gives the usual notation, e.g. "[0, 1)"."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        lo_ok = x > self.lo if (self.lo_open or math.isinf(self.lo)) else x >= self.lo
        hi_ok = x < self.hi if (self.hi_open or math.isinf(self.hi)) else x <= self.hi
        return bool(lo_ok and hi_ok)

    def __str__(self) -> str:
        def num(v: float) -> str:
            return ("-inf" if v < 0 else "inf") if math.isinf(v) else f"{v:g}"
        left = "(" if (self.lo_open or math.isinf(self.lo)) else "["
        right = ")" if (self.hi_open or math.isinf(self.hi)) else "]"
        return f"{left}{num(self.lo)}, {num(self.hi)}{right}"


NON_NEGATIVE = Range(0.0, math.inf)
# Every hyperparameter of every registered loss, with its valid range (filled by `register`; one range per name).
HYPERPARAMETER_RANGES: dict[str, Range] = {}


def flag(field: str) -> str:
    """The command-line flag of a hyperparameter (Config field): "--" + name with "_" -> "-"."""
    return "--" + field.replace("_", "-")


# keyword-only parameters that the training loop supplies, not hyperparameters: the 1-based epoch, ROLE's
# label estimates of the batch rows, EM_PL's pseudo-label scores of the batch rows, and the run's number of epochs
# (GR-Loss's schedules)
CONTEXT = ("epoch", "estimates", "pseudo_scores", "num_epochs", "frozen_backbone_epochs")


def register(name: str, negative_obs: bool = False, ranges: Optional[Mapping[str, Range]] = None,
             corrections: Optional[Callable[..., torch.Tensor]] = None, plain_mean: bool = False,
             masked: bool = False) -> Callable:
    """Add a loss under `name`; its keyword-only parameters are the hyperparameters it takes (those with a default
    are optional), except `epoch` (1-based, given by the training loop). `negative_obs`: the loss reads negative
    observed labels (-q); the others refuse them, and main.py checks that at load time. `ranges`: the valid
    `Range` of every hyperparameter (all must have one). `corrections(logits, obs, **same keywords)`: the (B, C)
    mask of entries that become observed positives for good after the step (LL-Cp), applied by the loop.
    `plain_mean`: the loss is `matrix.mean()`, as its source reduces (Kim et al.), not the original's division by
    a tensor of B * C and sum (the two differ in the last bits). `masked`: always filled by boolean
    indexing, also when the caller asks for torch.where: for x ** q with a general q the CPU computes the last
    elements of a tensor by another code path (scalar, not vectorised), so the bits of an entry depend on its place
    in the tensor, and only the authors' masked subsets give their bits (one host sync per step on a GPU, as in
    their code)."""
    ranges = dict(ranges or {})

    def add(fn: Callable) -> Callable:
        params = [v for v in inspect.signature(fn).parameters.values()
                  if v.kind is inspect.Parameter.KEYWORD_ONLY and v.name not in CONTEXT]
        fn.context = tuple(k for k in inspect.signature(fn).parameters if k in CONTEXT)
        fn.corrections = corrections
        fn.plain_mean, fn.masked = plain_mean, masked
        fn.hyperparameters = tuple(v.name for v in params)
        fn.required = tuple(v.name for v in params if v.default is inspect.Parameter.empty)
        fn.defaults = {v.name: v.default for v in params if v.default is not inspect.Parameter.empty}
        if set(ranges) != set(fn.hyperparameters):
            raise TypeError(f"loss {name!r}: ranges {sorted(ranges)} must cover exactly its hyperparameters "
                            f"{sorted(fn.hyperparameters)}")
        for k, r in ranges.items():
            if HYPERPARAMETER_RANGES.setdefault(k, r) != r:
                raise TypeError(f"loss {name!r}: {k} has range {r}, another loss gives it {HYPERPARAMETER_RANGES[k]}")
            if k in fn.defaults and fn.defaults[k] not in r:
                raise TypeError(f"loss {name!r}: default {k} = {fn.defaults[k]} is outside {r}")
        fn.ranges = ranges
        fn.negative_obs = negative_obs
        LOSSES[name] = fn
        return fn
    return add


def neg_log(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(x + EPS)


class Entries:
    """The loss matrix being filled, and the predictions p = sigmoid(logits) it reads.

    masked (the original's code): `set` is `loss[mask] = value` and `p(mask)` is `p[mask]`, a fresh indexing at
    every use, as the original writes `preds[mask]` at each use (autograd then adds the gradient contributions
    in the original's order; one shared indexed copy would change the last bits).
    where (no host synchronisation, which boolean indexing needs on a GPU): every formula runs on the whole
    matrix and `set` selects with torch.where; `p(mask)` is a fresh view of p, standing in for each fresh
    indexing, so the gradient contributions arrive in the same order and the result is the same to the bit.
    Both need finite formulas on every entry, which eps guarantees.
    """

    def __init__(self, logits: torch.Tensor, where: bool) -> None:
        self.where, self.logits = where, logits
        self.preds = torch.sigmoid(logits)
        self.loss = torch.zeros_like(self.preds)
        self.regulariser: torch.Tensor | None = None  # a scalar added after the division by B * C (ROLE)

    def p(self, mask: torch.Tensor) -> torch.Tensor:
        return self.at(self.preds, mask)

    def at(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`values[mask]`, a fresh indexing (where: a fresh view) of labels or of any (B, C) operand."""
        return values.view_as(values) if self.where else values[mask]

    def matrix(self, mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A new (B, C) matrix: `value` on `mask`, 0 elsewhere (the original's `m = zeros_like(...); m[mask] = value`)."""
        if self.where:
            return torch.where(mask, value, torch.zeros_like(self.preds))
        m = torch.zeros_like(self.preds)
        m[mask] = value
        return m

    def set(self, mask: torch.Tensor, value: torch.Tensor) -> None:
        if self.where:
            self.loss = torch.where(mask, value, self.loss)
        else:
            self.loss[mask] = value


@register("iun")
def iun(e: Entries, obs: torch.Tensor, true: torch.Tensor) -> None:
    """"1 P. & All N.": obs = 1 -> neg_log(p); then true = 0 -> neg_log(1 - p) (overriding, as the original);
    unobserved true positives -> 0.

    The negatives come from the true labels (the original's corrected version, `true == 0`).
    Source: Zhou et al. 2022, `loss_iun` (a fix of Cole et al. 2021's `loss_iun`, which compares with -1).
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    e.set(true == 0, neg_log(1 - e.p(true == 0)))


@register("bce")
@register("an")
def assume_negative(e: Entries, obs: torch.Tensor, true: torch.Tensor) -> None:
    """obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p).

    `an` (assume negative) on the single positives; `bce` ("All P. & All N.", full supervision) is the same
    formula, trained on the full labels (the training loop passes them as `obs`).
    Source: Cole et al. 2021 / Zhou et al. 2022, `loss_an` and `loss_bce`.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    e.set(obs == 0, neg_log(1 - e.p(obs == 0)))


@register("EM", ranges={"alpha": NON_NEGATIVE})
def entropy_maximisation(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, alpha: float) -> None:
    """Entropy maximisation: obs = 1 -> neg_log(p); obs = 0 -> -alpha * H(p).

    On an unknown entry the gradient w.r.t. its logit g is alpha * g * p * (1 - p) (eps ignored): it pulls
    uncertain logits towards 0 (p = 0.5) and vanishes for confident ones.
    Source: Zhou et al. 2022, Eq. 3 and `loss_EM`.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, -alpha * (e.p(u) * neg_log(e.p(u)) + (1 - e.p(u)) * neg_log(1 - e.p(u))))


@register("EM_APL", negative_obs=True, ranges={"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE})
def entropy_maximisation_apl(e: Entries, obs: torch.Tensor, true: torch.Tensor, *,
                             alpha: float, beta: float) -> None:
    """EM plus asymmetric pseudo-labels: obs = 1 -> neg_log(p); obs = 0 -> -alpha * H(p);
    obs = -q < 0 -> beta * [q * neg_log(p) + (1 - q) * neg_log(1 - p)]  (soft BCE towards target q).

    Pseudo-labelled entries get only the beta term, not the EM term.
    Source: Zhou et al. 2022, Eq. 8 and `loss_EM_APL`.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, -alpha * (e.p(u) * neg_log(e.p(u)) + (1 - e.p(u)) * neg_log(1 - e.p(u))))
    pseudo = obs < 0
    q = -e.at(obs, pseudo)
    e.set(pseudo, beta * (q * neg_log(e.p(pseudo)) + (1 - q) * neg_log(1 - e.p(pseudo))))


# ------------------------------------------------------------------------------------------------------------
# Comparison methods of the paper's table (docs/original.md §6d). Zhou et al.'s code has none of them: each docstring
# names its source, and "reconstruction" where the paper's configuration could not be read. All take obs in {0, 1}.

EPS_RANGE = Range(-1.0, 1.0)  # label-smoothing rates; negative ones (N-LS) put the targets outside [0, 1]


@register("dw")
def down_weighted(e: Entries, obs: torch.Tensor, true: torch.Tensor) -> None:
    """DW (down-weighted assume negative): obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p) / (C - 1).

    Source: Cole et al. 2021, "Multi-label learning from single positive labels", `loss_wan` in
    elijahcole/single-positive-multi-label losses.py (the same division by the Python float C - 1); equal bit for
    bit (tests/test_baseline_losses.py).
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    e.set(obs == 0, neg_log(1.0 - e.p(obs == 0)) / float(obs.shape[1] - 1))


def _label_smoothing(e: Entries, obs: torch.Tensor, eps: float) -> None:
    """obs = 1 -> (1 - eps) neg_log(p) + eps neg_log(1 - p); obs = 0 -> (1 - eps) neg_log(1 - p) + eps neg_log(p)."""
    e.set(obs == 1, (1.0 - eps) * neg_log(e.p(obs == 1)) + eps * neg_log(1.0 - e.p(obs == 1)))
    e.set(obs == 0, (1.0 - eps) * neg_log(1.0 - e.p(obs == 0)) + eps * neg_log(e.p(obs == 0)))


@register("ls", ranges={"ls_eps": EPS_RANGE})
def label_smoothing(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, ls_eps: float = 0.1) -> None:
    """LS (assume negative with label smoothing), eps = ls_eps:
    obs = 1 -> (1 - eps) neg_log(p) + eps neg_log(1 - p);  obs = 0 -> (1 - eps) neg_log(1 - p) + eps neg_log(p).

    Source: Cole et al. 2021, `loss_an_ls` in elijahcole/single-positive-multi-label losses.py (their `ls_coef`
    = 0.1, our default); equal bit for bit (tests/test_baseline_losses.py).
    """
    _label_smoothing(e, obs, ls_eps)


@register("nls", ranges={"nls_eps": EPS_RANGE})
def negative_label_smoothing(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, nls_eps: float = -0.1) -> None:
    """N-LS (negative label smoothing): the LS formula with a negative eps = nls_eps:
    obs = 1 -> (1 - eps) neg_log(p) + eps neg_log(1 - p);  obs = 0 -> (1 - eps) neg_log(1 - p) + eps neg_log(p).

    Source: Wei et al., ICML 2022, "To smooth or not? When label smoothing meets noisy labels" (generalized label
    smoothing with rate r < 0, which for one sigmoid output is this formula with eps = r / 2). Zhou et al.'s rate
    is unknown: the default -0.1 (r = -0.2) is our reconstruction.
    """
    _label_smoothing(e, obs, nls_eps)


@register("l1r", ranges={"reg_lambda": NON_NEGATIVE})
def l1_regularised(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, reg_lambda: float = 0.1) -> None:
    """L1R: obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p) + lambda * |p|   (lambda = reg_lambda).

    Reconstruction (the paper's definition could not be read): AN plus an L1 penalty on the unknown entries'
    predictions (not on the weights); |p| = p for a sigmoid output. Like every term it is divided by B * C.
    Source: the L1R row of Zhou et al. 2022's table (no public code); the formula is ours.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, neg_log(1.0 - e.p(u)) + reg_lambda * e.p(u).abs())


@register("l2r", ranges={"reg_lambda": NON_NEGATIVE})
def l2_regularised(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, reg_lambda: float = 0.1) -> None:
    """L2R: obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p) + lambda * p^2   (lambda = reg_lambda).

    Reconstruction (the paper's definition could not be read): AN plus an L2 penalty on the unknown entries'
    predictions (not on the weights). Like every term it is divided by B * C.
    Source: the L2R row of Zhou et al. 2022's table (no public code); the formula is ours.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, neg_log(1.0 - e.p(u)) + reg_lambda * e.p(u) ** 2)


@register("entmin", ranges={"entmin_lambda": NON_NEGATIVE})
def entropy_minimisation(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, entmin_lambda: float = 0.1) -> None:
    """EntMin: obs = 1 -> neg_log(p); obs = 0 -> +lambda * H(p)   (lambda = entmin_lambda).

    Reconstruction: entropy minimisation on the unknown entries, the sign flip of EM; no negative term, so nothing
    stops all predictions going to 1 (the paper's EntMin row collapses).
    Source: Grandvalet & Bengio, NeurIPS 2004, "Semi-supervised learning by entropy minimization"; the EntMin row
    of Zhou et al. 2022's table (no public code).
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, entmin_lambda * (e.p(u) * neg_log(e.p(u)) + (1 - e.p(u)) * neg_log(1 - e.p(u))))


RIDNIK_EPS = 1e-8  # Ridnik et al.'s log clamp (`eps` of `AsymmetricLoss`): log(max(x, 1e-8)), no eps inside


def _ridnik_asymmetric(e: Entries, obs: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float,
                       weight_gradient: bool) -> None:
    """The per-entry matrix of Ridnik et al.'s `AsymmetricLoss.forward` with targets y = obs in {0, 1}, the whole
    matrix at once, in the source's order of operations (it has no masks; both fillings give these bits):
        xs_neg = min(1 - p + clip, 1) if clip > 0 else 1 - p
        L = -[y log(max(p, 1e-8)) + (1 - y) log(max(xs_neg, 1e-8))] * w
        w = (1 - pt) ** (gamma_pos y + gamma_neg (1 - y)),  pt = p y + xs_neg (1 - y)   (w = 1 if both gammas are 0)
    w is a constant for autograd unless `weight_gradient` (the source's disable_torch_grad_focal_loss=False).
    The source returns the sum of L; compute_loss divides by B * C, so its value and gradients are the source's
    divided by B * C."""
    xs_pos = e.preds
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = obs * torch.log(xs_pos.clamp(min=RIDNIK_EPS)) + (1 - obs) * torch.log(xs_neg.clamp(min=RIDNIK_EPS))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(weight_gradient and torch.is_grad_enabled()):
            pt = xs_pos * obs + xs_neg * (1 - obs)
            w = torch.pow(1 - pt, gamma_pos * obs + gamma_neg * (1 - obs))
        loss = loss * w
    e.loss = -loss


@register("focal", ranges={"focal_gamma": NON_NEGATIVE})
def focal(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, focal_gamma: float = 2.0) -> None:
    """Focal loss on AN targets (unknowns taken as negatives), gamma = focal_gamma (default 2, Lin et al.'s):
    obs = 1 -> -(1 - p)^gamma log(max(p, 1e-8));  obs = 0 -> -p^gamma log(max(1 - p, 1e-8)).

    Equals Ridnik et al.'s `AsymmetricLoss` (Alibaba-MIIL/ASL, src/loss_functions/losses.py) with gamma_neg =
    gamma_pos = gamma, clip = 0 and disable_torch_grad_focal_loss=False: the focusing weight is differentiated,
    as in Lin et al.'s focal loss; no alpha balancing. gamma = 0 is plain cross-entropy (log clamped at 1e-8).
    For 0 < gamma < 1 an entry whose weight's base is exactly 0 (p rounds to 1 on a positive, 0 on an unknown)
    gets a nan gradient, as in the source (the weight's derivative is infinite there).
    Source: Lin et al., ICCV 2017, "Focal loss for dense object detection"; the code: Ridnik et al. 2021.
    """
    _ridnik_asymmetric(e, obs, focal_gamma, focal_gamma, 0.0, weight_gradient=True)


@register("asl", ranges={"asl_gamma_neg": NON_NEGATIVE, "asl_gamma_pos": NON_NEGATIVE,
                         "asl_clip": Range(0.0, 1.0, hi_open=True)})
def asymmetric(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, asl_gamma_neg: float = 4.0,
               asl_gamma_pos: float = 0.0, asl_clip: float = 0.05) -> None:
    """ASL on AN targets (unknowns taken as negatives), with p_m = max(p - clip, 0) (clip > 0; else p_m = p):
    obs = 1 -> -w_pos log(max(p, 1e-8)),      w_pos = (1 - p)^gamma_pos;
    obs = 0 -> -w_neg log(max(1 - p_m, 1e-8)), w_neg = p_m^gamma_neg.

    Equals Ridnik et al.'s `AsymmetricLoss` (Alibaba-MIIL/ASL, src/loss_functions/losses.py) entry by entry, with
    disable_torch_grad_focal_loss=True (its default, and the setting of its train.py): the weights are
    constants for autograd, so below the clip an unknown entry has no gradient. Defaults gamma_neg = 4,
    gamma_pos = 0, clip = 0.05: those of its train.py for multi-label training (the class's own default
    gamma_pos is 1). The source sums the matrix; the project averages it over B x C (docs/original.md §6d).
    Source: Ridnik et al., ICCV 2021, "Asymmetric loss for multi-label classification".
    """
    _ridnik_asymmetric(e, obs, asl_gamma_neg, asl_gamma_pos, asl_clip, weight_gradient=False)


def check_hyperparameters(name: str, values: Mapping[str, object]) -> None:
    """Raise ValueError, naming the flag, if a hyperparameter of loss `name` in `values` lies outside its range.

    `values` may hold any fields (e.g. the whole Config): only those the loss takes are checked, and a missing
    or None one is left to its default (its absence for a required one is compute_loss's TypeError).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    fn = LOSSES[name]
    for k in fn.hyperparameters:
        v = values.get(k)
        if v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{flag(k)} must be a number in {fn.ranges[k]} for loss {name}, got {v!r}") from None
        if isinstance(v, bool) or x not in fn.ranges[k]:
            raise ValueError(f"{flag(k)} must be in {fn.ranges[k]} for loss {name}, got {v!r}")


# ----------------------------------------------------------------------------------------------------------------
# Large-Loss methods (Kim et al., CVPR 2022, "Large Loss Matters in Weakly Supervised Multi-Label Classification"),
# as their code runs them (snucml/LargeLossMatters: `losses.compute_batch_loss`, the schedule in `train.py`)

def clean_rate(epoch: int, delta_rel: float) -> float:
    """Kim et al.'s `clean_rate` during `epoch` (1-based): 1 in epoch 1, then lowered by delta_rel / 100 after every
    epoch, by repeated float subtraction as their loop does (a closed formula differs in the last bits, and then
    ceil can give another k)."""
    rate, step = 1.0, delta_rel / 100
    for _ in range(epoch - 1):
        rate -= step
    return rate


def large_loss_count(batch_entries: int, epoch: int, delta_rel: float, fixed: bool) -> int:
    """How many unknown entries of a batch of `batch_entries` = B*C entries are large losses at `epoch`, by Kim et
    al.'s arithmetic: none while clean_rate == 1 (epoch 1), then k = ceil(B*C * (1 - clean_rate)) (LL-R, LL-Ct: the
    rate grows by delta_rel % each epoch) or the fixed k = ceil(B*C * (delta_rel / 100)) (LL-Cp)."""
    rate = clean_rate(epoch, delta_rel)
    if rate == 1:
        return 0
    return math.ceil(batch_entries * (delta_rel / 100 if fixed else 1 - rate))


def _an_loss_matrix(logits: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Kim et al.'s per-entry loss: BCE with logits towards the observed labels (unknowns as negatives)."""
    return F.binary_cross_entropy_with_logits(logits, obs.clip(0), reduction="none")


def large_loss_threshold(loss_matrix: torch.Tensor, obs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unknown entries' losses with 0 elsewhere, the k-th largest of them), as Kim et al. rank: by BCE with
    logits, `(obs == 0) * loss`, topk over the flattened batch. k above B*C (where their topk raises) takes all."""
    with torch.no_grad():
        unobserved_loss = (obs == 0) * loss_matrix.detach()
        threshold = torch.topk(unobserved_loss.flatten(), min(k, unobserved_loss.numel())).values[-1]
    return unobserved_loss, threshold


def large_losses(logits: torch.Tensor, obs: torch.Tensor, k: int, strict: bool = False) -> torch.Tensor:
    """The (B, C) mask of the entries that Kim et al.'s loss rejects or corrects with k large losses: every entry
    whose unknown-entry loss is not below the k-th largest, ties included (so more than k with ties, and, when that
    loss is 0, the observed positives too, as in their code). `strict`: those strictly above it instead, LL-Cp's
    corrections for good (their `correction_idx`: k - 1 entries without ties). None when k = 0."""
    if k == 0:
        return torch.zeros(obs.shape, dtype=torch.bool, device=obs.device)
    unobserved_loss, threshold = large_loss_threshold(_an_loss_matrix(logits.detach(), obs.to(logits.dtype)), obs, k)
    return unobserved_loss > threshold if strict else ~(unobserved_loss < threshold)


def _large_loss(e: Entries, obs: torch.Tensor, epoch: int, delta_rel: float, correct: bool, fixed: bool) -> None:
    """Kim et al.'s `compute_batch_loss`: loss = BCE(logits, obs); from epoch 2, with t the k-th largest loss among
    the unknown entries, every entry whose unknown-entry loss is not below t gets, instead, 0 (LL-R) or
    BCE(logits, not obs) (LL-Ct, LL-Cp: target 1 for an unknown entry). Their mean over B x C (`plain_mean`)."""
    loss_matrix = _an_loss_matrix(e.logits, obs)
    k = large_loss_count(obs.numel(), epoch, delta_rel, fixed)
    if k == 0:
        e.loss = loss_matrix
        return
    unobserved_loss, threshold = large_loss_threshold(loss_matrix, obs, k)
    if correct:
        replacement = F.binary_cross_entropy_with_logits(e.logits, torch.logical_not(obs).to(e.logits.dtype),
                                                         reduction="none")
    else:
        replacement = torch.zeros_like(loss_matrix)
    e.loss = torch.where(unobserved_loss < threshold, loss_matrix, replacement)


DELTA_REL = {"delta_rel": Range(0.0, math.inf, lo_open=True)}


@register("ll_r", ranges=DELTA_REL, plain_mean=True)
def large_loss_rejection(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                         epoch: int = 1) -> None:
    """LL-R: BCE with logits on assume-negative targets, except that from epoch 2 the large losses among the
    batch's unknown entries (all those >= the k-th largest, k = ceil(B*C * (1 - clean_rate)), clean_rate lowered by
    delta_rel % per epoch) are rejected (loss 0). The mean over B x C.
    Source: Kim et al. 2022, `compute_batch_loss` with mod_scheme LL-R (snucml/LargeLossMatters); delta_rel per
    dataset: config.LL_DELTA_REL."""
    _large_loss(e, obs, epoch, delta_rel, correct=False, fixed=False)


@register("ll_ct", ranges=DELTA_REL, plain_mean=True)
def large_loss_correction_temporary(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                                    epoch: int = 1) -> None:
    """LL-Ct: as LL-R, but the large losses are corrected for this step instead: BCE with logits towards
    `not obs` (target 1 on an unknown entry). Source: Kim et al. 2022, `compute_batch_loss` with LL-Ct."""
    _large_loss(e, obs, epoch, delta_rel, correct=True, fixed=False)


def _permanent_corrections(logits: torch.Tensor, obs: torch.Tensor, *, delta_rel: float = 0.2, epoch: int = 1,
                           ties: bool = False) -> torch.Tensor:
    """LL-Cp's corrections for good: the entries whose unknown-entry loss is strictly above the k-th largest (Kim
    et al.'s `>`), or, `ties` (--ll-cp-corrections at-or-above), at or above it (BoostLU's `>=`)."""
    return large_losses(logits, obs, large_loss_count(obs.numel(), epoch, delta_rel, fixed=True), strict=not ties)


@register("ll_cp", ranges=DELTA_REL, corrections=_permanent_corrections, plain_mean=True)
def large_loss_correction_permanent(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                                    epoch: int = 1) -> None:
    """LL-Cp: from epoch 2, LL-Ct's correction with the fixed k = ceil(B*C * (delta_rel / 100)); the unknown
    entries whose loss is strictly above the k-th largest become observed positives for good (`corrections`, which
    the loop writes into the training set's observed matrix at the end of the epoch; each row comes once per epoch,
    so the loaders see it from the next epoch on, as with the original's per-epoch DataLoader workers).
    Source: Kim et al. 2022, `compute_batch_loss` and `train.py` with LL-Cp as their paper describes it: their code
    compares the scheme name with `is` (False for a parsed string), so there LL-Cp runs as LL-Ct."""
    _large_loss(e, obs, epoch, delta_rel, correct=True, fixed=True)


# ----------------------------------------------------------------------------------------------------------------
# ROLE (Cole et al., CVPR 2021, "Multi-label learning from single positive labels")

def expected_positive_regulariser(probs: torch.Tensor, expected_num_pos: float) -> torch.Tensor:
    """(mean over the batch of the summed probabilities of a row - k)^2: Cole et al.'s
    `expected_positive_regularizer` with norm '2'."""
    return (probs.sum(1).mean(0) - expected_num_pos) ** 2


@register("role_li", ranges={"expected_num_pos": Range(0.0, math.inf, lo_open=True)})
@register("role", ranges={"expected_num_pos": Range(0.0, math.inf, lo_open=True)})
def role(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, expected_num_pos: float,
         estimates: torch.Tensor) -> None:
    """ROLE (regularised online label estimation). With g = the label estimates of the batch rows (sigmoid of
    the learnable N x C estimate logits, `estimates`) and g', p' their values without gradient:
      loss matrix = 1/2 [obs = 1: neg_log(p) + neg_log(g)]
                  + 1/2 [g' neg_log(p) + (1 - g') neg_log(1 - p) + p' neg_log(g) + (1 - p') neg_log(1 - g)]
      plus, after the division by B * C, the expected-positive regulariser
                    1/2 [(mean_b sum_c p - k)^2 + (mean_b sum_c g - k)^2] / C^2,   k = expected_num_pos.
    So the classifier learns from the observed positives, the estimates and its regulariser only, and the
    estimates likewise (the cross terms are stop-gradient on the other side). k per dataset:
    config.ROLE_EXPECTED_POSITIVES (--expected-num-pos). `role_li` (ROLE+LI) is the same loss after a linear
    initialisation phase (train.py).
    Source: Cole et al. 2021, `loss_role` and `expected_positive_regularizer` (norm '2') in
    elijahcole/single-positive-multi-label losses.py; matrix and regulariser equal bit for bit (tests/test_role.py).
    """
    g, pos = estimates, obs == 1
    num_classes = obs.shape[1]
    g_fixed, p_fixed = g.detach(), e.preds.detach()
    p = e.preds
    positives = 0.5 * (e.matrix(pos, neg_log(e.p(pos))) + e.matrix(pos, neg_log(e.at(g, pos))))
    e.loss = positives + 0.5 * ((g_fixed * neg_log(p) + (1.0 - g_fixed) * neg_log(1.0 - p))
                                + (p_fixed * neg_log(g) + (1.0 - p_fixed) * neg_log(1.0 - g)))
    e.regulariser = 0.5 * (expected_positive_regulariser(p, expected_num_pos) / num_classes ** 2
                           + expected_positive_regulariser(g, expected_num_pos) / num_classes ** 2)



# ----------------------------------------------------------------------------------------------------------------
# Methods since 2021 (issue 26; docs/recent_methods.md): Hill and SPLC (Zhang et al. 2021), EPR (Cole et al. 2021),
# EM_PL (Xing et al. 2024, VLPL). Each equals its authors' code per entry; the reduction is the project's
# sum / (B*C) of every row (Zhang et al. sum: a constant factor, which Adam all but cancels).

FOCAL_MARGIN = {"focal_margin": NON_NEGATIVE, "focal_gamma": NON_NEGATIVE}


@register("hill", ranges={"hill_lambda": NON_NEGATIVE, **FOCAL_MARGIN})
def hill(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, hill_lambda: float = 1.5, focal_margin: float = 1.0,
         focal_gamma: float = 2.0) -> None:
    """Hill: with p_m = sigmoid(logit - margin),
    obs = 1 -> (1 - p_m)^gamma * -log(p_m)   (the focal margin loss; no eps, the weight differentiated);
    obs = 0 -> (lambda - p) * p^2            (the hill: at lambda = 1.5 its slope 2 lambda p - 3 p^2 vanishes as
                                              p -> 1, so confident unknowns, likely false negatives, are pushed less).
    Defaults lambda = 1.5, margin = 1, gamma = 2 (theirs, for every dataset). Their code multiplies each term by
    its 0/1 target, so an unknown entry whose p_m underflows to 0 (logit < -103) gets 0 * log(0) = nan there;
    here each group has its own formula, which is finite there and bit-identical elsewhere.
    Source: Zhang et al. 2021, "Simple and Robust Loss Design for Multi-Label Learning with Missing Labels",
    `Hill` (xinyu1205/robust-loss-mlml, src/loss_functions/losses.py).
    """
    # Their code computes on the whole matrix: so does this (a formula run on a group's gathered entries may round
    # the gradient's last bit otherwise, as a vector kernel's tail differs). 0.5 off the group keeps log and pow finite.
    pos = obs == 1
    p_margin = torch.where(pos, torch.sigmoid(e.logits - focal_margin), 0.5)
    e.set(pos, e.at((1 - p_margin) ** focal_gamma * -torch.log(p_margin), pos))
    u = obs == 0
    e.set(u, e.at((hill_lambda - e.preds) * e.preds ** 2, u))


@register("splc", ranges={"splc_tau": Range(0.0, 1.0), "splc_start_epoch": Range(1.0, math.inf), **FOCAL_MARGIN})
def splc(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, splc_tau: float = 0.6, splc_start_epoch: int = 2,
         focal_margin: float = 1.0, focal_gamma: float = 2.0, epoch: int = 1) -> None:
    """SPLC (self-paced loss correction) with the focal margin loss: with z = logit - margin on observed positives
    and z = logit elsewhere, p_z = sigmoid(z), log_sig = logsigmoid,
    obs = 1, or obs = 0 with p_z > tau from the epoch on  -> (1 - p_z)^gamma * -log_sig(z)   (the latter taken as
                                                             positives for this step);
    other obs = 0                                         -> p_z^gamma * -log_sig(-z).
    The focal weights are differentiated. Their schedule: the correction from their `change_epoch` = 1 of a
    0-based count, i.e. from epoch 2 here (splc_start_epoch, 1-based); tau = 0.6 (their 0.65 is for COCO with 75 %
    of the labels left only). Source: Zhang et al. 2021, `SPLC` (xinyu1205/robust-loss-mlml).
    """
    pos, u = obs == 1, obs == 0
    z = torch.where(pos, e.logits - focal_margin, e.logits)
    p_z = torch.sigmoid(z)  # on the whole matrix, as theirs (see `hill`)
    corrected = u & (p_z.detach() > splc_tau) if epoch >= splc_start_epoch else torch.zeros_like(u)
    positive, negative = pos | corrected, u & ~corrected
    e.set(positive, e.at(torch.where(positive, 1 - p_z, 0.5) ** focal_gamma * -F.logsigmoid(z), positive))
    e.set(negative, e.at(torch.where(negative, p_z, 0.5) ** focal_gamma * -F.logsigmoid(-z), negative))


@register("epr", ranges={"expected_num_pos": Range(0.0, math.inf, lo_open=True)})
def expected_positive_regularisation(e: Entries, obs: torch.Tensor, true: torch.Tensor, *,
                                     expected_num_pos: float) -> None:
    """EPR: obs = 1 -> neg_log(p); unknowns no term; plus, after the division by B * C, the expected-positive
    regulariser (mean_b sum_c p - k)^2 / C^2, k = expected_num_pos (config.ROLE_EXPECTED_POSITIVES, as ROLE).
    Source: Cole et al. 2021, `loss_epr` and `expected_positive_regularizer` (norm '2').
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    e.regulariser = expected_positive_regulariser(e.preds, expected_num_pos) / obs.shape[1] ** 2


PSEUDO_LABEL_RANGES = {"alpha": NON_NEGATIVE, "pl_beta_pos": NON_NEGATIVE, "pl_beta_neg": NON_NEGATIVE,
                       "pl_pos_threshold": Range(0.0, 1.0), "pl_neg_threshold": Range(0.0, 1.0),
                       "pl_warmup_epoch": NON_NEGATIVE}


@register("EM_PL", ranges=PSEUDO_LABEL_RANGES)
def entropy_maximisation_pseudo_labels(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, alpha: float,
                                       pl_beta_pos: float = 0.7, pl_beta_neg: float = 0.0,
                                       pl_pos_threshold: float = 0.3, pl_neg_threshold: float = 0.0,
                                       pl_warmup_epoch: int = 0, epoch: int = 1,
                                       pseudo_scores: torch.Tensor) -> None:
    """EM plus pseudo-labels from a per-image score matrix s (`pseudo_scores`: the (B, C) rows of --pseudo-scores).
    Up to epoch pl_warmup_epoch: EM. After it, with positive pseudo-labels PP = (obs = 0 and s > pos_threshold) and
    negative ones PN = (obs = 0 and s < neg_threshold; PN wins where both hold):
    obs = 1 -> neg_log(p);   PP -> beta_pos * (0.9 neg_log(p) + 0.1 neg_log(1 - p));
    PN -> beta_neg * (0.1 neg_log(p) + 0.9 neg_log(1 - p));   other obs = 0 -> -alpha * H(p).
    Defaults, theirs for every dataset: warm-up 0, pos_threshold 0.3, beta_pos 0.7, beta_neg 0 and no negatives
    (their negative pseudo-labels, the int(partial * C) lowest scores of a row, are off by default and their loss
    is commented out: such entries leave the EM term and get 0, which beta_neg = 0 reproduces). The comparisons
    run in the scores' float32, as theirs. Their s is the softmax over classes of CLIP image-text cosine
    similarities / 0.01 (preproc/clip_scores.py writes it), computed in the forward pass of a frozen CLIP, so
    the pseudo-labels are a fixed function of the image: here they come from a file written once.
    Source: Xing et al., CVPRW 2024, "VLPL: Vision Language Pseudo Labels for Multi-label Learning with Single
    Positive Labels", `loss_EM_PL` and `ImageClassifier.forward` (mvrl/VLPL, losses.py and models.py).
    """
    if epoch <= pl_warmup_epoch:  # their `P['epoch'] > P['warmup_epoch']`, 1-based epochs
        entropy_maximisation(e, obs, true, alpha=alpha)
        return
    u = obs == 0
    negative = u & (pseudo_scores < pl_neg_threshold)
    positive = u & (pseudo_scores > pl_pos_threshold) & ~negative
    unknown = u & ~positive & ~negative
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    e.set(unknown, -alpha * (e.p(unknown) * neg_log(e.p(unknown)) + (1 - e.p(unknown)) * neg_log(1 - e.p(unknown))))
    e.set(positive, pl_beta_pos * (0.9 * neg_log(e.p(positive)) + 0.1 * neg_log(1 - e.p(positive))))
    e.set(negative, pl_beta_neg * (0.1 * neg_log(e.p(negative)) + 0.9 * neg_log(1 - e.p(negative))))
# ---------------------------------------------------------------------------------------------------- (issue 26)



# ================================================================================================================
# Methods since 2022 (issue 25). GR-Loss (Chen et al., IJCAI 2024, "Boosting Single Positive Multi-label
# Classification with Generalized Robust Loss"; code yan4xi1/GRLoss). BoostLU is a model head: models.CAMHead.

GR_EPS = 1e-7  # GR-Loss's LOG_EPSILON, inside the log of the observed positives (not the original's 1e-5)
ANY_REAL = Range(-math.inf, math.inf)
POSITIVE = Range(0.0, math.inf, lo_open=True)


def gr_schedule(start: float, end: float, epoch: int, num_epochs: int, lag: int, frozen: int = 0) -> float:
    """GR-Loss's linear move of a parameter from `start` to `end` over the run, at `epoch` (1-based):
        start + (end - start) * max(epoch - n - lag, 0) / (num_epochs - n),
    in the authors' float arithmetic and order (train.py), where n = `frozen` is their `linear_init`: the epochs
    that train the head alone (--frozen-backbone-epochs), after which the schedules start. Their two schedules
    differ by one epoch: K's w and b lag by 1 (w = w0 in epoch n + 1, never wT), V's mu and sigma by 0 (mu reaches
    muT in the last epoch)."""
    return start + (end - start) * max(epoch - frozen - lag, 0) / (num_epochs - frozen)


@register("gr", plain_mean=True, masked=True,
          ranges={"gr_w_start": ANY_REAL, "gr_w_end": ANY_REAL, "gr_b_start": ANY_REAL, "gr_b_end": ANY_REAL,
                  "gr_mu_start": ANY_REAL, "gr_mu_end": ANY_REAL, "gr_sigma_start": POSITIVE,
                  "gr_sigma_end": POSITIVE, "gr_q2": POSITIVE, "gr_q3": POSITIVE})
def generalized_robust(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, gr_w_start: float = 0.0,
                       gr_w_end: float = 2.0, gr_b_start: float = -2.0, gr_b_end: float = -2.0,
                       gr_mu_start: float = 0.5, gr_mu_end: float = 0.8, gr_sigma_start: float = 2.0,
                       gr_sigma_end: float = 0.5, gr_q2: float = 0.01, gr_q3: float = 1.0, epoch: int = 1,
                       num_epochs: int, frozen_backbone_epochs: int = 0) -> None:
    """GR-Loss (generalized robust loss), the mean over the B x C entries of
        obs = 1 -> -log(p + 1e-7)
        obs = 0 -> V(p) * [K(p) * (1 - p^q2) / q2 + (1 - K(p)) * (1 - (1 - p)^q3) / q3]
    with K(p) = 1 / (1 + exp(-(w p + b))) (a soft pseudo-label) and V(p) = exp(-0.5 ((p - mu) / sigma)^2) (a
    reweighting), both of p without gradient. w, b, mu, sigma move linearly over the run (`gr_schedule`: w, b
    lagging one epoch behind mu, sigma; both start after the run's `frozen_backbone_epochs`, their --linear_init,
    0 by default); q2, q3 are fixed. Defaults: the authors' (config.py: --beta [w0, wT, b0, bT]
    = [0, 2, -2, -2], --alpha [mu0, sigma0, muT, sigmaT] = [0.5, 2, 0.8, 0.5], --q2q3 [0.01, 1]), the same for
    every dataset (their code and README publish this one setting).
    Source: Chen et al., IJCAI 2024, Eq. of the GR loss; code yan4xi1/GRLoss, losses.py `GR_loss`, `loss1`,
    `loss2`, models.py `KFunction`, `VFunction`, and the schedule in train.py.
    """
    frozen = frozen_backbone_epochs
    w = gr_schedule(gr_w_start, gr_w_end, epoch, num_epochs, lag=1, frozen=frozen)
    b = gr_schedule(gr_b_start, gr_b_end, epoch, num_epochs, lag=1, frozen=frozen)
    mu = gr_schedule(gr_mu_start, gr_mu_end, epoch, num_epochs, lag=0, frozen=frozen)
    sigma = gr_schedule(gr_sigma_start, gr_sigma_end, epoch, num_epochs, lag=0, frozen=frozen)
    p_fixed = e.preds.detach()
    k = 1 / (1 + torch.exp(-(w * p_fixed + b)))
    v = torch.exp(-0.5 * ((p_fixed - mu) / sigma) ** 2)
    pos = obs == 1
    e.set(pos, -torch.log(e.p(pos) + GR_EPS))
    u = obs == 0
    # always filled masked (register): the unknowns' own values, where p^q (q < 1) is finite
    loss1 = (1 - torch.pow(e.p(u), gr_q2)) / gr_q2
    loss2 = (1 - torch.pow(1 - e.p(u), gr_q3)) / gr_q3
    e.set(u, e.at(v, u) * (e.at(k, u) * loss1 + (1 - e.at(k, u)) * loss2))
# ================================================================================================================


def check_observed(name: str, obs: torch.Tensor) -> None:
    """The original's asserts on a batch's labels: obs in [-1, 1], and >= 0 unless the loss reads negatives.
    Each check reads the labels back to the host; the training loop runs them once at load time instead."""
    if ((obs < -1) | (obs > 1)).any():
        raise ValueError("obs must lie in [-1, 1]")
    if not LOSSES[name].negative_obs and (obs < 0).any():
        raise ValueError(f"loss {name} takes observed labels in {{0, 1}} but found negative entries (observed "
                         f"negatives, -1): regenerate them with generate_observed_labels.py --num-neg 0")


def compute_loss(name: str, logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor, *,
                 checked: bool = False, where: bool = False, epoch: int = 1, estimates: torch.Tensor | None = None,
                 pseudo_scores: torch.Tensor | None = None, num_epochs: int | None = None,
                 frozen_backbone_epochs: int = 0, **hparams: float) -> torch.Tensor:
    """Mean over the B x C entries of loss `name`. Hyperparameters the loss does not take are ignored; one it
    takes that is absent or None gets its default (TypeError if it has none, e.g. EM's alpha).

    `checked=True`: the labels were validated already (`check_observed`), skip the checks. `where=True`: fill
    by torch.where (see `Entries`). With both, nothing here waits for the device: the same bits, no sync.
    `epoch` (1-based) is passed to the losses whose schedule depends on it (the Large-Loss methods, SPLC,
    EM_PL); `estimates`, the (B, C) label estimates of the batch rows in (0, 1), to ROLE (`role`);
    `pseudo_scores`, the (B, C) score rows of the batch, to EM_PL; `num_epochs`, the run's number of epochs, to a
    loss with a schedule over the run (GR-Loss), and `frozen_backbone_epochs`, the run's first epochs that train
    the head alone (--frozen-backbone-epochs), after which GR-Loss's schedule starts.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    if logits.ndim != 2 or logits.shape != obs.shape or logits.shape != true.shape:
        raise ValueError(f"logits, obs and true must be (B, C) of one shape, got {tuple(logits.shape)}, "
                         f"{tuple(obs.shape)}, {tuple(true.shape)}")
    fn = LOSSES[name]
    given = {k: hparams[k] for k in fn.hyperparameters if hparams.get(k) is not None}
    missing = [k for k in fn.required if k not in given]
    if missing:
        raise TypeError(f"loss {name!r} needs hyperparameter(s) {missing}")
    if not checked:
        check_observed(name, obs)
    # Labels in the logits' dtype, as the original's float32 label tensors (so the matrix stays float32).
    obs, true = obs.to(logits.dtype), true.to(logits.dtype)
    entries = Entries(logits, where and not fn.masked)
    context = {"epoch": epoch, "estimates": estimates, "pseudo_scores": pseudo_scores, "num_epochs": num_epochs,
               "frozen_backbone_epochs": frozen_backbone_epochs}
    if "estimates" in fn.context and estimates is None:
        raise TypeError(f"loss {name!r} needs the label estimates of the batch rows (estimates=)")
    if "num_epochs" in fn.context and num_epochs is None:
        raise TypeError(f"loss {name!r} needs the run's number of epochs (num_epochs=)")
    if estimates is not None and estimates.shape != logits.shape:
        raise ValueError(f"estimates must be (B, C) like the logits, got {tuple(estimates.shape)}")
    if "pseudo_scores" in fn.context and (pseudo_scores is None or pseudo_scores.shape != logits.shape):
        raise TypeError(f"loss {name!r} needs the (B, C) pseudo-label scores of the batch rows (pseudo_scores=), got "
                        f"{None if pseudo_scores is None else tuple(pseudo_scores.shape)}")
    fn(entries, obs, true, **given, **{k: context[k] for k in fn.context})
    if fn.plain_mean:
        loss = entries.loss.mean()
    else:  # divide by a tensor holding B * C, then sum, as the original: on CUDA, dividing by a Python number
        # multiplies by its reciprocal instead, which differs in the last bit
        loss = (entries.loss / (entries.loss.numel() * torch.ones_like(entries.loss))).sum()
    return loss if entries.regulariser is None else loss + entries.regulariser
