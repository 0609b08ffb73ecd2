// CUDA kernels. A "team" of TEAM lanes (a power of two up to a warp) owns one group and reduces it
// with butterfly shuffles: no shared memory, no atomics, so results are bitwise reproducible.
// Small fixed groups pack several teams per warp; larger or ragged groups loop with stride TEAM.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <limits>

#include "launchers.h"

namespace bv_blend::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kHistoryThreads = 1024;

template <int TEAM, typename T>
__device__ __forceinline__ T team_sum(T value) {
#pragma unroll
  for (int offset = TEAM / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset, TEAM);
  }
  return value;
}

template <typename scalar_t>
__device__ __forceinline__ accumulate_t<scalar_t> load(const scalar_t* p) {
  return static_cast<accumulate_t<scalar_t>>(__ldg(p));
}

template <>
__device__ __forceinline__ float load<c10::Half>(const c10::Half* p) {
  return static_cast<float>(*p);
}

template <>
__device__ __forceinline__ float load<c10::BFloat16>(const c10::BFloat16* p) {
  return static_cast<float>(*p);
}

// Count, mean and squared deviations of the valid (finite) rewards of [start, end), identical in every
// lane of the team. Lanes past the last group run with an empty range so the shuffles stay full.
template <typename scalar_t, int TEAM>
struct TeamMoments {
  using acc_t = accumulate_t<scalar_t>;
  int64_t count;
  acc_t mean;
  acc_t sq_dev;

  __device__ __forceinline__ TeamMoments(const scalar_t* r, int64_t start, int64_t end, int lane) {
    acc_t sum = 0;
    int64_t n = 0;
    for (int64_t i = start + lane; i < end; i += TEAM) {
      const acc_t v = load(r + i);
      if (is_finite(v)) {
        sum += v;
        ++n;
      }
    }
    sum = team_sum<TEAM>(sum);
    count = team_sum<TEAM>(n);
    mean = count > 0 ? sum / acc_t(count) : acc_t(0);
    acc_t sq = 0;
    for (int64_t i = start + lane; i < end; i += TEAM) {
      const acc_t v = load(r + i);
      if (is_finite(v)) sq += (v - mean) * (v - mean);
    }
    sq_dev = team_sum<TEAM>(sq);
  }
};

// Rewards outside every group (before offsets[0] or from offsets[G] on, possible only with
// offsets that skipped validation) get 0: the first group's team writes the head, the last
// group's team the tail. With fixed group sizes both ranges are empty.
template <typename scalar_t, int TEAM>
__device__ __forceinline__ void zero_uncovered(const GroupArgs& args, int64_t group, int64_t start,
                                               int64_t end, int lane, scalar_t* out) {
  if (group == 0) {
    for (int64_t i = lane; i < start; i += TEAM) out[i] = scalar_t(0);
  }
  if (group == args.num_groups - 1) {
    for (int64_t i = end + lane; i < args.num_rewards; i += TEAM) out[i] = scalar_t(0);
  }
}

// A group's H and σ_u²: hist[group * stride], or in a keyed forward gathered from the group's key,
// where `record` (one lane per team) also writes them to the op's group_hist outputs.
template <typename acc_t>
__device__ __forceinline__ History<acc_t> read_history(const GroupArgs& args, int64_t group,
                                                       bool record = false) {
  double mean, var;
  if (args.keyed.keys != nullptr) {
    args.keyed.tables.history_of(args.keyed.keys[group], *args.hist_mean, *args.hist_var, mean,
                                 var);
    if (record) {
      args.keyed.group_hist_mean[group] = mean;
      args.keyed.group_hist_var[group] = var;
    }
  } else {
    mean = args.hist_mean[group * args.hist_mean_stride];
    var = args.hist_var[group * args.hist_var_stride];
  }
  return usable_history<acc_t>(acc_t(mean), acc_t(var));
}

template <typename acc_t>
__device__ __forceinline__ acc_t read_batch_std(const BatchSums<acc_t>& batch) {
  return batch_std<acc_t>(*batch.count, *batch.sq_dev);
}

// The group this thread's team owns and the thread's lane in it. Threads past the last group get
// an empty range, so that they still take part in their team's shuffles.
template <int TEAM>
struct TeamGroup {
  int64_t group;
  int lane;
  int64_t start = 0;
  int64_t end = 0;

