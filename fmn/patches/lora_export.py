"""Patches as LoRA files for other tools.

- diffusers / peft: "unet.<module>.lora_A.weight" [r, in], "unet.<module>.lora_B.weight" [out, r]
  (alpha == rank, so scale 1), plus "unet.<module>.lora_B.bias" for a changed bias (peft's
  lora_bias); `pipe.load_lora_weights(FILE)` on the base pipeline reproduces `fmn.apply`.
- kohya / A1111 / ComfyUI: "lora_unet_<module path, dots as underscores>.lora_down.weight" [r, in],
  ".lora_up.weight" [out, r], ".alpha" (= r, so scale 1), and a changed bias (attn2.to_out.0) as the
  whole difference "lora_unet_<module>.diff_b" [out], the key ComfyUI's LoRA loader (comfy/lora.py)
  adds to "<module>.bias" next to the pair. A1111's built-in Lora extension reads diff_b only in a
  full-difference module (network_full.py: with "<module>.diff"), so it applies the pairs and leaves
  the bias; diffusers' kohya converter refuses diff_b keys ("have not been correctly renamed"):
  `bias=False` leaves the biases out (named in the metadata, "fmn.dropped") for such loaders.

A LoRA-trained patch is exported as it is (exactly what fmn.apply adds), unless a smaller rank is
asked for. A delta patch becomes one low-rank pair per changed weight (fmn.patches.compress.factorize):
`rank=R`, or the smallest rank within `rel_error` (default 0.01, relative Frobenius error) per
weight; a patch already compressed keeps its factor pairs. 1-D changes other than biases (norm
weights of a train="unet" patch) cannot be LoRA and are dropped, named in "fmn.dropped".
"""
from __future__ import annotations

import json

import torch

from fmn.patches.compress import factorize, full_changes
from fmn.patches.patch import DOWN_SUFFIX, UP_SUFFIX, Patch, PatchError, atomic_write

FORMATS = ("diffusers", "kohya")
DEFAULT_REL_ERROR = 0.01


def _pair_from_patch(patch: Patch, name: str):
    """The (down, up) pair the patch itself holds for target `name`, or None."""
    t = patch.tensors
    stem = name[: -len(".weight")]
    if patch.kind == "lora" and stem + ".lora_A.weight" in t:
        return t[stem + ".lora_A.weight"], t[stem + ".lora_B.weight"]
    if name + UP_SUFFIX in t:
        return t[name + DOWN_SUFFIX], t[name + UP_SUFFIX]
    return None


def lora_pairs(patch: Patch, rank: int | None = None, rel_error: float | None = None, dtype=torch.float16):
    """({module: (down [r, in...], up [out, r(, 1, 1)])}, {module: bias change}, [dropped names], max rel error)."""
    pairs, biases, dropped, worst = {}, {}, [], 0.0
    refactor = rank is not None or rel_error is not None
    changes = full_changes(patch)
    for name, d in changes.items():
        shape = patch.fingerprint["tensors"][name]["shape"]
        module, _, leaf = name.removeprefix("unet.").rpartition(".")
        if len(shape) == 1 and leaf == "bias":
            biases[module] = d.reshape(shape).to(dtype)
            continue
        if len(shape) < 2 or leaf != "weight":
            dropped.append(name)
            continue
        own = None if refactor else _pair_from_patch(patch, name)
        if own is not None:
            down, up = own[0].float(), own[1].float()
        else:
            bound = None if rank is not None else (rel_error if rel_error is not None else DEFAULT_REL_ERROR)
            up, down, err = factorize(d.reshape(shape), rank=rank, rel_error=bound)
            worst = max(worst, err)
        r = down.shape[0]
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        pairs[module] = (down.to(dtype).contiguous(), up.to(dtype).contiguous())
    for module in biases:
        if module not in pairs:  # a bias change on its own rides on a zero pair of rank 1
            w = patch.fingerprint["tensors"].get(f"unet.{module}.weight", {"shape": [biases[module].numel(), 1]})
            shape = w["shape"]
            pairs[module] = (torch.zeros(1, *shape[1:], dtype=dtype),
                             torch.zeros(shape[0], 1, *([1] * (len(shape) - 2)), dtype=dtype))
    return pairs, biases, dropped, worst


