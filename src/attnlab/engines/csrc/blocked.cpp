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
// Forward  (one task per batch, query head and `group` rows of a query block, in row tiles
//          of 32): register tiles of S^T with the rows in the vector lanes, an online
//          softmax over chunks of keys, out = softmax(S) V and lse = logsumexp(S) per row,
//          in log2 units (-inf, out 0 if no key); see "The forward's register tiles" below.
// Weights  (forward_weights, interval masks only): the same forward also copies each score
//          chunk, transposed, to a row tile buffer, and once the tile's rows have their
//          maximum and sum, writes w = 2^(s - lse) normalized by its own sum, so Q K^T is
//          computed once (see store_weights).
// Decode   (decode: a few query rows per key/value head, no autograd; float32, bfloat16 or
//          float16, each chunk of half-precision keys and values converted to float32 in a
//          small buffer per worker, the sums in float32 as for float32): the query heads that
//          share a key/value head are the rows of one product, so each key and value is read
//          once; keys split into parts run in parallel and merged; an interval mask reads
//          only each row's interval (see "Decoding" below); a row that a NaN value of a
//          key it does not see reached (0 * NaN) is computed again (decode_exact_row).
// Backward (one task per batch, query head and query block; dK and dV summed from one buffer
//          per worker): S made bit for bit as the forward made it, P = 2^(S - lse) (log2
//          units), dV += P^T dO, dS = P * (dO V^T - delta), dQ += scale dS K,
//          dK += scale dS^T Q; see "The backward's scores" below. Given a `shift`, P is
//          normalized by its row's sum and each row's delta is sum_j P_ij dP_ij + shift_i
//          of the very P and dP its dS is made of (kept over the rows' key span between
//          two passes; see backward_rows), so each row of dS sums to 0 as plain PyTorch's;
//          with a `mass` per row, P sums to it instead (a part of a larger softmax).
//          A NaN reaches the gradients of the rows and keys that read it only, as in fp64:
//          chunks where it could spread through 0 * NaN take a careful path (see there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Tasks [0, n) in chunks of `chunk`, chunk c to worker c % workers(n, chunk), each worker's
// in order: what a worker sums into its own buffer is the same from run to run, so sums
// of the buffers are too (dynamic_for gives chunks to whichever worker asks first).
template <typename F>
void static_for(int64_t n, int64_t chunk, const F& fn) {
  const int64_t nw = workers(n, chunk);
  at::parallel_for(0, nw, 1, [&](int64_t wb, int64_t we) {
    SerialBlas serial;
    for (int64_t w = wb; w < we; ++w)
      for (int64_t s = w * chunk; s < n; s += nw * chunk) fn(w, s, std::min(n, s + chunk));
    if (brgemm_works()) at::native::cpublas::brgemm_release(false);
  });
}

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

// oneDNN keeps each brgemm shape's generated code for the life of the thread (torch's
// cache has no bound): a thread's first kBrgemmShapes shapes run on brgemm, later new ones
// on sgemm (backward passes over 300 new lengths on one thread left 313 MiB of code).
constexpr size_t kBrgemmShapes = 256;

bool brgemm_shape(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                  bool add) {
  thread_local std::set<std::array<int64_t, 7>> seen;
  const std::array<int64_t, 7> key{m, n, k, lda, ldb, ldc, add ? 1 : 0};
  if (seen.count(key) != 0) return true;
  if (seen.size() >= kBrgemmShapes) return false;
  seen.insert(key);
  return true;
}

// Row-major C (m x n) = A (m x k) B (k x n), or C += A B with `add`.
void mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
        int64_t ldb, float* c, int64_t ldc, bool add) {
  if (brgemm_works() && brgemm_shape(m, n, k, lda, ldb, ldc, add))
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
  else
    gemm(false, false, m, n, k, 1.f, a, lda, b, ldb, add ? 1.f : 0.f, c, ldc);
}

using Vec = at::vec::Vectorized<float>;

// a * b + c per lane, rounded once. Without a vector ISA (the DEFAULT build) ATen's fmadd is
// a * b + c, rounded twice: in the scores' dot products that gave 2.17x plain PyTorch's
// float32 error in the output (B=1, Hq=4, Hkv=2, E=32, N=64, q and k x3, global tokens and
// causal, seed 1; dQ 2.64x on seed 4), so the DEFAULT build fuses lane by lane (1.02x,
// 1.04x); AVX2 and AVX-512 keep ATen's FMA instruction, bit for bit as before.
inline Vec fma_once(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmadd(a, b, c);
#else
  float x[Vec::size()], y[Vec::size()], z[Vec::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t u = 0; u < Vec::size(); ++u) x[u] = std::fma(x[u], y[u], z[u]);
  return Vec::loadu(x);
#endif
}

// Whether any of p[0, n) is NaN or infinite (x * 0 is 0 for finite x, NaN otherwise; four
// sums, so that the adds' latency does not set the pace).
inline bool non_finite(const float* p, int64_t n) {
  constexpr int64_t w = Vec::size();
  const Vec zero(0.f);
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t j = 0;
  for (; j + 4 * w <= n; j += 4 * w) {
    a0 = at::vec::fmadd(Vec::loadu(p + j), zero, a0);
    a1 = at::vec::fmadd(Vec::loadu(p + j + w), zero, a1);
    a2 = at::vec::fmadd(Vec::loadu(p + j + 2 * w), zero, a2);
    a3 = at::vec::fmadd(Vec::loadu(p + j + 3 * w), zero, a3);
  }
  for (; j + w <= n; j += w) a0 = at::vec::fmadd(Vec::loadu(p + j), zero, a0);
  if (j < n) a1 = at::vec::fmadd(Vec::loadu(p + j, static_cast<int>(n - j)), zero, a1);
  return ((a0 + a1) + (a2 + a3)).zero_mask() != (1 << w) - 1;  // a lane that is not 0: NaN
}

// (B, H, L, E) -> (B, H, E, L), in 16 x 16 tiles, in parallel: the right operand of Q K^T.
// Where `bad` is given (B * H * L bytes), bad[row] |= 1 for each row of x that holds a NaN
// or an infinity, read while its tile is in the cache.
at::Tensor transposed(const at::Tensor& x, uint8_t* bad = nullptr) {
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
      for (int64_t e0 = 0; e0 < E; e0 += 16) {
        if (l1 - l0 == 16 && e0 + 16 <= E) {  // a whole 16 x 16 tile, in vector registers
          at::vec::transpose_mxn<float, 16, 16>(s + l0 * E + e0, E, d + e0 * ld + l0, ld);
          continue;
        }
        for (int64_t l = l0; l < l1; ++l)
          for (int64_t e = e0; e < std::min(e0 + 16, E); ++e) d[e * ld + l] = s[l * E + e];
      }
      if (bad != nullptr && non_finite(s + l0 * E, (l1 - l0) * E))  // (rare) which rows
        for (int64_t l = l0; l < l1; ++l) bad[m * L + l] |= non_finite(s + l * E, E) ? 1 : 0;
    }
  });
  return out;
}

// The planned problem: tensors, sizes, the block schedule and the partial tiles.
struct Problem {
  const float *q, *k, *v;
  const float *kt, *vt;  // K and V transposed, (B, Hkv, E, ldt): the right operand of Q K^T
  int64_t ldt;           // their row length (Lk padded)
  int64_t B, Hq, Hkv, Lq, Lk, E, Ev, bs;
  float scale;
  float softcap;          // scores become softcap * tanh(s / softcap) (0: not capped)
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
  // (backward) (B, Hkv, Lk + 1): the keys before each one whose K or V row holds a NaN or
  // an infinity, or null: none
  const int32_t* nonfinite = nullptr;

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

// s[0, n) = cap * tanh(s / cap) in place, and, unless dcap is null, dcap[0, n) = its
// derivative 1 - tanh^2.
void cap_scores(float* s, int64_t n, float cap, float* dcap) {
  const Vec c(cap), inv(1.f / cap), one(1.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec t = (Vec::loadu(s + j) * inv).tanh();
    (t * c).store(s + j);
    if (dcap != nullptr) (one - t * t).store(dcap + j);
  }
  for (; j < n; ++j) {
    const float t = std::tanh(s[j] / cap);
    s[j] = cap * t;
    if (dcap != nullptr) dcap[j] = 1.f - t * t;
  }
}

// Per-thread scratch: a score chunk, its gradient, the accumulator and row statistics.
struct Scratch {
  std::vector<float> S, dP, X, C, Q, acc, m, l;  // C: the soft-cap's derivative, if capped
  std::vector<float> kept;  // the backward's P, dP (and C) over a row group's key span
  std::vector<float> dO;    // a row group's dO, each row divided by its P's sum
  std::vector<float> delta, scales;  // a row group's deltas and dS scales
  std::vector<double> sums;          // a row group's sum_j P dP and sum_j P, interleaved
  std::vector<float> clean;  // the careful path's K, Q or dO with NaN and infinities 0
  Scratch(int64_t rows, int64_t chunk, int64_t e, int64_t ev, bool capped)
      : S(rows * chunk), dP(rows * chunk), X(rows * chunk), C(capped ? rows * chunk : 0),
        Q(rows * e), acc(rows * ev), m(rows), l(rows) {}
};

// ---- The forward's register tiles -------------------------------------------------------
// A row tile is kRT query rows. Its scores are held transposed, St[key][row], with the rows
// in the vector lanes: each key's K and V elements are broadcast against vectors of rows, so
// K and V are read in place (no transposed copy), any E and Ev work, and the online softmax
// is lane by lane (no horizontal reductions). Scores are kept in log2 units (each dot product
// is multiplied by scale * log2(e): one rounding, as plain PyTorch's (Q K^T) * scale has;
// with Q scaled first, every element of Q was rounded, and the output and dQ came out up to
// 2.3-3.4x plain PyTorch's float32 error with queries and keys of standard deviation 3), so
// the exponential is a power of two. Where only some of the tile's row vectors have keys
// (the ends of a band), only those vectors are computed.
constexpr int64_t kW = Vec::size();              // floats per vector
constexpr int64_t kRT = 32;                      // query rows per row tile
constexpr int kNV = static_cast<int>(kRT / kW);  // row vectors per row tile
constexpr int64_t kChunkKeys = 256;              // keys per score chunk: St stays in L1
constexpr float kLog2e = 1.4426950408889634f;
// products per partial sum of a score's dot product over the head size: one serial sum
// over all of E=130 gave 2.4x plain PyTorch's float32 error at 2 query rows, where MKL's
// few-row product splits its sums
constexpr int64_t kScoreRun = 32;

// Keys per score tile and value columns per output tile when J row vectors are computed:
// as many accumulators as the registers hold beside the J row vectors and one broadcast.
constexpr int keys_per_tile(int J) {
#if defined(CPU_CAPABILITY_AVX512)
  return J == 1 ? 16 : 12;  // 32 registers
#elif defined(CPU_CAPABILITY_AVX2)
  return J == 1 ? 8 : J == 2 ? 6 : J == 3 ? 3 : 2;  // 16 registers
#else
  return 4;
#endif
}
constexpr int cols_per_tile(int J) {
#if defined(CPU_CAPABILITY_AVX512)
  return J == 1 ? 16 : 12;
#elif defined(CPU_CAPABILITY_AVX2)
  return J == 1 ? 8 : J == 2 ? 4 : J == 3 ? 3 : 2;
#else
  return 4;
#endif
}

// 2^x per lane; lanes below -100 (and -inf) give 0: relative to the row's maximum, which
// gives 1, such terms are below float resolution. NaN gives NaN (max(-100, x) returns its
// second operand x for NaN, and the unordered compare keeps the lane live). A degree-6 polynomial on the fraction in
// [-1/2, 1/2] (1.6 ulp, and exactly 1 at 0: a degree-5 fit's bias showed in sums over
// thousands of keys), no denormal in sight.
inline Vec exp2_lanes(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-100.f), x);
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-100.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.534581243e-4f), f, _mm512_set1_ps(1.339993090e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489072e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264625e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = _mm256_max_ps(_mm256_set1_ps(-100.f), x);
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-100.f), _CMP_NLT_UQ);
  const __m256 n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(v, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.534581243e-4f), f, _mm256_set1_ps(1.339993090e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489072e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264625e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471825e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
#else
  float tmp[kW];
  x.store(tmp);
  for (int64_t u = 0; u < kW; ++u) tmp[u] = tmp[u] < -100.f ? 0.f : std::exp2(tmp[u]);
  return Vec::loadu(tmp);
#endif
}

