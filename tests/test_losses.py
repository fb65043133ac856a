"""Tests for losses.py: values worked out entry by entry with `math`, gradients via autograd, and errors.

Reference: docs/original.md §6 (per-entry formulas, eps = 1e-5 inside the log,
sum over the B x C matrix divided by B * C, masked entries included in the denominator).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REALDATA, ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

from losses import compute_loss  # noqa: E402

from helpers import ent, nl, random_batch as _batch, sig, t  # noqa: E402  (hand computations in float64)

# A 2 x 3 example used throughout.
LOGITS = [[0.5, -1.0, 2.0],
          [-0.3, 1.5, 0.0]]
OBS = [[1.0, 0.0, 0.0],    # single positive per row, everything else unknown
       [0.0, 1.0, 0.0]]
TRUE = [[1.0, 1.0, 0.0],   # (0, 1) is an unobserved true positive
        [0.0, 1.0, 1.0]]   # (1, 2) is an unobserved true positive


def loss(name, logits, obs, true, **hp) -> float:
    return compute_loss(name, t(logits), t(obs), t(true), **hp).item()


# ------------------------------------------------------------------------------------------------------------
# values


def test_bce_hand_values():
    # bce is trained on the full labels: obs = TRUE
    p = [[sig(x) for x in row] for row in LOGITS]
    expected = (nl(p[0][0]) + nl(p[0][1]) + nl(1 - p[0][2])
                + nl(1 - p[1][0]) + nl(p[1][1]) + nl(p[1][2])) / 6
    assert loss("bce", LOGITS, TRUE, TRUE) == pytest.approx(expected, rel=1e-10)


def test_iun_hand_values():
    p = [[sig(x) for x in row] for row in LOGITS]
    # row 0: (0,0) observed positive; (0,1) unobserved true positive -> 0; (0,2) true negative
    # row 1: (1,0) true negative; (1,1) observed positive; (1,2) unobserved true positive -> 0
    expected = (nl(p[0][0]) + 0.0 + nl(1 - p[0][2])
                + nl(1 - p[1][0]) + nl(p[1][1]) + 0.0) / 6
    assert loss("iun", LOGITS, OBS, TRUE) == pytest.approx(expected, rel=1e-10)


def test_iun_ignores_unobserved_true_positives_and_uses_true_negatives():
    # A single unknown entry that is a true positive contributes exactly 0 (the mean over 1 x 2 entries is
    # then only the observed positive's term / 2).
    logits, obs = [[0.7, -2.0]], [[1.0, 0.0]]
    assert loss("iun", logits, obs, [[1.0, 1.0]]) == pytest.approx(nl(sig(0.7)) / 2, rel=1e-10)
    # ... and the same entry as a true negative gets neg_log(1 - p)
    assert loss("iun", logits, obs, [[1.0, 0.0]]) == pytest.approx((nl(sig(0.7)) + nl(1 - sig(-2.0))) / 2,
                                                                   rel=1e-10)


def test_an_hand_values():
    p = [[sig(x) for x in row] for row in LOGITS]
    expected = (nl(p[0][0]) + nl(1 - p[0][1]) + nl(1 - p[0][2])
                + nl(1 - p[1][0]) + nl(p[1][1]) + nl(1 - p[1][2])) / 6
    got = loss("an", LOGITS, OBS, TRUE)
    assert got == pytest.approx(expected, rel=1e-10)
    # the true labels play no role in AN
    assert loss("an", LOGITS, OBS, [[0.0] * 3, [0.0] * 3]) == pytest.approx(got, rel=1e-12)


def test_an_at_zero_logits_is_log2_with_eps():
    # p = 0.5 everywhere: every entry is -log(0.5 + 1e-5), whatever is observed
    assert loss("an", [[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]) == pytest.approx(-math.log(0.50001), rel=1e-12)
    assert -math.log(0.50001) == pytest.approx(0.6931272, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.2, 0.01])
def test_em_hand_values(alpha):
    p = [[sig(x) for x in row] for row in LOGITS]
    expected = (nl(p[0][0]) - alpha * ent(p[0][1]) - alpha * ent(p[0][2])
                - alpha * ent(p[1][0]) + nl(p[1][1]) - alpha * ent(p[1][2])) / 6
    assert loss("EM", LOGITS, OBS, TRUE, alpha=alpha) == pytest.approx(expected, rel=1e-10)


def test_em_small_number_by_hand():
    # logits 0 -> p = 0.5; H(0.5) = -log(0.50001); (1 P + 1 U) / 2 with alpha 0.2 -> 0.8 * 0.693127 / 2
    assert loss("EM", [[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]], alpha=0.2) == pytest.approx(
        0.8 * -math.log(0.50001) / 2, rel=1e-12)
    assert 0.8 * -math.log(0.50001) / 2 == pytest.approx(0.2772509, abs=1e-7)


def test_em_total_can_be_negative():
    # all unknown: every entry is -alpha * H(p) < 0, and the total is its mean
    logits = [[0.0, 1.0, -0.5]]
    got = loss("EM", logits, [[0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]], alpha=0.1)
    expected = -0.1 * sum(ent(sig(x)) for x in logits[0]) / 3
    assert got < 0
    assert got == pytest.approx(expected, rel=1e-10)
    # per-entry range [-alpha ln 2, 0]: at p = 0.5 it is (about) the minimum
    assert loss("EM", [[0.0]], [[0.0]], [[0.0]], alpha=0.1) == pytest.approx(-0.1 * math.log(2), rel=1e-4)


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.9), (0.2, 0.02)])
def test_em_apl_hand_values(alpha, beta):
    obs = [[1.0, -0.3, 0.0],
           [-1.0, 1.0, -0.05]]
    p = [[sig(x) for x in row] for row in LOGITS]

    def soft(pp, q):
        return beta * (q * nl(pp) + (1 - q) * nl(1 - pp))

    expected = (nl(p[0][0]) + soft(p[0][1], 0.3) - alpha * ent(p[0][2])
                + soft(p[1][0], 1.0) + nl(p[1][1]) + soft(p[1][2], 0.05)) / 6
    got = loss("EM_APL", LOGITS, obs, TRUE, alpha=alpha, beta=beta)
    assert got == pytest.approx(expected, rel=1e-10)
    # pseudo-labelled entries get no EM term: adding it would give a different number
    with_em = expected - alpha * (ent(p[0][1]) + ent(p[1][0]) + ent(p[1][2])) / 6
    assert got != pytest.approx(with_em, rel=1e-6)


def test_em_apl_without_pseudo_labels_equals_em():
    a = loss("EM_APL", LOGITS, OBS, TRUE, alpha=0.2, beta=0.5)
    b = loss("EM", LOGITS, OBS, TRUE, alpha=0.2)
    assert a == pytest.approx(b, rel=1e-12)


def test_normalisation_counts_masked_entries():
    # iun with only one entry set (the observed positive; the others are unobserved true positives -> 0):
    # the sum is divided by all 2 x 4 = 8 entries, not by the number of non-zero entries.
    logits = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    obs = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    true = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert loss("iun", logits, obs, true) == pytest.approx(nl(sig(1.0)) / 8, rel=1e-12)


def test_batch_of_one():
    logits, obs, true = [[1.2, -0.4, 0.1]], [[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]
    p = [sig(x) for x in logits[0]]
    got = loss("EM", logits, obs, true, alpha=0.1)
    assert got == pytest.approx((-0.1 * ent(p[0]) + nl(p[1]) - 0.1 * ent(p[2])) / 3, rel=1e-10)
    got = loss("an", logits, obs, true)
    assert got == pytest.approx((nl(1 - p[0]) + nl(p[1]) + nl(1 - p[2])) / 3, rel=1e-10)


def test_unused_hyperparameters_are_ignored():
    a = loss("an", LOGITS, OBS, TRUE)
    assert loss("an", LOGITS, OBS, TRUE, alpha=0.3, beta=0.7) == pytest.approx(a, rel=1e-12)


def test_returns_scalar_float32_for_float32_input():
    out = compute_loss("EM", torch.tensor(LOGITS), torch.tensor(OBS), torch.tensor(TRUE), alpha=0.2)
    assert out.ndim == 0
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# gradients


def grad_of(name, logits, obs, true, **hp) -> torch.Tensor:
    x = t(logits, requires_grad=True)
    compute_loss(name, x, t(obs), t(true), **hp).backward()
    return x.grad


def test_em_gradient_on_unknowns_is_alpha_g_p_1mp():
    logits = [[-2.5, -1.0, -0.2, 0.3],
              [1.1, 2.5, 0.7, -1.7]]
    obs = [[0.0] * 4, [0.0] * 4]
    alpha, n = 0.2, 8
    g = grad_of("EM", logits, obs, obs, alpha=alpha)
    for b in range(2):
        for c in range(4):
            x = logits[b][c]
            p = sig(x)
            assert g[b, c].item() == pytest.approx(alpha * x * p * (1 - p) / n, rel=1e-4)


def test_em_pulls_unknown_logits_towards_zero_from_both_sides():
    logits = [[-3.0, -0.5, 0.5, 3.0]]
    g = grad_of("EM", logits, [[0.0] * 4], [[0.0] * 4], alpha=0.1)
    # gradient descent moves logit - lr * grad: a positive logit has a positive gradient (moves down) and
    # a negative one a negative gradient (moves up)
    assert g[0, 0] < 0 and g[0, 1] < 0
    assert g[0, 2] > 0 and g[0, 3] > 0
    # symmetric around 0, and larger at |g| = 3 than at 0.5 here (the magnitude peaks near |g| ~ 1.5)
    assert g[0, 3].item() == pytest.approx(-g[0, 0].item(), rel=1e-3)
    assert abs(g[0, 3]) > abs(g[0, 2])
    # (about) zero at logit 0
    g0 = grad_of("EM", [[0.0]], [[0.0]], [[0.0]], alpha=0.1)
    assert abs(g0.item()) < 1e-6


def test_em_gradient_vanishes_for_confident_unknowns():
    g = grad_of("EM", [[12.0, -12.0, 1.5]], [[0.0] * 3], [[0.0] * 3], alpha=0.1)
    assert abs(g[0, 0]) < 1e-3 * abs(g[0, 2])
    assert abs(g[0, 1]) < 1e-3 * abs(g[0, 2])


def test_an_pushes_unknown_logits_down():
    logits = [[-2.0, 0.0, 1.5]]
    g = grad_of("an", logits, [[0.0] * 3], [[0.0] * 3])
    for c, x in enumerate(logits[0]):
        assert g[0, c] > 0
        # d/dg -log(1 - p + eps) = p (1 - p) / (1 - p + eps) ~ p
        assert g[0, c].item() == pytest.approx(sig(x) / 3, rel=1e-3)


@pytest.mark.parametrize("name,hp", [("an", {}), ("EM", {"alpha": 0.2}), ("EM", {"alpha": 0.01}),
                                     ("EM_APL", {"alpha": 0.1, "beta": 0.9}),
                                     ("EM_APL", {"alpha": 0.3, "beta": 0.02}), ("iun", {}), ("bce", {})])
def test_observed_positive_gradient_is_p_minus_1_for_every_loss(name, hp):
    # entry (0, 0) is an observed positive: its gradient does not depend on the loss or on alpha / beta
    logits = [[0.4, -0.2], [1.0, 0.3]]
    obs = [[1.0, 0.0], [0.0, 1.0]]
    g = grad_of(name, logits, obs, obs, **hp)
    assert g[0, 0].item() == pytest.approx((sig(0.4) - 1) / 4, rel=1e-4)
    assert g[1, 1].item() == pytest.approx((sig(0.3) - 1) / 4, rel=1e-4)


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0])
def test_pseudo_label_gradient_is_beta_p_minus_q_only(q):
    logits = [[0.8, -1.2], [0.1, 2.0]]
    obs = [[1.0, -q], [0.0, 0.0]]
    beta, n = 0.4, 4
    g1 = grad_of("EM_APL", logits, obs, obs, alpha=0.1, beta=beta)
    g2 = grad_of("EM_APL", logits, obs, obs, alpha=0.7, beta=beta)
    p = sig(-1.2)
    assert g1[0, 1].item() == pytest.approx(beta * (p - q) / n, rel=1e-3)
    # alpha does not touch the pseudo-labelled entry (no EM term there)
    assert g1[0, 1].item() == pytest.approx(g2[0, 1].item(), rel=1e-12)
    # ... but it does change the unknown entries
    assert g1[1, 0].item() != pytest.approx(g2[1, 0].item(), rel=1e-3)
    # doubling beta doubles the pseudo-label gradient
    g3 = grad_of("EM_APL", logits, obs, obs, alpha=0.1, beta=2 * beta)
    assert g3[0, 1].item() == pytest.approx(2 * g1[0, 1].item(), rel=1e-10)


# ------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss("no_such_loss", t(LOGITS), t(OBS), t(TRUE))


def test_shape_mismatch():
    with pytest.raises(ValueError):
        compute_loss("an", t(LOGITS), t([[1.0, 0.0], [0.0, 1.0]]), t(TRUE))
    with pytest.raises(ValueError):
        compute_loss("an", t(LOGITS), t(OBS), t([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):  # 1-D input is not a (B, C) batch
        compute_loss("an", t([0.1, 0.2]), t([1.0, 0.0]), t([1.0, 0.0]))


@pytest.mark.parametrize("name,hp", [("EM", {}), ("EM_APL", {"alpha": 0.1}), ("EM_APL", {"beta": 0.1})])
def test_missing_hyperparameter(name, hp):
    with pytest.raises(TypeError, match="alpha|beta"):
        compute_loss(name, t(LOGITS), t(OBS), t(TRUE), **hp)


def test_em_rejects_negative_obs():
    obs = [[1.0, -0.2, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError):
        compute_loss("EM", t(LOGITS), t(obs), t(TRUE), alpha=0.1)
    # EM_APL accepts the same matrix
    assert math.isfinite(loss("EM_APL", LOGITS, obs, TRUE, alpha=0.1, beta=0.2))


@pytest.mark.parametrize("name", ["bce", "iun", "an"])
def test_baselines_reject_negative_obs(name):
    with pytest.raises(ValueError, match="negative"):
        compute_loss(name, t(LOGITS), t([[1.0, -1.0, 0.0], [0.0, 1.0, 0.0]]), t(TRUE))


def test_iun_true_negative_overrides_an_observed_positive():
    # The original writes the true-negative term over the observed-positive one: an entry with obs = 1 and
    # true = 0 (impossible for generated labels, possible for hand-made ones) gets neg_log(1 - p) only.
    logits, obs, true = [[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 0.0]]
    expected = (nl(1 - sig(0.0)) + nl(1 - sig(1.0))) / 2
    assert loss("iun", logits, obs, true) == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# bit-identity with the original, values AND gradients (torch.equal, no tolerance)

def _original_style(name: str, logits: torch.Tensor, obs: torch.Tensor, true: torch.Tensor,
                    alpha: float = 0.1, beta: float = 0.2) -> torch.Tensor:
    """The original's computation, written independently of losses.py from docs/original.md §6: preds =
    sigmoid(logits) once; a float32 zero matrix filled by masked assignment, indexing preds[mask] afresh at
    every use; divided elementwise by a tensor of B*C and summed. Labels are float32, as the original's."""
    preds = torch.sigmoid(logits)
    obs, true = obs.float(), true.float()
    mtx = torch.zeros_like(preds)

    def nlog(x):
        return -torch.log(x + 1e-5)

    if name in ("bce", "an", "iun", "EM", "EM_APL"):
        mtx[obs == 1] = nlog(preds[obs == 1])
    if name in ("bce", "an"):
        mtx[obs == 0] = nlog(1.0 - preds[obs == 0])
    if name == "iun":
        mtx[true == 0] = nlog(1.0 - preds[true == 0])
    if name in ("EM", "EM_APL"):
        mtx[obs == 0] = -alpha * (preds[obs == 0] * nlog(preds[obs == 0]) +
                                  (1 - preds[obs == 0]) * nlog(1 - preds[obs == 0]))
    if name == "EM_APL":
        soft = -obs[obs < 0]
        mtx[obs < 0] = beta * (soft * nlog(preds[obs < 0]) + (1 - soft) * nlog(1 - preds[obs < 0]))
    denom = (mtx.shape[0] * mtx.shape[1]) * torch.ones_like(mtx)
    return (mtx / denom).sum()


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("name", ["bce", "iun", "an", "EM", "EM_APL"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_values_and_gradients_are_bit_identical_to_the_original(name, seed, where):
    # both ways of filling the matrix: the original's masked assignment, and the sync-free torch.where
    # version that training uses
    logits, obs, true = _batch(seed, pseudo=name == "EM_APL")
    if name == "bce":
        obs = true.clone()  # bce trains on the full labels
    if seed == 4:  # saturated predictions: p rounds to exactly 0 or 1, only eps keeps the logs finite
        logits = logits * 40
    ours_in = logits.clone().requires_grad_(True)
    ours = compute_loss(name, ours_in, obs, true, alpha=0.1, beta=0.2, where=where, checked=where)
    ours.backward()
    ref_in = logits.clone().requires_grad_(True)
    ref = _original_style(name, ref_in, obs, true)
    ref.backward()
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    assert torch.equal(ours_in.grad, ref_in.grad)
    assert ours_in.grad.abs().sum() > 0


def test_reusing_one_indexed_copy_changes_the_gradients():
    # Why the losses index preds[mask] at every use: the version that indexes once and reuses the copy has the
    # same values but sums the gradient contributions in another order. This checks that the batches above
    # are sensitive enough to tell the two apart (otherwise the bit-identity test above could not fail).
    logits, obs, _ = _batch(0)
    diffs = 0
    for variant in ("reuse", "original"):
        x = logits.clone().requires_grad_(True)
        p = torch.sigmoid(x)
        mtx = torch.zeros_like(p)
        mtx[obs == 1] = -torch.log(p[obs == 1] + 1e-5)
        if variant == "reuse":
            pu = p[obs == 0]
            mtx[obs == 0] = -0.1 * (pu * -torch.log(pu + 1e-5) + (1 - pu) * -torch.log(1 - pu + 1e-5))
        else:
            mtx[obs == 0] = -0.1 * (p[obs == 0] * -torch.log(p[obs == 0] + 1e-5) +
                                    (1 - p[obs == 0]) * -torch.log(1 - p[obs == 0] + 1e-5))
        (mtx / (mtx.numel() * torch.ones_like(mtx))).sum().backward()
        if variant == "reuse":
            reuse_grad = x.grad
        else:
            diffs = int((x.grad != reuse_grad).sum())
    assert diffs > 0
    x = logits.clone().requires_grad_(True)
    compute_loss("EM", x, obs, obs.clamp(min=0), alpha=0.1).backward()
    assert int((x.grad != reuse_grad).sum()) == diffs  # ours is the original's, not the reused copy's


@pytest.mark.parametrize("bad", [1.5, -1.5, 2.0])
def test_obs_outside_minus1_1(bad):
    obs = [[1.0, bad, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        compute_loss("EM_APL", t(LOGITS), t(obs), t(TRUE), alpha=0.1, beta=0.2)
