// Host-callable launchers of the CUDA kernels. Kept free of ATen so that kernels.cu compiles
// quickly; dispatch_cuda.cpp does the tensor-level work and calls these on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bv_blend_math.h"

namespace bv_blend::cuda {

struct GroupArgs {
  const int64_t* offsets;  // nullptr: fixed group_size
  int64_t group_size;
  int64_t num_groups;
  int64_t num_rewards;
  const double* hist_mean;  // device scalars, so a captured graph sees each step's history
  const double* hist_var;
  double eps;
  ScaleMode mode;
};

// Device scalars of scale="batch", read only in ScaleMode::Batch (all nullptr otherwise): the
// count, mean and sum of squared deviations of the call's valid rewards, and for the backward
// Σ grad_advantages·advantages. The kernels turn them into the scale and its gradient with the
// formulas of bv_blend_math.h, the ones the CPU kernels use.
template <typename acc_t>
struct BatchSums {
  const acc_t* count;
  const acc_t* mean;
  const acc_t* sq_dev;
  const acc_t* grad_dot_adv;
};

template <typename scalar_t>
void launch_group_forward(const GroupArgs& args, const scalar_t* rewards,
                          BatchSums<accumulate_t<scalar_t>> batch, scalar_t* advantages,
                          accumulate_t<scalar_t>* group_mean, accumulate_t<scalar_t>* group_std,
                          accumulate_t<scalar_t>* beta, cudaStream_t stream);

template <typename scalar_t>
void launch_group_backward(const GroupArgs& args, const scalar_t* rewards,
                           const scalar_t* grad_advantages, BatchSums<accumulate_t<scalar_t>> batch,
                           scalar_t* grad_rewards, cudaStream_t stream);

template <typename acc_t>
void launch_update_history(const acc_t* group_mean, int64_t num_groups, double* ring,
                           int64_t window, int64_t* count, double* ema, double* var, double alpha,
                           int64_t min_history, cudaStream_t stream);

}  // namespace bv_blend::cuda
