#!/usr/bin/env python
"""Linear probe of a BEiT-3's frozen image features on an ImageNet-style folder: how good are the features?

The features are the mean of the final patch tokens (the image-classification head's pooling); a logistic
regression is trained on the training split's features and scored on the validation split. With
`--random_init` the same architecture is probed with random weights: the gap to a pretrained model measures what
pretraining taught.

    python examples/pretraining/linear_probe.py --model_name_or_path beit3-mim --data_dir imagenet
    python examples/pretraining/linear_probe.py --model_name_or_path beit3-mim --random_init --data_dir imagenet
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from transformers import AutoConfig, AutoModel

import beit3_hf  # noqa: F401  (registers the BEiT-3 classes with the Auto classes)
from beit3_hf.data.loaders import load_imagefolder, open_image


@torch.no_grad()
def image_features(model: torch.nn.Module, rows, image_size: int, batch_size: int = 64) -> torch.Tensor:
    """(num_images, hidden) mean final patch token of every image of `rows` (a `datasets` split)."""
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    features = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]["image"]
        pixel_values = torch.stack([transform(open_image(image)) for image in batch])
        hidden = model(pixel_values=pixel_values).last_hidden_state  # (batch, 1 + patches, hidden)
        features.append(hidden[:, 1:].mean(dim=1))
    return torch.cat(features)


def fit_logistic_regression(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, steps: int = 500, weight_decay: float = 1e-4
) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features, trained full-batch with L-BFGS."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def linear_probe_accuracy(model: torch.nn.Module, data_dir: str, image_size: int) -> dict[str, float]:
    data = load_imagefolder(data_dir, decode_images=False)
    train, validation = data.dataset["train"], data.dataset["validation"]
    train_x, val_x = image_features(model, train, image_size), image_features(model, validation, image_size)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    train_y, val_y = torch.tensor(train["label"]), torch.tensor(validation["label"])
    probe = fit_logistic_regression(train_x, train_y, len(data.class_names))
    with torch.no_grad():
        return {
            "train_accuracy": (probe(train_x).argmax(-1) == train_y).float().mean().item(),
            "eval_accuracy": (probe(val_x).argmax(-1) == val_y).float().mean().item(),
            "num_classes": len(data.class_names),
        }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="a BEiT-3 folder (any task) or Hub id")
    parser.add_argument("--data_dir", required=True, help="an ImageNet-style folder with train/ and val/")
    parser.add_argument("--random_init", action="store_true", help="probe the same architecture, randomly initialised")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--output_file", help="also write the accuracies to this JSON file")
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    config.vision_only = True
    if args.random_init:
        torch.manual_seed(args.seed)
        model = AutoModel.from_config(config)
    else:
        model = AutoModel.from_pretrained(args.model_name_or_path, config=config)
    model = getattr(model, "beit3", model).eval()  # the backbone of any head
    result = linear_probe_accuracy(model, args.data_dir, config.image_size)
    print(json.dumps(result))
    if args.output_file:
        with open(args.output_file, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
