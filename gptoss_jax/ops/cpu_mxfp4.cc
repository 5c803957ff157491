// gptoss_mxfp4_grouped_matmul: y [m, out] (float32) = rows of x [m, in] (float32), grouped
// consecutively by group_sizes [g], times the MXFP4 matrix W[layer, group] [in, out], read packed
// where it lies: blocks uint8 [layers, g, out, 16, in/32] (byte j of block k holds the e2m1 codes of
// inputs 32k + 2j, low nibble, and 32k + 2j + 1) and e8m0 scales uint8 [layers, g, out, in/32]
// (`gptoss_jax.ops.mxfp4`'s in-memory layout). Rows past the last group are zero. The values are
// exact (e2m1 times a power of two); only the order of the float32 sums differs from the dense
// product's. Built with cpu_kernels.cc into one library (ops/native.py).
//
// x is first laid out once per call in the order the decoded codes come out ("xp", see XpIndex), so
// that the 64 values decoded from 2 x 16 code bytes of an output row meet 64 consecutive inputs. Then, per output row:
// - groups of at most kFusedRows rows (decode: each expert sees a token or a few) decode 32 code
//   bytes at a time straight into registers (AVX2: each e2m1 value's float32 bytes by byte
//   shuffles, see Decode32) and multiply them with x's rows, each block's scale applied once per
//   chunk; the weights are read once;
// - larger groups (prefill) decode 16 output rows at a time into a float32 panel in L2, input-major
//   (AVX2: 8 x 8 transposes in registers), the scales folded in; then 6 rows of x at a time take
//   their outer products with it (2 x 6 vectors of sums in registers).
// Without AVX2 the second way serves every group, the decode done one code at a time.
// With `int8_activations` (`Config.expert_activations`, off by default) decode groups instead take x
// rounded to int8 per block of 32 and sum byte products in int32, as llama.cpp does (see Quantize).
// Output rows are split between the pool's threads (cpu_pool.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_MXFP4_AVX2 1
#endif

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockBytes = 16;  // bytes of codes per block of 32 inputs
constexpr int64_t kChunkBlocks = 16;  // blocks per chunk: 512 inputs, xp's unit
constexpr int64_t kChunkFloats = kChunkBlocks * 32;
constexpr int kFusedRows = 4;

typedef float F8 __attribute__((vector_size(32)));

constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

inline float ScaleOf(uint8_t e) {  // e8m0 -> 2^(e - 127) as its float32 bits (0 -> 0, 255 -> inf)
  const uint32_t u = static_cast<uint32_t>(e) << 23;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline F8 Load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float Sum8(F8 v) {
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}

// Where input 32 (16c + b) + 2j + n (block b < 16 of chunk c, byte j, nibble n) lies in a row of
// xp: byte pairs (j = 2p, 2p + 1), nibbles, quarters q of 4 blocks (even blocks of 0-7, odd of 0-7,
// even of 8-15, odd of 8-15), the two bytes of the pair, then the 4 blocks: the order `Decode32`
// leaves 64 values in.
inline int64_t XpIndex(int64_t j, int64_t n, int64_t b) {
  const int64_t quarter = (b / 8) * 2 + b % 2, t = (b % 8) / 2;
  return (((j / 2) * 2 + n) * 4 + quarter) * 8 + (j % 2) * 4 + t;
}

// x [m, in] -> xp [m, chunks * 512] (`XpIndex` within each chunk of 512), zero past the last block.
std::vector<float> Permute(const float* x, int64_t m, int64_t in, int64_t chunks) {
  const int64_t blocks = in / 32, width = chunks * kChunkFloats;
  std::vector<float> xp(m * width, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      float* dst = xp.data() + r * width + (k / kChunkBlocks) * kChunkFloats;
      const float* src = x + r * in + 32 * k;
      for (int64_t j = 0; j < 16; ++j) {
        for (int64_t n = 0; n < 2; ++n) dst[XpIndex(j, n, k % kChunkBlocks)] = src[2 * j + n];
      }
    }
  }
  return xp;
}

