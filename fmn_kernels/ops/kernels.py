"""Triton kernels of fused concept attention: forward and backward, no N x L map in memory.

Per (batch b, head h), with scale s, concept weights w, zero mask z and key mask m over the L keys:

    s_ij = s * q_i . k_j                  keys with m_j = 0 are left out of the softmax
    p_ij = softmax_j(s_ij)
    o_i  = sum_j (1 - z_j) p_ij v_j        zeroing after the softmax, no renormalisation
    c_i  = sum_j w_j p_ij^2                the concept score of row i

Forward: an online softmax over key blocks keeps the running max M, the running sum l and the
running r = sum_j w_j exp(2 (s_ij - M)); when M grows, l and the output scale by exp(M - M') and r
by exp(2 (M - M')). At the end c_i = r / l^2. Row i stores LSE_i = M + log l for the backward.
When all keys fit in one block (ONE_KEY_BLOCK, SD's 77 text tokens) no rescaling is done.
Exponentials are taken base 2 (exp2, with log2(e) folded into the scale).

Backward, with upstream dO and g_i = dLoss/dc_i:

    p_ij    = exp(s_ij - LSE_i)                             recomputed from LSE, never stored
    dp_ij   = (1 - z_j) dO_i . v_j + 2 g_i w_j p_ij
    delta_i = dO_i . o_i + 2 g_i c_i                         the usual rowsum(dO * O) plus one term
    ds_ij   = p_ij (dp_ij - delta_i)
    dQ = s dS K,   dK = s dS^T Q,   dV = (P * (1 - z))^T dO

dK/dV come from a grid over (batch*head, key block, split), each program looping over its share of
the query rows. dQ comes from the same pass when possible: FUSED_DQ (all keys in one tile: the pass
also computes delta and stores dQ, one kernel in all) or ATOMIC_DQ (long keys: FlashAttention-2's
5-matmul backward, dQ added into an fp32 buffer); otherwise from its own kernel over query blocks.
HAS_DO = False (only the score is used, the attention loss): dO is not read, dV not computed.

The head dim is a compile-time constant (HEAD_DIM, padded to the power of two BLOCK_D), so the d
mask folds away and rows load as vectors; VEC is the number of elements that the host checked every
base pointer and stride to be a multiple of (16 bytes, else 1), given to the compiler as a hint.
Bool masks and concept weights of any float dtype are read as they are (no conversion kernels).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot: it gets fp32 operands instead.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_offsets(b, h, stride_b, stride_h, stride_n, rows, offs_d, VEC: tl.constexpr):
    """int64 offsets of a [rows, BLOCK_D] tile of a [B, H, seq, D] tensor with a unit last stride."""
    row = tl.multiple_of(b * stride_b + h * stride_h + rows[:, None].to(tl.int64) * stride_n, [VEC, VEC])
    return row + offs_d[None, :]


@triton.jit
def _batch_head(pid_bh, H):
    """(b, h) as int64 from the program's batch*head index."""
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _load_tile(PTR, b, h, stride_b, stride_h, stride_n, rows, offs_d, mask, VEC: tl.constexpr):
    """A [rows, BLOCK_D] tile of a [B, H, seq, D] tensor, zeros where masked."""
    return tl.load(PTR + _tile_offsets(b, h, stride_b, stride_h, stride_n, rows, offs_d, VEC), mask=mask, other=0.0)


@triton.jit
def _load_tile_pair(A, B, b, h, stride_ab, stride_ah, stride_an, stride_bb, stride_bh, stride_bn, rows, offs_d, mask,
                    LOAD_B: tl.constexpr, VEC: tl.constexpr):
    """The tiles of A and B at the same rows (q and dO, or k and v). Without LOAD_B, B is not read and
    A's tile stands in for it (a placeholder the caller never uses)."""
    a = _load_tile(A, b, h, stride_ab, stride_ah, stride_an, rows, offs_d, mask, VEC)
    second = a
    if LOAD_B:
        second = _load_tile(B, b, h, stride_bb, stride_bh, stride_bn, rows, offs_d, mask, VEC)
    return a, second


