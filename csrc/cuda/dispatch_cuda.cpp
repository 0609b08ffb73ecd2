// CUDA implementations of the bv_blend ops: tensor checks and allocation, then the launchers of
// kernels.cu on the current stream of the rewards' device. No host synchronisation: the history
// statistics stay on the device and are read by the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../op_common.h"
#include "launchers.h"

namespace bv_blend {
namespace {

cuda::GroupArgs group_args(const GroupInputs& in, int64_t group_size, const at::Tensor& hist_mean,
                           const at::Tensor& hist_var, double eps) {
  return {in.offsets_ptr(),
          group_size,
          in.num_groups,
          in.rewards.numel(),
          hist_mean.data_ptr<double>(),
          hist_var.data_ptr<double>(),
          hist_mean.dim() == 0 ? 0 : 1,
          hist_var.dim() == 0 ? 0 : 1,
          eps,
          in.mode};
}

// H or σ_u² as the kernels read them: float64 and contiguous (a no-op for the estimator's
// buffers and for the keyed history's (G,) float64 tensors).
at::Tensor device_history(const at::Tensor& stat) {
  return stat.to(at::kDouble).contiguous();
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The sums behind scale="batch" as 0-dim device tensors of the accumulation dtype, from ATen's
// reductions (run-to-run deterministic on CUDA); the kernels apply the formulas. Undefined
// tensors in every other mode.
struct BatchSumTensors {
  at::Tensor count, mean, sq_dev, grad_dot_adv;

  template <typename acc_t>
  cuda::BatchSums<acc_t> pointers() const {
    return {optional_ptr<acc_t>(count), optional_ptr<acc_t>(mean), optional_ptr<acc_t>(sq_dev),
            optional_ptr<acc_t>(grad_dot_adv)};
  }
};

BatchSumTensors batch_sums(const GroupInputs& in, const at::Tensor* grad = nullptr,
                           const at::Tensor* advantages = nullptr) {
  BatchSumTensors sums;
  if (in.mode != ScaleMode::Batch) return sums;
  const at::Tensor r = in.rewards.to(accumulation_type(in.rewards.scalar_type()));
  const at::Tensor valid = r.isfinite();
  const at::Tensor zero = at::zeros({}, r.options());
  sums.count = valid.sum().to(r.scalar_type());
  sums.mean = at::where(valid, r, zero).sum() / sums.count.clamp_min(1);
  const at::Tensor centered = at::where(valid, r - sums.mean, zero);
  sums.sq_dev = (centered * centered).sum();
  if (grad != nullptr) {
    sums.grad_dot_adv = (grad->to(r.scalar_type()) * advantages->to(r.scalar_type())).sum();
  }
  return sums;
}

// The forward launch, its inputs checked: with `keyed`, gathering each group's history from its
// key (hist_mean and hist_var then the global ones, 0-dim).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const GroupInputs& in, int64_t group_size, const at::Tensor& hist_mean_in,
    const at::Tensor& hist_var_in, double eps, const cuda::KeyedGather& keyed = {}) {
  const at::Tensor& rewards = in.rewards;
  const at::Tensor hist_mean = device_history(hist_mean_in);
  const at::Tensor hist_var = device_history(hist_var_in);
  auto [advantages, group_mean, group_std, beta] = allocate_outputs(rewards, in.num_groups);
  // Offsets of no group at all: no kernel runs and every reward is uncovered.
  if (in.num_groups == 0) advantages.zero_();
  const BatchSumTensors batch = batch_sums(in);
  auto args = group_args(in, group_size, hist_mean, hist_var, eps);
  args.keyed = keyed;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "group_advantages_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    cuda::launch_group_forward<scalar_t>(
        args, rewards.data_ptr<scalar_t>(), batch.pointers<acc_t>(),
        advantages.data_ptr<scalar_t>(), group_mean.data_ptr<acc_t>(), group_std.data_ptr<acc_t>(),
        beta.data_ptr<acc_t>(), stream);
  });
  return {advantages, group_mean, group_std, beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size,
    const at::Tensor& hist_mean, const at::Tensor& hist_var, double eps,
    c10::string_view scale) {
  // Checked before the guard: a CPU rewards tensor (with CUDA offsets) must get the ValueError.
  const GroupInputs in =
      prepare_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  const c10::cuda::CUDAGuard guard(rewards.device());
  return forward_cuda(in, group_size, hist_mean, hist_var, eps);
}

