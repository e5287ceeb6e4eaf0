"""The losses of a forgetting run and one training step of them.

- attention: the Forget-Me-Not loss on the concept's key columns (fmn.processors.attention.concept_scores);
- visual: the x0 the denoiser implies, held to images drawn with the concept's attention zeroed;
- retain (not in the paper): on cached noisy latents, the outputs for retained phrases' prompts held
  to the base model's;
- anchor (Concept Ablation, Kumari et al. 2023): on cached noisy latents of the anchors' images, the
  outputs for the concept's prompts pulled to the base model's outputs with the anchor in its place.
`Run` is the one object the step functions share.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fmn.processors.attention import AttentionContext, recording, score_total
from fmn.forgetting.distributed import Shard
from fmn.families.base import ModelFamily, Prompts
from fmn.forgetting.options import ForgetError, ForgetOptions


@dataclass
class Run:
    """What the steps of one run share. items: (concept index, x0, visual target or None);
    text: the concept's prompts with their key columns; timesteps drawn from [lo, hi); attention:
    the context of the fused processors (per-call data: concept weights, score recorder); shard: this
    process's part of each step's global batch under data parallel (fmn.forgetting.distributed)."""
    family: ModelFamily
    model: torch.nn.Module          # the denoiser as called
    opts: ForgetOptions
    device: torch.device
    items: list
    text: Prompts
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable
    lo: int
    hi: int
    attention: AttentionContext     # read by the fused processors the family installed
    shard: Shard = field(default_factory=Shard)


@dataclass
class Batch:
    pick: list          # indices into run.items
    rows: list          # prompt rows of run.text
    t: torch.Tensor
    noise: torch.Tensor


@dataclass
class Cache:
    """Cached samples: noisy latents x_t at t, prompt rows of `text`, and the base model's outputs."""
    text: Prompts
    x_t: torch.Tensor
    t: torch.Tensor
    rows: torch.Tensor
    target: torch.Tensor


def sample_batch(run: Run, n: int, gen) -> Batch:
    """n items (a permutation, repeated as needed), a prompt of each one's concept, timesteps, noise."""
    pick = torch.randperm(len(run.items), generator=gen)[:n].tolist()
    while len(pick) < n:
        pick += torch.randperm(len(run.items), generator=gen)[: n - len(pick)].tolist()
    n_tpl = len(run.text.by_concept[0])
    rows = [int(run.text.by_concept[run.items[i][0]][torch.randint(n_tpl, (1,), generator=gen)].item())
            for i in pick]
    t = torch.randint(run.lo, run.hi, (n,), generator=gen).to(run.device)
    noise = torch.randn((n,) + tuple(run.items[0][1].shape), generator=gen).to(run.device)
    return Batch(pick, rows, t, noise)


def part_of(batch: Batch, part: slice) -> Batch:
    """The samples `part` of a batch."""
    return Batch(batch.pick[part], batch.rows[part], batch.t[part], batch.noise[part])


def visual_loss(run: Run, batch: Batch, x_t, out):
    """Mean squared distance of the implied x0 from the suppressed images, on items that have one."""
    has = [j for j, i in enumerate(batch.pick) if run.items[i][2] is not None]
    if not has:
        return None
    target = torch.stack([run.items[batch.pick[j]][2] for j in has])
    x0_hat = run.family.x0_estimate(x_t[has], out[has].float(), batch.t[has])
    return F.mse_loss(x0_hat, target)


def global_loss(run: Run, batch: Batch, x_t, out, recorded, shard: Shard):
    """(value, surrogate) of the loss on the global batch, from this process's part `batch`: the
    attention loss is sqrt(sum of every sample's scores), the visual loss a mean over the global
    batch's visual targets; the surrogate's gradient, averaged over the processes (DDP), is the value's."""
    opts = run.opts
    zero = out.new_zeros((), dtype=torch.float32)
    score = score_total(recorded.scores) if recorded is not None else zero
    sq, n = zero, 0
    if opts.loss in ("visual", "both"):
        has = [j for j, i in enumerate(batch.pick) if run.items[i][2] is not None]
        if has:
            target = torch.stack([run.items[batch.pick[j]][2] for j in has])
            sq = (run.family.x0_estimate(x_t[has], out[has].float(), batch.t[has]) - target).square().sum()
            n = target.numel()
    total_score, total_sq, total_n = shard.total(torch.stack([score, sq, zero + n])).unbind()
    value, surrogate = zero, zero
    if recorded is not None:  # at 0: loss 0 with no gradient, as forgetting_loss; NaN stays NaN
        value = total_score.sqrt()
        surrogate = shard.world * score / (2 * value) if total_score > 0 else 0 * score
    if total_n > 0:
        w = opts.visual_weight if opts.loss == "both" else 1.0
        value = value + w * total_sq / total_n
        surrogate = surrogate + w * shard.world * sq / total_n
    return value, surrogate


ONE_PROCESS = Shard()


