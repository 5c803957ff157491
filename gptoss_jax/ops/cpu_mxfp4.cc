// gptoss_mxfp4_grouped_matmul: y [m, out] (float32) = rows of x [m, in] (float32), grouped
// consecutively by group_sizes [g], times the MXFP4 matrix W[layer, group] [in, out], read packed
// where it lies: blocks uint8 [layers, g, out, 16, in/32] (byte j of block k holds the e2m1 codes of
// inputs 32k + 2j, low nibble, and 32k + 2j + 1) and e8m0 scales uint8 [layers, g, out, in/32]
// (`gptoss_jax.ops.mxfp4`'s in-memory layout). Rows past the last group are zero. The values are
// exact (e2m1 times a power of two); only the order of the float32 sums differs from the dense
// product's. Built with cpu_kernels.cc into one library (ops/native.py).
//
// x is first laid out once per call in the order the codes are read ("xp", per row: chunks of 16
// blocks, then byte j, then nibble, then the 16 blocks), so that a run of 16 code bytes of one
// output row meets 16 consecutive inputs. Then, per output row:
// - groups of at most kFusedRows rows (decode: each expert sees a token or a few) decode 16 code
//   bytes at a time straight into registers (AVX2 + F16C: the fp16 high byte of each e2m1 value
//   by one byte shuffle, widened by vcvtph2ps) and multiply them with x's rows, the block's scale
//   applied once per 16 bytes x 2 nibbles; the weights are read once, at memory speed;
// - larger groups (prefill) decode 16 output rows at a time into a float32 buffer in L2, the scale
//   folded in, and every 4 rows of x pass over pairs of them (8 dot products in registers).
// Without AVX2 / F16C the second way serves every group, the decode done one code at a time.
// Output rows are split between threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_MXFP4_AVX2 1
#endif

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

// x [m, in] -> xp [m, chunks * 512]: xp[r][c*512 + j*32 + n*16 + b] = x[r][32*(16c + b) + 2j + n],
// zero for blocks past the last.
std::vector<float> Permute(const float* x, int64_t m, int64_t in, int64_t chunks) {
  const int64_t blocks = in / 32, width = chunks * kChunkFloats;
  std::vector<float> xp(m * width, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      float* dst = xp.data() + r * width + (k / kChunkBlocks) * kChunkFloats + k % kChunkBlocks;
      const float* src = x + r * in + 32 * k;
      for (int64_t j = 0; j < 16; ++j) {
        dst[j * 32] = src[2 * j];
        dst[j * 32 + 16] = src[2 * j + 1];
      }
    }
  }
  return xp;
}

// One output row's codes and scales, chunk by chunk: chunk c's 16 bytes of byte j, and its 16
// scales. The last chunk, when the blocks do not fill it, is copied zero-padded (zero codes and
// scales: nothing read past the row, and nothing added).
struct Row {
  const uint8_t* codes;  // [16, blocks]
  const uint8_t* scales;  // [blocks]
  int64_t blocks;
  alignas(16) uint8_t tail_codes[16][kChunkBlocks];
  alignas(16) uint8_t tail_scales[kChunkBlocks];

  Row(const uint8_t* codes, const uint8_t* scales, int64_t blocks) : codes(codes), scales(scales), blocks(blocks) {
    const int64_t start = blocks / kChunkBlocks * kChunkBlocks, n = blocks - start;
    if (n == 0) return;
    std::memset(tail_codes, 0, sizeof tail_codes);
    std::memset(tail_scales, 0, sizeof tail_scales);
    for (int64_t j = 0; j < 16; ++j) std::memcpy(tail_codes[j], codes + j * blocks + start, n);
    std::memcpy(tail_scales, scales + start, n);
  }
  bool Full(int64_t c) const { return (c + 1) * kChunkBlocks <= blocks; }
  const uint8_t* Codes(int64_t c, int64_t j) const {
    return Full(c) ? codes + j * blocks + c * kChunkBlocks : tail_codes[j];
  }
  const uint8_t* Scales(int64_t c) const { return Full(c) ? scales + c * kChunkBlocks : tail_scales; }
};