at::Tensor group_advantages_backward_cuda(const at::Tensor& grad_in, const at::Tensor& advantages,
                                          const at::Tensor& rewards_in,
                                          const std::optional<at::Tensor>& offsets_in,
                                          int64_t group_size, const at::Tensor& hist_mean_in,
                                          const at::Tensor& hist_var_in, double eps,
                                          c10::string_view scale) {
  const GroupInputs in = prepare_group_inputs(rewards_in, offsets_in, group_size, hist_mean_in,
                                              hist_var_in, eps, scale);
  check_backward_inputs(grad_in, advantages, rewards_in);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor& rewards = in.rewards;
  const at::Tensor grad = grad_in.to(rewards.scalar_type()).contiguous();
  const at::Tensor hist_mean = device_history(hist_mean_in);
  const at::Tensor hist_var = device_history(hist_var_in);
  at::Tensor grad_rewards = at::empty_like(rewards, at::MemoryFormat::Contiguous);
  if (in.num_groups == 0) grad_rewards.zero_();
  const BatchSumTensors batch = batch_sums(in, &grad, &advantages);
  const auto args = group_args(in, group_size, hist_mean, hist_var, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "group_advantages_backward_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    cuda::launch_group_backward<scalar_t>(
        args, rewards.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), batch.pointers<acc_t>(),
        grad_rewards.data_ptr<scalar_t>(), stream);
  });
  return grad_rewards;
}

void update_history_cuda(const at::Tensor& group_mean_in, at::Tensor& ring, at::Tensor& count,
                         at::Tensor& ema, at::Tensor& var, double alpha, int64_t min_history) {
  check_history_inputs(group_mean_in, ring, count, ema, var, alpha, min_history);
  const c10::cuda::CUDAGuard guard(group_mean_in.device());
  const at::Tensor group_mean = group_mean_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(group_mean.scalar_type(), "update_history_cuda", [&] {
    cuda::launch_update_history<scalar_t>(group_mean.data_ptr<scalar_t>(), group_mean.numel(),
                                          ring.data_ptr<double>(), ring.numel(),
                                          count.data_ptr<int64_t>(), ema.data_ptr<double>(),
                                          var.data_ptr<double>(), alpha, min_history, stream);
  });
}

std::tuple<at::Tensor, at::Tensor> keyed_history_cuda(const at::Tensor& keys_in,
                                                      const at::Tensor& key_count,
                                                      const at::Tensor& key_mean,
                                                      const at::Tensor& key_var,
                                                      const at::Tensor& hist_mean_in,
                                                      const at::Tensor& hist_var_in,
                                                      int64_t key_min_history) {
  check_keyed_history_inputs(keys_in, key_count, key_mean, key_var, hist_mean_in, hist_var_in,
                             key_min_history);
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor hist_mean = device_history(hist_mean_in);
  const at::Tensor hist_var = device_history(hist_var_in);
  const int64_t num_groups = keys.numel();
  const auto options = keys.options().dtype(at::kDouble);
  at::Tensor group_hist_mean = at::empty({num_groups}, options);
  at::Tensor group_hist_var = at::empty({num_groups}, options);
  cuda::launch_keyed_history(keys.data_ptr<int64_t>(), num_groups,
                             key_table_view(key_count, key_mean, key_var, key_min_history),
                             hist_mean.data_ptr<double>(), hist_var.data_ptr<double>(),
                             group_hist_mean.data_ptr<double>(), group_hist_var.data_ptr<double>(),
                             c10::cuda::getCurrentCUDAStream().stream());
  return {group_hist_mean, group_hist_var};
}

// The forward, gathering each group's history from its key as it goes: one launch (plus the
// reductions of scale="batch"), no synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
keyed_group_advantages_cuda(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                            int64_t group_size, const at::Tensor& keys_in,
                            const at::Tensor& key_count, const at::Tensor& key_mean,
                            const at::Tensor& key_var, const at::Tensor& hist_mean,
                            const at::Tensor& hist_var, int64_t key_min_history, double eps,
                            c10::string_view scale) {
  // Every check before the first launch, so that a bad call launches nothing.
  check_keyed_history_inputs(keys_in, key_count, key_mean, key_var, hist_mean, hist_var,
                             key_min_history);
  parse_scale(scale);
  check_group_keys(keys_in, rewards,
                   check_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps));
  const GroupInputs in =
      prepare_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor keys = keys_in.contiguous();
  const auto options = keys.options().dtype(at::kDouble);
  at::Tensor group_hist_mean = at::empty({in.num_groups}, options);
  at::Tensor group_hist_var = at::empty({in.num_groups}, options);
  const cuda::KeyedGather keyed{keys.data_ptr<int64_t>(),
                                key_table_view(key_count, key_mean, key_var, key_min_history),
                                group_hist_mean.data_ptr<double>(),
                                group_hist_var.data_ptr<double>()};
  auto [advantages, group_mean, group_std, beta] =
      forward_cuda(in, group_size, hist_mean, hist_var, eps, keyed);
  return {advantages, group_mean, group_std, beta, group_hist_mean, group_hist_var};
}

