// The native CPU kernels of Based linear attention, forward (jrt_based_rows) and backward
// (jrt_based_backward_rows): the chunked algorithm of chunk.py for one (sequence, head) row at a time, with the
// running state kept in cache and every product computed here by a register-blocked micro-kernel, so that
// nothing of size T * Dc is ever written to memory.
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
constexpr int R = 6;   // rows per micro-kernel block
#if defined(__AVX512F__)
constexpr int VB = 4;  // 16-float vectors per block row: 6 x 4 accumulators in 24 of the 32 AVX-512 registers
#else
constexpr int VB = 1;  // a 16-float vector is two AVX2 registers: 6 x 2 accumulators of the 16 (the classic 6x16)
#endif

constexpr int GROUP = 8;  // rows (sequence, head) of the backward pass that advance chunk by chunk side by side

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));  // unaligned access
typedef int vi __attribute__((vector_size(64)));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) {  // one broadcast (vf{} + x would add 0.0f first: not a no-op for -0.0f)
  return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// The masks of the 2x2 block swaps of a 16 x 16 transpose at block size 8, 4, 2, 1: for rows x (with bit b of
// its index clear) and y (bit set), LO[b] takes x's columns without bit b and y's first ones, HI[b] the rest.
typedef int mask __attribute__((vector_size(64)));
constexpr mask LO[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                        {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                        {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                        {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
constexpr mask HI[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                        {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                        {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                        {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};

// out[i] = the sum of the lanes of x[i], for i < 16: 15 shuffle-and-add steps (the block swaps, summed).
inline vf hsum16(vf* x) {
  for (int level = 0, half = 8; level < 4; ++level, half /= 2) {
    for (int i = 0; i < half; ++i) {
      x[i] = __builtin_shuffle(x[i], x[i + half], LO[level]) + __builtin_shuffle(x[i], x[i + half], HI[level]);
    }
  }
  return x[0];
}

// dst [16, 16] = src [16, 16]^T (leading dimensions in floats): the 2x2 block swaps at every block size.
inline void transpose16(const float* src, long lds, float* dst, long ldd) {
  vf x[W];
  for (int i = 0; i < W; ++i) x[i] = load(src + i * lds);
  for (int level = 0, b = 8; level < 4; ++level, b /= 2) {
    for (int i = 0; i < W; ++i) {
      if (i & b) continue;
      const vf lo = __builtin_shuffle(x[i], x[i + b], LO[level]);
      x[i + b] = __builtin_shuffle(x[i], x[i + b], HI[level]);
      x[i] = lo;
    }
  }
  for (int i = 0; i < W; ++i) store(dst + i * ldd, x[i]);
}

// dst [cols, rows] = src [rows, cols]^T, both multiples of 16.
inline void transpose(const float* src, long lds, float* dst, long ldd, int rows, int cols) {
  for (int r = 0; r < rows; r += W)
    for (int c = 0; c < cols; c += W) transpose16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
}

// c[r, 0:NV*W] (+)= sum_{k<K} a[r*ars + k*aks] * b[k*ldb + 0:NV*W] for r < RR.
template <int RR, int NV>
inline void micro(const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc, bool zero) {
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

using Micro = void (*)(const float*, long, long, const float*, long, int, float*, long, bool);

// Rows 0 .. RR-1 of c (+)= a b over nvec vectors of columns: blocks of VB vectors, then the rest.
template <int RR>
void micro_cols(const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc, int nvec,
                bool zero) {
  static constexpr Micro REST[4] = {nullptr, micro<RR, 1>, micro<RR, 2>, micro<RR, 3>};
  int j = 0;
  for (; j + VB <= nvec; j += VB) micro<RR, VB>(a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero);
  if (j < nvec) REST[nvec - j](a, ars, aks, b + j * W, ldb, K, c + j * W, ldc, zero);
}

using Cols = void (*)(const float*, long, long, const float*, long, int, float*, long, int, bool);
constexpr Cols BLOCKS[R + 1] = {nullptr,       micro_cols<1>, micro_cols<2>, micro_cols<3>,
                                micro_cols<4>, micro_cols<5>, micro_cols<6>};

// Rows 0 .. rr-1 (rr <= R) of c (+)= a b with K terms.
inline void block(int rr, const float* a, long ars, long aks, const float* b, long ldb, int K, float* c, long ldc,
                  int nvec, bool zero) {
  BLOCKS[rr](a, ars, aks, b, ldb, K, c, ldc, nvec, zero);
}

// Software prefetch of the inputs of the next (row, chunk), spread over the products of the current one: a
// stride of whole pages between tokens defeats the hardware prefetchers, and a burst of hundreds of prefetches
// would stall on the line-fill buffers.
struct Ahead {
  struct Stream {
    const float* p;
    int64_t stride;
    int floats;
  };
  Stream streams[6];
  int count = 0, next = 0, n = 0;

  // tokens t0 .. t0+n-1 of a stream that starts at p (token stride, floats per token); p == nullptr: none
  void add(const float* p, int64_t t0, int64_t stride, int floats) {
    if (p) streams[count++] = {p + t0 * stride, stride, floats};
  }
  void step(int tokens) {
    for (const int stop = std::min(n, next + tokens); next < stop; ++next) {
      for (int i = 0; i < count; ++i) {
        const float* p = streams[i].p + next * streams[i].stride;
        for (int j = 0; j < streams[i].floats; j += W) __builtin_prefetch(p + j);
      }
    }
  }
};

// c [m, nvec*W] (+)= a [m, K] b [K, nvec*W], the element (r, k) of a at a[r*ars + k*aks]; ahead (optional) issues
// two tokens of prefetches per block of rows.
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

// The backward pass of features(): dx [F, C] = d(features)/dx^T dfeat, from dfeat [Dc, C] and x [F, C].
inline void features_backward(const float* dfeat, const float* xt, int f, float* dx, bool halve) {
  std::memcpy(dx, dfeat + C, sizeof(float) * f * C);
  const float* row = dfeat + (1 + f) * C;
  for (int d = 0; d < f; ++d) {
    for (int a = 0; a + d < f; ++a, row += C) {
      float* da = dx + a * C;
      float* db = dx + (a + d) * C;
      const float* x = xt + a * C;
      const float* y = xt + (a + d) * C;
      if (d == 0) {
        const vf two = splat(halve ? 1.0f : 2.0f);
        for (int t = 0; t < C; t += W) store(da + t, load(da + t) + load(row + t) * load(x + t) * two);
      } else {
        for (int t = 0; t < C; t += W) {
          const vf r = load(row + t);
          store(da + t, load(da + t) + r * load(y + t));
          store(db + t, load(db + t) + r * load(x + t));
        }
      }
    }
  }
}

// c [m, C] += a [m] b [C]^T (a rank-one update of a feature-major block; rows m .. dcp-1 of c may be touched).
inline void rank1(int m, const float* a, const float* b, float* c) {
  for (int i = 0; i < m; ++i) {
    const vf x = splat(a[i]);
    for (int j = 0; j < C; j += W) store(c + i * C + j, load(c + i * C + j) + x * load(b + j));
  }
}

// u[i] += sum_t feat[i, t] x[t] for i < m (m rounded up to 16: rows up to dcp of feat must be readable).
inline void row_dots(int m, const float* feat, const float* x, float* u) {
  for (int i0 = 0; i0 < m; i0 += W) {
    vf sums[W];
    for (int i = 0; i < W; ++i) {
      vf acc = {};
      for (int j = 0; j < C / W; ++j) acc += load(feat + (i0 + i) * C + j * W) * load(x + j * W);
      sums[i] = acc;
    }
    store(u + i0, load(u + i0) + hsum16(sums));
  }
}

// s [C, C] = q k^T on the blocks of 16 columns that reach the diagonal (qt, kt: [F, C]); blocks above are not
// written.
inline void causal_scores(const float* qt, const float* kt, int f, float* s) {
  for (int r = 0; r < C; r += R) {
    const int rr = std::min(R, C - r);
    block(rr, qt + r, 1, C, kt, C, f, s + r * C, C, (r + rr - 1) / W + 1, true);
  }
}

// The Taylor kernel on scores: 1 + s + s^2/2.
inline vf taylor(vf s) { return splat(1.0f) + s + splat(0.5f) * s * s; }

// A state [Dc, Dv+1] (the caller's layout: the denominator as the last column) into U [Dc, Dvp] and u [Dc].
inline void unpack_state(const float* st, int dc, int dv, int dvp, float* u, float* uden) {
  for (int i = 0; i < dc; ++i) {
    std::memcpy(u + i * dvp, st + i * (dv + 1), sizeof(float) * dv);
    uden[i] = st[i * (dv + 1) + dv];
  }
}

// The inverse of unpack_state.
inline void pack_state(const float* u, const float* uden, int dc, int dv, int dvp, float* st) {
  for (int i = 0; i < dc; ++i) {
    std::memcpy(st + i * (dv + 1), u + i * dvp, sizeof(float) * dv);
    st[i * (dv + 1) + dv] = uden[i];
  }
}

// The dimensions of one row's problem, padded to whole vectors where a buffer needs it.
struct Dims {
  int f, dv, dc, nvec, dvp, dcp, fp;
  Dims(int f_, int dv_)
      : f(f_),
        dv(dv_),
        dc(1 + f_ + f_ * (f_ + 1) / 2),
        nvec((dv_ + W - 1) / W),
        dvp(nvec * W),
        dcp((dc + W - 1) / W * W),
        fp((f_ + W - 1) / W * W) {}
};

// One zeroed, 64-byte aligned allocation cut into buffers: *slots[i] gets sizes[i] floats (rounded up to whole
// vectors). Owns the memory.
struct Buffers {
  void* base = nullptr;
  bool carve(const size_t* sizes, float** const* slots, int count) {
    size_t total = 0;
    for (int i = 0; i < count; ++i) total += (sizes[i] + W - 1) / W * W;
    base = std::aligned_alloc(64, total * sizeof(float));
    if (!base) return false;
    std::memset(base, 0, total * sizeof(float));
    float* ptr = static_cast<float*>(base);
    for (int i = 0; i < count; ++i) {
      *slots[i] = ptr;
      ptr += (sizes[i] + W - 1) / W * W;
    }
    return true;
  }
  ~Buffers() { std::free(base); }
};

// The work buffers of the forward pass.
struct Work : Dims, Buffers {
  float *qt, *kt, *feat, *v, *ones, *p, *o, *den;  // one chunk's work
  float *u, *uden;                                 // the running state of the current row: [Dc, Dvp], [Dcp]

  Work(int f_, int dv_) : Dims(f_, dv_) {}
  bool init() {
    const size_t sizes[] = {
        size_t(f) * C, size_t(f) * C, size_t(dcp) * C, size_t(C) * dvp, C, size_t(C) * C, size_t(C) * dvp, C};
    float** const slots[] = {&qt, &kt, &feat, &v, &ones, &p, &o, &den};
    return carve(sizes, slots, 8);
  }
};

}  // namespace

extern "C" {

// Rows g0 .. g1-1 of B*H (row g: sequence g / H, head g % H, key/value head (g % H) / groups).
// Strides (in floats) are given for the sequence, head and time dimensions; the last dimension is contiguous.
// state: [B*H, Dc, Dv+1] running states in the compressed, weighted, diagonal-ordered space of chunk.py, read at
// the start and overwritten with the final state. keep: [B, T] bytes or null. q == nullptr: state update only.
// den_out: [B*H, T] or null, receives each position's denominator (before eps). saved: [B*H, chunks, Dc*Dvp + Dcp]
// or null, receives the running state that each chunk reads (U, then u; Dvp and Dcp are Dv and Dc rounded up to
// 16), for the backward pass.
// Returns 0, or 1 when the work buffers could not be allocated.
int jrt_based_rows(int64_t g0, int64_t g1, int64_t heads, int64_t groups, int64_t length, int64_t f, int64_t dv,
                   const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                   const int64_t* vs, const uint8_t* keep, float* o, const int64_t* os, float eps, float* state,
                   float* den_out, float* saved) {
  Work w{int(f), int(dv)};
  if (!w.init()) return 1;
  const int dc = w.dc, dvp = w.dvp, dcp = w.dcp, nvec = w.nvec, dv1 = int(dv) + 1;
  const float kscale = 1.0f / __builtin_sqrtf(float(f));
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const bool stream = dv % W == 0 && length * heads * dv >= (int64_t(1) << 22);  // outputs of 16 MB and more
  // the running states of all rows (chunks outermost: the rows of one chunk sit side by side in memory)
  const int64_t rows = g1 - g0, per_row = int64_t(dc) * dvp + dcp;
  float* states = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * rows * per_row));
  if (!states) return 1;
  for (int64_t g = g0; g < g1; ++g) {
    float* u = states + (g - g0) * per_row;
    std::memset(u, 0, sizeof(float) * per_row);
    unpack_state(state + g * int64_t(dc) * dv1, dc, int(dv), dvp, u, u + int64_t(dc) * dvp);
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
          ahead.add(q ? q + nb * qs[0] + nh * qs[1] : nullptr, nt, q ? qs[2] : 0, int(f));
          ahead.add(k + nb * ks[0] + nhk * ks[1], nt, ks[2], int(f));
          ahead.add(v + nb * vs[0] + nhk * vs[1], nt, vs[2], int(dv));
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
      if (saved) {
        float* dst = saved + (g * ((length + C - 1) / C) + t0 / C) * per_row;
#if defined(__AVX512F__)
        if (reinterpret_cast<uintptr_t>(dst) % 64 == 0 && per_row % W == 0) {  // no read for ownership
          for (int64_t i = 0; i < per_row; i += W) _mm512_stream_ps(dst + i, load(w.u + i));
        } else {
          std::memcpy(dst, w.u, sizeof(float) * per_row);
        }
#else
        std::memcpy(dst, w.u, sizeof(float) * per_row);
#endif
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
        causal_scores(w.qt, w.kt, int(f), w.p);
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
            const vf kern = ((lane + j * W) <= t) ? taylor(s) : vf{};
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
        // o = O / (den + eps) in the caller's layout (and den, for the backward pass)
        if (den_out) std::memcpy(den_out + g * length + t0, w.den, sizeof(float) * n);
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
      row_dots(dc, w.feat, w.ones, w.uden);
    }
  }
  for (int64_t g = g0; g < g1; ++g) {
    const float* u = states + (g - g0) * per_row;
    pack_state(u, u + int64_t(dc) * dvp, dc, int(dv), dvp, state + g * int64_t(dc) * dv1);
  }
  std::free(states);
#if defined(__AVX512F__)
  _mm_sfence();
#endif
  return 0;
}

// The buffers of the backward pass of one row (all [., C] blocks feature- or value-major, [C, .] token-major).
struct BackWork : Dims, Buffers {
  float *qt, *kt, *qr, *kr, *v, *vt, *ones, *g, *gt, *gden, *feat, *dfeat, *dx, *dxq, *s, *p, *ds, *dqc, *dkc, *dvc;
  float* states;  // per row of a group: the state's gradient G [Dc, Dvp], then its denominator column [Dcp]

  BackWork(int f_, int dv_) : Dims(f_, dv_) {}
  bool init() {
    const size_t fc = size_t(fp) * C, cf = size_t(C) * fp, cv = size_t(C) * dvp, vc = size_t(dvp) * C,
                 dcc = size_t(dcp) * C, cc = size_t(C) * C;
    const size_t sizes[] = {fc, fc, cf, cf,  cv,  vc, C,
                            cv, vc, C,  dcc, dcc, fc, fc,
                            cc, cc, cc, cf,  cf,  cv, GROUP * (size_t(dc) * dvp + dcp)};
    float** const slots[] = {&qt,    &kt, &qr,  &kr, &v, &vt, &ones, &g,   &gt,  &gden,  &feat,
                             &dfeat, &dx, &dxq, &s,  &p, &ds, &dqc,  &dkc, &dvc, &states};
    return carve(sizes, slots, sizeof(sizes) / sizeof(sizes[0]));
  }
};

// The backward pass of jrt_based_rows for rows g0 .. g1-1: one sweep over the chunks of each row, backwards,
// carrying G = dL/dU after the chunk. Per chunk: dq through the read of the saved state U (d fq = U [g, gden]^T)
// and the intra-chunk scores; dk and dv through the state (U += fk [v, 1] gives d fk = G [v, 1]^T and
// d[v, 1] = fk^T G) and the intra-chunk term; then G += fq [g, gden] (the chunk's read of U).
// With dO the output's gradient (dout), o the output and den [B*H, T] the denominator (from jrt_based_rows),
// g = dO / (den + eps) and gden = -(dO . o) / (den + eps) are the gradients of the numerator and denominator.
// saved: the chunk states that jrt_based_rows saved. q == nullptr: the state of an encoder sum (no output, no
// saved states): dk, dv from G = dfinal alone. dfinal: the gradient of the final state, [B*H, Dc, Dv+1], or null.
// dq [B, T, H, F], dk [B, T, H, F] and dv [B, T, H, Dv] are written for every position (per query head: a
// group's key/value head gradient is the sum over its query heads, taken by the caller); dstart [B*H, Dc, Dv+1]
// receives dL/d(the state before the first token).
int jrt_based_backward_rows(int64_t g0, int64_t g1, int64_t heads, int64_t groups, int64_t length, int64_t f,
                            int64_t dv, const float* q, const int64_t* qs, const float* k, const int64_t* ks,
                            const float* v, const int64_t* vs, const uint8_t* keep, const float* o, const int64_t* os,
                            const float* den, const float* dout, const int64_t* douts, float eps, const float* saved,
                            const float* dfinal, float* dq, const int64_t* dqs, float* dk, const int64_t* dks,
                            float* dvv, const int64_t* dvs, float* dstart) {
  BackWork w{int(f), int(dv)};
  if (!w.init()) return 1;
  const int dc = w.dc, dvp = w.dvp, fp = w.fp, nvec = w.nvec, dv1 = int(dv) + 1, fv = fp / W;
  const int64_t per_state = int64_t(dc) * dvp + w.dcp;
  const float kscale = 1.0f / __builtin_sqrtf(float(f));
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t chunks = (length + C - 1) / C;

  // where row g reads and writes (each pointer at the row's first token)
  struct Row {
    const float *q, *k, *v, *o, *dout, *den;
    const uint8_t* keep;
    float *dq, *dk, *dv, *grad, *grad_den;  // G and its denominator column, in the work buffers
  };
  auto row_of = [&](int64_t g, int64_t gs) {
    const int64_t b = g / heads, h = g % heads, hk = h / groups;
    Row r;
    r.q = q ? q + b * qs[0] + h * qs[1] : nullptr;
    r.k = k + b * ks[0] + hk * ks[1];
    r.v = v + b * vs[0] + hk * vs[1];
    r.o = q ? o + b * os[0] + h * os[1] : nullptr;
    r.dout = q ? dout + b * douts[0] + h * douts[1] : nullptr;
    r.den = q ? den + g * length : nullptr;
    r.keep = keep ? keep + b * length : nullptr;
    r.dq = q ? dq + b * dqs[0] + h * dqs[1] : nullptr;
    r.dk = dk + b * dks[0] + h * dks[1];
    r.dv = dvv + b * dvs[0] + h * dvs[1];
    r.grad = w.states + (g - gs) * per_state;
    r.grad_den = r.grad + int64_t(dc) * dvp;
    return r;
  };
  // one chunk's inputs: q, k / sqrt(F) (feature- and token-major), [v] (token- and value-major), the ones
  // column, and the numerator's and denominator's gradients g, gden (zero past the end)
  auto load_chunk = [&](const Row& row, int64_t t0, int n) {
    for (int t = 0; t < C; ++t) {
      const bool real = t < n && (!row.keep || row.keep[t0 + t]);
      const float* kt = row.k + (t0 + t) * ks[2];
      float* kr = w.kr + t * fp;
      for (int i = 0; i < f; ++i) kr[i] = real ? kt[i] * kscale : 0.0f;
      if (real) {
        std::memcpy(w.v + t * dvp, row.v + (t0 + t) * vs[2], sizeof(float) * dv);
      } else {
        std::memset(w.v + t * dvp, 0, sizeof(float) * dv);
      }
      w.ones[t] = real ? 1.0f : 0.0f;
      if (!q) continue;
      float* qr = w.qr + t * fp;
      float* gr = w.g + t * dvp;
      if (t >= n) {
        std::memset(qr, 0, sizeof(float) * f);
        std::memset(gr, 0, sizeof(float) * dv);
        w.gden[t] = 0.0f;
        continue;
      }
      std::memcpy(qr, row.q + (t0 + t) * qs[2], sizeof(float) * f);
      const float* dot = row.dout + (t0 + t) * douts[2];
      const float* ot = row.o + (t0 + t) * os[2];
      const float inv = 1.0f / (row.den[t0 + t] + eps);
      // (in vectors: a scalar sum would be one chain of dependent adds, which the compiler may not reorder)
      vf acc = {};
      int j = 0;
      for (; j + W <= dv; j += W) {
        const vf d = load(dot + j);
        store(gr + j, d * splat(inv));
        acc += d * load(ot + j);
      }
      float dsum = 0.0f;
      for (int i = 0; i < W; ++i) dsum += acc[i];
      for (; j < dv; ++j) {
        gr[j] = dot[j] * inv;
        dsum += dot[j] * ot[j];
      }
      w.gden[t] = -dsum * inv;
    }
    transpose(w.kr, fp, w.kt, C, C, fp);
    transpose(w.v, dvp, w.vt, C, C, dvp);
    if (!q) return;
    transpose(w.qr, fp, w.qt, C, C, fp);
    transpose(w.g, dvp, w.gt, C, C, dvp);
  };
  // the intra-chunk term of the loaded chunk: s = q k^T, P = 1 + s + s^2/2 (lower triangle),
  // dP = g v^T + gden 1^T, ds = dP (1 + s) (lower triangle)
  auto intra = [&]() {
    causal_scores(w.qt, w.kt, int(f), w.s);
    for (int r = 0; r < C; r += R) {  // dP = g v^T on the same blocks
      const int rr = std::min(R, C - r);
      block(rr, w.g + r * dvp, dvp, 1, w.vt, C, int(dv), w.ds + r * C, C, (r + rr - 1) / W + 1, true);
    }
    for (int t = 0; t < C; ++t) {
      const vf gd = splat(w.gden[t]);
      for (int j = 0; j < C / W; ++j) {
        if (j > t / W) {
          store(w.p + t * C + j * W, vf{});
          store(w.ds + t * C + j * W, vf{});
          continue;
        }
        const vf sc = load(w.s + t * C + j * W);
        const auto lower = (lane + j * W) <= t;
        const vf dp = load(w.ds + t * C + j * W) + gd * load(w.ones + j * W);
        store(w.p + t * C + j * W, lower ? taylor(sc) : vf{});
        store(w.ds + t * C + j * W, lower ? dp * (splat(1.0f) + sc) : vf{});
      }
    }
  };
  // prefetch the inputs of (row, chunk c), spread over the products of the current one
  auto ahead_of = [&](const Row& row, int64_t c, Ahead& ahead) {
    if (c < 0 || c >= chunks) return;
    const int64_t t0 = c * C;
    ahead.add(row.q, t0, q ? qs[2] : 0, int(f));
    ahead.add(row.k, t0, ks[2], int(f));
    ahead.add(row.v, t0, vs[2], int(dv));
    ahead.add(row.o, t0, q ? os[2] : 0, int(dv));
    ahead.add(row.dout, t0, q ? douts[2] : 0, int(dv));
    ahead.n = int(std::min<int64_t>(C, length - t0));
  };

  // Groups of rows advance chunk by chunk side by side (neighbouring heads: one run of memory per token).
  for (int64_t gs = g0; gs < g1; gs += GROUP) {
    const int nr = int(std::min<int64_t>(GROUP, g1 - gs));
    Row rows[GROUP];
    for (int r = 0; r < nr; ++r) rows[r] = row_of(gs + r, gs);
    // one sweep, backwards, with G = dL/dU after the chunk: dq, dk, dv
    for (int r = 0; r < nr; ++r) {
      std::memset(rows[r].grad, 0, sizeof(float) * per_state);
      if (dfinal) unpack_state(dfinal + (gs + r) * int64_t(dc) * dv1, dc, int(dv), dvp, rows[r].grad, rows[r].grad_den);
    }
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * C;
      const int n = int(std::min<int64_t>(C, length - t0));
      for (int r = 0; r < nr; ++r) {
        const Row& row = rows[r];
        float* gst = row.grad;
        float* gden = row.grad_den;
        Ahead ahead;
        if (r + 1 < nr) {
          ahead_of(rows[r + 1], c, ahead);
        } else {
          ahead_of(rows[0], c - 1, ahead);
        }
        load_chunk(row, t0, n);
        if (q) {
          // through the read of the saved state U: dfq = U g^T + u gden^T, then dq from the features
          const float* uc = saved + ((gs + r) * chunks + c) * per_state;
          gemm(dc, uc, dvp, 1, w.gt, C, int(dv), w.dfeat, C, C / W, true, &ahead);
          rank1(dc, uc + int64_t(dc) * dvp, w.gden, w.dfeat);
          features_backward(w.dfeat, w.qt, int(f), w.dxq, false);
          // the intra-chunk term: dq += ds k, and (below) dk += ds^T q, dv += P^T g
          intra();
          for (int i = 0; i < C; i += R) {
            const int rr = std::min(R, C - i);
            block(rr, w.ds + i * C, C, 1, w.kr, fp, i + rr, w.dqc + i * fp, fp, fv, true);
          }
          float* dxr = w.s;  // (free again) dx token-major, [C, Fp]
          transpose(w.dxq, C, dxr, fp, fp, C);
          for (int t = 0; t < n; ++t) {
            float* dqt = row.dq + (t0 + t) * dqs[2];
            for (int i = 0; i < f; ++i) dqt[i] = dxr[t * fp + i] + w.dqc[t * fp + i];
          }
        }
        // through the state: d fk = G [v, 1]^T (dk from the features of the scaled keys), d[v] = fk^T G
        features(w.kt, int(f), w.feat, true);
        gemm(dc, gst, dvp, 1, w.vt, C, int(dv), w.dfeat, C, C / W, true, &ahead);
        rank1(dc, gden, w.ones, w.dfeat);
        features_backward(w.dfeat, w.kt, int(f), w.dx, true);
        gemm(C, w.feat, 1, C, gst, dvp, dc, w.dvc, dvp, nvec, true, &ahead);
        if (q) {
          for (int i = 0; i < C; i += R) {  // rows s of ds^T q and P^T g: the terms t >= s
            const int rr = std::min(R, C - i);
            block(rr, w.ds + i * C + i, 1, C, w.qr + i * fp, fp, C - i, w.dkc + i * fp, fp, fv, true);
            block(rr, w.p + i * C + i, 1, C, w.g + i * dvp, dvp, C - i, w.dvc + i * dvp, dvp, nvec, false);
          }
        } else {
          std::memset(w.dkc, 0, sizeof(float) * C * fp);
        }
        float* dxr = w.s;  // (free again) dx token-major, [C, Fp]
        transpose(w.dx, C, dxr, fp, fp, C);
        for (int t = 0; t < n; ++t) {
          float* dkt = row.dk + (t0 + t) * dks[2];
          float* dvt = row.dv + (t0 + t) * dvs[2];
          if (row.keep && !row.keep[t0 + t]) {
            std::memset(dkt, 0, sizeof(float) * f);
            std::memset(dvt, 0, sizeof(float) * dv);
            continue;
          }
          for (int i = 0; i < f; ++i) dkt[i] = (dxr[t * fp + i] + w.dkc[t * fp + i]) * kscale;
          std::memcpy(dvt, w.dvc + t * dvp, sizeof(float) * dv);
        }
        if (!q) continue;
        // the chunk's read of U: G += fq [g, gden]
        features(w.qt, int(f), w.feat, false);
        gemm(dc, w.feat, C, 1, w.g, dvp, n, gst, dvp, nvec, false, &ahead);
        row_dots(dc, w.feat, w.gden, gden);
      }
    }
    for (int r = 0; r < nr; ++r) {
      pack_state(rows[r].grad, rows[r].grad_den, dc, int(dv), dvp, dstart + (gs + r) * int64_t(dc) * dv1);
    }
  }
  return 0;
}

}  // extern "C"