  __device__ __forceinline__ explicit TeamGroup(const GroupArgs& args)
      : group((static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / TEAM),
        lane(threadIdx.x % TEAM) {
    if (exists(args)) group_bounds(args.offsets, args.group_size, group, start, end);
  }

  __device__ __forceinline__ bool exists(const GroupArgs& args) const {
    return group < args.num_groups;
  }
};

template <typename scalar_t, int TEAM>
__global__ void __launch_bounds__(kThreads)
    group_forward_kernel(GroupArgs args, const scalar_t* __restrict__ rewards,
                         BatchSums<accumulate_t<scalar_t>> batch,
                         scalar_t* __restrict__ advantages, accumulate_t<scalar_t>* group_mean,
                         accumulate_t<scalar_t>* group_std, accumulate_t<scalar_t>* beta) {
  using acc_t = accumulate_t<scalar_t>;
  const TeamGroup<TEAM> team(args);
  const auto [group, lane, start, end] = team;
  const TeamMoments<scalar_t, TEAM> m(rewards, start, end, lane);
  if (!team.exists(args)) return;
  const auto history = read_history<acc_t>(args, group, lane == 0);
  zero_uncovered<scalar_t, TEAM>(args, group, start, end, lane, advantages);

  if (m.count == 0) {
    if (lane == 0) {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      group_mean[group] = group_std[group] = beta[group] = nan;
    }
    for (int64_t i = start + lane; i < end; i += TEAM) advantages[i] = scalar_t(0);
    return;
  }
  const acc_t scale_of_batch =
      args.mode == ScaleMode::Batch ? read_batch_std(batch) + acc_t(args.eps) : acc_t(1);
  const auto b = blend_group<acc_t>(m.count, m.mean, m.sq_dev, history.mean, history.var,
                                    acc_t(args.eps), args.mode, scale_of_batch);
  if (lane == 0) {
    group_mean[group] = b.mean;
    group_std[group] = sqrt(b.var);
    beta[group] = b.beta;
  }
  for (int64_t i = start + lane; i < end; i += TEAM) {
    const acc_t v = load(rewards + i);
    advantages[i] =
        is_finite(v) ? static_cast<scalar_t>((v - b.baseline) * b.inv_scale) : scalar_t(0);
  }
}

template <typename scalar_t, int TEAM>
__global__ void __launch_bounds__(kThreads)
    group_backward_kernel(GroupArgs args, const scalar_t* __restrict__ rewards,
                          const scalar_t* __restrict__ grad,
                          BatchSums<accumulate_t<scalar_t>> batch,
                          scalar_t* __restrict__ grad_rewards) {
  using acc_t = accumulate_t<scalar_t>;
  const TeamGroup<TEAM> team(args);
  const auto [group, lane, start, end] = team;
  const TeamMoments<scalar_t, TEAM> m(rewards, start, end, lane);
  acc_t sum_grad = 0, sum_grad_centered = 0;
  for (int64_t i = start + lane; i < end; i += TEAM) {
    const acc_t v = load(rewards + i);
    if (!is_finite(v)) continue;
    const acc_t g = load(grad + i);
    sum_grad += g;
    sum_grad_centered += g * (v - m.mean);
  }
  sum_grad = team_sum<TEAM>(sum_grad);
  sum_grad_centered = team_sum<TEAM>(sum_grad_centered);
  if (!team.exists(args)) return;
  zero_uncovered<scalar_t, TEAM>(args, group, start, end, lane, grad_rewards);

  if (m.count == 0) {
    for (int64_t i = start + lane; i < end; i += TEAM) grad_rewards[i] = scalar_t(0);
    return;
  }
  const bool batch_mode = args.mode == ScaleMode::Batch;
  const acc_t eps = acc_t(args.eps);
  const acc_t std_of_batch = batch_mode ? read_batch_std(batch) : acc_t(0);
  const auto history = read_history<acc_t>(args, group);
  const auto b = blend_group<acc_t>(m.count, m.mean, m.sq_dev, history.mean, history.var, eps,
                                    args.mode, batch_mode ? std_of_batch + eps : acc_t(1));
  const auto c = group_gradient<acc_t>(b, history.mean, history.var, args.mode, sum_grad,
                                       sum_grad_centered);
  const acc_t coef =
      batch_mode && b.usable
          ? batch_scale_coefficient(*batch.grad_dot_adv, *batch.count, std_of_batch, eps)
          : acc_t(0);
  const acc_t center = batch_mode ? *batch.mean : acc_t(0);
  for (int64_t i = start + lane; i < end; i += TEAM) {
    const acc_t v = load(rewards + i);
    grad_rewards[i] = is_finite(v) ? static_cast<scalar_t>(c.self * load(grad + i) + c.shift +
                                                           c.deviation * (v - m.mean) +
                                                           coef * (v - center))
                                   : scalar_t(0);
  }
}

// One block: each thread owns a contiguous run of groups, so a single block-wide exclusive scan of
// the threads' valid counts ranks every push; each of the last `window` valid means lands in its
// ring slot in parallel, and the EMA after m pushes is evaluated in closed form,
// (1-α)^m·H + Σ_k α(1-α)^(m-1-k)·μ_k, with a fixed-order block reduction. A thread walks its run
// backwards, so the weights cost one pow per thread and one multiplication per push. Then the ring's variance is refreshed for the next call. Only finite means
// are pushed; a negative count is read as 0 and the count saturates at INT64_MAX, so no value of
// the state can make a slot fall outside the ring. It is one long kernel on purpose: counting,
// ranking, the EMA and the variance run back to back in one launch, which keeps the stateful step
// at two launches with no host synchronisation.
template <typename acc_t>
__device__ __forceinline__ void update_global_history(const acc_t* __restrict__ group_mean,
                                                      int64_t num_groups, double* ring,
                                                      int64_t window, int64_t* count, double* ema,
                                                      double* var, double alpha,
                                                      int64_t min_history) {
  using CountScan = cub::BlockScan<int64_t, kHistoryThreads>;
  using SumReduce = cub::BlockReduce<double, kHistoryThreads>;
  __shared__ union {
    typename CountScan::TempStorage scan;
    typename SumReduce::TempStorage sum;
  } temp;
  __shared__ double shared_double;
  const int tid = threadIdx.x;
  const int64_t pushed_before = *count < 0 ? 0 : *count;
  const double ema_before = *ema;

  const int64_t per_thread = (num_groups + kHistoryThreads - 1) / kHistoryThreads;
  const int64_t begin = min(tid * per_thread, num_groups);
  const int64_t end = min(begin + per_thread, num_groups);
  int64_t local_valid = 0;
  for (int64_t g = begin; g < end; ++g) local_valid += is_finite(group_mean[g]);
  int64_t first_rank, pushes;
  CountScan(temp.scan).ExclusiveSum(local_valid, first_rank, pushes);
  __syncthreads();

  const double keep = 1.0 - alpha;
  double weighted = 0;
  int64_t rank = first_rank + local_valid;  // one past the rank of this thread's last push
  double weight = alpha * pow(keep, static_cast<double>(pushes - rank));
  for (int64_t g = end - 1; g >= begin; --g) {
    const acc_t value = group_mean[g];
    if (!is_finite(value)) continue;
    --rank;
    const double mu = static_cast<double>(value);
    if (rank >= pushes - window) {
      ring[(static_cast<uint64_t>(pushed_before) + rank) % static_cast<uint64_t>(window)] = mu;
    }
    weighted += weight * mu;
    weight *= keep;
  }
  const double weighted_sum = SumReduce(temp.sum).Sum(weighted);
  __syncthreads();

  const int64_t pushed_after = pushes > INT64_MAX - pushed_before ? INT64_MAX : pushed_before + pushes;
  const int64_t entries = pushed_after < window ? pushed_after : window;
  double result_var = 0;
  if (entries >= (min_history > 2 ? min_history : 2)) {
    double local = 0;
    for (int64_t i = tid; i < entries; i += kHistoryThreads) local += ring[i];
    const double sum = SumReduce(temp.sum).Sum(local);
    if (tid == 0) shared_double = sum / static_cast<double>(entries);
    __syncthreads();
    const double mean = shared_double;
    local = 0;
    for (int64_t i = tid; i < entries; i += kHistoryThreads) local += (ring[i] - mean) * (ring[i] - mean);
    result_var = SumReduce(temp.sum).Sum(local) / static_cast<double>(entries - 1);
  }
  if (tid == 0) {
    *count = pushed_after;
    *ema = pow(keep, static_cast<double>(pushes)) * ema_before + weighted_sum;
    *var = result_var;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kHistoryThreads)
    update_history_kernel(const acc_t* __restrict__ group_mean, int64_t num_groups, double* ring,
                          int64_t window, int64_t* count, double* ema, double* var, double alpha,
                          int64_t min_history) {
  update_global_history(group_mean, num_groups, ring, window, count, ema, var, alpha, min_history);
}

// ---- Per-key history ----------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    keyed_history_kernel(const int64_t* __restrict__ keys, int64_t num_groups,
                         KeyTableView tables, const double* __restrict__ hist_mean,
                         const double* __restrict__ hist_var, double* __restrict__ group_hist_mean,
                         double* __restrict__ group_hist_var) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= num_groups) return;
  tables.history_of(keys[g], *hist_mean, *hist_var, group_hist_mean[g], group_hist_var[g]);
}