void update_keyed_history_cuda(const at::Tensor& group_mean_in, const at::Tensor& keys_in,
                               at::Tensor& key_count, at::Tensor& key_mean, at::Tensor& key_var,
                               double key_alpha, at::Tensor& ring, at::Tensor& count,
                               at::Tensor& ema, at::Tensor& var, double alpha,
                               int64_t min_history) {
  check_history_inputs(group_mean_in, ring, count, ema, var, alpha, min_history);
  check_keyed_update_inputs(group_mean_in, keys_in, key_count, key_mean, key_var, key_alpha);
  TORCH_CHECK_VALUE(keys_in.numel() <= std::numeric_limits<int32_t>::max(),
                    "keys: at most 2^31 - 1 groups per call, got ",
                    as_text(keys_in.numel()));
  const c10::cuda::CUDAGuard guard(group_mean_in.device());
  const at::Tensor group_mean = group_mean_in.contiguous();
  const at::Tensor keys = keys_in.contiguous();
  const int64_t num_groups = keys.numel(), num_keys = key_count.numel();
  // From the caching allocator on the current stream: no synchronisation, and inside a CUDA
  // graph capture it comes from the graph's private pool.
  const at::Tensor scratch = at::empty(
      {static_cast<int64_t>(cuda::keyed_update_scratch_bytes(num_groups, num_keys))},
      keys.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(group_mean.scalar_type(), "update_keyed_history_cuda", [&] {
    cuda::launch_update_keyed_history<scalar_t>(
        group_mean.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), num_groups,
        key_count.data_ptr<int64_t>(), key_mean.data_ptr<double>(), key_var.data_ptr<double>(),
        num_keys, key_table_stride(key_count), key_alpha, scratch.data_ptr(),
        ring.data_ptr<double>(), ring.numel(), count.data_ptr<int64_t>(), ema.data_ptr<double>(),
        var.data_ptr<double>(), alpha, min_history, stream);
  });
}

// keyed_step's validation: the values Python's check_values reads, in one transfer (the one
// synchronisation of a validated step).
void validate_keyed_step_cuda(const std::optional<at::Tensor>& offsets, int64_t num_rewards,
                              const at::Tensor& keys, int64_t num_keys) {
  std::vector<at::Tensor> probes;
  if (offsets.has_value()) {
    const at::Tensor& o = *offsets;
    const int64_t n = o.numel();
    const at::Tensor decreasing = at::lt(o.slice(0, 1, n), o.slice(0, 0, n - 1)).any();
    probes.insert(probes.end(), {o[0], o[n - 1], decreasing});
  }
  if (keys.numel() > 0) {
    const auto [low, high] = at::aminmax(keys);
    probes.insert(probes.end(), {low, high});
  }
  if (probes.empty()) return;
  for (at::Tensor& probe : probes) probe = probe.to(at::kLong);
  const at::Tensor values = at::stack(probes).cpu();
  const int64_t* v = values.const_data_ptr<int64_t>();
  if (offsets.has_value()) {
    check_offset_values(v[0], v[1], v[2] != 0, num_rewards);
    v += 3;
  }
  if (keys.numel() > 0) check_key_range(v[0], v[1], num_keys);
}

// The keyed forward, then the keyed update with the group means it computed: launches only, unless
// validate reads the values first.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> keyed_step_cuda(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size,
    const at::Tensor& keys, at::Tensor& key_count, at::Tensor& key_mean, at::Tensor& key_var,
    double key_alpha, int64_t key_min_history, at::Tensor& ring, at::Tensor& count,
    at::Tensor& ema, at::Tensor& var, double alpha, int64_t min_history, double eps,
    c10::string_view scale, bool validate) {
  parse_scale(scale);
  const int64_t num_groups = check_group_inputs(rewards, offsets, group_size, ema, var, eps);
  check_keyed_step_inputs(rewards, num_groups, keys, key_count, key_mean, key_var, key_alpha,
                          key_min_history, ring, count, ema, var, alpha, min_history);
  if (validate) {
    const c10::cuda::CUDAGuard guard(rewards.device());
    validate_keyed_step_cuda(offsets, rewards.numel(), keys, key_count.numel());
  }
  auto out = keyed_group_advantages_cuda(rewards, offsets, group_size, keys, key_count, key_mean,
                                         key_var, ema, var, key_min_history, eps, scale);
  update_keyed_history_cuda(std::get<1>(out), keys, key_count, key_mean, key_var, key_alpha, ring,
                            count, ema, var, alpha, min_history);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bv_blend, CUDA, m) {
  m.impl("group_advantages", &group_advantages_cuda);
  m.impl("group_advantages_backward", &group_advantages_backward_cuda);
  m.impl("update_history", &update_history_cuda);
  m.impl("keyed_history", &keyed_history_cuda);
  m.impl("keyed_group_advantages", &keyed_group_advantages_cuda);
  m.impl("update_keyed_history", &update_keyed_history_cuda);
  m.impl("keyed_step", &keyed_step_cuda);
}

}  // namespace bv_blend
