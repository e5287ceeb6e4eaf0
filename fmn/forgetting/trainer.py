"""The forgetting run: `forget(pipe, concepts, images=None, **options) -> Patch`.

An orchestrator: the pipeline is reached only through its model family (fmn.families: SD 1.x,
2.x and SDXL today), the work is done by fmn.forgetting's references, inversion, trainable, losses
and Patch.from_trained. Steps:

1. prompts from templates ("object": "a photo of {}", "style": "a photo in the style of {}",
   or your own list of templates with "{}"); every concept must occur in every prompt;
2. reference latents: your images (a folder, files, PIL images, a dict per concept, or a tensor
   of latents), VAE-encoded once; or N images generated with the base pipeline and fixed seeds;
   for the visual loss, pairs generated with the same seeds with and without the concept's
   attention (`fmn.processors.attention.suppress`);
3. optional concept inversion (textual inversion into k new tokens, on copies of the text
   encoders: the pipeline is not touched), after which the new tokens are the concept;
4. text encoded once; the training loop (none with steps=0): uniform timesteps, DDPM noise, the attention loss
   (`fmn.processors.attention.concept_scores`, fused kernels), the visual denoising loss, or both; AdamW;
   trainable set attn2 (default), attn2-kv, unet, or a LoRA on attn2 (peft); optional terms not in
   the paper, each on a cache of (noisy latent, timestep, prompt) -> base UNet output made before the
   first step: `retain` (the retained phrases' outputs held to the base's) and `anchor` (Concept
   Ablation, Kumari et al. 2023: on noisy images of the anchor, the concept's prompts are pulled to the
   base's outputs for the same prompts with the anchor in the concept's place); under an accelerate
   launch or torchrun, each step's batch of processes x batch_size split over the processes, its loss
   the global batch's and the gradients averaged (fmn.distributed; data_parallel=False: alone);
5. with closed_form, after the steps: the anchor edit solved in closed form on the layers that read the
   text, on their weights as trained (fmn.forgetting.closed_form, UCE; no images needed unless steps or inversion
   ask for them);
6. the patch: only what changed (see fmn.patches.patch), with a fingerprint of the base tensors.

The pipeline comes back with its original weights (inplace=False, the default) or with the
trained weights (inplace=True). On any error or interrupt its weights, processors, adapters,
requires_grad flags and devices are restored.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch

from fmn.forgetting import closed_form
from fmn.forgetting.cuda_graphs import GraphedDenoiser, unavailable
from fmn.forgetting.distributed import shard_of
from fmn.families import family_for
from fmn.families.base import Prompts
from fmn.forgetting.inversion import invert
from fmn.forgetting.losses import (Batch, Run, anchor_cache, cached_loss, forgetting_step, retain_cache, sample_batch,
                                   train)
from fmn.forgetting.options import PATCH_DTYPES, ForgetError, ForgetOptions, templates
from fmn.patches.patch import Patch
from fmn.forgetting.references import References, reference_latents
from fmn.forgetting.restore import PipelineState
from fmn.forgetting.runtime import (accelerator, autocast_for, kernel_compile_notice, peak_memory, peak_rss,
                                    reset_peak_memory)
from fmn.forgetting.trainable import TrainableSet, lora_scale


def checked_concepts(concepts, opts) -> tuple[list[str], list[str]]:
    """(concepts, one anchor per concept or none), or a ValueError naming what is wrong."""
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, (list, tuple)) or not concepts or not all(isinstance(c, str) and c.strip()
                                                                           for c in concepts):
        raise ValueError(f"concepts must be a non-empty phrase or list of phrases, got {concepts!r}")
    concepts = [c.strip() for c in concepts]
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"concepts repeat: {concepts}")
    both = sorted(set(concepts) & set(opts.retain))
    if both:
        raise ValueError(f"retain names concepts being forgotten: {both}")
    anchors = list(opts.anchor) * len(concepts) if len(opts.anchor) == 1 else list(opts.anchor)
    if anchors and len(anchors) != len(concepts):
        raise ValueError(f"anchor must be one phrase or one per concept ({len(concepts)}), got {len(anchors)}")
    if set(anchors) & set(concepts):
        raise ValueError(f"anchor names concepts being forgotten: {sorted(set(anchors) & set(concepts))}")
    return concepts, anchors


def concept_prompts(phrases, tpl) -> tuple[list[str], list[int]]:
    """Every template with every phrase, phrase-major; and the phrase index of each prompt."""
    return [t.format(p) for p in phrases for t in tpl], [i for i in range(len(phrases)) for _ in tpl]


def encode(family, phrases, tpl, concept_of, opts, parts, columns_of=None) -> Prompts:
    """The phrases' prompts encoded once (no gradient); with columns_of (one phrase per prompt), also
    their key columns."""
    prompts = concept_prompts(phrases, tpl)[0]
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(prompts, parts)
        columns = None if columns_of is None else family.concept_columns(
            prompts, columns_of, include_eos=opts.include_eos, parts=parts).to(family.denoiser.device)
    return Prompts(embeds.float(), None if pooled is None else pooled.float(), concept_of, columns, opts.resolution)


def encode_all(family, concepts, words, anchors, tpl, opts, parts) -> dict:
    """{"concept", "retain", "anchor"}: Prompts of the concept's prompts (words: the concepts, or
    their inverted tokens), the retained phrases' and the concept's with the anchor in its place."""
    concept_of = concept_prompts(concepts, tpl)[1]
    texts = {"concept": encode(family, words, tpl, concept_of, opts, parts, [words[c] for c in concept_of])}
    if opts.retain:
        texts["retain"] = encode(family, opts.retain, tpl, [0] * len(opts.retain) * len(tpl), opts, parts)
    if anchors:
        texts["anchor"] = encode(family, anchors, tpl, concept_of, opts, parts)
    return texts


def closed_form_edit(family, trainable, texts, concepts, tpl, opts, parts) -> dict:
    """The closed-form anchor edit (fmn.forgetting.closed_form) of trainable.edited; returns the summary's figures."""
    t0 = time.perf_counter()
    concept_of = concept_prompts(concepts, tpl)[1]
    target = texts.get("anchor") or encode(family, [""] * len(concepts), tpl, concept_of, opts, parts)
    keep = [encode(family, [""], tpl, [0] * len(tpl), opts, parts),  # the bare templates, "", the retained
            encode(family, [""], ["{}"], [0], opts, parts)] + ([texts["retain"]] if "retain" in texts else [])
    base = {n: trainable.saved[n] for n, _, _ in trainable.edited} if opts.preserve_base else None
    closed_form.edit(trainable.edited, [texts["concept"]], [target], keep, opts.preserve_weight, base=base,
                     rounds=opts.closed_form_rounds)
    return {"seconds_closed_form": round(time.perf_counter() - t0, 4), "closed_form_layers": len(trainable.edited)}


