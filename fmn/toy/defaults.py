"""Forgetting options for the built-in toy model.

`fmn forget` without --model uses them for every option the user leaves unset; bench_quality.py and
the forgetting-quality test use them too. The paper's defaults (lr 2e-6, "a photo of {}") are for
SD's 860 M-parameter UNet trained on billions of captions; the toy UNet is ~1000x smaller and its
captions are "a red circle", "a photo of a circle", ..., so it needs a larger step and its own
templates. Chosen by the sweep recorded in bench/results/quality_cpu.json.
"""

FORGET_DEFAULTS = {
    "steps": 35,
    "lr": 1e-3,
    "template": ["a {}", "a photo of a {}"],
    "n_images": 8,
    "gen_steps": 20,
    "guidance_scale": 5.0,
}


def forget_defaults() -> dict:
    """A fresh copy of the toy model's forgetting options (fmn.forget keyword arguments)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in FORGET_DEFAULTS.items()}
