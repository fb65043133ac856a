"""How batches run on the device: the model as the loop runs it (`Engine`) and its build from the speed options
(--amp, --channels-last, --compile, --cudnn-benchmark, a torchrun launch)."""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from config import AMP_MODES
from distributed import SINGLE, DistContext
from image_cache import to_model_input
from label_state import ESTIMATES_LR_FACTOR, BufferedAdam, LabelEstimates

AMP_DTYPES = dict(zip(AMP_MODES, (None, torch.bfloat16, torch.float16)))


@dataclass
class Engine:
    """The model as the loop runs it: `model` (whose state is saved), `forward` (the same module, or its
    torch.compile, or its DistributedDataParallel wrapper), the device, the autocast dtype (None = float32
    throughout), the memory format, ROLE's label estimates (trained and saved with the model) for a loss that
    reads them, and where the process stands in a torchrun launch (`dist`; SINGLE for one process); `optimizer`
    makes the Adam that trains them."""

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

    def optimizer(self, lr: float, head_lr_mult: float = 1.0) -> torch.optim.Optimizer:
        """Adam over `parameter_groups`, with torch's other defaults, as the original trains: torch.optim.Adam, or
        with ROLE's estimates label_state.BufferedAdam (the same bits; its docstring says why)."""
        return (torch.optim.Adam if self.estimates is None else BufferedAdam)(self.parameter_groups(lr, head_lr_mult),
                                                                             lr=lr)

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
            if importlib.util.find_spec("triton") is None:  # (torch's own check is private: torch.utils._triton)
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
