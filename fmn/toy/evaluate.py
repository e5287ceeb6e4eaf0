"""Forgetting evaluation on the toy model, in the spirit of UnlearnCanvas.

Generate a fixed prompt set with fixed seeds from any StableDiffusionPipeline (patched or not,
optionally with a negative prompt), classify every image for shape and colour, and report:

- unlearning accuracy (UA), per forgotten concept: share of images from prompts naming it that do
  NOT show it (a forgotten shape: predicted shape differs, "none" counts as forgotten; a forgotten
  colour: predicted colour differs);
- in-domain retain accuracy (IRA): the forgotten concepts' domain (shapes or colours) still right
  on prompts naming none of the forgotten concepts of that domain;
- cross-domain retain accuracy (CRA): the other domain still right, on ALL prompts, the forgotten
  concept's own prompts included (the paper's "natural fallback": "a red circle" with "circle"
  forgotten should still be red); the fallback share alone is reported too;
- time (seconds spent generating) and the number of images.

`score()` is a pure function of labels and predictions (what the tests check); `generate()` and
`evaluate()` run the pipeline; `save_grid()` writes a PNG of image panels side by side.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmn.toy.data import COLORS, SHAPES

DEFAULT_TEMPLATE = "a {c} {s}"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_SEEDS = (0, 1, 2, 3)


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    shape: str | None  # the shape the prompt asks for (None: any)
    color: str | None  # the colour the prompt asks for (None: any)


def prompt_set(template: str = DEFAULT_TEMPLATE, shapes: Sequence[str] = SHAPES,
               colors: Sequence[str] = COLORS) -> list[PromptSpec]:
    """Every (shape, colour) pair through one template, shapes outer: 25 prompts by default."""
    return [PromptSpec(template.format(c=c, s=s), s, c) for s in shapes for c in colors]


def _as_specs(prompts_spec) -> list[PromptSpec]:
    if prompts_spec is None:
        return prompt_set()
    out = []
    for p in prompts_spec:
        if isinstance(p, PromptSpec):
            out.append(p)
        elif isinstance(p, dict):
            out.append(PromptSpec(p["prompt"], p.get("shape"), p.get("color")))
        else:
            out.append(PromptSpec(*p))
    return out


def _concepts(forgotten) -> tuple[list[str], list[str]]:
    if forgotten is None:
        return [], []
    if isinstance(forgotten, str):
        forgotten = [forgotten]
    shapes, colors = [], []
    for f in forgotten:
        if f in SHAPES:
            shapes.append(f)
        elif f in COLORS:
            colors.append(f)
        else:
            raise ValueError(f"forgotten concept {f!r} is neither a shape {SHAPES} nor a colour {COLORS}")
    return shapes, colors


def _mean(mask_ok: np.ndarray, select: np.ndarray):
    return float(mask_ok[select].mean()) if select.any() else None


def score(specs, pred_shapes, pred_colors, forgotten=None) -> dict:
    """Metrics from one record per image.

    specs: PromptSpec per image (what was asked); pred_shapes: names or indices into
    SHAPES + ("none",); pred_colors: names or indices into COLORS; forgotten: None, a shape, a
    colour or a list of them. Accuracies are fractions in [0, 1]; None where no image qualifies.
    """
    specs = _as_specs(specs)
    shape_names = list(SHAPES) + ["none"]
    ps = np.array([shape_names[int(p)] if not isinstance(p, str) else p for p in pred_shapes])
    pc = np.array([COLORS[int(p)] if not isinstance(p, str) else p for p in pred_colors])
    asked_s = np.array([s.shape or "" for s in specs])
    asked_c = np.array([s.color or "" for s in specs])
    if not (len(ps) == len(pc) == len(specs)):
        raise ValueError("specs, pred_shapes and pred_colors must have one entry per image")
    has_s, has_c = asked_s != "", asked_c != ""
    shape_ok = (ps == asked_s) & has_s
    # an image with no shape has no colour either
    color_ok = (pc == asked_c) & has_c & (ps != "none")
    fs, fc = _concepts(forgotten)
    out = {
        "n_images": len(specs),
        "shape_acc": _mean(shape_ok, has_s),
        "color_acc": _mean(color_ok, has_c),
        "both_acc": _mean(shape_ok & color_ok, has_s & has_c),
        "per_shape": {s: _mean(shape_ok, asked_s == s) for s in SHAPES if (asked_s == s).any()},
        "per_color": {c: _mean(color_ok, asked_c == c) for c in COLORS if (asked_c == c).any()},
    }
    if not fs and not fc:
        return out
    names_fs = np.isin(asked_s, fs)
    names_fc = np.isin(asked_c, fc)
    per = {}
    for s in fs:
        sel = asked_s == s
        per[s] = {"domain": "shape", "ua": _mean(ps != s, sel),
                  "fallback_color_acc": _mean(color_ok, sel & has_c & ~names_fc),
                  "shown_rate": _mean(ps == s, sel)}
    for c in fc:
        sel = asked_c == c
        per[c] = {"domain": "color", "ua": _mean((pc != c) | (ps == "none"), sel),
                  "fallback_shape_acc": _mean(shape_ok, sel & has_s & ~names_fs),
                  "shown_rate": _mean((pc == c) & (ps != "none"), sel)}
    retain_shape = _mean(shape_ok, has_s & ~names_fs)
    retain_color = _mean(color_ok, has_c & ~names_fc)
    in_dom = [r for r, f in ((retain_shape, fs), (retain_color, fc)) if f and r is not None]
    cross = [r for r, f in ((retain_shape, fs), (retain_color, fc)) if not f and r is not None]
    uas = [v["ua"] for v in per.values() if v["ua"] is not None]
    out.update({
        "forgotten": fs + fc,
        "ua": float(np.mean(uas)) if uas else None,
        "in_domain_retain": float(np.mean(in_dom)) if in_dom else None,
        "cross_domain_retain": float(np.mean(cross)) if cross else None,
        "retain_shape_acc": retain_shape,
        "retain_color_acc": retain_color,
        "per_concept": per,
    })
    return out


def relative_to(metrics: dict, base: dict) -> dict:
    """IRA and CRA of `metrics` as fractions of the base model's accuracy on the same images."""
    out = {}
    for key, base_key in (("retain_shape_acc", "retain_shape_acc"), ("retain_color_acc", "retain_color_acc")):
        if metrics.get(key) is not None and base.get(base_key):
            out[key + "_rel"] = metrics[key] / base[base_key]
    if metrics.get("in_domain_retain") is not None and base.get("in_domain_retain"):
        out["in_domain_retain_rel"] = metrics["in_domain_retain"] / base["in_domain_retain"]
    if metrics.get("cross_domain_retain") is not None and base.get("cross_domain_retain"):
        out["cross_domain_retain_rel"] = metrics["cross_domain_retain"] / base["cross_domain_retain"]
    return out