@triton.jit
def _load_key_vectors(W, ZERO, VALID, sw, sz, sv, b, cols, col_ok,
                      HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr):
    """Concept weights w, kept-column factor (1 - z) and key validity for one block of keys."""
    w = tl.zeros(cols.shape, dtype=tl.float32)
    keep = tl.full(cols.shape, 1.0, dtype=tl.float32)
    valid = col_ok
    if HAS_W:
        w = tl.load(W + b * sw + cols, mask=col_ok, other=0).to(tl.float32)
    if HAS_ZERO:
        keep = 1.0 - tl.load(ZERO + b * sz + cols, mask=col_ok, other=0).to(tl.float32)
    if HAS_VALID:
        valid = valid & (tl.load(VALID + b * sv + cols, mask=col_ok, other=0) != 0)
    return w, keep, valid


@triton.jit
def _fwd_kernel(
    Q, K, V, W, ZERO, VALID, O, SCORE, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    sw, sz, sv,
    H, N, L, qk_scale,
    HEAD_DIM: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h = _batch_head(pid_bh, H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM

    q = _load_tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, offs_d, row_ok[:, None] & d_ok[None, :], VEC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of w * exp2^2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k, v = _load_tile_pair(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                               cols, offs_d, kv_mask, True, VEC)
        w, keep, valid = _load_key_vectors(W, ZERO, VALID, sw, sz, sv, b, cols, col_ok, HAS_W, HAS_ZERO, HAS_VALID)

        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: no NaN
        p = tl.exp2(s - m_safe[:, None])
        if HAS_ZERO:
            pv = _dot((p * keep[None, :]).to(v.dtype), v, UPCAST, PRECISION)
        else:
            pv = _dot(p.to(v.dtype), v, UPCAST, PRECISION)
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
    tl.store(O + _tile_offsets(b, h, stride_ob, stride_oh, stride_on, rows, offs_d, VEC),
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # A row with no valid key stores LSE = +inf, so the backward recomputes p = 0 for it.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(has_mass, m_safe + tl.log2(l_safe), float("inf"))
    row_base = pid_bh.to(tl.int64) * N
    tl.store(LSE + row_base + rows, lse, mask=row_ok)
    if HAS_W:
        tl.store(SCORE + row_base + rows, r_i / (l_safe * l_safe), mask=row_ok)


@triton.jit
def _row_delta(O, DO, SCORE, g, b, h, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
               row_base, rows, row_ok, offs_d, d_ok, do,
               HAS_DO: tl.constexpr, HAS_G: tl.constexpr, VEC: tl.constexpr):
    """delta_i = dO_i . o_i + 2 g_i c_i for a block of rows (do: the loaded dO block, if any)."""
    delta = tl.zeros(rows.shape, dtype=tl.float32)
    if HAS_DO:
        o = _load_tile(O, b, h, stride_ob, stride_oh, stride_on, rows, offs_d, row_ok[:, None] & d_ok[None, :], VEC)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_G:
        delta += 2.0 * g * tl.load(SCORE + row_base + rows, mask=row_ok, other=0.0)
    return delta


@triton.jit
def _bwd_delta_kernel(
    O, DO, SCORE, DSCORE, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N,
    HEAD_DIM: tl.constexpr, VEC: tl.constexpr, HAS_DO: tl.constexpr, HAS_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h = _batch_head(pid_bh, H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N
    do = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DO:
        do = _load_tile(DO, b, h, stride_dob, stride_doh, stride_don, rows, offs_d, row_ok[:, None] & d_ok[None, :],
                        VEC)
    g = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_G:
        g = tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
    delta = _row_delta(O, DO, SCORE, g, b, h, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                       row_base, rows, row_ok, offs_d, d_ok, do, HAS_DO, HAS_G, VEC)
    tl.store(DELTA + row_base + rows, delta, mask=row_ok)


@triton.jit
def _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale,
            HAS_DO: tl.constexpr, HAS_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputes P for a [rows, keys] tile and returns (P, dS)."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = tl.zeros(p.shape, dtype=tl.float32)
    if HAS_DO:
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
    Q, K, V, W, ZERO, VALID, DO, LSE, DELTA, DSCORE, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    sw, sz, sv,
    H, N, L, qk_scale, scale,
    HEAD_DIM: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    HAS_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h = _batch_head(pid_bh, H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]
    q, do = _load_tile_pair(Q, DO, b, h, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                            rows, offs_d, row_mask, HAS_DO, VEC)
    row_base = pid_bh.to(tl.int64) * N
    lse, g = _load_row_vectors(LSE, DSCORE, row_base, rows, row_ok, HAS_G)
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k, v = _load_tile_pair(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                               cols, offs_d, kv_mask, HAS_DO, VEC)
        w, keep, valid = _load_key_vectors(W, ZERO, VALID, sw, sz, sv, b, cols, col_ok, HAS_W, HAS_ZERO, HAS_VALID)
        p, ds = _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale, HAS_DO, HAS_G, UPCAST, PRECISION)
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    tl.store(DQ + _tile_offsets(b, h, stride_dqb, stride_dqh, stride_dqn, rows, offs_d, VEC),
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, W, ZERO, VALID, DO, LSE, DELTA, DSCORE, DK, DV, O, SCORE, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dks, stride_dkb, stride_dkh, stride_dkn,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    sw, sz, sv,
    H, N, L, qk_scale, scale, rows_per_split,
    HEAD_DIM: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    HAS_DO: tl.constexpr, ATOMIC: tl.constexpr, FUSED_DQ: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block from the query rows [split * rows_per_split, +rows_per_split).

    DK/DV carry a split stride: the final tensors (one split), a workspace with one slice per split
    (deterministic), or one buffer that the splits add into atomically (ATOMIC, split stride 0).
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_split = tl.program_id(2)
    b, h = _batch_head(pid_bh, H)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < L
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k, v = _load_tile_pair(K, V, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                           cols, offs_d, kv_mask, HAS_DO, VEC)
    w, keep, valid = _load_key_vectors(W, ZERO, VALID, sw, sz, sv, b, cols, col_ok, HAS_W, HAS_ZERO, HAS_VALID)
    row_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < row_end
        row_mask = row_ok[:, None] & d_ok[None, :]
        q, do = _load_tile_pair(Q, DO, b, h, stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                rows, offs_d, row_mask, HAS_DO, VEC)
        lse, g = _load_row_vectors(LSE, DSCORE, row_base, rows, row_ok, HAS_G)
        if FUSED_DQ:
            delta = _row_delta(O, DO, SCORE, g, b, h, stride_ob, stride_oh, stride_on, stride_dob, stride_doh,
                               stride_don, row_base, rows, row_ok, offs_d, d_ok, do, HAS_DO, HAS_G, VEC)
        else:
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        p, ds = _bwd_ds(q, k, v, do, lse, delta, g, w, keep, valid, qk_scale, HAS_DO, HAS_G, UPCAST, PRECISION)
        if HAS_DO:
            if HAS_ZERO:
                p = p * keep[None, :]
            dv += _dot(tl.trans(p).to(do.dtype), do, UPCAST, PRECISION)
        dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST, PRECISION)
        if FUSED_DQ or ATOMIC_DQ:
            dq = _dot(ds.to(k.dtype), k, UPCAST, PRECISION) * scale
            dq_ptrs = DQ + _tile_offsets(b, h, stride_dqb, stride_dqh, stride_dqn, rows, offs_d, VEC)
            if ATOMIC_DQ:
                tl.atomic_add(dq_ptrs, dq, mask=row_mask)
            else:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask)

    dk *= scale
    split64 = pid_split.to(tl.int64)
    dk_ptrs = DK + split64 * stride_dks + _tile_offsets(b, h, stride_dkb, stride_dkh, stride_dkn, cols, offs_d, VEC)
    dv_ptrs = DV + split64 * stride_dvs + _tile_offsets(b, h, stride_dvb, stride_dvh, stride_dvn, cols, offs_d, VEC)
    if ATOMIC:
        tl.atomic_add(dk_ptrs, dk, mask=kv_mask)
        if HAS_DO:
            tl.atomic_add(dv_ptrs, dv, mask=kv_mask)
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        if HAS_DO:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
