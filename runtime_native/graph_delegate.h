// A graph blob on the GPU: buffers allocated once, one submit per call.
//
// The C++ twin of runtime_py/graph_delegate.py, and as thin: it knows no op.
// init() creates every buffer the blob lists (constants and the initial state
// from the program's named data), one 256-byte uniform slot per step, every
// pipeline and bind group. A call then
//
//   1. reads the symbols (input dims, input_pos) from the inputs, checks their
//      ranges and the export's assertions, evaluates the expression table;
//   2. writes the inputs (int64 token ids become i32, checked) and every step's
//      Params (one upload, skipped when no value changed);
//   3. encodes every step into one compute pass -- a q4gsw linear takes the
//      kernel its route gives this M, planned as a linear-only delegate plans
//      it (plan.h) -- copies the outputs to a staging buffer, submits once,
//      maps once, and copies them into the output tensors, resized to the
//      shapes the expressions give.
//
// State buffers (the KV cache) persist across calls; reset_state() puts them
// back to their value at load. Every live graph delegate is listed, so one C
// entry (executorch_wgpu_reset_state, c_api.h) or the backend option
// "reset_state" resets them all.
#pragma once

#include <webgpu.h>

#include <executorch/runtime/core/error.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/named_data_map.h>
#include <executorch/runtime/core/span.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blob_reader.h"
#include "gpu_device.h"
#include "graph_reader.h"
#include "plan.h"

namespace wgq4_native {

// What went wrong, as the ExecuTorch status to return and the message to log.
struct Status {
  executorch::runtime::Error error = executorch::runtime::Error::Ok;
  std::string message;
  bool ok() const { return error == executorch::runtime::Error::Ok; }
};

// What the last call of a graph delegate did (runtime_py/graph_delegate.py GraphCall).
struct GraphCallRecord {
  uint64_t dispatches = 0;
  double gpu_us = -1;  // the compute pass by GPU timestamps; -1 without them
  double prepare_us = 0, encode_us = 0, wait_us = 0, readback_us = 0, wall_us = 0;
};

class GraphDelegate {
 public:
  // Reads nothing itself: `blob` was read and checked (graph_reader.h). Named data
  // (weights, the WGQ4 blobs of linears, non-zero initial state) from `named_data`.
  static std::unique_ptr<GraphDelegate> create(GpuDevice* gpu, GraphBlob blob,
                                               const executorch::runtime::NamedDataMap* named_data, Status* status);
  ~GraphDelegate();
  GraphDelegate(const GraphDelegate&) = delete;
  GraphDelegate& operator=(const GraphDelegate&) = delete;

  size_t input_count() const { return blob_.inputs.size(); }
  size_t output_count() const { return blob_.outputs.size(); }

  // args: the delegate's inputs, then its outputs (ExecuTorch's DelegateCall order).
  Status execute(executorch::runtime::Span<executorch::runtime::EValue*> args);

  // Every state buffer back to its value at load ("" or what failed).
  std::string reset_state();

 private:
  GraphDelegate() = default;
  struct PlannedCall {
    Plan plan;
    std::vector<WGPUComputePipeline> pipelines;
  };
  struct Linear {
    size_t step;                 // its uniform slot
    uint32_t x, m;               // the graph's buffer of its activations; the expr of M
    std::vector<GraphLinearPart> parts;  // its outputs: a fused linear's parts, else one (y, N, its name)
    std::vector<uint32_t> part_columns;  // a fused linear's part widths (q4_params); empty when unfused
    std::string name;
    uint32_t k, n, n_stride, group_size;
    Route route;
    int precision = 0;           // what its prefill runs in (prefill_precision_on)
    std::string reasons[2];      // route-report reason of M == 1 and M > 1
    WGPUBuffer qweight = nullptr, scales = nullptr, bias = nullptr;
    WGPUBindGroup bind_group = nullptr;
    std::map<uint64_t, PlannedCall> plans;  // by M
  };
  struct Dispatch {
    WGPUComputePipeline pipeline;
    WGPUBindGroup bind_group;
    uint32_t grid[3];
  };

  Status load(const executorch::runtime::NamedDataMap* named_data);
  Status named_bytes(const executorch::runtime::NamedDataMap* named_data, const std::string& key, const std::string& what,
                     std::vector<uint64_t>* storage, const uint8_t** data, size_t* size);
  std::string build_linear_bind_groups(uint64_t scratch_bytes);
  std::string plan_linear(Linear& lin, uint64_t m, const PlannedCall** out);
  Status read_inputs(executorch::runtime::Span<executorch::runtime::EValue*> args);

  GpuDevice* gpu_ = nullptr;
  Limits limits_{};
  GraphBlob blob_;
  std::vector<WGPUBuffer> buffers_;
  std::vector<uint64_t> sizes_;                                  // each buffer's allocated bytes
  std::vector<std::pair<size_t, std::vector<uint8_t>>> state_;   // state buffer, initial bytes (empty: zeros)
  WGPUBuffer uniform_ = nullptr, scratch_ = nullptr, staging_ = nullptr, resolve_ = nullptr;
  uint64_t scratch_size_ = 0, ts_offset_ = 0;
  WGPUQuerySet queries_ = nullptr;
  std::vector<WGPUComputePipeline> pipelines_;   // per step (nullptr for linears)
  std::vector<WGPUBindGroup> bind_groups_;       // per kernel step (nullptr for linears)
  std::vector<Linear> linears_;
  std::vector<uint64_t> output_offsets_;
  GpuDevice::MapState map_state_;

  // Per-call scratch, kept to avoid allocating on every call.
  std::vector<int64_t> symbols_, values_, stack_;
  std::vector<uint32_t> params_, uploaded_params_;
  std::vector<std::vector<int32_t>> converted_;  // int64 inputs as i32
  std::vector<std::pair<const void*, uint64_t>> input_data_;
  std::vector<Dispatch> dispatches_;
  std::vector<std::array<uint32_t, 3>> grids_;                      // per step (kernel steps)
  std::vector<std::pair<Linear*, const PlannedCall*>> linear_calls_;  // per linear, in step order

 public:
  GraphCallRecord last_call;
};

// Resets the state of every live graph delegate; how many, or -1 with *error set.
long reset_all_graph_state(std::string* error);
// The last call of any graph delegate in this process (for profiles); false when none ran.
bool last_graph_call(GraphCallRecord* out);

}  // namespace wgq4_native
