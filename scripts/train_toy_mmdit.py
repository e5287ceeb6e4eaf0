#!/usr/bin/env python
"""Train fmn's built-in MM-DiT toy model ("toy-mmdit") from scratch on the procedural shapes data set.

Same classes as Stable Diffusion 3 (StableDiffusion3Pipeline, SD3Transformer2DModel with joint
attention, FlowMatchEulerDiscreteScheduler, two CLIPTextModelWithProjection + CLIPTokenizer, no
T5); see fmn/toy/mmdit_model.py for the architecture. On the CPU, reproducible from --seed at a
fixed --threads:
  - VAE: the UNet toy model's (fmn/assets/toy/pipeline/vae), reused as shipped; the latent shift and
    scale are set to the mean and 1 / std of the training pool's latents (SD3's convention).
  - Transformer and the text encoders' embeddings trained together by flow matching:
    x_s = (1 - s) x0 + s noise, target noise - x0, s logit-normal (or uniform), 10% empty captions
    (classifier-free guidance), AdamW, warm-up + cosine decay, gradient clipping.
  - The pipeline's zero T5 tokens (max_sequence_length of them, 256 by default) are trained as one
    token with a log(count) attention bias (PadCollapsedJointAttnProcessor: the same function at a
    quarter of the tokens), the count drawn per sample log-uniformly in 1..256, so that the model
    serves the default 256 and the 4.5 x cheaper max_sequence_length=1 alike.
A held-out probe logs the loss with the true caption, with another shape's caption, with another
colour's and with the empty prompt (a model that reads its words: swapped >> true).
Shipped model: four stages, each --init-from the previous (dim 128, 4 layers, 2.29 M transformer
parameters, 6.3 MB); all four re-run from scratch on the idle 2-core machine: 26.1 min, every weight file
bit-identical to the shipped ones (bench/results/toy_mmdit_reproduce_cpu.txt). First trained on 2 cores
shared with other jobs: (1) seed 0, 2000 steps, lr 1e-3, 43 min wall
(held-out seeds 0, 1: shape 0.68 / 0.72); (2) --seed 1 --steps 1000 --lr 4e-4 --warmup 50 (0.80 /
0.82); (3) --seed 2 --steps 600 --lr 2e-4 --warmup 30; (4) --seed 3 --steps 1500 --lr 3e-4 --warmup
50: shape 0.96 / 0.98, colour 1.00 / 1.00 (bench/results/toy_mmdit_base_msl1.json). The VAE keeps the
shapes apart (bench/toy_vae_roundtrip.py): the earlier circle/square confusion was under-training.
Saved with save_pretrained (safetensors, fp16 weights unless --fp32) into a new folder (default
fmn/assets/toy/mmdit; --overwrite to replace it), with training_info.json.

    .venv/bin/python scripts/train_toy_mmdit.py --out /tmp/runs/s1          # the shipped model, stage 1
    .venv/bin/python scripts/train_toy_mmdit.py --init-from /tmp/runs/s1 --out /tmp/runs/s2 \
        --seed 1 --steps 1000 --lr 4e-4 --warmup 50                        # then s3, s4 as above
    .venv/bin/python scripts/train_toy_mmdit.py --steps 300 --out /tmp/runs/short
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

# Spinning OpenMP workers slow training badly on a shared 2-core machine; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmn.toy import data
from fmn.toy import mmdit_model as MM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests/toy/test_toy_mmdit.py)
from toy_training import cosine_lr, encode_pool, log, make_pool, name_fp32_in_config, tokenize

ROOT = Path(__file__).resolve().parents[1]


def context(text_encoders, ids):
    """Transformer inputs for token ids: CLIP slots + one zero token standing for the 256 T5 slots."""
    slots, pooled = MM.clip_slots(text_encoders, ids)
    pad = slots.new_zeros(slots.shape[0], 1, slots.shape[2])
    return torch.cat([slots, pad], dim=1), pooled


def sample_sigmas(kind, n, gen):
    if kind == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


def flow_loss(transformer, z0, ctx, pooled, sigmas, noise):
    s = sigmas.view(-1, 1, 1, 1)
    zt = (1 - s) * z0 + s * noise
    pred = transformer(zt, ctx, pooled, sigmas * 1000).sample
    return F.mse_loss(pred, noise - z0)


@torch.no_grad()
def probe(transformer, text_encoders, tok, lat, shapes, colors, seed):
    """Held-out loss with the true caption, another shape's, another colour's, and the empty prompt."""
    gen = torch.Generator().manual_seed(seed)
    sig = 0.2 + 0.6 * torch.rand(len(lat), generator=gen)
    noise = torch.randn(lat.shape, generator=gen)
    n_s, n_c = len(data.SHAPES), len(data.COLORS)
    captions = {
        "true": [f"a {data.COLORS[c]} {data.SHAPES[s]}" for s, c in zip(shapes.tolist(), colors.tolist())],
        "shape_swap": [f"a {data.COLORS[c]} {data.SHAPES[(s + 1) % n_s]}" for s, c in zip(shapes.tolist(), colors.tolist())],
        "color_swap": [f"a {data.COLORS[(c + 1) % n_c]} {data.SHAPES[s]}" for s, c in zip(shapes.tolist(), colors.tolist())],
        "empty": [""] * len(lat),
    }
    out = {}
    for key, caps in captions.items():
        ctx, pooled = context(text_encoders, tokenize(tok, caps))
        out[key] = flow_loss(transformer, lat, ctx, pooled, sig, noise).item()
    return out


def load_trainable(folder):
    """The text encoders and transformer of a saved toy-mmdit pipeline, in fp32, for a further stage."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    text_encoders = [CLIPTextModelWithProjection.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32)
                     for sub in ("text_encoder", "text_encoder_2")]
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    MM.zero_pooled_projection(transformer)
    return text_encoders, transformer


