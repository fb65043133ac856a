"""Whole-epoch speed of the full pipeline, faithful against each fast combination (issue 27; docs/gpu-speed.md).

    python bench/epoch.py [--preset voc|coco|both] [--device cuda] [--epochs 2] [--json F]
    BENCH_SMOKE=1 python bench/epoch.py [--json F]     # the CPU, tiny sizes: proves every command starts

Data: data roots of real JPEGs, made in a temporary folder: the 145 CUB photos of tests/data re-encoded with a long
side of 500 px (VOC-like) or 640 px (COCO-like) by bench/make_bench_root.py, named over and over (symlinks) to the
set sizes below, with random labels (1-3 positives, one observed). Presets: VOC-like, 20 classes, batch 8 (-d
pascal's settings); COCO-like, 80 classes, batch 16 (-d coco's); ResNet-50 at 448 px, random weights. (These
re-encoded photos are smoother than real ones: ~30 KB, where COCO's average ~160 KB, so PIL decodes them faster than
real data and the faithful loader's figures are, if anything, flattering.)

What is timed is the pipeline itself, main.build_run then train.fit: EM_APL with APL from epoch 1, --early-stop none
--test-pass every, so every epoch runs train, the APL pass, val, test and the checkpoints. Per combination: `setup_s`
(model and loaders: the image cache's build is there), seconds per epoch (`epoch_s`: the first with its one-time
costs, the last the steady state), per phase of the last epoch seconds and img/s (train: train.train_epoch; apl_pass:
the eval-mode pass over the training loader; apl: with the labelling; val, test: train.evaluate; checkpoint: best.pt,
predictions.npz and last.pt), peak GPU memory (allocated, and reserved: CUDA graphs' pools count there), the
speed-ups against `faithful`, and whether the final weights equal faithful's bit for bit (`equal_to_faithful`,
torch.equal over the state dict after the last epoch; `max_abs_diff_to_faithful`). `cache` is the eager loop on the
bit-identical image cache, so its `equal_to_faithful` says whether this GPU reproduces the eager loop itself.
`decode` compares --image-decode device with PIL on the VOC-like test images: max / mean abs pixel difference (uint8,
at the preset's size) and the images per second of each.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import main  # noqa: E402
import checkpoints  # noqa: E402
import train  # noqa: E402
from config import build_config  # noqa: E402
from datasets import DATASET_INFO, build_datasets  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from make_bench_root import make_bench_root  # noqa: E402
from step import bench_device, synchronize  # noqa: E402

CUB = REPO / "tests" / "data" / "cub" / "CUB_200_2011"
# name -> (settings on top of the faithful ones, what they change)
COMBINATIONS = {
    "faithful": ({}, "the original"),
    "cache": (dict(image_cache="ram"), "bit-identical"),
    "cache+graphs": (dict(image_cache="ram", cuda_graphs="model"), "bit-identical"),
    "cache+graphs-step": (dict(image_cache="ram", cuda_graphs="step"), "float rounding (capturable Adam)"),
    "cache+graphs-step+bf16+cl+eval4x": (dict(image_cache="ram", cuda_graphs="step", amp="bf16", channels_last=True,
                                              eval_batch_size=4), "statistical"),
    "decode+graphs-step+bf16+cl+eval4x": (dict(image_decode="device", cuda_graphs="step", amp="bf16",
                                               channels_last=True, eval_batch_size=4), "statistical"),
}
# preset -> (dataset, classes, batch, official train images, official val (= test) images, JPEG long side)
PRESETS = {"voc": ("pascal", 20, 8, 1200, 400, 500), "coco": ("coco", 80, 16, 1600, 640, 640)}
SMOKE_SIZES = dict(train=40, test=16)
# BENCH_SMOKE=1: the CPU refuses --cuda-graphs (recorded), then runs the combination without it and without --amp
# (bfloat16 on a CPU without its instructions takes minutes): every other code path in a minute or two
SMOKE_COMBINATIONS = ("faithful", "cache+graphs", "decode+graphs-step+bf16+cl+eval4x")


def parse_args(argv=None) -> argparse.Namespace:
    smoke = os.environ.get("BENCH_SMOKE") == "1"
    p = argparse.ArgumentParser(description="seconds per epoch of the full pipeline, faithful vs fast combinations")
    p.add_argument("--preset", choices=("voc", "coco", "both"), default="voc" if smoke else "both")
    p.add_argument("--device", default="cpu" if smoke else "cuda", help="cpu or cuda[:N]")
    p.add_argument("--arch", default="resnet18" if smoke else "resnet50")
    p.add_argument("--image-size", type=int, default=32 if smoke else 448)
    p.add_argument("--epochs", type=int, default=2, help=">= 2 (APL runs from epoch 1 and needs a later epoch)")
    p.add_argument("--num-workers", type=int, default=0 if smoke else 8)
    p.add_argument("--combinations", default=",".join(SMOKE_COMBINATIONS) if smoke else None,
                   help=f"comma-separated subset of {', '.join(COMBINATIONS)} (faithful first)")
    p.add_argument("--images", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                   help="official train and test images of each preset (default: the preset's; smoke: 40 16)")
    p.add_argument("--no-decode-check", action="store_true", help="leave out the decode comparison")
    p.add_argument("--decode-only", action="store_true", help="only the decode comparison (VOC-like test images)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.smoke = smoke
    return args


# ----------------------------------------------------------------------------------------------------------------
# data

def make_root(out: Path, dataset: str, num_classes: int, n_train: int, n_test: int, long_side: int) -> Path:
    """A data root holding <dataset>: n_train + n_test names for the re-encoded CUB photos, random labels."""
    photos = sorted((make_bench_root(CUB, out / f"photos_{long_side}", upscale=long_side, split="all-train")
                     / "pascal").rglob("*.jpg"))
    folder = out / f"root_{dataset}" / dataset
    image_dir = folder / DATASET_INFO[dataset].image_subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1200)
    for phase, n in (("train", n_train), ("val", n_test)):
        names = [f"{phase}_{i:06d}.jpg" for i in range(n)]
        for i, name in enumerate(names):
            (image_dir / name).symlink_to(photos[i % len(photos)].resolve())
        labels = np.zeros((n, num_classes))
        for row in labels:
            row[rng.choice(num_classes, rng.randint(1, 4), replace=False)] = 1.0
        np.save(folder / f"formatted_{phase}_images.npy", np.array(names))
        np.save(folder / f"formatted_{phase}_labels.npy", labels)
        np.save(folder / f"formatted_{phase}_labels_obs.npy", generate_observed(labels, 1, 0, 1200))
    return folder.parent


# ----------------------------------------------------------------------------------------------------------------
# timing the pipeline's own functions

class PhaseTimer:
    """Wraps the functions that train.fit calls through their modules (train's loop, checkpoints' files) to time
    each phase of each epoch."""

    TARGETS = ((train, ("train_epoch", "run_apl", "evaluate")),
               (checkpoints, ("save_checkpoint", "save_predictions", "save_last")))

    def __init__(self, device: torch.device, num_epochs: int) -> None:
        self.device, self.num_epochs = device, num_epochs
        self.epoch, self.starts, self.events = 0, {}, []
        self.last_weights: dict | None = None
        self.snapshot_s = 0.0

    def __enter__(self):
        self.saved = [(module, name, getattr(module, name)) for module, names in self.TARGETS for name in names]
        for module, name, fn in self.saved:
            setattr(module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, fn in self.saved:
            setattr(module, name, fn)

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if name == "train_epoch":
                self.epoch = args[5]
                self.starts[self.epoch] = time.perf_counter()
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            seconds = time.perf_counter() - start
            phase = {"train_epoch": "train", "run_apl": "apl", "save_last": "checkpoint",
                     "save_checkpoint": "checkpoint", "save_predictions": "checkpoint"}.get(name)
            if name == "evaluate":
                desc = args[2]
                phase = "apl_pass" if "APL" in desc else "val" if desc.endswith("val") else "test"
            self.events.append((self.epoch, phase, seconds))
            if name == "save_last" and self.epoch == self.num_epochs:  # the last epoch's weights, not timed
                t = time.perf_counter()
                self.last_weights = {k: v.detach().cpu().clone() for k, v in args[1].model.state_dict().items()}
                self.snapshot_s = time.perf_counter() - t
            return out
        return timed


def run_combination(args, name: str, preset: str, root: Path, device: torch.device, work: Path,
                    no_graphs: bool = False) -> tuple[dict, dict]:
    dataset, _, batch, *_ = PRESETS[preset]
    overrides, exactness = COMBINATIONS[name]
    overrides = {k: v for k, v in overrides.items() if not (no_graphs and k in ("cuda_graphs", "amp"))}
    name += " (CPU: no graphs, no amp)" if no_graphs else ""
    if "eval_batch_size" in overrides:
        overrides["eval_batch_size"] *= batch
    row = {"combination": name, "exactness": exactness, "settings": overrides, "status": "ok"}
    cfg = build_config(dataset, loss="EM_APL", gpu="cpu" if device.type == "cpu" else str(device.index or 0),
                       data_root=str(root), results_dir=str(work / "results"), arch=args.arch, weights="random",
                       image_size=args.image_size, num_epochs=args.epochs, warmup_epoch=1, batch_size=batch,
                       num_workers=args.num_workers, early_stop="none", test_pass="every", **overrides)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.pytorch_seed)
    torch.cuda.manual_seed_all(cfg.pytorch_seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        datasets, engine, loaders, _ = main.build_run(cfg, device)
    except ValueError as exc:  # e.g. --cuda-graphs on the CPU: its one-line refusal is the result
        row.update(status="refused", error=str(exc))
        return row, {}
    synchronize(device)
    row["setup_s"] = time.perf_counter() - start
    run_dir = work / f"{preset}_{name.replace(' ', '_').replace(':', '')}"
    run_dir.mkdir(parents=True)
    sizes = {"train": len(datasets["train"]), "apl_pass": len(datasets["train"]), "apl": len(datasets["train"]),
             "val": len(datasets["val"]), "test": len(datasets["test"])}
    results = {"config": cfg.to_dict()}
    with PhaseTimer(device, cfg.num_epochs) as timer:
        try:
            train.fit(engine, loaders, datasets, cfg, run_dir, results)
        except Exception as exc:  # noqa: BLE001 - one failing combination must not hide the others
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            return row, {}
        finished = time.perf_counter()
    starts = [timer.starts[e] for e in sorted(timer.starts)] + [finished]
    row["epoch_s"] = [b - a for a, b in zip(starts, starts[1:])]
    row["epoch_s"][-1] -= timer.snapshot_s
    last = max(timer.starts)
    phases: dict = {}
    for epoch, phase, seconds in timer.events:
        if epoch == last:
            phases[phase] = phases.get(phase, 0.0) + seconds
    row["phases"] = {p: {"seconds": s, **({"img_s": sizes[p] / s} if p in sizes and s > 0 else {})}
                     for p, s in phases.items()}
    row["images_per_epoch"] = sizes
    row["val_map"] = {e: r["val"]["map_clean"] for e, r in results["epochs"].items()}
    row["test_map"] = {e: r["test"]["map_clean"] for e, r in results["epochs"].items()}
    row["train_loss"] = {e: r["train"]["loss"] for e, r in results["epochs"].items()}
    if engine.graphs is not None:
        row["graph_stats"] = dict(engine.graphs.stats)
    if device.type == "cuda":
        row["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    weights = timer.last_weights or {}
    del engine, loaders, datasets
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, weights


@contextlib.contextmanager
def _cache_built_once():
    """image_cache.build_cache memoised per (data root, phase, size): every combination on the cache reads the same
    arrays, built (and timed) once per preset, as a run's later epochs read the cache its first one built."""
    import image_cache
    original, built, seconds = image_cache.build_cache, {}, {}

    def build_once(dataset, image_size, mode, phase, cache_dir, num_workers):
        key = (str(dataset.image_root), phase, image_size, mode, len(dataset))
        if key not in built:
            start = time.perf_counter()
            built[key] = original(dataset, image_size, mode, phase, cache_dir, num_workers)
            seconds[key[:2]] = time.perf_counter() - start
        return built[key]
    image_cache.build_cache = build_once
    try:
        yield seconds
    finally:
        image_cache.build_cache = original


