"""Hill, SPLC (Zhang et al. 2021), EPR (Cole et al. 2021) and EM_PL (Xing et al. 2024, VLPL): values and gradients
bit for bit against independent re-statements of the authors' code, schedules epoch by epoch, hand values, and the
per-dataset defaults pinned to the authors' published settings.

The references below are written from reading the authors' public code (xinyu1205/robust-loss-mlml
src/loss_functions/losses.py: `Hill`, `SPLC` with reduction 'none'; elijahcole/single-positive-multi-label
losses.py: `loss_epr`; mvrl/VLPL losses.py `loss_EM_PL` and models.py `ImageClassifier.forward`), in their own
style (dense target arithmetic, or boolean indexing), then reduced as this project reduces every loss: the matrix
divided by a tensor holding B * C and summed.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import config
from losses import LOSSES, compute_loss

from helpers import nl, random_batch, sig

SEEDS = [0, 1, 2, 3]


def project_reduction(loss_mtx: torch.Tensor) -> torch.Tensor:
    return (loss_mtx / (loss_mtx.numel() * torch.ones_like(loss_mtx))).sum()


def zhang_hill(logits, targets, lamb=1.5, margin=1.0, gamma=2.0):
    """Zhang et al.'s `Hill.forward`, reduction 'none'."""
    logits_margin = logits - margin
    pred_pos = torch.sigmoid(logits_margin)
    pred_neg = torch.sigmoid(logits)
    pt = (1 - pred_pos) * targets + (1 - targets)
    focal_weight = pt ** gamma
    los_pos = targets * torch.log(pred_pos)
    los_neg = (1 - targets) * -(lamb - pred_neg) * pred_neg ** 2
    loss = -(los_pos + los_neg)
    loss *= focal_weight
    return loss


def zhang_splc(logits, targets, epoch, tau=0.6, change_epoch=1, margin=1.0, gamma=2.0):
    """Zhang et al.'s `SPLC.forward`, reduction 'none' (`epoch` counted from 0, as their training loop)."""
    logits = torch.where(targets == 1, logits - margin, logits)
    if epoch >= change_epoch:
        targets = torch.where(torch.sigmoid(logits) > tau, torch.tensor(1), targets)
    pred = torch.sigmoid(logits)
    pt = (1 - pred) * targets + pred * (1 - targets)
    focal_weight = pt ** gamma
    los_pos = targets * F.logsigmoid(logits)
    los_neg = (1 - targets) * F.logsigmoid(-logits)
    loss = -(los_pos + los_neg)
    loss *= focal_weight
    return loss


def cole_neg_log(x):
    return -torch.log(x + 1e-5)


def cole_epr(preds, observed_labels, expected_num_pos):
    """Cole et al.'s `loss_epr` + `compute_batch_loss`."""
    loss_mtx = torch.zeros_like(observed_labels)
    loss_mtx[observed_labels == 1] = cole_neg_log(preds[observed_labels == 1])
    reg_loss = (preds.sum(1).mean(0) - expected_num_pos) ** 2 / (observed_labels.shape[1] ** 2)
    return project_reduction(loss_mtx) + reg_loss


def vlpl_pseudo_labels(similarity, threshold):
    """VLPL's `ImageClassifier.forward` (resnet50 branch, its default): positives where similarity > threshold."""
    logits_pl = torch.zeros_like(similarity)
    return torch.where(similarity > threshold, torch.tensor(1, dtype=torch.float32), logits_pl)