def prepare(args, t0):
    """Everything training needs, built deterministically from args.seed."""
    torch.manual_seed(args.seed)
    vae = MM.load_unet_toy_vae(args.init_from or args.vae_from)
    x, shapes, colors = make_pool(args.seed + 2, args.pool)
    lat_mean, lat_std = encode_pool(vae, x)
    if args.init_from:  # keep the latent normalisation the loaded transformer was trained with
        shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    else:
        shift, scale = float(lat_mean.mean()), float(1.0 / lat_mean.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(t0, f"pool of {len(x)} images encoded; latent shift {shift:.4f} scale {scale:.4f}")
    tok = MM.build_tokenizer()
    torch.manual_seed(args.seed + 3)
    if args.init_from:
        text_encoders, transformer = load_trainable(args.init_from)
        log(t0, f"transformer and text encoders loaded from {args.init_from} (fp32)")
    else:
        text_encoders = [MM.build_text_encoder(tok), MM.build_text_encoder(tok)]
        transformer = MM.build_transformer(args.dim, args.layers, args.head_dim)
    pad = MM.set_pad_collapsed(transformer, MM.T5_SLOTS)
    px, ps, pc = make_pool(args.seed + 6, args.probe_size)
    probe_lat = (encode_pool(vae, px)[0] - shift) * scale
    return dict(vae=vae, tok=tok, text_encoders=text_encoders, transformer=transformer, pad=pad, lat_mean=lat_mean,
                lat_std=lat_std, shapes=shapes, colors=colors, shift=shift, scale=scale, probe=(probe_lat, ps, pc))


def train(args, t0=None, on_checkpoint=None):
    """Run the training loop; returns (state from prepare(), per-step losses, seconds per step).
    on_checkpoint(step, state) is called every args.save_every steps (0: never)."""
    t0 = t0 or time.time()
    st = prepare(args, t0)
    tok, tes, tr = st["tok"], st["text_encoders"], st["transformer"]
    params = [p for p in tr.parameters() if p.requires_grad] + [p for te in tes for p in te.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 5)
    rng = np.random.default_rng(args.seed + 4)
    log(t0, f"transformer {sum(p.numel() for p in tr.parameters()) / 1e6:.2f} M params, text encoders "
            f"{sum(p.numel() for te in tes for p in te.parameters()) / 1e6:.2f} M; dim {args.dim}, "
            f"{args.layers} layers, batch {args.batch}, {args.steps} steps")
    losses, ema, t_steps, cpu_steps = [], None, time.time(), time.process_time()
    tr.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, len(st["lat_mean"]), (args.batch,), generator=gen)
        caps = ["" if rng.random() < args.uncond_prob else
                data.caption_for(data.SHAPES[st["shapes"][i]], data.COLORS[st["colors"][i]], rng)
                for i in idx.tolist()]
        ctx, pooled = context(tes, tokenize(tok, caps))
        z0 = (st["lat_mean"][idx] + st["lat_std"][idx] * torch.randn(st["lat_mean"][idx].shape, generator=gen)
              - st["shift"]) * st["scale"]
        noise = torch.randn(z0.shape, generator=gen)
        st["pad"].set_count(torch.exp(torch.rand(args.batch, generator=gen) * math.log(MM.T5_SLOTS)))
        loss = flow_loss(tr, z0, ctx, pooled, sample_sigmas(args.sigmas, args.batch, gen), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.98 * ema + 0.02 * losses[-1]
        if step % args.log_every == 0 or step == args.steps - 1:
            rate, cpu = (time.time() - t_steps) / (step + 1), (time.process_time() - cpu_steps) / (step + 1)
            log(t0, f"step {step:5d} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} s/step "
                    f"(cpu {cpu:.2f} s/step) load {os.getloadavg()[0]:.1f}")
        if args.probe_every and (step % args.probe_every == 0 or step == args.steps - 1):
            tr.eval()
            st["pad"].set_count(MM.T5_SLOTS)
            pr = probe(tr, tes, tok, *st["probe"], seed=args.seed + 7)
            tr.train()
            log(t0, "probe " + " ".join(f"{k} {v:.4f}" for k, v in pr.items()))
        if on_checkpoint and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            on_checkpoint(step + 1, st)
    st["cpu_seconds_per_step"] = (time.process_time() - cpu_steps) / max(1, args.steps)
    return st, losses, (time.time() - t_steps) / max(1, args.steps)


def save_pipeline(out, st, fp32=False):
    """save_pretrained (copies of the modules, fp16 unless fp32) into a new temporary folder next to
    `out`; returns that folder (the caller moves it into place)."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    modules = [copy.deepcopy(m).eval() for m in (st["transformer"], *st["text_encoders"], st["vae"])]
    MM.set_default_attention(modules[0])
    if not fp32:
        modules = [m.half() for m in modules]
    pipe = StableDiffusion3Pipeline(transformer=modules[0], scheduler=MM.build_scheduler(), vae=modules[3],
                                    text_encoder=modules[1], tokenizer=st["tok"], text_encoder_2=modules[2],
                                    tokenizer_2=st["tok"], text_encoder_3=None, tokenizer_3=None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    for cfg_path in tmp.glob("*/config.json"):  # where the modules were loaded from is no part of the model
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for sub in ("text_encoder", "text_encoder_2"):  # an all-fp32 pipeline from a plain from_pretrained(path)
        name_fp32_in_config(tmp / sub / "config.json")
    return tmp


def relative_to_root(value):
    """Paths inside the repository as relative paths (training_info.json is shipped)."""
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(ROOT):
        return str(Path(value).resolve().relative_to(ROOT))
    return value


def file_manifest(folder):
    """{relative path: {"bytes", "sha256"}} of every file under folder (tests check the shipped files)."""
    import hashlib

    folder = Path(folder)
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "fmn" / "assets" / "toy" / "mmdit"))
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--vae-from", default=str(ROOT / "fmn" / "assets" / "toy" / "pipeline"),
                    help="pipeline folder whose VAE is reused (default: the shipped UNet toy model)")
    ap.add_argument("--init-from", default=None,
                    help="a saved toy-mmdit pipeline folder to continue training from (a further stage: its VAE, "
                         "latent normalisation, transformer and text encoders; --dim/--layers/--head-dim unused)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--sigmas", choices=("logit-normal", "uniform"), default="logit-normal")
    ap.add_argument("--probe-size", type=int, default=100)
    ap.add_argument("--probe-every", type=int, default=250, help="0: no probe")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also save the pipeline every N steps into --checkpoint-dir/step<N> (0: never)")
    ap.add_argument("--checkpoint-dir", default=None, help="needed with --save-every")
    args = ap.parse_args(argv)
    if args.save_every and not args.checkpoint_dir:
        raise SystemExit("--save-every needs --checkpoint-dir")
    for name in ("steps", "batch", "pool", "dim", "layers", "head_dim", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"--out {out} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    load_start = os.getloadavg()

    def checkpoint(step, state):
        folder = Path(args.checkpoint_dir) / f"step{step}"
        if folder.exists():
            shutil.rmtree(folder)
        save_pipeline(folder, state, args.fp32).rename(folder)
        log(t0, f"checkpoint saved to {folder}")

    st, losses, step_s = train(args, t0, checkpoint)
    t_total = time.time() - t0
    tmp = save_pipeline(out, st, args.fp32)
    files = file_manifest(tmp)
    size = sum(rec["bytes"] for rec in files.values())
    info = {"seed": args.seed, "args": {k: relative_to_root(v) for k, v in vars(args).items()},
            "train_seconds": round(t_total, 1),
            "seconds_per_step": round(step_s, 3), "cpu_seconds_per_step": round(st["cpu_seconds_per_step"], 3),
            "cpu_seconds_total": round(time.process_time(), 1), "threads": args.threads, "torch": torch.__version__,
            "transformer_params": sum(p.numel() for p in st["transformer"].parameters()),
            "size_bytes": size, "final_loss_mean_last_100": float(np.mean(losses[-100:])),
            "load_average_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "cores": os.cpu_count(), "files": files}
    if args.init_from:  # the earlier stage(s), so that the chain can be rerun and checked
        info["init_from_training_info"] = json.loads((Path(args.init_from) / "training_info.json").read_text())
    (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(t0, f"saved to {out} ({size / 1e6:.2f} MB); training took {t_total:.0f} s ({step_s:.2f} s/step)")


if __name__ == "__main__":
    main()
