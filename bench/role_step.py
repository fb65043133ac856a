"""ROLE's training step at COCO's size on the CPU: CPU time per step and memory growth, buffered or not.

    python bench/role_step.py [--steps 200] [--threads 1] [--mmap-threshold BYTES] [--plain {rows,adam,both}]

A 2,048 x 80 linear head and ROLE's 65,665 x 80 estimate matrix (label_state.LabelEstimates) trained with batch 64,
each step's predictions kept as a training pass keeps them. The project's step (`_RowsOf`'s gradient buffer and
BufferedAdam's denominator buffer), or with `--plain` torch's own for the rows (`sigmoid(logits[rows])` autograd),
Adam (torch.optim.Adam) or both, which make fresh 21 MB matrices at every step. `--mmap-threshold` sets glibc's fixed mmap
threshold first (mallopt M_MMAP_THRESHOLD; it also turns off glibc's dynamic threshold), so that such matrices are
mapped and returned to the system instead of being carved from the heap. Prints the CPU milliseconds per step
(this process, all threads) and the resident memory before and after the timed steps.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time unaffected by spinning)")
    p.add_argument("--mmap-threshold", type=int, help="glibc's fixed mmap threshold in bytes (e.g. 1048576)")
    p.add_argument("--plain", choices=("rows", "adam", "both"),
                   help="torch's indexing backward (rows), torch.optim.Adam (adam) or both, instead of the buffers")
    args = p.parse_args()
    if args.mmap_threshold is not None and ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD,
                                                                             args.mmap_threshold) != 1:
        print("mallopt refused the threshold", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from label_state import BufferedAdam, LabelEstimates
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_n, classes, dim, batch = 65665, 80, 2048, 64
    obs = np.zeros((rows_n, classes))
    obs[np.arange(rows_n), np.random.RandomState(0).randint(classes, size=rows_n)] = 1
    estimates, head = LabelEstimates(obs), torch.nn.Linear(dim, classes)
    groups = [{"params": list(head.parameters()), "lr": 1e-3}, {"params": [estimates.logits], "lr": 1e-2}]
    plain_rows, plain_adam = args.plain in ("rows", "both"), args.plain in ("adam", "both")
    optimizer = (torch.optim.Adam if plain_adam else BufferedAdam)(groups, lr=1e-3)
    features, kept = torch.randn(batch, dim), []

    def step() -> None:
        rows = torch.randint(0, rows_n, (batch,))
        optimizer.zero_grad()
        preds = torch.sigmoid(head(features))
        guesses = torch.sigmoid(estimates.logits[rows]) if plain_rows else estimates(rows)
        ((preds - guesses) ** 2).sum().backward()
        optimizer.step()
        kept.append(preds.detach().clone())  # as a pass keeps each batch's predictions

    for _ in range(20):  # warm-up: the state and the buffers exist
        step()
    before, cpu0 = rss_gb(), time.process_time()
    for _ in range(args.steps):
        step()
    cpu = (time.process_time() - cpu0) / args.steps
    print(f"{'buffered' if args.plain is None else 'plain ' + args.plain} step, mmap threshold "
          f"{args.mmap_threshold if args.mmap_threshold is not None else 'dynamic'}: {1000 * cpu:.1f} ms CPU per step; "
          f"RSS {before:.2f} -> {rss_gb():.2f} GB over {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
