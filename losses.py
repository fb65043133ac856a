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
To add a loss: write one function with the docstring formula and decorate it with @register("name").

Values and gradients equal the original's bit for bit, in both ways of filling (tests/test_losses.py checks
them with torch.equal against an independent copy of the original's code): see `Entries`.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

EPS = 1e-5
LOSSES: dict[str, Callable[..., None]] = {}


def register(name: str, negative_obs: bool = False) -> Callable:
    """Add a loss under `name`; its keyword-only parameters are the hyperparameters it takes. `negative_obs`:
    the loss reads negative observed labels (-q); the others refuse them, and main.py checks that at load time."""
    def add(fn: Callable) -> Callable:
        fn.hyperparameters = tuple(k for k, v in inspect.signature(fn).parameters.items()
                                   if v.kind is inspect.Parameter.KEYWORD_ONLY)
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
        self.where = where
        self.preds = torch.sigmoid(logits)
        self.loss = torch.zeros_like(self.preds)

    def p(self, mask: torch.Tensor) -> torch.Tensor:
        return self.preds.view_as(self.preds) if self.where else self.preds[mask]

    def at(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`values[mask]`, for label-valued operands (no gradient)."""
        return values if self.where else values[mask]

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


@register("EM")
def entropy_maximisation(e: Entries, obs: torch.Tensor, true: torch.Tensor, *, alpha: float) -> None:
    """Entropy maximisation: obs = 1 -> neg_log(p); obs = 0 -> -alpha * H(p).

    On an unknown entry the gradient w.r.t. its logit g is alpha * g * p * (1 - p) (eps ignored): it pulls
    uncertain logits towards 0 (p = 0.5) and vanishes for confident ones.
    Source: Zhou et al. 2022, Eq. 3 and `loss_EM`.
    """
    e.set(obs == 1, neg_log(e.p(obs == 1)))
    u = obs == 0
    e.set(u, -alpha * (e.p(u) * neg_log(e.p(u)) + (1 - e.p(u)) * neg_log(1 - e.p(u))))


@register("EM_APL", negative_obs=True)
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


def check_observed(name: str, obs: torch.Tensor) -> None:
    """The original's asserts on a batch's labels: obs in [-1, 1], and >= 0 unless the loss reads negatives.
    Each check reads the labels back to the host; the training loop runs them once at load time instead."""
    if ((obs < -1) | (obs > 1)).any():
        raise ValueError("obs must lie in [-1, 1]")
    if not LOSSES[name].negative_obs and (obs < 0).any():
        raise ValueError(f"loss {name} takes observed labels in {{0, 1}} but found negative entries (observed "
                         f"negatives, -1): regenerate them with generate_observed_labels.py --num-neg 0")


def compute_loss(name: str, logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor, *,
                 checked: bool = False, where: bool = False, **hparams: float) -> torch.Tensor:
    """Mean over the B x C entries of loss `name`. Hyperparameters the loss does not take are ignored.

    `checked=True`: the labels were validated already (`check_observed`), skip the checks. `where=True`: fill
    by torch.where (see `Entries`). With both, nothing here waits for the device: the same bits, no sync.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    if logits.ndim != 2 or logits.shape != obs.shape or logits.shape != true.shape:
        raise ValueError(f"logits, obs and true must be (B, C) of one shape, got {tuple(logits.shape)}, "
                         f"{tuple(obs.shape)}, {tuple(true.shape)}")
    fn = LOSSES[name]
    missing = [k for k in fn.hyperparameters if k not in hparams]
    if missing:
        raise TypeError(f"loss {name!r} needs hyperparameter(s) {missing}")
    if not checked:
        check_observed(name, obs)
    # Labels in the logits' dtype, as the original's float32 label tensors (so the matrix stays float32).
    obs, true = obs.to(logits.dtype), true.to(logits.dtype)
    entries = Entries(logits, where)
    fn(entries, obs, true, **{k: hparams[k] for k in fn.hyperparameters})
    # divide by a tensor holding B * C, then sum, as the original: on CUDA, dividing by a Python number
    # multiplies by its reciprocal instead, which differs in the last bit
    denominator = entries.loss.numel() * torch.ones_like(entries.loss)
    return (entries.loss / denominator).sum()
