"""Training: epoch -> train -> (pseudo-label) -> evaluate -> select, as the original.

Early stopping (--early-stop, set by --protocol): the original stops at the first epoch whose clean-val mAP does not
strictly improve (that epoch's test pass is skipped); Kim et al.'s loop when it falls more than 3 below the best;
Cole et al.'s runs every epoch. The best-val weights are kept and the test mAP at the best epoch is the reported
number.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from config import AMP_MODES, ROLE_LI_PHASE1, Config
from datasets import DataError, FeatureDataset, FeatureLoader, MultilabelDataset, raise_sample_errors
from distributed import SINGLE, DistContext, start_watchdog
from image_cache import to_model_input
from losses import LOSSES, compute_loss
from metrics import THRESHOLDS, compute_metrics, per_class_ap, threshold_metrics, worker_threads
from fileio import OutputError, pid_alive, write_atomic


class RankFailure(RuntimeError):
    """Another rank of a torchrun launch died; the message names it."""


class NonFiniteLossError(RuntimeError):
    def __init__(self, epoch: int, batch: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch}, batch {batch}; stopping (finished epochs are saved)")
        self.epoch, self.batch = epoch, batch


# ----------------------------------------------------------------------------------------------------------------
# asymmetric pseudo-labelling

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


# ----------------------------------------------------------------------------------------------------------------
# ROLE's label estimates

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
    rows' gradients put in with accumulate: aten's index_backward), in `estimates.grad_buffer` rather than a new
    N x C matrix at every step. Same bits (tests/test_role.py). Why: on the CPU, a fresh 21 MB matrix per step
    (COCO's 65,665 x 80) is carved from glibc's heap, and the small tensors a pass keeps (predictions, labels) land
    in the freed ones, so each step's matrix needed new memory: a COCO-sized ROLE epoch on features grew the
    process by 24 GB. A gradient that exists already is added to, as autograd does."""

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
        torch.ops.aten._index_put_impl_(buffer, (rows,), grad, True, True)  # accumulate, unsafe: index_backward's
        if param.grad is None:
            param.grad = buffer
        else:
            param.grad += buffer
        return None, None, None