// One output row's codes and scales, chunk by chunk (C blocks per chunk): chunk c's C bytes of byte
// j, and its C scales. When the blocks do not fill the last chunk, its scales are copied zero-padded
// (nothing is added past the row: the codes read there, finite, meet zero scales and zero inputs),
// and so are its codes where reading on would pass the end of the weight (`end`).
template <int64_t C>
struct ChunkedRow {
  const uint8_t* codes;  // [16, blocks]
  const uint8_t* scales;  // [blocks]
  int64_t blocks, full;  // full: chunks of C blocks read in place
  bool copied;
  alignas(32) uint8_t tail_scales[C];
  alignas(32) uint8_t tail_codes[16][C];

  ChunkedRow(const uint8_t* codes, const uint8_t* scales, int64_t blocks, const uint8_t* end)
      : codes(codes), scales(scales), blocks(blocks), full(blocks / C), copied(false) {
    const int64_t start = full * C, n = blocks - start;
    if (n == 0) return;
    std::memset(tail_scales, 0, sizeof tail_scales);
    std::memcpy(tail_scales, scales + start, n);
    copied = codes + 16 * blocks + C > end;
    if (!copied) return;
    std::memset(tail_codes, 0, sizeof tail_codes);
    for (int64_t j = 0; j < 16; ++j) std::memcpy(tail_codes[j], codes + j * blocks + start, n);
  }
  const uint8_t* Codes(int64_t c) const { return c < full || !copied ? codes + c * C : tail_codes[0]; }
  int64_t Stride(int64_t c) const { return c < full || !copied ? blocks : C; }  // from byte j to j + 1
  const uint8_t* Scales(int64_t c) const { return c < full ? scales + c * C : tail_scales; }
};
using Row = ChunkedRow<kChunkBlocks>;

#if defined(GPTOSS_MXFP4_AVX2)
// 16 code bytes of byte j and 16 of byte j + 1 (the same 16 blocks) -> 64 values as 8 x 8 floats,
// in xp's order (v[4n + q]: nibble n, quarter q of the blocks of byte j, then of byte j + 1). A
// float32 e2m1 value is a bfloat16 one: two byte shuffles give its two bytes, an unpack makes
// them words, and a shift or a mask places the even or the odd words (14 shuffle-port operations
// per 64 values). AMD EPYC (Zen 3), one core, one expert's gate_up [2880, 5760] at one row, ms:
// fp16 bytes + vcvtph2ps 1.43, dword unpacks 1.24, these words 1.21-1.27 (1.10 from L3): the loop
// is compute-bound at ~7-8 GB/s of packed weights per core.
inline void Decode32(const uint8_t* byte_j, const uint8_t* byte_j1, __m256* v) {
  const __m256i top = _mm256_setr_epi8(0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, -0x80, -0x41, -0x41, -0x41,
                                       -0x40, -0x40, -0x40, -0x40, 0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40,
                                       -0x80, -0x41, -0x41, -0x41, -0x40, -0x40, -0x40, -0x40);  // 0x80, 0xBF, 0xC0
  const __m256i second = _mm256_setr_epi8(0x00, 0x00, -0x80, -0x40, 0x00, 0x40, -0x80, -0x40, 0x00, 0x00, -0x80,
                                          -0x40, 0x00, 0x40, -0x80, -0x40, 0x00, 0x00, -0x80, -0x40, 0x00, 0x40,
                                          -0x80, -0x40, 0x00, 0x00, -0x80, -0x40, 0x00, 0x40, -0x80, -0x40);
  const __m256i nibble = _mm256_set1_epi8(0x0F), odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256i b = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(byte_j))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(byte_j1)), 1);
  const __m256i codes[2] = {_mm256_and_si256(b, nibble), _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble)};
  for (int n = 0; n < 2; ++n) {
    const __m256i hi = _mm256_shuffle_epi8(top, codes[n]), lo = _mm256_shuffle_epi8(second, codes[n]);
    const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);  // bfloat16 words
    v[4 * n + 0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    v[4 * n + 1] = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
    v[4 * n + 2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    v[4 * n + 3] = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
  }
}

// 16 e8m0 bytes -> s[q]: 2^(e - 127) of quarter q's 4 blocks, twice (xp's order).
inline void Scales16(const uint8_t* p, __m256* s) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m128i q = _mm_shuffle_epi8(b, order);
  const __m128i quarters[4] = {q, _mm_srli_si128(q, 4), _mm_srli_si128(q, 8), _mm_srli_si128(q, 12)};
  for (int k = 0; k < 4; ++k) {
    s[k] = _mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_slli_epi32(_mm_cvtepu8_epi32(quarters[k]), 23)));
  }
}

