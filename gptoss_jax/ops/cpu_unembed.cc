// gptoss_unembed: y [m, v] (float32) = x [m, d] (float32) times table [v, d] transposed, the table in
// float32 or bfloat16 (or its bits; x is then rounded to bfloat16 where the CPU has bfloat16 dot
// products). XLA:CPU's dot reads the bench config's float32 unembedding (823 MB) at bandwidth for
// one row but takes twice as long for 16 (40.8 / 87.1 ms); here a few table rows stay in L1 while
// every row of x passes over them, so the table is read once whatever m is. Rows marked invalid (an
// idle decode slot) are skipped (and zero). Built with cpu_kernels.cc into one library (ops/native.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "cpu_amx.h"
#include "cpu_pool.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace gptoss;  // NOLINT: the shared vector types

namespace {

constexpr int kRows = 4;  // rows of x per pass over a few table rows
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr int64_t kAmxUnembedRows = 4;  // fewer: the dot products read the table at bandwidth already
#endif

// The vector the dot products step by: with AVX2 8 floats, R x J = 4 x 3 sums in registers (12 of
// the 16; as pairs of 8 they spilled: bench config unembedding, float32, 8 rows 66 ms where 4 rows
// took 32), else `F16` (one AVX-512 register), 4 x 4 sums.
#if defined(__AVX2__) && !defined(__AVX512F__)
using DotVector = __m256;
constexpr int kDotLanes = 8;
constexpr int64_t kTableRows = 3;
template <typename T>
inline DotVector LoadDot(const T* p) { return Load8(p); }
inline DotVector ZeroDot() { return _mm256_setzero_ps(); }
inline DotVector Fma(DotVector a, DotVector b, DotVector acc) { return _mm256_fmadd_ps(a, b, acc); }
inline float SumDot(DotVector v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += lanes[k];
  return sum;
}
#else
using DotVector = F16;
constexpr int kDotLanes = 16;
constexpr int64_t kTableRows = 4;
template <typename T>
inline DotVector LoadDot(const T* p) { return Load16(p); }
inline DotVector ZeroDot() { return Zero16(); }
inline DotVector Fma(const DotVector& a, const DotVector& b, DotVector acc) { return acc += a * b; }
inline float SumDot(const DotVector& v) {
  float sum = 0.0f;
  for (int k = 0; k < 16; ++k) sum += v[k];
  return sum;
}
#endif

// y[r][j] = x[r] . t[j] for r < R, j < J (x[r], y[r]: row pointers; t: J consecutive table rows of d).
template <int R, int J, typename W>
void Dots(const float* const* x, int64_t d, const W* t, float* const* y) {
  DotVector acc[R][J];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) acc[r][j] = ZeroDot();
  }
  int64_t i = 0;
  for (; i + kDotLanes <= d; i += kDotLanes) {
    DotVector w[J];
    for (int j = 0; j < J; ++j) {
      // the next J table rows, once per line: short rows (2 KB of bfloat16) end before the hardware
      // prefetcher ramps up (bench config unembedding, batch 1, bfloat16: 33.0 -> 16.5 ms; float32 36.3 -> 31.2)
      if (i % (64 / sizeof(W)) == 0) __builtin_prefetch(t + (J + j) * d + i);
      w[j] = LoadDot(t + j * d + i);
    }
    for (int r = 0; r < R; ++r) {
      const DotVector xv = LoadDot(x[r] + i);
      for (int j = 0; j < J; ++j) acc[r][j] = Fma(xv, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      float sum = SumDot(acc[r][j]);
      for (int64_t k = i; k < d; ++k) sum += x[r][k] * Widen(t[j * d + k]);
      y[r][j] = sum;
    }
  }
}

#if defined(__AVX512BF16__)
// The same for a bfloat16 table and x rounded to bfloat16 (X = uint16_t bits): vdpbf16ps multiplies
// 32 pairs into 16 float32 sums, twice the products of a float32 FMA and no widening of the table.
// Bench config unembedding, ms float32 FMAs / vdpbf16ps (same run): 8 rows 49-52 / 33-35, 16 rows
// 85-88 / 62-64.
template <int R, int J>
void Dots(const uint16_t* const* x, int64_t d, const uint16_t* t, float* const* y) {
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    __m512bh w[J];
    for (int j = 0; j < J; ++j) {
      __builtin_prefetch(t + (J + j) * d + i);
      w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(t + j * d + i));
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x[r] + i));
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, w[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      float sum = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t k = i; k < d; ++k) sum += Widen(x[r][k]) * Widen(t[j * d + k]);
      y[r][j] = sum;
    }
  }
}
#endif

