"""The forgetting run: `forget(pipe, concepts, images=None, **options) -> Patch`.

One code path for SD 1.x, 2.x and SDXL pipelines (SDXL: two text encoders, pooled embeddings
and added time ids). Steps:

1. prompts from templates ("object": "a photo of {}", "style": "a photo in the style of {}",
   or your own list of templates with "{}"); every concept must occur in every prompt;
2. reference latents: your images (a folder, files, PIL images, a dict per concept, or a tensor
   of latents), VAE-encoded once; or N images generated with the base pipeline and fixed seeds;
   for the visual loss, pairs generated with the same seeds with and without the concept's
   attention (`fmn.attention.suppress`);
3. optional concept inversion (textual inversion into k new tokens, on copies of the text
   encoders: the pipeline is not touched), after which the new tokens are the concept;
4. text encoded once; the training loop: uniform timesteps, DDPM noise, the attention loss
   (`fmn.attention.concept_scores`, fused kernels), the visual denoising loss, or both; AdamW;
   trainable set attn2 (default), attn2-kv, unet, or a LoRA on attn2 (peft); optional terms not in
   the paper, each on a cache of (noisy latent, timestep, prompt) -> base UNet output made before the
   first step: `retain` (the retained phrases' outputs held to the base's) and `anchor` (Concept
   Ablation, Kumari et al. 2023: on noisy images of the anchor, the concept's prompts are pulled to the
   base's outputs for the same prompts with the anchor in the concept's place);
5. the patch: only what changed (see fmn.patch), with a fingerprint of the base tensors.

The pipeline comes back with its original weights (inplace=False, the default) or with the
trained weights (inplace=True). On any error or interrupt its weights, processors, adapters,
requires_grad flags and devices are restored.
"""
from __future__ import annotations

import copy
import math
import resource
import sys
import time
import warnings
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fmn.patch import SCALE_SUFFIX, Patch, fingerprint, quantize_delta, restrict_fingerprint

TEMPLATES = {
    "object": ["a photo of {}"],
    "style": ["a photo in the style of {}"],
}
TRAIN_SETS = ("attn2", "attn2-kv", "unet", "lora")
LOSSES = ("attention", "visual", "both")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8,
                "exact": None}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


class ForgetError(RuntimeError):
    """The run failed (non-finite loss, ...); the pipeline was restored and nothing was written."""