// The key update must apply a key's visits in group order, however often the key repeats. The
// (key, group) pairs are sorted by key with a stable radix sort, so each key's groups form one
// run in group order, and one thread per run applies them: no atomics, no races, and the bits of
// the sequential loop (visit_key rounds each operation as the CPU does). Groups that visit no key
// (a mean that is not finite, a key outside [0, K): possible only past validation) are given the
// key K, which sorts after every real key and is skipped; the sort then only needs the bits of K.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    key_pairs_kernel(const acc_t* __restrict__ group_mean, const int64_t* __restrict__ keys,
                     int64_t num_groups, int64_t num_keys, uint64_t* __restrict__ sort_keys,
                     int32_t* __restrict__ sort_groups) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= num_groups) return;
  const int64_t k = keys[g];
  const bool visits = key_in_range(k, num_keys) && is_finite(group_mean[g]);
  sort_keys[g] = static_cast<uint64_t>(visits ? k : num_keys);
  sort_groups[g] = static_cast<int32_t>(g);
}

// The visits of one key, when sorted pair i starts the run of a key in [0, num_keys): its groups'
// means in group order, from one read of the key's entries to one write.
template <typename acc_t>
__device__ __forceinline__ void apply_key_run(int64_t i, int64_t num_pairs,
                                              const uint64_t* sorted_keys,
                                              const int32_t* sorted_groups,
                                              const acc_t* group_mean, int64_t* key_count,
                                              double* key_mean, double* key_var,
                                              int64_t num_keys, int64_t key_stride,
                                              double key_alpha) {
  const uint64_t key = sorted_keys[i];
  if (key >= static_cast<uint64_t>(num_keys) || (i > 0 && sorted_keys[i - 1] == key)) return;
  const int64_t slot = static_cast<int64_t>(key) * key_stride;
  int64_t n = key_count[slot];
  double m = key_mean[slot], v = key_var[slot];
  for (int64_t j = i; j < num_pairs && sorted_keys[j] == key; ++j) {
    visit_key(n, m, v, static_cast<double>(group_mean[sorted_groups[j]]), key_alpha);
  }
  key_count[slot] = n;
  key_mean[slot] = m;
  key_var[slot] = v;
}

