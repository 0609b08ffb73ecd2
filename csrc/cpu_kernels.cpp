// CPU implementations: at::parallel_for over groups. Each group is reduced by one thread in a
// fixed order, so results are bitwise independent of the thread count. Fixed group sizes with
// float32/float64 rewards run several groups at once, one per SIMD lane (16-byte vectors, or
// 32-byte AVX2 vectors for float32 where the CPU has AVX2), with the per-group path's summation
// order, so that they give the per-group path's bits (see "Fixed group sizes" below).
// (-Wpsabi: blend_lanes takes and returns 32-byte vectors in the AVX2 path below, which inlines
// it; GCC warns about the ABI of an out-of-line call that never happens.)
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bv_blend_math.h"
#include "op_common.h"

namespace bv_blend {
namespace {

// Aim for roughly this many rewards per parallel task: small enough to spread 1024 groups of 16
// over a few threads, large enough to amortise the task overhead.
constexpr int64_t kRewardsPerTask = 16384;

int64_t group_grain(int64_t num_rewards, int64_t num_groups) {
  const int64_t avg = num_groups > 0 ? std::max<int64_t>(1, num_rewards / num_groups) : 1;
  return std::max<int64_t>(1, kRewardsPerTask / avg);
}

// Group reductions run over the lanes of one 16-byte vector (GCC/Clang vector extensions, so the
// same code compiles to SSE, AVX or NEON) and combine the lanes pairwise at the end: a fixed
// summation order, hence the same bits for any thread count or address, without a serial chain
// of dependent scalar additions. Counts are kept in floating-point lanes, exact because a lane
// sees at most kChunk / lanes rewards before they are moved to an integer.
constexpr int64_t kChunk = int64_t(1) << 20;

typedef float float_lanes __attribute__((vector_size(16)));
typedef double double_lanes __attribute__((vector_size(16)));

template <typename acc_t>
struct Lanes {
  using vec = std::conditional_t<std::is_same_v<acc_t, double>, double_lanes, float_lanes>;
  static constexpr int size = 16 / sizeof(acc_t);

  // Loads `count` <= size values; missing lanes read as `pad`: NaN by default, which every masked
  // reduction skips, or a value that makes an unmasked one add nothing.
  template <typename scalar_t>
  static vec load(const scalar_t* p, int64_t count = size,
                  acc_t pad = std::numeric_limits<acc_t>::quiet_NaN()) {
    vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (count == size) {
        std::memcpy(&v, p, sizeof(vec));
        return v;
      }
    }
    for (int l = 0; l < size; ++l) {
      v[l] = l < count ? static_cast<acc_t>(p[l]) : pad;
    }
    return v;
  }

  template <typename scalar_t>
  static void store(scalar_t* p, vec v, int64_t count = size) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (count == size) {
        std::memcpy(p, &v, sizeof(vec));
        return;
      }
    }
    for (int l = 0; l < count; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }

  // All-ones lanes where v is finite: x - x is NaN exactly for NaN and ±inf (see is_finite).
  static auto finite(vec v) { return v - v == vec{}; }

  // `value` where v is finite and 0 elsewhere; with Masked = false (every v known to be finite,
  // padding lanes loaded with a harmless value) simply `value`.
  template <bool Masked>
  static vec where_valid(vec v, vec value) {
    if constexpr (Masked) {
      return finite(v) ? value : vec{};
    } else {
      return value;
    }
  }

  static acc_t combine(vec v) {
    for (int width = size / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) v[l] += v[l + width];
    }
    return v[0];
  }

  // body(offset, count) over [0, n) in whole vectors and one partial vector.
  template <typename Body>
  static void for_each(int64_t n, const Body& body) {
    int64_t i = 0;
    for (; i + size <= n; i += size) body(i, int64_t(size));
    if (i < n) body(i, n - i);
  }
};

template <typename acc_t>
struct GroupMoments {
  int64_t count = 0;
  acc_t mean = 0;
  acc_t sq_dev = 0;
};

// Calls body(std::true_type) when some rewards of a group must be masked out as non-finite,
// body(std::false_type) when all of them are valid.
template <typename Body>
void with_finiteness_mask(bool all_valid, const Body& body) {
  if (all_valid) {
    body(std::false_type{});
  } else {
    body(std::true_type{});
  }
}

// Moments of a group's valid (finite) rewards. K > 0 is the group size known at compile time,
// which lets the compiler unroll small groups completely; K = 0 reads it from n. Once the first
// pass has found every reward valid (the common case), the later passes of this and the other
// per-group loops skip the finiteness mask.
template <int K, typename scalar_t, typename acc_t>
GroupMoments<acc_t> group_moments(const scalar_t* p, int64_t n_runtime) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  const int64_t n = K > 0 ? K : n_runtime;
  const vec zero = {}, one = zero + acc_t(1);
  GroupMoments<acc_t> m;
  acc_t total = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    vec sum = zero, valid = zero;
    L::for_each(std::min(kChunk, n - c), [&](int64_t i, int64_t count) {
      const vec v = L::load(p + c + i, count);
      const auto finite = L::finite(v);
      sum += finite ? v : zero;
      valid += finite ? one : zero;
    });
    total += L::combine(sum);
    m.count += static_cast<int64_t>(L::combine(valid));
  }
  if (m.count == 0) return m;
  m.mean = total / acc_t(m.count);
  with_finiteness_mask(m.count == n, [&](auto masked) {
    for (int64_t c = 0; c < n; c += kChunk) {
      vec sq = zero;
      L::for_each(std::min(kChunk, n - c), [&](int64_t i, int64_t count) {
        const vec v = L::load(p + c + i, count, m.mean);
        const vec d = v - m.mean;
        sq += L::template where_valid<decltype(masked)::value>(v, d * d);
      });
      m.sq_dev += L::combine(sq);
    }
  });
  return m;
}

// Σ g_i and Σ g_i (r_i - mean) over the valid rewards of a group, for the backward pass.
template <bool Masked, int K, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> grad_moments(const scalar_t* p, const scalar_t* grad, int64_t n_runtime,
                                     acc_t mean) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  const int64_t n = K > 0 ? K : n_runtime;
  const vec zero = {};
  acc_t sum_grad = 0, sum_centered = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    vec sum = zero, centered = zero;
    L::for_each(std::min(kChunk, n - c), [&](int64_t i, int64_t count) {
      const vec v = L::load(p + c + i, count, mean);
      const vec g = L::template where_valid<Masked>(v, L::load(grad + c + i, count, acc_t(0)));
      sum += g;
      centered += L::template where_valid<Masked>(v, g * (v - mean));
    });
    sum_grad += L::combine(sum);
    sum_centered += L::combine(centered);
  }
  return {sum_grad, sum_centered};
}

