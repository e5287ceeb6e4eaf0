"""Triton kernels of fused concept attention: forward and backward, no N x L map in memory.

Per (batch b, head h), with scale s, concept weights w, zero mask z and key mask m over the L keys:

    s_ij = s * q_i . k_j                  keys with m_j = 0 are left out of the softmax
    p_ij = softmax_j(s_ij)
    o_i  = sum_j (1 - z_j) p_ij v_j        zeroing after the softmax, no renormalisation
    c_i  = sum_j w_j p_ij^2                the concept score of row i

Forward: an online softmax over key blocks keeps the running max M and the running sum l; when M
grows, l and the output scale by exp(M - M'). As in Triton's tutorial, the row max is taken on the
unscaled dot and the scale folded into one FMA (qk * c - M; so the scale must be positive) and
P V accumulates in place. Row i stores LSE_i = M + log l for the backward. The score is then
summed from the final LSE, c_i = sum_j w_j exp(2 (s_ij - LSE_i)), over the key blocks that hold a
concept column only (`_fwd_score`): MM-DiT joint attention has a few concept columns among ~4608
keys, so the softmax loop, the bottleneck on Hopper, carries no score work. When all keys fit in one
block (ONE_KEY_BLOCK, SD's 77 text tokens) no rescaling is done and the score is summed in the pass
(r = sum_j w_j exp(2 (s_ij - M)), c_i = r / l^2). Exponentials are base 2 (log2(e) in the scale).
Full key blocks carry no column mask, the ragged last one is done after the loop; a block whose keys
all take part skips the key-mask select (a uniform branch on the block's mask).

Backward, with upstream dO and g_i = dLoss/dc_i:

    p_ij    = exp(s_ij - LSE_i)                             recomputed from LSE, never stored
    dp_ij   = (1 - z_j) dO_i . v_j + 2 g_i w_j p_ij
    delta_i = dO_i . o_i + 2 g_i c_i                         the usual rowsum(dO * O) plus one term
    ds_ij   = p_ij (dp_ij - delta_i)
    dQ = s dS K,   dK = s dS^T Q,   dV = (P * (1 - z))^T dO

The backward is FlashAttention-2's, without atomics (bitwise repeatable):
- `_bwd_delta_kernel`: delta per row;
- `_bwd_dkdv_kernel`: one program per block of BLOCK_N keys, which sit in the M dimension of the
  dots (S^T = K Q^T, P^T directly, dV += P^T dO, dK += dS^T Q), looping over query blocks of
  BLOCK_M rows. The query rows can be split over programs (axis 2) into an fp32 workspace that
  `_sum_splits_kernel` adds up in a fixed order (fills the GPU when there are few key blocks).
  FUSED_DQ (all keys in one block, SD's 77 tokens): the same pass computes delta itself and
  stores dQ = dS K for its rows: the whole backward in one kernel (plus the split sum).
- `_bwd_dq_kernel`: one program per block of BLOCK_M query rows, looping over key blocks.
HAS_DO = False (only the score is used, the attention loss): dO is not read, dV not computed.
The score's term of dS, 2 g_i w_j p_ij^2, is added only on key blocks holding a concept column: in
dQ by a second loop over those blocks (`_dq_score`), in dK/dV by a branch decided once per program.
dK/dV skips the key-mask select (left-out keys' rows of dK, dV are zeroed once at the end).

EVEN_N / EVEN_L: the host found N (resp. L) a multiple of the block, so no tile carries a row (key)
mask. The head dim is a compile-time constant (HEAD_DIM, padded to the power of two BLOCK_D; the d
mask folds away when they are equal). VEC is the number of elements that the host checked every
base pointer and stride to be a multiple of (16 bytes, else 1), given to the compiler as a hint.
Loop bodies add start * stride (hinted a multiple of VEC) to loop-invariant tile pointers: measured
with ptxas, loop-carried pointer tiles spilled (fwd1 bf16 D=40: 189 -> 255 registers) and a
loop-carried scalar base lost the vector loads. Bool masks and concept weights of any float dtype
are read as they are (no conversion kernels).
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
def _dot_acc(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in place by the dot (one accumulator, no extra add)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _batch_head(pid_bh, H):
    """(b, h) as int64 from the program's batch*head index."""
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _tile_ptrs(PTR, b, h, stride_b, stride_h, stride_n, rows, offs_d, VEC: tl.constexpr):
    """Pointers of a [rows, BLOCK_D] tile of a [B, H, seq, D] tensor with a unit last stride (int64)."""
    row = tl.multiple_of(b * stride_b + h * stride_h + rows[:, None].to(tl.int64) * stride_n, [VEC, VEC])
    return PTR + row + offs_d[None, :]


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile, zeros where masked; no mask on a full block."""
    if EVEN_ROWS:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, d_ok, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    x = x.to(ptrs.dtype.element_ty)
    if EVEN_ROWS:
        if EVEN_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=d_ok[None, :])
    else:
        if EVEN_D:
            tl.store(ptrs, x, mask=row_ok[:, None])
        else:
            tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _load_key_vectors(W, ZERO, VALID, cols, col_ok,
                      HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, EVEN: tl.constexpr):
    """Concept weights w, kept-column factor (1 - z) and key validity (key mask, and cols < L unless
    EVEN, a full block) for one block of keys. W, ZERO, VALID point at the sample's row."""
    w = tl.zeros(cols.shape, dtype=tl.float32)
    keep = tl.full(cols.shape, 1.0, dtype=tl.float32)
    valid = col_ok
    if EVEN:
        if HAS_W:
            w = tl.load(W + cols).to(tl.float32)
        if HAS_ZERO:
            keep = 1.0 - tl.load(ZERO + cols).to(tl.float32)
        if HAS_VALID:
            valid = tl.load(VALID + cols) != 0
    else:
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0).to(tl.float32)
        if HAS_ZERO:
            keep = 1.0 - tl.load(ZERO + cols, mask=col_ok, other=0).to(tl.float32)
        if HAS_VALID:
            valid = col_ok & (tl.load(VALID + cols, mask=col_ok, other=0) != 0)
    return w, keep, valid


