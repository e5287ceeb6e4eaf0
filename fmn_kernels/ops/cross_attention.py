"""Fused concept attention in Triton: forward and backward, no N x L map in memory.

Per (batch b, head h), with scale s, concept weights w, zero mask z and key mask m over the L keys:

    s_ij = s * q_i . k_j                  keys with m_j = 0 are left out of the softmax
    p_ij = softmax_j(s_ij)
    o_i  = sum_j (1 - z_j) p_ij v_j        zeroing after the softmax, no renormalisation
    c_i  = sum_j w_j p_ij^2                the concept score of row i

Forward: an online softmax over key blocks keeps the running max M, the running sum l and the
running r = sum_j w_j exp(2 (s_ij - M)); when M grows, l and the output scale by exp(M - M') and r
by exp(2 (M - M')). At the end c_i = r / l^2. Row i stores LSE_i = M + log l for the backward.
When all keys fit in one block (L <= 128, SD's 77 text tokens) the loop runs once and no
rescaling is done. Exponentials are taken base 2 (exp2, with log2(e) folded into the scale).

Backward, with upstream dO and g_i = dLoss/dc_i:

    p_ij    = exp(s_ij - LSE_i)                             recomputed from LSE, never stored
    dp_ij   = (1 - z_j) dO_i . v_j + 2 g_i w_j p_ij
    delta_i = dO_i . o_i + 2 g_i c_i                         the usual rowsum(dO * O) plus one term
    ds_ij   = p_ij (dp_ij - delta_i)
    dQ = s dS K,   dK = s dS^T Q,   dV = (P * (1 - z))^T dO

dK/dV come from a grid over (key block, batch*head, split): with L = 77 there is one key block, so
the query rows are split over `split` programs to fill the GPU, and their partial dK/dV are reduced
with fp32 atomics, or, when torch.are_deterministic_algorithms_enabled(), written to a workspace
and summed in a fixed order. When one key tile holds all keys (SD's L = 77 with D <= 64) that same
pass computes delta and dQ too: q, dO and O are read once, one kernel in all. Otherwise delta and
dQ come from their own kernels over query blocks (FlashAttention-2's split).
"""
import math

import torch
import triton
import triton.language as tl

from ..utils import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot: it gets fp32 operands instead.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_key_vectors(W, KEEP, VALID, vec_base, cols, col_ok,
                      HAS_W: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_VALID: tl.constexpr):
    """Concept weights w, kept-column factor (1 - z) and key validity for one block of keys."""
    w = tl.zeros(cols.shape, dtype=tl.float32)
    keep = tl.full(cols.shape, 1.0, dtype=tl.float32)
    valid = col_ok
    if HAS_W:
        w = tl.load(W + vec_base + cols, mask=col_ok, other=0.0)
    if HAS_KEEP:
        keep = tl.load(KEEP + vec_base + cols, mask=col_ok, other=0.0)
    if HAS_VALID:
        valid = valid & (tl.load(VALID + vec_base + cols, mask=col_ok, other=0.0) != 0)
    return w, keep, valid


