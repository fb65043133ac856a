"""label_state.BufferedAdam (ROLE's optimizer): torch.optim.Adam's update with a kept denominator buffer on the
CPU. Same parameters, same state, same bits."""
import numpy as np
import pytest
import torch

from engine import build_engine
from label_state import BufferedAdam as Adam
from label_state import LabelEstimates
from losses import compute_loss


def pair(seed: int = 0, dtype=torch.float32):
    """Two copies of one model's parameters, in two groups at different lrs (as ROLE's estimates), and their two
    optimizers: torch's and ours."""
    torch.manual_seed(seed)
    weights = [torch.randn(80, 64, dtype=dtype), torch.randn(80, dtype=dtype), torch.randn(30, 80, dtype=dtype)]
    copies = [[torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2)]
    optimizers = [cls([{"params": ps[:2], "lr": 3e-3}, {"params": ps[2:], "lr": 0.3}], lr=3e-3)
                  for cls, ps in zip((torch.optim.Adam, Adam), copies)]
    return copies, optimizers


def assert_same(copies, optimizers):
    for p, q in zip(*copies):
        assert torch.equal(p, q)
    theirs, ours = (o.state_dict() for o in optimizers)
    assert theirs["param_groups"] == ours["param_groups"]
    assert theirs["state"].keys() == ours["state"].keys()
    for key, state in theirs["state"].items():
        assert state.keys() == ours["state"][key].keys()
        for name, value in state.items():
            assert value.dtype == ours["state"][key][name].dtype
            assert torch.equal(value, ours["state"][key][name]), (key, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_update_equals_torchs_bit_for_bit(dtype):
    copies, optimizers = pair(dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch keeps the step count in the default dtype: so must we
    try:
        for step in range(300):
            grads = [torch.randn_like(p) * 10.0 ** (step % 5 - 2) for p in copies[0]]
            for params, optimizer in zip(copies, optimizers):
                optimizer.zero_grad()
                for i, (p, g) in enumerate(zip(params, grads)):
                    if not (i == 2 and step % 7 == 3):  # a parameter without a gradient this step is left alone
                        p.grad = g.clone()
                optimizer.step()
    finally:
        torch.set_default_dtype(default)
    assert_same(copies, optimizers)
    assert optimizers[1].state[copies[1][2]]["step"].item() == 300 - len(range(3, 300, 7))


def test_training_a_linear_head_with_a_loss_gives_torchs_weights():
    torch.manual_seed(1)
    x, obs = torch.randn(64, 32), torch.zeros(64, 10)
    obs[torch.arange(64), torch.randint(10, (64,))] = 1
    obs[(torch.rand(64, 10) < 0.3) & (obs == 0)] = -0.7
    heads = [torch.nn.Linear(32, 10) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    optimizers = [torch.optim.Adam(heads[0].parameters(), lr=1e-2), Adam(heads[1].parameters(), lr=1e-2)]
    for _ in range(50):
        for head, optimizer in zip(heads, optimizers):
            loss = compute_loss("EM_APL", head(x), obs, obs, alpha=0.1, beta=0.9)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert_same([list(h.parameters()) for h in heads], optimizers)
    assert not torch.equal(heads[1].weight, torch.nn.Linear(32, 10).weight)  # it did train


def test_a_state_saved_by_either_optimizer_resumes_in_the_other():
    copies, optimizers = pair(seed=2)
    grads = [[torch.randn_like(p) for p in copies[0]] for _ in range(20)]

    def run(params, optimizer, steps):
        for g in steps:
            optimizer.zero_grad()
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            optimizer.step()

    for params, optimizer in zip(copies, optimizers):
        run(params, optimizer, grads[:10])
    swapped = [Adam(optimizers[0].param_groups, lr=3e-3), torch.optim.Adam(optimizers[1].param_groups, lr=3e-3)]
    swapped[0].load_state_dict(optimizers[0].state_dict())  # torch's state into ours, and ours into torch's
    swapped[1].load_state_dict(optimizers[1].state_dict())
    for params, optimizer in zip(copies, swapped):
        run(params, optimizer, grads[10:])
    assert_same(copies, swapped[::-1])


def test_zero_grad_and_a_closure_behave_as_torchs():
    copies, optimizers = pair(seed=3)
    for params, optimizer in zip(copies, optimizers):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in params)
        optimizer.zero_grad()
        assert all(p.grad is None for p in params)

    def closure(params):
        def compute():
            loss = sum((p ** 2).sum() for p in params)
            loss.backward()
            return loss
        return compute

    losses = [optimizer.step(closure(params)) for params, optimizer in zip(copies, optimizers)]
    assert torch.equal(losses[0], losses[1])
    assert_same(copies, optimizers)



def test_a_run_takes_torchs_adam_and_role_the_buffered_one():
    head = torch.nn.Linear(4, 2)
    plain = build_engine(head, torch.device("cpu")).optimizer(1e-3)
    assert type(plain) is torch.optim.Adam and plain.defaults["lr"] == 1e-3
    role = build_engine(head, torch.device("cpu"), estimates=LabelEstimates(np.eye(3, 2))).optimizer(1e-3)
    assert type(role) is Adam and [g["lr"] for g in role.param_groups] == [1e-3, 1e-2]
