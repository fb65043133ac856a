"""A worker for tests/test_distributed.py, run as `python tests/distributed_worker.py TASK ...` (one process) or
under `torchrun --nproc_per_node N` (gloo on the CPU). It builds a run as main.py does and writes what the test
compares into OUT:

    evaluate RUN_DIR DATA_ROOT OUT   the val and test predictions of RUN_DIR/best.pt (rank 0: OUT/eval.npz)
    apl DATA_ROOT OUT                one training epoch and one APL round (every rank: OUT/obs_rank<r>.npy)
    state LOSS DATA_ROOT OUT         two training epochs of LOSS (every rank: its observed matrix, its estimates,
                                     its model in OUT/state_rank<r>.pt)
    nan MAIN_FLAGS...                main.py, whose loss is NaN at rank 1's second step (and on no other rank)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
import train  # noqa: E402
from config import build_config  # noqa: E402
from metrics import compute_map  # noqa: E402

SETTINGS = dict(loss="EM_APL", gpu="cpu", batch_size=8, arch="resnet18", weights="random", image_size=32,
                num_workers=0, num_epochs=4, warmup_epoch=1, lr=1e-3)


def build(data_root: str, **settings):
    cfg = build_config("mini", data_root=data_root, **{**SETTINGS, **settings})
    device, ctx = main.setup_device(cfg, "cpu")
    torch.manual_seed(cfg.pytorch_seed)
    datasets, engine, loaders, _ = main.build_run(cfg, device, ctx=ctx)
    return cfg, ctx, datasets, engine, loaders


def evaluate(run_dir: str, data_root: str, out: str) -> None:
    cfg, ctx, datasets, engine, loaders = build(data_root)
    engine.load_state(torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=False))
    passes = {phase: train.evaluate(engine, loaders[phase], phase) for phase in ("val", "test")}
    if ctx.main:
        np.savez(Path(out) / "eval.npz", **{f"{p}_{k}": v[k] for p, v in passes.items() for k in ("preds", "idx")},
                 **{f"{p}_map": compute_map(v["preds"], v["true"]) for p, v in passes.items()})
    ctx.close()


def apl(data_root: str, out: str) -> None:
    cfg, ctx, datasets, engine, loaders = build(data_root)
    optimizer = torch.optim.Adam(engine.parameter_groups(cfg.lr), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    unlabel_num = (datasets["train"].labels_obs == 0).sum(axis=0)
    train.train_epoch(engine, loaders["train"], optimizer, scaler, cfg, 1, datasets["train"])
    new = train.run_apl(engine, loaders["train"], datasets["train"], unlabel_num, cfg, 1, len(loaders["train"]))
    np.save(Path(out) / f"obs_rank{ctx.rank}.npy", datasets["train"].labels_obs)
    np.save(Path(out) / f"new_rank{ctx.rank}.npy", np.array(new))
    ctx.close()


def state(loss: str, data_root: str, out: str) -> None:
    # LL-Cp corrects the losses strictly above the k-th largest: k - 1 per batch, so a k of several
    extra = {"delta_rel": 5.0} if loss == "ll_cp" else {"expected_num_pos": 1.9}
    cfg, ctx, datasets, engine, loaders = build(data_root, loss=loss, **extra)
    optimizer = torch.optim.Adam(engine.parameter_groups(cfg.lr), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    corrected = [train.train_epoch(engine, loaders["train"], optimizer, scaler, cfg, epoch, datasets["train"])
                 .get("corrected_labels") for epoch in (1, 2)]
    # the parameters only: BatchNorm's running statistics are each rank's until evaluate() sends rank 0's to all
    parameters = {n: p.detach() for n, p in engine.model.named_parameters()}
    torch.save({"obs": torch.from_numpy(datasets["train"].labels_obs), "corrected": corrected, **engine.state(),
                "model": parameters}, Path(out) / f"state_rank{ctx.rank}.pt")
    ctx.close()


def nan_on_rank_1(*flags: str) -> int:
    compute_loss, steps = train.compute_loss, [0]

    def faulty(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        steps[0] += 1
        return loss * float("nan") if steps[0] == 2 and main.os.environ.get("RANK") == "1" else loss
    train.compute_loss = faulty
    return main.main(list(flags))


if __name__ == "__main__":
    sys.exit({"evaluate": evaluate, "apl": apl, "state": state, "nan": nan_on_rank_1}[sys.argv[1]](*sys.argv[2:]))