@triton.jit
def _any_nonzero(w):
    """Whether a block of concept weights has a non-zero entry: a scalar, so a branch on it is uniform."""
    return tl.max((w != 0).to(tl.int32), 0) != 0


@triton.jit
def _some_invalid(valid):
    """Whether a key of a block is left out (a scalar, for a uniform branch)."""
    return tl.min(valid.to(tl.int32), 0) == 0


@triton.jit
def _fwd_step(acc, l_i, m_i, r_i, q, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n, d_ok, L,
              stride_kn, stride_vn, qk_scale,
              VEC: tl.constexpr, EVEN: tl.constexpr, EVEN_D: tl.constexpr,
              HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr,
              ONE_KEY_BLOCK: tl.constexpr, LEAN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax (EVEN: a full block, no column mask). As Triton's
    tutorial: the row max is taken on the raw dot, the scale folded into one FMA (qk * c - m)."""
    cols = start_n + offs_n
    col_ok = cols < L
    start = tl.cast(start_n, tl.int64)
    k = _load_tile(k_ptrs + tl.multiple_of(start * stride_kn, VEC), col_ok, d_ok, EVEN, EVEN_D)
    v = _load_tile(v_ptrs + tl.multiple_of(start * stride_vn, VEC), col_ok, d_ok, EVEN, EVEN_D)
    w, keep, valid = _load_key_vectors(W, ZERO, VALID, cols, col_ok, HAS_W, HAS_ZERO, HAS_VALID, EVEN)

    qk = _dot(q, tl.trans(k), UPCAST, PRECISION)
    if HAS_VALID:
        if EVEN and LEAN:
            if _some_invalid(valid):  # a block of all-valid keys skips the select
                qk = tl.where(valid[None, :], qk, float("-inf"))
        else:
            qk = tl.where(valid[None, :], qk, float("-inf"))
    elif not EVEN:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0 (checked by the API)
    if HAS_VALID:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: no NaN
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    # the row sums before the dot, so that p is dead once converted for it (fewer registers)
    if ONE_KEY_BLOCK:
        l_i = tl.sum(p, 1)
        if HAS_W:
            if _any_nonzero(w):
                r_i = tl.sum(p * p * w[None, :], 1)
    else:  # LEAN: the score is added after the loop (_fwd_score), from the final LSE
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_W and not LEAN:
            r_i = r_i * (alpha * alpha) + tl.sum(p * p * w[None, :], 1)
    if HAS_ZERO:
        pv = (p * keep[None, :]).to(v.dtype)
    else:
        pv = p.to(v.dtype)
    if ONE_KEY_BLOCK:
        acc = _dot(pv, v, UPCAST, PRECISION)
    else:
        acc = _dot_acc(pv, v, acc, UPCAST, PRECISION)
    return acc, l_i, m_new, r_i


@triton.jit
def _fwd_score(q, lse, k_ptrs, W, VALID, offs_n, d_ok, L, stride_kn, qk_scale,
               VEC: tl.constexpr, EVEN_L: tl.constexpr, EVEN_D: tl.constexpr, HAS_VALID: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """c_i = sum_j w_j p_ij^2, p_ij = exp2(s_ij - LSE_i) from the final LSE (as the backward
    recomputes it), over the key blocks that hold a concept column only (a uniform branch per
    block). So the softmax loop carries no score work, and a block without concept columns costs
    one load of its BLOCK_N weights (MM-DiT: a few concept columns among ~4608 keys)."""
    score = tl.zeros(lse.shape, dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        w = tl.load(W + cols, mask=col_ok, other=0).to(tl.float32)
        if _any_nonzero(w):
            start = tl.cast(start_n, tl.int64)
            k = _load_tile(k_ptrs + tl.multiple_of(start * stride_kn, VEC), col_ok, d_ok, EVEN_L, EVEN_D)
            p = tl.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale - lse[:, None])
            ok = col_ok  # left-out and padding keys: p = 0 exactly (not inf * 0)
            if HAS_VALID:
                ok = ok & (tl.load(VALID + cols, mask=col_ok, other=0) != 0)
            p = tl.where(ok[None, :], p, 0.0)
            score += tl.sum(p * p * w[None, :], 1)
    return score


@triton.jit
def _fwd_kernel(
    Q, K, V, W, ZERO, VALID, O, SCORE, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    sw, sz, sv,
    H, N, L, qk_scale,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_L: tl.constexpr, LEAN: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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

    q = _load_tile(_tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, rows, offs_d, VEC), row_ok, d_ok,
                   EVEN_N, EVEN_D)
    k_ptrs = _tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, offs_n, offs_d, VEC)
    v_ptrs = _tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, offs_n, offs_d, VEC)
    W += b * sw
    ZERO += b * sz
    VALID += b * sv
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of exp2
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running sum of w * exp2^2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if LEAN:  # full key blocks without masks, then the ragged last one (when L is not a multiple)
        full_end = (L // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i, r_i = _fwd_step(acc, l_i, m_i, r_i, q, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n,
                                           d_ok, L, stride_kn, stride_vn, qk_scale, VEC, True, EVEN_D, HAS_W,
                                           HAS_ZERO, HAS_VALID, ONE_KEY_BLOCK, LEAN, UPCAST, PRECISION)
        if not EVEN_L:
            acc, l_i, m_i, r_i = _fwd_step(acc, l_i, m_i, r_i, q, k_ptrs, v_ptrs, W, ZERO, VALID, full_end, offs_n,
                                           d_ok, L, stride_kn, stride_vn, qk_scale, VEC, False, EVEN_D, HAS_W,
                                           HAS_ZERO, HAS_VALID, ONE_KEY_BLOCK, LEAN, UPCAST, PRECISION)
    else:  # fp32 (FMA or TF32 dots, register-bound): one loop, the score summed in it
        for start_n in range(0, L, BLOCK_N):
            acc, l_i, m_i, r_i = _fwd_step(acc, l_i, m_i, r_i, q, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n,
                                           d_ok, L, stride_kn, stride_vn, qk_scale, VEC, EVEN_L, EVEN_D, HAS_W,
                                           HAS_ZERO, HAS_VALID, ONE_KEY_BLOCK, LEAN, UPCAST, PRECISION)

    has_mass = l_i > 0
    l_safe = tl.where(has_mass, l_i, 1.0)
    out = acc / l_safe[:, None]
    _store_tile(_tile_ptrs(O, b, h, stride_ob, stride_oh, stride_on, rows, offs_d, VEC), out, row_ok, d_ok,
                EVEN_N, EVEN_D)
    # A row with no valid key stores LSE = +inf, so the backward recomputes p = 0 for it.
    lse = tl.where(has_mass, m_i + tl.log2(l_safe), float("inf"))
    row_base = pid_bh.to(tl.int64) * N
    tl.store(LSE + row_base + rows, lse, mask=row_ok)
    if HAS_W:
        if ONE_KEY_BLOCK or not LEAN:
            score = r_i / (l_safe * l_safe)
        else:
            score = _fwd_score(q, lse, k_ptrs, W, VALID, offs_n, d_ok, L, stride_kn, qk_scale, VEC, EVEN_L, EVEN_D,
                               HAS_VALID, UPCAST, PRECISION, BLOCK_N)
        tl.store(SCORE + row_base + rows, score, mask=row_ok)


@triton.jit
def _row_delta(o, do, SCORE, g, row_base, rows, row_ok, HAS_DO: tl.constexpr, HAS_G: tl.constexpr):
    """delta_i = dO_i . o_i + 2 g_i c_i for a block of rows (o, do: the loaded tiles, if HAS_DO)."""
    delta = tl.zeros(rows.shape, dtype=tl.float32)
    if HAS_DO:
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
    o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    do = o
    if HAS_DO:
        o = _load_tile(_tile_ptrs(O, b, h, stride_ob, stride_oh, stride_on, rows, offs_d, VEC), row_ok, d_ok,
                       False, False)
        do = _load_tile(_tile_ptrs(DO, b, h, stride_dob, stride_doh, stride_don, rows, offs_d, VEC), row_ok, d_ok,
                        False, False)
    g = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_G:
        g = tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + row_base + rows, _row_delta(o, do, SCORE, g, row_base, rows, row_ok, HAS_DO, HAS_G), mask=row_ok)


@triton.jit
def _dq_step(dq, q, do, lse, delta, g2, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n, d_ok, L,
             stride_kn, stride_vn, qk_scale,
             VEC: tl.constexpr, EVEN: tl.constexpr, EVEN_D: tl.constexpr,
             HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
             HAS_DO: tl.constexpr, LEAN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq + dS K over one key block (EVEN: a full block, no column mask); LEAN: without the score's
    term (added by `_dq_score`)."""
    cols = start_n + offs_n
    col_ok = cols < L
    start = tl.cast(start_n, tl.int64)
    k = _load_tile(k_ptrs + tl.multiple_of(start * stride_kn, VEC), col_ok, d_ok, EVEN, EVEN_D)
    v = k
    if HAS_DO:
        v = _load_tile(v_ptrs + tl.multiple_of(start * stride_vn, VEC), col_ok, d_ok, EVEN, EVEN_D)
    w, keep, valid = _load_key_vectors(W, ZERO, VALID, cols, col_ok, HAS_W, HAS_ZERO, HAS_VALID, EVEN)
    p = tl.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale - lse[:, None])
    if HAS_VALID:
        if EVEN and LEAN:
            if _some_invalid(valid):
                p = tl.where(valid[None, :], p, 0.0)
        else:
            p = tl.where(valid[None, :], p, 0.0)
    elif not EVEN:
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.zeros(p.shape, dtype=tl.float32)
    if HAS_DO:
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        if HAS_ZERO:
            dp = dp * keep[None, :]
    if HAS_G and not LEAN:
        dp += g2[:, None] * w[None, :] * p
    ds = p * (dp - delta[:, None])
    return _dot_acc(ds.to(k.dtype), k, dq, UPCAST, PRECISION)


