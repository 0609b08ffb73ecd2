// Op schemas of the bv_blend namespace. Device implementations register themselves in
// cpu_kernels.cpp and cuda/dispatch_cuda.cpp, the autograd kernel in autograd.cpp; the Python
// layer adds the fake (meta) registrations.
#include <torch/library.h>

TORCH_LIBRARY(bv_blend, m) {
  // Advantages of one call with the history statistics given (H = hist_mean, σ_u² = hist_var,
  // both 0-dim). Groups come from `offsets` (G+1, int64) or, when offsets is None, from
  // group_size. Statistics are returned in the accumulation dtype (float32, float64 for float64).
  m.def(
      "group_advantages(Tensor rewards, Tensor? offsets, int group_size, Tensor hist_mean, "
      "Tensor hist_var, float eps, str scale) -> (Tensor advantages, Tensor group_mean, "
      "Tensor group_std, Tensor beta)");
  // d loss / d rewards given d loss / d advantages; `advantages` is the forward output.
  m.def(
      "group_advantages_backward(Tensor grad_advantages, Tensor advantages, Tensor rewards, "
      "Tensor? offsets, int group_size, Tensor hist_mean, Tensor hist_var, float eps, str scale) "
      "-> Tensor");
  // Pushes every finite group mean, in group order, into the ring of recent means and the EMA,
  // then refreshes the cached ring variance (0 while fewer than max(2, min_history) entries).
  // A negative count is read as 0, so no value of the state can index outside the ring.
  m.def(
      "update_history(Tensor group_mean, Tensor(a!) ring, Tensor(b!) count, Tensor(c!) ema, "
      "Tensor(d!) var, float alpha, int min_history) -> ()");
}
