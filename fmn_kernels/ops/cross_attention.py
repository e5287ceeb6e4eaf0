"""Host side of the Triton concept attention: plans, launches, autograd, the torch.library custom ops.

The kernels and their math are in kernels.py, the tile table in configs.py.

Host path: everything a call needs that depends only on (shapes, strides, dtypes, device, flags) --
tiles, grids, constexprs, vector width, stride arguments, the bound launch callables -- is built
once into a plan (`ForwardPlan`, `BackwardPlan`) and cached under that key; device properties are
cached per device. A call then allocates its outputs and launches. Eager calls go through a plain
torch.autograd.Function (`ConceptAttention`); under torch.compile the torch.library custom ops
(fmn_kernels::concept_attention_fwd / _bwd, with fake implementations) are traced instead, so
fullgraph=True works.

Tiles: a plan takes the table's tile for (kernel, precision, padded head dim, GPU class) and, should
that tile not compile within the GPU's limits (Triton raises OutOfResources when it loads the
kernel), the next smaller one; the tile that worked is remembered, so a user never meets
OutOfResources.

Paths, by key length L and query length N:
- L <= 128 (SD's 77 text tokens): the forward holds all keys in one block; the backward is one
  fused pass (delta, dQ, dK, dV: "bwd1") when the table allows it for the head dim and precision.
- N, L >= long_threshold (default 1024, MM-DiT joint attention): the "_long" tiles (big blocks).
- otherwise the general tiles. Backward = delta, dK/dV over key blocks, dQ over query blocks.
The dK/dV pass splits the query rows over programs when there are too few key blocks to fill the
GPU; the splits' fp32 partial sums are added in a fixed order by a small kernel. No atomics: the
backward is bitwise repeatable.
"""
import math
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from ..utils import triton_interpreting
from . import configs
from .kernels import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel, _sum_splits_kernel

LOG2E = 1.4426950408889634
LONG_THRESHOLD = 1024
_WORKING_TILE = {}  # (kernel, precision, BLOCK_D, GPU class, flags) -> index of the tile that fit
_DEVICE_INFO = {}   # torch.device -> (GPU class, SM count)
_FWD_PLANS = {}
_BWD_PLANS = {}


