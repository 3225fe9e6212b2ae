// See plan.h. Constants and formulas mirror runtime_py/q4_linear.py and
// runtime_py/split_linear.py line for line; change them together.
#include "plan.h"

#include <algorithm>
#include <tuple>

namespace wgq4_native {

namespace {

// The shmem GEMM splits K over extra workgroups when its 128 x 128 tiles alone
// would leave most of a large GPU idle (q4_linear.py SPLITK_*).
constexpr uint64_t kSplitkTargetWorkgroups = 256;
constexpr uint64_t kSplitkMinChunk = 256;
constexpr uint64_t kSplitkMaxSplits = 8;
constexpr uint64_t kGemvSlices = 64;     // K slices inside a GEMV workgroup
constexpr uint64_t kGemvMaxSplits = 8;
constexpr uint32_t kQwBlock = 16;        // columns per packed weight block
constexpr uint64_t kMinRowsPerWorkgroup = 4;  // skinny: grid y = ceil(M / 4)

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// (k_splits, k_chunk) for the shmem GEMM.
std::pair<uint64_t, uint64_t> k_split_for(uint64_t m, uint64_t k, uint64_t n_stride, uint64_t max_groups) {
  const uint64_t tiles = ceil_div(n_stride, 128) * ceil_div(m, 128);
  const uint64_t splits = std::min({kSplitkMaxSplits, max_groups, std::max<uint64_t>(1, k / kSplitkMinChunk),
                                    ceil_div(kSplitkTargetWorkgroups, tiles)});
  if (splits <= 1) return {1, k};
  const uint64_t chunk = ceil_div(ceil_div(k, splits), 16) * 16;
  return {ceil_div(k, chunk), chunk};
}

// (k_splits, k_chunk) for the GEMV: one quantization group per thread when K is long.
std::pair<uint64_t, uint64_t> gemv_k_split_for(uint64_t k, uint64_t group_size, uint64_t max_groups) {
  const uint64_t groups = k / group_size;
  const uint64_t splits = std::max<uint64_t>(1, std::min({kGemvMaxSplits, max_groups, groups / kGemvSlices}));
  if (splits == 1) return {1, k};
  const uint64_t chunk = ceil_div(groups, splits) * group_size;
  return {ceil_div(k, chunk), chunk};
}

}  // namespace

const char* const kSplitkReduceShader = "q4gsw_splitk_reduce.wgsl";

const char* shader_file(Kernel k) {
  switch (k) {
    case Kernel::Gemv: return "q4gsw_gemv.wgsl";
    case Kernel::Regtiled: return "q4gsw_gemm_regtiled.wgsl";
    case Kernel::Shmem: return "q4gsw_gemm_shmem.wgsl";
    case Kernel::Skinny: return "q4gsw_gemm_skinny.wgsl";
  }
  return "";
}

std::string plan_call(Kernel kernel, uint64_t m, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                      uint32_t max_groups, Plan* out) {
  if (m == 0 || k == 0 || n == 0 || n_stride == 0 || group_size == 0 || max_groups == 0)
    return "cannot plan a call with M, K, N, n_stride, group size or max workgroups of 0";
  Plan p;
  p.kernel = kernel;
  p.m = m;
  uint64_t k_splits = 1, k_chunk = k;
  uint64_t grids[2][3] = {};
  int count = 1;
  switch (kernel) {
    case Kernel::Gemv: {
      if (m != 1) return "the gemv kernel computes M = 1 only, not M = " + std::to_string(m);
      std::tie(k_splits, k_chunk) = gemv_k_split_for(k, group_size, max_groups);
      uint64_t g[3] = {n_stride / 16, 1, k_splits};
      std::copy(g, g + 3, grids[0]);
      if (k_splits > 1) {
        uint64_t r[3] = {ceil_div(n, 256), 1, 1};
        std::copy(r, r + 3, grids[1]);
        count = 2;
      }
      break;
    }
    case Kernel::Regtiled: {
      uint64_t g[3] = {ceil_div(n_stride, 32), ceil_div(m, 32), 1};
      std::copy(g, g + 3, grids[0]);
      break;
    }
    case Kernel::Skinny: {
      uint64_t g[3] = {ceil_div(n_stride, 16), ceil_div(m, 4), 1};
      std::copy(g, g + 3, grids[0]);
      break;
    }
    case Kernel::Shmem: {
      std::tie(k_splits, k_chunk) = k_split_for(m, k, n_stride, max_groups);
      uint64_t g[3] = {ceil_div(n_stride, 128), ceil_div(m, 128), k_splits};
      std::copy(g, g + 3, grids[0]);
      if (k_splits > 1) {
        uint64_t r[3] = {ceil_div(m * n, 256), 1, 1};
        std::copy(r, r + 3, grids[1]);
        count = 2;
      }
      break;
    }
  }
  for (int d = 0; d < count; ++d) {
    for (int i = 0; i < 3; ++i) {
      if (grids[d][i] > max_groups)
        return std::string(kernel_name(kernel)) + " at M=" + std::to_string(m) + ", N=" + std::to_string(n) +
               ": grid exceeds " + std::to_string(max_groups) + " workgroups per dimension";
    }
    Dispatch dispatch{d == 0 ? shader_file(kernel) : kSplitkReduceShader,
                      {uint32_t(grids[d][0]), uint32_t(grids[d][1]), uint32_t(grids[d][2])}};
    p.dispatches.push_back(dispatch);
  }
  p.k_splits = uint32_t(k_splits);
  p.k_chunk = uint32_t(k_chunk);
  p.partial_bytes = k_splits == 1 ? 0 : k_splits * m * n * 4;
  *out = std::move(p);
  return "";
}

std::string column_parts(const LinearBlob& b, const Limits& limits, std::vector<std::pair<uint32_t, uint32_t>>* out) {
  const uint64_t k = b.in_features;
  const uint64_t bytes_per_column = std::max(k / 8, k / b.group_size) * 4;  // qweight is the larger
  const uint64_t by_binding = limits.max_binding_bytes / bytes_per_column;
  const uint64_t by_grid = uint64_t(limits.max_workgroups_per_dim) * kQwBlock;  // gemv/skinny: a workgroup per 16 columns
  uint64_t width = std::min({by_binding, by_grid, uint64_t(b.n_stride)});
  const uint64_t step = width >= 128 ? 128 : kQwBlock;
  width = width / step * step;
  if (width < kQwBlock)
    return "layer " + py_repr(b.name) + ": 16 columns of K=" + std::to_string(k) + " (" +
           std::to_string(kQwBlock * bytes_per_column) + " bytes) exceed the " +
           std::to_string(limits.max_binding_bytes) + "-byte binding limit";
  out->clear();
  for (uint64_t n0 = 0; n0 < b.n_stride; n0 += width)
    out->emplace_back(uint32_t(n0), uint32_t(std::min<uint64_t>(n0 + width, b.n_stride)));
  return "";
}

std::string chunk_rows(const std::string& name, uint32_t k32, uint32_t group_size, const Route& route, uint32_t part_n,
                       uint32_t part_n_stride, const Limits& limits, uint64_t m, uint64_t* rows_out) {
  const uint64_t k = k32;
  uint64_t rows = std::min({m, limits.max_binding_bytes / (k * 4), limits.max_binding_bytes / (uint64_t(part_n_stride) * 4),
                            uint64_t(limits.max_workgroups_per_dim) * kMinRowsPerWorkgroup});
  while (rows > 1) {
    Plan plan;
    if (plan_call(route.kernel_for(rows), rows, k32, part_n, part_n_stride, group_size,
                  limits.max_workgroups_per_dim, &plan).empty() &&
        plan.partial_bytes <= limits.max_binding_bytes) {
      *rows_out = rows;
      return "";
    }
    rows /= 2;
  }
  if (rows < 1 || k * 4 > limits.max_binding_bytes)
    return "layer " + py_repr(name) + ": one row of x (K=" + std::to_string(k) + ") exceeds the " +
           std::to_string(limits.max_binding_bytes) + "-byte binding limit";
  *rows_out = 1;
  return "";
}

}  // namespace wgq4_native
