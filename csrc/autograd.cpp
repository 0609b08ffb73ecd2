// The autograd kernel of bv_blend::group_advantages, in C++: a Python autograd wrapper costs tens
// of microseconds per call, several times the kernels themselves at typical batch sizes. The
// history statistics are constants of the estimator, so only the rewards get a gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace bv_blend {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOutputs call_forward(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                            int64_t group_size, const at::Tensor& hist_mean,
                            const at::Tensor& hist_var, double eps, c10::string_view scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bv_blend::group_advantages", "")
                             .typed<ForwardOutputs(const at::Tensor&,
                                                   const std::optional<at::Tensor>&, int64_t,
                                                   const at::Tensor&, const at::Tensor&, double,
                                                   c10::string_view)>();
  return op.call(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
}

at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& advantages,
                         const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                         int64_t group_size, const at::Tensor& hist_mean,
                         const at::Tensor& hist_var, double eps, c10::string_view scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bv_blend::group_advantages_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                            const at::Tensor&, double, c10::string_view)>();
  return op.call(grad, advantages, rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
}

// Whether an op must go through its autograd Function: some input requires a gradient (with grad
// mode on), or the rewards carry a forward-mode one, which the Function rejects. Otherwise the
// Function's node and the metadata of its many tensor inputs are pure cost (about 1.5 us a call
// on the benchmark machine, against a forward of about 10 us at 1024 groups of 16), and the
// kernel is called directly.
template <typename... Tensors>
bool needs_function(const at::Tensor& rewards, const Tensors&... tensors) {
  return torch::autograd::compute_requires_grad(rewards, tensors...) ||
         rewards._fw_grad(/*level=*/0).defined();
}

