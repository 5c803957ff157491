// Vector types shared by the native CPU kernels (cpu_kernels.cc, cpu_mxfp4.cc), compiled for the
// machine they run on (-march=native, ops/native.py).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace gptoss {

// F16: 16 floats, one AVX-512 register (a GCC / Clang vector type), with AVX2 a pair of registers
// (intrinsics: GCC keeps arrays of 64-byte vector types in memory where registers are 32 bytes and
// moves them through general registers; AMD EPYC (Zen 3), one core, bfloat16: the unembedding's dot
// products 6.0 -> 17.5 GB/s, a projection's streamed rows 6.9 -> 16.5 GB/s), else a vector type.
inline float Widen(float v) { return v; }
inline float Widen(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__)
typedef float F16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));
typedef uint32_t U16x __attribute__((vector_size(64)));

inline F16 Load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F16 Load16(const uint16_t* p) {  // bfloat16 bits -> float32: the high half of each word
  H16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<F16>(__builtin_convertvector(h, U16x) << 16);
}
inline void Store16(float* p, const F16& v) { std::memcpy(p, &v, sizeof v); }
inline F16 Zero16() { return F16{}; }
#elif defined(__AVX2__)
struct F16 {
  __m256 lo, hi;
  float operator[](int k) const {
    alignas(32) float v[16];
    _mm256_store_ps(v, lo);
    _mm256_store_ps(v + 8, hi);
    return v[k];
  }
  F16& operator+=(const F16& o) {
    lo = _mm256_add_ps(lo, o.lo);
    hi = _mm256_add_ps(hi, o.hi);
    return *this;
  }
};
inline F16 operator*(float s, const F16& v) {
  const __m256 b = _mm256_set1_ps(s);
  return {_mm256_mul_ps(b, v.lo), _mm256_mul_ps(b, v.hi)};
}
inline F16 operator*(const F16& a, const F16& b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 Load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline F16 Load16(const uint16_t* p) { return {Load8(p), Load8(p + 8)}; }
inline void Store16(float* p, const F16& v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline F16 Zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
#else
typedef float F16 __attribute__((vector_size(64)));

inline F16 Load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F16 Load16(const uint16_t* p) {
  F16 v;
  for (int k = 0; k < 16; ++k) v[k] = Widen(p[k]);
  return v;
}
inline void Store16(float* p, const F16& v) { std::memcpy(p, &v, sizeof v); }
inline F16 Zero16() { return F16{}; }
#endif

inline uint16_t RoundToBf16(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace gptoss
