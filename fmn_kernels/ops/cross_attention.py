"""Host side of the Triton concept attention: tile choice, launches, the torch.library custom ops.

The kernels and their math are in kernels.py, the tile table in configs.py. Each launch takes the
table's tile for (kernel, precision, padded head dim, GPU class) and, should that tile not compile
within the GPU's limits (Triton raises OutOfResources when it loads the kernel), the next smaller
one; the tile that worked is remembered per key, so a user never meets OutOfResources.

Paths, by key length L and query length N:
- L <= 128 (SD's 77 text tokens): the forward holds all keys in one block; the backward is one
  fused pass (delta, dQ, dK, dV) when the table allows it for the head dim and precision.
- N, L >= long_threshold (default 1024, MM-DiT joint attention): bigger query blocks forward;
  backward = delta + FlashAttention-2's dK/dV pass with dQ added atomically (5 matmuls), or, under
  torch.use_deterministic_algorithms(True), a separate dQ pass (7 matmuls, bitwise repeatable).
- otherwise: delta, dQ over query blocks, dK/dV over key blocks.
The dK/dV pass splits the query rows over programs to fill the GPU when there are few key blocks,
reducing with fp32 atomics, or a workspace summed in a fixed order when deterministic.

Registered as torch.library custom ops (fmn_kernels::concept_attention_fwd / _bwd) with autograd
and fake implementations, so torch.compile(fullgraph=True) traces through them without a break.
"""
import math
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from ..utils import triton_interpreting
from . import configs
from .kernels import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel

LOG2E = 1.4426950408889634
LONG_THRESHOLD = 1024
_WORKING_TILE = {}  # (kernel, precision, BLOCK_D, GPU class, flags) -> index of the tile that fit