// y[r] = xp[r] . W[o] for R <= 2 rows (xp rows `width` apart), decoding straight into registers:
// per row four sums, one per quarter of the blocks (each quarter's scales applied once per chunk).
template <int R>
void FusedRow(const Row& row, const float* xp, int64_t width, int64_t chunks, float* y, int64_t y_stride) {
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_ps();
    }
    const float* xc = xp + c * kChunkFloats;
    const uint8_t* codes = row.Codes(c);
  const int64_t stride = row.Stride(c);
    for (int64_t p = 0; p < 8; ++p) {
      __m256 w[8];
      Decode32(codes + 2 * p * stride, codes + (2 * p + 1) * stride, w);
      for (int r = 0; r < R; ++r) {
        const float* xr = xc + r * width + p * 64;
        for (int i = 0; i < 8; ++i) acc[r][i % 4] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i % 4]);
      }
    }
    __m256 s[4];
    Scales16(row.Scales(c), s);
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < 4; ++q) total[r] = _mm256_fmadd_ps(acc[r][q], s[q], total[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    F8 t;
    std::memcpy(&t, &total[r], sizeof t);
    y[r * y_stride] = Sum8(t);
  }
}
#endif

// With int8_activations (off by default), groups of at most kFusedRows rows multiply as llama.cpp
// multiplies MXFP4 weights: each row of x quantized per block of 32 inputs to int8 with one float
// scale (Q8_0: d = max|x| / 127, q = round(x / d)), the codes looked up as doubled e2m1 values
// offset to be unsigned (2 v + 12: 0..24), byte products summed exactly in int32 per block, and each
// block's sum scaled once: y = sum_k (d_k / 2) 2^(e_k - 127) (S_k - 12 sum(q_k)). Only x's rounding
// differs from the float kernel. Larger groups (prefill) keep the float panel path.
constexpr int64_t kQBlocks = 32;  // blocks per chunk of the int8 path
using QRow = ChunkedRow<kQBlocks>;

// Where input 32 b + 4 p + t of a chunk's block b < 32 lies in the chunk's 1024 quantized values:
// per pair p of code bytes (2p, 2p + 1), four registers g of 32 bytes, register g holding blocks
// 4g..4g+3 in its low half and 16+4g..16+4g+3 in its high half, 4 inputs each: the order
// `FusedInt8` decodes the codes in. `QLane`: where block b's scale lies in the chunk's [4][8].
inline int64_t QIndex(int64_t b, int64_t p, int64_t t) {
  return (p * 4 + (b % 16) / 4) * 32 + (b / 16) * 16 + (b % 4) * 4 + t;
}
inline int64_t QLane(int64_t b) { return ((b % 16) / 4) * 8 + (b / 16) * 4 + b % 4; }

struct QuantizedX {  // rows of x, Q8_0
  int64_t chunks;
  std::vector<int8_t> q;  // [m, chunks, 1024] (`QIndex`)
  std::vector<float> half_scale;  // [m, chunks, 32] (`QLane`): d / 2, as the codes are doubled
  std::vector<int32_t> offset;  // [m, chunks, 32]: 12 times the block's sum of q (the codes' offset)
};

QuantizedX Quantize(const float* x, int64_t m, int64_t in) {
  const int64_t blocks = in / 32, chunks = (blocks + kQBlocks - 1) / kQBlocks;
  QuantizedX qx{chunks, std::vector<int8_t>(m * chunks * kQBlocks * 32, 0),
                std::vector<float>(m * chunks * kQBlocks, 0.0f), std::vector<int32_t>(m * chunks * kQBlocks, 0)};
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      const float* src = x + r * in + 32 * k;
      float amax = 0.0f, poison = 0.0f;  // poison: NaN if the block holds a NaN or an infinity
      for (int t = 0; t < 32; ++t) {
        amax = std::max(amax, std::fabs(src[t]));
        poison += 0.0f * src[t];
      }
      const float d = amax / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
      const int64_t chunk = r * chunks + k / kQBlocks, b = k % kQBlocks;
      int32_t sum = 0;
      for (int t = 0; t < 32; ++t) {
        const int v = static_cast<int>(std::nearbyint(src[t] * inverse));
        qx.q[chunk * kQBlocks * 32 + QIndex(b, t / 4, t % 4)] = static_cast<int8_t>(v);
        sum += v;
      }
      qx.half_scale[chunk * kQBlocks + QLane(b)] = 0.5f * d + poison;
      qx.offset[chunk * kQBlocks + QLane(b)] = 12 * sum;
    }
  }
  return qx;
}