@torch.no_grad()
def generate(pipe, prompts_spec=None, seeds: Iterable[int] = DEFAULT_SEEDS, negative_prompt: str | None = None,
             num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
             batch_size: int = 50, **pipe_kwargs):
    """Images for every (prompt, seed), prompts outer: returns (images (N,3,H,W) in [-1,1], specs per image).

    Each image has its own torch.Generator seeded with its seed, so an image depends only on its
    prompt and seed, not on batching. Extra keyword arguments go to the pipeline call.
    """
    from fmn.families import family_for
    specs = _as_specs(prompts_spec)
    seeds = list(seeds)
    pipe_kwargs = {**family_for(pipe).pipeline_kwargs(), **pipe_kwargs}  # toy-mmdit: its T5 length
    jobs = [(sp, sd) for sp in specs for sd in seeds]
    device = getattr(pipe, "_execution_device", None) or pipe.device
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(sd)) for _, sd in chunk]
        kw = dict(pipe_kwargs)
        if negative_prompt is not None:
            kw["negative_prompt"] = [negative_prompt] * len(chunk)
        res = pipe(prompt=[sp.prompt for sp, _ in chunk], generator=gens, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, output_type="pt", **kw)
        out.append(res.images.float().cpu() * 2 - 1)
    del device
    return torch.cat(out), [sp for sp, _ in jobs]


