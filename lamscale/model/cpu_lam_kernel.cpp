// Fused LAM attention for CPU (the `cpp` backend; built on first use by cpu_lam.py).
//
// One task = (sample, block of query rows). Per head it computes the score tile S = q_blk Kᵀ and the
// mask tile M = bound(h_blk Gᵀ + c) with BLAS, then one vectorisable pass combines, pads and
// softmaxes the tile while it sits in cache, and O = P V. Backward recomputes both tiles from
// (q, k, h, g, c) and the saved row log-sum-exp (FlashAttention-2 equations plus the mask's chain
// rule). Memory is O(block·N) per thread; nothing of size N×N exists. Gradients that sum over query
// rows (dK, dV, dG, dc) go to per-thread buffers summed at the end, so no two threads write one row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

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

struct Mode {
  bool masked, mul, sigmoid;
  double scale;
};

// logits = combine(scale·raw, M) + pad (0 or −inf). The mode is a template argument so that every
// row loop below compiles to straight-line SIMD code with no per-element branch.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
inline T logit(T raw, T m, T pad, T scale) {
  T s = raw * scale;
  if constexpr (MASKED) {
    if constexpr (MUL) s = s * m;
    else s = s + (SIGMOID ? m - T(1) : m);  // with a sigmoid bound, M − 1 keeps S exact at init
  }
  return s + pad;
}

// M tile rows: m = bound(h_blk Gᵀ + c), in place over the BLAS product.
template <typename T, bool SIGMOID>
void mask_rows(T* m, const T* c, int64_t n, int64_t N) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = m + i * N;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) row[j] = bounded<T, SIGMOID>(row[j] + c[j]);
  }
}

// Forward rows: s holds raw scores; leaves unnormalised exp(logit − max) and returns row sums.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
void forward_rows(T* s, const T* m, const T* pad, int64_t n, int64_t N, T scale, T* lse, T* row_sum) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = s + i * N;
    const T* mrow = m + i * N;
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < N; ++j) {
      row[j] = logit<T, MASKED, MUL, SIGMOID>(row[j], mrow[j], pad[j], scale);
      mx = row[j] > mx ? row[j] : mx;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < N; ++j) {
      row[j] = exp_approx(row[j] - mx);
      sum += row[j];
    }
    row_sum[i] = sum;
    lse[i] = mx + std::log(sum);
  }
}

// Backward rows: raw → dL/draw (scale folded in), dp → P, dz += dL/dz.
template <typename T, bool MASKED, bool MUL, bool SIGMOID>
void backward_rows(T* raw, T* dp, const T* m, T* dz, const T* pad, int64_t n, int64_t N, T scale, const T* lse,
                   const T* delta) {
  for (int64_t i = 0; i < n; ++i) {
    T* rrow = raw + i * N;
    T* dprow = dp + i * N;
    const T* mrow = m + i * N;
    T* dzrow = dz + i * N;
    const T lse_i = lse[i], delta_i = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const T r = rrow[j], mm = mrow[j];
      const T p = exp_approx(logit<T, MASKED, MUL, SIGMOID>(r, mm, pad[j], scale) - lse_i);
      const T ds = p * (dprow[j] - delta_i);  // d loss / d logits
      if constexpr (MASKED) {
        const T dm = MUL ? ds * r * scale : ds;
        dzrow[j] += SIGMOID ? dm * mm * (T(1) - mm / T(2)) : dm;  // d(2σ(z))/dz = M(1 − M/2)
      }
      rrow[j] = (MASKED && MUL ? ds * mm : ds) * scale;
      dprow[j] = p;
    }
  }
}

template <typename T>
struct RowKernels {
  using Mask = void (*)(T*, const T*, int64_t, int64_t);
  using Fwd = void (*)(T*, const T*, const T*, int64_t, int64_t, T, T*, T*);
  using Bwd = void (*)(T*, T*, const T*, T*, const T*, int64_t, int64_t, T, const T*, const T*);
  Mask mask;
  Fwd fwd;
  Bwd bwd;
};

