"""--protocol {zhou,cole,kim}: each source's training loop (config.PROTOCOLS), and each of its settings alone.

Sources: Zhou et al.'s main.py (stop at the first non-improving epoch, test after each improving one); Cole et
al.'s train.py (drop_last=True for the train, val and test loaders, every epoch runs train/val/test, the best val
epoch kept; ROLE+LI's `inverse_sigmoid(torch.FloatTensor(estimated_labels))`); Kim et al.'s config.py and train.py
(bsize 16, lr 1e-5, lr_mult 10 for the linear classifier, num_epochs 10, `elif bestmap_val - map_val > 3: break`,
the test phase once after loading the best model).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ROOT  # noqa: F401  (conftest puts ROOT on sys.path)

import config  # noqa: E402
import main  # noqa: E402
import train  # noqa: E402
from datasets import FeatureDataset, FeatureLoader  # noqa: E402
from image_cache import make_loaders  # noqa: E402
from models import MultilabelClassifier  # noqa: E402
from test_early_stopping import run_fit, same_state  # noqa: E402

CPU = torch.device("cpu")


# --- the presets ---------------------------------------------------------------------------------------------------

def test_zhou_is_the_default_and_keeps_the_dataset_table():
    for dataset, batch, lr in (("pascal", 8, 1e-5), ("coco", 16, 1e-5), ("cub", 8, 1e-4)):
        cfg = config.build_config(dataset, loss="EM_APL")
        assert cfg == config.build_config(dataset, loss="EM_APL", protocol="zhou")
        assert (cfg.protocol, cfg.batch_size, cfg.lr, cfg.num_epochs) == ("zhou", batch, lr, 10)
        assert (cfg.head_lr_mult, cfg.early_stop, cfg.drop_last, cfg.test_pass, cfg.role_li_init) == \
            (1.0, "first-drop", False, "best", "float64")


@pytest.mark.parametrize("dataset", ["pascal", "coco", "nuswide", "cub"])
def test_kim_is_their_loop_on_every_dataset(dataset):
    cfg = config.build_config(dataset, loss="ll_r", protocol="kim")
    assert (cfg.batch_size, cfg.lr, cfg.num_epochs, cfg.head_lr_mult) == (16, 1e-5, 10, 10.0)
    assert (cfg.early_stop, cfg.drop_last, cfg.test_pass) == ("drop-3", False, "end")
    assert cfg.delta_rel == config.LL_DELTA_REL[dataset]["ll_r"]


def test_cole_is_their_loop():
    cfg = config.build_config("coco", loss="role", protocol="cole")
    assert (cfg.early_stop, cfg.drop_last, cfg.test_pass, cfg.role_li_init, cfg.head_lr_mult) == \
        ("none", True, "every", "float32", 1.0)
    assert (cfg.batch_size, cfg.lr) == (16, 1e-5)  # the dataset table's


def test_a_flag_overrides_its_protocol_and_a_linear_probe_keeps_its_schedule():
    cfg = config.build_config("pascal", loss="ll_r", protocol="kim", batch_size=8, early_stop="none")
    assert (cfg.batch_size, cfg.early_stop, cfg.head_lr_mult) == (8, "none", 10.0)
    assert config.build_config("pascal", protocol="cole", drop_last=False).drop_last is False
    probe = config.build_config("pascal", loss="ll_r", protocol="kim", features="resnet50_imagenet_448")
    assert (probe.batch_size, probe.lr, probe.num_epochs) == tuple(config.LINEAR_SETTINGS[k] for k in
                                                                   ("batch_size", "lr", "num_epochs"))
    assert (probe.head_lr_mult, probe.early_stop) == (10.0, "drop-3")


def test_bad_values_are_one_line_errors(capsys):
    for argv in (["--protocol", "mine"], ["--early-stop", "drop-5"], ["--test-pass", "never"]):
        with pytest.raises(SystemExit) as exit_:
            main.main(["-d", "demo", *argv])
        assert exit_.value.code == 2 and f"{argv[0]}: invalid choice" in capsys.readouterr().err
    for value in ("0", "-1", "nan", "inf"):
        assert main.main(["-d", "demo", "--head-lr-mult", value]) == 2
        assert "--head-lr-mult must be a finite number > 0" in capsys.readouterr().err


# --- the loop ------------------------------------------------------------------------------------------------------
# val mAP 50, 60, 50, 20, 70, 30 (k of 10 classes on the diagonal, see test_early_stopping)
VAL = [5, 6, 5, 2, 7, 3]
TEST = [1, 2, 3, 4, 8, 6]


def test_first_drop_stops_at_the_first_epoch_that_does_not_improve(tmp_path, monkeypatch):
    fake, *_, results = run_fit(tmp_path, monkeypatch, VAL, TEST, 6, early_stop="first-drop")
    assert fake.calls == [(1, "val"), (1, "test"), (2, "val"), (2, "test"), (3, "val")]
    assert results["best_epoch"] == 2 and results["test_map"] == pytest.approx(20.0)


def test_drop_3_goes_on_until_val_falls_more_than_3_below_the_best(tmp_path, monkeypatch):
    # epoch 3: 60 - 50 = 10 > 3 already; with val falling by at most 3 the run goes on
    fake, *_, results = run_fit(tmp_path, monkeypatch, VAL, TEST, 6, early_stop="drop-3")
    assert [c for c in fake.calls if c[1] == "val"] == [(1, "val"), (2, "val"), (3, "val")]
    assert results["best_epoch"] == 2
    # 59.x is within 3 of 60: no stop; 50 is not
    fake, *_, results = run_fit(tmp_path / "b", monkeypatch, [5, 6, 6, 7, 5, 7], TEST, 6, early_stop="drop-3")
    assert [e for e, p in fake.calls if p == "val"] == [1, 2, 3, 4, 5]
    assert results["best_epoch"] == 4 and results["test_map"] == pytest.approx(40.0)


def test_drop_3_compares_with_the_best_not_the_last(tmp_path, monkeypatch):
    from train import _stops
    cfg = config.build_config("demo", early_stop="drop-3")
    assert not _stops(cfg, False, 57.0, 60.0) and _stops(cfg, False, 56.99, 60.0)
    assert not _stops(cfg, True, 10.0, 60.0)  # an improving epoch never stops
    drop_2 = config.build_config("demo", early_stop="drop-2")  # GR-Loss's loop
    assert not _stops(drop_2, False, 58.0, 60.0) and _stops(drop_2, False, 57.99, 60.0)
    none = config.build_config("demo", early_stop="none")
    assert not _stops(none, False, 0.0, 100.0)
    first = config.build_config("demo")
    assert _stops(first, False, 60.0, 60.0)  # a tie is no improvement


def test_none_with_every_test_pass_runs_all_epochs_and_keeps_the_best(tmp_path, monkeypatch):
    fake, model, _, _, run_dir, results = run_fit(tmp_path, monkeypatch, VAL, TEST, 6, early_stop="none",
                                                  test_pass="every")
    assert fake.calls == [(e, p) for e in range(1, 7) for p in ("val", "test")]
    assert all("test" in results["epochs"][str(e)] for e in range(1, 7))
    assert results["best_epoch"] == 5 and results["test_map"] == pytest.approx(80.0)
    assert same_state(model.state_dict(), fake.snapshots[(5, "val")])
    with np.load(run_dir / "predictions.npz") as saved:
        assert int(saved["epoch"]) == 5


def test_the_end_test_pass_scores_the_best_weights_once(tmp_path, monkeypatch):
    fake, model, _, _, run_dir, results = run_fit(tmp_path, monkeypatch, VAL, TEST, 6, early_stop="none",
                                                  test_pass="end")
    assert fake.calls == [(e, "val") for e in range(1, 7)] + [(5, "test")]
    assert same_state(fake.snapshots[(5, "test")], fake.snapshots[(5, "val")])  # epoch 5's weights, after epoch 6
    assert not same_state(fake.snapshots[(5, "test")], fake.snapshots[(6, "val")])
    assert [e for e in results["epochs"] if "test" in results["epochs"][e]] == ["5"]
    assert results["test_map"] == pytest.approx(80.0) and results["status"] == "finished"
    with np.load(run_dir / "predictions.npz") as saved:
        assert int(saved["epoch"]) == 5


# --- each setting ----------------------------------------------------------------------------------------------------

def test_the_head_learns_at_head_lr_mult_times_lr():
    torch.manual_seed(0)
    model = MultilabelClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5)), 5, 3)
    engine = train.build_engine(model, CPU)
    groups = engine.parameter_groups(1e-3, 10.0)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert [len(g["params"]) for g in groups] == [2, 2]
    assert all(p is q for p, q in zip(groups[1]["params"], model.head.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    # Adam's first step moves every weight by lr * g / (|g| + eps) ~ lr
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert moved[0] == pytest.approx(1e-3, rel=1e-3) and moved[2] == pytest.approx(1e-2, rel=1e-3)
    # the default: one group, as the original
    assert len(engine.parameter_groups(1e-3)) == 1 and len(engine.parameter_groups(1e-3)[0]["params"]) == 4
    # a linear probe is all head
    probe = train.build_engine(torch.nn.Linear(6, 3), CPU)
    assert [g["lr"] for g in probe.parameter_groups(1e-3, 10.0)] == [1e-2]


def test_drop_last_leaves_out_the_last_partial_batch_of_every_loader(tmp_path):
    from helpers import tiny_dataset
    datasets = {phase: tiny_dataset(tmp_path / phase, n, 4, seed=i)
                for i, (phase, n) in enumerate((("train", 10), ("val", 7), ("test", 9)))}
    kept = make_loaders(datasets, 4, 0, False, CPU)
    dropped = make_loaders(datasets, 4, 0, False, CPU, drop_last=True)
    for phase, n in (("train", 10), ("val", 7), ("test", 9)):
        assert sum(len(b["idx"]) for b in kept[phase]) == n
        assert [len(b["idx"]) for b in dropped[phase]] == [4] * (n // 4)
    # the linear probe's loaders: the eval passes' own large batches, cut where batches of 4 would end
    features = FeatureDataset(np.random.rand(10, 3).astype(np.float32), datasets["train"].labels_obs,
                              datasets["train"].labels_true)
    evaluation = FeatureLoader(features, 4096, False, CPU, drop_last_of=4)
    assert len(evaluation) == 1 and [b["idx"].tolist() for b in evaluation] == [list(range(8))]
    shuffled = FeatureLoader(features, 4, True, CPU, drop_last_of=4)
    assert [len(b["idx"]) for b in shuffled] == [4, 4] and len(shuffled) == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's, on Cole et al.'s ufuncs over a tensor
def test_role_li_float32_init_is_coles_inverse_sigmoid():
    def inverse_sigmoid(p):  # Cole et al.'s models.py, applied as their LabelEstimator does, to a FloatTensor
        epsilon = 1e-5
        p = np.minimum(p, 1 - epsilon)
        p = np.maximum(p, epsilon)
        return np.log(p / (1 - p))

    probs = torch.sigmoid(3 * torch.randn(200, 7, generator=torch.Generator().manual_seed(0))).numpy()
    probs[0, :3] = (0.0, 1.0, 0.5)
    obs = np.zeros(probs.shape)
    coles = torch.as_tensor(inverse_sigmoid(torch.FloatTensor(probs)))
    ours = train.LabelEstimates(obs, probs, np.float32).logits.detach()
    assert torch.equal(ours, coles)
    rounded = train.LabelEstimates(obs, probs).logits.detach()  # float64 logit, rounded to float32
    assert 0 < int((rounded != coles).sum()) < probs.size


def test_results_record_the_protocol_and_report_keeps_protocols_apart(tmp_path):
    import report
    zhou = config.build_config("pascal", loss="ll_r").to_dict()
    kim = config.build_config("pascal", loss="ll_r", protocol="kim").to_dict()
    assert config.comparable_settings(zhou) != config.comparable_settings(kim)
    assert report.label_settings([zhou, kim], [report.dataset_defaults("pascal", "ll_r", c) for c in (zhou, kim)]) == \
        ["", "protocol=kim"]
    # a setting changed on top of the protocol shows as such
    kim8 = config.build_config("pascal", loss="ll_r", protocol="kim", batch_size=8).to_dict()
    assert report.label_settings([kim8], [report.dataset_defaults("pascal", "ll_r", kim8)]) == \
        ["batch_size=8, protocol=kim"]


def test_drop_last_is_refused_under_torchrun(monkeypatch):
    import distributed
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    cfg = config.build_config("demo", protocol="cole")
    with pytest.raises(ValueError, match="--drop-last is not supported under torchrun"):
        main.setup_device(cfg, None)


def test_report_never_pools_runs_of_different_protocols(tmp_path):
    import report
    from test_report import write_run
    for seed, value in ((0, 80.0), (1, 82.0)):
        write_run(tmp_path, "pascal", "ll_r", seed, value)
        write_run(tmp_path, "pascal", "ll_r", seed, value - 10, protocol="kim")
    runs, _ = report.collect_runs([tmp_path])
    experiments = report.group_runs(runs)
    assert sorted((e.label, len(e.runs), e.test_map().mean) for e in experiments) == [
        ("ll_r", 2, pytest.approx(81.0)), ("ll_r (protocol=kim)", 2, pytest.approx(71.0))]


def test_role_li_init_given_to_another_loss_is_reported_as_ignored():
    assert config.build_config("demo", loss="role").unused_settings({"role_li_init", "early_stop"}) == ["role_li_init"]
    assert config.build_config("demo", loss="role_li").unused_settings({"role_li_init"}) == []