@triton.jit
def _fwd_kernel(
    Q, K, V, W, KEEP, VALID, O, SCORE, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, L, D, qk_scale,
    HAS_W: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_VALID: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    vec_base = b * L

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of w * exp2^2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        w, keep, valid = _load_key_vectors(W, KEEP, VALID, vec_base, cols, col_ok, HAS_W, HAS_KEEP, HAS_VALID)

        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: no NaN
        p = tl.exp2(s - m_safe[:, None])
        pv = _dot((p * keep[None, :]).to(v.dtype), v, UPCAST, PRECISION)
        if ONE_KEY_BLOCK:
            l_i = tl.sum(p, 1)
            acc = pv
            if HAS_W:
                r_i = tl.sum(p * p * w[None, :], 1)
        else:
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + pv
            if HAS_W:
                r_i = r_i * (alpha * alpha) + tl.sum(p * p * w[None, :], 1)
        m_i = m_new

    has_mass = l_i > 0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # A row with no valid key stores LSE = +inf, so the backward recomputes p = 0 for it.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(has_mass, m_safe + tl.log2(l_safe), float("inf"))
    row_base = pid_bh.to(tl.int64) * N
    tl.store(LSE + row_base + rows, lse, mask=row_ok)
    if HAS_W:
        tl.store(SCORE + row_base + rows, r_i / (l_safe * l_safe), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, SCORE, DSCORE, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N, D,
    HAS_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = dO_i . o_i + 2 g_i c_i."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None].to(tl.int64) * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_base = pid_bh.to(tl.int64) * N
    if HAS_G:
        c = tl.load(SCORE + row_base + rows, mask=row_ok, other=0.0)
        g = tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
        delta += 2.0 * g * c
    tl.store(DELTA + row_base + rows, delta, mask=row_ok)


@triton.jit
def _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale,
            HAS_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputes P for a [rows, keys] tile and returns (P, dS)."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), UPCAST, PRECISION) * keep[None, :]
    if HAS_G:
        dp += 2.0 * g[:, None] * w[None, :] * p
    return p, p * (dp - delta[:, None])


@triton.jit
def _load_row_vectors(LSE, DSCORE, row_base, rows, row_ok, HAS_G: tl.constexpr):
    """LSE (inf past the last row, so p = 0 there) and g = dLoss/dc of a block of rows."""
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    g = tl.zeros(rows.shape, dtype=tl.float32)
    if HAS_G:
        g = tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
    return lse, g


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, W, KEEP, VALID, DO, LSE, DELTA, DSCORE, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, L, D, qk_scale, scale,
    HAS_W: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < D
    row_mask = row_ok[:, None] & d_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :],
                 mask=row_mask, other=0.0)
    lse, g = _load_row_vectors(LSE, DSCORE, pid_bh.to(tl.int64) * N, rows, row_ok, HAS_G)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        w, keep, valid = _load_key_vectors(W, KEEP, VALID, b * L, cols, col_ok, HAS_W, HAS_KEEP, HAS_VALID)
        p, ds = _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale, HAS_G, UPCAST, PRECISION)
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, W, KEEP, VALID, DO, LSE, DELTA, DSCORE, DK, DV, O, SCORE, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, L, D, qk_scale, scale, rows_per_split,
    HAS_W: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    ATOMIC: tl.constexpr, FUSED_DQ: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block from the query rows [split * rows_per_split, +rows_per_split).

    DK/DV carry a split stride: the final tensors (stride 0, one split), a workspace with one slice
    per split (deterministic), or one fp32 buffer that the splits add into atomically.
    FUSED_DQ (all keys in this one block, short L): the same pass also computes delta from O and
    dO and writes dQ, so q and dO are read once and no other backward kernel runs.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < L
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    cols64 = cols[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + h * stride_kh + cols64 * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols64 * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    w, keep, valid = _load_key_vectors(W, KEEP, VALID, b * L, cols, col_ok, HAS_W, HAS_KEEP, HAS_VALID)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < row_end
        row_mask = row_ok[:, None] & d_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + rows64 * stride_qn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_base + rows64 * stride_don + offs_d[None, :], mask=row_mask, other=0.0)
        lse, g = _load_row_vectors(LSE, DSCORE, row_base, rows, row_ok, HAS_G)
        if FUSED_DQ:
            o = tl.load(O + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :],
                        mask=row_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_G:
                delta += 2.0 * g * tl.load(SCORE + row_base + rows, mask=row_ok, other=0.0)
        else:
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        p, ds = _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale, HAS_G, UPCAST, PRECISION)
        dv += _dot(tl.trans(p * keep[None, :]).to(do.dtype), do, UPCAST, PRECISION)
        dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST, PRECISION)
        if FUSED_DQ:
            dq = _dot(ds.to(k.dtype), k, UPCAST, PRECISION) * scale
            tl.store(DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqn + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=row_mask)

    dk *= scale
    split64 = pid_split.to(tl.int64)
    dk_ptrs = DK + split64 * stride_dks + b * stride_dkb + h * stride_dkh + cols64 * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + split64 * stride_dvs + b * stride_dvb + h * stride_dvh + cols64 * stride_dvn + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptrs, dk, mask=kv_mask)
        tl.atomic_add(dv_ptrs, dv, mask=kv_mask)
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _config(q, L):
    """Block sizes and flags shared by the kernels. GPU tile sizes are conservative defaults."""
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    one_key_block = L <= 128
    block_n = max(16, triton.next_power_of_2(L)) if one_key_block else (32 if block_d > 128 else 64)
    block_m = 64 if block_d <= 128 else 32
    # The dK/dV pass keeps two [BLOCK_N_KV, BLOCK_D] fp32 accumulators live. When all keys fit in
    # one such tile (short L, narrow heads: SD's L = 77 with D <= 64), it computes dQ as well.
    fused_dq = one_key_block and block_n * block_d <= 128 * 64
    block_n_kv = block_n if fused_dq else min(block_n, 64 if block_d <= 128 else 32)
    return dict(
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_N_KV=block_n_kv, BLOCK_M=block_m, ONE_KEY_BLOCK=one_key_block,
        FUSED_DQ=fused_dq,
        UPCAST=triton_interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
        # Kernels looping over keys: with one key block there is nothing to pipeline, and multi-
        # buffering a [128, 256] K and V tile would overflow shared memory on wide heads.
        KEY_LOOP_STAGES=1 if one_key_block else 2,
    )


