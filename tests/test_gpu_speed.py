"""Issue 27's options, as far as a CPU can check them (docs/gpu-speed.md; the GPU figures come from bench/gpu.sh).

--cuda-graphs: refused on the CPU and with the losses and options it cannot capture, one line naming the flag; the
host logic around the graphs (static buffers, warm-up whose effects are undone, the last partial batch run
eagerly, one eval graph per batch shape, Adam after each replay) gives the eager loop's numbers bit for bit, with a
CPU stand-in for torch.cuda's graphs. --image-decode device: within 2 levels of PIL's pixels on real JPEGs (CPU
decoder), the faithful loader's order, flips and random draws, and the faithful path untouched.
--eval-batch-size: the val / test loaders only. bench/epoch.py and bench/gpu.sh (what a session lent a GPU runs)
work on the current code, in their CPU smoke mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import cuda_graphs
from conftest import ROOT
import main
import train
from config import build_config
from datasets import build_datasets
from device_decode import DecodedLoader
from image_cache import CachedLoader, build_cache, make_loaders, to_model_input
from models import build_model

CPU = torch.device("cpu")


def _args(root, tmp_path):
    return ["-d", "pascal", "-g", "cpu", "--data-root", str(root), "--results-dir", str(tmp_path / "r"),
            "--arch", "resnet18", "--weights", "random", "--image-size", "32", "--num-workers", "0"]


# ----------------------------------------------------------------------------------------------------------------
# refusals

def test_cuda_graphs_on_the_cpu_is_refused_in_one_line(bird_root, tmp_path, capsys):
    assert main.main([*_args(bird_root, tmp_path), "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --cuda-graphs model needs a CUDA GPU")
    assert "leave --cuda-graphs off" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # no run folder


@pytest.mark.parametrize("settings, message", [
    (dict(loss="gr"), "-l gr fills its loss by boolean indexing"),
    (dict(loss="ll_cp"), "-l ll_cp collects its label corrections"),
    (dict(loss="role", expected_num_pos=1.5), "-l role trains a label-estimate matrix"),
    (dict(compile=True), "--compile both put the model in graphs"),
    (dict(amp="fp16", cuda_graphs="step"), "--cuda-graphs step with --amp fp16"),
])
def test_what_a_graph_cannot_replay_is_refused(settings, message):
    cfg = build_config("pascal", **{"cuda_graphs": "model", **settings})
    with pytest.raises(ValueError, match=message):
        cuda_graphs.check(cfg, torch.device("cuda", 0))  # (only the settings are read: no GPU needed)
    for fine in (dict(loss="EM_APL"), dict(loss="ll_r"), dict(amp="fp16"), dict(amp="bf16", channels_last=True)):
        cuda_graphs.check(build_config("pascal", cuda_graphs="step" if "amp" not in fine else "model", **fine),
                          torch.device("cuda", 0))


def test_bad_values_of_the_new_flags_name_them(bird_root, tmp_path, capsys):
    for flags, message in ((["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
                           (["--image-decode", "device", "--image-cache", "ram"], "give one of them"),
                           (["--eval-batch-size", "16", "--drop-last"], "--eval-batch-size with --drop-last")):
        assert main.main([*_args(bird_root, tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit):
        main.main([*_args(bird_root, tmp_path), "--cuda-graphs", "all"])
    assert "invalid choice" in capsys.readouterr().err
    assert main.parse_args(["--cuda-graphs"]).cuda_graphs == "model"
    cfg = build_config("pascal")
    assert (cfg.cuda_graphs, cfg.image_decode, cfg.eval_batch_size) == ("off", "pil", None)  # faithful defaults


# ----------------------------------------------------------------------------------------------------------------
# --cuda-graphs' host logic, with a CPU stand-in for the graphs

class CpuStandIn:
    """torch.cuda's graphs as the code around them sees them: a capture runs nothing (here: runs the body and undoes
    its effect on the model's state); a replay computes the captured step again from the static inputs and writes the
    results into the tensors the capture made (the outputs and the gradients: the addresses a real replay writes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def warm_up(self, device, body, iterations):
        for _ in range(iterations):
            body()

    def capture(self, device, body):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        outputs = body()
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(before[k])
        return (body, outputs), outputs

    def replay(self, handle):
        body, outputs = handle
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        fresh = body()
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None and p.grad is not None and p.grad is not g:
                    g.copy_(p.grad)
                    p.grad = g
            for out, new in zip(outputs, fresh):
                out.detach().copy_(new.detach())


def _train_two_epochs(root, graphs: bool, batch: int = 7):
    cfg = build_config("pascal", loss="EM_APL", gpu="cpu", batch_size=batch, lr=1e-3, arch="resnet18",
                       weights="random", image_size=32, num_epochs=3, warmup_epoch=1, num_workers=0)
    sets = build_datasets(root, "pascal", 32)
    torch.manual_seed(0)
    model = build_model("resnet18", 20, "random")
    engine = train.build_engine(model, CPU)
    if graphs:
        engine.graphs = cuda_graphs.CudaGraphs("model", backend=CpuStandIn(model))
    optimizer = engine.optimizer(cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = DataLoader(sets["train"], batch_size=batch, shuffle=True)
    outs = [train.train_epoch(engine, loader, optimizer, scaler, cfg, epoch) for epoch in (1, 2)]
    outs.append(train.evaluate(engine, DataLoader(sets["val"], batch_size=batch), "val"))
    outs.append(train.evaluate(engine, loader, "APL pass"))
    return engine, outs, len(sets["train"]), len(sets["val"])


def test_graphed_steps_give_the_eager_loops_numbers(bird_root):
    eager, expected, n_train, n_val = _train_two_epochs(bird_root, graphs=False)
    graphed, got, _, _ = _train_two_epochs(bird_root, graphs=True)
    assert n_train % 7 and n_val % 7  # a last partial batch in each pass
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics (the warm-ups' moves undone)
    for e, g in zip(expected, got):
        assert e["loss"] == g["loss"] and np.array_equal(e["preds"], g["preds"]) and np.array_equal(e["idx"], g["idx"])
    batches = -(-n_train // 7)
    stats = graphed.graphs.stats
    # one capture per epoch (its first batch, replayed too), the last partial batch eagerly
    assert stats["train_captures"] == 2 and stats["train_replays"] == 2 * (batches - 1) and stats["train_eager"] == 2
    # eval: one graph per shape (7 rows, the val pass's and the training loader's last ones), every batch replayed
    assert stats["eval_captures"] == len({7, n_val % 7, n_train % 7}) and stats["eval_eager"] == 0
    assert stats["eval_replays"] == -(-n_val // 7) + batches
    assert expected[0]["loss"] != expected[1]["loss"]  # it trains: equal numbers are not those of a frozen model


def test_mode_step_captures_only_once_every_training_parameter_has_adams_state():
    """--cuda-graphs step with --frozen-backbone-epochs: when the backbone starts training, the head has Adam's
    state and the backbone has none; a capture then would record Adam making the backbone's state (zeros) and
    replay that at every step. The capture waits until every parameter that trains has its state."""
    head, backbone = torch.nn.Linear(3, 2), torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3)
    backbone.requires_grad_(False)  # the frozen epochs: the head alone trains and gets its state
    head(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert cuda_graphs._has_state(optimizer)
    backbone.requires_grad_(True)  # the first unfrozen epoch: no state for the backbone yet, no capture
    assert not cuda_graphs._has_state(optimizer)
    head(backbone(torch.randn(4, 3))).sum().backward()  # the eager batch that makes it
    optimizer.step()
    assert cuda_graphs._has_state(optimizer)


# ----------------------------------------------------------------------------------------------------------------
# --image-decode device

@pytest.mark.parametrize("size", [40, 448])
def test_device_decoding_is_within_two_levels_of_pil(bird_root, tmp_path, size):
    ds = build_datasets(bird_root, "pascal", size)["test"]  # real JPEGs, not square
    faithful = build_cache(ds, size, "ram", "test", tmp_path, num_workers=0)  # the PIL path's bits (test_speed.py)
    decoded = torch.cat([b["image"] for b in DecodedLoader(ds, size, CPU, 16, shuffle=False, flip=False)])
    diff = np.abs(decoded.numpy().astype(int) - faithful.astype(int))
    # the CPU's decoder (libjpeg-turbo) and torch's antialiased bilinear resize against PIL's: at most 2 levels of
    # 255 (measured: 1 at 40 px, 2 at 448 px), on average well under one (GPU decoding: bench/epoch.py measures it)
    assert decoded.shape == faithful.shape and diff.max() <= 2 and diff.mean() < 0.05
    assert diff.max() > 0  # another path indeed: a comparison with itself would pass anything


def test_device_decoding_keeps_the_loaders_order_flips_and_draws(bird_root, tmp_path):
    ds = build_datasets(bird_root, "pascal", 40)["train"]
    cached = CachedLoader(ds, build_cache(ds, 40, "ram", "train", tmp_path, num_workers=0), 8, shuffle=True,
                          flip=True, num_workers=2)
    decoded = DecodedLoader(ds, 40, CPU, 8, shuffle=True, flip=True, num_workers=2)
    torch.manual_seed(3)
    expected = list(cached)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    got = list(decoded)
    assert torch.equal(torch.get_rng_state(), after)
    for e, g in zip(expected, got, strict=True):
        assert all(torch.equal(e[k], g[k]) for k in ("idx", "flip", "label_vec_obs", "label_vec_true"))
        x, y = to_model_input(e, CPU), to_model_input(g, CPU)
        assert (x - y).abs().max() < 3 / 255 / 0.224  # 2 levels, normalised (flips applied alike)


def test_the_faithful_loaders_are_untouched_and_eval_batches_are_the_eval_loaders_only(bird_root, tmp_path):
    sets = build_datasets(bird_root, "pascal", 40)
    loaders = make_loaders(sets, 8, 0, False, CPU)
    assert all(type(loader) is DataLoader and loader.batch_size == 8 for loader in loaders.values())
    loaders = make_loaders(sets, 8, 0, False, CPU, eval_batch_size=32)
    assert [loaders[p].batch_size for p in ("train", "val", "test")] == [8, 32, 32]
    cached = make_loaders(sets, 8, 0, False, CPU, "ram", 40, tmp_path, eval_batch_size=32)
    assert type(cached["train"]) is CachedLoader
    assert [cached[p].batch_sampler.batch_size for p in ("train", "val", "test")] == [8, 32, 32]
    decoded = make_loaders(sets, 8, 0, False, CPU, image_size=40, image_decode="device")
    assert all(type(loader) is DecodedLoader for loader in decoded.values())


def test_a_run_with_device_decoding_and_eval_batches_finishes(bird_root, tmp_path):
    assert main.main([*_args(bird_root, tmp_path), "--epochs", "2", "--warmup-epoch", "1", "--batch-size", "16",
                      "--image-decode", "device", "--eval-batch-size", "64"]) == 0
    res = json.loads(next((tmp_path / "r").glob("*/results.json")).read_text())
    assert res["status"] == "finished" and res["config"]["image_decode"] == "device"
    assert res["config"]["eval_batch_size"] == 64 and np.isfinite(res["test_map"])


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetching_gives_the_same_batches_and_draws(bird_root, tmp_path, workers):
    ds = build_datasets(bird_root, "pascal", 40)["train"]
    images = build_cache(ds, 40, "ram", "train", tmp_path, num_workers=0)
    runs = []
    for prefetch in (False, True):  # (on a GPU prefetching is on, with pinned memory)
        torch.manual_seed(5)
        loader = CachedLoader(ds, images, 8, shuffle=True, flip=True, num_workers=workers, prefetch=prefetch)
        runs.append(([b for b in loader], torch.get_rng_state()))
        assert len(runs[-1][0]) == len(loader) > 2
    (plain, plain_state), (ahead, ahead_state) = runs
    assert torch.equal(plain_state, ahead_state)
    for a, b in zip(plain, ahead, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(5)
    first = next(iter(CachedLoader(ds, images, 8, shuffle=True, flip=True, num_workers=workers, prefetch=True)))
    assert torch.equal(first["idx"], plain[0]["idx"])  # a loop left after one batch: the thread is not in the way


# ----------------------------------------------------------------------------------------------------------------
# the prepared GPU script (bench/gpu.sh) and its whole-epoch benchmark (bench/epoch.py), in their CPU smoke mode:
# epoch.py drives main.build_run and train.fit and times them by wrapping train's and checkpoints' functions, so a
# refactor of either must keep it working

def _check_epoch_rows(epoch: dict) -> None:
    """bench/epoch.py's VOC-like rows in smoke mode: every phase timed, the cache bit-identical to faithful."""
    rows = {r["combination"]: r for r in epoch["presets"]["voc"]["rows"]}
    # on the CPU each graphed combination is refused in one line, then run without the graphs and amp
    assert rows["cache+graphs"]["status"] == "refused"
    assert rows["cache+graphs"]["error"].startswith("--cuda-graphs model needs a CUDA GPU")
    faithful, cache = rows["faithful"], rows["cache+graphs (CPU: no graphs, no amp)"]
    statistical = rows["decode+graphs-step+bf16+cl+eval4x (CPU: no graphs, no amp)"]
    for row in (faithful, cache, statistical):
        assert row["status"] == "ok" and len(row["epoch_s"]) == 2
        # smoke sizes: 40 official training images = 32 train + 8 val, 16 test; the APL pass sees the train rows
        assert row["images_per_epoch"] == {"train": 32, "apl_pass": 32, "apl": 32, "val": 8, "test": 16}
        assert all(row["phases"][p]["seconds"] > 0 for p in ("train", "apl_pass", "val", "test", "checkpoint"))
    # the image cache is bit-identical to the faithful loader: equal final weights and equal metrics per epoch
    assert cache["equal_to_faithful"] is True and cache["max_abs_diff_to_faithful"] == 0.0
    assert cache["val_map"] == faithful["val_map"] and cache["train_loss"] == faithful["train_loss"]
    # device decoding + channels-last + 4x eval batches are statistical: compared, and not equal
    assert statistical["equal_to_faithful"] is False and statistical["max_abs_diff_to_faithful"] > 0


def test_the_prepared_gpu_script_runs_its_benchmarks_in_smoke_mode(tmp_path):
    """bench/gpu.sh is what a session lent a GPU runs once: its benchmark scripts must work on the current code
    (BENCH_SMOKE=1: the CPU at tiny sizes). Skipped here: the demo runs of main.py (they write the checkout's
    data/demo; other tests run main.py) and the compiled step (half a minute of compiling)."""
    skip = ("demo_data", "seed_faithful_s0", "seed_graphs_s0", "seed_fast_s0", "main_faithful", "main_fast",
            "main_graphs", "step_b16_compile")
    env = {**os.environ, "BENCH_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "BENCH_SKIP": ",".join(skip), "BENCH_STEP_CAP_S": "900", "BENCH_BUDGET_S": "3600"}
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    status = {r["name"]: r["status"] for r in result["steps"]}
    assert {name: status[name] for name in skip} == dict.fromkeys(skip, "skipped")
    ran = {name: s for name, s in status.items() if name not in skip}
    assert set(ran) >= {"step_b16", "step_b8", "epoch_voc", "decode", "bench_root", "loader_w0", "loader_w2"}
    assert ran == dict.fromkeys(ran, "ok"), [r.get("log_tail") for r in result["steps"] if r["status"] != "ok"]
    # each benchmark's own JSON made it into the one file
    assert result["epoch"]["voc"]["presets"]["voc"]["rows"][0]["combination"] == "faithful"
    _check_epoch_rows(result["epoch"]["voc"])
    assert all(result["step"][name] for name in ("step_b16", "step_b8"))
    assert result["loader"]["loader_w0"]["max_abs_diff"] == 0.0 and result["decode"]
