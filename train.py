"""Training: epoch -> train -> (pseudo-label) -> evaluate -> select, as the original; the loop only. How batches
run on the device: engine.py; what methods keep about the labels (ROLE's estimates, LL-Cp's corrections, APL):
label_state.py; the run folder's files and the resume state: checkpoints.py.

Early stopping (--early-stop, set by --protocol): the original stops at the first epoch whose clean-val mAP does not
strictly improve (that epoch's test pass is skipped); Kim et al.'s loop when it falls more than 3 below the best;
Cole et al.'s runs every epoch. The best-val weights are kept and the test mAP at the best epoch is the reported
number.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
from checkpoints import Progress, save_json
from config import ROLE_LI_PHASE1, Config
from datasets import DataError, FeatureDataset, FeatureLoader, MultilabelDataset, raise_sample_errors
from distributed import start_watchdog
from engine import Engine, build_engine
from fileio import OutputError
from label_state import LabelEstimates, PermanentCorrections, apl_update
from losses import compute_loss
from metrics import THRESHOLDS, compute_metrics, per_class_ap, threshold_metrics


class RankFailure(RuntimeError):
    """Another rank of a torchrun launch died; the message names it."""


class NonFiniteLossError(RuntimeError):
    def __init__(self, epoch: int, batch: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch}, batch {batch}; stopping (finished epochs are saved)")
        self.epoch, self.batch = epoch, batch


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

    def stopped_by_watchdog(message: str) -> None:  # this process may be blocked inside a collective: end it here
        error = f"{message} during epoch {len(results['epochs']) + 1}; the run stopped"
        if dist.main:
            try:
                save_json(run_dir / "results.json", {**results, "status": "failed", "error": error})
            except Exception:  # (the loop may be changing `results` right now: the running record stays)
                pass
        print(f"error: {error}" if dist.main else f"[rank {dist.rank}] error: {error}", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = None
    try:  # from the first "running" record on: a signal that lands anywhere after it is recorded below
        if dist.main:
            save_json(run_dir / "results.json", results)
        watchdog = start_watchdog(dist, stopped_by_watchdog)
        best_state, progress = _train_with_early_stopping(engine, loaders, datasets, cfg, run_dir, results, resume)
        watchdog.set()
        dist.all_gather(None)  # no rank exits (and looks dead to a watchdog) before every rank stopped watching
    except BaseException as exc:
        if watchdog is not None:
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
    optimizer = engine.optimizer(cfg.lr, cfg.head_lr_mult)
    scaler = torch.amp.GradScaler(engine.device.type, enabled=cfg.amp == "fp16")
    finished = False
    if resume is None:
        progress = Progress(unlabel_num=(datasets["train"].labels_obs == 0).sum(axis=0))
        best_state = None
    else:
        progress = checkpoints.restore(resume, engine, optimizer, scaler, datasets, loaders)
        # the loop only goes on after an improving epoch, whose state is the current one; else best.pt has it
        if progress.best_epoch == progress.epoch:
            best_state = engine.state()
            if engine.dist.main:
                checkpoints.rewrite_best_if_ahead(run_dir, best_state, progress, datasets, cfg)
        else:
            best_state = checkpoints.load_best(run_dir, progress)
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
        if "corrected_labels" in out:  # LL-Cp
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
                checkpoints.save_checkpoint(run_dir / "best.pt", best_state, cfg, epoch)
                if progress.best_test is not None:
                    checkpoints.save_predictions(run_dir / "predictions.npz", progress, datasets, epoch)
        checkpoints.save_last(run_dir, engine, optimizer, scaler, datasets, loaders, progress, results, cfg)
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
            checkpoints.save_predictions(run_dir / "predictions.npz", progress, datasets, progress.best_epoch)
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


def _eval_metrics(out: dict) -> dict:
    metrics = compute_metrics(out["preds"], out["true"], out["obs"])
    for t in THRESHOLDS:
        metrics.update({f"{k}@{t}": v for k, v in threshold_metrics(out["preds"], out["true"], t).items()})
    metrics["seconds"] = out["seconds"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# train, pseudo-label, evaluate

def train_epoch(engine: Engine, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                cfg: Config, epoch: int, dataset: MultilabelDataset | None = None) -> dict:
    """One training epoch. A loss that corrects labels for good (LL-Cp) has its corrections written into
    `dataset` (default: the loader's) at the end of the epoch (label_state.PermanentCorrections). In a torchrun
    launch every rank trains on its shard (reshuffled each epoch), and the returned predictions are all ranks'
    (gather_pass)."""
    engine.train()
    if cfg.frozen_backbone_epochs:  # GR-Loss's linear init: the head alone first, the backbone still in train mode
        engine.model.backbone.requires_grad_(epoch > cfg.frozen_backbone_epochs)
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # a DistributedSampler: this epoch's shuffle
        loader.sampler.set_epoch(epoch)
    hyperparameters = cfg.loss_hyperparameters()
    corrections = PermanentCorrections.of(cfg.loss, epoch, hyperparameters,
                                          ties=cfg.ll_cp_corrections == "at-or-above")
    target = dataset if dataset is not None else loader.dataset
    # EM_PL's score rows of the training set, on the device for the epoch (main.attach_pseudo_scores)
    scores = None if target.pseudo_scores is None else torch.from_numpy(target.pseudo_scores).to(engine.device)

    def step(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        obs = batch["label_vec_obs"].to(engine.device, non_blocking=True)
        # labels were checked once at load time; torch.where filling gives the original's bits without a sync
        estimates = None if engine.estimates is None else engine.estimates(batch["idx"].to(engine.device))
        if corrections is not None:
            corrections.add(batch["idx"], logits, obs)
        batch_scores = None if scores is None else scores[batch["idx"].to(engine.device)]
        loss = compute_loss(cfg.loss, logits, obs, batch["label_vec_true"].to(engine.device, non_blocking=True),
                            checked=True, where=True, epoch=epoch, estimates=estimates,
                            pseudo_scores=batch_scores, num_epochs=cfg.num_epochs,
                            frozen_backbone_epochs=cfg.frozen_backbone_epochs, **hyperparameters)
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
        out["corrected_labels"] = corrections.write(target, engine.dist)
    return engine.dist.gather_pass(out)


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


def evaluate(engine: Engine, loader, desc: str) -> dict:
    """Predictions over `loader` in eval mode; in a torchrun launch every rank evaluates rank 0's model on its
    shard and gets all ranks' predictions, each row once (gather_pass)."""
    engine.model.eval()
    engine.dist.broadcast_buffers_(engine.model)
    return engine.dist.gather_pass(_forward_pass(engine, loader, desc))


# ----------------------------------------------------------------------------------------------------------------
# one pass over a loader

NONFINITE_CHECK_EVERY = 50  # training steps between read-backs of the device-side non-finite-loss check


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
    optimizer = engine.optimizer(phase.lr)
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
