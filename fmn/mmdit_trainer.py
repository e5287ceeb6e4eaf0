"""`fmn.forget` for SD3 / FLUX pipelines on the current trainer: a compact driver over the MM-DiT
family (fmn.families.mmdit).

Temporary: once the trainer is split around its model-family seam (issue 14), MMDiTFamily is
registered there and this module goes; until then `fmn.trainer.forget` hands MM-DiT pipelines here.
Covered: reference latents (generated with the base pipeline, or a latent tensor [N, C, h, w]),
the attention / visual / both losses, train sets attn2, attn2-kv, unet and lora, every patch
dtype, inplace, precision (autocast), and the pipeline restored on any error. Not covered yet
(ValueError): image files, retain, anchor, concept inversion, include_eos.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fmn.attention import concept_scores
from fmn.families.mmdit import MMDiTFamily
from fmn.patch import SCALE_SUFFIX, Patch, fingerprint, quantize_delta, restrict_fingerprint
from fmn.trainer import PATCH_DTYPES, PRECISIONS, ForgetError, templates

ADAPTER = "fmn"


def check_supported(opts, images):
    unsupported = [name for name, on in (("retain", opts.retain), ("anchor", opts.anchor),
                                         ("inversion", opts.inversion), ("include_eos", opts.include_eos)) if on]
    if images is not None and not isinstance(images, torch.Tensor):
        unsupported.append("images other than a latent tensor")
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported for SD3 / FLUX pipelines yet")


@torch.no_grad()
def generate_latents(pipe, family, prompts, seeds, opts, suppressed=None):
    """Latents [n, C, h, w] of the base pipeline's images (FLUX's packed output unpacked)."""
    from fmn.attention import suppress
    from fmn.families.mmdit import unpack_latents
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    kw = dict(prompt=prompts, num_inference_steps=opts.gen_steps, guidance_scale=opts.guidance_scale,
              height=opts.resolution, width=opts.resolution, generator=gens, output_type="latent",
              max_sequence_length=family.text_length)
    pipe.set_progress_bar_config(disable=True)
    with suppress(pipe, suppressed, backend=opts.backend) if suppressed else nullcontext():
        out = pipe(**kw).images
    if out.dim() == 3:
        side = opts.resolution // pipe.vae_scale_factor
        out = unpack_latents(out, side, side)
    return out.float()


def reference_items(pipe, family, concepts, images, tpl, opts, device):
    """(concept index, x0, visual target or None) for every reference latent."""
    n = opts.n_images or (4 if opts.resolution <= 64 else 10)
    items = []
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be latents [N, C, h, w], got shape {list(images.shape)}")
        items = [(ci, x.to(device, torch.float32), None) for ci in range(len(concepts)) for x in images]
    if images is None or opts.loss != "attention":
        for ci, c in enumerate(concepts):
            prompts = [tpl[i % len(tpl)].format(c) for i in range(n)]
            seeds = [opts.seed + 1000 * ci + i for i in range(n)]
            x0 = generate_latents(pipe, family, prompts, seeds, opts).to(device)
            targets = (generate_latents(pipe, family, prompts, seeds, opts, [c]).to(device)
                       if opts.loss != "attention" else [None] * n)
            items += [(ci, x, y) for x, y in zip(x0, targets)]
    return items


class Trainable:
    """The trained parameters (fp32) and the base tensors to put back."""

    def __init__(self, family, opts):
        self.family, self.opts, self.saved, self.lora = family, opts, {}, opts.train == "lora"
        model = family.denoiser
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        if self.lora:
            from peft import LoraConfig
            alpha = opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank
            model.add_adapter(LoraConfig(r=opts.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                         target_modules=family.lora_targets()), adapter_name=ADAPTER)
            self.named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
            touched = sorted({"transformer." + n.split(".lora_")[0] + ".weight" for n, _ in self.named})
        else:
            self.named = family.trainable(opts.train)
            touched = ["transformer." + n for n, _ in self.named]
            for n, p in self.named:
                self.saved[n] = p.detach().to("cpu", copy=True)
        self.fingerprint = fingerprint(family.pipe, touched)
        for _, p in self.named:
            p.data = p.data.float()
            p.requires_grad_(True)

    @property
    def params(self):
        return [p for _, p in self.named]

    def scale(self):
        return (self.opts.lora_alpha if self.opts.lora_alpha is not None else self.opts.lora_rank) / self.opts.lora_rank

    def patch_tensors(self):
        """({name: tensor}, kind) of what changed, in the patch dtype."""
        out_dtype = PATCH_DTYPES[self.opts.patch_dtype]
        tensors = {}
        if self.lora:
            from peft.utils import get_peft_model_state_dict
            sd = {k: v.detach().float().cpu()
                  for k, v in get_peft_model_state_dict(self.family.denoiser, adapter_name=ADAPTER).items()}
            for k, a in sd.items():
                b = sd.get(k.replace(".lora_A.", ".lora_B."))
                if ".lora_A." in k and b.any():
                    for key, t in ((k, a), (k.replace(".lora_A.", ".lora_B."), b * self.scale())):
                        tensors["transformer." + key] = t if out_dtype is None else t.to(out_dtype)
            return tensors, "lora"
        for n, p in self.named:
            trained, base = p.detach().float().cpu(), self.saved[n].float()
            if torch.equal(trained, base):
                continue
            if out_dtype is None:
                tensors["transformer." + n] = trained
            elif out_dtype == torch.int8:
                codes, scale = quantize_delta(trained - base)
                tensors["transformer." + n], tensors["transformer." + n + SCALE_SUFFIX] = codes, scale
            else:
                tensors["transformer." + n] = (trained - base).to(out_dtype)
        return tensors, "replace" if out_dtype is None else "delta"

    @torch.no_grad()
    def restore(self, keep):
        model = self.family.denoiser
        if self.lora:
            deltas = {}
            if keep:
                sd = dict(self.named)
                deltas = {n.split(".lora_A.")[0]: self.scale() * (sd[n.replace(".lora_A.", ".lora_B.")].float() @ a.float())
                          for n, a in sd.items() if ".lora_A." in n}
            model.unload_lora()
            for stem, d in deltas.items():
                w = model.get_submodule(stem).weight
                w.copy_((w.float() + d.reshape(w.shape).to(w.device)).to(w.dtype))
        named = dict(model.named_parameters())
        for n, base in self.saved.items():
            named[n].data = named[n].data.to(base.dtype) if keep else base.to(named[n].device)
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(self.flags.get(n, False))


def step_loss(family, model, items, text, columns, batch, opts, autocast, backward=None):
    """The forgetting loss on one batch (pick, rows, t, noise); backward(loss) when given."""
    pick, rows, t, noise = batch
    x0 = torch.stack([items[i][1] for i in pick])
    x_t = family.add_noise(x0, noise, t)
    scores = opts.loss in ("attention", "both")
    with concept_scores(model, columns[rows], backend=opts.backend) if scores else nullcontext() as recorder:
        with autocast():
            out = family.predict(model, x_t, t, text, rows)
        terms = [recorder.loss()] if scores else []
        has = [j for j, i in enumerate(pick) if items[i][2] is not None]
        if opts.loss != "attention" and has:
            target = torch.stack([items[pick[j]][2] for j in has])
            weight = opts.visual_weight if opts.loss == "both" else 1.0
            terms.append(weight * F.mse_loss(family.x0_estimate(x_t[has], out[has].float(), t[has]), target))
        loss = torch.stack(terms).sum()
        if backward is not None:
            if not torch.isfinite(loss):
                raise ForgetError(f"the loss became {loss.item()}; nothing was written. Try a lower lr.")
            backward(loss)
    return loss.item()


def forget_mmdit(pipe, concepts, images, opts, base_model) -> Patch:
    """fmn.forget for an SD3 / FLUX pipeline (concepts already checked, opts a ForgetOptions)."""
    check_supported(opts, images)
    family = MMDiTFamily(pipe)
    tpl = templates(opts.template)
    for c in concepts:
        family.concept_columns([t.format(c) for t in tpl], [c] * len(tpl))
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts.resolution = opts.resolution or family.default_resolution()
    if opts.precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")

    def autocast():
        return torch.autocast(device.type, dtype=PRECISIONS[opts.precision], enabled=opts.precision != "fp32")

    model = family.denoiser
    devices = {n: m.device for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    was_training, t_start = model.training, time.perf_counter()
    trainable, handle, ok = None, None, False
    try:
        pipe.to(device)
        items = reference_items(pipe, family, concepts, images, tpl, opts, device)
        prompts = [t.format(c) for c in concepts for t in tpl]
        concept_of = [ci for ci in range(len(concepts)) for _ in tpl]
        with torch.no_grad():
            embeds, pooled = family.encode_prompts(prompts)
            columns = family.concept_columns(prompts, [concepts[ci] for ci in concept_of]).to(device)
        text = type("Text", (), {"embeds": embeds.float(), "pooled": pooled.float()})()
        trainable = Trainable(family, opts)
        handle = family.fused_attention(opts.backend)
        optimizer = torch.optim.AdamW(trainable.params, lr=opts.lr, betas=tuple(opts.betas),
                                      weight_decay=opts.weight_decay)
        lo, hi = opts.timesteps[0], min(opts.timesteps[1], family.timestep_count())
        by_concept = [[r for r, c in enumerate(concept_of) if c == ci] for ci in range(len(concepts))]

        def sample(n, gen):
            pick = torch.randint(len(items), (n,), generator=gen).tolist()
            rows = torch.tensor([by_concept[items[i][0]][torch.randint(len(tpl), (1,), generator=gen).item()]
                                 for i in pick])
            t = torch.randint(lo, hi, (n,), generator=gen).to(device)
            return pick, rows, t, torch.randn((n,) + tuple(items[0][1].shape), generator=gen).to(device)

        eval_batch = sample(min(4, len(items)), torch.Generator().manual_seed(opts.seed + 12345))
        model.train()
        with torch.no_grad():
            loss_before = step_loss(family, model, items, text, columns, eval_batch, opts, autocast)
        g = torch.Generator().manual_seed(opts.seed + 1)
        losses, t_train = [], time.perf_counter()

        def backward(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

        for step in range(opts.steps):
            losses.append(step_loss(family, model, items, text, columns, sample(opts.batch_size, g), opts,
                                    autocast, backward))
            if opts.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable.params, opts.max_grad_norm)
            optimizer.step()
        t_train = time.perf_counter() - t_train
        with torch.no_grad():
            loss_after = step_loss(family, model, items, text, columns, eval_batch, opts, autocast)
        if not math.isfinite(loss_after) or not all(bool(torch.isfinite(p).all()) for p in trainable.params):
            raise ForgetError("the trained weights are not finite; nothing was written. Try a lower lr.")
        tensors, kind = trainable.patch_tensors()
        if not tensors:
            raise ForgetError("no weight changed during the run; nothing was written")
        touched = {k for k in tensors if not k.endswith(SCALE_SUFFIX)}
        if kind == "lora":
            touched = {k.split(".lora_")[0] + ".weight" for k in tensors}
        summary = {"seconds_total": round(time.perf_counter() - t_start, 4), "seconds_train": round(t_train, 4),
                   "steps": opts.steps, "batch_size": opts.batch_size, "device": str(device),
                   "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                   "loss_before": loss_before, "loss_after": loss_after, "losses": losses,
                   "n_trainable": sum(p.numel() for p in trainable.params), "n_reference": len(items),
                   "resolution": opts.resolution, "family": family.kind}
        patch = Patch(tensors=tensors, kind=kind, concepts=list(concepts), base_model=base_model,
                      fingerprint=restrict_fingerprint(trainable.fingerprint, touched), options=opts.record(),
                      summary=summary)
        summary["patch_bytes"] = patch.nbytes
        ok = True
        return patch
    finally:
        if handle is not None:
            handle.remove()
        if trainable is not None:
            trainable.restore(keep=ok and opts.inplace)
        model.train(was_training)
        for name, dev in devices.items():
            getattr(pipe, name).to(dev)
