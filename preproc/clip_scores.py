"""Write CLIP's per-image class scores of a dataset's official train images, the score file of -l EM_PL (VLPL).

    python preproc/clip_scores.py --dataset pascal [--model ViT-L-14-336] [--pretrained openai] [--download]
        [--template "{}"] [--temperature 0.01] [--preprocess vlpl] [--image-size 448] [--data-root data] [-g 0]
    python main.py -d pascal -l EM_PL --pseudo-scores data/pascal/pseudo_scores/clip_ViT-L-14-336_openai.npy

writes an (N, C) float32 .npy, a row per row of formatted_train_*.npy, and a .json beside it saying how it was
made. As Xing et al.'s VLPL (mvrl/VLPL, models.py): score = softmax over the classes of cos(image, text) / T, with
the image and text embeddings of a frozen CLIP (theirs: ViT-L/14 at 336 px, OpenAI's weights, T = 0.01), the text
of each class its name (their *_labelonly text features; --template changes it). --preprocess vlpl (default) feeds
CLIP as they do: the training pipeline's image (resized to --image-size, ImageNet-normalised) resized to CLIP's
input size; they score the randomly flipped view of every batch, this file the unflipped image.

Needs the open-clip-torch package and the weights: a tag is looked up in the local Hugging Face cache only, unless
--download; --pretrained PATH loads a checkpoint file; --pretrained random draws the weights (tests).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preproc.common import one_line  # noqa: E402

VLPL_TEMPERATURE = 0.01  # their -t default


class ClipError(Exception):
    """A missing package, missing weights or a bad option: reported in one line, exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write CLIP image-text scores (softmax over classes) of a dataset's "
                                            "official train images, for main.py -l EM_PL --pseudo-scores.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset folder under --data-root (pascal, coco, ...)")
    p.add_argument("--data-root", default="data", help="folder holding <dataset>/formatted_train_*.npy")
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model name (VLPL: ViT-L/14 at 336 px)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip weights tag (from the local cache unless --download), a checkpoint path, or "
                        "'random' (randomly initialised, drawn with --seed: for tests)")
    p.add_argument("--download", action="store_true", help="let open_clip download the weights of a tag")
    p.add_argument("--template", default="{}", help="text of a class, '{}' standing for its name")
    p.add_argument("--temperature", type=float, default=VLPL_TEMPERATURE, help="softmax temperature T > 0")
    p.add_argument("--preprocess", choices=("vlpl", "openclip"), default="vlpl",
                   help="vlpl: the training pipeline's image (--image-size, ImageNet normalisation) resized to "
                        "CLIP's input, as VLPL; openclip: open_clip's own preprocessing of the file")
    p.add_argument("--image-size", type=int, default=448, help="vlpl: the training pipeline's square size")
    p.add_argument("--clip-image-size", type=int,
                   help="CLIP's input size (default: the model's own; another one resizes its position embedding)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding the images")
    p.add_argument("-g", "--gpu", default="0", help="CUDA device index, or 'cpu'")
    p.add_argument("--seed", type=int, default=0, help="torch seed of --pretrained random")
    p.add_argument("--out", help="output .npy (default: "
                                 "<data-root>/<dataset>/pseudo_scores/clip_<model>_<weights>.npy)")
    return p.parse_args(argv)