def precision_class(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def device_info(q: torch.Tensor):
    """(GPU class, SM count). Under the interpreter: sm80's table, one SM (no split needed).
    With CPU tensors outside the interpreter (the ahead-of-time check): Triton's active driver."""
    if triton_interpreting():
        return "sm80", 1
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        return configs.arch_class(10 * major + minor), torch.cuda.get_device_properties(q.device).multi_processor_count
    driver = triton.runtime.driver.active
    props = driver.utils.get_device_properties(driver.get_current_device())
    return configs.arch_class(driver.get_current_target().arch), props["multiprocessor_count"]


class Plan:
    """What one call launches: shapes, precision, tiles' keys and flags shared by the kernels."""

    def __init__(self, q, L, long_threshold):
        B, H, N, D = q.shape
        self.B, self.H, self.N, self.L, self.D = B, H, N, L, D
        self.block_d = max(16, triton.next_power_of_2(D))
        self.precision = precision_class(q.dtype)
        self.arch, self.sm_count = device_info(q)
        self.one_block_n = max(16, triton.next_power_of_2(L)) if L <= 128 else 0
        self.long = N >= long_threshold and L >= long_threshold
        self.common = dict(
            HEAD_DIM=D, BLOCK_D=self.block_d,
            UPCAST=triton_interpreting() and q.dtype == torch.bfloat16,
            PRECISION="ieee" if self.precision == "ieee" else "tf32",
        )

    def tiles(self, kernel):
        if kernel in ("fwd1", "bwd1") and not self.one_block_n:
            return []
        return configs.tiles(kernel, self.precision, self.block_d, self.arch)

    def block_n(self, tile):
        return tile.block_n or self.one_block_n


def vector_width(tensors, element_size):
    """Elements per 16 bytes when every tensor's base is 16-byte aligned and every stride of a dim
    longer than 1 (but the last) is a multiple of it; else 1. Given to the kernels as VEC."""
    vec = 16 // element_size
    for t in tensors:
        if t.data_ptr() % 16:
            return 1
        if any(size > 1 and stride % vec for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
            return 1
    return vec


def _launch(kernel_name, plan, flags, candidates, launch_one):
    """Launches with the first candidate tile that fits the GPU; returns it (None: none fitted)."""
    key = (kernel_name, plan.precision, plan.block_d, plan.arch, tuple(sorted(flags.items())))
    start = _WORKING_TILE.get(key, 0)
    for index in range(start, len(candidates)):
        try:
            launch_one(candidates[index])
        except OutOfResources:
            continue
        _WORKING_TILE[key] = index
        return candidates[index]
    _WORKING_TILE[key] = len(candidates)
    return None


def _mask_args(w, zero, valid, dummy):
    """Pointers and batch strides of the [B, L] vectors; dummies for absent ones."""
    tensors = [t if t is not None else dummy for t in (w, zero, valid)]
    strides = [t.stride(0) if t is not None else 0 for t in (w, zero, valid)]
    flags = dict(HAS_W=w is not None, HAS_ZERO=zero is not None, HAS_VALID=valid is not None)
    return tensors, strides, flags


def forward(q, k, v, w, zero, valid, scale, long_threshold=LONG_THRESHOLD):
    """out (q's layout), score [B, H, N] float32 (empty without w), lse [B, H, N] (log2 units)."""
    plan = Plan(q, k.shape[2], long_threshold)
    B, H, N = plan.B, plan.H, plan.N
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    score = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if w is not None else lse.new_empty(0)
    vectors, vector_strides, flags = _mask_args(w, zero, valid, lse)
    vec = vector_width((q, k, v, out), q.element_size())

    def launch(one_block):
        def launch_one(tile):
            grid = (B * H, triton.cdiv(N, tile.block_m))
            _fwd_kernel[grid](
                q, k, v, *vectors, out, score, lse,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *vector_strides,
                H, N, plan.L, scale * LOG2E, VEC=vec, ONE_KEY_BLOCK=one_block, **flags, **plan.common,
                BLOCK_M=tile.block_m, BLOCK_N=plan.block_n(tile), num_warps=tile.num_warps,
                num_stages=tile.num_stages,
            )
        return launch_one

    if _launch("fwd1", plan, flags, plan.tiles("fwd1"), launch(True)) is None:
        kernel = "fwd_long" if plan.long else "fwd"
        if _launch(kernel, plan, flags, plan.tiles(kernel), launch(False)) is None:
            raise RuntimeError(f"no tile of the forward kernel fits this GPU ({plan.arch}, D={plan.D})")
    return out, score, lse


def dkdv_split(plan, block_m, block_n, requested):
    """(splits, rows per split): programs sharing one key block's query rows (fills the GPU at L = 77)."""
    n_row_blocks = triton.cdiv(plan.N, block_m)
    if requested:
        split = requested
    else:
        programs = triton.cdiv(plan.L, block_n) * plan.B * plan.H
        split = math.ceil(4 * plan.sm_count / programs)
    split = max(1, min(split, n_row_blocks))
    blocks_per_split = triton.cdiv(n_row_blocks, split)
    return triton.cdiv(n_row_blocks, blocks_per_split), blocks_per_split * block_m


def backward(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale, split_request=0,
             long_threshold=LONG_THRESHOLD):
    """(dq, dk, dv): dv is empty when dout is None (only the score was used)."""
    plan = Plan(q, k.shape[2], long_threshold)
    B, H, N, L, D = plan.B, plan.H, plan.N, plan.L, plan.D
    has_do = dout is not None
    has_g = dscore is not None and w is not None
    dscore = dscore.contiguous() if has_g else lse
    do = dout if has_do else out
    vectors, vector_strides, mask_flags = _mask_args(w, zero, valid, lse)
    flags = dict(mask_flags, HAS_G=has_g, HAS_DO=has_do)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v) if has_do else v.new_empty(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    vec = vector_width((q, k, v, out, do, dq, dk) + ((dv,) if dv.numel() else ()), q.element_size())
    vec = vec if D % vec == 0 else 1  # the fp32 [split, B, H, L, D] dK/dV buffers share the hint
    row_args = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    def launch_dkdv(one_block, dq_mode, dq_target, delta):
        def launch_one(tile):
            block_n = plan.block_n(tile)
            split, rows_per_split = dkdv_split(plan, tile.block_m, block_n, split_request)
            atomic = split > 1 and not deterministic
            direct = split == 1 or (atomic and k.dtype == torch.float32)  # no fp32 buffer needed
            if direct:
                if atomic:
                    dk.zero_()
                    dv.zero_()
                dk_buf, dv_buf = dk.unsqueeze(0), (dv if dv.numel() else dk).unsqueeze(0)
            else:
                shape = (1 if atomic else split, B, H, L, D)
                zero_or_empty = torch.zeros if atomic else torch.empty
                dk_buf = zero_or_empty(shape, device=q.device, dtype=torch.float32)
                dv_buf = zero_or_empty(shape, device=q.device, dtype=torch.float32) if dv.numel() else dk_buf
            split_strides = lambda t: (0 if atomic else t.stride(0), *t.stride()[1:4])  # noqa: E731
            _bwd_dkdv_kernel[(B * H, triton.cdiv(L, block_n), split)](
                q, k, v, *vectors, do, lse, delta, dscore, dk_buf, dv_buf, out, score, dq_target,
                *row_args, *split_strides(dk_buf), *split_strides(dv_buf), *out.stride()[:3],
                *dq_target.stride()[:3], *vector_strides,
                H, N, L, scale * LOG2E, scale, rows_per_split, VEC=vec, ATOMIC=atomic,
                FUSED_DQ=dq_mode == "fused", ATOMIC_DQ=dq_mode == "atomic", **flags, **plan.common,
                BLOCK_M=tile.block_m, BLOCK_N=block_n, num_warps=tile.num_warps, num_stages=tile.num_stages,
            )
            if not direct:
                dk.copy_(dk_buf.sum(0))
                if dv.numel():
                    dv.copy_(dv_buf.sum(0))
        return launch_one

    if _launch("bwd1", plan, flags, plan.tiles("bwd1"), launch_dkdv(True, "fused", dq, lse)) is not None:
        return dq, dk, dv
    delta = _delta(plan, out, do, score, dscore, has_do, has_g, vec)
    if plan.long and not deterministic and plan.tiles("dkdv_long"):
        dq_acc = dq if q.dtype == torch.float32 else torch.empty_like(q, dtype=torch.float32)
        dq_acc.zero_()
        if _launch("dkdv_long", plan, flags, plan.tiles("dkdv_long"), launch_dkdv(False, "atomic", dq_acc, delta)):
            if dq_acc is not dq:
                dq.copy_(dq_acc)
            return dq, dk, dv
    _dq(plan, q, k, v, vectors, vector_strides, flags, do, lse, delta, dscore, dq, scale, vec)
    if _launch("dkdv", plan, flags, plan.tiles("dkdv"), launch_dkdv(False, "none", dq, delta)) is None:
        raise RuntimeError(f"no tile of the dK/dV kernel fits this GPU ({plan.arch}, D={D})")
    return dq, dk, dv


def _delta(plan, out, do, score, dscore, has_do, has_g, vec):
    delta = torch.empty((plan.B, plan.H, plan.N), device=out.device, dtype=torch.float32)
    block_m = 64 if plan.block_d <= 128 else 32
    _bwd_delta_kernel[(plan.B * plan.H, triton.cdiv(plan.N, block_m))](
        out, do, score, dscore, delta, *out.stride()[:3], *do.stride()[:3], plan.H, plan.N,
        HEAD_DIM=plan.D, VEC=vec, HAS_DO=has_do, HAS_G=has_g, BLOCK_M=block_m, BLOCK_D=plan.block_d,
    )
    return delta


def _dq(plan, q, k, v, vectors, vector_strides, flags, do, lse, delta, dscore, dq, scale, vec):
    def launch_one(tile):
        _bwd_dq_kernel[(plan.B * plan.H, triton.cdiv(plan.N, tile.block_m))](
            q, k, v, *vectors, do, lse, delta, dscore, dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *vector_strides,
            plan.H, plan.N, plan.L, scale * LOG2E, scale, VEC=vec, **flags, **plan.common,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
    if _launch("dq", plan, flags, plan.tiles("dq"), launch_one) is None:
        raise RuntimeError(f"no tile of the dQ kernel fits this GPU ({plan.arch}, D={plan.D})")


# ---- torch.library registration ----

@torch.library.custom_op("fmn_kernels::concept_attention_fwd", mutates_args=())
def concept_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor],
                          zero: Optional[torch.Tensor], valid: Optional[torch.Tensor], scale: float,
                          dkdv_split: int, long_threshold: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(q, k, v, w, zero, valid, scale, long_threshold)


@concept_attention_fwd.register_fake
def _(q, k, v, w, zero, valid, scale, dkdv_split, long_threshold):
    B, H, N, _ = q.shape
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    score = q.new_empty((B, H, N), dtype=torch.float32) if w is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), score, lse


@torch.library.custom_op("fmn_kernels::concept_attention_bwd", mutates_args=())
def concept_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          score: torch.Tensor, lse: torch.Tensor, w: Optional[torch.Tensor],
                          zero: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                          dout: Optional[torch.Tensor], dscore: Optional[torch.Tensor], scale: float,
                          dkdv_split: int, long_threshold: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dout is not None and dout.stride(-1) != 1:
        dout = dout.contiguous()
    return backward(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale, dkdv_split, long_threshold)


@concept_attention_bwd.register_fake
def _(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale, dkdv_split, long_threshold):
    dv = torch.empty_like(v) if dout is not None else v.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), dv


