"""Forgetting options for the built-in toy model.

The defaults (forget_defaults, method="closed-form"): the closed-form anchor edit alone (fmn.closed_form; UCE,
Gandikota et al. 2024): the attn2 to_k / to_v weights solved so that every caption form naming the concept
(templates_for) gives the keys and values of the same caption with the next shape or colour (anchor_for),
the other shapes or colours' caption forms (retain_for) and the empty prompt kept, PRESERVE_WEIGHT 1; no
training step, no generated image, ~0.3 s. On the tuning split all ten concepts reach UA 1.0 at in-domain and
cross-domain retain 1.00 of base with preserve weight 0.1, 1 or 10 alike (heart and red checked at each, all
ten at 1); the held-out table: bench/results/quality_all_cpu.json (README). What it does not do: the edit is
one linear map T applied to the text embeddings before every edited layer (W' = W T for all of them), so a
textual-inversion attack (fmn.toy.robustness.attack) that finds a token T sends to the concept's embedding brings
the concept back. Tuning runs (attack success, 20 images; the attention rule: 0.15 on "circle"): the closed
form 1.00 on circle and heart, 0.35 on red; solved again with 3 / 8 rounds of tokens inverted by the attack's
own procedure (other seeds) added to the concept's rows: circle 0.65 / 0.50; with 3 rounds of fmn.inversion's
tokens (4 per round, from 8 generated images; 240 s): 1.00; the closed form then the attention rule's 100
steps: 0.55; the same steps on the attacker's preimage T^-1 of the concept's embeddings: 1.00 (only q / out
trained: 0.80, in-domain retain 0.65); T made singular along its main direction (a rank-1 oblique projection,
retains kept): 1.00, so the concept is not one direction of the text space. Robustness needs the denoiser's
own weights changed (bench/bench_robustness.py, README).

The attention-loss rule (method="attention", attention_defaults; the defaults before the closed form):
`fmn forget` without --model uses them for every option the user leaves unset; bench_quality.py and
the forgetting-quality test use them too. The paper's defaults (lr 2e-6, 35 steps, "a photo of {}")
are for SD's 860 M-parameter UNet trained on billions of captions; the toy UNet is ~200x smaller, so
it needs a larger step, its own templates (templates_for: the model's caption forms), a retain term
(not in the paper): the UNet's outputs on the other shapes' (or colours') prompts, on noisy versions
of the concept's images, are held to the base model's; and an anchor (anchor_for, Concept
Ablation's target): the forgotten concept's prompts are pulled to the base model's outputs with the next
shape (colour) named instead, weight 16, 100 steps per forgotten shape, 200 per colour.

Every concept, tuned and reported on separate splits (issue 17; fmn.toy.evaluate.SPLITS): tuning = seed 10
with "a {c} {s}" and seed 11 with "a photo of a {c} {s}", forgetting seed 0; held-out = seed 20 with
"a {s} in {c}" and seed 21 with "{c} {s}", forgetting seed 1 (bench_quality.py --all). Candidate rules on the
tuning split (bench/sweep_toy_rules.py, bench/results/sweep_toy_rules.jsonl; UA / in-domain / cross-domain
retain of base): the retain term on 128 cached samples instead of 32 at weight 16 instead of 8
("wide-retain"): heart 0.90 / 1.00 / 1.00, blue 1.00 / 0.88 / 1.00; the same with 4 images of each
retained concept's own ("own-images"): heart 0.80 / 1.00 / 1.00, blue 0.50 / 0.95 / 1.00. More retain holds
the other concepts and forgets less, and neither meets the bar on both (the rule below, on held-out heart:
0.90 / 0.95 / 0.98). With forgetting seed 2 (tuning split): these defaults circle 1.00 / 1.00 / 1.00, heart
0.60 / 0.78 / 1.00 (star prompts collapse); anchor weight 32: circle 1.00, heart 0.50 / 0.75; 150 steps per
shape: circle 1.00, heart 0.40 / 0.90. No candidate beat the rule below, so it stays as it is. On the
held-out split (bench/results/quality_all_cpu.json, README) it meets UA >= 0.95 with retains >= 0.95 of base
on blue and purple only: min UA 0.70 (circle, triangle), min in-domain retain 0.75 (green); mean 0.90 /
0.94 / 0.98.

Why the anchor: with attention loss and retain term alone (150 steps) "circle" reached UA 0.8 at 4
seeds (0.8 / 0.95 with training seeds 1 / 2), star 0.5: once the word is not read, the prompt falls
back to the base model's "a red something", a circle ~35% of the time (suppress's UA 0.65). With the
anchor (4 seeds, UA / in-domain / cross-domain retain of base, ~25 s at 1 thread): circle 1.0 / 1.00 /
1.00, square 1.0 / 0.96 / 1.00, triangle 0.9 / 0.99 / 1.00, star 0.95 / 0.95 / 1.00, heart 1.0 / 0.90 /
1.00; circle+square 200 steps 0.93 / 1.00 / 1.00 (100 steps: 0.78). Anchor weight 4 / 16 / 32 on circle
(2 seeds): UA 0.8 / 0.9 / 1.0; the latents noised for the anchor term taken from the concept's own
images instead of the anchor's: UA 0.8-1.0 but hearts drift (IRA 0.90-0.93). "shape" ("a red shape",
the toy's colour-only caption) as the anchor: UA 0.6-0.7 (it draws circles too). For colours the anchor is
the next colour (red -> green), with the colours' own caption forms as templates ("a {} circle", ..., "{}") and the
other colours retained by name (so "a green circle", ...), 200 steps per colour: "red" (4 seeds) UA 1.0
at 1.00 / 1.00 (~34 s at 2 threads; 100 steps: UA 0.85); "blue" (-> yellow) UA 1.0 at 0.80 / 0.97
(purple and green drift). Retaining "green shape", ... in these templates ("a green shape circle")
instead: red UA 0.85 at 200 steps (also with weight 32 or 300 steps); the generic templates with the
anchor: 0.6-0.7; no anchor (150 steps, generic templates, retain weight 4): UA 1.0, IRA 0.79.

The sweep before the anchor (150 steps, lr 1e-3, 2 seeds x 25 prompts):

- without the retain term the attention loss forgets either nothing or everything at this scale
  ("circle", 35 steps: lr 4e-4 UA 0.1 at 1.00 / 1.00; lr 1e-3 UA 1.0 at 0.38 / 0.46);
- only "a {}" and "a photo of a {}" as templates: "heart" is forgotten there ("a heart" draws
  hearts 8% of the time) but not in "a red heart" (60%): the toy text encoder embeds each word with
  its slot, and the evaluation prompts put the shape in another slot. UA heart 0.2, star 0.7,
  circle 0.7. The caption forms: heart 1.0, star 1.0, circle 0.9, triangle 1.0;
- retain cache on the retained shapes' own images (retain_images=8: 32 more images to draw) or on
  the concept's (retain_images=0, the default: no extra generation): circle at 4 seeds UA 0.8 with
  retain 0.97 / 1.00 vs 0.8 with 1.00 / 0.97, but 49 s vs ~20 s on 2 cores (the issue's budget is
  30 s); 2 or 4 images per phrase: UA 0.6 / 0.7. Own images held more on star (2 seeds, UA 0.9 at
  0.78 / 0.96 vs 0.5 at 0.72 / 0.98); colours did worse with them ("red" UA 0.4, retain 0.55 vs
  1.0 / 0.78);
- retain weight 4 / 8 / 16 (with the retained shapes' own images): circle UA 0.9 / 1.0 / 0.6,
  heart 1.0 / 1.0 / 1.0, star 1.0 / 0.9 / 0.7; in-domain retain 0.82-1.00 / 0.78-1.00 / 0.80-1.00; weight 8
  held the retains best overall
  (circle 0.95 / 1.00, heart 0.95 / 1.00, star 0.78 / 0.96, triangle 1.00 / 0.98). Batch 2 or 200
  steps did not help (circle UA 0.7 with either), and results move by +-0.3 UA between such nearby
  settings: which shape a prompt falls back to once its word is not read is partly chance (the
  base model draws a circle for ~35% of "a red circle" prompts with "circle" zeroed: suppress's UA);
- adding the visual loss (loss="both") at a light weight did not lift it: circle at 4 seeds,
  visual_weight 0.3 UA 0.5, 0.1 UA 0.7 (retain 1.00 / 0.92-0.94); at weight 1, UA 0.85 (0.93 / 0.92).
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
METHODS = ("closed-form", "attention", "attention+closed-form")
# "attention+closed-form": a gentler attention rule (the closed form then does the forgetting). Tuning split,
# forgetting seed 1, UA / in-domain / cross-domain retain of base, attack success: the rule's own lr 1e-3:
# heart 1.00 / 0.90 / 1.00, 0.10; green (200 steps) 1.00 / 0.75 / 1.00, 0.00. lr 5e-4: heart 1.00 / 1.00 /
# 1.00, 0.05; green 1.00 / 0.83 / 1.00, 0.00, at 100 steps 1.00 / 0.93 / 1.00, 0.00. lr 2.5e-4: heart
# 1.00 / 1.00 / 1.00, 0.20; green 1.00 / 0.78 / 1.00, 0.00.
ROBUST = {"lr": 5e-4, "steps": 100}  # steps per forgotten concept
PRESERVE_WEIGHT = 1.0  # closed form: tuning split, all ten concepts UA 1.0 at retains 1.00 with 0.1, 1 and 10 alike
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


def forget_defaults(concepts=None, anchor: bool = True, method: str = "closed-form") -> dict:
    """A fresh copy of the toy model's forgetting options (fmn.forget keyword arguments): with
    method="closed-form" (the default) the closed-form edit alone (closed_form=True, steps=0,
    PRESERVE_WEIGHT) over attention_defaults(concepts, anchor), whose training options then apply only
    if steps are given; method="attention": attention_defaults, the attention-loss rule;
    "attention+closed-form": the rule's steps, then the closed-form edit on the trained weights (slower, and
    the one that resists the inversion attack): ROBUST's lr and steps per concept."""
    return with_method(attention_defaults(concepts, anchor), method, concepts, ROBUST)


def with_method(opts: dict, method: str, concepts, robust: dict) -> dict:
    """opts (a built-in model's attention-loss options) for `method` (METHODS): "attention+closed-form" trains
    with robust["lr"] for robust["steps"] per concept; shared with fmn.toy.mmdit_defaults."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "attention":  # the closed-form edit: alone, or after the attention rule's steps
        opts.update(closed_form=True, preserve_weight=PRESERVE_WEIGHT)
    if method == "closed-form":
        opts["steps"] = 0
    if method == "attention+closed-form":
        n = len([concepts] if isinstance(concepts, str) else list(concepts or [None]))
        opts.update(lr=robust["lr"], steps=robust["steps"] * n)
    return opts


def attention_defaults(concepts=None, anchor: bool = True) -> dict:
    """The attention-loss rule (the defaults before the closed form): with `concepts`, their templates
    (templates_for), what to retain (retain_for) and, unless anchor=False, what they become (anchor_for).
    Without an anchor: 150 steps; colours alone then use retain weight 4 ("red": UA 1.0, in-domain retain
    0.79 of base)."""
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
