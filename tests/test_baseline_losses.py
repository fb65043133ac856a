"""Tests for the comparison losses of losses.py: dw, ls, nls, l1r, l2r, entmin, focal, asl (docs/original.md §6d).

Values are worked out entry by entry with `math`, independently of losses.py; gradients analytically. Where a
loss equals public code, values and gradients are compared with torch.equal against a re-statement of that code
written here: `dw` and `ls` against Cole et al.'s `loss_wan` / `loss_an_ls` with their `compute_batch_loss`
(elijahcole/single-positive-multi-label losses.py), `asl` and `focal` against Ridnik et al.'s `AsymmetricLoss`
(Alibaba-MIIL/ASL src/loss_functions/losses.py) under the project's mean. Every loss: 'masked' and 'where'
filling give the same bits.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from losses import LOSSES, Entries, check_hyperparameters, compute_loss  # noqa: E402

from helpers import EPS, ent, nl, random_batch as _batch, sig, t  # noqa: E402  (hand computations in float64)

# A 2 x 3 example: one observed positive per row, the rest unknown.
LOGITS = [[0.5, -1.0, 2.0],
          [-0.3, 1.5, 0.0]]
OBS = [[1.0, 0.0, 0.0],
       [0.0, 1.0, 0.0]]
TRUE = [[1.0, 1.0, 0.0],
        [0.0, 1.0, 1.0]]
N = 6  # B * C
POS = [(0, 0), (1, 1)]
UNK = [(0, 1), (0, 2), (1, 0), (1, 2)]

NEW = ["dw", "ls", "nls", "l1r", "l2r", "entmin", "focal", "asl"]


def loss(name, logits=LOGITS, obs=OBS, true=TRUE, **hp) -> float:
    return compute_loss(name, t(logits), t(obs), t(true), **hp).item()


def grad_of(name, logits=LOGITS, obs=OBS, true=TRUE, **hp) -> torch.Tensor:
    x = t(logits, requires_grad=True)
    compute_loss(name, x, t(obs), t(true), **hp).backward()
    return x.grad


P = [[sig(x) for x in row] for row in LOGITS]


def hand_total(pos_term, unk_term, logits=LOGITS) -> float:
    p = [[sig(x) for x in row] for row in logits]
    return (sum(pos_term(p[i][j]) for i, j in POS) + sum(unk_term(p[i][j]) for i, j in UNK)) / N


# ------------------------------------------------------------------------------------------------------------
# values by hand


def test_dw_hand_values():
    # C = 3: the unknown entries are divided by C - 1 = 2
    expected = hand_total(nl, lambda p: nl(1 - p) / 2)
    assert loss("dw") == pytest.approx(expected, rel=1e-12)
    # and it is not AN (which would not divide)
    assert loss("an") != pytest.approx(expected, rel=1e-3)


def test_dw_divides_by_c_minus_1():
    # one row, C = 5, all logits 0: (neg_log(0.5) + 4 * neg_log(0.5) / 4) / 5 = 2 * neg_log(0.5) / 5
    got = loss("dw", [[0.0] * 5], [[1.0, 0, 0, 0, 0]], [[1.0, 0, 0, 0, 0]])
    assert got == pytest.approx(2 * nl(0.5) / 5, rel=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3, -0.2])
def test_ls_hand_values(eps):
    expected = hand_total(lambda p: (1 - eps) * nl(p) + eps * nl(1 - p),
                          lambda p: (1 - eps) * nl(1 - p) + eps * nl(p))
    assert loss("ls", ls_eps=eps) == pytest.approx(expected, rel=1e-12)
    assert loss("nls", nls_eps=eps) == pytest.approx(expected, rel=1e-12)


def test_ls_and_nls_defaults():
    ls_expected = hand_total(lambda p: 0.9 * nl(p) + 0.1 * nl(1 - p), lambda p: 0.9 * nl(1 - p) + 0.1 * nl(p))
    nls_expected = hand_total(lambda p: 1.1 * nl(p) - 0.1 * nl(1 - p), lambda p: 1.1 * nl(1 - p) - 0.1 * nl(p))
    assert loss("ls") == pytest.approx(ls_expected, rel=1e-12)
    assert loss("nls") == pytest.approx(nls_expected, rel=1e-12)
    assert ls_expected != pytest.approx(nls_expected, rel=1e-3)
    # a hyperparameter given as None takes the default too; other losses' hyperparameters are ignored
    assert loss("nls", nls_eps=None, ls_eps=0.4, alpha=0.3) == pytest.approx(nls_expected, rel=1e-12)


def test_negative_ls_pushes_harder_than_an_on_a_confident_positive():
    # d/dg of LS at an observed positive: -(1 - eps) p (1 - p) / (p + eps') + eps p (1 - p) / (1 - p + eps')
    x = 2.0
    p = sig(x)
    for eps in (0.1, -0.1):
        g = grad_of("ls", [[x]], [[1.0]], [[1.0]], ls_eps=eps)[0, 0].item()
        assert g == pytest.approx(-(1 - eps) * p * (1 - p) / (p + EPS) + eps * p * (1 - p) / (1 - p + EPS),
                                  rel=1e-10)
    g_nls = grad_of("nls", [[x]], [[1.0]], [[1.0]])[0, 0].item()
    g_an = grad_of("an", [[x]], [[1.0]], [[1.0]])[0, 0].item()
    assert g_nls < g_an < 0


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_l1r_and_l2r_hand_values(lam):
    assert loss("l1r", reg_lambda=lam) == pytest.approx(hand_total(nl, lambda p: nl(1 - p) + lam * abs(p)),
                                                        rel=1e-12)
    assert loss("l2r", reg_lambda=lam) == pytest.approx(hand_total(nl, lambda p: nl(1 - p) + lam * p * p),
                                                        rel=1e-12)
    # lambda = 0 is AN
    assert loss("l1r", reg_lambda=0.0) == pytest.approx(loss("an"), rel=1e-12)
    assert loss("l2r", reg_lambda=0.0) == pytest.approx(loss("an"), rel=1e-12)


def test_l1r_l2r_defaults_and_gradients():
    lam = 0.1
    assert loss("l1r") == pytest.approx(hand_total(nl, lambda p: nl(1 - p) + lam * p), rel=1e-12)
    assert loss("l2r") == pytest.approx(hand_total(nl, lambda p: nl(1 - p) + lam * p * p), rel=1e-12)
    g1, g2 = grad_of("l1r"), grad_of("l2r")
    for i, j in UNK:
        p = P[i][j]
        an = p * (1 - p) / (1 - p + EPS)
        assert g1[i, j].item() == pytest.approx((an + lam * p * (1 - p)) / N, rel=1e-10)
        assert g2[i, j].item() == pytest.approx((an + lam * 2 * p * p * (1 - p)) / N, rel=1e-10)
    for i, j in POS:  # the penalty is on the unknown entries only
        p = P[i][j]
        assert g1[i, j].item() == pytest.approx(-p * (1 - p) / (p + EPS) / N, rel=1e-10)
        assert g2[i, j].item() == pytest.approx(-p * (1 - p) / (p + EPS) / N, rel=1e-10)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_entmin_hand_values(lam):
    assert loss("entmin", entmin_lambda=lam) == pytest.approx(hand_total(nl, lambda p: lam * ent(p)), rel=1e-12)
    # the sign flip of EM: EM(alpha) on the unknown entries is -alpha * H
    em, entmin = loss("EM", alpha=lam), loss("entmin", entmin_lambda=lam)
    pos = sum(nl(P[i][j]) for i, j in POS) / N
    assert entmin - pos == pytest.approx(-(em - pos), rel=1e-12)


def test_entmin_default_and_gradient_pushes_away_from_half():
    lam = 0.1
    assert loss("entmin") == pytest.approx(hand_total(nl, lambda p: lam * ent(p)), rel=1e-12)
    g = grad_of("entmin")
    for i, j in UNK:
        x, p = LOGITS[i][j], P[i][j]
        # d/dg H(sigmoid(g)) = -g p (1 - p) (eps ignored): gradient descent moves g away from 0
        assert g[i, j].item() == pytest.approx(-lam * x * p * (1 - p) / N, rel=1e-3)
    assert abs(g[1, 2].item()) < 1e-12  # logit 0 (p = 0.5): a stationary point of H


def cl(x: float) -> float:
    """Ridnik et al.'s clamped log, negated: -log(max(x, 1e-8)) (focal and asl; no eps inside)."""
    return -math.log(max(x, 1e-8))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_focal_hand_values(gamma):
    expected = hand_total(lambda p: (1 - p) ** gamma * cl(p), lambda p: p ** gamma * cl(1 - p))
    assert loss("focal", focal_gamma=gamma) == pytest.approx(expected, rel=1e-12)
    if gamma == 0.0:  # cross-entropy, the log clamped rather than shifted by eps: close to AN, not equal
        assert loss("focal", focal_gamma=0.0) == pytest.approx(loss("an"), rel=1e-4)
        assert loss("focal", focal_gamma=0.0) != pytest.approx(loss("an"), rel=1e-9)