template <int J, typename X, typename W>
void DotsRows(const X* const* x, int64_t m, int64_t d, const W* t, float* const* y, int64_t j) {
  for (int64_t r = 0; r < m; r += kRows) {
    float* yj[kRows];
    for (int64_t k = 0; k < kRows && r + k < m; ++k) yj[k] = y[r + k] + j;
    switch (std::min<int64_t>(kRows, m - r)) {
      case 1: Dots<1, J>(x + r, d, t, yj); break;
      case 2: Dots<2, J>(x + r, d, t, yj); break;
      case 3: Dots<3, J>(x + r, d, t, yj); break;
      default: Dots<4, J>(x + r, d, t, yj); break;
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Table rows [j0, j0 + 16k) of a bfloat16 table on AMX tiles: 16 table rows (A, as they lie) times
// x's rows laid out once in pairs (B), up to 32 rows of x per table read, y written transposed.
// Bench config, ms vdpbf16ps / tiles: 8 rows 33-35 / 17-23, 16 rows 62-64 / 19-24 (the table at bandwidth).
void UnembedRowsAmx(const uint16_t* const* x, const uint16_t* t, int64_t m, int64_t d, float* const* y, int64_t j0,
                    int64_t j1) {
  AmxConfigure();
  const int64_t chunks = d / 32, blocks = (m + 15) / 16;
  std::vector<uint16_t> b(blocks * chunks * 512, 0);  // per 16 rows of x, per 32 of d: [16 pairs][16 rows][2]
  for (int64_t row = 0; row < m; ++row) {
    const int64_t block = row / 16, r = row % 16;
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t pair = 0; pair < 16; ++pair) {
        std::memcpy(b.data() + ((block * chunks + k) * 16 + pair) * 32 + r * 2, x[row] + k * 32 + 2 * pair, 4);
      }
    }
  }
  alignas(64) float c[2][16 * 16];
  for (int64_t j = j0; j + 16 <= j1; j += 16) {
    for (int64_t block = 0; block < blocks; block += 2) {
      const bool two = block + 1 < blocks;
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < chunks; ++k) {
        _tile_loadd(2, t + j * d + k * 32, d * 2);
        _tile_loadd(3, b.data() + (block * chunks + k) * 512, 64);
        _tile_dpbf16ps(0, 2, 3);
        if (two) {
          _tile_loadd(4, b.data() + ((block + 1) * chunks + k) * 512, 64);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, c[0], 64);
      if (two) _tile_stored(1, c[1], 64);
      for (int q = 0; q < (two ? 2 : 1); ++q) {
        for (int64_t r = 0; r < 16 && (block + q) * 16 + r < m; ++r) {
          float* yr = y[(block + q) * 16 + r] + j;
          for (int v = 0; v < 16; ++v) yr[v] = c[q][v * 16 + r];
        }
      }
    }
  }
  _tile_release();
}
#endif

// Table rows [j0, j1): kTableRows at a time (every row of x over them), then one at a time.
template <typename X, typename W>
void UnembedRows(const X* const* x, const W* t, int64_t m, int64_t d, float* const* y, int64_t j0, int64_t j1) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<X, uint16_t> && std::is_same_v<W, uint16_t>) {
    if (m >= kAmxUnembedRows && d % 32 == 0 && AmxPermitted()) {
      const int64_t tiled = j0 + (j1 - j0) / 16 * 16;
      UnembedRowsAmx(x, t, m, d, y, j0, tiled);
      j0 = tiled;
    }
  }
#endif
  int64_t j = j0;
  for (; j + kTableRows <= j1; j += kTableRows) DotsRows<kTableRows>(x, m, d, t + j * d, y, j);
  for (; j < j1; ++j) DotsRows<1>(x, m, d, t + j * d, y, j);
}

// Only the rows r with valid[r] != 0 are computed; the others are zero. Rows x[r] are X's (float32,
// or bfloat16 bits under a bfloat16 table).
template <typename X, typename W>
void UnembedValid(const X* x, const W* t, const int32_t* valid, int64_t m, int64_t d, int64_t v, float* y) {
  std::vector<const X*> xs;
  std::vector<float*> ys;
  for (int64_t r = 0; r < m; ++r) {
    if (valid[r]) {
      xs.push_back(x + r * d);
      ys.push_back(y + r * v);
    } else {
      std::memset(y + r * v, 0, sizeof(float) * v);
    }
  }
  const int64_t n = static_cast<int64_t>(xs.size());
  if (n == 0) return;
  const int threads = n * d * v < (int64_t{1} << 20) ? 1 : gptoss::Pool::Get().Threads();
  // table rows split in multiples of 16, so that the tiles and the dot products share the same rows
  // whatever the number of threads (a row of x gets the same logits whatever the other rows)
  const int64_t per = ((v + threads - 1) / threads + 15) / 16 * 16;
  gptoss::Pool::Get().Run(threads, [&](int k) {
    const int64_t j0 = std::min(v, k * per), j1 = std::min(v, j0 + per);
    if (j0 < j1) UnembedRows<X, W>(xs.data(), t, n, d, ys.data(), j0, j1);
  });
}

template <typename W>
void RunUnembed(const float* x, const W* t, const int32_t* valid, int64_t m, int64_t d, int64_t v, float* y) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<W, uint16_t>) {  // x rounded to bfloat16, as the table's dtype
    std::vector<uint16_t> rounded(m * d);
    for (int64_t k = 0; k < m * d; ++k) rounded[k] = RoundToBf16(x[k]);
    return UnembedValid(rounded.data(), t, valid, m, d, v, y);
  }
#endif
  UnembedValid(x, t, valid, m, d, v, y);
}

ffi::Error Unembed(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer table, ffi::Buffer<ffi::S32> valid,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto td = table.dimensions();
  if (xd.size() != 2 || td.size() != 2 || td[1] != xd[1] || valid.dimensions().size() != 1 ||
      valid.dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument("gptoss_unembed: x [m, d], table [v, d], valid [m]");
  }
  const int64_t m = xd[0], d = xd[1], v = td[0];
  switch (table.element_type()) {
    case ffi::F32:
      RunUnembed(x.typed_data(), static_cast<const float*>(table.untyped_data()), valid.typed_data(), m, d, v,
                 y->typed_data());
      break;
    case ffi::BF16:
    case ffi::U16:
      RunUnembed(x.typed_data(), static_cast<const uint16_t*>(table.untyped_data()), valid.typed_data(), m, d,
                 v, y->typed_data());
      break;
    default:
      return ffi::Error::InvalidArgument("gptoss_unembed: the table must be float32, bfloat16 or its uint16 bits");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossUnembed, Unembed,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
