// Fused LAM attention for CPU (the `cpp` backend; built on first use by cpu_lam.py).
//
// One task = (sample, block of query rows); keys are visited in blocks too, so every tile is
// q_block × kv_block and stays in the core's cache whatever N is. Per (query block, key block, head):
// the score tile S = scale·q Kᵀ and the mask tile Z = [h, 1]·[G, c]ᵀ (c rides along as an extra
// factor column, so one GEMM gives both) come from BLAS, then one vectorisable pass bounds the mask,
// combines, pads and exponentiates. The forward keeps FlashAttention's online softmax (running row
// max and sum, output rescaled per key block); the backward recomputes the tiles from the saved row
// log-sum-exp (FlashAttention-2 equations plus the mask's chain rule). Memory is O(tile) per thread:
// nothing of size N×N exists. Gradients that sum over query rows (dK, dV, d[G, c]) go to per-thread
// buffers summed at the end, so no two threads write one row. GEMMs call ATen's BLAS directly
// (Fortran sgemm_/dgemm_, no tensor per call): with tiles this small, per-call overhead would otherwise show.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Fortran BLAS, exported by libtorch_cpu (MKL on x86 wheels); ATen's own cpublas::gemm is not exported.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                      const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                      const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                      const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C (m×n) = alpha·op(A)·op(B) + beta·C on column-major BLAS (Cᵀ = op(B)ᵀ·op(A)ᵀ). BLAS
// leaves C unread when beta = 0, so uninitialised output is fine then.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  blas_gemm(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

// exp for float that the compiler vectorises (Cephes-style range reduction + degree-6 polynomial,
// ~2 ulp); large negative inputs (padding, −inf) give exactly 0.
inline float exp_approx(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }  // float64 is the exactness reference

template <typename T, bool SIGMOID>
inline T bounded(T z) {
  if constexpr (SIGMOID) return T(2) / (T(1) + exp_approx(-z));  // 2σ(z): M ∈ (0, 2), identity at z = 0
  return z;
}

// logit = combine(s, M) + pad (0 or −inf); s already carries the 1/√d scale. The mode is a template
// argument so every row loop below compiles to straight-line SIMD code with no per-element branch.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
inline T logit(T s, T m, T pad) {
  if constexpr (MASKED) {
    if constexpr (MUL) s = s * m;
    else s = s + (SIGMOID ? m - T(1) : m);  // with a sigmoid bound, M − 1 keeps S exact at init
  }
  return s + pad;
}

// Forward over one n × nk tile: s holds scores and becomes exp(logit − new row max); the running
// row max mx and sum l are updated and alpha gets each row's rescale factor for the output so far.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
void forward_rows(T* s, const T* z, const T* pad, int64_t n, int64_t nk, T* mx, T* l, T* alpha) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = s + i * nk;
    T block_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < nk; ++j) {
      T m = T(0);
      if constexpr (MASKED) m = bounded<T, SIGMOID>(z[i * nk + j]);
      row[j] = logit<T, MASKED, MUL, SIGMOID>(row[j], m, pad[j]);
      block_max = row[j] > block_max ? row[j] : block_max;
    }
    const T new_max = std::max(mx[i], block_max);
    const T base = new_max == -std::numeric_limits<T>::infinity() ? T(0) : new_max;  // all keys so far padded
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < nk; ++j) {
      row[j] = exp_approx(row[j] - base);
      sum += row[j];
    }
    alpha[i] = std::exp(mx[i] - base);  // 0 while nothing was accumulated
    l[i] = l[i] * alpha[i] + sum;
    mx[i] = new_max;
  }
}

// Backward over one tile: s → dL/ds (for mul, the chain through s·M included), dp → P, dz += dL/dz.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
void backward_rows(T* s, T* dp, const T* z, T* dz, const T* pad, int64_t n, int64_t nk, const T* lse,
                   const T* delta) {
  for (int64_t i = 0; i < n; ++i) {
    T* srow = s + i * nk;
    T* dprow = dp + i * nk;
    const T lse_i = lse[i], delta_i = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) {
      const T sv = srow[j];
      T m = T(0);
      if constexpr (MASKED) m = bounded<T, SIGMOID>(z[i * nk + j]);
      const T p = exp_approx(logit<T, MASKED, MUL, SIGMOID>(sv, m, pad[j]) - lse_i);
      const T dlogit = p * (dprow[j] - delta_i);
      if constexpr (MASKED) {
        const T dm = MUL ? dlogit * sv : dlogit;
        dz[i * nk + j] += SIGMOID ? dm * m * (T(1) - m / T(2)) : dm;  // d(2σ(z))/dz = M(1 − M/2)
      }
      srow[j] = MASKED && MUL ? dlogit * m : dlogit;
      dprow[j] = p;
    }
  }
}