// ---- Fixed group sizes: one group per lane ----------------------------------------------------
// For a fixed group size K that is a multiple of the lane count W (and rewards already in acc_t:
// float32 or float64), W consecutive groups are processed together. Each group's sums are
// formed exactly as group_moments / grad_moments form them (lane l of the group adds the group's
// rewards l, l + W, l + 2W, ... to 0, then the lanes combine pairwise); a W x W transpose then puts
// the W groups' lane sums side by side, so the pairwise combine, the blend math (blend_lanes /
// gradient_lanes) and the writes run on all W groups at once. Every result is bitwise the one
// the per-group path computes. A block with a non-finite reward (or a sum that overflowed) is
// handed back to the per-group path, which masks.

template <typename acc_t>
struct VectorOps {
  using scalar = acc_t;
  using vec = typename Lanes<acc_t>::vec;
  template <typename M>
  static vec select(M mask, vec a, vec b) {
    return mask ? a : b;
  }
  static vec sqrt(vec x) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<acc_t, float>) {
      return __builtin_ia32_sqrtps(x);
    } else {
      return __builtin_ia32_sqrtpd(x);
    }
#else
    for (int l = 0; l < Lanes<acc_t>::size; ++l) x[l] = std::sqrt(x[l]);
    return x;
#endif
  }
};

// True when group size K runs on the block path for rewards of type scalar_t.
template <int K, typename scalar_t>
constexpr bool kBlockPath = std::is_same_v<scalar_t, accumulate_t<scalar_t>> && K > 0 &&
                            K % Lanes<accumulate_t<scalar_t>>::size == 0;