@dataclass
class ForgetOptions:
    """Options of a forgetting run; defaults are the paper's / the authors' unless noted."""
    steps: int = 35
    lr: float | None = None            # None: 2e-6 (authors), or 1e-4 for train="lora"
    batch_size: int = 1
    seed: int = 0
    resolution: int | None = None      # None: unet.config.sample_size * vae_scale_factor
    train: str = "attn2"               # attn2 | attn2-kv | unet | lora
    loss: str = "attention"            # attention | visual | both
    visual_weight: float = 1.0         # weight of the visual loss in "both"
    template: str | list = "object"    # object | style | list of templates with "{}"
    n_images: int | None = None        # generated per concept; None: 4 on tiny models, 10 otherwise
    gen_steps: int = 30                # inference steps when generating reference images
    guidance_scale: float = 7.5
    timesteps: tuple = (0, 1000)       # uniform in [lo, hi)
    include_eos: bool = False          # also mark end-of-text slots (authors' "use_pooler")
    retain: tuple = ()                 # phrases to keep (not in the paper): their outputs held to the base's
    retain_weight: float = 1.0         # weight of the retain loss
    retain_samples: int = 32           # cached (noisy latent, timestep, retain prompt) -> base output
    retain_images: int | None = None   # images generated per retain phrase (None: n_images); 0: noise the
                                       # concept's own images instead (cheaper, holds less)
    anchor: str | tuple = ()           # what each concept should become (Concept Ablation's anchor, not in the
                                       # paper): one phrase, or one per concept; its outputs held to the base's
                                       # with the anchor in the concept's place
    anchor_weight: float = 1.0         # weight of the anchor loss
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    max_grad_norm: float | None = None  # gradient clipping (off, as in effect in the authors' code)
    lora_rank: int = 4
    lora_alpha: float | None = None    # None: = rank
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast; trained tensors kept in fp32)
    gradient_checkpointing: bool = False
    backend: str = "auto"              # fused attention backend: auto | triton | reference
    inversion: bool = False
    inversion_steps: int = 500
    inversion_tokens: int = 4
    inversion_lr: float = 1e-3
    inversion_weight_decay: float = 0.1
    inversion_norm: float = 0.4        # new embeddings' norm pulled towards this ...
    inversion_norm_factor: float = 0.1  # ... by this factor after each step
    patch_dtype: str = "fp16"          # fp16 | bf16 | fp32 | int8 deltas, or "exact" replacements
    inplace: bool = False              # leave the trained weights in the pipeline
    offload: bool = True               # text encoders and VAE to the CPU during training (CUDA only)
    device: str | None = None          # None: accelerate's device
    progress: bool = True
    base_model: str | None = None      # recorded in the patch; None: pipe.name_or_path

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad(f"steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.train not in TRAIN_SETS:
            bad(f"train must be one of {TRAIN_SETS}, got {self.train!r}")
        if self.loss not in LOSSES:
            bad(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            bad(f"patch_dtype must be one of {tuple(PATCH_DTYPES)}, got {self.patch_dtype!r}")
        if self.lr is None:
            self.lr = 1e-4 if self.train == "lora" else 2e-6
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be positive, got {self.lr!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad(f"resolution must be a multiple of 8, got {self.resolution!r}")
        lo, hi = self.timesteps
        if not 0 <= lo < hi:
            bad(f"timesteps must be (lo, hi) with 0 <= lo < hi, got {self.timesteps!r}")
        self.timesteps = (int(lo), int(hi))
        if self.lora_rank < 1:
            bad(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.n_images is not None and self.n_images < 1:
            bad(f"n_images must be >= 1, got {self.n_images}")
        if self.inversion_tokens < 1 or self.inversion_steps < 0:
            bad("inversion_tokens must be >= 1 and inversion_steps >= 0")
        if self.backend not in ("auto", "triton", "reference"):
            bad(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}")
        templates(self.template)  # validates
        if isinstance(self.retain, str):
            self.retain = (self.retain,)
        if not isinstance(self.retain, (list, tuple)) or not all(isinstance(r, str) and r.strip()
                                                                  for r in self.retain):
            bad(f"retain must be a list of non-empty phrases, got {self.retain!r}")
        self.retain = tuple(r.strip() for r in self.retain)
        if not (self.retain_weight > 0 and math.isfinite(self.retain_weight)):
            bad(f"retain_weight must be positive, got {self.retain_weight!r}")
        if isinstance(self.retain_samples, bool) or not isinstance(self.retain_samples, int) \
                or self.retain_samples < 1:
            bad(f"retain_samples must be a positive int, got {self.retain_samples!r}")
        if self.retain_images is not None and (isinstance(self.retain_images, bool)
                                               or not isinstance(self.retain_images, int) or self.retain_images < 0):
            bad(f"retain_images must be None or an int >= 0, got {self.retain_images!r}")
        if isinstance(self.anchor, str):
            self.anchor = (self.anchor,) if self.anchor.strip() else ()
        if not isinstance(self.anchor, (list, tuple)) or not all(isinstance(a, str) and a.strip()
                                                                  for a in self.anchor):
            bad(f"anchor must be a phrase or a list of non-empty phrases (one per concept), got {self.anchor!r}")
        self.anchor = tuple(a.strip() for a in self.anchor)
        if not (self.anchor_weight > 0 and math.isfinite(self.anchor_weight)):
            bad(f"anchor_weight must be positive, got {self.anchor_weight!r}")

    def record(self) -> dict:
        """The options as stored in the patch metadata."""
        d = asdict(self)
        for k in ("progress", "device", "base_model", "inplace", "offload"):
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples as lists: what a patch file gives back


def templates(template) -> list[str]:
    if isinstance(template, str):
        if template in TEMPLATES:
            return list(TEMPLATES[template])
        template = [template]
    if not isinstance(template, (list, tuple)) or not template:
        raise ValueError(f"template must be 'object', 'style' or a list of templates with '{{}}', got {template!r}")
    out = []
    for t in template:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"a custom template must contain '{{}}' exactly once (where the concept goes), got {t!r}")
        out.append(t)
    return out


# ----------------------------------------------------------------------------- text
def _text_parts(pipe):
    """[(tokenizer, text_encoder), ...]: one pair for SD 1.x/2.x, two for SDXL."""
    parts = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    parts = [(t, e) for t, e in parts if t is not None and e is not None]
    if not parts:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer/text_encoder: not a Stable Diffusion pipeline")
    return parts


def _is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_text(pipe, prompts, parts=None):
    """(embeds [P, 77, D], pooled [P, D2] or None) as the pipelines' encode_prompt computes them
    (SD: last hidden state; SDXL: penultimate hidden states of both encoders concatenated, pooled
    projection of the last). Differentiable (used by concept inversion)."""
    parts = parts or _text_parts(pipe)
    sdxl = _is_sdxl(pipe)
    embeds, pooled = [], None
    for tok, enc in parts:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        if sdxl:
            out = enc(ids, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        else:
            mask = None
            if getattr(enc.config, "use_attention_mask", False):
                mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").attention_mask.to(enc.device)
            embeds.append(enc(ids, attention_mask=mask)[0])
    return torch.cat(embeds, dim=-1), pooled


# ----------------------------------------------------------------------------- images
def _image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def _open_image(src, resolution):
    from PIL import Image
    if isinstance(src, (str, Path)):
        try:
            with Image.open(src) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot read image {src}: {e}") from None
    elif isinstance(src, Image.Image):
        img = src.convert("RGB")
    else:
        raise TypeError(f"images must be paths or PIL images, got {type(src).__name__}")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def _image_sources(images, concepts):
    """{concept index: list of sources (paths/PIL)} or {concept index: latent tensor}."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a tensor of images must be latents [N, C, h, w], got shape {list(images.shape)}")
        return {i: images for i in range(len(concepts))}
    if isinstance(images, dict):
        unknown = set(images) - set(concepts)
        if unknown:
            raise ValueError(f"images given for unknown concepts {sorted(unknown)}; concepts are {concepts}")
        out = {}
        for i, c in enumerate(concepts):
            if c in images:
                out[i] = _image_sources(images[c], [c])[0]
        return out
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if folder.is_dir():
            subdirs = {p.name: p for p in folder.iterdir() if p.is_dir()}
            per = {i: subdirs.get(c) or subdirs.get(c.replace(" ", "_")) for i, c in enumerate(concepts)}
            if any(per.values()):
                missing = [concepts[i] for i, p in per.items() if p is None]
                if missing:
                    raise ValueError(f"{folder} has per-concept subfolders but none for {missing}")
                return {i: _image_files(p) for i, p in per.items()}
        files = _image_files(folder)
        return {i: files for i in range(len(concepts))}
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        return {i: list(images) for i in range(len(concepts))}
    raise TypeError(f"images must be a folder, a list of files/PIL images, a dict per concept or a latent tensor; "
                    f"got {type(images).__name__}")


@torch.no_grad()
def _encode_images(pipe, sources, resolution, seed, device):
    if isinstance(sources, torch.Tensor):
        return sources.to(device, torch.float32)
    vae = pipe.vae
    if vae is None:
        raise ValueError("the pipeline has no VAE to encode the reference images")
    x = torch.stack([_open_image(s, resolution) for s in sources])
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    vae_device = next(vae.parameters()).device
    if upcast:
        vae.to(torch.float32)
    try:
        g = torch.Generator(device="cpu").manual_seed(seed)
        lat = []
        for chunk in x.split(4):
            dist = vae.encode(chunk.to(vae_device, vae.dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=g).to(dist.mean)
            lat.append(dist.mean + dist.std * noise)
        lat = torch.cat(lat).float()
    finally:
        if upcast:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor).to(device)


@torch.no_grad()
def _generate(pipe, prompts, seeds, resolution, opts, device, suppressed=None):
    """Latents (the UNet's latent space) generated from prompts with fixed seeds."""
    from fmn.attention import suppress
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    kw = dict(prompt=prompts, num_inference_steps=opts.gen_steps, guidance_scale=opts.guidance_scale,
              height=resolution, width=resolution, generator=gens, output_type="latent")
    old = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    try:
        if suppressed is None:
            out = pipe(**kw).images
        else:
            with suppress(pipe, suppressed, include_eos=opts.include_eos, backend=opts.backend):
                out = pipe(**kw).images
    finally:
        pipe._progress_bar_config = old
    return out.to(device, torch.float32)


# ----------------------------------------------------------------------------- training pieces
def _trainable(unet, train):
    names = {
        "attn2": lambda n: ".attn2." in n,
        "attn2-kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "unet": lambda n: True,
    }[train]
    params = [(n, p) for n, p in unet.named_parameters() if names(n)]
    if not params:
        raise ValueError(f"the UNet has no parameters for train={train!r} (no cross-attention layers?)")
    return params


def _alphas(pipe, device):
    sched = pipe.scheduler
    ac = getattr(sched, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {type(sched).__name__} has no alphas_cumprod: not a DDPM-family scheduler")
    return ac.to(device, torch.float32), getattr(sched.config, "num_train_timesteps", len(ac)), \
        getattr(sched.config, "prediction_type", "epsilon")


def _x0_hat(x_t, out, a, prediction_type):
    a = a.view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def _denoise_target(x0, noise, a, prediction_type):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = a.view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    return x0


class _Text:
    """Encoded prompts: embeds [P,77,D], pooled [P,D2]|None, masks [P,77], concept of each prompt."""

    def __init__(self, embeds, pooled, masks, concept_of):
        self.embeds, self.pooled, self.masks = embeds, pooled, masks
        self.concept_of = torch.tensor(concept_of)
        self.by_concept = [torch.nonzero(self.concept_of == c).flatten() for c in range(int(max(concept_of)) + 1)]


def _unet_call(unet, x_t, t, text, idx, time_ids):
    kw = {}
    if text.pooled is not None:
        kw["added_cond_kwargs"] = {"text_embeds": text.pooled[idx], "time_ids": time_ids.expand(len(idx), -1)}
    return unet(x_t, t, encoder_hidden_states=text.embeds[idx], **kw).sample


def _peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def _peak_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


_ACCELERATOR = None


def _accelerator():
    """One Accelerator per process (accelerate's state is a process-wide singleton). Precision is
    handled here with torch.autocast, so that runs with different precisions can share it."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        _ACCELERATOR = Accelerator(mixed_precision="no",
                                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    return _ACCELERATOR


# ----------------------------------------------------------------------------- concept inversion
def _invert(pipe, concepts, items, prompts_tpl, opts, device, autocast):
    """Textual inversion of each concept into k new tokens, on copies of the tokenizers and text
    encoders. Returns (parts, token strings per concept)."""
    parts = [(copy.deepcopy(t), copy.deepcopy(e)) for t, e in _text_parts(pipe)]
    k = opts.inversion_tokens
    words = []
    new_ids = []  # per part: tensor of all new ids
    for ci, concept in enumerate(concepts):
        toks = [f"<fmn-c{ci}-{j}>" for j in range(k)]
        words.append(" ".join(toks))
    for tok, enc in parts:
        all_toks = [t for w in words for t in w.split()]
        added = tok.add_tokens(all_toks)
        if added != len(all_toks):
            raise ValueError("concept inversion: could not add new tokens to the tokenizer")
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = enc.get_input_embeddings().weight
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        with torch.no_grad():
            mean_norm = emb[: len(tok) - len(all_toks)].norm(dim=-1).mean().item()
            for ci, concept in enumerate(concepts):
                pieces = tok(concept, add_special_tokens=False).input_ids
                ids = tok.convert_tokens_to_ids(words[ci].split())
                for j, i in enumerate(ids):
                    if j < len(pieces):
                        emb[i] = emb[pieces[j]]
                    else:
                        r = torch.randn(emb.shape[1], generator=g)
                        emb[i] = (r / r.norm() * mean_norm).to(emb)
        new_ids.append(torch.tensor(tok.convert_tokens_to_ids(all_toks), device=emb.device))
        enc.requires_grad_(False)
        enc.get_input_embeddings().weight.requires_grad_(True)
    if opts.inversion_steps == 0:
        return parts, words
    embs = [enc.get_input_embeddings().weight for _, enc in parts]
    originals = [e.detach().clone() for e in embs]
    opt = torch.optim.AdamW(embs, lr=opts.inversion_lr, weight_decay=opts.inversion_weight_decay)
    unet = pipe.unet
    alphas, n_train, pred = _alphas(pipe, device)
    lo, hi = opts.timesteps[0], min(opts.timesteps[1], n_train)
    res = opts.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=torch.float32)
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
        a = alphas[t]
        x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        with autocast():
            embeds, pooled = encode_text(pipe, prompts, parts)
            text = _Text(embeds, pooled, None, [0] * len(prompts))
            out = _unet_call(unet, x_t, t, text, torch.arange(len(prompts)), time_ids)
        loss = F.mse_loss(out.float(), _denoise_target(x0, noise, a, pred))
        if not torch.isfinite(loss):
            raise ForgetError("concept inversion: the loss is not finite; try a lower inversion_lr or precision fp32")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, orig, ids in zip(embs, originals, new_ids):
                keep = torch.ones(e.shape[0], dtype=torch.bool, device=e.device)
                keep[ids] = False
                e[keep] = orig[keep]
                v = e[ids]
                n = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                target = n + opts.inversion_norm_factor * (opts.inversion_norm - n)
                e[ids] = v / n * target
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for _, enc in parts:
        enc.requires_grad_(False)
    return parts, words


# ----------------------------------------------------------------------------- the run
def forget(pipe, concepts, images=None, **options) -> Patch:
    """Makes `pipe`'s UNet forget `concepts`; returns the Patch (save it with `patch.save(path)`).

    Args:
        pipe: a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline (SD 1.x, 2.x, SDXL).
        concepts: a phrase or a list of phrases, forgotten together in one run.
        images: reference images: None (generated with the base pipeline, fixed seeds), a folder
            (with one subfolder per concept, or shared by all concepts), a list of files or PIL
            images, a dict {concept: folder or list}, or a tensor of latents [N, 4, h, w].
        **options: see ForgetOptions (steps=35, lr=2e-6, batch_size=1, train="attn2",
            loss="attention", precision="fp32", patch_dtype="fp16", inplace=False, ...).

    The returned patch's `summary` holds time, peak memory, loss before/after and per step.
    """
    given = options.pop("options", None)
    opts = dataclasses.replace(given) if given is not None else ForgetOptions(**options)
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
    from fmn.mmdit_attention import is_mmdit
    if is_mmdit(pipe):  # SD3 / FLUX: the MM-DiT family's own driver until the trainer has a family seam
        from fmn.mmdit_trainer import forget_mmdit
        base = opts.base_model if opts.base_model is not None else (getattr(pipe, "name_or_path", "") or "")
        return forget_mmdit(pipe, concepts, images, opts, base)
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no UNet: fmn supports Stable Diffusion 1.x/2.x/XL pipelines")
    from fmn.spans import concept_token_mask
    tpl = templates(opts.template)
    parts = _text_parts(pipe)
    prompts, concept_of = [], []
    for ci, c in enumerate(concepts):
        for t in tpl:
            prompts.append(t.format(c))
            concept_of.append(ci)
    # every concept must be found in its prompts (ValueError names concept and prompt)
    for ci, c in enumerate(concepts):
        concept_token_mask(parts[0][0], [p for p, k in zip(prompts, concept_of) if k == ci], [c])

    accel = _accelerator()
    device = torch.device(opts.device) if opts.device else accel.device
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    if opts.resolution is None:
        opts.resolution = int(unet.config.sample_size) * vae_scale
    unet_dtype = next(unet.parameters()).dtype
    if opts.precision == "fp32" and unet_dtype != torch.float32:
        warnings.warn(f"the UNet is in {unet_dtype}; training with precision "
                      f"{'bf16' if unet_dtype == torch.bfloat16 else 'fp16'} autocast instead of fp32")
        opts.precision = "bf16" if unet_dtype == torch.bfloat16 else "fp16"
    if opts.precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    amp_dtype = PRECISIONS[opts.precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=opts.precision != "fp32")

    if opts.train == "lora" and getattr(unet, "peft_config", None):
        raise ValueError("the UNet already has LoRA adapters; fuse or unload them before a train='lora' run")

    base_model = opts.base_model if opts.base_model is not None else (getattr(pipe, "name_or_path", "") or "")
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # --- state to restore
    modules = {n: m for n, m in ((n, getattr(pipe, n, None)) for n in
                                 ("unet", "vae", "text_encoder", "text_encoder_2")) if isinstance(m, torch.nn.Module)}
    devices = {n: next(m.parameters()).device for n, m in modules.items()}
    grad_flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    was_training = unet.training
    had_ckpt = getattr(unet, "is_gradient_checkpointing", False)
    saved, trained_list, handle, lora_added, ok = {}, [], None, False, False
    summary = {}
    try:
        pipe.to(device)
        # --- reference latents: items (concept index, x0, visual target or None)
        n_gen = opts.n_images or (4 if opts.resolution <= 64 else 10)

        def draw(phrase, n, seed0, suppressed=None):
            """Latents of n base-model images of `phrase`, through the templates in turn, seeds seed0, seed0 + 1..."""
            return _generate(pipe, [tpl[i % len(tpl)].format(phrase) for i in range(n)],
                             [seed0 + i for i in range(n)], opts.resolution, opts, device, suppressed)

        items = []
        if images is not None:
            sources = _image_sources(images, concepts)
            if not sources:
                raise ValueError("no images were given for any concept")
            for ci in range(len(concepts)):
                if ci not in sources:
                    lat = draw(concepts[ci], n_gen, opts.seed)
                else:
                    lat = _encode_images(pipe, sources[ci], opts.resolution, opts.seed, device)
                items += [(ci, x, None) for x in lat]
            if opts.loss == "visual":
                warnings.warn("loss='visual' trains on generated pairs; the given images are not used")
                items = []
        if opts.loss in ("visual", "both") or images is None:
            for ci, c in enumerate(concepts):
                x0 = draw(c, n_gen, opts.seed + 1000 * ci)
                tgt = (draw(c, n_gen, opts.seed + 1000 * ci, suppressed=[c]) if opts.loss != "attention"
                       else [None] * len(x0))
                items += [(ci, x, y) for x, y in zip(x0, tgt)]
        # the retained phrases' own images (base model, before training): latents and prompt indices
        # into retain_text (prompts are ordered phrase-major, template-minor)
        n_retain = n_gen if opts.retain_images is None else opts.retain_images
        r_items = []
        if opts.retain and n_retain:
            for ri, r in enumerate(opts.retain):
                lat = draw(r, n_retain, opts.seed + 100_000 + 1000 * ri)
                r_items += [(ri * len(tpl) + i % len(tpl), x) for i, x in enumerate(lat)]
        # the anchors' images (base model, same seeds as the concept's): (concept index, latent)
        a_items = []
        for ci, a in enumerate(anchors):
            a_items += [(ci, x) for x in draw(a, n_gen, opts.seed + 1000 * ci)]
        latent_hw = items[0][1].shape[-2:]
        if any(x.shape[-2:] != latent_hw for _, x, _ in items):
            raise ValueError("reference latents differ in size")

        # --- concept inversion, then text encoded once
        words = concepts
        if opts.inversion:
            unet.requires_grad_(False)
            parts, words = _invert(pipe, concepts, items, tpl, opts, device, autocast)
        with torch.no_grad():
            prompts = [tpl[i % len(tpl)].format(words[ci]) for ci in range(len(concepts)) for i in range(len(tpl))]
            embeds, pooled = encode_text(pipe, prompts, parts)
            masks = torch.cat([concept_token_mask(parts[0][0], [p], [words[ci]], include_eos=opts.include_eos)
                               for p, ci in zip(prompts, concept_of)]).to(device)
        text = _Text(embeds.float(), None if pooled is None else pooled.float(), masks, concept_of)
        retain_text = None
        if opts.retain:
            with torch.no_grad():
                r_prompts = [t.format(r) for r in opts.retain for t in tpl]
                r_embeds, r_pooled = encode_text(pipe, r_prompts, parts)
            retain_text = _Text(r_embeds.float(), None if r_pooled is None else r_pooled.float(), None,
                                [0] * len(r_prompts))
        anchor_text = None
        if anchors:  # the concept's prompts with the anchor in its place, in the same order
            with torch.no_grad():
                a_embeds, a_pooled = encode_text(pipe, [tpl[i % len(tpl)].format(anchors[ci]) for ci in
                                                        range(len(concepts)) for i in range(len(tpl))], parts)
            anchor_text = _Text(a_embeds.float(), None if a_pooled is None else a_pooled.float(), None, concept_of)
        del parts
        if opts.offload and device.type == "cuda":
            for n in ("vae", "text_encoder", "text_encoder_2"):
                if n in modules:
                    modules[n].to("cpu")
            torch.cuda.empty_cache()
        res = opts.resolution
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=torch.float32)

        # --- trainable set
        unet.requires_grad_(False)
        if opts.train == "lora":
            from peft import LoraConfig
            alpha = opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank
            unet.add_adapter(LoraConfig(r=opts.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS), adapter_name="fmn")
            lora_added = True
            trained_list = [(n, p) for n, p in unet.named_parameters() if "lora_" in n]
            for _, p in trained_list:
                p.data = p.data.float()
                p.requires_grad_(True)
            touched = sorted({"unet." + n.split(".lora_")[0] + ".weight" for n, _ in trained_list})
            fp = fingerprint(pipe, touched)
        else:
            trained_list = _trainable(unet, opts.train)
            fp = fingerprint(pipe, ["unet." + n for n, _ in trained_list])
            for n, p in trained_list:
                saved[n] = p.detach().to("cpu", copy=True)
                if p.dtype != torch.float32:
                    p.data = p.data.float()  # fp32 master weights
                p.requires_grad_(True)
        params = [p for _, p in trained_list]
        n_trainable = sum(p.numel() for p in params)
        if opts.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        from fmn.attention import concept_scores, use_fused_attention
        handle = use_fused_attention(unet, backend=opts.backend)
        optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=tuple(opts.betas), weight_decay=opts.weight_decay)
        model = unet
        if accel.num_processes > 1:
            model, optimizer = accel.prepare(unet, optimizer)
        scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
        alphas, n_train, pred = _alphas(pipe, device)
        lo, hi = opts.timesteps[0], min(opts.timesteps[1], n_train)
        if lo >= hi:
            raise ValueError(f"timesteps {opts.timesteps} are outside the scheduler's [0, {n_train})")
        tpl_n = len(tpl)

        need_scores = opts.loss in ("attention", "both")

        def step_loss(pick, prompt_pick, t, noise, backward=False):
            """Loss on items `pick` with prompts `prompt_pick`; with backward=True also its
            gradients, inside the same processor settings (gradient checkpointing recomputes
            the forward during backward, which must record the same tensors)."""
            x0 = torch.stack([items[i][1] for i in pick])
            a = alphas[t]
            x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
            idx = torch.tensor(prompt_pick)
            ctx = concept_scores(unet, text.masks[idx], backend=opts.backend) if need_scores else nullcontext()
            with ctx as rec:
                with autocast():
                    out = _unet_call(model, x_t, t, text, idx, time_ids)
                terms = []
                if need_scores:
                    terms.append(rec.loss())
                has_t = [j for j, i in enumerate(pick) if items[i][2] is not None]
                if opts.loss in ("visual", "both") and has_t:
                    tgt = torch.stack([items[pick[j]][2] for j in has_t])
                    x0_hat = _x0_hat(x_t[has_t], out[has_t].float(), a[has_t], pred)
                    w = opts.visual_weight if opts.loss == "both" else 1.0
                    terms.append(w * F.mse_loss(x0_hat, tgt))
                loss = torch.stack(terms).sum()
                if need_scores:
                    # forgetting_loss maps a NaN score sum to 0 (its "total > 0" test), so look at the sum
                    raw = torch.stack([sc.detach().sum() for sc in rec.scores]).sum()
                    loss_seen = loss.detach() if torch.isfinite(raw) else raw
                else:
                    loss_seen = loss.detach()
                if backward:
                    if not torch.isfinite(loss_seen):
                        raise ForgetError(f"the loss became {loss_seen.item()}; nothing was written. "
                                          "Try a lower lr or precision fp32.")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
            return loss_seen.item()

        def base_outputs(x_t, t, target_text, idx):
            """The base UNet's outputs (before any step), in chunks of 8."""
            with torch.no_grad(), autocast():
                return torch.cat([_unet_call(model, x_t[j:j + 8], t[j:j + 8], target_text, idx[j:j + 8],
                                             time_ids).float() for j in range(0, len(idx), 8)])

        def noised(x0, gen):
            t = torch.randint(lo, hi, (len(x0),), generator=gen).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen).to(device), t

        # retain cache: the base UNet's outputs for retain prompts on noisy latents of their own images
        # (or, with retain_images=0, of the concept's images)
        k = opts.retain_samples
        retain_cache = None
        if retain_text is not None:
            gr = torch.Generator(device="cpu").manual_seed(opts.seed + 4242)
            if r_items:
                pick = torch.randint(len(r_items), (k,), generator=gr).tolist()
                r_x0 = torch.stack([r_items[i][1] for i in pick])
                r_idx = torch.tensor([r_items[i][0] for i in pick])
            else:
                r_x0 = torch.stack([items[i][1] for i in torch.randint(len(items), (k,), generator=gr).tolist()])
                r_idx = torch.randint(len(retain_text.embeds), (k,), generator=gr)
            r_xt, r_t = noised(r_x0, gr)
            retain_cache = (retain_text, r_xt, r_t, r_idx, base_outputs(r_xt, r_t, retain_text, r_idx))
        # anchor cache (Concept Ablation's model-based target): noisy latents of the anchors' images with a
        # concept prompt, and the base UNet's outputs for that prompt with the anchor in the concept's place
        anchor_cache = None
        if anchor_text is not None:
            ga = torch.Generator(device="cpu").manual_seed(opts.seed + 4343)
            pick = torch.randint(len(a_items), (k,), generator=ga).tolist()
            a_idx = torch.tensor([int(text.by_concept[a_items[i][0]][torch.randint(tpl_n, (1,), generator=ga)])
                                  for i in pick])
            a_xt, a_t = noised(torch.stack([a_items[i][1] for i in pick]), ga)
            anchor_cache = (text, a_xt, a_t, a_idx, base_outputs(a_xt, a_t, anchor_text, a_idx))

        def cached_loss(cache, rows, weight=1.0, backward=False):
            """Mean squared difference of the UNet's outputs on cached samples `rows` from their targets."""
            c_text, c_xt, c_t, c_idx, c_out = cache
            with autocast():
                out = _unet_call(model, c_xt[rows], c_t[rows], c_text, c_idx[rows], time_ids)
            loss = F.mse_loss(out.float(), c_out[rows])
            if backward:
                scaler.scale(weight * loss).backward()  # adds to the forgetting loss's gradients
            return loss.detach().item()

        g = torch.Generator(device="cpu").manual_seed(opts.seed + 1 + 7919 * accel.process_index)

        def sample(n, gen):
            pick = torch.randperm(len(items), generator=gen)[:n].tolist()
            while len(pick) < n:
                pick += torch.randperm(len(items), generator=gen)[: n - len(pick)].tolist()
            prompt_pick = [int(text.by_concept[items[i][0]][torch.randint(tpl_n, (1,), generator=gen)].item())
                           for i in pick]
            t = torch.randint(lo, hi, (n,), generator=gen).to(device)
            noise = torch.randn((n,) + tuple(items[0][1].shape), generator=gen).to(device)
            return pick, prompt_pick, t, noise

        # fixed evaluation batch: loss before / after
        ge = torch.Generator(device="cpu").manual_seed(opts.seed + 12345)
        n_eval = min(4, len(items))
        eval_batch = sample(n_eval, ge)
        eval_batch = (eval_batch[0], eval_batch[1],
                      torch.linspace(lo, hi - 1, n_eval).round().long().to(device), eval_batch[3])
        unet.train()
        with torch.no_grad():
            loss_before = step_loss(*eval_batch)
        t_train = time.perf_counter()
        losses, retain_losses, anchor_losses = [], [], []
        from tqdm.auto import tqdm
        bar = tqdm(range(opts.steps), desc="forgetting " + ", ".join(concepts),
                   disable=not opts.progress or not accel.is_main_process)
        for step in bar:
            try:
                value = step_loss(*sample(opts.batch_size, g), backward=True)
                for name, cache, weight, seen in (("retain", retain_cache, opts.retain_weight, retain_losses),
                                                  ("anchor", anchor_cache, opts.anchor_weight, anchor_losses)):
                    if cache is None:
                        continue
                    value_c = cached_loss(cache, torch.randint(k, (opts.batch_size,), generator=g), weight, True)
                    if not math.isfinite(value_c):
                        raise ForgetError(f"the {name} loss became {value_c}; nothing was written. Try a lower lr.")
                    seen.append(value_c)
            except ForgetError as e:
                raise ForgetError(f"step {step}: {e}") from None
            if opts.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4g}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t_train
        with torch.no_grad():
            loss_after = step_loss(*eval_batch)
            retain_after = cached_loss(retain_cache, torch.arange(k)) if retain_cache is not None else None
            anchor_after = cached_loss(anchor_cache, torch.arange(k)) if anchor_cache is not None else None
        if not math.isfinite(loss_after) or not all(bool(torch.isfinite(p).all()) for p in params):
            raise ForgetError("the trained weights are not finite; nothing was written. Try a lower lr.")
        if accel.num_processes > 1:
            model = accel.unwrap_model(model, keep_fp32_wrapper=False)

        # --- the patch
        out_dtype = PATCH_DTYPES[opts.patch_dtype]
        tensors = {}
        if opts.train == "lora":
            from peft.utils import get_peft_model_state_dict
            scale = (opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank) / opts.lora_rank
            sd = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name="fmn").items()}
            for k, v in sd.items():
                if ".lora_A." not in k:
                    continue
                b = sd[k.replace(".lora_A.", ".lora_B.")] * scale  # alpha folded in: loads with alpha == rank
                if not b.any():
                    continue  # B still zero: this layer got no gradient, the pair changes nothing
                for key, t in ((k, v), (k.replace(".lora_A.", ".lora_B."), b)):
                    tensors["unet." + key] = t if out_dtype is None else t.to(out_dtype)
            touched = {k.split(".lora_")[0] + ".weight" for k in tensors}
            kind = "lora"
        else:
            kind = "replace" if out_dtype is None else "delta"
            for n, p in trained_list:
                trained = p.detach().float().cpu()
                if torch.equal(trained, saved[n].float()):
                    continue  # unchanged (no gradient reached it): not part of the patch
                if out_dtype is None:
                    tensors["unet." + n] = trained
                elif out_dtype == torch.int8:
                    codes, scale = quantize_delta(trained - saved[n].float())
                    tensors["unet." + n], tensors["unet." + n + SCALE_SUFFIX] = codes, scale
                else:
                    tensors["unet." + n] = (trained - saved[n].float()).to(out_dtype)
            touched = {k for k in tensors if not k.endswith(SCALE_SUFFIX)}
        if not tensors:
            raise ForgetError("no weight changed during the run (no gradient reached the trainable set?); "
                              "nothing was written")
        fp = restrict_fingerprint(fp, touched)
        summary = {
            "seconds_total": round(time.perf_counter() - t_start, 4), "seconds_train": round(t_train, 4),
            "steps": opts.steps, "batch_size": opts.batch_size, "device": str(device),
            "peak_memory_bytes": _peak_memory(device), "peak_rss_bytes": _peak_rss(),
            "loss_before": loss_before, "loss_after": loss_after, "losses": losses,
            "retain_loss_after": retain_after, "retain_losses": retain_losses or None,
            "anchor_loss_after": anchor_after, "anchor_losses": anchor_losses or None,
            "n_trainable": n_trainable, "n_reference": len(items), "resolution": opts.resolution,
            "inverted_tokens": words if opts.inversion else None,
        }
        record = opts.record()
        patch = Patch(tensors=tensors, kind=kind, concepts=list(concepts), base_model=base_model,
                      fingerprint=fp, options=record, summary=summary)
        summary["patch_bytes"] = patch.nbytes
        ok = True
        return patch
    finally:
        # --- restore the pipeline (weights, adapters, processors, flags, devices)
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            if lora_added:
                merged = {}
                if ok and opts.inplace:
                    scale = (opts.lora_alpha if opts.lora_alpha is not None else opts.lora_rank) / opts.lora_rank
                    sd = dict(trained_list)
                    for n, a in sd.items():
                        if ".lora_A." in n:
                            stem = n.split(".lora_A.")[0]
                            b = sd[n.replace(".lora_A.", ".lora_B.")]
                            merged[stem] = scale * (b.float() @ a.float())
                unet.unload_lora()
                for stem, d in merged.items():
                    w = unet.get_submodule(stem).weight
                    w.copy_((w.float() + d.reshape(w.shape).to(w.device)).to(w.dtype))
            named = dict(unet.named_parameters())
            for n, base in saved.items():
                p = named[n]
                if ok and opts.inplace:
                    p.data = p.data.to(base.dtype)
                else:
                    p.data = base.to(p.device)
        for n, p in unet.named_parameters():
            p.grad = None
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        if opts.gradient_checkpointing and not had_ckpt:
            unet.disable_gradient_checkpointing()
        unet.train(was_training)
        for n, m in modules.items():
            if next(m.parameters()).device != devices[n]:
                m.to(devices[n])
        if accel.num_processes > 1:
            accel.free_memory()


def format_summary(patch: Patch, path=None) -> str:
    s = patch.summary
    mem = s.get("peak_memory_bytes")
    mem = f"{mem / 2**30:.2f} GiB (CUDA)" if mem else f"{s.get('peak_rss_bytes', 0) / 2**30:.2f} GiB (process RSS)"
    size = Path(path).stat().st_size if path and Path(path).exists() else patch.nbytes
    lines = [
        f"concepts      {', '.join(patch.concepts)}",
        f"time          {s['seconds_total']:.2f} s total, {s['seconds_train']:.2f} s for {s['steps']} steps "
        f"(batch {s['batch_size']}, {s['device']})",
        f"peak memory   {mem}",
        f"loss          {s['loss_before']:.5g} -> {s['loss_after']:.5g}"
        + "".join(f", {k} {s[k + '_losses'][0]:.3g} -> {s[k + '_loss_after']:.3g}" for k in ("retain", "anchor")
                  if s.get(k + "_losses")),
        f"patch         {patch.kind}, {len(patch.tensors)} tensors, {size / 2**20:.2f} MiB"
        + (f" -> {path}" if path else ""),
    ]
    if s.get("inverted_tokens"):
        lines.insert(1, f"inverted as   {s['inverted_tokens']}")
    return "\n".join(lines)


__all__ = ["forget", "ForgetOptions", "ForgetError", "encode_text", "templates", "format_summary"]

