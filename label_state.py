"""What methods learn or change about the training labels, one small object or function per method: ROLE's label
estimates (a learnable matrix trained with the model), LL-Cp's corrections for good, and APL's negative
pseudo-labels. The training loop (train.py) calls them; the losses (losses.py) stay pure functions."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from distributed import SINGLE, DistContext
from losses import LOSSES

# ----------------------------------------------------------------------------------------------------------------
# ROLE: the label estimates

ESTIMATES_LR_FACTOR = 10  # ROLE: the estimate matrix learns at 10 x the model's lr (Cole et al.'s `lr_mult`)


def logit(p: float | np.ndarray, dtype: type = np.float64) -> float | np.ndarray:
    """log(p / (1 - p)) with p clipped to [1e-5, 1 - 1e-5] (Cole et al.'s `inverse_sigmoid`), in float64, or in
    `dtype` float32 as their ROLE+LI computes it on its float32 estimates (numpy's float32 operations)."""
    p = np.asarray(p, dtype=dtype)
    p = np.maximum(np.minimum(p, dtype(1 - 1e-5)), dtype(1e-5))
    return np.log(p / (dtype(1) - p))


class LabelEstimates(torch.nn.Module):
    """ROLE's learnable N x C matrix of label-estimate logits, one row per training sample (Cole et al.'s
    `LabelEstimator`). Initialised from the global torch generator: unknown entries uniform in
    (-logit(0.6), logit(0.6)), observed positives logit(0.995); or, given `probs` (ROLE+LI's phase 1), logit(probs)
    computed in `probs_dtype` (float64, or float32 as Cole et al.: --role-li-init).
    Calling it with row indices gives their estimates sigmoid(logits[rows]).

    The gradient of `logits` is dense (N x C, zero outside the batch rows), as the original's. It is built in one
    buffer kept from step to step (`_RowsOf`), so after `zero_grad()` the next backward overwrites the previous
    step's `logits.grad` tensor instead of allocating a new one.
    """

    def __init__(self, labels_obs: np.ndarray, probs: np.ndarray | None = None, probs_dtype: type = np.float64) -> None:
        super().__init__()
        if probs is None:
            logits = float(logit(0.5 + 0.1)) * (2 * torch.rand(labels_obs.shape) - 1)
            logits[torch.from_numpy(np.asarray(labels_obs) == 1)] = float(logit(0.995))
        else:
            logits = torch.from_numpy(logit(probs, probs_dtype)).float()
        self.logits = torch.nn.Parameter(logits)
        self.grad_buffer: torch.Tensor | None = None  # not state: not saved, made again where needed

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_RowsOf.apply(self.logits, rows, self))


class _RowsOf(torch.autograd.Function):
    """`logits[rows]` whose backward builds the dense gradient with the indexing's own operations (zeros, then the
    rows' gradients put in with `index_put_(accumulate=True)`, as torch's index backward), in
    `estimates.grad_buffer` rather than a new N x C matrix at every step. Same bits (tests/test_role.py). Why: on
    the CPU, a fresh 21 MB matrix per step (COCO's 65,665 x 80) is carved from glibc's heap, and the small tensors
    a pass keeps (predictions, labels) land in the freed ones, so each step's matrix needed new memory: a
    COCO-sized ROLE epoch on features grew the process by 24 GB. A gradient that exists already is added to, as
    autograd does.

    Measured (BufferedAdam gives the whole-run figures of both buffers: 66 % of a ROLE run): with torch's indexing
    backward and BufferedAdam, a one-epoch ROLE run (`python bench/linear.py --loss role -- --expected-num-pos 2.9
    --epochs 1` under `ulimit -v 9437184`) ran out of its 9 GB of address space during the epoch (the fault); with
    this buffer it ended at a peak RSS of 2.73 GB. glibc's fixed mmap threshold fixes the fault without the buffer,
    at a cost: a ROLE step (`python bench/role_step.py --plain rows --mmap-threshold 1048576`, 1 thread) takes 26.3
    ms of CPU against 16.5-16.9 ms with the buffer.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, estimates: LabelEstimates) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.estimates = estimates
        return logits[rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        param = ctx.estimates.logits
        buffer = ctx.estimates.grad_buffer
        if param.grad is not None or buffer is None or (buffer.device, buffer.dtype, buffer.shape) != (
                param.device, param.dtype, param.shape):
            buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
            if param.grad is None:
                ctx.estimates.grad_buffer = buffer
        buffer.zero_()
        buffer.index_put_((rows,), grad, accumulate=True)
        if param.grad is None:
            param.grad = buffer
        else:
            param.grad += buffer
        return None, None, None


class BufferedAdam(torch.optim.Adam):
    """torch.optim.Adam(params, lr) with torch's other defaults, whose CPU update keeps its denominator in one buffer
    per parameter: ROLE's optimizer (engine.Engine.optimizer; every other run takes torch.optim.Adam itself).

    torch's single-tensor update makes two temporaries of a parameter's size per step (`exp_avg_sq.sqrt()`, then its
    division). For the 65,665 x 80 estimates those are fresh 21 MB matrices carved from glibc's heap, and the small
    tensors a training pass keeps (each batch's predictions and labels) land in the freed ones, so each step needs
    new memory: a COCO-sized ROLE run grows without bound (3.4 GB per 200 steps, below). `step` runs the operations of
    torch.optim.adam._single_tensor_adam (its branch without capturable / differentiable / weight decay / amsgrad)
    in torch's order, with `torch.sqrt(..., out=)` into the buffer, and initialises the state as torch does;
    tests/test_optim.py compares the parameters and the state with torch.optim.Adam's by torch.equal. Other
    devices (CUDA: torch's foreach update), a closure or complex / sparse parameters take torch's own step.

    Measured on this project's 2-core VM (CPU seconds too: the host is shared): a whole COCO-sized ROLE run
    (`python bench/linear.py --loss role -- --expected-num-pos 2.9`: 23 epochs, test mAP 35.48 both ways) took
    208.6 s (385.1 s CPU, peak RSS 2.73 GB) with this class and `_RowsOf`'s buffer, and 606.3 s (1,182.1 s CPU,
    2.72 GB) with torch's indexing and torch.optim.Adam under glibc's fixed mmap threshold (mallopt
    M_MMAP_THRESHOLD = 1 MB), the public way to keep the memory flat: the buffers save 66 % of the run. This
    class alone, on a ROLE step (`python bench/role_step.py`, 1 thread): 16.5-16.9 ms of CPU, RSS flat; with
    torch.optim.Adam (`--plain adam`) 25.6 ms and RSS +3.4 GB per 200 steps; with torch.optim.Adam and the fixed
    threshold (`--plain adam --mmap-threshold 1048576`) flat, 33.4 ms.
    """

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self._denominators: dict[torch.Tensor, torch.Tensor] = {}  # per parameter, reused by `step` (not state)

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if closure is not None or any(p.device.type != "cpu" or p.is_complex() or p.grad.is_sparse
                                      for p in with_grad):
            return super().step(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            assert group["weight_decay"] == 0 and not (group["amsgrad"] or group["maximize"] or group["capturable"]
                                                       or group["differentiable"] or group["fused"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch.optim.Adam._init_group (step: the default float dtype's scalar)
                    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=scalar)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                step_size = lr / (1 - beta1 ** step)
                # torch's (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps) with the same kernels, in the buffer
                denom = self._denominators.get(p)
                if denom is None or (denom.dtype, denom.shape, denom.stride()) != (exp_avg_sq.dtype, exp_avg_sq.shape,
                                                                                   exp_avg_sq.stride()):
                    denom = self._denominators[p] = torch.empty_like(exp_avg_sq)
                torch.sqrt(exp_avg_sq, out=denom).div_((1 - beta2 ** step) ** 0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return None


# ----------------------------------------------------------------------------------------------------------------
# LL-Cp: corrections for good

class PermanentCorrections:
    """One epoch's corrections for good of a loss registered with `corrections` (LL-Cp): each step's (B, C) mask of
    entries that become observed positives, kept on the device with the batch rows (no sync), then written into
    the training set's observed matrix in one go at the end of the epoch. Each row comes once per epoch, so the
    loaders see them from the next epoch on, as with the original's per-epoch DataLoader workers. In a torchrun
    launch the corrections of every rank reach every rank."""

    def __init__(self, find: Callable[..., torch.Tensor], epoch: int, hyperparameters: dict,
                 ties: bool = False) -> None:
        self.find, self.epoch, self.hyperparameters, self.ties = find, epoch, hyperparameters, ties
        self.rows: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    @classmethod
    def of(cls, loss: str, epoch: int, hyperparameters: dict, ties: bool = False) -> PermanentCorrections | None:
        """The epoch's corrections of `loss`, or None for a loss that corrects nothing for good; `ties`: those at
        the k-th largest loss too (--ll-cp-corrections at-or-above, BoostLU's)."""
        find = LOSSES[loss].corrections
        return None if find is None else cls(find, epoch, hyperparameters, ties)

    def add(self, rows: torch.Tensor, logits: torch.Tensor, obs: torch.Tensor) -> None:
        """A step's corrections of its batch (dataset `rows`, on any device)."""
        self.masks.append(self.find(logits, obs, epoch=self.epoch, ties=self.ties, **self.hyperparameters))
        self.rows.append(rows)

    def write(self, dataset, dist: DistContext = SINGLE) -> int:
        """Mark the epoch's corrections (every rank's) positive in `dataset`; returns how many entries changed."""
        before = dataset.labels_obs.copy()
        rows = self.rows or [torch.zeros(0, dtype=torch.long)]
        masks = self.masks or [torch.zeros((0, before.shape[1]), dtype=torch.bool)]
        for rank_rows, rank_masks in dist.all_gather((torch.cat(rows), torch.cat(masks).cpu())):
            dataset.mark_positive(rank_rows, rank_masks)
        return int(((dataset.labels_obs == 1) & (before != 1)).sum())


# ----------------------------------------------------------------------------------------------------------------
# APL: asymmetric pseudo-labelling (its U_c are counted once before training: checkpoints.Progress.unlabel_num)

def worker_threads() -> int:
    """Threads for per-class work (apl_update): OMP_NUM_THREADS when set (torchrun sets 1 per process), else
    the usable cores."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def apl_update(obs: np.ndarray, preds: np.ndarray, unlabel_num: np.ndarray, neg_proportion: float,
               num_epochs: int, warmup_epoch: int) -> np.ndarray:
    """One round of APL; returns the new observed matrix (the input is not modified).

    For each class c, among the entries still exactly 0, the k_c = floor(neg_proportion * U_c / (T - T_w))
    with the lowest predicted probability become soft negative pseudo-labels -p (target q = p). U_c
    (`unlabel_num[c]`) is the count of unknowns in the initial observed matrix. No positive pseudo-labels.
    """
    obs = np.array(obs, dtype=np.float64)  # a copy; float64 so that -p is not truncated
    preds = np.asarray(preds)
    if preds.shape != obs.shape or len(unlabel_num) != obs.shape[1]:
        raise ValueError(f"obs {obs.shape}, preds {preds.shape} and unlabel_num ({len(unlabel_num)}) do not agree")
    rounds = num_epochs - warmup_epoch
    if rounds < 1:
        raise ValueError(f"APL needs num_epochs > warmup_epoch, got {num_epochs} and {warmup_epoch}")
    def label(c: int) -> None:  # the classes are independent: they are spread over threads
        k = int(np.floor(neg_proportion * unlabel_num[c] / rounds))
        candidates = np.flatnonzero(obs[:, c] == 0)
        chosen = candidates[_lowest(preds[candidates, c], k)]
        obs[chosen, c] = -preds[chosen, c]

    with ThreadPoolExecutor(worker_threads()) as pool:
        list(pool.map(label, range(obs.shape[1])))
    return obs


def _lowest(values: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k lowest values: the set that the original's `np.argsort(values)[:k]` picks. Unless
    the k-th and (k+1)-th lowest are equal (then which of the tied values it picks depends on the sort, and the
    sort decides), the set is those at most the k-th lowest, found by a partition instead of a sort."""
    if 0 < k < len(values):
        kth, next_one = np.partition(values, (k - 1, k))[[k - 1, k]]
        if kth < next_one:  # (False with a NaN: sorted)
            return np.flatnonzero(values <= kth)
    return np.argsort(values)[:k]
