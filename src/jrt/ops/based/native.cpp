// The native CPU kernel of Based linear attention (inference): the chunked algorithm of chunk.py for one
// (sequence, head) row at a time, with the running state kept in cache and every product computed here by a
// register-blocked micro-kernel, so that nothing of size T * Dc is ever written to memory.
//
// Per chunk of C = 64 tokens, for a row whose running state is U [Dc, Dv] and u [Dc] (the denominator), in the
// compressed feature space and diagonal order of chunk.py (Dc = 1 + F + F(F+1)/2):
//   1. fq = features(q)            [Dc, C], feature-major
//   2. O = fq^T U, den = fq^T u    the read of every earlier token
//   3. P = tril(1 + s + s^2/2)     s = q . k / sqrt(F) inside the chunk
//      O += P V, den += P 1
//   4. fk = features(k / sqrt(F)) with the squares halved; U += fk V, u += fk 1
//   5. o = O / (den + eps)          written straight into the caller's [B, T, H, Dv] layout
// Padded positions (keep == 0) enter with k = 0 and [v, 1] = 0, so they add nothing to any sum whatever the
// caller's tensors hold there. With q == nullptr only step 4 runs (the encoder sum of the prefix operator).
//
// Built by jrt/ops/based/native.py with the system C++ compiler (-O3 -march=native) and called through ctypes;
// GCC's vector extensions give 16-float vectors (one AVX-512 register, two AVX2 registers).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int C = 64;  // chunk length
constexpr int W = 16;  // floats per vector
constexpr int R = 6;   // rows per micro-kernel block (R x 4 accumulators of 16 floats)

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));  // unaligned access
typedef int vi __attribute__((vector_size(64)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) {  // one broadcast (vf{} + x would add 0.0f first: not a no-op for -0.0f)
  return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// out[i] = hsum(x[i]) for i < 16: the 16 horizontal sums in 15 shuffle-and-add steps (a transposing tree).
inline vf hsum16(vf* x) {
  typedef int m __attribute__((vector_size(64)));
  const m a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const m a2 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const m b1 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const m b2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const m c1 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const m c2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const m d1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const m d2 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  for (int i = 0; i < 8; ++i) x[i] = __builtin_shuffle(x[i], x[i + 8], a1) + __builtin_shuffle(x[i], x[i + 8], a2);
  for (int i = 0; i < 4; ++i) x[i] = __builtin_shuffle(x[i], x[i + 4], b1) + __builtin_shuffle(x[i], x[i + 4], b2);
  for (int i = 0; i < 2; ++i) x[i] = __builtin_shuffle(x[i], x[i + 2], c1) + __builtin_shuffle(x[i], x[i + 2], c2);
  return __builtin_shuffle(x[0], x[1], d1) + __builtin_shuffle(x[0], x[1], d2);
}

// c[r, 0:NV*W] (+)= sum_{k<K} a[r*ars + k*aks] * b[k*ldb + 0:NV*W] for r < RR.
template <int RR, int NV>
inline void micro(const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc,
                  bool zero) {
  vf acc[RR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = zero ? vf{} : load(c + r * ldc + j * W);
  for (int k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    vf bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = load(bk + j * W);
    const float* ak = a + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const vf x = splat(ak[r * ars]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += x * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store(c + r * ldc + j * W, acc[r][j]);
}

template <int RR>
inline void micro_cols(const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc,
                       int nvec, bool zero) {
  int j = 0;
  for (; j + 4 <= nvec; j += 4) micro<RR, 4>(a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero);
  switch (nvec - j) {
    case 3: micro<RR, 3>(a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero); break;
    case 2: micro<RR, 2>(a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero); break;
    case 1: micro<RR, 1>(a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero); break;
    default: break;
  }
}

// Rows r0 .. r0+rr-1 (rr <= R) of c (+)= a b with K(r0) terms.
inline void block(int rr, const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc,
                  int nvec, bool zero) {
  switch (rr) {
    case 6: micro_cols<6>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    case 5: micro_cols<5>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    case 4: micro_cols<4>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    case 3: micro_cols<3>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    case 2: micro_cols<2>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    case 1: micro_cols<1>(a, ars, aks, b, ldb, K, c, ldc, nvec, zero); break;
    default: break;
  }
}

// c [m, nvec*W] (+)= a [m, K] b [K, nvec*W], the element (r, k) of a at a[r*ars + k*aks].
// Software prefetch of the inputs of the next (row, chunk), spread over the products of the current one: a
// stride of whole pages between tokens defeats the hardware prefetchers, and a burst of hundreds of prefetches
// would stall on the line-fill buffers.
struct Ahead {
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t qs = 0, ks = 0, vs = 0;
  int f = 0, dv = 0, next = 0, n = 0;

  void step(int tokens) {
    for (const int stop = std::min(n, next + tokens); next < stop; ++next) {
      __builtin_prefetch(k + next * ks);
      if (q) __builtin_prefetch(q + next * qs);
      for (int i = 0; i < dv; i += W) __builtin_prefetch(v + next * vs + i);
    }
  }
};

inline void gemm(int m, const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc,
                 int nvec, bool zero, Ahead* ahead = nullptr) {
  for (int r = 0; r < m; r += R) {
    block(std::min(R, m - r), a + r * ars, ars, aks, b, ldb, K, c + r * ldc, ldc, nvec, zero);
    if (ahead) ahead->step(2);
  }
}

// Feature-major monomials in the diagonal order: xt [F, C] -> out [Dc, C]: 1, x_a, x_a x_(a+d).
inline void features(const float* xt, int f, float* out, bool halve) {
  for (int t = 0; t < C; t += W) store(out + t, splat(1.0f));
  std::memcpy(out + C, xt, sizeof(float) * f * C);
  float* row = out + (1 + f) * C;
  for (int d = 0; d < f; ++d) {
    const vf scale = splat((d == 0 && halve) ? 0.5f : 1.0f);
    for (int a = 0; a + d < f; ++a, row += C) {
      const float* x = xt + a * C;
      const float* y = xt + (a + d) * C;
      for (int t = 0; t < C; t += W) store(row + t, load(x + t) * load(y + t) * scale);
    }
  }
}

struct Work {
  int f, dv, dc, nvec, dvp, dcp;
  float *qt, *kt, *feat, *v, *ones, *p, *o, *den;  // one chunk's work
  float *u, *uden;                                    // the running state of the current row: [Dc, Dvp], [Dcp]
  void* base;

  bool init(int f_, int dv_) {
    f = f_;
    dv = dv_;
    dc = 1 + f + f * (f + 1) / 2;
    nvec = (dv + W - 1) / W;
    dvp = nvec * W;
    dcp = (dc + W - 1) / W * W;
    const size_t sizes[] = {size_t(f) * C, size_t(f) * C, size_t(dcp) * C, size_t(C) * dvp, C, size_t(C) * C,
                            size_t(C) * dvp, C};
    size_t total = 0;
    for (size_t s : sizes) total += (s + W - 1) / W * W;
    base = std::aligned_alloc(64, total * sizeof(float));
    if (!base) return false;
    std::memset(base, 0, total * sizeof(float));
    float* ptr = static_cast<float*>(base);
    float** slots[] = {&qt, &kt, &feat, &v, &ones, &p, &o, &den};
    for (int i = 0; i < 8; ++i) {
      *slots[i] = ptr;
      ptr += (sizes[i] + W - 1) / W * W;
    }
    return true;
  }
  ~Work() { std::free(base); }
};

}  // namespace

extern "C" {

// Rows g0 .. g1-1 of B*H (row g: sequence g / H, head g % H, key/value head (g % H) / groups).
// Strides (in floats) are given for the sequence, head and time dimensions; the last dimension is contiguous.
// state: [B*H, Dc, Dv+1] running states in the compressed, weighted, diagonal-ordered space of chunk.py, read at
// the start and overwritten with the final state. keep: [B, T] bytes or null. q == nullptr: state update only.
// Returns 0, or 1 when the work buffers could not be allocated.
int jrt_based_rows(int64_t g0, int64_t g1, int64_t heads, int64_t groups, int64_t length, int64_t f, int64_t dv,
                   const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                   const int64_t* vs, const uint8_t* keep, float* o, const int64_t* os, float eps, float* state) {
  Work w;
  if (!w.init(int(f), int(dv))) return 1;
  const int dc = w.dc, dvp = w.dvp, dcp = w.dcp, nvec = w.nvec, dv1 = int(dv) + 1;
  const float kscale = 1.0f / __builtin_sqrtf(float(f));
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const bool stream = dv % W == 0 && length * heads * dv >= (int64_t(1) << 22);  // outputs of 16 MB and more
  // the running states of all rows (chunks outermost: the rows of one chunk sit side by side in memory)
  const int64_t rows = g1 - g0, per_row = int64_t(dc) * dvp + dcp;
  float* states = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * rows * per_row));
  if (!states) return 1;
  for (int64_t g = g0; g < g1; ++g) {
    const float* st = state + g * int64_t(dc) * dv1;
    float* u = states + (g - g0) * per_row;
    std::memset(u, 0, sizeof(float) * per_row);
    for (int i = 0; i < dc; ++i) {
      std::memcpy(u + i * dvp, st + i * dv1, sizeof(float) * dv);
      u[int64_t(dc) * dvp + i] = st[i * dv1 + dv];
    }
  }

  for (int64_t t0 = 0; t0 < length; t0 += C) {
   for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / heads, h = g % heads, hk = h / groups;
    w.u = states + (g - g0) * per_row;
    w.uden = w.u + int64_t(dc) * dvp;
    const float* qrow = q ? q + b * qs[0] + h * qs[1] : nullptr;
    const float* krow = k + b * ks[0] + hk * ks[1];
    const float* vrow = v + b * vs[0] + hk * vs[1];
    const uint8_t* keeprow = keep ? keep + b * length : nullptr;
    Ahead ahead;  // the next row of this chunk, or the first row of the next chunk
    {
      const int64_t ng = g + 1 < g1 ? g + 1 : g0, nt = g + 1 < g1 ? t0 : t0 + C;
      const int64_t nb = ng / heads, nh = ng % heads, nhk = nh / groups;
      if (nt < length) {
        ahead.q = q ? q + nb * qs[0] + nh * qs[1] + nt * qs[2] : nullptr;
        ahead.k = k + nb * ks[0] + nhk * ks[1] + nt * ks[2];
        ahead.v = v + nb * vs[0] + nhk * vs[1] + nt * vs[2];
        ahead.qs = q ? qs[2] : 0;
        ahead.ks = ks[2];
        ahead.vs = vs[2];
        ahead.f = int(f);
        ahead.dv = int(dv);
        ahead.n = int(std::min<int64_t>(C, length - nt));
      }
    }
      const int n = int(std::min<int64_t>(C, length - t0));
      // load the chunk: feature-major q and k / sqrt(F), [v] rows and the ones column (0 at padded positions)
      for (int t = 0; t < C; ++t) {
        const bool real = t < n && (!keeprow || keeprow[t0 + t]);
        const float* kt = krow + (t0 + t) * ks[2];
        const float* vt = vrow + (t0 + t) * vs[2];
        for (int i = 0; i < f; ++i) w.kt[i * C + t] = real ? kt[i] * kscale : 0.0f;
        if (real) {
          std::memcpy(w.v + t * dvp, vt, sizeof(float) * dv);
        } else {
          std::memset(w.v + t * dvp, 0, sizeof(float) * dv);
        }
        w.ones[t] = real ? 1.0f : 0.0f;
        if (qrow) {
          const float* qt = qrow + (t0 + t) * qs[2];
          for (int i = 0; i < f; ++i) w.qt[i * C + t] = t < n ? qt[i] : 0.0f;
        }
      }
      if (qrow) {
        // the read of the earlier chunks: O = fq^T U, den = fq^T u
        features(w.qt, int(f), w.feat, false);
        gemm(C, w.feat, 1, C, w.u, dvp, dc, w.o, dvp, nvec, true, &ahead);
        vf den[C / W] = {};
        for (int i = 0; i < dc; ++i) {
          const vf x = splat(w.uden[i]);
          for (int j = 0; j < C / W; ++j) den[j] += load(w.feat + i * C + j * W) * x;
        }
        // the intra-chunk term: P = tril(1 + s + s^2/2), O += P V, den += P 1
        for (int r = 0; r < C; r += R) {  // s = q k^T on the blocks of 16 columns that reach the diagonal
          const int rr = std::min(R, C - r);
          block(rr, w.qt + r, 1, C, w.kt, C, int(f), w.p + r * C, C, (r + rr - 1) / W + 1, true);
        }
        vf rows[W];
        for (int t = 0; t < C; ++t) {
          const int blocks = t / W + 1;
          vf dacc = {};
          for (int j = 0; j < C / W; ++j) {
            if (j >= blocks) {
              store(w.p + t * C + j * W, vf{});
              continue;
            }
            const vf s = load(w.p + t * C + j * W);
            vf kern = splat(1.0f) + s + splat(0.5f) * s * s;
            kern = ((lane + j * W) <= t) ? kern : vf{};
            store(w.p + t * C + j * W, kern);
            dacc += kern * load(w.ones + j * W);
          }
          rows[t % W] = dacc;
          if (t % W == W - 1) den[t / W] += hsum16(rows);
        }
        for (int j = 0; j < C / W; ++j) store(w.den + j * W, den[j]);
        for (int r = 0; r < C; r += R) {
          const int rr = std::min(R, C - r);
          block(rr, w.p + r * C, C, 1, w.v, dvp, r + rr, w.o + r * dvp, dvp, nvec, false);
        }
        // o = O / (den + eps) in the caller's layout
        float* orow = o + b * os[0] + h * os[1];
        for (int t = 0; t < n; ++t) {
          const float inv = 1.0f / (w.den[t] + eps);
          float* ot = orow + (t0 + t) * os[2];
          const float* src = w.o + t * dvp;
#if defined(__AVX512F__)
          if (stream && (reinterpret_cast<uintptr_t>(ot) % 64 == 0)) {  // large outputs: no read for ownership
            for (int i = 0; i < dv; i += W) _mm512_stream_ps(ot + i, load(src + i) * splat(inv));
            continue;
          }
#endif
          for (int i = 0; i < dv; ++i) ot[i] = src[i] * inv;
        }
      }
      // the state update: U += fk V, u += fk 1
      features(w.kt, int(f), w.feat, true);
      gemm(dc, w.feat, C, 1, w.v, dvp, n, w.u, dvp, nvec, false, &ahead);
      for (int i0 = 0; i0 < dc; i0 += W) {  // (rows dc .. dcp-1 of feat and uden stay zero)
        vf sums[W];
        for (int i = 0; i < W; ++i) {
          vf acc = {};
          for (int j = 0; j < C / W; ++j) acc += load(w.feat + (i0 + i) * C + j * W) * load(w.ones + j * W);
          sums[i] = acc;
        }
        store(w.uden + i0, load(w.uden + i0) + hsum16(sums));
      }
    }
  }
  for (int64_t g = g0; g < g1; ++g) {
    float* st = state + g * int64_t(dc) * dv1;
    const float* u = states + (g - g0) * per_row;
    for (int i = 0; i < dc; ++i) {
      std::memcpy(st + i * dv1, u + i * dvp, sizeof(float) * dv);
      st[i * dv1 + dv] = u[int64_t(dc) * dvp + i];
    }
  }
  std::free(states);
#if defined(__AVX512F__)
  _mm_sfence();
#endif
  return 0;
}

}  // extern "C"