def to_diffusers(patch: Patch, rank=None, rel_error=None, dtype=torch.float16):
    """(state dict in the peft/diffusers LoRA format, info dict)."""
    pairs, biases, dropped, worst = lora_pairs(patch, rank, rel_error, dtype)
    sd = {}
    for module, (down, up) in pairs.items():
        sd[f"unet.{module}.lora_A.weight"], sd[f"unet.{module}.lora_B.weight"] = down, up
        if biases:  # diffusers turns lora_bias on for every module when one has a bias: give each one
            sd[f"unet.{module}.lora_B.bias"] = biases.get(module, torch.zeros(up.shape[0], dtype=dtype))
    return sd, _info(patch, "diffusers", pairs, dropped, worst)


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def to_kohya(patch: Patch, rank=None, rel_error=None, dtype=torch.float16, bias=True):
    """(state dict in the kohya / A1111 / ComfyUI LoRA format, info dict); bias changes as
    "<key>.diff_b", or with bias=False left out (named in info["dropped"])."""
    pairs, biases, dropped, worst = lora_pairs(patch, rank, rel_error, dtype)
    pairs = {m: p for m, p in pairs.items() if p[0].any() or m not in biases}  # drop pairs that only carried a bias
    pairs = _same_rank(pairs)
    sd = {}
    for module, (down, up) in pairs.items():
        key = kohya_name(module)
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        sd[key + ".alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    if bias:
        sd.update({kohya_name(module) + ".diff_b": change for module, change in biases.items()})
    else:
        dropped = dropped + [f"unet.{m}.bias" for m in biases]
    return sd, _info(patch, "kohya", pairs, dropped, worst)


def _same_rank(pairs: dict) -> dict:
    """Pads every pair with zero rows/columns to the largest rank (the product is unchanged), so that
    one alpha fits all: diffusers' kohya converter (0.42) files some per-module alphas (mid_block)
    under names peft ignores and falls back to the most common alpha."""
    top = max((down.shape[0] for down, _ in pairs.values()), default=0)
    out = {}
    for module, (down, up) in pairs.items():
        pad = top - down.shape[0]
        if pad:
            down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])])
            up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
        out[module] = (down, up)
    return out


def _info(patch, fmt, pairs, dropped, worst) -> dict:
    ranks = [down.shape[0] for down, _ in pairs.values()]
    return {"format": fmt, "concepts": patch.concepts, "base_model": patch.base_model, "source_kind": patch.kind,
            "modules": len(pairs), "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
            "max_rel_error": round(worst, 6), "dropped": dropped}


def export(patch: Patch, path, fmt: str = "diffusers", *, rank=None, rel_error=None, force=False,
           dtype=torch.float16, bias=True) -> dict:
    """Writes `patch` as a LoRA file in format `fmt` (atomically; an existing file only with force).
    bias=False (kohya only): no "diff_b" keys, the bias changes left out and named in info["dropped"].
    Returns the info dict (also stored in the file's metadata)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not bias and fmt != "kohya":
        raise ValueError("bias=False is for the kohya format (the diffusers format holds biases as lora_B.bias)")
    from safetensors.torch import save_file
    if fmt == "diffusers":
        sd, info = to_diffusers(patch, rank, rel_error, dtype)
    else:
        sd, info = to_kohya(patch, rank, rel_error, dtype, bias)
    if not sd:
        raise PatchError("nothing in this patch can be expressed as LoRA (only 1-D changes)")
    meta = {"format": "pt", "fmn.export": json.dumps(info), "fmn.dropped": json.dumps(info["dropped"])}
    if fmt == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(info["rank_max"]),
                     "ss_network_alpha": str(info["rank_max"])})
    sd = {k: v.contiguous() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), force=force)
    return info


__all__ = ["FORMATS", "export", "to_diffusers", "to_kohya", "lora_pairs", "kohya_name"]