// Transposes W lane vectors in place: afterwards v[l][g] is what v[g][l] was.
template <typename vec>
inline void transpose_lanes(vec* v) {
  constexpr int W = sizeof(vec) / sizeof(v[0][0]);
  if constexpr (W == 4) {
    const vec t0 = __builtin_shufflevector(v[0], v[1], 0, 4, 1, 5);
    const vec t1 = __builtin_shufflevector(v[0], v[1], 2, 6, 3, 7);
    const vec t2 = __builtin_shufflevector(v[2], v[3], 0, 4, 1, 5);
    const vec t3 = __builtin_shufflevector(v[2], v[3], 2, 6, 3, 7);
    v[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    v[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    v[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    v[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
  } else {
    static_assert(W == 2);
    const vec t0 = __builtin_shufflevector(v[0], v[1], 0, 2);
    v[1] = __builtin_shufflevector(v[0], v[1], 1, 3);
    v[0] = t0;
  }
}

// For the W groups of K rewards at p: lane g of the result is 0 + combine(lane sums of
// term(j, g)) over the group's vectors j = 0, W, 2W, ...: group_moments' order for each group.
template <int K, typename acc_t, typename Term>
inline typename Lanes<acc_t>::vec block_sum(const Term& term) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  constexpr int W = L::size;
  vec s[W];
  for (int g = 0; g < W; ++g) {
    vec acc = {};
    for (int j = 0; j < K; j += W) acc += term(g * K + j, g);
    s[g] = acc;
  }
  transpose_lanes(s);
  for (int width = W / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) s[l] += s[l + width];
  }
  return vec{} + s[0];
}

// block_sum of two terms at once: terms(i, g) returns both as a pair.
template <int K, typename acc_t, typename Terms>
inline std::pair<typename Lanes<acc_t>::vec, typename Lanes<acc_t>::vec> block_sum2(
    const Terms& terms) {
  using L = Lanes<acc_t>;
  using vec = typename L::vec;
  constexpr int W = L::size;
  vec s[W], t[W];
  for (int g = 0; g < W; ++g) {
    vec sum_a = {}, sum_b = {};
    for (int j = 0; j < K; j += W) {
      const auto [a, b] = terms(g * K + j, g);
      sum_a += a;
      sum_b += b;
    }
    s[g] = sum_a;
    t[g] = sum_b;
  }
  transpose_lanes(s);
  transpose_lanes(t);
  for (int width = W / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      s[l] += s[l + width];
      t[l] += t[l + width];
    }
  }
  return {vec{} + s[0], vec{} + t[0]};
}

template <typename acc_t>
inline typename Lanes<acc_t>::vec load_lanes(const acc_t* p) {
  typename Lanes<acc_t>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store_lanes(acc_t* p, typename Lanes<acc_t>::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
inline bool all_finite(typename Lanes<acc_t>::vec v) {
  const auto finite = Lanes<acc_t>::finite(v);
  for (int l = 0; l < Lanes<acc_t>::size; ++l) {
    if (!finite[l]) return false;
  }
  return true;
}

// Count, mean and sum of squared deviations of W groups of K rewards, all finite: false (and
// nothing computed) when some reward is not finite.
template <int K, typename acc_t>
struct BlockMoments {
  using vec = typename Lanes<acc_t>::vec;
  vec mean, sq_dev;

  bool compute(const acc_t* r) {
    const vec total = block_sum<K, acc_t>([&](int i, int) { return load_lanes(r + i); });
    // A non-finite reward makes its group's sum NaN or ±inf; finite rewards whose sum overflows
    // also take the per-group path, which gives them the same bits it always did.
    if (!all_finite<acc_t>(total)) return false;
    mean = total / acc_t(K);
    sq_dev = block_sum<K, acc_t>([&](int i, int g) {
      const vec d = load_lanes(r + i) - mean[g];
      return d * d;
    });
    return true;
  }
};

// ---- float32 with AVX2: eight groups at once -------------------------------------------------
// The same sums as above, but a 256-bit vector holds the same 4-lane chunk of two groups, p and
// p + 4 (lanes 0-3 and 4-7): each half does exactly what the 16-byte path does for its group, and
// the in-lane transpose leaves groups 0..7 in lanes 0..7. Compiled for AVX2 (without FMA, so no
// product is fused into a sum and every rounding stays the one above) and used only where the CPU
// has it; everything it calls is inlined into it (flatten), so nothing compiled for AVX2 leaks
// into code that runs elsewhere. BV_BLEND_CPU_AVX2=0 in the environment turns it off (tests
// compare both).
#if defined(__x86_64__)
#define BVB_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
typedef int ivec8 __attribute__((vector_size(32)));

struct Ops {
  using scalar = float;
  template <typename M>
  static vec8 select(M mask, vec8 a, vec8 b) {
    return mask ? a : b;
  }
  static vec8 sqrt(vec8 x) { return __builtin_ia32_sqrtps256(x); }
};

inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// Chunk j (4 rewards) of groups p (low half) and p + 4 (high half), groups of K rewards at base.
template <int K>
inline vec8 load_pair(const float* base, int p, int j) {
  vec4 lo, hi;
  std::memcpy(&lo, base + p * K + 4 * j, sizeof(lo));
  std::memcpy(&hi, base + (p + 4) * K + 4 * j, sizeof(hi));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
}

template <int K>
inline void store_pair(float* base, int p, int j, vec8 v) {
  const vec4 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  const vec4 hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  std::memcpy(base + p * K + 4 * j, &lo, sizeof(lo));
  std::memcpy(base + (p + 4) * K + 4 * j, &hi, sizeof(hi));
}

// Lane p of v in the low half and lane p + 4 in the high half: a per-group value for pair p.
inline vec8 spread(vec8 v, int p) {
  const ivec8 index = {p, p, p, p, p + 4, p + 4, p + 4, p + 4};
  return __builtin_shuffle(v, index);
}

// Lane g: 0 + the pairwise combine of group g's lane sums of term(p, j), as block_sum.
template <int K, typename Term>
inline vec8 block_sum(const Term& term) {
  vec8 s[4];
  for (int p = 0; p < 4; ++p) {
    vec8 acc = {};
    for (int j = 0; j < K / 4; ++j) acc += term(p, j);
    s[p] = acc;
  }
  const vec8 t0 = __builtin_shufflevector(s[0], s[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t1 = __builtin_shufflevector(s[0], s[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 t2 = __builtin_shufflevector(s[2], s[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t3 = __builtin_shufflevector(s[2], s[3], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 lane0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 lane1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const vec8 lane2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 lane3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  return vec8{} + ((lane0 + lane2) + (lane1 + lane3));
}

inline bool all_finite(vec8 v) {
  const ivec8 finite = v - v == vec8{};
  return __builtin_ia32_movmskps256(reinterpret_cast<vec8>(finite)) == 0xff;
}

// Mean and sum of squared deviations of 8 groups of K finite rewards; false if one is not.
template <int K>
inline bool moments(const float* r, vec8& mean, vec8& sq_dev) {
  const vec8 total = block_sum<K>([&](int p, int j) { return load_pair<K>(r, p, j); });
  if (!all_finite(total)) return false;
  mean = total / float(K);
  const vec8 m = mean;
  sq_dev = block_sum<K>([&](int p, int j) {
    const vec8 d = load_pair<K>(r, p, j) - spread(m, p);
    return d * d;
  });
  return true;
}

template <int K>
__attribute__((flatten)) bool forward_block(const float* r, float* adv, float* mean_out,
                                            float* std_out, float* beta_out,
                                            const float* hist_mean, const float* hist_var,
                                            float eps, ScaleMode mode, float batch_scale) {
  vec8 mean, sq_dev;
  if (!moments<K>(r, mean, sq_dev)) return false;
  const auto b = blend_lanes<Ops>(vec8{} + float(K - 1), mean, sq_dev, load8(hist_mean),
                                  load8(hist_var), eps, mode, batch_scale);
  store8(mean_out, mean);
  store8(std_out, Ops::sqrt(b.var));
  store8(beta_out, b.beta);
  for (int p = 0; p < 4; ++p) {
    const vec8 baseline = spread(b.baseline, p), inv_scale = spread(b.inv_scale, p);
    for (int j = 0; j < K / 4; ++j) {
      store_pair<K>(adv, p, j, (load_pair<K>(r, p, j) - baseline) * inv_scale);
    }
  }
  return true;
}

template <int K>
__attribute__((flatten)) bool backward_block(const float* r, const float* grad, float* out,
                                             const float* hist_mean_lanes,
                                             const float* hist_var_lanes, float eps,
                                             ScaleMode mode, float batch_scale, float batch_mean,
                                             float batch_coef) {
  const vec8 hist_mean = load8(hist_mean_lanes), hist_var = load8(hist_var_lanes);
  vec8 mean, sq_dev;
  if (!moments<K>(r, mean, sq_dev)) return false;
  vec8 sum_grad = {}, sum_grad_centered = {};
  {
    // block_sum of two terms in one pass.
    vec8 s[4], c[4];
    for (int p = 0; p < 4; ++p) {
      const vec8 m = spread(mean, p);
      vec8 acc_s = {}, acc_c = {};
      for (int j = 0; j < K / 4; ++j) {
        const vec8 g = load_pair<K>(grad, p, j);
        acc_s += g;
        acc_c += g * (load_pair<K>(r, p, j) - m);
      }
      s[p] = acc_s;
      c[p] = acc_c;
    }
    sum_grad = block_sum<4>([&](int p, int) { return s[p]; });
    sum_grad_centered = block_sum<4>([&](int p, int) { return c[p]; });
  }
  const vec8 count_minus_one = vec8{} + float(K - 1);
  const auto b = blend_lanes<Ops>(count_minus_one, mean, sq_dev, hist_mean, hist_var, eps, mode,
                                  batch_scale);
  const auto c = gradient_lanes<Ops>(b, vec8{} + float(K), count_minus_one, mean, hist_mean,
                                     hist_var, mode, sum_grad, sum_grad_centered);
  const vec8 coef = Ops::select(b.usable, vec8{} + batch_coef, vec8{});
  for (int p = 0; p < 4; ++p) {
    const vec8 self = spread(c.self, p), shift = spread(c.shift, p),
               deviation = spread(c.deviation, p), m = spread(mean, p), k = spread(coef, p);
    for (int j = 0; j < K / 4; ++j) {
      const vec8 v = load_pair<K>(r, p, j);
      store_pair<K>(out, p, j, self * load_pair<K>(grad, p, j) + shift + deviation * (v - m) +
                                   k * (v - batch_mean));
    }
  }
  return true;
}

}  // namespace avx2
#pragma GCC pop_options
#endif

// Whether the AVX2 path runs: the CPU has AVX2 and BV_BLEND_CPU_AVX2 is not "0".
bool use_avx2() {
  static const bool enabled = [] {
    const char* env = std::getenv("BV_BLEND_CPU_AVX2");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
#if defined(BVB_CPU_AVX2)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return false;
#endif
  }();
  return enabled;
}

// Groups per block for rewards of scalar_t: 8 float32 groups with AVX2, else one per lane.
template <typename scalar_t>
int64_t block_groups() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_avx2()) return 8;
  }
  return Lanes<accumulate_t<scalar_t>>::size;
}

// Calls body(std::integral_constant<int, K>) with K = group_size for the common fixed sizes and
// K = 0 (sizes read at run time) for the rest and for ragged groups.
template <typename Body>
void with_static_group_size(const int64_t* offsets, int64_t group_size, const Body& body) {
  if (offsets == nullptr) {
    switch (group_size) {
      case 2: return body(std::integral_constant<int, 2>{});
      case 4: return body(std::integral_constant<int, 4>{});
      case 8: return body(std::integral_constant<int, 8>{});
      case 16: return body(std::integral_constant<int, 16>{});
      case 32: return body(std::integral_constant<int, 32>{});
      case 64: return body(std::integral_constant<int, 64>{});
      default: break;
    }
  }
  body(std::integral_constant<int, 0>{});
}

// Sum of term(i) over [0, n) in fixed chunks combined in order: the same bits for any thread
// count (ATen's own CPU reductions split work by thread count, which changes the rounding).
template <typename Term>
double deterministic_sum(int64_t n, const Term& term) {
  const int64_t chunks = (n + kRewardsPerTask - 1) / kRewardsPerTask;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      double sum = 0;
      const int64_t end = std::min(n, (c + 1) * kRewardsPerTask);
      for (int64_t i = c * kRewardsPerTask; i < end; ++i) sum += term(i);
      partial[c] = sum;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// Count, mean and sum of squared deviations of the call's finite rewards (scale="batch"), in
// fixed chunks: the same bits for any thread count.
struct CpuBatchMoments {
  double count = 0;
  double mean = 0;
  double sq_dev = 0;
};

CpuBatchMoments cpu_batch_moments(const at::Tensor& rewards) {
  CpuBatchMoments m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "batch_moments_cpu", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const int64_t n = rewards.numel();
    auto value = [&](int64_t i) { return static_cast<double>(r[i]); };
    m.count = deterministic_sum(n, [&](int64_t i) { return std::isfinite(value(i)) ? 1.0 : 0.0; });
    const double sum = deterministic_sum(n, [&](int64_t i) {
      return std::isfinite(value(i)) ? value(i) : 0.0;
    });
    m.mean = m.count > 0 ? sum / m.count : 0.0;
    m.sq_dev = deterministic_sum(n, [&](int64_t i) {
      return std::isfinite(value(i)) ? (value(i) - m.mean) * (value(i) - m.mean) : 0.0;
    });
  });
  return m;
}

double cpu_dot(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.to(at::kDouble).contiguous();
  const at::Tensor b = b_in.to(at::kDouble).contiguous();
  const double* ap = a.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  return deterministic_sum(a.numel(), [&](int64_t i) { return ap[i] * bp[i]; });
}

// Keys are typically prompt ids drawn at random from a large table (K ~ 10^6: 32 MB in BVBlend's
// records), so nearly every table read misses the cache. The gather is a tight loop without
// dependences between groups, so the out-of-order core already keeps many of its misses in
// flight (software prefetch measured no faster there, nor inside the forward's loop, where the
// misses of the gather did not overlap with the arithmetic: gathering each group's history as
// the forward reaches it, with or without prefetch, made a keyed step at 16384 groups, whose
// lines come from DRAM, 1.4x slower, and one at 1024 no faster); the update's longer, branchy
// body does gain from prefetching the entries of the group kPrefetchDistance ahead when it runs on
// its own (a third faster at K = 10^6). In a keyed step it mostly finds the lines the gather
// brought in, and the prefetch makes no measurable difference.
constexpr int64_t kPrefetchDistance = 32;

// Groups per task of the gather: the tables' misses, not the arithmetic, set its cost.
constexpr int64_t kGatherGrain = 4096;

// Below this many groups the key update runs on one thread, in group order. Above, each task owns
// a range of keys and walks every group in order, updating its own keys only: every key still sees
// its visits in group order, so the tables get the same bits for any thread count.
constexpr int64_t kParallelKeyUpdate = 65536;

// keyed_history's gather: each group's H and σ_u² from its key (KeyTableView::history_of).
struct KeyGather {
  const int64_t* keys;
  KeyTableView tables;
  double global_mean, global_var;
  double* mean_out;
  double* var_out;

  void gather(int64_t first, int64_t last) const {
    for (int64_t g = first; g < last; ++g) {
      tables.history_of(keys[g], global_mean, global_var, mean_out[g], var_out[g]);
    }
  }
};

// H and σ_u² as the CPU kernels read them: float64, group g's at g * stride, where the stride is 0
// for a 0-dim statistic shared by every group. Each group's pair passes through usable_history on
// its own, so a (G,) statistic holding one value gives the bits of that value as a scalar.
struct CpuHistory {
  at::Tensor mean_values, var_values;  // float64 and contiguous: the inputs or converted copies
  const double* mean;
  const double* var;
  int64_t mean_stride, var_stride;

  template <typename acc_t>
  History<acc_t> at(int64_t group) const {
    return usable_history<acc_t>(acc_t(mean[group * mean_stride]),
                                 acc_t(var[group * var_stride]));
  }

  // The histories of groups [first, first + n), for the lanes of a block.
  template <typename acc_t>
  void fill(int64_t first, int n, acc_t* means, acc_t* vars) const {
    for (int l = 0; l < n; ++l) {
      const History<acc_t> h = at<acc_t>(first + l);
      means[l] = h.mean;
      vars[l] = h.var;
    }
  }
};

at::Tensor as_contiguous_double(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble && t.is_contiguous() ? t : t.to(at::kDouble).contiguous();
}

CpuHistory cpu_history(const at::Tensor& hist_mean, const at::Tensor& hist_var) {
  CpuHistory h{as_contiguous_double(hist_mean), as_contiguous_double(hist_var)};
  h.mean = h.mean_values.const_data_ptr<double>();
  h.var = h.var_values.const_data_ptr<double>();
  h.mean_stride = hist_mean.dim() == 0 ? 0 : 1;
  h.var_stride = hist_var.dim() == 0 ? 0 : 1;
  return h;
}

// Writes 0 to the rewards that no group covers: those before offsets[0] and from offsets[G] on
// (only possible with offsets that skipped validation).
template <typename scalar_t>
void zero_uncovered(const GroupInputs& in, scalar_t* out) {
  const int64_t* offsets = in.offsets_ptr();
  if (offsets == nullptr) return;
  const int64_t num_rewards = in.rewards.numel();
  std::fill(out, out + offsets[0], scalar_t(0));
  std::fill(out + offsets[in.num_groups], out + num_rewards, scalar_t(0));
}

// Calls body(static_size, group, start, n) for every group, in parallel over groups; n is the
// group's length, a compile-time constant (decltype(static_size)::value) for common fixed sizes.
// Where kBlockPath<K, scalar_t>, runs of block_groups<scalar_t>() groups go to
// block(static_size, first_group) first,
// which returns false to have body handle them one by one. Which groups form a block depends on
// the thread count, but a group's results do not depend on the path.
template <typename scalar_t, typename Block, typename Body>
void parallel_over_groups(const GroupInputs& in, int64_t group_size, const Block& block,
                          const Body& body) {
  const int64_t* offsets = in.offsets_ptr();
  const int64_t num_rewards = in.rewards.numel();
  with_static_group_size(offsets, group_size, [&](auto static_size) {
    constexpr int K = decltype(static_size)::value;
    at::parallel_for(0, in.num_groups, group_grain(num_rewards, in.num_groups),
                     [&](int64_t first, int64_t last) {
      int64_t g = first;
      if constexpr (kBlockPath<K, scalar_t>) {
        const int64_t W = block_groups<scalar_t>();
        for (; g + W <= last; g += W) {
          if (block(static_size, g)) continue;
          for (int64_t h = 0; h < W; ++h) body(static_size, g + h, (g + h) * K, int64_t(K));
        }
      }
      for (; g < last; ++g) {
        int64_t start, end;
        group_bounds(offsets, group_size, g, start, end);
        body(static_size, g, start, K > 0 ? K : end - start);
      }
    });
  });
}

// This and the backward below are long because each holds its two paths side by side, the block
// of groups one per lane and the single group, so that a reader can check they compute the same
// thing; the formulas themselves are in bv_blend_math.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const GroupInputs& in,
                                                                       int64_t group_size,
                                                                       const CpuHistory& history,
                                                                       double eps) {
  auto [advantages, group_mean, group_std, beta] = allocate_outputs(in.rewards, in.num_groups);
  double batch_scale = 1.0;
  if (in.mode == ScaleMode::Batch) {
    const CpuBatchMoments moments = cpu_batch_moments(in.rewards);
    batch_scale = batch_std(moments.count, moments.sq_dev) + eps;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(),
                                  "group_advantages_cpu", [&] {
    using acc_t = accumulate_t<scalar_t>;
    using L = Lanes<acc_t>;
    const scalar_t* r = in.rewards.data_ptr<scalar_t>();
    scalar_t* adv = advantages.data_ptr<scalar_t>();
    zero_uncovered(in, adv);
    acc_t* mean_out = group_mean.data_ptr<acc_t>();
    acc_t* std_out = group_std.data_ptr<acc_t>();
    acc_t* beta_out = beta.data_ptr<acc_t>();
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    auto block = [&](auto static_size, int64_t g0) {
      constexpr int K = decltype(static_size)::value;
      if constexpr (kBlockPath<K, scalar_t>) {
        using vec = typename L::vec;
        const acc_t* rb = reinterpret_cast<const acc_t*>(r) + g0 * K;
#if defined(BVB_CPU_AVX2)
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_avx2()) {
            float hm[8], hv[8];
            history.fill<float>(g0, 8, hm, hv);
            return avx2::forward_block<K>(rb, reinterpret_cast<float*>(adv) + g0 * K,
                                          mean_out + g0, std_out + g0, beta_out + g0, hm, hv,
                                          acc_t(eps), in.mode, acc_t(batch_scale));
          }
        }
#endif
        BlockMoments<K, acc_t> m;
        if (!m.compute(rb)) return false;
        acc_t hm[L::size], hv[L::size];
        history.fill<acc_t>(g0, L::size, hm, hv);
        const auto b = blend_lanes<VectorOps<acc_t>>(vec{} + acc_t(K - 1), m.mean, m.sq_dev,
                                                     load_lanes(hm), load_lanes(hv), acc_t(eps),
                                                     in.mode, acc_t(batch_scale));
        store_lanes(mean_out + g0, m.mean);
        store_lanes(std_out + g0, VectorOps<acc_t>::sqrt(b.var));
        store_lanes(beta_out + g0, b.beta);
        acc_t* ab = reinterpret_cast<acc_t*>(adv) + g0 * K;
        for (int h = 0; h < L::size; ++h) {
          const acc_t baseline = b.baseline[h], inv_scale = b.inv_scale[h];
          for (int j = 0; j < K; j += L::size) {
            store_lanes(ab + h * K + j, (load_lanes(rb + h * K + j) - baseline) * inv_scale);
          }
        }
        return true;
      }
      return false;
    };
    parallel_over_groups<scalar_t>(in, group_size, block, [&](auto static_size, int64_t g, int64_t start, int64_t n) {
      constexpr int K = decltype(static_size)::value;
      const auto m = group_moments<K, scalar_t, acc_t>(r + start, n);
      if (m.count == 0) {
        mean_out[g] = std_out[g] = beta_out[g] = nan;
        std::fill(adv + start, adv + start + n, scalar_t(0));
        return;
      }
      const History<acc_t> h = history.at<acc_t>(g);
      const auto b = blend_group<acc_t>(m.count, m.mean, m.sq_dev, h.mean, h.var, acc_t(eps),
                                        in.mode, acc_t(batch_scale));
      mean_out[g] = b.mean;
      std_out[g] = std::sqrt(b.var);
      beta_out[g] = b.beta;
      with_finiteness_mask(m.count == n, [&](auto masked) {
        L::for_each(n, [&](int64_t i, int64_t count) {
          const typename L::vec v = L::load(r + start + i, count);
          L::store(adv + start + i,
                   L::template where_valid<decltype(masked)::value>(
                       v, (v - b.baseline) * b.inv_scale),
                   count);
        });
      });
    });
  });
  return {advantages, group_mean, group_std, beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size,
    const at::Tensor& hist_mean, const at::Tensor& hist_var, double eps, c10::string_view scale) {
  const GroupInputs in =
      prepare_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  return forward_cpu(in, group_size, cpu_history(hist_mean, hist_var), eps);
}

at::Tensor group_advantages_backward_cpu(const at::Tensor& grad_in, const at::Tensor& advantages,
                                         const at::Tensor& rewards_in,
                                         const std::optional<at::Tensor>& offsets_in,
                                         int64_t group_size, const at::Tensor& hist_mean,
                                         const at::Tensor& hist_var, double eps,
                                         c10::string_view scale) {
  const GroupInputs in =
      prepare_group_inputs(rewards_in, offsets_in, group_size, hist_mean, hist_var, eps, scale);
  check_backward_inputs(grad_in, advantages, rewards_in);
  const at::Tensor grad = grad_in.to(in.rewards.scalar_type()).contiguous();
  at::Tensor grad_rewards = at::empty_like(in.rewards, at::MemoryFormat::Contiguous);
  double batch_scale = 1.0, batch_mean = 0.0, batch_coef = 0.0;
  if (in.mode == ScaleMode::Batch) {
    const CpuBatchMoments moments = cpu_batch_moments(in.rewards);
    const double std = batch_std(moments.count, moments.sq_dev);
    batch_scale = std + eps;
    batch_mean = moments.mean;
    batch_coef = batch_scale_coefficient(cpu_dot(grad, advantages), moments.count, std, eps);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(),
                                  "group_advantages_backward_cpu", [&] {
    using acc_t = accumulate_t<scalar_t>;
    using L = Lanes<acc_t>;
    const CpuHistory history = cpu_history(hist_mean, hist_var);
    const scalar_t* r = in.rewards.data_ptr<scalar_t>();
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_rewards.data_ptr<scalar_t>();
    zero_uncovered(in, out);
    auto block = [&](auto static_size, int64_t g0) {
      constexpr int K = decltype(static_size)::value;
      if constexpr (kBlockPath<K, scalar_t>) {
        using vec = typename L::vec;
        const acc_t* rb = reinterpret_cast<const acc_t*>(r) + g0 * K;
        const acc_t* gb = reinterpret_cast<const acc_t*>(gr) + g0 * K;
#if defined(BVB_CPU_AVX2)
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_avx2()) {
            float hm[8], hv[8];
            history.fill<float>(g0, 8, hm, hv);
            return avx2::backward_block<K>(rb, gb, reinterpret_cast<float*>(out) + g0 * K, hm,
                                           hv, acc_t(eps), in.mode, acc_t(batch_scale),
                                           acc_t(batch_mean), acc_t(batch_coef));
          }
        }
#endif
        BlockMoments<K, acc_t> m;
        if (!m.compute(rb)) return false;
        const auto [sum_grad, sum_grad_centered] = block_sum2<K, acc_t>([&](int i, int h) {
          const vec g = load_lanes(gb + i);
          return std::pair<vec, vec>{g, g * (load_lanes(rb + i) - m.mean[h])};
        });
        const vec count_minus_one = vec{} + acc_t(K - 1);
        acc_t hm_lanes[L::size], hv_lanes[L::size];
        history.fill<acc_t>(g0, L::size, hm_lanes, hv_lanes);
        const vec hm = load_lanes(hm_lanes), hv = load_lanes(hv_lanes);
        const auto b = blend_lanes<VectorOps<acc_t>>(count_minus_one, m.mean, m.sq_dev, hm, hv,
                                                     acc_t(eps), in.mode, acc_t(batch_scale));
        const auto c = gradient_lanes<VectorOps<acc_t>>(b, vec{} + acc_t(K), count_minus_one,
                                                        m.mean, hm, hv, in.mode, sum_grad,
                                                        sum_grad_centered);
        const vec batch_coef_lanes =
            VectorOps<acc_t>::select(b.usable, vec{} + acc_t(batch_coef), vec{});
        acc_t* ob = reinterpret_cast<acc_t*>(out) + g0 * K;
        for (int h = 0; h < L::size; ++h) {
          const acc_t self = c.self[h], shift = c.shift[h], deviation = c.deviation[h],
                      mean = m.mean[h], coef = batch_coef_lanes[h];
          for (int j = 0; j < K; j += L::size) {
            const vec v = load_lanes(rb + h * K + j);
            store_lanes(ob + h * K + j, self * load_lanes(gb + h * K + j) + shift +
                                            deviation * (v - mean) +
                                            coef * (v - acc_t(batch_mean)));
          }
        }
        return true;
      }
      return false;
    };
    parallel_over_groups<scalar_t>(in, group_size, block, [&](auto static_size, int64_t g, int64_t start, int64_t n) {
      constexpr int K = decltype(static_size)::value;
      const auto m = group_moments<K, scalar_t, acc_t>(r + start, n);
      if (m.count == 0) {
        std::fill(out + start, out + start + n, scalar_t(0));
        return;
      }
      with_finiteness_mask(m.count == n, [&](auto masked) {
        constexpr bool kMasked = decltype(masked)::value;
        const auto [sum_grad, sum_grad_centered] =
            grad_moments<kMasked, K, scalar_t, acc_t>(r + start, gr + start, n, m.mean);
        const History<acc_t> h = history.at<acc_t>(g);
        const auto b = blend_group<acc_t>(m.count, m.mean, m.sq_dev, h.mean, h.var, acc_t(eps),
                                          in.mode, acc_t(batch_scale));
        const auto c = group_gradient<acc_t>(b, h.mean, h.var, in.mode, sum_grad,
                                             sum_grad_centered);
        const acc_t group_batch_coef = b.usable ? acc_t(batch_coef) : acc_t(0);
        L::for_each(n, [&](int64_t i, int64_t count) {
          const typename L::vec v = L::load(r + start + i, count);
          const typename L::vec grad_i = c.self * L::load(gr + start + i, count) + c.shift +
                                         c.deviation * (v - m.mean) +
                                         group_batch_coef * (v - acc_t(batch_mean));
          L::store(out + start + i, L::template where_valid<kMasked>(v, grad_i), count);
        });
      });
    });
  });
  return grad_rewards;
}

// Groups per chunk of the history update. A call of at most this many groups runs the EMA
// recursion exactly as defined, one push after the other; a larger one runs it per chunk, the
// chunks in parallel, and combines them in order (see push_group_means).
constexpr int64_t kHistoryChunk = 8192;

// Pushes the finite means in group order: the last `window` of them land in their ring slots and
// the EMA follows H <- (1 - α)·H + α·μ for each. The count is read as 0 when negative and
// saturates at INT64_MAX, so whatever a (corrupted) state holds, every slot written lies inside
// the ring.
//
// The EMA of chunk c, run from 0 (chunk 0 from H), is S_c; with n_c pushes in chunk c the EMA
// after it is (1 - α)^n_c·H_(c-1) + S_c, which the chunks are combined by, in order. The chunking
// is fixed, so the result has the same bits for any thread count, and a single chunk is exactly
// the sequential recursion.
template <typename acc_t>
void push_group_means(const acc_t* means, int64_t num_groups, double* ring, int64_t window,
                      int64_t& count, double& ema, double alpha) {
  const uint64_t before = count < 0 ? 0 : static_cast<uint64_t>(count);
  const double keep = 1.0 - alpha;
  const int64_t chunks = (num_groups + kHistoryChunk - 1) / kHistoryChunk;
  std::vector<double> chunk_ema(chunks);
  std::vector<int64_t> chunk_pushes(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      double h = c == 0 ? ema : 0.0;
      int64_t pushes = 0;
      const int64_t end = std::min(num_groups, (c + 1) * kHistoryChunk);
      for (int64_t g = c * kHistoryChunk; g < end; ++g) {
        const double mu = static_cast<double>(means[g]);
        if (!is_finite(mu)) continue;
        h = keep * h + alpha * mu;
        ++pushes;
      }
      chunk_ema[c] = h;
      chunk_pushes[c] = pushes;
    }
  });
  uint64_t pushes = 0;
  double h = ema;
  for (int64_t c = 0; c < chunks; ++c) {
    h = c == 0 ? chunk_ema[0]
               : std::pow(keep, static_cast<double>(chunk_pushes[c])) * h + chunk_ema[c];
    pushes += static_cast<uint64_t>(chunk_pushes[c]);
  }
  ema = h;

  // Only the last `window` pushes survive in the ring: walk back from the end to place them.
  const auto slots = static_cast<uint64_t>(window);
  uint64_t placed = 0;
  for (int64_t g = num_groups - 1; g >= 0 && placed < std::min(pushes, slots); --g) {
    const double mu = static_cast<double>(means[g]);
    if (!is_finite(mu)) continue;
    ++placed;
    ring[(before + (pushes - placed)) % slots] = mu;
  }
  constexpr auto kMaxCount = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  count = static_cast<int64_t>(before > kMaxCount - pushes ? kMaxCount : before + pushes);
}

