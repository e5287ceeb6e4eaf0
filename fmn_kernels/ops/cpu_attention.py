"""Native CPU backend of `fmn_kernels.cross_attention`: fused forward and backward in C++.

The kernels (fmn_kernels/csrc/cross_attention_cpu.cpp, built by the top-level CMakeLists.txt during
`pip install`) are registered as the torch ops fmn::concept_attention_cpu_fwd / _bwd. This module
loads that library, gives the ops their autograd formula and fake (shape-only) implementations, so
they work under torch.compile, and wraps them for `cross_attention(..., backend="cpu")`.
Same math as the Triton kernels (see fmn_kernels/ops/cross_attention.py); nothing of size N x L is
kept, only a [128 or 256 x up to 512] score tile per thread.
"""
import glob
import os
import platform
import warnings

import torch

LIBRARY_GLOB = "_cpu_attention*.so"
DISABLE_ENV = "FMN_DISABLE_CPU_KERNELS"  # =1: act as if the library were not built (tests, troubleshooting)


def _find_library():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(here, LIBRARY_GLOB)))
    return found[0] if found else None


def _load():
    """Finds and loads the library; returns None, or why the backend is unavailable.

    Called once, at import: the search reads the file system, which torch.compile(fullgraph=True)
    cannot trace, so the calls below only read LOAD_ERROR."""
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    path = _find_library()
    if path is None:
        return ("the compiled library fmn_kernels/_cpu_attention*.so is missing (build it with "
                "`bash scripts/setup.sh`, or `pip install --no-build-isolation -e .` with cmake installed)")
    if platform.machine().lower() in ("x86_64", "amd64") and \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the compiled library needs a CPU with AVX2 and FMA"
    try:
        torch.ops.load_library(path)
        _register_python_parts()
    except (OSError, RuntimeError) as e:
        return f"loading {path} failed: {e}"
    return None


def cpu_backend_available() -> bool:
    """True when the native CPU kernels are built and loaded on this machine."""
    return LOAD_ERROR is None


def auto_cpu_backend() -> str:
    """The backend `backend="auto"` uses for CPU tensors: "cpu", or "reference" with a warning.

    fmn_kernels.api calls it once, at import, so the warning is never inside a traced call."""
    if LOAD_ERROR is None:
        return "cpu"
    warnings.warn(f"fmn_kernels: native CPU backend unavailable ({LOAD_ERROR}); backend='auto' uses the "
                  "materialising reference for CPU tensors", RuntimeWarning, stacklevel=2)
    return "reference"


def _fake_fwd(q, k, v, weights, keep, valid, scale):
    B, H, N, _ = q.shape
    stats = q.new_empty((B, H, N), dtype=torch.float32)
    return torch.empty_like(q), stats, torch.empty_like(stats)


def _fake_bwd(dout, dscore, q, k, v, out, score, lse, weights, keep, valid, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, weights, keep, valid, scale = inputs
    out, score, lse = output
    ctx.save_for_backward(q, k, v, out, score, lse, weights, keep, valid)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dscore, _dlse):
    q, k, v, out, score, lse, weights, keep, valid = ctx.saved_tensors
    if dout is None and (dscore is None or weights is None):
        return (None,) * 7
    dq, dk, dv = torch.ops.fmn.concept_attention_cpu_bwd(dout, dscore, q, k, v, out, score, lse,
                                                         weights, keep, valid, ctx.scale)
    # Only the score used (the attention loss): v gets no gradient, as with autograd on the reference.
    return dq, dk, (dv if dout is not None else None), None, None, None, None


def _register_python_parts():
    torch.library.register_fake("fmn::concept_attention_cpu_fwd")(_fake_fwd)
    torch.library.register_fake("fmn::concept_attention_cpu_bwd")(_fake_bwd)
    torch.library.register_autograd("fmn::concept_attention_cpu_fwd", _backward, setup_context=_setup_context)


def concept_attention_cpu(q, k, v, scale, concept_weights=None, zero_mask=None, key_mask=None):
    """CPU path of `fmn_kernels.cross_attention` (inputs checked there): (out, score or None)."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"backend='cpu' is unavailable: {LOAD_ERROR}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"backend='cpu' supports float32, bfloat16 and float16 q, got {q.dtype}")
    if q.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got q on {q.device}")
    weights = None if concept_weights is None else concept_weights.to(torch.float32)
    keep = None if zero_mask is None else (~zero_mask).to(torch.float32)
    valid = None if key_mask is None else key_mask.to(torch.float32)
    out, score, _ = torch.ops.fmn.concept_attention_cpu_fwd(q, k, v, weights, keep, valid, float(scale))
    return out, (score if weights is not None else None)


LOAD_ERROR = _load()  # None, or why the native kernels are unavailable (at import: see _load)
