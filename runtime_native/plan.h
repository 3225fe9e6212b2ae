// How one call of a layer runs: which dispatches, on which grids.
//
// The C++ twin of runtime_py/q4_linear.py (plan_call, k_split_for,
// gemv_k_split_for) and runtime_py/split_linear.py (column_parts,
// chunk_rows). Tile sizes and split-K knobs come from the kernel registry
// (kernel_registry.h, generated from shaders/registry.py). Both runtimes
// must make the same plan for the same call -- tests/test_native.py compares
// them over many shapes -- so results agree bit for bit.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "blob_reader.h"

namespace wgq4_native {

struct Dispatch {
  const KernelInfo* kernel;  // a registry entry: a routable kernel or a helper (splitk_reduce)
  uint32_t grid[3];
};

struct Plan {
  Kernel kernel;               // the route's kernel
  const KernelInfo* runs = nullptr;  // the kernel the call runs: kernel's entry, or its precision variant's
  uint64_t m = 0;
  uint32_t k_splits = 1;
  uint32_t k_chunk = 0;
  uint64_t partial_bytes = 0;  // scratch the plan writes: split-K sums (none without split K), then any
                               // quantized activations (int8 prefill: q4gsw_int8_prelude.wgsl)
  std::vector<Dispatch> dispatches;
};

// The plan for `kernel` at M = m on a layer (part) of K x N; "" or why it
// cannot run (a grid beyond max_groups workgroups per dimension). precision: what the
// layer's prefill runs in (prefill_precision_on, q4_linear.h), so a call with M > 1 of a
// kernel that has a variant in it runs that variant, planned from its own tiles.
std::string plan_call(Kernel kernel, uint64_t m, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                      uint32_t max_groups, Plan* out, int precision = 0);

// The q4gsw kernels' Params for a plan of a layer of K x N (runtime_py/q4_linear.py q4_params);
// part_columns: the widths of a fused layer's output parts (kQ4OutputParts), empty for one part.
Q4Params q4_params(const Plan& p, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                   const std::vector<uint32_t>& part_columns = {});

struct Limits {
  uint64_t max_binding_bytes;   // largest storage buffer one binding may hold
  uint32_t max_workgroups_per_dim;
};

// [n0, n1) column ranges (multiples of 16) a layer splits into so each fits the limits.
std::string column_parts(const LinearBlob& b, const Limits& limits, std::vector<std::pair<uint32_t, uint32_t>>* out);

// Most rows of M one call of every part of a layer (name, K, group size, route)
// can take; part_n, part_n_stride: the widest part.
std::string chunk_rows(const std::string& name, uint32_t k, uint32_t group_size, const Route& route, uint32_t part_n,
                       uint32_t part_n_stride, const Limits& limits, uint64_t m, uint64_t* rows, int precision = 0);

}  // namespace wgq4_native