double ring_variance(const double* ring, int64_t entries, int64_t min_history) {
  if (entries < std::max<int64_t>(2, min_history)) return 0.0;
  double sum = 0;
  for (int64_t i = 0; i < entries; ++i) sum += ring[i];
  const double mean = sum / double(entries);
  double sq = 0;
  for (int64_t i = 0; i < entries; ++i) sq += (ring[i] - mean) * (ring[i] - mean);
  return sq / double(entries - 1);
}

// The global half of both history updates: group_mean already checked and contiguous.
void update_global_history(const at::Tensor& group_mean, at::Tensor& ring, at::Tensor& count,
                           at::Tensor& ema, at::Tensor& var, double alpha, int64_t min_history) {
  const int64_t window = ring.numel();
  int64_t& pushed = *count.data_ptr<int64_t>();
  double& h = *ema.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(group_mean.scalar_type(), "update_history_cpu", [&] {
    push_group_means<scalar_t>(group_mean.data_ptr<scalar_t>(), group_mean.numel(),
                               ring.data_ptr<double>(), window, pushed, h, alpha);
  });
  *var.data_ptr<double>() = ring_variance(ring.data_ptr<double>(), std::min(pushed, window), min_history);
}

void update_history_cpu(const at::Tensor& group_mean_in, at::Tensor& ring, at::Tensor& count,
                        at::Tensor& ema, at::Tensor& var, double alpha, int64_t min_history) {
  check_history_inputs(group_mean_in, ring, count, ema, var, alpha, min_history);
  update_global_history(group_mean_in.contiguous(), ring, count, ema, var, alpha, min_history);
}

