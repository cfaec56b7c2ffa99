// A decode step's attention on CPU, one call per layer (fp32 math; q, k, v and the cache in fp32
// or bf16): rotary on the new q and k, k and v
// written to the paged cache, and each sequence's one query against its whole context, read
// from the cache's blocks in place.
//
// Why: through torch this is ~40 ops per layer (rotary as complex views, two index_copy_, two
// index_selects that copy every sequence's padded context out of the cache, the mask, SDPA,
// reshapes), 250 us per layer at batch 1 on this project's 2-core machines where the weights
// take ~80 us, and more at batch 32, where the copies grow with the contexts. Build:
// ernie/native.py (`g++ -O3 -march=native`); no torch headers, called through ctypes.
//
// Layouts: q [T, hq, d] rows q_ld values apart (likewise k and v with hkv heads: views into the
// packed qkv projection); rot [T, d/2, 2] (cos, sin) per interleaved pair (x[2i], x[2i+1]);
// caches [slots, hkv, d]; tables [T, nblk] cache blocks of each sequence (a block is
// block_size consecutive slots); ctx [T] keys each query sees (its own position + 1);
// out [T, hq, d]. The query heads of one kv head (hq / hkv of them) share its keys and values.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"  // v16, ld, ldw, st, vexp, hsum (expertmesh/ernie)

template <typename S>
static inline float dot(const float* a, const S* b, int64_t d) {
  v16 acc = v16{};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) acc += ld(a + i) * ldw(b + i);
  float s = hsum(acc);
  for (; i < d; i++) s += a[i] * to_f(b[i]);
  return s;
}

// y[i] += p * x[i]
template <typename S>
static inline void axpy(float* y, float p, const S* x, int64_t d) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) st(y + i, ld(y + i) + p * ldw(x + i));
  for (; i < d; i++) y[i] += p * to_f(x[i]);
}

// x [heads, d] rotated by rot [d/2, 2] into y (stored as Y: a query in fp32, a key as the
// cache holds it)
template <typename S, typename Y>
static inline void rotate(const S* x, const float* rot, Y* y, int64_t heads, int64_t d) {
  for (int64_t h = 0; h < heads; h++)
    for (int64_t i = 0; i < d / 2; i++) {
      float x0 = to_f(x[h * d + 2 * i]), x1 = to_f(x[h * d + 2 * i + 1]);
      float c = rot[2 * i], s = rot[2 * i + 1];
      from_f(x0 * c - x1 * s, y + h * d + 2 * i);
      from_f(x0 * s + x1 * c, y + h * d + 2 * i + 1);
    }
}

// p[0:n] = exp(p - max) / sum, in place
static void softmax(float* p, int64_t n) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; j++) m = p[j] > m ? p[j] : m;
  float sum = 0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16 e = vexp(ld(p + j) - m);
    st(p + j, e);
    sum += hsum(e);
  }
  for (; j < n; j++) {
    p[j] = std::exp(p[j] - m);
    sum += p[j];
  }
  float inv = 1.0f / sum;
  for (j = 0; j < n; j++) p[j] *= inv;
}

// dot and axpy of d = 16 * D16 floats, unrolled (D16 = 0: any d, at run time)
template <int D16, typename S>
static inline float dot_n(const float* a, const S* b, int64_t d) {
  if (D16 == 0) return dot(a, b, d);
  v16 s = ld(a) * ldw(b);
  for (int c = 1; c < D16; c++) s += ld(a + 16 * c) * ldw(b + 16 * c);
  return hsum(s);
}

template <int D16, typename S>
static inline void axpy_n(float* y, float p, const S* x, int64_t d) {
  if (D16 == 0) return axpy(y, p, x, d);
  for (int c = 0; c < D16; c++) st(y + 16 * c, ld(y + 16 * c) + p * ldw(x + 16 * c));
}

