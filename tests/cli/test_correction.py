"""Concept correction as docs/concept-correction.md runs it: `fmn forget --concept shape --template "a green {}"`
--steps 0 on the built-in toy model (the closed-form edit alone) sends "a green shape" to the bare context
"a green " at the layers that read the text, and leaves the named shapes' prompts as they were."""
import copy

import torch

from fmn.cli.commands import main
from fmn.families import family_for
from fmn.patches.patch import load_patch
from fmn.toy import SHAPES


def keys(pipe, prompts):
    """Every attn2 layer's keys and values of the prompts, concatenated: [len(prompts), -1]."""
    text = family_for(pipe).encode_prompts(prompts)[0]
    out = [m.to_k(text) for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    out += [m.to_v(text) for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    return torch.cat([o.flatten(1) for o in out], 1)


@torch.no_grad()
def test_correction_in_one_context_keeps_the_named_prompts(toy_base, tmp_path):
    out = tmp_path / "green-shape.safetensors"
    retain = [a for s in SHAPES for a in ("--retain", s)]
    assert main(["forget", "--concept", "shape", "--template", "a green {}", *retain, "--steps", "0", "--out", str(out),
                 "-q"]) == 0
    patch = load_patch(out)
    assert patch.options["template"] == ["a green {}"] and patch.options["closed_form"] and patch.summary["steps"] == 0
    prompts = ["a green shape", "a green ", "a green star", "a green circle"]
    pipe = copy.deepcopy(toy_base)
    before = keys(pipe, prompts)
    patch.apply(pipe)
    after = keys(pipe, prompts)
    gap = (before[0] - before[1]).norm()
    assert (after[0] - before[1]).norm() < 0.05 * gap  # "a green shape" now reads as "a green "
    for i in (2, 3):  # the retained shapes' prompts in the same context: as before
        assert (after[i] - before[i]).norm() < 0.01 * before[i].norm(), prompts[i]