// f(std::integral_constant<int, n>) for a run-time n in [1, N]: tile shapes and tails.
template <int N, typename F>
void with_count(int64_t n, const F& f) {
  if constexpr (N > 0) {
    if (n == N) f(std::integral_constant<int, N>{});
    else with_count<N - 1>(n, f);
  }
}

// What a score tile applies while its scores are in registers (positions are relative to
// the chunk's first key): ALiBi's -slope |pos - key| and the rows' key spans [lo, hi).
struct TileTerms {
  bool spans = false, alibi = false, cap = false;
  Vec cap_by{0.f}, cap_over{0.f};  // the soft-cap in log2 units, and its inverse
  int64_t inner_lo = 0, inner_hi = 0;  // keys inside every row's span: no mask needed
  Vec lo[kNV], hi[kNV], pos[kNV];
  Vec slope{0.f};
  Vec scale{0.f};  // scale * log2(e): the scores' factor, applied to each dot product
};

// The broadcast products the forward's tiles (query rows in the vector lanes) and the
// decoding kernel's P V (value columns in the lanes) are made of:
// acc[i][j] = sum over t < n of a[t * step + j * kW ..][lanes] * b[i * bi + t * bt], for J
// vectors of the panel a (`step` floats per step t; `lanes` < kW: one partial vector, the
// rest 0) and I broadcast columns of b. With `run` > 0 each `run` steps are summed from 0
// and the partial sums added, so no sum runs serially over more than `run` products.
template <int I, int J>
inline __attribute__((always_inline)) void lane_run(const float* a, int64_t t0, int64_t t1,
                                                    const float* b, int64_t bi, int64_t bt,
                                                    Vec (&acc)[I][J], int64_t step, int lanes) {
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[i][j] = Vec(0.f);
  for (int64_t t = t0; t < t1; ++t) {
    Vec av[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) av[j] = Vec::loadu(a + t * step + j * kW, lanes);
#pragma GCC unroll 16
    for (int i = 0; i < I; ++i) {
      const Vec bv(b[i * bi + t * bt]);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc[i][j] = fma_once(av[j], bv, acc[i][j]);
    }
  }
}

template <int I, int J>
inline __attribute__((always_inline)) void lane_products(const float* a, int64_t n,
                                                         const float* b, int64_t bi,
                                                         int64_t bt, Vec (&acc)[I][J],
                                                         int64_t step = kRT, int lanes = kW,
                                                         int64_t run = 0) {
  if (run <= 0 || n <= run) return lane_run<I, J>(a, 0, n, b, bi, bt, acc, step, lanes);
  Vec total[I][J];
  lane_run<I, J>(a, 0, run, b, bi, bt, total, step, lanes);
  for (int64_t t = run; t < n; t += run) {
    lane_run<I, J>(a, t, std::min(n, t + run), b, bi, bt, acc, step, lanes);
#pragma GCC unroll 16
    for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) total[i][j] = total[i][j] + acc[i][j];
  }
#pragma GCC unroll 16
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[i][j] = total[i][j];
}

// St[c + i][vectors j0 .. j0 + J) for keys c .. c + RK of the chunk (rows of `k`, E apart),
// from the transposed queries qt (E x kRT); raises the running maximum mx.
template <int RK, int J>
void score_tile(const float* qt, const float* k, int64_t E, int64_t c, int j0, float* st,
                const TileTerms& tt, Vec* mx) {
  Vec acc[RK][J];
  lane_products<RK, J>(qt + j0 * kW, E, k, E, 1, acc, kRT, kW, kScoreRun);  // Q k_i
  const bool masked = tt.spans && (c < tt.inner_lo || c + RK > tt.inner_hi);
#pragma GCC unroll 16
  for (int i = 0; i < RK; ++i) {
    const Vec key(static_cast<float>(c + i));
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      Vec s = acc[i][j] * tt.scale;
      if (tt.cap) s = (s * tt.cap_over).tanh() * tt.cap_by;  // log2 units: cap * log2(e)
      if (tt.alibi) s = at::vec::fmadd(tt.slope, (tt.pos[j0 + j] - key).abs(), s);
      if (masked)
        s = Vec::blendv(Vec(kNegInf), s, (key >= tt.lo[j0 + j]) & (key < tt.hi[j0 + j]));
      mx[j0 + j] = at::vec::clamp_min(s, mx[j0 + j]);  // a NaN score reaches p all the same
      s.store(st + (c + i) * kRT + (j0 + j) * kW);
    }
  }
}

// acc[ev][vectors j0 .. j0 + J) += P^T V over n keys, for EB value columns: P^T = st (n rows
// of kRT), V = v (n rows, ldv apart). The sum starts from 0 and is added last, so no sum
// runs serially over more than a chunk's keys.
template <int EB, int J>
void value_tile(const float* st, int64_t n, const float* v, int64_t ldv, int j0, float* acc) {
  Vec o[EB][J];
  lane_products<EB, J>(st + j0 * kW, n, v, 1, ldv, o);  // o[i] = P^T v[:, i], rows in lanes
#pragma GCC unroll 16
  for (int i = 0; i < EB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      float* a = acc + i * kRT + (j0 + j) * kW;
      (Vec::loadu(a) + o[i][j]).store(a);
    }
}

// dst (n x m, leading dim ldd) = src (m x n, leading dim lds) transposed, by vector blocks
// (the last rows, fewer than a vector, by AVX-512's masked blocks where it has them).
void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t m,
                     int64_t n) {
  int64_t i = 0;
  for (; i + kW <= m; i += kW) {
    int64_t j = 0;
    for (; j + kW <= n; j += kW)
      at::vec::transpose_mxn<float, kW, kW>(src + i * lds + j, lds, dst + j * ldd + i, ldd);
    for (; j < n; ++j)
      for (int64_t u = i; u < i + kW; ++u) dst[j * ldd + u] = src[u * lds + j];
  }
  if (i == m) return;
#if defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float>(src + i * lds, lds, dst + i, ldd, static_cast<int>(m - i),
                                static_cast<int>(n));
#else
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// Cache lines wanted soon (the next row tile's queries and new keys and values, this tile's
// output rows before they are written), fetched a few per step between register tiles: the
// fetches overlap the arithmetic instead of stalling it at the next tile's start.
struct Ahead {
  struct Range {
    const char* p;
    int64_t lines;
    bool write;
  };
  Range r[4];
  int n = 0, i = 0;
  int64_t done = 0;
  void add(const void* p, int64_t bytes, bool write) {
    if (bytes > 0 && n < 4) r[n++] = {static_cast<const char*>(p), (bytes + 63) / 64, write};
  }
  void step() {  // two lines: fewer than the core's line fill buffers
    for (int s = 0; s < 2 && i < n; ++s) {
      const char* line = r[i].p + 64 * done;
      if (r[i].write) __builtin_prefetch(line, 1, 3);
      else __builtin_prefetch(line, 0, 2);
      if (++done == r[i].lines) ++i, done = 0;
    }
  }
};

// Per-thread scratch of the forward, 64-byte aligned: transposed queries, a score chunk,
// the transposed output accumulator.
struct TileScratch {
  std::vector<float> buf, sw;  // sw: the row tile's scores (rows of keys), for weights
  float *qt, *st, *acc;
  TileScratch(int64_t e, int64_t ev) : buf((e + kChunkKeys + ev) * kRT + 16) {
    float* p = buf.data();
    p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(float);
    qt = p;
    st = qt + e * kRT;
    acc = st + kChunkKeys * kRT;
  }
};

// The partial tiles' mask on St (keys [c0, c0 + n), rows [a, a + T) of block blk).
void mask_tiles(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                int64_t c0, int64_t n, float* st) {
  const int64_t* bl = P.blocks + 4 * blk;
  const int64_t r0 = bl[0], k0 = bl[2];
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t j_end = std::min(P.ntile, (c0 + n - k0 + P.bs - 1) / P.bs);
  for (int64_t j = (c0 - k0) / P.bs; j < j_end; ++j) {
    const int64_t t = P.tiles[blk * P.ntile + j];
    if (t < 0) continue;
    const int64_t lo = std::max(c0, k0 + j * P.bs), hi = std::min(c0 + n, k0 + (j + 1) * P.bs);
    const bool* tile = P.allowed + ((mb * P.mH + mh) * P.nP + t) * P.bs * P.bs;
    for (int64_t u = lo; u < hi; ++u) {
      const bool* ok = tile + (a - r0) * P.bs + (u - k0 - j * P.bs);
      float* s = st + (u - c0) * kRT;
      for (int64_t i = 0; i < T; ++i) s[i] = ok[i * P.bs] ? s[i] : kNegInf;
    }
  }
}

// A run of a chunk's keys [c0, c1) over which the row vectors j0 .. j0 + nv hold every key
// any row of the tile may see.
struct Segment {
  int64_t c0, c1;
  int j0, nv;
};

// The chunk's keys [0, n) cut where the set of row vectors with keys changes, from each
// vector's key range [vlo, vhi) (rows' spans, relative to the chunk); returns the count.
int segments(const int64_t* vlo, const int64_t* vhi, int64_t n, Segment* out) {
  int64_t cut[2 * kNV + 2];
  int nc = 0;
  cut[nc++] = 0;
  cut[nc++] = n;
  for (int j = 0; j < kNV; ++j)
    if (vlo[j] < vhi[j]) cut[nc++] = vlo[j], cut[nc++] = vhi[j];
  std::sort(cut, cut + nc);
  int count = 0;
  for (int u = 0; u + 1 < nc; ++u) {
    const int64_t c0 = cut[u], c1 = cut[u + 1];
    if (c0 == c1) continue;
    int j0 = kNV, j1 = -1;
    for (int j = 0; j < kNV; ++j)
      if (vlo[j] <= c0 && c1 <= vhi[j]) j0 = std::min(j0, j), j1 = j;
    if (j1 < 0) continue;  // no row of the tile sees these keys
    if (count > 0 && out[count - 1].c1 == c0 && out[count - 1].j0 == j0 &&
        out[count - 1].nv == j1 - j0 + 1)
      out[count - 1].c1 = c1;
    else
      out[count++] = {c0, c1, j0, j1 - j0 + 1};
  }
  return count;
}

// St for the keys of one segment: score tiles of its vectors, then the tail.
template <int J>
void score_segment(const float* qt, const float* kc, int64_t E, const Segment& s, float* st,
                   const TileTerms& tt, Vec* mx, Ahead& ahead) {
  constexpr int RK = keys_per_tile(J);
  int64_t c = s.c0;
  for (; c + RK <= s.c1; c += RK) {
    score_tile<RK, J>(qt, kc + c * E, E, c, s.j0, st, tt, mx);
    ahead.step();
  }
  with_count<RK - 1>(s.c1 - c, [&](auto rk) {
    score_tile<decltype(rk)::value, J>(qt, kc + c * E, E, c, s.j0, st, tt, mx);
  });
}

// acc += P^T V for the keys of one segment, all value columns.
template <int J>
void value_segment(const float* st, const float* vc, int64_t Ev, const Segment& s, float* acc) {
  constexpr int EB = cols_per_tile(J);
  const float* p = st + s.c0 * kRT;
  const float* v = vc + s.c0 * Ev;
  const int64_t n = s.c1 - s.c0;
  int64_t ev = 0;
  for (; ev + EB <= Ev; ev += EB) value_tile<EB, J>(p, n, v + ev, Ev, s.j0, acc + ev * kRT);
  with_count<EB - 1>(Ev - ev, [&](auto eb) {
    value_tile<decltype(eb)::value, J>(p, n, v + ev, Ev, s.j0, acc + ev * kRT);
  });
}

// Whether row r (of block blk) sees key c.
bool sees(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t r, int64_t c) {
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq + r);
  if (c < rs[0] || c >= rs[1]) return false;
  if (P.interval) return true;
  const int64_t* bl = P.blocks + 4 * blk;
  if (c < bl[2] || c >= bl[3]) return false;
  const int64_t j = (c - bl[2]) / P.bs, t = P.tiles[blk * P.ntile + j];
  if (t < 0) return true;
  return P.allowed[(((mb * P.mH + mh) * P.nP + t) * P.bs + (r - bl[0])) * P.bs +
                   (c - bl[2] - j * P.bs)];
}