#if defined(GPTOSS_MXFP4_AVX2)
// 16 code bytes -> 32 values as 4 x 8 floats: low nibbles of bytes 0-7, 8-15, high nibbles 0-7, 8-15.
// An e2m1 value's fp16 encoding has a zero low byte, so one byte shuffle gives all of it.
inline void Decode16(const uint8_t* p, __m256* v) {
  const __m128i table = _mm_setr_epi8(0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, static_cast<char>(0x80),
                                      static_cast<char>(0xB8), static_cast<char>(0xBC), static_cast<char>(0xBE),
                                      static_cast<char>(0xC0), static_cast<char>(0xC2), static_cast<char>(0xC4),
                                      static_cast<char>(0xC6));
  const __m128i nibble = _mm_set1_epi8(0x0F), zero = _mm_setzero_si128();
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(b, nibble));
  const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
  v[0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, low));
  v[1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, low));
  v[2] = _mm256_cvtph_ps(_mm_unpacklo_epi8(zero, high));
  v[3] = _mm256_cvtph_ps(_mm_unpackhi_epi8(zero, high));
}

inline void Scales16(const uint8_t* p, __m256* s) {  // 16 e8m0 bytes -> 2 x 8 floats
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  s[0] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(b), 23));
  s[1] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), 23));
}

// y[r] = xp[r] . W[o] for R rows (xp rows `width` apart), decoding straight into registers. With one
// or two rows each takes four accumulators (the FMA latency, not the decode, would bound two).
template <int R>
void FusedRow(const Row& row, const float* xp, int64_t width, int64_t chunks, float* y, int64_t y_stride) {
  constexpr int A = R <= 2 ? 4 : 2;
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m256 acc[R][A];
    for (int r = 0; r < R; ++r) {
      for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    }
    const float* xc = xp + c * kChunkFloats;
    for (int64_t j = 0; j < 16; ++j) {
      __m256 w[4];
      Decode16(row.Codes(c, j), w);
      for (int r = 0; r < R; ++r) {
        const float* xr = xc + r * width + j * 32;
        for (int q = 0; q < 4; ++q) acc[r][q % A] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xr + 8 * q), acc[r][q % A]);
      }
    }
    __m256 s[2];
    Scales16(row.Scales(c), s);
    for (int r = 0; r < R; ++r) {
      // lanes: blocks 0-7 (low and high nibbles), blocks 8-15
      const __m256 first = A == 4 ? _mm256_add_ps(acc[r][0], acc[r][2]) : acc[r][0];
      const __m256 second = A == 4 ? _mm256_add_ps(acc[r][1], acc[r][3]) : acc[r][1];
      total[r] = _mm256_fmadd_ps(first, s[0], total[r]);
      total[r] = _mm256_fmadd_ps(second, s[1], total[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    F8 t;
    std::memcpy(&t, &total[r], sizeof t);
    y[r * y_stride] = Sum8(t);
  }
}
#endif

// W[o] decoded into buf [chunks * 512] in xp's order, the scales folded in.
void DecodeRow(const Row& row, int64_t chunks, float* buf) {
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* scales = row.Scales(c);
    float* out = buf + c * kChunkFloats;
#if defined(GPTOSS_MXFP4_AVX2)
    __m256 s[2];
    Scales16(scales, s);
    for (int64_t j = 0; j < 16; ++j) {
      __m256 w[4];
      Decode16(row.Codes(c, j), w);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + j * 32 + 8 * q, _mm256_mul_ps(w[q], s[q % 2]));
    }
#else
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t* codes = row.Codes(c, j);
      for (int64_t b = 0; b < kChunkBlocks; ++b) {
        const float scale = ScaleOf(scales[b]);
        out[j * 32 + b] = kFp4[codes[b] & 15] * scale;
        out[j * 32 + 16 + b] = kFp4[codes[b] >> 4] * scale;
      }
    }
#endif
  }
}

// y[r, o + p] = xp[r] . w[p] for R rows and P decoded rows w (`width` floats each).
template <int R, int P>
void Dots(const float* xp, const float* w, int64_t width, float* y, int64_t y_stride) {
  F8 acc[R][P] = {};
  for (int64_t i = 0; i < width; i += 8) {
    F8 wv[P];
    for (int p = 0; p < P; ++p) wv[p] = Load8(w + p * width + i);
    for (int r = 0; r < R; ++r) {
      const F8 xv = Load8(xp + r * width + i);
      for (int p = 0; p < P; ++p) acc[r][p] += xv * wv[p];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) y[r * y_stride + p] = Sum8(acc[r][p]);
  }
}

