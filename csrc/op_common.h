// Device-independent halves of the op implementations: argument checks, the normalised inputs
// and output allocation, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "bv_blend_math.h"

namespace bv_blend {

ScaleMode parse_scale(std::string_view scale);

// Numbers and shapes as text for error messages. Every message of this extension formats them
// with these rather than inserting them into an ostream: on a lent H100 machine (GCC 13, torch
// 2.11) building such a message crashed inside std::ostream's integer insertion compiled into
// this library, whereas std::to_chars needs no locale or stream.
std::string as_text(int64_t value);
std::string as_text(double value);
std::string as_text(at::IntArrayRef shape);

at::ScalarType accumulation_type(at::ScalarType reward_type);

// Checks what can be checked without reading device memory and returns the number of groups.
// hist_mean and hist_var are each 0-dim (every group) or (G,) (one per group).
// Offsets' values (start 0, end N, non-decreasing) need a device sync; the Python layer checks
// them when validate=True, and prepare_group_inputs normalises them so bad values cannot fault.
int64_t check_group_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                           int64_t group_size, const at::Tensor& hist_mean,
                           const at::Tensor& hist_var, double eps);

// The checked, contiguous inputs of group_advantages and its backward, shared by every device;
// offsets come normalised (clamped to [0, N], non-decreasing: see group_bounds).
struct GroupInputs {
  ScaleMode mode;
  int64_t num_groups;
  at::Tensor rewards;
  std::optional<at::Tensor> offsets;

  const int64_t* offsets_ptr() const {
    return offsets.has_value() ? offsets->data_ptr<int64_t>() : nullptr;
  }
};
GroupInputs prepare_group_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                                 int64_t group_size, const at::Tensor& hist_mean,
                                 const at::Tensor& hist_var, double eps, std::string_view scale);

// grad_advantages and advantages of the backward: the rewards' device and shape, floating point.
void check_backward_inputs(const at::Tensor& grad_advantages, const at::Tensor& advantages,
                           const at::Tensor& rewards);

// (advantages, group_mean, group_std, beta) allocated on the rewards' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_outputs(
    const at::Tensor& rewards, int64_t num_groups);

void check_history_inputs(const at::Tensor& group_mean, const at::Tensor& ring,
                          const at::Tensor& count, const at::Tensor& ema, const at::Tensor& var,
                          double alpha, int64_t min_history);

// check_history_inputs' checks of the state, which must be on the device of `owner` (its name in
// the messages).
void check_history_state(const at::Tensor& ring, const at::Tensor& count, const at::Tensor& ema,
                         const at::Tensor& var, double alpha, int64_t min_history,
                         const at::Tensor& owner, const char* owner_name);

// The per-key tables (key_count (K,) int64, key_mean and key_var (K,) float64) on the device of
// `keys` (G,) int64, sharing one stride: key k's entries lie at k * stride in each. Contiguous
// tables have stride 1; BVBlend keeps the three as columns of one 32-byte record per key (stride
// 4), so that a visit of a key touches one cache line rather than three.
void check_key_tables(const at::Tensor& keys, const at::Tensor& key_count,
                      const at::Tensor& key_mean, const at::Tensor& key_var);

// The stride of a key table as the kernels use it (any for a single key, which sits at 0).
int64_t key_table_stride(const at::Tensor& table);

// The tables, checked by check_key_tables, as the kernels read them.
KeyTableView key_table_view(const at::Tensor& key_count, const at::Tensor& key_mean,
                            const at::Tensor& key_var, int64_t key_min_history);

// keyed_history: the tables, the global H and σ_u² (0-dim, on the keys' device), min_history >= 1.
void check_keyed_history_inputs(const at::Tensor& keys, const at::Tensor& key_count,
                                const at::Tensor& key_mean, const at::Tensor& key_var,
                                const at::Tensor& hist_mean, const at::Tensor& hist_var,
                                int64_t key_min_history);

// update_keyed_history's per-key half: the tables, keys of group_mean's shape and device, α_k.
// The global half is check_history_inputs.
void check_keyed_update_inputs(const at::Tensor& group_mean, const at::Tensor& keys,
                               const at::Tensor& key_count, const at::Tensor& key_mean,
                               const at::Tensor& key_var, double key_alpha);

// keyed_group_advantages: one key per group, on the rewards' device.
void check_group_keys(const at::Tensor& keys, const at::Tensor& rewards, int64_t num_groups);

// key_ema_decay (key_alpha) in (0, 1].
void check_key_alpha(double key_alpha);

// keyed_step's checks beyond those of check_group_inputs (with ema and var as the history): the
// keys, tables and state as keyed_group_advantages and update_keyed_history check them.
void check_keyed_step_inputs(const at::Tensor& rewards, int64_t num_groups, const at::Tensor& keys,
                             const at::Tensor& key_count, const at::Tensor& key_mean,
                             const at::Tensor& key_var, double key_alpha, int64_t key_min_history,
                             const at::Tensor& ring, const at::Tensor& count, const at::Tensor& ema,
                             const at::Tensor& var, double alpha, int64_t min_history);

// keyed_step's validation of values, with the Python validation's messages (ValueError):
// from the smallest and largest key, both in [0, num_keys); from offsets' first and last value
// and whether they ever decrease, offsets starting at 0, ending at N and non-decreasing.
void check_key_range(int64_t low, int64_t high, int64_t num_keys);
void check_offset_values(int64_t first, int64_t last, bool decreasing, int64_t num_rewards);

}  // namespace bv_blend