def vlpl_em_pl(preds, observed_labels, pseudo_labels, P, with_negative_term=False):
    """VLPL's `loss_EM_PL` (+ `compute_batch_loss`); `with_negative_term`: its commented-out negative block put back."""
    if P["epoch"] > P["warmup_epoch"]:
        final_labels = torch.where(observed_labels == 0, pseudo_labels, observed_labels)
        loss_mtx = torch.zeros_like(preds)
        loss_mtx[observed_labels == 1] = cole_neg_log(preds[observed_labels == 1])
        loss_mtx[final_labels == 0] = -P["alpha"] * (preds[final_labels == 0] * cole_neg_log(preds[final_labels == 0])
                                                     + (1 - preds[final_labels == 0])
                                                     * cole_neg_log(1 - preds[final_labels == 0]))
        mask_pos = (observed_labels == 0) & (pseudo_labels == 1)
        loss_mtx[mask_pos] = P["beta_pos"] * (0.9 * cole_neg_log(preds[mask_pos])
                                              + 0.1 * cole_neg_log(1 - preds[mask_pos]))
        if with_negative_term:
            mask_neg = (observed_labels == 0) & (pseudo_labels == -1)
            loss_mtx[mask_neg] = P["beta_neg"] * (0.1 * cole_neg_log(preds[mask_neg])
                                                  + 0.9 * cole_neg_log(1 - preds[mask_neg]))
    else:
        loss_mtx = torch.zeros_like(preds)
        loss_mtx[observed_labels == 1] = cole_neg_log(preds[observed_labels == 1])
        loss_mtx[observed_labels == 0] = -P["alpha"] * (
            preds[observed_labels == 0] * cole_neg_log(preds[observed_labels == 0])
            + (1 - preds[observed_labels == 0]) * cole_neg_log(1 - preds[observed_labels == 0]))
    return project_reduction(loss_mtx)


def batch(seed: int, saturated: bool = False):
    """random_batch's logits (x 25 and clipped to [-85, 85] when `saturated`: p rounds to exactly 1 above ~17, and
    sigmoid(logit - 1) stays a normal float32 so that Zhang et al.'s Hill is finite) and observed labels (float32)."""
    logits, obs, true = random_batch(seed)
    if saturated:
        logits = (25 * logits).clamp(-85, 85)
    return logits, obs.float(), true.float()


def ours_and_grad(name, logits, obs, true, where, **kw):
    x = logits.clone().requires_grad_(True)
    value = compute_loss(name, x, obs, true, where=where, checked=where, **kw)
    value.backward()
    return value, x.grad


def reference_and_grad(fn, logits):
    y = logits.clone().requires_grad_(True)
    value = fn(y)
    value.backward()
    return value, y.grad


def assert_bit_identical(ours, ref):
    (v1, g1), (v2, g2) = ours, ref
    assert v1.dtype == torch.float32 and torch.isfinite(v1) and torch.isfinite(g1).all()
    assert torch.equal(v1, v2) and torch.equal(g1, g2)
    assert g1.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# Hill


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("saturated", [False, True], ids=["plain", "saturated"])
@pytest.mark.parametrize("hp", [{}, {"hill_lambda": 2.0, "focal_margin": 0.5, "focal_gamma": 1.0},
                                {"focal_margin": 0.0, "focal_gamma": 0.0}])
@pytest.mark.parametrize("seed", SEEDS)
def test_hill_equals_zhang(seed, hp, saturated, where):
    logits, obs, true = batch(seed, saturated)
    ours = ours_and_grad("hill", logits, obs, true, where, **hp)
    theirs = dict(lamb=hp.get("hill_lambda", 1.5), margin=hp.get("focal_margin", 1.0), gamma=hp.get("focal_gamma", 2.0))
    assert_bit_identical(ours, reference_and_grad(lambda y: project_reduction(zhang_hill(y, obs, **theirs)), logits))


