"""Forgetting options for the built-in MM-DiT toy model ("toy-mmdit"): one set for every concept.

The defaults (forget_defaults, method="closed-form"): as the UNet toy's (fmn.toy.defaults), the closed-form
anchor edit alone, here of the transformer's context_embedder (the one layer every text token passes through
before the joint blocks; the pooled projection is zero on this model): on the tuning split all ten concepts
UA 1.0 at in-domain and cross-domain retain 1.00, ~0.1 s; held-out: bench/results/quality_all_toy_mmdit_cpu.json.

The attention-loss rule (method="attention", attention_defaults):
The MM-DiT family (fmn.families.mmdit) supplies them for every option the user leaves unset when the
pipeline was loaded from the shipped folder (fmn.toy.paths.is_built_in(pipe, "toy-mmdit")), as the UNet
family does for "toy" with fmn.toy.defaults. The recipe is the UNet toy's (its caption forms as templates,
the other shapes or colours retained, the next shape or colour as an anchor: fmn.toy.defaults.templates_for,
retain_for, anchor_for); what differs is the step size: "attn2" here is every projection of
the joint attention layers, image stream included, and the UNet toy's lr 1e-3 wrecks the rest ("circle":
UA 0.9 at in-domain / cross-domain retain 0.78 / 0.82 of base).

Tuned on the tuning split only (fmn.toy.evaluate.SPLITS: seed 10 "a {c} {s}", seed 11 "a photo of a {c} {s}",
forgetting seed 0; 10 forgotten-prompt and 40 retained images per concept, so UA moves in steps of 0.1),
1 thread on the shared 2-core machine (load 4-8), ~20-45 s per run. UA / in-domain / cross-domain retain of base:
- the UNet toy's options as they are (lr 1e-3, retain weight 8 on 32 samples, 100 steps per shape):
  circle 0.90 / 0.78 / 0.82 (trained with the pipeline's default 256 zero T5 tokens, evaluated with 1:
  0.80 / 0.60 / 0.40);
- train="attn2-kv" (text-side k, v only) at lr 1e-3: circle 0.80 / 0.95 / 0.98 (lr 2e-3: 0.80 / 0.93 / 0.84;
  200 steps: 0.80 / 0.98 / 0.96), red 0.80 / 0.73 / 0.96: it stops short of forgetting;
- attn2 at lr 3e-4: circle 0.90 / 0.98 / 0.96, red 0.90 / 0.75 / 0.96 (purple drifts), heart 0.50 / 0.95 / 1.00;
  anchor weight 32: circle 0.70 / 0.93 / 0.98; lr 5e-4: circle 0.90 / 0.98 / 0.98;
- the retain term on 128 samples at weight 16 (red at lr 3e-4: 0.90 / 0.93 / 0.96; weight 32: 0.80 / 0.93 / 0.98),
  at lr 5e-4: circle 0.90 / 1.00 / 1.00, red 1.00 / 0.88 / 0.92, heart 0.60 / 0.93 / 0.96 (lr 1e-3:
  0.60 / 0.78 / 0.92);
- the same with 200 steps per shape (the values below): circle 1.00 / 0.98 / 0.98, heart 0.80 / 0.88 / 0.94.
Heart (anchored to circle, which the model also draws for hearts) is the hard one: more steps forget it
more and move the other shapes; no tried rule reached UA >= 0.95 at retains >= 0.95 on all three tuning
concepts. Held-out figures for all ten: bench/results/quality_all_toy_mmdit_cpu.json (README).
"""
from fmn.toy.data import COLORS, SHAPES
from fmn.toy.defaults import anchor_for, retain_for, templates_for, with_method

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
# "attention+closed-form": lr, steps per concept. Tuning split, forgetting seed 1, UA / in-domain / cross-domain
# retain of base, attack success: lr 2.5e-4, 100 steps: heart 1.00 / 1.00 / 1.00, 0.60; red 1.00 / 0.88 / 0.98,
# 0.00. lr 5e-4, 100 steps: heart 1.00 / 0.95 / 0.96, 0.50; red 1.00 / 0.88 / 0.94, 0.00. The rule's own
# (5e-4, 200 steps): heart 0.80 / 0.90 / 0.84, 0.40; red 1.00 / 0.65 / 0.94, 0.00. None reaches attack <= 0.2
# on heart with retains >= 0.95; the first keeps the retains best.
ROBUST = {"lr": 2.5e-4, "steps": 100}


def forget_defaults(concepts=None, anchor: bool = True, method: str = "closed-form") -> dict:
    """A fresh copy of toy-mmdit's forgetting options (fmn.forget keyword arguments), as fmn.toy.defaults'
    for the UNet toy: method="closed-form" (the default) the closed-form edit of the context embedder alone
    over attention_defaults (whose training options apply only if steps are given); "attention" the
    attention-loss rule; "attention+closed-form" ROBUST's gentler rule, then the closed form."""
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
