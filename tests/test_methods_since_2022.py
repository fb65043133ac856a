"""Tests of the methods since 2022 (issue 25; docs/methods_since_2022.md): GR-Loss (-l gr) and the CAM heads
(--head cam / boostlu, BoostLU).

GR-Loss is compared bit for bit (values and gradients, torch.equal) with an independent re-statement of its
authors' code (yan4xi1/GRLoss: losses.py `GR_loss`, `loss1`, `loss2`, `neg_log`; models.py `KFunction`,
`VFunction`; the schedule of train.py), written here in their style: masked indexing, `.mean()`, K and V from the
detached predictions. BoostLU's head is compared with a re-statement of youngwk/BridgeGapExplanationPAMC's
models.py `ImageClassifier.forward` over the same torchvision ResNet trunk. Every per-dataset default of these
methods is pinned to its authors' published value, with the source in a comment.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch.nn import functional as F

import config
import main
import models
from helpers import random_batch
from losses import LOSSES, check_hyperparameters, compute_loss, gr_schedule
from report import PAPER_METHODS, PAPER_VALUES

# ----------------------------------------------------------------------------------------------------------------
# GR-Loss: the authors' code, re-stated

AUTHORS_BETA = [0, 2, -2, -2]  # GRLoss config.py: --beta default [w0, wT, b0, bT]
AUTHORS_ALPHA = [0.5, 2, 0.8, 0.5]  # GRLoss config.py: --alpha default [mu0, sigma0, muT, sigmaT]
AUTHORS_Q2Q3 = [0.01, 1]  # GRLoss config.py: --q2q3 default [q2, q3]


def authors_schedule(epoch: int, num_epochs: int, beta, alpha, n: int = 0) -> tuple[float, float, float, float]:
    """GRLoss train.py, at the start of each training epoch (n = their --linear_init, default 0)."""
    w_0, w_max, b_0, b_max = beta
    w = w_0 + (w_max - w_0) * max((epoch - n - 1), 0) / (num_epochs - n)
    b = b_0 + (b_max - b_0) * max((epoch - n - 1), 0) / (num_epochs - n)
    mu_0, sigma_0, mu_max, sigma_max = alpha
    mu = mu_0 + (mu_max - mu_0) * max((epoch - n), 0) / (num_epochs - n)
    sigma = sigma_0 + (sigma_max - sigma_0) * max((epoch - n), 0) / (num_epochs - n)
    return w, b, mu, sigma


def authors_gr_loss(logits: torch.Tensor, label_vec: torch.Tensor, epoch: int, num_epochs: int, beta, alpha,
                    q2q3, n: int = 0) -> torch.Tensor:
    """GRLoss train.py's step (preds, preds1 = detached, K = KFunction(w, b)(preds1), V = VFunction) and
    losses.py's GR_loss, in their masked-assignment style."""
    w, b, mu, sigma = authors_schedule(epoch, num_epochs, beta, alpha, n)
    preds = torch.sigmoid(logits)
    preds1 = preds.detach()
    K = 1 / (1 + torch.exp(-(w * preds1 + b)))
    V = torch.exp(-0.5 * ((preds1 - mu) / sigma) ** 2)
    q2, q3 = q2q3

    def neg_log(x):
        return - torch.log(x + 1e-7)

    def loss1(x, q):
        return (1 - torch.pow(x, q)) / q

    def loss2(x, q):
        return (1 - torch.pow(1 - x, q)) / q

    loss_mtx = torch.zeros_like(preds)
    loss_mtx[label_vec == 1] = neg_log(preds[label_vec == 1])
    loss_mtx[label_vec == 0] = V[label_vec == 0] * (K[label_vec == 0] * loss1(preds[label_vec == 0], q2)
                                                    + (1 - K[label_vec == 0]) * loss2(preds[label_vec == 0], q3))
    return loss_mtx.mean()


def gr_flags(beta, alpha, q2q3) -> dict:
    return dict(gr_w_start=beta[0], gr_w_end=beta[1], gr_b_start=beta[2], gr_b_end=beta[3], gr_mu_start=alpha[0],
                gr_sigma_start=alpha[1], gr_mu_end=alpha[2], gr_sigma_end=alpha[3], gr_q2=q2q3[0], gr_q3=q2q3[1])


OTHER_SETTING = ([0.5, 3.0, -1.0, -3.0], [0.3, 1.0, 0.9, 0.25], [0.5, 2.0])  # every symbol moves


