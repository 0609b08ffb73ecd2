// Op schemas of the bv_blend namespace. Device implementations register themselves in
// cpu_kernels.cpp and cuda/dispatch_cuda.cpp, the autograd kernel in autograd.cpp; the Python
// layer adds the fake (meta) registrations.
#include <torch/library.h>

TORCH_LIBRARY(bv_blend, m) {
  // Advantages of one call with the history statistics given (H = hist_mean, σ_u² = hist_var,
  // each 0-dim, shared by every group, or (G,), group g using element g). Groups come from
  // `offsets` (G+1, int64) or, when offsets is None, from group_size. Statistics are returned in
  // the accumulation dtype (float32, float64 for float64).
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
  // The (H, σ_u²) of every group of a keyed call, (G,) float64 each: key k's moments (key_mean,
  // key_var) where key_count[k] >= key_min_history, else the global hist_mean and hist_var
  // (0-dim). Keys outside [0, num_keys) read no table and take the global history.
  m.def(
      "keyed_history(Tensor keys, Tensor key_count, Tensor key_mean, Tensor key_var, "
      "Tensor hist_mean, Tensor hist_var, int key_min_history) -> "
      "(Tensor group_hist_mean, Tensor group_hist_var)");
  // keyed_history and group_advantages in one op: the advantages and statistics of
  // group_advantages, then each group's H and σ_u² as keyed_history gives them (the gradient
  // treats them as constants). One op rather than two calls, because each entry from Python
  // costs microseconds.
  m.def(
      "keyed_group_advantages(Tensor rewards, Tensor? offsets, int group_size, Tensor keys, "
      "Tensor key_count, Tensor key_mean, Tensor key_var, Tensor hist_mean, Tensor hist_var, "
      "int key_min_history, float eps, str scale) -> (Tensor advantages, Tensor group_mean, "
      "Tensor group_std, Tensor beta, Tensor group_hist_mean, Tensor group_hist_var)");
  // After a keyed call: every group with a finite mean visits its key, in group order (so
  // duplicate keys apply in group order; keys outside [0, num_keys) are skipped), then the global
  // history is updated exactly as update_history does.
  m.def(
      "update_keyed_history(Tensor group_mean, Tensor keys, Tensor(a!) key_count, "
      "Tensor(b!) key_mean, Tensor(c!) key_var, float key_alpha, Tensor(d!) ring, "
      "Tensor(e!) count, Tensor(f!) ema, Tensor(g!) var, float alpha, int min_history) -> ()");
  // A whole keyed step: keyed_group_advantages with the global ema and var as its history, then
  // update_keyed_history with the group means it computed; its outputs are those of
  // keyed_group_advantages. validate: the values Python's validation reads (offsets start at 0,
  // end at N and never decrease; keys in [0, num_keys)) are checked first, a ValueError naming
  // the argument, so that a bad call changes no state. One op rather than two because each entry
  // from Python costs microseconds. BVBlend calls it on the host, where reading those values
  // costs no transfer; on CUDA validate synchronises once, and BVBlend keeps the two ops there,
  // validating between them as before.
  m.def(
      "keyed_step(Tensor rewards, Tensor? offsets, int group_size, Tensor keys, "
      "Tensor(a!) key_count, Tensor(b!) key_mean, Tensor(c!) key_var, float key_alpha, "
      "int key_min_history, Tensor(d!) ring, Tensor(e!) count, Tensor(f!) ema, Tensor(g!) var, "
      "float alpha, int min_history, float eps, str scale, bool validate) -> (Tensor advantages, "
      "Tensor group_mean, Tensor group_std, Tensor beta, Tensor group_hist_mean, "
      "Tensor group_hist_var)");
}
