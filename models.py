"""The classifier: a torchvision backbone without its last linear layer, then Linear(feat_dim, C).

With arch="resnet50" this is the original's model: ResNet-50 trunk -> global average pooling -> 2048-d ->
Linear(2048, C) with bias, fine-tuned end to end. Any torchvision classification model works the same way
(resnet18, mobilenet_v2, ...), which the tests and CPU runs use.

`head` (--head) chooses the classifier: "linear" (the above, the default), or a class activation map head
(`CAMHead`: "cam", and "boostlu", Kim et al. 2023's BoostLU), which needs the backbone's last feature map.
"""
from __future__ import annotations

import copy
import urllib.error
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
# torchvision is imported inside the functions that use it: importing it takes ~2 s, which a linear probe on
# cached features (main.py --features) never needs.


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit; the message says what to do."""


# --head: the classifier on the backbone. "linear": global average pooling, then Linear (the original's);
# "cam" and "boostlu": a 1x1 convolution over the last feature map (CAMHead), without and with BoostLU's boost.
HEADS = ("linear", "cam", "boostlu")


class CAMHead(nn.Module):
    """Logits as the global average of a class activation map: CAM = Conv1x1(feature map) (weight and bias),
    positive CAM values multiplied by `alpha`, then averaged over the map, in training and evaluation alike:
        logit_c = mean_{h,w} [ CAM_c,h,w * (alpha if CAM_c,h,w > 0 else 1) ].
    alpha = 1 ("cam") is the linear head computed in another order (pooling commutes with the 1x1 convolution),
    equal up to float rounding; alpha > 1 is BoostLU ("boostlu", default alpha 5).
    Source: Kim et al., CVPR 2023, "Bridging the Gap between Model Explanations in Partially Annotated
    Multi-label Classification" (youngwk/BridgeGapExplanationPAMC, models.py `ImageClassifier`: Conv2d(feat_dim, C,
    1), `torch.where(CAM > 0, CAM * alpha, CAM)`, `adaptive_avg_pool2d(CAM, 1)`). A Conv2d(D, C, 1) is initialised
    from the same random numbers as a Linear(D, C), so both heads start from the same weights under one seed."""

    def __init__(self, feat_dim: int, num_classes: int, alpha: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(feat_dim, num_classes, 1)
        self.alpha = alpha

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        cam = self.conv(feature_map)
        cam = torch.where(cam > 0, cam * self.alpha, cam)  # x 1 is exact: "cam" runs the same code
        return F.adaptive_avg_pool2d(cam, 1).squeeze(-1).squeeze(-1)


class MultilabelClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, head: str = "linear",
                 boost_alpha: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes) if head == "linear" else CAMHead(feat_dim, num_classes, boost_alpha)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torchvision's forward flattens the pooled map, so a batch of one keeps its batch dimension.
        return self.head(self.backbone(images))


def _strip_last_linear(model: nn.Module) -> tuple[str, int]:
    """Replace the model's last nn.Linear (its ImageNet classifier) by Identity; return its name and in_features."""
    name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name, last = module_name, module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return name, last.in_features


def _imagenet_state_dict(arch: str) -> dict:
    """torchvision's IMAGENET1K_V1 weights (the original's `pretrained=True`), via torchvision's download cache."""
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError) as exc:
        raise WeightsError(f"torchvision has no IMAGENET1K_V1 weights for {arch!r}; pass --weights PATH "
                           f"or --weights random") from exc
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    was_cached = cache.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError) as exc:
        raise WeightsError(
            f"could not download the ImageNet weights of {arch} ({exc}): connect to the internet and rerun "
            f"(torchvision caches the file), or download {weights.url} to {cache}, or pass --weights PATH to a "
            f"local state dict (--weights random only if you mean it)") from exc
    except Exception as exc:  # a damaged cached file fails in torch.load with many exception types
        if was_cached:
            raise WeightsError(f"the cached ImageNet weights {cache} are damaged ({type(exc).__name__}); "
                               f"delete that file and run again to download it afresh") from exc
        if isinstance(exc, OSError):
            raise WeightsError(f"could not save the ImageNet weights of {arch} to {cache} ({exc}); "
                               f"free space there or set TORCH_HOME to a writable folder") from exc
        raise


def _load_state_dict_file(path: Path) -> dict:
    """A state dict from `path` (torchvision's keys), or the backbone of one of our checkpoints (best.pt)."""
    expected = (f"--weights {path}: expected a PyTorch state dict of tensors saved with torch.save "
                f"(torchvision's keys) or a best.pt of this project")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # text, empty, .npy or pickled-model files fail with many exception types
        with open(path, "rb") as f:
            head = f.read(8)
        if not head:
            reason = "the file is empty"
        elif head.startswith(b"\x93NUMPY"):
            reason = "it is a NumPy .npy file"
        elif "Unsupported global" in str(exc):
            reason = "it holds a pickled model object: save model.state_dict() instead"
        else:
            reason = f"not a file written by torch.save: {type(exc).__name__}"
        raise WeightsError(f"{expected}; cannot read it ({reason})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        # one of our checkpoints (best.pt): start from its backbone, with a fresh head
        state = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{expected}; found {type(state).__name__} instead")
    return state


def _backbone(arch: str) -> nn.Module:
    """torchvision's `arch` with random weights; only image classification models (their last Linear is the
    ImageNet classifier), and never a pretrained sub-network (segmentation/detection builders default to one)."""
    import torchvision
    classifiers = torchvision.models.list_models(module=torchvision.models)
    if arch not in classifiers:
        raise ValueError(f"--arch {arch!r} is not a torchvision image classification model; use one of "
                         f"resnet50, resnet18, mobilenet_v2, ... (torchvision.models.list_models())")
    if arch in _AUX_HEADS:  # training-mode auxiliary classifiers would change the output type: leave them out
        return torchvision.models.get_model(arch, weights=None, aux_logits=False, init_weights=True)
    return torchvision.models.get_model(arch, weights=None)


# Models whose builders add auxiliary ImageNet classifiers (their pretrained tensors are dropped with them).
_AUX_HEADS = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}


