// Calls the bv_blend ops through the dispatcher, as a libtorch user without Python would, and
// checks them against numbers worked out by hand from the contract (docs/op_api.md, README "The contract").
// Exits non-zero on any mismatch; run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
    const at::Tensor&, double, c10::string_view);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, const at::Tensor&,
                            const at::Tensor&, double, c10::string_view);
using UpdateHistory = void(const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                           double, int64_t);

int failures = 0;

// Compares element by element; NaN expected means NaN required.
void expect_values(const std::string& what, const at::Tensor& got, const std::vector<double>& want,
                   double tol) {
  at::Tensor values = got.to(at::kDouble).contiguous();
  if (values.numel() != static_cast<int64_t>(want.size())) {
    std::printf("FAIL %s: %lld values, expected %zu\n", what.c_str(),
                static_cast<long long>(values.numel()), want.size());
    ++failures;
    return;
  }
  const double* data = values.data_ptr<double>();
  for (size_t i = 0; i < want.size(); ++i) {
    const bool ok = std::isnan(want[i]) ? std::isnan(data[i])
                                        : std::abs(data[i] - want[i]) <= tol * (1 + std::abs(want[i]));
    if (!ok) {
      std::printf("FAIL %s[%zu]: got %.9g, expected %.9g\n", what.c_str(), i, data[i], want[i]);
      ++failures;
    }
  }
}

void expect_dtype(const std::string& what, const at::Tensor& got, at::ScalarType want) {
  if (got.scalar_type() != want) {
    std::printf("FAIL %s: dtype %s, expected %s\n", what.c_str(), c10::toString(got.scalar_type()),
                c10::toString(want));
    ++failures;
  }
}

at::Tensor scalar(double value) { return at::scalar_tensor(value, at::kDouble); }