def _setup_context(ctx, inputs, output):
    q, k, v, w, zero, valid, scale, dkdv_split, long_threshold = inputs
    out, score, lse = output
    ctx.save_for_backward(q, k, v, out, score, lse, w, zero, valid)
    ctx.scale, ctx.dkdv_split, ctx.long_threshold = scale, dkdv_split, long_threshold
    ctx.has_w = w is not None
    ctx.mark_non_differentiable(lse)
    if w is None:
        ctx.mark_non_differentiable(score)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no dO of zeros


def _backward(ctx, dout, dscore, _dlse):
    q, k, v, out, score, lse, w, zero, valid = ctx.saved_tensors
    if not ctx.has_w:
        dscore = None
    if dscore is None and dout is None:
        return (None,) * 9
    needs = ctx.needs_input_grad
    # Only the score used (the attention loss): v gets no gradient, as with autograd on the reference.
    need_dv = needs[2] and dout is not None
    dq, dk, dv = concept_attention_bwd(q, k, v, out, score, lse, w, zero, valid, dout, dscore, ctx.scale,
                                       ctx.dkdv_split, ctx.long_threshold)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if need_dv else None,
            None, None, None, None, None, None)


concept_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def concept_attention_triton(q, k, v, scale, concept_weights=None, zero_mask=None, key_mask=None,
                             dkdv_split=None, long_threshold=LONG_THRESHOLD):
    """Triton path of `fmn_kernels.cross_attention` (inputs already checked there).

    Masks are passed as they are ([B, L], bool or float weights): only a non-unit last stride is
    copied. dkdv_split forces the number of programs sharing one key block's query rows in the
    backward (tests use it for the atomic and workspace reductions); long_threshold lowers the N, L
    from which the long-sequence path is taken (tests run it at small sizes).
    """
    w, zero, valid = (None if t is None else (t if t.stride(-1) == 1 else t.contiguous())
                      for t in (concept_weights, zero_mask, key_mask))
    out, score, _ = concept_attention_fwd(q, k, v, w, zero, valid, float(scale), int(dkdv_split or 0),
                                          int(long_threshold))
    return out, (score if w is not None else None)