def test_focal_default_and_gradient_differentiates_the_weight():
    g_ = 2.0
    assert loss("focal") == pytest.approx(hand_total(lambda p: (1 - p) ** 2 * cl(p), lambda p: p ** 2 * cl(1 - p)),
                                          rel=1e-12)
    g = grad_of("focal")
    for i, j in UNK:
        p = P[i][j]
        dp = p * (1 - p)
        full = g_ * p ** (g_ - 1) * dp * cl(1 - p) + p ** g_ * dp / (1 - p)
        assert g[i, j].item() == pytest.approx(full / N, rel=1e-10)
    for i, j in POS:
        p = P[i][j]
        dp = p * (1 - p)
        full = -g_ * (1 - p) ** (g_ - 1) * dp * cl(p) - (1 - p) ** g_ * dp / p
        assert g[i, j].item() == pytest.approx(full / N, rel=1e-10)


# ASL: logits chosen so that one unknown entry is below the clip (p = sigmoid(-4) = 0.018 < 0.05)
ASL_LOGITS = [[0.5, -4.0, 2.0],
              [-0.3, 1.5, 0.0]]


def asl_hand(gneg, gpos, clip):
    def pm(p):
        return max(p - clip, 0.0)
    return hand_total(lambda p: (1 - p) ** gpos * cl(p), lambda p: pm(p) ** gneg * cl(1 - pm(p)), ASL_LOGITS)