template <typename T>
struct RowKernels {
  using Fwd = void (*)(T*, const T*, const T*, int64_t, int64_t, T*, T*, T*);
  using Bwd = void (*)(T*, T*, const T*, T*, const T*, int64_t, int64_t, const T*, const T*);
  Fwd fwd;
  Bwd bwd;
};

template <typename T, bool MASKED, bool MUL, bool SIGMOID>
RowKernels<T> kernels() {
  return {forward_rows<T, MASKED, MUL, SIGMOID>, backward_rows<T, MASKED, MUL, SIGMOID>};
}

template <typename T>
RowKernels<T> pick(bool masked, bool mul, bool sigmoid) {
  if (!masked) return kernels<T, false, false, false>();
  if (mul) return sigmoid ? kernels<T, true, true, true>() : kernels<T, true, true, false>();
  return sigmoid ? kernels<T, true, false, true>() : kernels<T, true, false, false>();
}

// A (B, H, N, D) tensor whose rows are contiguous but whose batch, head and row strides are free:
// q, k, v arrive as views into the fused qkv projection, and out is written in (B, N, H, D) order,
// so neither side needs a copy.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sb, sh, ld;
  explicit Rows(const at::Tensor& t)
      : ptr(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), ld(t.stride(2)) {
    TORCH_CHECK(t.stride(3) == 1, "lamscale cpp kernel: the last dim must be contiguous");
  }
  Rows(T* p, int64_t H, int64_t N, int64_t D) : ptr(p), sb(H * N * D), sh(N * D), ld(D) {}  // contiguous
  T* at(int64_t b, int64_t h, int64_t i) const { return ptr + b * sb + h * sh + i * ld; }
};

// Shapes and raw pointers shared by forward and backward; pad, hx and gx are contiguous.
template <typename T>
struct Problem {
  int64_t B, H, N, D, Hm, R, q_block, kv_block, blocks;
  T scale;
  Rows<const T> q, k, v;
  const T *pad, *hx, *gx;
  bool masked;
  RowKernels<T> rows;

  Problem(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& pad_,
          const at::Tensor& hx_, const at::Tensor& gx_, bool masked_, bool mul, bool sigmoid, int64_t qb, int64_t kb)
      : B(q_.size(0)), H(q_.size(1)), N(q_.size(2)), D(q_.size(3)), Hm(masked_ ? hx_.size(1) : 1),
        R(masked_ ? hx_.size(3) : 0), q_block(qb), kv_block(kb), blocks((N + qb - 1) / qb),
        scale(T(1.0 / std::sqrt(static_cast<double>(q_.size(3))))), q(q_), k(k_), v(v_), pad(pad_.data_ptr<T>()), hx(masked_ ? hx_.data_ptr<T>() : nullptr),
        gx(masked_ ? gx_.data_ptr<T>() : nullptr), masked(masked_), rows(pick<T>(masked_, mul, sigmoid)) {}

  int64_t factor_row(int64_t b, int64_t mh, int64_t i) const { return ((b * Hm + mh) * N + i) * R; }
  bool new_mask(int64_t hh) const { return masked && (Hm > 1 || hh == 0); }  // a shared mask serves all heads
  bool mask_done(int64_t hh) const { return masked && (Hm > 1 || hh == H - 1); }

  // Z tile for query rows [i0, i0+n) × keys [j0, j0+nk) of mask head mh.
  void mask_tile(int64_t b, int64_t mh, int64_t i0, int64_t n, int64_t j0, int64_t nk, T* z) const {
    gemm<T>(false, true, n, nk, R, T(1), hx + factor_row(b, mh, i0), R, gx + factor_row(b, mh, j0), R, T(0), z, nk);
  }
};

