// The blocked engine's weights kernel: normalized attention weights of a mask that allows
// exactly one key interval per row (causal, windows, documents, prefixes, padding and
// their `&`), written straight into a dense (B, Hq, Lq, Lk) result that the caller made
// zero (lazily: only the pages this kernel writes are ever backed).
//
// One task per batch, query head and block of kRows rows: S = scale * Q K^T over the
// union of the rows' spans (one BLAS product), then per row P = exp(S - lse) on its own
// span, normalized by its sum (so the weights are as exact as a softmax even where the
// forward's lse is off by a rounding), and stored into that span of the result. Rows
// without a key stay 0. Float32, contiguous tensors; layout (B, H, L, E).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

extern "C" int MKL_Set_Num_Threads_Local(int nt);  // MKL (in libtorch_cpu): per-thread

namespace {

constexpr int64_t kRows = 32;
using Vec = at::vec::Vectorized<float>;

// S (T x n, row-major) = alpha * Q (T x E) K^T, K (n x E): column-major S^T = K Q^T.
void scores(const float* q, const float* k, int64_t T, int64_t n, int64_t E, float alpha,
            float* s) {
  const char tk = 'T', nq = 'N';
  const int m = static_cast<int>(n), nn = static_cast<int>(T), kk = static_cast<int>(E);
  const float beta = 0.f;
  sgemm_(&tk, &nq, &m, &nn, &kk, &alpha, k, &kk, q, &kk, &beta, s, &m);
}

// dst[j] = exp(s[j] - shift) / sum over j of the same, for j < n.
void normalized_exp(float* s, int64_t n, float shift, float* dst) {
  const Vec vs(shift);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(s + j) - vs).exp();
    e.store(s + j);
    acc = acc + e;
  }
  float tmp[Vec::size()];
  acc.store(tmp);
  double total = 0.0;
  for (int64_t u = 0; u < Vec::size(); ++u) total += tmp[u];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  const Vec inv(total > 0.0 ? static_cast<float>(1.0 / total) : 0.f);
  j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(s + j) * inv).store(dst + j);
  for (; j < n; ++j) dst[j] = s[j] * (total > 0.0 ? static_cast<float>(1.0 / total) : 0.f);
}

// w (B, Hq, Lq, Lk) = the weights; spans (Bm, Hm, Lq, 2) with Bm in {1, B}, Hm in {1, Hq}.
void interval_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                      const at::Tensor& spans, double scale, at::Tensor w) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "attnlab weights kernel: float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && lse.is_contiguous() &&
                  spans.is_contiguous() && w.is_contiguous(),
              "attnlab weights kernel: contiguous tensors only");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = Hq / Hkv;
  const int64_t mB = spans.size(0), mH = spans.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  float* wp = w.data_ptr<float>();
  const int64_t nblk = (Lq + kRows - 1) / kRows;
  at::parallel_for(0, B * Hq * nblk, 1, [&](int64_t begin, int64_t end) {
    const int previous = MKL_Set_Num_Threads_Local(1);
    std::vector<float> s;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (Hq * nblk), h = (t / nblk) % Hq, r0 = (t % nblk) * kRows;
      const int64_t r1 = std::min(Lq, r0 + kRows), T = r1 - r0;
      const int64_t* rs = sp + 2 * (((mB == 1 ? 0 : b) * mH + (mH == 1 ? 0 : h)) * Lq);
      int64_t lo = Lk, hi = 0;
      for (int64_t r = r0; r < r1; ++r) {
        if (rs[2 * r] < rs[2 * r + 1]) {
          lo = std::min(lo, rs[2 * r]);
          hi = std::max(hi, rs[2 * r + 1]);
        }
      }
      if (hi <= lo) continue;  // no row of the block sees a key: its weights stay 0
      const int64_t n = hi - lo;
      s.resize(static_cast<size_t>(T * n));
      const float* qrow = qp + ((b * Hq + h) * Lq + r0) * E;
      const float* krow = kp + ((b * Hkv + h / group) * Lk + lo) * E;
      scores(qrow, krow, T, n, E, static_cast<float>(scale), s.data());
      for (int64_t i = 0; i < T; ++i) {
        const int64_t a = rs[2 * (r0 + i)], z = rs[2 * (r0 + i) + 1];
        const float l = lp[(b * Hq + h) * Lq + r0 + i];
        if (z <= a || !std::isfinite(l)) continue;
        float* dst = wp + ((b * Hq + h) * Lq + r0 + i) * Lk + a;
        normalized_exp(s.data() + i * n + (a - lo), z - a, l, dst);
      }
    }
    MKL_Set_Num_Threads_Local(previous);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnlab_blocked, m) {
  m.def(
      "interval_weights(Tensor q, Tensor k, Tensor lse, Tensor spans, float scale, "
      "Tensor(a!) w) -> ()");
}

TORCH_LIBRARY_IMPL(attnlab_blocked, CPU, m) { m.impl("interval_weights", &interval_weights); }