def _key_vectors(q, concept_weights, zero_mask, key_mask):
    """[B, L] float32 contiguous vectors the kernels read (None when absent)."""
    w = None if concept_weights is None else concept_weights.to(torch.float32).contiguous()
    keep = None if zero_mask is None else (~zero_mask).to(torch.float32).contiguous()
    valid = None if key_mask is None else key_mask.to(torch.float32).contiguous()
    return w, keep, valid


def _dkdv_split(q, L, cfg, requested):
    """How many programs share the query rows of one key block (fills the GPU at L = 77)."""
    n_row_blocks = triton.cdiv(q.shape[2], cfg["BLOCK_M"])
    if requested is not None:
        split = requested
    elif q.is_cuda:
        programs = triton.cdiv(L, cfg["BLOCK_N_KV"]) * q.shape[0] * q.shape[1]
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
        split = math.ceil(target / programs)
    else:
        split = 1  # the interpreter runs programs one after another: fewer is faster
    split = max(1, min(split, n_row_blocks))
    blocks_per_split = triton.cdiv(n_row_blocks, split)
    return triton.cdiv(n_row_blocks, blocks_per_split), blocks_per_split * cfg["BLOCK_M"]


def _forward(q, k, v, w, keep, valid, scale, cfg):
    B, H, N, D = q.shape
    L = k.shape[2]
    out = torch.empty_like(q)  # keeps q's layout, e.g. diffusers' [B, N, H, D] memory order
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    score = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if w is not None else lse.new_empty(0)
    dummy = lse
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, w if w is not None else dummy, keep if keep is not None else dummy,
        valid if valid is not None else dummy, out, score, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, N, L, D, scale * LOG2E,
        HAS_W=w is not None, HAS_KEEP=keep is not None, HAS_VALID=valid is not None,
        ONE_KEY_BLOCK=cfg["ONE_KEY_BLOCK"], UPCAST=cfg["UPCAST"], PRECISION=cfg["PRECISION"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        num_stages=cfg["KEY_LOOP_STAGES"],
    )
    return out, score, lse


