#include "op_common.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <utility>

namespace bv_blend {

std::string as_text(int64_t value) {
  char buffer[24];
  return std::string(buffer, std::to_chars(buffer, buffer + sizeof(buffer), value).ptr);
}

std::string as_text(double value) {
  char buffer[32];  // the shortest round-trip form of any double fits
  return std::string(buffer, std::to_chars(buffer, buffer + sizeof(buffer), value).ptr);
}

std::string as_text(at::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += as_text(shape[i]);
  }
  return text + "]";
}

ScaleMode parse_scale(std::string_view scale) {
  if (scale == "group") return ScaleMode::Group;
  if (scale == "blend") return ScaleMode::Blend;
  if (scale == "batch") return ScaleMode::Batch;
  if (scale == "none") return ScaleMode::None;
  TORCH_CHECK_VALUE(false, "scale must be one of 'group', 'blend', 'batch', 'none', got '", scale,
                    "'");
}

at::ScalarType accumulation_type(at::ScalarType reward_type) {
  return reward_type == at::kDouble ? at::kDouble : at::kFloat;
}

// H or σ_u²: 0-dim (shared by every group) or (G,) (group g uses element g).
static void check_history_stat(const at::Tensor& stat, const at::Tensor& rewards,
                               int64_t num_groups, const char* name) {
  TORCH_CHECK_VALUE(stat.dim() == 0 || (stat.dim() == 1 && stat.size(0) == num_groups), name,
                    " must be a 0-dim tensor or of shape (G,) = (", as_text(num_groups),
                    ",) (one value per group), got shape ", as_text(stat.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(stat.scalar_type()), name,
                   " must be a floating-point tensor, got ", stat.scalar_type());
  TORCH_CHECK_VALUE(stat.device() == rewards.device(), name, " must be on the rewards' device (",
                    rewards.device(), "), got ", stat.device());
}

static int64_t count_groups(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                            int64_t group_size) {
  const int64_t n = rewards.numel();
  if (offsets.has_value()) {
    TORCH_CHECK_VALUE(group_size == 0, "pass exactly one of group_size and offsets, got both "
                      "(group_size = ", as_text(group_size), ")");
    const at::Tensor& o = *offsets;
    TORCH_CHECK_TYPE(o.scalar_type() == at::kLong, "offsets must be int64, got ", o.scalar_type());
    TORCH_CHECK_VALUE(o.dim() == 1 && o.numel() >= 1,
                      "offsets must be 1-D of length G+1 >= 1, got shape ", as_text(o.sizes()));
    TORCH_CHECK_VALUE(o.device() == rewards.device(), "offsets must be on the rewards' device (",
                      rewards.device(), "), got ", o.device());
    return o.numel() - 1;
  }
  TORCH_CHECK_VALUE(group_size >= 1, "pass exactly one of group_size and offsets: group_size must "
                    "be >= 1 when offsets is None, got ", as_text(group_size));
  TORCH_CHECK_VALUE(n % group_size == 0, "group_size (", as_text(group_size),
                    ") must divide the number of rewards (", as_text(n), ")");
  return n / group_size;
}

int64_t check_group_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                           int64_t group_size, const at::Tensor& hist_mean,
                           const at::Tensor& hist_var, double eps) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards must be 1-D (N,), got shape ",
                    as_text(rewards.sizes()));
  const auto dtype = rewards.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   "rewards must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ",
                    as_text(eps));
  const int64_t num_groups = count_groups(rewards, offsets, group_size);
  check_history_stat(hist_mean, rewards, num_groups, "hist_mean");
  check_history_stat(hist_var, rewards, num_groups, "hist_var");
  return num_groups;
}

