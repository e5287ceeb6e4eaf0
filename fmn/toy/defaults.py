"""Forgetting options for the built-in toy model, tuned on the tuning split (docs/toy-tuning.md).

The default (forget_defaults, method="attention+closed-form"): Forget-Me-Not's attention re-steering through
the fused kernels, with the toy's caption forms as templates (templates_for), the other shapes or colours
held to the base model's outputs (retain_for) and each concept pulled towards the next shape or colour
(anchor_for), ROBUST's lr, steps per concept and retain images; then the closed-form anchor edit
(fmn.forgetting.closed_form) on the trained weights. The training is what resists a textual-inversion
attack: the closed form alone is one linear map on the text embeddings, which an inverted token goes around.
method="closed-form" (fmn forget --steps 0): the edit alone, no training step; method="attention"
(--no-closed-form): the attention rule alone, at its own lr and steps. Held-out results: docs/results.md,
docs/results-robustness.md.
"""
from fmn.toy.data import COLOR_TEMPLATES, COLORS, FULL_TEMPLATES, SHAPE_TEMPLATES, SHAPES

FORGET_DEFAULTS = {  # the attention-loss rule's (forget_defaults' method="attention")
    "closed_form": False,
    "steps": 150,
    "lr": 1e-3,
    "template": ["a {}", "a photo of a {}"],
    "n_images": 8,
    "gen_steps": 20,
    "guidance_scale": 5.0,
    "retain_weight": 8.0,
    "retain_images": 0,
}
ANCHOR_WEIGHT = 16.0
METHODS = ("attention+closed-form", "closed-form", "attention")
DEFAULT_METHOD = METHODS[0]
# the gentler rule before the closed form: steps per forgotten concept; the retained concepts held on 4 images
# each of their own (docs/toy-tuning.md, "Robustness tuning")
ROBUST = {"lr": 5e-4, "steps": 100, "retain_images": 4}
PRESERVE_WEIGHT = 1.0  # the closed form's weight of the kept prompts
ANCHOR_STEPS = {"shape": 100, "color": 200}  # per forgotten concept, with its anchor


def _domains(concepts) -> tuple[list[str], bool, bool]:
    concepts = [concepts] if isinstance(concepts, str) else list(concepts or [])
    return concepts, any(c in SHAPES for c in concepts), any(c in COLORS for c in concepts)


def templates_for(concepts, anchored: bool = True) -> list[str]:
    """Forgetting templates. For shapes: the model's own caption forms (fmn.toy.data) with the shape's
    slot left as {} and the colours rotated through: "a {}", "a photo of a {}", ..., "a red {}",
    "a photo of a green {}", ..., "a {} in red". The toy text encoder embeds a word with its slot, so
    forgetting "heart" only through "a {}" and "a photo of a {}" leaves "a red heart" (the word in
    another slot) drawing hearts 60% of the time; the caption forms cover every slot. For colours with
    an anchor, likewise ("a {} circle", ..., "a {} shape", "{}"); without one, and for both domains or
    none: "a {}", "a photo of a {}" (the colours' caption forms without an anchor did worse: "red" UA
    0.4-0.6 against 1.0)."""
    concepts, shape, color = _domains(concepts)
    if shape and not color:
        full = [t.replace("{s}", "{{}}").format(c=COLORS[i % len(COLORS)]) for i, t in enumerate(FULL_TEMPLATES)]
        return [t.replace("{s}", "{}") for t in SHAPE_TEMPLATES] + full
    if color and not shape and anchored:
        full = [t.replace("{c}", "{{}}").format(s=SHAPES[i % len(SHAPES)]) for i, t in enumerate(FULL_TEMPLATES)]
        return full + [t.replace("{c}", "{}") for t in COLOR_TEMPLATES]
    return list(FORGET_DEFAULTS["template"])


def retain_for(concepts, anchored: bool = True) -> list[str]:
    """The toy concepts to keep when forgetting `concepts`: the other shapes if a shape is forgotten,
    the other colours if a colour is: by name in the colours' caption forms (colours alone with an
    anchor: "a green circle", ...), else as "green shape" ("a green shape"); nothing for phrases the
    toy model lacks."""
    concepts, shape, color = _domains(concepts)
    out = []
    if shape:
        out += [s for s in SHAPES if s not in concepts]
    if color:
        plain = anchored and not shape
        out += [c if plain else f"{c} shape" for c in COLORS if c not in concepts]
    return out


def anchor_for(concepts) -> list[str]:
    """What each forgotten concept should become (ForgetOptions.anchor): the next shape (colour) in
    SHAPES (COLORS) that is not forgotten: circle -> square, ..., heart -> circle; red -> green, ...
    Nothing for concepts from both domains or outside them."""
    concepts, shape, color = _domains(concepts)
    for names in (SHAPES, COLORS):
        kept = [n for n in names if n not in concepts]
        if concepts and all(c in names for c in concepts) and kept:
            return [next(n for n in names[names.index(c) + 1:] + names if n in kept) for c in concepts]
    return []


def forget_defaults(concepts=None, anchor: bool = True, method: str = DEFAULT_METHOD) -> dict:
    """A fresh copy of the toy model's forgetting options (fmn.forget keyword arguments) for `method`
    (METHODS): "attention+closed-form" (the default) attention_defaults at ROBUST's lr and steps per concept,
    then the closed-form edit (PRESERVE_WEIGHT); "closed-form" the edit alone
    (steps=0); "attention" the attention-loss rule alone (attention_defaults)."""
    return with_method(attention_defaults(concepts, anchor), method, concepts, ROBUST)


def with_method(opts: dict, method: str, concepts, robust: dict) -> dict:
    """opts (a built-in model's attention-loss options) for `method` (METHODS): "attention+closed-form" trains
    with robust["lr"] for robust["steps"] per concept, holding the retained concepts on robust["retain_images"]
    images each; shared with fmn.toy.mmdit_defaults."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "attention":  # the closed-form edit: alone, or after the attention rule's steps
        opts.update(closed_form=True, preserve_weight=PRESERVE_WEIGHT)
    if method == "closed-form":
        opts["steps"] = 0
    if method == "attention+closed-form":
        opts.update(robust, steps=robust["steps"] * max(1, len(_domains(concepts)[0])))
    return opts


def attention_defaults(concepts=None, anchor: bool = True) -> dict:
    """The attention-loss rule alone: with `concepts`, their templates (templates_for), what to retain
    (retain_for) and, unless anchor=False, what they become (anchor_for). Without an anchor: 150 steps;
    colours alone then use retain weight 4."""
    opts = {k: (list(v) if isinstance(v, list) else v) for k, v in FORGET_DEFAULTS.items()}
    names, shape, color = _domains(concepts)
    anchors = anchor_for(concepts) if anchor else []
    opts["template"] = templates_for(concepts, anchored=bool(anchors))
    retain = retain_for(concepts, anchored=bool(anchors))
    if retain:
        opts["retain"] = retain
    if anchors:
        opts["anchor"], opts["anchor_weight"] = anchors, ANCHOR_WEIGHT
        opts["steps"] = ANCHOR_STEPS["shape" if shape else "color"] * len(anchors)
    elif color and not shape:
        opts["retain_weight"] = 4.0
    return opts
