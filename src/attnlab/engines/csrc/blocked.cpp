// attnlab's fused CPU tile kernel for the blocked engine (float32, forward and backward).
//
// The Python side plans the work: query blocks of `bs` rows, each with one contiguous key
// range cut into `bs`-wide tiles. A tile is either full (no mask evaluation at all) or
// partial (its allowed pairs come precomputed as a bool tile). ALiBi is evaluated in the
// kernel from its per-head slopes, so no bias tensor exists. Everything else — the
// online softmax, the probabilities, the gradients — happens per tile in small buffers:
// memory stays O(bs x (bs + E)) per thread.
//
// Layout (B, H, L, E), contiguous. Scores S = scale * Q K^T (+ ALiBi), masked pairs -inf.
// Forward  (one task per batch, query head, query block): online softmax over the tiles,
//          out = softmax(S) V and lse = logsumexp(S) per row (-inf, out 0 if no key).
// Backward (one task per batch and key/value head, looping over the query heads that share
//          it, so dK and dV have a single writer): P = exp(S - lse), dV += P^T dO,
//          dS = P * (dO V^T - delta), dQ += scale dS K, dK += scale dS^T Q.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

extern "C" int MKL_Set_Num_Threads_Local(int nt);  // MKL (in libtorch_cpu): per-thread

namespace {

// BLAS calls run single-threaded inside the kernel's own parallel loop.
struct SerialBlas {
  int previous;
  SerialBlas() : previous(MKL_Set_Num_Threads_Local(1)) {}
  ~SerialBlas() { MKL_Set_Num_Threads_Local(previous); }
};

// Tasks [0, n) handed out `chunk` at a time to workers that ask for more when done: on a
// shared machine a stalled core then costs only its current chunk, not half the work.
// fn(worker, begin, end); worker < workers(n, chunk).
int64_t workers(int64_t n, int64_t chunk) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk));
}

bool brgemm_works();

template <typename F>
void dynamic_for(int64_t n, int64_t chunk, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(n, chunk), 1, [&](int64_t wb, int64_t we) {
    SerialBlas serial;
    for (int64_t w = wb; w < we; ++w)
      for (int64_t s = next.fetch_add(chunk); s < n; s = next.fetch_add(chunk))
        fn(w, s, std::min(n, s + chunk));
    if (brgemm_works()) at::native::cpublas::brgemm_release(false);
  });
}

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, through column-major BLAS.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
}

// oneDNN's brgemm (through torch's cpublas) where this CPU and build run it: it reads A and
// B in place, where MKL's sgemm would first pack both for each of these small products.
bool brgemm_works() {
  static const bool works = [] {
    try {
      float a[16] = {1.f}, b[16] = {2.f}, c[16] = {0.f};
      at::native::cpublas::brgemm(1, 16, 1, 1, 16, 16, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 2.f;
    } catch (...) {
      return false;
    }
  }();
  return works;
}

// Row-major C (m x n) = A (m x k) B (k x n), or C += A B with `add`.
void mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc, bool add) {
  if (brgemm_works())
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
  else
    gemm(false, false, m, n, k, 1.f, a, lda, b, ldb, add ? 1.f : 0.f, c, ldc);
}

// (B, H, L, E) -> (B, H, E, L), in 16 x 16 tiles, in parallel: the right operand of Q K^T.
at::Tensor transposed(const at::Tensor& x) {
  const int64_t bh = x.size(0) * x.size(1), L = x.size(2), E = x.size(3);
  // rows padded past a power-of-two stride, which would map them onto the same cache sets
  const int64_t ld = L + 16;
  at::Tensor out = at::empty({x.size(0), x.size(1), E, ld}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t nl = (L + 15) / 16;
  at::parallel_for(0, bh * nl, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / nl, l0 = (t % nl) * 16, l1 = std::min(l0 + 16, L);
      const float* s = src + m * L * E;
      float* d = dst + m * E * ld;
      for (int64_t e0 = 0; e0 < E; e0 += 16)
        for (int64_t l = l0; l < l1; ++l)
          for (int64_t e = e0; e < std::min(e0 + 16, E); ++e) d[e * ld + l] = s[l * E + e];
    }
  });
  return out;
}