// Row r's output (Ev floats) in double from the keys it sees, NaN only from the values it
// reads: the forward's path for rows a NaN in V reached (rare; not fast).
void exact_row(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t r, float* out) {
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq + r);
  const int64_t lo = rs[0], hi = std::max(rs[0], rs[1]);
  std::vector<double> s(static_cast<size_t>(hi - lo)), o(static_cast<size_t>(P.Ev), 0.0);
  const float* q = P.qrow(b, h, r);
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t c = lo; c < hi; ++c) {
    double x = -std::numeric_limits<double>::infinity();
    if (sees(P, b, h, blk, r, c)) {
      const float* k = P.krow(b, h, c);
      x = 0.0;
      for (int64_t e = 0; e < P.E; ++e) x += static_cast<double>(q[e]) * k[e];
      x *= P.scale;
      if (P.softcap > 0.f) x = P.softcap * std::tanh(x / P.softcap);
      if (P.slopes != nullptr)
        x -= static_cast<double>(P.slopes[h]) * std::fabs(static_cast<double>(r + P.Lk - P.Lq - c));
    }
    s[c - lo] = x;
    mx = std::max(mx, x);
  }
  double total = 0.0;
  if (mx != -std::numeric_limits<double>::infinity()) {
    for (int64_t c = lo; c < hi; ++c) {
      if (s[c - lo] == -std::numeric_limits<double>::infinity()) continue;  // unseen: skipped
      const double p = std::exp(s[c - lo] - mx);
      total += p;
      const float* v = P.vrow(b, h, c);
      for (int64_t e = 0; e < P.Ev; ++e) o[e] += p * v[e];
    }
  }
  for (int64_t e = 0; e < P.Ev; ++e) out[e] = total > 0.0 ? static_cast<float>(o[e] / total) : 0.f;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// A streaming store of one vector to p (aligned to a whole vector).
inline void stream(float* p, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, x);
#else
  _mm256_stream_ps(p, x);
#endif
}
#endif

// p[0, n) = 0 (nothing for n <= 0), by streaming stores where whole aligned vectors fit:
// no line is read first. (Reading each vector and writing only those that hold any bit was
// slower: 28.3 against 26.0 ms for a layer's weights at 4096 tokens, AVX2 forced.)
void stream_zero(float* p, int64_t n) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t head = (kW - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) / 4 % kW)) % kW;
  for (; j < std::min(head, n); ++j) p[j] = 0.f;
  for (; j + kW <= n; j += kW) stream(p + j, Vec(0.f));
#endif
  for (; j < n; ++j) p[j] = 0.f;
}

// The pages of a reused (lazily zeroed) result that an earlier user wrote: ascending page
// indices, `page` floats each, counted from the result's first float. The forward that
// writes weights sets them to 0 where it writes no weight, row by row in its own tasks,
// instead of a separate pass over all of them first (13.7 ms a layer at 4096 tokens, AVX2
// forced; in the tasks they cost 9 more than the weights alone. Zeroing a few lines between
// register tiles instead, so that the stores would overlap the arithmetic, was slower).
struct DirtyPages {
  const int64_t* pages = nullptr;
  int64_t n = 0, page = 1;

  // w[s, e) = 0 where it lies in a dirty page, except w[keep0, keep1), which the caller
  // writes (empty when keep1 <= keep0).
  void clear(float* w, int64_t s, int64_t e, int64_t keep0, int64_t keep1) const {
    if (keep1 <= keep0) keep0 = keep1 = s;
    for (const int64_t* p = std::lower_bound(pages, pages + n, s / page);
         p != pages + n && *p * page < e; ++p) {
      const int64_t c0 = std::max(s, *p * page), c1 = std::min(e, (*p + 1) * page);
      stream_zero(w + c0, std::min(c1, keep0) - c0);
      stream_zero(w + std::max(c0, keep1), c1 - std::max(c0, keep1));
    }
  }
};

// The DirtyPages of an op's optional `dirty` argument (none: nothing to zero).
DirtyPages dirty_pages(const c10::optional<at::Tensor>& dirty, int64_t page) {
  if (!dirty.has_value() || dirty->numel() == 0) return {};
  TORCH_CHECK(dirty->scalar_type() == at::kLong && dirty->is_contiguous() && page > 0,
              "attnlab: dirty pages are contiguous int64, page > 0");
  return {dirty->data_ptr<int64_t>(), dirty->numel(), page};
}

// The floats store_scaled writes for dst[0, m) inside the row [first, last), relative to
// dst: [0, m), widened to whole aligned vectors (with zeros, what w holds outside the span)
// at the first and last vector where those stay inside the row, which no other task
// writes. p0 < 0: the first vector is widened; p1 > m: the last one (or the first, when it
// holds the whole span).
std::pair<int64_t, int64_t> scaled_extent(const float* dst, int64_t m, const float* first,
                                          const float* last) {
  int64_t p0 = 0, p1 = m;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % (kW * 4) / 4);
  int64_t j = 0;
  if (mis > 0) {
    j = std::min(kW - mis, m);
    if (dst - mis >= first && dst - mis + kW <= last) p0 = -mis, p1 = std::max(p1, kW - mis);
  }
  j += (m - j) / kW * kW;
  if (j < m && dst + j + kW <= last) p1 = j + kW;
#else
  (void)first, (void)last;
#endif
  return {p0, p1};
}

// dst[0, m) = row[0, m) * inv by streaming stores: w is far larger than the caches and is
// not read here, so its lines need not be fetched before they are written. `ext` is
// scaled_extent(dst, m, ...): which of the first and last vectors are widened.
void store_scaled(const float* row, float* dst, int64_t m, const Vec& inv,
                  std::pair<int64_t, int64_t> ext) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  alignas(64) float tmp[2 * kW];
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % (kW * 4) / 4);
  if (mis > 0) {
    const int64_t c = std::min(kW - mis, m);
    if (ext.first < 0) {
      Vec(0.f).store(tmp);
      Vec(0.f).store(tmp + kW);
      (Vec::loadu(row, static_cast<int>(c)) * inv).store(tmp + mis, static_cast<int>(c));
      stream(dst - mis, Vec::loadu(tmp));
    } else {
      (Vec::loadu(row, static_cast<int>(c)) * inv).store(dst, static_cast<int>(c));
    }
    j = c;
  }
  for (; j + kW <= m; j += kW) stream(dst + j, Vec::loadu(row + j) * inv);
  if (j < m && ext.second > m) {  // (j < m: the first vector did not hold the whole span)
    Vec(0.f).store(tmp);
    (Vec::loadu(row + j, static_cast<int>(m - j)) * inv).store(tmp, static_cast<int>(m - j));
    stream(dst + j, Vec::loadu(tmp));
    return;
  }
#else
  (void)ext;
  for (; j + kW <= m; j += kW) (Vec::loadu(row + j) * inv).store(dst + j);
#endif
  if (j < m)
    (Vec::loadu(row + j, static_cast<int>(m - j)) * inv).store(dst + j, static_cast<int>(m - j));
}

// s[0, n) = 2^(s - shift) in place (NaN stays NaN); returns their sum, the lanes' partial
// sums added in double.
float exp2_sum(float* s, int64_t n, float shift) {
  const Vec vs(shift);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec e = exp2_lanes(Vec::loadu(s + j) - vs);
    e.store(s + j);
    acc = acc + e;
  }
  if (j < n) {
    const int c = static_cast<int>(n - j);
    const Vec e = exp2_lanes(Vec::loadu(s + j, c) - vs);
    e.store(s + j, c);
    acc = acc + Vec::set(Vec(0.f), e, c);
  }
  float tmp[kW];
  acc.store(tmp);
  double total = 0.0;
  for (int64_t u = 0; u < kW; ++u) total += tmp[u];
  return static_cast<float>(total);
}

// Where the forward also writes the weights (B, Hq, Lq, Lk) of an interval mask: w is zero
// but for the dirty pages of a reused result (see DirtyPages).
struct WeightsOut {
  float* w;
  DirtyPages dirty;
};

// Rows of w that see no key (rows of no block, or all rows of a row tile without keys): 0.
void clear_weight_rows(const WeightsOut& wo, int64_t Lk, int64_t row0, int64_t rows) {
  wo.dirty.clear(wo.w, row0 * Lk, (row0 + rows) * Lk, 0, 0);
}

