"""Inputs and the tolerance rule shared by the kernel tests (Triton, native CPU, torch.compile, GPU).

Tolerance rule (flash-attention's): a backend's max error against the float64 oracle must be within
2x the max error of the same computation done by PyTorch in the input dtype, plus a floor of
FLOOR_ULPS units in the last place of the output's scale (in float32 both errors are rounding noise,
and summation order alone can differ by that much).
"""
import torch

FLOOR_ULPS = 8


def make_inputs(B, H, N, L, D, dtype, seed=0):
    """q, k, v laid out as diffusers does (view(B, seq, H, D).transpose(1, 2)), with k, v from one
    fused projection, so none is contiguous in [B, H, seq, D] order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(B, L, 2, H, D, generator=g).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return q, k, v


def make_masks(B, L, seed=0, bool_weights=False):
    """(concept weights [B, L] (about half zero), zero mask, key mask); with B > 1 the last sample
    has every key masked (its rows must come out zero, not NaN)."""
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.5)
    if bool_weights:
        weights = weights > 0
    zero_mask = torch.rand(B, L, generator=g) < 0.25
    key_mask = torch.rand(B, L, generator=g) < 0.8
    key_mask[:, 0] = True
    if B > 1:
        key_mask[-1] = False
    return weights, zero_mask, key_mask


def mask_kwargs(B, L, seed=0):
    """make_masks as keyword arguments of cross_attention."""
    weights, zero_mask, key_mask = make_masks(B, L, seed)
    return dict(concept_weights=weights, zero_mask=zero_mask, key_mask=key_mask)


def assert_within_rule(name, actual, oracle, torch_same_dtype, dtype):
    actual, oracle, torch_same_dtype = actual.double(), oracle.double(), torch_same_dtype.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - oracle).abs().max().item()
    torch_err = (torch_same_dtype - oracle).abs().max().item()
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * max(oracle.abs().max().item(), 1e-3)
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"
