// Routed experts of one MoE layer on CPU, fp32 math (weights fp32, or bf16 widened in
// registers): the whole layer in one call, on the calling thread (em_fused_moe_f32), or begun
// on a helper thread that the caller joins later (em_fused_moe_f32_start / em_fused_moe_wait:
// the in-process gateway computes its shared experts meanwhile, then takes the experts the
// helper has not reached).
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
// Each expert's outputs land in rows of their own, and every row's slots are summed in slot
// order at the end, so the result does not depend on which thread computed which expert.
// The vector type (simd.h) is one AVX-512 register with -march=native where the CPU has them,
// two AVX2 (or four SSE) registers elsewhere; weights are prefetched 4 KB ahead.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "simd.h"  // v16, ld, ldw, st, splat, vexp, TILE_ROWS (expertmesh/ernie)

#define DIST 1024  // floats ahead (4 KB): of 128..4096, the best at 32 rows here, no loss at 1
#define PF(p) __builtin_prefetch((p), 0, 0)
static inline void relax() {  // in a spin loop
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

static inline v16 silu(v16 g) { return g / (1.0f + vexp(-g)); }

// act[m, 16j:16j+16] = silu(x[m] . gate_j) * (x[m] . up_j) for MT rows.
template <int MT, typename W>
static inline void up_tile(const float* x, int64_t H, const W* b, float* act, int64_t ip,
                           int64_t j) {
  v16 g[MT], u[MT];
  for (int m = 0; m < MT; m++) g[m] = u[m] = v16{};
  const W* bg = b;
  const W* bu = b + H * 16;
  for (int64_t k = 0; k < H; k++) {
    PF(bg + 16 * k + DIST); PF(bu + 16 * k + DIST);
    v16 wg = ldw(bg + 16 * k), wu = ldw(bu + 16 * k);
    for (int m = 0; m < MT; m++) {
      float xv = x[m * H + k];
      g[m] += xv * wg;
      u[m] += xv * wu;
    }
  }
  for (int m = 0; m < MT; m++) st(act + m * ip + 16 * j, silu(g[m]) * u[m]);
}

// y[m, 16h:16h+16 (and the next block when TWO)] = act[m] . down_h for MT rows.
template <int MT, bool TWO, typename W>
static inline void down_tile(const float* act, int64_t ip, const W* b, float* y, int64_t H,
                             int64_t hb) {
  v16 a0[MT], a1[MT];
  for (int m = 0; m < MT; m++) a0[m] = a1[m] = v16{};
  const W* b0 = b;
  const W* b1 = b + ip * 16;
  for (int64_t k = 0; k < ip; k++) {
    PF(b0 + 16 * k + DIST); if (TWO) PF(b1 + 16 * k + DIST);
    v16 w0 = ldw(b0 + 16 * k);
    v16 w1 = TWO ? ldw(b1 + 16 * k) : v16{};
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

// One row tile's share of column block j (up) or of block pair hb (down), MT = 1..8 rows,
// for weights of type W.
template <typename W>
struct Tiles {
  typedef void (*up_fn)(const float*, int64_t, const W*, float*, int64_t, int64_t);
  typedef void (*down_fn)(const float*, int64_t, const W*, float*, int64_t, int64_t);
  static constexpr up_fn UP[9] = {nullptr,        up_tile<1, W>, up_tile<2, W>,
                                  up_tile<3, W>,  up_tile<4, W>, up_tile<5, W>,
                                  up_tile<6, W>,  up_tile<7, W>, up_tile<8, W>};
  static constexpr down_fn DOWN2[9] = {
      nullptr,               down_tile<1, true, W>, down_tile<2, true, W>,
      down_tile<3, true, W>, down_tile<4, true, W>, down_tile<5, true, W>,
      down_tile<6, true, W>, down_tile<7, true, W>, down_tile<8, true, W>};
  static constexpr down_fn DOWN1[9] = {
      nullptr,                down_tile<1, false, W>, down_tile<2, false, W>,
      down_tile<3, false, W>, down_tile<4, false, W>, down_tile<5, false, W>,
      down_tile<6, false, W>, down_tile<7, false, W>, down_tile<8, false, W>};
};
static const int64_t T = TILE_ROWS;  // rows per register tile (simd.h: 8 on AVX-512, 4 on AVX2)

// y[c, H] = act[c, ip] . w2^T for w2 in its blocked layout [H/16, ip, 16]: the down
// projection, and the plain linear (em_linear_f32). Column blocks outside, row tiles inside.
template <typename W>
static void down_rows(const float* act, int64_t c, int64_t ip, const W* w2, float* y, int64_t H) {
  for (int64_t hb = 0; hb < H / 16; hb += 2) {
    const auto* down = hb + 1 < H / 16 ? Tiles<W>::DOWN2 : Tiles<W>::DOWN1;
    for (int64_t m = 0; m < c; m += T)
      down[c - m < T ? c - m : T](act + m * ip, ip, w2 + hb * ip * 16, y + m * H, H, hb);
  }
}

// y[c, H] = SwiGLU of one expert over its c rows xs[c, H]; act [c, ip] is scratch.
// Column blocks outside, row tiles inside: a block's weights (2 x H x 16 floats) are read
// from memory once and then from cache by every tile.
template <typename W>
static void expert_rows(const float* xs, int64_t c, float* act, float* y, int64_t H, int64_t ip,
                        const W* w13, const W* w2) {
  for (int64_t j = 0; j < ip / 16; j++)
    for (int64_t m = 0; m < c; m += T)
      Tiles<W>::UP[c - m < T ? c - m : T](xs + m * H, H, w13 + j * 2 * H * 16, act + m * ip, ip,
                                          j);
  down_rows(act, c, ip, w2, y, H);
}

// One layer's call: what to compute, grouped by expert, and where each (row, slot) pair's
// unweighted expert output goes. Experts are the unit of work: any thread claims the next one
// (`next`); each writes only its experts' rows of `ys`, so which thread took which expert does
// not change the result, and `reduce` sums every row's slots in slot order (deterministic).
struct Call {
  const float* x;
  int64_t n, H, k, n_experts;
  const int64_t* ids;
  const float* topw;
  std::vector<const void*> w13, w2;
  bool bf16;  // weights in bfloat16 (else float32)
  std::vector<int64_t> ip;
  float* out;
  std::vector<int64_t> start;  // [E + 1] each expert's first position in `order`
  std::vector<int64_t> order;  // [pairs] (row * k + slot), grouped by expert
  std::vector<int64_t> pos;    // [n * k] position of the pair in `order`, -1: not ours
  std::vector<float> ys;       // [pairs, H] each pair's expert output (before its weight)
  int64_t max_rows = 0, max_ip = 0;
  std::atomic<int64_t> next{0};
  // helper-thread state (async calls)
  std::atomic<bool> helper_done{false};
  std::mutex mu;
  std::condition_variable cv;
};

// Fill `c`'s plan; -1 for an id out of range.
static int plan(Call& c) {
  c.start.assign(c.n_experts + 1, 0);
  for (int64_t p = 0; p < c.n * c.k; p++) {
    int64_t e = c.ids[p];
    if (e >= c.n_experts) return -1;
    if (e >= 0) c.start[e + 1]++;
  }
  for (int64_t e = 0; e < c.n_experts; e++) {
    c.max_rows = c.start[e + 1] > c.max_rows ? c.start[e + 1] : c.max_rows;
    c.max_ip = c.ip[e] > c.max_ip ? c.ip[e] : c.max_ip;
    c.start[e + 1] += c.start[e];
  }
  int64_t pairs = c.start[c.n_experts];
  c.order.resize(pairs);
  c.pos.assign(c.n * c.k, -1);
  std::vector<int64_t> fill(c.start.begin(), c.start.end() - 1);
  for (int64_t p = 0; p < c.n * c.k; p++)
    if (c.ids[p] >= 0) {
      c.pos[p] = fill[c.ids[p]];
      c.order[fill[c.ids[p]]++] = p;
    }
  c.ys.resize(pairs * c.H);
  return 0;
}

// Compute experts until none is left unclaimed.
static void work(Call& c) {
  std::vector<float> xs(c.max_rows * c.H), act(c.max_rows * c.max_ip);
  for (int64_t e; (e = c.next.fetch_add(1)) < c.n_experts;) {
    int64_t s = c.start[e], rows = c.start[e + 1] - s;
    if (rows == 0) continue;
    for (int64_t m = 0; m < rows; m++)
      std::memcpy(&xs[m * c.H], c.x + (c.order[s + m] / c.k) * c.H, sizeof(float) * c.H);
    if (c.bf16)
      expert_rows(xs.data(), rows, act.data(), &c.ys[s * c.H], c.H, c.ip[e],
                  static_cast<const uint16_t*>(c.w13[e]), static_cast<const uint16_t*>(c.w2[e]));
    else
      expert_rows(xs.data(), rows, act.data(), &c.ys[s * c.H], c.H, c.ip[e],
                  static_cast<const float*>(c.w13[e]), static_cast<const float*>(c.w2[e]));
  }
}

// out[row] = sum over its slots, in order, of topw * the slot's expert output.
static void reduce(Call& c) {
  for (int64_t r = 0; r < c.n; r++) {
    float* o = c.out + r * c.H;
    std::memset(o, 0, sizeof(float) * c.H);
    for (int64_t j = 0; j < c.k; j++) {
      int64_t q = c.pos[r * c.k + j];
      if (q < 0) continue;
      float w = c.topw[r * c.k + j];
      const float* y = &c.ys[q * c.H];
      for (int64_t h = 0; h < c.H; h++) o[h] += w * y[h];
    }
  }
}

static Call* make_call(const float* x, int64_t n, int64_t H, const int64_t* ids,
                       const float* topw, int64_t k, int64_t n_experts, const void* const* w13,
                       const void* const* w2, const int64_t* ip, int64_t bf16, float* out) {
  Call* c = new Call;
  c->x = x, c->n = n, c->H = H, c->k = k, c->n_experts = n_experts, c->bf16 = bf16 != 0;
  c->ids = ids, c->topw = topw, c->out = out;
  c->w13.assign(w13, w13 + n_experts);
  c->w2.assign(w2, w2 + n_experts);
  c->ip.assign(ip, ip + n_experts);
  if (plan(*c) != 0) {
    delete c;
    return nullptr;
  }
  return c;
}

// The helper: one thread per process, started on first use, never stopped; its state lives
// on the heap so that nothing it waits on is destroyed at exit.
struct Helper {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Call*> queue;
};

static Helper* helper() {
  static Helper* h = [] {
    Helper* h = new Helper;
    std::thread([h] {
      for (;;) {
        Call* c;
        {
          std::unique_lock<std::mutex> lock(h->mu);
          h->cv.wait(lock, [h] { return !h->queue.empty(); });
          c = h->queue.front();
          h->queue.pop_front();
        }
        work(*c);
        std::lock_guard<std::mutex> lock(c->mu);  // notified under the lock: the waiter
        c->helper_done = true;                     // may delete c as soon as it has it
        c->cv.notify_one();
      }
    }).detach();
    return h;
  }();
  return h;
}

extern "C" {

int em_fused_moe_abi() { return 4; }

// out[n, H] = sum over (row, slot) with ids >= 0 of topw * SwiGLU expert ids[row, slot] (x[row]).
// x [n, H], ids [n, k] local expert ids (-1: not computed here), topw [n, k];
// w13 / w2 / ip: each expert's blocked weights and width, in bfloat16 when bf16 != 0 (else
// float32; x, topw and out are float32 either way). H % 16 == 0, ip % 16 == 0.
// Returns 0, or -1 for an id out of range (nothing computed).
int em_fused_moe_f32(const float* x, int64_t n, int64_t H, const int64_t* ids, const float* topw,
                     int64_t k, int64_t n_experts, const void* const* w13, const void* const* w2,
                     const int64_t* ip, int64_t bf16, float* out) {
  Call* c = make_call(x, n, H, ids, topw, k, n_experts, w13, w2, ip, bf16, out);
  if (c == nullptr) return -1;
  work(*c);
  reduce(*c);
  delete c;
  return 0;
}

// out[n, O] = x[n, K] . w^T, a plain linear layer on the calling thread, for few rows (the
// gateway's projections at decode sizes): w [O/16, K, 16] in w2's layout (block2 of the dense
// [O, K]), bfloat16 when bf16 != 0; x and out float32. O % 16 == 0.
void em_linear_f32(const float* x, int64_t n, int64_t K, int64_t O, const void* w, int64_t bf16,
                   float* out) {
  if (bf16)
    down_rows(x, n, K, static_cast<const uint16_t*>(w), out, O);
  else
    down_rows(x, n, K, static_cast<const float*>(w), out, O);
}

// The same call started on the helper thread: returns a handle for em_fused_moe_wait (null
// for an id out of range, nothing started). The caller keeps every buffer alive, and leaves
// x, ids and topw unchanged, until the wait returns.
void* em_fused_moe_f32_start(const float* x, int64_t n, int64_t H, const int64_t* ids,
                             const float* topw, int64_t k, int64_t n_experts,
                             const void* const* w13, const void* const* w2, const int64_t* ip,
                             int64_t bf16, float* out) {
  Call* c = make_call(x, n, H, ids, topw, k, n_experts, w13, w2, ip, bf16, out);
  if (c == nullptr) return nullptr;
  Helper* h = helper();
  {
    std::lock_guard<std::mutex> lock(h->mu);
    h->queue.push_back(c);
  }
  h->cv.notify_one();
  return c;
}

// Finish a started call: this thread computes the experts the helper has not claimed yet
// (all of them if the helper has not begun: a busy core never makes the call slower than
// computing it here), waits for the helper's, and writes out.
void em_fused_moe_wait(void* handle) {
  Call* c = static_cast<Call*>(handle);
  work(*c);
  Helper* h = helper();
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(h->mu);
    for (auto it = h->queue.begin(); it != h->queue.end(); ++it)
      if (*it == c) {
        h->queue.erase(it);
        queued = true;
        break;
      }
  }
  if (!queued) {
    // the helper is on its last expert: spin a while (a blocked caller gives its core away,
    // and waits for the scheduler to give one back), then sleep
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    while (!c->helper_done.load(std::memory_order_acquire) &&
           std::chrono::steady_clock::now() < until)
      relax();
    std::unique_lock<std::mutex> lock(c->mu);
    c->cv.wait(lock, [c] { return c->helper_done.load(); });
  }
  reduce(*c);
  delete c;
}
}