def test_hill_by_hand():
    # one row: a positive at logit 2 and unknowns at 0 and 3; C = 3
    got = compute_loss("hill", torch.tensor([[2.0, 0.0, 3.0]], dtype=torch.float64),
                       torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    pm = sig(2.0 - 1.0)
    positive = (1 - pm) ** 2 * -math.log(pm)  # the focal margin loss: 0.0227
    unknowns = (1.5 - 0.5) * 0.5 ** 2 + (1.5 - sig(3.0)) * sig(3.0) ** 2  # 0.25 + 0.4967
    assert got.item() == pytest.approx((positive + unknowns) / 3, rel=1e-12)
    assert (positive + unknowns) / 3 == pytest.approx(0.2565, abs=1e-4)


def test_hill_weighs_confident_unknowns_less_than_an_does():
    # the hill (1.5 - p) p^2 has its top at p = 1: at p = 0.9 its slope 3p - 3p^2 = 0.27 is under 3 % of AN's
    # -log(1 - p) slope 1 / (1 - p) = 10, so confident unknowns (likely false negatives) are pushed down less
    logit = torch.tensor([[math.log(9.0)]], requires_grad=True)  # p = 0.9, an unknown entry
    compute_loss("hill", logit, torch.zeros(1, 1), torch.zeros(1, 1)).backward()
    hill_slope = logit.grad.item() / (0.9 * 0.1)  # d loss / d p = (d loss / d logit) / (p (1 - p))
    assert hill_slope == pytest.approx(0.27, rel=1e-5)
    an_logit = torch.tensor([[math.log(9.0)]], requires_grad=True)
    compute_loss("an", an_logit, torch.zeros(1, 1), torch.zeros(1, 1)).backward()
    assert hill_slope < 0.03 * an_logit.grad.item() / (0.9 * 0.1)


def test_hill_where_zhang_is_nan():
    # an unknown whose sigmoid(logit - 1) underflows to 0: Zhang et al.'s 0 * log(0) is nan; ours is the hill term
    logits = torch.tensor([[3.0, -120.0]])
    obs = torch.tensor([[1.0, 0.0]])
    assert torch.isnan(zhang_hill(logits, obs)[0, 1])
    value, grad = ours_and_grad("hill", logits, obs, obs, where=True)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert torch.equal(value, project_reduction(torch.stack([zhang_hill(logits, obs)[0, 0], torch.tensor(0.0)])[None]))
    # a positive there is infinite in both (their log has no eps)
    assert torch.isinf(compute_loss("hill", torch.tensor([[-120.0]]), torch.ones(1, 1), torch.ones(1, 1)))
    assert torch.isinf(zhang_hill(torch.tensor([[-120.0]]), torch.ones(1, 1))).all()


# ------------------------------------------------------------------------------------------------------------
# SPLC


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("saturated", [False, True], ids=["plain", "saturated"])
@pytest.mark.parametrize("seed", SEEDS)
def test_splc_equals_zhang_epoch_by_epoch(seed, saturated, where):
    logits, obs, true = batch(seed, saturated)
    values = []
    for epoch in range(1, 5):  # ours 1-based, theirs 0-based: their change_epoch = 1 is our epoch 2
        ours = ours_and_grad("splc", logits, obs, true, where, epoch=epoch)
        ref = reference_and_grad(lambda y: project_reduction(zhang_splc(y, obs, epoch - 1)), logits)
        assert_bit_identical(ours, ref)
        values.append(ours[0])
    # the correction starts at epoch 2 and is the same later (it depends on the logits only)
    assert values[0] != values[1] and values[1] == values[2] == values[3]


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("hp", [{"splc_tau": 0.65, "splc_start_epoch": 3},
                                {"splc_tau": 0.3, "splc_start_epoch": 1, "focal_margin": 0.0, "focal_gamma": 1.0}])
def test_splc_options_equal_zhang(hp, where):
    logits, obs, true = batch(5)
    for epoch in range(1, 5):
        ours = ours_and_grad("splc", logits, obs, true, where, epoch=epoch, **hp)
        ref = reference_and_grad(lambda y: project_reduction(zhang_splc(
            y, obs, epoch - 1, tau=hp["splc_tau"], change_epoch=hp["splc_start_epoch"] - 1,
            margin=hp.get("focal_margin", 1.0), gamma=hp.get("focal_gamma", 2.0))), logits)
        assert_bit_identical(ours, ref)


def test_splc_by_hand():
    # unknowns at logits 1 (p = 0.731 > 0.6: a positive from epoch 2) and -1; a positive at logit 0
    logits = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    obs = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    ls = lambda x: -math.log(sig(x))  # noqa: E731  -logsigmoid
    positive = (1 - sig(-1.0)) ** 2 * ls(-1.0)
    far_negative = sig(-1.0) ** 2 * ls(1.0)
    as_negative, as_positive = sig(1.0) ** 2 * ls(-1.0), (1 - sig(1.0)) ** 2 * ls(1.0)
    for epoch, middle in ((1, as_negative), (2, as_positive)):
        got = compute_loss("splc", logits, obs, obs, epoch=epoch)
        assert got.item() == pytest.approx((positive + middle + far_negative) / 3, rel=1e-12)
    assert as_negative == pytest.approx(0.7019, abs=1e-4) and as_positive == pytest.approx(0.0227, abs=1e-4)


# ------------------------------------------------------------------------------------------------------------
# EPR


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("seed", SEEDS)
def test_epr_equals_cole(seed, where):
    logits, obs, true = batch(seed, saturated=seed == 3)
    ours = ours_and_grad("epr", logits, obs, true, where, expected_num_pos=2.9)
    assert_bit_identical(ours, reference_and_grad(lambda y: cole_epr(torch.sigmoid(y), obs, 2.9), logits))


def test_epr_by_hand():
    # B = 1, C = 2, p = (1/2, 3/4), obs = (1, 0), k = 1: neg_log(1/2) / 2 + (1.25 - 1)^2 / 4
    got = compute_loss("epr", torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64),
                       torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                       expected_num_pos=1.0)
    assert got.item() == pytest.approx(nl(0.5) / 2 + 0.0625 / 4, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# EM_PL


def scores_for(seed: int, b: int = 16, c: int = 80) -> torch.Tensor:
    """VLPL-like scores: a softmax over classes of cosine similarities / 0.01, float32."""
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.softmax(0.3 * torch.randn(b, c, generator=gen) / 0.01, dim=-1)


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("seed", SEEDS)
def test_em_pl_equals_vlpl_epoch_by_epoch(seed, warmup, where):
    logits, obs, true = batch(seed, saturated=seed == 3)
    scores = scores_for(seed)
    P = {"alpha": 0.2, "beta_pos": 0.7, "beta_neg": 0.0, "warmup_epoch": warmup}
    assert ((obs == 0) & (scores > 0.3)).sum() > 0  # some positive pseudo-labels to test
    for epoch in range(1, 5):
        ours = ours_and_grad("EM_PL", logits, obs, true, where, alpha=0.2, epoch=epoch, pseudo_scores=scores,
                             pl_warmup_epoch=warmup)
        ref = reference_and_grad(lambda y: vlpl_em_pl(torch.sigmoid(y), obs, vlpl_pseudo_labels(scores, 0.3),
                                                      {**P, "epoch": epoch}), logits)
        assert_bit_identical(ours, ref)
        em = compute_loss("EM", logits, obs, true, alpha=0.2)
        assert torch.equal(ours[0], em) == (epoch <= warmup)


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("beta_neg", [0.0, 0.4])
def test_em_pl_negative_pseudo_labels_equal_vlpl(beta_neg, where):
    # negatives below a threshold; VLPL marks them -1: beta_neg 0 is its effective loss (its block is commented
    # out), beta_neg > 0 its commented-out formula
    logits, obs, true = batch(6)
    scores = scores_for(6)
    pseudo = vlpl_pseudo_labels(scores, 0.25)
    pseudo[scores < 1e-4] = -1
    assert (pseudo[obs == 0] == -1).sum() > 10
    P = {"alpha": 0.1, "beta_pos": 0.5, "beta_neg": beta_neg, "warmup_epoch": 0, "epoch": 1}
    ours = ours_and_grad("EM_PL", logits, obs, true, where, alpha=0.1, pl_beta_pos=0.5, pl_beta_neg=beta_neg,
                         pl_pos_threshold=0.25, pl_neg_threshold=1e-4, pseudo_scores=scores)
    ref = reference_and_grad(lambda y: vlpl_em_pl(torch.sigmoid(y), obs, pseudo, P, with_negative_term=beta_neg > 0),
                             logits)
    assert_bit_identical(ours, ref)


def test_em_pl_by_hand():
    # C = 4: observed positive, unknown with score 0.5 (> 0.3: PP), 0.1 (EM), 0.01 (< 0.05: PN); all logits 0
    logits = torch.zeros(1, 4, dtype=torch.float64)
    obs = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([[0.39, 0.5, 0.1, 0.01]])
    got = compute_loss("EM_PL", logits, obs, obs, alpha=0.2, pl_beta_neg=0.3, pl_neg_threshold=0.05,
                       pseudo_scores=scores)
    expected = nl(0.5) + 0.7 * (0.9 * nl(0.5) + 0.1 * nl(0.5)) - 0.2 * (2 * 0.5 * nl(0.5)) + 0.3 * nl(0.5)
    assert got.item() == pytest.approx(expected / 4, rel=1e-12)


def test_em_pl_needs_its_scores():
    logits, obs, true = batch(0)
    with pytest.raises(TypeError, match="pseudo_scores"):
        compute_loss("EM_PL", logits, obs, true, alpha=0.1)
    with pytest.raises(TypeError, match="pseudo_scores"):
        compute_loss("EM_PL", logits, obs, true, alpha=0.1, pseudo_scores=torch.zeros(3, 80))


# ------------------------------------------------------------------------------------------------------------
# defaults: the authors' published values


def test_defaults_are_the_authors():
    # Zhang et al., src/loss_functions/losses.py: Hill(lamb=1.5, margin=1.0, gamma=2.0),
    # SPLC(tau=0.6, change_epoch=1 of a 0-based count, margin=1.0, gamma=2.0); train.py uses them as they are
    assert LOSSES["hill"].defaults == {"hill_lambda": 1.5, "focal_margin": 1.0, "focal_gamma": 2.0}
    assert LOSSES["splc"].defaults == {"splc_tau": 0.6, "splc_start_epoch": 2, "focal_margin": 1.0,
                                       "focal_gamma": 2.0}
    # VLPL main_clip.py: -th 0.3; beta_pos 0.7, beta_neg 0.0, warmup_epoch 0 for every dataset; -p 0.0 (no negatives)
    assert LOSSES["EM_PL"].defaults == {"pl_beta_pos": 0.7, "pl_beta_neg": 0.0, "pl_pos_threshold": 0.3,
                                        "pl_neg_threshold": 0.0, "pl_warmup_epoch": 0}
    assert LOSSES["EM_PL"].required == ("alpha",) and LOSSES["epr"].required == ("expected_num_pos",)


@pytest.mark.parametrize("dataset,k", [("pascal", 1.5), ("coco", 2.9), ("nuswide", 1.9), ("cub", 31.4)])
def test_epr_k_per_dataset_is_coles(dataset, k):
    # Cole et al., train.py: lookup['expected_num_pos'] (the same k for 'epr' and 'role')
    assert config.build_config(dataset, loss="epr").expected_num_pos == k


@pytest.mark.parametrize("dataset,alpha", [("pascal", 0.2), ("coco", 0.1), ("nuswide", 0.1), ("cub", 0.01)])
def test_em_pl_alpha_per_dataset_is_vlpls(dataset, alpha):
    # VLPL main_clip.py: P['alpha'] per dataset (Zhou et al.'s EM alphas, config.DATASET_SETTINGS)
    cfg = config.build_config(dataset, loss="EM_PL", pseudo_scores="scores.npy")
    assert cfg.alpha == alpha
    assert cfg.loss_hyperparameters() == {"alpha": alpha, "pl_beta_pos": 0.7, "pl_beta_neg": 0.0,
                                          "pl_pos_threshold": 0.3, "pl_neg_threshold": 0.0, "pl_warmup_epoch": 0}


def test_config_refusals():
    with pytest.raises(ValueError, match="--pseudo-scores"):
        config.build_config("pascal", loss="EM_PL")
    with pytest.raises(ValueError, match="--pl-neg-threshold"):
        config.build_config("pascal", loss="EM_PL", pseudo_scores="s.npy", pl_neg_threshold=0.5)
    with pytest.raises(ValueError, match=r"--splc-tau must be in \[0, 1\]"):
        config.build_config("pascal", loss="splc", splc_tau=1.5)
    with pytest.raises(ValueError, match="--splc-start-epoch"):
        config.build_config("pascal", loss="splc", splc_start_epoch=0)
    with pytest.raises(ValueError, match="--hill-lambda"):
        config.build_config("pascal", loss="hill", hill_lambda=-1.0)