@pytest.mark.parametrize("gneg,gpos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.1), (0.0, 0.0, 0.0), (3.0, 2.0, 0.0)])
def test_asl_hand_values(gneg, gpos, clip):
    got = loss("asl", ASL_LOGITS, asl_gamma_neg=gneg, asl_gamma_pos=gpos, asl_clip=clip)
    assert got == pytest.approx(asl_hand(gneg, gpos, clip), rel=1e-12)
    if (gneg, gpos, clip) == (0.0, 0.0, 0.0):  # cross-entropy, as focal with gamma 0
        assert got == loss("focal", ASL_LOGITS, focal_gamma=0.0)


def test_asl_defaults():
    assert loss("asl", ASL_LOGITS) == pytest.approx(asl_hand(4.0, 0.0, 0.05), rel=1e-12)
    assert loss("asl", ASL_LOGITS) != pytest.approx(asl_hand(4.0, 0.0, 0.0), rel=1e-6)  # the clip matters


def test_asl_clamps_the_log_where_eps_inside_would_not():
    # a positive with p rounding to 0 (logit -200 in float64): Ridnik's log(max(p, 1e-8)) gives -log(1e-8) = 18.42,
    # the project's other losses -log(0 + 1e-5) = 11.51
    got = loss("asl", [[-200.0]], [[1.0]], [[1.0]], asl_gamma_neg=0.0, asl_gamma_pos=0.0, asl_clip=0.0)
    assert got == pytest.approx(-math.log(1e-8), rel=1e-12)
    assert loss("an", [[-200.0]], [[1.0]], [[1.0]]) == pytest.approx(-math.log(1e-5), rel=1e-12)


@pytest.mark.parametrize("gneg,gpos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.1), (3.0, 2.0, 0.0)])
def test_asl_focusing_weight_has_no_gradient(gneg, gpos, clip):
    g = grad_of("asl", ASL_LOGITS, asl_gamma_neg=gneg, asl_gamma_pos=gpos, asl_clip=clip)
    p = [[sig(x) for x in row] for row in ASL_LOGITS]
    for i, j in UNK:
        q = p[i][j]
        dp = q * (1 - q)
        m = max(q - clip, 0.0)
        inside = 1.0 if q - clip > 0 else 0.0  # d p_m / d p
        constant_w = m ** gneg * inside * dp / (1 - m)
        differentiated = (constant_w + gneg * m ** (gneg - 1) * inside * dp * cl(1 - m)) if m > 0 else 0.0
        assert g[i, j].item() == pytest.approx(constant_w / N, rel=1e-10, abs=1e-300)
        if m > 0:
            assert g[i, j].item() != pytest.approx(differentiated / N, rel=1e-3)
        else:  # below the clip: no gradient at all
            assert g[i, j].item() == 0.0
    for i, j in POS:
        q = p[i][j]
        dp = q * (1 - q)
        constant_w = -(1 - q) ** gpos * dp / q
        assert g[i, j].item() == pytest.approx(constant_w / N, rel=1e-10)
        if gpos > 0:
            differentiated = constant_w - gpos * (1 - q) ** (gpos - 1) * dp * cl(q)
            assert g[i, j].item() != pytest.approx(differentiated / N, rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# bit-identity of asl and focal with Ridnik et al.'s AsymmetricLoss (values and gradients, torch.equal)


def ridnik_asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float,
                           clip: float, disable_torch_grad_focal_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridnik et al.'s `AsymmetricLoss.forward` (Alibaba-MIIL/ASL src/loss_functions/losses.py, read at commit
    8c9e0bd), re-stated from that reading in its order of operations: sigmoid once; the negative side 1 - p,
    shifted by the clip and capped at 1 when clip > 0; y log(p clamped at 1e-8) + (1 - y) log(that side clamped at
    1e-8); if a gamma is positive, multiplied in place by (1 - pt) ** (gamma_pos y + gamma_neg (1 - y)) with
    pt = p y + side (1 - y), grad mode switched off around the weight when the flag is set.
    Returns (the per-entry matrix L with the source's total = -L.sum(), the source's total)."""
    probs = torch.sigmoid(logits)
    negative_side = 1 - probs
    if clip > 0:
        negative_side = (negative_side + clip).clamp(max=1)
    entry = targets * torch.log(probs.clamp(min=1e-8))
    entry = entry + (1 - targets) * torch.log(negative_side.clamp(min=1e-8))
    if gamma_neg > 0 or gamma_pos > 0:
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(False)
        true_class_prob = probs * targets + negative_side * (1 - targets)
        weight = torch.pow(1 - true_class_prob, gamma_pos * targets + gamma_neg * (1 - targets))
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(True)
        entry *= weight
    return entry, -entry.sum()


def ridnik_as_the_project_averages(name: str, logits: torch.Tensor, obs: torch.Tensor, hp: dict) -> torch.Tensor:
    """The source's per-entry matrix, negated entry by entry, under compute_loss's mean: divided by a tensor
    holding B * C, then summed. focal = AsymmetricLoss(gamma, gamma, clip 0, disable_torch_grad_focal_loss=False)."""
    if name == "asl":
        args = (hp.get("asl_gamma_neg", 4.0), hp.get("asl_gamma_pos", 0.0), hp.get("asl_clip", 0.05), True)
    else:
        gamma = hp.get("focal_gamma", 2.0)
        args = (gamma, gamma, 0.0, False)
    entry, _ = ridnik_asymmetric_loss(logits, obs.float(), *args)
    per_entry = -entry
    return (per_entry / (per_entry.numel() * torch.ones_like(per_entry))).sum()


RIDNIK_CASES = [("asl", {}), ("asl", {"asl_gamma_pos": 1.0}),  # train.py's settings; the class's default gamma_pos
                ("asl", {"asl_gamma_neg": 2.0, "asl_gamma_pos": 1.0, "asl_clip": 0.1}),
                ("asl", {"asl_gamma_neg": 3.0, "asl_gamma_pos": 2.0, "asl_clip": 0.0}),
                ("asl", {"asl_gamma_neg": 0.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05}),
                ("asl", {"asl_gamma_neg": 0.0, "asl_gamma_pos": 0.0, "asl_clip": 0.0}),
                ("focal", {}), ("focal", {"focal_gamma": 1.0}), ("focal", {"focal_gamma": 3.5}),
                ("focal", {"focal_gamma": 0.5}), ("focal", {"focal_gamma": 0.0})]


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("name,hp", RIDNIK_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_asl_and_focal_are_bit_identical_to_ridnik(name, hp, seed, where):
    logits, obs, true = _batch(seed)
    saturated = seed == 3 and hp.get("focal_gamma", 2.0) >= 1  # (for 0 < gamma < 1 the source's gradient is nan)
    if saturated:  # p rounds to exactly 0 or 1
        logits = logits * 40
    x = logits.clone().requires_grad_(True)
    got = compute_loss(name, x, obs, true, where=where, checked=where, **hp)
    got.backward()
    y = logits.clone().requires_grad_(True)
    ref = ridnik_as_the_project_averages(name, y, obs, hp)
    ref.backward()
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, y.grad)
    assert x.grad.abs().sum() > 0
    if saturated:
        assert ((torch.sigmoid(logits) == 0) | (torch.sigmoid(logits) == 1)).any()


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asl_matrix_is_ridniks_and_his_sum_is_bc_times_the_mean(seed, where):
    """B * C = 1024, a power of two: the source's sum and its gradients are exactly 1024 times the project's mean
    and its gradients (so Adam sees the same steps up to its eps, 1e-8 against gradients 1024 times smaller)."""
    logits, obs, true = _batch(seed, b=16, c=64)
    entries = Entries(logits, where)
    LOSSES["asl"](entries, obs.float(), true.float(), **LOSSES["asl"].defaults)
    source_matrix, source_total = ridnik_asymmetric_loss(logits, obs.float(), 4.0, 0.0, 0.05, True)
    assert torch.equal(entries.loss, -source_matrix)
    assert torch.equal(entries.loss.sum(), source_total)
    x = logits.clone().requires_grad_(True)
    ours = compute_loss("asl", x, obs, true, where=where, checked=where)
    ours.backward()
    y = logits.clone().requires_grad_(True)
    _, theirs = ridnik_asymmetric_loss(y, obs.float(), 4.0, 0.0, 0.05, True)
    theirs.backward()
    assert torch.equal(ours * 1024, theirs)
    assert torch.equal(x.grad * 1024, y.grad) and y.grad.abs().sum() > 0


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_focal_is_asl_without_clip_but_with_the_weight_differentiated(gamma):
    logits, obs, true = _batch(5)
    results = []
    for name, hp in (("focal", {"focal_gamma": gamma}),
                     ("asl", {"asl_gamma_neg": gamma, "asl_gamma_pos": gamma, "asl_clip": 0.0})):
        x = logits.clone().requires_grad_(True)
        value = compute_loss(name, x, obs, true, **hp)
        value.backward()
        results.append((value, x.grad))
    (focal_value, focal_grad), (asl_value, asl_grad) = results
    assert torch.equal(focal_value, asl_value)  # the same matrix ...
    assert (focal_grad - asl_grad).abs().max() > 1e-3 * asl_grad.abs().max()  # ... other gradients


# ------------------------------------------------------------------------------------------------------------
# bit-identity with Cole et al.'s loss_wan and loss_an_ls (values and gradients, torch.equal)


def _cole_style(name: str, logits: torch.Tensor, obs: torch.Tensor, ls_coef: float = 0.1) -> torch.Tensor:
    """Cole et al.'s `loss_wan` / `loss_an_ls` and `compute_batch_loss` (elijahcole/single-positive-multi-label
    losses.py, read at commit 89152d5), re-stated: preds = sigmoid(logits) once, a zero matrix filled by masked
    assignment with preds[mask] indexed afresh at every use, the unknowns of wan divided by the Python float
    C - 1, the matrix divided elementwise by a tensor of B * C and summed. Labels float32."""
    preds = torch.sigmoid(logits)
    observed_labels = obs.float()
    batch_size, num_classes = preds.shape

    def neg_log(x):
        return -torch.log(x + 1e-5)

    loss_mtx = torch.zeros_like(preds)
    if name == "wan":
        loss_mtx[observed_labels == 1] = neg_log(preds[observed_labels == 1])
        loss_mtx[observed_labels == 0] = neg_log(1.0 - preds[observed_labels == 0]) / float(num_classes - 1)
    elif name == "an_ls":
        loss_mtx[observed_labels == 1] = (1.0 - ls_coef) * neg_log(preds[observed_labels == 1]) + \
            ls_coef * neg_log(1.0 - preds[observed_labels == 1])
        loss_mtx[observed_labels == 0] = (1.0 - ls_coef) * neg_log(1.0 - preds[observed_labels == 0]) + \
            ls_coef * neg_log(preds[observed_labels == 0])
    loss_denom_mtx = (num_classes * batch_size) * torch.ones_like(preds)
    return (loss_mtx / loss_denom_mtx).sum()


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("ours,cole,hp", [("dw", "wan", {}), ("ls", "an_ls", {}),
                                          ("ls", "an_ls", {"ls_eps": 0.25}), ("nls", "an_ls", {"nls_eps": -0.1})])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dw_and_ls_are_bit_identical_to_cole(ours, cole, hp, seed, where):
    logits, obs, true = _batch(seed)
    if seed == 3:  # saturated predictions: p rounds to exactly 0 or 1
        logits = logits * 40
    x = logits.clone().requires_grad_(True)
    got = compute_loss(ours, x, obs, true, where=where, checked=where, **hp)
    got.backward()
    y = logits.clone().requires_grad_(True)
    ref = _cole_style(cole, y, obs, ls_coef=next(iter(hp.values()), 0.1))
    ref.backward()
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert torch.equal(x.grad, y.grad)
    assert x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# 'masked' and 'where' filling: the same bits


@pytest.mark.parametrize("name,hp", [("dw", {}), ("ls", {}), ("nls", {}), ("l1r", {}), ("l2r", {"reg_lambda": 0.7}),
                                     ("entmin", {}), ("focal", {}), ("focal", {"focal_gamma": 1.0}),
                                     ("focal", {"focal_gamma": 0.5}),
                                     ("asl", {}), ("asl", {"asl_gamma_pos": 1.0, "asl_clip": 0.0}),
                                     ("asl", {"asl_gamma_neg": 2.0, "asl_gamma_pos": 3.0, "asl_clip": 0.2})])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_masked_and_where_filling_are_bit_identical(name, hp, seed):
    logits, obs, true = _batch(seed)
    if seed == 4 and hp.get("focal_gamma", 2.0) >= 1:  # saturated (gamma < 1 is singular at p = 0 in any filling)
        logits = logits * 40
    results = []
    for where in (False, True):
        x = logits.clone().requires_grad_(True)
        value = compute_loss(name, x, obs, true, where=where, checked=where, **hp)
        value.backward()
        results.append((value, x.grad))
    (v1, g1), (v2, g2) = results
    assert torch.isfinite(v1) and torch.isfinite(g1).all()
    assert torch.equal(v1, v2)
    assert torch.equal(g1, g2)
    assert g1.abs().sum() > 0


def test_focal_with_gamma_below_one_stays_finite_where_only_another_group_saturates():
    # (0, 0) is unknown with p == 1.0 exactly: the positive formula (1 - p) ** 0.5 is singular there. The group
    # that applies (the unknown one) is regular, so both fillings must give the same finite gradient.
    logits = torch.tensor([[20.0, -1.0], [0.3, 0.2]])
    obs = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    grads = []
    for where in (False, True):
        x = logits.clone().requires_grad_(True)
        compute_loss("focal", x, obs, obs, where=where, focal_gamma=0.5).backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all() and torch.equal(grads[0], grads[1])


def test_every_new_loss_is_registered_and_refuses_negative_obs():
    for name in NEW:
        assert name in LOSSES and not LOSSES[name].negative_obs
        with pytest.raises(ValueError, match="negative"):
            compute_loss(name, t(LOGITS), t([[1.0, -1.0, 0.0], [0.0, 1.0, 0.0]]), t(TRUE))
        assert LOSSES[name].__doc__ and "Source" in LOSSES[name].__doc__


def test_reconstructions_say_so():
    for name in ("l1r", "l2r", "entmin", "nls"):
        assert "reconstruction" in LOSSES[name].__doc__.lower()


# ------------------------------------------------------------------------------------------------------------
# hyperparameters: defaults, optional in compute_loss, ranges


def test_defaults_and_names():
    assert LOSSES["ls"].defaults == {"ls_eps": 0.1}
    assert LOSSES["nls"].defaults == {"nls_eps": -0.1}
    assert LOSSES["l1r"].defaults == {"reg_lambda": 0.1}
    assert LOSSES["l2r"].defaults == {"reg_lambda": 0.1}
    assert LOSSES["entmin"].defaults == {"entmin_lambda": 0.1}
    assert LOSSES["focal"].defaults == {"focal_gamma": 2.0}
    assert LOSSES["asl"].defaults == {"asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05}
    assert LOSSES["dw"].hyperparameters == ()
    # the five original losses keep alpha / beta required
    assert LOSSES["EM"].required == ("alpha",) and LOSSES["EM_APL"].required == ("alpha", "beta")
    for name in ("bce", "iun", "an"):
        assert LOSSES[name].hyperparameters == ()


def test_unknown_loss_name_still_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss("no_such_loss", t(LOGITS), t(OBS), t(TRUE))
    with pytest.raises(ValueError, match="unknown loss"):
        check_hyperparameters("no_such_loss", {})


@pytest.mark.parametrize("name,field,bad", [
    ("focal", "focal_gamma", -0.5), ("asl", "asl_gamma_neg", -1.0), ("asl", "asl_gamma_pos", -0.1),
    ("ls", "ls_eps", 1.5), ("ls", "ls_eps", -1.01), ("nls", "nls_eps", -2.0), ("nls", "nls_eps", 1.2),
    ("asl", "asl_clip", 1.0), ("asl", "asl_clip", -0.01), ("asl", "asl_clip", 3.0),
    ("l1r", "reg_lambda", -0.1), ("l2r", "reg_lambda", -1e-9), ("entmin", "entmin_lambda", -0.2),
    ("focal", "focal_gamma", math.inf), ("focal", "focal_gamma", math.nan), ("ls", "ls_eps", "abc"),
    ("EM", "alpha", -0.1), ("EM_APL", "beta", -0.3)])
def test_check_hyperparameters_rejects_with_the_flag(name, field, bad):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=flag):
        check_hyperparameters(name, {field: bad})


@pytest.mark.parametrize("name,values", [
    ("focal", {"focal_gamma": 0.0}), ("focal", {"focal_gamma": 5}), ("ls", {"ls_eps": 1.0}),
    ("ls", {"ls_eps": -1.0}), ("nls", {"nls_eps": -0.3}), ("asl", {"asl_clip": 0.0, "asl_gamma_neg": 0.0}),
    ("asl", {"asl_clip": 0.999}), ("l1r", {"reg_lambda": 0.0}), ("entmin", {"entmin_lambda": 2.0}),
    ("asl", {}), ("asl", {"asl_clip": None}),
    # only the loss's own hyperparameters are checked: the whole config can be passed
    ("ls", {"ls_eps": 0.1, "focal_gamma": -1.0, "asl_clip": 5.0, "alpha": None}),
    ("an", {"focal_gamma": -1.0})])
def test_check_hyperparameters_accepts(name, values):
    check_hyperparameters(name, values)


def test_range_messages_show_the_interval():
    with pytest.raises(ValueError, match=r"--asl-clip must be in \[0, 1\)"):
        check_hyperparameters("asl", {"asl_clip": 1.0})
    with pytest.raises(ValueError, match=r"--ls-eps must be in \[-1, 1\]"):
        check_hyperparameters("ls", {"ls_eps": 2.0})
    with pytest.raises(ValueError, match=r"--focal-gamma must be in \[0, inf\)"):
        check_hyperparameters("focal", {"focal_gamma": -2.0})