def compare(rows: list[dict], weights: dict[str, dict]) -> None:
    base = next((r for r in rows if r["combination"] == "faithful" and r["status"] == "ok"), None)
    for r in rows:
        if base is None or r["status"] != "ok":
            continue
        r["speedup_epoch"] = base["epoch_s"][-1] / r["epoch_s"][-1]
        r["speedup_phases"] = {p: base["phases"][p]["seconds"] / v["seconds"] for p, v in r["phases"].items()
                               if p in base["phases"] and v["seconds"] > 0}
        mine, theirs = weights.get(r["combination"]), weights.get("faithful")
        if mine and theirs:
            r["equal_to_faithful"] = all(torch.equal(mine[k], theirs[k]) for k in theirs)
            r["max_abs_diff_to_faithful"] = max(float((mine[k].double() - theirs[k].double()).abs().max())
                                                for k in theirs if mine[k].numel())


def decode_check(args, root: Path, device: torch.device) -> dict:
    """--image-decode device against PIL over the VOC-like root's test images: pixels and speed."""
    from device_decode import DecodedLoader
    from image_cache import build_cache
    ds = build_datasets(root, PRESETS["voc"][0], args.image_size)["test"]
    start = time.perf_counter()
    pil = build_cache(ds, args.image_size, "ram", "test", root, args.num_workers)  # PIL in workers: the faithful bits
    pil_s = time.perf_counter() - start
    loader = DecodedLoader(ds, args.image_size, device, 16, shuffle=False, flip=False, num_workers=args.num_workers)
    next(iter(loader))  # decoder start-up
    synchronize(device)
    start = time.perf_counter()
    decoded = [b["image"] for b in loader]
    synchronize(device)
    device_s = time.perf_counter() - start
    diff = np.abs(torch.cat(decoded).cpu().numpy().astype(np.int16) - pil.astype(np.int16))
    return {"images": len(ds), "image_size": args.image_size, "device": str(device), "max_abs_diff": int(diff.max()),
            "mean_abs_diff": float(diff.mean()), "share_over_2_levels": float((diff > 2).mean()),
            "pil_img_s": len(ds) / pil_s, "pil_workers": args.num_workers, "device_img_s": len(ds) / device_s}


