// keyed_group_advantages: keyed_history then group_advantages, composed through the dispatcher
// so that each device's kernels, the autograd kernel of group_advantages and the fake kernels
// under torch.compile all apply unchanged.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_common.h"

namespace bv_blend {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs keyed_group_advantages(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                               int64_t group_size, const at::Tensor& keys,
                               const at::Tensor& key_count, const at::Tensor& key_mean,
                               const at::Tensor& key_var, const at::Tensor& hist_mean,
                               const at::Tensor& hist_var, int64_t key_min_history, double eps,
                               c10::string_view scale) {
  // The keys are checked against the groups here, so that a mismatch names `keys` rather than
  // the (G,) statistics gathered from them.
  const int64_t num_groups =
      check_group_inputs(rewards, offsets, group_size, hist_mean, hist_var, eps);
  TORCH_CHECK_VALUE(keys.dim() == 1 && keys.size(0) == num_groups,
                    "keys must have shape (G,) = (", num_groups, ",), one per group, got ",
                    keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == rewards.device(), "keys must be on the rewards' device (",
                    rewards.device(), "), got ", keys.device());
  static const auto gather =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bv_blend::keyed_history", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&,
                                                    int64_t)>();
  static const auto blend =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bv_blend::group_advantages", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
              const at::Tensor&, double, c10::string_view)>();
  auto [group_hist_mean, group_hist_var] =
      gather.call(keys, key_count, key_mean, key_var, hist_mean, hist_var, key_min_history);
  auto [advantages, group_mean, group_std, beta] =
      blend.call(rewards, offsets, group_size, group_hist_mean, group_hist_var, eps, scale);
  return {advantages, group_mean, group_std, beta, group_hist_mean, group_hist_var};
}

}  // namespace

TORCH_LIBRARY_IMPL(bv_blend, CompositeImplicitAutograd, m) {
  m.impl("keyed_group_advantages", &keyed_group_advantages);
}

}  // namespace bv_blend