// dst (n x m) = src (m x n)^T, leading dims n and m.
void transpose(const float* src, int64_t m, int64_t n, float* dst) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) dst[j * m + i] = src[i * n + j];
}

// The planned problem: tensors, sizes, the block schedule and the partial tiles.
struct Problem {
  const float *q, *k, *v;
  const float *kt, *vt;  // K and V transposed, (B, Hkv, E, ldt): the right operand of Q K^T
  int64_t ldt;           // their row length (Lk padded)
  int64_t B, Hq, Hkv, Lq, Lk, E, Ev, bs;
  float scale;
  const int64_t* blocks;  // (nblk, 4): r0, r1, k0, k1
  int64_t nblk;
  const int64_t* tiles;   // (nblk, ntile): index of the block's j-th tile in `allowed`, or -1
  int64_t ntile;
  const bool* allowed;    // (mB, mH, nP, bs, bs)
  int64_t mB, mH, nP;
  const float* slopes;    // (Hq,) ALiBi slopes, or null
  const int64_t* spans;   // (mB, mH, Lq, 2): each row's key span [lo, hi) (hi <= lo: none)
  int64_t chunk;          // keys per score chunk
  bool interval;          // the mask allows exactly each row's span: mask by the spans

  int64_t group() const { return Hq / Hkv; }
  const float* qrow(int64_t b, int64_t h, int64_t r) const { return q + ((b * Hq + h) * Lq + r) * E; }
  const float* krow(int64_t b, int64_t h, int64_t c) const {
    return k + ((b * Hkv + h / group()) * Lk + c) * E;
  }
  const float* vrow(int64_t b, int64_t h, int64_t c) const {
    return v + ((b * Hkv + h / group()) * Lk + c) * Ev;
  }
  const float* ktcol(int64_t b, int64_t h, int64_t c) const {
    return kt + (b * Hkv + h / group()) * E * ldt + c;
  }
  const float* vtcol(int64_t b, int64_t h, int64_t c) const {
    return vt + (b * Hkv + h / group()) * Ev * ldt + c;
  }
};

void scale_row(float* x, int64_t n, float a);

// The key span [lo, hi) of rows [a, z): the union of the rows' spans (hi <= lo: no key).
std::pair<int64_t, int64_t> group_span(const Problem& P, int64_t b, int64_t h, int64_t a,
                                       int64_t z) {
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq);
  int64_t lo = P.Lk, hi = 0;
  for (int64_t r = a; r < z; ++r) {
    if (rs[2 * r] < rs[2 * r + 1]) {
      lo = std::min(lo, rs[2 * r]);
      hi = std::max(hi, rs[2 * r + 1]);
    }
  }
  return {lo, hi};
}

