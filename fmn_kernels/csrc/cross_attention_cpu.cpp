// Fused concept attention on the CPU: forward and backward, no N x L map in memory.
//
// Math (per batch b, head h; see fmn_kernels/ops/cross_attention.py and the project notes):
//   s_ij = scale q_i.k_j (keys with valid_j = 0 left out), p_ij = softmax_j(s_ij),
//   o_i = sum_j keep_j p_ij v_j,   c_i = sum_j w_j p_ij^2,   lse_i = log sum_j exp(s_ij).
// Forward: online softmax over key blocks with running max M, sum l and r = sum_j w_j exp(2(s_ij - M)).
// Backward, with dO and g = dLoss/dc:
//   dp_ij = keep_j dO_i.v_j + 2 g_i w_j p_ij,  delta_i = dO_i.o_i + 2 g_i c_i,  ds_ij = p_ij (dp_ij - delta_i)
//   dQ = scale dS K,  dK = scale dS^T Q,  dV = (P keep)^T dO.
// The weights w are nonzero on a few keys (the concept's tokens): c_i and the 2 g_i w_j p_ij term are
// summed over those keys only, gathered once per call.
// Work is split over (batch, head, query block) tasks with at::parallel_for (which needs OpenMP at
// compile time: see CMakeLists.txt). Each task keeps one [query block x key block] score tile in a
// per-thread buffer; rows are vectorised with ATen's at::vec, the last partial vector masked.
// In the backward a task owns a range of query rows of one head and accumulates dK/dV for that
// head into its own fp32 slice (the first tile writes it, so nothing is zero-filled): no two
// threads write the same memory. With one slice per head (the usual case) the slice is the
// gradient itself, in its input's layout. Matrix products go to the BLAS that PyTorch links (sgemm_,
// as ATen's own CPU kernels do); when it is absent, or FMN_CPU_GEMM=portable is set, to plain loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (its C name; mkl.h maps mkl_set_num_threads_local to it): inside
// our parallel region the products must run single-threaded, or MKL starts a nested thread team
// on every call (measured: 100x slower on 2 busy cores).
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

namespace fmn_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per tile: SD's 77 text tokens fit in one; long keys go through the online softmax.
constexpr int64_t kBlockN = 512;

bool use_blas() {
  const char* mode = std::getenv("FMN_CPU_GEMM");
  return sgemm_ != nullptr && !(mode && std::strcmp(mode, "portable") == 0);
}

// Keeps the BLAS single-threaded on the calling thread while alive.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Row-major C[m x n] = alpha op(A) op(B) + beta C; op(X) = X^T when trans_x.
void portable_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                   const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  std::vector<float> row(n);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t p = 0; p < k; ++p) {
      const float a_ip = trans_a ? a[p * lda + i] : a[i * lda + p];
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) row[j] += a_ip * b[j * ldb + p];
      } else {
        const float* b_p = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) row[j] += a_ip * b_p[j];
      }
    }
    float* c_i = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) c_i[j] = alpha * row[j] + (beta == 0.f ? 0.f : beta * c_i[j]);
  }
}

void gemm(bool blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!blas) return portable_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
  sgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// ---- vectorised rows: x[0, n) in steps of Vec::size(), the last step masked to what is left ----

constexpr int64_t kLanes = Vec::size();

// Calls f(j, lanes) for j = 0, kLanes, ... < n; lanes = kLanes except on a shorter last step.
template <typename F>
inline void for_each_vec(int64_t n, F f) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) f(j, kLanes);
  if (j < n) f(j, n - j);
}

inline Vec fast_exp(const Vec& x) {
  // exp_u20 is what ATen's own CPU flash attention uses: an inline polynomial, 0 below ln(FLT_MIN)
  // (so exp(-inf) = 0), several times cheaper than the Sleef call behind Vec::exp().
  return x.exp_u20();
}

inline float reduce_sum(const Vec& x) { return at::vec::vec_reduce_all<float>(std::plus<Vec>(), x); }

// x += bias (when given) in place; returns max_j x_j.
float add_bias_and_max(float* x, const float* bias, int64_t n) {
  Vec vmax(kNegInf);
  for_each_vec(n, [&](int64_t j, int64_t lanes) {
    Vec xj = Vec::loadu(x + j, lanes);
    if (bias) {
      xj = xj + Vec::loadu(bias + j, lanes);
      xj.store(x + j, lanes);
    }
    vmax = at::vec::maximum(vmax, Vec::set(Vec(kNegInf), xj, lanes));
  });
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
}

