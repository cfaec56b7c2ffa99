// 16-lane float vectors for this package's CPU kernels (`ernie/native.py` builds them with
// this folder on the include path). GCC's generic vector type: one AVX-512 register with
// -march=native where the CPU has it, two AVX2 (or four SSE) registers elsewhere.
#pragma once
#include <cstdint>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

static inline v16 ld(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void st(float* p, v16 v) { std::memcpy(p, &v, 64); }
static inline v16 splat(float x) { return v16{} + x; }

// 16 values as floats: fp32 as they are, bf16 (the top half of an fp32) widened exactly
typedef uint16_t vh16 __attribute__((vector_size(32)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
static inline v16 ldw(const float* p) { return ld(p); }
static inline v16 ldw(const uint16_t* p) {
  vh16 h;
  std::memcpy(&h, p, 32);
  vu16 w = __builtin_convertvector(h, vu16) << 16;
  v16 f;
  std::memcpy(&f, &w, 64);
  return f;
}

// one value as a float, and back (bf16: rounded to nearest even, as torch rounds)
static inline float to_f(float x) { return x; }
static inline float to_f(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void from_f(float x, float* y) { *y = x; }
static inline void from_f(float x, uint16_t* y) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    *y = uint16_t((u >> 16) | 0x40);
    return;
  }
  *y = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// exp on 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (Cephes' expf polynomial, ~1 ulp)
static inline v16 vexp(v16 x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const v16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 n = (x * 1.44269504088896341f + magic) - magic;
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  v16 y = p * r * r + r + 1.0f;
  vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, 64);
  return y * scale;
}