// The weights of the row tile's rows [a, a + T) (head h), from their scores sw (rows of ldw
// floats, key lo first, log2 units as in St) and maxima m and sums l (log2 units): each
// row's span gets 2^(s - m - log2 l), normalized by its own sum (a softmax exact to its
// rounding); rows without a key stay 0, rows with a NaN score (lse NaN) are NaN throughout,
// as fp64's softmax gives.
void store_weights(const Problem& P, const WeightsOut& wo, int64_t b, int64_t h, int64_t a,
                   int64_t T, int64_t lo, float* sw, int64_t ldw, const float* m, const float* l,
                   const float* ls) {
  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq + a);
  for (int64_t r = 0; r < T; ++r) {
    const int64_t row = ((b * P.Hq + h) * P.Lq + a + r) * P.Lk;
    float* wr = wo.w + row;
    if (std::isnan(ls[r])) {
      std::fill(wr, wr + P.Lk, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const int64_t sa = rs[2 * r], sz = rs[2 * r + 1];
    if (sa >= sz || ls[r] == kNegInf) {
      wo.dirty.clear(wo.w, row, row + P.Lk, 0, 0);
      continue;
    }
    // the dirty pages' zeros end where the stores begin, on a whole vector: a partial one
    // there (scalar stores into a line also streamed) cost 5 of 48 ms a layer, AVX2 forced
    const auto ext = scaled_extent(wr + sa, sz - sa, wr, wr + P.Lk);
    wo.dirty.clear(wo.w, row, row + P.Lk, row + sa + ext.first, row + sa + ext.second);
    float* s = sw + r * ldw + (sa - lo);
    const float total = exp2_sum(s, sz - sa, m[r] + std::log2(l[r]));
    store_scaled(s, wr + sa, sz - sa, Vec(1.f / total), ext);
  }
}

// One row tile: rows [a, a + T) (T <= kRT) of block blk, batch b, query head h. Writes
// their output and logsumexp (0 and -inf for rows without a key); returns the number of
// scores it computed.
int64_t forward_tile(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                     float* out, float* lse, TileScratch& w, const WeightsOut* wo) {
  float* o = out + ((b * P.Hq + h) * P.Lq + a) * P.Ev;
  float* ls = lse + (b * P.Hq + h) * P.Lq + a;
  const auto [lo, hi] = group_span(P, b, h, a, a + T);
  if (lo >= hi) {  // no key for any row
    std::fill(o, o + T * P.Ev, 0.f);
    std::fill(ls, ls + T, kNegInf);
    if (wo != nullptr) clear_weight_rows(*wo, P.Lk, (b * P.Hq + h) * P.Lq + a, T);
    return 0;
  }
  // the rows' scores for the weights: rows of ldw floats (not a multiple of 256: such rows
  // would share cache sets)
  int64_t ldw = (hi - lo + kW - 1) / kW * kW;
  if (ldw % 256 == 0) ldw += kW;
  if (wo != nullptr) w.sw.resize(static_cast<size_t>(kRT * ldw));
  const int64_t E = P.E, Ev = P.Ev;
  Ahead ahead;  // the next row tile (of this head): its queries, its keys and values past hi
  const int64_t na = std::min(P.Lq, a + T), nz = std::min(P.Lq, a + T + kRT);
  const int64_t kz = std::min(P.Lk, hi + kRT);
  ahead.add(P.qrow(b, h, na), (nz - na) * E * 4, false);
  ahead.add(P.krow(b, h, std::min(hi, kz)), (kz - hi) * E * 4, false);
  ahead.add(P.vrow(b, h, std::min(hi, kz)), (kz - hi) * Ev * 4, false);

  if (T < kRT) std::fill(w.qt, w.qt + E * kRT, 0.f);  // lanes past T: finite, never read
  transpose_block(P.qrow(b, h, a), E, w.qt, kRT, T, E);
  std::fill(w.acc, w.acc + Ev * kRT, 0.f);

  const int64_t mb = P.mB == 1 ? 0 : b, mh = P.mH == 1 ? 0 : h;
  const int64_t* rs = P.spans + 2 * ((mb * P.mH + mh) * P.Lq + a);
  TileTerms tt;
  tt.scale = Vec(P.scale * kLog2e);
  tt.spans = P.interval;
  tt.alibi = P.slopes != nullptr;
  if (tt.alibi) tt.slope = Vec(-P.slopes[h] * kLog2e);
  tt.cap = P.softcap > 0.f;
  if (tt.cap) tt.cap_by = Vec(P.softcap * kLog2e), tt.cap_over = Vec(1.f / (P.softcap * kLog2e));
  Vec vm[kNV], vl[kNV];  // per row: running maximum (log2 units) and sum
  for (int j = 0; j < kNV; ++j) vm[j] = Vec(kNegInf), vl[j] = Vec(0.f);
  const int64_t nchunk = (hi - lo + kChunkKeys - 1) / kChunkKeys;
  const int64_t chunk = (hi - lo + nchunk - 1) / nchunk;
  for (int64_t c0 = lo; c0 < hi; c0 += chunk) {
    const int64_t n = std::min(chunk, hi - c0);
    if (c0 + n >= hi) ahead.add(o, T * Ev * 4, true);  // written after this chunk
    // lane terms relative to the chunk's first key; lanes past T allow every key
    float lo_r[kRT], hi_r[kRT], pos[kRT];
    int64_t vlo[kNV], vhi[kNV];
    std::fill(vlo, vlo + kNV, n);
    std::fill(vhi, vhi + kNV, 0);
    tt.inner_lo = 0;
    tt.inner_hi = n;
    for (int64_t r = 0; r < kRT; ++r) {
      const bool row = r < T;
      const int64_t rl = row ? std::clamp<int64_t>(rs[2 * r] - c0, -1, n + 1) : -1;
      const int64_t rh = row ? std::clamp<int64_t>(rs[2 * r + 1] - c0, -1, n + 1) : n + 1;
      lo_r[r] = static_cast<float>(rl);
      hi_r[r] = static_cast<float>(rh);
      pos[r] = static_cast<float>(a + r + P.Lk - P.Lq - c0);
      if (!row) continue;
      tt.inner_lo = std::max(tt.inner_lo, rl);
      tt.inner_hi = std::min(tt.inner_hi, rh);
      const int64_t l0 = std::max<int64_t>(rl, 0), h0 = std::min(rh, n);
      if (l0 < h0) {
        vlo[r / kW] = std::min(vlo[r / kW], l0);
        vhi[r / kW] = std::max(vhi[r / kW], h0);
      }
    }
    for (int j = 0; j < kNV; ++j) {
      tt.lo[j] = Vec::loadu(lo_r + j * kW);
      tt.hi[j] = Vec::loadu(hi_r + j * kW);
      tt.pos[j] = Vec::loadu(pos + j * kW);
    }
    Segment seg[2 * kNV + 1];
    const int ns = segments(vlo, vhi, n, seg);

    Vec mx[kNV];
    for (int j = 0; j < kNV; ++j) mx[j] = Vec(kNegInf);
    const float* kc = P.krow(b, h, c0);
    for (int u = 0; u < ns; ++u)
      with_count<kNV>(seg[u].nv, [&](auto nv) {
        score_segment<decltype(nv)::value>(w.qt, kc, E, seg[u], w.st, tt, mx, ahead);
      });
    if (wo != nullptr)  // the rows' scores, for the weights (each row reads its span only)
      transpose_block(w.st, kRT, w.sw.data() + (c0 - lo), ldw, n, T);
    if (!P.interval) {  // the partial tiles' mask, then the maximum again
      mask_tiles(P, b, h, blk, a, T, c0, n, w.st);
      for (int j = 0; j < kNV; ++j) mx[j] = Vec(kNegInf);
      for (int u = 0; u < ns; ++u)
        for (int64_t c = seg[u].c0; c < seg[u].c1; ++c)
          for (int j = seg[u].j0; j < seg[u].j0 + seg[u].nv; ++j)
            mx[j] = at::vec::maximum(mx[j], Vec::loadu(w.st + c * kRT + j * kW));
    }

    Vec alpha[kNV], shift[kNV], sum[2][kNV];
    for (int j = 0; j < kNV; ++j) {  // online softmax, lane by lane
      const Vec nm = at::vec::maximum(vm[j], mx[j]);
      shift[j] = Vec::blendv(nm, Vec(0.f), nm == Vec(kNegInf));  // no key yet: p = 0
      alpha[j] = exp2_lanes(vm[j] - shift[j]);
      vm[j] = nm;
      sum[0][j] = sum[1][j] = Vec(0.f);
    }
    for (int u = 0; u < ns; ++u) {  // p = 2^(s - max), summed over alternate keys
      for (int64_t c = seg[u].c0; c < seg[u].c1; ++c) {
        ahead.step();
        for (int j = seg[u].j0; j < seg[u].j0 + seg[u].nv; ++j) {
          float* s = w.st + c * kRT + j * kW;
          const Vec p = exp2_lanes(Vec::loadu(s) - shift[j]);
          sum[c & 1][j] = sum[c & 1][j] + p;
          p.store(s);
        }
      }
    }
    for (int j = 0; j < kNV; ++j) vl[j] = vl[j] * alpha[j] + (sum[0][j] + sum[1][j]);
    if (c0 > lo)  // earlier chunks' sums, rescaled to this chunk's maximum
      for (int64_t e = 0; e < Ev; ++e)
        for (int j = 0; j < kNV; ++j)
          (Vec::loadu(w.acc + e * kRT + j * kW) * alpha[j]).store(w.acc + e * kRT + j * kW);
    const float* vc = P.vrow(b, h, c0);
    for (int u = 0; u < ns; ++u)
      with_count<kNV>(seg[u].nv, [&](auto nv) {
        value_segment<decltype(nv)::value>(w.st, vc, Ev, seg[u], w.acc);
      });
  }

  float m[kRT], l[kRT];
  Vec inv[kNV], nan[kNV];
  for (int j = 0; j < kNV; ++j) {  // rows without a key: l = 0, out 0
    vm[j].store(m + j * kW);
    vl[j].store(l + j * kW);
    inv[j] = Vec::blendv(Vec(1.f) / vl[j], Vec(0.f), vl[j] == Vec(0.f));
    nan[j] = Vec(0.f);
  }
  for (int64_t e = 0; e < Ev; ++e)
    for (int j = 0; j < kNV; ++j) {
      const Vec x = Vec::loadu(w.acc + e * kRT + j * kW) * inv[j];
      nan[j] = nan[j] | (x != x);
      x.store(w.acc + e * kRT + j * kW);
    }
  transpose_block(w.acc, kRT, o, Ev, Ev, T);
  for (int64_t r = 0; r < T; ++r)  // NaN scores (from Q or K) give l = NaN: lse NaN
    ls[r] = l[r] == 0.f ? kNegInf : m[r] + std::log2(l[r]);  // log2 units
  // A NaN output beside a finite sum came from V, and V is read by whole row vectors: a NaN
  // value reaches the rows that do not see its key too (0 * NaN), and rows without keys.
  // Those rows are computed again one by one, from the keys each row sees.
  float bad[kRT];
  for (int j = 0; j < kNV; ++j) (nan[j] & (vl[j] == vl[j])).store(bad + j * kW);
  for (int64_t r = 0; r < T; ++r)
    if (bad[r] != 0.f) exact_row(P, b, h, blk, a + r, o + r * Ev);
  if (wo != nullptr) store_weights(P, *wo, b, h, a, T, lo, w.sw.data(), ldw, m, l, ls);
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
                     bool interval, double softcap) {
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
  TORCH_CHECK(softcap >= 0.0, "softcap must be positive (0: none)");
  P.softcap = static_cast<float>(softcap);
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

// Map the pages of [p, p + bytes) in one call, instead of one page fault per 4 KiB on first
// touch (Linux 5.14+; elsewhere the pages fault in as usual). The worker that will write
// them calls it: the kernel zeroes them into that core's cache.
void populate(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t a = (begin + kPage - 1) & ~(kPage - 1), z = (begin + bytes) & ~(kPage - 1);
  if (z > a) madvise(reinterpret_cast<void*>(a), z - a, MADV_POPULATE_WRITE);
#endif
}

// The forward's large outputs come from a small pool of freed ones: a fresh buffer of tens
// of MiB is mapped by the allocator on each call (every page faulted in and zeroed by the
// system) and unmapped when freed, and those two cost about a tenth of a window forward at
// 16k rows. A freed output of at least kPoolMin bytes goes back to the pool, which keeps
// the most recently freed of them, at most kPoolBuffers and `limit` bytes in all (the
// limit is set from ATTNLAB_KERNEL_POOL_MB when the kernel loads, 0: no pool); a request
// takes one of exactly its size, or allocates. Outputs so made are not resizable. The pool's buffers
// stay resident between calls: in a model, through the layers' other work.
constexpr size_t kPoolMin = size_t{4} << 20, kPoolBytes = size_t{256} << 20;
constexpr size_t kPoolBuffers = 2;

struct OutputPool {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free;
  size_t held = 0, limit = kPoolBytes;

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < free.size(); ++i)
      if (free[i].first == bytes) {
        void* p = free[i].second;
        free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
        held -= bytes;
        return p;
      }
    return nullptr;
  }
  // Keeps p, the oldest buffers making room (a pool that kept the first two sizes it saw
  // held them for good and served no other size), or frees it if it alone passes limit.
  void give(void* p, size_t bytes) {
    std::vector<void*> drop{p};
    {
      std::lock_guard<std::mutex> lock(mu);
      if (bytes <= limit) {
        drop.clear();
        while (!free.empty() && (free.size() >= kPoolBuffers || held + bytes > limit)) {
          drop.push_back(free.front().second);
          held -= free.front().first;
          free.erase(free.begin());
        }
        free.emplace_back(bytes, p);
        held += bytes;
      }
    }
    for (void* d : drop) std::free(d);
  }
};

OutputPool& output_pool() {
  static OutputPool* pool = new OutputPool;  // never destroyed: outputs may outlive statics
  return *pool;
}

// The op output_pool(limit): sets the pool's limit in bytes (0: no pool; < 0: unchanged),
// frees the buffers it no longer allows, and returns the bytes the pool holds.
int64_t output_pool_op(int64_t limit) {
  OutputPool& pool = output_pool();
  std::vector<void*> drop;
  int64_t held = 0;
  {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (limit >= 0) pool.limit = static_cast<size_t>(limit);
    while (pool.held > pool.limit && !pool.free.empty()) {
      drop.push_back(pool.free.back().second);
      pool.held -= pool.free.back().first;
      pool.free.pop_back();
    }
    held = static_cast<int64_t>(pool.held);
  }
  for (void* p : drop) std::free(p);
  return held;
}

// at::empty(sizes) of float32 on the CPU, from the pool when large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t bytes = (static_cast<size_t>(numel) * sizeof(float) + 63) / 64 * 64;
  if (bytes < kPoolMin) return at::empty(sizes, options);
  void* p = output_pool().take(bytes);
  if (p == nullptr) p = std::aligned_alloc(64, bytes);
  if (p == nullptr) return at::empty(sizes, options);
  return at::from_blob(
      p, sizes, [bytes](void* q) { output_pool().give(q, bytes); }, options);
}

// (out, lse, number of scores computed); also the weights where wo is given.
std::tuple<at::Tensor, at::Tensor, int64_t> run_forward(const Problem& P, const at::Tensor& q,
                                                        int64_t group, const WeightsOut* wo) {
  // every row is written once by its task (rows of no block here), so no zeroing pass; the
  // tasks first-touch the output's pages in parallel
  at::Tensor out = pooled_empty({P.B, P.Hq, P.Lq, P.Ev}, q.options());
  at::Tensor lse = at::empty({P.B, P.Hq, P.Lq}, q.options());
  float* o = out.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  std::vector<char> covered(P.Lq, 0);
  for (int64_t blk = 0; blk < P.nblk; ++blk)
    std::fill(covered.begin() + P.blocks[4 * blk], covered.begin() + P.blocks[4 * blk + 1], 1);
  for (int64_t r = 0; r < P.Lq; ++r) {
    if (covered[r]) continue;
    for (int64_t bh = 0; bh < P.B * P.Hq; ++bh) {
      std::fill(o + (bh * P.Lq + r) * P.Ev, o + (bh * P.Lq + r + 1) * P.Ev, 0.f);
      ls[bh * P.Lq + r] = kNegInf;
      if (wo != nullptr) clear_weight_rows(*wo, P.Lk, bh * P.Lq + r, 1);
    }
  }
  const int64_t ng = groups_of(P, group);
  std::atomic<int64_t> work{0};
  dynamic_for(P.B * P.Hq * P.nblk * ng, 16, [&](int64_t, int64_t begin, int64_t end) {
    TileScratch w(P.E, P.Ev);
    int64_t done = 0;
    {  // the output rows of these tasks (consecutive tasks: consecutive rows)
      auto row = [&](int64_t t, bool last) {
        const int64_t g = t % ng, blk = (t / ng) % P.nblk, bh = t / ng / P.nblk;
        const int64_t* bl = P.blocks + 4 * blk;
        const int64_t a = std::min(bl[0] + g * group, bl[1]);
        return bh * P.Lq + (last ? std::min(a + group, bl[1]) : a);
      };
      const int64_t r0 = row(begin, false), r1 = row(end - 1, true);
      if (r1 > r0) populate(o + r0 * P.Ev, (r1 - r0) * P.Ev * 4);
    }
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t % ng, blk = (t / ng) % P.nblk, bh = t / ng / P.nblk;
      const int64_t* bl = P.blocks + 4 * blk;
      const int64_t a = bl[0] + g * group, z = std::min(a + group, bl[1]);
      for (int64_t r = a; r < z; r += kRT)
        done += forward_tile(P, bh / P.Hq, bh % P.Hq, blk, r, std::min(kRT, z - r), o, ls, w, wo);
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (wo != nullptr) _mm_sfence();  // the weights' streaming stores are visible
#endif
    work += done;
  });
  return {out, lse, work.load()};
}