// x = exp(x - shift) in place; returns sum_j x_j. shift = +inf gives zeros.
float exp_row(float* x, int64_t n, float shift) {
  Vec vsum(0.f);
  const Vec vshift(shift);
  for_each_vec(n, [&](int64_t j, int64_t lanes) {
    const Vec e = fast_exp(Vec::loadu(x + j, lanes) - vshift);
    e.store(x + j, lanes);
    vsum = vsum + Vec::set(Vec(0.f), e, lanes);
  });
  return reduce_sum(vsum);
}

void mul_row(float* x, const float* y, int64_t n) {
  for_each_vec(n, [&](int64_t j, int64_t lanes) {
    (Vec::loadu(x + j, lanes) * Vec::loadu(y + j, lanes)).store(x + j, lanes);
  });
}

void scale_row(float* x, float a, int64_t n) {
  for_each_vec(n, [&](int64_t j, int64_t lanes) { (Vec::loadu(x + j, lanes) * Vec(a)).store(x + j, lanes); });
}

float dot(const float* x, const float* y, int64_t n) {
  Vec acc(0.f);
  for_each_vec(n, [&](int64_t j, int64_t lanes) {
    acc = at::vec::fmadd(Vec::loadu(x + j, lanes), Vec::loadu(y + j, lanes), acc);
  });
  return reduce_sum(acc);
}

// ---- loading rows as fp32 ----

// Rows of a [rows, d] slice with row stride `stride` as fp32: float data is used in place
// (*ld = stride), other dtypes are converted into buf (*ld = d).
template <typename T>
const float* rows_as_float(const T* src, int64_t stride, int64_t rows, int64_t d, float* buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    *ld = stride;
    return src;
  } else {
    for (int64_t i = 0; i < rows; ++i) at::vec::convert(src + i * stride, buf + i * d, d);
    *ld = d;
    return buf;
  }
}

// dst = factor x (x is overwritten when T is not float).
template <typename T>
void store_row(float* x, float factor, T* dst, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    for_each_vec(d, [&](int64_t j, int64_t lanes) { (Vec::loadu(x + j, lanes) * Vec(factor)).store(dst + j, lanes); });
  } else {
    scale_row(x, factor, d);
    at::vec::convert(x, dst, d);
  }
}

// A key with a nonzero concept weight. The weights are nonzero on a few keys (the concept's
// tokens), so the score and its gradient term are computed over these keys only.
struct WeightedKey {
  int64_t j;  // key index within the block
  float w;
};

// Per-key data of one (sample, key block).
struct KeyBlock {
  const float* bias = nullptr;  // 0 or -inf, added to the scores
  const float* keep = nullptr;  // 1 - zero mask
  std::vector<WeightedKey> weighted;
};

struct KeyVectors {
  std::vector<std::vector<WeightedKey>> weighted;  // per sample, j ascending; empty without weights
  const float* keep;                               // [B, L] or null
  at::Tensor bias;                                 // [B, L] 0 / -inf, undefined when every key is valid
  int64_t L;

  // Fills kb for keys [j0, j0 + n) of sample b (kb is reused to keep its vector's storage).
  void block(int64_t b, int64_t j0, int64_t n, KeyBlock& kb) const {
    kb.bias = bias.defined() ? bias.data_ptr<float>() + b * L + j0 : nullptr;
    kb.keep = keep ? keep + b * L + j0 : nullptr;
    kb.weighted.clear();
    if (weighted.empty()) return;
    for (const WeightedKey& k : weighted[b])
      if (k.j >= j0 && k.j < j0 + n) kb.weighted.push_back({k.j - j0, k.w});
  }
  bool has_weights() const { return !weighted.empty(); }
};

KeyVectors key_vectors(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& keep,
                       const std::optional<at::Tensor>& valid, int64_t B, int64_t L) {
  KeyVectors kv{{}, nullptr, at::Tensor(), L};
  if (w) {
    const float* wp = w->data_ptr<float>();
    kv.weighted.resize(B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < L; ++j)
        if (wp[b * L + j] != 0.f) kv.weighted[b].push_back({j, wp[b * L + j]});
  }
  if (keep) kv.keep = keep->data_ptr<float>();
  if (valid) kv.bias = at::where(*valid != 0, 0.0f, kNegInf).to(at::kFloat).contiguous();
  return kv;
}

