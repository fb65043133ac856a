"""Losses for single-positive multi-label learning, as in the original.

Every loss is a pure function  (entries, obs, true, **hyperparameters) -> None  that fills the (B, C) matrix of
per-entry losses group by group, `entries.set(mask, value)`, as the original's `loss[mask] = value`, reading the
predictions of a group as `entries.p(mask)`, the original's `preds[mask]`; entries no group sets stay 0.
`compute_loss` divides the matrix by a tensor holding B * C and sums it (zero entries still count in the
denominator). Label coding of `obs`: 1 = observed positive, 0 = unknown, -q (0 < q <= 1) = negative pseudo-label
with soft target q (written by APL).

With p = sigmoid(logits) and eps = 1e-5 (always added inside the log, never clamped):
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
# label estimates of the batch rows, LL-Cp's corrections of the batch when the loop computed them already, and
# the run's number of epochs (GR-Loss's schedules)
CONTEXT = ("epoch", "estimates", "corrected", "num_epochs")


def register(name: str, negative_obs: bool = False, ranges: Optional[Mapping[str, Range]] = None,
             corrections: Optional[Callable[..., torch.Tensor]] = None, mean: bool = False,
             masked: bool = False) -> Callable:
    """Add a loss under `name`; its keyword-only parameters are the hyperparameters it takes (those with a default
    are optional), except `epoch` (1-based, given by the training loop). `negative_obs`: the loss reads negative
    observed labels (-q); the others refuse them, and main.py checks that at load time. `ranges`: the valid
    `Range` of every hyperparameter (all must have one). `corrections(logits, obs, **same keywords)`: the (B, C)
    mask of entries that become observed positives for good after the step (LL-Cp), applied by the loop, which
    hands the mask to the loss (`corrected=`) so that it is computed once. `mean`: the matrix is reduced by
    `.mean()`, as the loss's authors' code does, instead of the original's division by a tensor of B*C and sum
    (the same number, other last bits). `masked`: always filled by boolean indexing, also when the caller asks for
    torch.where: for x ** q with a general q the CPU computes the last elements of a tensor by another code path
    (scalar, not vectorised), so the bits of an entry depend on its place in the tensor, and only the authors'
    masked subsets give their bits (one host sync per step on a GPU, as in their code)."""
    ranges = dict(ranges or {})

    def add(fn: Callable) -> Callable:
        params = [v for v in inspect.signature(fn).parameters.values()
                  if v.kind is inspect.Parameter.KEYWORD_ONLY and v.name not in CONTEXT]
        fn.context = tuple(k for k in inspect.signature(fn).parameters if k in CONTEXT)
        fn.corrections = corrections
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
        fn.mean, fn.masked = mean, masked
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

    def safe(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`values` of the group `mask` as an operand of a formula that is singular elsewhere (x ** gamma with
        gamma < 1 at x = 0): masked, they are the group's already; where, the other entries become 0.5, so their
        zero gradient cannot turn into 0 * inf = nan."""
        return torch.where(mask, values, 0.5) if self.where else values

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
# Comparison methods of the paper's table (docs/baselines.md). Zhou et al.'s code has none of them: each docstring
# names its source, and "reconstruction" where the paper's configuration could not be read. All take obs in {0, 1}.

EPS_RANGE = Range(-1.0, 1.0)  # label-smoothing rates; negative ones (N-LS) put the targets outside [0, 1]