std::tuple<at::Tensor, at::Tensor, int64_t> blocked_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& blocks,
    const at::Tensor& tiles, const at::Tensor& allowed, const at::Tensor& spans,
    const c10::optional<at::Tensor>& slopes, int64_t bs, bool interval, double softcap,
    double scale, int64_t group) {
  Problem P =
      make_problem(q, k, v, blocks, tiles, allowed, spans, slopes, bs, scale, interval, softcap);
  return run_forward(P, q, group, nullptr);
}

// The forward of an interval mask that also writes every weight into w (B, Hq, Lq, Lk),
// zero but for the `dirty` pages (of `page` floats) of a reused result: from the scores the
// forward computes anyway, so no second pass over Q K^T.
std::tuple<at::Tensor, at::Tensor, int64_t> forward_weights(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& blocks,
    const at::Tensor& tiles, const at::Tensor& allowed, const at::Tensor& spans,
    const c10::optional<at::Tensor>& slopes, int64_t bs, bool interval, double softcap,
    double scale, int64_t group, at::Tensor w, const c10::optional<at::Tensor>& dirty,
    int64_t page) {
  TORCH_CHECK(interval, "attnlab forward_weights: interval masks only");
  Problem P =
      make_problem(q, k, v, blocks, tiles, allowed, spans, slopes, bs, scale, interval, softcap);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() &&
                  w.sizes() == at::IntArrayRef({P.B, P.Hq, P.Lq, P.Lk}),
              "attnlab forward_weights: w must be contiguous float32 (B, Hq, Lq, Lk)");
  WeightsOut wo{w.data_ptr<float>(), dirty_pages(dirty, page)};
  return run_forward(P, q, group, &wo);
}

// ---- Decoding: a few query rows against a long key/value cache ---------------------------
// The G = Hq / Hk query heads of a key/value head, times their Lq rows, are the R rows of
// one product, so each key and value is read once for all of them (torch's SDPA reads them
// once per query head). The keys are cut into parts run in parallel, each with its own
// online softmax over chunks of kDecodeChunk keys; the parts' partial results are merged at
// the end. A mask, if any, is one key interval per batch and query row (its row bounds,
// `lo` and `hi`): only the keys of the rows' intervals are read, so a sliding
// window costs its width, not the cache's length. Scores are in log2 units, as in the
// forward. A row without keys gives 0.
constexpr int64_t kDecodeChunk = 256;  // keys per score chunk
constexpr int64_t kDecodePart = 512;   // fewest keys per part, where there are more keys

// Row r of one key/value head's rows is query head hk * G + r / Lq, query row r % Lq.
// The first or last key of each query row: (1 or B, Lq) int64, any strides.
struct RowKeys {
  const int64_t* p = nullptr;
  int64_t sb = 0, sr = 0;
  RowKeys() = default;
  RowKeys(const at::Tensor& t, int64_t B, int64_t Lq, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(1) == Lq &&
                    (t.size(0) == 1 || t.size(0) == B),
                "attnlab decode: ", name, " must be int64 (1 or B, Lq)");
    p = t.data_ptr<int64_t>();
    sb = t.size(0) == 1 ? 0 : t.stride(0);
    sr = t.stride(1);
  }
  int64_t at(int64_t b, int64_t i) const { return p[b * sb + i * sr]; }
};

struct DecodeShape {
  int64_t B, Hk, G, Lq, Lk, E, Ev, R, parts;
  float cap2 = 0.f;  // the soft-cap in log2 units (0: none)
  float scale2 = 0.f;  // scale * log2(e): each dot product's factor (as the forward's tiles)
  RowKeys lo, hi;  // each query row's first and last key (inclusive), or none: every key
  // [lo, hi + 1) of row r of batch b, clamped to the keys (empty when hi < lo)
  std::pair<int64_t, int64_t> interval(int64_t b, int64_t r) const {
    if (lo.p == nullptr) return {0, Lk};
    const int64_t i = r % Lq;
    return {std::max<int64_t>(0, lo.at(b, i)), std::min(Lk, hi.at(b, i) + 1)};
  }
};

// Lane u of the result = the sum of the lanes of v[u], u < kW.
inline Vec lane_sums(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  auto tree8 = [](const __m256* w) {  // 8 vectors of 8 lanes -> their 8 sums
    const __m256 t0 = _mm256_hadd_ps(w[0], w[1]), t1 = _mm256_hadd_ps(w[2], w[3]);
    const __m256 t2 = _mm256_hadd_ps(w[4], w[5]), t3 = _mm256_hadd_ps(w[6], w[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
  };
#endif
#if defined(CPU_CAPABILITY_AVX512)
  __m256 w[16];
  for (int u = 0; u < 16; ++u) {
    const __m512 x = v[u];
    w[u] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  }
  return _mm512_insertf32x8(_mm512_castps256_ps512(tree8(w)), tree8(w + 8), 1);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 w[8];
  for (int u = 0; u < 8; ++u) w[u] = v[u];
  return tree8(w);
#else
  float out[kW], tmp[kW];
  for (int64_t u = 0; u < kW; ++u) {
    v[u].store(tmp);
    out[u] = 0.f;
    for (int64_t e = 0; e < kW; ++e) out[u] += tmp[e];
  }
  return Vec::loadu(out);
#endif
}

// Scores of one row q against the kW keys at kp (leading dim ldk): per key one vector of
// products (E in the lanes), then the kW vectors' lane sums at once. `keys` < kW: a tail.
template <bool Full>
inline Vec row_key_scores(const float* q, int64_t E, const float* kp, int64_t ldk,
                          int64_t keys) {
  Vec acc[kW];
  for (int64_t u = 0; u < kW; ++u) acc[u] = Vec(0.f);
  int64_t e = 0;
  for (; e + kW <= E; e += kW) {
    const Vec qv = Vec::loadu(q + e);
    for (int64_t u = 0; u < (Full ? kW : keys); ++u)
      acc[u] = fma_once(qv, Vec::loadu(kp + u * ldk + e), acc[u]);
  }
  if (e < E) {
    const int c = static_cast<int>(E - e);
    const Vec qv = Vec::loadu(q + e, c);
    for (int64_t u = 0; u < (Full ? kW : keys); ++u)
      acc[u] = fma_once(qv, Vec::loadu(kp + u * ldk + e, c), acc[u]);
  }
  return lane_sums(acc);
}

// p (R x n, leading dim kDecodeChunk) = scale2 Q K^T for the rows qr (R x E) and keys kp
// (n x E, leading dim ldk), read in place.
void decode_scores(const float* qr, int64_t R, int64_t E, const float* kp, int64_t ldk,
                   int64_t n, float scale2, float* p) {
  const Vec by(scale2);
  int64_t j = 0;
  for (; j + kW <= n; j += kW)  // the kW keys stay in L1 for all the rows
    for (int64_t r = 0; r < R; ++r)
      (row_key_scores<true>(qr + r * E, E, kp + j * ldk, ldk, kW) * by)
          .store(p + r * kDecodeChunk + j);
  if (j < n)
    for (int64_t r = 0; r < R; ++r)
      (row_key_scores<false>(qr + r * E, E, kp + j * ldk, ldk, n - j) * by)
          .store(p + r * kDecodeChunk + j, static_cast<int>(n - j));
}

// acc (R x Ev) += P (R x n, leading dim kDecodeChunk) V (n x Ev, leading dim ldv) for rows
// [r0, r0 + RN) and the CV value vectors from column c0 (`cols` < kW: one partial vector):
// the accumulators stay in registers over the n keys, each V vector used by RN rows.
template <int RN, int CV>
void pv_tile(const float* p, int64_t r0, int64_t n, const float* v, int64_t ldv, int64_t c0,
             int cols, float* acc, int64_t Ev) {
  Vec a[RN][CV];  // this chunk's sums, added to acc at the end: shorter rounding chains
  lane_products<RN, CV>(v + c0, n, p + r0 * kDecodeChunk, kDecodeChunk, 1, a, ldv, cols);
  for (int i = 0; i < RN; ++i)
    for (int c = 0; c < CV; ++c) {
      float* dst = acc + (r0 + i) * Ev + c0 + c * kW;
      (a[i][c] + Vec::loadu(dst, cols)).store(dst, cols);
    }
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPvCols = 4;  // value vectors per tile: 4 rows x 4 accumulators, 32 registers
#else
constexpr int kPvCols = 2;  // 16 registers
#endif

void decode_pv(const float* p, int64_t R, int64_t n, const float* v, int64_t ldv, float* acc,
               int64_t Ev) {
  for (int64_t r0 = 0; r0 < R; r0 += 4)
    with_count<4>(std::min<int64_t>(4, R - r0), [&](auto rn) {
      constexpr int RN = decltype(rn)::value;
      int64_t c0 = 0;
      for (; c0 + kPvCols * kW <= Ev; c0 += kPvCols * kW)
        pv_tile<RN, kPvCols>(p, r0, n, v, ldv, c0, kW, acc, Ev);
      for (; c0 < Ev; c0 += kW)
        pv_tile<RN, 1>(p, r0, n, v, ldv, c0, static_cast<int>(std::min(kW, Ev - c0)), acc, Ev);
    });
}

// n rows of `cols` elements of x (leading dim ld) as float32: x itself (leading dim ld) for
// float, else converted into buf (leading dim cols) with at::vec's conversions.
template <typename T>
std::pair<const float*, int64_t> as_floats(const T* x, int64_t ld, int64_t n, int64_t cols,
                                           float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return {x, ld};
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T* src = x + i * ld;
      float* dst = buf + i * cols;
      int64_t e = 0;
      for (; e + kW <= cols; e += kW) {
        Vec f;
        at::vec::load_to_float<T>(src + e, f);
        f.store(dst + e);
      }
      for (; e < cols; ++e) dst[e] = static_cast<float>(src[e]);
    }
    return {buf, cols};
  }
}

// The rows' partial softmax over keys [k0, k1) of batch b, head hk: running maximum m and
// sum l per row, and acc (R x Ev) = sum over keys of 2^(s - m) v. Half-precision keys and
// values are read a chunk at a time into kv (kDecodeChunk x (E + Ev) floats).
template <typename T>
void decode_span(const DecodeShape& D, const at::Tensor& k, const at::Tensor& v,
                 const float* qr, int64_t b, int64_t hk, int64_t k0, int64_t k1, float* m,
                 float* l, float* acc, float* p, float* kv) {
  const int64_t R = D.R, ldk = k.stride(2), ldv = v.stride(2);
  const T* kp = k.data_ptr<T>() + b * k.stride(0) + hk * k.stride(1);
  const T* vp = v.data_ptr<T>() + b * v.stride(0) + hk * v.stride(1);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * D.Ev, 0.f);
  for (int64_t c0 = k0; c0 < k1; c0 += kDecodeChunk) {
    const int64_t n = std::min(kDecodeChunk, k1 - c0);
    const auto [kc, ldkc] = as_floats(kp + c0 * ldk, ldk, n, D.E, kv);
    decode_scores(qr, R, D.E, kc, ldkc, n, D.scale2, p);
    for (int64_t r = 0; r < R; ++r) {
      float* pr = p + r * kDecodeChunk;
      if (D.cap2 > 0.f) cap_scores(pr, n, D.cap2, nullptr);
      const auto [lo, hi] = D.interval(b, r);  // keys outside: -inf
      std::fill(pr, pr + std::clamp<int64_t>(lo - c0, 0, n), kNegInf);
      std::fill(pr + std::clamp<int64_t>(hi - c0, 0, n), pr + n, kNegInf);
      float mx = m[r];  // NaN scores are skipped here and come out of exp2 as NaN
      for (int64_t j = 0; j < n; ++j) mx = pr[j] > mx ? pr[j] : mx;
      if (mx == kNegInf) {  // no key yet: weights 0, NaN stays NaN
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += pr[j] = pr[j] == kNegInf ? 0.f : pr[j];
        l[r] += sum;
        continue;
      }
      const float alpha = m[r] == kNegInf ? 0.f : std::exp2(m[r] - mx);
      l[r] = l[r] * alpha + exp2_sum(pr, n, mx);
      m[r] = mx;
      if (alpha != 1.f)
        for (int64_t e = 0; e < D.Ev; ++e) acc[r * D.Ev + e] *= alpha;
    }
    float* vbuf = kv ? kv + kDecodeChunk * D.E : nullptr;  // (float32: read in place)
    const auto [vc, ldvc] = as_floats(vp + c0 * ldv, ldv, n, D.Ev, vbuf);
    decode_pv(p, R, n, vc, ldvc, acc, D.Ev);  // acc += P V
  }
}

