// CUDA implementations of the bv_blend ops: tensor checks and allocation, then the launchers of
// kernels.cu on the current stream of the rewards' device. No host synchronisation: the history
// statistics stay on the device and are read by the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
          eps,
          in.mode};
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(
    const at::Tensor& rewards_in, const std::optional<at::Tensor>& offsets_in, int64_t group_size,
    const at::Tensor& hist_mean_in, const at::Tensor& hist_var_in, double eps,
    c10::string_view scale) {
  // Checked before the guard: a CPU rewards tensor (with CUDA offsets) must get the ValueError.
  const GroupInputs in = prepare_group_inputs(rewards_in, offsets_in, group_size, hist_mean_in,
                                              hist_var_in, eps, scale);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor& rewards = in.rewards;
  const at::Tensor hist_mean = hist_mean_in.to(at::kDouble);
  const at::Tensor hist_var = hist_var_in.to(at::kDouble);
  auto [advantages, group_mean, group_std, beta] = allocate_outputs(rewards, in.num_groups);
  // Offsets of no group at all: no kernel runs and every reward is uncovered.
  if (in.num_groups == 0) advantages.zero_();
  const at::Tensor batch_scale =
      in.mode == ScaleMode::Batch ? batch_moments(rewards).std + eps : at::Tensor();
  const auto args = group_args(in, group_size, hist_mean, hist_var, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "group_advantages_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    cuda::launch_group_forward<scalar_t>(
        args, rewards.data_ptr<scalar_t>(), optional_ptr<acc_t>(batch_scale),
        advantages.data_ptr<scalar_t>(), group_mean.data_ptr<acc_t>(), group_std.data_ptr<acc_t>(),
        beta.data_ptr<acc_t>(), stream);
  });
  return {advantages, group_mean, group_std, beta};
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
  const at::Tensor hist_mean = hist_mean_in.to(at::kDouble);
  const at::Tensor hist_var = hist_var_in.to(at::kDouble);
  at::Tensor grad_rewards = at::empty_like(rewards, at::MemoryFormat::Contiguous);
  if (in.num_groups == 0) grad_rewards.zero_();
  at::Tensor batch_scale, batch_mean, batch_coef;
  if (in.mode == ScaleMode::Batch) {
    const BatchMoments moments = batch_moments(rewards);
    batch_scale = moments.std + eps;
    batch_mean = moments.mean;
    batch_coef = batch_scale_coefficient(moments, grad, advantages, eps);
  }
  const auto args = group_args(in, group_size, hist_mean, hist_var, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(),
                                  "group_advantages_backward_cuda", [&] {
    using acc_t = accumulate_t<scalar_t>;
    cuda::launch_group_backward<scalar_t>(
        args, rewards.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        optional_ptr<acc_t>(batch_scale), optional_ptr<acc_t>(batch_mean),
        optional_ptr<acc_t>(batch_coef), grad_rewards.data_ptr<scalar_t>(), stream);
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

}  // namespace

TORCH_LIBRARY_IMPL(bv_blend, CUDA, m) {
  m.impl("group_advantages", &group_advantages_cuda);
  m.impl("group_advantages_backward", &group_advantages_backward_cuda);
  m.impl("update_history", &update_history_cuda);
}

}  // namespace bv_blend
