"""--cuda-graphs (issue 27; docs/gpu-speed.md): the training step and the evaluation forward replayed as CUDA graphs.

Why: at the paper's batch (8 images at 448 px) a ResNet-50 step on a recent GPU is bound by the host's work per step
(kernel launches, Python, autograd's engine, the optimizer), not by arithmetic (bench/measured/: 29.7 ms per step on
an H200, whatever the precision). A CUDA graph records the kernels of one step once; a replay launches them all
with one call.

Why torch.cuda.graphs directly rather than torch.compile(mode="reduce-overhead"): compile's graphs replay inductor's
own (fused) kernels, so they cannot give the eager step's bits; its warm-up takes minutes, it recompiles for the last
partial batch's shape and for Python values a guard sees change (a loss's epoch), and the optimizer step stays out
unless compiled too. The capture below is explicit and checkable rule by rule.

Two modes:
  model  the forward, the loss and the backward of a training step are one graph, the eval forward another (one
         per batch shape); torch's Adam (capturable=False: the run's own optimizer, unchanged) runs eagerly after
         each replay, its step count and bias corrections host-side float64 numbers as always. A replay launches
         the kernels that the eager step launches, on the same inputs, so the numbers are the eager step's: bit for
         bit wherever the eager step is itself reproducible on that GPU (bench/epoch.py measures both).
  step   Adam's step is in the training graph too, with capturable=True, which torch requires for a captured step.
         torch documents only that capturable=True may be slower when not captured; its code
         (torch/optim/adam.py, _multi_tensor_adam) computes the bias corrections in float32 on the device
         (beta ** step) and applies param += exp_avg / (denom / step_size) instead of the default
         param += step_size * exp_avg / denom with float64 host scalars: the parameters differ from the default
         Adam's in the last bits from the first step on. Statistical, not bit-identical.

The capture rules (torch.cuda graphs' documentation), as followed here:
  - static inputs: the model input (image_cache.to_model_input's output: the flips, decided on the host, and the
    normalisation run eagerly before), the observed and true label rows and the batch's row indices are copied
    into buffers that the graph reads; the outputs (logits, loss) are buffers that the next replay overwrites, so
    the loss is cloned and the logits consumed (sigmoid, on the same stream) before the next replay.
  - warm-up: eager iterations on a side stream before each capture (cuDNN / cuBLAS handles and workspaces,
    autograd's state, cuDNN's benchmark search). Training warm-ups run the forward, loss and backward only (no
    optimizer step), and their effect on the BatchNorm statistics is undone (copied back in place) and their random
    draws too (fork_rng), so the run never sees them. In mode step Adam's state must exist before the capture (the
    state tensors the graph updates in place): the first training batch of a run runs eagerly, creating it.
  - gradients are None before the capture, so the captured backward allocates them in the graph's private pool and
    every replay writes them anew, as the eager step's zero_grad(set_to_none=True) and backward do.
  - nothing inside waits for the host: the losses run with where=True; the losses and options that need the host
    at every step are refused by `check` (and torchrun by main.setup_device).
  - capture_error_mode "thread_local": a DataLoader's pin-memory thread may allocate pinned memory meanwhile.
  - a training graph belongs to one epoch's step (a loss's epoch-dependent constants are baked in) and to the
    tensors it was captured on: a new epoch's step, a batch of another shape (the last partial batch: eager, then
    the graph is dropped), or a parameter, buffer, gradient or Adam-state tensor that is no longer the one it
    recorded makes the next batch run eagerly or be captured again.
Eval graphs are kept per input shape (the full batch and each loader's last partial batch recur every epoch), at
most MAX_EVAL_GRAPHS; other shapes run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from config import Config
from image_cache import to_model_input
from losses import LOSSES

TRAIN_WARMUP = 3  # eager iterations before a training capture (torch's documented example uses 3; DDP would need 11)
EVAL_WARMUP = 2
MAX_EVAL_GRAPHS = 6  # the val / test / APL passes' full and last partial batch shapes, and one more


def check(cfg: Config, device: torch.device) -> None:
    """ValueError (one line, naming the flag and the fix) when --cuda-graphs cannot run with these settings."""
    if cfg.cuda_graphs == "off":  # (main.build_run calls this for image runs only: --features ignores the flag)
        return
    flag = f"--cuda-graphs {cfg.cuda_graphs}"
    if device.type != "cuda":
        raise ValueError(f"{flag} needs a CUDA GPU (it replays CUDA graphs); on the CPU leave --cuda-graphs off")
    if cfg.compile:
        raise ValueError(f"{flag} and --compile both put the model in graphs (torch.compile has its own, "
                         f"mode='reduce-overhead'): give one of them")
    loss = LOSSES[cfg.loss]
    why = ("fills its loss by boolean indexing, whose size the host reads at every step" if loss.masked else
           "collects its label corrections on the host at every step" if loss.corrections is not None else
           "trains a label-estimate matrix whose gradient buffer the host manages per step (label_state.LabelEstimates)"
           if "estimates" in loss.context else None)
    if why:
        raise ValueError(f"{flag}: -l {cfg.loss} {why}, which a CUDA graph cannot replay; leave --cuda-graphs off "
                         f"for -l {cfg.loss}")
    if cfg.amp == "fp16" and cfg.cuda_graphs == "step":
        raise ValueError("--cuda-graphs step with --amp fp16: the loss scaler reads its inf/NaN check on the host "
                         "before every optimizer step; use --cuda-graphs model, or --amp bf16")


class CudaBackend:
    """torch.cuda's graphs on one device. (tests/test_gpu_speed.py replaces it by a CPU stand-in that checks the
    host logic around it.)"""

    def warm_up(self, device: torch.device, body: Callable[[], object], iterations: int) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(iterations):
                body()
        torch.cuda.current_stream(device).wait_stream(side)

    def capture(self, device: torch.device, body: Callable[[], tuple]) -> tuple[object, tuple]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device),
                                                         capture_error_mode="thread_local"):
            outputs = body()
        return graph, outputs

    def replay(self, graph) -> None:
        graph.replay()


@dataclass
class _Graph:
    handle: object  # the backend's graph
    inputs: dict  # the static input buffers, by batch key
    outputs: tuple  # the static outputs
    pointers: tuple  # what it was captured on (`_tensor_pointers`)
    step: Callable | None = None  # the training step closure it belongs to (None: an eval graph)


@dataclass
class CudaGraphs:
    """The graphs of a run (Engine.graphs); train._forward_pass calls `train_step` and `eval_logits`."""

    mode: str = "model"  # "model" or "step" (config.CUDA_GRAPH_MODES)
    backend: object = field(default_factory=CudaBackend)
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("train_captures", "train_replays", "train_eager", "eval_captures", "eval_replays", "eval_eager"), 0))

    def __post_init__(self) -> None:
        if self.mode not in ("model", "step"):
            raise ValueError(f"--cuda-graphs must be model or step here, got {self.mode!r}")
        self._train: _Graph | None = None
        self._eval: dict[tuple, _Graph] = {}
        self._no_capture_for: Callable | None = None  # the step of a pass that already ran a batch eagerly

    # ---- training ---------------------------------------------------------------------------------------------

    def train_step(self, engine, batch: dict, step: Callable, update: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, detached loss) of one training batch, the optimizer stepped: the captured step replayed, or
        this batch run eagerly (another shape, the first batch of mode step, or a graph that no longer fits)."""
        optimizer = getattr(update, "optimizer", None)  # (train.train_epoch hangs it on its `update`)
        x = to_model_input(batch, engine.device, engine.channels_last)
        graph = self._train
        if graph is not None and graph.step is step and not _fits(graph, x, batch):
            # a batch of another shape within the pass (its last, partial one): the rest of the pass runs eagerly
            self.drop_train(engine)
            graph, self._no_capture_for = None, step
        elif graph is not None and (graph.step is not step or graph.pointers != self._train_pointers(engine,
                                                                                                     optimizer)):
            self.drop_train(engine)  # a new pass (epoch), or tensors that moved: captured again
            graph = None
        if graph is None and self.mode == "step":
            _make_capturable(optimizer)
        if graph is None and step is not self._no_capture_for and (self.mode == "model" or _has_state(optimizer)):
            graph = self._train = self._capture_train(engine, x, batch, step, update, optimizer)
        if graph is None:  # eagerly, as the loop without graphs (mode step: a batch that makes Adam's state)
            self.stats["train_eager"] += 1
            logits = engine.logits({"image": x})
            loss = step(logits, batch)
            update()
            return logits, loss
        _copy_inputs(graph, x, batch)
        self.backend.replay(graph.handle)
        if self.mode == "model":
            update()  # torch's Adam, eagerly, on the gradients the replay wrote
        self.stats["train_replays"] += 1
        logits, loss = graph.outputs
        return logits, loss.clone()  # (the next replay overwrites the buffer; the logits are used before it)

    def drop_train(self, engine) -> None:
        """Forget the training graph (its memory returns when its gradients go)."""
        if self._train is not None:
            for p in engine.model.parameters():
                p.grad = None
            self._train = None

    def _train_pointers(self, engine, optimizer) -> tuple:
        params = list(engine.model.parameters())
        pointers = _tensor_pointers(engine.model) + tuple(0 if p.grad is None else p.grad.data_ptr() for p in params)
        if self.mode == "step":
            pointers += tuple(t.data_ptr() for state in optimizer.state.values() for t in state.values()
                              if isinstance(t, torch.Tensor))
        return pointers

    def _capture_train(self, engine, x: torch.Tensor, batch: dict, step: Callable, update: Callable,
                       optimizer) -> _Graph:
        device = engine.device
        inputs = {"image": x.clone(), **{k: batch[k].to(device, non_blocking=True).clone() for k in _LABEL_KEYS}}

        def body(with_update: bool) -> tuple:
            logits = engine.logits(inputs)
            loss = step(logits, inputs)
            if with_update:
                update()
            return logits, loss

        buffers = [b for b in engine.model.buffers()]
        saved = [b.detach().clone() for b in buffers]  # BatchNorm statistics: the warm-up's forwards move them
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.backend.warm_up(device, lambda: body(False), TRAIN_WARMUP)
        with torch.no_grad():
            for b, value in zip(buffers, saved):
                b.copy_(value)
        for p in engine.model.parameters():
            p.grad = None  # allocated by the captured backward, in the graph's pool
        handle, outputs = self._capture(device, lambda: body(self.mode == "step"), "training step")
        self.stats["train_captures"] += 1
        return _Graph(handle, inputs, outputs, self._train_pointers(engine, optimizer), step)

    # ---- evaluation -------------------------------------------------------------------------------------------

    def eval_logits(self, engine, batch: dict) -> torch.Tensor:
        """The eval-mode logits of a batch (called in inference mode): a graph per input shape, replayed. The
        result is the graph's output buffer: use it before the next call."""
        x = to_model_input(batch, engine.device, engine.channels_last)
        key = (tuple(x.shape), x.dtype, x.stride(), engine.model.training)
        graph = self._eval.get(key)
        if graph is not None and graph.pointers != _tensor_pointers(engine.model):
            del self._eval[key]
            graph = None
        if graph is None and len(self._eval) < MAX_EVAL_GRAPHS:
            inputs = {"image": x.clone()}
            body = lambda: (engine.logits(inputs, training=False),)  # noqa: E731
            self.backend.warm_up(engine.device, body, EVAL_WARMUP)
            handle, outputs = self._capture(engine.device, body, "evaluation forward")
            graph = self._eval[key] = _Graph(handle, inputs, outputs, _tensor_pointers(engine.model))
            self.stats["eval_captures"] += 1
        if graph is None:
            self.stats["eval_eager"] += 1
            return engine.logits({"image": x}, training=False)
        graph.inputs["image"].copy_(x)
        self.backend.replay(graph.handle)
        self.stats["eval_replays"] += 1
        return graph.outputs[0]

    # ---- both ---------------------------------------------------------------------------------------------------

    def _capture(self, device: torch.device, body: Callable[[], tuple], what: str) -> tuple[object, tuple]:
        try:
            return self.backend.capture(device, body)
        except RuntimeError as exc:  # an operation that waits for the host, or one CUDA graphs do not support
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ValueError(f"--cuda-graphs {self.mode}: the {what} could not be captured as a CUDA graph "
                             f"({first}); run without --cuda-graphs") from exc