// One query token, every head: each key and value row (all kv heads, `row` floats) is read
// once from the cache, for all the query heads; scores p [hq, n], then out [hq, d] summed
// in acc. qr: the rotated, scaled query [hq, d]. Loops run block by block (no division per
// key) and kv head by kv head (no division per head).
template <int D16, typename S>
static void attend(const float* qr, int64_t hq, int64_t hkv, int64_t d, const S* k_cache,
                   const S* v_cache, int64_t row, const int64_t* table, int64_t block_size,
                   int64_t n, float* p, float* acc) {
  const int64_t group = hq / hkv;
  for (int64_t b = 0, j0 = 0; j0 < n; b++, j0 += block_size) {
    const S* kb = k_cache + table[b] * block_size * row;
    for (int64_t j = j0; j < std::min(n, j0 + block_size); j++) {
      const S* kj = kb + (j - j0) * row;
      for (int64_t g = 0, h = 0; g < hkv; g++)
        for (int64_t e = 0; e < group; e++, h++)
          p[h * n + j] = dot_n<D16>(qr + h * d, kj + g * d, d);
    }
  }
  for (int64_t h = 0; h < hq; h++) softmax(p + h * n, n);
  std::fill(acc, acc + hq * d, 0.0f);
  for (int64_t b = 0, j0 = 0; j0 < n; b++, j0 += block_size) {
    const S* vb = v_cache + table[b] * block_size * row;
    for (int64_t j = j0; j < std::min(n, j0 + block_size); j++) {
      const S* vj = vb + (j - j0) * row;
      for (int64_t g = 0, h = 0; g < hkv; g++)
        for (int64_t e = 0; e < group; e++, h++)
          axpy_n<D16>(acc + h * d, p[h * n + j], vj + g * d, d);
    }
  }
}

// The whole call for q, k, v and caches stored as S (float or bf16); out is fp32.
template <typename S>
static int run(int64_t T, int64_t hq, int64_t hkv, int64_t d, const S* q, int64_t q_ld,
               const S* k, int64_t k_ld, const S* v, int64_t v_ld, const float* rot,
               const int64_t* slot_mapping, S* k_cache, S* v_cache, int64_t slots,
               const int64_t* tables, int64_t nblk, int64_t block_size, const int64_t* ctx,
               float scale, float* out) {
  if (hkv <= 0 || hq % hkv || d % 2 || block_size <= 0) return -1;
  const int64_t blocks = slots / block_size;
  for (int64_t t = 0; t < T; t++) {
    if (slot_mapping[t] < 0 || slot_mapping[t] >= slots) return -1;
    if (ctx[t] < 1 || ctx[t] > nblk * block_size) return -1;
    for (int64_t b = 0; b < (ctx[t] + block_size - 1) / block_size; b++)
      if (tables[t * nblk + b] < 0 || tables[t * nblk + b] >= blocks) return -1;
  }
  const int64_t row = hkv * d;  // values per cache slot
  for (int64_t t = 0; t < T; t++) {  // every new key and value first
    rotate(k + t * k_ld, rot + t * d, k_cache + slot_mapping[t] * row, hkv, d);
    std::memcpy(v_cache + slot_mapping[t] * row, v + t * v_ld, row * sizeof(S));
  }
  std::vector<float> qr(hq * d), acc(hq * d), p;
  for (int64_t t = 0; t < T; t++) {
    const int64_t n = ctx[t];
    const int64_t* table = tables + t * nblk;
    rotate(q + t * q_ld, rot + t * d, qr.data(), hq, d);
    for (float& x : qr) x *= scale;
    p.resize(hq * n);
    auto attend_d = d == 64 ? attend<4, S> : d == 128 ? attend<8, S> : attend<0, S>;
    attend_d(qr.data(), hq, hkv, d, k_cache, v_cache, row, table, block_size, n, p.data(),
             acc.data());
    std::memcpy(out + t * hq * d, acc.data(), hq * d * sizeof(float));
  }
  return 0;
}

extern "C" int em_decode_attention_abi() { return 2; }

// Returns 0, or -1 (and touches nothing) when a slot, block or context length is out of range.
// bf16 != 0: q, k, v and the caches are bfloat16 (else float32); out is float32 either way.
extern "C" int em_decode_attention(int64_t T, int64_t hq, int64_t hkv, int64_t d, const void* q,
                                   int64_t q_ld, const void* k, int64_t k_ld, const void* v,
                                   int64_t v_ld, const float* rot, const int64_t* slot_mapping,
                                   void* k_cache, void* v_cache, int64_t slots,
                                   const int64_t* tables, int64_t nblk, int64_t block_size,
                                   const int64_t* ctx, float scale, int64_t bf16, float* out) {
  if (bf16)
    return run(T, hq, hkv, d, static_cast<const uint16_t*>(q), q_ld,
               static_cast<const uint16_t*>(k), k_ld, static_cast<const uint16_t*>(v), v_ld, rot,
               slot_mapping, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache),
               slots, tables, nblk, block_size, ctx, scale, out);
  return run(T, hq, hkv, d, static_cast<const float*>(q), q_ld, static_cast<const float*>(k),
             k_ld, static_cast<const float*>(v), v_ld, rot, slot_mapping,
             static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, tables, nblk,
             block_size, ctx, scale, out);
}
