// See plan.h. Formulas mirror runtime_py/q4_linear.py and runtime_py/split_linear.py
// line for line (change them together); constants come from the registry.
#include "plan.h"

#include <algorithm>
#include <tuple>

namespace wgq4_native {

namespace {

constexpr uint32_t kQwBlock = 16;  // columns per packed weight block
constexpr uint64_t kGemvColumns = 4 * gemv::kQuads;      // columns per gemv workgroup (one 16-column block)
constexpr uint64_t kSkinnyColumns = 4 * skinny::kQuads;  // columns per skinny workgroup (one 16-column block)
constexpr uint64_t kMinRowsPerWorkgroup = skinny::kRows;  // the fewest rows a workgroup row covers

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

// (k_splits, k_chunk) for a shared-memory GEMM of tiles tm x tn x tk (shmem and its variants: one set of split knobs).
std::pair<uint64_t, uint64_t> k_split_for(uint64_t m, uint64_t k, uint64_t n_stride, uint64_t max_groups, uint64_t tm,
                                          uint64_t tn, uint64_t tk) {
  static_assert(shmem::kMaxKSplits == shmem_f16::kMaxKSplits && shmem::kSplitkMinChunk == shmem_f16::kSplitkMinChunk &&
                    shmem::kSplitkTargetWorkgroups == shmem_f16::kSplitkTargetWorkgroups &&
                    shmem::kMaxKSplits == shmem_int8::kMaxKSplits && shmem::kSplitkMinChunk == shmem_int8::kSplitkMinChunk &&
                    shmem::kSplitkTargetWorkgroups == shmem_int8::kSplitkTargetWorkgroups,
                "the registry gives shmem and its variants one set of split-K knobs (_SHMEM_PLAN)");
  const uint64_t tiles = ceil_div(n_stride, tn) * ceil_div(m, tm);
  const uint64_t splits =
      std::min({uint64_t(shmem::kMaxKSplits), max_groups, std::max<uint64_t>(1, k / shmem::kSplitkMinChunk),
                ceil_div(shmem::kSplitkTargetWorkgroups, tiles)});
  if (splits <= 1) return {1, k};
  const uint64_t chunk = ceil_div(ceil_div(k, splits), tk) * tk;
  return {ceil_div(k, chunk), chunk};
}

// (k_splits, k_chunk) for the GEMV: one quantization group per thread when K is long.
std::pair<uint64_t, uint64_t> gemv_k_split_for(uint64_t k, uint64_t group_size, uint64_t max_groups) {
  const uint64_t groups = k / group_size;
  const uint64_t splits =
      std::max<uint64_t>(1, std::min({uint64_t(gemv::kMaxKSplits), max_groups, groups / gemv::kSlices}));
  if (splits == 1) return {1, k};
  const uint64_t chunk = ceil_div(groups, splits) * group_size;
  return {ceil_div(k, chunk), chunk};
}

}  // namespace

Q4Params q4_params(const Plan& p, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                   const std::vector<uint32_t>& part_columns) {
  Q4Params q{};
  q.M = uint32_t(p.m), q.K = k, q.N = n, q.n_stride = n_stride, q.group_size = group_size;
  q.k_splits = p.k_splits, q.k_chunk = p.k_chunk;
  uint32_t starts[2] = {n, n}, start = 0;  // the first columns of parts 1 and 2; N where there is none
  for (size_t i = 0; i + 1 < part_columns.size() && i < 2; ++i) starts[i] = start += part_columns[i];
  q.part1 = starts[0], q.part2 = starts[1];
  return q;
}

std::string plan_call(Kernel kernel, uint64_t m, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                      uint32_t max_groups, Plan* out, int precision) {
  if (m == 0 || k == 0 || n == 0 || n_stride == 0 || group_size == 0 || max_groups == 0)
    return "cannot plan a call with M, K, N, n_stride, group size or max workgroups of 0";
  Plan p;
  p.kernel = kernel;
  p.runs = &kernel_info(kernel);
  if (m > 1 && precision_variant(kernel, precision)) p.runs = precision_variant(kernel, precision);
  p.m = m;
  uint64_t k_splits = 1, k_chunk = k, quantized_x_bytes = 0;
  const KernelInfo* prepass = nullptr;  // a kernel dispatched before the call's own (KernelInfo::prepass)
  uint64_t prepass_grid[3] = {};
  uint64_t grids[2][3] = {};
  int count = 1;
  switch (kernel) {
    case Kernel::Gemv: {
      if (m != 1) return "the gemv kernel computes M = 1 only, not M = " + std::to_string(m);
      std::tie(k_splits, k_chunk) = gemv_k_split_for(k, group_size, max_groups);
      uint64_t g[3] = {n_stride / kGemvColumns, 1, k_splits};
      std::copy(g, g + 3, grids[0]);
      break;
    }
    case Kernel::Regtiled: {
      uint64_t g[3] = {ceil_div(n_stride, regtiled::kTileN), ceil_div(m, regtiled::kTileM), 1};
      std::copy(g, g + 3, grids[0]);
      break;
    }
    case Kernel::Skinny: {
      uint64_t g[3] = {ceil_div(n_stride, kSkinnyColumns), ceil_div(m, skinny::kRows), 1};
      std::copy(g, g + 3, grids[0]);
      break;
    }
    case Kernel::Shmem: {
      const uint64_t tm = p.runs->tile[0], tn = p.runs->tile[1];  // shmem's or its variant's own tiles
      std::tie(k_splits, k_chunk) = k_split_for(m, k, n_stride, max_groups, tm, tn, p.runs->tile[2]);
      uint64_t g[3] = {ceil_div(n_stride, tn), ceil_div(m, tm), k_splits};
      std::copy(g, g + 3, grids[0]);
      if (p.runs->prepass) {  // quantize_int8: one invocation per row and block of k
        prepass = find_kernel(p.runs->prepass);
        if (!prepass) return std::string("the kernel registry has no ") + p.runs->prepass;
        const uint64_t block = quantize_int8::kInt8Block;
        prepass_grid[0] = ceil_div(m * k / block, prepass->workgroup_size[0]);
        prepass_grid[1] = prepass_grid[2] = 1;
        quantized_x_bytes = m * k + m * (k / block) * 4;
      }
      break;
    }
    default:
      return "unknown kernel " + std::to_string(int(kernel)) + ": the registry routes to it, plan.cpp has no grid for it";
  }
  static const KernelInfo* const reduce = find_kernel("splitk_reduce");
  if (k_splits > 1 && !reduce) return "the kernel registry has no splitk_reduce";
  if (k_splits > 1) {
    uint64_t r[3] = {ceil_div(m * n, reduce->workgroup_size[0]), 1, 1};
    std::copy(r, r + 3, grids[1]);
    count = 2;
  }
  if (prepass) {
    for (int i = 0; i < 3; ++i)
      if (prepass_grid[i] > max_groups)
        return std::string(p.runs->name) + " at M=" + std::to_string(m) + ", N=" + std::to_string(n) +
               ": grid exceeds " + std::to_string(max_groups) + " workgroups per dimension";
    p.dispatches.push_back(
        Dispatch{prepass, {uint32_t(prepass_grid[0]), uint32_t(prepass_grid[1]), uint32_t(prepass_grid[2])}});
  }
  for (int d = 0; d < count; ++d) {
    for (int i = 0; i < 3; ++i) {
      if (grids[d][i] > max_groups)
        return std::string(p.runs->name) + " at M=" + std::to_string(m) + ", N=" + std::to_string(n) +
               ": grid exceeds " + std::to_string(max_groups) + " workgroups per dimension";
    }
    Dispatch dispatch{d == 0 ? p.runs : reduce,
                      {uint32_t(grids[d][0]), uint32_t(grids[d][1]), uint32_t(grids[d][2])}};
    p.dispatches.push_back(dispatch);
  }
  p.k_splits = uint32_t(k_splits);
  p.k_chunk = uint32_t(k_chunk);
  p.partial_bytes = (k_splits == 1 ? 0 : k_splits * m * n * 4) + quantized_x_bytes;
  *out = std::move(p);
  return "";
}

std::string column_parts(const LinearBlob& b, const Limits& limits, std::vector<std::pair<uint32_t, uint32_t>>* out) {
  const uint64_t k = b.in_features;
  const uint64_t bytes_per_column = std::max(k / 8, k / b.group_size) * 4;  // qweight is the larger
  const uint64_t by_binding = limits.max_binding_bytes / bytes_per_column;
  // gemv and skinny grids: a workgroup per block of columns
  const uint64_t by_grid = uint64_t(limits.max_workgroups_per_dim) * std::min(kGemvColumns, kSkinnyColumns);
  uint64_t width = std::min({by_binding, by_grid, uint64_t(b.n_stride)});
  const uint64_t step = width >= shmem::kTn ? shmem::kTn : kQwBlock;  // whole shmem tiles when they fit
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
                       uint32_t part_n_stride, const Limits& limits, uint64_t m, uint64_t* rows_out, int precision) {
  const uint64_t k = k32;
  uint64_t rows = std::min({m, limits.max_binding_bytes / (k * 4), limits.max_binding_bytes / (uint64_t(part_n_stride) * 4),
                            uint64_t(limits.max_workgroups_per_dim) * kMinRowsPerWorkgroup});
  while (rows > 1) {
    Plan plan;
    if (plan_call(route.kernel_for(rows), rows, k32, part_n, part_n_stride, group_size,
                  limits.max_workgroups_per_dim, &plan, precision).empty() &&
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
