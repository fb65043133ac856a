"""ROLE (Cole et al. 2021): the loss against hand-computed values and an independent copy of Cole et al.'s
`loss_role`, which terms carry gradient to the classifier and to the estimates, the estimate matrix's
initialisation, its optimiser group, and Adam leaving rows outside the batch alone while their moments are zero.

The reference below re-states Cole et al.'s `loss_role`, `expected_positive_regularizer` (norm '2') and
`compute_batch_loss` (elijahcole/single-positive-multi-label losses.py, read at commit 89152d5) in their order of
operations (boolean indexing, a loss matrix divided by a tensor holding B * C, the regulariser added after),
independently of losses.py (docs/original.md §6d).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses import LOSSES, Entries, compute_loss
from engine import Engine
from label_state import ESTIMATES_LR_FACTOR, LabelEstimates, logit


def cole_neg_log(x):
    return -torch.log(x + 1e-5)


def cole_role(preds, observed_labels, estimated_labels, expected_num_pos):
    """Cole et al.'s `loss_role` + `compute_batch_loss`: the classifier's and the estimates' positive terms, the
    cross terms with the other side detached, each side's regulariser over C^2, all halved; the matrix divided by
    a tensor of B * C and summed, the regulariser added."""
    num_classes = observed_labels.shape[1]
    loss_mtx_pos_1 = torch.zeros_like(observed_labels)
    loss_mtx_pos_1[observed_labels == 1] = cole_neg_log(preds[observed_labels == 1])
    est_detached = estimated_labels.detach()
    loss_mtx_cross_1 = est_detached * cole_neg_log(preds) + (1.0 - est_detached) * cole_neg_log(1.0 - preds)
    reg_1 = (preds.sum(1).mean(0) - expected_num_pos) ** 2 / (num_classes ** 2)
    loss_mtx_pos_2 = torch.zeros_like(observed_labels)
    loss_mtx_pos_2[observed_labels == 1] = cole_neg_log(estimated_labels[observed_labels == 1])
    preds_detached = preds.detach()
    loss_mtx_cross_2 = (preds_detached * cole_neg_log(estimated_labels)
                        + (1.0 - preds_detached) * cole_neg_log(1.0 - estimated_labels))
    reg_2 = (estimated_labels.sum(1).mean(0) - expected_num_pos) ** 2 / (num_classes ** 2)
    reg_loss = 0.5 * (reg_1 + reg_2)
    loss_mtx = 0.5 * (loss_mtx_pos_1 + loss_mtx_pos_2)
    loss_mtx += 0.5 * (loss_mtx_cross_1 + loss_mtx_cross_2)
    return loss_mtx, reg_loss


def cole_total(preds, observed_labels, estimated_labels, expected_num_pos):
    loss_mtx, reg_loss = cole_role(preds, observed_labels, estimated_labels, expected_num_pos)
    denom = loss_mtx.numel() * torch.ones_like(loss_mtx)
    return (loss_mtx / denom).sum() + reg_loss


def single_positive_batch(seed: int, b: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, c, generator=g)).requires_grad_()
    est_logits = (2 * torch.randn(b, c, generator=g)).requires_grad_()
    obs = torch.zeros(b, c)
    obs[torch.arange(b), torch.randint(0, c, (b,), generator=g)] = 1
    return logits, est_logits, obs


def test_role_by_hand_on_one_row():
    # B = 1, C = 2: z = (0, ln 3) -> p = (1/2, 3/4); estimate logits (ln 3, 0) -> g = (3/4, 1/2); obs = (1, 0); k = 1
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    g = torch.sigmoid(torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64))
    obs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    nl = lambda x: -math.log(x + 1e-5)  # noqa: E731
    p1, p2, g1, g2 = 0.5, 0.75, 0.75, 0.5
    positives = 0.5 * (nl(p1) + nl(g1))  # entry 1 only
    cross = [0.5 * (g1 * nl(p1) + (1 - g1) * nl(1 - p1) + p1 * nl(g1) + (1 - p1) * nl(1 - g1)),
             0.5 * (g2 * nl(p2) + (1 - g2) * nl(1 - p2) + p2 * nl(g2) + (1 - p2) * nl(1 - g2))]
    reg = 0.5 * ((p1 + p2 - 1) ** 2 + (g1 + g2 - 1) ** 2) / 4
    expected = (positives + sum(cross)) / 2 + reg
    got = compute_loss("role", z, obs, obs, expected_num_pos=1.0, estimates=g)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # by hand: positives 0.4904, cross terms 0.7651 each, halved by B*C = 2, regulariser 0.015625
    assert expected == pytest.approx(1.0259, abs=1e-4)


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("name", ["role", "role_li"])  # ROLE+LI trains with the same loss after its linear phase
@pytest.mark.parametrize("seed,size,k", [(0, (6, 5), 1.5), (1, (6, 5), 1.5), (2, (16, 80), 2.9), (3, (8, 20), 1.5),
                                         (4, (8, 312), 31.4)])
def test_role_equals_cole_values_and_gradients(seed, size, k, name, where):
    logits, est_logits, obs = single_positive_batch(seed, *size)
    if seed == 3:  # saturated, both sides: p and g round to exactly 0 or 1
        logits, est_logits = (40 * v.detach() for v in (logits, est_logits))
        logits.requires_grad_(), est_logits.requires_grad_()
        assert (torch.sigmoid(logits) == 1).any() and (torch.sigmoid(est_logits) == 0).any()
    ref = cole_total(torch.sigmoid(logits), obs, torch.sigmoid(est_logits), k)
    ref_dz, ref_de = torch.autograd.grad(ref, (logits, est_logits))
    ours = compute_loss(name, logits, obs, obs, expected_num_pos=k, estimates=torch.sigmoid(est_logits),
                        where=where)
    dz, de = torch.autograd.grad(ours, (logits, est_logits))
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    assert torch.equal(dz, ref_dz) and torch.equal(de, ref_de)
    assert torch.isfinite(dz).all() and dz.abs().sum() > 0 and de.abs().sum() > 0
    # and the two parts separately (Cole et al. log the regulariser on its own): the matrix and the regulariser
    entries = Entries(logits, where)
    LOSSES[name](entries, obs, obs, expected_num_pos=k, estimates=torch.sigmoid(est_logits))
    ref_matrix, ref_regulariser = cole_role(torch.sigmoid(logits), obs, torch.sigmoid(est_logits), k)
    assert torch.equal(entries.loss, ref_matrix) and torch.equal(entries.regulariser, ref_regulariser)


def test_gradients_flow_only_through_their_terms():
    """The classifier's gradient is that of  pos(p) + BCE(p; g fixed) + reg(p)  with g a constant, and the
    estimates' that of  pos(g) + BCE(g; p fixed) + reg(g)  with p a constant: the cross terms stop the gradient."""
    logits, est_logits, obs = single_positive_batch(7)
    b, c = obs.shape
    loss = compute_loss("role", logits, obs, obs, expected_num_pos=2.0, estimates=torch.sigmoid(est_logits))
    dz, de = torch.autograd.grad(loss, (logits, est_logits))

    def one_side(x_logits, other):  # what one side's gradient should come from, the other side a constant
        x = torch.sigmoid(x_logits)
        terms = 0.5 * obs * cole_neg_log(x) + 0.5 * (other * cole_neg_log(x) + (1 - other) * cole_neg_log(1 - x))
        return terms.sum() / (b * c) + 0.5 * (x.sum(1).mean() - 2.0) ** 2 / c ** 2

    (want_dz,) = torch.autograd.grad(one_side(logits, torch.sigmoid(est_logits).detach()), logits)
    (want_de,) = torch.autograd.grad(one_side(est_logits, torch.sigmoid(logits).detach()), est_logits)
    torch.testing.assert_close(dz, want_dz, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(de, want_de, rtol=1e-5, atol=1e-8)
    # and the stop-gradients matter: the same formula without them gives other gradients on both sides
    p, g = torch.sigmoid(logits), torch.sigmoid(est_logits)
    no_stop = (0.5 * obs * (cole_neg_log(p) + cole_neg_log(g))
               + 0.5 * (g * cole_neg_log(p) + (1 - g) * cole_neg_log(1 - p) + p * cole_neg_log(g)
                        + (1 - p) * cole_neg_log(1 - g))).sum() / (b * c)
    no_stop = no_stop + 0.5 * ((p.sum(1).mean() - 2.0) ** 2 + (g.sum(1).mean() - 2.0) ** 2) / c ** 2
    torch.testing.assert_close(no_stop, loss)  # same value ...
    full_dz, full_de = torch.autograd.grad(no_stop, (logits, est_logits))
    assert (full_dz - dz).abs().max() > 1e-3 and (full_de - de).abs().max() > 1e-3  # ... other gradients


def test_role_needs_its_estimates():
    logits, est_logits, obs = single_positive_batch(0)
    with pytest.raises(TypeError, match="estimates"):
        compute_loss("role", logits, obs, obs, expected_num_pos=1.5)
    with pytest.raises(TypeError, match="expected_num_pos"):
        compute_loss("role", logits, obs, obs, estimates=torch.sigmoid(est_logits))


def test_estimates_initialisation_as_cole():
    rng = np.random.RandomState(0)
    obs = np.zeros((50, 7))
    obs[np.arange(50), rng.randint(0, 7, 50)] = 1
    torch.manual_seed(3)
    ours = LabelEstimates(obs).logits.detach()
    # Cole et al.: q = inverse_sigmoid(0.5 + 0.1); q * (2 * rand - 1); positives inverse_sigmoid(0.995)
    torch.manual_seed(3)
    q = np.log(0.6 / 0.4)
    ref = q * (2 * torch.rand(50, 7) - 1)
    ref[torch.from_numpy(obs == 1)] = np.log(0.995 / 0.005)
    assert torch.equal(ours, ref) and ours.dtype == torch.float32
    unknown = ours[torch.from_numpy(obs == 0)]
    assert unknown.abs().max() < math.log(1.5) and unknown.min() < -0.3 and unknown.max() > 0.3
    assert torch.all(ours[torch.from_numpy(obs == 1)] == torch.tensor(math.log(199.0), dtype=torch.float32))
    # from probabilities (ROLE+LI's phase 2): logit, clipped at 1e-5
    probs = np.array([[0.5, 0.9, 0.0, 1.0]])
    init = LabelEstimates(np.zeros((1, 4)), probs).logits.detach()
    torch.testing.assert_close(init, torch.tensor([[0.0, math.log(9.0), math.log(1e-5 / (1 - 1e-5)),
                                                    math.log((1 - 1e-5) / 1e-5)]]))
    assert logit(0.6) == pytest.approx(math.log(1.5))


def _engine_with_estimates(n: int = 10, c: int = 4) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, c)
    obs = np.zeros((n, c))
    obs[np.arange(n), np.arange(n) % c] = 1
    return Engine(model, model, torch.device("cpu"), estimates=LabelEstimates(obs))