// Row r's output (Ev floats) of batch b, head hk, in double from the keys of its interval
// only: the decoding kernel's path for rows that a NaN value reached through the 0 weights
// of keys they do not see (P V runs over all rows of a chunk), or through a part without
// their keys (rare; not fast). q: the row's query; sink: its sink in log2 units, or -inf.
template <typename T>
void decode_exact_row(const DecodeShape& D, const at::Tensor& k, const at::Tensor& v,
                      const float* q, int64_t b, int64_t hk, int64_t r, float sink, float* out) {
  const auto [lo, hi] = D.interval(b, r);
  const T* kp = k.data_ptr<T>() + b * k.stride(0) + hk * k.stride(1);
  const T* vp = v.data_ptr<T>() + b * v.stride(0) + hk * v.stride(1);
  const int64_t ldk = k.stride(2), ldv = v.stride(2);
  std::vector<double> s(static_cast<size_t>(std::max<int64_t>(0, hi - lo)));
  std::vector<double> o(static_cast<size_t>(D.Ev), 0.0);
  double mx = sink;
  for (int64_t c = lo; c < hi; ++c) {
    double x = 0.0;
    for (int64_t e = 0; e < D.E; ++e)
      x += static_cast<double>(q[e]) * static_cast<float>(kp[c * ldk + e]);
    x *= D.scale2;
    if (D.cap2 > 0.f) x = D.cap2 * std::tanh(x / D.cap2);
    s[c - lo] = x;
    mx = std::max(mx, x);  // a NaN score is skipped here and makes the sum NaN below
  }
  double total = sink == kNegInf ? 0.0 : std::exp2(sink - mx);
  for (int64_t c = lo; c < hi; ++c) {
    const double p = std::exp2(s[c - lo] - mx);
    total += p;
    for (int64_t e = 0; e < D.Ev; ++e) o[e] += p * static_cast<float>(vp[c * ldv + e]);
  }
  for (int64_t e = 0; e < D.Ev; ++e) out[e] = static_cast<float>(o[e] / total);
}

// The sinks of a decoding call, (sB, Hq, sL) contiguous float32, or none (p null).
struct DecodeSinks {
  const float* p = nullptr;
  int64_t sB = 0, H = 0, sL = 0;
  float at(int64_t b, int64_t h, int64_t qi) const {
    return p[((sB == 1 ? 0 : b) * H + h) * sL + (sL == 1 ? 0 : qi)];
  }
};

// o (B, Hq, Lq, Ev) float32 from the parts' maxima M, sums L and accumulators A (per task
// of D.parts per head, R rows each) of the rows qr (per head, R x E), and the sinks.
template <typename T>
void decode_merge(const DecodeShape& D, const at::Tensor& k, const at::Tensor& v,
                  const DecodeSinks& sinks, const std::vector<float>& qr,
                  const std::vector<float>& M, const std::vector<float>& L,
                  const std::vector<float>& A, float* o) {
  const int64_t heads = D.B * D.Hk;
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t r = 0; r < D.R; ++r) {  // merge the parts: the same rescaling
      const int64_t t0 = bh * D.parts;
      float mx = kNegInf;
      double total = 0.0;
      for (int64_t s = 0; s < D.parts; ++s) mx = std::max(mx, M[(t0 + s) * D.R + r]);
      const int64_t b = bh / D.Hk, h = bh % D.Hk * D.G + r / D.Lq, qi = r % D.Lq;
      float* dst = o + ((bh * D.G + r / D.Lq) * D.Lq + qi) * D.Ev;
      std::fill(dst, dst + D.Ev, 0.f);
      if (mx == kNegInf) {  // no key: 0 (a sink or not), or NaN where a score was NaN
        for (int64_t s = 0; s < D.parts; ++s) total += L[(t0 + s) * D.R + r];
        if (total != total) std::fill(dst, dst + D.Ev, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      float s2 = kNegInf;  // the row's sink in log2 units (-inf: none)
      if (sinks.p != nullptr) {  // the row's sink joins the denominator (its value is 0)
        s2 = sinks.at(b, h, qi) * kLog2e;
        mx = std::max(mx, s2);
        total += std::exp2(s2 - mx);
      }
      for (int64_t s = 0; s < D.parts; ++s) {
        const int64_t i = (t0 + s) * D.R + r;
        const float w = M[i] == kNegInf ? 0.f : std::exp2(M[i] - mx);
        total += static_cast<double>(w) * L[i];  // 0 * NaN: NaN
        const float* a = A.data() + i * D.Ev;
        for (int64_t e = 0; e < D.Ev; ++e) dst[e] += w * a[e];
      }
      const float inv = static_cast<float>(1.0 / total);
      bool nan = false;
      for (int64_t e = 0; e < D.Ev; ++e) {
        dst[e] *= inv;
        nan |= dst[e] != dst[e];
      }
      // A NaN output beside a sum that is not NaN came from V, which P V reads for all the
      // rows of a chunk: a NaN value reaches rows that do not see its key (0 * NaN). Such a
      // row is computed again from the keys it sees (NaN again where it sees the value).
      if (nan && total == total)
        decode_exact_row<T>(D, k, v, qr.data() + (bh * D.R + r) * D.E, b, bh % D.Hk, r, s2, dst);
    }
}

// fn(T{}) for the element type T of a decoding call's q, k and v (one dtype): float,
// c10::BFloat16 or c10::Half.
template <typename F>
void with_element(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const F& fn) {
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == t && v.scalar_type() == t,
              "attnlab decode: q, k and v must share one dtype");
  if (t == at::kFloat) return fn(float{});
  if (t == at::kBFloat16) return fn(c10::BFloat16{});
  TORCH_CHECK(t == at::kHalf, "attnlab decode: float32, bfloat16 or float16 inputs");
  fn(c10::Half{});
}

// out (B, Hq, Lq, Ev) = softmax(scale Q K^T) V, for R = Hq / Hk * Lq rows per key/value
// head of at most 64 (float32, bfloat16 or float16, summed in float32, out in q's dtype;
// the last dimension of each input contiguous); `lo`, `hi` (1 or B, Lq), int64: each query
// row's first and last key (a mask's row bounds), or None: every key. `softcap` > 0 caps
// the scaled scores (softcap * tanh(s / softcap));
// `sinks` (1 or B, Hq, 1 or Lq), float32: a logit per row in the softmax's denominator.
at::Tensor decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& lo,
                          const c10::optional<at::Tensor>& hi, double scale, double softcap,
                          const c10::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attnlab decode: 4-D inputs");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "attnlab decode: k, v last dim contiguous");
  DecodeShape D{q.size(0), k.size(1), 0, q.size(2), k.size(2), q.size(3), v.size(3), 0, 0,
                {}, {}};
  TORCH_CHECK(D.Hk > 0 && q.size(1) % D.Hk == 0 && k.size(0) == D.B && v.size(0) == D.B &&
                  k.size(3) == D.E && v.size(1) == D.Hk && v.size(2) == D.Lk,
              "attnlab decode: shapes do not match");
  D.G = q.size(1) / D.Hk;
  D.R = D.G * D.Lq;
  TORCH_CHECK(D.R >= 1 && D.R <= 64, "attnlab decode: at most 64 rows per key/value head");
  TORCH_CHECK(softcap >= 0.0, "attnlab decode: softcap must be positive (0: none)");
  D.cap2 = static_cast<float>(softcap) * kLog2e;
  DecodeSinks sk;  // the sinks, (sB, Hq, sL)
  if (sinks.has_value()) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 &&
                    (t.size(0) == 1 || t.size(0) == D.B) && t.size(1) == q.size(1) &&
                    (t.size(2) == 1 || t.size(2) == D.Lq),
                "attnlab decode: sinks must be contiguous float32 (1 or B, Hq, 1 or Lq)");
    sk = {t.data_ptr<float>(), t.size(0), t.size(1), t.size(2)};
  }
  TORCH_CHECK(lo.has_value() == hi.has_value(), "attnlab decode: lo and hi go together");
  if (lo.has_value()) {
    D.lo = RowKeys(*lo, D.B, D.Lq, "lo");
    D.hi = RowKeys(*hi, D.B, D.Lq, "hi");
  }
  // each batch's key range: the union of its rows' intervals
  std::vector<std::pair<int64_t, int64_t>> range(D.B);
  int64_t widest = 0;
  for (int64_t b = 0; b < D.B; ++b) {
    int64_t lo = D.Lk, hi = 0;
    for (int64_t r = 0; r < D.Lq; ++r) {
      const auto [a, z] = D.interval(b, r);
      if (a < z) lo = std::min(lo, a), hi = std::max(hi, z);
    }
    range[b] = {lo, std::max(lo, hi)};
    widest = std::max(widest, range[b].second - lo);
  }
  const int64_t heads = D.B * D.Hk, threads = at::get_num_threads();
  // parts of at least kDecodePart keys of the widest range, for 4 tasks per thread
  const int64_t most = std::max<int64_t>(1, widest / kDecodePart);
  D.parts = std::min(most, std::max<int64_t>(1, (4 * threads + heads - 1) / heads));
  // the rows (R x E) per head
  std::vector<float> qr(heads * D.R * D.E);
  const at::Tensor qc = q.to(at::kFloat).contiguous();
  const float* qp = qc.data_ptr<float>();
  D.scale2 = static_cast<float>(scale) * kLog2e;
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t r = 0; r < D.R; ++r) {
      const float* row = qp + ((bh * D.G + r / D.Lq) * D.Lq + r % D.Lq) * D.E;
      std::copy(row, row + D.E, qr.data() + (bh * D.R + r) * D.E);
    }
  const int64_t tasks = heads * D.parts;
  std::vector<float> M(tasks * D.R), L(tasks * D.R), A(tasks * D.R * D.Ev);
  at::Tensor out = at::empty({D.B, D.Hk * D.G, D.Lq, D.Ev}, q.options().dtype(at::kFloat));
  with_element(q, k, v, [&](auto element) {
    using T = decltype(element);
    // each worker's scores and (half precision) converted keys and values, allocated once
    // per call, not per task, and not zeroed (always written before read): zeroing 256 KiB
    // per task made 64 heads over 16 bfloat16 keys 4.5x slower than float32
    const int64_t scratch = std::is_same_v<T, float> ? 0 : kDecodeChunk * (D.E + D.Ev);
    const int64_t each = kDecodeChunk * D.R + scratch;
    const std::unique_ptr<float[]> buf(new float[workers(tasks, 1) * each]);
    dynamic_for(tasks, 1, [&](int64_t w, int64_t begin, int64_t end) {
      float* p = buf.get() + w * each;
      float* kv = scratch ? p + kDecodeChunk * D.R : nullptr;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / D.parts, b = bh / D.Hk;
        const auto [lo, hi] = range[b];
        const int64_t width = (hi - lo + D.parts - 1) / D.parts, k0 = lo + t % D.parts * width;
        decode_span<T>(D, k, v, qr.data() + bh * D.R * D.E, b, bh % D.Hk, k0,
                       std::min(hi, k0 + width), M.data() + t * D.R, L.data() + t * D.R,
                       A.data() + t * D.R * D.Ev, p, kv);
      }
    });
    decode_merge<T>(D, k, v, sk, qr, M, L, A, out.data_ptr<float>());
  });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// ---- The backward's scores ------------------------------------------------------------
// The backward recomputes P = 2^(S - lse) from scores made bit for bit as the forward's
// register tiles made them: the same scaled queries (scale * log2(e) * Q), the same fused
// multiply-adds over E in the same order from 0, the same soft-cap, ALiBi and mask, in log2
// units, against the forward's logsumexp in log2 units. Recomputed any other way (natural
// units, or another summation order, as a BLAS product has), each score differs from the
// forward's by rounding, P no longer sums to what the forward's lse says, and dQ, dK and dV
// carried up to 3.4, 3.9 and 6.6 times plain PyTorch's float32 error with queries and keys
// scaled by 3 (test_kernel_backward_within_2x_of_plain_pytorch, AVX2).