def build_run(family, accel, opts, device, items, text, params, autocast, attention) -> Run:
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay)
    shard = shard_of(accel, opts.data_parallel)
    shard.same_start(params)  # every process from the main one's weights; their gradients averaged each step
    scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
    n_train = family.timestep_count()
    lo, hi = opts.timesteps[0], min(opts.timesteps[1], n_train)
    if lo >= hi:
        raise ValueError(f"timesteps {opts.timesteps} are outside the scheduler's [0, {n_train})")
    model = family.denoiser
    if unavailable(opts, device, accel.num_processes) is None:  # the steps' calls replayed as CUDA graphs
        model = GraphedDenoiser(model, attention, detach_recorded_output=opts.loss == "attention")
    return Run(family, model, opts, device, items, text, optimizer, scaler, autocast, lo, hi, attention, shard)


def graphs_status(run, accel) -> str:
    """The summary's word on CUDA graphs: on (graphs, replays), failed, or off and why."""
    if isinstance(run.model, GraphedDenoiser):
        return run.model.status()
    return f"off ({unavailable(run.opts, run.device, accel.num_processes)})"


def train_and_measure(run, caches, accel, concepts, params) -> dict:
    """Loss on a fixed batch before and after, the steps between; the summary's figures."""
    opts = run.opts
    ge = torch.Generator(device="cpu").manual_seed(opts.seed + 12345)
    n_eval = min(4, len(run.items))
    eval_batch = sample_batch(run, n_eval, ge)
    eval_batch = Batch(eval_batch.pick, eval_batch.rows,
                       torch.linspace(run.lo, run.hi - 1, n_eval).round().long().to(run.device), eval_batch.noise)
    run.family.denoiser.train()
    notice = kernel_compile_notice(run.device, opts) if opts.progress and accel.is_main_process else None
    if notice:  # the first step may compile for tens of seconds: say so rather than look stuck
        print(notice, file=sys.stderr, flush=True)
    with torch.no_grad():
        loss_before = forgetting_step(run, eval_batch)
    t_train = time.perf_counter()
    # the same generator in every process: each draws the global batch and takes its part (fmn.forgetting.distributed)
    g = torch.Generator(device="cpu").manual_seed(opts.seed + 1)
    seen = train(run, caches, g, "forgetting " + ", ".join(concepts), opts.progress and accel.is_main_process)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    t_train = time.perf_counter() - t_train
    with torch.no_grad():
        loss_after = forgetting_step(run, eval_batch)
        after = {name: cached_loss(run, cache, torch.arange(len(cache.rows))) for name, cache in caches.items()}
    if not math.isfinite(loss_after) or not all(bool(torch.isfinite(p).all()) for p in params):
        raise ForgetError("the trained weights are not finite; nothing was written. Try a lower lr.")
    return {"seconds_train": round(t_train, 4), "cuda_graphs": graphs_status(run, accel),
            "loss_before": loss_before, "loss_after": loss_after,
            "processes": run.shard.world, "global_batch_size": opts.batch_size * run.shard.world,
            "losses": seen["forget"],
            "retain_loss_after": after.get("retain"), "retain_losses": seen["retain"] or None,
            "anchor_loss_after": after.get("anchor"), "anchor_losses": seen["anchor"] or None}