std::optional<at::Tensor> as_key_vector(const std::optional<at::Tensor>& t, const char* name, int64_t B, int64_t L) {
  if (!t) return std::nullopt;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == L, name, " must have shape [B, L] = [", B, ", ", L,
              "], got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// An uninitialised tensor shaped and (where dense) laid out like t, last dim contiguous.
at::Tensor empty_in_layout_of(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor e = at::empty_like(t, t.options().dtype(dtype));
  return e.stride(-1) == 1 ? e : at::empty(t.sizes(), t.options().dtype(dtype));
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), "fmn::concept_attention_cpu needs CPU tensors, got q on ", q.device());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [B, H, seq, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "k must match q in batch, heads and head dim, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "fmn::concept_attention_cpu supports float32, bfloat16 and float16, got ", q.scalar_type());
}

// Calls f(T{}) with T the C++ type of dtype (checked by check_qkv).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

// ---- forward ----

// Problem sizes and tiling: m query rows per tile; score tiles [m x min(L, kBlockN)] with row stride ld.
struct Dims {
  int64_t B, H, N, L, D, m, ld;
  int64_t qblocks() const { return (N + m - 1) / m; }
};

// Rows per tile, as ATen's flash attention for long keys. Measured on one thread (fp32, fwd+bwd,
// kernels only, loaded machine): at N=1024 L=4608 D=128, 128 / 256 rows took 1.10x / 0.99x SDPA's
// time (matrix-product bound; each key block is packed once per 256 rows); at SD 2.1's L=77,
// 64 / 128 / 256 rows took 0.94x / 0.86x / 0.77x in one run and 0.79x / 0.89x (128 / 256) in another.
Dims make_dims(int64_t B, int64_t H, int64_t N, int64_t L, int64_t D) {
  const int64_t m = L > kBlockN ? 256 : 128;
  const int64_t ld = (std::min(std::max<int64_t>(L, 1), kBlockN) + 15) / 16 * 16;  // rows on 64-byte lines
  return {B, H, N, L, D, m, ld};
}

// Per-thread state of the forward: the running statistics of one query tile's rows.
struct RowState {
  std::vector<float> max, sum, wsq, acc;  // acc: [rows, D], sum_j keep_j exp(s_ij - max_i) v_j
  KeyBlock kb;
  explicit RowState(const Dims& d) : max(d.m), sum(d.m), wsq(d.m), acc(d.m * d.D) {}
};

// Turns row s[0, n) of a score tile into kept exp(s_j - max) and updates row i of the state.
// first: the tile's first key block (nothing accumulated yet, acc is about to be overwritten).
void online_softmax_row(float* s, int64_t n, int64_t i, bool first, const KeyBlock& kb, RowState& st, int64_t D) {
  const float old_max = first ? kNegInf : st.max[i];
  const float new_max = std::max(old_max, add_bias_and_max(s, kb.bias, n));
  const float shift = new_max == kNegInf ? 0.f : new_max;  // every key so far left out: all p are 0
  // Score terms over the weighted keys (few, usually): a sequential sum, hence in double.
  double wsq = 0.0;
  for (const WeightedKey& k : kb.weighted) {
    const double e = std::exp(s[k.j] - shift);
    wsq += k.w * e * e;
  }
  const float sum = exp_row(s, n, shift);
  if (kb.keep) mul_row(s, kb.keep, n);
  if (first) {
    st.sum[i] = sum;
    st.wsq[i] = wsq;
  } else {
    const float rescale = std::exp(old_max - shift);
    st.sum[i] = st.sum[i] * rescale + sum;
    st.wsq[i] = st.wsq[i] * rescale * rescale + wsq;
    if (rescale != 1.f) scale_row(st.acc.data() + i * D, rescale, D);
  }
  st.max[i] = new_max;
}

