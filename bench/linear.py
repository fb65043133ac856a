"""Linear-probe speed at COCO's size: one full `main.py --features` run on synthetic features.

    python bench/linear.py [--loss EM_APL] [--train 82081] [--test 40137] [--dim 2048] [--classes 80] [--json F]

Makes (once, in a temporary data root) a features dataset of COCO's shape: the official train split of 82,081 rows
(65,665 train + 16,416 val after the 80/20 split) and 40,137 test rows of `--dim` float32 features, 80 classes with
about 2.9 positives per image, one observed positive per training row. The features carry the labels weakly (a
random linear map of them, scale `--signal`, plus unit noise), so val mAP improves over several epochs (`-l an`: 14
epochs). EM_APL with COCO's settings stops early at epoch 2, before its first APL round (warm-up 5): give
`-- --warmup-epoch 1` for a run with APL (11 epochs, 11 rounds). Then it times
`python main.py -d <synthetic> -l LOSS -g cpu` with the linear defaults of config.LINEAR_SETTINGS and prints the
wall time, the CPU time (user + system, all threads), the peak memory (RSS), the epochs run, the APL rounds and
the test mAP (ROLE: `--loss role -- --expected-num-pos 2.9`). On a shared virtual machine the same run's wall time
varies by up to 2x with the host's load: run it a few times.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preproc.common import write_dataset_json  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402


def make_dataset(folder: Path, n_train: int, n_test: int, dim: int, classes: int, signal: float = 0.05,
                 seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    prevalence = 2.9 / classes
    mixing = signal * rng.randn(classes, dim).astype(np.float32)
    arrays = {}
    for phase, n in (("train", n_train), ("val", n_test)):
        labels = (rng.rand(n, classes) < prevalence).astype(np.float64)
        labels[np.arange(n), rng.randint(classes, size=n)] = 1.0  # at least one positive
        features = labels.astype(np.float32) @ mixing + rng.randn(n, dim).astype(np.float32)
        arrays[f"formatted_{phase}_labels.npy"] = labels
        arrays[f"formatted_{phase}_features.npy"] = features
        arrays[f"formatted_{phase}_labels_obs.npy"] = generate_observed(labels, 1, 0, 1200)
    write_dataset_json(folder, class_names=[f"c{i}" for i in range(classes)], image_folder=None,
                       single_positive=False, features=True, source="bench/linear.py", arrays=arrays)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", default="EM_APL")
    p.add_argument("--train", type=int, default=82081, help="official train rows (COCO 2014: 82,081)")
    p.add_argument("--test", type=int, default=40137, help="official val rows, the test set (COCO 2014: 40,137)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--signal", type=float, default=0.05,
                   help="scale of the labels' linear map in the features (noise: 1); small enough that val mAP "
                        "keeps improving for several epochs, so that a run reaches its APL rounds")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("main_flags", nargs="*", help="extra main.py flags (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        t0 = time.time()
        make_dataset(data / "synthcoco", args.train, args.test, args.dim, args.classes, args.signal)
        made = time.time() - t0
        command = [sys.executable, str(ROOT / "main.py"), "-d", "synthcoco", "-l", args.loss, "-g", "cpu",
                   "--data-root", str(data), "--results-dir", str(Path(tmp) / "runs"), *args.main_flags]
        t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall, cpu1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        res = json.loads(next((Path(tmp) / "runs").glob("*/results.json")).read_text())
    rounds = [e.get("apl_new_pseudo_labels") for e in res["epochs"].values() if "apl_new_pseudo_labels" in e]
    figures = {"loss": args.loss, "train_rows": args.train, "test_rows": args.test, "dim": args.dim,
               "classes": args.classes, "signal": args.signal, "dataset_seconds": round(made, 1),
               "run_wall_seconds": round(wall, 1), "run_cpu_seconds": round(cpu, 1),
               "run_peak_rss_gb": round(cpu1.ru_maxrss / 2 ** 20, 2),  # KiB on Linux
               "epochs": len(res["epochs"]), "best_epoch": res["best_epoch"], "apl_rounds": len(rounds),
               "test_map": round(res["test_map"], 2), "chance_test_map": round(res["chance_test_map"], 2),
               "batch_size": res["config"]["batch_size"], "lr": res["config"]["lr"],
               "epoch_seconds": [round(e["seconds"], 1) for e in res["epochs"].values()]}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