def train_steps(family, accel, opts, device, refs, texts, trainable, autocast, handle, concepts) -> dict:
    """The training loop (opts.steps steps) with its caches; the summary's figures."""
    if opts.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    run = build_run(family, accel, opts, device, refs.items, texts["concept"], trainable.params, autocast,
                    handle.context)
    caches = {}
    if "retain" in texts:
        caches["retain"] = retain_cache(run, texts["retain"], refs.retain)
    if "anchor" in texts:
        caches["anchor"] = anchor_cache(run, texts["anchor"], refs.anchor)
    return train_and_measure(run, caches, accel, concepts, trainable.params)


@torch.enable_grad()  # it trains: also when called inside the caller's torch.no_grad() or inference code
def forget(pipe, concepts, images=None, **options) -> Patch:
    """Makes `pipe`'s denoiser forget `concepts`; returns the Patch (save it with `patch.save(path)`).

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (SD 1.x, 2.x, SDXL;
            any pipeline a family in fmn.families handles).
        concepts: a phrase or a list of phrases, forgotten together in one run.
        images: reference images: None (generated with the base pipeline, fixed seeds), a folder
            (with one subfolder per concept, or shared by all concepts), a list of files or PIL
            images, a dict {concept: folder or list}, or a tensor of latents [N, 4, h, w].
        **options: see ForgetOptions (steps=35, lr=2e-6, batch_size=1, train="attn2",
            loss="attention", precision="fp32", patch_dtype="fp16", inplace=False, ...), over the
            model family's default_options(concepts) (on the built-in toy model, fmn.toy.load_default_pipeline():
            its tuned defaults, fmn/toy/defaults.py); or options=ForgetOptions(...), taken as it is.

    The returned patch's `summary` holds time, peak memory, loss before/after and per step.
    """
    family = family_for(pipe)
    given = options.pop("options", None)
    if given is not None:
        opts = dataclasses.replace(given)
    else:  # the caller's options over the family's (the built-in toy model's: its tuned ones)
        opts = ForgetOptions(**{**family.default_options(concepts, options), **options})
    concepts, anchors = checked_concepts(concepts, opts)
    tpl = templates(opts.template)
    for c in concepts:  # every concept must be found in its prompts (the error names both)
        family.concept_columns(concept_prompts([c], tpl)[0], [c] * len(tpl))
    accel = accelerator()
    device = torch.device(opts.device) if opts.device else accel.device
    if opts.resolution is None:
        opts.resolution = family.default_resolution()
    autocast = autocast_for(opts, family.denoiser, device)
    if opts.train == "lora" and getattr(family.denoiser, "peft_config", None):
        raise ValueError("the UNet already has LoRA adapters; fuse or unload them before a train='lora' run")
    base_model = opts.base_model if opts.base_model is not None else (getattr(pipe, "name_or_path", "") or "")
    t_start = time.perf_counter()
    reset_peak_memory(device)
    state, trainable = PipelineState(pipe, family.denoiser), TrainableSet(family, opts)
    handle, ok = None, False
    try:
        pipe.to(device)
        needs_images = opts.steps or opts.inversion  # the closed-form edit alone reads none
        t_images = time.perf_counter()
        refs = reference_latents(family, concepts, images, anchors, tpl, opts, device) if needs_images \
            else References([], [], [])
        figures = {"seconds_images": round(time.perf_counter() - t_images, 4)}
        parts, words = family.text_parts(), concepts
        if opts.inversion:
            family.denoiser.requires_grad_(False)
            parts, words = invert(family, concepts, refs.items, tpl, opts, device, autocast)
        texts = encode_all(family, concepts, words, anchors, tpl, opts, parts)
        trainable.setup()
        if opts.steps:
            if opts.offload and device.type == "cuda" and not opts.closed_form:
                state.offload_text_and_vae()
            handle = family.fused_attention(opts.backend)
            figures.update(train_steps(family, accel, opts, device, refs, texts, trainable, autocast, handle,
                                       concepts))
        if opts.closed_form:  # after training: on the trained weights (the order that resists inversion)
            figures.update(closed_form_edit(family, trainable, texts, concepts, tpl, opts, parts))
        del parts
        summary = {
            "seconds_total": round(time.perf_counter() - t_start, 4), "steps": opts.steps,
            "batch_size": opts.batch_size, "device": str(device), "peak_memory_bytes": peak_memory(device),
            "peak_rss_bytes": peak_rss(), **figures, "n_trainable": sum(p.numel() for p in trainable.params),
            "n_reference": len(refs.items), "resolution": opts.resolution,
            "inverted_tokens": words if opts.inversion else None,
        }
        patch = Patch.from_trained(trainable.trained(), trainable.saved, component=family.component,
                                   dtype=PATCH_DTYPES[opts.patch_dtype],
                                   lora_scale=lora_scale(opts) if trainable.lora else None,
                                   fingerprint=trainable.fingerprint, concepts=list(concepts),
                                   base_model=base_model, options=opts.record(), summary=summary)
        if not patch.tensors:
            raise ForgetError("no weight changed during the run (no gradient reached the trainable set?); "
                              "nothing was written")
        summary["patch_bytes"] = patch.nbytes
        ok = True
        return patch
    finally:  # the pipeline back: processors, weights (or the trained ones kept), flags, devices
        if handle is not None:
            handle.remove()
        trainable.restore(keep=ok and opts.inplace)
        state.restore()


__all__ = ["forget", "ForgetOptions", "ForgetError", "templates"]
