// CPU kernels behind gptoss_jax.ops (an XLA FFI library of cpu_kernels.cc, cpu_unembed.cc and
// cpu_mxfp4.cc, built on first use by ops/native.py with -O3 -march=native for the machine it runs on).
//
// gptoss_grouped_matmul: y [m, out] (float32) = rows of x [m, in] (float32), grouped consecutively by
// group_sizes [g], times w[layer, group] for w [layers, g, in, out] in float32 or bfloat16 (or its
// uint16 bits); rows past the last group are zero. The weight is read where it lies: XLA:CPU copies
// each expert's slice before its dot, which holds a decode step to about a third of the memory
// bandwidth (bench config, 8 layers' gate_up, batch 1: 40.6 ms tiled, 13.6 ms here).
//
// (gptoss_unembed is in cpu_unembed.cc.)
//
// gptoss_grouped_matmul: a group of at most kStreamRows rows (decode: each expert sees a few tokens)
// is one thread's, its weight matrix read once front to back, four weight rows at a time, into
// y rows kept in L1 (see Stream). Larger groups go four rows at a time, 64 output columns at a
// time: 4 x 64 float32 accumulators stay in registers while each weight row segment is loaded once
// per four rows (from L2 after the first four), over 32 weight rows at a time (see kDepth), their
// columns split between threads; in float32 each output sums over the weight rows in order. With
// bfloat16 weights, groups of 16 rows and more take AMX tiles where the CPU has them (AmxGroup).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif

#include "cpu_amx.h"
#include "cpu_pool.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace gptoss;  // NOLINT: the shared vector types

namespace {

constexpr int kRows = 4;
constexpr int kColumns = 64;


// y[r, c:c+64] += sum_{i < depth} x[r, i] * w[i, c:c+64] for r < R (x rows `in` apart, w rows `out`
// apart): R x 4 accumulators in registers, loaded from y and stored back (the same sums, in the same
// order, as one pass over every i).
template <int R, typename W>
void Block64(const float* x, int64_t in, int64_t depth, const W* w, int64_t out, float* y) {
  F16 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = Load16(y + r * out + 16 * q);
  }
  for (int64_t i = 0; i < depth; ++i) {
    const W* wr = w + i * out;
    const F16 w0 = Load16(wr), w1 = Load16(wr + 16), w2 = Load16(wr + 32), w3 = Load16(wr + 48);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * in + i];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
      acc[r][2] += xv * w2;
      acc[r][3] += xv * w3;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) Store16(y + r * out + 16 * q, acc[r][q]);
  }
}

// The same for fewer than 64 columns (a matrix's last ones), one value at a time.
template <typename W>
void BlockTail(const float* x, int rows, int64_t in, int64_t depth, const W* w, int64_t out, float* y, int64_t n) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      float sum = y[r * out + c];
      for (int64_t i = 0; i < depth; ++i) sum += x[r * in + i] * Widen(w[i * out + c]);
      y[r * out + c] = sum;
    }
  }
}

template <typename W>
void Block(const float* x, int rows, int64_t in, int64_t depth, const W* w, int64_t out, float* y, int64_t c0,
           int64_t c1) {
  if (c1 - c0 < kColumns) return BlockTail(x, rows, in, depth, w + c0, out, y + c0, c1 - c0);
  switch (rows) {
    case 1: return Block64<1>(x, in, depth, w + c0, out, y + c0);
    case 2: return Block64<2>(x, in, depth, w + c0, out, y + c0);
    case 3: return Block64<3>(x, in, depth, w + c0, out, y + c0);
    default: return Block64<4>(x, in, depth, w + c0, out, y + c0);
  }
}

// A group goes over kDepth weight rows at a time: those (kDepth pages at most) stay in the L1 TLB
// and L2 for every column strip and row block, where one pass down a 64-column strip touches a new
// 4 KB page at each weight row (XLA:CPU allocates without huge pages). One layer of the bench
// config's gate_up, float32, ms one pass / blocked: 8 rows per expert 39.5 / 17.3, 16 rows 39.4 /
// 26.5, 64 rows 112.0 / 54.3; 1-2 rows the same.
constexpr int64_t kDepth = 32;