// Block 0 updates the global history (update_global_history, as update_history_kernel does); the
// other blocks apply the runs of the sorted pairs, thread i owning the run that starts at i. The
// two halves touch disjoint state, so they share one launch.
template <typename acc_t>
__global__ void __launch_bounds__(kHistoryThreads)
    keyed_update_kernel(const acc_t* __restrict__ group_mean,
                        const uint64_t* __restrict__ sorted_keys,
                        const int32_t* __restrict__ sorted_groups, int64_t num_groups,
                        int64_t* key_count, double* key_mean, double* key_var, int64_t num_keys,
                        int64_t key_stride, double key_alpha, double* ring, int64_t window,
                        int64_t* count, double* ema, double* var, double alpha,
                        int64_t min_history) {
  if (blockIdx.x == 0) {
    update_global_history(group_mean, num_groups, ring, window, count, ema, var, alpha,
                          min_history);
    return;
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x - 1) * kHistoryThreads + threadIdx.x;
  if (i >= num_groups) return;
  apply_key_run(i, num_groups, sorted_keys, sorted_groups, group_mean, key_count, key_mean,
                key_var, num_keys, key_stride, key_alpha);
}

// The whole keyed update in one block, for up to kBlockKeyUpdateGroups groups: chunk by chunk of
// kHistoryThreads groups in group order, the chunk's (key, group) pairs (key K for a group that
// visits none, as key_pairs_kernel gives them) are sorted in shared memory with CUB's block radix
// sort, stable like the device-wide one, so each key's groups in the chunk form one run in group
// order; the runs are applied before the next chunk, so a key's visits across chunks keep group
// order too. Then the block updates the global history.
template <typename acc_t>
__global__ void __launch_bounds__(kHistoryThreads)
    keyed_update_block_kernel(const acc_t* __restrict__ group_mean,
                              const int64_t* __restrict__ keys, int64_t num_groups,
                              int64_t* key_count, double* key_mean, double* key_var,
                              int64_t num_keys, int64_t key_stride, double key_alpha,
                              int key_bits, double* ring, int64_t window, int64_t* count,
                              double* ema, double* var, double alpha, int64_t min_history) {
  // Radix digits of 3 bits rather than CUB's default 4: the ranking counters then take 20 KB of
  // shared memory instead of 36, which with the chunk's pairs and the global update's storage
  // stays under the 48 KB a kernel may declare statically.
  using PairSort = cub::BlockRadixSort<uint64_t, kHistoryThreads, 1, int32_t, 3>;
  __shared__ typename PairSort::TempStorage sort_storage;
  __shared__ uint64_t chunk_keys[kHistoryThreads];
  __shared__ int32_t chunk_groups[kHistoryThreads];
  const int tid = threadIdx.x;
  for (int64_t first = 0; first < num_groups; first += kHistoryThreads) {
    const int64_t g = first + tid;
    uint64_t key[1] = {static_cast<uint64_t>(num_keys)};
    int32_t group[1] = {static_cast<int32_t>(g)};
    if (g < num_groups && key_in_range(keys[g], num_keys) && is_finite(group_mean[g])) {
      key[0] = static_cast<uint64_t>(keys[g]);
    }
    PairSort(sort_storage).Sort(key, group, 0, key_bits);
    chunk_keys[tid] = key[0];
    chunk_groups[tid] = group[0];
    __syncthreads();
    apply_key_run(tid, kHistoryThreads, chunk_keys, chunk_groups, group_mean, key_count,
                  key_mean, key_var, num_keys, key_stride, key_alpha);
    // The chunk's writes to the tables are visible to the whole block from here, and the shared
    // arrays and the sort's storage are free again.
    __syncthreads();
  }
  update_global_history(group_mean, num_groups, ring, window, count, ema, var, alpha,
                        min_history);
}