// Offsets as the kernels read them: clamped to [0, N] and made non-decreasing (each bound at
// least the one before), so that every reward belongs to at most one group whatever the values.
// Valid offsets pass through unchanged. On CPU one loop; elsewhere two ATen ops, computing the
// same prefix maximum without a host synchronisation.
static at::Tensor normalized_offsets(const at::Tensor& offsets, int64_t num_rewards) {
  if (!offsets.device().is_cpu()) {
    return std::get<0>(at::cummax(offsets.clamp(0, num_rewards), 0));
  }
  const at::Tensor in = offsets.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t* src = in.const_data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  int64_t bound = 0;
  for (int64_t i = 0; i < in.numel(); ++i) {
    bound = std::max(bound, std::clamp(src[i], int64_t(0), num_rewards));
    dst[i] = bound;
  }
  return out;
}

GroupInputs prepare_group_inputs(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                                 int64_t group_size, const at::Tensor& hist_mean,
                                 const at::Tensor& hist_var, double eps, std::string_view scale) {
  const ScaleMode mode = parse_scale(scale);
  const int64_t num_groups =
      check_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps);
  return {mode, num_groups, rewards.contiguous(),
          offsets.has_value()
              ? std::optional<at::Tensor>(normalized_offsets(*offsets, rewards.numel()))
              : std::nullopt};
}

