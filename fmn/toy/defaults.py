"""Forgetting options for the built-in toy model.

`fmn forget` without --model uses them for every option the user leaves unset; bench_quality.py and
the forgetting-quality test use them too. The paper's defaults (lr 2e-6, "a photo of {}") are for
SD's 860 M-parameter UNet trained on billions of captions; the toy UNet is ~1000x smaller and its
captions are "a red circle", "a photo of a circle", ..., so it needs a larger step and its own
templates. Chosen by a sweep on "circle" (4 seeds x 25 prompts): lr 1e-4 / 2e-4 leave the shape
(UA 0 / 0.1), 4e-4 forgets it (UA 0.9) at retain 0.83 (other shapes) / 0.73 (colours), 1e-3 forgets
at retain 0.38 / 0.32. The model reads the shape from its end-of-text and padding slots, not from
the word (fmn.toy.slot_control: word 0.00, end 1.00), and the attention loss steers the word's
column: stronger steps then cost retention. Also tried (2 seeds): include_eos=True (the end slots
marked too) leaves the shape at lr 1e-5 to 4e-4 (UA 0, retain >= 0.85); a preservation term keeping
the UNet's outputs on other shapes' prompts (not kept) trades forgetting for retention: at lr 4e-4
and weight 1 UA 0.3 / retain 0.70 / 0.74, at weight 4 UA 0.3 / retain 0.88 / 0.88.
"""

FORGET_DEFAULTS = {
    "steps": 35,
    "lr": 4e-4,
    "template": ["a {}", "a photo of a {}"],
    "n_images": 8,
    "gen_steps": 20,
    "guidance_scale": 5.0,
}


def forget_defaults() -> dict:
    """A fresh copy of the toy model's forgetting options (fmn.forget keyword arguments)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in FORGET_DEFAULTS.items()}
