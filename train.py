"""Training: epoch -> train -> (pseudo-label) -> evaluate -> select, as the original.

Early stopping: stop at the first epoch whose clean-val mAP does not strictly improve (that epoch's test pass is
skipped); the best-val weights are kept and the test mAP at the best epoch is the reported number.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config
from datasets import MultilabelDataset
from losses import compute_loss
from metrics import THRESHOLDS, compute_metrics, per_class_ap, threshold_metrics
from fileio import write_atomic


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
    for c in range(obs.shape[1]):
        k = int(np.floor(neg_proportion * unlabel_num[c] / rounds))
        candidates = np.where(obs[:, c] == 0)[0]
        chosen = candidates[np.argsort(preds[candidates, c])[:k]]
        obs[chosen, c] = -preds[chosen, c]
    return obs


# ----------------------------------------------------------------------------------------------------------------
# one pass over a loader

def _forward_pass(model: torch.nn.Module, loader: DataLoader, device: torch.device, desc: str,
                  step: Callable[[torch.Tensor, dict, int], float] | None = None) -> dict:
    """Runs the model over `loader`; with `step` (training), `step(logits, batch, i)` returns the batch loss.

    Returns predictions, true and observed labels and dataset indices in loader order, and the mean loss.
    """
    preds, true, obs, idx = [], [], [], []
    loss_sum, seen, start = 0.0, 0, time.time()
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for i, batch in enumerate(bar):
        images = batch["image"].to(device, non_blocking=True)
        if step is None:
            with torch.no_grad():
                logits = model(images)
        else:
            logits = model(images)
            loss_sum += step(logits, batch, i) * len(images)
        seen += len(images)
        preds.append(torch.sigmoid(logits.detach()).cpu().numpy())
        true.append(batch["label_vec_true"].numpy())
        obs.append(batch["label_vec_obs"].numpy())
        idx.append(batch["idx"].numpy())
        postfix = {"img/s": f"{seen / max(time.time() - start, 1e-9):.1f}"}
        if step is not None:
            postfix["loss"] = f"{loss_sum / seen:.4f}"
        bar.set_postfix(postfix)
    return {"preds": np.concatenate(preds), "true": np.concatenate(true), "obs": np.concatenate(obs),
            "idx": np.concatenate(idx), "loss": loss_sum / max(seen, 1), "seconds": time.time() - start,
            "num_batches": len(loader)}


def train_epoch(model, loader, optimizer, cfg: Config, device, epoch: int) -> dict:
    model.train()

    def step(logits: torch.Tensor, batch: dict, i: int) -> float:
        loss = compute_loss(cfg.loss, logits, batch["label_vec_obs"].to(device), batch["label_vec_true"].to(device),
                            alpha=cfg.alpha, beta=cfg.beta)
        value = loss.item()
        if not np.isfinite(value):
            raise NonFiniteLossError(epoch, i + 1, value)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return value

    return _forward_pass(model, loader, device, f"epoch {epoch} train", step)


def evaluate(model, loader, device, desc: str) -> dict:
    model.eval()
    return _forward_pass(model, loader, device, desc)


def run_apl(model, loader: DataLoader, dataset: MultilabelDataset, unlabel_num: np.ndarray, cfg: Config,
            device, epoch: int) -> int:
    """Pseudo-label after a training epoch, as the original: eval mode, predictions taken over the training
    loader itself (shuffled, train transform). Returns the number of new pseudo-labels."""
    out = evaluate(model, loader, device, f"epoch {epoch} APL")
    if out["num_batches"] <= 1:
        # The original's update sits in its "not the first batch" branch: a one-batch loader is iterated
        # (consuming the same random numbers) but never labels.
        print(f"[epoch {epoch}] APL made no pseudo-labels: the training loader has a single batch (as the original)")
        return 0
    preds = np.zeros_like(out["preds"])
    preds[out["idx"]] = out["preds"]
    before = dataset.labels_obs.copy()
    after = apl_update(before, preds, unlabel_num, cfg.neg_proportion, cfg.num_epochs, cfg.warmup_epoch)
    dataset.set_observed(after)
    return int(((after < 0) & (before == 0)).sum())


# ----------------------------------------------------------------------------------------------------------------
# results

def save_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
    write_atomic(path, write)


def _eval_metrics(out: dict) -> dict:
    metrics = compute_metrics(out["preds"], out["true"], out["obs"])
    for t in THRESHOLDS:
        metrics.update({f"{k}@{t}": v for k, v in threshold_metrics(out["preds"], out["true"], t).items()})
    metrics["seconds"] = out["seconds"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# the loop

def fit(model: torch.nn.Module, datasets: dict[str, MultilabelDataset], cfg: Config, device: torch.device,
        run_dir: Path, results: dict) -> dict:
    """Train with early stopping; fill and save `results` (results.json) after every epoch; keep best.pt.

    A run that breaks (NaN loss, unreadable image, Ctrl-C, ...) keeps its finished epochs in results.json
    with status "failed" or "interrupted" and the error.
    """
    results.update(epochs={}, best_epoch=None, status="running")
    save_json(run_dir / "results.json", results)
    try:
        best_state, best_test = _train_with_early_stopping(model, datasets, cfg, device, run_dir, results)
    except BaseException as exc:
        results.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                       error=f"{type(exc).__name__}: {exc}")
        save_json(run_dir / "results.json", results)
        raise

    model.load_state_dict(best_state)
    best = results["epochs"][str(results["best_epoch"])]
    results.update(
        status="finished",
        val_map=best["val"]["map_clean"],
        test_map=best["test"]["map_clean"],
        test_per_class_ap=(100 * per_class_ap(best_test["preds"], best_test["true"])).tolist(),
        test_thresholded={str(t): {k[:-len(f"@{t}")]: v for k, v in best["test"].items() if k.endswith(f"@{t}")}
                          for t in THRESHOLDS},
        recommended_threshold=0.75 if cfg.loss in ("EM", "EM_APL") else 0.5,
    )
    save_json(run_dir / "results.json", results)
    return results


def _train_with_early_stopping(model, datasets, cfg: Config, device, run_dir: Path, results: dict):
    """epoch -> train -> (pseudo-label) -> val -> select (-> test); returns the best state and test pass."""
    loaders = {phase: DataLoader(ds, batch_size=cfg.batch_size, shuffle=(phase == "train"),
                                 num_workers=cfg.num_workers, drop_last=False, pin_memory=device.type == "cuda",
                                 persistent_workers=cfg.persistent_workers and cfg.num_workers > 0)
               for phase, ds in datasets.items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    unlabel_num = (datasets["train"].labels_obs == 0).sum(axis=0)  # U_c, counted once before training

    best_val_map, best_state, best_test = -np.inf, None, None
    for epoch in range(1, cfg.num_epochs + 1):
        record: dict = {}
        results["epochs"][str(epoch)] = record
        epoch_start = time.time()
        out = train_epoch(model, loaders["train"], optimizer, cfg, device, epoch)
        record["train"] = {"loss": out["loss"], **compute_metrics(out["preds"], out["true"], out["obs"]),
                           "seconds": out["seconds"]}

        if cfg.loss == "EM_APL" and epoch >= cfg.warmup_epoch:
            record["apl_new_pseudo_labels"] = run_apl(model, loaders["train"], datasets["train"], unlabel_num,
                                                      cfg, device, epoch)
            record["apl_total_pseudo_labels"] = int((datasets["train"].labels_obs < 0).sum())

        out = evaluate(model, loaders["val"], device, f"epoch {epoch} val")
        record["val"] = _eval_metrics(out)
        val_map = record["val"]["map_clean"]
        improved = val_map > best_val_map  # strict: a tie stops the run, as the original
        line = (f"epoch {epoch}/{cfg.num_epochs}  train loss {record['train']['loss']:.4f}  "
                f"val mAP {val_map:.2f}")
        if improved:
            best_val_map = val_map
            best_state = copy.deepcopy(model.state_dict())
            results["best_epoch"] = epoch
            best_test = evaluate(model, loaders["test"], device, f"epoch {epoch} test")
            record["test"] = _eval_metrics(best_test)
            line += f"  test mAP {record['test']['map_clean']:.2f}  *best*"
        record["seconds"] = time.time() - epoch_start
        print(line + f"  ({record['seconds']:.0f} s)", flush=True)
        if improved:
            _save_checkpoint(run_dir / "best.pt", best_state, cfg, epoch)
        save_json(run_dir / "results.json", results)
        if not improved:
            # the original leaves both loops here, so this epoch has no test pass
            print(f"*** early stop: val mAP {val_map:.2f} did not improve on {best_val_map:.2f} "
                  f"(epoch {results['best_epoch']}) ***", flush=True)
            break
    return best_state, best_test


def _save_checkpoint(path: Path, state: dict, cfg: Config, epoch: int) -> None:
    write_atomic(path, lambda tmp: torch.save({"model": state, "config": cfg.to_dict(), "epoch": epoch}, tmp))