// y[r, :cols] += x[r, :] . w[:, :cols] for r < R (x rows `in` apart, w [in, out], y rows `out` apart):
// the weight rows four at a time, in order, over every column, the y rows (R x cols floats) in L1.
// Read front to back (and prefetched 8 weight rows ahead: one core alone reads ~12 GB/s here), a
// matrix streams where the column-strip blocks read 256 bytes at a time from 32 pages. Bench
// config gate_up, 8 layers, batch 16 (2-3 rows per expert), ms blocked / streamed: float32 95-111 /
// 89-93; bfloat16 79-87 / 61-66, prefetched 48-57.
template <int R, typename W>
void Stream(const float* x, int64_t in, const W* w, int64_t out, int64_t cols, float* y) {
  const int64_t vectors = cols / 16 * 16;
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    float xs[R][4];
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < 4; ++k) xs[r][k] = x[r * in + i + k];
    }
    const W* w0 = w + i * out;
    for (int64_t c = 0; c < vectors; c += 16) {
      if (sizeof(W) == 4 || (c & 31) == 0) {  // each 64-byte line of the weight rows 8 ahead
        for (int k = 0; k < 4; ++k) __builtin_prefetch(w0 + (8 + k) * out + c);
      }
      const F16 a = Load16(w0 + c), b = Load16(w0 + out + c), e = Load16(w0 + 2 * out + c),
                f = Load16(w0 + 3 * out + c);
      for (int r = 0; r < R; ++r) {
        F16 acc = Load16(y + r * out + c);
        acc += xs[r][0] * a;
        acc += xs[r][1] * b;
        acc += xs[r][2] * e;
        acc += xs[r][3] * f;
        Store16(y + r * out + c, acc);
      }
    }
    for (int64_t c = vectors; c < cols; ++c) {
      for (int r = 0; r < R; ++r) {
        float sum = y[r * out + c];
        for (int k = 0; k < 4; ++k) sum += xs[r][k] * Widen(w0[k * out + c]);
        y[r * out + c] = sum;
      }
    }
  }
  for (; i < in; ++i) {
    for (int r = 0; r < R; ++r) {
      for (int64_t c = 0; c < cols; ++c) y[r * out + c] += x[r * in + i] * Widen(w[i * out + c]);
    }
  }
}


#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX: bfloat16 tile products (TDPBF16PS: C [16 x 16] float32 += A [16 x 32] . B [32 x 16]) for the
// groups the column-strip blocks would take (prefill: dozens of rows per expert), with x rounded to
// bfloat16. The kernel asks Linux for the tile state once per process (arch_prctl); where that is
// refused, or the sizes are not multiples of 32, the float32 blocks run instead. Bench config
// gate_up, bfloat16, one layer (32 experts), ms float32 blocks / tiles: 64 rows per expert 85-110 /
// 28-35, 256 rows 400-444 / 109-111.
constexpr int64_t kAmxRows = 16;  // fewer rows fill too little of a 32-row pass (8 rows: 16-20 ms, blocks 11-17)

// Weight rows a and b interleaved over 16 columns: [a[c], b[c]] pairs, the tiles' B layout.
inline __m512i Pair16(const uint16_t* a, const uint16_t* b) {
  alignas(64) static const uint16_t kIndex[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i hi = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  return _mm512_permutex2var_epi16(lo, _mm512_load_si512(kIndex), hi);
}

// y[0:n, c0:c1) = xb[0:n, :] . w[:, c0:c1) for bfloat16 bits xb [n, in] and w [in, out]; in and
// c1 - c0 multiples of 32. Per 32 columns the weight strip is laid out once as pairs of rows
// (the tiles' B layout), then every 32 rows of x pass over it.
void AmxGroup(const uint16_t* xb, int64_t n, int64_t in, const uint16_t* w, int64_t out, float* y, int64_t c0,
              int64_t c1) {
  AmxConfigure();
  const int64_t padded = (n + 31) / 32 * 32;
  std::vector<uint16_t> a(padded * in, 0);
  std::memcpy(a.data(), xb, sizeof(uint16_t) * n * in);
  std::vector<uint16_t> b(in * 32);  // [in / 2][32 columns][2]
  alignas(64) float c[32 * 32];
  for (int64_t col = c0; col < c1; col += 32) {
    for (int64_t p = 0; p < in / 2; ++p) {
      const uint16_t* row = w + 2 * p * out + col;
      const __m512i lo = Pair16(row, row + out), hi = Pair16(row + 16, row + out + 16);
      _mm512_storeu_si512(b.data() + p * 64, lo);
      _mm512_storeu_si512(b.data() + p * 64 + 32, hi);
    }
    for (int64_t r0 = 0; r0 < padded; r0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < in; k += 32) {
        _tile_loadd(4, a.data() + r0 * in + k, in * 2);
        _tile_loadd(5, a.data() + (r0 + 16) * in + k, in * 2);
        _tile_loadd(6, b.data() + (k / 2) * 64, 128);
        _tile_loadd(7, b.data() + (k / 2) * 64 + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, 128);
      _tile_stored(1, c + 16, 128);
      _tile_stored(2, c + 16 * 32, 128);
      _tile_stored(3, c + 16 * 32 + 16, 128);
      for (int64_t r = 0; r < 32 && r0 + r < n; ++r) {
        std::memcpy(y + (r0 + r) * out + col, c + r * 32, sizeof(float) * 32);
      }
    }
  }
  _tile_release();
}
#endif

constexpr int64_t kStreamRows = 4;

// One thread's share: the groups of at most kStreamRows rows dealt out by turns (whole), and
// columns [c0, c1) of every larger group.
template <typename W>
void Work(const float* x, const uint16_t* xb, const W* w, const int32_t* sizes, int64_t groups, int64_t m,
          int64_t in, int64_t out, float* y, int64_t c0, int64_t c1, int thread, int threads) {
  // fewer small groups than threads (a projection: one group): each thread streams its columns
  // of every small group (bfloat16 [2880, 4096], one row: one thread 1.2 ms, two 0.9)
  int64_t smalls = 0, seen = 0;
  for (int64_t g = 0; g < groups && seen < m; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(sizes[g], 0), m - seen);
    smalls += n > 0 && n <= kStreamRows;
    seen += n;
  }
  const bool split = smalls < threads;
  int64_t start = 0, small = 0;
  for (int64_t g = 0; g < groups && start < m; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(sizes[g], 0), m - start);
    const W* wg = w + g * in * out;
    const float* xg = x + start * in;
    float* yg = y + start * out;
    start += n;
    if (n == 0) continue;
    if (n <= kStreamRows) {
      if (!split && small++ % threads != thread) continue;
      const int64_t s0 = split ? c0 : 0, s1 = split ? c1 : out;  // columns [s0, s1)
      if (s1 <= s0) continue;
      switch (n) {
        case 1: Stream<1>(xg, in, wg + s0, out, s1 - s0, yg + s0); break;
        case 2: Stream<2>(xg, in, wg + s0, out, s1 - s0, yg + s0); break;
        case 3: Stream<3>(xg, in, wg + s0, out, s1 - s0, yg + s0); break;
        default: Stream<4>(xg, in, wg + s0, out, s1 - s0, yg + s0); break;
      }
      continue;
    }
    int64_t blocked = c0;  // the columns from here on go to the float32 blocks
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if constexpr (std::is_same_v<W, uint16_t>) {
      if (xb != nullptr && n >= kAmxRows) {
        blocked = c0 + (c1 - c0) / 32 * 32;
        if (blocked > c0) AmxGroup(xb + (start - n) * in, n, in, wg, out, yg, c0, blocked);
      }
    }
#endif
    for (int64_t i0 = 0; i0 < in; i0 += kDepth) {
      const int64_t d = std::min(kDepth, in - i0);
      for (int64_t c = blocked; c < c1; c += kColumns) {
        for (int64_t r = 0; r < n; r += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r));
          Block(xg + r * in + i0, rows, in, d, wg + i0 * out, out, yg + r * out, c, std::min(c + kColumns, c1));
        }
      }
    }
  }
}