template <typename T>
RowKernels<T> pick(const Mode& mode) {
  if (!mode.masked) return {nullptr, forward_rows<T, false, false, false>, backward_rows<T, false, false, false>};
  if (mode.mul && mode.sigmoid)
    return {mask_rows<T, true>, forward_rows<T, true, true, true>, backward_rows<T, true, true, true>};
  if (mode.mul) return {mask_rows<T, false>, forward_rows<T, true, true, false>, backward_rows<T, true, true, false>};
  if (mode.sigmoid)
    return {mask_rows<T, true>, forward_rows<T, true, false, true>, backward_rows<T, true, false, true>};
  return {mask_rows<T, false>, forward_rows<T, true, false, false>, backward_rows<T, true, false, false>};
}

// M tile for query rows [i0, i0+n) of sample b, mask head mh, into m (n × N).
template <typename T>
void mask_tile(const RowKernels<T>& kern, const at::Tensor& h, const at::Tensor& g, const at::Tensor& c, int64_t b,
               int64_t mh, int64_t i0, int64_t n, at::Tensor& m) {
  at::mm_out(m, h[b][mh].narrow(0, i0, n), g[b][mh].t());
  kern.mask(m.data_ptr<T>(), c[b][mh].data_ptr<T>(), n, m.size(1));
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad,
                  const at::Tensor& h, const at::Tensor& g, const at::Tensor& c, const Mode& mode, int64_t block,
                  at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t Hm = mode.masked ? h.size(1) : 1;
  const int64_t blocks = (N + block - 1) / block;
  const RowKernels<T> kern = pick<T>(mode);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_buf = at::empty({block, N}, q.options());
    at::Tensor m_buf = at::empty({block, N}, q.options());
    at::Tensor sum_buf = at::empty({block, 1}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * block, n = std::min(block, N - i0);
      at::Tensor s = s_buf.narrow(0, 0, n), m = m_buf.narrow(0, 0, n), row_sum = sum_buf.narrow(0, 0, n);
      for (int64_t hh = 0; hh < H; ++hh) {
        if (mode.masked && (Hm > 1 || hh == 0)) mask_tile<T>(kern, h, g, c, b, Hm > 1 ? hh : 0, i0, n, m);
        at::mm_out(s, q[b][hh].narrow(0, i0, n), k[b][hh].t());
        kern.fwd(s.data_ptr<T>(), m.data_ptr<T>(), pad[b].data_ptr<T>(), n, N, T(mode.scale),
                 lse[b][hh].data_ptr<T>() + i0, row_sum.data_ptr<T>());
        at::Tensor o = out[b][hh].narrow(0, i0, n);
        at::mm_out(o, s, v[b][hh]);
        o.div_(row_sum);  // normalise the n×d output instead of the n×N probabilities
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lam_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& pad, const at::Tensor& h, const at::Tensor& g,
                                               const at::Tensor& c, bool masked, bool mul, bool sigmoid,
                                               int64_t block) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the Python autograd.Function owns the graph
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const Mode mode{masked, mul, sigmoid, 1.0 / std::sqrt(static_cast<double>(q.size(3)))};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lam_forward",
                             [&] { forward_impl<scalar_t>(q, k, v, pad, h, g, c, mode, block, out, lse); });
  return {out, lse};
}