class GroupAdvantages : public torch::autograd::Function<GroupAdvantages> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rewards,
                               const std::optional<at::Tensor>& offsets, int64_t group_size,
                               const at::Tensor& hist_mean, const at::Tensor& hist_var,
                               double eps, c10::string_view scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [advantages, group_mean, group_std, beta] =
        call_forward(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
    ctx->save_for_backward({rewards, offsets.value_or(at::Tensor()), hist_mean, hist_var,
                            advantages});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["scale"] = std::string(scale);
    ctx->saved_data["has_offsets"] = offsets.has_value();
    ctx->mark_non_differentiable({group_mean, group_std, beta});
    return {advantages, group_mean, group_std, beta};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> offsets =
        ctx->saved_data["has_offsets"].toBool() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    at::Tensor grad_rewards;
    if (grads[0].defined()) {
      grad_rewards = call_backward(grads[0], saved[4], saved[0], offsets,
                                   ctx->saved_data["group_size"].toInt(), saved[2], saved[3],
                                   ctx->saved_data["eps"].toDouble(),
                                   ctx->saved_data["scale"].toStringRef());
    }
    return {grad_rewards, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ForwardOutputs group_advantages_autograd(const at::Tensor& rewards,
                                         const std::optional<at::Tensor>& offsets,
                                         int64_t group_size, const at::Tensor& hist_mean,
                                         const at::Tensor& hist_var, double eps,
                                         c10::string_view scale) {
  if (!needs_function(rewards, offsets, hist_mean, hist_var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  }
  const variable_list out =
      GroupAdvantages::apply(rewards, offsets, group_size, hist_mean, hist_var, eps, scale);
  return {out[0], out[1], out[2], out[3]};
}

using KeyedOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

KeyedOutputs call_keyed_forward(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                                int64_t group_size, const at::Tensor& keys,
                                const at::Tensor& key_count, const at::Tensor& key_mean,
                                const at::Tensor& key_var, const at::Tensor& hist_mean,
                                const at::Tensor& hist_var, int64_t key_min_history, double eps,
                                c10::string_view scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bv_blend::keyed_group_advantages", "")
          .typed<KeyedOutputs(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              double, c10::string_view)>();
  return op.call(rewards, offsets, group_size, keys, key_count, key_mean, key_var, hist_mean,
                 hist_var, key_min_history, eps, scale);
}

KeyedOutputs call_keyed_step(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets,
                             int64_t group_size, const at::Tensor& keys, at::Tensor& key_count,
                             at::Tensor& key_mean, at::Tensor& key_var, double key_alpha,
                             int64_t key_min_history, at::Tensor& ring, at::Tensor& count,
                             at::Tensor& ema, at::Tensor& var, double alpha, int64_t min_history,
                             double eps, c10::string_view scale, bool validate) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bv_blend::keyed_step", "")
          .typed<KeyedOutputs(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                              const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, double,
                              int64_t, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, double,
                              int64_t, double, c10::string_view, bool)>();
  return op.call(rewards, offsets, group_size, keys, key_count, key_mean, key_var, key_alpha,
                 key_min_history, ring, count, ema, var, alpha, min_history, eps, scale, validate);
}

// What the keyed ops' gradient needs: group_advantages' saved state, with the (G,) history the
// forward gathered (the key tables are constants like the global history).
KeyedOutputs save_keyed_forward(AutogradContext* ctx, const at::Tensor& rewards,
                                const std::optional<at::Tensor>& offsets, int64_t group_size,
                                double eps, c10::string_view scale, KeyedOutputs outputs) {
  auto& [advantages, group_mean, group_std, beta, group_hist_mean, group_hist_var] = outputs;
  ctx->save_for_backward({rewards, offsets.value_or(at::Tensor()), group_hist_mean,
                          group_hist_var, advantages});
  ctx->saved_data["group_size"] = group_size;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["scale"] = std::string(scale);
  ctx->saved_data["has_offsets"] = offsets.has_value();
  ctx->mark_non_differentiable({group_mean, group_std, beta, group_hist_mean, group_hist_var});
  return outputs;
}

variable_list as_list(KeyedOutputs outputs) {
  auto& [a, b, c, d, e, f] = outputs;
  return {a, b, c, d, e, f};
}

// The keyed forward's gradient is group_advantages' with the (G,) history it gathered, which it
// returns and which is saved here.
class KeyedGroupAdvantages : public torch::autograd::Function<KeyedGroupAdvantages> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rewards,
                               const std::optional<at::Tensor>& offsets, int64_t group_size,
                               const at::Tensor& keys, const at::Tensor& key_count,
                               const at::Tensor& key_mean, const at::Tensor& key_var,
                               const at::Tensor& hist_mean, const at::Tensor& hist_var,
                               int64_t key_min_history, double eps, c10::string_view scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_list(save_keyed_forward(
        ctx, rewards, offsets, group_size, eps, scale,
        call_keyed_forward(rewards, offsets, group_size, keys, key_count, key_mean, key_var,
                           hist_mean, hist_var, key_min_history, eps, scale)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);
    out[0] = GroupAdvantages::backward(ctx, grads)[0];
    return out;
  }
};

// keyed_step's gradient is the keyed forward's: the history it updates afterwards is state, not
// an input of the advantages.
class KeyedStep : public torch::autograd::Function<KeyedStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rewards,
                               const std::optional<at::Tensor>& offsets, int64_t group_size,
                               const at::Tensor& keys, at::Tensor key_count, at::Tensor key_mean,
                               at::Tensor key_var, double key_alpha, int64_t key_min_history,
                               at::Tensor ring, at::Tensor count, at::Tensor ema, at::Tensor var,
                               double alpha, int64_t min_history, double eps,
                               c10::string_view scale, bool validate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_list(save_keyed_forward(
        ctx, rewards, offsets, group_size, eps, scale,
        call_keyed_step(rewards, offsets, group_size, keys, key_count, key_mean, key_var,
                        key_alpha, key_min_history, ring, count, ema, var, alpha, min_history,
                        eps, scale, validate)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(18);
    out[0] = GroupAdvantages::backward(ctx, grads)[0];
    return out;
  }
};

KeyedOutputs keyed_group_advantages_autograd(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size,
    const at::Tensor& keys, const at::Tensor& key_count, const at::Tensor& key_mean,
    const at::Tensor& key_var, const at::Tensor& hist_mean, const at::Tensor& hist_var,
    int64_t key_min_history, double eps, c10::string_view scale) {
  if (!needs_function(rewards, offsets, keys, key_count, key_mean, key_var, hist_mean,
                      hist_var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_keyed_forward(rewards, offsets, group_size, keys, key_count, key_mean, key_var,
                              hist_mean, hist_var, key_min_history, eps, scale);
  }
  const variable_list out = KeyedGroupAdvantages::apply(rewards, offsets, group_size, keys,
                                                        key_count, key_mean, key_var, hist_mean,
                                                        hist_var, key_min_history, eps, scale);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

KeyedOutputs keyed_step_autograd(const at::Tensor& rewards,
                                 const std::optional<at::Tensor>& offsets, int64_t group_size,
                                 const at::Tensor& keys, at::Tensor& key_count,
                                 at::Tensor& key_mean, at::Tensor& key_var, double key_alpha,
                                 int64_t key_min_history, at::Tensor& ring, at::Tensor& count,
                                 at::Tensor& ema, at::Tensor& var, double alpha,
                                 int64_t min_history, double eps, c10::string_view scale,
                                 bool validate) {
  if (!needs_function(rewards, offsets, keys, key_count, key_mean, key_var, ring, count, ema,
                      var)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_keyed_step(rewards, offsets, group_size, keys, key_count, key_mean, key_var,
                           key_alpha, key_min_history, ring, count, ema, var, alpha, min_history,
                           eps, scale, validate);
  }
  const variable_list out = KeyedStep::apply(rewards, offsets, group_size, keys, key_count,
                                             key_mean, key_var, key_alpha, key_min_history, ring,
                                             count, ema, var, alpha, min_history, eps, scale,
                                             validate);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bv_blend, Autograd, m) {
  m.impl("group_advantages", &group_advantages_autograd);
  m.impl("keyed_group_advantages", &keyed_group_advantages_autograd);
  m.impl("keyed_step", &keyed_step_autograd);
}

}  // namespace bv_blend
