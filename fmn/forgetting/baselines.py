"""Baselines that fmn is compared with (bench/bench_quality.py).

ESD (Gandikota et al., "Erasing Concepts from Diffusion Models", 2023), the cross-attention
variant ESD-x: fine-tune the cross-attention parameters (the family's "attn2" set; on an MM-DiT every
joint-attention projection) so that the denoiser's prediction for the concept prompt follows negative
guidance away from it, computed with a frozen copy of the denoiser:

    target = out*(x_t, "") - eta * (out*(x_t, c) - out*(x_t, ""))
    loss   = || out(x_t, c) - target ||^2

out is the family's prediction (epsilon for SD 1.x / 2.x / XL, the flow-matching velocity for SD3 / FLUX:
guidance is linear in either). ESD draws x_t by partially sampling the frozen model with the concept
prompt; here x_t comes from noising latents of the concept's images (the same reference latents fmn
trains on), so both methods see the same inputs and the same step budget.
"""
import copy

import torch
import torch.nn.functional as F

from fmn.families import family_for
from fmn.families.base import Prompts


def esd(pipe, concepts, latents, *, prompts=None, steps=35, lr=1e-5, negative_guidance=1.0, train="attn2",
        seed=0, batch_size=1):
    """Fine-tunes the pipeline's denoiser in place with ESD's negative-guidance loss; returns the per-step losses.

    concepts: list of concept phrases; latents: [n, C, h, w] x0 latents of the concepts' images,
    one drawn at random each step; prompts: prompts naming the concepts, one drawn at random each
    step (default: the concept phrases themselves).
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    if not concepts:
        raise ValueError("concepts must name at least one concept")
    if latents.dim() != 4 or len(latents) == 0:
        raise ValueError(f"latents must be [n, C, h, w] with n >= 1, got {list(latents.shape)}")
    prompts = prompts or list(concepts)
    family = family_for(pipe)
    model = family.denoiser
    device = model.device
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    n_train = family.timestep_count()
    with torch.no_grad():
        resolution = latents.shape[-1] * pipe.vae_scale_factor
        cond = Prompts(*family.encode_prompts(prompts), list(range(len(prompts))), resolution=resolution)
        uncond = Prompts(*family.encode_prompts([""]), [0], resolution=resolution)
    params = [p for _, p in family.trainable(train)]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    latents = latents.to(device, torch.float32)
    losses = []
    model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(len(latents), (batch_size,), generator=g)
            which = torch.randint(len(prompts), (batch_size,), generator=g)
            t = torch.randint(n_train, (batch_size,), generator=g).to(device)
            noise = torch.randn(latents[idx].shape, generator=g).to(device)
            x_t = family.add_noise(latents[idx], noise, t)
            with torch.no_grad():
                out_uncond = family.predict(frozen, x_t, t, uncond, torch.zeros(batch_size, dtype=torch.long))
                out_cond = family.predict(frozen, x_t, t, cond, which)
                target = out_uncond - negative_guidance * (out_cond - out_uncond)
            loss = F.mse_loss(family.predict(model, x_t, t, cond, which).float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        model.eval()
        model.requires_grad_(False)
    return losses
