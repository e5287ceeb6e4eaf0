#!/usr/bin/env python
"""Train fmn's built-in toy text-to-image model from scratch on the procedural shapes data set.

Same classes as Stable Diffusion 1.x (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention, DDPM/DDIM schedulers), so everything that runs on SD
runs on it. Two stages, both on the CPU, both reproducible from --seed:
  1. VAE: reconstruction (L1 + MSE) with a small KL term on 32 px images -> 4 x 16 x 16 latents;
     the latent scaling factor is set to 1 / std of the training latents (as SD does).
  2. Text encoder + UNet jointly, epsilon prediction on the VAE latents, 10% empty captions
     (classifier-free guidance), AdamW with warm-up and cosine decay.
Known limit: the text encoder is trained jointly with the UNet, and it writes the whole prompt
into the ~72 end-of-text/padding slots, from which the UNet then reads shape and colour; its word
slots are ignored (fmn.toy.slot_control: word 0.00, end 1.00). SD 1.x/2.x keep CLIP frozen and
read their words (Toker et al. 2025, "Padding Tone"), so token-level forgetting is less specific
here than the method's premise assumes. Tried and failed at this budget (1400 steps, 16 text
slots, a 588-token vocabulary): training the UNet on the empty prompt's end slots, with a loss
pulling the encoder's end slots to them (the encoder collapses every token to one output, whether
that loss starts at step 0 or late), or on another caption's end slots (no text conditioning
learnt: shape accuracy 0.22, chance 0.20); the first variant's code is in commit aa573b6.
The pipeline is saved with safe_serialization into fmn/assets/toy/pipeline (weights stored in fp16
unless --fp32; fmn.toy.load_default_pipeline loads them in fp32).

    .venv/bin/python scripts/train_toy_model.py            # ~15-25 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

# Spinning OpenMP workers slow training badly on a shared 2-core machine; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmn.tokenizer import clip_tokenizer
from fmn.toy import data
from fmn.toy import model as M

ROOT = Path(__file__).resolve().parents[1]


def log(t0, msg):
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def cosine_lr(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_pool(seed, n):
    imgs, shapes, colors = [], [], []
    for i in range(n):
        s = data.make_sample(seed, i, shape=i % 5, color=(i // 5) % 5)
        imgs.append(s.image)
        shapes.append(s.shape)
        colors.append(s.color)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor(shapes), torch.tensor(colors)


def train_vae(args, t0, gen):
    torch.manual_seed(args.seed)
    vae = M.build_vae()
    x, _, _ = make_pool(args.seed + 1, args.vae_pool)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, 50)
        idx = torch.randint(0, len(x), (args.vae_batch,), generator=gen)
        xb = x[idx]
        dist = vae.encode(xb).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(t0, f"vae step {step:5d} loss {loss.item():.4f} mse {F.mse_loss(rec, xb).item():.5f} kl/dim {kl.item():.3f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_pool(vae, x, bs=256):
    means, stds = [], []
    for i in range(0, len(x), bs):
        d = vae.encode(x[i:i + bs]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "fmn" / "assets" / "toy" / "pipeline"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-pool", type=int, default=4000)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--pool", type=int, default=16000)
    ap.add_argument("--channels", type=int, nargs=2, default=(64, 128))
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: off)")
    ap.add_argument("--vae-from", default=None, help="reuse the VAE of a pipeline folder trained with the same seed")
    ap.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    tok = clip_tokenizer(pad_token="<|endoftext|>")

    if args.vae_from:
        # the VAE of an earlier run with the same --seed and VAE options: stage 1 is deterministic,
        # and stage 2 draws from its own generator, so the result equals a full run
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32).eval()
        vae.register_to_config(scaling_factor=1.0)
        log(t0, f"VAE loaded from {args.vae_from}")
    else:
        vae = train_vae(args, t0, gen)
        if not args.fp32:  # the VAE ships in fp16: train the UNet on the latents of those very weights
            vae = vae.half().float()
    t_vae = time.time() - t0
    gen = torch.Generator().manual_seed(args.seed + 5)

    x, shapes, colors = make_pool(args.seed + 2, args.pool)
    log(t0, f"pool of {len(x)} images made")
    lat_mean, lat_std = encode_pool(vae, x)
    scale = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scale)
    log(t0, f"pool encoded; latent std {lat_mean.std():.3f} -> scaling_factor {scale:.4f}; "
            f"posterior std {lat_std.mean():.4f}")

    # every caption the data set can produce, tokenized once
    cache: dict[str, torch.Tensor] = {}

    def ids_for(caps):
        out = []
        for c in caps:
            if c not in cache:
                cache[c] = tok(c, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids[0]
            out.append(cache[c])
        return torch.stack(out)

    torch.manual_seed(args.seed + 3)
    te = M.build_text_encoder()
    unet = M.build_unet(tuple(args.channels))
    sched = M.build_train_scheduler()
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed + 4)
    n_unet = sum(p.numel() for p in unet.parameters())
    log(t0, f"unet {n_unet / 1e6:.2f} M params, text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f} M")
    ema_loss = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, 100)
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        caps = []
        for i in idx.tolist():
            if rng.random() < args.uncond_prob:
                caps.append("")
            else:
                caps.append(data.caption_for(data.SHAPES[shapes[i]], data.COLORS[colors[i]], rng))
        ids = ids_for(caps)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        emb = te(ids)[0]
        pred = unet(zt, t, emb).sample
        if args.min_snr > 0:
            snr = a.view(-1) / (1 - a.view(-1))
            w = torch.clamp(snr, max=args.min_snr) / snr
            loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(t0, f"unet step {step:5d} loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    t_total = time.time() - t0

    from diffusers import StableDiffusionPipeline
    te.eval()
    unet.eval()
    if not args.fp32:
        vae, te, unet = vae.half(), te.half(), unet.half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=M.build_inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    if not args.fp32:
        # transformers loads weights in their stored dtype unless the config names one: name fp32, so
        # that a plain StableDiffusionPipeline.from_pretrained(path) gives an all-fp32 pipeline
        cfg_path = out / "text_encoder" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info = {"seed": args.seed, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "train_seconds": round(t_total, 1), "vae_seconds": round(t_vae, 1), "threads": args.threads,
            "torch": torch.__version__, "unet_params": n_unet, "size_bytes": size, "final_loss": ema_loss}
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    log(t0, f"saved to {out} ({size / 1e6:.1f} MB); training took {t_total:.0f} s")


if __name__ == "__main__":
    main()
