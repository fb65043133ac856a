"""What a run folder keeps, written atomically: results.json (after every epoch), best.pt and predictions.npz (of
the best epoch), and last.pt, the state a resumed run (--resume) goes on from (written at the end of every epoch).
"""
from __future__ import annotations

import dataclasses
import json
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config
from engine import Engine
from fileio import pid_alive, write_atomic

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



# ----------------------------------------------------------------------------------------------------------------
# last.pt: the resume state

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


def save_last(run_dir: Path, engine: Engine, optimizer, scaler, datasets: dict, loaders: dict, progress: Progress,
              results: dict, cfg: Config) -> None:
    """last.pt after a finished epoch: the model (and estimates), optimizer, scaler, observed labels, progress, epoch
    records and every rank's random generators. Every rank calls it; rank 0 writes."""
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


def restore(state: dict, engine: Engine, optimizer, scaler, datasets: dict, loaders: dict) -> Progress:
    """Put a `load_last` state back into the run's objects and generators; returns its progress."""
    engine.load_state(state)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    datasets["train"].set_observed(state["labels_obs"])
    _restore_random_states(state["random"][engine.dist.rank], loaders)
    return Progress(**state["progress"])



# ----------------------------------------------------------------------------------------------------------------
# best.pt and predictions.npz

def rewrite_best_if_ahead(run_dir: Path, best_state: dict, progress: Progress, datasets: dict, cfg: Config) -> None:
    """A run stopped after writing best.pt / predictions.npz of an epoch but before its last.pt: they belong to an
    epoch that the resumed run trains again (and that may not improve then). Put back the last.pt's best."""
    def saved_epoch(path: Path, read) -> int | None:
        try:
            return int(read(path))
        except Exception:  # missing or damaged: rewritten too
            return None
    if saved_epoch(run_dir / "best.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False)["epoch"]) \
            != progress.best_epoch:
        save_checkpoint(run_dir / "best.pt", best_state, cfg, progress.best_epoch)
    if progress.best_test is not None and \
            saved_epoch(run_dir / "predictions.npz", lambda p: np.load(p)["epoch"]) != progress.best_epoch:
        save_predictions(run_dir / "predictions.npz", progress, datasets, progress.best_epoch)


def load_best(run_dir: Path, progress: Progress) -> dict:
    """best.pt's state, which must be the best epoch's of `progress` (ResumeError otherwise)."""
    path = run_dir / "best.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ResumeError(f"cannot read {path} ({type(exc).__name__}); start the run again instead") from exc
    if state.get("epoch") != progress.best_epoch:
        raise ResumeError(f"{path} holds epoch {state.get('epoch')}, but last.pt's best epoch is "
                          f"{progress.best_epoch}; start the run again instead")
    return state


def save_checkpoint(path: Path, state: dict, cfg: Config, epoch: int) -> None:
    """best.pt: an `Engine.state()` with the run's config and its epoch."""
    write_atomic(path, lambda tmp: torch.save({**state, "config": cfg.to_dict(), "epoch": epoch}, tmp))


def save_predictions(path: Path, progress: Progress, datasets: dict, epoch: int) -> None:
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
