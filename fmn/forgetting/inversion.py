"""Concept inversion: textual inversion of each concept into k new tokens, on copies of the
tokenizers and text encoders (the pipeline is not touched); the new tokens then stand for the
concept in the forgetting prompts."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fmn.families.base import Prompts
from fmn.forgetting.options import ForgetError


def new_tokens(concepts, k) -> list[str]:
    """The k new tokens of each concept, as one phrase per concept: "<fmn-c0-0> <fmn-c0-1> ..."."""
    return [" ".join(f"<fmn-c{ci}-{j}>" for j in range(k)) for ci in range(len(concepts))]


def add_tokens(tok, enc, concepts, words, seed) -> torch.Tensor:
    """Adds the words' tokens to (tok, enc), each initialised from the concept's own token
    embeddings (then random ones of the mean norm); returns the new ids. Only the input
    embeddings are left trainable."""
    all_toks = [t for w in words for t in w.split()]
    if tok.add_tokens(all_toks) != len(all_toks):
        raise ValueError("concept inversion: could not add new tokens to the tokenizer")
    enc.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = enc.get_input_embeddings().weight
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        mean_norm = emb[: len(tok) - len(all_toks)].norm(dim=-1).mean().item()
        for ci, concept in enumerate(concepts):
            pieces = tok(concept, add_special_tokens=False).input_ids
            for j, i in enumerate(tok.convert_tokens_to_ids(words[ci].split())):
                if j < len(pieces):
                    emb[i] = emb[pieces[j]]
                else:
                    r = torch.randn(emb.shape[1], generator=g)
                    emb[i] = (r / r.norm() * mean_norm).to(emb)
    enc.requires_grad_(False)
    enc.get_input_embeddings().weight.requires_grad_(True)
    return torch.tensor(tok.convert_tokens_to_ids(all_toks), device=emb.device)


@torch.no_grad()
def keep_only_new(embs, originals, new_ids, opts):
    """After a step: every old embedding back to its original, the new ones' norms pulled towards
    opts.inversion_norm by opts.inversion_norm_factor."""
    for e, orig, ids in zip(embs, originals, new_ids):
        keep = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
        keep[ids] = False
        e[keep] = orig[keep]
        v = e[ids]
        n = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        target = n + opts.inversion_norm_factor * (opts.inversion_norm - n)
        e[ids] = v / n * target


def invert(family, concepts, items, prompts_tpl, opts, device, autocast):
    """Textual inversion of each concept on the reference latents `items`; returns (the copied
    (tokenizer, encoder) parts, the new token phrase of each concept)."""
    parts = [(copy.deepcopy(t), copy.deepcopy(e)) for t, e in family.text_parts()]
    words = new_tokens(concepts, opts.inversion_tokens)
    new_ids = [add_tokens(tok, enc, concepts, words, opts.seed) for tok, enc in parts]
    if opts.inversion_steps == 0:
        return parts, words
    embs = [enc.get_input_embeddings().weight for _, enc in parts]
    originals = [e.detach().clone() for e in embs]
    opt = torch.optim.AdamW(embs, lr=opts.inversion_lr, weight_decay=opts.inversion_weight_decay)
    lo, hi = opts.timesteps[0], min(opts.timesteps[1], family.timestep_count())
    g = torch.Generator(device="cpu").manual_seed(opts.seed + 7)
    from tqdm.auto import tqdm
    bar = tqdm(range(opts.inversion_steps), desc="concept inversion", disable=not opts.progress, leave=False)
    for _ in bar:
        pick = torch.randint(len(items), (opts.batch_size,), generator=g).tolist()
        x0 = torch.stack([items[i][1] for i in pick])
        prompts = [prompts_tpl[torch.randint(len(prompts_tpl), (1,), generator=g).item()].format(words[items[i][0]])
                   for i in pick]
        t = torch.randint(lo, hi, (len(pick),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = family.add_noise(x0, noise, t)
        with autocast():
            embeds, pooled = family.encode_prompts(prompts, parts)
            text = Prompts(embeds, pooled, [0] * len(prompts), resolution=opts.resolution)
            out = family.predict(family.denoiser, x_t, t, text, torch.arange(len(prompts)))
        loss = F.mse_loss(out.float(), family.target(x0, noise, t))
        if not torch.isfinite(loss):
            raise ForgetError("concept inversion: the loss is not finite; try a lower inversion_lr or precision fp32")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        keep_only_new(embs, originals, new_ids, opts)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for _, enc in parts:
        enc.requires_grad_(False)
    return parts, words