// A 0-dim CPU tensor's value; reads float64 (what BVBlend's buffers hold) without a dispatch.
double cpu_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : t.item<double>();
}

// ---- Per-key history ----------------------------------------------------------------------------

// The (G,) float64 H and σ_u² of every group of a keyed call (see keyed_history), gathered in
// parallel over groups: each group is read and written on its own.
std::tuple<at::Tensor, at::Tensor> gather_key_history(const at::Tensor& keys_in,
                                                      const at::Tensor& key_count,
                                                      const at::Tensor& key_mean,
                                                      const at::Tensor& key_var,
                                                      const at::Tensor& hist_mean,
                                                      const at::Tensor& hist_var,
                                                      int64_t key_min_history) {
  const at::Tensor keys = keys_in.contiguous();
  const int64_t num_groups = keys.numel();
  const auto options = keys.options().dtype(at::kDouble);
  at::Tensor group_mean = at::empty({num_groups}, options);
  at::Tensor group_var = at::empty({num_groups}, options);
  const KeyGather gather{keys.const_data_ptr<int64_t>(),
                         key_table_view(key_count, key_mean, key_var, key_min_history),
                         cpu_scalar(hist_mean),
                         cpu_scalar(hist_var),
                         group_mean.data_ptr<double>(),
                         group_var.data_ptr<double>()};
  at::parallel_for(0, num_groups, kGatherGrain,
                   [&](int64_t first, int64_t last) { gather.gather(first, last); });
  return {group_mean, group_var};
}

