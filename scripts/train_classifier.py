#!/usr/bin/env python
"""Train the shape-and-colour classifier that scores the toy model's images (fmn/assets/toy/classifier).

A small CNN with two heads (shape incl. "none", colour) on procedural images from fmn.toy.data,
with blur, noise and small brightness jitter so that it also reads slightly imperfect generated
images; 8% of each batch is blank background (label "none"). Reports accuracy on a held-out set
drawn with another seed. About 2-4 minutes on 2 CPU cores.

    .venv/bin/python scripts/train_classifier.py
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fmn.toy import data  # noqa: E402
from fmn.toy.classifier import NONE, ShapeColorClassifier, save_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pool(seed: int, n: int):
    imgs = [data.make_sample(seed, i, shape=i % 5, color=(i // 5) % 5) for i in range(n)]
    x = torch.from_numpy(np.stack([s.image for s in imgs])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor([s.shape for s in imgs]), torch.tensor([s.color for s in imgs])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # Gaussian blur with a random sigma in [0, 1] per image (3x3 separable kernel)
    sigma = torch.rand(n, generator=gen) * 1.0 + 1e-3
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    kx = k[:, None, None, None, :]  # (n,1,1,1,3)
    h = sum(kx[..., j] * xp[:, :, :, j:j + x.shape[-1]] for j in range(3))
    x = sum(kx[..., j] * h[:, :, j:j + x.shape[-2], :] for j in range(3))
    # brightness / contrast jitter, then pixel noise
    x = x * (1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2) + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.15
    return x.clamp(-1.2, 1.2)


def blanks(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.ones(n, 3, 32, 32) + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.1


@torch.no_grad()
def accuracy(model, x, s, c):
    model.eval()
    ps, pc = [], []
    for i in range(0, len(x), 500):
        ls, lc = model(x[i:i + 500])
        ps.append(ls.argmax(-1))
        pc.append(lc.argmax(-1))
    ps, pc = torch.cat(ps), torch.cat(pc)
    model.train()
    return (ps == s).float().mean().item(), (pc == c).float().mean().item(), ((ps == s) & (pc == c)).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "fmn" / "assets" / "toy" / "classifier"))
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=15000)
    ap.add_argument("--n-test", type=int, default=2500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, s, c = pool(args.seed, args.n_train)
    xt, st, ct = pool(args.seed + 1, args.n_test)
    print(f"[{time.time() - t0:6.1f}s] data ready", flush=True)
    model = ShapeColorClassifier(width=args.width)
    steps = args.epochs * (args.n_train // args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    n_blank = max(1, args.batch * 8 // 100)
    for step in range(steps):
        idx = torch.randint(0, len(x), (args.batch - n_blank,), generator=gen)
        xb = torch.cat([x[idx], blanks(n_blank, gen)])
        sb = torch.cat([s[idx], torch.full((n_blank,), NONE)])
        cb = torch.cat([c[idx], torch.full((n_blank,), -100)])
        ls, lc = model(augment(xb, gen))
        loss = F.cross_entropy(ls, sb) + F.cross_entropy(lc, cb, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[{time.time() - t0:6.1f}s] step {step:4d}/{steps} loss {loss.item():.4f}", flush=True)
    acc_s, acc_c, acc_both = accuracy(model, xt, st, ct)
    gen_t = torch.Generator().manual_seed(args.seed + 2)
    acc_s_aug, acc_c_aug, _ = accuracy(model, augment(xt, gen_t), st, ct)
    blank_ok = (model.eval()(blanks(200, gen_t))[0].argmax(-1) == NONE).float().mean().item()
    secs = time.time() - t0
    info = {"heldout_shape_acc": acc_s, "heldout_color_acc": acc_c, "heldout_both_acc": acc_both,
            "heldout_aug_shape_acc": acc_s_aug, "heldout_aug_color_acc": acc_c_aug, "blank_as_none": blank_ok,
            "n_test": args.n_test, "train_seconds": round(secs, 1), "seed": args.seed, "epochs": args.epochs,
            "n_train": args.n_train, "params": sum(p.numel() for p in model.parameters())}
    save_classifier(model, args.out, {"metrics": info})
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
