"""One training on several processes: DistributedDataParallel launched by `torchrun` (README "Several GPUs").

`torchrun --nproc_per_node N main.py ...` starts N copies of main.py with RANK, WORLD_SIZE, LOCAL_RANK, ... in
their environment; `setup` reads them, checks the request (one-line errors) and joins the process group: NCCL,
one GPU per process picked by the local rank, or gloo on the CPU (`-g cpu`). A plain `python main.py` gets
`SINGLE`, whose collectives return their input, so the training loop has one code path for both.

What is synchronised, and how (train.py calls these):
  - gradients: DDP averages the model's; `average_gradients_` does the same for ROLE's estimate matrix;
  - BatchNorm buffers: rank 0's are broadcast before every evaluation, so every rank evaluates the model
    that rank 0 saves;
  - predictions of a sharded pass (train, APL, val, test): `gather_pass` gathers every rank's rows to every
    rank and drops the distributed sampler's padding, so metrics see each row exactly once, in dataset order
    (val and test are dealt out by whole batches, `shard_arguments`: the same predictions as one process's);
  - decisions (APL's new observed matrix, whether an epoch improved): rank 0 computes, `from_main` broadcasts.
Faults: every rank notes each batch it starts (`mark`), and its watchdog thread (`start_watchdog`) sends the
last one with a heartbeat to torchrun's key-value store every second. The watchdogs end the run when a rank of
their host dies, and rank 0's when a rank's mark has not moved for --dist-timeout seconds (a hang), naming the
rank that is behind. A collective that fails (a peer's closed connection, gloo's own timeout) is explained the
same way (`dead_ranks`, `behind`).
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from fileio import pid_alive

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: rank, world size, its GPU (local rank) and its peers' processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "nccl", "gloo"; "" for a single process
    timeout_s: float = 0.0
    peers: tuple = ()  # (host, pid) of every rank, in rank order
    group: Any = None  # a gloo group for the Python-object collectives (the default one may be NCCL)
    store: Any = None  # a client of torchrun's key-value store, for the marks
    _mark: list = field(default_factory=lambda: [0, "start"])  # this rank's count of marks, and the last one
    _beats: dict = field(default_factory=dict)  # rank 0's watchdog: rank -> (last heartbeat read, when it changed)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """`compute()` run by rank 0 only, its result sent to every rank."""
        if not self.enabled:
            return compute()
        box = [compute() if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_pass(self, out: dict) -> dict:
        """A pass's outputs (train._forward_pass) of every rank joined: each dataset row once (the padding a
        distributed sampler adds repeats rows: the first copy is kept), sorted by row; the loss is the mean over
        all the rows the ranks processed."""
        if not self.enabled:
            return out
        parts = self.all_gather({k: out[k] for k in ("preds", "true", "obs", "idx", "loss", "seconds")}
                                | {"seen": len(out["idx"])})
        idx = np.concatenate([p["idx"] for p in parts])
        rows, first = np.unique(idx, return_index=True)
        joined = {k: np.concatenate([p[k] for p in parts])[first] for k in ("preds", "true", "obs")}
        seen = sum(p["seen"] for p in parts)
        return {**out, **joined, "idx": rows, "seconds": max(p["seconds"] for p in parts),
                "loss": sum(p["loss"] * p["seen"] for p in parts) / max(seen, 1)}

    def average_gradients_(self, tensors: list[torch.Tensor]) -> None:
        """Average the gradients of parameters that DDP does not hold (ROLE's estimates) over the ranks."""
        if not self.enabled:
            return
        for t in tensors:
            if t.grad is not None:
                torch.distributed.all_reduce(t.grad)
                t.grad.div_(self.world_size)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The largest of every rank's `tensor` (in place), e.g. a non-finite loss's batch: all ranks stop together."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def broadcast_buffers_(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def mark(self, where: str) -> None:
        """Note that this rank starts `where` (a pass's batch); the watchdog's next beat sends it to the store (no
        network round trip per batch)."""
        if self.store is not None:
            self._mark[:] = [self._mark[0] + 1, where]

    def read_marks(self) -> list[tuple[str, int, str]]:
        """Every rank's last beat as sent: (beat, count of marks, last mark); ("", 0, "start") before its first."""
        out = []
        for key in (f"spml/at/{r}" for r in range(self.world_size)):
            beat, count, where = (self.store.get(key).decode() if self.store.check([key]) else " 0 start").split(" ", 2)
            out.append((beat, int(count), where))
        return out

    def beat(self, now: float) -> list[tuple[str, int, str]]:
        """The watchdog's heartbeat, with this rank's mark (its thread runs while the main thread waits in a
        collective); rank 0 also notes when each rank's beat last changed. Returns every rank's marks."""
        count, where = self._mark
        self.store.set(f"spml/at/{self.rank}", f"{now} {count} {where}")
        marks = self.read_marks() if self.main else []
        for r, (beat, _, _) in enumerate(marks):
            if self._beats.get(r, (None,))[0] != beat:
                self._beats[r] = (beat, now)
        return marks

    def behind(self, silent_s: float = 5.0) -> list[str]:
        """The ranks to blame for a stall, e.g. ["rank 1 (pid 4242, at epoch 3 train, batch 17)"]: those whose
        heartbeat stopped (a stopped or frozen process), else those whose mark is the least advanced while
        another's is further (stuck outside a collective); [] when neither tells."""
        try:
            marks = self.read_marks()
        except Exception:  # the store is gone with the agent or rank 0
            return []
        now = time.time()
        silent = [r for r, (_, since) in self._beats.items() if r != self.rank and now - since > silent_s]
        low = min(count for _, count, _ in marks)
        slow = [] if all(count == low for _, count, _ in marks) else \
            [r for r, (_, count, _) in enumerate(marks) if count == low]
        return [f"rank {r} (pid {self.peers[r][1]}, at {marks[r][2]})" for r in sorted(silent or slow)]

    def dead_ranks(self, wait_s: float = 3.0) -> list[str]:
        """The other ranks on this host whose process has ended, e.g. ["rank 1 (pid 4242)"]; waits up to `wait_s`
        for a dying one (its closed connection may reach us before its exit is visible). Ranks on other hosts
        cannot be looked at from here (`diagnose` says so)."""
        host = socket.gethostname()
        deadline = time.time() + wait_s
        while True:
            dead = [f"rank {r} (pid {pid})" for r, (h, pid) in enumerate(self.peers)
                    if r != self.rank and h == host and _ended(pid)]
            if dead or time.time() >= deadline:
                return dead
            time.sleep(0.2)

    def diagnose(self) -> str:
        """What can be said of the other ranks when a collective failed and none of this host's ranks died."""
        behind = self.behind()
        if behind:
            return f"{', '.join(behind)} stopped answering (the others had gone on)"
        remote = [r for r, (h, _) in enumerate(self.peers) if h != socket.gethostname()]
        return (f"no rank on this host died; ranks {remote} on other hosts may have (see their logs)" if remote
                else "every rank is alive and at the same point; one failed on its own (see its output)")

    def close(self) -> None:
        if self.backend and torch.distributed.is_initialized():  # (torchrun with one process has a group too)
            torch.distributed.destroy_process_group()


SINGLE = DistContext()


def _ended(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by torchrun counts as ended)."""
    if not pid_alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def start_watchdog(ctx: DistContext, on_failure: Callable[[str], None], period_s: float = 1.0) -> threading.Event:
    """A daemon thread that calls `on_failure(message)` (which ends the process) when another rank of this host has
    died, or, on rank 0, when some rank's mark has not moved for --dist-timeout seconds: a rank blocked inside a
    collective (NCCL notices a peer's death only at its own timeout) cannot handle torchrun's SIGTERM, so the
    run's status is written from here. Returns the event that stops it; no thread for a single process."""
    stop = threading.Event()
    if not ctx.enabled:
        return stop

    def watch() -> None:
        moved = {}  # rank -> (count of marks, time it last changed)
        wait_s = 0.0  # a first beat at once, then one every period
        while not stop.wait(wait_s):
            wait_s, now = period_s, time.time()
            try:
                marks = ctx.beat(now)  # (rank 0 only reads them back)
            except Exception:  # the store is gone: the agent is stopping the job
                return
            dead = ctx.dead_ranks(wait_s=0.0)
            if dead and not stop.is_set():
                on_failure(f"{', '.join(dead)} died")
                return
            for r, (_, count, _) in enumerate(marks):
                if moved.get(r, (None,))[0] != count:
                    moved[r] = (count, now)
            if any(now - since > ctx.timeout_s for _, since in moved.values()) and not stop.is_set():
                stuck = ctx.behind() or [f"every rank (at {marks[0][2]})"]
                on_failure(f"{', '.join(stuck)} stopped answering for --dist-timeout {ctx.timeout_s:g} s")
                return

    threading.Thread(target=watch, name="spml-watchdog", daemon=True).start()
    return stop


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def setup(gpu_flag: str | None, batch_size: int, timeout_s: float, sync_bn: bool) -> tuple[DistContext, torch.device]:
    """The process group of a torchrun launch (`launched_by_torchrun`) and this process's device; ValueError, one
    line, for a request that cannot work. `gpu_flag`: -g as given on the command line (None when not given; only
    'cpu' is taken under torchrun: the local rank picks the GPU)."""
    rank, world, local_rank = (int(os.environ[v]) for v in TORCHRUN_VARIABLES)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if gpu_flag not in (None, "cpu", "auto"):  # (auto: the local rank's GPU, as without -g)
        raise ValueError(f"-g {gpu_flag} cannot be given under torchrun: each process takes the GPU of its local "
                         f"rank (LOCAL_RANK); drop -g (or use -g cpu to train on the CPU with gloo)")
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} does not divide by the world size {world} (torchrun's "
                         f"processes): it is the global batch, split evenly over the processes; give a multiple "
                         f"of {world} or run a number of processes that divides {batch_size}")
    if gpu_flag == "cpu":
        if sync_bn:
            raise ValueError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); drop it or "
                             "drop -g cpu")
        backend, device = "gloo", torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ValueError("torchrun without -g cpu uses NCCL, one GPU per process, but this machine has no "
                             "CUDA GPU: add -g cpu to train on the CPU with gloo")
        if local_world > torch.cuda.device_count():
            raise ValueError(f"torchrun started {local_world} processes on this node but it has "
                             f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node {torch.cuda.device_count()} "
                             f"(or fewer)")
        backend, device = "nccl", torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    torch.distributed.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    group = torch.distributed.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    ctx = DistContext(rank, world, local_rank, backend, timeout_s, group=group)
    peers = tuple(ctx.all_gather((socket.gethostname(), os.getpid())))
    # the store that init_process_group joined (torchrun's agent, or rank 0's), as a client of our own
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timeout)
    return DistContext(rank, world, local_rank, backend, timeout_s, peers, group, store), device


def shard_arguments(dataset, ctx: DistContext, train: bool, batch_size: int, seed: int) -> dict:
    """The DataLoader arguments of this rank's share of `dataset`. Training: torch's DistributedSampler (reshuffled
    with `set_epoch` every epoch; the last shard padded with repeated rows, which gather_pass drops) in batches of
    `batch_size` / world size. Evaluation: the single process's batches of `batch_size` rows dealt out in turn
    (batch i to rank i mod world), so every row is predicted in the same batch as by one process (the same bits:
    a kernel's result may depend on the batch) and none twice; a rank may get one batch fewer."""
    if train:
        from torch.utils.data import DistributedSampler
        return {"batch_size": batch_size // ctx.world_size,
                "sampler": DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                              seed=seed, drop_last=False)}
    n = len(dataset)
    batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return {"batch_sampler": batches[ctx.rank::ctx.world_size]}
