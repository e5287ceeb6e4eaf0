"""Baselines that fmn is compared with (bench/bench_quality.py).

ESD (Gandikota et al., "Erasing Concepts from Diffusion Models", 2023), the cross-attention
variant ESD-x: fine-tune the `attn2` parameters so that the model's noise prediction for the concept
prompt follows negative guidance away from it, computed with a frozen copy of the model:

    target = eps*(x_t, "") - eta * (eps*(x_t, c) - eps*(x_t, ""))
    loss   = || eps(x_t, c) - target ||^2

ESD draws x_t by partially sampling the frozen model with the concept prompt; here x_t comes from
noising latents of the concept's images (the same reference latents fmn trains on), so both methods
see the same inputs and the same step budget.
"""
import copy

import torch
import torch.nn.functional as F

from fmn.families import family_for


def esd(pipe, concepts, latents, *, prompts=None, steps=35, lr=1e-5, negative_guidance=1.0, train="attn2",
        seed=0, batch_size=1):
    """Fine-tunes pipe.unet in place with ESD's negative-guidance loss; returns the per-step losses.

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
    unet = pipe.unet
    device = unet.device
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    family = family_for(pipe)
    n_train = family.timestep_count()
    if family.prediction_type() != "epsilon":
        raise ValueError(f"esd() supports epsilon-prediction models, got prediction_type={family.prediction_type()!r}")
    with torch.no_grad():
        cond, _ = family.encode_prompts(prompts)
        uncond, _ = family.encode_prompts([""])
    params = [p for _, p in family.trainable(train)]
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    latents = latents.to(device, torch.float32)
    losses = []
    unet.train()
    try:
        for _ in range(steps):
            idx = torch.randint(len(latents), (batch_size,), generator=g)
            which = torch.randint(len(prompts), (batch_size,), generator=g)
            t = torch.randint(n_train, (batch_size,), generator=g).to(device)
            noise = torch.randn(latents[idx].shape, generator=g).to(device)
            x_t = family.add_noise(latents[idx], noise, t)
            text = cond[which.to(device)]
            with torch.no_grad():
                e_uncond = frozen(x_t, t, encoder_hidden_states=uncond.expand(batch_size, -1, -1)).sample
                e_cond = frozen(x_t, t, encoder_hidden_states=text).sample
                target = e_uncond - negative_guidance * (e_cond - e_uncond)
            loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=text).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        unet.eval()
        unet.requires_grad_(False)
    return losses
