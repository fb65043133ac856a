"""Losses for single-positive multi-label learning, as in the original.

Every loss is a pure function  (logits, obs, true, **hyperparameters) -> (B, C) matrix of per-entry losses,
registered by name, filled by masked assignment into a zero matrix as the original does (same values and
gradients, bit for bit). `compute_loss` divides that matrix by B * C and sums it (entries a loss leaves at
zero still count in the denominator). Label coding of `obs`: 1 = observed positive, 0 = unknown,
-q (0 < q <= 1) = negative pseudo-label with soft target q (written by APL).

With p = sigmoid(logits) and eps = 1e-5 (always added inside the log, never clamped):
    neg_log(x) = -log(x + eps)
    H(p)       = p * neg_log(p) + (1 - p) * neg_log(1 - p)           (entropy)
To add a loss: write one function with the docstring formula and decorate it with @register("name").
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

EPS = 1e-5
LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str) -> Callable:
    """Add a loss under `name`; its keyword-only parameters are the hyperparameters it takes."""
    def add(fn: Callable) -> Callable:
        fn.hyperparameters = tuple(k for k, v in inspect.signature(fn).parameters.items()
                                   if v.kind is inspect.Parameter.KEYWORD_ONLY)
        LOSSES[name] = fn
        return fn
    return add


def neg_log(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(x + EPS)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return p * neg_log(p) + (1 - p) * neg_log(1 - p)


def _require_nonnegative(obs: torch.Tensor, name: str) -> None:
    if (obs < 0).any():
        raise ValueError(f"{name} expects obs in {{0, 1}}, found negative values (pseudo-labels need EM_APL)")


@register("iun")
def iun(logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """"1 P. & All N.": obs = 1 -> neg_log(p); then true = 0 -> neg_log(1 - p) (overriding, as the original);
    unobserved true positives -> 0.

    The negatives come from the true labels (the original's corrected version, `true == 0`).
    """
    _require_nonnegative(obs, "iun")
    p = torch.sigmoid(logits)
    loss = torch.zeros_like(p)
    loss[obs == 1] = neg_log(p[obs == 1])
    loss[true == 0] = neg_log(1 - p[true == 0])
    return loss


@register("bce")
@register("an")
def assume_negative(logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """obs = 1 -> neg_log(p); obs = 0 -> neg_log(1 - p).

    `an` (assume negative) on the single positives; `bce` ("All P. & All N.", full supervision) is the same
    formula, trained on the full labels (the training loop passes them as `obs`).
    """
    _require_nonnegative(obs, "bce/an")
    p = torch.sigmoid(logits)
    loss = torch.zeros_like(p)
    loss[obs == 1] = neg_log(p[obs == 1])
    loss[obs == 0] = neg_log(1 - p[obs == 0])
    return loss


@register("EM")
def entropy_maximisation(logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor, *,
                         alpha: float) -> torch.Tensor:
    """Entropy maximisation: obs = 1 -> neg_log(p); obs = 0 -> -alpha * H(p).

    On an unknown entry the gradient w.r.t. its logit g is alpha * g * p * (1 - p) (eps ignored): it pulls
    uncertain logits towards 0 (p = 0.5) and vanishes for confident ones.
    """
    _require_nonnegative(obs, "EM")
    p = torch.sigmoid(logits)
    loss = torch.zeros_like(p)
    loss[obs == 1] = neg_log(p[obs == 1])
    loss[obs == 0] = -alpha * entropy(p[obs == 0])
    return loss


@register("EM_APL")
def entropy_maximisation_apl(logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor, *,
                             alpha: float, beta: float) -> torch.Tensor:
    """EM plus asymmetric pseudo-labels: obs = 1 -> neg_log(p); obs = 0 -> -alpha * H(p);
    obs = -q < 0 -> beta * [q * neg_log(p) + (1 - q) * neg_log(1 - p)]  (soft BCE towards target q).

    Pseudo-labelled entries get only the beta term, not the EM term.
    """
    p = torch.sigmoid(logits)
    loss = torch.zeros_like(p)
    loss[obs == 1] = neg_log(p[obs == 1])
    loss[obs == 0] = -alpha * entropy(p[obs == 0])
    pseudo = obs < 0
    q, p_pseudo = -obs[pseudo], p[pseudo]
    loss[pseudo] = beta * (q * neg_log(p_pseudo) + (1 - q) * neg_log(1 - p_pseudo))
    return loss


def compute_loss(name: str, logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor,
                 **hparams: float) -> torch.Tensor:
    """Mean over the B x C entries of loss `name`. Hyperparameters the loss does not take are ignored."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
    if logits.ndim != 2 or logits.shape != obs.shape or logits.shape != true.shape:
        raise ValueError(f"logits, obs and true must be (B, C) of one shape, got {tuple(logits.shape)}, "
                         f"{tuple(obs.shape)}, {tuple(true.shape)}")
    fn = LOSSES[name]
    needed = fn.hyperparameters
    missing = [k for k in needed if k not in hparams]
    if missing:
        raise TypeError(f"loss {name!r} needs hyperparameter(s) {missing}")
    if ((obs < -1) | (obs > 1)).any():
        raise ValueError("obs must lie in [-1, 1]")
    # Labels in the logits' dtype, as the original's float32 label tensors (so the matrix stays float32).
    obs, true = obs.to(logits.dtype), true.to(logits.dtype)
    loss_matrix = fn(logits, obs, true, **{k: hparams[k] for k in needed})
    # divide, then sum: the original's order of operations (bit-identical values)
    return (loss_matrix / loss_matrix.numel()).sum()