def _feature_map_trunk(model: nn.Module, arch: str) -> nn.Sequential:
    """The layers of `model` (its classifier stripped) before its global average pooling, as one Sequential that
    keeps their names (so the state dict's keys are the linear head's): the source's
    `Sequential(*list(resnet50.children())[:-2])`. Only models whose forward runs their children in order and
    ends in AdaptiveAvgPool2d -> flatten -> classifier qualify: torchvision's ResNet family and RegNets."""
    import torchvision
    children = list(model.named_children())
    if not (isinstance(model, (torchvision.models.ResNet, torchvision.models.RegNet))
            and isinstance(children[-2][1], nn.AdaptiveAvgPool2d) and isinstance(children[-1][1], nn.Identity)):
        raise ValueError(f"--head cam/boostlu needs the backbone's last feature map, which this project takes from "
                         f"ResNet-style models (resnet*, resnext*, wide_resnet*, regnet*); --arch {arch} is not one: "
                         f"choose one of those or --head linear")
    return nn.Sequential(OrderedDict(children[:-2]))


def build_model(arch: str, num_classes: int, weights: str = "imagenet", head: str = "linear",
                boost_alpha: float = 1.0) -> MultilabelClassifier:
    """`weights`: "imagenet" (torchvision IMAGENET1K_V1), "random", or the path of a torchvision-format state dict
    (or of a best.pt of this project, whose backbone is used). `head`: one of HEADS; `boost_alpha` is the CAM
    head's factor on positive CAM values (1 for "cam").

    Never falls back silently: a weights source that fails raises WeightsError.
    """
    if head not in HEADS:
        raise ValueError(f"--head must be one of {list(HEADS)}, got {head!r}")
    backbone = _backbone(arch)
    classifier_name, feat_dim = _strip_last_linear(backbone)
    if head != "linear":  # (before any download: an --arch without a feature map fails at once)
        backbone = _feature_map_trunk(backbone, arch)
    if weights == "imagenet":
        state = _imagenet_state_dict(arch)
    elif weights == "random":
        state = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file (expected 'imagenet', 'random' or a state dict path)")
        state = _load_state_dict_file(path)

    if state is not None:
        # the ImageNet classifier is replaced by our head, so its weights are not needed
        unused = (classifier_name + ".", *_AUX_HEADS.get(arch, ()))
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise WeightsError(f"--weights {weights}: the tensors do not fit torchvision's {arch} ({first}); "
                               f"pass weights saved from {arch}, or choose the matching --arch") from exc
    return MultilabelClassifier(backbone, feat_dim, num_classes, head, boost_alpha)


def check_model_runs(model: nn.Module, arch: str, image_size: int, device: torch.device,
                     last_batch_size: int) -> None:
    """Fail before training, with what to change, if `arch` cannot train on `image_size` px inputs (inception_v3
    at 80 px, ViTs at any size but their own, ...) or if the last training batch of `last_batch_size` images
    cannot train (BatchNorm needs more than one value per channel). Runs a copy of the model, under a forked
    random state, so the run itself is unchanged."""
    import torchvision
    probe = copy.deepcopy(model).train()
    devices = [device] if device.type == "cuda" else []
    sizes = [2] + ([1] if last_batch_size == 1 else [])
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for batch in sizes:
            try:
                probe(torch.zeros(batch, 3, image_size, image_size, device=device))
            except torch.OutOfMemoryError as exc:  # not a shape problem: the GPU is full (or shared)
                raise ValueError(f"the GPU ran out of memory on a batch of {batch} images of {arch} at --image-size "
                                 f"{image_size}: free the GPU (other processes?) or choose a smaller --image-size "
                                 f"or --arch") from exc
            except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if batch == 1:
                    raise ValueError(
                        f"the last training batch holds a single image and {arch}'s BatchNorm cannot train on it "
                        f"at --image-size {image_size} ({first}); choose a --batch-size that does not leave one "
                        f"image over, or a larger --image-size") from exc
                try:
                    height, width = torchvision.models.get_model_weights(arch).DEFAULT.meta["min_size"]
                    trained_at = f" (torchvision gives {height}x{width} px as its minimum input)"
                except (ValueError, AttributeError, KeyError):
                    trained_at = ""
                raise ValueError(f"--arch {arch} cannot train on --image-size {image_size} images ({first})"
                                 f"{trained_at}; choose a larger --image-size or another --arch") from exc