def forgetting_step(run: Run, batch: Batch, backward: bool = False, shard: Shard = ONE_PROCESS) -> float:
    """The attention and/or visual loss on `batch`; with backward=True also its gradients, inside
    the same attention context (gradient checkpointing recomputes the forward during backward,
    which must record the same tensors). With a shard of several processes, `batch` is this
    process's part and the loss the global batch's (global_loss)."""
    opts = run.opts
    x0 = torch.stack([run.items[i][1] for i in batch.pick])
    x_t = run.family.add_noise(x0, batch.noise, batch.t)
    rows = torch.tensor(batch.rows)
    scores = opts.loss in ("attention", "both")
    ctx = recording(run.attention, run.text.columns[rows]) if scores else nullcontext()
    with ctx as recorded:
        with run.autocast():
            out = run.family.predict(run.model, x_t, batch.t, run.text, rows)
        if shard.world > 1:
            loss, surrogate = global_loss(run, batch, x_t, out, recorded, shard)
        else:
            terms = [recorded.loss()] if scores else []
            visual = visual_loss(run, batch, x_t, out) if opts.loss in ("visual", "both") else None
            if visual is not None:
                terms.append((opts.visual_weight if opts.loss == "both" else 1.0) * visual)
            loss = surrogate = torch.stack(terms).sum()
        if backward:
            if not torch.isfinite(loss):  # on every process alike: the value is the global batch's
                raise ForgetError(f"the loss became {loss.item()}; nothing was written. "
                                  "Try a lower lr or precision fp32.")
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(surrogate).backward()
    return loss.detach().item()


def noised(run: Run, x0, gen):
    """x0 noised to timesteps drawn from gen (timesteps first, then the noise)."""
    t = torch.randint(run.lo, run.hi, (len(x0),), generator=gen).to(run.device)
    return run.family.add_noise(x0, torch.randn(x0.shape, generator=gen).to(run.device), t), t


@torch.no_grad()
def base_outputs(run: Run, x_t, t, text: Prompts, rows):
    """The denoiser's outputs before any step, in chunks of 8."""
    with run.autocast():
        return torch.cat([run.family.predict(run.model, x_t[j:j + 8], t[j:j + 8], text, rows[j:j + 8]).float()
                          for j in range(0, len(rows), 8)])


def retain_cache(run: Run, retain_text: Prompts, retain_items: list) -> Cache:
    """The base outputs for retain prompts on noisy latents of their own images (retain_items), or
    with none, of the concept's images with retain prompts drawn at random."""
    k, gen = run.opts.retain_samples, torch.Generator(device="cpu").manual_seed(run.opts.seed + 4242)
    if retain_items:
        pick = torch.randint(len(retain_items), (k,), generator=gen).tolist()
        x0 = torch.stack([retain_items[i][1] for i in pick])
        rows = torch.tensor([retain_items[i][0] for i in pick])
    else:
        x0 = torch.stack([run.items[i][1] for i in torch.randint(len(run.items), (k,), generator=gen).tolist()])
        rows = torch.randint(len(retain_text.embeds), (k,), generator=gen)
    x_t, t = noised(run, x0, gen)
    return Cache(retain_text, x_t, t, rows, base_outputs(run, x_t, t, retain_text, rows))


def anchor_cache(run: Run, anchor_text: Prompts, anchor_items: list) -> Cache:
    """Noisy latents of the anchors' images with a concept prompt, and the base outputs for that
    prompt with the anchor in the concept's place (anchor_text: rows aligned with run.text)."""
    k, gen = run.opts.retain_samples, torch.Generator(device="cpu").manual_seed(run.opts.seed + 4343)
    n_tpl = len(run.text.by_concept[0])
    pick = torch.randint(len(anchor_items), (k,), generator=gen).tolist()
    rows = torch.tensor([int(run.text.by_concept[anchor_items[i][0]][torch.randint(n_tpl, (1,), generator=gen)])
                         for i in pick])
    x_t, t = noised(run, torch.stack([anchor_items[i][1] for i in pick]), gen)
    return Cache(run.text, x_t, t, rows, base_outputs(run, x_t, t, anchor_text, rows))


def cached_loss(run: Run, cache: Cache, rows, weight: float = 1.0, backward: bool = False) -> float:
    """Mean squared difference of the outputs on cached samples `rows` from their targets; with
    backward=True its gradients (times weight) are added to the ones already there."""
    with run.autocast():
        out = run.family.predict(run.model, cache.x_t[rows], cache.t[rows], cache.text, cache.rows[rows])
    loss = F.mse_loss(out.float(), cache.target[rows])
    if backward:
        run.scaler.scale(weight * loss).backward()
    return loss.detach().item()


def train(run: Run, caches: dict, gen, desc: str = "forgetting", progress: bool = True) -> dict:
    """opts.steps optimizer steps on the forgetting loss plus the cached terms (caches: {"retain" /
    "anchor": Cache}); returns the loss per step of each term {"forget", "retain", "anchor"}."""
    opts = run.opts
    weights = {"retain": opts.retain_weight, "anchor": opts.anchor_weight}
    seen = {"forget": [], "retain": [], "anchor": []}
    from tqdm.auto import tqdm
    bar = tqdm(range(opts.steps), desc=desc, disable=not progress)
    shard, b = run.shard, opts.batch_size  # the global batch: shard.world * b samples, this process's part
    for step in bar:
        try:
            batch = part_of(sample_batch(run, b * shard.world, gen), shard.part(b))
            value = forgetting_step(run, batch, backward=True, shard=shard)
            for name, cache in caches.items():
                rows = torch.randint(len(cache.rows), (b * shard.world,), generator=gen)[shard.part(b)]
                value_c = cached_loss(run, cache, rows, weights[name], backward=True)
                if shard.world > 1:  # equal parts: the global mean is the mean of the processes' means
                    value_c = shard.total(torch.tensor(value_c, device=run.device)).item() / shard.world
                if not math.isfinite(value_c):
                    raise ForgetError(f"the {name} loss became {value_c}; nothing was written. Try a lower lr.")
                seen[name].append(value_c)
        except ForgetError as e:
            raise ForgetError(f"step {step}: {e}") from None
        shard.average_gradients(run.optimizer.param_groups[0]["params"])
        if opts.max_grad_norm:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], opts.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        seen["forget"].append(value)
        bar.set_postfix(loss=f"{value:.4g}")
    return seen