@triton.jit
def _dq_score(dq, q, lse, g2, k_ptrs, W, VALID, offs_n, d_ok, L, stride_kn, qk_scale,
              VEC: tl.constexpr, EVEN_L: tl.constexpr, EVEN_D: tl.constexpr, HAS_VALID: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq + (2 g_i w_j p_ij^2) K, the score's part of dS, over the key blocks holding a concept
    column only (a uniform branch per block): the main loop carries no score work (a branch in it
    cost registers: 255 and spills at 128 x 64, D=64 on sm_90, against 197 without)."""
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        w = tl.load(W + cols, mask=col_ok, other=0).to(tl.float32)
        if _any_nonzero(w):
            start = tl.cast(start_n, tl.int64)
            k = _load_tile(k_ptrs + tl.multiple_of(start * stride_kn, VEC), col_ok, d_ok, EVEN_L, EVEN_D)
            p = tl.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale - lse[:, None])
            ok = col_ok
            if HAS_VALID:
                ok = ok & (tl.load(VALID + cols, mask=col_ok, other=0) != 0)
            p = tl.where(ok[None, :], p, 0.0)
            ds = g2[:, None] * w[None, :] * (p * p)
            dq = _dot_acc(ds.to(k.dtype), k, dq, UPCAST, PRECISION)
    return dq


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
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    HAS_DO: tl.constexpr, EVEN_N: tl.constexpr, EVEN_L: tl.constexpr, LEAN: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of BLOCK_M query rows, looping over full key blocks of BLOCK_N, then the ragged last one."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h = _batch_head(pid_bh, H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(_tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, rows, offs_d, VEC), row_ok, d_ok,
                   EVEN_N, EVEN_D)
    do = q
    if HAS_DO:
        do = _load_tile(_tile_ptrs(DO, b, h, stride_dob, stride_doh, stride_don, rows, offs_d, VEC), row_ok, d_ok,
                        EVEN_N, EVEN_D)
    row_base = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    g2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_G:
        g2 = 2.0 * tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
    k_ptrs = _tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, offs_n, offs_d, VEC)
    v_ptrs = _tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, offs_n, offs_d, VEC)
    W += b * sw
    ZERO += b * sz
    VALID += b * sv

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if LEAN:
        full_end = (L // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g2, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n, d_ok, L,
                          stride_kn, stride_vn, qk_scale, VEC, True, EVEN_D, HAS_W, HAS_ZERO, HAS_VALID, HAS_G,
                          HAS_DO, LEAN, UPCAST, PRECISION)
        if not EVEN_L:
            dq = _dq_step(dq, q, do, lse, delta, g2, k_ptrs, v_ptrs, W, ZERO, VALID, full_end, offs_n, d_ok, L,
                          stride_kn, stride_vn, qk_scale, VEC, False, EVEN_D, HAS_W, HAS_ZERO, HAS_VALID, HAS_G,
                          HAS_DO, LEAN, UPCAST, PRECISION)
        if HAS_G:
            dq = _dq_score(dq, q, lse, g2, k_ptrs, W, VALID, offs_n, d_ok, L, stride_kn, qk_scale, VEC, EVEN_L,
                           EVEN_D, HAS_VALID, UPCAST, PRECISION, BLOCK_N)
    else:  # fp32: one loop, the score's term in it (fewer registers for FMA / TF32 dots)
        for start_n in range(0, L, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, g2, k_ptrs, v_ptrs, W, ZERO, VALID, start_n, offs_n, d_ok, L,
                          stride_kn, stride_vn, qk_scale, VEC, EVEN_L, EVEN_D, HAS_W, HAS_ZERO, HAS_VALID, HAS_G,
                          HAS_DO, LEAN, UPCAST, PRECISION)
    _store_tile(_tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, rows, offs_d, VEC), dq * scale, row_ok, d_ok,
                EVEN_N, EVEN_D)


@triton.jit
def _dkdv_step(dk, dv, k, v, w2, keep, valid, col_ok, any_w, q_ptrs, do_ptrs, o_ptrs, dq_ptrs,
               LSE, DELTA, DSCORE, SCORE, row_base, start_m, offs_m, row_end, d_ok,
               stride_qn, stride_don, stride_on, stride_dqn, qk_scale, scale,
               VEC: tl.constexpr, EVEN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_L: tl.constexpr,
               HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr, HAS_DO: tl.constexpr,
               FUSED_DQ: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV (+ dS^T Q, P^T dO) of one block of query rows (EVEN: a full block, no row mask).

    Without FUSED_DQ the key mask is not applied here: a left-out key's rows of P^T touch only its
    own rows of dK and dV, which the kernel zeroes at the end."""
    rows = start_m + offs_m
    row_ok = rows < row_end
    start = tl.cast(start_m, tl.int64)
    q = _load_tile(q_ptrs + tl.multiple_of(start * stride_qn, VEC), row_ok, d_ok, EVEN, EVEN_D)
    do = q
    if HAS_DO:
        do = _load_tile(do_ptrs + tl.multiple_of(start * stride_don, VEC), row_ok, d_ok, EVEN, EVEN_D)
    if EVEN:
        lse = tl.load(LSE + row_base + rows)
    else:
        lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    g = tl.zeros(lse.shape, dtype=tl.float32)
    if HAS_G:
        g = tl.load(DSCORE + row_base + rows, mask=row_ok, other=0.0)
    if FUSED_DQ:
        o = q
        if HAS_DO:
            o = _load_tile(o_ptrs + tl.multiple_of(start * stride_on, VEC), row_ok, d_ok, EVEN, EVEN_D)
        delta = _row_delta(o, do, SCORE, g, row_base, rows, row_ok, HAS_DO, HAS_G)
    elif EVEN:
        delta = tl.load(DELTA + row_base + rows)
    else:
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    pt = tl.exp2(_dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale - lse[None, :])  # P^T [keys, rows]
    if FUSED_DQ:  # dQ sums over the keys: left-out and padding keys must give exact zeros
        if HAS_VALID:
            pt = tl.where(valid[:, None], pt, 0.0)
        elif not EVEN_L:
            pt = tl.where(col_ok[:, None], pt, 0.0)
    dpt = tl.zeros(pt.shape, dtype=tl.float32)
    if HAS_DO:
        dpt = _dot(v, tl.trans(do), UPCAST, PRECISION)
        if HAS_ZERO:
            dpt = dpt * keep[:, None]
            dv = _dot_acc((pt * keep[:, None]).to(do.dtype), do, dv, UPCAST, PRECISION)
        else:
            dv = _dot_acc(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
    if HAS_G:
        if any_w:  # uniform: this program's keys hold a concept column
            dpt += w2[:, None] * g[None, :] * pt
    dst = pt * (dpt - delta[None, :])
    dk = _dot_acc(dst.to(q.dtype), q, dk, UPCAST, PRECISION)
    if FUSED_DQ:
        dq = _dot(tl.trans(dst).to(k.dtype), k, UPCAST, PRECISION) * scale
        _store_tile(dq_ptrs + tl.multiple_of(start * stride_dqn, VEC), dq, row_ok, d_ok, EVEN, EVEN_D)
    return dk, dv


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
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_VALID: tl.constexpr, HAS_G: tl.constexpr,
    HAS_DO: tl.constexpr, FUSED_DQ: tl.constexpr, EVEN_N: tl.constexpr, EVEN_L: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of BLOCK_N keys (the M dimension of the dots) from the query rows
    [split * rows_per_split, +rows_per_split), BLOCK_M rows at a time: full blocks without row
    masks, then the ragged last one.

    DK/DV carry a split stride: the final tensors (one split, stride 0) or an fp32 workspace with
    one slice per split. EVEN_N: N and rows_per_split are multiples of BLOCK_M.
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
    k = _load_tile(_tile_ptrs(K, b, h, stride_kb, stride_kh, stride_kn, cols, offs_d, VEC), col_ok, d_ok,
                   EVEN_L, EVEN_D)
    v = k
    if HAS_DO:
        v = _load_tile(_tile_ptrs(V, b, h, stride_vb, stride_vh, stride_vn, cols, offs_d, VEC), col_ok, d_ok,
                       EVEN_L, EVEN_D)
    w, keep, valid = _load_key_vectors(W + b * sw, ZERO + b * sz, VALID + b * sv, cols, col_ok,
                                       HAS_W, HAS_ZERO, HAS_VALID, False)
    w2 = 2.0 * w
    any_w = _any_nonzero(w)
    row_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    full_end = row_start + ((row_end - row_start) // BLOCK_M) * BLOCK_M
    q_ptrs = _tile_ptrs(Q, b, h, stride_qb, stride_qh, stride_qn, offs_m, offs_d, VEC)
    do_ptrs = _tile_ptrs(DO, b, h, stride_dob, stride_doh, stride_don, offs_m, offs_d, VEC)
    o_ptrs = _tile_ptrs(O, b, h, stride_ob, stride_oh, stride_on, offs_m, offs_d, VEC)
    dq_ptrs = _tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, offs_m, offs_d, VEC)
    for start_m in range(row_start, full_end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, w2, keep, valid, col_ok, any_w, q_ptrs, do_ptrs, o_ptrs, dq_ptrs,
                            LSE, DELTA, DSCORE, SCORE, row_base, start_m, offs_m, row_end, d_ok,
                            stride_qn, stride_don, stride_on, stride_dqn, qk_scale, scale,
                            VEC, True, EVEN_D, EVEN_L, HAS_ZERO, HAS_VALID, HAS_G, HAS_DO, FUSED_DQ,
                            UPCAST, PRECISION)
    if not EVEN_N:
        if full_end < row_end:
            dk, dv = _dkdv_step(dk, dv, k, v, w2, keep, valid, col_ok, any_w, q_ptrs, do_ptrs, o_ptrs, dq_ptrs,
                                LSE, DELTA, DSCORE, SCORE, row_base, full_end, offs_m, row_end, d_ok,
                                stride_qn, stride_don, stride_on, stride_dqn, qk_scale, scale,
                                VEC, False, EVEN_D, EVEN_L, HAS_ZERO, HAS_VALID, HAS_G, HAS_DO, FUSED_DQ,
                                UPCAST, PRECISION)
    if HAS_VALID and not FUSED_DQ:  # left-out keys get zero gradients
        dk = tl.where(valid[:, None], dk, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)

    split64 = pid_split.to(tl.int64)
    dk_ptrs = _tile_ptrs(DK + split64 * stride_dks, b, h, stride_dkb, stride_dkh, stride_dkn, cols, offs_d, VEC)
    _store_tile(dk_ptrs, dk * scale, col_ok, d_ok, EVEN_L, EVEN_D)
    if HAS_DO:
        dv_ptrs = _tile_ptrs(DV + split64 * stride_dvs, b, h, stride_dvb, stride_dvh, stride_dvn, cols, offs_d, VEC)
        _store_tile(dv_ptrs, dv, col_ok, d_ok, EVEN_L, EVEN_D)


@triton.jit
def _sum_splits_kernel(
    WK, WV, DK, DV, splits, split_stride,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, L,
    HEAD_DIM: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK (and dV) = the sum of the fp32 workspace's split slices [splits, B, H, L, HEAD_DIM],
    added in split order (deterministic), cast and stored with the outputs' strides."""
    pid_bh = tl.program_id(0)
    b, h = _batch_head(pid_bh, H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < L
    d_ok = offs_d < HEAD_DIM
    mask = col_ok[:, None] & d_ok[None, :]
    offs = cols[:, None] * HEAD_DIM + offs_d[None, :]
    wk = WK + pid_bh.to(tl.int64) * L * HEAD_DIM  # scalar bases, advanced by one split per step
    wv = WV + pid_bh.to(tl.int64) * L * HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for _split in range(0, splits):
        dk += tl.load(wk + offs, mask=mask, other=0.0)
        if HAS_DO:
            dv += tl.load(wv + offs, mask=mask, other=0.0)
        wk += split_stride
        wv += split_stride
    _store_tile(_tile_ptrs(DK, b, h, stride_dkb, stride_dkh, stride_dkn, cols, offs_d, 1), dk, col_ok, d_ok,
                False, False)
    if HAS_DO:
        _store_tile(_tile_ptrs(DV, b, h, stride_dvb, stride_dvh, stride_dvn, cols, offs_d, 1), dv, col_ok, d_ok,
                    False, False)