// S (T x n, leading dim n) = scores of rows [a, a + T) (in block `blk`) against keys
// [c0, c0 + n), with the partial tiles' mask and ALiBi applied.
void scores(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
            int64_t c0, int64_t n, float* S, float* qscaled) {
  const int64_t* bl = P.blocks + 4 * blk;
  const int64_t r0 = bl[0], k0 = bl[2];
  float* qs = qscaled;  // scale * Q of the rows (T x E), so S needs no pass of its own
  const float* qp = P.qrow(b, h, a);
  for (int64_t i = 0; i < T * P.E; ++i) qs[i] = qp[i] * P.scale;
  mm(T, n, P.E, qs, P.E, P.ktcol(b, h, c0), P.ldt, S, n, false);
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t j_end = P.interval ? 0 : std::min(P.ntile, (c0 + n - k0 + P.bs - 1) / P.bs);
  for (int64_t j = (c0 - k0) / P.bs; j < j_end; ++j) {  // partial tiles: their mask
    const int64_t t = P.tiles[blk * P.ntile + j];
    if (t < 0) continue;
    const int64_t lo = std::max(c0, k0 + j * P.bs), hi = std::min(c0 + n, k0 + (j + 1) * P.bs);
    const bool* tile = P.allowed + ((mb * P.mH + mh) * P.nP + t) * P.bs * P.bs;
    for (int64_t i = 0; i < T; ++i) {
      const bool* ok = tile + (a - r0 + i) * P.bs + (lo - k0 - j * P.bs);
      float* s = S + i * n + (lo - c0);
      for (int64_t u = 0; u < hi - lo; ++u) s[u] = ok[u] ? s[u] : kNegInf;
    }
  }
  if (P.interval) {  // keys outside the row's span are masked; nothing else is
    const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq + a);
    for (int64_t i = 0; i < T; ++i) {
      float* s = S + i * n;
      const int64_t lo = std::clamp<int64_t>(rs[2 * i] - c0, 0, n);
      const int64_t hi = std::clamp<int64_t>(rs[2 * i + 1] - c0, lo, n);
      std::fill(s, s + lo, kNegInf);
      std::fill(s + hi, s + n, kNegInf);
    }
  }
  if (P.slopes != nullptr) {
    const float m = P.slopes[h];
    const float pos0 = static_cast<float>(a + P.Lk - P.Lq - c0);  // position - first key
    for (int64_t i = 0; i < T; ++i) {
      float* s = S + i * n;
      const float d0 = pos0 + static_cast<float>(i);
      for (int64_t u = 0; u < n; ++u) s[u] += -m * std::fabs(d0 - static_cast<float>(u));
    }
  }
}

float row_max(const float* s, int64_t n) {
  int64_t j = 0;
  Vec vm(kNegInf);
  for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(s + j));
  float m = kNegInf;
  float tmp[Vec::size()];
  vm.store(tmp);
  for (int64_t u = 0; u < Vec::size(); ++u) m = std::max(m, tmp[u]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - shift) in place; returns the sum.
float exp_sum(float* s, int64_t n, float shift) {
  int64_t j = 0;
  const Vec vs(shift);
  Vec acc(0.f);
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(s + j) - vs).exp_u20();
    e.store(s + j);
    acc = acc + e;
  }
  float tmp[Vec::size()];
  acc.store(tmp);
  float total = 0.f;
  for (int64_t u = 0; u < Vec::size(); ++u) total += tmp[u];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

void scale_row(float* x, int64_t n, float a) {
  int64_t j = 0;
  const Vec va(a);
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// Per-thread scratch: a score chunk, its gradient, the accumulator and row statistics.
struct Scratch {
  std::vector<float> S, dP, X, Q, acc, m, l;
  Scratch(int64_t rows, int64_t chunk, int64_t e, int64_t ev)
      : S(rows * chunk), dP(rows * chunk), X(rows * chunk), Q(rows * e), acc(rows * ev),
        m(rows), l(rows) {}
};

// One forward task: rows [a, a + T) of block `blk` for batch b, query head h.
// Returns the number of scores it computed.
int64_t forward_rows(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                     float* out, float* lse, Scratch& w) {
  const auto [lo, hi] = group_span(P, b, h, a, a + T);
  if (lo >= hi) return 0;  // no key for any row: out stays 0, lse -inf
  float *S = w.S.data(), *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data();
  std::fill(m, m + T, kNegInf);
  std::fill(l, l + T, 0.f);
  std::fill(acc, acc + T * P.Ev, 0.f);
  for (int64_t c0 = lo; c0 < hi; c0 += P.chunk) {
    const int64_t n = std::min(P.chunk, hi - c0);
    scores(P, b, h, blk, a, T, c0, n, S, w.Q.data());
    for (int64_t i = 0; i < T; ++i) {
      float* s = S + i * n;
      const float nm = std::max(m[i], row_max(s, n));
      if (nm == kNegInf) {  // no allowed key yet: this chunk adds nothing to the row
        std::fill(s, s + n, 0.f);
        continue;
      }
      const float alpha = std::exp(m[i] - nm);
      l[i] = l[i] * alpha + exp_sum(s, n, nm);
      if (alpha != 1.f) scale_row(acc + i * P.Ev, P.Ev, alpha);
      m[i] = nm;
    }
    mm(T, P.Ev, n, S, n, P.vrow(b, h, c0), P.Ev, acc, P.Ev, true);
  }
  float* o = out + ((b * P.Hq + h) * P.Lq + a) * P.Ev;
  float* ls = lse + (b * P.Hq + h) * P.Lq + a;
  for (int64_t i = 0; i < T; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t e = 0; e < P.Ev; ++e) o[i * P.Ev + e] = acc[i * P.Ev + e] * inv;
    ls[i] = l[i] > 0.f ? m[i] + std::log(l[i]) : kNegInf;
  }
  return T * (hi - lo);
}

