// Per-group BV-Blend math: the single source of truth shared by the CPU and CUDA kernels.
// Everything here works on already-reduced group moments, so each device only has to supply its
// own (deterministic) reductions.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define BVB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BVB_HOST_DEVICE inline
#endif

namespace bv_blend {

// Statistics accumulate in float32, or float64 for float64 rewards.
template <typename scalar_t>
using accumulate_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

enum class ScaleMode : int { Group = 0, Blend = 1, Batch = 2, None = 3 };

// True for finite x: x - x is NaN exactly when x is NaN or ±inf. Written out rather than
// std::isfinite so that host and device code share one definition (and vector lanes can use it).
template <typename T>
BVB_HOST_DEVICE bool is_finite(T x) {
  return x - x == T(0);
}

// Group g's rewards are [start, end). With offsets, these come already normalised by
// prepare_group_inputs (clamped to [0, N] and non-decreasing), so groups never overlap and never
// reach outside the rewards; rewards before offsets[0] or from offsets[G] on belong to no group.
BVB_HOST_DEVICE void group_bounds(const int64_t* offsets, int64_t group_size, int64_t group,
                                  int64_t& start, int64_t& end) {
  if (offsets != nullptr) {
    start = offsets[group];
    end = offsets[group + 1];
  } else {
    start = group * group_size;
    end = start + group_size;
  }
}

// The history statistics a call blends with. H or σ_u² that is not finite, or σ_u² < 0 (only
// reachable past validation: validate=False, torch.compile, the raw op), cannot be blended with;
// such a history is ignored (H = σ_u² = 0, so β = 0), which keeps every advantage finite.
template <typename acc_t>
struct History {
  acc_t mean;
  acc_t var;
};

template <typename acc_t>
BVB_HOST_DEVICE History<acc_t> usable_history(acc_t mean, acc_t var) {
  if (is_finite(mean) && is_finite(var) && var >= acc_t(0)) return {mean, var};
  return {acc_t(0), acc_t(0)};
}

// scale="batch": the unbiased std of the call's valid rewards from their count and sum of squared
// deviations; 0 below two. Each device supplies the two sums from its own deterministic reduction.
template <typename acc_t>
BVB_HOST_DEVICE acc_t batch_std(acc_t count, acc_t sq_dev) {
  return count >= acc_t(2) ? std::sqrt(sq_dev / (count - acc_t(1))) : acc_t(0);
}

// The gradient through the batch std of scale="batch", folded into one coefficient per reward:
// grad_j += coef * (r_j - batch mean), where grad_dot_adv = Σ_i g_i A_i. Zero when the std is 0.
template <typename acc_t>
BVB_HOST_DEVICE acc_t batch_scale_coefficient(acc_t grad_dot_adv, acc_t count, acc_t std,
                                              acc_t eps) {
  return std > acc_t(0) ? -grad_dot_adv / (std + eps) / ((count - acc_t(1)) * std) : acc_t(0);
}

// The formulas of blend_group and group_gradient are written once, for a value type `V` that is
// either acc_t (one group: the CUDA kernels and the CPU's general path) or a CPU SIMD vector of
// acc_t holding one group per lane (the CPU's fixed-size path). `Ops` names acc_t (`scalar`) and
// supplies the two operations whose spelling differs: select(mask, a, b) (both arms are
// evaluated; the unselected one may be NaN or inf, never trapped) and sqrt. The lanes compute
// exactly the scalar operations, so both CPU paths give the same bits.
template <typename acc_t>
struct ScalarOps {
  using scalar = acc_t;
  BVB_HOST_DEVICE static acc_t select(bool mask, acc_t a, acc_t b) { return mask ? a : b; }
  BVB_HOST_DEVICE static acc_t sqrt(acc_t x) { return std::sqrt(x); }
};

template <typename V, typename M>
struct BlendLanes {
  V var;        // σ_g², unbiased; 0 below two valid rewards
  V beta;       // σ_u² / (σ_u² + σ_g²), 0 when both vanish
  V baseline;   // B_g = (1 - β)·μ_g + β·H; 0 when the group is not usable
  V scale;      // s_g of the chosen scale mode
  V inv_scale;  // 1 / s_g; 0 when the group is not usable
  // A group is usable when its scale is positive and finite and its baseline finite. An unusable
  // group (eps = 0 with σ = 0, or moments that overflowed) gets advantage 0 and gradient 0:
  // A = (r - baseline) * inv_scale is then exactly 0 for every finite r, without a branch.
  M usable;
};

// count_minus_one: the number of valid rewards minus one, in acc_t (at least 0). The history
// `Hist` is acc_t (one H and σ_u² for every lane) or V (each lane's group its own).
template <typename Ops, typename V, typename Hist, typename acc_t>
BVB_HOST_DEVICE BlendLanes<V, decltype(V{} > V{})> blend_lanes(
    V count_minus_one, V mean, V sq_dev, Hist hist_mean, Hist hist_var, acc_t eps,
    ScaleMode mode, acc_t batch_scale) {
  const V zero{};
  BlendLanes<V, decltype(V{} > V{})> g;
  g.var = Ops::select(count_minus_one >= acc_t(1), sq_dev / count_minus_one, zero);
  const V total = hist_var + g.var;
  g.beta = Ops::select(total > acc_t(0), hist_var / total, zero);
  g.baseline = (acc_t(1) - g.beta) * mean + g.beta * hist_mean;
  switch (mode) {
    case ScaleMode::Group:
      g.scale = Ops::sqrt(g.var) + eps;
      break;
    case ScaleMode::Blend:
      g.scale = Ops::sqrt((acc_t(1) - g.beta) * g.var + g.beta * hist_var) + eps;
      break;
    case ScaleMode::Batch:
      g.scale = zero + batch_scale;  // batch_scale >= +0, so adding +0 keeps its bits
      break;
    default:
      g.scale = zero + acc_t(1);
  }
  // is_finite, spelled so that it also applies lane-wise.
  g.usable = (g.scale > acc_t(0)) & (g.scale - g.scale == acc_t(0)) &
             (g.baseline - g.baseline == acc_t(0));
  g.inv_scale = Ops::select(g.usable, acc_t(1) / g.scale, zero);
  g.baseline = Ops::select(g.usable, g.baseline, zero);
  return g;
}

// One group's blend: the fields of BlendLanes for a single group, with its count and mean.
template <typename acc_t>
struct GroupBlend : BlendLanes<acc_t, bool> {
  int64_t count;  // valid (finite) rewards
  acc_t mean;     // μ_g
};

// From a group's count, mean and sum of squared deviations to its baseline and scale.
// `batch_scale` is only read in ScaleMode::Batch; the history must come from usable_history.
// A group without valid rewards is not blended: callers write NaN statistics and zero
// advantages for it.
template <typename acc_t>
BVB_HOST_DEVICE GroupBlend<acc_t> blend_group(int64_t count, acc_t mean, acc_t sq_dev,
                                              acc_t hist_mean, acc_t hist_var, acc_t eps,
                                              ScaleMode mode, acc_t batch_scale) {
  GroupBlend<acc_t> g;
  static_cast<BlendLanes<acc_t, bool>&>(g) = blend_lanes<ScalarOps<acc_t>>(
      acc_t(count > 0 ? count - 1 : 0), mean, sq_dev, hist_mean, hist_var, eps, mode, batch_scale);
  g.count = count;
  g.mean = mean;
  return g;
}

// Gradient of the loss w.r.t. one valid reward of a group is
//   self * g_j + shift + deviation * (r_j - μ_g)
// (plus, in batch mode, a term through the batch std that the caller adds). Derivation: with
// A_i = (r_i - B)/s, B = μ + β(H - μ), β = u/(u + σ²) and s = s(σ²), and dσ²/dr_j = 2(r_j-μ)/(n-1):
//   dL/dr_j = g_j/s - Σg·(1-β)/(n s) - [Σg·(H-μ)·β'/s + Σg(r-B)·s'/s²] · 2(r_j-μ)/(n-1)
// where β' = dβ/dσ² and s' = ds/dσ². The history statistics are constants. An unusable group's
// advantages are the constant 0, so its gradient is 0.
template <typename V>
struct GradientLanes {
  V self;
  V shift;
  V deviation;
};

// The lane form of group_gradient (see blend_lanes): count and count_minus_one in acc_t.
template <typename Ops, typename V, typename M, typename Hist>
BVB_HOST_DEVICE GradientLanes<V> gradient_lanes(const BlendLanes<V, M>& g, V count,
                                                V count_minus_one, V mean, Hist hist_mean,
                                                Hist hist_var, ScaleMode mode, V sum_grad,
                                                V sum_grad_centered) {
  using acc_t = typename Ops::scalar;
  const V zero{};
  GradientLanes<V> out;
  const V inv_scale = g.inv_scale;  // 0 when the group is not usable
  out.self = inv_scale;
  out.shift = Ops::select(g.usable, -sum_grad * (acc_t(1) - g.beta) * inv_scale / count, zero);

  const V total = hist_var + g.var;
  const V dbeta = Ops::select(total > acc_t(0), -hist_var / (total * total), zero);
  V dscale = zero;
  if (mode == ScaleMode::Group) {
    const V sd = Ops::sqrt(g.var);
    dscale = Ops::select(sd > acc_t(0), acc_t(0.5) / sd, zero);
  } else if (mode == ScaleMode::Blend) {
    const V q = (acc_t(1) - g.beta) * g.var + g.beta * hist_var;
    const V dq = (g.var * g.var + acc_t(2) * hist_var * g.var - hist_var * hist_var) /
                 (total * total);
    dscale = Ops::select((q > acc_t(0)) & (total > acc_t(0)), dq * acc_t(0.5) / Ops::sqrt(q),
                         zero);
  }
  // Σ g_i (r_i - B) from Σ g_i (r_i - μ), which the kernels accumulate without cancellation.
  const V sum_grad_residual = sum_grad_centered + (mean - g.baseline) * sum_grad;
  const V deviation = -(sum_grad * (hist_mean - mean) * dbeta * inv_scale +
                        sum_grad_residual * dscale * inv_scale * inv_scale) *
                      acc_t(2) / count_minus_one;
  out.deviation = Ops::select(g.usable & (count_minus_one >= acc_t(1)), deviation, zero);
  return out;
}

template <typename acc_t>
BVB_HOST_DEVICE GradientLanes<acc_t> group_gradient(const GroupBlend<acc_t>& g, acc_t hist_mean,
                                                    acc_t hist_var, ScaleMode mode, acc_t sum_grad,
                                                    acc_t sum_grad_centered) {
  return gradient_lanes<ScalarOps<acc_t>>(
      static_cast<const BlendLanes<acc_t, bool>&>(g), acc_t(g.count),
      acc_t(g.count > 0 ? g.count - 1 : 0), g.mean, hist_mean, hist_var, mode, sum_grad,
      sum_grad_centered);
}

// ---- Per-key history ----------------------------------------------------------------------------
// Key k holds a visit count n_k and EMA moments (m_k, v_k) of the group means it has seen.

// A group blends with its key's moments once the key has been visited key_min_history times, else
// with the global history. A key outside [0, num_keys) (possible only past validation) reads and
// writes no table: its group uses the global history. One unsigned comparison covers both ends.
BVB_HOST_DEVICE bool key_in_range(int64_t key, int64_t num_keys) {
  return static_cast<uint64_t>(key) < static_cast<uint64_t>(num_keys);
}

// The per-key tables as the kernels read them (see check_key_tables): key k's count, mean and
// variance at k * stride.
struct KeyTableView {
  const int64_t* count;
  const double* mean;
  const double* var;
  int64_t stride, num_keys, min_history;