std::tuple<at::Tensor, at::Tensor> keyed_history_cpu(const at::Tensor& keys,
                                                     const at::Tensor& key_count,
                                                     const at::Tensor& key_mean,
                                                     const at::Tensor& key_var,
                                                     const at::Tensor& hist_mean,
                                                     const at::Tensor& hist_var,
                                                     int64_t key_min_history) {
  check_keyed_history_inputs(keys, key_count, key_mean, key_var, hist_mean, hist_var,
                             key_min_history);
  return gather_key_history(keys, key_count, key_mean, key_var, hist_mean, hist_var,
                            key_min_history);
}

// The gather, then the forward blending each group with its gathered history; the checks done.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
keyed_forward_cpu(const GroupInputs& in, int64_t group_size, const at::Tensor& keys,
                  const at::Tensor& key_count, const at::Tensor& key_mean,
                  const at::Tensor& key_var, const at::Tensor& hist_mean,
                  const at::Tensor& hist_var, int64_t key_min_history, double eps) {
  auto [group_hist_mean, group_hist_var] = gather_key_history(
      keys, key_count, key_mean, key_var, hist_mean, hist_var, key_min_history);
  auto [advantages, group_mean, group_std, beta] =
      forward_cpu(in, group_size, cpu_history(group_hist_mean, group_hist_var), eps);
  return {advantages, group_mean, group_std, beta, group_hist_mean, group_hist_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
keyed_group_advantages_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                           int64_t group_size, const at::Tensor& keys,
                           const at::Tensor& key_count, const at::Tensor& key_mean,
                           const at::Tensor& key_var, const at::Tensor& hist_mean,
                           const at::Tensor& hist_var, int64_t key_min_history, double eps,
                           c10::string_view scale) {
  check_keyed_history_inputs(keys, key_count, key_mean, key_var, hist_mean, hist_var,
                             key_min_history);
  const GroupInputs in =
      prepare_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  check_group_keys(keys, rewards, in.num_groups);
  return keyed_forward_cpu(in, group_size, keys, key_count, key_mean, key_var, hist_mean,
                           hist_var, key_min_history, eps);
}

// Visits of keys in [first_key, last_key) by the groups in order (see visit_key); key k's entries
// at k * stride.
template <typename acc_t>
void visit_keys(const acc_t* group_mean, const int64_t* keys, int64_t num_groups, int64_t first_key,
                int64_t last_key, double alpha, int64_t* count, double* mean, double* var,
                int64_t stride) {
  const auto owned = [&](int64_t k) { return k >= first_key && k < last_key; };
  for (int64_t g = 0; g < num_groups; ++g) {
    if (g + kPrefetchDistance < num_groups && owned(keys[g + kPrefetchDistance])) {
      const int64_t ahead = keys[g + kPrefetchDistance] * stride;
      __builtin_prefetch(count + ahead, 1, 3);
      __builtin_prefetch(mean + ahead, 1, 3);
      __builtin_prefetch(var + ahead, 1, 3);
    }
    const int64_t k = keys[g];
    const double mu = static_cast<double>(group_mean[g]);
    if (!owned(k) || !is_finite(mu)) continue;
    const int64_t slot = k * stride;
    visit_key(count[slot], mean[slot], var[slot], mu, alpha);
  }
}

// The update of a keyed call, its checks done and group_mean and keys contiguous.
void keyed_update_cpu(const at::Tensor& group_mean, const at::Tensor& keys, at::Tensor& key_count,
                      at::Tensor& key_mean, at::Tensor& key_var, double key_alpha,
                      at::Tensor& ring, at::Tensor& count, at::Tensor& ema, at::Tensor& var,
                      double alpha, int64_t min_history) {
  const int64_t num_groups = keys.numel(), num_keys = key_count.numel();
  const int64_t stride = key_table_stride(key_count);
  AT_DISPATCH_FLOATING_TYPES(group_mean.scalar_type(), "update_keyed_history_cpu", [&] {
    const scalar_t* means = group_mean.const_data_ptr<scalar_t>();
    const int64_t* k_ptr = keys.const_data_ptr<int64_t>();
    int64_t* counts = key_count.data_ptr<int64_t>();
    double* key_means = key_mean.data_ptr<double>();
    double* key_vars = key_var.data_ptr<double>();
    if (num_groups < kParallelKeyUpdate) {
      visit_keys(means, k_ptr, num_groups, 0, num_keys, key_alpha, counts, key_means, key_vars,
                 stride);
      return;
    }
    const int64_t tasks = std::max<int64_t>(1, at::get_num_threads());
    const int64_t keys_per_task = (num_keys + tasks - 1) / tasks;
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        visit_keys(means, k_ptr, num_groups, t * keys_per_task,
                   std::min(num_keys, (t + 1) * keys_per_task), key_alpha, counts, key_means,
                   key_vars, stride);
      }
    });
  });
  update_global_history(group_mean, ring, count, ema, var, alpha, min_history);
}