// Rows of S per register tile of the backward's scores, and key vectors per row.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kSR = 8, kSV = 2;  // 16 accumulators of 32 registers
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kSR = 4, kSV = 2;  // 8 of 16
#else
constexpr int kSR = 4, kSV = 1;
#endif

// S[i][0, J kW) (rows ldS apart; `lanes` of a single partial vector) = scale2 times the sum
// over e of qs[i][e] * kt[e][...] for I rows: lane_products with the keys in the lanes, which
// gives each (row, key) the forward's fused sum (a * b + c is the same for b * a + c).
template <int I, int J>
void key_scores(const float* qs, int64_t E, const float* kt, int64_t ldt, float* S,
                int64_t ldS, int lanes, const Vec scale2) {
  Vec acc[I][J];
  lane_products<I, J>(kt, E, qs, E, 1, acc, ldt, lanes, kScoreRun);
#pragma GCC unroll 8
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) (acc[i][j] * scale2).store(S + i * ldS + j * kW, lanes);
}

// S (T x n) = scale Q K^T of rows [a, a + T) against keys [c0, c0 + n), in log2 units, as
// the forward computes them (see above); qs (T x E) receives a copy of the rows (read in
// place from q instead, the backward took 7-10% longer: window 512, 8192 tokens, AVX512-b).
void key_products(const Problem& P, int64_t b, int64_t h, int64_t a, int64_t T, int64_t c0,
                  int64_t n, float* S, float* qs) {
  std::copy(P.qrow(b, h, a), P.qrow(b, h, a) + T * P.E, qs);
  const Vec scale2(P.scale * kLog2e);
  const float* kt = P.ktcol(b, h, c0);
  for (int64_t i = 0; i < T; i += kSR)
    with_count<kSR>(std::min<int64_t>(kSR, T - i), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      const float* q = qs + i * P.E;
      float* s = S + i * n;
      int64_t c = 0;
      for (; c + kSV * kW <= n; c += kSV * kW) key_scores<R, kSV>(q, P.E, kt + c, P.ldt, s + c, n, kW, scale2);
      for (; c + kW <= n; c += kW) key_scores<R, 1>(q, P.E, kt + c, P.ldt, s + c, n, kW, scale2);
      if (c < n)
        key_scores<R, 1>(q, P.E, kt + c, P.ldt, s + c, n, static_cast<int>(n - c), scale2);
    });
}

// f(x, j, lanes) -> the new s[j, j + lanes) for the vectors of s[0, n), the last one partial.
template <typename F>
void each_vector(float* s, int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f(Vec::loadu(s + j), j, static_cast<int>(kW)).store(s + j);
  if (j < n) {
    const int c = static_cast<int>(n - j);
    f(Vec::loadu(s + j, c), j, c).store(s + j, c);
  }
}

// S (T x n, leading dim n) = the forward's scores (log2 units) of rows [a, a + T) (in block
// `blk`) against keys [c0, c0 + n): soft-capped (the cap's derivative in dcap, T x n), ALiBi
// added, masked, each by the forward's vector operations.
void scores(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
            int64_t c0, int64_t n, float* S, float* qcopy, float* dcap) {
  key_products(P, b, h, a, T, c0, n, S, qcopy);
  if (P.softcap > 0.f) {
    const Vec by(P.softcap * kLog2e), over(1.f / (P.softcap * kLog2e)), one(1.f);
    for (int64_t i = 0; i < T * n; i += n)
      each_vector(S + i, n, [&](const Vec& x, int64_t j, int c) {
        const Vec t = (x * over).tanh();
        ((one - t) * (one + t)).store(dcap + i + j, c);  // exact near |t| = 1
        return t * by;
      });
  }
  if (P.slopes != nullptr) {  // -slope |position - key|, fused as the forward's
    const Vec slope(-P.slopes[h] * kLog2e);
    for (int64_t i = 0; i < T; ++i) {
      const Vec pos(static_cast<float>(a + i + P.Lk - P.Lq - c0));  // position - first key
      each_vector(S + i * n, n, [&](const Vec& x, int64_t j, int) {
        return at::vec::fmadd(slope, (pos - Vec::arange(static_cast<float>(j), 1.f)).abs(), x);
      });
    }
  }
  const int64_t* bl = P.blocks + 4 * blk;
  const int64_t r0 = bl[0], k0 = bl[2];
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
}

// ---- The backward's careful path -------------------------------------------------------
// A product over a whole row group and chunk multiplies the pairs the mask hides by 0, and
// 0 * NaN is NaN: a NaN (or infinite) key or value a row does not see reached its dQ through
// dP = dO V^T and dQ += dS K (dq NaN in all 19 rows that never see the last key, causal),
// and a row with a NaN logsumexp, query, upstream gradient or delta reached the dK and dV
// of keys it does not see. So the chunks that hold such a key or value (K and V rows are
// checked while they are transposed, and counted), and every chunk of a row group with
// such a row (see rows_finite and backward_rows), take the careful path: P marks the
// hidden pairs -0.0 (2^x is never -0.0), dP and dS are 0 there by selection, and dQ, dK and
// dV take K, Q and dO with their NaN and infinities set to 0. A row that sees a NaN key or
// has a NaN query has NaN P on every key it sees (its logsumexp is NaN), so its dS carries
// the NaN on, as fp64 does; a NaN in dO reaches dV through the pairs its row sees, added
// back one by one. Every other chunk runs exactly as before: the checks cost 0.06 ms per
// transposed K or V of 8 heads x 4096 x 64 (0.4% of a window-32 backward, 0.03% causal).
inline bool hidden_pair(float p) { return p == 0.f && std::signbit(p); }

// x (rows x cols, leading dim ld) with NaN and infinities 0, in w.clean (rows x cols).
const float* cleaned(const float* x, int64_t rows, int64_t cols, int64_t ld, Scratch& w) {
  if (static_cast<int64_t>(w.clean.size()) < rows * cols) w.clean.resize(rows * cols);
  float* c = w.clean.data();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t e = 0; e < cols; ++e) {
      const float y = x[i * ld + e];
      c[i * cols + e] = std::isfinite(y) ? y : 0.f;
    }
  return c;
}

// dV += P^T dO for T rows of head h against keys [c0, c0 + n) (S holds P, T x n; dO: the
// rows' T x Ev upstream gradient); `careful`: see above.
void add_dv(const Problem& P, int64_t b, int64_t h, int64_t T, int64_t c0, int64_t n,
            const float* dO, const float* S, float* dv, Scratch& w, bool careful = false) {
  const int64_t kv = (b * P.Hkv + h / P.group()) * P.Lk + c0;
  float* X = w.X.data();  // n x T: P^T
  transpose_block(S, n, X, T, T, n);
  const bool clean = careful && non_finite(dO, T * P.Ev);
  mm(n, P.Ev, T, X, T, clean ? cleaned(dO, T, P.Ev, P.Ev, w) : dO, P.Ev, dv + kv * P.Ev, P.Ev,
     true);
  if (!clean) return;
  for (int64_t i = 0; i < T; ++i)  // the non-finite dO, through the pairs its row sees
    for (int64_t e = 0; e < P.Ev; ++e) {
      const float g = dO[i * P.Ev + e];
      if (std::isfinite(g)) continue;
      for (int64_t j = 0; j < n; ++j)
        if (!hidden_pair(S[i * n + j])) dv[(kv + j) * P.Ev + e] += S[i * n + j] * g;
    }
}

// The first half of a backward step: rows [a, a + T) of block `blk`, head h, against keys
// [c0, c0 + n). Makes P = 2^(S - lse) (T x n) in S (log2 units; rows without keys: 0), adds
// P^T dO to dV (unless dv is null) and makes dP = dO V^T (T x n); C gets the soft-cap's
// derivative, if capped. `careful`: hidden pairs -0.0 in P and 0 in dP (see above).
void chunk_probs(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                 int64_t c0, int64_t n, const float* dout, const float* lse, float* dv,
                 float* S, float* dP, float* C, Scratch& w, bool careful = false) {
  scores(P, b, h, blk, a, T, c0, n, S, w.Q.data(), C);
  const int64_t row = (b * P.Hq + h) * P.Lq + a;
  for (int64_t i = 0; i < T; ++i) {
    const float top = lse[row + i];
    float* s = S + i * n;
    if (top == kNegInf) std::fill(s, s + n, careful ? -0.f : 0.f);
    else if (!careful)
      each_vector(s, n, [&](const Vec& x, int64_t, int) { return exp2_lanes(x - Vec(top)); });
    else  // a NaN logsumexp: NaN on the keys the row sees, 0 on the others
      each_vector(s, n, [&](const Vec& x, int64_t, int) {
        return Vec::blendv(exp2_lanes(x - Vec(top)), Vec(-0.f), x == Vec(kNegInf));
      });
  }
  const float* dO = dout + row * P.Ev;
  if (dv != nullptr) add_dv(P, b, h, T, c0, n, dO, S, dv, w, careful);
  mm(T, n, P.Ev, dO, P.Ev, P.vtcol(b, h, c0), P.ldt, dP, n, false);  // dP = dO V^T
  if (careful)
    for (int64_t u = 0; u < T * n; ++u) dP[u] = hidden_pair(S[u]) ? 0.f : dP[u];
}

// The second half: dS = scale_i * P * (dP - delta) (* the cap's derivative) in S, then
// dQ += dS K and dK += dS^T Q. `delta` holds the T rows' deltas, `scales` their scales
// (null: the call's scale).
void chunk_grads(const Problem& P, int64_t b, int64_t h, int64_t a, int64_t T, int64_t c0,
                 int64_t n, const float* delta, const float* scales, float* S, const float* dP,
                 const float* C, float* dq, float* dk, Scratch& w, bool careful = false) {
  for (int64_t i = 0; i < T; ++i) {
    const float scale = scales == nullptr ? P.scale : scales[i];
    const Vec d(delta[i]), sc(scale);
    float* s = S + i * n;
    const float* g = dP + i * n;
    if (careful) {  // hidden pairs: dS 0, whatever delta and the cap's derivative are
      for (int64_t u = 0; u < n; ++u) {
        const float x = s[u] * (g[u] - delta[i]) * scale * (P.softcap > 0.f ? C[i * n + u] : 1.f);
        s[u] = hidden_pair(s[u]) ? 0.f : x;
      }
      continue;
    }
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size())
      (Vec::loadu(s + j) * (Vec::loadu(g + j) - d) * sc).store(s + j);
    for (; j < n; ++j) s[j] = s[j] * (g[j] - delta[i]) * scale;
    if (P.softcap > 0.f)
      for (int64_t u = 0; u < n; ++u) s[u] *= C[i * n + u];
  }
  const int64_t row = (b * P.Hq + h) * P.Lq + a;
  const int64_t kv = (b * P.Hkv + h / P.group()) * P.Lk + c0;
  const float* kr = P.krow(b, h, c0);
  if (careful && non_finite(kr, n * P.E)) kr = cleaned(kr, n, P.E, P.E, w);
  mm(T, P.E, n, S, n, kr, P.E, dq + row * P.E, P.E, true);  // dQ += dS K
  float* X = w.X.data();  // n x T: dS^T
  transpose_block(S, n, X, T, T, n);
  const float* qr = P.qrow(b, h, a);
  if (careful && non_finite(qr, T * P.E)) qr = cleaned(qr, T, P.E, P.E, w);
  mm(n, P.E, T, X, T, qr, P.E, dk + kv * P.E, P.E, true);  // dK += dS^T Q
}

// Adds sum_j P_ij dP_ij to acc[2i] and sum_j P_ij to acc[2i + 1] (P, dP: T x n), in double.
void add_row_sums(int64_t T, int64_t n, const float* S, const float* dP, double* acc) {
  for (int64_t i = 0; i < T; ++i) {
    const float *p = S + i * n, *g = dP + i * n;
    Vec pg(0.f), pp(0.f);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec x = Vec::loadu(p + j);
      pg = fma_once(x, Vec::loadu(g + j), pg);
      pp = pp + x;
    }
    float a[Vec::size()], b[Vec::size()];
    pg.store(a);
    pp.store(b);
    double sum = 0.0, total = 0.0;
    for (int64_t u = 0; u < Vec::size(); ++u) {
      sum += a[u];
      total += b[u];
    }
    for (; j < n; ++j) {
      sum += static_cast<double>(p[j]) * g[j];
      total += p[j];
    }
    acc[2 * i] += sum;
    acc[2 * i + 1] += total;
  }
}

