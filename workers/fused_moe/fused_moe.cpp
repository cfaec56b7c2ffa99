// Routed experts of one MoE layer on one CPU thread, fp32: the whole layer in one call.
//
// Why: a decode step sends each expert a few rows; per expert, torch runs ~10 ops (gather,
// two matmuls, silu, mul, slices, scatter) at ~1-10 us of dispatch each, and oneDNN's
// matmul reads a 4 MB weight at ~28 GB/s, against ~40 GB/s for one long stream here. This
// kernel groups the rows by expert itself, and streams each expert's weights once through
// register tiles of up to 8 rows. Build: `g++ -O3 -march=native` (fused_moe/__init__.py);
// no torch headers, called through ctypes.
//
// Weight layouts (made by fused_moe.block13 / block2 from the checkpoint's dense ones), for an
// expert of width I (ip below; H and I multiples of 16):
//   w13 [I/16, 2, H, 16]: column block j of gate (0) and of up (1), k-major, 16 columns each;
//   w2  [H/16, I, 16]:    column block of down, k-major.
// The vector type is GCC's generic one: AVX-512 registers with -march=native where the CPU has
// them, two AVX2 (or four SSE) registers elsewhere; weights are prefetched 4 KB ahead.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

static inline v16 ld(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void st(float* p, v16 v) { std::memcpy(p, &v, 64); }
#define DIST 1024  // floats ahead (4 KB): of 128..4096, the best at 32 rows here, no loss at 1
#define PF(p) __builtin_prefetch((p), 0, 0)
static inline v16 splat(float x) { return v16{} + x; }

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

static inline v16 silu(v16 g) { return g / (1.0f + vexp(-g)); }

// act[m, 16j:16j+16] = silu(x[m] . gate_j) * (x[m] . up_j) for MT rows.
template <int MT>
static inline void up_tile(const float* x, int64_t H, const float* b, float* act, int64_t ip,
                           int64_t j) {
  v16 g[MT], u[MT];
  for (int m = 0; m < MT; m++) g[m] = u[m] = v16{};
  const float* bg = b;
  const float* bu = b + H * 16;
  for (int64_t k = 0; k < H; k++) {
    PF(bg + 16 * k + DIST); PF(bu + 16 * k + DIST);
    v16 wg = ld(bg + 16 * k), wu = ld(bu + 16 * k);
    for (int m = 0; m < MT; m++) {
      float xv = x[m * H + k];
      g[m] += xv * wg;
      u[m] += xv * wu;
    }
  }
  for (int m = 0; m < MT; m++) st(act + m * ip + 16 * j, silu(g[m]) * u[m]);
}

// y[m, 16h:16h+16 (and the next block when TWO)] = act[m] . down_h for MT rows.
template <int MT, bool TWO>
static inline void down_tile(const float* act, int64_t ip, const float* b, float* y, int64_t H,
                             int64_t hb) {
  v16 a0[MT], a1[MT];
  for (int m = 0; m < MT; m++) a0[m] = a1[m] = v16{};
  const float* b0 = b;
  const float* b1 = b + ip * 16;
  for (int64_t k = 0; k < ip; k++) {
    PF(b0 + 16 * k + DIST); if (TWO) PF(b1 + 16 * k + DIST);
    v16 w0 = ld(b0 + 16 * k);
    v16 w1 = TWO ? ld(b1 + 16 * k) : v16{};
    for (int m = 0; m < MT; m++) {
      float av = act[m * ip + k];
      a0[m] += av * w0;
      if (TWO) a1[m] += av * w1;
    }
  }
  for (int m = 0; m < MT; m++) {
    st(y + m * H + 16 * hb, a0[m]);
    if (TWO) st(y + m * H + 16 * (hb + 1), a1[m]);
  }
}

// One row tile's share of column block j (up) or of block pair hb (down), MT = 1..8 rows.
typedef void (*up_fn)(const float*, int64_t, const float*, float*, int64_t, int64_t);
typedef void (*down_fn)(const float*, int64_t, const float*, float*, int64_t, int64_t);
static const up_fn UP[9] = {nullptr,     up_tile<1>, up_tile<2>, up_tile<3>, up_tile<4>,
                            up_tile<5>, up_tile<6>, up_tile<7>, up_tile<8>};
static const down_fn DOWN2[9] = {nullptr,
                                 down_tile<1, true>, down_tile<2, true>, down_tile<3, true>,
                                 down_tile<4, true>, down_tile<5, true>, down_tile<6, true>,
                                 down_tile<7, true>, down_tile<8, true>};
static const down_fn DOWN1[9] = {nullptr,
                                 down_tile<1, false>, down_tile<2, false>, down_tile<3, false>,
                                 down_tile<4, false>, down_tile<5, false>, down_tile<6, false>,
                                 down_tile<7, false>, down_tile<8, false>};
static const int64_t T = 8;  // rows per register tile

// y[c, H] = SwiGLU of one expert over its c rows xs[c, H]; act [c, ip] is scratch.
// Column blocks outside, row tiles inside: a block's weights (2 x H x 16 floats) are read
// from memory once and then from cache by every tile.
static void expert_rows(const float* xs, int64_t c, float* act, float* y, int64_t H, int64_t ip,
                        const float* w13, const float* w2) {
  for (int64_t j = 0; j < ip / 16; j++)
    for (int64_t m = 0; m < c; m += T)
      UP[c - m < T ? c - m : T](xs + m * H, H, w13 + j * 2 * H * 16, act + m * ip, ip, j);
  for (int64_t hb = 0; hb < H / 16; hb += 2) {
    const down_fn* down = hb + 1 < H / 16 ? DOWN2 : DOWN1;
    for (int64_t m = 0; m < c; m += T)
      down[c - m < T ? c - m : T](act + m * ip, ip, w2 + hb * ip * 16, y + m * H, H, hb);
  }
}

extern "C" {

int em_fused_moe_abi() { return 1; }

// out[n, H] = sum over (row, slot) with ids >= 0 of topw * SwiGLU expert ids[row, slot] (x[row]).
// x [n, H], ids [n, k] local expert ids (-1: not computed here), topw [n, k];
// w13 / w2 / ip: each expert's blocked weights and width. H % 16 == 0, ip % 16 == 0.
// Returns 0, or -1 for an id out of range (nothing computed).
int em_fused_moe_f32(const float* x, int64_t n, int64_t H, const int64_t* ids, const float* topw,
                     int64_t k, int64_t n_experts, const float* const* w13,
                     const float* const* w2, const int64_t* ip, float* out) {
  std::memset(out, 0, sizeof(float) * n * H);
  std::vector<int64_t> count(n_experts + 1, 0);
  for (int64_t p = 0; p < n * k; p++) {
    int64_t e = ids[p];
    if (e >= n_experts) return -1;
    if (e >= 0) count[e + 1]++;
  }
  for (int64_t e = 0; e < n_experts; e++) count[e + 1] += count[e];  // starts
  int64_t pairs = count[n_experts];
  if (pairs == 0) return 0;
  std::vector<int64_t> order(pairs);  // (row * k + slot), grouped by expert
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < n * k; p++)
    if (ids[p] >= 0) order[fill[ids[p]]++] = p;
  int64_t max_ip = 0;
  for (int64_t e = 0; e < n_experts; e++) max_ip = ip[e] > max_ip ? ip[e] : max_ip;
  int64_t max_rows = 0;
  for (int64_t e = 0; e < n_experts; e++)
    max_rows = count[e + 1] - count[e] > max_rows ? count[e + 1] - count[e] : max_rows;
  std::vector<float> xs(max_rows * H), act(max_rows * max_ip), y(max_rows * H);
  for (int64_t e = 0; e < n_experts; e++) {
    int64_t s = count[e], c = count[e + 1] - count[e];
    if (c == 0) continue;
    for (int64_t m = 0; m < c; m++)
      std::memcpy(&xs[m * H], x + (order[s + m] / k) * H, sizeof(float) * H);
    expert_rows(xs.data(), c, act.data(), y.data(), H, ip[e], w13[e], w2[e]);
    for (int64_t m = 0; m < c; m++) {
      int64_t p = order[s + m];
      float w = topw[p];
      float* o = out + (p / k) * H;
      const float* ym = &y[m * H];
      for (int64_t h = 0; h < H; h++) o[h] += w * ym[h];
    }
  }
  return 0;
}
}