def load_clip(model_name: str, pretrained: str, download: bool, clip_image_size: int | None, seed: int):
    """The open_clip model (eval mode), its preprocessing and its tokenizer; ClipError when the package or the
    weights are missing."""
    offline = os.environ.get("HF_HUB_OFFLINE")
    if not download:  # the local cache only (huggingface_hub reads this when open_clip first imports it)
        os.environ["HF_HUB_OFFLINE"] = offline or "1"
    try:
        import open_clip
    except ImportError as exc:
        raise ClipError(f"preproc/clip_scores.py needs the open-clip-torch package ({exc}): "
                        f"pip install open-clip-torch") from exc
    finally:  # the caller's environment as it was
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    import torch
    if model_name not in open_clip.list_models():
        raise ClipError(f"--model {model_name}: not an open_clip model; e.g. ViT-L-14-336, ViT-B-32 "
                        f"(open_clip.list_models() has them all)")
    weights = None if pretrained == "random" else pretrained
    kwargs = {} if clip_image_size is None else {"force_image_size": clip_image_size}
    torch.manual_seed(seed)
    logging.disable(logging.ERROR)  # open_clip logs its failures before raising them
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        how = "give --download to fetch them" if not download and not Path(pretrained).exists() else \
            "check the file / tag"
        raise ClipError(f"--pretrained {pretrained}: cannot load open_clip weights for {model_name} "
                        f"({one_line(exc)[:300]}); {how}, --pretrained PATH for a checkpoint file") from exc
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_scores(model, tokenizer, images, prompts: list[str], temperature: float, device) -> np.ndarray:
    """softmax_c(cos(image embedding, text embedding of class c) / temperature) for every batch of `images`
    (an iterable of dicts with "image", "idx", "error", as datasets.MultilabelDataset's batches), in row order."""
    import torch
    import torch.nn.functional as F
    from datasets import raise_sample_errors
    model = model.to(device)
    with torch.inference_mode():
        text = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
        rows, scores = [], []
        for batch in images:
            raise_sample_errors(batch)
            image = F.normalize(model.encode_image(batch["image"].to(device)).float(), dim=-1)
            scores.append(torch.softmax(image @ text.T / temperature, dim=-1).cpu())
            rows.append(batch["idx"])
    out = np.empty((len(torch.cat(rows)), len(prompts)), dtype=np.float32)
    out[torch.cat(rows).numpy()] = torch.cat(scores).numpy()
    return out


def _image_size(model) -> tuple[int, int]:
    size = model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def write_scores(args: argparse.Namespace) -> Path:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from datasets import MultilabelDataset, class_names, dataset_info, get_transforms, load_formatted
    from fileio import write_atomic
    from main import resolve_device

    if not args.temperature > 0:
        raise ClipError(f"--temperature must be > 0, got {args.temperature}")
    if "{}" not in args.template:
        raise ClipError(f"--template must hold '{{}}' where the class name goes, got {args.template!r}")
    weights = Path(args.pretrained).stem if Path(args.pretrained).is_file() else args.pretrained
    out = Path(args.out or Path(args.data_root) / args.dataset / "pseudo_scores" / f"clip_{args.model}_{weights}.npy")
    record_path = out.with_suffix(".json")
    for path in (out, record_path):
        if path.exists():
            raise ClipError(f"{path} exists and is not overwritten: remove it, or give --out another file")
    train = load_formatted(args.data_root, args.dataset, "train")
    device = resolve_device(args.gpu)
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained, args.download, args.clip_image_size,
                                             args.seed)
    if args.preprocess == "vlpl":  # the training pipeline's tensor, resized to CLIP's input (bilinear, antialiased)
        tfm = transforms.Compose([get_transforms(args.image_size)["val"], transforms.Resize(_image_size(model))])
    else:
        tfm = preprocess
    root = Path(args.data_root) / args.dataset / dataset_info(args.data_root, args.dataset).image_subdir
    images = MultilabelDataset(train["images"], train["labels_obs"], train["labels"], root, tfm)
    names = class_names(args.data_root, args.dataset)
    scores = clip_scores(model, tokenizer, DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers),
                         [args.template.format(name) for name in names], args.temperature, device)
    record = {"what": "CLIP scores: softmax over classes of cos(image, text) / temperature (preproc/clip_scores.py)",
              "dataset": args.dataset, "rows": len(scores), "class_names": names, "model": args.model,
              "pretrained": args.pretrained, "template": args.template, "temperature": args.temperature,
              "preprocess": args.preprocess, "image_size": args.image_size, "clip_image_size": _image_size(model),
              "torch": torch.__version__}

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, scores)
    write_atomic(out, save)
    write_atomic(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from datasets import DataError
    from fileio import OutputError
    try:
        out = write_scores(args)
    except (ClipError, DataError, OutputError, ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"scores: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
