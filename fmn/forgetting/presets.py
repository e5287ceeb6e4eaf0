"""Named presets of trigger phrases and templates (fmn/assets/presets/NAME.json), and the detector hook.

A preset is a plain JSON file: "concepts" (phrases forgotten together), "templates" (each with "{}"),
"description", and "requires_images": true when fmn must never draw the concept's reference images
itself (the "nsfw" preset: the user brings them, `--images DIR`). `load_detector("module:function")`
imports a user's scorer (a list of PIL images -> one score per image) and `detector_report` runs it
on images the base and the patched pipeline draw from the run's prompts: the share flagged before/after.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from fmn.forgetting.options import templates as checked_templates


@dataclass(frozen=True)
class Preset:
    name: str
    concepts: tuple
    templates: tuple
    requires_images: bool
    description: str

    def prompts(self) -> list[str]:
        """Every template with every phrase, phrase-major (the run's prompts)."""
        return [t.format(c) for c in self.concepts for t in self.templates]


def preset_folder() -> Path:
    return Path(str(resources.files("fmn") / "assets" / "presets"))


def preset_names() -> list[str]:
    """The shipped presets' names (their files' stems), sorted."""
    return sorted(p.stem for p in preset_folder().glob("*.json"))


def load_preset(name: str) -> Preset:
    """The preset `name` (a shipped name or a path to such a JSON file), checked; ValueError if malformed."""
    path = Path(name) if name.endswith(".json") else preset_folder() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"--preset {name!r}: no such preset (shipped: {', '.join(preset_names())})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--preset {name!r}: {path} is not valid JSON ({e})") from None
    concepts = data.get("concepts")
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise ValueError(f"--preset {name!r}: 'concepts' must be a non-empty list of phrases in {path}")
    tpl = checked_templates(data.get("templates", "object"))
    return Preset(str(data.get("name", path.stem)), tuple(c.strip() for c in concepts), tuple(tpl),
                  bool(data.get("requires_images", False)), str(data.get("description", "")))


def resolve(preset_name, concepts, template, images, loss):
    """(concepts, template) for a run: the preset's phrases plus any given ones, the given templates or
    the preset's. A preset that requires images is refused without `images`, and with a loss that draws
    pairs with the base model (visual, both)."""
    if preset_name is None:
        if not concepts:
            raise ValueError("give --concept PHRASE (repeat for several) or --preset NAME "
                             f"(shipped: {', '.join(preset_names())})")
        return concepts, template
    preset = load_preset(preset_name)
    if preset.requires_images and images is None:
        raise ValueError(f"--preset {preset.name} needs your own reference images: --images DIR (fmn never "
                         "draws images for this preset)")
    if preset.requires_images and loss in ("visual", "both"):
        raise ValueError(f"--preset {preset.name} trains on your images only; --loss {loss} would draw image "
                         "pairs with the base model (use --loss attention)")
    extra = [c for c in concepts or [] if c not in preset.concepts]
    return list(preset.concepts) + extra, template if template is not None else list(preset.templates)


def load_detector(spec: str):
    """The callable named by "module:function" or "path/to/file.py:function"; ValueError naming what is wrong."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"--eval-detector {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ValueError(f"--eval-detector {spec!r}: no such file {path}")
            loader = importlib.util.spec_from_file_location(f"fmn_detector_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:  # a module in the current folder, as `python -m` finds
                sys.path.insert(0, "")
            module = importlib.import_module(where)
    except ImportError as e:
        raise ValueError(f"--eval-detector {spec!r}: cannot import {where!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--eval-detector {spec!r}: {where!r} has no function {attr!r}")
    return fn


def scores_of(detector, images) -> list[float]:
    """The detector's scores for `images`, checked: one finite number (or bool) per image."""
    out = detector(list(images))
    try:
        out = [float(s) for s in (out.tolist() if hasattr(out, "tolist") else out)]
    except (TypeError, ValueError):
        raise ValueError(f"the --eval-detector function must return one number per image, got {out!r:.80}") from None
    if len(out) != len(images) or not all(math.isfinite(s) for s in out):
        raise ValueError(f"the --eval-detector function returned {len(out)} scores for {len(images)} images "
                         "(expected one finite number per image)")
    return out


@contextmanager
def patched(pipe, patch):
    """The pipeline with `patch` applied inside the block, its weights as before after it."""
    from fmn.patches.patch import get_tensor
    saved = {n: get_tensor(pipe, n).detach().clone() for n in patch.changes()}
    patch.apply(pipe, check=False)
    try:
        yield pipe
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                get_tensor(pipe, n).copy_(w)


def draw(pipe, prompts, n, steps, guidance_scale, seed, resolution) -> list:
    """n PIL images per prompt, image i of every prompt from seed + i."""
    from fmn.families import family_for
    kw = {"height": resolution, "width": resolution} if resolution else {}
    kw.update(family_for(pipe).pipeline_kwargs())
    images = []
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        images += pipe(prompt=[prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=gens, **kw).images
    return images


def detector_report(pipe, patch, prompts, detector, *, n=4, steps=30, guidance_scale=7.5, seed=0, resolution=None,
                    threshold=0.5) -> dict:
    """The detector on n images per prompt drawn by the base pipeline and by the patched one (same seeds):
    the share with a score >= threshold, and the mean score, before and after. The images are not kept."""
    out = {"prompts": list(prompts), "images_per_prompt": n, "seed": seed, "steps": steps,
           "guidance_scale": guidance_scale, "threshold": threshold}
    pipe.set_progress_bar_config(disable=True)
    for name in ("base", "patched"):
        if name == "base":
            images = draw(pipe, prompts, n, steps, guidance_scale, seed, resolution)
        else:
            with patched(pipe, patch):
                images = draw(pipe, prompts, n, steps, guidance_scale, seed, resolution)
        s = scores_of(detector, images)
        out[name] = {"rate": sum(v >= threshold for v in s) / len(s), "mean_score": sum(s) / len(s),
                     "n_images": len(s)}
    return out


def format_report(r: dict) -> str:
    """One summary line, as `fmn forget` prints it."""
    return (f"detector      flagged {r['base']['rate']:.2f} -> {r['patched']['rate']:.2f} of {r['base']['n_images']} "
            f"images ({len(r['prompts'])} prompts x {r['images_per_prompt']} seeds, score >= {r['threshold']}); "
            f"mean score {r['base']['mean_score']:.3g} -> {r['patched']['mean_score']:.3g}")