template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad,
                   const at::Tensor& h, const at::Tensor& g, const at::Tensor& c, const at::Tensor& lse,
                   const at::Tensor& delta, const at::Tensor& dout, const Mode& mode, int64_t block, at::Tensor& dq,
                   at::Tensor& dk_t, at::Tensor& dv_t, at::Tensor& dh, at::Tensor& dg_t, at::Tensor& dc_t) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t Hm = mode.masked ? h.size(1) : 1;
  const int64_t blocks = (N + block - 1) / block;
  const RowKernels<T> kern = pick<T>(mode);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < dk_t.size(0), "lamscale cpp kernel: thread ", tid, " outside its gradient buffers");
    at::Tensor dk = dk_t[tid], dv = dv_t[tid];
    at::Tensor raw_buf = at::empty({block, N}, q.options()), dp_buf = at::empty({block, N}, q.options());
    at::Tensor m_buf = at::empty({block, N}, q.options()), dz_buf = at::empty({block, N}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * block, n = std::min(block, N - i0);
      at::Tensor raw = raw_buf.narrow(0, 0, n), dp = dp_buf.narrow(0, 0, n);
      at::Tensor m = m_buf.narrow(0, 0, n), dz = dz_buf.narrow(0, 0, n);
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t mh = Hm > 1 ? hh : 0;
        if (mode.masked && (Hm > 1 || hh == 0)) {
          mask_tile<T>(kern, h, g, c, b, mh, i0, n, m);
          dz.zero_();  // a shared mask sums dz over heads
        }
        at::Tensor q_blk = q[b][hh].narrow(0, i0, n), do_blk = dout[b][hh].narrow(0, i0, n);
        at::mm_out(raw, q_blk, k[b][hh].t());
        at::mm_out(dp, do_blk, v[b][hh].t());
        kern.bwd(raw.data_ptr<T>(), dp.data_ptr<T>(), m.data_ptr<T>(), dz.data_ptr<T>(), pad[b].data_ptr<T>(), n, N,
                 T(mode.scale), lse[b][hh].data_ptr<T>() + i0, delta[b][hh].data_ptr<T>() + i0);
        at::Tensor dq_blk = dq[b][hh].narrow(0, i0, n);
        at::mm_out(dq_blk, raw, k[b][hh]);
        dk[b][hh].addmm_(raw.t(), q_blk);
        dv[b][hh].addmm_(dp.t(), do_blk);
        if (mode.masked && (Hm > 1 || hh == H - 1)) {  // this mask head's dz is complete
          at::Tensor dh_blk = dh[b][mh].narrow(0, i0, n);
          at::mm_out(dh_blk, dz, g[b][mh]);
          dg_t[tid][b][mh].addmm_(dz.t(), h[b][mh].narrow(0, i0, n));
          dc_t[tid][b][mh].add_(dz.sum(0));
        }
      }
    }
  });
}

std::vector<at::Tensor> lam_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& pad, const at::Tensor& h, const at::Tensor& g,
                                     const at::Tensor& c, const at::Tensor& lse, const at::Tensor& delta,
                                     const at::Tensor& dout, bool masked, bool mul, bool sigmoid, int64_t block) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t threads = at::get_num_threads();
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk_t = at::zeros({threads, q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor dv_t = at::zeros_like(dk_t);
  at::Tensor dh = masked ? at::empty_like(h) : at::Tensor();
  at::Tensor dg_t = masked ? at::zeros({threads, g.size(0), g.size(1), g.size(2), g.size(3)}, g.options()) : at::Tensor();
  at::Tensor dc_t = masked ? at::zeros({threads, c.size(0), c.size(1), c.size(2)}, c.options()) : at::Tensor();
  const Mode mode{masked, mul, sigmoid, 1.0 / std::sqrt(static_cast<double>(q.size(3)))};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "lam_backward", [&] {
    backward_impl<scalar_t>(q, k, v, pad, h, g, c, lse, delta, dout, mode, block, dq, dk_t, dv_t, dh, dg_t, dc_t);
  });
  std::vector<at::Tensor> grads{dq, dk_t.sum(0), dv_t.sum(0)};
  if (masked) {
    grads.push_back(dh);
    grads.push_back(dg_t.sum(0));
    grads.push_back(dc_t.sum(0));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY(lamscale_cpu, m) {
  m.def("lam_forward(Tensor q, Tensor k, Tensor v, Tensor pad, Tensor h, Tensor g, Tensor c, bool masked, "
        "bool mul, bool sigmoid, int block) -> (Tensor, Tensor)");
  m.def("lam_backward(Tensor q, Tensor k, Tensor v, Tensor pad, Tensor h, Tensor g, Tensor c, Tensor lse, "
        "Tensor delta, Tensor dout, bool masked, bool mul, bool sigmoid, int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lamscale_cpu, CPU, m) {
  m.impl("lam_forward", &lam_forward);
  m.impl("lam_backward", &lam_backward);
}