def test_estimates_learn_at_ten_times_the_lr():
    engine = _engine_with_estimates()
    groups = engine.parameter_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-4 * ESTIMATES_LR_FACTOR] and ESTIMATES_LR_FACTOR == 10
    assert groups[1]["params"] == [engine.estimates.logits]
    assert sum(len(g["params"]) for g in groups) == 3  # weight, bias, estimate matrix


def test_rows_outside_the_batch_keep_their_values_while_adams_moments_are_zero():
    engine = _engine_with_estimates()
    optimizer = torch.optim.Adam(engine.parameter_groups(1e-3), lr=1e-3)
    x = torch.randn(3, 3)
    rows = torch.tensor([1, 4, 7])
    obs = torch.zeros(3, 4)
    obs[torch.arange(3), torch.tensor([1, 0, 3])] = 1
    before = engine.estimates.logits.detach().clone()

    def step(rows, x, obs):
        loss = compute_loss("role", engine.model(x), obs, obs, expected_num_pos=1.5, estimates=engine.estimates(rows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(rows, x, obs)
    after = engine.estimates.logits.detach()
    others = torch.ones(10, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(after[others], before[others])
    assert (after[rows] != before[rows]).all()  # every entry of the batch rows moved (by lr 1e-2 each)
    torch.testing.assert_close((after[rows] - before[rows]).abs(), torch.full((3, 4), 1e-2), rtol=1e-3, atol=0)
    # a second step on other rows: the first batch's rows still move, by their moments (as in the original)
    first = after.clone()
    step(torch.tensor([0, 2, 3]), x, obs)
    assert (engine.estimates.logits.detach()[rows] != first[rows]).all()
    assert torch.equal(engine.estimates.logits.detach()[[5, 6, 8, 9]], before[[5, 6, 8, 9]])


def test_estimate_gradients_equal_plain_indexing_and_reuse_one_buffer():
    """The estimates' dense gradient is built in one buffer kept from step to step, with the bits of plain
    `sigmoid(logits[rows])` autograd: over Adam steps (zero_grad between), when two backward passes accumulate,
    and into a gradient zeroed in place. Rows repeated within a batch accumulate as indexing's backward does."""
    torch.manual_seed(0)
    n, c = 30, 5
    obs = np.zeros((n, c))
    obs[np.arange(n), np.arange(n) % c] = 1
    ours = LabelEstimates(obs)
    plain = torch.nn.Parameter(ours.logits.detach().clone())
    opt_ours, opt_plain = (torch.optim.Adam([p], lr=1e-2) for p in (ours.logits, plain))
    gen = torch.Generator().manual_seed(1)

    def backward(rows, weights):
        (ours(rows) * weights).pow(3).sum().backward()
        (torch.sigmoid(plain[rows]) * weights).pow(3).sum().backward()

    pointers = set()
    for step in range(6):
        rows = torch.randperm(n, generator=gen)[:7]
        if step == 3:
            rows[1] = rows[0]  # a repeated row: its two gradients add up
        weights = torch.randn(7, c, generator=gen)
        opt_ours.zero_grad()
        opt_plain.zero_grad()
        backward(rows, weights)
        if step == 4:  # accumulate a second batch into the same gradient
            backward(torch.randperm(n, generator=gen)[:7], torch.randn(7, c, generator=gen))
        assert torch.equal(ours.logits.grad, plain.grad) and ours.logits.grad.abs().sum() > 0
        pointers.add(ours.logits.grad.data_ptr())
        opt_ours.step()
        opt_plain.step()
        assert torch.equal(ours.logits.detach(), plain.detach())
    assert len(pointers) == 1  # one gradient matrix for all steps, not a new one per step
    # zeroed in place (zero_grad(set_to_none=False)): the next gradient is added to the zeros
    opt_ours.zero_grad(set_to_none=False)
    opt_plain.zero_grad(set_to_none=False)
    backward(torch.tensor([2, 9]), torch.randn(2, c, generator=gen))
    assert torch.equal(ours.logits.grad, plain.grad)