template <typename T>
void forward_tile(const Dims& d, const KeyVectors& kvec, const T* q, const float* k, const float* v,
                  const int64_t* qs, const int64_t* ks, const int64_t* vs, float scale, bool blas,
                  int64_t b, int64_t h, int64_t i0, float* qbuf, float* sbuf, RowState& st,
                  T* out, const int64_t* os, float* score, float* lse) {
  const int64_t rows = std::min(d.m, d.N - i0), D = d.D;
  int64_t ldq;
  const float* qp = rows_as_float(q + b * qs[0] + h * qs[1] + i0 * qs[2], qs[2], rows, D, qbuf, &ldq);
  if (d.L == 0) {  // no keys: o = 0, c = 0, lse = +inf, as with every key left out
    std::fill(st.acc.begin(), st.acc.end(), 0.f);
    std::fill(st.sum.begin(), st.sum.end(), 0.f);
    std::fill(st.wsq.begin(), st.wsq.end(), 0.f);
  }
  for (int64_t j0 = 0; j0 < d.L; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, d.L - j0);
    const float* kp = k + b * ks[0] + h * ks[1] + j0 * ks[2];
    const float* vp = v + b * vs[0] + h * vs[1] + j0 * vs[2];
    gemm(blas, false, true, rows, n, D, scale, qp, ldq, kp, ks[2], 0.f, sbuf, d.ld);
    kvec.block(b, j0, n, st.kb);
    for (int64_t i = 0; i < rows; ++i) online_softmax_row(sbuf + i * d.ld, n, i, j0 == 0, st.kb, st, D);
    gemm(blas, false, false, rows, D, n, 1.f, sbuf, d.ld, vp, vs[2], j0 == 0 ? 0.f : 1.f, st.acc.data(), D);
  }
  const int64_t row0 = (b * d.H + h) * d.N + i0;
  for (int64_t i = 0; i < rows; ++i) {
    const float l = st.sum[i];
    const float inv = l > 0.f ? 1.f / l : 0.f;  // l = 0: every key left out, o = 0 and c = 0
    store_row(st.acc.data() + i * D, inv, out + b * os[0] + h * os[1] + (i0 + i) * os[2], D);
    score[row0 + i] = st.wsq[i] * inv * inv;
    lse[row0 + i] = l > 0.f ? st.max[i] + std::log(l) : std::numeric_limits<float>::infinity();
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k32, const at::Tensor& v32, const KeyVectors& kvec,
                  float scale, at::Tensor& out, at::Tensor& score, at::Tensor& lse) {
  const Dims d = make_dims(q.size(0), q.size(1), q.size(2), k32.size(2), q.size(3));
  const int64_t qblocks = d.qblocks();
  const bool blas = use_blas();
  const T* qp = q.data_ptr<T>();
  const float *kp = k32.data_ptr<float>(), *vp = v32.data_ptr<float>();
  T* op = out.data_ptr<T>();
  float *sp = score.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k32.stride(0), k32.stride(1), k32.stride(2)};
  const int64_t vs[3] = {v32.stride(0), v32.stride(1), v32.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  at::parallel_for(0, d.B * d.H * qblocks, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded;
    std::vector<float> qbuf(d.m * d.D), sbuf(d.m * d.ld);
    RowState st(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qblocks, i0 = (t % qblocks) * d.m;
      forward_tile<T>(d, kvec, qp, kp, vp, qs, ks, vs, scale, blas, bh / d.H, bh % d.H, i0, qbuf.data(),
                      sbuf.data(), st, op, os, sp, lp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> concept_attention_cpu_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& weights,
    const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& valid, double scale) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = last_dim_contiguous(q_in);
  // K and V are read once per query tile: convert them to fp32 once ([B, H, L, D], like k itself).
  const at::Tensor k32 = last_dim_contiguous(k_in.to(at::kFloat)), v32 = last_dim_contiguous(v_in.to(at::kFloat));
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k_in.size(2);
  const auto w = as_key_vector(weights, "weights", B, L), kp = as_key_vector(keep, "keep", B, L),
             vl = as_key_vector(valid, "valid", B, L);
  const KeyVectors kvec = key_vectors(w, kp, vl, B, L);
  at::Tensor out = at::empty_like(q_in);
  at::Tensor score = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    forward_impl<decltype(tag)>(q, k32, v32, kvec, static_cast<float>(scale), out, score, lse);
  });
  return {out, score, lse};
}

// ---- backward ----