// The scratch of the keyed update, as byte offsets into one allocation: the pairs before and
// after sorting, then CUB's temp storage.
struct ScratchLayout {
  size_t keys_in = 0, keys_out, groups_in, groups_out, temp, temp_bytes = 0;
};

constexpr size_t kScratchAlign = 256;

size_t align_up(size_t bytes) {
  return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

// Bits of the sort key: enough for the sentinel num_keys itself.
int sort_bits(int64_t num_keys) {
  int bits = 1;
  while (bits < 63 && (static_cast<uint64_t>(num_keys) >> bits) != 0) ++bits;
  return bits;
}

ScratchLayout scratch_layout(int64_t num_groups, int64_t num_keys) {
  const size_t n = static_cast<size_t>(num_groups);
  ScratchLayout l;
  l.keys_out = l.keys_in + align_up(n * sizeof(uint64_t));
  l.groups_in = l.keys_out + align_up(n * sizeof(uint64_t));
  l.groups_out = l.groups_in + align_up(n * sizeof(int32_t));
  l.temp = l.groups_out + align_up(n * sizeof(int32_t));
  // A size query (null storage): CUB computes the bytes it needs on the host and launches nothing.
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, l.temp_bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<int>(num_groups), 0, sort_bits(num_keys)));
  return l;
}