void update_keyed_history_cpu(const at::Tensor& group_mean, const at::Tensor& keys,
                              at::Tensor& key_count, at::Tensor& key_mean, at::Tensor& key_var,
                              double key_alpha, at::Tensor& ring, at::Tensor& count,
                              at::Tensor& ema, at::Tensor& var, double alpha,
                              int64_t min_history) {
  check_history_inputs(group_mean, ring, count, ema, var, alpha, min_history);
  check_keyed_update_inputs(group_mean, keys, key_count, key_mean, key_var, key_alpha);
  keyed_update_cpu(group_mean.contiguous(), keys.contiguous(), key_count, key_mean, key_var,
                   key_alpha, ring, count, ema, var, alpha, min_history);
}

// keyed_step's validation on the host, where reading the values costs no transfer: the offsets,
// then the keys. A key k lies in [0, num_keys) exactly when neither k nor num_keys - 1 - k
// (modulo 2^64) has its top bit set, so one OR over the keys (which vectorises) decides; only a
// failing call pays for the smallest and largest key, which the message names.
void validate_keyed_step_cpu(const std::optional<at::Tensor>& offsets, int64_t num_rewards,
                             const int64_t* keys, int64_t num_groups, int64_t num_keys) {
  if (offsets.has_value()) {
    const at::Tensor bounds = offsets->contiguous();
    const int64_t* o = bounds.const_data_ptr<int64_t>();
    bool decreasing = false;
    for (int64_t i = 1; i < bounds.numel(); ++i) decreasing |= o[i] < o[i - 1];
    check_offset_values(o[0], o[bounds.numel() - 1], decreasing, num_rewards);
  }
  uint64_t bits = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const auto key = static_cast<uint64_t>(keys[g]);
    bits |= key | (static_cast<uint64_t>(num_keys - 1) - key);
  }
  if (bits >> 63) {
    const auto [low, high] = std::minmax_element(keys, keys + num_groups);
    check_key_range(*low, *high, num_keys);
  }
}