// One row of a backward tile, in place. The scores s_j become p_j = exp(s_j + bias_j - lse), times
// keep_j when there is a dO (for dV); dp_j = dO_i . v_j (0 without dO) becomes
// ds_j = p_j (keep_j dp_j - delta) + two_g w_j p_j^2, the last term over the weighted keys only.
void backward_row(float* s, float* dp, bool has_dout, const KeyBlock& kb, float lse, float delta, float two_g,
                  int64_t n) {
  const Vec vlse(lse), vdelta(delta);
  for_each_vec(n, [&](int64_t j, int64_t lanes) {
    Vec x = Vec::loadu(s + j, lanes);
    if (kb.bias) x = x + Vec::loadu(kb.bias + j, lanes);
    const Vec p = fast_exp(x - vlse);  // lse = +inf on rows with every key left out: p = 0
    p.store(s + j, lanes);
    Vec dpj = has_dout ? Vec::loadu(dp + j, lanes) : Vec(0.f);
    if (kb.keep) dpj = dpj * Vec::loadu(kb.keep + j, lanes);
    (p * (dpj - vdelta)).store(dp + j, lanes);
  });
  for (const WeightedKey& k : kb.weighted) dp[k.j] += two_g * k.w * s[k.j] * s[k.j];
  if (has_dout && kb.keep) mul_row(s, kb.keep, n);
}

struct BwdTensors {
  Dims d;
  const at::Tensor &q, &k32, &v32, &out, &score, &lse;
  const std::optional<at::Tensor>& dout;  // last dim contiguous
  const std::optional<at::Tensor>& dscore;  // fp32 contiguous [B, H, N]
  at::Tensor& dq;     // [B, H, N, D], last dim contiguous
  at::Tensor& dk_ws;  // fp32 [splits, B, H, L, D], last dim contiguous, written by each split's first tile
  at::Tensor& dv_ws;
  int64_t tiles_per_split;
};

// Per-thread scratch of the backward.
struct BwdScratch {
  std::vector<float> q, dout, out, s, dp, dq, delta, two_g;
  KeyBlock kb;
  explicit BwdScratch(const Dims& d)
      : q(d.m * d.D), dout(d.m * d.D), out(d.m * d.D), s(d.m * d.ld), dp(d.m * d.ld), dq(d.m * d.D), delta(d.m),
        two_g(d.m) {}
};

// Row terms of one query tile: delta_i = dO_i . o_i + 2 g_i c_i and 2 g_i.
template <typename T>
void tile_row_terms(const BwdTensors& a, int64_t b, int64_t h, int64_t i0, int64_t rows, const float* dop,
                    int64_t lddo, BwdScratch& sc) {
  const int64_t D = a.d.D, row0 = (b * a.d.H + h) * a.d.N + i0;
  const float* c = a.score.data_ptr<float>() + row0;
  const float* g = a.dscore ? a.dscore->data_ptr<float>() + row0 : nullptr;
  int64_t ldo = 0;
  const float* op = nullptr;
  if (dop) {
    const T* o = a.out.data_ptr<T>() + b * a.out.stride(0) + h * a.out.stride(1) + i0 * a.out.stride(2);
    op = rows_as_float(o, a.out.stride(2), rows, D, sc.out.data(), &ldo);
  }
  for (int64_t i = 0; i < rows; ++i) {
    sc.two_g[i] = g ? 2.f * g[i] : 0.f;
    sc.delta[i] = (dop ? dot(dop + i * lddo, op + i * ldo, D) : 0.f) + sc.two_g[i] * c[i];
  }
}

