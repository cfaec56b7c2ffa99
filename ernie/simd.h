// 16-lane float vectors for this package's CPU kernels (`ernie/native.py` builds them with
// this folder on the include path), in the CPU's own registers.
//
// Why two forms: with AVX-512 (`-march=native` on such a CPU) GCC's generic 64-byte vector is
// one register, and is used as is. Without it GCC lowers a 64-byte generic vector through the
// stack, lane by lane (the fused-MoE kernel ran at 5 GB/s on an AVX2 EPYC, 2.5x slower than
// oneDNN at one row and 15x at 32), so there `v16` is a struct of 2 (AVX2) or 4 (SSE, NEON)
// vectors of the native width with the same operators. The kernels use only what both forms
// have: + - * / (with floats on either side), +=, unary -, v16{} for zero, and the helpers
// below.
//
// TILE_ROWS: rows a kernel keeps in registers at once (two v16 accumulators each): 8 with
// AVX-512's 32 registers; 4 with AVX2's 16, which spills a little but measured best of 2, 3 and 4
// at 8 and 32 rows on an AVX2 EPYC (`scripts/bench_fused_moe.py`).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#define EM_VEC_BYTES 64
#define TILE_ROWS 8
#elif defined(__AVX__)
#define EM_VEC_BYTES 32
#define TILE_ROWS 4
#else
#define EM_VEC_BYTES 16
#define TILE_ROWS 2
#endif
#define EM_LANES (EM_VEC_BYTES / 4)  // floats per native register
#define EM_PARTS (16 / EM_LANES)      // native registers per v16

typedef float vn __attribute__((vector_size(EM_VEC_BYTES)));  // one native register
typedef int32_t vni __attribute__((vector_size(EM_VEC_BYTES)));
typedef uint32_t vnu __attribute__((vector_size(EM_VEC_BYTES)));
typedef uint16_t vnh __attribute__((vector_size(EM_VEC_BYTES / 2)));  // as many bf16

// exp on native lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (Cephes' expf
// polynomial, ~1 ulp)
static inline vn vexp_n(vn x) {
  const vn lo = vn{} - 87.3f, hi = vn{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vn magic = vn{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vn n = (x * 1.44269504088896341f + magic) - magic;
  vn r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vn p = vn{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vn y = p * r * r + r + 1.0f;
  vni e = (__builtin_convertvector(n, vni) + 127) << 23;
  vn scale;
  std::memcpy(&scale, &e, EM_VEC_BYTES);
  return y * scale;
}

// native lanes of bf16 (the top half of an fp32) widened exactly
static inline vn ldw_n(const uint16_t* p) {
  vnh h;
  std::memcpy(&h, p, EM_VEC_BYTES / 2);
  vnu w = __builtin_convertvector(h, vnu) << 16;
  vn f;
  std::memcpy(&f, &w, EM_VEC_BYTES);
  return f;
}

static inline float hsum_n(vn v) {  // a tree, not dependent adds
#if EM_LANES >= 16
  typedef float h8 __attribute__((vector_size(32)));
  h8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<char*>(&v) + 32, 32);
  a += b;
#elif EM_LANES == 8
  typedef float h8 __attribute__((vector_size(32)));
  h8 a = v;
#endif
#if EM_LANES >= 8
  typedef float h4 __attribute__((vector_size(16)));
  h4 c, e;
  std::memcpy(&c, &a, 16);
  std::memcpy(&e, reinterpret_cast<char*>(&a) + 16, 16);
  c += e;
#else
  vn c = v;
#endif
  return (c[0] + c[2]) + (c[1] + c[3]);
}

#if EM_PARTS == 1

typedef vn v16;
static inline v16 ld(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void st(float* p, v16 v) { std::memcpy(p, &v, 64); }
static inline v16 ldw(const uint16_t* p) { return ldw_n(p); }
static inline v16 vexp(v16 x) { return vexp_n(x); }
static inline float hsum(v16 v) { return hsum_n(v); }

#else

struct v16 {
  vn p[EM_PARTS];
};
#define EM_EACH(expr)                                   \
  v16 r;                                                \
  for (int i = 0; i < EM_PARTS; i++) r.p[i] = (expr);   \
  return r
static inline v16 operator+(v16 a, v16 b) { EM_EACH(a.p[i] + b.p[i]); }
static inline v16 operator-(v16 a, v16 b) { EM_EACH(a.p[i] - b.p[i]); }
static inline v16 operator*(v16 a, v16 b) { EM_EACH(a.p[i] * b.p[i]); }
static inline v16 operator/(v16 a, v16 b) { EM_EACH(a.p[i] / b.p[i]); }
static inline v16 operator+(v16 a, float b) { EM_EACH(a.p[i] + b); }
static inline v16 operator-(v16 a, float b) { EM_EACH(a.p[i] - b); }
static inline v16 operator*(v16 a, float b) { EM_EACH(a.p[i] * b); }
static inline v16 operator/(v16 a, float b) { EM_EACH(a.p[i] / b); }
static inline v16 operator+(float a, v16 b) { EM_EACH(a + b.p[i]); }
static inline v16 operator-(float a, v16 b) { EM_EACH(a - b.p[i]); }
static inline v16 operator*(float a, v16 b) { EM_EACH(a * b.p[i]); }
static inline v16 operator/(float a, v16 b) { EM_EACH(a / b.p[i]); }
static inline v16 operator-(v16 a) { EM_EACH(-a.p[i]); }
static inline v16& operator+=(v16& a, v16 b) {
  for (int i = 0; i < EM_PARTS; i++) a.p[i] += b.p[i];
  return a;
}
static inline v16 ld(const float* p) {
  v16 v;
  for (int i = 0; i < EM_PARTS; i++) std::memcpy(&v.p[i], p + i * EM_LANES, EM_VEC_BYTES);
  return v;
}
static inline void st(float* p, v16 v) {
  for (int i = 0; i < EM_PARTS; i++) std::memcpy(p + i * EM_LANES, &v.p[i], EM_VEC_BYTES);
}
static inline v16 ldw(const uint16_t* p) { EM_EACH(ldw_n(p + i * EM_LANES)); }
static inline v16 vexp(v16 x) { EM_EACH(vexp_n(x.p[i])); }
static inline float hsum(v16 v) {
  vn s = v.p[0];
  for (int i = 1; i < EM_PARTS; i++) s += v.p[i];
  return hsum_n(s);
}
#undef EM_EACH

#endif

static inline v16 splat(float x) { return v16{} + x; }
static inline v16 ldw(const float* p) { return ld(p); }

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