#if defined(GPTOSS_MXFP4_AVX2)
// y[r] = x[r0 + r] . W[o] for R <= 2 quantized rows: per pair of code bytes, 64 bytes of codes (32
// blocks) give four registers of 32 unsigned weights (two unpacks, two nibble masks, two shuffles
// each half), multiplied with x's bytes (maddubs) and summed into int32 per block (madd).
template <int R>
void FusedInt8(const QRow& row, const QuantizedX& qx, int64_t r0, float* y, int64_t y_stride) {
  const __m256i table = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15,
                                         16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < qx.chunks; ++c) {
    __m256i acc[R][4];
    for (int r = 0; r < R; ++r) {
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_setzero_si256();
    }
    const uint8_t* codes = row.Codes(c);
    const int64_t stride = row.Stride(c);
    const int8_t* xq = qx.q.data() + (r0 * qx.chunks + c) * kQBlocks * 32;
    const int64_t x_stride = qx.chunks * kQBlocks * 32;
    for (int64_t half = 0; half < 8; half += 4) {  // int16 sums over 4 pairs: |sum| <= 4 x 2 x 24 x 127 < 2^15
      __m256i sums[R][4];
      for (int r = 0; r < R; ++r) {
        for (int g = 0; g < 4; ++g) sums[r][g] = _mm256_setzero_si256();
      }
      for (int64_t p = half; p < half + 4; ++p) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 2 * p * stride));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (2 * p + 1) * stride));
        const __m256i pairs[2] = {_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b)};
        for (int h = 0; h < 2; ++h) {
          const __m256i lo = _mm256_and_si256(pairs[h], nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(pairs[h], 4), nibble);
          const __m256i w[2] = {_mm256_shuffle_epi8(table, _mm256_unpacklo_epi8(lo, hi)),
                                _mm256_shuffle_epi8(table, _mm256_unpackhi_epi8(lo, hi))};
          for (int e = 0; e < 2; ++e) {
            for (int r = 0; r < R; ++r) {
              const __m256i xv = _mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(xq + r * x_stride + (p * 4 + 2 * h + e) * 32));
              sums[r][2 * h + e] = _mm256_add_epi16(sums[r][2 * h + e], _mm256_maddubs_epi16(w[e], xv));
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int g = 0; g < 4; ++g) acc[r][g] = _mm256_add_epi32(acc[r][g], _mm256_madd_epi16(sums[r][g], ones));
      }
    }
    const __m256i s = _mm256_permutevar8x32_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.Scales(c))), order);
    const __m128i halves[2] = {_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)};
    for (int g = 0; g < 4; ++g) {
      const __m128i bytes = g % 2 ? _mm_srli_si128(halves[g / 2], 8) : halves[g / 2];
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(bytes), 23));
      for (int r = 0; r < R; ++r) {
        const int64_t lane = ((r0 + r) * qx.chunks + c) * kQBlocks + 8 * g;
        const __m256i sums = _mm256_sub_epi32(
            acc[r][g], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.offset.data() + lane)));
        total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums),
                                   _mm256_mul_ps(_mm256_loadu_ps(qx.half_scale.data() + lane), scale), total[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    F8 t;
    std::memcpy(&t, &total[r], sizeof t);
    y[r * y_stride] = Sum8(t);
  }
}
#else
// The same one code at a time (exact integer sums; the float sums in another order).
void FusedInt8(const QRow& row, const QuantizedX& qx, int64_t r, float* y) {
  constexpr int kDoubled[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
  float total = 0.0f;
  for (int64_t c = 0; c < qx.chunks; ++c) {
    const int8_t* xq = qx.q.data() + (r * qx.chunks + c) * kQBlocks * 32;
    for (int64_t b = 0; b < kQBlocks; ++b) {
      int32_t sum = 0;
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t code = row.Codes(c)[j * row.Stride(c) + b];
        sum += kDoubled[code & 15] * xq[QIndex(b, j / 2, 2 * (j % 2))] +
               kDoubled[code >> 4] * xq[QIndex(b, j / 2, 2 * (j % 2) + 1)];
      }
      const int64_t lane = (r * qx.chunks + c) * kQBlocks + QLane(b);
      total += static_cast<float>(sum - qx.offset[lane]) * (qx.half_scale[lane] * ScaleOf(row.Scales(c)[b]));
    }
  }
  *y = total;
}
#endif