  // The H and σ_u² of a group whose key is `key`: the key's moments once it has been visited
  // min_history times, else the global ones. Branch-free (whether a key has history is as
  // unpredictable as the keys themselves): a key outside the tables reads entry 0 and takes the
  // global history.
  BVB_HOST_DEVICE void history_of(int64_t key, double global_mean, double global_var,
                                  double& mean_out, double& var_out) const {
    const bool in_range = key_in_range(key, num_keys);
    const int64_t slot = (in_range ? key : 0) * stride;
    const bool keyed = in_range & (count[slot] >= min_history);
    const double m = mean[slot], v = var[slot];
    mean_out = keyed ? m : global_mean;
    var_out = keyed ? v : global_var;
  }
};

// Products and sums rounded one by one on both devices: nvcc would otherwise fuse a*b + c into
// one FMA, and the key moments could not match the CPU's bit for bit.
BVB_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

BVB_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// One visit of a key by a group mean `mu` (finite): the first visit (a count <= 0, which only a
// corrupted state read past validation holds below 0) sets m = mu, v = 0; later ones
// d = mu - m, m += α·d, v = (1 - α)·(v + α·d²). The count saturates at INT64_MAX.
BVB_HOST_DEVICE void visit_key(int64_t& count, double& mean, double& var, double mu,
                               double alpha) {
  if (count <= 0) {
    mean = mu;
    var = 0.0;
    count = 1;
    return;
  }
  const double d = add_rn(mu, -mean);
  const double step = mul_rn(alpha, d);
  mean = add_rn(mean, step);
  var = mul_rn(add_rn(1.0, -alpha), add_rn(var, mul_rn(step, d)));
  if (count < INT64_MAX) ++count;
}

}  // namespace bv_blend