def precision_class(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def device_info(device: torch.device):
    """(GPU class, SM count), queried once per device. Under the interpreter: sm80's table, one SM
    (no split needed). CPU tensors outside the interpreter (the ahead-of-time check): Triton's
    active driver."""
    info = _DEVICE_INFO.get(device)
    if info is None:
        info = _DEVICE_INFO[device] = _query_device(device)
    return info


def _query_device(device):
    if triton_interpreting():
        return "sm80", 1
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return configs.arch_class(10 * props.major + props.minor), props.multi_processor_count
    driver = triton.runtime.driver.active
    props = driver.utils.get_device_properties(driver.get_current_device())
    return configs.arch_class(driver.get_current_target().arch), props["multiprocessor_count"]


class Plan:
    """Shapes, precision, GPU class and the constexprs shared by the kernels of one call."""

    def __init__(self, q, L, long_threshold):
        B, H, N, D = q.shape
        self.B, self.H, self.N, self.L, self.D = B, H, N, L, D
        self.block_d = max(16, triton.next_power_of_2(D))
        self.precision = precision_class(q.dtype)
        self.arch, self.sm_count = device_info(q.device)
        self.one_block_n = max(16, triton.next_power_of_2(L)) if L <= 128 else 0
        self.long = N >= long_threshold and L >= long_threshold
        # 16-bit inputs: the kernels' lean loops (no masks on full blocks, score work on concept blocks
        # only); fp32 (FMA / TF32 dots, register-bound) keeps one loop with the score in it
        self.lean = q.dtype != torch.float32
        self.common = dict(
            HEAD_DIM=D, EVEN_D=D == self.block_d, BLOCK_D=self.block_d,
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


class Launcher:
    """One kernel launch with everything fixed but the tensors and the scale: the tile is picked
    (with fallback) at the first call, then the bound `kernel[grid]` is called directly."""

    def __init__(self, name, plan, kernel, flags, grid_of, consts_of, candidates=None):
        self.name, self.plan, self.kernel, self.flags = name, plan, kernel, flags
        self.grid_of, self.consts_of = grid_of, consts_of
        self.candidates = plan.tiles(name) if candidates is None else candidates
        self.fn = self.consts = self.tile = self.compiled = None

    def __bool__(self):
        return bool(self.candidates)

    def __call__(self, *args):
        if self.fn is not None:
            return self.fn(*args, **self.consts)

        def launch_one(tile):
            fn, consts = self.kernel[self.grid_of(tile)], dict(self.consts_of(tile), **self.flags)
            self.compiled = fn(*args, **consts)  # Triton's compiled kernel (None under the interpreter)
            self.fn, self.consts, self.tile = fn, consts, tile
        if _launch(self.name, self.plan, self.flags, self.candidates, launch_one) is None:
            raise RuntimeError(f"no tile of the {self.name} kernel fits this GPU ({self.plan.arch}, D={self.plan.D})")


def _tile_consts(tile, block_n):
    return dict(BLOCK_M=tile.block_m, BLOCK_N=block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)


def _mask_flags(w, zero, valid):
    return dict(HAS_W=w is not None, HAS_ZERO=zero is not None, HAS_VALID=valid is not None)


def _mask_strides(w, zero, valid):
    return tuple(0 if t is None else t.stride(0) for t in (w, zero, valid))


def _mask_key(t):
    return None if t is None else (t.dtype, t.stride(0))


def _call_key(q, k, v, w, zero, valid, long_threshold):
    """What a plan depends on. 16-byte alignment of the bases is part of it (the vector width)."""
    aligned = not ((q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15)
    tf32 = q.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, _mask_key(w),
            _mask_key(zero), _mask_key(valid), long_threshold, tf32, aligned)


class ForwardPlan:
    """Forward launch of one call key: out strides, LSE/score shapes, the kernel's arguments."""

    def __init__(self, q, k, v, w, zero, valid, long_threshold):
        plan = self.plan = Plan(q, k.shape[2], long_threshold)
        B, H, N, L = plan.B, plan.H, plan.N, plan.L
        out = torch.empty_like(q)
        self.out_stride = out.stride()
        self.row_shape = (B, H, N)
        self.has_w = w is not None
        vec = vector_width((q, k, v, out), q.element_size())
        self.scalars = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                        *_mask_strides(w, zero, valid), H, N, L)
        flags = _mask_flags(w, zero, valid)

        def consts(one_block):
            def of(tile):
                block_n = plan.block_n(tile)
                return dict(_tile_consts(tile, block_n), **plan.common, VEC=vec, ONE_KEY_BLOCK=one_block,
                            EVEN_N=N % tile.block_m == 0, EVEN_L=L % block_n == 0, LEAN=plan.lean)
            return of

        grid = lambda tile: (B * H, triton.cdiv(N, tile.block_m))  # noqa: E731
        self.launch = Launcher("fwd1", plan, _fwd_kernel, flags, grid, consts(True))
        if not self.launch.candidates:
            name = "fwd_long" if plan.long else "fwd"
            self.launch = Launcher(name, plan, _fwd_kernel, flags, grid, consts(False))

    def run(self, q, k, v, w, zero, valid, scale):
        out = torch.empty_strided(q.shape, self.out_stride, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.row_shape, device=q.device, dtype=torch.float32)
        score = torch.empty(self.row_shape, device=q.device, dtype=torch.float32) if self.has_w else None
        self.launch(q, k, v, lse if w is None else w, lse if zero is None else zero, lse if valid is None else valid,
                    out, lse if score is None else score, lse, *self.scalars, scale * LOG2E)
        return out, score, lse


def forward(q, k, v, w, zero, valid, scale, long_threshold=LONG_THRESHOLD):
    """out (q's layout), score [B, H, N] float32 (None without w), lse [B, H, N] (log2 units)."""
    key = _call_key(q, k, v, w, zero, valid, long_threshold)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _FWD_PLANS[key] = ForwardPlan(q, k, v, w, zero, valid, long_threshold)
    return plan.run(q, k, v, w, zero, valid, scale)


def dkdv_split(plan, block_m, block_n, requested):
    """(splits, rows per split): programs sharing one key block's query rows, so that the dK/dV
    pass fills the GPU (about two programs per SM) when there are few key blocks (L = 77)."""
    n_row_blocks = triton.cdiv(plan.N, block_m)
    if requested:
        split = requested
    else:
        programs = triton.cdiv(plan.L, block_n) * plan.B * plan.H
        split = math.ceil(2 * plan.sm_count / programs)
    split = max(1, min(split, n_row_blocks))
    blocks_per_split = triton.cdiv(n_row_blocks, split)
    return triton.cdiv(n_row_blocks, blocks_per_split), blocks_per_split * block_m


def sum_block_n(block_d):
    """Keys per program of the split sum (sm80 at D=128 spilled with 32)."""
    return 32 if block_d <= 64 else 16 if block_d <= 128 else 8


class BackwardPlan:
    """Backward launches of one call key: delta, dK/dV (+ split sum), dQ; or the fused bwd1."""

    def __init__(self, q, k, v, out, w, zero, valid, dout, has_g, split_request, long_threshold):
        plan = self.plan = Plan(q, k.shape[2], long_threshold)
        B, H, N, L, D = plan.B, plan.H, plan.N, plan.L, plan.D
        self.has_do = has_do = dout is not None
        self.has_g = has_g
        do = dout if has_do else out
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        self.dq_stride, self.dk_stride = dq.stride(), dk.stride()
        self.dv_stride = torch.empty_like(v).stride() if has_do else None
        self.row_shape = (B, H, N)
        vec = vector_width((q, k, v, out, do, dq, dk), q.element_size())
        vec = vec if D % vec == 0 else 1  # the fp32 [split, B, H, L, D] workspace shares the hint
        flags = dict(_mask_flags(w, zero, valid), HAS_G=has_g, HAS_DO=has_do)
        masks = _mask_strides(w, zero, valid)
        row_args = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        dk_dest = (0, *self.dk_stride[:3])
        dv_dest = (0, *(self.dv_stride or self.dk_stride)[:3])
        self.split = 1

        def dkdv(name, fused):
            candidates = plan.tiles(name)
            if not candidates:
                return None, None
            tile = candidates[0]
            block_n = plan.block_n(tile)
            split, rows = dkdv_split(plan, tile.block_m, block_n, split_request)
            # Workspace [split, B, H, L, D] fp32 (split > 1) or the outputs themselves.
            ws_stride = (B * H * L * D, H * L * D, L * D, D)
            dk_strides = ws_stride if split > 1 else dk_dest
            dv_strides = ws_stride if split > 1 else dv_dest
            scalars = (*row_args, *dk_strides, *dv_strides, *out.stride()[:3], *self.dq_stride[:3], *masks, H, N, L)

            def consts(t):
                bn = plan.block_n(t)
                return dict(_tile_consts(t, bn), **plan.common, VEC=vec, FUSED_DQ=fused,
                            EVEN_N=N % t.block_m == 0 and rows % t.block_m == 0, EVEN_L=L % bn == 0)
            # the split (and so the grid) follows the table's tile; a fallback tile keeps it
            grid = lambda t: (B * H, triton.cdiv(L, plan.block_n(t)), split)  # noqa: E731
            launcher = Launcher(name, plan, _bwd_dkdv_kernel, flags, grid, consts, candidates)
            return launcher, (split, rows, scalars)

        self.fused, self.dkdv = True, None
        launcher, info = dkdv("bwd1", True)
        if launcher is None:
            self.fused = False
            name = "dkdv_long" if plan.long else "dkdv"
            launcher, info = dkdv(name, False)
            if launcher is None:
                raise RuntimeError(f"no tile of the dK/dV kernel in the table ({plan.arch}, D={D})")
        self.dkdv = launcher
        self.split, self.rows_per_split, self.dkdv_scalars = info
        self.ws_shape = (self.split, B, H, L, D)
        if self.split > 1:
            block_n = sum_block_n(plan.block_d)
            self.sum_splits = Launcher(
                "sum", plan, _sum_splits_kernel, dict(HAS_DO=has_do), lambda t: (B * H, triton.cdiv(L, block_n)),
                lambda t: dict(HEAD_DIM=D, BLOCK_N=block_n, BLOCK_D=plan.block_d, num_warps=4, num_stages=1),
                [configs.Tile(block_n, block_n, 4, 1)])
            self.sum_scalars = (self.split, B * H * L * D, *self.dk_stride[:3], *(self.dv_stride or self.dk_stride)[:3],
                                H, L)
        if not self.fused:
            delta_m = 64 if plan.block_d <= 128 else 32
            self.delta = Launcher(
                "delta", plan, _bwd_delta_kernel, dict(HAS_DO=has_do, HAS_G=has_g),
                lambda t: (B * H, triton.cdiv(N, delta_m)),
                lambda t: dict(HEAD_DIM=D, VEC=vec, BLOCK_M=delta_m, BLOCK_D=plan.block_d, num_warps=4, num_stages=1),
                [configs.Tile(delta_m, 0, 4, 1)])
            self.delta_scalars = (*out.stride()[:3], *do.stride()[:3], H, N)
            dq_name = "dq_long" if plan.long else "dq"

            def dq_consts(t):
                return dict(_tile_consts(t, t.block_n), **plan.common, VEC=vec, EVEN_N=N % t.block_m == 0,
                            EVEN_L=L % t.block_n == 0, LEAN=plan.lean)
            self.dq = Launcher(dq_name, plan, _bwd_dq_kernel, flags, lambda t: (B * H, triton.cdiv(N, t.block_m)),
                               dq_consts)
            self.dq_scalars = (*row_args, *self.dq_stride[:3], *masks, H, N, L)

    def run(self, q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale):
        dev = q.device
        dq = torch.empty_strided(q.shape, self.dq_stride, dtype=q.dtype, device=dev)
        dk = torch.empty_strided(k.shape, self.dk_stride, dtype=k.dtype, device=dev)
        dv = torch.empty_strided(v.shape, self.dv_stride, dtype=v.dtype, device=dev) if self.has_do else None
        do = dout if self.has_do else out
        dscore = dscore if self.has_g else lse
        vectors = (lse if w is None else w, lse if zero is None else zero, lse if valid is None else valid)
        score = lse if score is None else score
        if self.split > 1:
            wk = torch.empty(self.ws_shape, device=dev, dtype=torch.float32)
            wv = torch.empty(self.ws_shape, device=dev, dtype=torch.float32) if self.has_do else wk
        else:
            wk, wv = dk, (dv if self.has_do else dk)
        if self.fused:
            delta = lse
        else:
            delta = torch.empty(self.row_shape, device=dev, dtype=torch.float32)
            self.delta(out, do, score, dscore, delta, *self.delta_scalars)
        self.dkdv(q, k, v, *vectors, do, lse, delta, dscore, wk, wv, out, score, dq, *self.dkdv_scalars,
                  scale * LOG2E, scale, self.rows_per_split)
        if self.split > 1:
            self.sum_splits(wk, wv, dk, dk if dv is None else dv, *self.sum_scalars)
        if not self.fused:
            self.dq(q, k, v, *vectors, do, lse, delta, dscore, dq, *self.dq_scalars, scale * LOG2E, scale)
        return dq, dk, dv


def backward(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale, split_request=0,
             long_threshold=LONG_THRESHOLD):
    """(dq, dk, dv): dv is None when dout is None (only the score was used)."""
    if dout is not None and dout.stride(-1) != 1:
        dout = dout.contiguous()
    has_g = dscore is not None and w is not None
    if has_g and not dscore.is_contiguous():
        dscore = dscore.contiguous()
    key = (_call_key(q, k, v, w, zero, valid, long_threshold), None if dout is None else dout.stride(),
           has_g, split_request)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _BWD_PLANS[key] = BackwardPlan(q, k, v, out, w, zero, valid, dout, has_g, split_request,
                                              long_threshold)
    return plan.run(q, k, v, out, score, lse, w, zero, valid, dout, dscore, scale)


def clear_plans():
    """Forgets every cached plan and working tile (the tune tool changes tiles between calls)."""
    for cache in (_FWD_PLANS, _BWD_PLANS, _WORKING_TILE):
        cache.clear()


def planned_launchers():
    """Every Launcher of the cached plans (the tune tool reads the tile and compiled kernel used)."""
    for plan in list(_FWD_PLANS.values()) + list(_BWD_PLANS.values()):
        for name in ("launch", "dkdv", "dq", "delta", "sum_splits"):
            launcher = getattr(plan, name, None)
            if launcher is not None:
                yield launcher


# ---- eager autograd ----

class ConceptAttention(torch.autograd.Function):
    """Eager path: forward and backward launch directly (no dispatcher round trip)."""

    @staticmethod
    def forward(ctx, q, k, v, w, zero, valid, scale, split, long_threshold):
        out, score, lse = forward(q, k, v, w, zero, valid, scale, long_threshold)
        ctx.save_for_backward(q, k, v, out, score)  # outputs must be saved so; the rest kept plainly
        ctx.lse, ctx.masks = lse, (w, zero, valid)
        ctx.scale, ctx.split, ctx.long_threshold = scale, split, long_threshold
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no dO of zeros
        return out, score

    @staticmethod
    def backward(ctx, dout, dscore):
        q, k, v, out, score = ctx.saved_tensors
        lse, (w, zero, valid) = ctx.lse, ctx.masks
        if w is None:
            dscore = None
        if dscore is None and dout is None:
            return (None,) * 9
        needs = ctx.needs_input_grad
        dq, dk, dv = backward(q, k, v, out, score, lse, w, zero, valid, dout, dscore, ctx.scale, ctx.split,
                              ctx.long_threshold)
        # Only the score used (the attention loss): v gets no gradient, as with autograd on the reference.
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None, None)