#if !defined(GPTOSS_MXFP4_AVX2)
// W[o] decoded into buf [chunks * 512] in xp's order, the scales folded in, one code at a time.
void DecodeRow(const Row& row, int64_t chunks, float* buf) {
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* scales = row.Scales(c);
    float* out = buf + c * kChunkFloats;
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t* codes = row.Codes(c) + j * row.Stride(c);
      for (int64_t b = 0; b < kChunkBlocks; ++b) {
        const float scale = ScaleOf(scales[b]);
        out[XpIndex(j, 0, b)] = kFp4[codes[b] & 15] * scale;
        out[XpIndex(j, 1, b)] = kFp4[codes[b] >> 4] * scale;
      }
    }
  }
}
#endif

constexpr int64_t kPanel = 16;  // output rows decoded at a time ([3072 inputs][16] floats: 192 KB, in L2)

// Output rows rows[0:count) (count <= kPanel) decoded into panel [width][kPanel] (input-major, in
// xp's input order, the scales folded in; rows past count zero), for the outer products below.
void DecodePanel(const Row* rows, int64_t count, int64_t chunks, float* panel, float* scratch) {
  const int64_t width = chunks * kChunkFloats;
#if defined(GPTOSS_MXFP4_AVX2)
  (void)scratch;
  alignas(32) float decoded[8][64];  // 8 output rows x the 64 values of a byte pair
  for (int64_t half = 0; half < kPanel; half += 8) {
    std::memset(decoded, 0, sizeof decoded);
    for (int64_t c = 0; c < chunks; ++c) {
      __m256 s[8][4];
      for (int64_t q = 0; q < 8 && half + q < count; ++q) Scales16(rows[half + q].Scales(c), s[q]);
      for (int64_t pair = 0; pair < 8; ++pair) {
        for (int64_t q = 0; q < 8 && half + q < count; ++q) {
          const Row& row = rows[half + q];
          const uint8_t* codes = row.Codes(c) + 2 * pair * row.Stride(c);
          __m256 w[8];
          Decode32(codes, codes + row.Stride(c), w);
          for (int v = 0; v < 8; ++v) _mm256_store_ps(decoded[q] + 8 * v, _mm256_mul_ps(w[v], s[q][v % 4]));
        }
        for (int v = 0; v < 8; ++v) {  // 8 rows x 8 inputs -> 8 inputs x 8 rows
          __m256 r[8];
          for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(decoded[q] + 8 * v);
          const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
          const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
          const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
          const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
          const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
          const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
          const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
          const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
          const __m256 out[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                                 _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                                 _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                                 _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
          float* dst = panel + (c * kChunkFloats + pair * 64 + 8 * v) * kPanel + half;
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * kPanel, out[i]);
        }
      }
    }
  }
#else
  for (int64_t q = 0; q < kPanel; ++q) {
    if (q < count) DecodeRow(rows[q], chunks, scratch);
    for (int64_t i = 0; i < width; ++i) panel[i * kPanel + q] = q < count ? scratch[i] : 0.0f;
  }
#endif
}

