"""Reference latents: the images a forgetting run trains on, read from files or drawn with the base
model, VAE-encoded into the denoiser's latent space."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def open_image(src, resolution):
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


def image_sources(images, concepts):
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
                out[i] = image_sources(images[c], [c])[0]
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
                return {i: image_files(p) for i, p in per.items()}
        files = image_files(folder)
        return {i: files for i in range(len(concepts))}
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        return {i: list(images) for i in range(len(concepts))}
    raise TypeError(f"images must be a folder, a list of files/PIL images, a dict per concept or a latent tensor; "
                    f"got {type(images).__name__}")


@torch.no_grad()
def encode_images(pipe, sources, resolution, seed, device):
    if isinstance(sources, torch.Tensor):
        return sources.to(device, torch.float32)
    vae = pipe.vae
    if vae is None:
        raise ValueError("the pipeline has no VAE to encode the reference images")
    x = torch.stack([open_image(s, resolution) for s in sources])
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
def generate_latents(family, prompts, seeds, resolution, opts, device, suppressed=None):
    """Latents (the denoiser's latent space) generated from prompts with fixed seeds; with
    `suppressed` concepts, with their attention zeroed (family.suppress)."""
    pipe = family.pipe
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    kw = dict(prompt=prompts, num_inference_steps=opts.gen_steps, guidance_scale=opts.guidance_scale,
              height=resolution, width=resolution, generator=gens, output_type="latent", **family.pipeline_kwargs())
    old = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    # the pipeline's own bar over its denoising steps: drawing references is most of a short run
    pipe.set_progress_bar_config(disable=not opts.progress, leave=False,
                                 desc=f"drawing {len(prompts)} reference image(s)")
    try:
        if suppressed is None:
            out = pipe(**kw).images
        else:
            with family.suppress(suppressed, include_eos=opts.include_eos, backend=opts.backend):
                out = pipe(**kw).images
    finally:
        pipe._progress_bar_config = old
    return family.pipeline_latents(out, resolution).to(device, torch.float32)


@dataclass
class References:
    """The run's latents. items: (concept index, x0, visual target or None); retain: (prompt row
    in the retain prompts, x0) of the retained phrases' own images; anchor: (concept index, x0) of
    the anchors' images."""
    items: list
    retain: list = field(default_factory=list)
    anchor: list = field(default_factory=list)


def draw(family, phrase, tpl, n, seed0, opts, device, suppressed=None):
    """Latents of n base-model images of `phrase`, through the templates in turn, seeds seed0, seed0 + 1..."""
    return generate_latents(family, [tpl[i % len(tpl)].format(phrase) for i in range(n)],
                            [seed0 + i for i in range(n)], opts.resolution, opts, device, suppressed)


def concept_items(family, concepts, images, tpl, n_gen, opts, device) -> list:
    """(concept index, x0, visual target or None): the given images (a concept without any drawn),
    and for no images or a visual loss, drawn images with their targets drawn under suppress."""
    items = []
    if images is not None:
        sources = image_sources(images, concepts)
        if not sources:
            raise ValueError("no images were given for any concept")
        for ci in range(len(concepts)):
            if ci not in sources:
                lat = draw(family, concepts[ci], tpl, n_gen, opts.seed, opts, device)
            else:
                lat = encode_images(family.pipe, sources[ci], opts.resolution, opts.seed, device)
            items += [(ci, x, None) for x in lat]
        if opts.loss == "visual":
            warnings.warn("loss='visual' trains on generated pairs; the given images are not used", stacklevel=4)
            items = []
    if opts.loss in ("visual", "both") or images is None:
        for ci, c in enumerate(concepts):
            x0 = draw(family, c, tpl, n_gen, opts.seed + 1000 * ci, opts, device)
            tgt = (draw(family, c, tpl, n_gen, opts.seed + 1000 * ci, opts, device, suppressed=[c])
                   if opts.loss != "attention" else [None] * len(x0))
            items += [(ci, x, y) for x, y in zip(x0, tgt)]
    return items


def reference_latents(family, concepts, images, anchors, tpl, opts, device) -> References:
    """All latents of a run, drawn before any training step."""
    n_gen = opts.n_images or (4 if opts.resolution <= 64 else 10)
    items = concept_items(family, concepts, images, tpl, n_gen, opts, device)
    # the retained phrases' own images; prompt rows are phrase-major, template-minor
    n_retain = n_gen if opts.retain_images is None else opts.retain_images
    retain = []
    if opts.retain and n_retain:
        for ri, r in enumerate(opts.retain):
            lat = draw(family, r, tpl, n_retain, opts.seed + 100_000 + 1000 * ri, opts, device)
            retain += [(ri * len(tpl) + i % len(tpl), x) for i, x in enumerate(lat)]
    # the anchors' images: the same seeds as the concept's
    anchor = []
    for ci, a in enumerate(anchors):
        anchor += [(ci, x) for x in draw(family, a, tpl, n_gen, opts.seed + 1000 * ci, opts, device)]
    latent_hw = items[0][1].shape[-2:]
    if any(x.shape[-2:] != latent_hw for _, x, _ in items):
        raise ValueError("reference latents differ in size")
    return References(items, retain, anchor)
