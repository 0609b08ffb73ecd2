// Host-callable launchers of the CUDA kernels. Kept free of ATen so that kernels.cu compiles
// quickly; dispatch_cuda.cpp does the tensor-level work and calls these on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bv_blend_math.h"

namespace bv_blend::cuda {

// A keyed forward gathers each group's history from its key itself (one launch rather than a
// gather kernel before the forward): the global H and σ_u² are then hist_mean[0] and hist_var[0],
// and the forward records what each group used in group_hist_mean and group_hist_var.
struct KeyedGather {
  const int64_t* keys = nullptr;  // nullptr: not a keyed forward
  KeyTableView tables{};
  double* group_hist_mean = nullptr;
  double* group_hist_var = nullptr;
};

struct GroupArgs {
  const int64_t* offsets;  // nullptr: fixed group_size
  int64_t group_size;
  int64_t num_groups;
  int64_t num_rewards;
  // Device memory, so a captured graph sees each step's history: group g reads
  // hist_mean[g * hist_mean_stride], the stride 0 for a statistic shared by every group.
  const double* hist_mean;
  const double* hist_var;
  int64_t hist_mean_stride;
  int64_t hist_var_stride;
  double eps;
  ScaleMode mode;
  KeyedGather keyed{};
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

// Each group's (H, σ_u²) from its key's moments or the global history (one launch).
void launch_keyed_history(const int64_t* keys, int64_t num_groups, const KeyTableView& tables,
                          const double* hist_mean, const double* hist_var,
                          double* group_hist_mean, double* group_hist_var, cudaStream_t stream);

// Up to this many groups a keyed update is a single block (one launch, no scratch): it sorts the
// groups' keys 1024 at a time in shared memory. Above, a device-wide sort spreads the work.
constexpr int64_t kBlockKeyUpdateGroups = 8192;

// Bytes of device scratch that launch_update_keyed_history needs for num_groups groups (at most
// INT32_MAX) and num_keys keys: none up to kBlockKeyUpdateGroups groups, else the (key, group)
// pairs before and after sorting and CUB's temp storage. Host-only arithmetic, no
// synchronisation.
size_t keyed_update_scratch_bytes(int64_t num_groups, int64_t num_keys);

// The per-key visits in group order and the global history update: one launch up to
// kBlockKeyUpdateGroups groups, else two plus CUB's device-wide sort (see kernels.cu). `scratch`
// holds keyed_update_scratch_bytes(num_groups, num_keys) bytes, 256-aligned.
template <typename acc_t>
void launch_update_keyed_history(const acc_t* group_mean, const int64_t* keys, int64_t num_groups,
                                 int64_t* key_count, double* key_mean, double* key_var,
                                 int64_t num_keys, int64_t key_stride, double key_alpha,
                                 void* scratch, double* ring, int64_t window, int64_t* count,
                                 double* ema, double* var, double alpha, int64_t min_history,
                                 cudaStream_t stream);

}  // namespace bv_blend::cuda