@register("dw")
def down_weighted(e: Entries, obs: torch.Tensor, true: torch.Tensor) -> None:
    """DW (down-weighted assume negative): obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p) / (C - 1).

    Source: Cole et al. 2021, "Multi-label learning from single positive labels", `loss_wan` (the same
    division by the Python float C - 1).
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

    Source: Cole et al. 2021, `loss_an_ls` (their `ls_coef` = 0.1, our default).
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


@register("focal", ranges={"focal_gamma": NON_NEGATIVE})
def focal(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, focal_gamma: float = 2.0) -> None:
    """Focal loss on AN targets: obs = 1 -> (1 - p)^gamma neg_log(p); obs = 0 -> p^gamma neg_log(1 - p).

    The focusing weight is differentiated (as in the focal loss); no alpha balancing. gamma = focal_gamma,
    default 2 (Lin et al.'s). For 0 < gamma < 1 the weight's derivative is infinite where p rounds to exactly
    0 (positives: 1), which makes that entry's gradient nan, as in any implementation of the formula.
    Source: Lin et al., ICCV 2017, "Focal loss for dense object detection"; unknowns taken as negatives.
    """
    pos = obs == 1
    e.set(pos, e.safe(1 - e.p(pos), pos) ** focal_gamma * neg_log(e.p(pos)))
    u = obs == 0
    e.set(u, e.safe(e.p(u), u) ** focal_gamma * neg_log(1 - e.p(u)))


@register("asl", ranges={"asl_gamma_neg": NON_NEGATIVE, "asl_gamma_pos": NON_NEGATIVE,
                         "asl_clip": Range(0.0, 1.0, hi_open=True)})
def asymmetric(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, asl_gamma_neg: float = 4.0,
               asl_gamma_pos: float = 0.0, asl_clip: float = 0.05) -> None:
    """ASL on AN targets, with p_m = max(p - clip, 0):
    obs = 1 -> w_pos * neg_log(p),      w_pos = (1 - p)^gamma_pos;
    obs = 0 -> w_neg * neg_log(1 - p_m), w_neg = p_m^gamma_neg;
    the weights w are constants for autograd (computed under torch.no_grad, as the official code with
    `disable_torch_grad_focal_loss=True`, its default and the setting of its training scripts); below the clip
    an unknown entry has no gradient. Defaults gamma_neg = 4, gamma_pos = 0, clip = 0.05 (the official ones for
    multi-label training). eps is added inside the log (neg_log) rather than the official clamp(min=1e-8).
    Source: Ridnik et al., ICCV 2021, "Asymmetric loss for multi-label classification" (`AsymmetricLoss`);
    unknowns taken as negatives.
    """
    pos = obs == 1
    with torch.no_grad():
        w_pos = (1 - e.p(pos)) ** asl_gamma_pos
    e.set(pos, w_pos * neg_log(e.p(pos)))
    u = obs == 0
    with torch.no_grad():
        w_neg = (e.p(u) - asl_clip).clamp(min=0) ** asl_gamma_neg
    e.set(u, w_neg * neg_log(1 - (e.p(u) - asl_clip).clamp(min=0)))


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
# Large-Loss methods (Kim et al., CVPR 2022, "Large Loss Matters in Weakly Supervised Multi-Label Classification")

def large_loss_count(batch_entries: int, epoch: int, delta_rel: float, fixed: bool) -> int:
    """How many unknown entries of a batch count as large losses at `epoch` (1-based): none in epoch 1, then
    k = ceil(B*C * (epoch - 1) * delta_rel / 100) (LL-R, LL-Ct: the rate grows every epoch), or the fixed
    k = ceil(B*C * delta_rel / 100) (LL-Cp)."""
    if epoch < 2:
        return 0
    return math.ceil(batch_entries * (1 if fixed else epoch - 1) * delta_rel / 100)


def large_losses(logits: torch.Tensor, obs: torch.Tensor, k: int) -> torch.Tensor:
    """The (B, C) mask of the k unknown entries (obs == 0) whose assume-negative loss -log(1 - p + eps) is largest
    (exactly k, or all unknowns if fewer; the selection carries no gradient and needs no host sync)."""
    chosen = torch.zeros(obs.shape, dtype=torch.bool, device=obs.device)  # contiguous, whatever obs's strides
    unknown = obs == 0
    k = min(k, obs.numel())
    if k > 0:
        with torch.no_grad():
            an_loss = torch.where(unknown, neg_log(1 - torch.sigmoid(logits.detach())), -math.inf)
            chosen.view(-1)[an_loss.reshape(-1).topk(k).indices] = True
    return chosen & unknown


def _large_loss(e: Entries, obs: torch.Tensor, chosen: torch.Tensor, correct: bool) -> None:
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    kept = (obs == 0) & ~chosen
    e.set(kept, neg_log(1 - e.p(kept)))
    if correct:  # the large losses are taken as positives (target 1)
        e.set(chosen, neg_log(e.p(chosen)))


DELTA_REL = {"delta_rel": Range(0.0, math.inf, lo_open=True)}


@register("ll_r", ranges=DELTA_REL)
def large_loss_rejection(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                         epoch: int = 1) -> None:
    """LL-R: assume negative (obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p)), except that from epoch 2 the
    k = ceil(B*C (epoch-1) delta_rel / 100) largest unknown-entry losses of the batch are rejected (weight 0).
    Source: Kim et al. 2022, LL-R (their code: BCE with logits and a mean; here eps inside the log and the
    project's sum / (B*C), which is the same mean). delta_rel per dataset: config.LL_DELTA_REL."""
    _large_loss(e, obs, large_losses(e.logits, obs, large_loss_count(obs.numel(), epoch, delta_rel, False)), False)


@register("ll_ct", ranges=DELTA_REL)
def large_loss_correction_temporary(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                                    epoch: int = 1) -> None:
    """LL-Ct: as LL-R, but the large losses are corrected for this step instead: target 1, neg_log(p).
    Source: Kim et al. 2022, LL-Ct."""
    _large_loss(e, obs, large_losses(e.logits, obs, large_loss_count(obs.numel(), epoch, delta_rel, False)), True)


def _permanent_corrections(logits: torch.Tensor, obs: torch.Tensor, *, delta_rel: float = 0.2,
                           epoch: int = 1) -> torch.Tensor:
    return large_losses(logits, obs, large_loss_count(obs.numel(), epoch, delta_rel, True))


@register("ll_cp", ranges=DELTA_REL, corrections=_permanent_corrections)
def large_loss_correction_permanent(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, delta_rel: float = 0.2,
                                    epoch: int = 1, corrected: torch.Tensor | None = None) -> None:
    """LL-Cp: from epoch 2, the fixed k = ceil(B*C delta_rel / 100) largest unknown-entry losses of the batch are
    corrected (target 1, neg_log(p)) and become observed positives for good (the loop writes them into the
    training set's observed matrix, which the loaders read). `corrected`: that mask, when the caller computed it
    (the training loop, which needs it too); computed here otherwise. Source: Kim et al. 2022, LL-Cp as the paper
    describes it; their public code compares the scheme name with `is`, so LL-Cp runs there as LL-Ct."""
    if corrected is None:
        corrected = _permanent_corrections(e.logits, obs, delta_rel=delta_rel, epoch=epoch)
    _large_loss(e, obs, corrected, True)


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
    Source: Cole et al. 2021, `loss_role` and `expected_positive_regularizer` (norm '2').
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


# ================================================================================================================
# Methods since 2022 (issue 25). GR-Loss (Chen et al., IJCAI 2024, "Boosting Single Positive Multi-label
# Classification with Generalized Robust Loss"; code yan4xi1/GRLoss). BoostLU is a model head: models.CAMHead.

GR_EPS = 1e-7  # GR-Loss's LOG_EPSILON, inside the log of the observed positives (not the original's 1e-5)
ANY_REAL = Range(-math.inf, math.inf)
POSITIVE = Range(0.0, math.inf, lo_open=True)


def gr_schedule(start: float, end: float, epoch: int, num_epochs: int, lag: int) -> float:
    """GR-Loss's linear move of a parameter from `start` to `end` over the run, at `epoch` (1-based):
        start + (end - start) * max(epoch - lag, 0) / num_epochs,
    in the authors' float arithmetic and order (train.py, with their `linear_init` n = 0, its default). Their two
    schedules differ by one epoch: K's w and b lag by 1 (w = w0 in epoch 1, never wT), V's mu and sigma by 0
    (mu reaches muT in the last epoch)."""
    return start + (end - start) * max(epoch - lag, 0) / num_epochs


@register("gr", mean=True, masked=True,
          ranges={"gr_w_start": ANY_REAL, "gr_w_end": ANY_REAL, "gr_b_start": ANY_REAL, "gr_b_end": ANY_REAL,
                  "gr_mu_start": ANY_REAL, "gr_mu_end": ANY_REAL, "gr_sigma_start": POSITIVE,
                  "gr_sigma_end": POSITIVE, "gr_q2": POSITIVE, "gr_q3": POSITIVE})
def generalized_robust(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, gr_w_start: float = 0.0,
                       gr_w_end: float = 2.0, gr_b_start: float = -2.0, gr_b_end: float = -2.0,
                       gr_mu_start: float = 0.5, gr_mu_end: float = 0.8, gr_sigma_start: float = 2.0,
                       gr_sigma_end: float = 0.5, gr_q2: float = 0.01, gr_q3: float = 1.0, epoch: int = 1,
                       num_epochs: int) -> None:
    """GR-Loss (generalized robust loss), the mean over the B x C entries of
        obs = 1 -> -log(p + 1e-7)
        obs = 0 -> V(p) * [K(p) * (1 - p^q2) / q2 + (1 - K(p)) * (1 - (1 - p)^q3) / q3]
    with K(p) = 1 / (1 + exp(-(w p + b))) (a soft pseudo-label) and V(p) = exp(-0.5 ((p - mu) / sigma)^2) (a
    reweighting), both of p without gradient. w, b, mu, sigma move linearly over the run (`gr_schedule`: w, b
    lagging one epoch behind mu, sigma); q2, q3 are fixed. Defaults: the authors' (config.py: --beta [w0, wT, b0, bT]
    = [0, 2, -2, -2], --alpha [mu0, sigma0, muT, sigmaT] = [0.5, 2, 0.8, 0.5], --q2q3 [0.01, 1]), the same for
    every dataset (their code and README publish this one setting).
    Source: Chen et al., IJCAI 2024, Eq. of the GR loss; code yan4xi1/GRLoss, losses.py `GR_loss`, `loss1`,
    `loss2`, models.py `KFunction`, `VFunction`, and the schedule in train.py.
    """
    w = gr_schedule(gr_w_start, gr_w_end, epoch, num_epochs, lag=1)
    b = gr_schedule(gr_b_start, gr_b_end, epoch, num_epochs, lag=1)
    mu = gr_schedule(gr_mu_start, gr_mu_end, epoch, num_epochs, lag=0)
    sigma = gr_schedule(gr_sigma_start, gr_sigma_end, epoch, num_epochs, lag=0)
    p_fixed = e.preds.detach()
    k = 1 / (1 + torch.exp(-(w * p_fixed + b)))
    v = torch.exp(-0.5 * ((p_fixed - mu) / sigma) ** 2)
    pos = obs == 1
    e.set(pos, -torch.log(e.p(pos) + GR_EPS))
    u = obs == 0
    # always filled masked (register); e.safe would keep a torch.where filling finite where p^q is singular (q < 1)
    loss1 = (1 - torch.pow(e.safe(e.p(u), u), gr_q2)) / gr_q2
    loss2 = (1 - torch.pow(e.safe(1 - e.p(u), u), gr_q3)) / gr_q3
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
                 corrected: torch.Tensor | None = None, num_epochs: int | None = None,
                 **hparams: float) -> torch.Tensor:
    """Mean over the B x C entries of loss `name`. Hyperparameters the loss does not take are ignored; one it
    takes that is absent or None gets its default (TypeError if it has none, e.g. EM's alpha).

    `checked=True`: the labels were validated already (`check_observed`), skip the checks. `where=True`: fill
    by torch.where (see `Entries`). With both, nothing here waits for the device: the same bits, no sync.
    `epoch` (1-based) is passed to the losses whose schedule depends on it (the Large-Loss methods); `estimates`,
    the (B, C) label estimates of the batch rows in (0, 1), to ROLE (`role`); `corrected`, the (B, C) boolean
    mask of the loss's `corrections` for these logits and labels, to a loss that has them (LL-Cp), which then
    does not compute it again; `num_epochs`, the run's number of epochs, to a loss with a schedule over the run
    (GR-Loss).
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
    context = {"epoch": epoch, "estimates": estimates, "corrected": corrected, "num_epochs": num_epochs}
    if "estimates" in fn.context and estimates is None:
        raise TypeError(f"loss {name!r} needs the label estimates of the batch rows (estimates=)")
    if "num_epochs" in fn.context and num_epochs is None:
        raise TypeError(f"loss {name!r} needs the run's number of epochs (num_epochs=)")
    if estimates is not None and estimates.shape != logits.shape:
        raise ValueError(f"estimates must be (B, C) like the logits, got {tuple(estimates.shape)}")
    if corrected is not None and (corrected.shape != logits.shape or corrected.dtype != torch.bool):
        raise ValueError(f"corrected must be a (B, C) boolean mask like the logits, got {tuple(corrected.shape)} "
                         f"{corrected.dtype}")
    fn(entries, obs, true, **given, **{k: context[k] for k in fn.context})
    if fn.mean:
        loss = entries.loss.mean()
    else:
        # divide by a tensor holding B * C, then sum, as the original: on CUDA, dividing by a Python number
        # multiplies by its reciprocal instead, which differs in the last bit
        denominator = entries.loss.numel() * torch.ones_like(entries.loss)
        loss = (entries.loss / denominator).sum()
    return loss if entries.regulariser is None else loss + entries.regulariser