def main_(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device(args.device)
    if device is None:
        return 2
    if args.epochs < 2:
        print("error: --epochs must be >= 2", file=sys.stderr)
        return 2
    names = list(COMBINATIONS) if not args.combinations else [c.strip() for c in args.combinations.split(",")]
    unknown = [n for n in names if n not in COMBINATIONS]
    if unknown:
        print(f"error: unknown --combinations {unknown}; known: {list(COMBINATIONS)}", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    out = {"device": str(device), "device_name": card, "torch": torch.__version__, "arch": args.arch,
           "image_size": args.image_size, "epochs": args.epochs, "num_workers": args.num_workers,
           "smoke": args.smoke, "cpus": os.cpu_count(), "presets": {}}
    print(f"bench/epoch.py: {args.arch} {args.image_size} px, {args.epochs} epochs, {device} ({card}), "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="epoch_bench_") as tmp:
        work = Path(tmp)
        if not args.decode_only:
            with _cache_built_once() as cache_builds:
                _run_presets(args, device, names, work, cache_builds, out)
        if args.decode_only or not args.no_decode_check:
            try:
                out["decode"] = decode_check(args, work / "voc" / "root_pascal" if (work / "voc").is_dir() else
                                             make_root(work / "voc", "pascal", 20, *_sizes(args, "voc")), device)
            except Exception as exc:  # noqa: BLE001
                out["decode"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"decode: {out['decode']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _run_presets(args, device: torch.device, names: list[str], work: Path, cache_builds: dict, out: dict) -> None:
    for preset in (("voc", "coco") if args.preset == "both" else (args.preset,)):
        dataset, classes, batch, *_ = PRESETS[preset]
        n_train, n_test, side = _sizes(args, preset)
        root = make_root(work / preset, dataset, classes, n_train, n_test, side)
        rows, weights = [], {}
        for name in names:
            print(f"[{preset}] {name} ...", flush=True)
            row, w = run_combination(args, name, preset, root, device, work / preset)
            rows.append(row)
            if row["status"] == "refused" and device.type == "cpu" and "cuda_graphs" in COMBINATIONS[name][0]:
                # the CPU refuses the graphs (recorded above); the rest of the combination still runs
                print(f"[{preset}] {name}: refused ({row['error']}); again without --cuda-graphs", flush=True)
                row, w = run_combination(args, name, preset, root, device, work / preset, no_graphs=True)
                rows.append(row)
            if w:
                weights[row["combination"]] = w  # (a CPU row without the graphs has its own name)
            print(f"[{preset}] {name}: {row['status']}" + (
                f", epochs {', '.join(f'{s:.1f}' for s in row['epoch_s'])} s, train "
                f"{row['phases']['train']['img_s']:.0f} img/s" if row["status"] == "ok" else
                f" ({row.get('error')})"), flush=True)
        compare(rows, weights)
        out["presets"][preset] = {"dataset": dataset, "classes": classes, "batch_size": batch,
                                  "official_train_images": n_train, "test_images": n_test, "rows": rows,
                                  "cache_build_s": {k[1]: v for k, v in cache_builds.items()
                                                    if k[0].startswith(str(root))}}
        weights.clear()
        _print_table(preset, out["presets"][preset])


def _sizes(args, preset: str) -> tuple[int, int, int]:
    """(official train images, test images, JPEG long side) of a preset, as the arguments ask."""
    n_train, n_test, side = PRESETS[preset][3:]
    if args.images:
        n_train, n_test = args.images
    elif args.smoke:
        n_train, n_test, side = SMOKE_SIZES["train"], SMOKE_SIZES["test"], 160
    return n_train, n_test, side


def _print_table(preset: str, result: dict) -> None:
    print(f"\n| {preset}-like (batch {result['batch_size']}) | exactness | s/epoch (last) | train img/s | APL pass "
          f"img/s | val img/s | test img/s | peak GB | speed-up | = faithful |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"| {r['combination']} | {r['exactness']} | {r['status']}: {r.get('error', '')[:80]} |")
            continue
        img = lambda p: f"{r['phases'][p]['img_s']:.0f}" if p in r["phases"] else "-"  # noqa: E731
        print(f"| {r['combination']} | {r['exactness']} | {r['epoch_s'][-1]:.2f} | {img('train')} | "
              f"{img('apl_pass')} | {img('val')} | {img('test')} | {r.get('peak_reserved_gb', 0):.1f} | "
              f"{r.get('speedup_epoch', float('nan')):.2f}x | {r.get('equal_to_faithful', '-')} |")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main_())