template <typename T>
T* at_offset(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

int team_size_for(int64_t rewards_per_group) {
  int team = 1;
  while (team < 32 && team < rewards_per_group) team *= 2;
  return team;
}

template <typename Launch>
void with_team(int team, Launch&& launch) {
  switch (team) {
    case 1: return launch(std::integral_constant<int, 1>{});
    case 2: return launch(std::integral_constant<int, 2>{});
    case 4: return launch(std::integral_constant<int, 4>{});
    case 8: return launch(std::integral_constant<int, 8>{});
    case 16: return launch(std::integral_constant<int, 16>{});
    default: return launch(std::integral_constant<int, 32>{});
  }
}

int team_for(const GroupArgs& args) {
  const int64_t per_group =
      args.offsets == nullptr ? args.group_size
                              : (args.num_rewards + args.num_groups - 1) / args.num_groups;
  return team_size_for(per_group);
}

unsigned blocks_for(int64_t num_groups, int team) {
  return static_cast<unsigned>((num_groups * team + kThreads - 1) / kThreads);
}

// Launches a kernel over every group with the team size that suits them. `kernel_for` is a
// callable taking the team size as a std::integral_constant and returning the kernel to launch,
// so the forward and backward share the team choice, grid shape and launch check.
template <typename KernelFor, typename... Args>
void launch_over_groups(const GroupArgs& args, cudaStream_t stream, KernelFor&& kernel_for,
                        Args&&... kernel_args) {
  if (args.num_groups == 0) return;
  with_team(team_for(args), [&](auto team_constant) {
    constexpr int TEAM = decltype(team_constant)::value;
    kernel_for(team_constant)<<<blocks_for(args.num_groups, TEAM), kThreads, 0, stream>>>(
        args, kernel_args...);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_keyed_history(const int64_t* keys, int64_t num_groups, const KeyTableView& tables,
                          const double* hist_mean, const double* hist_var,
                          double* group_hist_mean, double* group_hist_var, cudaStream_t stream) {
  if (num_groups == 0) return;
  const auto blocks = static_cast<unsigned>((num_groups + kThreads - 1) / kThreads);
  keyed_history_kernel<<<blocks, kThreads, 0, stream>>>(keys, num_groups, tables, hist_mean,
                                                        hist_var, group_hist_mean,
                                                        group_hist_var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t keyed_update_scratch_bytes(int64_t num_groups, int64_t num_keys) {
  if (num_groups <= kBlockKeyUpdateGroups) return 0;
  const ScratchLayout l = scratch_layout(num_groups, num_keys);
  return l.temp + l.temp_bytes;
}

// Up to kBlockKeyUpdateGroups groups one launch, keyed_update_block_kernel. Above, key_pairs_kernel,
// CUB's device-wide radix sort (its own kernels: one or a few passes, depending on the number of
// groups and of key bits) and keyed_update_kernel, which also updates the global history. All on
// `stream`, none synchronises with the host, so a CUDA graph can capture them.
template <typename acc_t>
void launch_update_keyed_history(const acc_t* group_mean, const int64_t* keys, int64_t num_groups,
                                 int64_t* key_count, double* key_mean, double* key_var,
                                 int64_t num_keys, int64_t key_stride, double key_alpha,
                                 void* scratch, double* ring, int64_t window, int64_t* count,
                                 double* ema, double* var, double alpha, int64_t min_history,
                                 cudaStream_t stream) {
  if (num_groups == 0) return;
  if (num_groups <= kBlockKeyUpdateGroups) {
    keyed_update_block_kernel<acc_t><<<1, kHistoryThreads, 0, stream>>>(
        group_mean, keys, num_groups, key_count, key_mean, key_var, num_keys, key_stride,
        key_alpha, sort_bits(num_keys), ring, window, count, ema, var, alpha, min_history);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  ScratchLayout l = scratch_layout(num_groups, num_keys);
  uint64_t* keys_in = at_offset<uint64_t>(scratch, l.keys_in);
  uint64_t* keys_out = at_offset<uint64_t>(scratch, l.keys_out);
  int32_t* groups_in = at_offset<int32_t>(scratch, l.groups_in);
  int32_t* groups_out = at_offset<int32_t>(scratch, l.groups_out);
  const auto blocks = static_cast<unsigned>((num_groups + kThreads - 1) / kThreads);
  key_pairs_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(group_mean, keys, num_groups, num_keys,
                                                           keys_in, groups_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      static_cast<char*>(scratch) + l.temp, l.temp_bytes, keys_in, keys_out, groups_in, groups_out,
      static_cast<int>(num_groups), 0, sort_bits(num_keys), stream));
  const auto run_blocks =
      static_cast<unsigned>(1 + (num_groups + kHistoryThreads - 1) / kHistoryThreads);
  keyed_update_kernel<acc_t><<<run_blocks, kHistoryThreads, 0, stream>>>(
      group_mean, keys_out, groups_out, num_groups, key_count, key_mean, key_var, num_keys,
      key_stride, key_alpha, ring, window, count, ema, var, alpha, min_history);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_group_forward(const GroupArgs& args, const scalar_t* rewards,
                          BatchSums<accumulate_t<scalar_t>> batch, scalar_t* advantages,
                          accumulate_t<scalar_t>* group_mean, accumulate_t<scalar_t>* group_std,
                          accumulate_t<scalar_t>* beta, cudaStream_t stream) {
  launch_over_groups(
      args, stream,
      [](auto team) { return group_forward_kernel<scalar_t, decltype(team)::value>; }, rewards,
      batch, advantages, group_mean, group_std, beta);
}

template <typename scalar_t>
void launch_group_backward(const GroupArgs& args, const scalar_t* rewards,
                           const scalar_t* grad_advantages, BatchSums<accumulate_t<scalar_t>> batch,
                           scalar_t* grad_rewards, cudaStream_t stream) {
  launch_over_groups(
      args, stream,
      [](auto team) { return group_backward_kernel<scalar_t, decltype(team)::value>; }, rewards,
      grad_advantages, batch, grad_rewards);
}

template <typename acc_t>
void launch_update_history(const acc_t* group_mean, int64_t num_groups, double* ring,
                           int64_t window, int64_t* count, double* ema, double* var, double alpha,
                           int64_t min_history, cudaStream_t stream) {
  if (num_groups == 0) return;
  update_history_kernel<acc_t><<<1, kHistoryThreads, 0, stream>>>(
      group_mean, num_groups, ring, window, count, ema, var, alpha, min_history);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define BV_BLEND_INSTANTIATE(scalar_t)                                                          \
  template void launch_group_forward<scalar_t>(                                                 \
      const GroupArgs&, const scalar_t*, BatchSums<accumulate_t<scalar_t>>, scalar_t*,          \
      accumulate_t<scalar_t>*, accumulate_t<scalar_t>*, accumulate_t<scalar_t>*, cudaStream_t); \
  template void launch_group_backward<scalar_t>(const GroupArgs&, const scalar_t*,              \
                                                const scalar_t*, BatchSums<accumulate_t<scalar_t>>, \
                                                scalar_t*, cudaStream_t);

BV_BLEND_INSTANTIATE(c10::Half)
BV_BLEND_INSTANTIATE(c10::BFloat16)
BV_BLEND_INSTANTIATE(float)
BV_BLEND_INSTANTIATE(double)
#undef BV_BLEND_INSTANTIATE

template void launch_update_history<float>(const float*, int64_t, double*, int64_t, int64_t*,
                                           double*, double*, double, int64_t, cudaStream_t);
template void launch_update_history<double>(const double*, int64_t, double*, int64_t, int64_t*,
                                            double*, double*, double, int64_t, cudaStream_t);

template void launch_update_keyed_history<float>(const float*, const int64_t*, int64_t, int64_t*,
                                                 double*, double*, int64_t, int64_t, double, void*,
                                                 double*, int64_t, int64_t*, double*, double*,
                                                 double, int64_t, cudaStream_t);
template void launch_update_keyed_history<double>(const double*, const int64_t*, int64_t,
                                                  int64_t*, double*, double*, int64_t, int64_t,
                                                  double, void*, double*, int64_t, int64_t*,
                                                  double*, double*, double, int64_t,
                                                  cudaStream_t);

}  // namespace bv_blend::cuda
