"""Forgetting options for the built-in MM-DiT toy model ("toy-mmdit"), tuned on the tuning split
(docs/toy-tuning.md).

The recipe is the UNet toy's (fmn.toy.defaults: its caption forms as templates, the other shapes or colours
retained, the next shape or colour as an anchor; by default the attention re-steering, then the closed-form
edit, here of the transformer's context_embedder, the one layer every text token passes through before the
joint blocks). What differs is the step size: "attn2" here is every projection of the joint attention
layers, image stream included, so it takes a smaller lr and a wider retain term. The MM-DiT family
(fmn.families.mmdit) applies these when the pipeline was loaded from the shipped folder.
"""
from fmn.toy.data import COLORS, SHAPES
from fmn.toy.defaults import DEFAULT_METHOD, anchor_for, retain_for, templates_for, with_method

FORGET_DEFAULTS = {  # the attention-loss rule's (forget_defaults' method="attention")
    "closed_form": False,
    "lr": 5e-4,
    "train": "attn2",
    "n_images": 8,
    "gen_steps": 20,
    "guidance_scale": 5.0,
    "retain_weight": 16.0,
    "retain_samples": 128,
    "retain_images": 0,
}
ANCHOR_WEIGHT = 16.0
ANCHOR_STEPS = {"shape": 200, "color": 200}  # per forgotten concept, with its anchor
UNANCHORED_STEPS = 150
ROBUST = {"lr": 2.5e-4, "steps": 100, "retain_images": 4}  # the gentler rule before the closed form (per concept)


def forget_defaults(concepts=None, anchor: bool = True, method: str = DEFAULT_METHOD) -> dict:
    """A fresh copy of toy-mmdit's forgetting options (fmn.forget keyword arguments), as fmn.toy.defaults'
    for the UNet toy: "attention+closed-form" (the default) ROBUST's gentler rule, then the closed-form edit
    of the context embedder; "closed-form" the edit alone; "attention" the attention-loss rule alone."""
    return with_method(attention_defaults(concepts, anchor), method, concepts, ROBUST)


def attention_defaults(concepts=None, anchor: bool = True) -> dict:
    """The attention-loss rule: with `concepts`, their templates, what to retain and, unless anchor=False,
    what they become (as fmn.toy.defaults does for the UNet toy): ANCHOR_STEPS per forgotten shape / colour
    with an anchor, UNANCHORED_STEPS without."""
    opts = {k: (list(v) if isinstance(v, list) else v) for k, v in FORGET_DEFAULTS.items()}
    names = [concepts] if isinstance(concepts, str) else list(concepts or [])
    anchors = anchor_for(names) if anchor else []
    opts["template"] = templates_for(names, anchored=bool(anchors))
    retain = retain_for(names, anchored=bool(anchors))
    if retain:
        opts["retain"] = retain
    opts["steps"] = UNANCHORED_STEPS
    if anchors:
        shape = any(c in SHAPES for c in names) or not any(c in COLORS for c in names)
        opts["anchor"], opts["anchor_weight"] = anchors, ANCHOR_WEIGHT
        opts["steps"] = ANCHOR_STEPS["shape" if shape else "color"] * len(anchors)
    return opts