// y[r, 0:16) = xp[r] . panel for R rows of x (xp rows `width` apart): the panel's 16 columns in 2 x R
// registers, one x value broadcast per input and row (an outer product per input).
template <int R>
void Outer(const float* xp, int64_t width, const float* panel, float* y, int64_t y_stride) {
  F8 acc[R][2] = {};
  for (int64_t i = 0; i < width; ++i) {
    const F8 w0 = Load8(panel + i * kPanel), w1 = Load8(panel + i * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const float xv = xp[r * width + i];
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(y + r * y_stride, &acc[r][0], sizeof acc[r][0]);
    std::memcpy(y + r * y_stride + 8, &acc[r][1], sizeof acc[r][1]);
  }
}

constexpr int kOuterRows = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast: AVX2's 16 registers

// y[r, 0:count) = xp[r] . panel for the n rows of a group.
void PanelProducts(const float* xp, int64_t n, int64_t width, const float* panel, int64_t count, float* y,
                   int64_t out) {
  alignas(32) float tile[kOuterRows * kPanel];
  for (int64_t r = 0; r < n; r += kOuterRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kOuterRows, n - r));
    const bool direct = count == kPanel;
    float* dst = direct ? y + r * out : tile;
    const int64_t stride = direct ? out : kPanel;
    switch (rows) {
      case 1: Outer<1>(xp + r * width, width, panel, dst, stride); break;
      case 2: Outer<2>(xp + r * width, width, panel, dst, stride); break;
      case 3: Outer<3>(xp + r * width, width, panel, dst, stride); break;
      case 4: Outer<4>(xp + r * width, width, panel, dst, stride); break;
      case 5: Outer<5>(xp + r * width, width, panel, dst, stride); break;
      default: Outer<6>(xp + r * width, width, panel, dst, stride); break;
    }
    if (!direct) {
      for (int k = 0; k < rows; ++k) std::memcpy(y + (r + k) * out, tile + k * kPanel, sizeof(float) * count);
    }
  }
}

struct Problem {
  const float* xp;  // [m, width], or null where only int8 decode groups read x
  const uint8_t* codes;  // [g, out, 16, blocks]
  const uint8_t* scales;  // [g, out, blocks]
  const uint8_t* end;  // of every layer's codes
  const int32_t* sizes;
  int64_t groups, m, blocks, chunks, width, out;
  float* y;  // [m, out]
  const QuantizedX* qx;  // x quantized (int8_activations), else null
};

// A decode group's rows read one after the other; the codes kAhead rows on are fetched ahead of
// the hardware's prefetch: 4 experts x 1 row of gate_up [2880, 5760] from DRAM, int8 path, ms:
// none 1.80, 4 rows ahead 1.66, 8 rows 1.53, 16 rows 1.53 (AMD EPYC, Zen 3, one run, 10 x 100 calls).
constexpr int64_t kAhead = 8;

inline void Prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(p + k, 0, 3);
}

// Output rows [o0, o1) of every group.
void Work(const Problem& p, int64_t o0, int64_t o1) {
  std::vector<float> panel, scratch;  // for the panel path only (a decode step never allocates them)
  int64_t start = 0;
  for (int64_t g = 0; g < p.groups && start < p.m; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(p.sizes[g], 0), p.m - start);
    const float* xg = p.xp != nullptr ? p.xp + start * p.width : nullptr;  // null: int8 decode only
    float* yg = p.y + start * p.out;
    start += n;
    if (n == 0) continue;
    const uint8_t* codes = p.codes + g * p.out * 16 * p.blocks;
    const uint8_t* scales = p.scales + g * p.out * p.blocks;
    auto row = [&](int64_t o) { return Row(codes + o * 16 * p.blocks, scales + o * p.blocks, p.blocks, p.end); };
    if (p.qx != nullptr && n <= kFusedRows) {
      const int64_t r0 = start - n;
      for (int64_t o = o0; o < o1; ++o) {
        if (o + kAhead < o1) Prefetch(codes + (o + kAhead) * 16 * p.blocks, 16 * p.blocks);
        const QRow w(codes + o * 16 * p.blocks, scales + o * p.blocks, p.blocks, p.end);
#if defined(GPTOSS_MXFP4_AVX2)
        for (int64_t r = 0; r < n; r += 2) {
          if (n - r == 1) FusedInt8<1>(w, *p.qx, r0 + r, yg + r * p.out + o, p.out);
          else FusedInt8<2>(w, *p.qx, r0 + r, yg + r * p.out + o, p.out);
        }
#else
        for (int64_t r = 0; r < n; ++r) FusedInt8(w, *p.qx, r0 + r, yg + r * p.out + o);
#endif
      }
      continue;
    }
#if defined(GPTOSS_MXFP4_AVX2)
    if (n <= kFusedRows) {
      for (int64_t o = o0; o < o1; ++o) {
        if (o + kAhead < o1) Prefetch(codes + (o + kAhead) * 16 * p.blocks, 16 * p.blocks);
        const Row w = row(o);
        switch (n) {
          case 1: FusedRow<1>(w, xg, p.width, p.chunks, yg + o, p.out); break;
          case 3: FusedRow<1>(w, xg + 2 * p.width, p.width, p.chunks, yg + 2 * p.out + o, p.out); [[fallthrough]];
          case 2: FusedRow<2>(w, xg, p.width, p.chunks, yg + o, p.out); break;
          default:  // two passes of two rows: 16 sums in registers would leave none for the decode
            FusedRow<2>(w, xg, p.width, p.chunks, yg + o, p.out);
            FusedRow<2>(w, xg + 2 * p.width, p.width, p.chunks, yg + 2 * p.out + o, p.out);
        }
      }
      continue;
    }
#endif
    if (panel.empty()) {
      panel.resize(kPanel * p.width);
      scratch.resize(p.width);
    }
    for (int64_t o = o0; o < o1; o += kPanel) {
      const int64_t count = std::min(kPanel, o1 - o);
      std::vector<Row> rows;
      rows.reserve(count);
      for (int64_t q = 0; q < count; ++q) rows.push_back(row(o + q));
      DecodePanel(rows.data(), count, p.chunks, panel.data(), scratch.data());
      PanelProducts(xg, n, p.width, panel.data(), count, yg + o, p.out);
    }
  }
}