_LABEL_KEYS = ("label_vec_obs", "label_vec_true", "idx")  # what the step reads of a batch besides its image


def _fits(graph: _Graph, x: torch.Tensor, batch: dict) -> bool:
    static = graph.inputs
    return (static["image"].shape == x.shape and static["image"].stride() == x.stride()
            and static["image"].dtype == x.dtype
            and all(static[k].shape == batch[k].shape and static[k].dtype == batch[k].dtype for k in _LABEL_KEYS))


def _copy_inputs(graph: _Graph, x: torch.Tensor, batch: dict) -> None:
    graph.inputs["image"].copy_(x)
    for k in _LABEL_KEYS:  # from pinned host memory (the loaders pin on CUDA): no wait
        graph.inputs[k].copy_(batch[k], non_blocking=True)


def _tensor_pointers(model: torch.nn.Module) -> tuple:
    """Where the parameters and buffers live: a graph reads and writes these addresses."""
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())


def _has_state(optimizer) -> bool:
    """Mode step captures Adam's update only once every parameter that trains has its state: a state that Adam
    made inside the capture would be made anew, zeros, at every replay (e.g. the backbone's after the frozen
    epochs of --frozen-backbone-epochs, when the head's state exists already)."""
    return all(p in optimizer.state for group in optimizer.param_groups for p in group["params"] if p.requires_grad)


def _make_capturable(optimizer) -> None:
    """Mode step: torch's Adam with capturable=True (a captured step must be), its step counts on the device.
    A state made without it (a resumed run's last.pt) is moved there once."""
    if optimizer is None:
        raise ValueError("--cuda-graphs step needs the optimizer (train.train_epoch's update.optimizer)")
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)