at::Tensor vec(const std::vector<double>& values, at::ScalarType dtype) {
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

const double kNaN = std::nan("");

// Two groups of two: [1, 3] (mean 2, variance 2) and [5, 5] (mean 5, variance 0), with H = 4,
// σ_u² = 6, eps = 0.5. β = 6/(6+2) = 0.75 and 6/(6+0) = 1, so the baselines are
// 0.25·2 + 0.75·4 = 3.5 and 4.
void test_fixed_groups(const c10::TypedOperatorHandle<Forward>& forward) {
  const at::Tensor rewards = vec({1, 3, 5, 5}, at::kFloat);
  const double r2 = std::sqrt(2.0), r5 = std::sqrt(5.0), r6 = std::sqrt(6.0);
  const double batch_s = std::sqrt(11.0 / 3.0) + 0.5;  // all four: mean 3.5, Σ(r−3.5)² = 11
  struct Case {
    const char* scale;
    std::vector<double> advantages;
  };
  const std::vector<Case> cases = {
      // s = σ_g + eps: √2 + 0.5 and 0 + 0.5.
      {"group", {-2.5 / (r2 + 0.5), -0.5 / (r2 + 0.5), 1 / 0.5, 1 / 0.5}},
      // s = sqrt(0.25·2 + 0.75·6) + eps = √5 + 0.5 and sqrt(0 + 1·6) + eps = √6 + 0.5.
      {"blend", {-2.5 / (r5 + 0.5), -0.5 / (r5 + 0.5), 1 / (r6 + 0.5), 1 / (r6 + 0.5)}},
      {"batch", {-2.5 / batch_s, -0.5 / batch_s, 1 / batch_s, 1 / batch_s}},
      {"none", {-2.5, -0.5, 1, 1}},
  };
  for (const Case& c : cases) {
    auto [advantages, mean, std_, beta] =
        forward.call(rewards, std::nullopt, 2, scalar(4.0), scalar(6.0), 0.5, c.scale);
    const std::string name = std::string("fixed/") + c.scale;
    expect_dtype(name + "/advantages", advantages, at::kFloat);
    expect_dtype(name + "/group_mean", mean, at::kFloat);
    expect_values(name + "/advantages", advantages, c.advantages, 1e-5);
    expect_values(name + "/group_mean", mean, {2, 5}, 1e-6);
    expect_values(name + "/group_std", std_, {r2, 0}, 1e-6);
    expect_values(name + "/beta", beta, {0.75, 1}, 1e-6);
  }
}

// offsets [0, 3, 3, 4, 6]: [2, NaN, 4] (valid mean 3, variance 2), an empty group, [7] (one
// reward: variance 0) and [NaN, NaN] (no valid reward). No history (σ_u² = 0 gives β = 0),
// eps = 1, scale "group": s = √2 + 1 for the first group, 0 + 1 for [7].
void test_ragged_groups(const c10::TypedOperatorHandle<Forward>& forward) {
  const at::Tensor rewards = vec({2, kNaN, 4, 7, kNaN, kNaN}, at::kDouble);
  const at::Tensor offsets = at::tensor(std::vector<int64_t>{0, 3, 3, 4, 6}, at::kLong);
  auto [advantages, mean, std_, beta] =
      forward.call(rewards, offsets, 0, scalar(0.0), scalar(0.0), 1.0, "group");
  const double a = 1 / (std::sqrt(2.0) + 1);
  expect_dtype("ragged/group_std", std_, at::kDouble);
  expect_values("ragged/advantages", advantages, {-a, 0, a, 0, 0, 0}, 1e-12);
  expect_values("ragged/group_mean", mean, {3, kNaN, 7, kNaN}, 1e-12);
  expect_values("ragged/group_std", std_, {std::sqrt(2.0), kNaN, 0, kNaN}, 1e-12);
  expect_values("ragged/beta", beta, {0, kNaN, 0, kNaN}, 1e-12);
}

// Scale "none" without history: A_i = r_i − mean, so dA_0/dr_j = [j == 0] − 1/4 in a group of 4.
void test_backward_by_hand(const c10::TypedOperatorHandle<Forward>& forward,
                           const c10::TypedOperatorHandle<Backward>& backward) {
  const at::Tensor rewards = vec({1, 2, 3, 4}, at::kDouble);
  const at::Tensor advantages =
      std::get<0>(forward.call(rewards, std::nullopt, 4, scalar(0.0), scalar(0.0), 1e-4, "none"));
  const at::Tensor grad = vec({1, 0, 0, 0}, at::kDouble);
  const at::Tensor got = backward.call(grad, advantages, rewards, std::nullopt, 4, scalar(0.0),
                                       scalar(0.0), 1e-4, "none");
  expect_values("backward/none", got, {0.75, -0.25, -0.25, -0.25}, 1e-12);
}

// The blend scale with history is too long to differentiate by hand; a central difference of the
// forward op pins the backward op instead. grad_out weights every advantage differently so that
// each column of the Jacobian counts.
void test_backward_by_difference(const c10::TypedOperatorHandle<Forward>& forward,
                                 const c10::TypedOperatorHandle<Backward>& backward) {
  const at::Tensor rewards = vec({0.3, 1.7, -0.4, 2.2, 0.9, 1.1, 5.0}, at::kDouble);
  const at::Tensor offsets = at::tensor(std::vector<int64_t>{0, 4, 6, 7}, at::kLong);
  const at::Tensor grad_out = vec({0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0}, at::kDouble);
  for (const char* scale : {"group", "blend", "batch", "none"}) {
    auto advantages_of = [&](const at::Tensor& r) {
      return std::get<0>(forward.call(r, offsets, 0, scalar(0.8), scalar(0.6), 1e-4, scale));
    };
    const at::Tensor got = backward.call(grad_out, advantages_of(rewards), rewards, offsets, 0,
                                         scalar(0.8), scalar(0.6), 1e-4, scale);
    std::vector<double> want;
    const double h = 1e-6;
    for (int64_t j = 0; j < rewards.numel(); ++j) {
      at::Tensor up = rewards.clone(), down = rewards.clone();
      up[j] += h;
      down[j] -= h;
      const at::Tensor diff = (advantages_of(up) - advantages_of(down)) / (2 * h);
      want.push_back((diff * grad_out).sum().item<double>());
    }
    expect_values(std::string("backward/difference/") + scale, got, want, 1e-6);
  }
}

// window 4, α = 0.5. Pushing [1, NaN, 3, 5] skips the NaN: ring [1, 3, 5, 0], count 3,
// H = 0 → 0.5 → 1.75 → 3.375, variance of {1, 3, 5} = 4. Pushing [7, 9] fills the last slot
// and wraps: ring [9, 3, 5, 7], count 5, H → 5.1875 → 7.09375, variance of {9, 3, 5, 7} = 20/3.
void test_update_history(const c10::TypedOperatorHandle<UpdateHistory>& update) {
  at::Tensor ring = at::zeros({4}, at::kDouble);
  at::Tensor count = at::zeros({}, at::kLong);
  at::Tensor ema = at::zeros({}, at::kDouble);
  at::Tensor var = at::zeros({}, at::kDouble);
  update.call(vec({1, kNaN, 3, 5}, at::kFloat), ring, count, ema, var, 0.5, 2);
  expect_values("history/ring", ring, {1, 3, 5, 0}, 1e-12);
  expect_values("history/count", count, {3}, 0);
  expect_values("history/ema", ema, {3.375}, 1e-12);
  expect_values("history/var", var, {4}, 1e-12);
  update.call(vec({7, 9}, at::kFloat), ring, count, ema, var, 0.5, 2);
  expect_values("history/ring wrapped", ring, {9, 3, 5, 7}, 1e-12);
  expect_values("history/count wrapped", count, {5}, 0);
  expect_values("history/ema wrapped", ema, {7.09375}, 1e-12);
  expect_values("history/var wrapped", var, {20.0 / 3.0}, 1e-12);

  // min_history 3: two entries still give variance 0; the third makes it var{1, 3, 5} = 4.
  ring.zero_(), count.zero_(), ema.zero_(), var.zero_();
  update.call(vec({1, 3}, at::kDouble), ring, count, ema, var, 0.5, 3);
  expect_values("history/min_history not reached", var, {0}, 0);
  update.call(vec({5}, at::kDouble), ring, count, ema, var, 0.5, 3);
  expect_values("history/min_history reached", var, {4}, 1e-12);
}

}  // namespace

int run_all() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto forward =
      dispatcher.findSchemaOrThrow("bv_blend::group_advantages", "").typed<Forward>();
  const auto backward =
      dispatcher.findSchemaOrThrow("bv_blend::group_advantages_backward", "").typed<Backward>();
  const auto update =
      dispatcher.findSchemaOrThrow("bv_blend::update_history", "").typed<UpdateHistory>();
  test_fixed_groups(forward);
  test_ragged_groups(forward);
  test_backward_by_hand(forward, backward);
  test_backward_by_difference(forward, backward);
  test_update_history(update);
  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all bv_blend op checks passed\n");
  return 0;
}

int main() {
  // An op that rejects its arguments throws c10::Error; report it as a failure, not an abort.
  try {
    return run_all();
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
}
