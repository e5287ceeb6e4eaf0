#!/usr/bin/env python
"""Train fmn's built-in toy text-to-image model from scratch on the procedural shapes data set.

Same classes as Stable Diffusion 1.x (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention, DDPM/DDIM schedulers), so everything that runs on SD
runs on it. Two stages, both on the CPU, both reproducible from --seed:
  1. VAE: reconstruction (L1 + MSE) with a small KL term on 32 px images -> 4 x 16 x 16 latents;
     the latent scaling factor is set to 1 / std of the training latents (as SD does).
  2. UNet (and, but in the "words" recipe, the text encoder), epsilon prediction on the VAE latents,
     10% empty captions (classifier-free guidance), min-SNR weighting, AdamW, warm-up + cosine decay.
Recipes (--recipe):
  tokens the shipped model (the default): CLIP's BPE kept for the captions' words (588 tokens), 8
         slots; a CLIPTextModel without attention layers (each slot is layer-norm(token + position
         embedding)) trained with the UNet (64, 128 channels), 1600 steps. Every slot holds its own
         word, so the UNet must read its words, as SD 1.x/2.x's UNet does (slot_control word 1.00 /
         end 0.00), and forgetting a word's column leaves the others: shape 1.00, colour 1.00.
  joint  the model shipped before (reproduced bit for bit): full CLIP vocabulary, 77 slots, a 2-layer
         causal encoder trained with the UNet. It writes the whole prompt into the ~72 end-of-text/
         padding slots and the UNet reads only those (slot_control word 0.00, end 1.00), whereas SD
         keeps CLIP frozen and reads its words (Toker et al. 2025, "Padding Tone"): forgetting on it
         could not be specific (removing "circle" removed the colour of "a red circle" too).
  words  a random frozen 2-layer encoder, standardized, 8 slots, the UNet (32, 64) never shown a
         caption's own end slots: reads its words (word 1.00 / end 0.00) but colours stay weak
         (0.64-0.72, purple 0.0); the tokens recipe at (32, 64) channels and 3600 steps also lost
         blue and purple (colour 0.60), hence 64, 128 channels.
A held-out probe logs the denoising loss with the true caption, another shape's word, another
caption's end slots, and the empty prompt (a model that reads its words: word-swap >> true ~ end-swap).
Earlier tries (not kept): joint training with the end slots pulled to the empty prompt's (the
encoder collapses every token to one output) or with another caption's end slots (no conditioning
learnt in 1400 steps); code in commit aa573b6.
The pipeline is saved with safe_serialization into fmn/assets/toy/pipeline (weights stored in fp16
unless --fp32; fmn.toy.load_default_pipeline loads them in fp32).

    .venv/bin/python scripts/train_toy_model.py                  # the shipped model, ~30 min on 2 CPU cores
    .venv/bin/python scripts/train_toy_model.py --recipe joint --out runs/toy-joint   # the earlier model
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Spinning OpenMP workers slow training badly on a shared 2-core machine; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmn.processors.tokenizer import clip_tokenizer
from fmn.toy import data
from fmn.toy import model as M

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_training import cosine_lr, encode_pool, log, make_pool, name_fp32_in_config, tokenize

ROOT = Path(__file__).resolve().parents[1]


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


RECIPES = {
    # the shipped model: full CLIP vocabulary and SD's 77 slots, text encoder trained with the UNet
    "joint": dict(frozen_text_encoder=False, small_vocabulary=False, text_slots=77, channels=(64, 128), steps=1600,
                  text_layers=2),
    # reads its words (see the docstring): frozen standardized encoder, 8 slots, shuffled end slots
    "words": dict(frozen_text_encoder=True, small_vocabulary=True, text_slots=M.TEXT_SLOTS, channels=(32, 64),
                  steps=3600, text_layers=2),
    # each slot is its own word: a trained encoder without attention layers (see the docstring)
    "tokens": dict(frozen_text_encoder=False, small_vocabulary=True, text_slots=M.TEXT_SLOTS, channels=(64, 128),
                   steps=1600, text_layers=0),
}


@torch.no_grad()
def encode_captions(te, ids, captions, eos_id):
    """{caption: (encoder output [slots, hidden], index of its end-of-text slot)}; ids = tokenize(captions)."""
    out = te(ids)[0]
    end = (ids == eos_id).int().argmax(dim=1)
    return {c: (out[i], int(end[i])) for i, c in enumerate(captions)}


@torch.no_grad()
def standardize_outputs(te, ids):
    """Set the final layer norm's affine so that the outputs over all slots of the captions `ids`
    have zero mean and unit variance per dimension: a random transformer's outputs share one large
    direction (norm 7.4 of 8 here), which would otherwise drown the words' differences in every
    attention logit."""
    out = te(ids)[0].reshape(-1, te.config.hidden_size)
    ln = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
    mean, std = out.mean(0), out.std(0)
    ln.weight.div_(std)
    ln.bias.sub_(mean).div_(std)


def conditioning(enc, caption, end_from=None):
    """The caption's slots up to its last word, then the end slots (end-of-text on) of `end_from`
    (a caption of the same length, or "" for the empty prompt's slots at those places)."""
    emb, end = enc[caption]
    if end_from is None:
        return emb
    other, other_end = enc[end_from]
    assert end_from == "" or other_end == end, (caption, end_from)
    return torch.cat([emb[:end], other[end:]])


@torch.no_grad()
def probe(unet, enc, lat, shapes, colors, acp, gen, scale):
    """Held-out denoising loss with the true caption, with the shape word of another shape
    (own end slots), with the end slots of another shape's caption, and with the empty prompt.
    A UNet that reads its words: word-swap loss >> true, end-swap ~ true."""
    n = len(lat)
    t = torch.randint(200, 800, (n,), generator=gen)
    noise = torch.randn(lat.shape, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * lat * scale + (1 - a).sqrt() * noise
    true, other = [], []
    for s, c in zip(shapes.tolist(), colors.tolist()):
        true.append(f"a {data.COLORS[c]} {data.SHAPES[s]}")
        other.append(f"a {data.COLORS[c]} {data.SHAPES[(s + 1) % len(data.SHAPES)]}")
    conds = {
        "true": [conditioning(enc, x) for x in true],
        "word_swap": [conditioning(enc, y, end_from=x) for x, y in zip(true, other)],
        "end_swap": [conditioning(enc, x, end_from=y) for x, y in zip(true, other)],
        "empty": [conditioning(enc, "")] * n,
    }
    return {k: F.mse_loss(unet(zt, t, torch.stack(v)).sample, noise).item() for k, v in conds.items()}


def save_pipeline(out, vae, te, tok, unet, fp32=False):
    """Save a StableDiffusionPipeline with safetensors, weights in fp16 unless fp32, loading as fp32."""
    from diffusers import StableDiffusionPipeline
    if not fp32:
        vae, te, unet = vae.half(), te.half(), unet.half()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=M.build_inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    if not fp32:  # an all-fp32 pipeline from a plain StableDiffusionPipeline.from_pretrained(path)
        name_fp32_in_config(Path(out) / "text_encoder" / "config.json")


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
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="tokens",
                    help="tokens: the shipped model; joint: the earlier one; words: frozen encoder (see above)")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--pool", type=int, default=16000)
    ap.add_argument("--channels", type=int, nargs=2, default=None, help="default: the recipe's")
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--text-slots", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--text-layers", type=int, default=None, help="text encoder layers; default: the recipe's")
    ap.add_argument("--clean-frac", type=float, default=0.5,
                    help="words recipe: this share of the steps uses the empty prompt's end slots")
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0: off)")
    ap.add_argument("--vae-from", default=None, help="reuse the VAE of a pipeline folder trained with the same seed")
    ap.add_argument("--probe-every", type=int, default=200)
    ap.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    args = ap.parse_args()
    recipe = RECIPES[args.recipe]
    for key in ("steps", "channels", "text_slots", "text_layers"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    frozen = recipe["frozen_text_encoder"]

    torch.set_num_threads(args.threads)
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    if recipe["small_vocabulary"]:
        tok = M.build_tokenizer(args.text_slots)
    else:
        tok = clip_tokenizer(pad_token="<|endoftext|>", model_max_length=args.text_slots)

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
    captions = [""] + data.all_captions()
    caption_ids = tokenize(tok, captions)
    row = {c: i for i, c in enumerate(captions)}
    torch.manual_seed(args.seed + 3)
    te = M.build_text_encoder(tok, layers=args.text_layers)
    if frozen:  # random and frozen (see the docstring): encode every caption once
        te = te.eval().requires_grad_(False)
        standardize_outputs(te, caption_ids)
        if not args.fp32:  # it ships in fp16: condition the UNet on what those weights give
            te = te.half().float()
    enc = encode_captions(te, caption_ids, captions, tok.eos_token_id)
    same_length: dict[int, list[str]] = {}
    for c, (_, end) in enc.items():
        if c:
            same_length.setdefault(end, []).append(c)
    unet = M.build_unet(tuple(args.channels))
    sched = M.build_train_scheduler()
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + ([] if frozen else list(te.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed + 4)
    n_unet = sum(p.numel() for p in unet.parameters())
    log(t0, f"unet {n_unet / 1e6:.2f} M params, text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f} M "
            f"({'frozen' if frozen else 'trained'}); {len(enc)} captions, {args.text_slots} slots, "
            f"recipe {args.recipe}")
    # held-out latents for the probe (a pool built from another seed)
    px, ps, pc = make_pool(args.seed + 6, 100)
    probe_lat = encode_pool(vae, px)[0]
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
        if frozen:
            # a caption's own end slots are never seen: the empty prompt's, then another caption's
            clean = step < args.clean_frac * args.steps
            cond = []
            for c in caps:
                partner = None
                if c:
                    group = same_length[enc[c][1]]
                    partner = "" if clean else group[rng.integers(len(group))]
                cond.append(conditioning(enc, c, partner))
            emb = torch.stack(cond)
        else:
            emb = te(caption_ids[[row[c] for c in caps]])[0]
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
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
        if step % args.probe_every == 0 or step == args.steps - 1:
            unet.eval()
            if not frozen:
                enc = encode_captions(te, caption_ids, captions, tok.eos_token_id)
            pr = probe(unet, enc, probe_lat, ps, pc, acp, torch.Generator().manual_seed(args.seed + 7), scale)
            unet.train()
            log(t0, "probe " + " ".join(f"{k} {v:.4f}" for k, v in pr.items()))
    t_total = time.time() - t0

    out = Path(args.out)
    if not recipe["small_vocabulary"]:
        # the captions' words encode bit-identically with 588 of the 49408 rows (see prune_vocabulary)
        tok, te = M.prune_vocabulary(tok, te, data.vocabulary())
    save_pipeline(out, vae.eval(), te.eval(), tok, unet.eval(), fp32=args.fp32)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    info = {"seed": args.seed, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "train_seconds": round(t_total, 1), "vae_seconds": round(t_vae, 1), "threads": args.threads,
            "torch": torch.__version__, "unet_params": n_unet, "size_bytes": size, "final_loss": ema_loss}
    (out / "training_info.json").write_text(json.dumps(info, indent=1))
    log(t0, f"saved to {out} ({size / 1e6:.1f} MB); training took {t_total:.0f} s")


if __name__ == "__main__":
    main()
