"""A small shape-and-colour CNN for the procedural images (two heads), used to score generations.

The shape head has one extra class, "none", trained on blank (background-only, noisy) images, so
that an empty generation is never counted as a shape. Weights ship as safetensors plus a JSON
config in fmn/assets/toy/classifier; `fmn.toy.load_classifier()` loads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fmn.toy.data import COLORS, SHAPES

SHAPE_CLASSES = SHAPES + ("none",)
NONE = len(SHAPES)


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ShapeColorClassifier(nn.Module):
    def __init__(self, width: int = 32, image_size: int = 32):
        super().__init__()
        self.config = {"width": width, "image_size": image_size, "shapes": list(SHAPE_CLASSES),
                       "colors": list(COLORS)}
        self.features = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                      _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape_head = nn.Linear(4 * width, len(SHAPE_CLASSES))
        self.color_head = nn.Linear(4 * width, len(COLORS))

    def forward(self, x: torch.Tensor):
        """x: (N, 3, H, W) in [-1, 1] -> (shape logits (N, 6), colour logits (N, 5))."""
        s = self.config["image_size"]
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(x)
        return self.shape_head(h), self.color_head(h)

    @torch.no_grad()
    def classify(self, images, batch_size: int = 256) -> dict:
        """Classify images: a tensor (N,3,H,W) in [-1,1], a list of PIL images, or uint8 (N,H,W,3).

        Returns dict(shape=LongTensor (N,), color=LongTensor (N,), shape_prob, color_prob) where
        shape indexes SHAPE_CLASSES ("none" = 5) and color indexes COLORS.
        """
        x = to_model_input(images)
        out = {"shape": [], "color": [], "shape_prob": [], "color_prob": []}
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        for i in range(0, len(x), batch_size):
            ls, lc = self(x[i:i + batch_size].to(p.device, p.dtype))
            ps, pc = ls.float().softmax(-1), lc.float().softmax(-1)
            out["shape"].append(ps.argmax(-1).cpu())
            out["color"].append(pc.argmax(-1).cpu())
            out["shape_prob"].append(ps.cpu())
            out["color_prob"].append(pc.cpu())
        self.train(was_training)
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def to_model_input(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        return x
    if isinstance(images, np.ndarray):
        arr = images if images.ndim == 4 else images[None]
    else:  # list of PIL images or arrays
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def default_classifier_path() -> str:
    from importlib import resources
    return str(resources.files("fmn") / "assets" / "toy" / "classifier")


def save_classifier(model: ShapeColorClassifier, folder, extra: dict | None = None) -> None:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**model.config, **(extra or {})}, indent=1))


def load_classifier(path: str | None = None, device: str | torch.device = "cpu") -> ShapeColorClassifier:
    """The shipped shape-and-colour classifier (eval mode, fp32)."""
    from safetensors.torch import load_file
    folder = Path(path or default_classifier_path())
    cfg = json.loads((folder / "config.json").read_text())
    model = ShapeColorClassifier(width=cfg["width"], image_size=cfg["image_size"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()
