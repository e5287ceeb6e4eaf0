"""`cross_attention`: input checks and backend choice for fused concept attention."""
import math

import torch

from .ops.cpu_attention import auto_cpu_backend, concept_attention_cpu
from .reference import concept_attention_reference
from .utils import triton_interpreting

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
BACKENDS = ("auto", "triton", "cpu", "reference")
# backend="auto" is decided from these two, read once, here at import: finding the native library reads
# the file system, which torch.compile(fullgraph=True) cannot trace, so a call reads plain attributes.
# (TRITON_INTERPRET=1 has to be set before triton's import anyway.) Tests change them with monkeypatch.
TRITON_INTERPRETING = triton_interpreting()
CPU_AUTO_BACKEND = auto_cpu_backend()  # "cpu" (native kernels), or "reference" with a warning


def check_backend(backend) -> str:
    """`backend` if it is one of BACKENDS, else a ValueError naming the choices."""
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS[:-1])) + f" or {BACKENDS[-1]!r}"
        raise ValueError(f"backend must be {choices}, got {backend!r}")
    return backend


def _check_mask(name, mask, batch, keys, device, allow_float):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, L] = [{batch}, {keys}], got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, keys):
        raise ValueError(f"{name} must have shape [B, L] = [{batch}, {keys}], got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {mask.device}")
    if mask.dtype != torch.bool and not (allow_float and mask.is_floating_point()):
        expected = "bool or floating point" if allow_float else "bool"
        raise TypeError(f"{name} must be {expected}, got {mask.dtype}")
    return mask


def _check_inputs(q, k, v, concept_weights, zero_mask, key_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, seq, D], got shape {list(t.shape)}")
        if t.dtype not in _DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    B, H, N, D = q.shape
    L = k.shape[2]
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"k and v must have q's batch and heads [{B}, {H}], got k {list(k.shape)}, v {list(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, L, D], got k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have q's head dim {D}, got {k.shape[3]}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    if N < 1 or L < 1:
        raise ValueError(f"q and k must have at least one row, got N={N}, L={L}")
    _check_mask("concept_weights", concept_weights, B, L, q.device, allow_float=True)
    _check_mask("zero_mask", zero_mask, B, L, q.device, allow_float=False)
    _check_mask("key_mask", key_mask, B, L, q.device, allow_float=False)


def cross_attention(q, k, v, *, scale=None, concept_weights=None, zero_mask=None, key_mask=None,
                    backend="auto"):
    """Scaled-dot-product attention that also returns the concept score of every query row.

    Args:
        q: [B, H, N, D]; k, v: [B, H, L, D]. Any strides with a contiguous last dim;
            float32, float16 or bfloat16 (float64 on the reference backend).
        scale: softmax scale, default D ** -0.5.
        concept_weights: None or [B, L] bool/float, the weight w_j of each key column.
        zero_mask: None or [B, L] bool; True columns have their probabilities zeroed after the
            softmax, without renormalising.
        key_mask: None or [B, L] bool; True = the key takes part in the softmax.
        backend: "triton", "cpu", "reference" or "auto" (triton on CUDA, or on CPU under
            TRITON_INTERPRET=1; else "cpu", the native C++ kernels, for float32/bfloat16/float16
            CPU tensors, falling back to the reference with a warning when they are not built).

    Returns:
        out [B, H, N, D] in q's dtype, and concept_score [B, H, N] float32 = sum_j w_j p_ij^2
        (None when concept_weights is None). Both are differentiable w.r.t. q, k and v.
        Set torch.use_deterministic_algorithms(True) for a bitwise-reproducible backward.
    """
    check_backend(backend)
    _check_inputs(q, k, v, concept_weights, zero_mask, key_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):  # the kernels take the row max on the unscaled dot
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if backend == "auto":
        backend = "triton" if (q.is_cuda or TRITON_INTERPRETING) else (
            CPU_AUTO_BACKEND if q.dtype in _DTYPES else "reference")
    if backend == "cpu":
        return concept_attention_cpu(q, k, v, scale, concept_weights, zero_mask, key_mask)
    if backend == "reference":
        return concept_attention_reference(q, k, v, scale, concept_weights, zero_mask, key_mask,
                                           upcast=True)
    if not (q.is_cuda or TRITON_INTERPRETING):
        raise ValueError("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                         f"set before triton is imported; got tensors on {q.device}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 q, got {q.dtype}")
    from .ops.cross_attention import concept_attention_triton
    return concept_attention_triton(q, k, v, scale, concept_weights, zero_mask, key_mask)