class Adam(torch.optim.Adam):
    """torch.optim.Adam(params, lr) with torch's other defaults, as the original trains: the same state,
    state_dict and bits, with a direct `step` and `zero_grad` for parameters on the CPU.

    On the CPU torch runs its single-tensor update, whose few operations cost less than the wrappers around them (a
    profiler record and torch._dynamo's guards): ~190 us of a linear probe's 1.6-4 ms step. `step` below runs the
    operations of torch.optim.adam._single_tensor_adam (its branch without capturable / differentiable / weight
    decay / amsgrad) in torch's order, and initialises the state as torch does; tests/test_optim.py compares the
    parameters and the state with torch.optim.Adam's by torch.equal. Other devices (CUDA: torch's foreach update),
    a closure or complex / sparse parameters take torch's own step."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self._denominators: dict[torch.Tensor, torch.Tensor] = {}  # per parameter, reused by `step` (not state)

    # torch guards these with torch._dynamo.disable, whose first call imports torch._dynamo (~1.5 s, and ~0.3 s
    # more at exit); called eagerly (nothing here is compiled) they are the same functions without the guard
    add_param_group, state_dict, load_state_dict = (getattr(method, "__wrapped__", method) for method in (
        torch.optim.Optimizer.add_param_group, torch.optim.Optimizer.state_dict, torch.optim.Optimizer.load_state_dict))

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

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
                # torch's (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps) with the same kernels, in a buffer
                # kept per parameter: no parameter-sized temporaries per step (LabelEstimates says why that matters)
                denom = self._denominators.get(p)
                if denom is None or (denom.dtype, denom.shape, denom.stride()) != (exp_avg_sq.dtype, exp_avg_sq.shape,
                                                                                   exp_avg_sq.stride()):
                    denom = self._denominators[p] = torch.empty_like(exp_avg_sq)
                torch.sqrt(exp_avg_sq, out=denom).div_((1 - beta2 ** step) ** 0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return None

    step.hooked = True  # torch.optim.Optimizer wraps a step without it in its profiler record and hooks


# ----------------------------------------------------------------------------------------------------------------
# how batches run on the device

AMP_DTYPES = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))
NONFINITE_CHECK_EVERY = 50  # training steps between read-backs of the device-side non-finite-loss check


@dataclass
class Engine:
    """The model as the loop runs it: `model` (whose state is saved), `forward` (the same module, or its
    torch.compile, or its DistributedDataParallel wrapper), the device, the autocast dtype (None = float32
    throughout), the memory format, ROLE's label estimates (trained and saved with the model) for a loss that
    reads them, and where the process stands in a torchrun launch (`dist`; SINGLE for one process)."""

    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    estimates: LabelEstimates | None = None
    frozen_backbone: bool = False  # --freeze-backbone: the backbone stays in eval mode (BatchNorm statistics fixed)
    dist: DistContext = SINGLE
    eval_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # without DDP's wrapper (default: forward)
    graphs: Any = None  # --cuda-graphs: a cuda_graphs.CudaGraphs that runs the step and the eval forward; None: eager

    def train(self) -> None:
        self.model.train()
        if self.frozen_backbone:
            self.model.backbone.eval()

    def parameter_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        """Adam's groups: the trainable model parameters at `lr` (with `head_lr_mult` != 1, the classifier head's at
        head_lr_mult x lr, as Kim et al.'s `lr_mult`; a linear probe is all head); ROLE's estimates at
        ESTIMATES_LR_FACTOR x lr."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if head_lr_mult == 1:
            groups = [{"params": trainable, "lr": lr}]
        else:
            head = {id(p) for p in getattr(self.model, "head", self.model).parameters()}
            groups = [{"params": [p for p in trainable if id(p) not in head], "lr": lr},
                      {"params": [p for p in trainable if id(p) in head], "lr": head_lr_mult * lr}]
            groups = [g for g in groups if g["params"]]
        if self.estimates is not None:
            groups.append({"params": list(self.estimates.parameters()), "lr": ESTIMATES_LR_FACTOR * lr})
        return groups

    def state(self) -> dict:
        """What a checkpoint keeps: the model's state dict, and the estimate logits when there are any."""
        state = {"model": copy.deepcopy(self.model.state_dict())}
        if self.estimates is not None:
            state["label_estimates"] = self.estimates.logits.detach().clone()
        return state

    def load_state(self, state: dict) -> None:
        """Put back what `state()` kept."""
        self.model.load_state_dict(state["model"])
        if self.estimates is not None:
            self.estimates.logits.data.copy_(state["label_estimates"])

    def logits(self, batch: dict, training: bool = True) -> torch.Tensor:
        """float32 logits of a batch from any loader (the loss always runs in float32): images, or feature
        vectors (datasets.FeatureLoader, already on the device). Evaluation bypasses DDP's wrapper, whose
        forward would take part in collectives."""
        forward = self.forward if training or self.eval_forward is None else self.eval_forward
        if "features" in batch:
            return forward(batch["features"]).float()
        images = to_model_input(batch, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return forward(images).float()


def build_engine(model: torch.nn.Module, device: torch.device, amp: str = "off", channels_last: bool = False,
                 compile_model: bool = False, cudnn_benchmark: bool = False,
                 estimates: LabelEstimates | None = None, frozen_backbone: bool = False,
                 dist: DistContext = SINGLE, sync_bn: bool = False) -> Engine:
    """Check that the device supports the speed options (ValueError naming the flag and the alternative). In a
    torchrun launch the model is wrapped in DistributedDataParallel (its BatchNorm layers made SyncBatchNorm
    first with `sync_bn`), which starts every rank from rank 0's weights."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU (its loss scaling is GPU-only here); on the CPU use "
                         "--amp bf16 or leave --amp off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --amp fp16 instead")
    if amp == "bf16" and device.type == "cpu" and not _cpu_has_bf16():
        print("warning: this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16): --amp bf16 runs many "
              "times slower than float32 here; leave --amp off on this machine")
    if compile_model:
        if device.type == "cuda":
            from torch.utils._triton import has_triton
            if not has_triton():
                raise ValueError("--compile needs Triton for CUDA (pip install triton); or leave --compile off")
        elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            raise ValueError("--compile on the CPU needs a C++ compiler (e.g. apt-get install g++); "
                             "or leave --compile off")
    if cudnn_benchmark:  # let cuDNN time its algorithms for the fixed input size (nondeterministic choice)
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not dist.enabled:
        forward = torch.compile(model) if compile_model else model
        return Engine(model, forward, device, AMP_DTYPES[amp], channels_last,
                      estimates.to(device) if estimates is not None else None, frozen_backbone)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if estimates is not None:  # one start for every rank: rank 0's draw
        estimates = estimates.to(device)
        torch.distributed.broadcast(estimates.logits.data, src=0)
    return Engine(model, torch.compile(wrapped) if compile_model else wrapped, device, AMP_DTYPES[amp], channels_last,
                  estimates, frozen_backbone, dist, torch.compile(model) if compile_model else model)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------------------------------------------
# one pass over a loader

def _forward_pass(engine: Engine, loader, desc: str, step: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
                  epoch: int = 0, update: Callable[[], None] | None = None) -> dict:
    """Runs the model over `loader`; with `step` (training), `step(logits, batch)` computes the loss and its
    gradients and returns the detached batch loss, then `update()` steps the optimizer.

    Returns predictions, true and observed labels and dataset indices in loader order, and the mean loss.
    Nothing waits for the device inside the loop: predictions stay on it (copied once at the end), and the batch
    losses too, read back together every NONFINITE_CHECK_EVERY steps, where a non-finite one stops the pass.
    """
    preds, true, obs, idx = [], [], [], []
    seen, start = 0, time.time()
    loss_sum = 0.0  # the sum of loss x batch size, batch after batch, in float64 (a Python float)
    pending: list[tuple[torch.Tensor, int]] = []  # (batch loss on the device, batch size) since the last read-back
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for i, batch in enumerate(bar):
        engine.dist.mark(f"{desc}, batch {i + 1}")  # torchrun: where this rank is, for the watchdog
        raise_sample_errors(batch)
        size = len(batch["idx"])
        if step is None:
            with torch.inference_mode():
                logits = engine.graphs.eval_logits(engine, batch) if engine.graphs is not None else \
                    engine.logits(batch, training=False)
                preds.append(torch.sigmoid(logits))
        else:
            if engine.graphs is not None:  # a replayed CUDA graph (or eager, for a batch of another size)
                logits, loss = engine.graphs.train_step(engine, batch, step, update)
            else:
                logits = engine.logits(batch)
                loss = step(logits, batch)
                update()
            pending.append((loss, size))
            if (i + 1) % NONFINITE_CHECK_EVERY == 0 or i + 1 == len(loader):
                loss_sum = _add_losses(engine, pending, loss_sum, i + 1, epoch)
                pending = []
                bar.set_postfix({"loss": f"{loss_sum / (seen + size):.4f}"}, refresh=False)
            preds.append(torch.sigmoid(logits.detach()))
        seen += size
        true.append(batch["label_vec_true"].numpy())
        obs.append(batch["label_vec_obs"].numpy())
        idx.append(batch["idx"].numpy())
    if not idx:  # a rank whose share of a small set is empty
        empty = np.zeros((0, loader.dataset.labels_true.shape[1]), dtype=np.float32)
        preds, true, obs, idx = [torch.from_numpy(empty)], [empty], [empty], [np.zeros(0, dtype=np.int64)]
    return {"preds": torch.cat(preds).cpu().numpy(), "true": np.concatenate(true), "obs": np.concatenate(obs),
            "idx": np.concatenate(idx), "loss": loss_sum / max(seen, 1), "seconds": time.time() - start,
            "num_batches": len(loader)}


def _add_losses(engine: Engine, pending: list[tuple[torch.Tensor, int]], loss_sum: float, done: int,
                epoch: int) -> float:
    """`loss_sum` plus loss x size of the `pending` batches (the last of which is batch `done`, 1-based), read back
    in one copy; NonFiniteLossError for the first non-finite one. In a torchrun launch every rank learns the latest
    first-bad batch of any rank, so that all ranks stop together."""
    losses = torch.stack([loss for loss, _ in pending]).tolist()
    first = next((j for j, value in enumerate(losses) if not np.isfinite(value)), None)
    mine = -1 if first is None else done - len(losses) + 1 + first
    bad = int(engine.dist.max_(torch.tensor(mine, device=engine.device)))
    if bad >= 0:
        raise NonFiniteLossError(epoch, bad, losses[first] if mine == bad else float("nan"))  # (nan: another rank's)
    for value, (_, size) in zip(losses, pending):
        loss_sum += value * size  # float64 products and sums, as loss.double() * size added to a float64 sum
    return loss_sum


def train_epoch(engine: Engine, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                cfg: Config, epoch: int, dataset: MultilabelDataset | None = None) -> dict:
    """One training epoch. A loss that corrects labels for good (LL-Cp) has its corrections written into
    `dataset` (default: the loader's) at the end of the epoch, kept on the device until then (no sync): each
    row comes once per epoch, so the loaders see them from the next epoch on, as with the original's
    per-epoch DataLoader workers. In a torchrun launch every rank trains on its shard (reshuffled each epoch),
    the corrections of all ranks reach every rank, and the returned predictions are all ranks' (gather_pass)."""
    engine.train()
    if cfg.frozen_backbone_epochs:  # GR-Loss's linear init: the head alone first, the backbone still in train mode
        engine.model.backbone.requires_grad_(epoch > cfg.frozen_backbone_epochs)
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # a DistributedSampler: this epoch's shuffle
        loader.sampler.set_epoch(epoch)
    hyperparameters = cfg.loss_hyperparameters()
    corrections = LOSSES[cfg.loss].corrections
    corrected: list[tuple[torch.Tensor, torch.Tensor]] = []
    target = dataset if dataset is not None else loader.dataset
    # EM_PL's score rows of the training set, on the device for the epoch (main.attach_pseudo_scores)
    scores = None if target.pseudo_scores is None else torch.from_numpy(target.pseudo_scores).to(engine.device)

    def step(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        obs = batch["label_vec_obs"].to(engine.device, non_blocking=True)
        # labels were checked once at load time; torch.where filling gives the original's bits without a sync
        estimates = None if engine.estimates is None else engine.estimates(batch["idx"].to(engine.device))
        mask = None if corrections is None else corrections(logits, obs, epoch=epoch,
                                                            ties=cfg.ll_cp_corrections == "at-or-above",
                                                            **hyperparameters)
        batch_scores = None if scores is None else scores[batch["idx"].to(engine.device)]
        loss = compute_loss(cfg.loss, logits, obs, batch["label_vec_true"].to(engine.device, non_blocking=True),
                            checked=True, where=True, epoch=epoch, estimates=estimates,
                            pseudo_scores=batch_scores, num_epochs=cfg.num_epochs,
                            frozen_backbone_epochs=cfg.frozen_backbone_epochs, **hyperparameters)
        if mask is not None:
            corrected.append((batch["idx"], mask))
        optimizer.zero_grad()
        scaler.scale(loss).backward()  # no scaling unless --amp fp16
        if engine.estimates is not None:  # DDP averages the model's gradients; the estimates' are averaged here
            engine.dist.average_gradients_(list(engine.estimates.parameters()))
        return loss.detach()

    def update() -> None:
        scaler.step(optimizer)
        scaler.update()
    update.optimizer = optimizer  # (cuda_graphs: --cuda-graphs step makes it capturable)

    out = _forward_pass(engine, loader, f"epoch {epoch} train", step, epoch, update)
    if corrections is not None:
        before = target.labels_obs.copy()
        rows = [batch_rows for batch_rows, _ in corrected] or [torch.zeros(0, dtype=torch.long)]
        masks = [mask for _, mask in corrected] or [torch.zeros((0, before.shape[1]), dtype=torch.bool)]
        # the epoch's batches in one write
        for rank_rows, rank_masks in engine.dist.all_gather((torch.cat(rows), torch.cat(masks).cpu())):
            target.mark_positive(rank_rows, rank_masks)
        out["corrected_labels"] = int(((target.labels_obs == 1) & (before != 1)).sum())
    return engine.dist.gather_pass(out)


def evaluate(engine: Engine, loader, desc: str) -> dict:
    """Predictions over `loader` in eval mode; in a torchrun launch every rank evaluates rank 0's model on its
    shard and gets all ranks' predictions, each row once (gather_pass)."""
    engine.model.eval()
    engine.dist.broadcast_buffers_(engine.model)
    return engine.dist.gather_pass(_forward_pass(engine, loader, desc))


def run_apl(engine: Engine, loader, dataset: MultilabelDataset, unlabel_num: np.ndarray, cfg: Config,
            epoch: int, train_batches: int | None = None) -> int:
    """Pseudo-label after a training epoch, as the original: eval mode, predictions taken over the training
    loader itself (shuffled, train transform), or over `loader` (a linear probe's in-order pass) when the
    training loader has `train_batches` batches. Returns the number of new pseudo-labels."""
    out = evaluate(engine, loader, f"epoch {epoch} APL")
    if (out["num_batches"] if train_batches is None else train_batches) <= 1:
        # The original's update sits in its "not the first batch" branch: a one-batch loader is iterated
        # (consuming the same random numbers) but never labels.
        print(f"[epoch {epoch}] APL made no pseudo-labels: the training loader has a single batch (as the original)")
        return 0
    preds = out["preds"]
    if not np.array_equal(out["idx"], np.arange(len(preds))):  # a shuffled pass: into dataset order
        preds = np.zeros_like(out["preds"])
        preds[out["idx"]] = out["preds"]
    before = dataset.labels_obs  # (apl_update returns a new matrix; this one is unchanged until set_observed)
    # rank 0 labels, every rank (and, through the shared matrix, its loader workers) gets its matrix
    after = engine.dist.from_main(lambda: apl_update(before, preds, unlabel_num, cfg.neg_proportion, cfg.num_epochs,
                                                     cfg.warmup_epoch))
    new_labels = int(((after < 0) & (before == 0)).sum())
    dataset.set_observed(after)
    return new_labels


# ----------------------------------------------------------------------------------------------------------------
# ROLE+LI's phase 1

def linear_init(feature_sets: dict[str, FeatureDataset], cfg: Config, device: torch.device) -> tuple[dict, dict]:
    """ROLE+LI's linear initialisation (Cole et al.): a linear classifier and a fresh estimate matrix trained with
    ROLE on the frozen backbone's features of the same train / val split, for ROLE_LI_PHASE1's epochs, lr and
    batch; the best-val epoch's state is kept (all epochs run: Cole et al.'s loop has no early stopping).
    Returns that state ({"model": the head's weight and bias, "label_estimates": logits}) and a record."""
    phase = dataclasses.replace(cfg, loss="role", **ROLE_LI_PHASE1.get(cfg.dataset, ROLE_LI_PHASE1["coco"]))
    num_features, num_classes = feature_sets["train"].features.shape[1], feature_sets["train"].labels_true.shape[1]
    head = torch.nn.Linear(num_features, num_classes)
    engine = build_engine(head.to(device), device, estimates=LabelEstimates(feature_sets["train"].labels_obs))
    loaders = {split: FeatureLoader(feature_sets[split], phase.batch_size, split == "train", device,
                                    drop_last_of=phase.batch_size if cfg.drop_last else 0)
               for split in ("train", "val")}
    optimizer = Adam(engine.parameter_groups(phase.lr), lr=phase.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    record: dict = {"num_epochs": phase.num_epochs, "lr": phase.lr, "batch_size": phase.batch_size, "epochs": {},
                    "best_epoch": None, "selection": cfg.selection_key}
    best_val_map, best_state = -np.inf, None
    for epoch in range(1, phase.num_epochs + 1):
        out = train_epoch(engine, loaders["train"], optimizer, scaler, phase, epoch)
        val = evaluate(engine, loaders["val"], f"linear init {epoch} val")
        val_map = _eval_metrics(val)[cfg.selection_key]  # as the run selects (--stop-metric, --val-labels)
        record["epochs"][str(epoch)] = {"train_loss": out["loss"], "val_map": val_map}
        if val_map > best_val_map:
            best_val_map, best_state, record["best_epoch"] = val_map, engine.state(), epoch
        print(f"linear init epoch {epoch}/{phase.num_epochs}  train loss {out['loss']:.4f}  val mAP {val_map:.2f}"
              + ("  *best*" if record["best_epoch"] == epoch else ""), flush=True)
    if best_state is None:
        raise ValueError(f"ROLE+LI's linear phase never gave a finite val {cfg.selection_key}; check the features")
    record["val_map"] = best_val_map
    return best_state, record


# ----------------------------------------------------------------------------------------------------------------
# results

def save_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
    write_atomic(path, write)


def mark_if_dead(path: Path) -> bool:
    """A results.json left at "running" by a process of this host that no longer exists (kill -9, out of
    memory, power loss) is marked "killed"; its finished epochs are kept. Returns whether it was marked."""
    try:
        results = json.loads(path.read_text())
        pid, host = results["process"]["pid"], results["process"]["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if results.get("status") != "running" or host != socket.gethostname() or pid_alive(pid):
        return False
    results.update(status="killed", error=f"the process (pid {pid}) ended without a word (kill -9, out of memory, "
                                          f"...) during epoch {len(results.get('epochs', {})) + 1}")
    save_json(path, results)
    return True


def _eval_metrics(out: dict) -> dict:
    metrics = compute_metrics(out["preds"], out["true"], out["obs"])
    for t in THRESHOLDS:
        metrics.update({f"{k}@{t}": v for k, v in threshold_metrics(out["preds"], out["true"], t).items()})
    metrics["seconds"] = out["seconds"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# resuming: last.pt, written at the end of every epoch

CHECKPOINT_FORMAT = 2  # of last.pt (2: arrays stored as tensors); another one is refused on --resume, naming both


class ResumeError(ValueError):
    """A run folder that cannot be resumed; the message says why and what to do."""


class NoResumeState(ResumeError):
    """A run folder without last.pt: no finished epoch's state was saved; the message says what happened."""


def _why_no_last(run_dir: Path) -> str:
    """What a run folder without last.pt went through, from what it holds (results.json, write_atomic's
    temporaries): last.pt is written after each finished epoch's record, best.pt and predictions.npz."""
    try:
        finished = len(json.loads((run_dir / "results.json").read_text()).get("epochs") or {})
    except (OSError, ValueError, AttributeError):
        finished = 0
    half_written = sorted({p.name.split(".")[1] + ".pt" for p in run_dir.glob(".*.pt.*.tmp")})
    if half_written:
        return (f"no finished epoch's state was saved: it stopped while writing {' and '.join(half_written)} of "
                f"epoch {finished or 1} (the incomplete file is left aside, never read)")
    if finished:
        return (f"no finished epoch's state was saved: its results.json records {finished} epoch(s), but it stopped "
                f"before last.pt was written (or an older version made it, which kept none)")
    return "no finished epoch's state was saved: it stopped before its first epoch ended"


@dataclass
class Progress:
    """Where the loop stands after a finished epoch: what a resumed run needs besides the model and optimizer."""

    epoch: int = 0  # the last finished epoch
    best_val_map: float = -np.inf
    best_epoch: int | None = None
    unlabel_num: np.ndarray | None = None  # APL's U_c, counted once before training
    best_test: dict | None = None  # the test pass of the best epoch (its predictions)
    best_val: dict | None = None  # the val pass of the best epoch


def _random_states(loaders: dict) -> dict:
    """This process's random generators (each rank has its own: last.pt keeps them all, in rank order)."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    # the cached loaders' worker generators (kept across epochs with --persistent-workers)
    states["loaders"] = {phase: [g.get_state() for g in loader._worker_generators]
                         for phase, loader in loaders.items()
                         if getattr(loader, "_worker_generators", None) is not None}
    return states


def _restore_random_states(states: dict, loaders: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for phase, saved in states["loaders"].items():
        if hasattr(loaders.get(phase), "_worker_generators"):
            generators = [torch.Generator() for _ in saved]
            for g, state in zip(generators, saved):
                g.set_state(state)
            loaders[phase]._worker_generators = generators


def _save_last(run_dir: Path, engine: Engine, optimizer, scaler, datasets: dict, loaders: dict, progress: Progress,
               results: dict, cfg: Config) -> None:
    random_states = engine.dist.all_gather(_random_states(loaders))  # every rank takes part; rank 0 writes
    if not engine.dist.main:
        return
    # numpy arrays travel as tensors: torch.save pickles arrays ten times slower than it writes tensor storages
    state = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "world_size": engine.dist.world_size,
             **engine.state(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "labels_obs": torch.from_numpy(datasets["train"].labels_obs.copy()),
             "progress": _as_tensors(dataclasses.asdict(progress)),
             "epochs": results["epochs"], "random": random_states}
    write_atomic(run_dir / "last.pt", lambda tmp: torch.save(state, tmp))


def _as_tensors(tree):
    """`tree` (dicts of numpy arrays and plain values) with its arrays as tensors sharing their memory."""
    if isinstance(tree, dict):
        return {k: _as_tensors(v) for k, v in tree.items()}
    return torch.from_numpy(tree) if isinstance(tree, np.ndarray) else tree


def _as_arrays(tree):
    """The inverse of `_as_tensors`."""
    if isinstance(tree, dict):
        return {k: _as_arrays(v) for k, v in tree.items()}
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


def load_last(run_dir: Path) -> dict:
    """The state of `run_dir/last.pt`; ResumeError (one line: missing, damaged, another format) otherwise."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise NoResumeState(_why_no_last(Path(run_dir)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise ResumeError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          f"start the run again instead") from exc
    if not isinstance(state, dict) or "format" not in state:
        raise ResumeError(f"{path} is not a resume state of this project; start the run again instead")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} has checkpoint format {state['format']} (another version of this project); this "
                          f"version reads format {CHECKPOINT_FORMAT}: resume it with that version, or start again")
    state["labels_obs"], state["progress"] = _as_arrays(state["labels_obs"]), _as_arrays(state["progress"])
    return state


def _restore(state: dict, engine: Engine, optimizer, scaler, datasets: dict, loaders: dict) -> Progress:
    engine.load_state(state)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    datasets["train"].set_observed(state["labels_obs"])
    _restore_random_states(state["random"][engine.dist.rank], loaders)
    return Progress(**state["progress"])


# ----------------------------------------------------------------------------------------------------------------
# the loop

def fit(engine: Engine, loaders: dict, datasets: dict[str, MultilabelDataset], cfg: Config, run_dir: Path,
        results: dict, resume: dict | None = None) -> dict:
    """Train with early stopping; fill and save `results` (results.json) after every epoch; keep best.pt and
    predictions.npz of the best epoch, and last.pt (the resume state) of the last finished one.
    `loaders` come from `image_cache.make_loaders` (faithful DataLoaders or the cached loaders). `resume`: a
    `load_last` state, continued after its epoch (its records replace `results["epochs"]`).

    A run that breaks (NaN loss, unreadable image, Ctrl-C, ...) keeps its finished epochs in results.json
    with status "failed" or "interrupted" and the error. In a torchrun launch only rank 0 writes; a rank that
    died (torchrun then stops the others, or a collective fails or times out) fails the run, naming the rank.
    """
    dist = engine.dist
    results.update(epochs=resume["epochs"] if resume else {}, status="running",
                   process={"pid": os.getpid(), "host": socket.gethostname()},
                   best_epoch=resume["progress"]["best_epoch"] if resume else None)
    if dist.enabled:
        results["process"]["ranks"] = [{"host": host, "pid": pid} for host, pid in dist.peers]
    results.pop("error", None)
    if dist.main:
        save_json(run_dir / "results.json", results)

    def stopped_by_watchdog(message: str) -> None:  # this process may be blocked inside a collective: end it here
        error = f"{message} during epoch {len(results['epochs']) + 1}; the run stopped"
        if dist.main:
            try:
                save_json(run_dir / "results.json", {**results, "status": "failed", "error": error})
            except Exception:  # (the loop may be changing `results` right now: the running record stays)
                pass
        print(f"error: {error}" if dist.main else f"[rank {dist.rank}] error: {error}", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = start_watchdog(dist, stopped_by_watchdog)
    try:
        best_state, progress = _train_with_early_stopping(engine, loaders, datasets, cfg, run_dir, results, resume)
        watchdog.set()
        dist.all_gather(None)  # no rank exits (and looks dead to a watchdog) before every rank stopped watching
    except BaseException as exc:
        watchdog.set()
        if dist.enabled:  # torchrun's SIGTERM to the survivors must not cut what follows (main restores them)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupted = isinstance(exc, KeyboardInterrupt)
        ours = isinstance(exc, (KeyboardInterrupt, NonFiniteLossError, DataError, OutputError, ValueError))
        where = f"during epoch {len(results['epochs']) + 1}"
        # a rank dead before our own signal arrived (torchrun stops the survivors when one dies), or one that is
        # dead, or dies within seconds, when a collective fails; a stop of the whole job leaves them alive here
        dead = dist.dead_ranks(wait_s=0.0 if interrupted else 3.0) if dist.enabled else []
        if dead:
            interrupted, error = False, f"{', '.join(dead)} died {where}; the other ranks stopped ({exc})"
        elif interrupted:
            error = f"{str(exc) or 'Ctrl-C'} {where}"
        else:  # a failed collective (a closed connection, gloo's timeout) is explained by the other ranks' marks
            error = f"{type(exc).__name__}: {exc}" + (f" ({dist.diagnose()})" if dist.enabled and not ours else "")
        results.update(status="interrupted" if interrupted else "failed", error=error)
        try:
            if dist.main:
                save_json(run_dir / "results.json", results)
        except OSError:  # e.g. the disk is full: the last complete results.json stays, the caller reports
            pass
        if dead or (dist.enabled and not ours):
            raise RankFailure(error) from exc
        raise

    engine.load_state(best_state)
    best = results["epochs"][str(results["best_epoch"])]
    best_test = progress.best_test
    results.update(
        status="finished",
        val_map=best["val"]["map_clean"],
        test_map=best["test"]["map_clean"],
        test_per_class_ap=(100 * per_class_ap(best_test["preds"], best_test["true"])).tolist(),
        test_thresholded={str(t): {k[:-len(f"@{t}")]: v for k, v in best["test"].items() if k.endswith(f"@{t}")}
                          for t in THRESHOLDS},
        recommended_threshold=0.75 if cfg.loss in ("EM", "EM_APL", "EM_PL") else 0.5,
    )
    if dist.main:
        save_json(run_dir / "results.json", results)
        if not cfg.keep_last:  # a finished run cannot be resumed: its resume state is only weight (--keep-last)
            (run_dir / "last.pt").unlink(missing_ok=True)
    return results


def _train_with_early_stopping(engine: Engine, loaders: dict, datasets: dict, cfg: Config, run_dir: Path,
                               results: dict, resume: dict | None = None) -> tuple[dict, Progress]:
    """epoch -> train -> (pseudo-label) -> val -> select (-> test) -> stop?; returns the best state and the progress.
    The test pass runs after each improving epoch, every epoch or once at the end (--test-pass); its number is the
    best val epoch's either way (each pass draws the DataLoader's seed, so the choice follows the source's loop)."""
    optimizer = Adam(engine.parameter_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr)
    scaler = torch.amp.GradScaler(engine.device.type, enabled=cfg.amp == "fp16")
    finished = False
    if resume is None:
        progress = Progress(unlabel_num=(datasets["train"].labels_obs == 0).sum(axis=0))
        best_state = None
    else:
        progress = _restore(resume, engine, optimizer, scaler, datasets, loaders)
        # the loop only goes on after an improving epoch, whose state is the current one; else best.pt has it
        best_state = engine.state() if progress.best_epoch == progress.epoch else _load_best(run_dir, progress)
        if progress.best_epoch == progress.epoch and engine.dist.main:
            _rewrite_best_if_ahead(run_dir, best_state, progress, datasets, cfg)
        last_val = resume["epochs"][str(progress.epoch)]["val"][cfg.selection_key]
        # it stopped (after all epochs the range below is empty anyway), and was cut before it could say so
        finished = _stops(cfg, progress.best_epoch == progress.epoch, last_val, progress.best_val_map)

    for epoch in range(progress.epoch + 1, cfg.num_epochs + 1) if not finished else ():
        record: dict = {}  # enters results["epochs"] only once the epoch is complete
        epoch_start = time.time()
        out = train_epoch(engine, loaders["train"], optimizer, scaler, cfg, epoch, datasets["train"])
        train_metrics = compute_metrics(out["preds"], out["true"], out["obs"])
        if not datasets["train"].full_labels:  # single positives only: nothing "clean" to score against
            train_metrics = {k: v for k, v in train_metrics.items() if not k.endswith("_clean")}
        record["train"] = {"loss": out["loss"], **train_metrics, "seconds": out["seconds"]}
        if LOSSES[cfg.loss].corrections is not None:
            record["corrected_labels"] = out["corrected_labels"]

        if cfg.loss == "EM_APL" and epoch >= cfg.warmup_epoch:
            record["apl_new_pseudo_labels"] = run_apl(engine, loaders.get("apl", loaders["train"]), datasets["train"],
                                                      progress.unlabel_num, cfg, epoch, len(loaders["train"]))
            record["apl_total_pseudo_labels"] = int((datasets["train"].labels_obs < 0).sum())

        val = evaluate(engine, loaders["val"], f"epoch {epoch} val")
        record["val"] = _eval_metrics(val)
        val_map = record["val"][cfg.selection_key]  # map_clean unless --stop-metric / --val-labels
        # strict: a tie is no improvement, as the original; rank 0 decides for every rank
        improved = engine.dist.from_main(lambda: val_map > progress.best_val_map)
        line = (f"epoch {epoch}/{cfg.num_epochs}  train loss {record['train']['loss']:.4f}  "
                f"val mAP {record['val']['map_clean']:.2f}"
                + ("" if cfg.selection_key == "map_clean" else f"  val {cfg.selection_key} {val_map:.2f}"))
        stop = _stops(cfg, improved, val_map, progress.best_val_map)
        if improved:
            best_state = engine.state()
            progress.best_val_map, progress.best_epoch, progress.best_val = val_map, epoch, _kept(val)
        if cfg.test_pass == "every" or (improved and cfg.test_pass == "best"):
            test = evaluate(engine, loaders["test"], f"epoch {epoch} test")
            record["test"] = _eval_metrics(test)
            if improved:
                progress.best_test = _kept(test)
            line += f"  test mAP {record['test']['map_clean']:.2f}"
        line += "  *best*" if improved else ""
        record["seconds"] = time.time() - epoch_start
        print(line + f"  ({record['seconds']:.0f} s)", flush=True)
        results["epochs"][str(epoch)] = record
        results["best_epoch"] = progress.best_epoch
        progress.epoch = epoch
        if engine.dist.main:  # only rank 0 writes
            save_json(run_dir / "results.json", results)  # the small record first: a full disk still keeps it
            if improved:
                _save_checkpoint(run_dir / "best.pt", best_state, cfg, epoch)
                if progress.best_test is not None:
                    _save_predictions(run_dir / "predictions.npz", progress, datasets, epoch)
        _save_last(run_dir, engine, optimizer, scaler, datasets, loaders, progress, results, cfg)
        if stop:
            # the original leaves both loops here, so this epoch has no test pass
            print(f"*** early stop: val {cfg.selection_key} {val_map:.2f} " + (
                "did not improve on" if cfg.early_stop == "first-drop" else
                f"fell more than {cfg.early_stop.removeprefix('drop-')} below") +
                f" {progress.best_val_map:.2f} (epoch {results['best_epoch']}) ***", flush=True)
            break

    if cfg.test_pass == "end" and progress.best_test is None and best_state is not None:
        engine.load_state(best_state)  # the best val epoch's weights, as Kim et al.'s final test phase loads them
        test = evaluate(engine, loaders["test"], f"epoch {progress.best_epoch} test")
        progress.best_test = _kept(test)
        results["epochs"][str(progress.best_epoch)]["test"] = _eval_metrics(test)
        print(f"test mAP {results['epochs'][str(progress.best_epoch)]['test']['map_clean']:.2f} with the weights of "
              f"epoch {progress.best_epoch}", flush=True)
        if engine.dist.main:
            save_json(run_dir / "results.json", results)
            _save_predictions(run_dir / "predictions.npz", progress, datasets, progress.best_epoch)
    return best_state, progress


def _stops(cfg: Config, improved: bool, val_metric: float, best_val_metric: float) -> bool:
    """Whether the loop ends after an epoch (--early-stop): at the first epoch that does not strictly improve
    (first-drop, Zhou et al.), when val falls more than N below the best before it (drop-N: Kim et al.'s 3,
    GR-Loss's 2), or never (none, Cole et al.: every epoch runs)."""
    if improved:
        return False
    if cfg.early_stop.startswith("drop-"):
        return best_val_metric - val_metric > int(cfg.early_stop.removeprefix("drop-"))
    return cfg.early_stop == "first-drop"


def _kept(out: dict) -> dict:
    """What a pass's output keeps for later (predictions.npz, the final per-class AP): scores in dataset order."""
    order = np.argsort(out["idx"], kind="stable")
    return {"preds": out["preds"][order], "true": out["true"][order], "idx": out["idx"][order]}


def _rewrite_best_if_ahead(run_dir: Path, best_state: dict, progress: Progress, datasets: dict, cfg: Config) -> None:
    """A run stopped after writing best.pt / predictions.npz of an epoch but before its last.pt: they belong to an
    epoch that the resumed run trains again (and that may not improve then). Put back the last.pt's best."""
    def saved_epoch(path: Path, read) -> int | None:
        try:
            return int(read(path))
        except Exception:  # missing or damaged: rewritten too
            return None
    if saved_epoch(run_dir / "best.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False)["epoch"]) \
            != progress.best_epoch:
        _save_checkpoint(run_dir / "best.pt", best_state, cfg, progress.best_epoch)
    if progress.best_test is not None and \
            saved_epoch(run_dir / "predictions.npz", lambda p: np.load(p)["epoch"]) != progress.best_epoch:
        _save_predictions(run_dir / "predictions.npz", progress, datasets, progress.best_epoch)


def _load_best(run_dir: Path, progress: Progress) -> dict:
    path = run_dir / "best.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ResumeError(f"cannot read {path} ({type(exc).__name__}); start the run again instead") from exc
    if state.get("epoch") != progress.best_epoch:
        raise ResumeError(f"{path} holds epoch {state.get('epoch')}, but last.pt's best epoch is "
                          f"{progress.best_epoch}; start the run again instead")
    return state


def _save_checkpoint(path: Path, state: dict, cfg: Config, epoch: int) -> None:
    write_atomic(path, lambda tmp: torch.save({**state, "config": cfg.to_dict(), "epoch": epoch}, tmp))


def _save_predictions(path: Path, progress: Progress, datasets: dict, epoch: int) -> None:
    """The best epoch's val and test scores with their true labels and their rows in the formatted files
    (val: formatted_train_*, test: formatted_val_*), so that any metric can be recomputed later."""
    arrays = {"epoch": np.array(epoch)}
    for split, out in (("val", progress.best_val), ("test", progress.best_test)):
        arrays.update({f"{split}_scores": out["preds"].astype(np.float32), f"{split}_labels": out["true"],
                       f"{split}_rows": datasets[split].rows[out["idx"]]})

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomic(path, write)