// The plan's part of a Problem (blocks, tiles, partial-tile masks), checked.
Problem plan_problem(const at::Tensor& blocks, const at::Tensor& tiles, const at::Tensor& allowed,
                     int64_t bs) {
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.is_contiguous() && blocks.dim() == 2 &&
                  blocks.size(1) == 4,
              "blocks must be contiguous int64 (nblk, 4)");
  TORCH_CHECK(tiles.scalar_type() == at::kLong && tiles.is_contiguous() && tiles.dim() == 2 &&
                  tiles.size(0) == blocks.size(0),
              "tiles must be contiguous int64 (nblk, ntile)");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.is_contiguous() && allowed.dim() == 5 &&
                  allowed.size(3) == bs && allowed.size(4) == bs,
              "allowed must be contiguous bool (mB, mH, nP, bs, bs)");
  Problem P{};
  P.bs = bs;
  P.blocks = blocks.data_ptr<int64_t>();
  P.nblk = blocks.size(0);
  P.tiles = tiles.data_ptr<int64_t>();
  P.ntile = tiles.size(1);
  P.allowed = allowed.data_ptr<bool>();
  P.mB = allowed.size(0);
  P.mH = allowed.size(1);
  P.nP = allowed.size(2);
  return P;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& blocks, const at::Tensor& tiles,
                     const at::Tensor& allowed, const at::Tensor& spans,
                     const c10::optional<at::Tensor>& slopes, int64_t bs, double scale,
                     bool interval) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->device().is_cpu(),
                "attnlab blocked kernel: q, k, v must be contiguous float32 CPU (B, H, L, E)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of key heads");
  Problem P = plan_problem(blocks, tiles, allowed, bs);
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.is_contiguous() && spans.dim() == 4 &&
                  spans.size(0) == P.mB && spans.size(1) == P.mH && spans.size(2) == q.size(2),
              "spans must be contiguous int64 (mB, mH, Lq, 2)");
  P.q = q.data_ptr<float>();
  P.k = k.data_ptr<float>();
  P.v = v.data_ptr<float>();
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Hkv = k.size(1);
  P.Lq = q.size(2);
  P.Lk = k.size(2);
  P.E = q.size(3);
  P.Ev = v.size(3);
  P.scale = static_cast<float>(scale);
  P.spans = spans.data_ptr<int64_t>();
  P.chunk = 4 * bs;
  P.interval = interval;
  P.slopes = nullptr;
  if (slopes.has_value()) {
    TORCH_CHECK(slopes->scalar_type() == at::kFloat && slopes->is_contiguous() &&
                    slopes->numel() == P.Hq,
                "slopes must be contiguous float32 (Hq,)");
    P.slopes = slopes->data_ptr<float>();
  }
  return P;
}

// Rows of `rows` per task: at most `group`, at least one task per block.
int64_t groups_of(const Problem& P, int64_t group) { return (P.bs + group - 1) / group; }