void check_backward_inputs(const at::Tensor& grad_advantages, const at::Tensor& advantages,
                           const at::Tensor& rewards) {
  for (const auto& [tensor, name] : {std::pair{&grad_advantages, "grad_advantages"},
                                     std::pair{&advantages, "advantages"}}) {
    TORCH_CHECK_VALUE(tensor->device() == rewards.device(), name,
                      " must be on the rewards' device (", rewards.device(), "), got ",
                      tensor->device());
    TORCH_CHECK_VALUE(tensor->sizes() == rewards.sizes(), name, " must have the rewards' shape ",
                      as_text(rewards.sizes()), ", got ", as_text(tensor->sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(tensor->scalar_type()), name,
                     " must be a floating-point tensor, got ", tensor->scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_outputs(
    const at::Tensor& rewards, int64_t num_groups) {
  const auto stats = rewards.options().dtype(accumulation_type(rewards.scalar_type()));
  return {at::empty_like(rewards, at::MemoryFormat::Contiguous), at::empty({num_groups}, stats),
          at::empty({num_groups}, stats), at::empty({num_groups}, stats)};
}

void check_history_inputs(const at::Tensor& group_mean, const at::Tensor& ring,
                          const at::Tensor& count, const at::Tensor& ema, const at::Tensor& var,
                          double alpha, int64_t min_history) {
  TORCH_CHECK_VALUE(group_mean.dim() == 1, "group_mean must be 1-D, got shape ",
                    as_text(group_mean.sizes()));
  TORCH_CHECK_TYPE(group_mean.scalar_type() == at::kFloat || group_mean.scalar_type() == at::kDouble,
                   "group_mean must be float32 or float64, got ", group_mean.scalar_type());
  check_history_state(ring, count, ema, var, alpha, min_history, group_mean, "group_mean's");
}

void check_history_state(const at::Tensor& ring, const at::Tensor& count, const at::Tensor& ema,
                         const at::Tensor& var, double alpha, int64_t min_history,
                         const at::Tensor& owner, const char* owner_name) {
  TORCH_CHECK_VALUE(ring.dim() == 1 && ring.numel() >= 2, "ring must be 1-D with window >= 2 ",
                    "entries, got shape ", as_text(ring.sizes()));
  TORCH_CHECK_TYPE(ring.scalar_type() == at::kDouble && ema.scalar_type() == at::kDouble &&
                       var.scalar_type() == at::kDouble,
                   "ring, ema and var must be float64");
  TORCH_CHECK_TYPE(count.scalar_type() == at::kLong, "count must be int64, got ",
                   count.scalar_type());
  TORCH_CHECK_VALUE(count.dim() == 0 && ema.dim() == 0 && var.dim() == 0,
                    "count, ema and var must be 0-dim tensors");
  TORCH_CHECK_VALUE(ring.is_contiguous(), "ring must be contiguous");
  for (const at::Tensor* t : {&ring, &count, &ema, &var}) {
    TORCH_CHECK_VALUE(t->device() == owner.device(), "history state must be on ", owner_name,
                      " device (", owner.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(alpha > 0 && alpha <= 1, "ema_decay (alpha) must be in (0, 1], got ",
                    as_text(alpha));
  TORCH_CHECK_VALUE(min_history >= 0, "min_history must be >= 0, got ", as_text(min_history));
}

namespace {

// Whether two tables of 8-byte entries, `stride` entries apart, share a byte: entry i of `a` and
// entry k of `b` meet when their addresses differ by less than 8, and the difference
// d - (k - i)·8·stride is smallest for the multiples of 8·stride next to d = a - b.
bool tables_overlap(const at::Tensor& a, const at::Tensor& b, int64_t stride) {
  const int64_t num_keys = a.numel();
  const int64_t step = 8 * stride;
  const int64_t d = reinterpret_cast<intptr_t>(a.const_data_ptr()) -
                    reinterpret_cast<intptr_t>(b.const_data_ptr());
  const int64_t below = d >= 0 ? d / step : -((-d + step - 1) / step);
  for (const int64_t apart : {below, below + 1}) {
    const int64_t gap = d - apart * step;
    if (apart > -num_keys && apart < num_keys && gap > -8 && gap < 8) return true;
  }
  return false;
}

}  // namespace

void check_key_tables(const at::Tensor& keys, const at::Tensor& key_count,
                      const at::Tensor& key_mean, const at::Tensor& key_var) {
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong, "keys must be int64, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 1, "keys must be 1-D (G,), got shape ", as_text(keys.sizes()));
  TORCH_CHECK_TYPE(key_count.scalar_type() == at::kLong, "key_count must be int64, got ",
                   key_count.scalar_type());
  TORCH_CHECK_TYPE(key_mean.scalar_type() == at::kDouble && key_var.scalar_type() == at::kDouble,
                   "key_mean and key_var must be float64, got ", key_mean.scalar_type(), " and ",
                   key_var.scalar_type());
  TORCH_CHECK_VALUE(key_count.dim() == 1 && key_count.numel() >= 1 &&
                        key_mean.sizes() == key_count.sizes() &&
                        key_var.sizes() == key_count.sizes(),
                    "key_count, key_mean and key_var must be 1-D of one length num_keys >= 1, "
                    "got shapes ", as_text(key_count.sizes()), ", ", as_text(key_mean.sizes()),
                    ", ", as_text(key_var.sizes()));
  for (const auto& [tensor, name] : {std::pair{&key_count, "key_count"},
                                     std::pair{&key_mean, "key_mean"},
                                     std::pair{&key_var, "key_var"}}) {
    TORCH_CHECK_VALUE(tensor->device() == keys.device(), name, " must be on the keys' device (",
                      keys.device(), "), got ", tensor->device());
  }
  const int64_t stride = key_table_stride(key_count);
  TORCH_CHECK_VALUE(stride >= 1 && key_table_stride(key_mean) == stride &&
                        key_table_stride(key_var) == stride,
                    "key_count, key_mean and key_var must share one stride >= 1 (contiguous "
                    "tables, or the columns of one record per key), got strides ",
                    as_text(key_count.stride(0)), ", ", as_text(key_mean.stride(0)), ", ",
                    as_text(key_var.stride(0)));
  // Tables that share a word would make two keys' updates write it (on CUDA, from two threads).
  const bool overlapping = tables_overlap(key_count, key_mean, stride) ||
                           tables_overlap(key_count, key_var, stride) ||
                           tables_overlap(key_mean, key_var, stride);
  TORCH_CHECK_VALUE(!overlapping,
                    "key_count, key_mean and key_var must not overlap: each key's three entries "
                    "need memory of their own");
}

int64_t key_table_stride(const at::Tensor& table) {
  return table.numel() > 1 ? table.stride(0) : 1;
}

KeyTableView key_table_view(const at::Tensor& key_count, const at::Tensor& key_mean,
                            const at::Tensor& key_var, int64_t key_min_history) {
  return {key_count.const_data_ptr<int64_t>(), key_mean.const_data_ptr<double>(),
          key_var.const_data_ptr<double>(),    key_table_stride(key_count),
          key_count.numel(),                   key_min_history};
}

void check_keyed_history_inputs(const at::Tensor& keys, const at::Tensor& key_count,
                                const at::Tensor& key_mean, const at::Tensor& key_var,
                                const at::Tensor& hist_mean, const at::Tensor& hist_var,
                                int64_t key_min_history) {
  check_key_tables(keys, key_count, key_mean, key_var);
  for (const auto& [tensor, name] : {std::pair{&hist_mean, "hist_mean"},
                                     std::pair{&hist_var, "hist_var"}}) {
    TORCH_CHECK_VALUE(tensor->dim() == 0, name, " must be a 0-dim tensor (the global history), "
                      "got shape ", as_text(tensor->sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(tensor->scalar_type()), name,
                     " must be a floating-point tensor, got ", tensor->scalar_type());
    TORCH_CHECK_VALUE(tensor->device() == keys.device(), name, " must be on the keys' device (",
                      keys.device(), "), got ", tensor->device());
  }
  TORCH_CHECK_VALUE(key_min_history >= 1, "key_min_history must be >= 1, got ",
                    as_text(key_min_history));
}

void check_keyed_update_inputs(const at::Tensor& group_mean, const at::Tensor& keys,
                               const at::Tensor& key_count, const at::Tensor& key_mean,
                               const at::Tensor& key_var, double key_alpha) {
  check_key_tables(keys, key_count, key_mean, key_var);
  TORCH_CHECK_VALUE(keys.sizes() == group_mean.sizes(), "keys must have group_mean's shape ",
                    as_text(group_mean.sizes()), " (one key per group), got ",
                    as_text(keys.sizes()));
  TORCH_CHECK_VALUE(keys.device() == group_mean.device(), "keys must be on group_mean's device (",
                    group_mean.device(), "), got ", keys.device());
  check_key_alpha(key_alpha);
}

void check_key_alpha(double key_alpha) {
  TORCH_CHECK_VALUE(key_alpha > 0 && key_alpha <= 1,
                    "key_ema_decay (key_alpha) must be in (0, 1], got ", as_text(key_alpha));
}

void check_group_keys(const at::Tensor& keys, const at::Tensor& rewards, int64_t num_groups) {
  TORCH_CHECK_VALUE(keys.dim() == 1 && keys.size(0) == num_groups, "keys must have shape (G,) = (",
                    as_text(num_groups), ",), one per group, got ", as_text(keys.sizes()));
  TORCH_CHECK_VALUE(keys.device() == rewards.device(), "keys must be on the rewards' device (",
                    rewards.device(), "), got ", keys.device());
}

void check_keyed_step_inputs(const at::Tensor& rewards, int64_t num_groups, const at::Tensor& keys,
                             const at::Tensor& key_count, const at::Tensor& key_mean,
                             const at::Tensor& key_var, double key_alpha, int64_t key_min_history,
                             const at::Tensor& ring, const at::Tensor& count, const at::Tensor& ema,
                             const at::Tensor& var, double alpha, int64_t min_history) {
  check_keyed_history_inputs(keys, key_count, key_mean, key_var, ema, var, key_min_history);
  check_group_keys(keys, rewards, num_groups);
  check_history_state(ring, count, ema, var, alpha, min_history, rewards, "the rewards'");
  check_key_alpha(key_alpha);
}

void check_key_range(int64_t low, int64_t high, int64_t num_keys) {
  TORCH_CHECK_VALUE(low >= 0 && high < num_keys, "keys must be in [0, num_keys) = [0, ",
                    as_text(num_keys), "), got ", as_text(low < 0 ? low : high));
}

void check_offset_values(int64_t first, int64_t last, bool decreasing, int64_t num_rewards) {
  TORCH_CHECK_VALUE(first == 0, "offsets must start at 0, got offsets[0] = ", as_text(first));
  TORCH_CHECK_VALUE(last == num_rewards, "offsets must end at the number of rewards (",
                    as_text(num_rewards), "), got offsets[-1] = ", as_text(last));
  TORCH_CHECK_VALUE(!decreasing, "offsets must be non-decreasing");
}

}  // namespace bv_blend