@pytest.mark.parametrize("where", [False, True], ids=["masked", "where"])
@pytest.mark.parametrize("setting", ["authors", "other"])
@pytest.mark.parametrize("epoch, num_epochs", [(1, 8), (2, 8), (5, 8), (8, 8), (1, 1), (3, 10)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gr_is_bit_identical_to_the_authors_code(seed, epoch, num_epochs, setting, where):
    beta, alpha, q2q3 = (AUTHORS_BETA, AUTHORS_ALPHA, AUTHORS_Q2Q3) if setting == "authors" else OTHER_SETTING
    logits, obs, true = random_batch(seed)
    if seed == 3:  # saturated: p rounds to exactly 1 above ~17 and falls to ~1e-26 at -60 (p = 0 is singular
        logits = (logits * 20).clamp(-60, 60)  # for q2 < 1 in any implementation: 0 * inf)
    x = logits.clone().requires_grad_(True)
    hp = {} if setting == "authors" else gr_flags(beta, alpha, q2q3)
    got = compute_loss("gr", x, obs, true, where=where, checked=where, epoch=epoch, num_epochs=num_epochs, **hp)
    got.backward()
    y = logits.clone().requires_grad_(True)
    ref = authors_gr_loss(y, obs.float(), epoch, num_epochs, beta, alpha, q2q3)
    ref.backward()
    assert got.dtype == torch.float32 and torch.isfinite(got) and torch.isfinite(x.grad).all()
    assert torch.equal(got, ref)
    assert torch.equal(x.grad, y.grad)
    assert x.grad.abs().sum() > 0


def test_gr_hand_values():
    """One row, C = 3, epoch 1 of 4 with the authors' defaults: w = 0, b = -2, mu = 0.5 + 0.3 / 4, sigma = 2 - 1.5 / 4."""
    logits, obs = [0.4, -1.0, 2.0], [1.0, 0.0, 0.0]
    w, b, mu, sigma = 0.0, -2.0, 0.575, 1.625
    total = -math.log(1 / (1 + math.exp(-0.4)) + 1e-7)
    for z in logits[1:]:
        p = 1 / (1 + math.exp(-z))
        k = 1 / (1 + math.exp(-(w * p + b)))
        v = math.exp(-0.5 * ((p - mu) / sigma) ** 2)
        total += v * (k * (1 - p ** 0.01) / 0.01 + (1 - k) * (1 - (1 - p)))
    got = compute_loss("gr", torch.tensor([logits]), torch.tensor([obs]), torch.tensor([obs]), epoch=1, num_epochs=4)
    assert got.item() == pytest.approx(total / 3, rel=1e-6)


def test_gr_schedules_epoch_by_epoch_match_the_authors_arithmetic():
    for num_epochs in (1, 2, 8, 10, 25):
        for n in sorted({0, 1, 3, num_epochs - 1} & set(range(num_epochs))):  # their --linear_init
            for epoch in range(1, num_epochs + 1):
                for beta, alpha in ((AUTHORS_BETA, AUTHORS_ALPHA), (OTHER_SETTING[0], OTHER_SETTING[1])):
                    w, b, mu, sigma = authors_schedule(epoch, num_epochs, beta, alpha, n)
                    kw = dict(frozen=n) if n else {}  # n = 0: the call of a run without frozen epochs
                    assert gr_schedule(float(beta[0]), float(beta[1]), epoch, num_epochs, lag=1, **kw) == w
                    assert gr_schedule(float(beta[2]), float(beta[3]), epoch, num_epochs, lag=1, **kw) == b
                    assert gr_schedule(float(alpha[0]), float(alpha[2]), epoch, num_epochs, lag=0, **kw) == mu
                    assert gr_schedule(float(alpha[1]), float(alpha[3]), epoch, num_epochs, lag=0, **kw) == sigma
    # their linear init of n = 2 epochs out of 8: nothing moves before epoch 3, and mu still reaches muT at the end
    assert [gr_schedule(0.5, 0.8, e, 8, lag=0, frozen=2) for e in (1, 2, 3, 8)] == [0.5, 0.5, 0.5 + 0.3 / 6, 0.8]
    assert [gr_schedule(0.0, 2.0, e, 8, lag=1, frozen=2) for e in (3, 4)] == [0.0, 2.0 / 6]
    # the off-by-one, in numbers (8 epochs, the authors' defaults): w starts at w0 and never reaches wT ...
    assert [gr_schedule(0.0, 2.0, e, 8, lag=1) for e in (1, 2, 8)] == [0.0, 0.25, 1.75]
    # ... mu moves in epoch 1 already and reaches muT in the last epoch
    assert [gr_schedule(0.5, 0.8, e, 8, lag=0) for e in (1, 8)] == [0.5 + 0.3 / 8, 0.8]


@pytest.mark.parametrize("epoch, n", [(1, 1), (2, 1), (3, 2), (6, 3)])
def test_gr_after_frozen_epochs_is_bit_identical_to_the_authors_code(epoch, n):
    logits, obs, true = random_batch(7)
    x = logits.clone().requires_grad_(True)
    got = compute_loss("gr", x, obs, true, where=True, checked=True, epoch=epoch, num_epochs=8,
                       frozen_backbone_epochs=n)
    got.backward()
    y = logits.clone().requires_grad_(True)
    ref = authors_gr_loss(y, obs.float(), epoch, 8, AUTHORS_BETA, AUTHORS_ALPHA, AUTHORS_Q2Q3, n)
    ref.backward()
    assert torch.equal(got, ref) and torch.equal(x.grad, y.grad)
    # and it is another loss than the one without frozen epochs (the schedule has moved less)
    assert got.item() != compute_loss("gr", logits, obs, true, epoch=epoch, num_epochs=8).item()


class _BackboneAndHead(torch.nn.Module):
    """A model with the project's two parts: `backbone` (a convolution and a BatchNorm) and `head`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_frozen_backbone_epochs_train_the_head_alone_then_everything(tmp_path, monkeypatch):
    """GRLoss train.py's --linear_init n: in epochs <= n the backbone's parameters have requires_grad False (no
    gradient, so Adam leaves them and keeps no state for them) while the model is in train mode (BatchNorm's
    running statistics move); from epoch n + 1 all train; the loss gets n for its schedule."""
    import train
    from helpers import tiny_dataset
    from torch.utils.data import DataLoader
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, 16, 5)
    cfg = config.build_config("demo", loss="gr", frozen_backbone_epochs=1, num_epochs=3, batch_size=8,
                              num_workers=0)
    engine = train.build_engine(_BackboneAndHead(5), torch.device("cpu"))
    optimizer = torch.optim.Adam(engine.model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    real = train.compute_loss
    monkeypatch.setattr(train, "compute_loss", lambda *a, **kw: seen.append(kw["frozen_backbone_epochs"]) or
                        real(*a, **kw))
    conv, bn, head = engine.model.backbone[0], engine.model.backbone[1], engine.model.head
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    train.train_epoch(engine, DataLoader(ds, batch_size=8), optimizer, scaler, cfg, 1, ds)
    assert torch.equal(conv.weight, before["backbone.0.weight"]) and torch.equal(bn.weight, before["backbone.1.weight"])
    assert not torch.equal(bn.running_mean, before["backbone.1.running_mean"])  # train mode
    assert not torch.equal(head.weight, before["head.weight"])
    assert conv.weight not in optimizer.state and head.weight in optimizer.state
    train.train_epoch(engine, DataLoader(ds, batch_size=8), optimizer, scaler, cfg, 2, ds)
    assert not torch.equal(conv.weight, before["backbone.0.weight"]) and optimizer.state[conv.weight]["step"] == 2
    assert optimizer.state[head.weight]["step"] == 4
    assert seen == [1] * 4


@pytest.mark.parametrize("args, words", [
    (["--frozen-backbone-epochs", "3", "--epochs", "3"], "--frozen-backbone-epochs must be in [0, --epochs - 1]"),
    (["--frozen-backbone-epochs", "-1"], "--frozen-backbone-epochs must be in"),
    (["--frozen-backbone-epochs", "1", "--freeze-backbone"], "give one of them")])
def test_frozen_backbone_epochs_are_checked_with_one_line(args, words, capsys):
    assert main.main(["-d", "demo", "-l", "gr", *args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_gr_reads_its_schedule_from_the_epoch_and_the_run_length():
    logits, obs, true = random_batch(5)
    values = {(e, n): compute_loss("gr", logits, obs, true, epoch=e, num_epochs=n).item()
              for e, n in ((1, 8), (2, 8), (8, 8), (2, 4))}
    assert len(set(values.values())) == 4
    with pytest.raises(TypeError, match="num_epochs"):
        compute_loss("gr", logits, obs, true, epoch=1)


def test_gr_defaults_are_the_authors_for_every_dataset():
    # yan4xi1/GRLoss config.py (the only setting its code and README publish; the same for every dataset):
    # --beta [w0, wT, b0, bT] = [0, 2, -2, -2], --alpha [mu0, sigma0, muT, sigmaT] = [0.5, 2, 0.8, 0.5],
    # --q2q3 [q2, q3] = [0.01, 1]
    expected = gr_flags(AUTHORS_BETA, AUTHORS_ALPHA, AUTHORS_Q2Q3)
    assert LOSSES["gr"].defaults == expected
    for dataset in ("pascal", "coco", "nuswide", "cub", "demo"):
        cfg = config.build_config(dataset, loss="gr")
        assert cfg.loss_hyperparameters() == expected


@pytest.mark.parametrize("flag, value", [("--gr-sigma-start", "0"), ("--gr-sigma-end", "-1"), ("--gr-q2", "0"),
                                         ("--gr-q3", "-0.5"), ("--gr-w-end", "nan"), ("--gr-mu-start", "inf")])
def test_gr_ranges_are_checked_with_one_line(flag, value, capsys):
    assert main.main(["-d", "demo", "-l", "gr", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "for loss gr" in err


def test_gr_accepts_negative_slopes_and_offsets():
    check_hyperparameters("gr", {"gr_w_start": -3.0, "gr_b_end": -10.0, "gr_mu_end": 1.5, "gr_q3": 2.0})


# ----------------------------------------------------------------------------------------------------------------
# BoostLU and the CAM heads

def authors_boostlu_forward(trunk: torch.nn.Module, conv: torch.nn.Conv2d, alpha: float, x: torch.Tensor):
    """BridgeGapExplanationPAMC models.py ImageClassifier.forward (feature_extractor = the ResNet's children
    without avgpool and fc)."""
    feats = trunk(x)
    CAM = conv(feats)
    CAM = torch.where(CAM > 0, CAM * alpha, CAM)  # BoostLU operation
    logits = F.adaptive_avg_pool2d(CAM, 1).squeeze(-1).squeeze(-1)
    return logits


@pytest.mark.parametrize("alpha", [5.0, 1.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_boostlu_head_is_bit_identical_to_the_authors_model(seed, alpha):
    torch.manual_seed(seed)
    ours = models.build_model("resnet18", 7, "random", "boostlu", alpha).train()
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(ours.backbone.state_dict())  # strict: the trunk keeps torchvision's names
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
    conv = torch.nn.Conv2d(512, 7, 1)
    conv.load_state_dict(ours.head.conv.state_dict())
    trunk.train()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    got = ours(images)
    ref = authors_boostlu_forward(trunk, conv, alpha, images)
    assert got.shape == (3, 7) and torch.equal(got, ref)
    got.sum().backward()
    ref.sum().backward()
    assert torch.equal(ours.head.conv.weight.grad, conv.weight.grad)
    assert torch.equal(ours.backbone.conv1.weight.grad, trunk[0].weight.grad)
    if alpha != 1.0:  # the boost changes the logits wherever a CAM value is positive
        plain = authors_boostlu_forward(trunk, conv, 1.0, images)
        assert not torch.allclose(plain, ref)


def test_cam_head_equals_the_linear_head_up_to_float_rounding():
    """With the same seed both heads draw the same weights (a 1x1 Conv2d and a Linear take the same numbers from
    the generator), and averaging commutes with the 1x1 convolution: the logits agree to float rounding."""
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        linear = models.build_model("resnet18", 5, "random").eval()
        torch.manual_seed(seed)
        cam = models.build_model("resnet18", 5, "random", "cam").eval()
        assert torch.equal(cam.head.conv.weight.flatten(1), linear.head.weight)
        assert torch.equal(cam.head.conv.bias, linear.head.bias)
        assert linear.backbone.state_dict().keys() == cam.backbone.state_dict().keys()  # same names: --weights best.pt
        images = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            a, b = linear(images), cam(images)
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item())
        assert a.abs().max() > 0.1


def test_cam_heads_load_torchvision_weights_and_best_pt_both_ways(tmp_path):
    """--weights with a CAM head: a torchvision state dict fills the trunk; a BoostLU run's best.pt gives its
    backbone to a linear run and the reverse (the trunk keeps torchvision's parameter names)."""
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pt")
    boost = models.build_model("resnet18", 4, str(tmp_path / "resnet18.pt"), "boostlu", 5.0)
    assert len(boost.backbone.state_dict()) == len(state) - 2  # all but fc.weight, fc.bias
    assert all(torch.equal(v, state[k]) for k, v in boost.backbone.state_dict().items())
    torch.save({"model": boost.state_dict()}, tmp_path / "best.pt")
    linear = models.build_model("resnet18", 4, str(tmp_path / "best.pt"))
    assert all(torch.equal(v, state[k]) for k, v in linear.backbone.state_dict().items())
    torch.save({"model": linear.state_dict()}, tmp_path / "best_linear.pt")
    again = models.build_model("resnet18", 4, str(tmp_path / "best_linear.pt"), "cam")
    assert all(torch.equal(v, state[k]) for k, v in again.backbone.state_dict().items())


def test_linear_head_is_the_model_of_before():
    """--head linear (the default) builds what build_model built before heads existed: torchvision's model with its
    classifier replaced by Identity, then one Linear drawn after it, from the same generator."""
    torch.manual_seed(3)
    ours = models.build_model("resnet18", 6, "random")
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18()
    resnet.fc = torch.nn.Identity()
    head = torch.nn.Linear(512, 6)
    assert all(torch.equal(v, ours.backbone.state_dict()[k]) for k, v in resnet.state_dict().items())
    assert torch.equal(ours.head.weight, head.weight) and torch.equal(ours.head.bias, head.bias)
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours.eval()(images), head(resnet.eval()(images)))


def test_boostlu_defaults_are_the_authors_for_every_dataset():
    # youngwk/BridgeGapExplanationPAMC config.py: `_LOOKUP['delta_rel']` = {'LL-R': 0.5, 'LL-Ct': 0.2, 'LL-Cp': 0.1}
    # (percent, one value per scheme for every dataset) and `--alpha` default 5 (also the README's command).
    for dataset in ("pascal", "coco", "nuswide", "cub"):
        for loss, rate in (("ll_r", 0.5), ("ll_ct", 0.2), ("ll_cp", 0.1)):
            cfg = config.build_config(dataset, loss=loss, head="boostlu")
            assert (cfg.delta_rel, cfg.boost_alpha) == (rate, 5.0)
            # the linear head keeps Kim et al. 2022's per-dataset rates
            assert config.build_config(dataset, loss=loss).delta_rel == config.LL_DELTA_REL[dataset][loss]
        assert config.build_config(dataset, loss="ll_r", head="boostlu", delta_rel=0.3).delta_rel == 0.3


@pytest.mark.parametrize("args, words", [
    (["--head", "boostlu", "--features", "resnet18_random_16"], ["--head boostlu", "--features"]),
    (["--head", "cam", "-l", "role_li"], ["role_li", "--head cam"]),
    (["--head", "boostlu", "--boost-alpha", "0"], ["--boost-alpha"]),
    (["--head", "boostlu", "--boost-alpha", "nan"], ["--boost-alpha"]),
])
def test_head_options_are_checked_with_one_line(args, words, capsys):
    assert main.main(["-d", "demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words)


def test_a_cam_head_needs_a_feature_map_backbone():
    with pytest.raises(ValueError, match="--head cam/boostlu .* --arch mobilenet_v2"):
        models.build_model("mobilenet_v2", 4, "random", "cam")
    models.build_model("regnet_x_400mf", 4, "random", "boostlu", 5.0)  # RegNets qualify, like ResNets


def test_boost_alpha_without_boostlu_is_reported_as_unused():
    cfg = config.build_config("demo", head="cam")
    assert cfg.unused_settings({"boost_alpha"}) == ["boost_alpha"]
    assert config.build_config("demo", head="boostlu").unused_settings({"boost_alpha"}) == []


# ----------------------------------------------------------------------------------------------------------------
# end to end, and the report

def _finished(results_dir) -> dict:
    (run_dir,) = [p for p in results_dir.iterdir() if p.is_dir()]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and (run_dir / "best.pt").is_file()
    return res


@pytest.mark.parametrize("loss", ["ll_r", "ll_cp"])
def test_boostlu_runs_end_to_end_on_the_real_birds(bird_root, tmp_path, loss):
    assert main.main(["-d", "pascal", "-l", loss, "--head", "boostlu", "-g", "cpu", "--data-root", str(bird_root),
                      "--results-dir", str(tmp_path), "--num-workers", "0", "--arch", "resnet18", "--weights",
                      "random", "--image-size", "32", "--epochs", "3", "--batch-size", "16"]) == 0
    res = _finished(tmp_path)
    assert (res["config"]["head"], res["config"]["boost_alpha"]) == ("boostlu", 5.0)
    assert res["loss_hyperparameters"] == {"delta_rel": {"ll_r": 0.5, "ll_cp": 0.1}[loss]}
    assert len(res["test_per_class_ap"]) == 20 and np.isfinite(res["test_map"])
    state = torch.load(next(tmp_path.iterdir()) / "best.pt", weights_only=False)
    assert state["model"]["head.conv.weight"].shape == (20, 512, 1, 1)


@pytest.mark.parametrize("args", [["-l", "ll_r", "--head", "boostlu"], ["-l", "gr"], ["-l", "gr", "--head", "cam"]])
def test_new_rows_run_on_the_demo(small_demo, tmp_path, args):
    assert main.main(["-d", "demo", *args, "-g", "cpu", "--data-root", str(small_demo), "--results-dir",
                      str(tmp_path), "--image-size", "16", "--epochs", "3", "--batch-size", "16"]) == 0
    res = _finished(tmp_path)
    assert all(np.isfinite(r["train"]["loss"]) for r in res["epochs"].values())


def test_report_knows_the_reported_numbers():
    # BoostLU: Kim et al., CVPR 2023, Table 1 (VOC / COCO / NUS / CUB); GR-Loss: Chen et al., IJCAI 2024
    assert {k: tuple(v[0] for v in PAPER_VALUES[k].values()) for k in
            ("ll_r+boostlu", "ll_ct+boostlu", "ll_cp+boostlu", "gr")} == {
        "ll_r+boostlu": (89.29, 72.89, 49.59, 19.80), "ll_ct+boostlu": (88.61, 71.78, 48.37, 19.25),
        "ll_cp+boostlu": (87.81, 71.41, 48.61, 19.34), "gr": (89.83, 73.17, 49.08, 21.64)}
    assert "BoostLU" in PAPER_METHODS["ll_r+boostlu"] and "GR" in PAPER_METHODS["gr"]


def test_sweep_tells_a_boostlu_run_from_a_linear_one(tmp_path, capsys):
    """A finished -l ll_r run with the linear head is not the BoostLU row's run, nor the reverse (head and the
    BoostLU delta_rel are in results.json's config); a finished gr run is done."""
    import sweep
    from test_sweep import fake_run, recorded_config
    res = tmp_path / "res"
    same = dict(gpu="cpu", results_dir=str(res))
    fake_run(res, "pascal_ll_r_s0_linear", recorded_config("pascal", "ll_r", 0, **same), "finished")
    boost = fake_run(res, "pascal_ll_ct_s0_boost", recorded_config("pascal", "ll_ct", 0, head="boostlu", **same),
                     "finished")
    assert sweep.main(["--print", "-d", "pascal", "-l", "ll_r", "ll_ct", "-s", "0", "--results-dir", str(res),
                       "--", "-g", "cpu", "--head", "boostlu"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"python main.py -d pascal -l ll_r -s 0 -g cpu --head boostlu --results-dir {res}"]
    assert f"-d pascal -l ll_ct -s 0: done: {boost}" in err
    assert sweep.main(["--print", "-d", "pascal", "-l", "ll_ct", "-s", "0", "--results-dir", str(res),
                       "--", "-g", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"python main.py -d pascal -l ll_ct -s 0 -g cpu --results-dir {res}"]


def test_report_paper_compares_each_row_with_its_own_source(tmp_path, capsys):
    """An ll_r run with --head boostlu is compared with BoostLU's LL-R number, a linear one with Kim et al. 2022's."""
    from test_report import md_rows, run_report, write_run
    write_run(tmp_path, "pascal", "ll_r", 0, 89.0)
    write_run(tmp_path, "pascal", "ll_r", 0, 90.0, stamp="20240101-000001", head="boostlu")
    write_run(tmp_path, "pascal", "gr", 0, 88.83)
    code, out, _ = run_report(capsys, tmp_path, "--paper")
    assert code == 0
    rows = md_rows(out)
    assert rows["ll_r"] == ["LL-R (Kim et al. 2022)", "89.00 (1)", "89.2", "-0.20"]
    assert rows["ll_r (delta_rel=0.5, head=boostlu)"] == ["BoostLU + LL-R (Kim et al. 2023)", "90.00 (1)", "89.29",
                                                          "+0.71"]
    assert rows["gr"] == ["GR-Loss (Chen et al. 2024)", "88.83 (1)", "89.83", "-1.00"]