// (out, lse, number of scores computed)
std::tuple<at::Tensor, at::Tensor, int64_t> blocked_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& blocks,
    const at::Tensor& tiles, const at::Tensor& allowed, const at::Tensor& spans,
    const c10::optional<at::Tensor>& slopes, int64_t bs, bool interval, double scale,
    int64_t group) {
  Problem P = make_problem(q, k, v, blocks, tiles, allowed, spans, slopes, bs, scale, interval);
  const at::Tensor kt = transposed(k);
  P.kt = kt.data_ptr<float>();
  P.ldt = kt.size(3);
  at::Tensor out = at::zeros({P.B, P.Hq, P.Lq, P.Ev}, q.options());
  at::Tensor lse = at::full({P.B, P.Hq, P.Lq}, kNegInf, q.options());
  float* o = out.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  const int64_t ng = groups_of(P, group);
  std::atomic<int64_t> work{0};
  dynamic_for(P.B * P.Hq * P.nblk * ng, 16, [&](int64_t, int64_t begin, int64_t end) {
    Scratch w(group, P.chunk, P.E, P.Ev);
    int64_t done = 0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t % ng, blk = (t / ng) % P.nblk, bh = t / ng / P.nblk;
      const int64_t* bl = P.blocks + 4 * blk;
      const int64_t a = bl[0] + g * group, z = std::min(a + group, bl[1]);
      if (a < z) done += forward_rows(P, bh / P.Hq, bh % P.Hq, blk, a, z - a, o, ls, w);
    }
    work += done;
  });
  return {out, lse, work.load()};
}

// One backward step: rows [a, a + T) of block `blk`, head h, against keys [c0, c0 + n).
void backward_chunk(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                    int64_t c0, int64_t n, const float* dout, const float* lse,
                    const float* delta, float* dq, float* dk, float* dv, Scratch& w) {
  float* S = w.S.data();
  float* dP = w.dP.data();
  scores(P, b, h, blk, a, T, c0, n, S, w.Q.data());
  const int64_t row = (b * P.Hq + h) * P.Lq + a;
  for (int64_t i = 0; i < T; ++i) {  // P = exp(S - lse); rows without keys give 0
    const float shift = lse[row + i];
    float* s = S + i * n;
    if (shift == kNegInf) std::fill(s, s + n, 0.f);
    else exp_sum(s, n, shift);
  }
  const float* dO = dout + row * P.Ev;
  const int64_t kv = (b * P.Hkv + h / P.group()) * P.Lk + c0;
  float* X = w.X.data();  // n x T: P^T, then dS^T
  transpose(S, T, n, X);
  mm(n, P.Ev, T, X, T, dO, P.Ev, dv + kv * P.Ev, P.Ev, true);   // dV += P^T dO
  mm(T, n, P.Ev, dO, P.Ev, P.vtcol(b, h, c0), P.ldt, dP, n, false);  // dP = dO V^T
  for (int64_t i = 0; i < T; ++i) {  // dS = scale * P * (dP - delta)
    const Vec d(delta[row + i]), sc(P.scale);
    float* s = S + i * n;
    const float* g = dP + i * n;
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size())
      (Vec::loadu(s + j) * (Vec::loadu(g + j) - d) * sc).store(s + j);
    for (; j < n; ++j) s[j] = s[j] * (g[j] - delta[row + i]) * P.scale;
  }
  mm(T, P.E, n, S, n, P.krow(b, h, c0), P.E, dq + row * P.E, P.E, true);  // dQ += dS K
  transpose(S, T, n, X);
  mm(n, P.E, T, X, T, P.qrow(b, h, a), P.E, dk + kv * P.E, P.E, true);  // dK += dS^T Q
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blocked_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& blocks,
    const at::Tensor& tiles, const at::Tensor& allowed, const at::Tensor& spans,
    const c10::optional<at::Tensor>& slopes, int64_t bs, bool interval, double scale,
    int64_t group) {
  Problem P = make_problem(q, k, v, blocks, tiles, allowed, spans, slopes, bs, scale, interval);
  const at::Tensor kt = transposed(k), vt = transposed(v);
  P.kt = kt.data_ptr<float>();
  P.vt = vt.data_ptr<float>();
  P.ldt = kt.size(3);
  for (const at::Tensor* t : {&dout, &lse, &delta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "dout, lse and delta must be contiguous float32");
  const int64_t tasks = P.B * P.Hq * P.nblk;
  const int64_t nw = workers(tasks, 4);
  // dQ rows have one writer (their task); dK and dV get one buffer per worker, summed after
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({nw, P.B, P.Hkv, P.Lk, P.E}, k.options());
  at::Tensor dv = at::zeros({nw, P.B, P.Hkv, P.Lk, P.Ev}, v.options());
  const float *g = dout.data_ptr<float>(), *ls = lse.data_ptr<float>(),
              *dl = delta.data_ptr<float>();
  float *pq = dq.data_ptr<float>(), *pk = dk.data_ptr<float>(), *pv = dv.data_ptr<float>();
  const int64_t kv_size = P.B * P.Hkv * P.Lk;
  std::vector<Scratch> scratch;
  for (int64_t w = 0; w < nw; ++w) scratch.emplace_back(group, P.chunk, P.E, P.Ev);
  dynamic_for(tasks, 4, [&](int64_t w, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % P.nblk, bh = t / P.nblk, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t* bl = P.blocks + 4 * blk;
      for (int64_t a = bl[0]; a < bl[1]; a += group) {
        const int64_t z = std::min(a + group, bl[1]);
        const auto [lo, hi] = group_span(P, b, h, a, z);
        for (int64_t c0 = lo; c0 < hi; c0 += P.chunk)
          backward_chunk(P, b, h, blk, a, z - a, c0, std::min(P.chunk, hi - c0), g, ls, dl, pq,
                         pk + w * kv_size * P.E, pv + w * kv_size * P.Ev, scratch[w]);
      }
    }
  });
  return {dq, dk.sum(0), dv.sum(0)};
}