template <typename T>
void forward_impl(const Problem<T>& p, const Rows<T>& out, T* lse) {
  const int64_t qb = p.q_block, kb = p.kv_block, D = p.D;
  at::parallel_for(0, p.B * p.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(qb * kb), z(p.masked ? qb * kb : 0), mx(p.H * qb), l(p.H * qb), alpha(qb);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.blocks, i0 = (task % p.blocks) * qb, n = std::min(qb, p.N - i0);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < p.N; j0 += kb) {
        const int64_t nk = std::min(kb, p.N - j0);
        for (int64_t hh = 0; hh < p.H; ++hh) {
          if (p.new_mask(hh)) p.mask_tile(b, p.Hm > 1 ? hh : 0, i0, n, j0, nk, z.data());
          gemm<T>(false, true, n, nk, D, p.scale, p.q.at(b, hh, i0), p.q.ld, p.k.at(b, hh, j0), p.k.ld, T(0),
                  s.data(), nk);
          p.rows.fwd(s.data(), z.data(), p.pad + b * p.N + j0, n, nk, mx.data() + hh * qb, l.data() + hh * qb,
                     alpha.data());
          T* o = out.at(b, hh, i0);
          if (j0 > 0)
            for (int64_t i = 0; i < n; ++i)
              for (int64_t e = 0; e < D; ++e) o[i * out.ld + e] *= alpha[i];
          gemm<T>(false, false, n, D, nk, T(1), s.data(), nk, p.v.at(b, hh, j0), p.v.ld, j0 > 0 ? T(1) : T(0), o,
                  out.ld);
        }
      }
      for (int64_t hh = 0; hh < p.H; ++hh) {
        T* o = out.at(b, hh, i0);
        for (int64_t i = 0; i < n; ++i) {
          const T li = l[hh * qb + i];
          for (int64_t e = 0; e < D; ++e) o[i * out.ld + e] /= li;
          lse[(b * p.H + hh) * p.N + i0 + i] = mx[hh * qb + i] + std::log(li);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lam_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& pad, const at::Tensor& hx, const at::Tensor& gx,
                                               bool masked, bool mul, bool sigmoid, int64_t q_block,
                                               int64_t kv_block) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the Python autograd.Function owns the graph
  for (const at::Tensor* t : {&k, &v, &pad, &hx, &gx})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "lamscale cpp kernel: inputs must share one dtype");
  TORCH_CHECK(pad.is_contiguous() && hx.is_contiguous() && gx.is_contiguous(), "lamscale cpp kernel: pad and "
              "mask factors must be contiguous");
  // (B, N, H, D) memory: the caller's transpose(1, 2).reshape(B, N, H·D) is then free
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lam_forward", [&] {
    const Problem<scalar_t> p(q, k, v, pad, hx, gx, masked, mul, sigmoid, q_block, kv_block);
    forward_impl<scalar_t>(p, Rows<scalar_t>(out), lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

template <typename T>
void backward_impl(const Problem<T>& p, const T* lse, const T* delta, const Rows<const T>& dout, T* dq_ptr,
                   T* dk_t, T* dv_t, T* dhx, T* dgx_t) {
  const int64_t qb = p.q_block, kb = p.kv_block, D = p.D, R = p.R;
  at::parallel_for(0, p.B * p.blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    const Rows<T> dq(dq_ptr, p.H, p.N, D);
    const Rows<T> dk(dk_t + tid * p.B * p.H * p.N * D, p.H, p.N, D);  // this thread's row-summed gradients
    const Rows<T> dv(dv_t + tid * p.B * p.H * p.N * D, p.H, p.N, D);
    T* dgx = p.masked ? dgx_t + tid * p.B * p.Hm * p.N * R : nullptr;
    std::vector<T> s(qb * kb), dp(qb * kb), z(p.masked ? qb * kb : 0), dz(p.masked ? qb * kb : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.blocks, i0 = (task % p.blocks) * qb, n = std::min(qb, p.N - i0);
      for (int64_t j0 = 0; j0 < p.N; j0 += kb) {
        const int64_t nk = std::min(kb, p.N - j0);
        const T first = j0 > 0 ? T(1) : T(0);  // GEMM beta: rows owned by this task start from zero
        for (int64_t hh = 0; hh < p.H; ++hh) {
          const int64_t mh = p.Hm > 1 ? hh : 0;
          if (p.new_mask(hh)) {
            p.mask_tile(b, mh, i0, n, j0, nk, z.data());
            std::fill(dz.begin(), dz.end(), T(0));
          }
          const T* q_blk = p.q.at(b, hh, i0);
          const T* do_blk = dout.at(b, hh, i0);
          const T* k_blk = p.k.at(b, hh, j0);
          gemm<T>(false, true, n, nk, D, p.scale, q_blk, p.q.ld, k_blk, p.k.ld, T(0), s.data(), nk);
          gemm<T>(false, true, n, nk, D, T(1), do_blk, dout.ld, p.v.at(b, hh, j0), p.v.ld, T(0), dp.data(), nk);
          p.rows.bwd(s.data(), dp.data(), z.data(), dz.data(), p.pad + b * p.N + j0, n, nk,
                     lse + (b * p.H + hh) * p.N + i0, delta + (b * p.H + hh) * p.N + i0);
          gemm<T>(false, false, n, D, nk, p.scale, s.data(), nk, k_blk, p.k.ld, first, dq.at(b, hh, i0), D);
          gemm<T>(true, false, nk, D, n, p.scale, s.data(), nk, q_blk, p.q.ld, T(1), dk.at(b, hh, j0), D);
          gemm<T>(true, false, nk, D, n, T(1), dp.data(), nk, do_blk, dout.ld, T(1), dv.at(b, hh, j0), D);
          if (p.mask_done(hh)) {  // this mask head's dz over the tile is complete
            gemm<T>(false, false, n, R, nk, T(1), dz.data(), nk, p.gx + p.factor_row(b, mh, j0), R, first,
                    dhx + p.factor_row(b, mh, i0), R);
            gemm<T>(true, false, nk, R, n, T(1), dz.data(), nk, p.hx + p.factor_row(b, mh, i0), R, T(1),
                    dgx + p.factor_row(b, mh, j0), R);
          }
        }
      }
    }
  });
}

std::vector<at::Tensor> lam_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& pad, const at::Tensor& hx, const at::Tensor& gx,
                                     const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dout,
                                     bool masked, bool mul, bool sigmoid, int64_t q_block, int64_t kv_block) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "lamscale cpp kernel: lse and delta must be contiguous");
  const int64_t threads = at::get_num_threads();
  at::Tensor dq = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());  // contiguous
  at::Tensor dk_t = at::zeros({threads, q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor dv_t = at::zeros_like(dk_t);
  at::Tensor dhx = masked ? at::empty(hx.sizes(), hx.options()) : at::Tensor();
  at::Tensor dgx_t = masked ? at::zeros({threads, gx.size(0), gx.size(1), gx.size(2), gx.size(3)}, gx.options())
                            : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lam_backward", [&] {
    const Problem<scalar_t> p(q, k, v, pad, hx, gx, masked, mul, sigmoid, q_block, kv_block);
    backward_impl<scalar_t>(p, lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), Rows<const scalar_t>(dout),
                            dq.data_ptr<scalar_t>(), dk_t.data_ptr<scalar_t>(), dv_t.data_ptr<scalar_t>(),
                            masked ? dhx.data_ptr<scalar_t>() : nullptr,
                            masked ? dgx_t.data_ptr<scalar_t>() : nullptr);
  });
  std::vector<at::Tensor> grads{dq, dk_t.sum(0), dv_t.sum(0)};
  if (masked) {
    grads.push_back(dhx);
    grads.push_back(dgx_t.sum(0));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY(lamscale_cpu, m) {
  m.def("lam_forward(Tensor q, Tensor k, Tensor v, Tensor pad, Tensor hx, Tensor gx, bool masked, bool mul, "
        "bool sigmoid, int q_block, int kv_block) -> (Tensor, Tensor)");
  m.def("lam_backward(Tensor q, Tensor k, Tensor v, Tensor pad, Tensor hx, Tensor gx, Tensor lse, Tensor delta, "
        "Tensor dout, bool masked, bool mul, bool sigmoid, int q_block, int kv_block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lamscale_cpu, CPU, m) {
  m.impl("lam_forward", &lam_forward);
  m.impl("lam_backward", &lam_backward);
}
