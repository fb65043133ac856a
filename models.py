"""The classifier: a torchvision backbone without its last linear layer, then Linear(feat_dim, C).

With arch="resnet50" this is the original's model: ResNet-50 trunk -> global average pooling -> 2048-d ->
Linear(2048, C) with bias, fine-tuned end to end. Any torchvision classification model works the same way
(resnet18, mobilenet_v2, ...), which the tests and CPU runs use.
"""
from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit; the message says what to do."""


class MultilabelClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)

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
    try:
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError) as exc:
        raise WeightsError(f"torchvision has no IMAGENET1K_V1 weights for {arch!r}; pass --weights PATH "
                           f"or --weights random") from exc
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, ConnectionError) as exc:
        raise WeightsError(
            f"could not download the ImageNet weights of {arch} ({exc}).\n"
            f"  Connect to the internet and rerun (torchvision caches the file), or download\n"
            f"    {weights.url}\n  to\n    {cache}\n"
            f"  or pass --weights PATH to a local state dict. Use --weights random only if you mean it.") from exc


def build_model(arch: str, num_classes: int, weights: str = "imagenet") -> MultilabelClassifier:
    """`weights`: "imagenet" (torchvision IMAGENET1K_V1), "random", or the path of a torchvision-format state dict
    (or of a best.pt of this project, whose backbone is used).

    Never falls back silently: a weights source that fails raises WeightsError.
    """
    try:
        backbone = torchvision.models.get_model(arch, weights=None)
    except ValueError as exc:
        raise ValueError(f"unknown --arch {arch!r}; use a torchvision classification model such as resnet50, "
                         f"resnet18 or mobilenet_v2") from exc
    if weights == "imagenet":
        state = _imagenet_state_dict(arch)
    elif weights == "random":
        state = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file (expected 'imagenet', 'random' or a state dict path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            # one of our checkpoints (best.pt): start from its backbone, with a fresh head
            state = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"--weights {weights}: expected a state dict of tensors for {arch} "
                               f"(torchvision's keys) or a best.pt checkpoint of this project")

    classifier_name, feat_dim = _strip_last_linear(backbone)
    if state is not None:
        # the ImageNet classifier is replaced by our head, so its weights are not needed
        state = {k: v for k, v in state.items() if not k.startswith(classifier_name + ".")}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"weights {weights!r} do not fit torchvision's {arch}: {exc}") from exc
    return MultilabelClassifier(backbone, feat_dim, num_classes)