// Each row's key span [lo, hi) (mB, mH, Lq, 2): from the block's first key with any allowed
// pair in the row to its last. Full tiles allow every key; partial ones are scanned.
at::Tensor row_spans(const at::Tensor& blocks, const at::Tensor& tiles, const at::Tensor& allowed,
                     int64_t bs, int64_t lq) {
  Problem P = plan_problem(blocks, tiles, allowed, bs);
  at::Tensor spans = at::zeros({P.mB, P.mH, lq, 2}, blocks.options());
  int64_t* out = spans.data_ptr<int64_t>();
  at::parallel_for(0, P.mB * P.mH * P.nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % P.nblk, mbh = t / P.nblk;
      const int64_t* bl = P.blocks + 4 * blk;
      for (int64_t r = bl[0]; r < bl[1]; ++r) {
        int64_t lo = bl[3], hi = bl[2];
        for (int64_t j = 0; j * bs + bl[2] < bl[3]; ++j) {
          const int64_t c0 = bl[2] + j * bs, c1 = std::min(c0 + bs, bl[3]);
          const int64_t tile = P.tiles[blk * P.ntile + j];
          if (tile < 0) {
            lo = std::min(lo, c0);
            hi = std::max(hi, c1);
            continue;
          }
          const bool* ok = P.allowed + ((mbh * P.nP + tile) * bs + (r - bl[0])) * bs;
          for (int64_t u = 0; u < c1 - c0; ++u)
            if (ok[u]) {
              lo = std::min(lo, c0 + u);
              hi = std::max(hi, c0 + u + 1);
            }
        }
        out[2 * (mbh * lq + r)] = lo;
        out[2 * (mbh * lq + r) + 1] = hi;
      }
    }
  });
  return spans;
}

}  // namespace

TORCH_LIBRARY(attnlab_blocked, m) {
  m.def("row_spans(Tensor blocks, Tensor tiles, Tensor allowed, int bs, int lq) -> Tensor");
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor blocks, Tensor tiles, Tensor allowed, "
      "Tensor spans, Tensor? slopes, int bs, bool interval, float scale, int group) "
      "-> (Tensor, Tensor, int)");
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, "
      "Tensor blocks, Tensor tiles, Tensor allowed, Tensor spans, Tensor? slopes, int bs, "
      "bool interval, float scale, int group) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnlab_blocked, CPU, m) {
  m.impl("row_spans", &row_spans);
  m.impl("forward", &blocked_forward);
  m.impl("backward", &blocked_backward);
}