def evaluate(pipe, prompts_spec=None, seeds: Iterable[int] = DEFAULT_SEEDS, forgotten=None,
             negative_prompt: str | None = None, classifier=None, num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, return_images: bool = False, **pipe_kwargs) -> dict:
    """Generate, classify and score. `forgotten`: None, a shape, a colour or a list of them.

    Returns score()'s dict plus "seconds" (generation time), "images_per_second", the settings, and
    with return_images=True "images" (tensor in [-1,1]) and "specs".
    """
    if classifier is None:
        from fmn.toy.classifier import load_classifier
        classifier = load_classifier()
    t0 = time.perf_counter()
    images, specs = generate(pipe, prompts_spec, seeds, negative_prompt, num_inference_steps, guidance_scale,
                             **pipe_kwargs)
    seconds = time.perf_counter() - t0
    pred = classifier.classify(images)
    m = score(specs, pred["shape"].tolist(), pred["color"].tolist(), forgotten)
    m.update({"seconds": seconds, "images_per_second": len(specs) / max(seconds, 1e-9),
              "settings": {"seeds": list(seeds), "num_inference_steps": num_inference_steps,
                           "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}})
    if return_images:
        m["images"] = images
        m["specs"] = specs
        m["predictions"] = pred
    return m


# Named evaluation splits: (caption form, seeds) groups over the 5 x 5 shape-colour pairs. Settings
# (fmn.toy.defaults) are tuned on "tuning" only and reported on "held-out", whose seeds and caption forms
# (all from fmn.toy.data.FULL_TEMPLATES, the forms the model was trained on) the tuning never saw.
SPLITS = {
    "tuning": (("a {c} {s}", (10,)), ("a photo of a {c} {s}", (11,))),
    "held-out": (("a {s} in {c}", (20,)), ("{c} {s}", (21,))),
}


def evaluate_split(pipe, split: str = "held-out", forgotten=None, classifier=None, negative_prompt=None,
                   return_images: bool = False, **kw) -> dict:
    """evaluate() over a named split (SPLITS) or a tuple of (caption form, seeds) groups: every group's
    25 prompts with its seeds, all images scored together. Returns evaluate()'s dict with "split"."""
    if isinstance(split, str) and split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)} or (form, seeds) groups, got {split!r}")
    groups = SPLITS[split] if isinstance(split, str) else split
    if classifier is None:
        from fmn.toy.classifier import load_classifier
        classifier = load_classifier()
    parts = [evaluate(pipe, prompt_set(form), seeds, None, negative_prompt, classifier, return_images=True, **kw)
             for form, seeds in groups]
    images = torch.cat([m["images"] for m in parts])
    specs = [sp for m in parts for sp in m["specs"]]
    shapes = torch.cat([m["predictions"]["shape"] for m in parts]).tolist()
    colors = torch.cat([m["predictions"]["color"] for m in parts]).tolist()
    out = score(specs, shapes, colors, forgotten)
    seconds = sum(m["seconds"] for m in parts)
    out.update({"seconds": seconds, "images_per_second": len(specs) / max(seconds, 1e-9),
                "split": split if isinstance(split, str) else "custom",
                "groups": [[form, list(seeds)] for form, seeds in groups],
                "settings": dict(parts[0]["settings"], seeds=None)})
    if return_images:
        out.update({"images": images, "specs": specs, "predictions": {"shape": shapes, "color": colors}})
    return out


@torch.no_grad()
def slot_control(pipe, classifier=None, seeds: Iterable[int] = (0, 1), color: str = "red",
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
    """Which text slots carry the shape: for every ordered pair of shapes (a, b), encode
    "a {color} {a}" and replace (1) its shape word's slot, or (2) its end slots (end-of-text and
    padding), by those of "a {color} {b}"; generate and classify.

    Returns {"word": share of (1) drawn as b, "end": share of (2) drawn as b, "n_images": ...}.
    A model that reads the prompt's words, as SD 1.x/2.x do, scores word ~1 and end ~0; token-level
    forgetting (fmn's attention loss) can only work on such a model.
    """
    from fmn.families import family_for
    from fmn.processors.spans import concept_token_mask

    if classifier is None:
        from fmn.toy.classifier import load_classifier
        classifier = load_classifier()
    tok = pipe.tokenizer
    prompts = [f"a {color} {s}" for s in SHAPES]
    encode = family_for(pipe).encode_prompts
    enc = encode(prompts)[0]
    words = concept_token_mask(tok, prompts, [[s] for s in SHAPES])
    if not (words.sum(1) == 1).all() or not (words == words[0]).all():
        raise ValueError(f"the shapes {SHAPES} are not single tokens at the same place in {prompts}")
    ids = tok(prompts[0], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    end = int(torch.nonzero(ids == tok.eos_token_id)[0])
    embeds, wanted, kinds = [], [], []
    for i in range(len(SHAPES)):
        for j in range(len(SHAPES)):
            if i == j:
                continue
            word = enc[i].clone()
            word[words[0]] = enc[j, words[0]]
            tail = enc[i].clone()
            tail[end:] = enc[j, end:]
            embeds += [word, tail]
            wanted += [SHAPES[j]] * 2
            kinds += ["word", "end"]
    seeds = list(seeds)
    n = len(embeds) * len(seeds)
    neg = encode([""])[0]
    gens = [torch.Generator(device="cpu").manual_seed(int(sd)) for _ in embeds for sd in seeds]
    img = pipe(prompt_embeds=torch.stack(embeds).repeat_interleave(len(seeds), 0),
               negative_prompt_embeds=neg.expand(n, -1, -1), generator=gens,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               output_type="pt").images.float() * 2 - 1
    pred = classifier.classify(img)["shape"].tolist()
    hits = {"word": [], "end": []}
    for k, (b, kind) in enumerate(zip(wanted, kinds)):
        hits[kind] += [p < len(SHAPES) and SHAPES[p] == b for p in pred[k * len(seeds):(k + 1) * len(seeds)]]
    return {"word": float(np.mean(hits["word"])), "end": float(np.mean(hits["end"])),
            "n_images": n, "color": color, "seeds": seeds}


def save_grid(path, panels: dict, ncols: int = 5, scale: int = 2, pad: int = 2, title_height: int = 14):
    """Write a PNG with one panel per entry of `panels` ({title: images}), side by side.

    images: tensor (N,3,H,W) in [-1,1], uint8 array (N,H,W,3) or list of PIL images; each panel
    lays its images out row-major with `ncols` columns (e.g. rows = shapes, columns = colours).
    """
    from PIL import Image, ImageDraw

    arrays = {}
    for title, imgs in panels.items():
        if isinstance(imgs, torch.Tensor):
            a = ((imgs.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        elif isinstance(imgs, np.ndarray):
            a = imgs
        else:
            a = np.stack([np.asarray(im.convert("RGB")) for im in imgs])
        arrays[title] = a
    h, w = next(iter(arrays.values())).shape[1:3]
    ch, cw = h * scale + pad, w * scale + pad
    nrows = max(-(-len(a) // ncols) for a in arrays.values())
    pw = ncols * cw + pad
    gap = 8
    canvas = Image.new("RGB", (len(arrays) * (pw + gap) - gap, title_height + nrows * ch + pad), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for k, (title, a) in enumerate(arrays.items()):
        x0 = k * (pw + gap)
        draw.text((x0 + 3, 1), str(title), fill=(255, 255, 255))
        for i, img in enumerate(a):
            r, c = divmod(i, ncols)
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (x0 + pad + c * cw, title_height + pad + r * ch))
    canvas.save(path)
    return path
