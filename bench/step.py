"""Training-step speed of the faithful step and of each speed option (--amp, --channels-last, --compile).

    python bench/step.py --arch A --image-size S --batch-size B --device D [--steps K] [--json F]

Every configuration trains a fresh model (`models.build_model(A, C, "random")`, same seed) with the project's own
step: `train.train_epoch(engine, loader, optimizer, scaler, cfg, epoch)` on an Engine from
`train.build_engine(model, device, amp, channels_last, compile_model)`, Adam and GradScaler as
train._train_with_early_stopping makes them. The loader is an `image_cache.CachedLoader` over K batches of random
uint8 images (random single-positive labels), so each step includes what a cached run does per batch: the host
gathers the batch, the device flips and normalises it (image_cache.to_model_input), forward, EM_APL loss, backward,
Adam. The row `faithful` is the original's step: all options off and the faithful loader's float32 NCHW batches
(pre-built, so only their copy to the device is timed; the PIL work is bench/loader.py's). Warm-up steps
(`--warmup-steps`, run through train_epoch and train.evaluate before timing) are excluded; their time is reported
as `warmup_s` (the compile cost, for compiled configurations). For the fastest configuration the eval pass
(`train.evaluate`, as APL's pseudo-labelling pass over the same K batches) is timed too: "APL pass as % of a
training epoch" = its time / the training time over the same images. Configurations the device does not support
are skipped with a note (fp16 on the CPU; compile without a C++ compiler or Triton).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import image_cache  # noqa: E402
import train  # noqa: E402
from config import build_config  # noqa: E402
from datasets import MultilabelDataset  # noqa: E402
from models import build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="training img/s of the faithful step and of the speed options")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (K batches)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--loss", default="EM_APL")
    p.add_argument("--configs", help="comma-separated subset, names as in the table: faithful, off, bf16, "
                                     "fp16+cl, bf16+cl+compile, ... (default: every combination)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled combinations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def config_name(amp: str, channels_last: bool, compile_model: bool) -> str:
    return "+".join([amp] + (["cl"] if channels_last else []) + (["compile"] if compile_model else []))


def all_configs(device: torch.device, with_compile: bool) -> list[tuple[str, str, bool, bool]]:
    amps = ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    out = [("faithful", "off", False, False)]
    for compile_model, amp, cl in itertools.product([False, True] if with_compile else [False], amps, [False, True]):
        out.append((config_name(amp, cl, compile_model), amp, cl, compile_model))
    return out


def unsupported(device: torch.device, amp: str, compile_model: bool) -> str | None:
    """Why the device cannot run this configuration (None if it can); build_engine gives the same answers."""
    if amp == "fp16" and device.type != "cuda":
        return "fp16 needs CUDA (build_engine refuses it on the CPU)"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    if compile_model:
        if device.type == "cuda":
            if importlib.util.find_spec("triton") is None:
                return "compile on CUDA needs Triton"
        elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            return "compile on the CPU needs a C++ compiler (none found)"
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FloatBatches:
    """The faithful loader's batches (float32 NCHW, normalised, flips applied), pre-built on the host."""

    def __init__(self, cached: image_cache.CachedLoader) -> None:
        cpu = torch.device("cpu")
        self.dataset = cached.dataset  # (train_epoch reads it)
        self.batches = []
        for b in cached:
            b = dict(b)
            b["image"] = image_cache.to_model_input(b, cpu)
            del b["flip"]
            self.batches.append(b)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def run_config(args, device, name, amp, channels_last, compile_model, data, measure_eval: bool) -> dict:
    dataset, images_timed, images_warm = data
    bs, k = args.batch_size, args.steps
    torch.manual_seed(args.seed)
    torch._dynamo.reset()
    cfg = build_config("pascal", loss=args.loss, gpu="cpu" if device.type == "cpu" else str(device.index or 0),
                       batch_size=bs, arch=args.arch, weights="random", image_size=args.image_size, amp=amp,
                       channels_last=channels_last, compile=compile_model, num_epochs=10, warmup_epoch=1)
    model = build_model(args.arch, args.num_classes, "random").to(device)
    engine = train.build_engine(model, device, amp, channels_last, compile_model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    timed = image_cache.CachedLoader(dataset, images_timed, bs, shuffle=True, flip=True)
    warm = image_cache.CachedLoader(_subset(dataset, len(images_warm)), images_warm, bs, shuffle=True, flip=True)
    if name == "faithful":
        timed, warm = FloatBatches(timed), FloatBatches(warm)

    synchronize(device)
    start = time.perf_counter()
    train.train_epoch(engine, warm, optimizer, scaler, cfg, 0)
    if measure_eval:
        train.evaluate(engine, warm, "warm-up eval")
    synchronize(device)
    warmup_s = time.perf_counter() - start

    synchronize(device)
    start = time.perf_counter()
    out = train.train_epoch(engine, timed, optimizer, scaler, cfg, 1)
    synchronize(device)
    train_s = time.perf_counter() - start
    result = {"config": name, "amp": amp, "channels_last": channels_last, "compile": compile_model,
              "img_s": k * bs / train_s, "step_ms": 1e3 * train_s / k, "warmup_s": warmup_s,
              "loss": out["loss"]}
    if measure_eval:
        synchronize(device)
        start = time.perf_counter()
        train.evaluate(engine, timed, "APL pass")
        synchronize(device)
        eval_s = time.perf_counter() - start
        result.update(eval_img_s=k * bs / eval_s, apl_pass_pct_of_epoch=100 * eval_s / train_s)
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    del engine, model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _subset(ds: MultilabelDataset, n: int) -> MultilabelDataset:
    return MultilabelDataset(ds.image_paths[:n], ds.labels_obs[:n], ds.labels_true[:n], ds.image_root, None)


def synthetic_data(args) -> tuple[MultilabelDataset, np.ndarray, np.ndarray]:
    """K batches of random uint8 images with random labels (1-3 true positives, one observed), and warm-up ones."""
    rng = np.random.RandomState(args.seed)
    n = args.steps * args.batch_size
    true = np.zeros((n, args.num_classes))
    obs = np.zeros((n, args.num_classes))
    for i in range(n):
        pos = rng.choice(args.num_classes, rng.randint(1, 4), replace=False)
        true[i, pos] = 1
        obs[i, pos[0]] = 1
    dataset = MultilabelDataset(np.array([f"synthetic_{i}" for i in range(n)]), obs, true, Path("."), None)
    images = rng.randint(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8)
    warm = images[:args.warmup_steps * args.batch_size]
    return dataset, images, warm


def bench_device(name: str) -> torch.device | None:
    """The device of --device (CUDA without an index: the current one), or None, said on stderr, when it asks for CUDA
    and there is none (bench/epoch.py shares it)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {name} but CUDA is not available (BENCH_SMOKE=1 runs the CPU's sizes)", file=sys.stderr)
        return None
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device(args.device)
    if device is None:
        return 2
    if args.warmup_steps < 1 or args.steps < 1:
        print("error: --steps and --warmup-steps must be >= 1", file=sys.stderr)
        return 2
    configs = all_configs(device, not args.no_compile)
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        known = {c[0]: c for c in all_configs(torch.device("cuda"), True)}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"error: unknown --configs {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        configs = [known[w] for w in wanted]
    data = synthetic_data(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"{args.arch} {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps "
          f"(+{args.warmup_steps} warm-up), loss {args.loss}, {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {_loadavg()}", flush=True)

    rows, notes = [], []
    for cname, amp, cl, comp in configs:
        why = unsupported(device, amp, comp)
        if why:
            notes.append(f"{cname}: skipped, {why}")
            print(f"  {cname}: skipped ({why})", flush=True)
            continue
        try:
            row = run_config(args, device, cname, amp, cl, comp, data, measure_eval=True)
        except Exception as exc:  # noqa: BLE001 - one failing option must not hide the others
            notes.append(f"{cname}: failed, {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            print(f"  {cname}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})", flush=True)
            continue
        rows.append(row)
        print(f"  {cname:20s} {row['img_s']:8.1f} img/s  {row['step_ms']:8.1f} ms/step  "
              f"warm-up {row['warmup_s']:.1f} s  eval {row['eval_img_s']:.1f} img/s", flush=True)
    if not rows:
        print("no configuration ran", file=sys.stderr)
        return 1
    base = next((r for r in rows if r["config"] == "faithful"), rows[0])
    for r in rows:
        r["speedup"] = r["img_s"] / base["img_s"]
    fastest = max(rows, key=lambda r: r["img_s"])

    print(f"\n| config ({args.arch}, {args.image_size} px, batch {args.batch_size}, {device}) | train img/s | "
          f"ms/step | speedup vs faithful | warm-up s ({args.warmup_steps} steps) | eval img/s | APL pass % of epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['img_s']:.1f} | {r['step_ms']:.1f} | {r['speedup']:.2f}x | {r['warmup_s']:.1f} | "
              f"{r['eval_img_s']:.1f} | {r['apl_pass_pct_of_epoch']:.0f} % |")
    print(f"\nfastest: {fastest['config']} ({fastest['speedup']:.2f}x faithful); its eval/APL pass (train.evaluate over "
          f"the same {args.steps * args.batch_size} images) takes {fastest['apl_pass_pct_of_epoch']:.0f} % of a "
          f"training epoch's time")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        out = {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
               "device": str(device), "device_name": name, "steps": args.steps, "warmup_steps": args.warmup_steps,
               "loss": args.loss, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "loadavg_at_start": _loadavg(), "rows": rows, "fastest": fastest["config"],
               "apl_pass_pct_of_epoch": fastest["apl_pass_pct_of_epoch"], "notes": notes}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