// Whether rows [a, a + T) of head h are finite, as far as their logsumexp (-inf: no key) and
// `extra` (the given delta or shift) tell: a query that is not finite makes its row's
// logsumexp NaN, unless the row has no key (then the query is read here); an upstream
// gradient that is not makes the given delta so, or the row's own sum_j P dP (see
// backward_rows). Reading every query and dO row here cost 0.34 ms, 1.2% of a window-32
// backward at 4096 tokens.
bool rows_finite(const Problem& P, int64_t b, int64_t h, int64_t a, int64_t T,
                 const float* lse, const float* extra) {
  const int64_t row = (b * P.Hq + h) * P.Lq + a;
  for (int64_t i = 0; i < T; ++i) {
    const float l = lse[row + i];
    if (!std::isfinite(extra[row + i])) return false;
    if (l == kNegInf ? non_finite(P.qrow(b, h, a + i), P.E) : !std::isfinite(l)) return false;
  }
  return true;
}

// Whether keys [c0, c0 + n) of head h have finite K and V rows.
bool keys_finite(const Problem& P, int64_t b, int64_t h, int64_t c0, int64_t n) {
  if (P.nonfinite == nullptr) return true;
  const int32_t* c = P.nonfinite + (b * P.Hkv + h / P.group()) * (P.Lk + 1);
  return c[c0 + n] == c[c0];
}

// Floats a worker may keep of one row group's P, dP (and the cap's derivative) over its
// whole key span, so that its delta is sum_j P_ij dP_ij of these very P and dP (16 MiB).
constexpr int64_t kOwnDeltaFloats = int64_t{1} << 22;

// Whether any of rows [row, row + T) makes its own delta: a `mass` above 0 (all, without).
bool any_own(const float* mass, int64_t row, int64_t T) {
  if (mass == nullptr) return true;
  for (int64_t i = 0; i < T; ++i)
    if (mass[row + i] > 0.f) return true;
  return false;
}

// Rows [a, a + T) of block `blk`, head h, over their key span [lo, hi). With `shift` (the
// call holds every key of its rows and no sink), and where the span's P and dP fit
// kOwnDeltaFloats, a first pass keeps them and sums each row, and the second makes the
// gradients of each row's P normalized by its sum (a rounding of lse scales a whole row
// alike) with delta_i = sum_j P_ij dP_ij + shift_i of these very P and dP, so that each
// row of dS sums to 0 as plain PyTorch's does. Else delta as given, chunk by chunk.
// With `mass` too (a part of a larger softmax: context parallelism's pairs), row i's P is
// normalized to sum to mass_i, the part's share of its row, and shift_i holds the other
// parts' sum_j P_ij dP_ij; a row of mass 0 takes its delta as given, and P as made.
void backward_rows(const Problem& P, int64_t b, int64_t h, int64_t blk, int64_t a, int64_t T,
                   int64_t lo, int64_t hi, const float* dout, const float* lse,
                   const float* delta, const float* shift, const float* mass, float* dq,
                   float* dk, float* dv, Scratch& w) {
  if (hi <= lo) return;  // no key: the rows' gradients stay 0
  const int64_t row = (b * P.Hq + h) * P.Lq + a, span = hi - lo;
  const int64_t per = P.softcap > 0.f ? 3 : 2;  // floats kept per pair
  const bool own =
      shift != nullptr && span * T * per <= kOwnDeltaFloats && any_own(mass, row, T);
  // the careful path (see above) for every chunk where a row is not finite, else for the
  // chunks that hold a key or value that is not (with `mass`, a row may read either)
  bool rows_ok = rows_finite(P, b, h, a, T, lse, own ? shift : delta) &&
                 (!own || mass == nullptr || rows_finite(P, b, h, a, T, lse, delta));
  auto careful = [&](int64_t c0, int64_t n) { return !rows_ok || !keys_finite(P, b, h, c0, n); };
  if (!own) {
    for (int64_t c0 = lo; c0 < hi; c0 += P.chunk) {
      const int64_t n = std::min(P.chunk, hi - c0);
      const bool cf = careful(c0, n);
      chunk_probs(P, b, h, blk, a, T, c0, n, dout, lse, dv, w.S.data(), w.dP.data(),
                  w.C.data(), w, cf);
      chunk_grads(P, b, h, a, T, c0, n, delta + row, nullptr, w.S.data(), w.dP.data(),
                  w.C.data(), dq, dk, w, cf);
    }
    return;
  }
  if (static_cast<int64_t>(w.kept.size()) < span * T * per) w.kept.resize(span * T * per);
  float *Pk = w.kept.data(), *dPk = Pk + span * T, *Ck = per == 3 ? dPk + span * T : nullptr;
  auto first_pass = [&] {
    w.sums.assign(2 * T, 0.0);
    for (int64_t c0 = lo; c0 < hi; c0 += P.chunk) {  // chunk c's T x n block at T * (c0 - lo)
      const int64_t n = std::min(P.chunk, hi - c0), at = T * (c0 - lo);
      chunk_probs(P, b, h, blk, a, T, c0, n, dout, lse, nullptr, Pk + at, dPk + at,
                  Ck == nullptr ? nullptr : Ck + at, w, careful(c0, n));
      add_row_sums(T, n, Pk + at, dPk + at, w.sums.data());
    }
  };
  first_pass();
  if (rows_ok) {  // a row that reads a NaN value, or whose dO is not finite, has a sum_j P dP
    // that is not finite either: its delta would reach the keys it does not see through
    // 0 * NaN in other chunks. Then the first pass again, carefully everywhere.
    for (int64_t i = 0; i < T && rows_ok; ++i) rows_ok = std::isfinite(w.sums[2 * i]);
    if (!rows_ok) first_pass();
  }
  const double* sums = w.sums.data();
  // P normalized by its row's sum: dS takes 1 / sum in its row's scale, dV takes it in
  // the row of dO (P^T diag(1 / sum) dO), so P itself is not rewritten
  w.delta.resize(T);
  w.scales.resize(T);
  if (static_cast<int64_t>(w.dO.size()) < T * P.Ev) w.dO.resize(T * P.Ev);
  for (int64_t i = 0; i < T; ++i) {  // no key (P all 0): its gradients are 0 whatever these are
    const float m = mass == nullptr ? 1.f : mass[row + i];
    const float* g = dout + (row + i) * P.Ev;
    if (!(m > 0.f)) {  // the delta given, P as made (the path without `shift`)
      w.delta[i] = delta[row + i];
      w.scales[i] = P.scale;
      std::copy(g, g + P.Ev, w.dO.data() + i * P.Ev);
      continue;
    }
    const double total = sums[2 * i + 1];
    const double inv = total > 0.0 ? m / total : 1.0;
    w.delta[i] = static_cast<float>(sums[2 * i] * inv + shift[row + i]);
    w.scales[i] = static_cast<float>(P.scale * inv);
    for (int64_t e = 0; e < P.Ev; ++e) w.dO[i * P.Ev + e] = static_cast<float>(g[e] * inv);
  }
  for (int64_t c0 = lo; c0 < hi; c0 += P.chunk) {
    const int64_t n = std::min(P.chunk, hi - c0), at = T * (c0 - lo);
    const bool cf = careful(c0, n);
    add_dv(P, b, h, T, c0, n, w.dO.data(), Pk + at, dv, w, cf);
    chunk_grads(P, b, h, a, T, c0, n, w.delta.data(), w.scales.data(), Pk + at, dPk + at,
                Ck == nullptr ? nullptr : Ck + at, dq, dk, w, cf);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blocked_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& blocks,
    const at::Tensor& tiles, const at::Tensor& allowed, const at::Tensor& spans,
    const c10::optional<at::Tensor>& slopes, int64_t bs, bool interval, double softcap,
    double scale, int64_t group, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& mass) {
  Problem P =
      make_problem(q, k, v, blocks, tiles, allowed, spans, slopes, bs, scale, interval, softcap);
  // K and V transposed; the keys whose K or V row is not finite noted meanwhile, and counted
  const int64_t nkv = P.B * P.Hkv;
  std::vector<uint8_t> bad(static_cast<size_t>(nkv * P.Lk), 0);
  const at::Tensor kt = transposed(k, bad.data()), vt = transposed(v, bad.data());
  std::vector<int32_t> before;
  if (std::find(bad.begin(), bad.end(), uint8_t{1}) != bad.end()) {
    before.resize(static_cast<size_t>(nkv * (P.Lk + 1)));
    for (int64_t m = 0; m < nkv; ++m) {
      int32_t* c = before.data() + m * (P.Lk + 1);
      c[0] = 0;
      for (int64_t l = 0; l < P.Lk; ++l) c[l + 1] = c[l] + bad[m * P.Lk + l];
    }
    P.nonfinite = before.data();
  }
  P.kt = kt.data_ptr<float>();
  P.vt = vt.data_ptr<float>();
  P.ldt = kt.size(3);
  for (const at::Tensor* t : {&dout, &lse, &delta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "dout, lse and delta must be contiguous float32");
  TORCH_CHECK(!shift || (shift->scalar_type() == at::kFloat && shift->is_contiguous() &&
                         shift->numel() == delta.numel()),
              "shift must be contiguous float32 shaped as delta");
  TORCH_CHECK(!mass || (shift && mass->scalar_type() == at::kFloat && mass->is_contiguous() &&
                        mass->numel() == delta.numel()),
              "mass must come with shift, contiguous float32 shaped as delta");
  const int64_t tasks = P.B * P.Hq * P.nblk;
  const int64_t nw = workers(tasks, 4);
  // dQ rows have one writer (their task); dK and dV get one buffer per worker, summed after.
  // Under torch.use_deterministic_algorithms the tasks go to workers statically, so the sums
  // are the same from run to run (5-15% slower on a shared 2-core machine); otherwise to
  // whichever worker asks first, and their last bits vary.
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({nw, P.B, P.Hkv, P.Lk, P.E}, k.options());
  at::Tensor dv = at::zeros({nw, P.B, P.Hkv, P.Lk, P.Ev}, v.options());
  const float *g = dout.data_ptr<float>(), *ls = lse.data_ptr<float>(),
              *dl = delta.data_ptr<float>(), *sh = shift ? shift->data_ptr<float>() : nullptr,
              *ms = mass ? mass->data_ptr<float>() : nullptr;
  float *pq = dq.data_ptr<float>(), *pk = dk.data_ptr<float>(), *pv = dv.data_ptr<float>();
  const int64_t kv_size = P.B * P.Hkv * P.Lk;
  std::vector<Scratch> scratch;
  for (int64_t w = 0; w < nw; ++w) scratch.emplace_back(group, P.chunk, P.E, P.Ev, P.softcap > 0.f);
  const auto task = [&](int64_t w, int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % P.nblk, bh = t / P.nblk, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t* bl = P.blocks + 4 * blk;
      for (int64_t a = bl[0]; a < bl[1]; a += group) {
        const int64_t z = std::min(a + group, bl[1]);
        const auto [lo, hi] = group_span(P, b, h, a, z);
        backward_rows(P, b, h, blk, a, z - a, lo, hi, g, ls, dl, sh, ms, pq,
                      pk + w * kv_size * P.E, pv + w * kv_size * P.Ev, scratch[w]);
      }
    }
  };
  if (at::globalContext().deterministicAlgorithms())
    static_for(tasks, 4, task);
  else
    dynamic_for(tasks, 4, task);
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
      "Tensor spans, Tensor? slopes, int bs, bool interval, float softcap, float scale, "
      "int group) -> (Tensor, Tensor, int)");
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, "
      "Tensor blocks, Tensor tiles, Tensor allowed, Tensor spans, Tensor? slopes, int bs, "
      "bool interval, float softcap, float scale, int group, Tensor? shift=None, "
      "Tensor? mass=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "forward_weights(Tensor q, Tensor k, Tensor v, Tensor blocks, Tensor tiles, "
      "Tensor allowed, Tensor spans, Tensor? slopes, int bs, bool interval, float softcap, "
      "float scale, int group, Tensor(a!) w, Tensor? dirty, int page) -> (Tensor, Tensor, int)");
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor? lo, Tensor? hi, float scale, "
      "float softcap=0.0, Tensor? sinks=None) -> Tensor");
  m.def("output_pool(int limit) -> int", &output_pool_op);  // no tensor: every backend
}

TORCH_LIBRARY_IMPL(attnlab_blocked, CPU, m) {
  m.impl("row_spans", &row_spans);
  m.impl("forward", &blocked_forward);
  m.impl("forward_weights", &forward_weights);
  m.impl("backward", &blocked_backward);
  m.impl("decode", &decode_forward);
}