template <typename W>
void Run(const float* x, const W* w, const int32_t* sizes, int64_t groups, int64_t m, int64_t in, int64_t out,
         float* y) {
  std::memset(y, 0, sizeof(float) * m * out);
  // the pool's threads only where the work pays for waking them
  const int64_t work = m * in * out;
  const int hardware = gptoss::Pool::Get().Threads();
  const int64_t blocks = (out + kColumns - 1) / kColumns;
  const int threads = work < (int64_t{1} << 20) ? 1 : static_cast<int>(std::min<int64_t>(hardware, blocks));
  const int64_t per = (blocks + threads - 1) / threads * kColumns;
  std::vector<uint16_t> rounded;  // x in bfloat16 for the tiles (bfloat16 weights)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  // only when some group will take the tiles: not on every decode step
  const bool tiled = std::any_of(sizes, sizes + groups, [](int32_t size) { return size >= kAmxRows; });
  if (std::is_same_v<W, uint16_t> && tiled && in % 32 == 0 && AmxPermitted()) {
    rounded.resize(m * in);
    for (int64_t k = 0; k < m * in; ++k) rounded[k] = RoundToBf16(x[k]);
  }
#endif
  const uint16_t* xb = rounded.empty() ? nullptr : rounded.data();
  gptoss::Pool::Get().Run(threads, [&](int t) {
    const int64_t c0 = std::min(out, t * per), c1 = std::min(out, c0 + per);
    Work<W>(x, xb, w, sizes, groups, m, in, out, y, c0, c1, t, threads);
  });
}

ffi::Error GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != xd[1] || group_sizes.dimensions().size() != 1 ||
      group_sizes.dimensions()[0] != wd[1]) {
    return ffi::Error::InvalidArgument("gptoss_grouped_matmul: x [m, in], w [layers, g, in, out], group_sizes [g]");
  }
  const int64_t m = xd[0], in = xd[1], layers = wd[0], groups = wd[1], out = wd[3];
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1);
  const int64_t offset = l * groups * in * out;
  const int32_t* sizes = group_sizes.typed_data();
  switch (w.element_type()) {
    case ffi::F32:
      Run(x.typed_data(), static_cast<const float*>(w.untyped_data()) + offset, sizes, groups, m, in, out,
          y->typed_data());
      break;
    case ffi::BF16:
    case ffi::U16:
      Run(x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()) + offset, sizes, groups, m, in, out,
          y->typed_data());
      break;
    default:
      return ffi::Error::InvalidArgument("gptoss_grouped_matmul: w must be float32, bfloat16 or its uint16 bits");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