// dQ of one query tile (written to a.dq) and its share of dK, dV (added to this split's workspace,
// or written there when first_tile: the workspace is not zeroed beforehand).
template <typename T>
void backward_tile(const BwdTensors& a, const KeyVectors& kvec, float scale, bool blas, int64_t b, int64_t h,
                   int64_t split, int64_t i0, bool first_tile, BwdScratch& sc) {
  const Dims& d = a.d;
  const int64_t rows = std::min(d.m, d.N - i0), D = d.D, row0 = (b * d.H + h) * d.N + i0;
  int64_t ldq, lddo = 0;
  const T* qt = a.q.data_ptr<T>() + b * a.q.stride(0) + h * a.q.stride(1) + i0 * a.q.stride(2);
  const float* qp = rows_as_float(qt, a.q.stride(2), rows, D, sc.q.data(), &ldq);
  const float* dop = nullptr;
  if (a.dout) {
    const at::Tensor& g = *a.dout;
    const T* dt = g.data_ptr<T>() + b * g.stride(0) + h * g.stride(1) + i0 * g.stride(2);
    dop = rows_as_float(dt, g.stride(2), rows, D, sc.dout.data(), &lddo);
  }
  tile_row_terms<T>(a, b, h, i0, rows, dop, lddo, sc);
  const float* lse = a.lse.data_ptr<float>() + row0;
  const auto slice = [&](const at::Tensor& ws) {
    return ws.data_ptr<float>() + split * ws.stride(0) + b * ws.stride(1) + h * ws.stride(2);
  };
  float *dk = slice(a.dk_ws), *dv = slice(a.dv_ws);
  const int64_t lddk = a.dk_ws.stride(3), lddv = a.dv_ws.stride(3);
  const float beta_kv = first_tile ? 0.f : 1.f;
  if (d.L == 0) std::fill(sc.dq.begin(), sc.dq.end(), 0.f);
  for (int64_t j0 = 0; j0 < d.L; j0 += kBlockN) {
    const int64_t n = std::min(kBlockN, d.L - j0);
    kvec.block(b, j0, n, sc.kb);
    const float* kp = a.k32.data_ptr<float>() + b * a.k32.stride(0) + h * a.k32.stride(1) + j0 * a.k32.stride(2);
    const float* vp = a.v32.data_ptr<float>() + b * a.v32.stride(0) + h * a.v32.stride(1) + j0 * a.v32.stride(2);
    float *s = sc.s.data(), *dp = sc.dp.data();
    gemm(blas, false, true, rows, n, D, scale, qp, ldq, kp, a.k32.stride(2), 0.f, s, d.ld);
    if (dop) gemm(blas, false, true, rows, n, D, 1.f, dop, lddo, vp, a.v32.stride(2), 0.f, dp, d.ld);
    for (int64_t i = 0; i < rows; ++i)
      backward_row(s + i * d.ld, dp + i * d.ld, dop != nullptr, sc.kb, lse[i], sc.delta[i], sc.two_g[i], n);
    if (dop) gemm(blas, true, false, n, D, rows, 1.f, s, d.ld, dop, lddo, beta_kv, dv + j0 * lddv, lddv);
    gemm(blas, true, false, n, D, rows, scale, dp, d.ld, qp, ldq, beta_kv, dk + j0 * lddk, lddk);
    gemm(blas, false, false, rows, D, n, scale, dp, d.ld, kp, a.k32.stride(2), j0 == 0 ? 0.f : 1.f,
         sc.dq.data(), D);
  }
  T* dq = a.dq.data_ptr<T>() + b * a.dq.stride(0) + h * a.dq.stride(1) + i0 * a.dq.stride(2);
  for (int64_t i = 0; i < rows; ++i) store_row(sc.dq.data() + i * D, 1.f, dq + i * a.dq.stride(2), D);
}

template <typename T>
void backward_impl(const BwdTensors& a, const KeyVectors& kvec, float scale) {
  const Dims& d = a.d;
  const int64_t qblocks = d.qblocks(), splits = a.dk_ws.size(0);
  const bool blas = use_blas();
  at::parallel_for(0, d.B * d.H * splits, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded;
    BwdScratch sc(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / splits, split = t % splits;
      const int64_t first = split * a.tiles_per_split, last = std::min(qblocks, first + a.tiles_per_split);
      for (int64_t tile = first; tile < last; ++tile)
        backward_tile<T>(a, kvec, scale, blas, bh / d.H, bh % d.H, split, tile * d.m, tile == first, sc);
    }
  });
}