# ---- torch.library registration (torch.compile) ----

@torch.library.custom_op("fmn_kernels::concept_attention_fwd", mutates_args=())
def concept_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor],
                          zero: Optional[torch.Tensor], valid: Optional[torch.Tensor], scale: float,
                          dkdv_split: int, long_threshold: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, score, lse = forward(q, k, v, w, zero, valid, scale, long_threshold)
    return out, (score if score is not None else lse.new_empty(0)), lse


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
    dq, dk, dv = backward(q, k, v, out, score if w is not None else None, lse, w, zero, valid, dout, dscore, scale,
                          dkdv_split, long_threshold)
    return dq, dk, (dv if dv is not None else v.new_empty(0))


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
    copied. Eager calls: the autograd Function, or the plain forward when no gradient is needed;
    under torch.compile: the custom op. dkdv_split forces the number of programs sharing one key
    block's query rows in the backward (tests use it for the split reduction); long_threshold
    lowers the N, L from which the long-sequence tiles are taken (tests run them at small sizes).
    """
    w, zero, valid = concept_weights, zero_mask, key_mask
    if (w is not None and w.stride(-1) != 1) or (zero is not None and zero.stride(-1) != 1) or (
            valid is not None and valid.stride(-1) != 1):
        w, zero, valid = (None if t is None else t.contiguous() for t in (w, zero, valid))
    split = int(dkdv_split or 0)
    if torch.compiler.is_compiling():
        out, score, _ = concept_attention_fwd(q, k, v, w, zero, valid, float(scale), split, int(long_threshold))
        return out, (score if w is not None else None)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ConceptAttention.apply(q, k, v, w, zero, valid, float(scale), split, long_threshold)
    out, score, _ = forward(q, k, v, w, zero, valid, float(scale), long_threshold)
    return out, score