constexpr int64_t kPanel = 16;  // decoded output rows at a time (16 x 2880 floats: 184 KB, in L2)

// y[r, 0:panel) = xp[r] . w[p] for n rows (each 4-row block of x over every pair of decoded rows
// while it is in L1 / L2).
void PanelDots(const float* xp, int64_t n, const float* w, int64_t panel, int64_t width, float* y, int64_t out) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    int64_t p = 0;
    for (; p + 2 <= panel; p += 2) Dots<4, 2>(xp + r * width, w + p * width, width, y + r * out + p, out);
    if (p < panel) Dots<4, 1>(xp + r * width, w + p * width, width, y + r * out + p, out);
  }
  for (; r < n; ++r) {
    int64_t p = 0;
    for (; p + 2 <= panel; p += 2) Dots<1, 2>(xp + r * width, w + p * width, width, y + r * out + p, out);
    if (p < panel) Dots<1, 1>(xp + r * width, w + p * width, width, y + r * out + p, out);
  }
}

struct Problem {
  const float* xp;  // [m, width]
  const uint8_t* codes;  // [g, out, 16, blocks]
  const uint8_t* scales;  // [g, out, blocks]
  const int32_t* sizes;
  int64_t groups, m, blocks, chunks, width, out;
  float* y;  // [m, out]
};

// Output rows [o0, o1) of every group.
void Work(const Problem& p, int64_t o0, int64_t o1) {
  std::vector<float> buf(kPanel * p.width);
  int64_t start = 0;
  for (int64_t g = 0; g < p.groups && start < p.m; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(p.sizes[g], 0), p.m - start);
    const float* xg = p.xp + start * p.width;
    float* yg = p.y + start * p.out;
    start += n;
    if (n == 0) continue;
    const uint8_t* codes = p.codes + g * p.out * 16 * p.blocks;
    const uint8_t* scales = p.scales + g * p.out * p.blocks;
    auto row = [&](int64_t o) { return Row(codes + o * 16 * p.blocks, scales + o * p.blocks, p.blocks); };
#if defined(GPTOSS_MXFP4_AVX2)
    if (n <= kFusedRows) {
      for (int64_t o = o0; o < o1; ++o) {
        const Row w = row(o);
        switch (n) {
          case 1: FusedRow<1>(w, xg, p.width, p.chunks, yg + o, p.out); break;
          case 2: FusedRow<2>(w, xg, p.width, p.chunks, yg + o, p.out); break;
          case 3: FusedRow<3>(w, xg, p.width, p.chunks, yg + o, p.out); break;
          default: FusedRow<4>(w, xg, p.width, p.chunks, yg + o, p.out); break;
        }
      }
      continue;
    }
#endif
    for (int64_t o = o0; o < o1; o += kPanel) {
      const int64_t panel = std::min(kPanel, o1 - o);
      for (int64_t q = 0; q < panel; ++q) DecodeRow(row(o + q), p.chunks, buf.data() + q * p.width);
      PanelDots(xg, n, buf.data(), panel, p.width, yg + o, p.out);
    }
  }
}

ffi::Error Mxfp4GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> group_sizes,
                              ffi::ResultBuffer<ffi::F32> y) {
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
  std::vector<float> xp = Permute(x.typed_data(), m, in, chunks);
  Problem p{xp.data(), blocks.typed_data() + l * groups * out * kBlockBytes * k,
            scales.typed_data() + l * groups * out * k, group_sizes.typed_data(), groups, m, k, chunks,
            chunks * kChunkFloats, out, y->typed_data()};
  std::memset(p.y, 0, sizeof(float) * m * out);
  // threads only where the work pays for starting them (~20 us each); each an even share of rows
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = m * in * out < (int64_t{1} << 20) ? 1 : static_cast<int>(std::min<int64_t>(hardware, out / 2));
  const int64_t per = (out / std::max(threads, 1) + 1) / 2 * 2;
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    const int64_t o0 = std::min(out, t * per), o1 = t + 1 == threads ? out : std::min(out, o0 + per);
    pool.emplace_back([&p, o0, o1] { Work(p, o0, o1); });
  }
  Work(p, 0, threads > 1 ? std::min(out, per) : out);
  for (auto& thread : pool) thread.join();
  return ffi::Error::Success();
}

}  // namespace

// Which decode this build has: 1 for AVX2 + F16C (registers), 0 for the portable one.
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
