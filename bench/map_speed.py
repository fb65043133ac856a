"""Time the mAP computation against the original's (scikit-learn's `average_precision_score`, class by class) on
MS-COCO 2014's sizes, and check that both give the same bits.

    python bench/map_speed.py                      # COCO's three phases (65,665 / 16,416 / 40,137 x 80)
    python bench/map_speed.py --repeats 5 --json out.json

Each phase gets float32 scores (as the loop's predictions), clean labels with COCO's ~2.9 positives per image
and observed labels with one of them, made from `--seed`. The original computes AP per class for the clean and
then for the observed labels; `metrics.compute_metrics` sorts each class once for both. Printed per phase: CPU
seconds (process time, the median of `--repeats`) and wall seconds of each, and the speed-up in CPU time; the
script exits 1 if any AP differs in any bit. Figures grow several-fold under load: take them on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import _per_class_ap  # noqa: E402  (the loop's function: clean and observed AP in one pass)

COCO_PHASES = {"train": 65_665, "val": 16_416, "test": 40_137}
NUM_CLASSES = 80
POSITIVES_PER_IMAGE = 2.9


def make_phase(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (float32), clean labels (>= 1 positive per row) and observed labels (one of them per row)."""
    clean = rng.random((rows, NUM_CLASSES)) < (POSITIVES_PER_IMAGE - 1) / (NUM_CLASSES - 1)
    clean[np.arange(rows), rng.integers(0, NUM_CLASSES, rows)] = True
    observed = np.zeros_like(clean)
    for row in range(rows):
        observed[row, rng.choice(np.flatnonzero(clean[row]))] = True
    scores = (rng.standard_normal((rows, NUM_CLASSES)) + 1.5 * clean).astype(np.float32)
    return scores, clean, observed


def original(scores: np.ndarray, clean: np.ndarray, observed: np.ndarray) -> list[np.ndarray]:
    """The original's way: `average_precision_score` per class with a positive, for each label set."""
    result = []
    for labels in (clean, observed):
        ap = np.zeros(NUM_CLASSES)
        for c in range(NUM_CLASSES):
            if labels[:, c].any():
                ap[c] = average_precision_score(labels[:, c], scores[:, c].astype(np.float64))
        result.append(ap)
    return result


def timed(fn, repeats: int) -> tuple[list[np.ndarray], float, float]:
    """The last result and the median CPU and wall seconds of `repeats` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return out, statistics.median(cpu), statistics.median(wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per phase and method (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rng = np.random.default_rng(args.seed)
    rows, same = {}, True
    print(f"{'phase':<6} {'rows':>7} {'original CPU s':>15} {'ours CPU s':>11} {'original wall s':>16} "
          f"{'ours wall s':>12} {'speed-up (CPU)':>15}")
    for phase, n in COCO_PHASES.items():
        scores, clean, observed = make_phase(n, rng)
        theirs, t_cpu, t_wall = timed(lambda: original(scores, clean, observed), args.repeats)
        ours, o_cpu, o_wall = timed(lambda: _per_class_ap(scores, [clean, observed]), args.repeats)
        equal = all(np.array_equal(a, b) for a, b in zip(theirs, ours))
        same &= equal
        rows[phase] = {"rows": n, "original_cpu_s": t_cpu, "ours_cpu_s": o_cpu, "original_wall_s": t_wall,
                       "ours_wall_s": o_wall, "speedup_cpu": t_cpu / o_cpu, "same_bits": equal}
        print(f"{phase:<6} {n:>7,} {t_cpu:>15.3f} {o_cpu:>11.3f} {t_wall:>16.3f} {o_wall:>12.3f} "
              f"{t_cpu / o_cpu:>14.1f}x" + ("" if equal else "  DIFFERENT BITS"))
    total = {k: sum(r[k] for r in rows.values()) for k in ("original_cpu_s", "ours_cpu_s")}
    print(f"all three phases: {total['original_cpu_s']:.2f} against {total['ours_cpu_s']:.2f} CPU s, "
          f"{total['original_cpu_s'] / total['ours_cpu_s']:.1f}x; same bits: {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"phases": rows, "repeats": args.repeats, "seed": args.seed}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