def _backward(q, k, v, out, score, lse, w, keep, valid, do, dscore, scale, cfg, split_request):
    B, H, N, D = q.shape
    L = k.shape[2]
    has_g = dscore is not None and w is not None
    dscore = dscore.contiguous() if has_g else lse
    fused_dq = cfg["FUSED_DQ"]
    vectors = (w if w is not None else lse, keep if keep is not None else lse, valid if valid is not None else lse)
    flags = dict(HAS_W=w is not None, HAS_KEEP=keep is not None, HAS_VALID=valid is not None, HAS_G=has_g,
                 UPCAST=cfg["UPCAST"], PRECISION=cfg["PRECISION"],
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    dq = torch.empty_like(q)
    delta = lse  # unused by the fused pass, which computes delta itself
    if not fused_dq:
        delta = torch.empty_like(lse)
        row_grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
        _bwd_delta_kernel[row_grid](
            out, do, score, dscore, delta, *out.stride()[:3], *do.stride()[:3], H, N, D,
            HAS_G=has_g, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        )
        _bwd_dq_kernel[row_grid](
            q, k, v, *vectors, do, lse, delta, dscore, dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            H, N, L, D, scale * LOG2E, scale, BLOCK_N=cfg["BLOCK_N"], num_stages=cfg["KEY_LOOP_STAGES"], **flags,
        )

    split, rows_per_split = _dkdv_split(q, L, cfg, split_request)
    atomic = split > 1 and not torch.are_deterministic_algorithms_enabled()
    if split == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_buf, dv_buf = dk.unsqueeze(0), dv.unsqueeze(0)
    elif atomic:
        dk_buf = torch.zeros((1, B, H, L, D), device=q.device, dtype=torch.float32)
        dv_buf = torch.zeros_like(dk_buf)
    else:
        dk_buf = torch.empty((split, B, H, L, D), device=q.device, dtype=torch.float32)
        dv_buf = torch.empty_like(dk_buf)
    split_strides = lambda t: (0 if atomic else t.stride(0), *t.stride()[1:4])  # noqa: E731
    grid = (triton.cdiv(L, cfg["BLOCK_N_KV"]), B * H, split)
    _bwd_dkdv_kernel[grid](
        q, k, v, *vectors, do, lse, delta, dscore, dk_buf, dv_buf, out, score, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *split_strides(dk_buf), *split_strides(dv_buf), *out.stride()[:3], *dq.stride()[:3],
        H, N, L, D, scale * LOG2E, scale, rows_per_split, ATOMIC=atomic, FUSED_DQ=fused_dq,
        BLOCK_N=cfg["BLOCK_N_KV"], **flags,
    )
    if split > 1:
        dk = dk_buf.sum(0).to(k.dtype)
        dv = dv_buf.sum(0).to(v.dtype)
    return dq, dk, dv


class ConceptAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, keep, valid, scale, dkdv_split):
        cfg = _config(q, k.shape[2])
        out, score, lse = _forward(q, k, v, w, keep, valid, scale, cfg)
        ctx.save_for_backward(q, k, v, out, score, lse, w, keep, valid)
        ctx.scale, ctx.cfg, ctx.dkdv_split = scale, cfg, dkdv_split
        ctx.mark_non_differentiable(lse)
        if w is None:
            ctx.mark_non_differentiable(score)
        ctx.set_materialize_grads(False)
        return out, score, lse

    @staticmethod
    def backward(ctx, dout, dscore, _dlse):
        q, k, v, out, score, lse, w, keep, valid = ctx.saved_tensors
        if dscore is None and dout is None:
            return (None,) * 8
        # Only the score used (the attention loss): v gets no gradient, as with autograd on the reference.
        v_gets_grad = ctx.needs_input_grad[2] and dout is not None
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = _backward(q, k, v, out, score, lse, w, keep, valid, dout, dscore,
                               ctx.scale, ctx.cfg, ctx.dkdv_split)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if v_gets_grad else None,
                None, None, None, None, None)


def concept_attention_triton(q, k, v, scale, concept_weights=None, zero_mask=None, key_mask=None,
                             dkdv_split=None):
    """Triton path of `fmn_kernels.cross_attention` (inputs already checked there).

    dkdv_split forces the number of programs sharing one key block's query rows in the backward
    (tests use it to exercise the atomic and workspace reductions); None picks it from the GPU.
    """
    w, keep, valid = _key_vectors(q, concept_weights, zero_mask, key_mask)
    out, score, _ = ConceptAttentionFunction.apply(q, k, v, w, keep, valid, scale, dkdv_split)
    return out, (score if w is not None else None)