// Every check (and with validate, the values), then the forward, then the update with its group
// means: keyed_group_advantages and update_keyed_history in one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
keyed_step_cpu(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
               int64_t group_size, const at::Tensor& keys_in, at::Tensor& key_count,
               at::Tensor& key_mean, at::Tensor& key_var, double key_alpha,
               int64_t key_min_history, at::Tensor& ring, at::Tensor& count, at::Tensor& ema,
               at::Tensor& var, double alpha, int64_t min_history, double eps,
               c10::string_view scale, bool validate) {
  const GroupInputs in =
      prepare_group_inputs(rewards, offsets, group_size, ema, var, eps, scale);
  check_keyed_step_inputs(rewards, in.num_groups, keys_in, key_count, key_mean, key_var,
                          key_alpha, key_min_history, ring, count, ema, var, alpha, min_history);
  const at::Tensor keys = keys_in.contiguous();
  if (validate) {
    validate_keyed_step_cpu(offsets, rewards.numel(), keys.const_data_ptr<int64_t>(),
                            in.num_groups, key_count.numel());
  }
  auto out = keyed_forward_cpu(in, group_size, keys, key_count, key_mean, key_var, ema, var,
                               key_min_history, eps);
  keyed_update_cpu(std::get<1>(out), keys, key_count, key_mean, key_var, key_alpha, ring, count,
                   ema, var, alpha, min_history);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bv_blend, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("group_advantages_backward", &group_advantages_backward_cpu);
  m.impl("update_history", &update_history_cpu);
  m.impl("keyed_history", &keyed_history_cpu);
  m.impl("keyed_group_advantages", &keyed_group_advantages_cpu);
  m.impl("update_keyed_history", &update_keyed_history_cpu);
  m.impl("keyed_step", &keyed_step_cpu);
}

}  // namespace bv_blend
