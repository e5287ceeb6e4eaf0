"""Low-rank compression of weight changes: a change D (out x in, after flattening the trailing
dims) becomes two factors, up [out, r] and down [r, in], with D ~= up @ down, from the truncated
SVD (the best rank-r approximation in the Frobenius norm, Eckart-Young).

The rank is either given (`rank=R`, capped at min(out, in)) or the smallest one whose relative
Frobenius error ||D - up @ down|| / ||D|| is at most `rel_error`. A factor pair is kept only
when it is smaller than D itself; 1-D changes (biases, norms) stay as they are.

The singular values are split evenly (sqrt(S) on each side) so that both factors have the same
scale, which keeps their fp16 rounding balanced.
"""
from __future__ import annotations

import torch

from fmn.patches.patch import DOWN_SUFFIX, SCALE_SUFFIX, UP_SUFFIX, Patch, PatchError, dequantize_delta
from fmn.patches.patch_check import target_names


def _choose_rank(s: torch.Tensor, rank: int | None, rel_error: float | None) -> int:
    if rank is not None:
        return max(1, min(int(rank), s.numel()))
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    # tail[r] = sum of sigma_i^2 for i >= r: the squared error of the rank-r truncation
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
    for r in range(1, s.numel() + 1):
        if tail[r] <= (rel_error ** 2) * total:
            return r
    return s.numel()


def factorize(delta: torch.Tensor, rank: int | None = None, rel_error: float | None = None):
    """(up [out, r], down [r, in...] in fp32, relative Frobenius error) for a change of >= 2 dims."""
    if (rank is None) == (rel_error is None):
        raise ValueError("give exactly one of rank= and rel_error=")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rel_error is not None and not 0.0 <= rel_error < 1.0:
        raise ValueError(f"rel_error must be in [0, 1), got {rel_error}")
    d = delta.float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = _choose_rank(s, rank, rel_error)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    norm = float(d.norm())
    err = float((d - up @ down).norm()) / norm if norm > 0 else 0.0
    return up.contiguous(), down.reshape(r, *delta.shape[1:]).contiguous(), err


def full_changes(patch: Patch) -> dict:
    """{target name: fp32 change} of a delta or LoRA patch (a replace patch holds no changes)."""
    t = patch.tensors
    if patch.kind == "replace":
        raise PatchError("a 'replace' patch holds trained weights, not changes: it cannot be compressed or exported "
                         "as LoRA; train with a delta patch dtype (fp16, bf16, fp32, int8) or train='lora'")
    out = {}
    for name in target_names(patch.kind, t):
        if patch.kind == "lora":
            stem = name[: -len(".weight")]
            a, b = t[stem + ".lora_A.weight"].float(), t[stem + ".lora_B.weight"].float()
            out[name] = b @ a.reshape(a.shape[0], -1)
        elif name + UP_SUFFIX in t:
            down = t[name + DOWN_SUFFIX].float()
            out[name] = t[name + UP_SUFFIX].float() @ down.reshape(down.shape[0], -1)
        elif t[name].dtype == torch.int8:
            out[name] = dequantize_delta(t[name], t[name + SCALE_SUFFIX])
        else:
            out[name] = t[name].float()
    return out


def compress(patch: Patch, rank: int | None = None, rel_error: float | None = None,
             dtype: torch.dtype = torch.float16) -> Patch:
    """A delta patch holding factor pairs (`<name>.delta_up`, `<name>.delta_down`, in `dtype`) for
    every change of >= 2 dims where they are smaller; other changes in `dtype` as they are. The
    summary records the rank and error per tensor under "compression". Flattened shapes of LoRA
    changes are restored from the fingerprint."""
    tensors, report = {}, {}
    for name, d in full_changes(patch).items():
        shape = patch.fingerprint["tensors"][name]["shape"]
        d = d.reshape(shape)
        if d.dim() >= 2:
            up, down, err = factorize(d, rank, rel_error)
            if up.numel() + down.numel() < d.numel():
                tensors[name + UP_SUFFIX], tensors[name + DOWN_SUFFIX] = up.to(dtype), down.to(dtype)
                report[name] = {"rank": up.shape[1], "rel_error": round(err, 6)}
                continue
        tensors[name] = d.to(dtype)
        report[name] = {"rank": None, "rel_error": 0.0}
    errors = [r["rel_error"] for r in report.values()]
    summary = dict(patch.summary, compression={
        "rank": rank, "rel_error_bound": rel_error, "max_rel_error": max(errors, default=0.0),
        "dtype": str(dtype).replace("torch.", ""), "per_tensor": report})
    return Patch(tensors=tensors, kind="delta", concepts=list(patch.concepts), base_model=patch.base_model,
                 fingerprint=patch.fingerprint, options=dict(patch.options), summary=summary, version=patch.version)


__all__ = ["factorize", "compress", "full_changes"]