// How many tasks share the query rows of one head. Each split holds its own fp32 dK/dV
// ([B, H, L, D]), so take the fewest that keep the threads at least 80% busy.
int64_t dkdv_splits(int64_t heads, int64_t qblocks, int64_t* tiles_per_split) {
  const int64_t threads = at::get_num_threads();
  if (qblocks == 0) {
    *tiles_per_split = 1;
    return 1;
  }
  int64_t wanted = 1;
  for (; wanted < qblocks; ++wanted) {
    const int64_t tasks = heads * wanted, waves = (tasks + threads - 1) / threads;
    if (5 * tasks >= 4 * threads * waves) break;
  }
  *tiles_per_split = (qblocks + wanted - 1) / wanted;
  return (qblocks + *tiles_per_split - 1) / *tiles_per_split;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> concept_attention_cpu_bwd(
    const std::optional<at::Tensor>& dout_in, const std::optional<at::Tensor>& dscore_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& score_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& keep,
    const std::optional<at::Tensor>& valid, double scale) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = last_dim_contiguous(q_in), out = last_dim_contiguous(out_in.to(q.scalar_type()));
  const at::Tensor k32 = last_dim_contiguous(k_in.to(at::kFloat)), v32 = last_dim_contiguous(v_in.to(at::kFloat));
  const at::Tensor score = score_in.to(at::kFloat).contiguous(), lse = lse_in.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k_in.size(2), D = q.size(3);
  const auto w = as_key_vector(weights, "weights", B, L), kp = as_key_vector(keep, "keep", B, L),
             vl = as_key_vector(valid, "valid", B, L);
  const KeyVectors kvec = key_vectors(w, kp, vl, B, L);
  std::optional<at::Tensor> dout, dscore;
  if (dout_in) dout = last_dim_contiguous(dout_in->to(q.scalar_type()));
  if (dscore_in && w) dscore = dscore_in->to(at::kFloat).contiguous();
  int64_t tiles_per_split;
  const Dims dims = make_dims(B, H, N, L, D);
  const int64_t splits = dkdv_splits(B * H, dims.qblocks(), &tiles_per_split);
  // The gradients take their input's memory layout (diffusers' [B, seq, H, D] viewed as [B, H, seq, D]),
  // so autograd neither copies them into that layout nor before the projections' backward.
  at::Tensor dq = empty_in_layout_of(q, q.scalar_type());
  // Each split's first tile writes its dK/dV slice (dV only with a dO): zero only what nothing writes.
  // One split in fp32: the slice is the gradient itself, in its input's layout.
  const bool direct = splits == 1 && q.scalar_type() == at::kFloat;
  const auto workspace = [&](const at::Tensor& like, bool written) {
    if (direct) {
      at::Tensor g = empty_in_layout_of(like, at::kFloat);
      return (written ? g : g.zero_()).unsqueeze(0);
    }
    const auto options = q.options().dtype(at::kFloat);
    return written ? at::empty({splits, B, H, L, D}, options) : at::zeros({splits, B, H, L, D}, options);
  };
  at::Tensor dk_ws = workspace(k_in, N > 0), dv_ws = workspace(v_in, N > 0 && dout.has_value());
  BwdTensors a{dims, q, k32, v32, out, score, lse, dout, dscore, dq, dk_ws, dv_ws, tiles_per_split};
  dispatch_dtype(q.scalar_type(), [&](auto tag) { backward_impl<decltype(tag)>(a, kvec, static_cast<float>(scale)); });
  const auto gradient = [&](const at::Tensor& ws, const at::Tensor& like) {
    if (direct) return ws[0];
    return empty_in_layout_of(like, q.scalar_type()).copy_(splits == 1 ? ws[0] : ws.sum(0));
  };
  at::Tensor dk = gradient(dk_ws, k_in), dv = gradient(dv_ws, v_in);
  return {dq, dk, dv};
}

// How many threads at::parallel_for runs `tasks` tasks on inside this library: a check of the build
// (without OpenMP at compile time it is always 1, whatever torch.get_num_threads() says).
int64_t cpu_threads_used(int64_t tasks) {
  std::vector<char> used(at::get_num_threads(), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  return std::count(used.begin(), used.end(), 1);
}

}  // namespace
}  // namespace fmn_cpu

TORCH_LIBRARY_FRAGMENT(fmn, m) {
  m.def("concept_attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor? weights, Tensor? keep, Tensor? valid, "
        "float scale) -> (Tensor out, Tensor score, Tensor lse)");
  m.def("concept_attention_cpu_bwd(Tensor? dout, Tensor? dscore, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor score, Tensor lse, Tensor? weights, Tensor? keep, Tensor? valid, float scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("cpu_threads_used(int tasks) -> int", &fmn_cpu::cpu_threads_used);
}

TORCH_LIBRARY_IMPL(fmn, CPU, m) {
  m.impl("concept_attention_cpu_fwd", &fmn_cpu::concept_attention_cpu_fwd);
  m.impl("concept_attention_cpu_bwd", &fmn_cpu::concept_attention_cpu_bwd);
}
