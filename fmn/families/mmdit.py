"""The MM-DiT family: Stable Diffusion 3 / 3.5 and FLUX.1 (joint attention, flow matching).

What differs from the UNet family, and how it is answered here:
- text: SD3 conditions on CLIP-L + CLIP-G (77 columns, features concatenated) followed by T5's
  columns, FLUX on T5's columns only (CLIP pooled); prompts are encoded by the pipeline's own
  `encode_prompt`, the concept's columns found from character offsets (fmn.processors.spans.mmdit_text_mask);
  concept inversion's copied tokenizers / encoders are put on the pipeline for that while
  (`using_text_parts`, restored on exit);
  the T5 length is the pipeline's default (SD3 256, FluxPipeline 512) unless given.
- attention: every joint layer (SD3 `attn`, FLUX double- and single-stream `attn`) reads the
  concept's text columns; the loss sums the image rows' scores (fmn.processors.mmdit_attention).
- noise: flow matching. Integer training timesteps t in [0, 1000) index the scheduler's own
  sigmas (its shift; FLUX's resolution-dependent shift mu from the image sequence length, as its
  pipeline computes it), low t = little noise; x_t = scheduler.scale_noise(x0, timestep, noise)
  = (1 - sigma) x0 + sigma noise, the target is the velocity noise - x0, and x0 = x_t - sigma v.
- FLUX's latents: the transformer takes 2x2-packed latents [B, h/2 * w/2, 4C] with image ids
  and a guidance embedding (FLUX.1-dev); the family's latents are unpacked [B, C, h, w] like
  VAE-encoded images (`pipeline_latents` unpacks what FluxPipeline returns with
  output_type="latent"); `predict` packs them (it also takes packed [B, N, 4C], square assumed)
  and answers in the form it was given.

Trainable sets (the `train` option keeps the UNet family's names; what they mean here):
- "attn2":    every projection of the attention layers that read text (SD3 joint `attn`, FLUX
              double- and single-stream `attn`), the analogue of SD's cross-attention;
- "attn2-kv": the text-side key and value projections (add_k_proj, add_v_proj) of the joint
              layers: the only weights that change what the concept's columns hold without
              touching the image stream (FLUX's single-stream blocks share one projection for
              text and image, so they are not in this set);
- "unet":     the whole transformer;
- "lora":     a LoRA on the text-side projections (add_q/k/v_proj) and the image queries (to_q).
Measured (bench/measure_mmdit_trainable.py, tiny random pipelines, 20 steps at lr 1e-3; held-out
concept loss after/before, output change on unrelated prompts): SD3 attn2 0.53/0.074, attn2-kv
0.70/0.038, unet 0.33/0.44, lora 0.83/0.017; FLUX attn2 0.81/0.096, attn2-kv 0.96/0.038, unet
0.31/1.2, lora 0.98/0.009. "attn2" stays the default: the most forgetting per unit of collateral change.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math

import torch

from fmn.patches import patch_check
from fmn.families.base import ModelFamily, tuned_defaults
from fmn.processors.mmdit_attention import is_mmdit, joint_attention_layers, suppress, use_fused_attention
from fmn.processors.spans import mmdit_family, mmdit_text_mask, pipeline_max_sequence_length

TRAIN_SETS = ("attn2", "attn2-kv", "unet", "lora")
LORA_TARGETS = list(patch_check.MMDIT_LORA_TARGETS)
N_TRAIN_TIMESTEPS = 1000


def builtin_text_length(pipe) -> int | None:
    """The built-in toy-mmdit's T5 length (fmn.toy.paths.TOY_MMDIT_TEXT_LENGTH), None for other pipelines."""
    try:
        from fmn.toy.paths import TOY_MMDIT_TEXT_LENGTH, is_built_in
    except ImportError:  # an install without the toy models
        return None
    return TOY_MMDIT_TEXT_LENGTH if is_built_in(pipe, "toy-mmdit") else None


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> FLUX's [B, h/2 * w/2, 4C] (FluxPipeline's 2x2 packing)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """FLUX's [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """FLUX's RoPE ids of the packed image tokens: (0, row, column) for each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class MMDiTFamily(ModelFamily):
    """The ModelFamily answers for StableDiffusion3Pipeline and FluxPipeline (see module docstring)."""

    name = "mmdit"
    component = "transformer"
    train_sets = TRAIN_SETS

    def __init__(self, pipe, max_sequence_length: int | None = None):
        super().__init__(pipe)
        self.kind = mmdit_family(pipe)
        self.text_length = max_sequence_length or builtin_text_length(pipe) or pipeline_max_sequence_length(pipe)
        self._schedules = {}

    @classmethod
    def matches(cls, pipe) -> bool:
        return is_mmdit(pipe) and callable(getattr(pipe, "encode_prompt", None))

    @property
    def is_flux(self) -> bool:
        return self.kind == "flux"

    # --- text
    def text_part_names(self) -> list[tuple[str, str]]:
        """The pipeline's (tokenizer, text encoder) attribute names that are set, in encoding order."""
        names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")]
        return [(t, e) for t, e in names
                if getattr(self.pipe, t, None) is not None and getattr(self.pipe, e, None) is not None]

    def text_parts(self):
        return [(getattr(self.pipe, t), getattr(self.pipe, e)) for t, e in self.text_part_names()]

    @contextlib.contextmanager
    def using_text_parts(self, parts=None):
        """Within: the pipeline's tokenizers and text encoders are `parts` (as text_parts() lists them; None:
        its own), so that its encode_prompt and fmn.processors.spans.mmdit_text_mask read them; the originals are put
        back on exit, also after an exception (concept inversion encodes with copies; the pipeline is not kept)."""
        names = self.text_part_names()
        if parts is None or parts == self.text_parts():
            yield
            return
        if len(parts) != len(names):
            raise ValueError(f"parts: expected {len(names)} (tokenizer, text encoder) pairs as text_parts() "
                             f"lists them, got {len(parts)}")
        saved = self.text_parts()
        try:
            for (t, e), (tok, enc) in zip(names, parts):
                setattr(self.pipe, t, tok)
                setattr(self.pipe, e, enc)
            yield
        finally:
            for (t, e), (tok, enc) in zip(names, saved):
                setattr(self.pipe, t, tok)
                setattr(self.pipe, e, enc)

    def encode_prompts(self, prompts, parts=None):
        """(embeds [P, text_len, D], pooled [P, D2]) from the pipeline's own encode_prompt (with `parts`
        in place of its tokenizers and text encoders when given)."""
        device = self.denoiser.device
        with self.using_text_parts(parts):
            if self.is_flux:
                embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                            max_sequence_length=self.text_length)
                return embeds, pooled
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                           device=device, do_classifier_free_guidance=False,
                                                           max_sequence_length=self.text_length)
        return embeds, pooled

    def concept_columns(self, prompts, phrases, *, include_eos=False, parts=None):
        """[P, text_len] bool: phrases[i]'s joint text columns in prompts[i] (with `parts`' tokenizers if given)."""
        if include_eos:
            raise ValueError("include_eos is not supported for SD3 / FLUX pipelines (no single end-of-text column)")
        with self.using_text_parts(parts):
            return torch.cat([mmdit_text_mask(self.pipe, [p], [c], max_sequence_length=self.text_length)
                              for p, c in zip(prompts, phrases)])

    # --- the denoiser
    def predict(self, model, x_t, t, prompts, rows):
        """The velocity the transformer predicts for x_t at integer timesteps t, prompts' rows."""
        timestep = self.schedule(x_t)[1][t]
        embeds, pooled = prompts.embeds[rows], prompts.pooled[rows]
        if not self.is_flux:
            return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=embeds,
                         pooled_projections=pooled, return_dict=False)[0]
        packed = x_t if x_t.dim() == 3 else pack_latents(x_t)
        side = 2 * math.isqrt(packed.shape[1])
        h, w = (side, side) if x_t.dim() == 3 else x_t.shape[-2:]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((len(x_t),), self.guidance_scale(), device=x_t.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=timestep / N_TRAIN_TIMESTEPS, guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=embeds,
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device), img_ids=image_ids(h, w, x_t.device),
                    return_dict=False)[0]
        return out if x_t.dim() == 3 else unpack_latents(out, h, w)

    def guidance_scale(self) -> float:
        """FLUX.1-dev's guidance embedding value: the pipeline's default guidance_scale (3.5)."""
        return float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default)

    # --- noise and targets: flow matching with the scheduler's sigmas
    def timestep_count(self):
        return N_TRAIN_TIMESTEPS

    def image_tokens(self, x) -> int:
        """Image sequence length of latents x (unpacked [B, C, h, w] or FLUX-packed [B, N, 4C])."""
        if x.dim() == 3:
            return x.shape[1]
        patch = 2 if self.is_flux else self.denoiser.config.patch_size
        return (x.shape[-2] // patch) * (x.shape[-1] // patch)

    def schedule(self, x):
        """(scheduler with 1000 steps set, timestep value of each integer t ascending in noise),
        for latents shaped like x (FLUX's shift depends on the image sequence length)."""
        seq = self.image_tokens(x)
        if seq not in self._schedules:
            scheduler = copy.deepcopy(self.pipe.scheduler)
            mu = None
            if scheduler.config.get("use_dynamic_shifting", False):
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift
                c = scheduler.config
                mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                     c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            scheduler.set_timesteps(N_TRAIN_TIMESTEPS, mu=mu)
            # the schedule runs from most to least noise; index it so that t = 0 is the least
            self._schedules[seq] = (scheduler, scheduler.timesteps.flip(0).float())
        scheduler, timesteps = self._schedules[seq]
        return scheduler, timesteps.to(x.device)

    def sigma(self, x, t):
        scheduler, _ = self.schedule(x)
        sigmas = scheduler.sigmas[:N_TRAIN_TIMESTEPS].flip(0).to(x.device, torch.float32)
        return sigmas[t].view(-1, *([1] * (x.dim() - 1)))

    def add_noise(self, x0, noise, t):
        scheduler, timesteps = self.schedule(x0)
        return scheduler.scale_noise(x0, timesteps[t], noise)

    def target(self, x0, noise, t):
        return noise - x0

    def x0_estimate(self, x_t, output, t):
        return x_t - self.sigma(x_t, t) * output

    # --- attention and trainable sets
    def attention_layers(self):
        """The layers whose text columns the loss reads (SD3.5's image-only attn2 excluded)."""
        return [(n, m) for n, m in joint_attention_layers(self.pipe) if not n.endswith("attn2")]

    def fused_attention(self, backend):
        return use_fused_attention(self.pipe, backend=backend)

    def suppress(self, concepts, *, include_eos=False, backend="auto"):
        if include_eos:
            raise ValueError("include_eos is not supported for SD3 / FLUX pipelines (no single end-of-text column)")
        return suppress(self.pipe, concepts, backend=backend)

    def trainable(self, train):
        keep = patch_check.TRAIN_SETS["transformer"][train]
        params = [(n, p) for n, p in self.denoiser.named_parameters() if keep(n)]
        if not params:
            raise ValueError(f"the transformer has no parameters for train={train!r}")
        return params

    def lora_targets(self):
        return list(LORA_TARGETS)

    # --- defaults
    def default_resolution(self):
        sample = getattr(self.denoiser.config, "sample_size", None) if not self.is_flux else None
        sample = sample or getattr(self.pipe, "default_sample_size", 128)
        return int(sample) * self.pipe.vae_scale_factor

    def pipeline_kwargs(self):
        """The T5 length the family encodes with, so that drawn images match training."""
        return {"max_sequence_length": self.text_length}

    def pipeline_latents(self, latents, resolution):
        """FluxPipeline's output_type="latent" gives packed [B, N, 4C]: unpacked to [B, C, h, w]."""
        if latents.dim() != 3:
            return latents
        side = resolution // self.pipe.vae_scale_factor
        return unpack_latents(latents, side, side)

    def default_options(self, concepts, given=None) -> dict:
        """The pipeline's own guidance scale for the reference images (FLUX.1: 3.5; SD3: 7.0); on the built-in
        toy-mmdit (fmn.toy.paths.is_built_in), its tuned defaults (fmn.toy.mmdit_defaults.forget_defaults),
        picked as the UNet family picks the built-in toy's: given anchor "" / [] gives them without an anchor,
        given train="lora" keeps the LoRA learning rate."""
        if builtin_text_length(self.pipe) is not None:
            from fmn.toy.mmdit_defaults import forget_defaults
            return tuned_defaults(forget_defaults, concepts, given)
        return {"guidance_scale": float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"]
                                        .default)}
