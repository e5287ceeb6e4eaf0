"""Helpers shared by the toy models' training scripts (train_toy_model.py, train_toy_mmdit.py)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fmn.toy import data


def log(t0, msg):
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def cosine_lr(step, total, base, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay from base to 0.1 * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_pool(seed, n):
    """n balanced images (shape i % 5, colour (i // 5) % 5) in [-1, 1], with their labels."""
    samples = [data.make_sample(seed, i, shape=i % 5, color=(i // 5) % 5) for i in range(n)]
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor([s.shape for s in samples]), torch.tensor([s.color for s in samples])


@torch.no_grad()
def encode_pool(vae, x, bs=256):
    """The VAE posterior's means and standard deviations of images x, in batches of bs."""
    means, stds = [], []
    for i in range(0, len(x), bs):
        d = vae.encode(x[i:i + bs]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tok, captions):
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def name_fp32_in_config(cfg_path):
    """transformers loads weights in their stored dtype unless the config names one: name fp32, so
    that a plain from_pretrained(path) of an fp16-stored text encoder gives fp32 weights."""
    cfg_path = Path(cfg_path)
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