ffi::Error Mxfp4GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> group_sizes,
                              ffi::ResultBuffer<ffi::F32> y, int32_t int8_activations) {
  const auto xd = x.dimensions();
  const auto bd = blocks.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || bd.size() != 5 || sd.size() != 4 || bd[3] != kBlockBytes || xd[1] != 32 * bd[4] ||
      sd[0] != bd[0] || sd[1] != bd[1] || sd[2] != bd[2] || sd[3] != bd[4] ||
      group_sizes.dimensions().size() != 1 || group_sizes.dimensions()[0] != bd[1]) {
    return ffi::Error::InvalidArgument(
        "gptoss_mxfp4_grouped_matmul: x [m, 32 K], blocks [layers, g, out, 16, K], scales [layers, g, out, K], "
        "group_sizes [g]");
  }
  const int64_t m = xd[0], in = xd[1], layers = bd[0], groups = bd[1], out = bd[2], k = bd[4];
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1);
  const int64_t chunks = (k + kChunkBlocks - 1) / kChunkBlocks;
  bool small = false, large = false;  // groups of 1..kFusedRows rows and of more, as Work clips them
  for (int64_t g = 0, start = 0; g < groups && start < m; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(group_sizes.typed_data()[g], 0), m - start);
    (n > kFusedRows ? large : small) |= n > 0;
    start += n;
  }
  QuantizedX qx;  // x as each path reads it: quantized for int8 decode groups, permuted for the others
  if (int8_activations && small) qx = Quantize(x.typed_data(), m, in);
  std::vector<float> xp;
  if (!int8_activations || large) xp = Permute(x.typed_data(), m, in, chunks);
  Problem p{xp.empty() ? nullptr : xp.data(), blocks.typed_data() + l * groups * out * kBlockBytes * k,
            scales.typed_data() + l * groups * out * k, blocks.typed_data() + layers * groups * out * kBlockBytes * k,
            group_sizes.typed_data(), groups, m, k, chunks,
            chunks * kChunkFloats, out, y->typed_data(), int8_activations && small ? &qx : nullptr};
  std::memset(p.y, 0, sizeof(float) * m * out);
  // the pool's threads only where the work pays for waking them; each an even share of rows
  auto& pool = gptoss::Pool::Get();
  const int threads = m * in * out < (int64_t{1} << 20) ? 1 : static_cast<int>(std::min<int64_t>(pool.Threads(), out / 2));
  const int64_t per = (out / std::max(threads, 1) + 1) / 2 * 2;
  pool.Run(threads, [&](int t) {
    const int64_t o0 = std::min(out, t * per), o1 = t + 1 == threads ? out : std::min(out, o0 + per);
    Work(p, o0, o1);
  });
  return ffi::Error::Success();
}

}  // namespace

// Which decode this build has: 1 for AVX2 (registers), 0 for the portable one.
extern "C" int GptossMxfp4Avx2() {
#if defined(GPTOSS_MXFP4_AVX2)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4GroupedMatmul, Mxfp4GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("int8_activations"));
